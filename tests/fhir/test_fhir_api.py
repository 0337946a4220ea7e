"""The FHIR R4 API end to end on a real 4-validator network, driven by a real FHIR client
library (fhirpy): SMART Backend Services tokens, create/read/vread/update with ETags, search
with paging, transaction and batch Bundles, $everything, Consent across organizations,
AuditEvent and Provenance views, and OperationOutcome errors with their status codes."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import (
    AuthorizationError,
    ForbiddenError,
    MultipleResourcesFound,
    OperationOutcome,
)

from medledger.auth import node_audience, sign_request
from medledger.client.records import RecordsClient
from medledger.crypto.keys import KeyPair
from medledger.ledger.clients import RegisterClient
from medledger.ledger.consent import GranteeKind, Purpose, ScopeKind
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.samples.fhir import generate_patient
from medledger.services.custody import Custody
from medledger.validation import validate_resource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_network import (
    Network,
    assert_own_state_read_in_process,
    height_of,
    running_network,
    services_counters,
    wait_until,
)

pytestmark = pytest.mark.e2e

BASE_PORT = 28900
LOINC = "http://loinc.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class Site:
    """A custodial EHR member on one node with its registered SMART clients."""

    node: int
    base: str
    token_url: str
    ehr: KeyPair
    keys: dict[str, ed25519.Ed25519PrivateKey]

    def token(self, client_id: str, scope: str = "system/*.cruds", *, exp: int = 240) -> str:
        answer = request_token(self, client_id, scope, exp=exp)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["token_type"] == "bearer" and body["expires_in"] > 0
        return str(body["access_token"])

    def fhir(
        self, client_id: str = "", scope: str = "system/*.cruds", **headers: str
    ) -> AsyncFHIRClient:
        token = self.token(client_id or f"ehr-{self.node}", scope)
        return AsyncFHIRClient(self.base, authorization=f"Bearer {token}", extra_headers=headers)

    def headers(self, client_id: str = "") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(client_id or f'ehr-{self.node}')}"}


def assertion(key: ed25519.Ed25519PrivateKey, client_id: str, audience: str, exp: int) -> str:
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "exp": now + exp,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, key, algorithm="EdDSA")


def request_token(site: Site, client_id: str, scope: str, *, exp: int = 240) -> httpx.Response:
    form = {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion(site.keys[client_id], client_id, site.token_url, exp),
    }
    return httpx.post(site.token_url, data=form, timeout=10)


def public_jwk(key: ed25519.Ed25519PrivateKey) -> str:
    return str(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))


def patient_records(network: Network, patient: str) -> RecordsClient:
    """The patient acting with their own keys (those node 0 holds for them in custody)."""
    cfg = network.configs[0]
    passphrase = (cfg.home / "keys" / "node.passphrase").read_text().strip()
    keys = Custody(cfg.home / "custody", passphrase).keys_for(patient)
    return RecordsClient(network.client(0), cfg.api_url, keys, patient)


def make_site(network: Network, node: int, clients: dict[str, tuple[str, ...]]) -> Site:
    """Custody keys for an EHR member (picked up by the running node), enrolled by the
    organization's admin, and SMART clients registered for it."""
    cfg = network.configs[node]
    passphrase = (cfg.home / "keys" / "node.passphrase").read_text().strip()
    ehr = Custody(cfg.home / "custody", passphrase, fast_kdf=True).create(f"ehr-{node}")
    ledger = network.client(node)
    admin = network.admins[node]
    ledger.submit(
        admin, "member.enroll", EnrollMember(ehr.verify_key, ehr.encryption_key, Role.EHR)
    )
    keys = {}
    for client_id, scopes in clients.items():
        keys[client_id] = ed25519.Ed25519PrivateKey.generate()
        body = RegisterClient(client_id, ehr.member_id, public_jwk(keys[client_id]), scopes)
        ledger.submit(admin, "client.register", body)
    base = f"{cfg.api_url}/fhir"
    return Site(node, base, f"{base}/auth/token", ehr, keys)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with running_network(tmp_path_factory.mktemp("fhir") / "net", BASE_PORT) as net:
        yield net


