"""Third-party FHIR that nobody here wrote: every official R4 (4.0.1) example and every entry of
the public Synthea bundles validates; the clinical types real EHRs send beyond the first
fifteen (Medication, MedicationAdministration, Device, ImagingStudy, SupplyDelivery, Specimen)
are stored as encrypted records on a real 4-validator network, read back as sent and found by
their US Core search parameters; and every official R4 example of a stored type is accepted
through the gateway's write path.

The data is read in place from ../shared/testdata (see its SOURCES.md); the tests skip, saying
so, where that folder is absent.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from medledger.client.records import RecordHistory
from medledger.fhir.capability import RECORD_TYPES, RESOURCES
from medledger.fhir.include import split_inclusions
from medledger.fhir.search import SEARCH_PARAMS, SearchError
from medledger.ledger.clients import RegisterClient
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.services.custody import Custody
from medledger.validation import validate_resource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_network import Network, running_network, services_counters, wait_until

Json = dict[str, Any]

TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata"
R4_EXAMPLES = TESTDATA / "fhir-r4-examples"
SYNTHEA = TESTDATA / "synthea"
ABSENT = f"third-party test data not found at {TESTDATA} (see the project's testing notes)"

# Claims go to the claims ledger (fhir/claims.py), not through the records write path.
CLAIM_TYPES = frozenset({"Claim", "ExplanationOfBenefit"})
# The clinical types issue 11 adds as records.
NEW_RECORD_TYPES = (
    "Medication",
    "MedicationAdministration",
    "Device",
    "ImagingStudy",
    "SupplyDelivery",
    "Specimen",
    "Coverage",
    "MedicationDispense",
    "QuestionnaireResponse",
    "RelatedPerson",
)


def example_files() -> list[Path]:
    return sorted(R4_EXAMPLES.glob("*.json")) if R4_EXAMPLES.is_dir() else []


def synthea_files() -> list[Path]:
    if not SYNTHEA.is_dir():
        return []
    files = sorted(SYNTHEA.glob("*.json"))
    # The support bundles (organizations, practitioners) first, as the data's notes say.
    return sorted(files, key=lambda f: "Information" not in f.name)


def resources_of(document: Json) -> list[Json]:
    """A resource, or the resources of a Bundle's entries."""
    if document.get("resourceType") != "Bundle":
        return [document]
    return [e["resource"] for e in document.get("entry", []) if "resource" in e]


def load(path: Path) -> Json:
    document = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


# --- validation: every file, every entry ------------------------------------------------------


@pytest.mark.skipif(not R4_EXAMPLES.is_dir(), reason=ABSENT)
@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_every_official_r4_example_validates(path: Path) -> None:
    for resource in resources_of(load(path)):
        checked = validate_resource(resource)
        assert checked.resource_type == resource["resourceType"]
        # Validating the canonical form again gives it back unchanged.
        assert validate_resource(checked.canonical).canonical == checked.canonical


@pytest.mark.skipif(not SYNTHEA.is_dir(), reason=ABSENT)
@pytest.mark.parametrize("path", synthea_files(), ids=lambda p: p.name[:24])
def test_every_synthea_entry_validates(path: Path) -> None:
    bundle = load(path)
    entries = bundle["entry"]
    assert entries
    for position, entry in enumerate(entries):
        resource = entry["resource"]
        try:
            validate_resource(resource)
        except ValueError as exc:  # pragma: no cover - the message names the entry
            pytest.fail(f"{path.name} entry {position} ({resource['resourceType']}): {exc}")


@pytest.mark.parametrize("subject", ["Group/g1", "Device/d1", "Location/l1", "Patient/p1"])
def test_an_observation_about_a_group_device_or_location_validates(subject: str) -> None:
    """R4 Observation.subject: Reference(Patient | Group | Device | Location)."""
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
        "subject": {"reference": subject},
        "valueQuantity": {"value": 36.6, "unit": "Cel"},
    }
    assert validate_resource(observation).patient_reference == subject


def test_a_narrative_without_div_is_refused_as_r4_refuses_it() -> None:
    """R4 Narrative.div is 1..1: the R4B models are not stricter than R4 here."""
    report = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": {"text": "CBC"},
        "text": {"status": "generated"},
    }
    with pytest.raises(ValueError, match="div"):
        validate_resource(report)
    report["text"]["div"] = '<div xmlns="http://www.w3.org/1999/xhtml">CBC</div>'
    validate_resource(report)


@pytest.mark.parametrize(
    ("resource_type", "status"),
    [("Device", "broken"), ("SupplyDelivery", "done"), ("Medication", "current")],
)
def test_status_codes_of_the_new_types_come_from_r4_value_sets(
    resource_type: str, status: str
) -> None:
    resource: Json = {"resourceType": resource_type, "status": status}
    if resource_type == "Device":
        resource["patient"] = {"reference": "Patient/p1"}
    with pytest.raises(ValueError, match=f"{resource_type}.status"):
        validate_resource(resource)


