"""Records, consent, access and erasure, driven in-process."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from conftest import Consortium, keys_for

from medledger.crypto.keys import KeyPair
from medledger.ledger import codec
from medledger.ledger.access import Grant, RequestAccess, grant_key
from medledger.ledger.consent import (
    SECOND_NS,
    GrantConsent,
    GranteeKind,
    Purpose,
    RevokeConsent,
    ScopeKind,
    SetDelegate,
)
from medledger.ledger.errors import Code
from medledger.ledger.execution import AuditEntry, TxResult
from medledger.ledger.model import Role
from medledger.ledger.records import (
    EraseRecord,
    MarkEnteredInError,
    PutRecord,
    PutRecords,
    RecordStatus,
    RecordVersion,
    record_key,
)
from medledger.ledger.state import State
from medledger.ledger.transactions import EnrollMember

CUSTODIANS = ("careplus", "northside-lab", "riverside", "st-mary")
DAY_NS = 86_400 * SECOND_NS


class People:
    def __init__(self, c: Consortium) -> None:
        self.c = c
        self.patient = self.enroll("st-mary", "patient-maria", Role.PATIENT)
        self.doctor = self.enroll("st-mary", "dr-alice", Role.CLINICIAN)
        self.outsider = self.enroll("riverside", "dr-priya", Role.CLINICIAN)
        self.er_doc = self.enroll("riverside", "dr-omar", Role.EMERGENCY)
        self.relative = self.enroll("st-mary", "maria-daughter", Role.DELEGATE)

    def enroll(self, org: str, name: str, role: Role) -> KeyPair:
        keys = keys_for(name)
        body = EnrollMember(keys.verify_key, keys.encryption_key, role)
        assert self.c.submit(self.c.admin(org), "member.enroll", body).ok
        return keys


@pytest.fixture
def people(consortium: Consortium) -> People:
    return People(consortium)


def put_body(record_id: str, patient: str, previous: int = 0, content: str = "v1") -> PutRecord:
    digest = hashlib.sha256(f"{record_id}/{content}".encode()).hexdigest()
    return PutRecord(
        record_id=record_id,
        patient=patient,
        resource_type="Observation",
        category="laboratory",
        package_digest=digest,
        package_size=2048,
        commitment=hashlib.sha256(content.encode()).digest(),
        threshold=2,
        custodians=CUSTODIANS,
        previous=previous,
    )


def request(
    c: Consortium,
    who: KeyPair,
    record_id: str,
    purpose: Purpose = Purpose.TREATMENT,
    **extra: object,
) -> TxResult:
    return c.submit(who, "access.request", RequestAccess(record_id, purpose, **extra))  # type: ignore[arg-type]


def consent(
    patient: str,
    grantee_kind: GranteeKind,
    grantee: str,
    now_ns: int,
    *,
    purposes: tuple[Purpose, ...] = (Purpose.TREATMENT,),
    scope_kind: ScopeKind = ScopeKind.ALL,
    scope: tuple[str, ...] = (),
    start: int = -DAY_NS,
    end: int = 30 * DAY_NS,
) -> GrantConsent:
    return GrantConsent(
        patient, grantee_kind, grantee, scope_kind, scope, purposes, now_ns + start, now_ns + end
    )


def test_clinician_elsewhere_needs_consent_and_loses_it_on_revocation(
    consortium: Consortium, people: People
) -> None:
    c, p = consortium, people
    patient_id = p.patient.member_id
    assert c.submit(p.doctor, "record.put", put_body("obs-1", patient_id)).ok

    denied = request(c, p.outsider, "obs-1")
    assert denied.code is Code.ACCESS_DENIED
    assert "no consent" in denied.log

    now = c.chain.time_ns
    grant = consent(patient_id, GranteeKind.ORGANIZATION, "riverside", now)
    granted_consent = c.submit(p.patient, "consent.grant", grant)
    assert granted_consent.ok
    consent_id = granted_consent.log.split()[1]

    allowed = request(c, p.outsider, "obs-1")
    assert allowed.ok and "via consent" in allowed.log
    grant_id = allowed.log.split("grant ")[1].split()[0]
    stored = State(c.chain.store).read(grant_key(grant_id), Grant)
    assert stored is not None and stored.basis == "consent" and not stored.emergency

    assert c.submit(p.patient, "consent.revoke", RevokeConsent(patient_id, consent_id)).ok
    again = request(c, p.outsider, "obs-1")
    assert again.code is Code.ACCESS_DENIED and "revoked" in again.log

    # Granted and denied requests are both on the patient's audit trail, with reasons.
    trail = [
        codec.decode(leaf, AuditEntry)
        for _, _, leaf in c.chain.store.audit_entries_about(patient_id)
    ]
    access_entries = [e for e in trail if e.type == "access.request"]
    assert [e.code for e in access_entries] == [Code.ACCESS_DENIED, Code.OK, Code.ACCESS_DENIED]
    assert all(e.subject == patient_id and e.log for e in access_entries)


def test_patient_and_author_organization_have_access(
    consortium: Consortium, people: People
) -> None:
    c, p = consortium, people
    assert c.submit(p.doctor, "record.put", put_body("obs-2", p.patient.member_id)).ok
    assert "(patient)" in request(c, p.patient, "obs-2").log
    colleague = p.enroll("st-mary", "dr-bob", Role.CLINICIAN)
    assert "(author-organization)" in request(c, colleague, "obs-2").log


@pytest.mark.parametrize(
    ("grant_kwargs", "expected"),
    [
        ({"purposes": (Purpose.RESEARCH,)}, "covers research, not treatment"),
        ({"start": 2 * DAY_NS}, "is not valid yet"),
        ({"scope_kind": ScopeKind.CATEGORIES, "scope": ("vital-signs",)}, "does not cover"),
        ({"scope_kind": ScopeKind.RESOURCE_TYPES, "scope": ("Condition",)}, "does not cover"),
        ({"scope_kind": ScopeKind.RECORDS, "scope": ("other-record",)}, "does not cover"),
    ],
)
def test_consent_outside_purpose_period_or_scope_is_refused(
    consortium: Consortium, people: People, grant_kwargs: dict[str, object], expected: str
) -> None:
    c, p = consortium, people
    assert c.submit(p.doctor, "record.put", put_body("obs-3", p.patient.member_id)).ok
    body = consent(
        p.patient.member_id,
        GranteeKind.MEMBER,
        p.outsider.member_id,
        c.chain.time_ns,
        **grant_kwargs,
    )  # type: ignore[arg-type]
    assert c.submit(p.patient, "consent.grant", body).ok
    result = request(c, p.outsider, "obs-3")
    assert result.code is Code.ACCESS_DENIED
    assert expected in result.log


def test_expired_consent_is_refused(consortium: Consortium, people: People) -> None:
    c, p = consortium, people
    assert c.submit(p.doctor, "record.put", put_body("obs-4", p.patient.member_id)).ok
    body = consent(
        p.patient.member_id, GranteeKind.ROLE, "clinician", c.chain.time_ns, end=3 * SECOND_NS
    )
    assert c.submit(p.patient, "consent.grant", body).ok
    assert request(c, p.outsider, "obs-4").ok
    c.run()
    c.run()
    result = request(c, p.outsider, "obs-4")
    assert result.code is Code.ACCESS_DENIED and "has expired" in result.log


def test_break_the_glass(consortium: Consortium, people: People) -> None:
    c, p = consortium, people
    assert c.submit(p.doctor, "record.put", put_body("obs-5", p.patient.member_id)).ok
    no_reason = request(c, p.er_doc, "obs-5", emergency=True)
    assert no_reason.code is Code.ACCESS_DENIED and "needs a reason" in no_reason.log
    wrong_role = request(
        c, p.outsider, "obs-5", emergency=True, emergency_reason="life-threatening"
    )
    assert wrong_role.code is Code.ACCESS_DENIED and "emergency role" in wrong_role.log
    ok = request(c, p.er_doc, "obs-5", emergency=True, emergency_reason="patient-unconscious")
    assert ok.ok and "EMERGENCY" in ok.log
    grant_id = ok.log.split("grant ")[1].split()[0]
    grant = State(c.chain.store).read(grant_key(grant_id), Grant)
    assert grant is not None and grant.emergency and grant.emergency_reason == "patient-unconscious"
    assert grant.expires_ns - grant.time_ns == 4 * 3600 * SECOND_NS


def test_amendments_and_entered_in_error(consortium: Consortium, people: People) -> None:
    c, p = consortium, people
    pid = p.patient.member_id
    assert c.submit(p.doctor, "record.put", put_body("obs-6", pid)).ok
    assert c.submit(p.doctor, "record.amend", put_body("obs-6", pid, 1, "v2")).ok
    stale = c.submit(p.doctor, "record.amend", put_body("obs-6", pid, 1, "v3"))
    assert stale.code is Code.CONFLICT
    foreign = c.submit(p.outsider, "record.amend", put_body("obs-6", pid, 2, "v3"))
    assert foreign.code is Code.UNAUTHORIZED
    assert c.submit(
        p.doctor, "record.mark-error", MarkEnteredInError("obs-6", 2, "wrong patient")
    ).ok
    state = State(c.chain.store)
    v1 = state.read(record_key("obs-6", 1), RecordVersion)
    v2 = state.read(record_key("obs-6", 2), RecordVersion)
    assert v1 is not None and v1.status is RecordStatus.SUPERSEDED
    assert v2 is not None and v2.status is RecordStatus.ENTERED_IN_ERROR and v2.previous == 1
    assert v2.author == p.doctor.member_id


def test_erasure_leaves_a_tombstone_and_stops_access(
    consortium: Consortium, people: People
) -> None:
    c, p = consortium, people
    pid = p.patient.member_id
    assert c.submit(p.doctor, "record.put", put_body("obs-7", pid)).ok
    assert c.submit(p.doctor, "record.amend", put_body("obs-7", pid, 1, "v2")).ok
    assert c.submit(p.outsider, "record.erase", EraseRecord("obs-7", "x")).code is Code.UNAUTHORIZED
    outcome = c.run(c.tx(p.patient, "record.erase", EraseRecord("obs-7", "GDPR Art. 17 request")))
    assert outcome.results[0].ok
    assert sorted(outcome.packages_erased) == sorted(
        [put_body("obs-7", pid).package_digest, put_body("obs-7", pid, 1, "v2").package_digest]
    )
    result = request(c, p.patient, "obs-7")
    assert result.code is Code.ERASED and "erased" in result.log
    v1 = State(c.chain.store).read(record_key("obs-7", 1), RecordVersion)
    assert v1 is not None and v1.status is RecordStatus.ERASED and v1.package_digest


def test_author_admin_may_erase_when_policy_allows(consortium: Consortium, people: People) -> None:
    c, p = consortium, people
    assert c.submit(p.doctor, "record.put", put_body("obs-8", p.patient.member_id)).ok
    assert c.submit(c.admin("st-mary"), "record.erase", EraseRecord("obs-8", "request at desk")).ok


def test_delegate_manages_consent(consortium: Consortium, people: People) -> None:
    c, p = consortium, people
    pid = p.patient.member_id
    body = consent(pid, GranteeKind.ORGANIZATION, "riverside", c.chain.time_ns)
    assert c.submit(p.relative, "consent.grant", body).code is Code.UNAUTHORIZED
    delegate = SetDelegate(pid, p.relative.member_id, "guardian")
    assert c.submit(p.patient, "delegate.add", delegate).ok
    assert c.submit(p.relative, "consent.grant", body).ok
    assert c.submit(p.patient, "delegate.remove", delegate).ok
    assert c.submit(p.relative, "consent.grant", body).code is Code.UNAUTHORIZED


def _changes_nothing(c: Consortium, who: KeyPair, tx_type: str, body: object, code: Code) -> None:
    root = c.chain.store.state_root()
    result = c.submit(who, tx_type, body)
    assert result.code is code, result.log
    assert c.chain.store.state_root() == root


def test_bad_record_input_gets_clear_errors_and_changes_nothing(
    consortium: Consortium, people: People
) -> None:
    c, p = consortium, people
    pid = p.patient.member_id
    good = put_body("obs-9", pid)
    replace = msgspec.structs.replace
    _changes_nothing(
        c, p.doctor, "record.put", replace(good, package_digest="xyz"), Code.INVALID_BODY
    )
    _changes_nothing(c, p.doctor, "record.put", replace(good, patient="nobody"), Code.NOT_FOUND)
    _changes_nothing(
        c, p.doctor, "record.put", replace(good, patient=p.doctor.member_id), Code.INVALID_BODY
    )
    _changes_nothing(
        c, p.doctor, "record.put", replace(good, custodians=CUSTODIANS[:3]), Code.CONFLICT
    )
    _changes_nothing(c, p.doctor, "record.put", replace(good, threshold=1), Code.INVALID_BODY)
    _changes_nothing(
        c, p.doctor, "record.put", replace(good, commitment=b"short"), Code.INVALID_BODY
    )
    _changes_nothing(
        c, p.doctor, "record.put", replace(good, record_id="../etc"), Code.INVALID_BODY
    )
    _changes_nothing(c, p.patient, "record.put", good, Code.UNAUTHORIZED)
    _changes_nothing(c, p.doctor, "record.amend", replace(good, previous=1), Code.NOT_FOUND)
    _changes_nothing(
        c, p.doctor, "access.request", RequestAccess("nope", Purpose.TREATMENT), Code.NOT_FOUND
    )
    _changes_nothing(c, p.doctor, "record.erase", EraseRecord("nope", "x"), Code.NOT_FOUND)
    _changes_nothing(c, p.patient, "consent.revoke", RevokeConsent(pid, "nope"), Code.NOT_FOUND)
    expired = consent(
        pid,
        GranteeKind.MEMBER,
        p.outsider.member_id,
        c.chain.time_ns,
        start=-2 * DAY_NS,
        end=-DAY_NS,
    )
    _changes_nothing(c, p.patient, "consent.grant", expired, Code.INVALID_BODY)
    for bad in (
        consent(pid, GranteeKind.MEMBER, "nobody", c.chain.time_ns),
        consent(pid, GranteeKind.ROLE, "wizard", c.chain.time_ns),
        consent(pid, GranteeKind.ORGANIZATION, "riverside", c.chain.time_ns, purposes=()),
        consent(pid, GranteeKind.ORGANIZATION, "riverside", c.chain.time_ns, scope=("x",)),
    ):
        root = c.chain.store.state_root()
        assert not c.submit(p.patient, "consent.grant", bad).ok
        assert c.chain.store.state_root() == root
    assert c.submit(p.doctor, "record.put", good).ok
    _changes_nothing(c, p.doctor, "record.put", good, Code.CONFLICT)


def test_put_many_is_all_or_nothing(consortium: Consortium, people: People) -> None:
    c, p = consortium, people
    pid = p.patient.member_id
    good = [put_body(f"bundle-{i}", pid, content=f"c{i}") for i in range(3)]
    broken = [*good[:2], msgspec.structs.replace(good[2], patient="nobody")]
    root = c.chain.store.state_root()
    refused = c.submit(p.doctor, "record.put-many", PutRecords(tuple(broken)))
    assert refused.code is Code.NOT_FOUND and refused.log.startswith("entry 2:")
    assert c.chain.store.state_root() == root
    outcome = c.run(c.tx(p.doctor, "record.put-many", PutRecords(tuple(good))))
    assert outcome.results[0].ok
    assert sorted(outcome.packages_stored) == sorted(b.package_digest for b in good)
    amend_and_new = (put_body("bundle-0", pid, 1, "c0-v2"), put_body("bundle-9", pid, content="n"))
    assert c.submit(p.doctor, "record.put-many", PutRecords(amend_and_new)).ok
    assert c.submit(p.doctor, "record.put-many", PutRecords(())).code is Code.INVALID_BODY
