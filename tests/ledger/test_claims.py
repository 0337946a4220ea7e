"""Claims, driven in-process: the state machine, who may take each step, duplicate flags,
refused amounts and codes (which change nothing), claim-party access and the statistics."""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest
from conftest import Consortium, keys_for

from medledger.abci.queries import answer
from medledger.crypto.keys import KeyPair
from medledger.ledger import codec
from medledger.ledger.access import RequestAccess
from medledger.ledger.bundle import PutBundle
from medledger.ledger.claims import (
    CVX_SYSTEM,
    SNOMED_SYSTEM,
    AdjudicateClaim,
    AppealClaim,
    AppealReason,
    Claim,
    ClaimAction,
    ClaimItem,
    ClaimRemittance,
    ClaimStats,
    ClaimStatus,
    ImportClaims,
    ImportedClaim,
    ItemDecision,
    Outcome,
    PayClaim,
    Remittance,
    SubmitClaim,
    claim_key,
    claim_stats,
    format_amount,
    outcome_of,
)
from medledger.ledger.consent import SECOND_NS, GrantConsent, GranteeKind, Purpose, ScopeKind
from medledger.ledger.errors import Code
from medledger.ledger.execution import AuditEntry, TxResult
from medledger.ledger.model import Role
from medledger.ledger.records import PutRecord
from medledger.ledger.state import State
from medledger.ledger.transactions import EnrollMember

CUSTODIANS = ("careplus", "northside-lab", "riverside", "st-mary")
DAY_NS = 86_400 * SECOND_NS
# The in-process chain starts at 2026-01-01T00:00:00Z.
SERVED = "2025-12-30"
ITEMS = (
    ClaimItem(1, "99214", SERVED, 15_000),
    ClaimItem(2, "80053", SERVED, 4_550),
    ClaimItem(3, "36415", SERVED, 1_000),
)
TOTAL = 20_550


class Cast:
    def __init__(self, c: Consortium) -> None:
        self.c = c
        self.patient = self.enroll("st-mary", "claims-patient", Role.PATIENT)
        self.other_patient = self.enroll("st-mary", "claims-patient-2", Role.PATIENT)
        self.billing = self.enroll("st-mary", "st-mary-billing", Role.BILLING)
        self.doctor = self.enroll("st-mary", "st-mary-doctor", Role.CLINICIAN)
        self.lab_tech = self.enroll("st-mary", "st-mary-lab", Role.LAB)
        self.rival = self.enroll("riverside", "riverside-billing", Role.BILLING)
        self.examiner = self.enroll("careplus", "careplus-examiner", Role.BILLING)
        self.insurer_admin = c.admin("careplus")
        self.insurer_auditor = self.enroll("careplus", "careplus-auditor", Role.AUDITOR)
        self.ehr = self.enroll("st-mary", "st-mary-ehr", Role.EHR)
        self.lab_system = self.enroll("northside-lab", "northside-lis", Role.LIS)

    def enroll(self, org: str, name: str, role: Role) -> KeyPair:
        keys = keys_for(name)
        body = EnrollMember(keys.verify_key, keys.encryption_key, role)
        assert self.c.submit(self.c.admin(org), "member.enroll", body).ok
        return keys


@pytest.fixture
def cast(consortium: Consortium) -> Cast:
    return Cast(consortium)


def sealed(
    record_id: str, patient: str, resource_type: str = "Claim", category: str = "claim"
) -> PutRecord:
    """The ledger body of a sealed record (the package itself is not needed in-process)."""
    return PutRecord(
        record_id=record_id,
        patient=patient,
        resource_type=resource_type,
        category=category,
        package_digest=hashlib.sha256(f"package/{record_id}".encode()).hexdigest(),
        package_size=4096,
        commitment=hashlib.sha256(f"commitment/{record_id}".encode()).digest(),
        threshold=2,
        custodians=CUSTODIANS,
    )


def submission(
    claim_id: str,
    patient: str,
    items: tuple[ClaimItem, ...] = ITEMS,
    supporting: tuple[str, ...] = (),
    **changes: object,
) -> SubmitClaim:
    body = SubmitClaim(
        claim_id=claim_id,
        insurer="careplus",
        coverage="cov-4471",
        currency="USD",
        items=items,
        total=sum(i.amount for i in items),
        supporting=supporting,
        record=sealed(f"{claim_id}-claim", patient),
    )
    return msgspec.structs.replace(body, **changes)


def decision(
    claim_id: str,
    patient: str,
    decisions: tuple[ItemDecision, ...],
    outcome: Outcome | None = None,
    response: int = 1,
) -> AdjudicateClaim:
    return AdjudicateClaim(
        claim_id=claim_id,
        outcome=outcome or outcome_of(ITEMS[: len(decisions)], decisions),
        decisions=decisions,
        record=sealed(f"{claim_id}-response-{response}", patient, "ClaimResponse"),
    )


PARTIAL = (
    ItemDecision(1, 12_000, ("45",)),
    ItemDecision(2, 4_550),
    ItemDecision(3, 0, ("97",)),
)
IN_FULL = tuple(ItemDecision(i.sequence, i.amount) for i in ITEMS)


