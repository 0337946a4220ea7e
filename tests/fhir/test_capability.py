"""The CapabilityStatement says what the gateway serves, from the same tables."""

from __future__ import annotations

from medledger.fhir.capability import (
    OAUTH_URIS,
    RECORD_TYPES,
    RESOURCES,
    capability_statement,
    smart_configuration,
)
from medledger.fhir.search import SEARCH_PARAMS
from medledger.validation import validate_resource

BASE = "http://127.0.0.1:26657/fhir"
TOKEN = f"{BASE}/auth/token"
CLINICAL = [
    "Patient",
    "Observation",
    "Condition",
    "MedicationRequest",
    "AllergyIntolerance",
    "Procedure",
    "Encounter",
    "DiagnosticReport",
    "Immunization",
    "DocumentReference",
]


def statement() -> dict[str, object]:
    return capability_statement(BASE, TOKEN, "2026-01-01T00:00:00Z")


def test_it_is_a_valid_r4_capability_statement() -> None:
    document = statement()
    validated = validate_resource(document)
    assert validated.resource_type == "CapabilityStatement"
    assert document["fhirVersion"] == "4.0.1"
    assert document["kind"] == "instance"


def test_smart_oauth_uris_point_at_the_token_endpoint() -> None:
    (rest,) = statement()["rest"]  # type: ignore[misc]
    security = rest["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    (extension,) = [e for e in security["extension"] if e["url"] == OAUTH_URIS]
    assert extension["extension"] == [{"url": "token", "valueUri": TOKEN}]
    assert smart_configuration(TOKEN)["token_endpoint"] == TOKEN


def test_resources_and_search_parameters_match_the_tables() -> None:
    (rest,) = statement()["rest"]  # type: ignore[misc]
    resources = {r["type"]: r for r in rest["resource"]}
    assert set(resources) == set(RESOURCES)
    for name in CLINICAL:
        assert name in RECORD_TYPES
        entry = resources[name]
        codes = {i["code"] for i in entry["interaction"]}
        assert {"read", "vread", "update", "create", "search-type", "history-instance"} <= codes
        assert "delete" in codes  # entered-in-error (see the system documentation)
        assert entry["updateCreate"] is False
        assert entry["versioning"] == "versioned-update"
        params = {p["name"] for p in entry["searchParam"]}
        assert params == set(SEARCH_PARAMS[name])
        assert {"_id", "_lastUpdated"} <= params
        if name != "Patient":
            assert "patient" in params
    assert {"code", "category", "date"} <= {
        p["name"] for p in resources["Observation"]["searchParam"]
    }
    assert resources["Patient"]["conditionalCreate"] is True
    assert resources["Patient"]["operation"][0]["name"] == "everything"
    assert {i["code"] for i in resources["AuditEvent"]["interaction"]} == {"search-type"}
    # A consent is the patient's: SMART system clients read and search consents only.
    assert {i["code"] for i in resources["Consent"]["interaction"]} == {"read", "search-type"}
    assert "403" in resources["Consent"]["documentation"]
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
