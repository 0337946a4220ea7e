"""A provider's claim history through the FHIR API on a real 4-validator network, with a public
Synthea patient file nobody here wrote (../shared/testdata/synthea): the hospital's EHR client
posts the whole transaction Bundle — Claims and ExplanationOfBenefits included — after the
directory entries it references (from the public support bundles). Every entry is accepted;
each Claim becomes a ledger claim imported with the payer's reported decision and payment;
the Claim and ExplanationOfBenefit read back as the file has them (ids and references
rewritten); the patient's claims are on the ledger for the patient and auditors. An
ExplanationOfBenefit sent later for a claim imported without one decides it, once, and only
for the provider that imported it; a claim whose payer is a network insurer is that insurer's
to read and settle; the insurer of nobody's claims and another provider see nothing."""

from __future__ import annotations

import copy
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

from medledger.client.claims import ClaimsClient
from medledger.client.records import RecordsClient
from medledger.crypto.keys import KeyPair
from medledger.ledger.claims import Claim, ClaimStatus
from medledger.ledger.clients import RegisterClient
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.services.custody import Custody
from medledger.validation import validate_resource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_network import Network, running_network

pytestmark = pytest.mark.e2e

SYNTHEA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "synthea"
if not SYNTHEA.is_dir():
    pytest.skip(f"third-party test data not found at {SYNTHEA}", allow_module_level=True)
PATIENT_FILE = SYNTHEA / "Jeremiah751_Dach178_9785afad-19cc-02f6-de65-b2de2618c9ac.json"
SUPPORT_FILES = sorted(SYNTHEA.glob("*Information*.json"))

BASE_PORT = 32900
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
Json = dict[str, Any]


@dataclass
class Client:
    base: str
    client_id: str
    key: ed25519.Ed25519PrivateKey

    def headers(self) -> dict[str, str]:
        now = int(time.time())
        assertion = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": f"{self.base}/auth/token",
            "exp": now + 240,
            "jti": str(uuid.uuid4()),
        }
        form = {
            "grant_type": "client_credentials",
            "scope": "system/*.cruds",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": jwt.encode(assertion, self.key, algorithm="EdDSA"),
        }
        answer = httpx.post(f"{self.base}/auth/token", data=form, timeout=10)
        assert answer.status_code == 200, answer.text
        return {
            "Authorization": f"Bearer {answer.json()['access_token']}",
            "Content-Type": "application/fhir+json",
            "Accept": "application/fhir+json",
        }

    def get(self, path: str, **params: str) -> httpx.Response:
        return httpx.get(f"{self.base}/{path}", params=params, headers=self.headers(), timeout=60)

    def post(self, path: str, body: Json) -> httpx.Response:
        url = f"{self.base}/{path}" if path else self.base
        return httpx.post(url, json=body, headers=self.headers(), timeout=600)


