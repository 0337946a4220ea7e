"""Access requests, decided deterministically when their block executes.

The patient, a delegate the patient registered, and the care team of the organization that
authored a record (its clinicians, emergency and lab staff and its EHR and LIS systems, for
treatment, payment and operations) have access. Anyone else — the author organization's
billing staff and auditors included — needs an active consent that covers the record and the
purpose at the block's time. A practitioner in the emergency role may break the glass with a
stated reason: the grant is short-lived and flagged for the patient to see. The parties to a
claim read its Claim and ClaimResponse records for payment (see `claim_party_basis`); the
records supporting a claim still need consent.
Granted and denied requests are both in the audit log, each with its reason; only a committed,
unexpired grant lets custodian nodes release key shares.
"""

from __future__ import annotations

import re
from enum import StrEnum

import msgspec

from medledger.ledger.claims import CLAIM_CATEGORY, PROVIDER_ROLES, claim_for_record
from medledger.ledger.consent import (
    SECOND_NS,
    Consent,
    ConsentStatus,
    GranteeKind,
    Purpose,
    ScopeKind,
    consent_key,
    consents_of,
    is_delegate,
)
from medledger.ledger.context import TxContext
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.governance import load_params
from medledger.ledger.model import Member, Role, member_key
from medledger.ledger.records import (
    AUTHOR_ROLES,
    RecordStatus,
    RecordVersion,
    load_head,
    load_version,
    record_key,
)
from medledger.ledger.state import State


class EmergencyReason(StrEnum):
    PATIENT_UNCONSCIOUS = "patient-unconscious"
    LIFE_THREATENING = "life-threatening"
    UNABLE_TO_CONSENT = "unable-to-consent"
    URGENT_TREATMENT = "urgent-treatment"


class Basis(StrEnum):
    PATIENT = "patient"
    DELEGATE = "delegate"
    AUTHOR_ORGANIZATION = "author-organization"
    CONSENT = "consent"
    EMERGENCY = "emergency"
    CLAIM_INSURER = "claim-insurer"
    CLAIM_PROVIDER = "claim-provider"


# The author organization's care team (and its EHR and LIS systems) uses its own records for
# treatment, payment and health care operations, as HIPAA permits a covered entity (45 CFR
# 164.506); research needs the patient's consent, and so does every other role of the
# organization — its billing staff and auditors included.
CARE_TEAM_ROLES = AUTHOR_ROLES
CARE_TEAM_PURPOSES = frozenset({Purpose.TREATMENT, Purpose.PAYMENT, Purpose.OPERATIONS})