@pytest.fixture(scope="module")
def sites(network: Network) -> dict[int, Site]:
    return {
        0: make_site(
            network,
            0,
            {"ehr-0": ("system/*.cruds",), "reader-0": ("system/Patient.r",)},
        ),
        1: make_site(network, 1, {"ehr-1": ("system/*.cruds",)}),
    }


def lab(
    patient: str, code: str, value: float, when: str, display: str = "Glucose"
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "laboratory"}]}],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
        "subject": {"reference": patient},
        "effectiveDateTime": when,
        "valueQuantity": {
            "value": value,
            "unit": "mg/dL",
            "system": "http://unitsofmeasure.org",
            "code": "mg/dL",
        },
    }


@dataclass
class Chart:
    patient: str
    mrn: tuple[str, str]
    observations: list[str]
    condition: str
    response: dict[str, Any]


@pytest.fixture(scope="module")
def chart(sites: dict[int, Site]) -> Chart:
    """One patient with five lab results and a condition, in one transaction Bundle whose
    entries reference the new Patient by its urn:uuid fullUrl."""
    site = sites[0]
    patient = generate_patient(7)
    del patient["id"]
    mrn = (patient["identifier"][0]["system"], patient["identifier"][0]["value"])
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": patient_url,
            "resource": patient,
            "request": {"method": "POST", "url": "Patient"},
        }
    ]
    for day, (code, value) in enumerate(
        [("2345-7", 92), ("2345-7", 131), ("4548-4", 6.1), ("2345-7", 104), ("2093-3", 188)],
        start=1,
    ):
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": lab(patient_url, code, value, f"2026-0{day}-15T09:00:00Z"),
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    entries.append(
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": {
                "resourceType": "Condition",
                "clinicalStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "code": "active",
                        }
                    ]
                },
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                "code": "problem-list-item",
                            }
                        ]
                    }
                ],
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
                "subject": {"reference": patient_url},
                "onsetDateTime": "2025-11-02",
            },
            "request": {"method": "POST", "url": "Condition"},
        }
    )
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    answer = httpx.post(
        site.base,
        json=bundle,
        headers={**site.headers(), "Content-Type": "application/fhir+json"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("application/fhir+json")
    body = answer.json()
    locations = [e["response"]["location"] for e in body["entry"]]
    ids = [loc.split("/")[1] for loc in locations]
    return Chart(ids[0], mrn, ids[1:6], ids[6], body)


def valid(resource: Any) -> dict[str, Any]:
    """A resource the server returned, checked against the R4(B) models."""
    document = resource.serialize() if hasattr(resource, "serialize") else dict(resource)
    validate_resource(document)
    return dict(document)


# --- capability and authentication ----------------------------------------------------------


def test_capability_statement_tells_what_is_served(sites: dict[int, Site]) -> None:
    site = sites[0]
    answer = httpx.get(f"{site.base}/metadata", headers={"Accept": "application/fhir+json"})
    assert answer.status_code == 200
    statement = answer.json()
    validate_resource(statement)
    rest = statement["rest"][0]
    token = rest["security"]["extension"][0]["extension"][0]
    assert token == {"url": "token", "valueUri": site.token_url}
    types = {r["type"] for r in rest["resource"]}
    assert {"Patient", "Observation", "DocumentReference", "Consent", "AuditEvent"} <= types
    config = httpx.get(f"{site.base}/.well-known/smart-configuration").json()
    assert config["token_endpoint"] == site.token_url


async def test_requests_without_a_valid_token_get_401(
    network: Network, sites: dict[int, Site], chart: Chart
) -> None:
    site = sites[0]
    anonymous = AsyncFHIRClient(site.base)
    with pytest.raises(AuthorizationError):
        await anonymous.get("Observation", chart.observations[0])
    garbage = AsyncFHIRClient(site.base, authorization="Bearer not-a-token")
    with pytest.raises(AuthorizationError) as caught:
        await garbage.resources("Observation").search(patient=chart.patient).fetch()
    outcome = json.loads(str(caught.value))
    assert outcome["resourceType"] == "OperationOutcome"
    raw = httpx.get(f"{site.base}/Observation/{chart.observations[0]}")
    assert raw.status_code == 401 and "Bearer" in raw.headers["WWW-Authenticate"]
    # An expired client assertion gets no token at all.
    expired = request_token(site, "ehr-0", "system/*.cruds", exp=-120)
    assert expired.status_code == 401 and expired.json()["error"] == "invalid_client"
    # A token is not valid on a client the ledger does not know.
    unknown = httpx.post(
        site.token_url,
        data={
            "grant_type": "client_credentials",
            "scope": "system/*.rs",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion(site.keys["ehr-0"], "nobody", site.token_url, 60),
        },
    )
    assert unknown.status_code == 401


async def test_requests_outside_the_scopes_get_403_and_are_audited(
    network: Network, sites: dict[int, Site], chart: Chart
) -> None:
    site = sites[0]
    reader = site.fhir("reader-0", "system/Patient.r")
    patient = await reader.get("Patient", chart.patient)
    assert patient["id"] == chart.patient
    with pytest.raises(ForbiddenError):
        await reader.get("Observation", chart.observations[0])
    with pytest.raises(ForbiddenError):
        await reader.resource(
            "Observation", **lab(f"Patient/{chart.patient}", "2345-7", 1, "2026-01-01")
        ).save()
    with pytest.raises(ForbiddenError):
        await (
            reader.resources("Patient").search(identifier=f"{chart.mrn[0]}|{chart.mrn[1]}").fetch()
        )
    # Asking for more than the registration allows gets only what it allows.
    narrow = request_token(site, "reader-0", "system/Patient.r system/Observation.r")
    assert narrow.json()["scope"] == "system/Patient.r"
    admin = network.admins[0]
    cfg = network.configs[0]
    path = "/v1/audit/node"
    log = httpx.get(
        f"{cfg.api_url}{path}",
        headers={
            "Authorization": sign_request(
                admin, admin.member_id, "GET", path, audience=node_audience(cfg.organization)
            )
        },
    ).json()
    refused = [e for e in log if e["action"] == "fhir.request" and e["outcome"] == "refused"]
    assert any(e["actor"] == "reader-0" and e["target"] == "Observation.r" for e in refused)
    assert any(e["actor"] == "?" and "no bearer token" in e["reason"] for e in refused)


# --- records ------------------------------------------------------------------------------------


async def test_transaction_commits_all_entries_with_resolved_references(
    sites: dict[int, Site], chart: Chart
) -> None:
    response = chart.response
    assert response["type"] == "transaction-response"
    assert [e["response"]["status"] for e in response["entry"]] == ["201 Created"] * 7
    assert all(e["response"]["etag"] == 'W/"1"' for e in response["entry"])
    client = sites[0].fhir()
    patient = valid(await client.get("Patient", chart.patient))
    assert patient["identifier"][0]["value"] == chart.mrn[1]
    observation = valid(await client.get("Observation", chart.observations[0]))
    assert observation["subject"]["reference"] == f"Patient/{chart.patient}"
    assert observation["meta"]["versionId"] == "1"
    # One entry is invalid: nothing of the transaction is committed.
    before = await client.resources("Observation").search(patient=chart.patient).count()
    bad = lab(f"Patient/{chart.patient}", "2345-7", 1, "2026-01-01")
    bad["status"] = "finished"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": lab(f"Patient/{chart.patient}", "2345-7", 99, "2026-07-01"),
                "request": {"method": "POST", "url": "Observation"},
            },
            {"resource": bad, "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    with pytest.raises(OperationOutcome) as caught:
        await client.execute("", method="post", data=bundle)
    assert "entry[1]" in str(caught.value)
    assert await client.resources("Observation").search(patient=chart.patient).count() == before


async def test_create_read_update_with_etags_and_history(
    sites: dict[int, Site], chart: Chart
) -> None:
    client = sites[0].fhir()
    patient = client.resource(
        "Patient", **{k: v for k, v in generate_patient(11).items() if k != "id"}
    )
    await patient.save()
    assert patient.id and patient["meta"]["versionId"] == "1"
    observation = client.resource(
        "Observation", **lab(f"Patient/{patient.id}", "2345-7", 88, "2026-05-01T08:00:00Z")
    )
    await observation.save()
    assert observation["meta"]["versionId"] == "1"
    read = await client.get("Observation", observation.id)
    assert valid(read)["valueQuantity"]["value"] == 88
    # Update with the right ETag: version 2.
    current = AsyncFHIRClient(
        client.url, authorization=client.authorization, extra_headers={"If-Match": 'W/"1"'}
    )
    changed = current.resource(
        "Observation", **{**valid(read), "valueQuantity": {**read["valueQuantity"], "value": 90}}
    )
    await changed.save()
    assert changed["meta"]["versionId"] == "2"
    # A stale ETag is refused with 412 and changes nothing.
    stale = AsyncFHIRClient(
        client.url, authorization=client.authorization, extra_headers={"If-Match": 'W/"1"'}
    )
    with pytest.raises(MultipleResourcesFound):  # fhirpy's name for 412
        await stale.resource("Observation", **{**valid(read), "status": "amended"}).save()
    assert (await client.get("Observation", observation.id))["meta"]["versionId"] == "2"
    # vread of the first version, instance history of both.
    first = await client.execute(f"Observation/{observation.id}/_history/1", method="get")
    assert first["valueQuantity"]["value"] == 88
    history = await client.execute(f"Observation/{observation.id}/_history", method="get")
    validate_resource(history)
    assert history["type"] == "history"
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    # Provenance: who committed which version, proven against the signed header.
    provenance = (
        await client.resources("Provenance")
        .search(target=f"Observation/{observation.id}")
        .fetch_all()
    )
    assert len(provenance) == 2
    for item in provenance:
        record = valid(item)
        assert record["agent"][0]["who"]["reference"] == f"Device/{sites[0].ehr.member_id}"
        ledger = {e["url"]: e for e in record["extension"][0]["extension"]}
        assert ledger["stateProofVerified"]["valueBoolean"] is True
    # Update as create is not offered.
    missing = {**valid(read), "id": str(uuid.uuid4())}
    with pytest.raises(OperationOutcome) as caught:
        await client.resource("Observation", **missing).save()
    assert "update as create" in str(caught.value)


async def test_search_with_paging_filters_and_sort(sites: dict[int, Site], chart: Chart) -> None:
    client = sites[0].fhir()
    everything = client.resources("Observation").search(patient=chart.patient).limit(2)
    first_page = await everything.fetch_raw()
    assert first_page["total"] == 5 and len(first_page["entry"]) == 2
    assert {link["relation"] for link in first_page["link"]} == {"self", "next"}
    all_pages = await everything.fetch_all()  # follows the next links
    assert sorted(o.id for o in all_pages) == sorted(chart.observations)
    for observation in all_pages:
        valid(observation)
    glucose = (
        await client.resources("Observation")
        .search(patient=f"Patient/{chart.patient}", code=f"{LOINC}|2345-7")
        .fetch_all()
    )
    assert len(glucose) == 3
    spring = (
        await client.resources("Observation")
        .search(patient=chart.patient, date=["ge2026-02-01", "lt2026-04-30"])
        .fetch_all()
    )
    assert sorted(o["effectiveDateTime"][:7] for o in spring) == ["2026-02", "2026-03", "2026-04"]
    newest = (
        await client.resources("Observation")
        .search(patient=chart.patient)
        .sort("-date")
        .limit(3)
        .fetch()
    )
    assert [o["effectiveDateTime"][:7] for o in newest] == ["2026-05", "2026-04", "2026-03"]
    labs = (
        await client.resources("Observation")
        .search(subject=chart.patient, category="laboratory", _lastUpdated="gt2020-01-01")
        .fetch_all()
    )
    assert len(labs) == 5
    conditions = (
        await client.resources("Condition")
        .search(patient=chart.patient, code="44054006")
        .fetch_all()
    )
    assert [c.id for c in conditions] == [chart.condition]
    by_mrn = (
        await client.resources("Patient")
        .search(identifier=f"{chart.mrn[0]}|{chart.mrn[1]}")
        .fetch_all()
    )
    assert [p.id for p in by_mrn] == [chart.patient]
    summary = (
        await client.resources("Observation").search(patient=chart.patient, code="4548-4").count()
    )
    assert summary == 1
    bundle = await client.execute(f"Patient/{chart.patient}/$everything", method="get")
    validate_resource(bundle)
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds[0] == "Patient" and kinds.count("Observation") == 5 and "Condition" in kinds
    history = await client.execute(
        "Observation/_history", method="get", params={"patient": chart.patient}
    )
    validate_resource(history)
    assert history["type"] == "history" and history["total"] == 5
    by_id = (
        await client.resources("Observation")
        .search(_id=",".join(chart.observations[:2]))
        .fetch_all()
    )
    assert sorted(o.id for o in by_id) == sorted(chart.observations[:2])
    with pytest.raises(OperationOutcome) as caught:
        await client.resources("Observation").search(patient=chart.patient, colour="blue").fetch()
    assert "colour" in str(caught.value)


async def test_batch_entries_are_independent(sites: dict[int, Site], chart: Chart) -> None:
    client = sites[0].fhir()
    bad = lab(f"Patient/{chart.patient}", "2345-7", 1, "2026-01-01")
    bad["status"] = "finished"
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                # A conditional reference: the patient named by their MRN.
                "resource": lab(
                    f"Patient?identifier={chart.mrn[0]}|{chart.mrn[1]}", "2339-0", 97, "2026-06-01"
                ),
                "request": {"method": "POST", "url": "Observation"},
            },
            {"resource": bad, "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "GET", "url": f"Observation/{chart.observations[0]}"}},
            {"request": {"method": "GET", "url": "Observation/no-such-record"}},
        ],
    }
    answer = await client.execute("", method="post", data=bundle)
    validate_resource(answer)
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["201 Created", "400 Bad Request", "200 OK", "404 Not Found"]
    assert answer["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert answer["entry"][2]["resource"]["id"] == chart.observations[0]
    created = answer["entry"][0]
    assert created["resource"]["subject"]["reference"] == f"Patient/{chart.patient}"
    assert created["response"]["location"].endswith("/_history/1")
    # Conditional create: the MRN names the existing patient, nobody new is enrolled.
    again = httpx.post(
        f"{sites[0].base}/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": chart.mrn[0], "value": chart.mrn[1]}],
        },
        headers={
            **sites[0].headers(),
            "If-None-Exist": f"identifier={chart.mrn[0]}|{chart.mrn[1]}",
            "Prefer": "return=minimal",
        },
        timeout=30,
    )
    assert again.status_code == 200 and chart.patient in again.headers["Location"]
    duplicate = httpx.post(
        f"{sites[0].base}/Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": chart.mrn[0], "value": chart.mrn[1]}],
        },
        headers=sites[0].headers(),
        timeout=30,
    )
    assert duplicate.status_code == 409


