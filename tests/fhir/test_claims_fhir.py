"""Claims through the FHIR API on a real 4-validator network: the hospital's billing office
submits two claims with the SDK and the insurer (CarePlus, node 4) adjudicates one partially
and pays it; SMART clients of the hospital and of the insurer then read the Claim, its
ClaimResponse and the ExplanationOfBenefit and search them, each through the ledger's own
access rules (the hospital's EHR reads the Claim it authored, the insurer's EHR its decision and,
once the patient consents, the Claim); a client of an unrelated clinic sees nothing; the
hospital's EHR client submits a claim, the insurer's cannot; every resource validates against
the R4(B) models."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from medledger.client.claims import ClaimsClient
from medledger.client.records import RecordsClient
from medledger.client.sdk import QueryError
from medledger.crypto.keys import KeyPair
from medledger.ledger.claims import CPT_SYSTEM, Claim, ItemDecision
from medledger.ledger.clients import RegisterClient
from medledger.ledger.consent import GranteeKind, Purpose, ScopeKind
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.services.custody import Custody
from medledger.validation import validate_resource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_network import Network, running_network, wait_until

pytestmark = pytest.mark.e2e

BASE_PORT = 30600
SECOND_NS = 1_000_000_000
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLAIM_SCOPES = ("system/Claim.crs", "system/ClaimResponse.rs", "system/ExplanationOfBenefit.rs")
SERVED = (datetime.now(UTC) - timedelta(days=3)).strftime("%Y-%m-%d")
VISIT = [
    ("99214", "Office visit, established patient, moderate complexity", 150.0),
    ("83036", "Hemoglobin A1c", 45.5),
    ("36415", "Routine venipuncture", 10.0),
]
ECG = [("93000", "Electrocardiogram with interpretation and report", 60.0)]
PAID_CLAIM = "claim-fhir-1"
OPEN_CLAIM = "claim-fhir-2"


def claim_resource(
    patient: str, provider: str, insurer: str, lines: list[tuple[str, str, float]]
) -> dict[str, Any]:
    return {
        "resourceType": "Claim",
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
        "patient": {"reference": f"Patient/{patient}"},
        "billablePeriod": {"start": SERVED, "end": SERVED},
        "created": f"{SERVED}T17:00:00Z",
        "provider": {"reference": f"Organization/{provider}"},
        "insurer": {"reference": f"Organization/{insurer}"},
        "priority": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/processpriority",
                    "code": "normal",
                }
            ]
        },
        "diagnosis": [
            {
                "sequence": 1,
                "diagnosisCodeableConcept": {
                    "coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9"}]
                },
            }
        ],
        "insurance": [
            {"sequence": 1, "focal": True, "coverage": {"reference": "Coverage/cov-7781"}}
        ],
        "item": [
            {
                "sequence": n,
                "diagnosisSequence": [1],
                "productOrService": {
                    "coding": [{"system": CPT_SYSTEM, "code": code, "display": display}]
                },
                "servicedDate": SERVED,
                "quantity": {"value": 1},
                "net": {"value": amount, "currency": "USD"},
            }
            for n, (code, display, amount) in enumerate(lines, start=1)
        ],
        "total": {"value": sum(a for _, _, a in lines), "currency": "USD"},
    }


# --- SMART clients ---------------------------------------------------------------------------


@dataclass
class Site:
    """An EHR member held in custody by one node, and its SMART clients."""

    node: int
    base: str
    keys: dict[str, ed25519.Ed25519PrivateKey]

    def token(self, client_id: str, scope: str) -> str:
        now = int(time.time())
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": f"{self.base}/auth/token",
            "exp": now + 240,
            "jti": str(uuid.uuid4()),
        }
        form = {
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": jwt.encode(claims, self.keys[client_id], algorithm="EdDSA"),
        }
        answer = httpx.post(f"{self.base}/auth/token", data=form, timeout=10)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["access_token"])

    def fhir(self, client_id: str = "", scope: str = " ".join(CLAIM_SCOPES)) -> Fhir:
        return Fhir(self.base, self.token(client_id or f"claims-{self.node}", scope))


@dataclass
class Fhir:
    base: str
    token: str

    def get(self, path: str, **params: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/fhir+json"}
        return httpx.get(f"{self.base}/{path}", params=params, headers=headers, timeout=60)

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/fhir+json",
        }
        return httpx.post(f"{self.base}/{path}", json=body, headers=headers, timeout=60)

    def ok(self, path: str, **params: str) -> dict[str, Any]:
        answer = self.get(path, **params)
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"].startswith("application/fhir+json")
        body: dict[str, Any] = answer.json()
        validate_resource(body)
        for entry in body.get("entry", []):
            validate_resource(entry["resource"])
        return body


def refused(answer: httpx.Response, status: int, text: str = "") -> str:
    assert answer.status_code == status, answer.text
    outcome = answer.json()
    validate_resource(outcome)
    assert outcome["resourceType"] == "OperationOutcome"
    diagnostics = " ".join(i.get("diagnostics", "") for i in outcome["issue"])
    assert text in diagnostics, diagnostics
    return diagnostics


def make_site(network: Network, node: int, clients: dict[str, tuple[str, ...]]) -> Site:
    cfg = network.configs[node]
    passphrase = (cfg.home / "keys" / "node.passphrase").read_text().strip()
    ehr = Custody(cfg.home / "custody", passphrase, fast_kdf=True).create(f"ehr-claims-{node}")
    ledger = network.client(node)
    admin = network.admins[node]
    ledger.submit(
        admin, "member.enroll", EnrollMember(ehr.verify_key, ehr.encryption_key, Role.EHR)
    )
    keys = {}
    for client_id, scopes in clients.items():
        keys[client_id] = ed25519.Ed25519PrivateKey.generate()
        jwk = str(jwt.algorithms.OKPAlgorithm.to_jwk(keys[client_id].public_key()))
        ledger.submit(
            admin, "client.register", RegisterClient(client_id, ehr.member_id, jwk, scopes)
        )
    return Site(node, f"{cfg.api_url}/fhir", keys)


# --- the scenario ----------------------------------------------------------------------------


@dataclass
class Scene:
    network: Network
    hospital: str
    insurer: str
    patient: KeyPair
    records: RecordsClient
    response_id: str
    sites: dict[int, Site]


def _enroll(network: Network, node: int, role: Role) -> KeyPair:
    keys = KeyPair.generate()
    body = EnrollMember(keys.verify_key, keys.encryption_key, role)
    network.client(node).submit(network.admins[node], "member.enroll", body)
    return keys


def _seen(client: ClaimsClient, claim_id: str, steps: int) -> Claim:
    def look() -> Claim | None:
        try:
            found = client.show(claim_id)
        except QueryError:
            return None
        return found if len(found.history) >= steps else None

    claim: Claim = wait_until(look, 30, f"claim {claim_id} at {steps} steps")
    return claim


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with running_network(tmp_path_factory.mktemp("claims-fhir") / "net", BASE_PORT) as net:
        yield net


@pytest.fixture(scope="module")
def scene(network: Network) -> Iterator[Scene]:
    hospital = network.configs[0].organization
    insurer = network.configs[3].organization
    patient = _enroll(network, 0, Role.PATIENT)
    billing_keys = _enroll(network, 0, Role.BILLING)
    examiner_keys = _enroll(network, 3, Role.BILLING)
    clients = [
        RecordsClient(network.client(0), network.configs[0].api_url, patient),
        RecordsClient(network.client(0), network.configs[0].api_url, billing_keys),
        RecordsClient(network.client(3), network.configs[3].api_url, examiner_keys),
    ]
    records, billing, examiner = clients[0], ClaimsClient(clients[1]), ClaimsClient(clients[2])
    pid = patient.member_id
    billing.submit(claim_resource(pid, hospital, insurer, VISIT), claim_id=PAID_CLAIM)
    billing.submit(claim_resource(pid, hospital, insurer, ECG), claim_id=OPEN_CLAIM)
    _seen(examiner, PAID_CLAIM, 1)
    partial = (
        ItemDecision(1, 12_000, ("45",)),
        ItemDecision(2, 4_550),
        ItemDecision(3, 0, ("97",)),
    )
    decided = examiner.adjudicate(PAID_CLAIM, partial)
    examiner.pay(PAID_CLAIM, "eft-fhir-0001")
    sites = {
        0: make_site(network, 0, {"claims-0": CLAIM_SCOPES, "reader-0": ("system/Patient.r",)}),
        1: make_site(network, 1, {"claims-1": CLAIM_SCOPES}),
        3: make_site(network, 3, {"claims-3": CLAIM_SCOPES}),
    }
    _seen(ClaimsClient(records), PAID_CLAIM, 3)
    yield Scene(network, hospital, insurer, patient, records, decided.record_id, sites)
    for client in clients:
        client.close()


def _adjudication(item: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for entry in item["adjudication"]:
        code = entry["category"]["coding"][0]["code"]
        found[code] = entry["amount"]["value"] if "amount" in entry else entry["reason"]
    return found


# --- tests -----------------------------------------------------------------------------------


def test_the_capability_statement_lists_the_claim_types(scene: Scene) -> None:
    statement = httpx.get(f"{scene.sites[0].base}/metadata", timeout=10).json()
    validate_resource(statement)
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    created = {"Claim", "ExplanationOfBenefit"}  # submitted; imported with the payer's decision
    for name in ("Claim", "ClaimResponse", "ExplanationOfBenefit"):
        expected = {"read", "search-type"} | ({"create"} if name in created else set())
        assert {i["code"] for i in resources[name]["interaction"]} == expected
        assert "patient" in {p["name"] for p in resources[name]["searchParam"]}


def test_the_provider_reads_its_claims_and_their_explanation_of_benefit(scene: Scene) -> None:
    pid = scene.patient.member_id
    fhir = scene.sites[0].fhir()

    answer = fhir.get(f"Claim/{PAID_CLAIM}")
    assert answer.status_code == 200, answer.text
    assert answer.headers["ETag"] == 'W/"1"'
    claim = answer.json()
    validate_resource(claim)
    assert claim["id"] == PAID_CLAIM and claim["patient"] == {"reference": f"Patient/{pid}"}
    assert [i["productOrService"]["coding"][0]["code"] for i in claim["item"]] == [
        "99214",
        "83036",
        "36415",
    ]
    tags = {t["system"]: t["code"] for t in claim["meta"]["tag"]}
    assert tags["urn:medledger:claim-status"] == "paid"

    # Search by patient, by FHIR and by ledger status, with paging.
    found = fhir.ok("Claim", patient=f"Patient/{pid}")
    assert found["type"] == "searchset" and found["total"] == 2
    assert {e["resource"]["id"] for e in found["entry"]} == {PAID_CLAIM, OPEN_CLAIM}
    assert fhir.ok("Claim", patient=pid, status="active")["total"] == 2
    paid = fhir.ok("Claim", patient=pid, status="urn:medledger:claim-status|paid")
    assert [e["resource"]["id"] for e in paid["entry"]] == [PAID_CLAIM]
    assert fhir.ok("Claim", patient=pid, status="cancelled")["total"] == 0
    first = fhir.ok("Claim", _count="1")  # the hospital's own claims
    assert first["total"] >= 2 and len(first["entry"]) == 1
    assert any(link["relation"] == "next" for link in first["link"])

    # The ExplanationOfBenefit: on-chain amounts and history, the Claim's clinical context.
    eob = fhir.ok(f"ExplanationOfBenefit/{PAID_CLAIM}")
    assert eob["outcome"] == "complete" and eob["insurer"]["reference"].endswith(scene.insurer)
    assert eob["insurance"][0]["coverage"] == {"reference": "Coverage/cov-7781"}
    assert eob["diagnosis"][0]["diagnosisCodeableConcept"]["coding"][0]["code"] == "E11.9"
    visit, a1c, draw = (_adjudication(i) for i in eob["item"])
    assert visit["submitted"] == 150 and visit["eligible"] == 120 and visit["benefit"] == 120
    assert visit["adjustmentreason"]["coding"][0]["code"] == "45"
    assert a1c["benefit"] == 45.5 and draw["benefit"] == 0
    assert eob["payment"]["amount"] == {"value": 165.5, "currency": "USD"}
    assert eob["payment"]["identifier"]["value"] == "eft-fhir-0001"
    notes = [n["text"] for n in eob["processNote"]]
    assert len(notes) == 3 and "submitted" in notes[0] and "partial" in notes[1]
    assert "paid" in notes[2] and "block" in notes[2]

    # The hospital's EHR is no claims examiner: the ledger refuses it the insurer's decision,
    # and a search counts the decision it leaves out.
    refused(fhir.get(f"ClaimResponse/{scene.response_id}"), 403, "denied")
    left_out = fhir.ok("ClaimResponse", request=f"Claim/{PAID_CLAIM}")
    assert left_out["total"] == 0
    (note,) = [e["resource"] for e in left_out["entry"] if e["search"]["mode"] == "outcome"]
    assert "1 matching record(s) left out" in note["issue"][0]["diagnostics"]

    # The hospital's EHR submits a claim (for another patient, to leave the counts here as
    # they are); the insurer's EHR may not submit one, being no provider.
    other = _enroll(scene.network, 0, Role.PATIENT).member_id
    submitted = fhir.post("Claim", claim_resource(other, scene.hospital, scene.insurer, ECG))
    assert submitted.status_code == 201, submitted.text
    assert submitted.json()["meta"]["tag"][0]["code"] == "submitted"
    resource = claim_resource(other, scene.insurer, scene.insurer, ECG)
    refused(scene.sites[3].fhir().post("Claim", resource), 403)


def test_the_insurer_reads_its_decisions_and_the_claim_once_the_patient_consents(
    scene: Scene,
) -> None:
    pid = scene.patient.member_id
    fhir = scene.sites[3].fhir()

    response = fhir.ok(f"ClaimResponse/{scene.response_id}")
    assert response["id"] == scene.response_id
    assert response["request"] == {"reference": f"Claim/{PAID_CLAIM}"}
    assert response["disposition"] == "Claim partially approved"
    decision = {t["system"]: t["code"] for t in response["meta"]["tag"]}
    assert decision["urn:medledger:claim-decision"] == "current"
    by_claim = fhir.ok("ClaimResponse", request=f"Claim/{PAID_CLAIM}")
    assert [e["resource"]["id"] for e in by_claim["entry"]] == [scene.response_id]
    assert fhir.ok("ClaimResponse", patient=f"Patient/{pid}")["total"] == 1

    # The Claim was written by the hospital: without the patient's consent the ledger says no,
    # and the EOB is built from the ledger and the insurer's own decision alone.
    refused(fhir.get(f"Claim/{PAID_CLAIM}"), 403, "no active consent")
    eobs = fhir.ok("ExplanationOfBenefit", patient=pid)
    assert eobs["total"] == 2
    by_id = {e["resource"]["id"]: e["resource"] for e in eobs["entry"]}
    assert by_id[OPEN_CLAIM]["outcome"] == "queued" and "payment" not in by_id[OPEN_CLAIM]
    assert by_id[PAID_CLAIM]["type"]["coding"][0]["code"] == "professional"
    assert "diagnosis" not in by_id[PAID_CLAIM]
    only_open = fhir.ok("ExplanationOfBenefit", patient=pid, status="submitted")
    assert [e["resource"]["id"] for e in only_open["entry"]] == [OPEN_CLAIM]

    now = time.time_ns()
    scene.records.grant_consent(
        pid,
        GranteeKind.ORGANIZATION,
        scene.insurer,
        (Purpose.PAYMENT,),
        now - 3600 * SECOND_NS,
        now + 86_400 * SECOND_NS,
        ScopeKind.CATEGORIES,
        ("claim",),
    )

    def read() -> httpx.Response | None:
        answer = fhir.get(f"Claim/{PAID_CLAIM}")
        return answer if answer.status_code == 200 else None

    claim = wait_until(read, 30, "the insurer's read under the patient's consent", 1.0).json()
    validate_resource(claim)
    assert claim["diagnosis"][0]["sequence"] == 1
    eob = fhir.ok(f"ExplanationOfBenefit/{PAID_CLAIM}")
    assert eob["diagnosis"][0]["sequence"] == 1
    (ledger,) = eob["extension"]
    read_flag = next(e for e in ledger["extension"] if e["url"] == "claimDocumentRead")
    assert read_flag["valueBoolean"] is True


def test_an_unrelated_organization_and_narrow_scopes_see_nothing(scene: Scene) -> None:
    pid = scene.patient.member_id
    clinic = scene.sites[1].fhir()
    refused(clinic.get(f"Claim/{PAID_CLAIM}"), 403, "shown to the claim's patient")
    refused(clinic.get(f"ExplanationOfBenefit/{PAID_CLAIM}"), 403, scene.insurer)
    refused(clinic.get(f"ClaimResponse/{scene.response_id}"), 403, "shown to the claim's")
    assert clinic.ok("Claim", patient=pid)["total"] == 0
    assert clinic.ok("ExplanationOfBenefit")["total"] == 0

    reader = scene.sites[0].fhir("reader-0", "system/Patient.r")
    refused(reader.get(f"Claim/{PAID_CLAIM}"), 403, "scope does not allow r on Claim")
    anonymous = httpx.get(f"{scene.sites[0].base}/Claim/{PAID_CLAIM}", timeout=10)
    refused(anonymous, 401)

    fhir = scene.sites[0].fhir()
    refused(fhir.get("Claim/no-such-claim"), 404, "not known")
    refused(fhir.get("Claim", code="99214"), 400, "no search parameter 'code'")
    refused(fhir.get(f"Claim/{PAID_CLAIM}/_history"), 405, "not supported")
    put = httpx.put(
        f"{fhir.base}/Claim/{PAID_CLAIM}",
        json={"resourceType": "Claim"},
        headers={"Authorization": f"Bearer {fhir.token}", "Content-Type": "application/fhir+json"},
        timeout=10,
    )
    refused(put, 405, "not supported")
