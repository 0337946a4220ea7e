"""Synthea-style FHIR R4 patient bundles, made at test time from `medledger.samples.fhir`.

Synthea (https://github.com/synthetichealth/synthea) writes one Bundle per patient: type
`transaction` (entries with `request: {method: POST, url: <Type>}`) or, in older versions,
`collection`; every entry has `fullUrl: urn:uuid:<id>` and a resource whose `id` is that uuid;
the Patient comes first, and entries reference each other by those urn:uuid fullUrls (subject,
encounter, reasonReference, DiagnosticReport.result, ...). Practitioners and organizations are
not in the patient file: they are conditional references (`Practitioner?identifier=
http://hl7.org/fhir/sid/us-npi|...`). Each encounter brings a Claim and an
ExplanationOfBenefit — types the records write path does not take, which an import must report
rather than drop silently — and the bundle ends with a Provenance of the patient.

This is a plain module (no tests): a test adds tests/bulk to sys.path and imports it.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

from medledger.samples.fhir import generate_patient, generate_patient_record_set

Json = dict[str, Any]

SYNTHEA = "https://github.com/synthetichealth/synthea"
NPI = "http://hl7.org/fhir/sid/us-npi"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition"
WHEN = "2025-06-01T12:00:00+00:00"
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:medledger:tests:synthea")

# Where each type keeps the date that ties it to an encounter of the same day.
DATE_ELEMENTS = {
    "Observation": "effectiveDateTime",
    "Condition": "recordedDate",
    "MedicationRequest": "authoredOn",
    "Procedure": "performedDateTime",
    "DiagnosticReport": "effectiveDateTime",
    "Immunization": "occurrenceDateTime",
}
PROFILES = {
    "Patient": f"{US_CORE}/us-core-patient",
    "Encounter": f"{US_CORE}/us-core-encounter",
    "Condition": f"{US_CORE}/us-core-condition",
    "MedicationRequest": f"{US_CORE}/us-core-medicationrequest",
    "Immunization": f"{US_CORE}/us-core-immunization",
    "AllergyIntolerance": f"{US_CORE}/us-core-allergyintolerance",
    "Procedure": f"{US_CORE}/us-core-procedure",
    "DiagnosticReport": f"{US_CORE}/us-core-diagnosticreport-lab",
}


def _urn(resource: Json) -> str:
    return f"urn:uuid:{resource['id']}"


def _rewrite(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {
            k: mapping.get(v, v)
            if k == "reference" and isinstance(v, str)
            else _rewrite(v, mapping)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rewrite(v, mapping) for v in value]
    return value


def _new_id(seed: int, name: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{seed}|{name}"))


def _claims(seed: int, patient: Json, encounter: Json, n: int) -> list[Json]:
    start = encounter["period"]["start"]
    claim_id = _new_id(seed, f"claim|{n}")
    provider = {"reference": f"Organization?identifier={SYNTHEA}|{_new_id(seed, 'org')}"}
    claim = {
        "resourceType": "Claim",
        "id": claim_id,
        "status": "active",
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/claim-type",
                    "code": "professional",
                }
            ]
        },
        "use": "claim",
        "patient": {"reference": _urn(patient), "display": patient["name"][0]["family"]},
        "billablePeriod": encounter["period"],
        "created": encounter["period"]["end"],
        "provider": provider,
        "priority": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/processpriority",
                    "code": "normal",
                }
            ]
        },
        "insurance": [{"sequence": 1, "focal": True, "coverage": {"display": "Medicare"}}],
        "item": [
            {
                "sequence": 1,
                "productOrService": encounter["type"][0],
                "encounter": [{"reference": _urn(encounter)}],
            }
        ],
        "total": {"value": 136.8, "currency": "USD"},
    }
    eob = {
        "resourceType": "ExplanationOfBenefit",
        "id": _new_id(seed, f"eob|{n}"),
        "status": "active",
        "type": claim["type"],
        "use": "claim",
        "patient": {"reference": _urn(patient)},
        "billablePeriod": {"start": start, "end": encounter["period"]["end"]},
        "created": encounter["period"]["end"],
        "insurer": {"display": "Medicare"},
        "provider": provider,
        "claim": {"reference": f"urn:uuid:{claim_id}"},
        "outcome": "complete",
        "insurance": [{"focal": True, "coverage": {"display": "Medicare"}}],
        "total": [
            {
                "category": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/adjudication",
                            "code": "submitted",
                        }
                    ]
                },
                "amount": {"value": 136.8, "currency": "USD"},
            }
        ],
    }
    return [claim, eob]


def synthea_bundle(
    seed: int, count: int, *, kind: str = "transaction", org: str = "synthea", when: str = WHEN
) -> Json:
    """One patient and `count` clinical resources as Synthea writes them (plus a Claim and an
    ExplanationOfBenefit per encounter and a closing Provenance)."""
    patient = generate_patient(seed, org=org)
    patient["identifier"].insert(0, {"system": SYNTHEA, "value": patient["id"]})
    patient["meta"] = {"profile": [PROFILES["Patient"]]}
    patient["text"] = {
        "status": "generated",
        "div": '<div xmlns="http://www.w3.org/1999/xhtml">Generated by Synthea.</div>',
    }
    practitioner = f"Practitioner?identifier={NPI}|99999{seed % 100_000:05d}"
    records = generate_patient_record_set(seed, _urn(patient), practitioner, when=when, count=count)
    mapping = {f"{r['resourceType']}/{r['id']}": _urn(r) for r in records}
    records = [_rewrite(r, mapping) for r in records]
    encounters = {r["period"]["start"][:10]: r for r in records if r["resourceType"] == "Encounter"}
    conditions = {
        r["code"]["coding"][0]["code"]: r for r in records if r["resourceType"] == "Condition"
    }
    for record in records:
        if record["resourceType"] in PROFILES:
            record["meta"] = {"profile": [PROFILES[record["resourceType"]]]}
        element = DATE_ELEMENTS.get(record["resourceType"])
        day = str(record.get(element, ""))[:10] if element else ""
        if day in encounters:
            record["encounter"] = {"reference": _urn(encounters[day])}
        if record["resourceType"] == "MedicationRequest":
            reason = conditions.get(record["reasonCode"][0]["coding"][0]["code"])
            if reason is not None:
                record["reasonReference"] = [{"reference": _urn(reason)}]
    extras: list[Json] = []
    for n, encounter in enumerate(r for r in records if r["resourceType"] == "Encounter"):
        extras.extend(_claims(seed, patient, encounter, n))
    provenance = {
        "resourceType": "Provenance",
        "id": _new_id(seed, "provenance"),
        "target": [{"reference": _urn(patient)}],
        "recorded": when,
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "author",
                        }
                    ]
                },
                "who": {"reference": practitioner},
            }
        ],
    }
    resources = [patient, *records, *extras, provenance]
    entries = []
    for resource in resources:
        entry: Json = {"fullUrl": _urn(resource), "resource": copy.deepcopy(resource)}
        if kind == "transaction":
            entry["request"] = {"method": "POST", "url": resource["resourceType"]}
        entries.append(entry)
    return {"resourceType": "Bundle", "type": kind, "entry": entries}
