"""SMART Backend Services clients: EHR and laboratory systems registered on the ledger.

An organization's admin registers a client: its `client_id`, the public key (a JWK) that signs
its JWT assertions, the ledger member it acts as (a system client whose keys the node holds in
custody), and the most a token may ever grant it (SMART v2 scopes such as
`system/Observation.rs`). A revoked client can obtain no new token from this height on.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum

import msgspec

from medledger.ledger.context import TxContext
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.identity import load_member
from medledger.ledger.model import SYSTEM_ROLES
from medledger.ledger.state import State

CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# SMART v2 (`system/Observation.rs`, `system/*.cruds`) and v1 (`system/Observation.read`).
SCOPE = re.compile(r"system/(\*|[A-Z][A-Za-z]+)\.(c?r?u?d?s?|read|write|\*)")
MAX_SCOPES = 64
JWK_ALGORITHMS = {("OKP", "Ed25519"): "EdDSA", ("EC", "P-384"): "ES384", ("EC", "P-256"): "ES256"}


class ClientStatus(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


class SmartClient(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    client_id: str
    organization: str
    member: str
    jwk: str
    scopes: tuple[str, ...]
    status: ClientStatus
    registered_height: int
    revoked_height: int = 0


class RegisterClient(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`client.register`"""

    client_id: str
    member: str
    jwk: str
    scopes: tuple[str, ...]


class RevokeClient(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`client.revoke`"""

    client_id: str
    reason: str


def client_key(client_id: str) -> bytes:
    return f"smart-client/{client_id}".encode()


def load_client(state: State, client_id: str) -> SmartClient | None:
    return state.read(client_key(client_id), SmartClient)


# A public JWK is a flat object of short strings (`key_ops` and `x5c` are lists of them); an
# Ed25519 or P-384 key with its metadata is a few hundred bytes.
MAX_JWK_BYTES = 4096
MAX_JWK_MEMBER_BYTES = 1024
JwkValue = str | list[str] | bool


def jwk_algorithm(jwk_json: str) -> str:
    """The JWS algorithm a public JWK is used with; refuses private keys and other key types.

    The JWK is decoded into a flat typed structure, never as arbitrary JSON: arbitrary nesting
    would reach the interpreter's recursion limit, and that limit depends on the stack depth of
    the replica running it, so an exception there could differ between validators."""
    if len(jwk_json) > MAX_JWK_BYTES:
        raise LedgerError(Code.INVALID_BODY, f"jwk is at most {MAX_JWK_BYTES} characters")
    try:
        jwk = msgspec.json.decode(jwk_json.encode(), type=dict[str, JwkValue])
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeEncodeError) as exc:
        raise LedgerError(Code.INVALID_BODY, f"jwk must be a flat JSON object: {exc}") from None
    if len(_json_keys(jwk_json)) != len(jwk):
        raise LedgerError(Code.INVALID_BODY, "jwk has a member twice")
    if any(len(str(value)) > MAX_JWK_MEMBER_BYTES for value in jwk.values()):
        raise LedgerError(Code.INVALID_BODY, f"jwk members are at most {MAX_JWK_MEMBER_BYTES} long")
    if "d" in jwk:
        raise LedgerError(Code.INVALID_BODY, "jwk must be a public key (it has a private part)")
    algorithm = JWK_ALGORITHMS.get((str(jwk.get("kty")), str(jwk.get("crv"))))
    if algorithm is None:
        supported = ", ".join(f"{k}/{c}" for k, c in JWK_ALGORITHMS)
        raise LedgerError(Code.INVALID_BODY, f"jwk key type must be one of {supported}")
    if not isinstance(jwk.get("x"), str) or (
        jwk["kty"] == "EC" and not isinstance(jwk.get("y"), str)
    ):
        raise LedgerError(Code.INVALID_BODY, "jwk lacks its public coordinates")
    return algorithm


def _json_keys(jwk_json: str) -> list[str]:
    """Every member name of a flat JSON object, duplicates included (a decoder keeps only the
    last of two equal names, so "x" given twice would mean different keys to different
    parsers)."""
    names: list[str] = []
    json.loads(jwk_json, object_pairs_hook=lambda pairs: names.extend(k for k, _ in pairs))
    return names


def register_client(state: State, ctx: TxContext, body: RegisterClient) -> str:
    if not CLIENT_ID.fullmatch(body.client_id):
        raise LedgerError(Code.INVALID_BODY, "client_id: 1-128 of A-Z a-z 0-9 . _ : -")
    if state.get(client_key(body.client_id)) is not None:
        raise LedgerError(Code.CONFLICT, f"client {body.client_id} is already registered")
    member = load_member(state, body.member)
    if member.organization != ctx.sender.organization:
        raise LedgerError(Code.UNAUTHORIZED, "a client acts as a member of its own organization")
    if member.role not in SYSTEM_ROLES:
        raise LedgerError(
            Code.INVALID_BODY, f"a client acts as a system member (ehr, lis), not {member.role}"
        )
    jwk_algorithm(body.jwk)
    if (
        not body.scopes
        or len(body.scopes) > MAX_SCOPES
        or len(set(body.scopes)) != len(body.scopes)
    ):
        raise LedgerError(Code.INVALID_BODY, f"scopes: 1-{MAX_SCOPES} distinct SMART system scopes")
    for scope in body.scopes:
        if not SCOPE.fullmatch(scope):
            raise LedgerError(Code.INVALID_BODY, f"not a SMART system scope: {scope!r}")
    state.write(
        client_key(body.client_id),
        SmartClient(
            client_id=body.client_id,
            organization=ctx.sender.organization,
            member=member.id,
            jwk=body.jwk,
            scopes=body.scopes,
            status=ClientStatus.ACTIVE,
            registered_height=ctx.block.height,
        ),
    )
    return f"client {body.client_id} registered for {member.id}"


def revoke_client(state: State, ctx: TxContext, body: RevokeClient) -> str:
    client = load_client(state, body.client_id)
    if client is None:
        raise LedgerError(Code.NOT_FOUND, f"unknown client {body.client_id}")
    if client.organization != ctx.sender.organization:
        raise LedgerError(Code.UNAUTHORIZED, "only the client's organization may revoke it")
    if client.status is ClientStatus.REVOKED:
        raise LedgerError(Code.CONFLICT, f"client {body.client_id} is already revoked")
    if not body.reason.strip():
        raise LedgerError(Code.INVALID_BODY, "a reason is required")
    state.write(
        client_key(body.client_id),
        msgspec.structs.replace(
            client, status=ClientStatus.REVOKED, revoked_height=ctx.block.height
        ),
    )
    return f"client {body.client_id} revoked"