def test_the_new_clinical_types_are_records_searchable_by_patient() -> None:
    for resource_type in NEW_RECORD_TYPES:
        assert resource_type in RECORD_TYPES
        support = RESOURCES[resource_type]
        assert {"create", "read", "update", "search-type"} <= set(support.interactions)
        params = SEARCH_PARAMS[resource_type]
        if resource_type != "Medication":  # bound to its patient by context
            assert "patient" in params
    assert {"patient", "category"} <= set(SEARCH_PARAMS["CarePlan"])  # US Core SHALL
    assert {"patient", "type"} <= set(SEARCH_PARAMS["Device"])
    assert {"patient"} <= set(SEARCH_PARAMS["Specimen"])
    assert {"patient", "beneficiary"} <= set(SEARCH_PARAMS["Coverage"])  # US Core Coverage


@pytest.mark.skipif(not SYNTHEA.is_dir() or not R4_EXAMPLES.is_dir(), reason=ABSENT)
def test_every_clinical_type_of_the_public_data_is_a_record_type() -> None:
    """Measured on every entry: what the records write path does not take is only directory
    data (Organization, Practitioner, PractitionerRole, Location), claims, and Provenance
    (served as the ledger's own view of each record version)."""
    seen: Counter[str] = Counter()
    for path in [*synthea_files(), *example_files()]:
        for resource in resources_of(load(path)):
            seen[resource["resourceType"]] += 1
    not_records = {t for t in seen if t not in RECORD_TYPES}
    directory = {"Organization", "Practitioner", "PractitionerRole", "Location"}
    assert not_records <= directory | CLAIM_TYPES | {"Provenance", "Parameters"}
    assert seen["Observation"] > 1000 and seen["Organization"] > 1000  # every entry counted


# --- the write path, on a real network --------------------------------------------------------

BASE_PORT = 31700
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
SERVER_META = ("versionId", "lastUpdated")


@dataclass
class Site:
    base: str
    token_url: str
    key: ed25519.Ed25519PrivateKey
    client_id: str

    def headers(self) -> dict[str, str]:
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "exp": int(time.time()) + 240,
            "jti": str(uuid.uuid4()),
        }
        form = {
            "grant_type": "client_credentials",
            "scope": "system/*.cruds",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": jwt.encode(claims, self.key, algorithm="EdDSA"),
        }
        answer = httpx.post(self.token_url, data=form, timeout=10)
        assert answer.status_code == 200, answer.text
        return {"Authorization": f"Bearer {answer.json()['access_token']}", **FHIR_JSON}


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with running_network(tmp_path_factory.mktemp("public") / "net", BASE_PORT) as net:
        yield net


def make_site(network: Network, node: int, client_id: str) -> Site:
    cfg = network.configs[node]
    passphrase = (cfg.home / "keys" / "node.passphrase").read_text().strip()
    ehr = Custody(cfg.home / "custody", passphrase, fast_kdf=True).create(f"ehr-{client_id}")
    ledger = network.client(node)
    admin = network.admins[node]
    ledger.submit(
        admin, "member.enroll", EnrollMember(ehr.verify_key, ehr.encryption_key, Role.EHR)
    )
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = str(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
    ledger.submit(
        admin, "client.register", RegisterClient(client_id, ehr.member_id, jwk, ("system/*.cruds",))
    )
    base = f"{cfg.api_url}/fhir"
    return Site(base, f"{base}/auth/token", key, client_id)


@pytest.fixture(scope="module")
def site(network: Network) -> Site:
    return make_site(network, 0, "ehr")


@pytest.fixture(scope="module")
def other_site(network: Network) -> Site:
    """Another organization's EHR, on node 1."""
    return make_site(network, 1, "ehr-other")


def transaction(site: Site, entries: list[tuple[str, Json]]) -> httpx.Response:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": url, "resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
            for url, r in entries
        ],
    }
    return httpx.post(site.base, json=bundle, headers=site.headers(), timeout=120)


