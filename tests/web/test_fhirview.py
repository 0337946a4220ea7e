"""Records as people read them, and records from the portal's clinical forms."""

from __future__ import annotations

import json

import pytest

from medledger.samples.fhir import generate_patient_record_set
from medledger.validation import validate_resource
from medledger.web.fhirview import describe, range_text
from medledger.web.forms import FormProblem, resource_from_form

PATIENT = "Patient/4d69e4538f794c5234c25970e568a318287025b6"
AUTHOR = "91d4baf38b352d8c4c431ef1387afd7597e341f6"


def _chart() -> list[dict[str, object]]:
    return generate_patient_record_set(
        1101, PATIENT, f"Practitioner/{AUTHOR}", when="2026-11-01T09:00:00Z", count=40
    )


def test_a_lab_value_reads_with_its_unit_range_and_flag() -> None:
    glucose = next(r for r in _chart() if json.dumps(r.get("code")).find('"Glucose"') > 0)
    view = describe(glucose)
    assert view.kind == "Lab result" and view.title == "Glucose"
    assert view.summary == "209 mg/dL (reference 70–99 mg/dL) — High"
    assert view.flag == "high"
    facts = {f.label: f for f in view.facts}
    assert facts["Value"].value == "209 mg/dL" and facts["Value"].flag == "high"
    assert facts["Reference range"].value == "70–99 mg/dL"
    assert facts["Codes"].value == "LOINC 2345-7"
    assert view.when.startswith("2026-")


def test_every_sample_resource_has_a_readable_summary() -> None:
    kinds = set()
    for resource in _chart():
        view = describe(resource)
        kinds.add(view.kind)
        assert view.title and view.title != resource["resourceType"], resource
        assert view.when, resource
    assert {"Lab result", "Vital signs", "Condition", "Medication", "Report"} <= kinds


def test_medications_conditions_and_components() -> None:
    chart = _chart()
    medication = describe(next(r for r in chart if r["resourceType"] == "MedicationRequest"))
    assert "MG Oral Tablet" in medication.title and "active" in medication.summary
    pressure = describe(next(r for r in chart if r.get("component")))
    assert " / " in pressure.summary and "mmHg" in pressure.summary
    condition = describe(next(r for r in chart if r["resourceType"] == "Condition"))
    assert condition.summary.startswith("Active")


def test_one_sided_reference_ranges() -> None:
    assert range_text([{"high": {"value": 100, "unit": "mg/dL"}}]) == "< 100 mg/dL"
    assert range_text([{"low": {"value": 40.0, "unit": "mg/dL"}}]) == "> 40 mg/dL"
    assert range_text([{"text": "negative"}]) == "negative"
    assert range_text(None) == ""


@pytest.mark.parametrize(
    ("form", "resource_type"),
    [
        (
            {"kind": "lab", "name": "HbA1c", "code": "4548-4", "value": "7.2", "unit": "%",
             "low": "4.0", "high": "5.6"},
            "Observation",
        ),
        ({"kind": "condition", "name": "Asthma", "code": "195967001", "onset": "2020-05-01"},
         "Condition"),
        ({"kind": "medication", "name": "Salbutamol inhaler", "dosage": "2 puffs as needed"},
         "MedicationRequest"),
    ],
)  # fmt: skip
def test_clinical_forms_make_valid_fhir(form: dict[str, str], resource_type: str) -> None:
    resource = resource_from_form(form, PATIENT.split("/")[1], AUTHOR)
    validated = validate_resource(resource)
    assert validated.resource_type == resource_type
    assert validated.patient_reference == PATIENT


def test_a_lab_form_flags_values_outside_the_range() -> None:
    form = {"kind": "lab", "name": "HbA1c", "value": "7.2", "unit": "%", "low": "4", "high": "5.6"}
    view = describe(resource_from_form(form, "p", "a"))
    assert view.flag == "high" and "reference 4–5.6 %" in view.summary


@pytest.mark.parametrize(
    ("form", "problem"),
    [
        ({"kind": "lab", "name": "HbA1c", "unit": "%"}, "Value is required"),
        ({"kind": "lab", "name": "HbA1c", "value": "high", "unit": "%"}, "must be a number"),
        ({"kind": "condition"}, "Condition is required"),
        ({"kind": "json", "resource": "{not json"}, "not valid JSON"),
        ({"kind": "json", "resource": "[]"}, "one resource"),
        ({}, "Choose what kind"),
    ],
)
def test_incomplete_forms_say_what_to_fix(form: dict[str, str], problem: str) -> None:
    with pytest.raises(FormProblem, match=problem):
        resource_from_form(form, "p", "a")


def test_governance_actions_read_as_words() -> None:
    from medledger.ledger.transactions import SetParameter
    from medledger.web.explorer import action_text

    text = action_text(SetParameter("proposal_period_blocks", 2000))
    assert text == "param.set: name = proposal_period_blocks, value = 2000"
