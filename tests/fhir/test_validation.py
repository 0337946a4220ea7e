from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.validation import (
    REQUIRED_CODES,
    FhirValidationError,
    ValidatedResource,
    validate_resource,
)

GLUCOSE: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "glucose-1",
    "meta": {"lastUpdated": "2024-03-01T09:12:00Z"},
    "status": "final",
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "laboratory",
                    "display": "Laboratory",
                }
            ]
        }
    ],
    "code": {
        "coding": [
            {
                "system": "http://loinc.org",
                "code": "2345-7",
                "display": "Glucose [Mass/volume] in Serum or Plasma",
            }
        ],
        "text": "Glucose",
    },
    "subject": {"reference": "Patient/example", "display": "Amy Shaw"},
    "encounter": {"reference": "Encounter/visit-17"},
    "effectiveDateTime": "2024-03-01T08:30:00+01:00",
    "issued": "2024-03-01T09:12:00.000+01:00",
    "performer": [{"reference": "Organization/northside-lab"}],
    "valueQuantity": {
        "value": 95,
        "unit": "mg/dL",
        "system": "http://unitsofmeasure.org",
        "code": "mg/dL",
    },
    "interpretation": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                    "code": "N",
                    "display": "Normal",
                }
            ]
        }
    ],
    "referenceRange": [
        {
            "low": {
                "value": 70,
                "unit": "mg/dL",
                "system": "http://unitsofmeasure.org",
                "code": "mg/dL",
            },
            "high": {
                "value": 99,
                "unit": "mg/dL",
                "system": "http://unitsofmeasure.org",
                "code": "mg/dL",
            },
            "text": "70-99 mg/dL (fasting)",
        }
    ],
}

BLOOD_PRESSURE: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "bp-1",
    "status": "final",
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "vital-signs",
                }
            ]
        }
    ],
    "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
    "subject": {"reference": "Patient/example"},
    "effectiveDateTime": "2024-03-01",
    "component": [
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
            "valueQuantity": {
                "value": 118,
                "unit": "mmHg",
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
        },
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
            "valueQuantity": {
                "value": 76,
                "unit": "mmHg",
                "system": "http://unitsofmeasure.org",
                "code": "mm[Hg]",
            },
        },
    ],
}

CONDITION: dict[str, Any] = {
    "resourceType": "Condition",
    "id": "diabetes",
    "clinicalStatus": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active",
            }
        ]
    },
    "verificationStatus": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "code": "confirmed",
            }
        ]
    },
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                    "code": "problem-list-item",
                    "display": "Problem List Item",
                }
            ]
        }
    ],
    "code": {
        "coding": [
            {
                "system": "http://snomed.info/sct",
                "code": "44054006",
                "display": "Diabetes mellitus type 2",
            }
        ]
    },
    "subject": {"reference": "Patient/example"},
    "onsetDateTime": "2019-06-12",
    "recordedDate": "2019-06-14",
}

MEDICATION_REQUEST: dict[str, Any] = {
    "resourceType": "MedicationRequest",
    "id": "metformin",
    "status": "active",
    "intent": "order",
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                    "code": "outpatient",
                }
            ]
        }
    ],
    "medicationCodeableConcept": {
        "coding": [
            {
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                "code": "860975",
                "display": "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet",
            }
        ]
    },
    "subject": {"reference": "Patient/example"},
    "authoredOn": "2024-03-02",
    "requester": {"reference": "Practitioner/dr-jones"},
    "dosageInstruction": [
        {
            "text": "1 tablet by mouth once daily with the evening meal",
            "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
            "route": {"coding": [{"system": "http://snomed.info/sct", "code": "26643006"}]},
            "doseAndRate": [
                {
                    "doseQuantity": {
                        "value": 1,
                        "unit": "tablet",
                        "system": "http://terminology.hl7.org/CodeSystem/v3-orderableDrugForm",
                        "code": "TAB",
                    }
                }
            ],
        }
    ],
}