def load(c: Consortium, claim_id: str) -> Claim:
    found = State(c.chain.store).read(claim_key(claim_id), Claim)
    assert found is not None
    return found


def put_observation(c: Consortium, cast: Cast, record_id: str) -> None:
    body = sealed(record_id, cast.patient.member_id, "Observation", "laboratory")
    assert c.submit(cast.doctor, "record.put", body).ok


def refused(c: Consortium, who: KeyPair, tx_type: str, body: object, code: Code) -> TxResult:
    """A step that must be refused with `code` and change no state at all."""
    root = c.chain.store.state_root()
    result = c.submit(who, tx_type, body)
    assert result.code is code, result.log
    assert c.chain.store.state_root() == root
    return result


def test_submit_adjudicate_pay_appeal_readjudicate_pay(consortium: Consortium, cast: Cast) -> None:
    c, pid = consortium, cast.patient.member_id
    put_observation(c, cast, "lab-1")
    outcome = c.run(
        c.tx(cast.billing, "claim.submit", submission("c-1", pid, supporting=("lab-1",)))
    )
    result = outcome.results[0]
    assert result.ok, result.log
    assert "total 205.50 USD" in result.log and "duplicate" not in result.log
    # The sealed Claim is stored as a record, so its package is replicated like any other.
    assert outcome.packages_stored == [sealed("c-1-claim", pid).package_digest]
    claim = load(c, "c-1")
    assert claim.status is ClaimStatus.SUBMITTED and claim.provider == "st-mary"
    assert claim.insurer == "careplus" and claim.supporting == ("lab-1",)
    assert claim.claim_record == "c-1-claim" and claim.total == TOTAL

    partial = c.submit(cast.examiner, "claim.adjudicate", decision("c-1", pid, PARTIAL))
    assert partial.ok and "adjudicated partial: approved 165.50 USD of 205.50 USD" in partial.log
    claim = load(c, "c-1")
    assert claim.outcome is Outcome.PARTIAL and claim.approved_total == 16_550
    assert claim.responses == ("c-1-response-1",)

    paid = c.submit(cast.examiner, "claim.pay", PayClaim("c-1", 16_550, "USD", "eft-0001"))
    assert paid.ok, paid.log
    assert load(c, "c-1").status is ClaimStatus.PAID

    appeal = AppealClaim("c-1", AppealReason.MEDICAL_NECESSITY)
    assert c.submit(cast.patient, "claim.appeal", appeal).ok
    claim = load(c, "c-1")
    assert claim.status is ClaimStatus.APPEALED and claim.appeals == 1

    # The new decision approves item 3 too; payment is then exactly the difference.
    again = (PARTIAL[0], PARTIAL[1], ItemDecision(3, 1_000))
    assert c.submit(
        cast.insurer_admin, "claim.adjudicate", decision("c-1", pid, again, response=2)
    ).ok
    refused(
        c, cast.examiner, "claim.pay", PayClaim("c-1", 17_550, "USD", "eft-0002"), Code.INVALID_BODY
    )
    assert c.submit(cast.examiner, "claim.pay", PayClaim("c-1", 1_000, "USD", "eft-0002")).ok

    claim = load(c, "c-1")
    assert claim.status is ClaimStatus.PAID and claim.paid_total == claim.approved_total == 17_550
    assert claim.outstanding == 0
    assert [s.action for s in claim.history] == [
        ClaimAction.SUBMIT,
        ClaimAction.ADJUDICATE,
        ClaimAction.PAY,
        ClaimAction.APPEAL,
        ClaimAction.ADJUDICATE,
        ClaimAction.PAY,
    ]
    assert [s.status for s in claim.history] == [
        ClaimStatus.SUBMITTED,
        ClaimStatus.ADJUDICATED,
        ClaimStatus.PAID,
        ClaimStatus.APPEALED,
        ClaimStatus.ADJUDICATED,
        ClaimStatus.PAID,
    ]
    assert [s.amount for s in claim.history] == [TOTAL, 16_550, 16_550, 0, 17_550, 1_000]
    assert claim.history[3].actor == pid and claim.history[3].appeal_reason == "medical-necessity"
    assert claim.history[1].decisions == PARTIAL and claim.history[4].outcome is Outcome.PARTIAL
    assert all(len(s.tx) == 64 for s in claim.history)
    heights = [s.height for s in claim.history]
    assert heights == sorted(heights)

    # Every step is on the patient's audit trail.
    trail = [
        codec.decode(leaf, AuditEntry) for _, _, leaf in c.chain.store.audit_entries_about(pid)
    ]
    steps = [e.type for e in trail if e.type.startswith("claim.") and e.code == Code.OK]
    assert steps == [
        "claim.submit",
        "claim.adjudicate",
        "claim.pay",
        "claim.appeal",
        "claim.adjudicate",
        "claim.pay",
    ]


