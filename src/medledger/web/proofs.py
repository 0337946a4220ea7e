"""A patient's audit trail together with everything a browser needs to check each entry
itself (static/verify.js): the entry's leaf bytes and RFC 6962 inclusion proof, the audit
root and size and the state root they were taken at (height h), and the header of block h + 1
— which carries the app hash after h — with its commit signatures and validator set, exactly
as CometBFT's RPC serves them.

The server checks the same things first with the SDK's light client, so a node whose own
answer does not verify says so instead of serving it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import msgspec

from medledger.client.lightclient import LightClientError, verify_commit
from medledger.client.records import AuditTrail, ProvenAuditEntry, RecordsClient
from medledger.client.sdk import ProofError
from medledger.ledger import merkle
from medledger.ledger.app import app_hash_of
from medledger.ledger.execution import AuditEntry


@dataclass(frozen=True)
class EntryProof:
    leaf: str
    inclusion_proof: tuple[str, ...]


@dataclass(frozen=True)
class AuditEvidence:
    trail: AuditTrail
    proofs: dict[int, EntryProof]
    anchor: dict[str, Any]

    def proof_of(self, entry: ProvenAuditEntry) -> EntryProof:
        return self.proofs[entry.index]


def audit_evidence(client: RecordsClient, patient: str) -> AuditEvidence:
    """The patient's audit entries, each with its proof, checked here and packed for the
    browser to check again."""
    ledger = client.ledger
    height, raw = ledger.query_raw("/audit/patient", patient.encode())
    answer = msgspec.json.decode(raw)
    size = int(answer["audit_size"])
    root = base64.b64decode(answer["audit_root"])
    state_root = base64.b64decode(answer["state_root"])
    header = ledger.verified_header(height + 1)
    commit = ledger.rpc("commit", height=height + 1)
    validators = ledger.rpc("validators", height=height + 1, per_page=100)
    try:
        again = verify_commit(ledger.chain_id, commit, validators)
    except LightClientError as exc:
        raise ProofError(f"header {height + 1} does not verify: {exc}") from None
    if app_hash_of(state_root, root, size) != header.app_hash or again.app_hash != header.app_hash:
        raise ProofError(f"audit root at height {height} is not the one the validators signed")
    entries = []
    proofs = {}
    for item in answer["entries"]:
        leaf = base64.b64decode(item["leaf"])
        path = [base64.b64decode(p) for p in item["inclusion_proof"]]
        index = int(item["index"])
        if not merkle.verify_inclusion(merkle.leaf_hash(leaf), index, size, path, root):
            raise ProofError(f"audit entry {index} fails its inclusion proof")
        entry = msgspec.msgpack.decode(leaf, type=AuditEntry)
        entries.append(ProvenAuditEntry(index, int(item["height"]), int(item["time_ns"]), entry))
        proofs[index] = EntryProof(
            str(item["leaf"]), tuple(str(p) for p in item["inclusion_proof"])
        )
    anchor = {
        "chain_id": ledger.chain_id,
        "height": height,
        "state_root": answer["state_root"],
        "audit_root": answer["audit_root"],
        "audit_size": size,
        "commit": commit,
        "validators": validators,
    }
    return AuditEvidence(AuditTrail(patient, entries, height, header), proofs, anchor)
