"""Validation of the FHIR R4 resources that become record plaintexts.

The wire format is FHIR R4 (4.0.1). `fhir.resources` 8.x ships no 4.0.1 models, so resources are
validated with its R4B (4.3.0) models: R4B changed only the medication-definition, evidence and
subscription resources, and its clinical, administrative and financial resources (Patient,
Observation, Condition, MedicationRequest, AllergyIntolerance, Immunization, Claim, ...) are the
same as R4's. A resource that uses an element new in R4B would be accepted although R4 lacks it;
that is the one known difference. Every official R4 example of the types stored here validates
(tests/fhir/test_public_resources.py reads each file). Where R4 itself requires an element, so
does validation: R4's Narrative.div is 1..1, so a `text` without `div` is refused as R4 refuses
it. An Observation's subject may be a Patient, Group, Device or Location, as R4 allows.

A resource is valid when it is a JSON object with a `resourceType` naming a concrete FHIR
resource, the model accepts it (structure, cardinality, datatypes, choice elements), and its
top-level status-like codes (`status`, `intent`, `priority`, `use`, `outcome`, `gender`, ...
and the clinical/verification status of Condition and AllergyIntolerance) come from the R4
required value sets. The models do not check required bindings themselves; other terminology
(LOINC, SNOMED CT, RxNorm, UCUM) is not checked.

The canonical form of a resource is the model's JSON output without empty elements, re-serialised
with sorted keys, compact separators and UTF-8, so the same resource always gives the same bytes
(key order and whitespace of the input do not matter, and validating the canonical form again
gives it back unchanged). Decimals are written as the model writes them, so trailing zeros are
not kept (5.40 becomes 5.4).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class
from fhir_core.fhirabstractmodel import FHIRAbstractModel

_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ABSTRACT_TYPES = frozenset({"Resource", "DomainResource"})

# R4 (4.0.1) required value sets of top-level `code` elements, per resource type and element.
_REQUEST_STATUS = frozenset(
    {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
)
_REQUEST_PRIORITY = frozenset({"routine", "urgent", "asap", "stat"})
_FINANCIAL_STATUS = frozenset({"active", "cancelled", "draft", "entered-in-error"})
_CLAIM_USE = frozenset({"claim", "preauthorization", "predetermination"})
_CLAIM_OUTCOME = frozenset({"queued", "complete", "error", "partial"})
_GENDER = frozenset({"male", "female", "other", "unknown"})

REQUIRED_CODES: Mapping[str, Mapping[str, frozenset[str]]] = {
    "Observation": {
        "status": frozenset(
            {
                "registered",
                "preliminary",
                "final",
                "amended",
                "corrected",
                "cancelled",
                "entered-in-error",
                "unknown",
            }
        ),
    },
    "DiagnosticReport": {
        "status": frozenset(
            {
                "registered",
                "partial",
                "preliminary",
                "final",
                "amended",
                "corrected",
                "appended",
                "cancelled",
                "entered-in-error",
                "unknown",
            }
        ),
    },
    "Encounter": {
        "status": frozenset(
            {
                "planned",
                "arrived",
                "triaged",
                "in-progress",
                "onleave",
                "finished",
                "cancelled",
                "entered-in-error",
                "unknown",
            }
        ),
    },
    "MedicationRequest": {
        "status": frozenset(
            {
                "active",
                "on-hold",
                "cancelled",
                "completed",
                "entered-in-error",
                "stopped",
                "draft",
                "unknown",
            }
        ),
        "intent": frozenset(
            {
                "proposal",
                "plan",
                "order",
                "original-order",
                "reflex-order",
                "filler-order",
                "instance-order",
                "option",
            }
        ),
        "priority": _REQUEST_PRIORITY,
    },
    "MedicationStatement": {
        "status": frozenset(
            {
                "active",
                "completed",
                "entered-in-error",
                "intended",
                "stopped",
                "on-hold",
                "unknown",
                "not-taken",
            }
        ),
    },
    "MedicationAdministration": {
        "status": frozenset(
            {
                "in-progress",
                "not-done",
                "on-hold",
                "completed",
                "entered-in-error",
                "stopped",
                "unknown",
            }
        ),
    },
    "MedicationDispense": {
        "status": frozenset(
            {
                "preparation",
                "in-progress",
                "cancelled",
                "on-hold",
                "completed",
                "entered-in-error",
                "stopped",
                "declined",
                "unknown",
            }
        ),
    },
    "AllergyIntolerance": {
        "type": frozenset({"allergy", "intolerance"}),
        "category": frozenset({"food", "medication", "environment", "biologic"}),
        "criticality": frozenset({"low", "high", "unable-to-assess"}),
    },
    "Immunization": {"status": frozenset({"completed", "entered-in-error", "not-done"})},
    "Procedure": {
        "status": frozenset(
            {
                "preparation",
                "in-progress",
                "not-done",
                "on-hold",
                "stopped",
                "completed",
                "entered-in-error",
                "unknown",
            }
        ),
    },
    "DocumentReference": {
        "status": frozenset({"current", "superseded", "entered-in-error"}),
        "docStatus": frozenset({"preliminary", "final", "amended", "entered-in-error"}),
    },
    "Composition": {"status": frozenset({"preliminary", "final", "amended", "entered-in-error"})},
    "CarePlan": {
        "status": _REQUEST_STATUS,
        "intent": frozenset({"proposal", "plan", "order", "option"}),
    },
    "ServiceRequest": {
        "status": _REQUEST_STATUS,
        "intent": frozenset(
            {
                "proposal",
                "plan",
                "directive",
                "order",
                "original-order",
                "reflex-order",
                "filler-order",
                "instance-order",
                "option",
            }
        ),
        "priority": _REQUEST_PRIORITY,
    },
    "CareTeam": {
        "status": frozenset({"proposed", "active", "suspended", "inactive", "entered-in-error"})
    },
    "Goal": {
        "lifecycleStatus": frozenset(
            {
                "proposed",
                "planned",
                "accepted",
                "active",
                "on-hold",
                "completed",
                "cancelled",
                "entered-in-error",
                "rejected",
            }
        ),
    },
    "FamilyMemberHistory": {
        "status": frozenset({"partial", "completed", "entered-in-error", "health-unknown"})
    },
    "Specimen": {
        "status": frozenset({"available", "unavailable", "unsatisfactory", "entered-in-error"})
    },
    "ImagingStudy": {
        "status": frozenset({"registered", "available", "cancelled", "entered-in-error", "unknown"})
    },
    "Device": {"status": frozenset({"active", "inactive", "entered-in-error", "unknown"})},
    "SupplyDelivery": {
        "status": frozenset({"in-progress", "completed", "abandoned", "entered-in-error"})
    },
    "Medication": {"status": frozenset({"active", "inactive", "entered-in-error"})},
    "Location": {
        "status": frozenset({"active", "suspended", "inactive"}),
        "mode": frozenset({"instance", "kind"}),
    },
    "QuestionnaireResponse": {
        "status": frozenset({"in-progress", "completed", "amended", "entered-in-error", "stopped"})
    },
    "Consent": {
        "status": frozenset(
            {"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}
        )
    },
    "Claim": {"status": _FINANCIAL_STATUS, "use": _CLAIM_USE},
    "ClaimResponse": {"status": _FINANCIAL_STATUS, "use": _CLAIM_USE, "outcome": _CLAIM_OUTCOME},
    "ExplanationOfBenefit": {
        "status": _FINANCIAL_STATUS,
        "use": _CLAIM_USE,
        "outcome": _CLAIM_OUTCOME,
    },
    "Coverage": {"status": _FINANCIAL_STATUS},
    "Patient": {"gender": _GENDER},
    "Practitioner": {"gender": _GENDER},
    "RelatedPerson": {"gender": _GENDER},
}

# R4 required bindings of top-level CodeableConcept elements: (code system, codes).
REQUIRED_CONCEPTS: Mapping[str, Mapping[str, tuple[str, frozenset[str]]]] = {
    "Condition": {
        "clinicalStatus": (
            "http://terminology.hl7.org/CodeSystem/condition-clinical",
            frozenset({"active", "recurrence", "relapse", "inactive", "remission", "resolved"}),
        ),
        "verificationStatus": (
            "http://terminology.hl7.org/CodeSystem/condition-ver-status",
            frozenset(
                {
                    "unconfirmed",
                    "provisional",
                    "differential",
                    "confirmed",
                    "refuted",
                    "entered-in-error",
                }
            ),
        ),
    },
    "AllergyIntolerance": {
        "clinicalStatus": (
            "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
            frozenset({"active", "inactive", "resolved"}),
        ),
        "verificationStatus": (
            "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
            frozenset({"unconfirmed", "confirmed", "refuted", "entered-in-error"}),
        ),
    },
}

# Resource types whose record category is fixed by the type rather than by a category element.
DEFAULT_CATEGORIES: Mapping[str, str] = {
    "MedicationRequest": "medication",
    "MedicationStatement": "medication",
    "MedicationAdministration": "medication",
    "MedicationDispense": "medication",
    "AllergyIntolerance": "allergy",
    "Immunization": "immunization",
    "Procedure": "procedure",
    "Encounter": "encounter",
    "DocumentReference": "document",
    "Patient": "demographics",
    "Claim": "claim",
    "Coverage": "coverage",
}


class FhirValidationError(ValueError):
    """A resource is not valid FHIR R4; `problems` holds one `path: problem` line per error."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.message = message
        self.problems = tuple(problems)
        text = message if not self.problems else message + "\n" + "\n".join(self.problems)
        super().__init__(text)

    def __reduce__(self) -> tuple[type[FhirValidationError], tuple[str, tuple[str, ...]]]:
        # As the constructor takes them (a worker process sends refusals back pickled).
        return (FhirValidationError, (self.message, self.problems))