def rewrite(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {
            k: mapping.get(v, v) if k == "reference" and isinstance(v, str) else rewrite(v, mapping)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [rewrite(v, mapping) for v in value]
    return value


def as_sent(resource: Json) -> Json:
    """A resource without what the server assigns (id, meta.versionId, meta.lastUpdated),
    in its canonical form (the form validation stores)."""
    body = copy.deepcopy(resource)
    body.pop("id", None)
    meta = {k: v for k, v in body.pop("meta", {}).items() if k not in SERVER_META}
    if meta:
        body["meta"] = meta
    return json.loads(validate_resource({**body, "id": "x"}).canonical) | {"id": None}


def read_back(site: Site, location: str) -> Json:
    type_and_id = "/".join(location.split("/")[:2])
    answer = httpx.get(f"{site.base}/{type_and_id}", headers=site.headers(), timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert isinstance(body, dict)
    return body


def search(site: Site, query: str) -> list[Json]:
    answer = httpx.get(f"{site.base}/{query}", headers=site.headers(), timeout=60)
    assert answer.status_code == 200, answer.text
    return [e["resource"] for e in answer.json().get("entry", []) if e["search"]["mode"] == "match"]


def patient(family: str) -> Json:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:medledger:test:public", "value": str(uuid.uuid4())}],
        "name": [{"family": family, "given": ["Ana"]}],
        "gender": "female",
        "birthDate": "1980-04-02",
    }


SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def chart(patient_url: str) -> list[tuple[str, Json]]:
    """One patient's resources of the new types, as Synthea and US Core write them."""
    medication = f"urn:uuid:{uuid.uuid4()}"
    rx = {"coding": [{"system": RXNORM, "code": "308136", "display": "amlodipine 2.5 MG"}]}
    return [
        (medication, {"resourceType": "Medication", "status": "active", "code": rx}),
        (
            f"urn:uuid:{uuid.uuid4()}",
            {
                "resourceType": "MedicationRequest",
                "status": "active",
                "intent": "order",
                "medicationReference": {"reference": medication},
                "subject": {"reference": patient_url},
                "authoredOn": "2024-03-01",
            },
        ),
        (
            f"urn:uuid:{uuid.uuid4()}",
            {
                "resourceType": "MedicationAdministration",
                "status": "completed",
                "medicationReference": {"reference": medication},
                "subject": {"reference": patient_url},
                "effectiveDateTime": "2024-03-02T08:00:00+00:00",
            },
        ),
        (
            f"urn:uuid:{uuid.uuid4()}",
            {
                "resourceType": "Device",
                "status": "active",
                "udiCarrier": [{"deviceIdentifier": "09504000059118", "carrierHRF": "(01)0950"}],
                "type": {"coding": [{"system": SNOMED, "code": "72506001"}]},
                "patient": {"reference": patient_url},
            },
        ),
        (
            f"urn:uuid:{uuid.uuid4()}",
            {
                "resourceType": "ImagingStudy",
                "status": "available",
                "subject": {"reference": patient_url},
                "started": "2024-03-03T10:00:00+00:00",
                "numberOfSeries": 1,
                "series": [
                    {
                        "uid": "1.2.840.99999999.1.1",
                        "modality": {
                            "system": "http://dicom.nema.org/resources/ontology/DCM",
                            "code": "DX",
                        },
                    }
                ],
            },
        ),
        (
            f"urn:uuid:{uuid.uuid4()}",
            {
                "resourceType": "SupplyDelivery",
                "status": "completed",
                "patient": {"reference": patient_url},
                "suppliedItem": {
                    "itemCodeableConcept": {"coding": [{"system": SNOMED, "code": "1"}]}
                },
            },
        ),
        (
            f"urn:uuid:{uuid.uuid4()}",
            {
                "resourceType": "Specimen",
                "status": "available",
                "type": {"coding": [{"system": SNOMED, "code": "122555007"}]},
                "subject": {"reference": patient_url},
                "collection": {"collectedDateTime": "2024-03-04T07:30:00+00:00"},
            },
        ),
        (
            f"urn:uuid:{uuid.uuid4()}",
            {
                "resourceType": "MedicationDispense",
                "status": "completed",
                "medicationCodeableConcept": rx,
                "subject": {"reference": patient_url},
                "whenHandedOver": "2024-03-02T09:00:00+00:00",
            },
        ),
        (
            f"urn:uuid:{uuid.uuid4()}",
            {
                "resourceType": "QuestionnaireResponse",
                "status": "completed",
                "questionnaire": "http://loinc.org/q/93025-5|2.72",
                "subject": {"reference": patient_url},
                "authored": "2024-03-05T10:00:00+00:00",
                "item": [
                    {
                        "linkId": "/93030-5",
                        "text": "Has lack of transportation kept you from appointments?",
                        "answer": [
                            {"valueCoding": {"system": "http://loinc.org", "code": "LA33-6"}}
                        ],
                    }
                ],
            },
        ),
        (
            f"urn:uuid:{uuid.uuid4()}",
            {
                "resourceType": "RelatedPerson",
                "active": True,
                "patient": {"reference": patient_url},
                "relationship": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                "code": "MTH",
                            }
                        ]
                    }
                ],
                "name": [{"family": "Okafor", "given": ["Ngozi"]}],
            },
        ),
        (
            f"urn:uuid:{uuid.uuid4()}",
            {
                "resourceType": "Coverage",
                "status": "active",
                "beneficiary": {"reference": patient_url},
                "payor": [{"display": "Aetna"}],
            },
        ),
        (
            f"urn:uuid:{uuid.uuid4()}",
            {
                "resourceType": "CarePlan",
                "status": "active",
                "intent": "plan",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://hl7.org/fhir/us/core/CodeSystem/careplan-category",
                                "code": "assess-plan",
                            }
                        ]
                    }
                ],
                "subject": {"reference": patient_url},
            },
        ),
    ]


