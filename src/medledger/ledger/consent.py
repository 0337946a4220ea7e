"""Patient-managed consent: who may see which of my records, for what, until when.

A patient (or a delegate the patient registered: a guardian, a proxy) grants a grantee — one
member, a whole organization, or everyone in a role — a scope of records for a set of purposes
during a validity period, and may revoke it at any time.
Revocation takes effect for every access request executed after it.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from medledger.ledger.context import TxContext
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.identity import load_member, load_organization
from medledger.ledger.model import Member, Role
from medledger.ledger.records import CATEGORY, RECORD_ID, RESOURCE_TYPE, load_patient
from medledger.ledger.state import State

SECOND_NS = 1_000_000_000
MAX_SCOPE = 64


class GranteeKind(StrEnum):
    MEMBER = "member"
    ORGANIZATION = "organization"
    ROLE = "role"


class ScopeKind(StrEnum):
    ALL = "all"
    RESOURCE_TYPES = "resource-types"
    CATEGORIES = "categories"
    RECORDS = "records"


class Purpose(StrEnum):
    TREATMENT = "treatment"
    PAYMENT = "payment"
    OPERATIONS = "operations"
    RESEARCH = "research"


class ConsentStatus(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


class Consent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    patient: str
    grantor: str
    grantee_kind: GranteeKind
    grantee: str
    scope_kind: ScopeKind
    scope: tuple[str, ...]
    purposes: tuple[Purpose, ...]
    start_ns: int
    end_ns: int
    status: ConsentStatus
    granted_height: int
    revoked_height: int = 0
    revoke_reason: str = ""


class Delegation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    patient: str
    delegate: str
    relationship: str
    height: int


class GrantConsent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`consent.grant`"""

    patient: str
    grantee_kind: GranteeKind
    grantee: str
    scope_kind: ScopeKind
    scope: tuple[str, ...]
    purposes: tuple[Purpose, ...]
    start_ns: int
    end_ns: int


class RevokeConsent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`consent.revoke`"""

    patient: str
    consent_id: str
    reason: str = ""


class SetDelegate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`delegate.add` and `delegate.remove`"""

    patient: str
    delegate: str
    relationship: str = ""


RELATIONSHIPS = frozenset({"guardian", "parent", "proxy", "power-of-attorney", "caregiver"})


def consent_key(patient: str, consent_id: str) -> bytes:
    return f"consent/{patient}/{consent_id}".encode()


def consents_of(state: State, patient: str) -> list[Consent]:
    return state.read_all(f"consent/{patient}/".encode(), Consent)


def delegate_key(patient: str, delegate: str) -> bytes:
    return f"delegate/{patient}/{delegate}".encode()


def is_delegate(state: State, patient: str, member_id: str) -> bool:
    return state.get(delegate_key(patient, member_id)) is not None


def _require_patient_or_delegate(state: State, sender: Member, patient: str) -> None:
    if sender.id != patient and not is_delegate(state, patient, sender.id):
        raise LedgerError(
            Code.UNAUTHORIZED, "only the patient or a registered delegate may manage consent"
        )


def grant_consent(state: State, ctx: TxContext, body: GrantConsent) -> str:
    ctx.effects.subject = body.patient
    load_patient(state, body.patient)
    _require_patient_or_delegate(state, ctx.sender, body.patient)
    _check_grantee(state, body.grantee_kind, body.grantee)
    _check_scope(body.scope_kind, body.scope)
    if not body.purposes or len(set(body.purposes)) != len(body.purposes):
        raise LedgerError(Code.INVALID_BODY, "purposes: one or more, each once")
    if body.end_ns <= body.start_ns:
        raise LedgerError(Code.INVALID_BODY, "the validity period must end after it starts")
    if body.end_ns <= ctx.block.time_ns:
        raise LedgerError(Code.INVALID_BODY, "the validity period has already ended")
    consent_id = ctx.tx_hash.hex()[:32]
    state.write(
        consent_key(body.patient, consent_id),
        Consent(
            id=consent_id,
            patient=body.patient,
            grantor=ctx.sender.id,
            grantee_kind=body.grantee_kind,
            grantee=body.grantee,
            scope_kind=body.scope_kind,
            scope=body.scope,
            purposes=body.purposes,
            start_ns=body.start_ns,
            end_ns=body.end_ns,
            status=ConsentStatus.ACTIVE,
            granted_height=ctx.block.height,
        ),
    )
    return f"consent {consent_id} granted to {body.grantee_kind} {body.grantee}"


