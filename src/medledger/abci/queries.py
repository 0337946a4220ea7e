"""Read-only queries over committed state, answered as JSON.

With `prove`, an answer carries what a client needs to check it against the app hash in the
header of the next block, which 2/3+ of the validators signed: the state proof, the state
root, the audit root and the audit size (see `medledger.ledger.app.app_hash_of`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec

from medledger.ledger import codec
from medledger.ledger.access import load_grant, load_session
from medledger.ledger.claims import (
    PARTIES,
    all_claims,
    claim_stats,
    claims_of,
    load_claim,
)
from medledger.ledger.consent import Consent, ConsentStatus, GranteeKind, consents_of
from medledger.ledger.directory import (
    DIRECTORY_TYPES,
    entries_of_type,
    entry_by_identifier,
    entry_history,
    latest_entry,
)
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.execution import AuditEntry
from medledger.ledger.governance import Proposal, load_params, validators
from medledger.ledger.model import Member, Organization, member_key, nonce_key
from medledger.ledger.records import RecordHead, RecordVersion, head_key, record_key, versions_of
from medledger.ledger.state import State
from medledger.store.sqlite import CommittedReads, SqliteStore

log = logging.getLogger("medledger.query")

QueryFn = Callable[[CommittedReads, bytes, bool], Any]
ProofQueryFn = Callable[[SqliteStore, bytes, bool], Any]

# SQLite integers are signed 64-bit: a larger height or index must be refused before it
# reaches the database (which would raise OverflowError).
MAX_INTEGER = 2**63 - 1
MAX_QUERY_DATA = 4096


def _integer(data: bytes, name: str) -> int:
    """A decimal height, index or size from query data: digits only, within SQLite's range."""
    text = data.decode("ascii", errors="replace")
    if not text.isdigit() or not text.isascii() or len(text) > 19 or int(text) > MAX_INTEGER:
        raise LedgerError(Code.INVALID_BODY, f"{name} must be a whole number 0..{MAX_INTEGER}")
    return int(text)


def _nonce(store: CommittedReads, data: bytes, prove: bool) -> Any:
    state = State(store)
    return {"next": (state.read(nonce_key(data.decode()), int) or 0) + 1}


def _member(store: CommittedReads, data: bytes, prove: bool) -> Any:
    key = member_key(data.decode())
    member = State(store).read(key, Member)
    if member is None:
        raise LedgerError(Code.NOT_FOUND, f"unknown member {data.decode()}")
    if not prove:
        return member
    if not isinstance(store, SqliteStore):
        raise LedgerError(Code.INVALID_BODY, "proofs are answered through the node's RPC")
    return _with_proof(store, key, member, prove)


def _members(store: CommittedReads, data: bytes, prove: bool) -> Any:
    members = State(store).read_all(b"member/", Member)
    org = data.decode()
    return [m for m in members if not org or m.organization == org]


def _organizations(store: CommittedReads, data: bytes, prove: bool) -> Any:
    return State(store).read_all(b"org/", Organization)


def _validators(store: CommittedReads, data: bytes, prove: bool) -> Any:
    return validators(State(store))


def _params(store: CommittedReads, data: bytes, prove: bool) -> Any:
    return load_params(State(store))


def _proposals(store: CommittedReads, data: bytes, prove: bool) -> Any:
    return State(store).read_all(b"proposal/", Proposal)


def _state(store: SqliteStore, data: bytes, prove: bool) -> Any:
    value = store.get(data)
    return _with_proof(store, data, value, prove, raw=True)


def _audit_entry(store: SqliteStore, data: bytes, prove: bool) -> Any:
    index = _integer(data, "audit entry index")
    leaf = store.audit_leaf(index)
    log = store.audit_log()
    if leaf is None or index >= log.size:
        raise LedgerError(Code.NOT_FOUND, f"no audit entry {index}")
    height, raw = leaf
    return {
        "index": index,
        "height": height,
        "entry": codec.decode(raw, AuditEntry),
        "leaf": raw,
        "audit_size": log.size,
        "audit_root": log.root(),
        "inclusion_proof": log.inclusion_proof(index),
        **_anchor(store),
    }


def _audit_consistency(store: SqliteStore, data: bytes, prove: bool) -> Any:
    old = _integer(data, "old size")
    log = store.audit_log()
    if not 0 < old <= log.size:
        raise LedgerError(Code.INVALID_BODY, f"old size must be in 1..{log.size}")
    return {
        "old_size": old,
        "old_root": log.root_at(old),
        "audit_size": log.size,
        "audit_root": log.root(),
        "consistency_proof": log.consistency_proof(old),
        **_anchor(store),
    }


