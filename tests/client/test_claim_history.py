"""The billing summary and the payer's decision of claim history, extracted from every Claim
and ExplanationOfBenefit of the public Synthea export (../shared/testdata/synthea), and what
is refused with the reason; who pays (network insurer, mapped payer, outside payer); and the
node's `[claims] payers` table."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from medledger.client.claims import (
    ClaimError,
    claim_payer,
    extract_history_claim,
    extract_reported_decision,
    to_minor_units,
)
from medledger.config import ConfigError, load_payers
from medledger.ledger.claims import CVX_SYSTEM, SNOMED_SYSTEM, Outcome, outcome_of

SYNTHEA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "synthea"
Json = dict[str, Any]


def patient_files() -> list[Path]:
    if not SYNTHEA.is_dir():
        pytest.skip(f"third-party test data not found at {SYNTHEA}")
    return [p for p in sorted(SYNTHEA.glob("*.json")) if "Information" not in p.name]


def claims_and_eobs(path: Path) -> list[tuple[Json, Json | None]]:
    entries = json.loads(path.read_text())["entry"]
    eobs = {
        e["resource"]["claim"]["reference"]: e["resource"]
        for e in entries
        if e["resource"]["resourceType"] == "ExplanationOfBenefit"
    }
    return [
        (e["resource"], eobs.get(e["fullUrl"]))
        for e in entries
        if e["resource"]["resourceType"] == "Claim"
    ]


def with_patient(claim: Json) -> Json:
    return {**claim, "patient": {"reference": "Patient/p-1"}}


def test_every_public_synthea_claim_and_eob_is_extracted() -> None:
    payers: Counter[str] = Counter()
    outcomes: Counter[Outcome] = Counter()
    claims = 0
    for path in patient_files():
        for claim, eob in claims_and_eobs(path):
            content = extract_history_claim(with_patient(claim), {}, ())
            claims += 1
            assert content.insurer == "" and content.payer
            payers[content.payer] += 1
            assert content.currency == "USD" and content.patient == "p-1"
            assert [i.sequence for i in content.items] == list(range(1, len(claim["item"]) + 1))
            assert all(i.system in (SNOMED_SYSTEM, CVX_SYSTEM) for i in content.items)
            assert content.total == sum(i.amount for i in content.items)
            assert eob is not None
            decision = extract_reported_decision(eob, content.items, "eob-record")
            assert decision is not None
            for item, made in zip(content.items, decision.decisions, strict=True):
                assert 0 <= made.approved <= item.amount
                assert bool(made.reasons) == (made.approved < item.amount)
            approved = sum(d.approved for d in decision.decisions)
            assert decision.outcome is outcome_of(content.items, decision.decisions)
            assert decision.paid == approved  # Synthea's payment is the lines' payments
            outcomes[decision.outcome] += 1
    assert claims == 662
    assert payers["NO_INSURANCE"] == 29 and payers["Aetna"] == 126
    assert outcomes[Outcome.PARTIAL] == 579 and outcomes[Outcome.APPROVED] == 83


def synthea_pair() -> tuple[Json, Json]:
    claim, eob = claims_and_eobs(patient_files()[0])[0]
    assert eob is not None
    return with_patient(claim), eob


def test_a_line_payment_reduced_by_coinsurance_says_so_in_carc() -> None:
    claim, eob = synthea_pair()
    content = extract_history_claim(claim, {}, ())
    decision = extract_reported_decision(eob, content.items, "r-1")
    assert decision is not None
    encounter, vaccine = decision.decisions
    assert (encounter.approved, encounter.reasons) == (0, ())
    assert vaccine.approved == 11_242 and vaccine.reasons == ("2",)  # coinsurance
    assert decision.reference == "r-1"  # Synthea's payment names no identifier
    # An EOB not yet decided records no decision.
    assert extract_reported_decision({**eob, "outcome": "queued"}, content.items, "r") is None


def test_who_pays() -> None:
    claim, _ = synthea_pair()
    name = claim["insurance"][0]["coverage"]["display"]
    assert claim_payer(claim, {}, ()) == ("", name)
    assert claim_payer(claim, {name: "careplus"}, ()) == ("careplus", "")
    literal = {**claim, "insurer": {"reference": "Organization/careplus"}}
    assert claim_payer(literal, {}, ("careplus",)) == ("careplus", "")
    # An Organization that is no network insurer (a directory entry): the payer's name counts.
    other = {**claim, "insurer": {"reference": "Organization/dir-1", "display": "Acme Health"}}
    assert claim_payer(other, {}, ("careplus",)) == ("", "Acme Health")
    by_id = {**claim, "insurer": {"identifier": {"system": "urn:payers", "value": "77"}}}
    assert claim_payer(by_id, {"urn:payers|77": "careplus"}, ()) == ("careplus", "")
    nameless = {**claim, "insurance": [{"focal": True, "coverage": {"reference": "Coverage/c"}}]}
    with pytest.raises(ClaimError, match="the payer is not named"):
        claim_payer(nameless, {}, ())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"use": "preauthorization"}, "only 'claim' is imported"),
        ({"item": []}, "1-50 items"),
        ({"patient": {"reference": "Group/g"}}, "not a Patient reference"),
    ],
)
def test_what_is_not_claim_history_is_refused(change: Json, reason: str) -> None:
    claim, _ = synthea_pair()
    with pytest.raises(ClaimError, match=reason):
        extract_history_claim({**claim, **change}, {}, ())


def test_a_line_without_a_code_system_uri_or_two_currencies_is_refused() -> None:
    claim, _ = synthea_pair()
    odd = copy.deepcopy(claim)
    odd["item"][1]["productOrService"]["coding"][0]["system"] = "local codes"
    with pytest.raises(ClaimError, match="productOrService has no coding with a code system"):
        extract_history_claim(odd, {}, ())
    euros = copy.deepcopy(claim)
    euros["item"][1]["net"]["currency"] = "EUR"
    with pytest.raises(ClaimError, match="exactly one currency"):
        extract_history_claim(euros, {}, ())


def test_amounts_are_rounded_half_to_even_to_cents() -> None:
    assert to_minor_units(28.104000000000003, "x", rounded=True) == 2810
    assert to_minor_units("0.125", "x", rounded=True) == 12
    assert to_minor_units("0.135", "x", rounded=True) == 14
    # Exact amounts (claim.submit) refuse more precision; neither mode takes what is no number.
    with pytest.raises(ClaimError, match="more than two decimal places"):
        to_minor_units(28.104, "x")
    for rounded in (True, False):
        for hostile in ("abc", True, "NaN", float("nan"), "Infinity", "1e999999"):
            with pytest.raises(ClaimError, match="not a number"):
                to_minor_units(hostile, "x", rounded=rounded)


def test_the_payers_table(tmp_path: Path) -> None:
    config = tmp_path / "medledger.toml"
    assert load_payers(tmp_path) == {}
    config.write_text('[node]\nmoniker = "n"\n\n[claims]\npayers = { "Aetna" = "careplus" }\n')
    assert load_payers(tmp_path) == {"Aetna": "careplus"}
    config.write_text('[claims]\npayers = { "Aetna" = 7 }\n')
    with pytest.raises(ConfigError, match="maps a payer's name"):
        load_payers(tmp_path)
    config.write_text("[claims]\npayer = {}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_payers(tmp_path)