def test_out_of_order_steps_are_refused_and_change_nothing(
    consortium: Consortium, cast: Cast
) -> None:
    c, pid = consortium, cast.patient.member_id
    assert c.submit(cast.billing, "claim.submit", submission("c-2", pid)).ok
    pay = PayClaim("c-2", TOTAL, "USD", "eft-1")
    assert "not adjudicated" in refused(c, cast.examiner, "claim.pay", pay, Code.CONFLICT).log
    appeal = AppealClaim("c-2", AppealReason.DISAGREE)
    assert (
        "only an adjudicated" in refused(c, cast.patient, "claim.appeal", appeal, Code.CONFLICT).log
    )

    assert c.submit(cast.examiner, "claim.adjudicate", decision("c-2", pid, IN_FULL)).ok
    again = decision("c-2", pid, IN_FULL, response=2)
    log = refused(c, cast.examiner, "claim.adjudicate", again, Code.CONFLICT).log
    assert "is adjudicated" in log
    # An approval in full cannot be appealed.
    assert "no appeal" in refused(c, cast.billing, "claim.appeal", appeal, Code.CONFLICT).log
    assert c.submit(cast.examiner, "claim.pay", pay).ok
    log = refused(c, cast.examiner, "claim.pay", pay, Code.CONFLICT).log
    assert "already paid" in log

    # A denial is not paid, and the number of appeals is bounded.
    assert c.submit(cast.billing, "claim.submit", submission("c-3", pid)).ok
    denied = tuple(ItemDecision(i.sequence, 0, ("50",)) for i in ITEMS)
    assert c.submit(cast.examiner, "claim.adjudicate", decision("c-3", pid, denied)).ok
    assert load(c, "c-3").outcome is Outcome.DENIED
    log = refused(c, cast.examiner, "claim.pay", PayClaim("c-3", 0, "USD", "x"), Code.CONFLICT).log
    assert "denied" in log
    for round_ in range(2, 5):
        assert c.submit(cast.billing, "claim.appeal", AppealClaim("c-3", AppealReason.DISAGREE)).ok
        body = decision("c-3", pid, denied, response=round_)
        assert c.submit(cast.examiner, "claim.adjudicate", body).ok
    log = refused(
        c, cast.billing, "claim.appeal", AppealClaim("c-3", AppealReason.DISAGREE), Code.CONFLICT
    ).log
    assert "already appealed 3 times" in log


def test_only_the_right_parties_take_each_step(consortium: Consortium, cast: Cast) -> None:
    c, pid = consortium, cast.patient.member_id
    # Insurers do not submit claims; patients and lab technicians may not at all.
    log = refused(c, cast.examiner, "claim.submit", submission("c-4", pid), Code.UNAUTHORIZED).log
    assert "careplus is of kind insurer" in log
    refused(c, cast.patient, "claim.submit", submission("c-4", pid), Code.UNAUTHORIZED)
    refused(c, cast.lab_tech, "claim.submit", submission("c-4", pid), Code.UNAUTHORIZED)
    # A provider's clinician may submit.
    assert c.submit(cast.doctor, "claim.submit", submission("c-4", pid)).ok

    # A provider cannot adjudicate or pay, not even its own claim; nor can another provider.
    body = decision("c-4", pid, PARTIAL)
    log = refused(c, cast.billing, "claim.adjudicate", body, Code.UNAUTHORIZED).log
    assert "only billing or admin members of careplus" in log
    refused(c, cast.rival, "claim.adjudicate", body, Code.UNAUTHORIZED)
    refused(c, cast.insurer_auditor, "claim.adjudicate", body, Code.UNAUTHORIZED)
    assert c.submit(cast.examiner, "claim.adjudicate", body).ok
    pay = PayClaim("c-4", 16_550, "USD", "eft-4")
    refused(c, cast.billing, "claim.pay", pay, Code.UNAUTHORIZED)

    # Appeals: the patient or the provider, not another provider or another patient.
    appeal = AppealClaim("c-4", AppealReason.ADDITIONAL_INFORMATION)
    refused(c, cast.rival, "claim.appeal", appeal, Code.UNAUTHORIZED)
    refused(c, cast.other_patient, "claim.appeal", appeal, Code.UNAUTHORIZED)
    refused(c, cast.examiner, "claim.appeal", appeal, Code.UNAUTHORIZED)
    assert c.submit(cast.doctor, "claim.appeal", appeal).ok


def test_duplicate_service_is_flagged(consortium: Consortium, cast: Cast) -> None:
    c, pid = consortium, cast.patient.member_id
    assert c.submit(cast.billing, "claim.submit", submission("c-5", pid)).ok
    # Same provider, patient, service and date of service: accepted and flagged.
    again = submission("c-6", pid, items=(ClaimItem(1, "85025", SERVED, 3_000), ITEMS[1]))
    result = c.submit(cast.billing, "claim.submit", again)
    assert result.ok and "possible duplicate of claim c-5" in result.log
    assert load(c, "c-6").duplicate_of == "c-5"
    # Another day, another patient or another provider is no duplicate.
    other_day = submission("c-7", pid, items=(ClaimItem(1, "80053", "2025-12-29", 4_550),))
    other_patient = submission("c-8", cast.other_patient.member_id)
    other_provider = submission("c-9", pid)
    assert c.submit(cast.billing, "claim.submit", other_day).ok
    assert c.submit(cast.billing, "claim.submit", other_patient).ok
    assert c.submit(cast.rival, "claim.submit", other_provider).ok
    assert [load(c, i).duplicate_of for i in ("c-7", "c-8", "c-9")] == ["", "", ""]
    # The same code twice on one claim (two units) is not a duplicate of itself.
    twice = (ClaimItem(1, "36415", "2025-12-28", 1_000), ClaimItem(2, "36415", "2025-12-28", 1_000))
    assert c.submit(cast.billing, "claim.submit", submission("c-10", pid, items=twice)).ok
    assert load(c, "c-10").duplicate_of == ""