ALLERGY: dict[str, Any] = {
    "resourceType": "AllergyIntolerance",
    "id": "penicillin",
    "clinicalStatus": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                "code": "active",
            }
        ]
    },
    "verificationStatus": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                "code": "confirmed",
            }
        ]
    },
    "type": "allergy",
    "category": ["medication"],
    "criticality": "high",
    "code": {
        "coding": [
            {
                "system": "http://snomed.info/sct",
                "code": "91936005",
                "display": "Allergy to penicillin",
            }
        ]
    },
    "patient": {"reference": "Patient/example"},
    "recordedDate": "2015-08-06T15:37:31-06:00",
    "reaction": [
        {
            "manifestation": [
                {"coding": [{"system": "http://snomed.info/sct", "code": "247472004"}]}
            ],
            "severity": "moderate",
        }
    ],
}

IMMUNIZATION: dict[str, Any] = {
    "resourceType": "Immunization",
    "id": "flu-2023",
    "status": "completed",
    "vaccineCode": {
        "coding": [
            {
                "system": "http://hl7.org/fhir/sid/cvx",
                "code": "158",
                "display": "influenza, injectable, quadrivalent",
            }
        ]
    },
    "patient": {"reference": "Patient/example"},
    "occurrenceDateTime": "2023-10-15",
    "primarySource": True,
    "lotNumber": "AAJN11K",
    "doseQuantity": {"value": 0.5, "unit": "mL", "system": "http://unitsofmeasure.org"},
}

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "example",
    "identifier": [
        {
            "use": "usual",
            "type": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}
                ]
            },
            "system": "urn:oid:1.2.36.146.595.217.0.1",
            "value": "12345",
        }
    ],
    "active": True,
    "name": [{"use": "official", "family": "Shaw", "given": ["Amy", "V."]}],
    "telecom": [{"system": "phone", "value": "+1 555 0100", "use": "home"}],
    "gender": "female",
    "birthDate": "1987-02-20",
    "address": [{"line": ["49 Meadow St"], "city": "Mounds", "state": "OK", "postalCode": "74047"}],
}

CLAIM: dict[str, Any] = {
    "resourceType": "Claim",
    "id": "claim-1",
    "status": "active",
    "type": {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}
        ]
    },
    "use": "claim",
    "patient": {"reference": "Patient/example"},
    "created": "2024-03-02",
    "provider": {"reference": "Organization/st-mary"},
    "priority": {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/processpriority", "code": "normal"}
        ]
    },
    "insurance": [{"sequence": 1, "focal": True, "coverage": {"reference": "Coverage/cov-1"}}],
}


def _with(resource: dict[str, Any], **changes: Any) -> dict[str, Any]:
    result = copy.deepcopy(resource)
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


# -- valid resources ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "resource_type", "category", "patient"),
    [
        (GLUCOSE, "Observation", "laboratory", "Patient/example"),
        (BLOOD_PRESSURE, "Observation", "vital-signs", "Patient/example"),
        (CONDITION, "Condition", "problem-list-item", "Patient/example"),
        (MEDICATION_REQUEST, "MedicationRequest", "medication", "Patient/example"),
        (ALLERGY, "AllergyIntolerance", "allergy", "Patient/example"),
        (IMMUNIZATION, "Immunization", "immunization", "Patient/example"),
        (PATIENT, "Patient", "demographics", "Patient/example"),
        (CLAIM, "Claim", "claim", "Patient/example"),
    ],
)
def test_valid_r4_resources(
    resource: dict[str, Any], resource_type: str, category: str, patient: str
) -> None:
    result = validate_resource(json.dumps(resource).encode())
    assert isinstance(result, ValidatedResource)
    assert result.resource_type == resource_type
    assert result.category == category
    assert result.patient_reference == patient
    assert json.loads(result.canonical) == result.resource
    assert result.resource["resourceType"] == resource_type


def test_glucose_observation_content_is_kept() -> None:
    result = validate_resource(GLUCOSE)
    value = result.resource["valueQuantity"]
    assert value == {
        "value": 95,
        "unit": "mg/dL",
        "system": "http://unitsofmeasure.org",
        "code": "mg/dL",
    }
    assert result.resource["code"]["coding"][0]["code"] == "2345-7"
    assert result.resource["referenceRange"][0]["low"]["value"] == 70
    assert result.resource["effectiveDateTime"] == "2024-03-01T08:30:00+01:00"