def revoke_consent(state: State, ctx: TxContext, body: RevokeConsent) -> str:
    ctx.effects.subject = body.patient
    _require_patient_or_delegate(state, ctx.sender, body.patient)
    consent = state.read(consent_key(body.patient, body.consent_id), Consent)
    if consent is None:
        raise LedgerError(Code.NOT_FOUND, f"patient has no consent {body.consent_id}")
    if consent.status is ConsentStatus.REVOKED:
        raise LedgerError(Code.CONFLICT, f"consent {consent.id} is already revoked")
    state.write(
        consent_key(body.patient, consent.id),
        msgspec.structs.replace(
            consent,
            status=ConsentStatus.REVOKED,
            revoked_height=ctx.block.height,
            revoke_reason=body.reason,
        ),
    )
    return f"consent {consent.id} revoked"


def add_delegate(state: State, ctx: TxContext, body: SetDelegate) -> str:
    """The patient registers a delegate who may manage their consent and read their records.
    Nobody else can: an admin who could would make anyone — themselves included — a reader of
    every record of the patient. (For a minor or a patient who cannot act, the desk enrolls the
    patient's keystore under the guardian's passphrase; the guardian then signs as the patient,
    and the trail shows it.)"""
    ctx.effects.subject = body.patient
    patient = load_patient(state, body.patient)
    if ctx.sender.id != patient.id:
        raise LedgerError(
            Code.UNAUTHORIZED, "a delegate is added by the patient's own signature only"
        )
    if body.relationship not in RELATIONSHIPS:
        raise LedgerError(Code.INVALID_BODY, f"relationship is one of {sorted(RELATIONSHIPS)}")
    delegate = load_member(state, body.delegate)
    if delegate.id == patient.id:
        raise LedgerError(Code.INVALID_BODY, "a patient is not their own delegate")
    if is_delegate(state, patient.id, delegate.id):
        raise LedgerError(Code.CONFLICT, f"{delegate.id} is already a delegate")
    state.write(
        delegate_key(patient.id, delegate.id),
        Delegation(patient.id, delegate.id, body.relationship, ctx.block.height),
    )
    return f"{delegate.id} is now a delegate ({body.relationship})"


def remove_delegate(state: State, ctx: TxContext, body: SetDelegate) -> str:
    ctx.effects.subject = body.patient
    patient = load_patient(state, body.patient)
    _require_patient_or_their_admin(ctx.sender, patient)
    if not is_delegate(state, patient.id, body.delegate):
        raise LedgerError(Code.NOT_FOUND, f"{body.delegate} is not a delegate")
    state.delete(delegate_key(patient.id, body.delegate))
    return f"{body.delegate} is no longer a delegate"


def _require_patient_or_their_admin(sender: Member, patient: Member) -> None:
    if sender.id == patient.id:
        return
    if sender.role is Role.ADMIN and sender.organization == patient.organization:
        return
    raise LedgerError(
        Code.UNAUTHORIZED, "only the patient or their organization's admin manages delegates"
    )


def _check_grantee(state: State, kind: GranteeKind, grantee: str) -> None:
    match kind:
        case GranteeKind.MEMBER:
            load_member(state, grantee)
        case GranteeKind.ORGANIZATION:
            load_organization(state, grantee)
        case GranteeKind.ROLE:
            if grantee not in {r.value for r in Role}:
                raise LedgerError(Code.INVALID_BODY, f"unknown role {grantee!r}")


def _check_scope(kind: ScopeKind, scope: tuple[str, ...]) -> None:
    if kind is ScopeKind.ALL:
        if scope:
            raise LedgerError(Code.INVALID_BODY, "scope 'all' takes no values")
        return
    if not scope or len(scope) > MAX_SCOPE or len(set(scope)) != len(scope):
        raise LedgerError(Code.INVALID_BODY, f"scope {kind}: 1-{MAX_SCOPE} distinct values")
    pattern = {
        ScopeKind.RESOURCE_TYPES: RESOURCE_TYPE,
        ScopeKind.CATEGORIES: CATEGORY,
        ScopeKind.RECORDS: RECORD_ID,
    }[kind]
    for value in scope:
        if not pattern.fullmatch(value):
            raise LedgerError(Code.INVALID_BODY, f"invalid {kind} value {value!r}")