@pytest.mark.e2e
@pytest.mark.skipif(sys.platform == "win32", reason="real processes")
def test_new_clinical_types_are_stored_read_back_and_searched(site: Site) -> None:
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    entries = [(patient_url, patient("Okafor")), *chart(patient_url)]
    answer = transaction(site, entries)
    assert answer.status_code == 200, answer.text
    locations = [e["response"]["location"] for e in answer.json()["entry"]]
    assigned = {
        url: "/".join(loc.split("/")[:2]) for (url, _), loc in zip(entries, locations, strict=True)
    }
    patient_ref = assigned[patient_url]
    for (_, sent), location in zip(entries[1:], locations[1:], strict=True):
        returned = read_back(site, location)
        assert returned["id"] == location.split("/")[1]
        assert as_sent(returned) == as_sent(rewrite(sent, assigned)), sent["resourceType"]
    by_type = {sent["resourceType"]: assigned[url] for url, sent in entries}
    for resource_type in (
        "MedicationAdministration",
        "Device",
        "ImagingStudy",
        "SupplyDelivery",
        "Specimen",
        "Coverage",
        "MedicationDispense",
        "QuestionnaireResponse",
        "RelatedPerson",
    ):
        found = search(site, f"{resource_type}?patient={patient_ref}")
        assert [f"{resource_type}/{r['id']}" for r in found] == [by_type[resource_type]]
    # US Core SHALL and SHOULD searches of the types held.
    assert len(search(site, f"CarePlan?patient={patient_ref}&category=assess-plan")) == 1
    assert search(site, f"CarePlan?patient={patient_ref}&category=assess-plan-other") == []
    assert len(search(site, f"Device?patient={patient_ref}&type={SNOMED}|72506001")) == 1
    assert search(site, f"Device?patient={patient_ref}&type={SNOMED}|1") == []
    assert len(search(site, f"Specimen?patient={patient_ref}&type=122555007")) == 1
    assert len(search(site, f"ImagingStudy?patient={patient_ref}&modality=DX")) == 1
    assert len(search(site, f"Specimen?patient={patient_ref}&collected=2024-03-04")) == 1
    assert search(site, f"Specimen?patient={patient_ref}&collected=2024-03-05") == []
    assert len(search(site, f"MedicationDispense?patient={patient_ref}&status=completed")) == 1
    questionnaire = "questionnaire=http://loinc.org/q/93025-5"
    assert len(search(site, f"QuestionnaireResponse?patient={patient_ref}&{questionnaire}")) == 1
    assert len(search(site, f"QuestionnaireResponse?patient={patient_ref}&authored=2024-03")) == 1
    assert len(search(site, f"RelatedPerson?patient={patient_ref}&name=Ngozi")) == 1
    assert search(site, f"RelatedPerson?patient={patient_ref}&name=Chidi") == []
    medication = by_type["Medication"]
    assert [r["id"] for r in search(site, f"Medication?_id={medication.split('/')[1]}")] == [
        medication.split("/")[1]
    ]
    everything = httpx.get(
        f"{site.base}/{patient_ref}/$everything", headers=site.headers(), timeout=60
    ).json()
    types = {e["resource"]["resourceType"] for e in everything["entry"] if "resource" in e}
    assert set(NEW_RECORD_TYPES) <= types


@pytest.mark.e2e
def test_a_medication_no_record_refers_to_is_directory_data(site: Site) -> None:
    medication = {"resourceType": "Medication", "code": {"text": "aspirin"}}
    answer = httpx.post(
        f"{site.base}/Medication", json=medication, headers=site.headers(), timeout=60
    )
    assert answer.status_code == 201, answer.text
    entry_id = answer.json()["id"]
    read = httpx.get(f"{site.base}/Medication/{entry_id}", headers=site.headers(), timeout=60)
    assert read.status_code == 200 and read.json()["code"] == {"text": "aspirin"}
    assert [r["id"] for r in search(site, f"Medication?_id={entry_id}")] == [entry_id]
    patient_url, alone = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    answer = transaction(site, [(patient_url, patient("Lone")), (alone, medication)])
    assert answer.status_code == 200, answer.text
    location = answer.json()["entry"][1]["response"]["location"]
    assert read_back(site, location)["code"] == {"text": "aspirin"}


@pytest.mark.e2e
def test_a_medication_two_patients_refer_to_is_refused(site: Site) -> None:
    first, second, medication = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))

    def order(patient_url: str) -> Json:
        return {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "medicationReference": {"reference": medication},
            "subject": {"reference": patient_url},
        }

    answer = transaction(
        site,
        [
            (first, patient("One")),
            (second, patient("Two")),
            (medication, {"resourceType": "Medication", "code": {"text": "aspirin"}}),
            (f"urn:uuid:{uuid.uuid4()}", order(first)),
            (f"urn:uuid:{uuid.uuid4()}", order(second)),
        ],
    )
    assert answer.status_code == 422, answer.text
    assert "2 patients" in json.dumps(answer.json())


@pytest.mark.e2e
@pytest.mark.skipif(not R4_EXAMPLES.is_dir(), reason=ABSENT)
def test_every_official_r4_example_of_a_stored_type_is_accepted_and_reads_back(
    site: Site,
) -> None:
    """Each example file of a record type (Claims go to the claims ledger) is posted in one
    transaction with a new patient its patient references are pointed at; each reads back as
    sent. The R4 examples that name no patient at all cannot be a patient's record: they are
    counted and must be refused saying so."""
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    entries: list[tuple[str, Json]] = [(patient_url, patient("Example"))]
    no_patient: list[str] = []
    for path in example_files():
        for resource in resources_of(load(path)):
            resource_type = resource["resourceType"]
            if resource_type not in RECORD_TYPES or resource_type in ("Patient", "Medication"):
                continue
            body = copy.deepcopy(resource)
            body.pop("id", None)
            element = "patient" if "patient" in body else "subject"
            if not isinstance(body.get(element), dict):
                no_patient.append(path.name)
                continue
            body[element] = {"reference": patient_url}
            entries.append((f"urn:uuid:{uuid.uuid4()}", body))
    assert len(entries) > 50
    assert no_patient == ["Observation-decimal.json"]
    decimal = load(R4_EXAMPLES / "Observation-decimal.json")
    refused = httpx.post(
        f"{site.base}/Observation", json=decimal, headers=site.headers(), timeout=60
    )
    assert refused.status_code == 422, refused.text
    assert "Observation.subject must reference the patient" in refused.text
    answer = transaction(site, entries)
    assert answer.status_code == 200, answer.text
    locations = [e["response"]["location"] for e in answer.json()["entry"]]
    assigned = {
        url: "/".join(loc.split("/")[:2]) for (url, _), loc in zip(entries, locations, strict=True)
    }
    for (_, sent), location in zip(entries[1:], locations[1:], strict=True):
        assert as_sent(read_back(site, location)) == as_sent(rewrite(sent, assigned))


