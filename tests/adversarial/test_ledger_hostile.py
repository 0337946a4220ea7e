"""The ledger against hostile members: each test acts as the attacker would, through signed
transactions (the ledger's real interface), and checks that the refusal says why and changes
nothing. Threat model: docs/security.md."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import CHAIN_ID, ORGANIZATIONS, Consortium, genesis_app_state, keys_for

from medledger.client.tx import sign_transaction
from medledger.crypto.keys import KeyPair
from medledger.ledger import codec
from medledger.ledger.access import RequestAccess
from medledger.ledger.clients import RegisterClient
from medledger.ledger.consent import GrantConsent, GranteeKind, Purpose, ScopeKind, SetDelegate
from medledger.ledger.errors import Code
from medledger.ledger.execution import AuditEntry
from medledger.ledger.governance import Proposal
from medledger.ledger.model import (
    Member,
    Organization,
    OrganizationKind,
    ProposalStatus,
    Role,
    member_key,
    organization_key,
    proposal_key,
)
from medledger.ledger.records import PutRecord, threshold_for
from medledger.ledger.rules import TRANSACTION_RULES
from medledger.ledger.state import State
from medledger.ledger.transactions import (
    AddOrganization,
    AdminKeys,
    ChangeMemberStatus,
    EnrollMember,
    Propose,
    RemoveOrganization,
    RotateKey,
    SetParameter,
    Vote,
)
from medledger.node.inprocess import InProcessChain

CUSTODIANS = tuple(sorted(org for org, _, _ in ORGANIZATIONS))
DAY_NS = 86_400 * 1_000_000_000


def enroll(c: Consortium, org: str, name: str, role: Role) -> KeyPair:
    keys = keys_for(name)
    result = c.submit(
        c.admin(org), "member.enroll", EnrollMember(keys.verify_key, keys.encryption_key, role)
    )
    assert result.ok, result.log
    return keys


def put_body(record_id: str, patient: str, custodians: tuple[str, ...] = CUSTODIANS) -> PutRecord:
    digest = hashlib.sha256(record_id.encode()).hexdigest()
    return PutRecord(
        record_id=record_id,
        patient=patient,
        resource_type="Condition",
        category="problem-list-item",
        package_digest=digest,
        package_size=2048,
        commitment=hashlib.sha256(digest.encode()).digest(),
        threshold=threshold_for(len(custodians)),
        custodians=custodians,
    )


def state_root(c: Consortium) -> bytes:
    return c.chain.store.state_root()


def trail_of(c: Consortium, member_id: str) -> list[AuditEntry]:
    return [
        codec.decode(leaf, AuditEntry)
        for _, _, leaf in c.chain.store.audit_entries_about(member_id)
    ]


def grants(c: Consortium) -> list[bytes]:
    return [key for key, _ in State(c.chain.store).scan(b"grant/")]


class Hospital:
    """St. Mary's with two patients, its staff, and an outside clinician."""

    def __init__(self, c: Consortium) -> None:
        self.c = c
        self.maria = enroll(c, "st-mary", "patient-maria", Role.PATIENT)
        self.emma = enroll(c, "st-mary", "patient-emma", Role.PATIENT)
        self.doctor = enroll(c, "st-mary", "dr-alice", Role.CLINICIAN)
        self.billing = enroll(c, "st-mary", "billing-bob", Role.BILLING)
        self.auditor = enroll(c, "st-mary", "auditor-ann", Role.AUDITOR)
        self.ehr = enroll(c, "st-mary", "ehr-system", Role.EHR)
        self.daughter = enroll(c, "st-mary", "maria-daughter", Role.DELEGATE)
        result = c.submit(
            self.doctor, "record.put", put_body("maria-diabetes", self.maria.member_id)
        )
        assert result.ok, result.log


@pytest.fixture
def hospital(consortium: Consortium) -> Hospital:
    return Hospital(consortium)


# --- item 1: access bases by role -------------------------------------------------------------


def test_a_patient_cannot_read_another_patients_record_of_their_own_hospital(
    consortium: Consortium, hospital: Hospital
) -> None:
    result = consortium.submit(
        hospital.emma, "access.request", RequestAccess("maria-diabetes", Purpose.TREATMENT)
    )
    assert result.code is Code.ACCESS_DENIED, result.log
    assert "no active consent" in result.log
    # The denial is a recorded decision (it uses its nonce), and it grants nothing.
    assert grants(consortium) == []