def _record(store: CommittedReads, data: bytes, prove: bool) -> Any:
    record_id = data.decode()
    state = State(store)
    head = state.read(head_key(record_id), RecordHead)
    if head is None:
        raise LedgerError(Code.NOT_FOUND, f"unknown record {record_id}")
    return {"head": head, "versions": versions_of(state, record_id)}


def _records(store: CommittedReads, data: bytes, prove: bool) -> Any:
    """A patient's records: each record's head and latest version."""
    patient = data.decode()
    state = State(store)
    prefix = f"patient-record/{patient}/".encode()
    answer = []
    for key, _ in state.scan(prefix):
        record_id = key[len(prefix) :].decode()
        head = state.read(head_key(record_id), RecordHead)
        if head is not None:
            latest = state.read(record_key(record_id, head.latest), RecordVersion)
            answer.append({"head": head, "latest": latest})
    return answer


def _consents(store: CommittedReads, data: bytes, prove: bool) -> Any:
    return consents_of(State(store), data.decode())


def _consents_granted_to(store: CommittedReads, data: bytes, prove: bool) -> Any:
    """The consents naming a member — as that member, their organization or their role —
    that are active and unexpired at the latest block's time ("patients who shared with me").

    Data: JSON {"member", "organization", "role"} (each optional). A full scan of `consent/`:
    fine for a pilot's few thousand consents; an index by grantee is the step after that."""
    grantee = msgspec.json.decode(data or b"{}", type=dict[str, str])
    wanted = {
        (GranteeKind.MEMBER, grantee.get("member", "")),
        (GranteeKind.ORGANIZATION, grantee.get("organization", "")),
        (GranteeKind.ROLE, grantee.get("role", "")),
    }
    now_ns = store.block_time_ns()
    return [
        consent
        for consent in State(store).read_all(b"consent/", Consent)
        if (consent.grantee_kind, consent.grantee) in wanted
        and consent.grantee
        and consent.status is ConsentStatus.ACTIVE
        and consent.start_ns <= now_ns < consent.end_ns
    ]


def _grant(store: CommittedReads, data: bytes, prove: bool) -> Any:
    grant = load_grant(State(store), data.decode())
    if grant is None:
        raise LedgerError(Code.NOT_FOUND, f"no grant {data.decode()}")
    return grant


def _session(store: CommittedReads, data: bytes, prove: bool) -> Any:
    session = load_session(State(store), data.decode())
    if session is None:
        raise LedgerError(Code.NOT_FOUND, f"no session {data.decode()}")
    return session


def _patient_audit(store: SqliteStore, data: bytes, prove: bool) -> Any:
    """Every audit entry concerning a patient, each with its inclusion proof in the audit log
    whose root and size the app hash of the next block commits to."""
    log = store.audit_log()
    entries = []
    for index, height, leaf in store.audit_entries_about(data.decode()):
        block = store.block(height)
        entries.append(
            {
                "index": index,
                "height": height,
                "time_ns": block.time_ns if block is not None else 0,
                "entry": codec.decode(leaf, AuditEntry),
                "leaf": leaf,
                "inclusion_proof": log.inclusion_proof(index),
            }
        )
    return {"entries": entries, "audit_size": log.size, "audit_root": log.root(), **_anchor(store)}


def _claim(store: CommittedReads, data: bytes, prove: bool) -> Any:
    """One claim with its whole history (metadata only: its content is sealed off-chain)."""
    return load_claim(State(store), data.decode())


def _claim_filter(data: bytes) -> tuple[str, str]:
    """Query data "patient:<member id>", "provider:<org id>" or "insurer:<org id>"; empty
    for every claim."""
    text = data.decode()
    if not text:
        return "", ""
    party, _, party_id = text.partition(":")
    if party not in PARTIES or not party_id:
        raise LedgerError(
            Code.INVALID_BODY, f"claims are listed by {' or '.join(f'{p}:<id>' for p in PARTIES)}"
        )
    return party, party_id


def _claims(store: CommittedReads, data: bytes, prove: bool) -> Any:
    party, party_id = _claim_filter(data)
    state = State(store)
    return claims_of(state, party, party_id) if party else all_claims(state)


def _claim_stats(store: CommittedReads, data: bytes, prove: bool) -> Any:
    """Per provider and insurer totals computed from the committed claims; with a filter,
    only that party's claims are counted."""
    party, party_id = _claim_filter(data)
    state = State(store)
    return claim_stats(claims_of(state, party, party_id) if party else all_claims(state))


def _block(store: CommittedReads, data: bytes, prove: bool) -> Any:
    block = store.block(_integer(data, "height"))
    if block is None:
        raise LedgerError(Code.NOT_FOUND, f"no block {data.decode()}")
    return {
        "height": block.height,
        "time_ns": block.time_ns,
        "tx_hashes": [codec.tx_hash(tx).hex() for tx in block.txs],
        "results": block.results,
        "audit_size": block.audit_size,
        "app_hash": block.app_hash,
    }


