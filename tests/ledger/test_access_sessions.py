"""`access.session`: one access decision for a patient's records in scope, recorded with every
record version it covers; key release and the accounting of disclosures follow it record by
record, and revocation, erasure and expiry end it as they end a grant."""

from __future__ import annotations

import msgspec
import pytest
from conftest import Consortium
from test_records import People, consent, put_body

from medledger.ledger.access import (
    MAX_SESSION_TYPES,
    Basis,
    RequestSession,
    grant_for,
    load_session,
    release_problem,
)
from medledger.ledger.consent import GranteeKind, Purpose, RevokeConsent, ScopeKind
from medledger.ledger.errors import Code
from medledger.ledger.model import Member, member_key
from medledger.ledger.records import EraseRecord
from medledger.ledger.state import State
from medledger.node.inprocess import SECOND_NS


@pytest.fixture
def people(consortium: Consortium) -> People:
    return People(consortium)


def chart(c: Consortium, p: People) -> None:
    """Three Observations and a Condition about Maria, written at St. Mary's."""
    pid = p.patient.member_id
    for i in range(3):
        assert c.submit(p.doctor, "record.put", put_body(f"obs-{i}", pid)).ok
    condition = msgspec.structs.replace(
        put_body("cond-1", pid), resource_type="Condition", category="problem-list-item"
    )
    assert c.submit(p.doctor, "record.put", condition).ok


def open_session(
    c: Consortium, who: object, patient: str, *types: str, purpose: Purpose = Purpose.TREATMENT
) -> tuple[Code, str]:
    result = c.submit(who, "access.session", RequestSession(patient, purpose, types))  # type: ignore[arg-type]
    return result.code, result.log


def session_id(log: str) -> str:
    return log.split("session ")[1].split()[0]


def now_ns(c: Consortium) -> int:
    return c.chain.time_ns


def member(c: Consortium, keys: object) -> Member:
    found = State(c.chain.store).read(member_key(keys.member_id), Member)  # type: ignore[attr-defined]
    assert found is not None
    return found


def test_the_care_team_opens_a_session_over_the_whole_chart(
    consortium: Consortium, people: People
) -> None:
    c, p = consortium, people
    chart(c, p)
    code, log = open_session(c, p.doctor, p.patient.member_id)
    assert code is Code.OK, log
    assert "on 4 records" in log
    session = load_session(State(c.chain.store), session_id(log))
    assert session is not None
    assert sorted(r.record_id for r in session.records) == ["cond-1", "obs-0", "obs-1", "obs-2"]
    assert {r.basis for r in session.records} == {Basis.AUTHOR_ORGANIZATION}
    assert session.expires_ns == session.time_ns + 900 * SECOND_NS
    # Each covered version has a grant as an access request would have recorded it.
    grant = grant_for(State(c.chain.store), session.id, "obs-1", 1)
    assert grant is not None and grant.requester == p.doctor.member_id
    assert release_problem(State(c.chain.store), member(c, p.doctor), grant, now_ns(c)) is None
    # Another member cannot use it, nor can it name a version it does not cover.
    assert release_problem(State(c.chain.store), member(c, p.outsider), grant, now_ns(c))
    assert grant_for(State(c.chain.store), session.id, "obs-1", 2) is None
    # After its short lifetime it releases nothing.
    late = now_ns(c) + 901 * SECOND_NS
    assert release_problem(State(c.chain.store), member(c, p.doctor), grant, late) == (
        "the grant has expired"
    )


