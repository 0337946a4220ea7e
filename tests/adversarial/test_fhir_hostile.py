"""The FHIR gateway against hostile SMART clients, each acting through the real FHIR HTTP API
with a token of its own: an EHR client signing consents as the patient, searches that would
fan out into thousands of access requests, a create-only client fishing for a Patient with a
conditional create, export jobs hoarded in the node's memory, client assertions made for
another node, and bodies built to crash the parser. Threat model: docs/security.md.

The first tests run the gateway in process on a committed in-process chain (its ledger RPC
unreachable, which these refusals never need); those marked e2e run against a real
4-validator network, whose chain and audit trail show that a refusal committed nothing."""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import Consortium
from cryptography.hazmat.primitives.asymmetric import ed25519

from medledger.client.records import RecordsClient
from medledger.crypto.keys import KeyPair
from medledger.fhir.context import FHIR_CONTEXT, FhirContext
from medledger.fhir.routes import (
    add_fhir_routes,
)
from medledger.fhir.smart import TokenService
from medledger.ledger.clients import RegisterClient
from medledger.ledger.consent import GranteeKind, Purpose, ScopeKind
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.samples.fhir import generate_patient
from medledger.services.custody import Custody
from medledger.services.mpi import PatientIndex
from medledger.store.node_audit import NodeAuditLog

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_network import Network, running_network

LISTEN = "http://127.0.0.1:9"  # where each node reaches its own API; nothing listens there
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FHIR_JSON = "application/fhir+json"
LOINC = "http://loinc.org"
MRN = "urn:oid:2.16.840.1.113883.19.5"


def public_jwk(key: ed25519.Ed25519PrivateKey) -> str:
    return str(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))


def assertion(key: ed25519.Ed25519PrivateKey, client_id: str, audience: str) -> str:
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "exp": int(time.time()) + 120,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, key, algorithm="EdDSA")


def token_form(key: ed25519.Ed25519PrivateKey, client_id: str, audience: str, scope: str) -> Any:
    return {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion(key, client_id, audience),
    }