def test_inputs_as_bytes_text_and_dict_agree() -> None:
    as_bytes = validate_resource(json.dumps(CONDITION).encode())
    as_text = validate_resource(json.dumps(CONDITION, indent=2))
    as_dict = validate_resource(CONDITION)
    assert as_bytes == as_text == as_dict


def test_canonical_bytes_are_sorted_and_compact() -> None:
    text = '{ "status": "final", "resourceType": "Observation",\n  "code": { "text": "Glucose" } }'
    canonical = validate_resource(text).canonical
    assert canonical == b'{"code":{"text":"Glucose"},"resourceType":"Observation","status":"final"}'
    document = json.loads(validate_resource(GLUCOSE).canonical)
    assert validate_resource(GLUCOSE).canonical == json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def test_canonical_is_idempotent() -> None:
    for resource in (GLUCOSE, BLOOD_PRESSURE, CONDITION, MEDICATION_REQUEST, ALLERGY, PATIENT):
        first = validate_resource(resource)
        assert validate_resource(first.canonical) == first


def test_canonical_drops_empty_elements_and_keeps_unicode() -> None:
    patient = _with(PATIENT, name=[{"family": "Müller", "given": ["Zoë"]}], active=None)
    canonical = validate_resource(patient).canonical
    assert "Müller".encode() in canonical
    assert b'"active"' not in canonical


@settings(max_examples=50, deadline=None)
@given(st.permutations(list(GLUCOSE)), st.sampled_from([None, 1, 2, 4]))
def test_same_resource_same_bytes(order: list[str], indent: int | None) -> None:
    reordered = {key: GLUCOSE[key] for key in order}
    text = json.dumps(reordered, indent=indent)
    assert validate_resource(text).canonical == validate_resource(GLUCOSE).canonical


def test_category_falls_back_to_the_resource_type() -> None:
    uncategorised = _with(GLUCOSE, category=None)
    assert validate_resource(uncategorised).category == "observation"
    report = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "24323-8"}]},
        "subject": {"reference": "Patient/example"},
        "result": [{"reference": "Observation/glucose-1"}],
    }
    assert validate_resource(report).category == "lab"  # one case on the ledger
    practitioner = {"resourceType": "Practitioner", "id": "dr-jones", "gender": "male"}
    result = validate_resource(practitioner)
    assert (result.category, result.patient_reference) == ("practitioner", None)


def test_patient_reference_variants() -> None:
    coverage = {
        "resourceType": "Coverage",
        "status": "active",
        "beneficiary": {"reference": "Patient/example"},
        "payor": [{"reference": "Organization/careplus"}],
    }
    assert validate_resource(coverage).patient_reference == "Patient/example"
    assert validate_resource(_with(PATIENT, id=None)).patient_reference is None
    assert validate_resource(_with(GLUCOSE, subject=None)).patient_reference is None


# -- invalid input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not valid JSON"),
        ("{", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        ("[1, 2]", "expected a JSON object, got array"),
        ('{"resourceType": "Patient", "id": "a", "id": "b"}', "duplicate key 'id'"),
        ('{"resourceType": "Observation", "valueQuantity": {"value": NaN}}', "NaN"),
    ],
)
def test_not_json(data: bytes | str, message: str) -> None:
    with pytest.raises(FhirValidationError, match=message):
        validate_resource(data)


def test_missing_resource_type() -> None:
    with pytest.raises(FhirValidationError, match="no resourceType"):
        validate_resource(_with(GLUCOSE, resourceType=None))
    with pytest.raises(FhirValidationError, match="not a resource type name"):
        validate_resource(_with(GLUCOSE, resourceType=7))


@pytest.mark.parametrize("name", ["Observaton", "Reference", "CodeableConcept", "Resource"])
def test_unknown_resource_type(name: str) -> None:
    with pytest.raises(FhirValidationError, match=f"unknown FHIR resource type '{name}'"):
        validate_resource(_with(GLUCOSE, resourceType=name))