@pytest.mark.parametrize("who", ["billing", "auditor", "daughter"])
def test_staff_outside_care_and_unrelated_delegates_need_consent(
    consortium: Consortium, hospital: Hospital, who: str
) -> None:
    keys = getattr(hospital, who)
    for purpose in Purpose:
        result = consortium.submit(keys, "access.request", RequestAccess("maria-diabetes", purpose))
        assert result.code is Code.ACCESS_DENIED, (who, purpose, result.log)
    assert grants(consortium) == []


@pytest.mark.parametrize("who", ["doctor", "ehr"])
def test_the_author_organizations_care_team_reads_for_treatment(
    consortium: Consortium, hospital: Hospital, who: str
) -> None:
    keys = getattr(hospital, who)
    ok = consortium.submit(
        keys, "access.request", RequestAccess("maria-diabetes", Purpose.TREATMENT)
    )
    assert ok.ok and "author-organization" in ok.log, ok.log
    research = consortium.submit(
        keys, "access.request", RequestAccess("maria-diabetes", Purpose.RESEARCH)
    )
    assert research.code is Code.ACCESS_DENIED, research.log


def test_a_delegate_reads_the_records_of_their_patient_only(
    consortium: Consortium, hospital: Hospital
) -> None:
    c, h = consortium, hospital
    body = SetDelegate(h.maria.member_id, h.daughter.member_id, "caregiver")
    assert c.submit(h.maria, "delegate.add", body).ok
    mine = c.submit(
        h.daughter, "access.request", RequestAccess("maria-diabetes", Purpose.TREATMENT)
    )
    assert mine.ok and "(delegate)" in mine.log, mine.log
    assert c.submit(h.doctor, "record.put", put_body("emma-asthma", h.emma.member_id)).ok
    other = c.submit(h.daughter, "access.request", RequestAccess("emma-asthma", Purpose.TREATMENT))
    assert other.code is Code.ACCESS_DENIED, other.log


def test_an_auditor_reads_content_only_under_consent(
    consortium: Consortium, hospital: Hospital
) -> None:
    c, h = consortium, hospital
    now = c.chain.time_ns
    grant = GrantConsent(
        h.maria.member_id,
        GranteeKind.MEMBER,
        h.auditor.member_id,
        ScopeKind.ALL,
        (),
        (Purpose.OPERATIONS,),
        now - DAY_NS,
        now + DAY_NS,
    )
    assert c.submit(h.maria, "consent.grant", grant).ok
    result = c.submit(
        h.auditor, "access.request", RequestAccess("maria-diabetes", Purpose.OPERATIONS)
    )
    assert result.ok and "(consent via consent" in result.log, result.log


# --- item 2: execution is total ---------------------------------------------------------------


def test_a_deeply_nested_jwk_is_refused_and_the_chain_goes_on(
    consortium: Consortium, hospital: Hospital
) -> None:
    c = consortium
    before = state_root(c)
    body = RegisterClient("evil-client", hospital.ehr.member_id, "[" * 60_000, ("system/*.rs",))
    refused = c.submit(c.admin("st-mary"), "client.register", body)
    assert refused.code is Code.INVALID_BODY, refused.log
    assert "jwk" in refused.log
    assert state_root(c) == before
    # The next block executes normally.
    assert enroll(c, "st-mary", "after-the-attack", Role.CLINICIAN)


@pytest.mark.parametrize(
    "jwk",
    [
        json.dumps({"kty": "OKP", "crv": "Ed25519", "x": {"nested": [[[[1]]]]}}),
        json.dumps({"kty": "OKP", "crv": "Ed25519", "x": "A" * 5000}),
        '{"kty": "OKP", "crv": "Ed25519", "x": "a", "x": "b"}',
        "1" * 5000,
    ],
)
def test_hostile_jwks_are_refused_with_a_reason(
    consortium: Consortium, hospital: Hospital, jwk: str
) -> None:
    body = RegisterClient("evil-client", hospital.ehr.member_id, jwk, ("system/*.rs",))
    before = state_root(consortium)
    result = consortium.submit(consortium.admin("st-mary"), "client.register", body)
    assert result.code in (Code.INVALID_BODY, Code.MALFORMED), result.log
    assert state_root(consortium) == before


