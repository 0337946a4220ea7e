"""`medledger import fhir` without a network: how a Synthea-style bundle is planned (which
entries, in which order, in which transactions of at most 100 entries), how references are
written in each transaction, how the server's refusals are handled, and the client's keys."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from medledger.cli.bulk import (
    BundleImportError,
    BundlePlan,
    FileReport,
    Importer,
    SmartClient,
    conditional_patient,
    entry_position,
    load_signing_key,
    plan_bundle,
    references,
    transaction_bundle,
)
from medledger.fhir.capability import RESOURCES
from medledger.ledger.records import MAX_RECORDS_PER_TX
from medledger.validation import validate_resource

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthea_bundles import SYNTHEA, synthea_bundle

SUPPORTED = frozenset(t for t, s in RESOURCES.items() if "create" in s.interactions)
# Every type a Synthea patient bundle holds is stored (claims on the claims ledger).
CLAIM_TYPES = {"Claim", "ExplanationOfBenefit"}


def keys_of(plan: BundlePlan) -> dict[str, int]:
    return {e.key: n for n, chunk in enumerate(plan.chunks) for e in chunk}


def test_a_large_bundle_is_split_with_the_patient_first_and_references_backwards() -> None:
    bundle = synthea_bundle(3, 150)
    plan = plan_bundle(bundle, SUPPORTED, chunk_size=100)
    sent = [e.resource_type for e in plan.entries]
    assert sent[0] == "Patient"
    # The patient, 150 clinical resources, 7 claims with their 7 EOBs, its Provenance.
    assert len(plan.entries) == 166
    assert [len(c) for c in plan.chunks] == [100, 66]
    # Every entry is sent exactly once, after every entry it references.
    assert sorted(e.position for e in plan.entries) == list(range(len(bundle["entry"])))
    order = {e.key: n for n, e in enumerate(plan.entries)}
    for entry in plan.entries:
        assert all(order[r] < order[entry.key] for r in entry.refs), entry.resource_type
    assert plan.warnings == []
    # DiagnosticReports reference their Observations, some across the split.
    chunk = keys_of(plan)
    crossing = [
        e for e in plan.chunks[1] for r in e.refs if chunk[r] == 0 and e.resource_type != "Patient"
    ]
    assert crossing
    # Nothing is skipped: claims and their EOBs are stored too, each EOB after its Claim.
    assert plan.skipped == []
    for entry in plan.entries:
        if entry.resource_type == "ExplanationOfBenefit":
            (claim,) = [
                r
                for r in entry.refs
                if r.startswith("urn:")
                and order[r] < order[entry.key]
                and plan.entries[order[r]].resource_type == "Claim"
            ]
            assert claim
    assert plan.total == len(bundle["entry"])
    # The server assigns ids: none is sent.
    assert all("id" not in e.resource for e in plan.entries)


def test_later_transactions_reference_earlier_entries_by_their_new_ids() -> None:
    plan = plan_bundle(synthea_bundle(3, 150), SUPPORTED, chunk_size=100)
    patient = plan.chunks[0][0]
    assert plan.identifiers[patient.key] == (SYNTHEA, patient.resource["identifier"][0]["value"])
    first = transaction_bundle(plan.chunks[0], {}, plan.identifiers)
    assert first["type"] == "transaction"
    assert first["entry"][0]["request"] == {"method": "POST", "url": "Patient"}
    # Within the first transaction the references are the entries' urn:uuid fullUrls.
    full_urls = {e["fullUrl"] for e in first["entry"]}
    for entry in first["entry"][1:]:
        inside = [r for r in references(entry["resource"]) if r.startswith("urn:uuid:")]
        assert inside and set(inside) <= full_urls
    # The second transaction: the first one's entries have ids now.
    assigned = {e.key: f"{e.resource_type}/{uuid.uuid4()}" for e in plan.chunks[0]}
    second = transaction_bundle(plan.chunks[1], assigned, plan.identifiers)
    expected_patient = conditional_patient(plan.identifiers[patient.key])
    assert expected_patient.startswith(f"Patient?identifier={SYNTHEA}|")
    own = {e["fullUrl"] for e in second["entry"]}
    earlier = set(assigned.values())
    for entry in second["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Provenance":  # its targets: the patient's new id
            assert resource["target"] == [{"reference": assigned[patient.key]}]
        else:
            patient_typed = ("Immunization", "Claim", "ExplanationOfBenefit")
            element = "patient" if resource["resourceType"] in patient_typed else "subject"
            assert resource[element]["reference"] == expected_patient
        for target in references(resource):
            assert target in own | earlier | {expected_patient} or target.startswith(
                ("Practitioner?", "Organization?", "Location?", "#")
            ), target
        validate_resource({**resource, "id": "x"})


def test_a_collection_bundle_becomes_posts_and_relative_references_resolve() -> None:
    bundle = synthea_bundle(5, 12, kind="collection")
    # Some writers use absolute fullUrls and relative references instead of urn:uuid.
    base = "http://ehr.example.org/fhir"
    for entry in bundle["entry"]:
        resource = entry["resource"]
        entry["fullUrl"] = f"{base}/{resource['resourceType']}/{resource['id']}"
    text = json.dumps(bundle)
    for entry in bundle["entry"]:
        resource = entry["resource"]
        text = text.replace(
            f'"urn:uuid:{resource["id"]}"', f'"{resource["resourceType"]}/{resource["id"]}"'
        )
    plan = plan_bundle(json.loads(text), SUPPORTED)
    assert plan.bundle_type == "collection" and len(plan.chunks) == 1
    sent = transaction_bundle(plan.chunks[0], {}, plan.identifiers)
    keys = {e["fullUrl"] for e in sent["entry"]}
    assert all(k.startswith("urn:uuid:") for k in keys)
    assert all(e["request"]["method"] == "POST" for e in sent["entry"])
    patient_key = sent["entry"][0]["fullUrl"]
    for entry in sent["entry"][1:]:
        assert patient_key in set(references(entry["resource"]))
        assert not any(r.startswith("Patient/") for r in references(entry["resource"]))


def test_entries_are_ordered_by_their_references_and_cycles_are_reported() -> None:
    patient = {"resourceType": "Patient", "id": "p", "identifier": [{"system": "s", "value": "1"}]}

    def observation(n: int, *refs: str) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "id": f"o{n}",
            "status": "final",
            "code": {"text": "x"},
            "subject": {"reference": "urn:uuid:p"},
            "hasMember": [{"reference": f"urn:uuid:{r}"} for r in refs],
        }

    entries = [
        # A report before its results, the patient last: both are moved; the cycle is broken
        # at o3, its first entry in file order.
        observation(1, "o2", "o3"),
        observation(2),
        observation(3, "o4"),
        observation(4, "o3"),  # a cycle with o3
        patient,
    ]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {"method": "POST", "url": r["resourceType"]},
            }
            for r in entries
        ],
    }
    plan = plan_bundle(bundle, SUPPORTED, chunk_size=2)
    assert [e.key.removeprefix("urn:uuid:") for e in plan.entries] == ["p", "o2", "o3", "o1", "o4"]
    assert any("later transaction" in w for w in plan.warnings)  # o3 → o4 across the split
    with pytest.raises(ValueError):
        plan_bundle(bundle, SUPPORTED, chunk_size=MAX_RECORDS_PER_TX + 1)


def test_unusable_bundles_and_entries_are_reported() -> None:
    with pytest.raises(BundleImportError, match="not a FHIR Bundle"):
        plan_bundle({"resourceType": "Patient"}, SUPPORTED)
    with pytest.raises(BundleImportError, match="searchset"):
        plan_bundle({"resourceType": "Bundle", "type": "searchset"}, SUPPORTED)
    bundle = synthea_bundle(8, 3)
    bundle["entry"][1]["request"] = {"method": "DELETE", "url": "Observation/x"}
    bundle["entry"].append({"fullUrl": "urn:uuid:nothing"})
    plan = plan_bundle(bundle, SUPPORTED)
    unusable = [s for s in plan.skipped if not s.unsupported]
    assert [s.position for s in unusable] == [1, len(bundle["entry"]) - 1]
    assert "DELETE" in unusable[0].reason


# --- the importer against a stand-in server ---------------------------------------------------


class FakeServer:
    """Answers transactions like the gateway: refuses entries it is told to (by resource
    type and a marker), and otherwise assigns ids."""

    def __init__(self, refuse: dict[str, tuple[int, str]]) -> None:
        self.refuse = refuse
        self.bundles: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/auth/token"):
            return httpx.Response(200, json={"access_token": "t", "expires_in": 300})
        bundle = json.loads(request.content)
        self.bundles.append(bundle)
        for n, entry in enumerate(bundle["entry"]):
            marker = entry["resource"].get("status") or entry["resource"]["resourceType"]
            if marker in self.refuse:
                status, text = self.refuse[marker]
                issue = {
                    "severity": "error",
                    "code": "invalid",
                    "diagnostics": f"Bundle.entry[{n}]: {text}",
                }
                return httpx.Response(
                    status, json={"resourceType": "OperationOutcome", "issue": [issue]}
                )
        results = [
            {
                "response": {
                    "status": "201 Created",
                    "location": f"{e['request']['url']}/{uuid.uuid4()}/_history/1",
                }
            }
            for e in bundle["entry"]
        ]
        return httpx.Response(
            200, json={"resourceType": "Bundle", "type": "transaction-response", "entry": results}
        )


def run_import(plan: BundlePlan, server: FakeServer) -> FileReport:
    http = httpx.Client(transport=httpx.MockTransport(server))
    key = load_signing_key_from(ed25519.Ed25519PrivateKey.generate())
    smart = SmartClient(http, "http://node/fhir", "c", key, "system/*.c")
    smart._token_url = "http://node/fhir/auth/token"
    report = FileReport("bundle.json")
    advanced: list[int] = []
    Importer(http, smart, "http://node/fhir", advanced.append).run(plan, report)
    assert sum(advanced) == plan.total
    return report


def load_signing_key_from(key: ed25519.Ed25519PrivateKey) -> Any:
    from medledger.cli.bulk import SigningKey

    return SigningKey(key, "EdDSA", None)


def test_a_refused_entry_is_reported_and_the_rest_is_sent_again() -> None:
    bundle = synthea_bundle(3, 150)
    # Mark one observation so the stand-in server refuses it.
    target = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")
    target["resource"]["status"] = "preliminary"
    plan = plan_bundle(bundle, SUPPORTED, chunk_size=100)
    server = FakeServer({"preliminary": (400, "Observation.status: bad")})
    report = run_import(plan, server)
    assert [f.position for f in report.failed] == [bundle["entry"].index(target)]
    assert "Observation.status: bad" in report.failed[0].reason
    assert len(report.imported) == len(plan.entries) - 1
    assert report.transactions == 2
    # The retried first transaction no longer holds the refused entry.
    assert len(server.bundles) == 3 and len(server.bundles[1]["entry"]) == 99
    # Ids the server assigned come back in the report, keyed by the source fullUrl.
    assert {i.source_full_url for i in report.imported} <= {e["fullUrl"] for e in bundle["entry"]}


def test_when_the_patient_is_refused_its_records_are_reported_as_failed() -> None:
    plan = plan_bundle(synthea_bundle(4, 120), SUPPORTED)
    server = FakeServer({"Patient": (409, "identifier already names Patient/x")})
    report = run_import(plan, server)
    assert report.imported == []
    assert len(report.failed) == len(plan.entries)
    assert "identifier already names" in report.failed[0].reason
    assert all("its Patient was not imported" in f.reason for f in report.failed[1:])
    assert len(server.bundles) == 1  # nothing else was sent


def test_entry_position_reads_the_gateway_outcomes() -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": "Bundle.entry[7]: x"}],
    }
    assert entry_position(outcome) == 7
    assert entry_position({"issue": [{"expression": ["Bundle.entry[3].resource.status"]}]}) == 3
    assert entry_position({"issue": [{"diagnostics": "something else"}]}) is None


# --- keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["jwk-ed25519", "pem-ed25519", "pem-p256", "jwk-p384"])
def test_private_keys_sign_assertions_the_registration_verifies(tmp_path: Path, kind: str) -> None:
    private: Any
    if kind.endswith("ed25519"):
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        private = ec.generate_private_key(
            ec.SECP256R1() if kind.endswith("p256") else ec.SECP384R1()
        )
    path = tmp_path / "key"
    if kind.startswith("jwk"):
        algorithm = (
            jwt.algorithms.OKPAlgorithm if kind.endswith("ed25519") else jwt.algorithms.ECAlgorithm
        )
        path.write_text(algorithm.to_jwk(private))  # type: ignore[attr-defined]
    else:
        path.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    key = load_signing_key(path)
    http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(404)))
    smart = SmartClient(http, "http://node/fhir", "importer", key, "system/*.c")
    token = smart.assertion()
    claims = jwt.decode(
        token,
        private.public_key(),
        algorithms=[key.algorithm],
        audience="http://node/fhir/auth/token",
    )
    assert claims["iss"] == claims["sub"] == "importer"


def test_public_or_foreign_keys_are_refused(tmp_path: Path) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    public = tmp_path / "public.jwk"
    public.write_text(jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key()))  # type: ignore[attr-defined]
    with pytest.raises(BundleImportError, match="private"):
        load_signing_key(public)
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(BundleImportError):
        load_signing_key(junk)
