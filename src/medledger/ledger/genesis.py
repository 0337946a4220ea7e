"""The genesis state: the founding organizations, their admins and validators, parameters.

It comes from the `app_state` of CometBFT's genesis.json, the one file all founding nodes
share, so every replica starts from the same state.
"""

from __future__ import annotations

import base64
import binascii

import msgspec

from medledger.crypto.keys import member_id_for
from medledger.ledger.context import BlockContext
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.identity import check_key
from medledger.ledger.model import (
    PARAMS_KEY,
    Member,
    Organization,
    OrganizationKind,
    Params,
    Role,
    Status,
    Validator,
    member_key,
    organization_key,
    validator_key,
)
from medledger.ledger.state import State


class GenesisAdmin(msgspec.Struct, frozen=True):
    verify_key: str
    encryption_key: str


class GenesisValidator(msgspec.Struct, frozen=True):
    pub_key: str
    power: int


class GenesisOrganization(msgspec.Struct, frozen=True):
    id: str
    name: str
    kind: OrganizationKind
    admin: GenesisAdmin
    node_encryption_key: str
    node_verify_key: str
    validator: GenesisValidator | None = None


class AppState(msgspec.Struct, frozen=True):
    organizations: list[GenesisOrganization]
    params: dict[str, int] = msgspec.field(default_factory=dict)


def parse_app_state(raw: bytes) -> AppState:
    try:
        app_state = msgspec.json.decode(raw, type=AppState)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise LedgerError(Code.MALFORMED, f"invalid genesis app_state: {exc}") from None
    if not app_state.organizations:
        raise LedgerError(Code.INVALID_BODY, "genesis needs at least one organization")
    return app_state


def apply_genesis(state: State, block: BlockContext, app_state: AppState) -> list[Validator]:
    """Write the founding organizations, their admins, validators and parameters."""
    try:
        params = msgspec.convert(app_state.params, Params)
    except msgspec.ValidationError as exc:
        raise LedgerError(Code.INVALID_BODY, f"invalid genesis params: {exc}") from None
    state.write(PARAMS_KEY, params)
    validators: list[Validator] = []
    for org in app_state.organizations:
        if state.get(organization_key(org.id)) is not None:
            raise LedgerError(Code.CONFLICT, f"organization {org.id} appears twice in genesis")
        verify_key = _hex(org.admin.verify_key, f"{org.id} admin verify_key")
        encryption_key = _hex(org.admin.encryption_key, f"{org.id} admin encryption_key")
        node_key = _hex(org.node_encryption_key, f"{org.id} node_encryption_key")
        node_verify_key = _hex(org.node_verify_key, f"{org.id} node_verify_key")
        check_key(f"{org.id} node_verify_key", node_verify_key)
        for name, key in (("verify_key", verify_key), ("encryption_key", encryption_key)):
            check_key(f"{org.id} admin {name}", key)
        check_key(f"{org.id} node_encryption_key", node_key)
        admin_id = member_id_for(verify_key)
        state.write(
            organization_key(org.id),
            Organization(
                org.id, org.name, org.kind, admin_id, node_key, node_verify_key, Status.ACTIVE, 0
            ),
        )
        state.write(
            member_key(admin_id),
            Member(
                id=admin_id,
                organization=org.id,
                role=Role.ADMIN,
                verify_key=verify_key,
                encryption_key=encryption_key,
                status=Status.ACTIVE,
                enrolled_height=0,
                status_height=0,
                key_height=0,
            ),
        )
        if org.validator is not None:
            pub_key = _base64(org.validator.pub_key, f"{org.id} validator pub_key")
            check_key(f"{org.id} validator pub_key", pub_key)
            validator = Validator(pub_key, org.validator.power, org.id)
            state.write(validator_key(pub_key), validator)
            validators.append(validator)
    return validators


def _hex(value: str, what: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise LedgerError(Code.INVALID_BODY, f"{what} is not hex") from None


def _base64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise LedgerError(Code.INVALID_BODY, f"{what} is not base64") from None
