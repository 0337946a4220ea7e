"""What the node's FHIR facade, HL7 v2 listener and bulk services work with: this node's ledger
client, its custodial identities, its patient index, its token service and audit log.

The facade never bypasses the ledger: it acts as a custodial member through the same SDK a
client would use — writes are sealed, stored and committed; reads go through an access
request, key shares from t custodians and decryption. Inside the node (`ledger` and `home`
set by the composition root) the SDK reads committed state, stores packages and releases this
node's share in-process (`medledger.services`); only the mempool and the other custodians are
reached over the network.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from medledger.client.records import HomeNode, RecordsClient
from medledger.client.sdk import LedgerClient
from medledger.fhir.smart import TokenService
from medledger.fhir.validation_pool import ValidationPool
from medledger.services.custody import Custody
from medledger.services.mpi import PatientIndex
from medledger.store.node_audit import NodeAuditLog
from medledger.store.sqlite import CommittedView

# Per-request bounds of a search (and of $everything and type-level _history): how many
# records the ledger's indexes may offer as candidates, and how many new access requests
# (each one a ledger transaction, audited on the patient's trail) one request may issue.
MAX_SEARCH_CANDIDATES = 200
MAX_SEARCH_GRANTS = 50

# Bulk $export: unfinished jobs (running, or finished and holding decrypted output) per client
# and per node, and how long a finished job's output is kept in memory at most.
MAX_EXPORTS_PER_CLIENT = 2
MAX_EXPORTS_PER_NODE = 8
EXPORT_RETENTION = 600.0  # seconds

# Request bodies: size (bytes) and JSON nesting depth. A FHIR resource nests a few levels
# deep (a Bundle of resources a few more); nothing legitimate comes near these.
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64


@dataclass
class FhirContext:
    """`api_url` is where this process reaches its own node API (the listen address);
    `public_url` is the base URL clients use to reach this node (behind a reverse proxy, the
    proxy's URL), from which the FHIR base, every URL in a Bundle, and the SMART token
    endpoint (the `aud` a client assertion must name) are built. It defaults to `api_url`."""

    rpc_url: str
    chain_id: str
    api_url: str
    organization: str
    custody: Custody
    patients: PatientIndex
    tokens: TokenService
    audit: NodeAuditLog
    public_url: str = ""
    max_search_candidates: int = MAX_SEARCH_CANDIDATES
    max_search_grants: int = MAX_SEARCH_GRANTS
    max_exports_per_client: int = MAX_EXPORTS_PER_CLIENT
    max_exports_per_node: int = MAX_EXPORTS_PER_NODE
    export_retention: float = EXPORT_RETENTION
    max_body_bytes: int = MAX_BODY_BYTES
    max_json_depth: int = MAX_JSON_DEPTH
    # How the node's services reach the ledger and this node's record services; without them,
    # through CometBFT's RPC (`rpc_url`) and the node's HTTP API (`api_url`) like any client.
    ledger: Callable[[], LedgerClient] | None = None
    home: HomeNode | None = None
    # Committed state, for asking the ledger's rules ahead of a request (would this read be
    # granted; may this cached resource still be shown). Without it nothing is asked ahead:
    # every read goes to the ledger and nothing decrypted is served from memory.
    view: CommittedView | None = None
    # `[claims] payers`: a payer's identifier (system|value) or name, as imported claims name
    # it, -> the network insurer organization that is that payer.
    payers: Mapping[str, str] = field(default_factory=dict)
    # Large Bundles' resources are validated in worker processes (see validation_pool).
    validation: ValidationPool = field(default_factory=ValidationPool)
    _clients: dict[str, RecordsClient] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.public_url = (self.public_url or self.api_url).rstrip("/")

    @property
    def base_url(self) -> str:
        return f"{self.public_url}/fhir"

    @property
    def token_url(self) -> str:
        """The SMART token endpoint as clients name it (the audience of their assertions)."""
        return f"{self.base_url}/auth/token"

    def records_client(self, member_id: str) -> RecordsClient:
        """An SDK client acting as a custodial member (raises CustodyError if not held)."""
        with self._lock:
            client = self._clients.get(member_id)
            if client is None:
                keys = self.custody.keys_for(member_id)
                ledger = self.ledger() if self.ledger else LedgerClient(self.rpc_url, self.chain_id)
                client = RecordsClient(
                    ledger,
                    self.api_url,
                    keys,
                    member_id,
                    node_organization=self.organization if self.home else None,
                    home=self.home,
                )
                self._clients[member_id] = client
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.ledger.close()
                client.close()
            self._clients.clear()
        self.validation.close()


FHIR_CONTEXT = web.AppKey("fhir_context", FhirContext)