def ehr_client(network: Network, node: int, name: str) -> Client:
    cfg = network.configs[node]
    passphrase = (cfg.home / "keys" / "node.passphrase").read_text().strip()
    ehr = Custody(cfg.home / "custody", passphrase, fast_kdf=True).create(name)
    ledger, admin = network.client(node), network.admins[node]
    ledger.submit(
        admin, "member.enroll", EnrollMember(ehr.verify_key, ehr.encryption_key, Role.EHR)
    )
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = str(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
    ledger.submit(
        admin, "client.register", RegisterClient(name, ehr.member_id, jwk, ("system/*.cruds",))
    )
    return Client(f"{cfg.api_url}/fhir", name, key)


def referenced_directory(bundle: Json) -> list[Json]:
    """The support bundles' entries (ifNoneExist creates) that the patient file names."""
    wanted = set()
    for entry in bundle["entry"]:
        text = json.dumps(entry["resource"])
        for kind in ("Organization", "Location", "Practitioner", "PractitionerRole"):
            start = 0
            while (at := text.find(f'"{kind}?identifier=', start)) >= 0:
                end = text.find('"', at + 1)
                wanted.add(text[at + 1 : end])
                start = end
    found = []
    for path in SUPPORT_FILES:
        for entry in json.loads(path.read_text())["entry"]:
            condition = entry.get("request", {}).get("ifNoneExist", "")
            if f"{entry['resource']['resourceType']}?{condition}" in wanted:
                found.append(entry)
    return found


def transaction(entries: list[Json]) -> Json:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@dataclass
class History:
    network: Network
    ehr: Client
    clinic: Client
    insurer_ehr: Client
    bundle: Json
    response: Json
    ids: dict[str, str]  # the file's fullUrl -> "<Type>/<id>"
    late_eob: Json
    insured_claim: str
    insured_source: Json  # the insured claim as sent (payer and coverage set here)
    coverage: str
    patient: str


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with running_network(tmp_path_factory.mktemp("claim-history") / "net", BASE_PORT) as net:
        yield net


@pytest.fixture(scope="module")
def history(network: Network) -> History:
    ehr = ehr_client(network, 0, "ehr-history")
    clinic = ehr_client(network, 1, "ehr-clinic")
    insurer_ehr = ehr_client(network, 3, "ehr-insurer")
    insurer = network.configs[3].organization
    bundle = json.loads(PATIENT_FILE.read_text())

    directory = ehr.post("", transaction(referenced_directory(bundle)))
    assert directory.status_code == 200, directory.text

    # One claim's payer is the network's insurer (the file names its payer only by display),
    # with the patient's Coverage (US Core) beside it; one ExplanationOfBenefit is held back,
    # to follow its claim later.
    entries = copy.deepcopy(bundle["entry"])
    patient_url = next(e["fullUrl"] for e in entries if e["resource"]["resourceType"] == "Patient")
    coverage = {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": {
            "resourceType": "Coverage",
            "status": "active",
            "type": {
                "coding": [
                    {"system": "urn:oid:2.16.840.1.113883.3.221.5", "code": "5", "display": "PPO"}
                ]
            },
            "identifier": [{"system": "https://careplus.example/member", "value": "CP-7781"}],
            "beneficiary": {"reference": patient_url},
            "relationship": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship",
                        "code": "self",
                    }
                ]
            },
            "payor": [{"reference": f"Organization/{insurer}"}],
        },
        "request": {"method": "POST", "url": "Coverage"},
    }
    entries.insert(1, coverage)
    claims = [e for e in entries if e["resource"]["resourceType"] == "Claim"]
    insured = claims[0]
    insured["resource"]["insurer"] = {"reference": f"Organization/{insurer}"}
    insured["resource"]["insurance"][0]["coverage"] = {"reference": coverage["fullUrl"]}
    eobs = [e for e in entries if e["resource"]["resourceType"] == "ExplanationOfBenefit"]
    held_back = next(e for e in eobs if e["resource"]["claim"]["reference"] == claims[1]["fullUrl"])
    entries.remove(held_back)

    answer = ehr.post("", transaction(entries))
    assert answer.status_code == 200, answer.text[:4000]
    response = answer.json()
    ids = {
        e["fullUrl"]: "/".join(r["response"]["location"].split("/")[:2])
        for e, r in zip(entries, response["entry"], strict=True)
    }
    late = copy.deepcopy(held_back["resource"])
    late["claim"] = {"reference": ids[claims[1]["fullUrl"]]}
    late["patient"] = {"reference": ids[late["patient"]["reference"]]}
    patient = ids[next(e["fullUrl"] for e in entries if e["resource"]["resourceType"] == "Patient")]
    return History(
        network,
        ehr,
        clinic,
        insurer_ehr,
        bundle,
        response,
        ids,
        late,
        ids[insured["fullUrl"]].split("/")[1],
        insured["resource"],
        ids[coverage["fullUrl"]].split("/")[1],
        patient.split("/")[1],
    )


def rewritten(resource: Json, ids: dict[str, str], served: Json) -> Json:
    """The file's resource with its urn:uuid references as the server assigned them; the
    conditional (directory) references as the served copy has them."""

    def walk(value: Any, seen: Any) -> Any:
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if key == "reference" and isinstance(item, str):
                    out[key] = ids.get(item, seen.get(key) if isinstance(seen, dict) else item)
                else:
                    out[key] = walk(item, seen.get(key) if isinstance(seen, dict) else None)
            return out
        if isinstance(value, list):
            seen_list = seen if isinstance(seen, list) else []
            return [
                walk(v, seen_list[i] if i < len(seen_list) else None) for i, v in enumerate(value)
            ]
        return value

    out = walk({k: v for k, v in resource.items() if k != "id"}, served)
    return json.loads(validate_resource({**out, "id": "x"}).canonical)


def as_served(resource: Json, drop: tuple[str, ...] = ()) -> Json:
    out = {k: v for k, v in resource.items() if k not in ("id", "meta", *drop)}
    return json.loads(validate_resource({**out, "id": "x"}).canonical)


def test_every_entry_of_the_file_is_accepted_claims_included(history: History) -> None:
    statuses = [e["response"]["status"] for e in history.response["entry"]]
    # The file's entries but the held-back EOB, and the Coverage added.
    assert statuses == ["201 Created"] * len(history.bundle["entry"])
    kinds = [v.split("/")[0] for v in history.ids.values()]
    claims = kinds.count("Claim")
    assert claims == 31 and kinds.count("ExplanationOfBenefit") == 30
    # Synthea's Claim.total adds a cost no line bills: the ledger keeps the lines' sum, and
    # says so; every payer here is outside the network but the one we mapped.
    notes = [
        i["diagnostics"]
        for e in history.response["entry"]
        if e["fullUrl"].split("/")[-2] == "Claim"
        for i in e["response"].get("outcome", {}).get("issue", [])
    ]
    assert sum("is not the sum of its lines" in n for n in notes) == claims
    assert sum("outside the network" in n for n in notes) == claims - 1


