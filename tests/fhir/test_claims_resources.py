"""The FHIR views of a claim, without a network: the ExplanationOfBenefit built from a claim's
on-chain state (and its documents when readable), the Claim and ClaimResponse tags, the search
parameters and the status mapping."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from medledger.client.claims import build_claim_response
from medledger.fhir.capability import RESOURCES, capability_statement
from medledger.fhir.claims import (
    CLAIM_STATUS_SYSTEM,
    DECISION_SYSTEM,
    claim_view,
    explanation_of_benefit,
    parse_claim_search,
    response_view,
    search_matches,
    status_matches,
)
from medledger.fhir.search import SearchError, Token
from medledger.ledger.claims import (
    CPT_SYSTEM,
    AppealReason,
    Claim,
    ClaimAction,
    ClaimItem,
    ClaimStatus,
    ClaimStep,
    ItemDecision,
    Outcome,
)
from medledger.ledger.records import RecordStatus, RecordVersion
from medledger.validation import validate_resource

SECOND_NS = 1_000_000_000
T0 = 1_780_000_000 * SECOND_NS
ITEMS = (
    ClaimItem(1, "99214", "2026-05-20", 15_000),
    ClaimItem(2, "83036", "2026-05-20", 4_550),
)
DECISIONS = (ItemDecision(1, 12_000, ("45",)), ItemDecision(2, 4_550))


def step(action: ClaimAction, status: ClaimStatus, height: int, **more: Any) -> ClaimStep:
    return ClaimStep(
        action=action,
        status=status,
        height=height,
        time_ns=T0 + height * SECOND_NS,
        actor="a" * 40,
        actor_organization="org-1",
        tx="ab" * 32,
        **more,
    )


def claim(*steps: ClaimStep, **more: Any) -> Claim:
    return Claim(
        id="claim-1",
        provider="org-1",
        submitter="a" * 40,
        patient="p" * 40,
        insurer="org-4",
        coverage="cov-1",
        currency="USD",
        items=ITEMS,
        total=19_550,
        supporting=(),
        claim_record="rec-claim",
        status=steps[-1].status,
        submitted_height=steps[0].height,
        submitted_ns=steps[0].time_ns,
        history=steps,
        **more,
    )


SUBMITTED = step(
    ClaimAction.SUBMIT, ClaimStatus.SUBMITTED, 10, amount=19_550, record_id="rec-claim"
)
DECIDED = step(
    ClaimAction.ADJUDICATE,
    ClaimStatus.ADJUDICATED,
    12,
    amount=16_550,
    outcome=Outcome.PARTIAL,
    decisions=DECISIONS,
    record_id="rec-cr-1",
)
PAID = step(ClaimAction.PAY, ClaimStatus.PAID, 14, amount=16_550, reference="eft-1")
APPEALED = step(
    ClaimAction.APPEAL, ClaimStatus.APPEALED, 15, appeal_reason=AppealReason.MEDICAL_NECESSITY
)


def paid_claim(*more: ClaimStep) -> Claim:
    return claim(
        SUBMITTED,
        DECIDED,
        PAID,
        *more,
        outcome=Outcome.PARTIAL,
        decisions=DECISIONS,
        approved_total=16_550,
        paid_total=16_550,
        responses=("rec-cr-1",),
        first_adjudicated_ns=DECIDED.time_ns,
        last_adjudicated_ns=DECIDED.time_ns,
        appeals=len(more),
        duplicate_of="claim-0",
    )


def claim_document() -> dict[str, Any]:
    return {
        "resourceType": "Claim",
        "status": "active",
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/claim-type",
                    "code": "institutional",
                }
            ]
        },
        "use": "claim",
        "patient": {"reference": f"Patient/{'p' * 40}"},
        "created": "2026-05-20T17:00:00Z",
        "provider": {"reference": "Organization/org-1"},
        "insurer": {"reference": "Organization/org-4"},
        "priority": {"coding": [{"code": "normal"}]},
        "billablePeriod": {"start": "2026-05-20", "end": "2026-05-20"},
        "diagnosis": [
            {
                "sequence": 1,
                "diagnosisCodeableConcept": {
                    "coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9"}]
                },
            }
        ],
        "insurance": [{"sequence": 1, "focal": True, "coverage": {"reference": "Coverage/cov-1"}}],
        "item": [
            {
                "sequence": n,
                "diagnosisSequence": [1],
                "productOrService": {"coding": [{"system": CPT_SYSTEM, "code": i.code}]},
                "servicedDate": i.service_date,
                "quantity": {"value": 1},
                "net": {"value": i.amount / 100, "currency": "USD"},
            }
            for n, i in enumerate(ITEMS, start=1)
        ],
    }


def version(record_id: str, resource_type: str) -> RecordVersion:
    return RecordVersion(
        record_id=record_id,
        version=1,
        patient="p" * 40,
        author="a" * 40,
        author_organization="org-1",
        resource_type=resource_type,
        category="claim",
        package_digest="00" * 32,
        package_size=1,
        commitment=b"\0" * 32,
        previous=0,
        status=RecordStatus.CURRENT,
        height=10,
        time_ns=SUBMITTED.time_ns,
        threshold=2,
        custodians=(),
    )


def adjudications(item: dict[str, Any]) -> dict[str, Any]:
    found = {}
    for entry in item["adjudication"]:
        code = entry["category"]["coding"][0]["code"]
        found[code] = entry.get("amount", {}).get("value") or entry["reason"]["coding"][0]["code"]
    return found


def test_an_eob_from_the_ledger_alone_is_valid_and_complete() -> None:
    eob = explanation_of_benefit(paid_claim())
    validate_resource(eob)
    assert eob["id"] == "claim-1" and eob["outcome"] == "complete"
    assert eob["type"]["coding"][0]["code"] == "professional"
    assert eob["insurance"] == [{"focal": True, "coverage": {"reference": "Coverage/cov-1"}}]
    assert eob["claimResponse"] == {"reference": "ClaimResponse/rec-cr-1"}
    assert eob["disposition"] == "Claim partially approved"
    first, second = eob["item"]
    assert adjudications(first) == {
        "submitted": 150,
        "eligible": 120,
        "benefit": 120,
        "adjustmentreason": "45",
    }
    assert adjudications(second) == {"submitted": 45.5, "eligible": 45.5, "benefit": 45.5}
    assert eob["payment"]["amount"] == {"value": 165.5, "currency": "USD"}
    assert eob["payment"]["type"]["coding"][0]["code"] == "complete"
    assert eob["payment"]["identifier"]["value"] == "eft-1"
    assert [n["number"] for n in eob["processNote"]] == [1, 2, 3]
    assert (
        "block 12" in eob["processNote"][1]["text"] and "partial" in eob["processNote"][1]["text"]
    )
    (ledger,) = eob["extension"]
    steps = [e for e in ledger["extension"] if e["url"] == "step"]
    assert [s["extension"][2]["valueInteger"] for s in steps] == [10, 12, 14]
    assert eob["related"][0]["claim"] == {"reference": "Claim/claim-0"}
    assert {t["code"] for t in eob["meta"]["tag"]} == {"paid", "possible-duplicate"}
    assert eob["meta"]["versionId"] == "3"
    assert "diagnosis" not in eob


def test_an_eob_takes_what_the_documents_add() -> None:
    response = build_claim_response(paid_claim(), DECISIONS, created="2026-05-21T00:00:00Z")
    response["disposition"] = "Reduced to the fee schedule"
    eob = explanation_of_benefit(paid_claim(), claim_document(), response)
    validate_resource(eob)
    assert eob["type"]["coding"][0]["code"] == "institutional"
    assert eob["diagnosis"][0]["sequence"] == 1
    assert eob["item"][0]["diagnosisSequence"] == [1]
    assert eob["billablePeriod"] == {"start": "2026-05-20", "end": "2026-05-20"}
    assert eob["disposition"] == "Reduced to the fee schedule"


def test_a_submitted_or_appealed_claim_is_queued() -> None:
    queued = explanation_of_benefit(claim(SUBMITTED))
    validate_resource(queued)
    assert queued["outcome"] == "queued" and "payment" not in queued
    assert [e["category"]["coding"][0]["code"] for e in queued["total"]] == ["submitted"]
    assert all(len(i["adjudication"]) == 1 for i in queued["item"])
    appealed = explanation_of_benefit(paid_claim(APPEALED))
    validate_resource(appealed)
    assert appealed["outcome"] == "queued"
    assert "medical-necessity" in appealed["processNote"][-1]["text"]


def test_claim_and_response_views_carry_ledger_tags() -> None:
    shown = claim_view(paid_claim(), version("rec-claim", "Claim"), claim_document())
    validate_resource(shown)
    assert shown["id"] == "claim-1" and shown["meta"]["versionId"] == "1"
    assert {"system": CLAIM_STATUS_SYSTEM, "code": "paid"}.items() <= shown["meta"]["tag"][
        0
    ].items()
    again = msgspec.structs.replace(paid_claim(APPEALED), responses=("rec-cr-1", "rec-cr-2"))
    document = build_claim_response(again, DECISIONS, created="2026-05-21T00:00:00Z")
    old = response_view(again, version("rec-cr-1", "ClaimResponse"), document)
    new = response_view(again, version("rec-cr-2", "ClaimResponse"), document)
    validate_resource(old)
    assert old["id"] == "rec-cr-1"
    assert [t["code"] for t in old["meta"]["tag"] if t["system"] == DECISION_SYSTEM] == [
        "superseded"
    ]
    assert [t["code"] for t in new["meta"]["tag"] if t["system"] == DECISION_SYSTEM] == ["current"]


def test_status_maps_to_financial_and_ledger_statuses() -> None:
    paid = paid_claim()
    assert status_matches(paid, Token(None, "active"))
    assert status_matches(paid, Token("http://hl7.org/fhir/fm-status", "active"))
    assert status_matches(paid, Token(None, "paid"))
    assert status_matches(paid, Token(CLAIM_STATUS_SYSTEM, "paid"))
    assert not status_matches(paid, Token(None, "cancelled"))
    assert not status_matches(paid, Token(CLAIM_STATUS_SYSTEM, "submitted"))
    assert not status_matches(None, Token(None, "paid"))


def test_search_parameters_follow_the_capability_statement() -> None:
    search = parse_claim_search(
        "Claim",
        [("patient", f"Patient/{'p' * 40}"), ("status", "paid,submitted"), ("_count", "5")],
    )
    assert search.page.count == 5 and search.link[0][0] == "patient"
    assert search_matches(search, paid_claim(), "claim-1")
    assert not search_matches(
        parse_claim_search("Claim", [("insurer", "Organization/org-9")]), paid_claim(), "claim-1"
    )
    responses = parse_claim_search("ClaimResponse", [("request", "Claim/claim-1")])
    assert search_matches(responses, paid_claim(), "rec-cr-1")
    with pytest.raises(SearchError, match="no search parameter 'code'"):
        parse_claim_search("Claim", [("code", "99214")])
    with pytest.raises(SearchError, match="not a Patient reference"):
        parse_claim_search("ExplanationOfBenefit", [("patient", "Organization/x")])
    lenient = parse_claim_search("Claim", [("code", "99214")], strict=False)
    assert lenient.ignored == ("code",)
    assert parse_claim_search("Claim", [("_summary", "count")]).page.count == 0


def test_the_capability_statement_lists_the_claim_types() -> None:
    statement = capability_statement("http://x/fhir", "http://x/fhir/auth/token", "2026-01-01")
    validate_resource(statement)
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    for name in ("Claim", "ClaimResponse", "ExplanationOfBenefit"):
        created = {"create"} if name != "ClaimResponse" else set()  # submitted or imported
        assert {i["code"] for i in resources[name]["interaction"]} == {
            "read",
            "search-type",
        } | created
        params = {p["name"] for p in resources[name]["searchParam"]}
        assert params == {p.name for p in RESOURCES[name].search}
        assert {"_id", "patient", "status"} <= params
    assert "request" in {p["name"] for p in resources["ClaimResponse"]["searchParam"]}