def test_an_unexpected_exception_in_a_handler_becomes_an_error_result(
    consortium: Consortium, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net under every handler: whatever a bug raises, FinalizeBlock answers."""
    from dataclasses import replace

    def broken(state: State, ctx: object, body: object) -> str:
        state.put(b"half-written", b"x")
        raise ZeroDivisionError("a bug")

    rule = TRANSACTION_RULES["member.enroll"]
    monkeypatch.setitem(TRANSACTION_RULES, "member.enroll", replace(rule, handler=broken))
    keys = keys_for("victim")
    before = state_root(consortium)
    result = consortium.submit(
        consortium.admin("st-mary"),
        "member.enroll",
        EnrollMember(keys.verify_key, keys.encryption_key, Role.CLINICIAN),
    )
    assert result.code is Code.INTERNAL, result.log
    assert "ZeroDivisionError" in result.log
    assert state_root(consortium) == before
    assert State(consortium.chain.store).get(b"half-written") is None


# --- item 6: identifiers and digests are matched whole ----------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("package_digest", "a" * 64 + "\n"),
        ("record_id", "maria-x\n"),
        ("category", "laboratory\n"),
        ("resource_type", "Observation\n"),
    ],
)
def test_a_trailing_newline_is_not_a_valid_identifier(
    consortium: Consortium, hospital: Hospital, field: str, value: str
) -> None:
    import msgspec

    body = msgspec.structs.replace(
        put_body("maria-new", hospital.maria.member_id), **{field: value}
    )
    before = state_root(consortium)
    result = consortium.submit(hospital.doctor, "record.put", body)
    assert result.code is Code.INVALID_BODY, result.log
    assert state_root(consortium) == before


# --- item 9: nonces and the mempool -----------------------------------------------------------


def test_checktx_refuses_nonces_far_ahead(consortium: Consortium) -> None:
    ledger = consortium.chain.ledger
    admin = consortium.admin("st-mary")
    keys = keys_for("future")
    body = EnrollMember(keys.verify_key, keys.encryption_key, Role.CLINICIAN)
    far = sign_transaction(admin, CHAIN_ID, 10_000, "member.enroll", body)
    result = ledger.check_tx(far)
    assert result.code is Code.BAD_NONCE and "ahead" in result.log, result.log
    near = sign_transaction(admin, CHAIN_ID, 3, "member.enroll", body)
    assert ledger.check_tx(near).ok


def test_checktx_refuses_a_second_transaction_for_a_pending_nonce(consortium: Consortium) -> None:
    ledger = consortium.chain.ledger
    admin = consortium.admin("st-mary")
    first_keys, second_keys = keys_for("first"), keys_for("second")
    first = sign_transaction(
        admin,
        CHAIN_ID,
        1,
        "member.enroll",
        EnrollMember(first_keys.verify_key, first_keys.encryption_key, Role.CLINICIAN),
    )
    second = sign_transaction(
        admin,
        CHAIN_ID,
        1,
        "member.enroll",
        EnrollMember(second_keys.verify_key, second_keys.encryption_key, Role.CLINICIAN),
    )
    assert ledger.check_tx(first).ok
    duplicate = ledger.check_tx(second)
    assert duplicate.code is Code.BAD_NONCE and "pending" in duplicate.log
    # A recheck of the transaction already pending is still accepted.
    assert ledger.check_tx(first, recheck=True).ok
    # After the block that commits nonce 1, the pending set starts again.
    consortium.run(first)
    assert ledger.check_tx(second).code is Code.BAD_NONCE


def test_proposals_leave_out_transactions_that_cannot_execute(consortium: Consortium) -> None:
    from medledger.abci.application import LedgerApplication

    app = LedgerApplication(consortium.chain.store)
    admin = consortium.admin("st-mary")
    keys = keys_for("gap")
    body = EnrollMember(keys.verify_key, keys.encryption_key, Role.CLINICIAN)
    gapped = sign_transaction(admin, CHAIN_ID, 5, "member.enroll", body)
    good = sign_transaction(admin, CHAIN_ID, 1, "member.enroll", body)
    chosen = app.ledger.select_for_proposal([gapped, b"garbage", good], max_bytes=1 << 20)
    assert chosen == [good]


# --- item 12: threshold ----------------------------------------------------------------------


@pytest.mark.parametrize("count,expected", [(1, 1), (2, 2), (3, 2), (4, 2), (7, 3), (10, 4)])
def test_no_single_custodian_can_decrypt_when_there_are_two_or_more(
    count: int, expected: int
) -> None:
    assert threshold_for(count) == expected


def test_governance_cannot_shrink_custodians_below_two(tmp_path: Path) -> None:
    orgs = ORGANIZATIONS[:2]
    chain = InProcessChain(tmp_path / "two.db", CHAIN_ID, genesis_app_state(orgs))
    c = Consortium(chain)
    before = state_root(c)
    body = Propose(RemoveOrganization("riverside"), reason="leaving")
    result = c.submit(c.admin("st-mary"), "gov.propose", body)
    assert result.code is Code.CONFLICT and "at least 2" in result.log, result.log
    assert state_root(c) == before
    chain.close()


# --- item 13: admin actions on a member -------------------------------------------------------


def test_an_admin_rotating_a_patients_keys_shows_in_the_patients_trail(
    consortium: Consortium, hospital: Hospital
) -> None:
    c, h = consortium, hospital
    new = keys_for("maria-taken-over")
    body = RotateKey(h.maria.member_id, new.verify_key, new.encryption_key)
    assert c.submit(c.admin("st-mary"), "member.rotate", body).ok
    entries = [e for e in trail_of(c, h.maria.member_id) if e.type == "member.rotate"]
    assert len(entries) == 1
    assert entries[0].sender == c.admin("st-mary").member_id
    assert "by admin" in entries[0].log


def test_admin_status_changes_show_in_the_members_trail(
    consortium: Consortium, hospital: Hospital
) -> None:
    c, h = consortium, hospital
    body = ChangeMemberStatus(h.maria.member_id, "suspected compromise")
    assert c.submit(c.admin("st-mary"), "member.suspend", body).ok
    assert c.submit(c.admin("st-mary"), "member.reinstate", body).ok
    kinds = [e.type for e in trail_of(c, h.maria.member_id)]
    assert "member.suspend" in kinds and "member.reinstate" in kinds


def test_an_admin_cannot_make_anyone_a_delegate_without_the_patient(
    consortium: Consortium, hospital: Hospital
) -> None:
    c, h = consortium, hospital
    admin = c.admin("st-mary")
    before = state_root(c)
    for delegate in (admin.member_id, h.daughter.member_id):
        body = SetDelegate(h.maria.member_id, delegate, "proxy")
        result = c.submit(admin, "delegate.add", body)
        assert result.code is Code.UNAUTHORIZED and "patient's own" in result.log, result.log
    assert state_root(c) == before
    # The refusal is in the patient's trail.
    refused = [e for e in trail_of(c, h.maria.member_id) if e.type == "delegate.add"]
    assert [e.code for e in refused] == [Code.UNAUTHORIZED, Code.UNAUTHORIZED]


# --- governance re-validated at execution, parameter bounds -----------------------------------


def _add_org(org_id: str, seed: str) -> Propose:
    admin = keys_for(f"{seed}/admin")
    node = keys_for(f"{seed}/node")
    return Propose(
        AddOrganization(
            id=org_id,
            name=f"{seed} clinic",
            kind=OrganizationKind.CLINIC,
            admin=AdminKeys(admin.verify_key, admin.encryption_key),
            node_encryption_key=node.encryption_key,
            node_verify_key=node.verify_key,
        ),
        reason="join",
    )


def test_a_second_proposal_for_the_same_organization_cannot_overwrite_it(
    consortium: Consortium,
) -> None:
    c = consortium
    assert c.submit(c.admin("st-mary"), "gov.propose", _add_org("eastside", "honest")).ok
    assert c.submit(c.admin("riverside"), "gov.propose", _add_org("eastside", "takeover")).ok
    for org in ("riverside", "northside-lab"):
        assert c.submit(c.admin(org), "gov.vote", Vote(1, True)).ok
    org = State(c.chain.store).read(organization_key("eastside"), Organization)
    assert org is not None and org.admin == keys_for("honest/admin").member_id
    # Five organizations now: four approvals pass the second proposal, which then fails.
    for voter in ("st-mary", "northside-lab", "careplus"):
        result = c.submit(c.admin(voter), "gov.vote", Vote(2, True))
        assert result.ok, result.log
    proposal = State(c.chain.store).read(proposal_key(2), Proposal)
    assert proposal is not None and proposal.status is ProposalStatus.FAILED
    assert "exists" in proposal.outcome
    org = State(c.chain.store).read(organization_key("eastside"), Organization)
    assert org is not None and org.admin == keys_for("honest/admin").member_id
    assert (
        State(c.chain.store).read(member_key(keys_for("takeover/admin").member_id), Member) is None
    )


@pytest.mark.parametrize(
    "name,value",
    [
        ("max_tx_bytes", 1),
        ("max_tx_bytes", 1 << 40),
        ("proposal_period_blocks", 1),
        ("access_grant_seconds", 10**12),
        ("emergency_grant_seconds", 10**9),
        ("max_validators", 0),
    ],
)
def test_parameters_out_of_bounds_are_refused(
    consortium: Consortium, name: str, value: int
) -> None:
    before = state_root(consortium)
    body = Propose(SetParameter(name, value), reason="tune")
    result = consortium.submit(consortium.admin("st-mary"), "gov.propose", body)
    assert result.code is Code.INVALID_BODY and name in result.log, result.log
    assert state_root(consortium) == before