async def test_errors_are_operation_outcomes(sites: dict[int, Site], chart: Chart) -> None:
    site = sites[0]
    headers = site.headers()
    cases = [
        ("GET", "Basic/x", None, 404),
        ("GET", f"Observation/{uuid.uuid4()}", None, 404),
        ("DELETE", "Observation?code=2345-7", None, 405),  # conditional delete
        ("POST", "Observation", {"resourceType": "Observation", "status": "done"}, 400),
        (
            "POST",
            "Observation",
            lab(f"Patient/{uuid.uuid4().hex[:40]}", "2345-7", 1, "2026-01-01"),
            422,
        ),
        ("POST", "Observation", lab("Group/g1", "2345-7", 1, "2026-01-01"), 422),
        ("GET", f"Observation?patient={chart.patient}&date=soon", None, 400),
    ]
    for method, path, body, status in cases:
        answer = httpx.request(
            method, f"{site.base}/{path}", json=body, headers=headers, timeout=30
        )
        assert answer.status_code == status, (method, path, answer.text)
        outcome = answer.json()
        assert outcome["resourceType"] == "OperationOutcome", path
        validate_resource(outcome)
    xml = httpx.get(
        f"{site.base}/Patient/{chart.patient}",
        headers={**headers, "Accept": "application/fhir+xml"},
    )
    assert xml.status_code == 406
    text = httpx.post(
        f"{site.base}/Observation",
        content=b"<x/>",
        headers={**headers, "Content-Type": "application/xml"},
    )
    assert text.status_code == 415