def outcome_of(text: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(text)
    assert body["resourceType"] == "OperationOutcome", text
    return body


# --- in process: nodes on one committed chain ----------------------------------------------


@dataclass
class Gateway:
    """One node's FHIR API (a real gateway over the in-process chain's committed state)."""

    context: FhirContext
    client: TestClient[web.Request, web.Application]
    public_url: str

    @property
    def token_url(self) -> str:
        return f"{self.public_url}/fhir/auth/token"


class Nodes:
    """Two nodes of St. Mary's that listen on the same address behind two public URLs, and an
    EHR client registered with `system/*.cruds`."""

    def __init__(self, consortium: Consortium, tmp_path: Path) -> None:
        self.consortium = consortium
        self.tmp_path = tmp_path
        self.audit = NodeAuditLog(tmp_path / "audit.db")
        self.custody = Custody(tmp_path / "custody", "pw", fast_kdf=True)
        self.patients = PatientIndex(tmp_path / "patients.db")
        ehr = self.custody.create("ehr")
        admin = consortium.admin("st-mary")
        body = EnrollMember(ehr.verify_key, ehr.encryption_key, Role.EHR)
        assert consortium.submit(admin, "member.enroll", body).ok
        self.key = ed25519.Ed25519PrivateKey.generate()
        register = RegisterClient("ehr", ehr.member_id, public_jwk(self.key), ("system/*.cruds",))
        assert consortium.submit(admin, "client.register", register).ok
        self.ehr = ehr

    def context(self, public_url: str, **settings: Any) -> FhirContext:
        return FhirContext(
            rpc_url=LISTEN,
            chain_id="medledger-test",
            api_url=LISTEN,
            organization="st-mary",
            custody=self.custody,
            patients=self.patients,
            tokens=TokenService(
                self.consortium.chain.store, f"{public_url}/fhir/auth/token", self.audit
            ),
            audit=self.audit,
            public_url=public_url,
            **settings,
        )

    async def token(self, gateway: Gateway, scope: str = "system/*.cruds") -> dict[str, str]:
        form = token_form(self.key, "ehr", gateway.token_url, scope)
        answer = await gateway.client.post("/fhir/auth/token", data=form)
        assert answer.status == 200, await answer.text()
        return {"Authorization": f"Bearer {(await answer.json())['access_token']}"}


@pytest.fixture
async def nodes(consortium: Consortium, tmp_path: Path) -> AsyncIterator[Nodes]:
    setup = Nodes(consortium, tmp_path)
    yield setup
    setup.patients.close()
    setup.audit.close()


@pytest.fixture
async def gateways(nodes: Nodes) -> AsyncIterator[tuple[Gateway, Gateway]]:
    started: list[Gateway] = []
    for public in ("https://fhir.st-mary.example", "https://fhir2.st-mary.example"):
        app = web.Application()
        app[FHIR_CONTEXT] = nodes.context(public)
        add_fhir_routes(app)
        client: TestClient[web.Request, web.Application] = TestClient(TestServer(app))
        await client.start_server()
        started.append(Gateway(app[FHIR_CONTEXT], client, public))
    yield started[0], started[1]
    for gateway in started:
        await gateway.client.close()


async def test_a_client_assertion_made_for_another_node_is_refused(
    nodes: Nodes, gateways: tuple[Gateway, Gateway]
) -> None:
    """Both nodes listen on the same address (127.0.0.1:9, as behind their proxies): an
    assertion whose aud is node B's token endpoint does not buy a token at node A."""
    node_a, node_b = gateways
    form = token_form(nodes.key, "ehr", node_b.token_url, "system/*.cruds")
    refused = await node_a.client.post("/fhir/auth/token", data=form)
    body = await refused.json()
    assert refused.status == 401, body
    assert body["error"] == "invalid_client"
    assert node_a.token_url in body["error_description"]
    # The same client, for node A's own public endpoint, gets its token.
    granted = await node_a.client.post(
        "/fhir/auth/token", data=token_form(nodes.key, "ehr", node_a.token_url, "system/*.rs")
    )
    assert granted.status == 200
    # What node A hands out names its public URL, not the address it listens on.
    smart = await (await node_a.client.get("/fhir/.well-known/smart-configuration")).json()
    assert smart["token_endpoint"] == "https://fhir.st-mary.example/fhir/auth/token"
    statement = json.loads(await (await node_a.client.get("/fhir/metadata")).text())
    assert statement["implementation"]["url"] == "https://fhir.st-mary.example/fhir"
    assert LISTEN not in json.dumps(statement)
    # A node whose token service would check assertions against its listen address while it
    # is reached at a public URL does not start.
    miswired = nodes.context("https://fhir3.st-mary.example")
    miswired.tokens = TokenService(
        nodes.consortium.chain.store, f"{LISTEN}/fhir/auth/token", nodes.audit
    )
    app = web.Application()
    app[FHIR_CONTEXT] = miswired
    with pytest.raises(ValueError, match="public URL"):
        add_fhir_routes(app)


async def test_hostile_bodies_get_an_operation_outcome_never_a_crash(
    nodes: Nodes, gateways: tuple[Gateway, Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    node, _ = gateways
    headers = {**(await nodes.token(node)), "Content-Type": FHIR_JSON}
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/fhir/Observation", "/fhir", "/fhir/Patient"):
        answer = await node.client.post(path, data=deep, headers=headers)
        text = await answer.text()
        assert answer.status == 400, text
        assert "levels deep" in outcome_of(text)["issue"][0]["diagnostics"]
    # Nested just past the bound, within what the parser takes.
    nested: Any = {"resourceType": "Observation", "status": "final"}
    for _ in range(70):
        nested = {"extension": [nested]}
    answer = await node.client.post("/fhir/Observation", data=json.dumps(nested), headers=headers)
    assert answer.status == 400
    # Larger than any body the API takes (16 MiB).
    huge = b'{"resourceType": "Binary", "data": "' + b"A" * (17 * 1024 * 1024) + b'"}'
    answer = await node.client.post("/fhir/Observation", data=huge, headers=headers)
    text = await answer.text()
    assert answer.status == 413, text
    assert outcome_of(text)["issue"][0]["code"] == "too-costly"
    # Fields of the wrong JSON type where the gateway expects strings.
    for entry in (
        {
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": 5},
            "resource": {"resourceType": "Patient"},
        },
        {
            "request": {"method": "POST", "url": "Observation"},
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "glucose"},
                "subject": {"identifier": {"system": MRN, "value": ["Maria", "Garcia"]}},
            },
        },
    ):
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
        answer = await node.client.post("/fhir", data=json.dumps(bundle), headers=headers)
        text = await answer.text()
        assert answer.status == 400, text
        outcome_of(text)
    first_not_an_object = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": "x"}]}
    answer = await node.client.post("/fhir", data=json.dumps(first_not_an_object), headers=headers)
    assert answer.status == 200  # the batch answers, the entry is refused on its own
    (result,) = (await answer.json())["entry"]
    assert result["response"]["status"].startswith("400")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_internal_failure_is_a_500_that_tells_nothing(
    nodes: Nodes, gateways: tuple[Gateway, Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    """The node's patient index fails under a search by identifier (its database is gone):
    the client gets a bare 500 OperationOutcome; the log says what failed and where, but
    quotes neither the request nor the exception (whose text may carry PHI)."""
    node, _ = gateways
    headers = await nodes.token(node)
    nodes.patients.close()
    caplog.set_level(logging.INFO)
    name = "Maria-Garcia-1961-03-14"
    answer = await node.client.get(
        "/fhir/Observation", params={"patient:identifier": f"{MRN}|{name}"}, headers=headers
    )
    text = await answer.text()
    assert answer.status == 500, text
    body = outcome_of(text)
    assert body["issue"][0]["code"] == "exception"
    for leaked in (name, "Traceback", "sqlite", "closed", "gateway.py"):
        assert leaked not in text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors, "the failure is logged"
    for record in errors:
        assert record.exc_info is None  # no traceback, which would quote the exception
        assert name not in record.getMessage()
        assert "ProgrammingError" in record.getMessage()


async def test_consent_writes_by_a_system_client_are_refused_before_anything_is_signed(
    nodes: Nodes, gateways: tuple[Gateway, Gateway]
) -> None:
    """Every way of writing a Consent: create, update, delete, a batch entry and a transaction
    entry, for a patient whose keys this node holds. The refusal comes before the gateway
    touches the ledger (which is unreachable here: anything else would be a 503)."""
    node, _ = gateways
    patient = nodes.custody.create("patient-maria")
    admin = nodes.consortium.admin("st-mary")
    body = EnrollMember(patient.verify_key, patient.encryption_key, Role.PATIENT)
    assert nodes.consortium.submit(admin, "member.enroll", body).ok
    headers = {**(await nodes.token(node)), "Content-Type": FHIR_JSON}
    consent = consent_resource(patient.member_id, "riverside")
    answers = [
        await node.client.post("/fhir/Consent", data=json.dumps(consent), headers=headers),
        await node.client.put(
            "/fhir/Consent/c1",
            data=json.dumps({**consent, "id": "c1", "status": "inactive"}),
            headers=headers,
        ),
        await node.client.delete("/fhir/Consent/c1", headers=headers),
    ]
    for answer in answers:
        text = await answer.text()
        assert answer.status == 403, text
        assert "signed by the patient or their delegate" in text
    entry = {"request": {"method": "POST", "url": "Consent"}, "resource": consent}
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    answer = await node.client.post("/fhir", data=json.dumps(transaction), headers=headers)
    assert answer.status == 403
    assert "signed by the patient or their delegate" in await answer.text()
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [entry]}
    answer = await node.client.post("/fhir", data=json.dumps(batch), headers=headers)
    (result,) = (await answer.json())["entry"]
    assert result["response"]["status"].startswith("403")
    assert "signed by the patient" in json.dumps(result["response"]["outcome"])
    refused = [e for e in nodes.audit.entries("fhir.request") if e["target"].startswith("Consent")]
    assert {e["target"] for e in refused} == {"Consent.c", "Consent.u", "Consent.d"}


def consent_resource(patient: str, organization: str) -> dict[str, Any]:
    now = time.time()
    return {
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
        "patient": {"reference": f"Patient/{patient}"},
        "provision": {
            "type": "permit",
            "period": {
                "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60)),
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
        },
    }


# --- a real network: what a refusal did not commit -------------------------------------------

BASE_PORT = 31500
OBSERVATIONS = (("2345-7", 30), ("2093-3", 175))  # (LOINC code, how many) for patients 1, 2


@dataclass
class Site:
    """Node 0's EHR member (held in custody) and its SMART clients; two patients of it with
    30 and 175 lab results: 205 Observations in all."""

    network: Network
    base: str
    token_url: str
    ehr: KeyPair
    keys: dict[str, ed25519.Ed25519PrivateKey]
    patients: list[str]
    names: list[str]

    def headers(self, client_id: str, scope: str) -> dict[str, str]:
        form = token_form(self.keys[client_id], client_id, self.token_url, scope)
        answer = httpx.post(self.token_url, data=form, timeout=30)
        assert answer.status_code == 200, answer.text
        return {"Authorization": f"Bearer {answer.json()['access_token']}", "Accept": FHIR_JSON}

    def patient(self, index: int) -> RecordsClient:
        """Patient `index` acting with their own keys (node 0 holds them in custody)."""
        cfg = self.network.configs[0]
        passphrase = (cfg.home / "keys" / "node.passphrase").read_text().strip()
        member = self.patients[index]
        keys = Custody(cfg.home / "custody", passphrase).keys_for(member)
        return RecordsClient(self.network.client(0), cfg.api_url, keys, member)

    def access_requests(self, index: int) -> int:
        """Access decisions (requests and sessions) committed on patient `index`'s trail, as
        the ledger proves it."""
        trail = self.patient(index).verified_audit_trail(self.patients[index])
        return sum(1 for e in trail.entries if e.entry.type in ("access.request", "access.session"))


def observation(patient: str, code: str, day: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": patient},
        "effectiveDateTime": f"2026-01-{1 + day % 28:02d}T08:00:00Z",
        "valueQuantity": {"value": 90 + day, "unit": "mg/dL"},
    }


def post_bundle(site: Site, headers: dict[str, str], entries: list[dict[str, Any]]) -> Any:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    answer = httpx.post(
        site.base, json=bundle, headers={**headers, "Content-Type": FHIR_JSON}, timeout=300
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with running_network(tmp_path_factory.mktemp("fhir-hostile") / "net", BASE_PORT) as network:
        cfg = network.configs[0]
        passphrase = (cfg.home / "keys" / "node.passphrase").read_text().strip()
        ehr = Custody(cfg.home / "custody", passphrase, fast_kdf=True).create("ehr-0")
        ledger = network.client(0)
        admin = network.admins[0]
        ledger.submit(
            admin, "member.enroll", EnrollMember(ehr.verify_key, ehr.encryption_key, Role.EHR)
        )
        keys = {}
        for client_id, scope in (
            ("ehr-0", "system/*.cruds"),
            ("registrar-0", "system/Patient.c"),
            ("exporter-0", "system/*.rs"),
        ):
            keys[client_id] = ed25519.Ed25519PrivateKey.generate()
            body = RegisterClient(client_id, ehr.member_id, public_jwk(keys[client_id]), (scope,))
            ledger.submit(admin, "client.register", body)
        base = f"{cfg.api_url}/fhir"
        site = Site(network, base, f"{base}/auth/token", ehr, keys, [], [])
        headers = site.headers("ehr-0", "system/*.cruds")
        for number, (code, count) in enumerate(OBSERVATIONS, start=1):
            patient = generate_patient(100 + number)
            del patient["id"]
            patient["identifier"] = [{"system": MRN, "value": f"hostile-{number}"}]
            url = f"urn:uuid:{uuid.uuid4()}"
            entries = [{"fullUrl": url, "resource": patient, "request": {"method": "POST"}}]
            entries[0]["request"]["url"] = "Patient"
            answer = post_bundle(
                site,
                headers,
                entries
                + [
                    {"resource": observation(url, code, d), "request": _post("Observation")}
                    for d in range(min(count, 99))
                ],
            )
            member = answer["entry"][0]["fullUrl"].rsplit("/", 1)[1]
            for start in range(99, count, 99):
                post_bundle(
                    site,
                    headers,
                    [
                        {
                            "resource": observation(f"Patient/{member}", code, d),
                            "request": _post("Observation"),
                        }
                        for d in range(start, min(count, start + 99))
                    ],
                )
            site.patients.append(member)
            site.names.append(patient["name"][0]["family"])
        yield site


def _post(resource_type: str) -> dict[str, str]:
    return {"method": "POST", "url": resource_type}


@pytest.mark.e2e
def test_a_search_that_would_fan_out_is_refused_before_any_access_request(site: Site) -> None:
    headers = site.headers("ehr-0", "system/*.cruds")
    before = [site.access_requests(0), site.access_requests(1)]
    # Across every patient of the organization: 205 candidate records.
    wide = httpx.get(f"{site.base}/Observation", params={"_count": "5"}, headers=headers)
    assert wide.status_code == 422, wide.text
    (problem,) = outcome_of(wide.text)["issue"]
    assert problem["code"] == "too-costly"
    assert "narrow it by patient" in problem["diagnostics"]
    assert [site.access_requests(0), site.access_requests(1)] == before
    # One patient, with a content criterion: all 175 results are decrypted, through one
    # session (one access decision on the patient's trail), not one request per record.
    deep = httpx.get(
        f"{site.base}/Observation",
        params={"patient": site.patients[1], "code": f"{LOINC}|2093-3"},
        headers=headers,
        timeout=120,
    )
    assert deep.status_code == 200, deep.text
    assert deep.json()["total"] == 175
    assert site.access_requests(1) == before[1] + 1
    narrow = httpx.get(
        f"{site.base}/Observation",
        params={"patient": site.patients[0], "code": f"{LOINC}|2345-7"},
        headers=headers,
        timeout=120,
    )
    assert narrow.status_code == 200, narrow.text
    assert narrow.json()["total"] == 30
    assert site.access_requests(0) == before[0] + 1


@pytest.mark.e2e
def test_a_create_only_client_learns_nothing_of_an_existing_patient(site: Site) -> None:
    headers = site.headers("registrar-0", "system/Patient.c")
    before = site.access_requests(0)
    patient = generate_patient(999)
    del patient["id"]
    patient["identifier"] = [{"system": MRN, "value": "hostile-1"}]
    answer = httpx.post(
        f"{site.base}/Patient",
        json=patient,
        headers={
            **headers,
            "Content-Type": FHIR_JSON,
            "If-None-Exist": f"identifier={MRN}|hostile-1",
        },
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["Location"].endswith(f"/Patient/{site.patients[0]}/_history/1")
    body = outcome_of(answer.text)
    assert "nothing was created" in body["issue"][0]["diagnostics"]
    assert site.names[0] not in answer.text and "birthDate" not in answer.text
    assert site.access_requests(0) == before  # nothing was read


@pytest.mark.e2e
def test_export_jobs_are_capped_per_client_and_dropped_once_collected(site: Site) -> None:
    headers = site.headers("exporter-0", "system/*.rs")
    kickoff = f"{site.base}/Patient/{site.patients[0]}/$export?_type=Observation"
    asynchronous = {**headers, "Prefer": "respond-async"}
    jobs = []
    for _ in range(2):
        started = httpx.get(kickoff, headers=asynchronous, timeout=60)
        assert started.status_code == 202, started.text
        jobs.append(started.headers["Content-Location"])
    hoarded = httpx.get(kickoff, headers=asynchronous, timeout=60)
    assert hoarded.status_code == 429, hoarded.text
    (problem,) = outcome_of(hoarded.text)["issue"]
    assert problem["code"] == "throttled" and "unfinished export" in problem["diagnostics"]
    # The first job finishes; its file is served once, then dropped from memory.
    deadline = time.monotonic() + 120
    while (status := httpx.get(jobs[0], headers=headers, timeout=30)).status_code == 202:
        assert time.monotonic() < deadline, "the export did not finish"
        time.sleep(0.5)
    assert status.status_code == 200, status.text
    (output,) = status.json()["output"]
    first = httpx.get(output["url"], headers=headers, timeout=60)
    assert first.status_code == 200 and len(first.text.splitlines()) == 30
    again = httpx.get(output["url"], headers=headers, timeout=60)
    assert again.status_code == 410 and "downloaded already" in again.text
    assert site.names[0] not in again.text
    # DELETE drops the second job and whatever it holds at once.
    deleted = httpx.delete(jobs[1], headers=headers, timeout=30)
    assert deleted.status_code == 202
    assert httpx.get(jobs[1], headers=headers, timeout=30).status_code == 404
    # Nothing is left unfinished: the client may export again.
    later = httpx.get(kickoff, headers=asynchronous, timeout=60)
    assert later.status_code == 202, later.text
    assert httpx.delete(later.headers["Content-Location"], headers=headers).status_code == 202


@pytest.mark.e2e
def test_an_ehr_client_cannot_sign_a_consent_for_a_patient_whose_keys_the_node_holds(
    site: Site,
) -> None:
    headers = {**site.headers("ehr-0", "system/*.cruds"), "Content-Type": FHIR_JSON}
    patient = site.patient(1)
    member = site.patients[1]
    assert patient.consents(member) == []
    consent = consent_resource(member, site.network.configs[1].organization)
    answer = httpx.post(f"{site.base}/Consent", json=consent, headers=headers, timeout=60)
    assert answer.status_code == 403, answer.text
    (problem,) = outcome_of(answer.text)["issue"]
    assert "signed by the patient or their delegate" in problem["diagnostics"]
    assert patient.consents(member) == []
    # The patient grants it with their own keys; the EHR may not revoke it for them either.
    now = time.time_ns()
    consent_id = patient.grant_consent(
        member,
        GranteeKind.ORGANIZATION,
        site.network.configs[1].organization,
        (Purpose.TREATMENT,),
        now - 60 * 10**9,
        now + 86_400 * 10**9,
        ScopeKind.ALL,
    )
    shown = httpx.get(f"{site.base}/Consent/{consent_id}", headers=headers, timeout=60)
    assert shown.status_code == 200 and shown.json()["status"] == "active"
    revoke = {**shown.json(), "status": "inactive"}
    answer = httpx.put(
        f"{site.base}/Consent/{consent_id}", json=revoke, headers=headers, timeout=60
    )
    assert answer.status_code == 403, answer.text
    (still,) = patient.consents(member)
    assert still.id == consent_id and still.revoked_height == 0