@dataclass(frozen=True)
class ValidatedResource:
    """A valid resource: its type, record category, patient reference and canonical JSON."""

    resource_type: str
    category: str
    patient_reference: str | None
    canonical: bytes
    resource: dict[str, Any]


def validate_resource(data: bytes | str | Mapping[str, Any]) -> ValidatedResource:
    """Validate a FHIR R4 resource given as JSON bytes, JSON text or a parsed JSON object."""
    document = _load(data)
    resource_type = document.get("resourceType")
    if resource_type is None:
        raise FhirValidationError("not a FHIR resource: it has no resourceType")
    if not isinstance(resource_type, str) or not _RESOURCE_TYPE.fullmatch(resource_type):
        raise FhirValidationError(f"resourceType {resource_type!r} is not a resource type name")
    model_class = _model_class(resource_type)
    try:
        model = model_class.model_validate(document)
    except pydantic.ValidationError as exc:
        raise FhirValidationError(
            f"invalid FHIR {resource_type} resource",
            [_problem(resource_type, error) for error in exc.errors()],
        ) from None
    except (ValueError, TypeError) as exc:
        raise FhirValidationError(
            f"invalid FHIR {resource_type} resource", [f"{resource_type}: {_clean(str(exc))}"]
        ) from None

    resource = json.loads(model.model_dump_json(exclude_none=True))
    if not isinstance(resource, dict):  # pragma: no cover - a model always dumps an object
        raise FhirValidationError(f"invalid FHIR {resource_type} resource")
    problems = _binding_problems(resource_type, resource)
    if problems:
        raise FhirValidationError(f"invalid FHIR {resource_type} resource", problems)
    return ValidatedResource(
        resource_type=resource_type,
        category=_category(resource_type, resource),
        patient_reference=_patient_reference(resource_type, resource),
        canonical=_canonical_bytes(resource),
        resource=resource,
    )


