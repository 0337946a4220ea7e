"""Read-only queries over committed state, answered as JSON.

With `prove`, an answer carries what a client needs to check it against the app hash in the
header of the next block, which 2/3+ of the validators signed: the state proof, the state
root, the audit root and the audit size (see `medledger.ledger.app.app_hash_of`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from medledger.ledger import codec
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.execution import AuditEntry
from medledger.ledger.governance import Proposal, load_params, validators
from medledger.ledger.model import Member, Organization, member_key, nonce_key
from medledger.ledger.state import State
from medledger.store.sqlite import SqliteStore

QueryFn = Callable[[SqliteStore, bytes, bool], Any]


def _nonce(store: SqliteStore, data: bytes, prove: bool) -> Any:
    state = State(store)
    return {"next": (state.read(nonce_key(data.decode()), int) or 0) + 1}


def _member(store: SqliteStore, data: bytes, prove: bool) -> Any:
    key = member_key(data.decode())
    member = State(store).read(key, Member)
    if member is None:
        raise LedgerError(Code.NOT_FOUND, f"unknown member {data.decode()}")
    return _with_proof(store, key, member, prove)


def _members(store: SqliteStore, data: bytes, prove: bool) -> Any:
    members = State(store).read_all(b"member/", Member)
    org = data.decode()
    return [m for m in members if not org or m.organization == org]


def _organizations(store: SqliteStore, data: bytes, prove: bool) -> Any:
    return State(store).read_all(b"org/", Organization)


def _validators(store: SqliteStore, data: bytes, prove: bool) -> Any:
    return validators(State(store))


def _params(store: SqliteStore, data: bytes, prove: bool) -> Any:
    return load_params(State(store))


def _proposals(store: SqliteStore, data: bytes, prove: bool) -> Any:
    return State(store).read_all(b"proposal/", Proposal)


def _state(store: SqliteStore, data: bytes, prove: bool) -> Any:
    value = store.get(data)
    return _with_proof(store, data, value, prove, raw=True)


def _audit_entry(store: SqliteStore, data: bytes, prove: bool) -> Any:
    index = int(data.decode())
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
    old = int(data.decode())
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


def _block(store: SqliteStore, data: bytes, prove: bool) -> Any:
    block = store.block(int(data.decode()))
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


QUERIES: dict[str, QueryFn] = {
    "/nonce": _nonce,
    "/member": _member,
    "/members": _members,
    "/organizations": _organizations,
    "/validators": _validators,
    "/params": _params,
    "/proposals": _proposals,
    "/state": _state,
    "/audit/entry": _audit_entry,
    "/audit/consistency": _audit_consistency,
    "/block": _block,
}


def answer(store: SqliteStore, path: str, data: bytes, prove: bool) -> bytes:
    query = QUERIES.get(path)
    if query is None:
        raise LedgerError(Code.NOT_FOUND, f"unknown query path {path!r}")
    try:
        result = query(store, data, prove)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LedgerError(Code.INVALID_BODY, f"bad query data for {path}: {exc}") from None
    return msgspec.json.encode(result)