def test_bad_amounts_codes_and_references_are_refused_and_change_nothing(
    consortium: Consortium, cast: Cast
) -> None:
    c, pid = consortium, cast.patient.member_id
    good = submission("c-11", pid)
    item = ITEMS[0]
    replace = msgspec.structs.replace
    cases: list[tuple[SubmitClaim, Code, str]] = [
        (
            submission("c-11", pid, items=(replace(item, code="99999"),)),
            Code.INVALID_BODY,
            "unknown service code '99999'",
        ),
        (
            submission("c-11", pid, items=(replace(item, amount=-100), ITEMS[1])),
            Code.INVALID_BODY,
            "negative",
        ),
        (replace(good, total=TOTAL + 1), Code.INVALID_BODY, "not the sum"),
        (
            submission("c-11", pid, items=(replace(item, amount=0),)),
            Code.INVALID_BODY,
            "more than zero",
        ),
        (
            submission("c-11", pid, items=(replace(item, amount=10**12),)),
            Code.INVALID_BODY,
            "exceeds the limit",
        ),
        (replace(good, currency="XYZ"), Code.INVALID_BODY, "ISO 4217"),
        (replace(good, currency="usd"), Code.INVALID_BODY, "ISO 4217"),
        (
            submission("c-11", pid, items=(replace(item, service_date="2025-02-30"),)),
            Code.INVALID_BODY,
            "not a calendar date",
        ),
        (
            submission("c-11", pid, items=(replace(item, service_date="30/12/2025"),)),
            Code.INVALID_BODY,
            "YYYY-MM-DD",
        ),
        (
            submission("c-11", pid, items=(replace(item, service_date="2026-02-01"),)),
            Code.INVALID_BODY,
            "after 2026-01-01",
        ),
        (
            submission("c-11", pid, items=(replace(item, sequence=2),)),
            Code.INVALID_BODY,
            "sequences",
        ),
        (submission("c-11", pid, items=()), Code.INVALID_BODY, "1-50 items"),
        (replace(good, insurer="riverside"), Code.INVALID_BODY, "not an insurer"),
        (replace(good, insurer="nobody"), Code.NOT_FOUND, "unknown insurer"),
        (replace(good, coverage="../x"), Code.INVALID_BODY, "coverage"),
        (replace(good, claim_id="bad id"), Code.INVALID_BODY, "claim_id"),
        (replace(good, supporting=("nope",)), Code.NOT_FOUND, "unknown record nope"),
        (
            replace(good, record=replace(good.record, resource_type="Observation")),
            Code.INVALID_BODY,
            "must be a Claim",
        ),
        (
            replace(good, record=replace(good.record, category="billing")),
            Code.INVALID_BODY,
            "category",
        ),
        (
            replace(good, record=replace(good.record, patient=cast.doctor.member_id)),
            Code.INVALID_BODY,
            "not a patient",
        ),
    ]
    for body, code, message in cases:
        assert message in refused(c, cast.billing, "claim.submit", body, code).log

    assert c.submit(
        cast.doctor,
        "record.put",
        sealed("lab-of-other", cast.other_patient.member_id, "Observation", "laboratory"),
    ).ok
    body = replace(good, supporting=("lab-of-other",))
    assert (
        "another patient" in refused(c, cast.billing, "claim.submit", body, Code.INVALID_BODY).log
    )

    assert c.submit(cast.billing, "claim.submit", good).ok
    assert "exists" in refused(c, cast.billing, "claim.submit", good, Code.CONFLICT).log

    bad_decisions: list[tuple[AdjudicateClaim, str]] = [
        (
            decision("c-11", pid, (ItemDecision(1, 15_001), *IN_FULL[1:])),
            "approved 150.01 USD exceeds the 150.00 USD billed",
        ),
        (
            decision("c-11", pid, (ItemDecision(1, -1, ("45",)), *IN_FULL[1:]), Outcome.PARTIAL),
            "negative",
        ),
        (
            decision("c-11", pid, (ItemDecision(1, 10_000, ("999",)), *IN_FULL[1:])),
            "unknown adjustment reason code '999'",
        ),
        (
            decision("c-11", pid, (ItemDecision(1, 10_000), *IN_FULL[1:])),
            "needs at least one reason code",
        ),
        (decision("c-11", pid, PARTIAL, Outcome.APPROVED), "make the outcome partial"),
        (decision("c-11", pid, IN_FULL[:2]), "decide each of the claim's 3 items"),
        (
            decision("c-11", pid, (IN_FULL[1], IN_FULL[0], IN_FULL[2]), Outcome.APPROVED),
            "in order",
        ),
        (
            replace(
                decision("c-11", pid, IN_FULL),
                record=sealed("c-11-r", pid, "Claim"),
            ),
            "must be a ClaimResponse",
        ),
    ]
    for bad, message in bad_decisions:
        assert message in refused(c, cast.examiner, "claim.adjudicate", bad, Code.INVALID_BODY).log
    missing = decision("nope", pid, IN_FULL)
    refused(c, cast.examiner, "claim.adjudicate", missing, Code.NOT_FOUND)

    assert c.submit(cast.examiner, "claim.adjudicate", decision("c-11", pid, PARTIAL)).ok
    for pay, message in [
        (PayClaim("c-11", 16_550, "EUR", "eft-11"), "in USD, not EUR"),
        (PayClaim("c-11", 100, "USD", "eft-11"), "outstanding 165.50 USD"),
        (PayClaim("c-11", 16_550, "USD", "a/b"), "payment reference"),
    ]:
        assert message in refused(c, cast.examiner, "claim.pay", pay, Code.INVALID_BODY).log
    # A new decision never approves less than was paid.
    assert c.submit(cast.examiner, "claim.pay", PayClaim("c-11", 16_550, "USD", "eft-11")).ok
    assert c.submit(cast.patient, "claim.appeal", AppealClaim("c-11", AppealReason.DISAGREE)).ok
    lower = (ItemDecision(1, 100, ("45",)), *PARTIAL[1:])
    log = refused(
        c,
        cast.examiner,
        "claim.adjudicate",
        decision("c-11", pid, lower, response=2),
        Code.CONFLICT,
    ).log
    assert "cannot approve less" in log