# --- consent across organizations, audit ---------------------------------------------------------


async def test_another_organization_reads_after_a_fhir_consent(
    network: Network, sites: dict[int, Site], chart: Chart
) -> None:
    home, other = sites[0].fhir(), sites[1].fhir()
    record = chart.observations[1]
    with pytest.raises(ForbiddenError) as caught:
        await other.get("Observation", record)
    assert "no consent" in str(caught.value)
    hidden = await other.resources("Observation").search(patient=chart.patient).fetch_raw()
    assert hidden["total"] == 0
    assert hidden["entry"][-1]["search"]["mode"] == "outcome"
    organization = network.configs[1].organization
    now = time.time()
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{chart.patient}"},
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
            ]
        },
        "provision": {
            "type": "permit",
            "period": {
                "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 3600)),
                "end": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 86400)),
            },
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "IRCP",
                            }
                        ]
                    },
                    "reference": {"reference": f"Organization/{organization}"},
                }
            ],
            "purpose": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}
            ],
            "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}],
        },
    }
    # A consent is the patient's: no SMART system client grants one, not even on the node that
    # holds the patient's keys.
    for client in (other, home):
        with pytest.raises(ForbiddenError) as caught:
            await client.resource("Consent", **consent).save()
        assert "signed by the patient or their delegate" in str(caught.value)
    # The patient grants it with their own keys (the SDK with their keystore).
    patient = patient_records(network, chart.patient)
    consent_id = patient.grant_consent(
        chart.patient,
        GranteeKind.ORGANIZATION,
        organization,
        (Purpose.TREATMENT,),
        int((now - 3600) * 1e9),
        int((now + 86400) * 1e9),
        ScopeKind.RESOURCE_TYPES,
        ("Observation",),
    )
    created = await home.get("Consent", consent_id)
    granted = valid(created)
    assert granted["status"] == "active"
    assert (
        granted["provision"]["actor"][0]["reference"]["reference"] == f"Organization/{organization}"
    )
    read = valid(await other.get("Observation", record))
    assert read["id"] == record
    shared = (
        await other.resources("Observation")
        .search(patient=chart.patient, code="2345-7")
        .fetch_all()
    )
    assert len(shared) == 3
    # The consent covers Observations only.
    with pytest.raises(ForbiddenError):
        await other.get("Condition", chart.condition)
    consents = await home.resources("Consent").search(patient=chart.patient).fetch_all()
    assert [c.id for c in consents] == [created.id]
    assert (await home.get("Consent", created.id))["status"] == "active"
    # The audit trail, proven against the validators' signed header.
    member = f"Device/{sites[1].ehr.member_id}"
    events = (
        await home.resources("AuditEvent").search(patient=chart.patient, agent=member).fetch_all()
    )
    outcomes = [e["outcome"] for e in events]
    assert "4" in outcomes and "0" in outcomes  # denied, then granted
    for event in events:
        valid(event)
    granted_reads = [e for e in events if e["outcome"] == "0" and e["action"] == "R"]
    assert any(
        ent["what"]["reference"].startswith(f"Observation/{record}")
        for e in granted_reads
        for ent in e["entity"]
    )
    recent = (
        await home.resources("AuditEvent")
        .search(patient=chart.patient, date="ge2020-01-01", subtype="consent.grant")
        .fetch_all()
    )
    assert len(recent) == 1 and recent[0]["action"] == "C"
    with pytest.raises(OperationOutcome):
        await home.resources("AuditEvent").search(agent=member).fetch()
    # Revoking through FHIR is refused as granting is; the patient revokes it, and that stops
    # the next read on a node as soon as the node has committed the revocation, cached or not.
    with pytest.raises(ForbiddenError):
        await home.resource("Consent", **{**granted, "status": "inactive"}).save()
    revoked = patient.revoke_consent(chart.patient, consent_id, "changed my mind")
    assert (await home.get("Consent", consent_id))["status"] == "inactive"
    assert revoked.height is not None
    # The patient's client saw it committed on node 0; node 1 may be a block behind.
    wait_until(
        lambda: (height_of(network.configs[1]) or 0) >= revoked.height,
        30,
        "node 1 to commit the revocation",
    )
    with pytest.raises(ForbiddenError) as caught:
        await other.get("Observation", record)
    assert "revoked" in str(caught.value)


