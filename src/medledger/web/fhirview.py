"""FHIR R4 resources as people read them: a lab value with its unit, reference range and flag;
a medication with its dosage; a condition with its status and onset — never raw JSON first.

Only what the resource says is shown; anything this module does not know how to summarize
still appears under its resource type, with the full JSON one click away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Resource = dict[str, Any]

_KINDS = {
    "Observation": "Observation",
    "Condition": "Condition",
    "MedicationRequest": "Medication",
    "MedicationStatement": "Medication",
    "AllergyIntolerance": "Allergy",
    "Immunization": "Immunization",
    "Encounter": "Visit",
    "Procedure": "Procedure",
    "DiagnosticReport": "Report",
}
_OBSERVATION_KINDS = {
    "laboratory": "Lab result",
    "vital-signs": "Vital signs",
    "social-history": "Social history",
    "imaging": "Imaging",
}
_FLAGS = {"H": "high", "HH": "high", "L": "low", "LL": "low", "A": "abnormal", "AA": "abnormal"}


@dataclass(frozen=True)
class Fact:
    label: str
    value: str
    flag: str = ""


@dataclass(frozen=True)
class ResourceView:
    """`kind` groups the timeline (Lab result, Medication, ...); `summary` is one line;
    `flag` is high, low or abnormal when the resource says so."""

    kind: str
    title: str
    when: str
    summary: str
    flag: str
    facts: tuple[Fact, ...]


def concept_text(concept: Any) -> str:
    """A CodeableConcept's text, else its first coding's display, else its code."""
    if not isinstance(concept, dict):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and (coding.get("display") or coding.get("code")):
            return str(coding.get("display") or coding.get("code"))
    return ""


def _codes(concept: Any) -> str:
    if not isinstance(concept, dict):
        return ""
    systems = {
        "http://loinc.org": "LOINC",
        "http://snomed.info/sct": "SNOMED CT",
        "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
        "http://hl7.org/fhir/sid/cvx": "CVX",
        "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
    }
    parts = []
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and coding.get("code"):
            system = systems.get(str(coding.get("system", "")), "code")
            parts.append(f"{system} {coding['code']}")
    return ", ".join(parts)


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quantity_text(quantity: Any) -> str:
    if not isinstance(quantity, dict) or "value" not in quantity:
        return ""
    unit = quantity.get("unit") or quantity.get("code") or ""
    comparator = quantity.get("comparator", "")
    return f"{comparator}{_number(quantity['value'])} {unit}".strip()


def _value_text(holder: Resource) -> str:
    if "valueQuantity" in holder:
        return quantity_text(holder["valueQuantity"])
    if "valueCodeableConcept" in holder:
        return concept_text(holder["valueCodeableConcept"])
    for key in ("valueString", "valueBoolean", "valueInteger", "valueDateTime"):
        if key in holder:
            return str(holder[key])
    return ""


def range_text(ranges: Any) -> str:
    """The first reference range: `70–99 mg/dL`, `< 100 mg/dL`, `> 40 mg/dL`, or its text."""
    if not isinstance(ranges, list) or not ranges or not isinstance(ranges[0], dict):
        return ""
    first = ranges[0]
    low, high = first.get("low"), first.get("high")
    unit = ""
    for bound in (low, high):
        if isinstance(bound, dict):
            unit = str(bound.get("unit") or bound.get("code") or unit)
    low_value = _number(low["value"]) if isinstance(low, dict) and "value" in low else None
    high_value = _number(high["value"]) if isinstance(high, dict) and "value" in high else None
    if low_value is not None and high_value is not None:
        text = f"{low_value}–{high_value} {unit}"
    elif high_value is not None:
        text = f"< {high_value} {unit}"
    elif low_value is not None:
        text = f"> {low_value} {unit}"
    else:
        text = str(first.get("text", ""))
    return text.strip()


def _interpretation(resource: Resource) -> tuple[str, str]:
    """(flag, words) from Observation.interpretation: ("high", "High"), ("", "Normal")."""
    for concept in resource.get("interpretation") or []:
        for coding in (concept or {}).get("coding") or []:
            code = str(coding.get("code", ""))
            words = str(coding.get("display") or concept_text(concept) or code)
            return _FLAGS.get(code, ""), words
    return "", ""


def _date(resource: Resource) -> str:
    for key in (
        "effectiveDateTime",
        "occurrenceDateTime",
        "performedDateTime",
        "onsetDateTime",
        "authoredOn",
        "recordedDate",
        "issued",
        "date",
    ):
        if resource.get(key):
            return str(resource[key])
    for key in ("period", "effectivePeriod", "performedPeriod"):
        period = resource.get(key)
        if isinstance(period, dict) and period.get("start"):
            return str(period["start"])
    return ""


def _kind(resource: Resource) -> str:
    resource_type = str(resource.get("resourceType", "Resource"))
    if resource_type == "Observation":
        for concept in resource.get("category") or []:
            for coding in (concept or {}).get("coding") or []:
                kind = _OBSERVATION_KINDS.get(str(coding.get("code", "")))
                if kind:
                    return kind
    return _KINDS.get(resource_type, resource_type)


def _observation(resource: Resource) -> tuple[str, str, list[Fact]]:
    facts: list[Fact] = []
    flag, words = _interpretation(resource)
    value = _value_text(resource)
    reference = range_text(resource.get("referenceRange"))
    parts = [value] if value else []
    for component in resource.get("component") or []:
        if isinstance(component, dict):
            name = concept_text(component.get("code"))
            component_value = _value_text(component)
            facts.append(Fact(name, component_value))
    if facts and not value:
        parts.append(" / ".join(f.value for f in facts))
    if reference:
        parts.append(f"(reference {reference})")
    if words:
        parts.append(f"— {words}")
    if value:
        facts.insert(0, Fact("Value", value, flag))
    if reference:
        facts.append(Fact("Reference range", reference))
    if words:
        facts.append(Fact("Interpretation", words, flag))
    return " ".join(parts), flag, facts


def _medication(resource: Resource) -> tuple[str, list[Fact]]:
    dosage = "; ".join(
        str(d.get("text", "")) for d in resource.get("dosageInstruction") or [] if d.get("text")
    )
    reasons = ", ".join(concept_text(c) for c in resource.get("reasonCode") or [])
    facts = [Fact("Status", str(resource.get("status", "")))]
    if dosage:
        facts.append(Fact("Dosage", dosage))
    if reasons:
        facts.append(Fact("For", reasons))
    summary = " · ".join(p for p in (dosage.rstrip("."), str(resource.get("status", ""))) if p)
    return summary, facts


def _condition(resource: Resource) -> tuple[str, list[Fact]]:
    clinical = concept_text(resource.get("clinicalStatus"))
    verification = concept_text(resource.get("verificationStatus"))
    onset = str(resource.get("onsetDateTime", ""))
    facts = [Fact("Clinical status", clinical), Fact("Verification", verification)]
    if onset:
        facts.append(Fact("Onset", onset[:10]))
    summary = ", ".join(p for p in (clinical, f"since {onset[:10]}" if onset else "") if p)
    return summary, facts


def _allergy(resource: Resource) -> tuple[str, str, list[Fact]]:
    criticality = str(resource.get("criticality", ""))
    reactions = ", ".join(
        concept_text(m)
        for reaction in resource.get("reaction") or []
        for m in (reaction or {}).get("manifestation") or []
    )
    facts = [Fact("Criticality", criticality, "abnormal" if criticality == "high" else "")]
    if reactions:
        facts.append(Fact("Reaction", reactions))
    summary = ", ".join(p for p in (reactions, f"criticality {criticality}") if p)
    return summary, "abnormal" if criticality == "high" else "", facts


def describe(resource: Resource) -> ResourceView:
    """One resource, summarized for the timeline and the record page."""
    resource_type = str(resource.get("resourceType", "Resource"))
    kind = _kind(resource)
    flag = ""
    facts: list[Fact] = []
    summary = ""
    match resource_type:
        case "Observation":
            title = concept_text(resource.get("code"))
            summary, flag, facts = _observation(resource)
        case "MedicationRequest" | "MedicationStatement":
            title = concept_text(resource.get("medicationCodeableConcept")) or "Medication"
            summary, facts = _medication(resource)
        case "Condition":
            title = concept_text(resource.get("code"))
            summary, facts = _condition(resource)
        case "AllergyIntolerance":
            title = concept_text(resource.get("code"))
            summary, flag, facts = _allergy(resource)
        case "Immunization":
            title = concept_text(resource.get("vaccineCode"))
            summary = str(resource.get("status", ""))
        case "Encounter":
            types = ", ".join(concept_text(t) for t in resource.get("type") or [])
            title = types or concept_text(resource.get("class")) or "Visit"
            summary = str((resource.get("class") or {}).get("display", ""))
        case "Procedure":
            title = concept_text(resource.get("code"))
            summary = str(resource.get("status", ""))
        case "DiagnosticReport":
            title = concept_text(resource.get("code"))
            results = [str(r.get("display", "")) for r in resource.get("result") or []]
            summary = str(resource.get("conclusion") or ", ".join(r for r in results if r))
            if results:
                facts.append(Fact("Results", ", ".join(r for r in results if r)))
        case _:
            title = concept_text(resource.get("code")) or resource_type
    codes = _codes(
        resource.get("code")
        or resource.get("medicationCodeableConcept")
        or resource.get("vaccineCode")
    )
    if codes:
        facts.append(Fact("Codes", codes))
    note = "; ".join(str(n.get("text", "")) for n in resource.get("note") or [] if n.get("text"))
    if note:
        facts.append(Fact("Note", note))
    return ResourceView(
        kind=kind,
        title=title or resource_type,
        when=_date(resource),
        summary=summary,
        flag=flag,
        facts=tuple(f for f in facts if f.value),
    )