def test_claim_parties_read_claim_records_for_payment_but_supporting_records_need_consent(
    consortium: Consortium, cast: Cast
) -> None:
    c, pid = consortium, cast.patient.member_id
    put_observation(c, cast, "lab-2")
    assert c.submit(cast.billing, "claim.submit", submission("c-12", pid, supporting=("lab-2",))).ok

    def ask(who: KeyPair, record_id: str, purpose: Purpose = Purpose.PAYMENT) -> TxResult:
        return c.submit(who, "access.request", RequestAccess(record_id, purpose))

    granted = ask(cast.examiner, "c-12-claim")
    assert granted.ok and "(claim-insurer)" in granted.log
    # For payment only, and only the claim's own records.
    treatment = ask(cast.examiner, "c-12-claim", Purpose.TREATMENT)
    assert treatment.code is Code.ACCESS_DENIED
    denied = ask(cast.examiner, "lab-2")
    assert (
        denied.code is Code.ACCESS_DENIED
        and "no active consent covers lab-2 for payment" in denied.log
    )
    assert ask(cast.rival, "c-12-claim").code is Code.ACCESS_DENIED

    # The patient consents to the insurer reading lab results for payment.
    now = c.chain.time_ns
    consent = GrantConsent(
        pid,
        GranteeKind.ORGANIZATION,
        "careplus",
        ScopeKind.CATEGORIES,
        ("laboratory",),
        (Purpose.PAYMENT,),
        now - DAY_NS,
        now + 30 * DAY_NS,
    )
    assert c.submit(cast.patient, "consent.grant", consent).ok
    with_consent = ask(cast.examiner, "lab-2")
    assert with_consent.ok and "via consent" in with_consent.log

    # The provider reads the insurer's ClaimResponse by the same rule.
    assert c.submit(cast.examiner, "claim.adjudicate", decision("c-12", pid, IN_FULL)).ok
    provider_read = ask(cast.billing, "c-12-response-1")
    assert provider_read.ok and "(claim-provider)" in provider_read.log
    assert ask(cast.rival, "c-12-response-1").code is Code.ACCESS_DENIED
    assert "(patient)" in ask(cast.patient, "c-12-response-1").log


def test_claim_records_change_only_through_claim_steps(consortium: Consortium, cast: Cast) -> None:
    c, pid = consortium, cast.patient.member_id
    assert c.submit(cast.doctor, "claim.submit", submission("c-13", pid)).ok
    amendment = msgspec.structs.replace(
        sealed("c-13-claim", pid), package_digest="ab" * 32, previous=1
    )
    log = refused(c, cast.doctor, "record.amend", amendment, Code.CONFLICT).log
    assert "belongs to claim c-13" in log