def test_claims_are_on_the_ledger_with_the_payers_reported_decisions(history: History) -> None:
    listed = history.network.client(0).query(
        "/claims", f"patient:{history.patient}".encode(), list[Claim]
    )
    assert len(listed) == 31 and all(c.imported for c in listed)
    by_id = {c.id: c for c in listed}
    assert by_id[history.insured_claim].insurer == history.network.configs[3].organization
    assert by_id[history.insured_claim].coverage == history.coverage
    decided = [c for c in listed if c.outcome is not None]
    assert len(decided) == 30
    for claim in decided:
        assert [s.reported for s in claim.history[1:]] == [True] * (len(claim.history) - 1)
        if claim.approved_total:
            assert claim.status is ClaimStatus.PAID and claim.paid_total == claim.approved_total
    assert sum(c.paid_total for c in decided) > 0


def test_claim_and_eob_read_back_as_the_file_has_them(history: History) -> None:
    ehr = history.ehr
    checked = 0
    for entry in history.bundle["entry"]:
        kind = entry["resource"]["resourceType"]
        if kind not in ("Claim", "ExplanationOfBenefit") or entry["fullUrl"] not in history.ids:
            continue
        location = history.ids[entry["fullUrl"]]
        answer = ehr.get(location)
        assert answer.status_code == 200, answer.text
        served = answer.json()
        validate_resource(served)
        assert served["id"] == location.split("/")[1]
        source = entry["resource"]
        if kind == "Claim" and location.endswith(history.insured_claim):
            source = history.insured_source
        extra = ("extension", "processNote") if kind == "ExplanationOfBenefit" else ()
        assert as_served(served, extra) == rewritten(source, history.ids, served), location
        if kind == "ExplanationOfBenefit":
            ledger = next(x for x in served["extension"] if x["url"] == "urn:medledger:fhir:claim")
            assert {"url": "imported", "valueBoolean": True} in ledger["extension"]
            assert "as reported by" in served["processNote"][-1]["text"]
        checked += 1
    assert checked == 61
    found = ehr.get("ExplanationOfBenefit", patient=f"Patient/{history.patient}", _count="100")
    assert found.status_code == 200 and found.json()["total"] == 31
    # The Coverage is a record of its beneficiary, found by patient (US Core SHALL).
    coverages = ehr.get("Coverage", patient=f"Patient/{history.patient}")
    assert coverages.status_code == 200, coverages.text
    matches = [e["resource"] for e in coverages.json()["entry"] if e["search"]["mode"] == "match"]
    assert [c["id"] for c in matches] == [history.coverage]
    assert matches[0]["beneficiary"] == {"reference": f"Patient/{history.patient}"}


def test_a_later_explanation_of_benefit_decides_its_claim_once(history: History) -> None:
    claim_id = history.late_eob["claim"]["reference"].split("/")[1]
    # Not another provider's to report.
    refused = history.clinic.post("ExplanationOfBenefit", history.late_eob)
    assert refused.status_code in (403, 422), refused.text
    answer = history.ehr.post("ExplanationOfBenefit", history.late_eob)
    assert answer.status_code == 201, answer.text
    assert answer.json()["id"] == claim_id
    claim = history.network.client(0).query("/claim", claim_id, Claim)
    assert claim.outcome is not None and claim.history[-1].reported
    again = history.ehr.post("ExplanationOfBenefit", history.late_eob)
    assert again.status_code == 409, again.text
    assert "already" in again.text


def test_the_network_insurer_takes_its_claim_and_nobody_else_sees_any(history: History) -> None:
    insurer = history.insurer_ehr
    mine = insurer.get("ExplanationOfBenefit", patient=f"Patient/{history.patient}")
    assert mine.status_code == 200
    assert [
        e["resource"]["id"] for e in mine.json().get("entry", []) if e["search"]["mode"] == "match"
    ] == [history.insured_claim]
    others = [
        c
        for c in history.ids.values()
        if c.startswith("Claim/") and not c.endswith(history.insured_claim)
    ]
    assert insurer.get(others[0]).status_code == 403
    clinic = history.clinic
    assert clinic.get(f"ExplanationOfBenefit/{history.insured_claim}").status_code == 403
    seen = clinic.get("ExplanationOfBenefit", patient=f"Patient/{history.patient}")
    assert seen.status_code == 200 and seen.json()["total"] == 0
    # The insurer's claims examiner reads the imported claim like one submitted on the network.
    examiner = KeyPair.generate()
    network = history.network
    network.client(3).submit(
        network.admins[3],
        "member.enroll",
        EnrollMember(examiner.verify_key, examiner.encryption_key, Role.BILLING),
    )
    records = RecordsClient(network.client(3), network.configs[3].api_url, examiner)
    try:
        claim = ClaimsClient(records).show(history.insured_claim)
        assert claim.imported and claim.insurer == network.configs[3].organization
        document = ClaimsClient(records).read_claim(history.insured_claim)
        assert document["resourceType"] == "Claim"
    finally:
        records.close()