# --- the shared directory ---------------------------------------------------------------------

NPI = "http://hl7.org/fhir/sid/us-npi"


def organization(identifier: str, name: str) -> Json:
    return {
        "resourceType": "Organization",
        "identifier": [{"system": "urn:medledger:test:org", "value": identifier}],
        "active": True,
        "name": name,
        "address": [{"line": ["1 Main St"], "city": "Leominster", "state": "MA"}],
    }


@pytest.mark.e2e
def test_directory_entries_are_created_conditionally_read_searched_and_updated(
    site: Site, other_site: Site
) -> None:
    tag = uuid.uuid4().hex[:8]
    body = organization(tag, f"Hospital {tag}")
    condition = {"If-None-Exist": f"identifier=urn:medledger:test:org|{tag}"}
    created = httpx.post(
        f"{site.base}/Organization", json=body, headers=site.headers() | condition, timeout=60
    )
    assert created.status_code == 201, created.text
    org_id = created.json()["id"]
    assert created.headers["ETag"] == 'W/"1"'
    # The same conditional create finds it and writes nothing.
    again = httpx.post(
        f"{site.base}/Organization", json=body, headers=site.headers() | condition, timeout=60
    )
    assert again.status_code == 200 and again.json()["id"] == org_id
    # Read back as sent, from another organization's node too (the directory is shared).
    for reader in (site, other_site):
        returned = read_back(reader, f"Organization/{org_id}")
        assert as_sent(returned) == as_sent(body)
    # Searches by the US Core parameters.
    ids = [r["id"] for r in search(site, f"Organization?identifier=urn:medledger:test:org|{tag}")]
    assert ids == [org_id]
    assert [r["id"] for r in search(site, f"Organization?name=Hospital {tag}")] == [org_id]
    assert org_id in [r["id"] for r in search(site, "Organization?address-city=Leominster")]
    # A record refers to it conditionally: the reference resolves to the entry.
    patient_url, encounter_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": patient_url},
        "serviceProvider": {
            "reference": f"Organization?identifier=urn:medledger:test:org|{tag}",
            "display": "x",
        },
    }
    answer = transaction(site, [(patient_url, patient("Cond")), (encounter_url, encounter)])
    assert answer.status_code == 200, answer.text
    stored = read_back(site, answer.json()["entry"][1]["response"]["location"])
    assert stored["serviceProvider"] == {"reference": f"Organization/{org_id}", "display": "x"}
    # An update by the owner makes version 2; vread gives version 1 still.
    changed = {**body, "id": org_id, "name": f"Renamed {tag}"}
    updated = httpx.put(
        f"{site.base}/Organization/{org_id}",
        json=changed,
        headers=site.headers() | {"If-Match": 'W/"1"'},
        timeout=60,
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["meta"]["versionId"] == "2"
    first = httpx.get(
        f"{site.base}/Organization/{org_id}/_history/1", headers=site.headers(), timeout=60
    )
    assert first.status_code == 200 and first.json()["name"] == f"Hospital {tag}"
    stale = httpx.put(
        f"{site.base}/Organization/{org_id}",
        json=changed,
        headers=site.headers() | {"If-Match": 'W/"1"'},
        timeout=60,
    )
    assert stale.status_code == 412, stale.text
    # Another organization's EHR may read the entry but not change it.
    refused = httpx.put(
        f"{other_site.base}/Organization/{org_id}",
        json={**changed, "name": "Taken over"},
        headers=other_site.headers(),
        timeout=60,
    )
    assert refused.status_code == 403, refused.text
    assert "belongs to organization" in refused.text
    assert read_back(site, f"Organization/{org_id}")["name"] == f"Renamed {tag}"


@pytest.mark.e2e
def test_a_duplicate_identifier_and_a_bad_entry_are_refused(site: Site) -> None:
    tag = uuid.uuid4().hex[:8]
    body = {
        "resourceType": "Practitioner",
        "identifier": [{"system": NPI, "value": tag}],
        "name": [{"family": "Okafor"}],
    }
    first = httpx.post(f"{site.base}/Practitioner", json=body, headers=site.headers(), timeout=60)
    assert first.status_code == 201, first.text
    second = httpx.post(f"{site.base}/Practitioner", json=body, headers=site.headers(), timeout=60)
    assert second.status_code == 409, second.text
    assert "already names Practitioner/" in second.text
    invalid = {"resourceType": "Location", "status": "open-ish"}
    bad = httpx.post(f"{site.base}/Location", json=invalid, headers=site.headers(), timeout=60)
    assert bad.status_code == 400, bad.text
    assert [r["id"] for r in search(site, f"Practitioner?identifier={NPI}|{tag}")] == [
        first.json()["id"]
    ]
    assert len(search(site, "Practitioner?family=Okafor&_count=100")) >= 1


@pytest.mark.e2e
def test_delete_marks_entered_in_error_for_the_owning_organization_only(
    network: Network, site: Site, other_site: Site
) -> None:
    patient_url, observation_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
        "subject": {"reference": patient_url},
        "valueQuantity": {"value": 36.6, "unit": "Cel"},
    }
    answer = transaction(site, [(patient_url, patient("Del")), (observation_url, observation)])
    assert answer.status_code == 200, answer.text
    location = "/".join(answer.json()["entry"][1]["response"]["location"].split("/")[:2])
    # Another organization may not delete St. Mary's record (once its node has the block)...
    other_node = network.client(1)
    wait_until(
        lambda: other_node.query_found("/record", location.split("/")[1], RecordHistory),
        30,
        f"{location} committed on the other node",
    )
    refused = httpx.delete(
        f"{other_site.base}/{location}", headers=other_site.headers(), timeout=60
    )
    assert refused.status_code == 403, refused.text
    assert "author's organization" in refused.text
    assert "tag" not in read_back(site, location)["meta"]
    # ... its author's organization may: the version is flagged, and stays readable.
    for _ in range(2):  # deleting again succeeds and changes nothing
        deleted = httpx.delete(f"{site.base}/{location}", headers=site.headers(), timeout=60)
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["resourceType"] == "OperationOutcome"
    tags = read_back(site, location)["meta"]["tag"]
    assert {"system": "urn:medledger:record-status", "code": "entered-in-error"}.items() <= (
        tags[0].items()
    )

    # A directory entry: only its organization retires it; its identifier is then free.
    tag = uuid.uuid4().hex[:8]
    body = organization(tag, f"Closed {tag}")
    created = httpx.post(f"{site.base}/Organization", json=body, headers=site.headers(), timeout=60)
    assert created.status_code == 201, created.text
    org = f"Organization/{created.json()['id']}"
    refused = httpx.delete(f"{other_site.base}/{org}", headers=other_site.headers(), timeout=60)
    assert refused.status_code == 403, refused.text
    deleted = httpx.delete(f"{site.base}/{org}", headers=site.headers(), timeout=60)
    assert deleted.status_code == 200, deleted.text
    assert read_back(site, org)["meta"]["tag"][0]["code"] == "entered-in-error"
    assert search(site, f"Organization?identifier=urn:medledger:test:org|{tag}") == []
    again = httpx.post(f"{site.base}/Organization", json=body, headers=site.headers(), timeout=60)
    assert again.status_code == 201, again.text