def with_references_renamed(
    validated: ValidatedResource, resource: dict[str, Any]
) -> ValidatedResource:
    """`validated` once the server renamed references in it (a transaction's `urn:uuid:` and
    new patients' ids), which leaves a valid resource valid: its canonical form and patient
    reference are computed again, the models are not run a second time. `resource` must be
    `validated.resource` with references rewritten, nothing else."""
    return ValidatedResource(
        resource_type=validated.resource_type,
        category=_category(validated.resource_type, resource),
        patient_reference=_patient_reference(validated.resource_type, resource),
        canonical=_canonical_bytes(resource),
        resource=resource,
    )


# -- internals ----------------------------------------------------------------------------------


def _load(data: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(data, Mapping):
        try:
            text = json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise FhirValidationError(f"not a JSON object: {exc}") from None
    elif isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FhirValidationError(f"not valid JSON: not UTF-8 ({exc.reason})") from None
    elif isinstance(data, str):
        text = data
    else:
        raise FhirValidationError(f"expected JSON bytes, text or an object, got {type(data)}")
    try:
        document = json.loads(
            text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants
        )
    except (json.JSONDecodeError, _JsonRefused) as exc:
        raise FhirValidationError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise FhirValidationError("not valid JSON: nested too deeply") from None
    if not isinstance(document, dict):
        raise FhirValidationError(
            f"not a FHIR resource: expected a JSON object, got {_json_type(document)}"
        )
    return document


class _JsonRefused(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _JsonRefused(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise _JsonRefused(f"{name} is not a JSON number")


def _model_class(resource_type: str) -> type[FHIRAbstractModel]:
    unknown = FhirValidationError(f"unknown FHIR resource type {resource_type!r}")
    if resource_type in _ABSTRACT_TYPES:
        raise unknown
    try:
        model_class = get_fhir_model_class(resource_type)
    except ValueError:
        raise unknown from None
    if not model_class.has_resource_base() or model_class.get_resource_type() != resource_type:
        raise unknown  # a datatype such as Reference or CodeableConcept
    return model_class


def _problem(resource_type: str, error: Mapping[str, Any]) -> str:
    path = resource_type
    for part in error.get("loc", ()):
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    if error.get("type") == "json_invalid":
        problem = f"expected a JSON object, got {_json_type(error.get('input'))}"
    else:
        problem = _clean(str(error.get("msg", "invalid value")))
    return f"{path}: {problem}"


def _clean(message: str) -> str:
    message = " ".join(message.split())
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _binding_problems(resource_type: str, resource: Mapping[str, Any]) -> list[str]:
    problems = []
    for element, codes in REQUIRED_CODES.get(resource_type, {}).items():
        value = resource.get(element)
        values = value if isinstance(value, list) else [value]
        for position, code in enumerate(values):
            if code is None or code in codes:
                continue
            path = f"{resource_type}.{element}"
            if isinstance(value, list):
                path += f"[{position}]"
            problems.append(f"{path}: {code!r} is not one of {', '.join(sorted(codes))}")
    for element, (system, codes) in REQUIRED_CONCEPTS.get(resource_type, {}).items():
        concept = resource.get(element)
        if not isinstance(concept, dict):
            continue
        codings = [c for c in concept.get("coding", []) if isinstance(c, dict)]
        if not any(c.get("system") == system and c.get("code") in codes for c in codings):
            problems.append(
                f"{resource_type}.{element}: needs a coding from {system} "
                f"({', '.join(sorted(codes))})"
            )
    return problems


def _category(resource_type: str, resource: Mapping[str, Any]) -> str:
    fixed = DEFAULT_CATEGORIES.get(resource_type)
    if fixed is not None:
        return fixed
    value = resource.get("category")
    concepts = value if isinstance(value, list) else [value]
    for concept in concepts:
        if not isinstance(concept, dict):
            continue
        for coding in concept.get("coding", []):
            code = coding.get("code") if isinstance(coding, dict) else None
            if isinstance(code, str) and code:
                # The ledger keeps categories in one case: v2-0074's "LAB" is "lab" there.
                return code.lower()
    return resource_type.lower()


def _patient_reference(resource_type: str, resource: Mapping[str, Any]) -> str | None:
    if resource_type == "Patient":
        identifier = resource.get("id")
        return f"Patient/{identifier}" if isinstance(identifier, str) else None
    for element in ("subject", "patient", "beneficiary"):
        value = resource.get(element)
        if isinstance(value, dict):
            reference = value.get("reference")
            if isinstance(reference, str) and reference:
                return reference
    return None


def _canonical_bytes(resource: Mapping[str, Any]) -> bytes:
    return json.dumps(
        resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
