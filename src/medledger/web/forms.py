"""FHIR R4 resources from the portal's short clinical forms: a lab result, a condition, a
prescription. Each becomes a complete resource with the usual code systems, validated by the
SDK like any other record before it is sealed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from medledger.validation import FhirValidationError

TERMINOLOGY = "http://terminology.hl7.org/CodeSystem"
UCUM = "http://unitsofmeasure.org"
SYSTEMS = {
    "lab": "http://loinc.org",
    "condition": "http://snomed.info/sct",
    "medication": "http://www.nlm.nih.gov/research/umls/rxnorm",
}
KINDS = ("lab", "condition", "medication", "json")


class FormProblem(ValueError):
    """The form cannot make a resource; the message says which field to fix."""


def _text(form: Mapping[str, Any], name: str, label: str, required: bool = True) -> str:
    value = form.get(name, "")
    text = value.strip() if isinstance(value, str) else ""
    if required and not text:
        raise FormProblem(f"{label} is required.")
    return text[:500]


def _number(form: Mapping[str, Any], name: str, label: str, required: bool) -> float | None:
    text = _text(form, name, label, required)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise FormProblem(f"{label} must be a number.") from None
    return int(value) if value.is_integer() else value


def _concept(kind: str, code: str, name: str) -> dict[str, Any]:
    concept: dict[str, Any] = {"text": name}
    if code:
        concept["coding"] = [{"system": SYSTEMS[kind], "code": code, "display": name}]
    return concept


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def interpretation(value: float, low: float | None, high: float | None) -> tuple[str, str]:
    if low is not None and value < low:
        return "L", "Low"
    if high is not None and value > high:
        return "H", "High"
    return "N", "Normal"


def lab_result(form: Mapping[str, Any], patient: str, author: str) -> dict[str, Any]:
    name = _text(form, "name", "Test name")
    value = _number(form, "value", "Value", True)
    assert value is not None
    unit = _text(form, "unit", "Unit")
    low = _number(form, "low", "Reference low", False)
    high = _number(form, "high", "Reference high", False)
    quantity = {"unit": unit, "system": UCUM, "code": unit}
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": f"{TERMINOLOGY}/observation-category",
                        "code": "laboratory",
                        "display": "Laboratory",
                    }
                ]
            }
        ],
        "code": _concept("lab", _text(form, "code", "LOINC code", False), name),
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": _now(),
        "performer": [{"reference": f"Practitioner/{author}"}],
        "valueQuantity": {"value": value, **quantity},
    }
    if low is not None or high is not None:
        bounds: dict[str, Any] = {}
        if low is not None:
            bounds["low"] = {"value": low, **quantity}
        if high is not None:
            bounds["high"] = {"value": high, **quantity}
        resource["referenceRange"] = [bounds]
        code, display = interpretation(value, low, high)
        resource["interpretation"] = [
            {
                "coding": [
                    {
                        "system": f"{TERMINOLOGY}/v3-ObservationInterpretation",
                        "code": code,
                        "display": display,
                    }
                ]
            }
        ]
    return resource


def condition(form: Mapping[str, Any], patient: str, author: str) -> dict[str, Any]:
    name = _text(form, "name", "Condition")
    onset = _text(form, "onset", "Onset date", False)
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "clinicalStatus": {
            "coding": [{"system": f"{TERMINOLOGY}/condition-clinical", "code": "active"}]
        },
        "verificationStatus": {
            "coding": [{"system": f"{TERMINOLOGY}/condition-ver-status", "code": "confirmed"}]
        },
        "category": [
            {
                "coding": [
                    {
                        "system": f"{TERMINOLOGY}/condition-category",
                        "code": "problem-list-item",
                        "display": "Problem List Item",
                    }
                ]
            }
        ],
        "code": _concept("condition", _text(form, "code", "SNOMED CT code", False), name),
        "subject": {"reference": f"Patient/{patient}"},
        "recordedDate": _now(),
        "recorder": {"reference": f"Practitioner/{author}"},
    }
    if onset:
        resource["onsetDateTime"] = onset
    return resource


def medication(form: Mapping[str, Any], patient: str, author: str) -> dict[str, Any]:
    name = _text(form, "name", "Medication")
    dosage = _text(form, "dosage", "Dosage", False)
    resource: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": _concept(
            "medication", _text(form, "code", "RxNorm code", False), name
        ),
        "subject": {"reference": f"Patient/{patient}"},
        "authoredOn": _now(),
        "requester": {"reference": f"Practitioner/{author}"},
    }
    if dosage:
        resource["dosageInstruction"] = [{"text": dosage}]
    return resource


def resource_from_form(form: Mapping[str, Any], patient: str, author: str) -> dict[str, Any]:
    """The resource the form describes (kind lab, condition, medication, or raw FHIR json)."""
    kind = form.get("kind", "")
    if kind == "lab":
        return lab_result(form, patient, author)
    if kind == "condition":
        return condition(form, patient, author)
    if kind == "medication":
        return medication(form, patient, author)
    if kind == "json":
        return parse_json(_text_unbounded(form, "resource"))
    raise FormProblem("Choose what kind of record to add.")


def _text_unbounded(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


def parse_json(text: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise FormProblem(f"The FHIR JSON is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise FormProblem("The FHIR JSON must be one resource (a JSON object).")
    return document


def problem_text(exc: FhirValidationError | FormProblem) -> str:
    if isinstance(exc, FhirValidationError):
        return "; ".join((exc.message, *exc.problems))
    return str(exc)