def test_unsupported_inclusions_are_refused_saying_what_is_supported() -> None:
    with pytest.raises(SearchError, match="Provenance:target"):
        split_inclusions("Observation", [("_revinclude", "Observation:subject")])
    with pytest.raises(SearchError, match="MedicationRequest:medication"):
        split_inclusions("MedicationRequest", [("_include", "MedicationRequest:nothing")])
    with pytest.raises(SearchError, match="on Observation"):
        split_inclusions("Observation", [("_include", "Condition:subject")])
    rest, inclusions = split_inclusions(
        "MedicationRequest",
        [("patient", "Patient/p"), ("_include", "MedicationRequest:medication:Medication")],
    )
    assert rest == [("patient", "Patient/p")] and inclusions.includes[0].target == "Medication"


@pytest.mark.e2e
def test_include_and_revinclude_provenance(site: Site) -> None:
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    entries = [(patient_url, patient("Incl")), *chart(patient_url)]
    answer = transaction(site, entries)
    assert answer.status_code == 200, answer.text
    locations = ["/".join(e["response"]["location"].split("/")[:2]) for e in answer.json()["entry"]]
    by_type = {sent["resourceType"]: loc for (_, sent), loc in zip(entries, locations, strict=True)}
    patient_ref = by_type["Patient"]

    def bundle(query: str) -> list[Json]:
        got = httpx.get(f"{site.base}/{query}", headers=site.headers(), timeout=120)
        assert got.status_code == 200, got.text
        return list(got.json().get("entry", []))

    found = bundle(f"MedicationRequest?patient={patient_ref}&_include=MedicationRequest:medication")
    modes = {(e["search"]["mode"], e["resource"]["resourceType"]) for e in found}
    assert modes == {("match", "MedicationRequest"), ("include", "Medication")}
    included = next(e["resource"] for e in found if e["search"]["mode"] == "include")
    assert f"Medication/{included['id']}" == by_type["Medication"]
    # US Core SHALL: _revinclude=Provenance:target.
    found = bundle(f"Specimen?patient={patient_ref}&_revinclude=Provenance:target")
    provenance = [e["resource"] for e in found if e["search"]["mode"] == "include"]
    assert len(provenance) == 1 and provenance[0]["resourceType"] == "Provenance"
    assert provenance[0]["target"][0]["reference"].startswith(by_type["Specimen"])
    # A directory include: PractitionerRole -> Practitioner.
    tag = uuid.uuid4().hex[:8]
    doctor = {"resourceType": "Practitioner", "identifier": [{"system": NPI, "value": tag}]}
    made = httpx.post(f"{site.base}/Practitioner", json=doctor, headers=site.headers(), timeout=60)
    assert made.status_code == 201, made.text
    role = {
        "resourceType": "PractitionerRole",
        "practitioner": {"reference": f"Practitioner?identifier={NPI}|{tag}"},
    }
    made_role = httpx.post(
        f"{site.base}/PractitionerRole", json=role, headers=site.headers(), timeout=60
    )
    assert made_role.status_code == 201, made_role.text
    assert made_role.json()["practitioner"]["reference"] == f"Practitioner/{made.json()['id']}"
    found = bundle(
        f"PractitionerRole?practitioner=Practitioner/{made.json()['id']}"
        "&_include=PractitionerRole:practitioner"
    )
    assert [(e["search"]["mode"], e["resource"]["id"]) for e in found] == [
        ("match", made_role.json()["id"]),
        ("include", made.json()["id"]),
    ]