class RequestAccess(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`access.request`: version 0 means the latest version."""

    record_id: str
    purpose: Purpose
    version: int = 0
    emergency: bool = False
    emergency_reason: str = ""


class Grant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    requester: str
    requester_organization: str
    record_id: str
    version: int
    patient: str
    resource_type: str
    purpose: Purpose
    basis: Basis
    consent_id: str
    emergency: bool
    emergency_reason: str
    height: int
    time_ns: int
    expires_ns: int


class RequestSession(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`access.session`: a patient's records for one purpose, for a short session — every
    record of `resource_types` (all types when empty) whose latest version the requester may
    read now, decided record by record as `access.request` decides one."""

    patient: str
    purpose: Purpose
    resource_types: tuple[str, ...] = ()


class CoveredRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One record version a session covers, and the basis it was granted on."""

    record_id: str
    version: int
    resource_type: str
    basis: Basis
    consent_id: str


class SessionGrant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a granted `access.session` lets its requester obtain key shares for, until
    `expires_ns`: the record versions it covered, each listed (so the accounting of
    disclosures names every record the session disclosed)."""

    id: str
    requester: str
    requester_organization: str
    patient: str
    purpose: Purpose
    records: tuple[CoveredRecord, ...]
    height: int
    time_ns: int
    expires_ns: int

    def grant_for(self, record_id: str, version: int) -> Grant | None:
        """The grant this session holds for one record version, as `access.request` would
        have recorded it; None when the session does not cover it."""
        covered = next(
            (c for c in self.records if c.record_id == record_id and c.version == version), None
        )
        if covered is None:
            return None
        return Grant(
            id=self.id,
            requester=self.requester,
            requester_organization=self.requester_organization,
            record_id=covered.record_id,
            version=covered.version,
            patient=self.patient,
            resource_type=covered.resource_type,
            purpose=self.purpose,
            basis=covered.basis,
            consent_id=covered.consent_id,
            emergency=False,
            emergency_reason="",
            height=self.height,
            time_ns=self.time_ns,
            expires_ns=self.expires_ns,
        )


# A session covers at most this many records, found among at most MAX_SESSION_SCAN of the
# patient's records: execution stays bounded whatever the patient's chart holds; a larger
# chart is read by resource type, or record by record.
MAX_SESSION_RECORDS = 1000
MAX_SESSION_SCAN = 5000
MAX_SESSION_TYPES = 32


def session_key(session_id: str) -> bytes:
    return f"session/{session_id}".encode()


def load_session(state: State, session_id: str) -> SessionGrant | None:
    return state.read(session_key(session_id), SessionGrant)


def grant_for(state: State, grant_id: str, record_id: str, version: int) -> Grant | None:
    """The grant `grant_id` names for one record version: an access request's grant for that
    version, or what a session of that id covers of it."""
    grant = load_grant(state, grant_id)
    if grant is not None:
        return grant if (grant.record_id, grant.version) == (record_id, version) else None
    session = load_session(state, grant_id)
    return session.grant_for(record_id, version) if session is not None else None


def grant_key(grant_id: str) -> bytes:
    return f"grant/{grant_id}".encode()


def patient_grant_key(patient: str, grant_id: str) -> bytes:
    return f"patient-grant/{patient}/{grant_id}".encode()


def load_grant(state: State, grant_id: str) -> Grant | None:
    return state.read(grant_key(grant_id), Grant)


def request_access(state: State, ctx: TxContext, body: RequestAccess) -> str:
    head = load_head(state, body.record_id)
    ctx.effects.subject = head.patient
    if head.erased:
        raise LedgerError(
            Code.ERASED,
            f"record {body.record_id} was erased at height {head.erased_height}",
            subject=head.patient,
        )
    version = load_version(state, body.record_id, body.version)
    if version.status is RecordStatus.ERASED:
        raise LedgerError(Code.ERASED, f"record {body.record_id} was erased", subject=head.patient)
    basis, consent_id, lifetime = decide(state, ctx, version, body)
    grant_id = ctx.tx_hash.hex()[:32]
    grant = Grant(
        id=grant_id,
        requester=ctx.sender.id,
        requester_organization=ctx.sender.organization,
        record_id=version.record_id,
        version=version.version,
        patient=version.patient,
        resource_type=version.resource_type,
        purpose=body.purpose,
        basis=basis,
        consent_id=consent_id,
        emergency=basis is Basis.EMERGENCY,
        emergency_reason=body.emergency_reason if basis is Basis.EMERGENCY else "",
        height=ctx.block.height,
        time_ns=ctx.block.time_ns,
        expires_ns=ctx.block.time_ns + lifetime * SECOND_NS,
    )
    state.write(grant_key(grant_id), grant)
    state.put(patient_grant_key(version.patient, grant_id), b"")
    flag = " EMERGENCY (break-the-glass)" if grant.emergency else ""
    via = f" via consent {consent_id}" if consent_id else ""
    return (
        f"granted{flag}: grant {grant_id} to {ctx.sender.id} for {body.purpose}"
        f" on {version.record_id} v{version.version} ({basis}{via})"
    )


def request_session(state: State, ctx: TxContext, body: RequestSession) -> str:
    """Grant the patient's records in scope that the requester may read now, in one
    transaction: opening a chart or a search page costs one commit, not one per record. Denied
    (and recorded as a denial on the patient's trail) when it covers none."""
    ctx.effects.subject = body.patient
    if len(body.resource_types) > MAX_SESSION_TYPES or not all(
        _RESOURCE_TYPE.fullmatch(t) for t in body.resource_types
    ):
        raise LedgerError(
            Code.INVALID_BODY,
            f"resource_types are at most {MAX_SESSION_TYPES} FHIR resource type names",
        )
    patient = state.read(member_key(body.patient), Member)
    if patient is None or patient.role is not Role.PATIENT:
        raise LedgerError(Code.NOT_FOUND, f"unknown patient {body.patient}")
    wanted = set(body.resource_types)
    params = load_params(state)
    covered: list[CoveredRecord] = []
    reasons: list[str] = []
    prefix = f"patient-record/{body.patient}/".encode()
    for scanned, (key, _) in enumerate(state.scan(prefix)):
        if scanned >= MAX_SESSION_SCAN:
            raise LedgerError(
                Code.TOO_LARGE,
                f"the patient has more than {MAX_SESSION_SCAN} records: open sessions by"
                " resource type, or request records one by one",
                subject=body.patient,
            )
        record_id = key[len(prefix) :].decode()
        head = load_head(state, record_id)
        if head.erased:
            continue
        version = load_version(state, record_id, head.latest)
        if version.status is RecordStatus.ERASED or (
            wanted and version.resource_type not in wanted
        ):
            continue
        basis = grant_basis(state, ctx.sender, version, body.purpose, ctx.block.time_ns)
        if isinstance(basis, str):
            if len(reasons) < 3:
                reasons.append(basis)
            continue
        covered.append(CoveredRecord(record_id, version.version, version.resource_type, *basis))
        if len(covered) > MAX_SESSION_RECORDS:
            raise LedgerError(
                Code.TOO_LARGE,
                f"a session covers at most {MAX_SESSION_RECORDS} records: open sessions by"
                " resource type",
                subject=body.patient,
            )
    if not covered:
        detail = "; ".join(reasons) if reasons else "the patient has no records in scope"
        raise _denied(body.patient, f"no record of the patient is covered: {detail}")
    session_id = ctx.tx_hash.hex()[:32]
    session = SessionGrant(
        id=session_id,
        requester=ctx.sender.id,
        requester_organization=ctx.sender.organization,
        patient=body.patient,
        purpose=body.purpose,
        records=tuple(covered),
        height=ctx.block.height,
        time_ns=ctx.block.time_ns,
        expires_ns=ctx.block.time_ns + params.session_grant_seconds * SECOND_NS,
    )
    state.write(session_key(session_id), session)
    state.put(patient_grant_key(body.patient, session_id), b"")
    return (
        f"granted: session {session_id} to {ctx.sender.id} for {body.purpose} on"
        f" {len(covered)} records of {body.patient}"
    )


_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")


def decide(
    state: State, ctx: TxContext, version: RecordVersion, body: RequestAccess
) -> tuple[Basis, str, int]:
    """(basis, consent id, grant lifetime in seconds), or a denial with its reason."""
    params = load_params(state)
    sender = ctx.sender
    patient = version.patient
    if body.emergency:
        if sender.role is not Role.EMERGENCY:
            raise _denied(patient, "only a practitioner in the emergency role may break the glass")
        if body.emergency_reason not in {r.value for r in EmergencyReason}:
            allowed = sorted(r.value for r in EmergencyReason)
            raise _denied(patient, f"break-the-glass needs a reason: one of {allowed}")
        return Basis.EMERGENCY, "", params.emergency_grant_seconds
    if body.emergency_reason:
        raise LedgerError(Code.INVALID_BODY, "an emergency reason without an emergency request")
    basis = grant_basis(state, sender, version, body.purpose, ctx.block.time_ns)
    if isinstance(basis, str):
        raise _denied(patient, basis)
    return basis[0], basis[1], params.access_grant_seconds


def grant_basis(
    state: State, sender: Member, version: RecordVersion, purpose: Purpose, now_ns: int
) -> tuple[Basis, str] | str:
    """The basis (and consent id) on which an ordinary — not break-the-glass — request by
    `sender` for `version` and `purpose` is granted at time `now_ns`, or the reason it is
    denied. The node's services ask it ahead of a request (against committed state at the last
    block's time) so as not to ask for what the ledger would deny; the ledger still decides."""
    patient = version.patient
    if sender.id == patient:
        return Basis.PATIENT, ""
    if is_delegate(state, patient, sender.id):
        return Basis.DELEGATE, ""
    if is_care_team(sender, version, purpose):
        return Basis.AUTHOR_ORGANIZATION, ""
    claim_basis = claim_party_basis(state, sender, version, purpose)
    if claim_basis is not None:
        return claim_basis, ""
    reasons: list[str] = []
    for consent in consents_of(state, patient):
        problem = consent_problem(consent, sender, version, purpose, now_ns)
        if problem is None:
            return Basis.CONSENT, consent.id
        if problem:
            reasons.append(f"consent {consent.id} {problem}")
    detail = "; ".join(reasons) if reasons else "the patient has granted this requester no consent"
    return f"no active consent covers {version.record_id} for {purpose}: {detail}"


def release_problem(state: State, member: Member, grant: Grant, now_ns: int) -> str | None:
    """Why a custodian must not release a share to `member` for `grant` at time `now_ns` (the
    last committed block's), or None: the grant is someone else's, has expired, its record was
    erased, or the consent it rests on no longer covers the record (revoked, expired, narrowed).
    The same rule keeps a node's cache of decrypted resources from outliving the grant."""
    if grant.requester != member.id:
        return "the grant belongs to another member"
    if now_ns >= grant.expires_ns:
        return "the grant has expired"
    version = state.read(record_key(grant.record_id, grant.version), RecordVersion)
    if version is None or version.status is RecordStatus.ERASED:
        return "the record was erased"
    if grant.basis is Basis.CONSENT:
        consent = state.read(consent_key(grant.patient, grant.consent_id), Consent)
        if consent is None:
            return "the consent behind the grant is gone"
        problem = consent_problem(consent, member, version, grant.purpose, now_ns)
        if problem is not None:
            return f"consent {consent.id} {problem or 'no longer covers the grantee'}"
    return None


def is_care_team(member: Member, version: RecordVersion, purpose: Purpose) -> bool:
    """The author-organization basis: a care-team role of the organization that wrote the
    record, reading for treatment, payment or operations."""
    return (
        member.organization == version.author_organization
        and member.role in CARE_TEAM_ROLES
        and purpose in CARE_TEAM_PURPOSES
    )


def claim_party_basis(
    state: State, sender: Member, version: RecordVersion, purpose: Purpose
) -> Basis | None:
    """The insurer of a claim reads the claim's FHIR Claim and ClaimResponse records, and the
    provider that submitted it reads the insurer's ClaimResponses, for payment only and only
    by a billing or clinician member (a claims examiner or medical reviewer). Nothing else is
    covered: the records supporting a claim need the patient's consent for payment."""
    if purpose is not Purpose.PAYMENT or version.category != CLAIM_CATEGORY:
        return None
    if sender.role not in PROVIDER_ROLES:
        return None
    claim = claim_for_record(state, version.record_id)
    if claim is None:
        return None
    if sender.organization == claim.insurer:
        return Basis.CLAIM_INSURER
    if sender.organization == claim.provider:
        return Basis.CLAIM_PROVIDER
    return None


def consent_problem(
    consent: Consent, sender: Member, version: RecordVersion, purpose: Purpose, now_ns: int
) -> str | None:
    """None when the consent covers the request; otherwise why not ("" when the consent is
    for somebody else altogether and not worth mentioning)."""
    if not _grantee_matches(consent, sender):
        return ""
    if consent.status is ConsentStatus.REVOKED:
        return f"was revoked at height {consent.revoked_height}"
    if now_ns < consent.start_ns:
        return "is not valid yet"
    if now_ns >= consent.end_ns:
        return "has expired"
    if purpose not in consent.purposes:
        return f"covers {', '.join(consent.purposes)}, not {purpose}"
    if not _scope_covers(consent, version):
        return f"does not cover {version.resource_type} {version.record_id}"
    return None


def _grantee_matches(consent: Consent, sender: Member) -> bool:
    match consent.grantee_kind:
        case GranteeKind.MEMBER:
            return consent.grantee == sender.id
        case GranteeKind.ORGANIZATION:
            return consent.grantee == sender.organization
        case GranteeKind.ROLE:
            return consent.grantee == sender.role.value
    return False


def _scope_covers(consent: Consent, version: RecordVersion) -> bool:
    match consent.scope_kind:
        case ScopeKind.ALL:
            return True
        case ScopeKind.RESOURCE_TYPES:
            return version.resource_type in consent.scope
        case ScopeKind.CATEGORIES:
            return version.category in consent.scope
        case ScopeKind.RECORDS:
            return version.record_id in consent.scope
    return False


def _denied(patient: str, reason: str) -> LedgerError:
    return LedgerError(Code.ACCESS_DENIED, f"denied: {reason}", subject=patient, decision=True)