# --- the node's own services ------------------------------------------------------------------


async def test_fhir_requests_read_the_nodes_own_state_without_its_rpc(
    network: Network, sites: dict[int, Site], chart: Chart
) -> None:
    """A transaction Bundle, a read and searches — on the author's node and on another
    organization's — answer from each node's committed state in-process: the only CometBFT RPC
    calls are the transactions sent to the mempool."""
    before = {node: services_counters(network.configs[node]) for node in (0, 1)}
    site = sites[0]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": lab(f"Patient/{chart.patient}", "2345-7", 99, "2026-07-01T08:00:00Z"),
                "request": {"method": "POST", "url": "Observation"},
            }
        ],
    }
    answer = httpx.post(
        site.base,
        json=bundle,
        headers={**site.headers(), "Content-Type": "application/fhir+json"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    written = answer.json()["entry"][0]["response"]["location"].split("/")[1]
    home = sites[0].fhir()
    assert (await home.get("Observation", written))["id"] == written
    found = await home.resources("Observation").search(patient=chart.patient).fetch_all()
    assert written in {o.id for o in found}
    await sites[1].fhir().resources("Condition").search(patient=chart.patient).fetch_raw()
    for node in (0, 1):
        assert_own_state_read_in_process(before[node], services_counters(network.configs[node]))
    sent = services_counters(network.configs[0]).get("rpc:broadcast_tx_sync", 0)
    assert sent > before[0].get("rpc:broadcast_tx_sync", 0)


async def test_a_search_commits_once_per_patient_and_its_disclosures_name_every_record(
    network: Network, sites: dict[int, Site]
) -> None:
    """The first search of a patient's records opens one session (one `access.session` on the
    patient's trail, not one access request per record); further searches and reads of that
    patient commit nothing; the accounting of disclosures lists each record the session
    covered."""
    site = sites[0]
    patient = generate_patient(9301)
    del patient["id"]
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": patient_url,
            "resource": patient,
            "request": {"method": "POST", "url": "Patient"},
        }
    ]
    for day in range(1, 7):
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": lab(patient_url, "2345-7", 90 + day, f"2026-02-0{day}T08:00:00Z"),
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    answer = httpx.post(
        site.base,
        json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
        headers={**site.headers(), "Content-Type": "application/fhir+json"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    ids = [e["response"]["location"].split("/")[1] for e in answer.json()["entry"]]
    patient_id, observations = ids[0], ids[1:]
    own = patient_records(network, patient_id)

    def access_entries() -> list[str]:
        return [
            e.entry.type
            for e in own.audit_trail(patient_id)
            if e.entry.type in ("access.request", "access.session")
        ]

    before = access_entries()
    client = site.fhir()
    found = await client.resources("Observation").search(patient=patient_id).fetch_all()
    assert sorted(o.id for o in found) == sorted(observations)
    assert access_entries() == [*before, "access.session"]
    again = (
        await client.resources("Observation")
        .search(patient=patient_id, code="2345-7", date="ge2026-02-03")
        .fetch_all()
    )
    assert len(again) == 4
    assert (await client.get("Observation", observations[0]))["id"] == observations[0]
    assert access_entries() == [*before, "access.session"]
    disclosed = {
        d.grant.record_id
        for d in own.disclosures(patient_id)
        if d.entry.entry.type == "access.session"
    }
    assert set(observations) <= disclosed