@pytest.mark.e2e
def test_a_transaction_looks_each_conditional_reference_up_once(
    network: Network, site: Site
) -> None:
    """A Synthea patient file names the same few practitioners and organizations in hundreds
    of entries: each is looked up in the directory once per transaction, not once per use."""
    tag = uuid.uuid4().hex[:8]
    doctor = {"resourceType": "Practitioner", "identifier": [{"system": NPI, "value": tag}]}
    made = httpx.post(f"{site.base}/Practitioner", json=doctor, headers=site.headers(), timeout=60)
    assert made.status_code == 201, made.text
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    asserted = {"reference": f"Practitioner?identifier={NPI}|{tag}"}
    unknown = {"reference": f"Practitioner?identifier={NPI}|missing-{tag}"}
    conditions = [
        (
            f"urn:uuid:{uuid.uuid4()}",
            {
                "resourceType": "Condition",
                "code": {"coding": [{"system": SNOMED, "code": "44054006"}]},
                "subject": {"reference": patient_url},
                "asserter": asserted if i % 2 else unknown,
                "recorder": asserted,
            },
        )
        for i in range(6)
    ]
    before = services_counters(network.configs[0])  # the site is node 0's
    answer = transaction(site, [(patient_url, patient("Lookups")), *conditions])
    assert answer.status_code == 200, answer.text
    after = services_counters(network.configs[0])
    lookups = after.get("query:/directory/identifier", 0) - before.get(
        "query:/directory/identifier", 0
    )
    assert lookups == 2  # the practitioner, and the identifier no entry holds
    stored = [read_back(site, e["response"]["location"]) for e in answer.json()["entry"][1:]]
    resolved = f"Practitioner/{made.json()['id']}"
    assert all(s["recorder"]["reference"] == resolved for s in stored)
    expected = [resolved if i % 2 else unknown["reference"] for i in range(6)]
    assert [s["asserter"]["reference"] for s in stored] == expected


def provenance_of(*targets: str) -> Json:
    return {
        "resourceType": "Provenance",
        "target": [{"reference": t} for t in targets],
        "recorded": "2024-03-05T10:00:00+00:00",
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
                "who": {"reference": f"Practitioner?identifier={NPI}|9999999999"},
            }
        ],
    }


@pytest.mark.e2e
def test_an_ehrs_provenance_is_a_record_of_its_targets_patient(site: Site) -> None:
    patient_url, condition_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    condition = {
        "resourceType": "Condition",
        "code": {"coding": [{"system": SNOMED, "code": "44054006"}]},
        "subject": {"reference": patient_url},
    }
    provenance_url = f"urn:uuid:{uuid.uuid4()}"
    entries = [
        (patient_url, patient("Prov")),
        (condition_url, condition),
        (provenance_url, provenance_of(patient_url, condition_url)),
    ]
    answer = transaction(site, entries)
    assert answer.status_code == 200, answer.text
    locations = ["/".join(e["response"]["location"].split("/")[:2]) for e in answer.json()["entry"]]
    assigned = {url: loc for (url, _), loc in zip(entries, locations, strict=True)}
    stored = read_back(site, locations[2])
    assert as_sent(stored) == as_sent(rewrite(entries[2][1], assigned))
    found = search(site, f"Provenance?patient={locations[0]}")
    assert [f"Provenance/{r['id']}" for r in found] == [locations[2]]
    # The ledger's own Provenance views are still there.
    views = search(site, f"Provenance?target={locations[1]}")
    assert views and views[0]["id"].endswith("-v1")
    # One Provenance about two patients' records is refused.
    other_url = f"urn:uuid:{uuid.uuid4()}"
    answer = transaction(
        site,
        [
            (patient_url, patient("ProvA")),
            (other_url, patient("ProvB")),
            (provenance_url, provenance_of(patient_url, other_url)),
        ],
    )
    assert answer.status_code == 422, answer.text
    assert "one patient" in answer.text