def test_stats_are_computed_from_the_ledger(consortium: Consortium, cast: Cast) -> None:
    c, pid = consortium, cast.patient.member_id
    assert c.submit(cast.billing, "claim.submit", submission("s-1", pid)).ok  # t0
    c.run()
    c.run()
    assert c.submit(cast.examiner, "claim.adjudicate", decision("s-1", pid, PARTIAL)).ok  # +3 s
    assert c.submit(cast.examiner, "claim.pay", PayClaim("s-1", 16_550, "USD", "eft-s1")).ok
    other = submission("s-2", pid, items=(ClaimItem(1, "93000", SERVED, 5_000),))
    assert c.submit(cast.billing, "claim.submit", other).ok
    denied = AdjudicateClaim(
        "s-2",
        Outcome.DENIED,
        (ItemDecision(1, 0, ("197",)),),
        sealed("s-2-r", pid, "ClaimResponse"),
    )
    assert c.submit(cast.examiner, "claim.adjudicate", denied).ok  # +1 s
    euros = submission("s-3", pid, currency="EUR", items=(ClaimItem(1, "71046", SERVED, 9_000),))
    assert c.submit(cast.rival, "claim.submit", euros).ok
    dup = submission("s-4", pid, items=(ClaimItem(1, "93000", SERVED, 5_000),))
    assert c.submit(cast.billing, "claim.submit", dup).ok

    raw = answer(c.chain.store, "/claims/stats", b"", False)
    stats = msgspec.json.decode(raw, type=ClaimStats)
    assert [p.organization for p in stats.providers] == ["riverside", "st-mary"]
    assert [i.organization for i in stats.insurers] == ["careplus"]
    st_mary = stats.providers[1]
    assert (st_mary.claims, st_mary.submitted, st_mary.adjudicated, st_mary.paid) == (3, 1, 1, 1)
    assert (st_mary.approved_outcomes, st_mary.partial_outcomes, st_mary.denied_outcomes) == (
        0,
        1,
        1,
    )
    assert st_mary.duplicates == 1 and st_mary.decided == 2
    assert (st_mary.denial_rate.numerator, st_mary.denial_rate.denominator) == (1, 2)
    assert st_mary.adjudication_ns_total == 4 * SECOND_NS
    assert st_mary.mean_seconds_to_adjudication == 2
    (usd,) = st_mary.totals
    assert (usd.currency, usd.submitted, usd.approved, usd.paid) == ("USD", 30_550, 16_550, 16_550)
    careplus = stats.insurers[0]
    assert careplus.claims == 4 and [t.currency for t in careplus.totals] == ["EUR", "USD"]
    assert careplus.denial_rate.denominator == 2

    # Filters and the other queries.
    only = msgspec.json.decode(
        answer(c.chain.store, "/claims/stats", b"provider:riverside", False), type=ClaimStats
    )
    assert [p.organization for p in only.providers] == ["riverside"]
    listed = json.loads(answer(c.chain.store, "/claims", f"patient:{pid}".encode(), False))
    assert sorted(x["id"] for x in listed) == ["s-1", "s-2", "s-3", "s-4"]
    by_insurer = json.loads(answer(c.chain.store, "/claims", b"insurer:careplus", False))
    assert len(by_insurer) == 4
    shown = json.loads(answer(c.chain.store, "/claim", b"s-1", False))
    assert shown["status"] == "paid" and len(shown["history"]) == 3
    from medledger.ledger.errors import LedgerError

    with pytest.raises(LedgerError, match="listed by"):
        answer(c.chain.store, "/claims", b"doctor:x", False)
    with pytest.raises(LedgerError, match="unknown claim"):
        answer(c.chain.store, "/claim", b"nope", False)
    # The pure function agrees with the query.
    assert claim_stats(State(c.chain.store).read_all(b"claim/", Claim)) == stats


def test_amount_formatting_and_outcomes() -> None:
    assert format_amount(20_550, "USD") == "205.50 USD"
    assert format_amount(5, "EUR") == "0.05 EUR"
    assert format_amount(-1_001, "USD") == "-10.01 USD"
    assert outcome_of(ITEMS, IN_FULL) is Outcome.APPROVED
    assert outcome_of(ITEMS, PARTIAL) is Outcome.PARTIAL
    assert outcome_of(ITEMS, tuple(ItemDecision(i.sequence, 0) for i in ITEMS)) is Outcome.DENIED


# --- imported claim history (claim.import) -------------------------------------------------

HISTORY_ITEMS = (
    ClaimItem(1, "410620009", SERVED, 0, SNOMED_SYSTEM),  # the encounter line: no charge
    ClaimItem(2, "08", SERVED, 14_052, CVX_SYSTEM),
)


def imported(
    claim_id: str,
    patient: str,
    *,
    payer: str = "Cigna Health",
    insurer: str = "",
    remittance: Remittance | None = None,
    items: tuple[ClaimItem, ...] = HISTORY_ITEMS,
    **changes: object,
) -> ImportedClaim:
    body = ImportedClaim(
        claim_id=claim_id,
        insurer=insurer,
        payer=payer,
        coverage="",
        currency="USD",
        items=items,
        total=sum(i.amount for i in items),
        supporting=(),
        record=sealed(f"{claim_id}-claim", patient),
        remittance=remittance,
    )
    return msgspec.structs.replace(body, **changes)