def test_wrong_type_for_a_field() -> None:
    bad = _with(GLUCOSE, referenceRange={"low": {"value": 70}}, subject="Patient/example")
    bad["code"]["coding"][0]["system"] = 42
    bad["valueQuantity"]["value"] = "ninety-five"
    with pytest.raises(FhirValidationError) as caught:
        validate_resource(bad)
    problems = caught.value.problems
    assert "Observation.referenceRange: Input should be a valid list" in problems
    assert "Observation.subject: expected a JSON object, got string" in problems
    assert "Observation.code.coding[0].system: Input should be a valid string" in problems
    assert any(p.startswith("Observation.valueQuantity.value: ") for p in problems)
    message = str(caught.value)
    assert message.startswith("invalid FHIR Observation resource\n")
    assert all(problem in message for problem in problems)


def test_unknown_element_and_bad_date() -> None:
    bad = _with(GLUCOSE, colour="blue", effectiveDateTime="yesterday")
    with pytest.raises(FhirValidationError) as caught:
        validate_resource(bad)
    assert "Observation.colour: Extra inputs are not permitted" in caught.value.problems
    assert any(p.startswith("Observation.effectiveDateTime: ") for p in caught.value.problems)


def test_missing_required_element() -> None:
    with pytest.raises(FhirValidationError) as caught:
        validate_resource(_with(GLUCOSE, status=None))
    assert caught.value.problems == (
        "Observation.status: Value for the field 'status' is required.",
    )


def test_two_choices_of_one_element() -> None:
    with pytest.raises(FhirValidationError, match="valueQuantity"):
        validate_resource(_with(GLUCOSE, valueString="95 mg/dL"))


@pytest.mark.parametrize(
    ("resource", "element", "value"),
    [
        (GLUCOSE, "status", "done"),
        (GLUCOSE, "status", "FINAL"),
        (MEDICATION_REQUEST, "status", "finished"),
        (MEDICATION_REQUEST, "intent", "wish"),
        (IMMUNIZATION, "status", "given"),
        (PATIENT, "gender", "f"),
        (CLAIM, "use", "bill"),
        (ALLERGY, "criticality", "severe"),
    ],
)
def test_invalid_code_for_a_required_binding(
    resource: dict[str, Any], element: str, value: str
) -> None:
    resource_type = resource["resourceType"]
    with pytest.raises(FhirValidationError) as caught:
        validate_resource(_with(resource, **{element: value}))
    (problem,) = caught.value.problems
    assert problem.startswith(f"{resource_type}.{element}: {value!r} is not one of ")


def test_invalid_code_in_a_code_list() -> None:
    with pytest.raises(FhirValidationError) as caught:
        validate_resource(_with(ALLERGY, category=["medication", "pollen"]))
    (problem,) = caught.value.problems
    assert problem.startswith("AllergyIntolerance.category[1]: 'pollen' is not one of ")


def test_invalid_clinical_status_concept() -> None:
    bad = copy.deepcopy(CONDITION)
    bad["clinicalStatus"]["coding"][0]["code"] = "cured"
    with pytest.raises(FhirValidationError) as caught:
        validate_resource(bad)
    (problem,) = caught.value.problems
    assert problem.startswith("Condition.clinicalStatus: needs a coding from ")


def test_every_r4_status_code_is_accepted() -> None:
    for code in REQUIRED_CODES["Observation"]["status"]:
        assert validate_resource(_with(GLUCOSE, status=code)).resource["status"] == code


@pytest.mark.parametrize(
    ("resource_type", "element"),
    [(rt, element) for rt, elements in REQUIRED_CODES.items() for element in elements],
)
def test_required_codes_agree_with_the_models(resource_type: str, element: str) -> None:
    """Where the R4B model lists a value set's codes, they are the R4 codes listed here."""
    field = get_fhir_model_class(resource_type).model_fields[element]
    extra = field.json_schema_extra
    assert isinstance(extra, dict)
    listed = extra.get("enum_values")
    assert isinstance(listed, list)
    ours = REQUIRED_CODES[resource_type][element]
    if "+" in listed:  # the model lists only the first few codes
        assert set(listed) - {"+"} <= ours
    else:
        assert set(listed) == ours
