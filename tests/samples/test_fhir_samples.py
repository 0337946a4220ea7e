"""The sample generator gives valid, reproducible, varied and clinically consistent FHIR."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from medledger.samples.fhir import (
    canonical_json,
    generate_patient,
    generate_patient_record_set,
    sized_observation,
)

PATIENT = "Patient/0f6c2a51-7d1e-4b8e-9a40-2b1f3c9e8d11"
AUTHOR = "Practitioner/st-mary-dr-okafor"
WHEN = "2025-06-01T12:00:00+00:00"
WHEN_DT = datetime(2025, 6, 1, 12, tzinfo=UTC)

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

ALL_TYPES = {
    "Observation",
    "DiagnosticReport",
    "Condition",
    "MedicationRequest",
    "AllergyIntolerance",
    "Immunization",
    "Encounter",
    "Procedure",
}


def record_set(seed: int, count: int = 8, **kwargs: Any) -> list[dict[str, Any]]:
    return generate_patient_record_set(seed, PATIENT, AUTHOR, when=WHEN, count=count, **kwargs)


def many_sets(count: int, seeds: range = range(80)) -> list[list[dict[str, Any]]]:
    return [record_set(seed, count) for seed in seeds]


def validate(resource: dict[str, Any]) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def compact(resource: dict[str, Any]) -> bytes:
    return json.dumps(resource, sort_keys=True, separators=(",", ":")).encode()


def category_codes(resource: dict[str, Any]) -> set[str]:
    return {coding["code"] for concept in resource["category"] for coding in concept["coding"]}


def code_of(resource: dict[str, Any], element: str = "code") -> tuple[str, str]:
    coding = resource[element]["coding"][0]
    return coding["system"], coding["code"]


def is_lab(resource: dict[str, Any]) -> bool:
    return resource["resourceType"] == "Observation" and "laboratory" in category_codes(resource)


def moment_of(resource: dict[str, Any]) -> datetime:
    for element in ("effectiveDateTime", "recordedDate", "authoredOn", "occurrenceDateTime"):
        if element in resource:
            return datetime.fromisoformat(resource[element])
    if "period" in resource:
        return datetime.fromisoformat(resource["period"]["start"])
    return datetime.fromisoformat(resource["performedPeriod"]["start"])


# --- Validity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 5, 8, 30])
def test_every_generated_resource_validates_as_fhir(count: int) -> None:
    for resources in many_sets(count, range(60)):
        assert len(resources) == count
        for resource in resources:
            validate(resource)


def test_patients_and_sized_observations_validate() -> None:
    for seed in range(100):
        validate(generate_patient(seed))
        validate(sized_observation(seed))
        validate(sized_observation(seed, 8192))


def test_count_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        record_set(1, 0)


# --- Determinism -------------------------------------------------------------------------------


def test_same_seed_same_output() -> None:
    for seed in (0, 1, 42, 2**40):
        assert record_set(seed, 12) == record_set(seed, 12)
        assert canonical_json(generate_patient(seed)) == canonical_json(generate_patient(seed))
        assert sized_observation(seed) == sized_observation(seed)


def test_different_seeds_differ() -> None:
    outputs = {b"".join(compact(r) for r in record_set(seed, 8)) for seed in range(30)}
    assert len(outputs) == 30
    assert len({generate_patient(seed)["id"] for seed in range(30)}) == 30


def test_when_may_be_a_datetime_and_naive_means_utc() -> None:
    as_string = record_set(5, 10)
    assert generate_patient_record_set(5, PATIENT, AUTHOR, when=WHEN_DT, count=10) == as_string
    naive = generate_patient_record_set(5, PATIENT, AUTHOR, when="2025-06-01T12:00:00", count=10)
    assert naive == as_string


def test_ids_are_unique_name_based_uuids() -> None:
    seen: set[str] = set()
    for seed in range(40):
        for resource in record_set(seed, 20):
            assert uuid.UUID(resource["id"]).version == 5
            assert resource["id"] not in seen
            seen.add(resource["id"])
    # The same seed for another patient does not reuse ids.
    other = generate_patient_record_set(0, "Patient/other", AUTHOR, when=WHEN, count=20)
    assert not {r["id"] for r in other} & {r["id"] for r in record_set(0, 20)}


# --- Variety and shape -------------------------------------------------------------------------


def test_small_sets_are_varied_and_all_types_appear() -> None:
    types_seen: Counter[str] = Counter()
    categories: set[str] = set()
    for resources in many_sets(8):
        types = {r["resourceType"] for r in resources}
        assert len(types) >= 3
        types_seen.update(types)
        for r in resources:
            if r["resourceType"] == "Observation":
                categories |= category_codes(r)
    assert set(types_seen) == ALL_TYPES
    assert {"vital-signs", "laboratory"} <= categories


def test_dates_fall_in_the_year_before_when_and_run_oldest_first() -> None:
    for resources in many_sets(25, range(40)):
        moments = [moment_of(r) for r in resources]
        assert moments == sorted(moments)
        for moment in moments:
            assert WHEN_DT - timedelta(days=366) <= moment < WHEN_DT


def test_references_point_to_the_patient_and_the_author() -> None:
    for resources in many_sets(25, range(40)):
        for r in resources:
            subject = r.get("subject") or r.get("patient")
            assert subject == {"reference": PATIENT}
            for element in ("recorder", "requester"):
                if element in r:
                    assert r[element] == {"reference": AUTHOR}
            for performer in r.get("performer", []):
                assert performer.get("actor", performer) == {"reference": AUTHOR}
            if r["resourceType"] == "Encounter":
                assert r["participant"][0]["individual"] == {"reference": AUTHOR}


def test_codes_come_from_the_standard_systems() -> None:
    expected = {
        "Observation": LOINC,
        "DiagnosticReport": LOINC,
        "Condition": SNOMED,
        "AllergyIntolerance": SNOMED,
        "Procedure": SNOMED,
    }
    for resources in many_sets(25, range(40)):
        for r in resources:
            kind = r["resourceType"]
            if kind in expected:
                assert code_of(r)[0] == expected[kind]
            elif kind == "MedicationRequest":
                assert code_of(r, "medicationCodeableConcept")[0] == RXNORM
                assert r["dosageInstruction"][0]["text"]
            elif kind == "Immunization":
                assert code_of(r, "vaccineCode")[0] == CVX
            if kind == "Observation":
                assert category_codes(r) & {"vital-signs", "laboratory"}
                quantities = [r["valueQuantity"]] if "valueQuantity" in r else []
                quantities += [c["valueQuantity"] for c in r.get("component", [])]
                assert quantities
                assert all(q["system"] == UCUM and q["code"] for q in quantities)
            if kind == "Condition":
                assert category_codes(r) == {"problem-list-item"}
                assert r["clinicalStatus"]["coding"][0]["code"] == "active"
                assert r["verificationStatus"]["coding"][0]["code"] == "confirmed"


def test_blood_pressure_is_a_panel_of_systolic_and_diastolic() -> None:
    panels = [
        r
        for resources in many_sets(30, range(40))
        for r in resources
        if r["resourceType"] == "Observation" and code_of(r) == (LOINC, "85354-9")
    ]
    assert panels
    for panel in panels:
        assert "valueQuantity" not in panel
        components = {
            c["code"]["coding"][0]["code"]: c["valueQuantity"] for c in panel["component"]
        }
        assert set(components) == {"8480-6", "8462-4"}
        assert all(q["code"] == "mm[Hg]" for q in components.values())
        assert components["8480-6"]["value"] > components["8462-4"]["value"]


def test_bmi_agrees_with_weight_and_height_of_the_same_visit() -> None:
    checked = 0
    for resources in many_sets(40, range(30)):
        visits: dict[str, dict[str, float]] = {}
        for r in resources:
            if r["resourceType"] == "Observation" and "valueQuantity" in r:
                visit = visits.setdefault(r["effectiveDateTime"], {})
                visit[code_of(r)[1]] = r["valueQuantity"]["value"]
        for vitals in visits.values():
            if {"29463-7", "8302-2", "39156-5"} <= set(vitals):
                bmi = vitals["29463-7"] / (vitals["8302-2"] / 100) ** 2
                assert vitals["39156-5"] == pytest.approx(bmi, abs=0.11)
                assert 15 < bmi < 45
                checked += 1
    assert checked > 0


# --- Laboratory results ------------------------------------------------------------------------


def expected_flag(value: float, low: float | None, high: float | None) -> str:
    if low is not None and value < low:
        return "L"
    if high is not None and value > high:
        return "H"
    return "N"


def test_interpretation_agrees_with_the_reference_range() -> None:
    flags: Counter[str] = Counter()
    labs = [r for resources in many_sets(30) for r in resources if is_lab(r)]
    labs += [sized_observation(seed) for seed in range(80)]
    for obs in labs:
        value = obs["valueQuantity"]["value"]
        (ref_range,) = obs["referenceRange"]
        assert "low" in ref_range or "high" in ref_range
        low = ref_range["low"]["value"] if "low" in ref_range else None
        high = ref_range["high"]["value"] if "high" in ref_range else None
        for bound in ("low", "high"):
            if bound in ref_range:
                assert ref_range[bound]["code"] == obs["valueQuantity"]["code"]
        (interpretation,) = obs["interpretation"]
        flag = interpretation["coding"][0]["code"]
        assert flag == expected_flag(value, low, high), obs["code"]["text"]
        flags[flag] += 1
    assert flags["N"] and flags["H"] and flags["L"]


def test_diagnostic_reports_reference_their_own_observations() -> None:
    reports = 0
    for resources in many_sets(30, range(60)):
        by_ref = {
            f"Observation/{r['id']}": r for r in resources if r["resourceType"] == "Observation"
        }
        for report in (r for r in resources if r["resourceType"] == "DiagnosticReport"):
            reports += 1
            assert report["result"]
            for result in report["result"]:
                obs = by_ref[result["reference"]]
                assert is_lab(obs)
                assert obs["effectiveDateTime"] == report["effectiveDateTime"]
    assert reports > 0


def test_metabolic_panel_holds_the_usual_analytes() -> None:
    for resources in many_sets(30, range(60)):
        codes = {f"Observation/{r['id']}": code_of(r)[1] for r in resources if is_lab(r)}
        for report in resources:
            if report["resourceType"] == "DiagnosticReport" and code_of(report)[1] == "51990-0":
                members = {codes[result["reference"]] for result in report["result"]}
                assert {"2345-7", "2160-0", "2823-3", "2951-2"} <= members
                return
    pytest.fail("no basic metabolic panel generated")


# --- Patient and sized observation -------------------------------------------------------------


def test_patient_has_name_gender_birth_date_and_mrn() -> None:
    for seed in range(50):
        patient = generate_patient(seed)
        assert patient["gender"] in {"female", "male"}
        assert patient["name"][0]["family"] and patient["name"][0]["given"]
        assert 1938 <= int(patient["birthDate"][:4]) <= 2005
        (mrn,) = patient["identifier"]
        assert mrn["system"] == "urn:medledger:mrn:st-mary"
        assert mrn["value"].isdigit()
    assert generate_patient(3, org="riverside")["identifier"][0]["system"] == (
        "urn:medledger:mrn:riverside"
    )


@pytest.mark.parametrize("target", [2048, 4096, 16384])
def test_sized_observation_is_close_to_the_target_size(target: int) -> None:
    for seed in range(100):
        obs = sized_observation(seed, target)
        size = len(compact(obs))
        assert abs(size - target) <= target * 0.1, (seed, size)
        assert size <= target
        assert is_lab(obs) and obs["note"][0]["text"]
        assert size == len(canonical_json(obs))


def test_sized_observation_uses_given_references() -> None:
    obs = sized_observation(9, patient_ref=PATIENT, author_ref=AUTHOR)
    assert obs["subject"] == {"reference": PATIENT}
    assert obs["performer"] == [{"reference": AUTHOR}]