def _directory_type(text: str) -> str:
    if text not in DIRECTORY_TYPES:
        raise LedgerError(
            Code.INVALID_BODY, f"directory types are {', '.join(sorted(DIRECTORY_TYPES))}"
        )
    return text


def _directory_entry(store: CommittedReads, data: bytes, prove: bool) -> Any:
    """Query data "<Type>/<id>": the entry's latest version and its whole history."""
    resource_type, _, entry_id = data.decode().partition("/")
    state = State(store)
    latest = latest_entry(state, _directory_type(resource_type), entry_id)
    if latest is None:
        raise LedgerError(Code.NOT_FOUND, f"no directory entry {resource_type}/{entry_id}")
    return {"latest": latest, "versions": entry_history(state, resource_type, entry_id)}


def _directory_identifier(store: CommittedReads, data: bytes, prove: bool) -> Any:
    """Query data "<Type>\n<system>|<value>": the active entry holding the identifier."""
    resource_type, _, identifier = data.decode().partition("\n")
    state = State(store)
    entry_id = entry_by_identifier(state, _directory_type(resource_type), identifier)
    latest = None if entry_id is None else latest_entry(state, resource_type, entry_id)
    if latest is None:
        raise LedgerError(Code.NOT_FOUND, f"no {resource_type} has identifier {identifier}")
    return latest


def _directory_entries(store: CommittedReads, data: bytes, prove: bool) -> Any:
    """Query data "<Type>": the latest version of every entry of the type."""
    return entries_of_type(State(store), _directory_type(data.decode()))


def _anchor(store: SqliteStore) -> dict[str, Any]:
    log = store.audit_log()
    return {
        "state_root": store.state_root(),
        "anchor_audit_root": log.root(),
        "anchor_audit_size": log.size,
    }


def _with_proof(
    store: SqliteStore, key: bytes, value: Any, prove: bool, *, raw: bool = False
) -> Any:
    if not prove:
        return value
    proof = store.state_proof(key)
    return {"value": value, "proof": proof.to_json(), **_anchor(store)}


# Queries over committed state alone, which the node's own services also ask in-process.
QUERIES: dict[str, QueryFn] = {
    "/nonce": _nonce,
    "/member": _member,
    "/members": _members,
    "/organizations": _organizations,
    "/validators": _validators,
    "/params": _params,
    "/proposals": _proposals,
    "/block": _block,
    "/record": _record,
    "/records": _records,
    "/consents": _consents,
    "/consents/granted-to": _consents_granted_to,
    "/grant": _grant,
    "/session": _session,
    "/claim": _claim,
    "/claims": _claims,
    "/claims/stats": _claim_stats,
    "/directory/entry": _directory_entry,
    "/directory/identifier": _directory_identifier,
    "/directory/entries": _directory_entries,
}

# Queries whose answers carry what a client checks against a signed header (state and audit
# roots, proofs): they need the committed state tree, which only the store itself keeps.
PROOF_QUERIES: dict[str, ProofQueryFn] = {
    "/state": _state,
    "/audit/entry": _audit_entry,
    "/audit/consistency": _audit_consistency,
    "/audit/patient": _patient_audit,
}


def answer(store: SqliteStore, path: str, data: bytes, prove: bool) -> bytes:
    """The JSON answer to one query. Anyone who reaches the node's RPC may ask, so every
    failure — malformed data, a bug — is a LedgerError the ABCI adapter turns into an error
    answer; nothing a caller sends takes the application down."""
    proof_query = PROOF_QUERIES.get(path)
    if proof_query is not None:
        return _answer(path, data, lambda: proof_query(store, data, prove))
    return answer_from(store, path, data, prove)


def answer_from(reads: CommittedReads, path: str, data: bytes, prove: bool = False) -> bytes:
    """The JSON answer to a query of `QUERIES` over committed state read through `reads` (the
    node's services ask so in-process, from a snapshot of their own)."""
    query = QUERIES.get(path)
    if query is None:
        raise LedgerError(Code.NOT_FOUND, f"unknown query path {path[:64]!r}")
    return _answer(path, data, lambda: query(reads, data, prove))


def _answer(path: str, data: bytes, query: Callable[[], Any]) -> bytes:
    if len(data) > MAX_QUERY_DATA:
        raise LedgerError(Code.TOO_LARGE, f"query data is at most {MAX_QUERY_DATA} bytes")
    try:
        return msgspec.json.encode(query())
    except LedgerError:
        raise
    except (ValueError, UnicodeDecodeError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise LedgerError(Code.INVALID_BODY, f"bad query data for {path}: {exc}") from None
    except Exception as exc:
        log.exception("query failed", extra={"path": path})
        raise LedgerError(
            Code.INTERNAL, f"query {path} failed ({type(exc).__name__}); see the node's log"
        ) from None