def remitted(claim_id: str, patient: str, approved: int = 11_242, paid: int = 11_242) -> Remittance:
    decisions = (ItemDecision(1, 0), ItemDecision(2, approved, ("2",) if approved < 14_052 else ()))
    return Remittance(
        outcome=outcome_of(HISTORY_ITEMS, decisions),
        decisions=decisions,
        paid=paid,
        reference=f"{claim_id}-eob",
        record=sealed(f"{claim_id}-eob", patient, "ExplanationOfBenefit"),
    )


def test_an_ehr_imports_claim_history_with_the_payers_reported_decisions(
    consortium: Consortium, cast: Cast
) -> None:
    c, pid = consortium, cast.patient.member_id
    history = ImportClaims(
        (
            imported("h-1", pid, remittance=remitted("h-1", pid)),
            imported("h-2", pid, payer="NO_INSURANCE"),
            imported(
                "h-3", pid, insurer="careplus", payer="", remittance=remitted("h-3", pid, paid=0)
            ),
        )
    )
    result = c.submit(cast.ehr, "claim.import", history)
    assert result.ok, result.log
    assert "3 claims imported by st-mary, 2 payer decisions reported" in result.log

    paid = load(c, "h-1")
    assert paid.imported and paid.payer == "Cigna Health" and paid.insurer == ""
    assert (paid.status, paid.outcome) == (ClaimStatus.PAID, Outcome.PARTIAL)
    assert (paid.total, paid.approved_total, paid.paid_total) == (14_052, 11_242, 11_242)
    assert [s.action for s in paid.history] == [
        ClaimAction.SUBMIT,
        ClaimAction.ADJUDICATE,
        ClaimAction.PAY,
    ]
    assert [s.reported for s in paid.history] == [False, True, True]
    assert {s.actor for s in paid.history} == {cast.ehr.member_id}
    assert (
        paid.responses == ("h-1-eob",) and paid.payer_name == "Cigna Health (outside the network)"
    )
    unpaid = load(c, "h-2")
    assert unpaid.status is ClaimStatus.SUBMITTED and unpaid.outcome is None
    decided = load(c, "h-3")
    assert (decided.status, decided.insurer, decided.outstanding) == (
        ClaimStatus.ADJUDICATED,
        "careplus",
        11_242,
    )

    # The network insurer of an imported claim takes it from there: it pays what is outstanding.
    assert c.submit(cast.examiner, "claim.pay", PayClaim("h-3", 11_242, "USD", "eft-h3")).ok
    # Nobody on the network acts for an outside payer; its claims are closed history.
    log = refused(c, cast.examiner, "claim.pay", PayClaim("h-1", 1, "USD", "x"), Code.CONFLICT).log
    assert "outside the network" in log
    log = refused(
        c, cast.patient, "claim.appeal", AppealClaim("h-1", AppealReason.DISAGREE), Code.CONFLICT
    ).log
    assert "appeal to it directly" in log
    # The outside payer is counted by name in the statistics; the network insurer by id.
    stats = msgspec.json.decode(answer(c.chain.store, "/claims/stats", b"", False), type=ClaimStats)
    assert [i.organization for i in stats.insurers] == [
        "Cigna Health (outside the network)",
        "NO_INSURANCE (outside the network)",
        "careplus",
    ]
    listed = json.loads(answer(c.chain.store, "/claims", f"patient:{pid}".encode(), False))
    assert sorted(x["id"] for x in listed) == ["h-1", "h-2", "h-3"]