def test_a_consent_scope_limits_what_a_session_covers_and_revocation_ends_it(
    consortium: Consortium, people: People
) -> None:
    c, p = consortium, people
    chart(c, p)
    pid = p.patient.member_id
    # Without consent, another organization's clinician gets a recorded denial.
    code, log = open_session(c, p.outsider, pid)
    assert code is Code.ACCESS_DENIED and "no record of the patient is covered" in log
    body = consent(
        pid,
        GranteeKind.ORGANIZATION,
        "riverside",
        now_ns(c),
        scope_kind=ScopeKind.RESOURCE_TYPES,
        scope=("Condition",),
    )
    granted = c.submit(p.patient, "consent.grant", body)
    assert granted.ok, granted.log
    consent_id = granted.log.split("consent ")[1].split()[0]
    code, log = open_session(c, p.outsider, pid)
    assert code is Code.OK, log
    session = load_session(State(c.chain.store), session_id(log))
    assert session is not None
    assert [(r.record_id, r.basis, r.consent_id) for r in session.records] == [
        ("cond-1", Basis.CONSENT, consent_id)
    ]
    # Research is not a purpose the consent names.
    assert open_session(c, p.outsider, pid, purpose=Purpose.RESEARCH)[0] is Code.ACCESS_DENIED
    grant = grant_for(State(c.chain.store), session.id, "cond-1", 1)
    assert grant is not None
    outsider = member(c, p.outsider)
    assert release_problem(State(c.chain.store), outsider, grant, now_ns(c)) is None
    assert c.submit(p.patient, "consent.revoke", RevokeConsent(pid, consent_id, "no")).ok
    problem = release_problem(State(c.chain.store), outsider, grant, now_ns(c))
    assert problem is not None and "revoked" in problem


def test_a_session_by_resource_type_and_an_erased_record(
    consortium: Consortium, people: People
) -> None:
    c, p = consortium, people
    chart(c, p)
    pid = p.patient.member_id
    code, log = open_session(c, p.doctor, pid, "Observation")
    assert code is Code.OK and "on 3 records" in log
    session = load_session(State(c.chain.store), session_id(log))
    assert session is not None
    assert c.submit(p.patient, "record.erase", EraseRecord("obs-0", "mine")).ok
    grant = grant_for(State(c.chain.store), session.id, "obs-0", 1)
    assert grant is not None
    assert release_problem(State(c.chain.store), member(c, p.doctor), grant, now_ns(c)) == (
        "the record was erased"
    )
    # A new session leaves the erased record out; a type the patient has none of: denied.
    assert "on 2 records" in open_session(c, p.doctor, pid, "Observation")[1]
    assert open_session(c, p.doctor, pid, "Immunization")[0] is Code.ACCESS_DENIED


def test_bad_session_requests_get_clear_errors_and_change_nothing(
    consortium: Consortium, people: People
) -> None:
    c, p = consortium, people
    chart(c, p)
    pid = p.patient.member_id
    cases: list[tuple[RequestSession, Code]] = [
        (RequestSession("nobody", Purpose.TREATMENT), Code.NOT_FOUND),
        (RequestSession(p.doctor.member_id, Purpose.TREATMENT), Code.NOT_FOUND),
        (RequestSession(pid, Purpose.TREATMENT, ("observation",)), Code.INVALID_BODY),
        (RequestSession(pid, Purpose.TREATMENT, ("Observation/x",)), Code.INVALID_BODY),
        (
            RequestSession(
                pid, Purpose.TREATMENT, tuple(f"T{i}" for i in range(MAX_SESSION_TYPES + 1))
            ),
            Code.INVALID_BODY,
        ),
    ]
    for body, expected in cases:
        root = c.chain.store.state_root()
        result = c.submit(p.doctor, "access.session", body)
        assert result.code is expected, (body, result.log)
        assert c.chain.store.state_root() == root


def test_a_session_is_bounded_by_the_size_of_the_chart(
    consortium: Consortium, people: People, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medledger.ledger.access as access

    c, p = consortium, people
    chart(c, p)
    monkeypatch.setattr(access, "MAX_SESSION_RECORDS", 2)
    root = c.chain.store.state_root()
    code, log = open_session(c, p.doctor, p.patient.member_id)
    assert code is Code.TOO_LARGE and "by resource type" in log
    assert c.chain.store.state_root() == root
    monkeypatch.setattr(access, "MAX_SESSION_RECORDS", 1000)
    monkeypatch.setattr(access, "MAX_SESSION_SCAN", 3)
    assert open_session(c, p.doctor, p.patient.member_id)[0] is Code.TOO_LARGE