@pytest.mark.e2e
def test_an_observation_about_a_device_or_location_is_directory_data(
    site: Site, other_site: Site
) -> None:
    """R4 lets an Observation be about a Device or a Location (a calibration, a room's
    temperature): not patient data, so a shared directory entry, found by its subject. One
    about a Group of patients is refused saying why."""
    device_url, calibration_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    device = {
        "resourceType": "Device",
        "status": "active",
        "type": {"coding": [{"system": SNOMED, "code": "19892000", "display": "Thermometer"}]},
    }
    calibration = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
        "subject": {"reference": device_url},
        "effectiveDateTime": "2026-11-30T08:00:00+00:00",
        "valueQuantity": {"value": 37.0, "unit": "Cel"},
    }
    answer = transaction(site, [(device_url, device), (calibration_url, calibration)])
    assert answer.status_code == 200, answer.text
    device_id, observation_id = (
        e["response"]["location"].split("/")[1] for e in answer.json()["entry"]
    )
    served = read_back(site, f"Observation/{observation_id}")
    assert served["subject"] == {"reference": f"Device/{device_id}"}
    found = search(site, f"Observation?subject=Device/{device_id}")
    assert [r["id"] for r in found] == [observation_id]
    assert search(site, f"Observation?subject=Device/{uuid.uuid4()}") == []
    # Every node serves it: another organization reads it, and may not change it.
    elsewhere = httpx.get(
        f"{other_site.base}/Observation/{observation_id}", headers=other_site.headers(), timeout=60
    )
    assert elsewhere.status_code == 200 and elsewhere.json()["id"] == observation_id
    refused = httpx.delete(
        f"{other_site.base}/Observation/{observation_id}", headers=other_site.headers(), timeout=60
    )
    assert refused.status_code == 403, refused.text

    # On its own: about a Location.
    room = httpx.post(
        f"{site.base}/Location",
        json={"resourceType": "Location", "name": "Ward 3, room 12", "status": "active"},
        headers={**site.headers(), **FHIR_JSON},
        timeout=60,
    )
    assert room.status_code == 201, room.text
    room_id = room.json()["id"]
    temperature = {**calibration, "subject": {"reference": f"Location/{room_id}"}}
    created = httpx.post(
        f"{site.base}/Observation",
        json=temperature,
        headers={**site.headers(), **FHIR_JSON},
        timeout=60,
    )
    assert created.status_code == 201, created.text
    assert [r["id"] for r in search(site, f"Observation?subject=Location/{room_id}")] == [
        created.json()["id"]
    ]

    # About a Group: refused, nothing written.
    group = {**calibration, "subject": {"reference": "Group/ward-3-patients"}}
    refused = httpx.post(
        f"{site.base}/Observation", json=group, headers={**site.headers(), **FHIR_JSON}, timeout=60
    )
    assert refused.status_code == 422, refused.text
    assert "a Group is not stored here" in refused.text


@pytest.mark.e2e
def test_conditional_update_updates_what_the_identifier_names_or_creates(
    site: Site, other_site: Site
) -> None:
    """PUT <Type>?identifier=system|value, as HAPI FHIR does it, where an identifier names one
    resource on the ledger (Patient, the directory types); alone and in a transaction."""
    mrn = str(uuid.uuid4())
    condition = f"identifier=urn:medledger:test:public|{mrn}"

    def put(target: Site, kind: str, query: str, body: Json) -> httpx.Response:
        return httpx.put(
            f"{target.base}/{kind}?{query}",
            json=body,
            headers={**target.headers(), **FHIR_JSON},
            timeout=60,
        )

    body = {
        **patient("Cond"),
        "identifier": [{"system": "urn:medledger:test:public", "value": mrn}],
    }
    created = put(site, "Patient", condition, body)
    assert created.status_code == 201, created.text
    patient_id = created.json()["id"]
    renamed = {**body, "name": [{"family": "Conde", "given": ["Ana"]}]}
    updated = put(site, "Patient", condition, renamed)
    assert updated.status_code == 200, updated.text
    assert updated.json()["id"] == patient_id and updated.json()["meta"]["versionId"] == "2"
    assert read_back(site, f"Patient/{patient_id}")["name"][0]["family"] == "Conde"
    # The body's id, if any, must be the one the identifier names.
    wrong = put(site, "Patient", condition, {**renamed, "id": "someone-else"})
    assert wrong.status_code == 400 and "names Patient/" in wrong.text

    org_id = str(uuid.uuid4())
    org_condition = f"identifier=urn:medledger:test:org|{org_id}"
    first = put(site, "Organization", org_condition, organization(org_id, "Cond Clinic"))
    assert first.status_code == 201, first.text
    again = put(site, "Organization", org_condition, organization(org_id, "Cond Clinic East"))
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.json()["name"] == "Cond Clinic East"
    # Another organization may not update St. Mary's entry through its identifier either.
    theirs = put(other_site, "Organization", org_condition, organization(org_id, "Taken"))
    assert theirs.status_code == 403, theirs.text
    # Records are updated by id: no conditional update on them.
    observation = put(site, "Observation", "identifier=x|y", {"resourceType": "Observation"})
    assert (
        observation.status_code == 400 and "conditional update is supported on" in observation.text
    )

    # In a transaction: the patient is updated, a new practitioner created.
    npi = str(uuid.uuid4().int)[:10]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {**renamed, "birthDate": "1980-04-03"},
                "request": {"method": "PUT", "url": f"Patient?{condition}"},
            },
            {
                "resource": {
                    "resourceType": "Practitioner",
                    "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": npi}],
                    "name": [{"family": "Adeyemi"}],
                },
                "request": {
                    "method": "PUT",
                    "url": f"Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|{npi}",
                },
            },
        ],
    }
    answer = httpx.post(site.base, json=bundle, headers={**site.headers(), **FHIR_JSON}, timeout=60)
    assert answer.status_code == 200, answer.text
    statuses = [e["response"]["status"] for e in answer.json()["entry"]]
    assert statuses == ["200 OK", "201 Created"]
    assert read_back(site, f"Patient/{patient_id}")["birthDate"] == "1980-04-03"

    statement = httpx.get(f"{site.base}/metadata", timeout=10).json()
    conditional = {r["type"]: r.get("conditionalUpdate") for r in statement["rest"][0]["resource"]}
    assert conditional["Patient"] and conditional["Organization"]
    assert not conditional["Observation"]