def test_claim_import_refusals_change_nothing(consortium: Consortium, cast: Cast) -> None:
    c, pid, other = consortium, cast.patient.member_id, cast.other_patient.member_id

    def refuse(who: KeyPair, claims: tuple[ImportedClaim, ...], code: Code, text: str) -> None:
        log = refused(c, who, "claim.import", ImportClaims(claims), code).log
        assert text in log, log

    one = (imported("r-1", pid),)
    # Who: an insurer's member, a patient, a lab system, a provider's auditor.
    refuse(cast.examiner, one, Code.UNAUTHORIZED, "of kind insurer")
    refuse(cast.lab_system, one, Code.UNAUTHORIZED, "role lis may not send claim.import")
    refuse(cast.patient, one, Code.UNAUTHORIZED, "")
    # What: codes outside the known systems or of the wrong form; a zero total on submit.
    odd = (ClaimItem(1, "123", SERVED, 100, "local codes"),)
    refuse(cast.ehr, (imported("r-1", pid, items=odd),), Code.INVALID_BODY, "not an absolute URI")
    bad = (ClaimItem(1, "12 ab", SERVED, 100, SNOMED_SYSTEM),)
    refuse(cast.ehr, (imported("r-1", pid, items=bad),), Code.INVALID_BODY, "is not a code of")
    log = refused(
        c,
        cast.billing,
        "claim.submit",
        submission("r-9", pid, items=HISTORY_ITEMS),
        Code.INVALID_BODY,
    ).log
    assert "network's table only" in log
    # The payer: neither named, both named, a network organization that is not an insurer.
    refuse(cast.ehr, (imported("r-1", pid, payer=""),), Code.INVALID_BODY, "outside payer's name")
    refuse(
        cast.ehr,
        (imported("r-1", pid, insurer="careplus"),),
        Code.INVALID_BODY,
        "named in insurer",
    )
    refuse(
        cast.ehr,
        (imported("r-1", pid, insurer="riverside", payer=""),),
        Code.INVALID_BODY,
        "not an insurer",
    )
    # The payer's decision: more approved than billed, paid more than approved, an outcome the
    # amounts do not imply, an EOB about another patient or of another type.
    over = msgspec.structs.replace(
        remitted("r-1", pid), decisions=(ItemDecision(1, 0), ItemDecision(2, 20_000))
    )
    refuse(cast.ehr, (imported("r-1", pid, remittance=over),), Code.INVALID_BODY, "exceeds")
    overpaid = remitted("r-1", pid, paid=11_243)
    refuse(cast.ehr, (imported("r-1", pid, remittance=overpaid),), Code.INVALID_BODY, "exceeds")
    wrong = msgspec.structs.replace(remitted("r-1", pid), outcome=Outcome.APPROVED)
    refuse(
        cast.ehr, (imported("r-1", pid, remittance=wrong),), Code.INVALID_BODY, "make the outcome"
    )
    elsewhere = msgspec.structs.replace(
        remitted("r-1", pid), record=sealed("r-1-eob", other, "ExplanationOfBenefit")
    )
    refuse(
        cast.ehr,
        (imported("r-1", pid, remittance=elsewhere),),
        Code.INVALID_BODY,
        "another patient",
    )
    response = msgspec.structs.replace(
        remitted("r-1", pid), record=sealed("r-1-eob", pid, "ClaimResponse")
    )
    refuse(cast.ehr, (imported("r-1", pid, remittance=response),), Code.INVALID_BODY, "must be a")
    # All or none: a good claim followed by a claim id already taken.
    assert c.submit(cast.ehr, "claim.import", ImportClaims((imported("r-2", pid),))).ok
    refuse(cast.ehr, (imported("r-3", pid), imported("r-2", pid)), Code.CONFLICT, "claim 1:")
    assert State(c.chain.store).read(claim_key("r-3"), Claim) is None
    refuse(cast.ehr, (), Code.INVALID_BODY, "claims and decisions per import")


def test_a_payer_decision_may_follow_its_imported_claim(consortium: Consortium, cast: Cast) -> None:
    c, pid = consortium, cast.patient.member_id
    assert c.submit(cast.ehr, "claim.import", ImportClaims((imported("l-1", pid),))).ok
    assert c.submit(cast.billing, "claim.submit", submission("l-2", pid)).ok
    later = ImportClaims((), (ClaimRemittance("l-1", remitted("l-1", pid)),))

    # Not by another provider; not for a claim submitted on the network (its insurer decides).
    log = refused(c, cast.rival, "claim.import", later, Code.UNAUTHORIZED).log
    assert "not one riverside imported" in log
    native = ImportClaims((), (ClaimRemittance("l-2", remitted("l-2", pid)),))
    log = refused(c, cast.ehr, "claim.import", native, Code.UNAUTHORIZED).log
    assert "its payer decides it" in log

    assert c.submit(cast.ehr, "claim.import", later).ok
    claim = load(c, "l-1")
    assert (claim.status, claim.paid_total) == (ClaimStatus.PAID, 11_242)
    # Once decided, a second report is refused.
    again = ImportClaims((), (ClaimRemittance("l-1", remitted("l-1b", pid)),))
    assert "already paid" in refused(c, cast.ehr, "claim.import", again, Code.CONFLICT).log


def test_a_fhir_bundle_imports_its_claims_with_its_records_or_nothing(
    consortium: Consortium, cast: Cast
) -> None:
    """record.put-bundle: the Bundle's records and the claims they support in one ledger
    transaction — a bad claim refuses the records too; a lab system imports no claims."""
    c, pid = consortium, cast.patient.member_id
    encounter = sealed("b-encounter", pid, "Encounter", "encounter")
    claim = imported("b-1", pid, remittance=remitted("b-1", pid), supporting=("b-encounter",))
    bad = imported("b-2", pid, payer="")
    log = refused(
        c,
        cast.ehr,
        "record.put-bundle",
        PutBundle((encounter,), claims=ImportClaims((claim, bad))),
        Code.INVALID_BODY,
    ).log
    assert "claim 1:" in log
    lab_bundle = PutBundle(
        (sealed("b-obs", pid, "Observation", "laboratory"),), claims=ImportClaims((claim,))
    )
    assert (
        "role lis may not import"
        in refused(c, cast.lab_system, "record.put-bundle", lab_bundle, Code.UNAUTHORIZED).log
    )
    result = c.submit(
        cast.ehr, "record.put-bundle", PutBundle((encounter,), claims=ImportClaims((claim,)))
    )
    assert result.ok, result.log
    assert (
        load(c, "b-1").supporting == ("b-encounter",) and load(c, "b-1").status is ClaimStatus.PAID
    )
    assert (
        refused(c, cast.ehr, "record.put-bundle", PutBundle(), Code.INVALID_BODY).log
        == "a bundle holds records or claims"
    )
