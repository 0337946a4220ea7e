"""What the node's FHIR facade, HL7 v2 listener and bulk services work with: this node's ledger
client, its custodial identities, its patient index, its token service and audit log.

The facade never bypasses the ledger: it acts as a custodial member through the same SDK a
client would use — writes are sealed, uploaded and committed; reads go through an access
request, key shares from t custodians and decryption.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from aiohttp import web

from medledger.client.records import RecordsClient
from medledger.client.sdk import LedgerClient
from medledger.fhir.smart import TokenService
from medledger.node.custody import Custody
from medledger.node.mpi import PatientIndex
from medledger.store.node_audit import NodeAuditLog


@dataclass
class FhirContext:
    rpc_url: str
    chain_id: str
    api_url: str
    organization: str
    custody: Custody
    patients: PatientIndex
    tokens: TokenService
    audit: NodeAuditLog
    _clients: dict[str, RecordsClient] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        return f"{self.api_url}/fhir"

    def records_client(self, member_id: str) -> RecordsClient:
        """An SDK client acting as a custodial member (raises CustodyError if not held)."""
        with self._lock:
            client = self._clients.get(member_id)
            if client is None:
                keys = self.custody.keys_for(member_id)
                client = RecordsClient(
                    LedgerClient(self.rpc_url, self.chain_id), self.api_url, keys, member_id
                )
                self._clients[member_id] = client
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.ledger.close()
                client.close()
            self._clients.clear()


FHIR_CONTEXT = web.AppKey("fhir_context", FhirContext)
