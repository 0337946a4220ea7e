"""Bulk data end to end on a real 4-validator network: `medledger import fhir` loads two
Synthea-style patient bundles (a 150-record transaction bundle, split into transactions of 50
entries, and a collection bundle), every imported resource reads back identical, and FHIR Bulk Data
`$export` (patient and system level) gives the same resources as NDJSON — only to the client
that asked, only what the ledger's rules let it read. The node's OpenAPI document describes
every route the running node has.

"Identical" is defined as: for each imported entry, the resource the server returns, without
`id`, `meta.versionId` and `meta.lastUpdated` (which the server assigns), equals the file's
resource without `id` and with every reference to another entry of the file (`urn:uuid:<x>`)
replaced by `<Type>/<id the server assigned to x>` — compared as parsed JSON, every other
element (codes, values, dates, narrative, meta.profile, references to resources outside the
file such as `Practitioner?identifier=...`) exactly as the file has it.
"""

from __future__ import annotations

import json
import subprocess
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
from openapi_spec_validator import validate

from medledger.auth import node_audience, sign_request
from medledger.crypto.keys import KeyPair
from medledger.ledger.clients import RegisterClient
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.services.custody import Custody
from medledger.validation import validate_resource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_network import Network, running_network
from synthea_bundles import synthea_bundle

pytestmark = pytest.mark.e2e

BASE_PORT = 30300
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Claims go to the claims ledger (read by id, not in the patient's $everything); the closing
# Provenance is stored as a record of its patient.
CLAIM_TYPES = {"Claim", "ExplanationOfBenefit"}
FHIR_JSON = "application/fhir+json"
ASYNC = {"Accept": FHIR_JSON, "Prefer": "respond-async"}
IMPORT = [sys.executable, "-m", "medledger.cli.main", "import", "fhir"]


@dataclass
class Site:
    """A custodial EHR member on one node and the SMART clients registered for it."""

    node: int
    api: str
    base: str
    ehr: KeyPair
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

    def headers(self, client_id: str, scope: str = "system/*.rs") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(client_id, scope)}", "Accept": FHIR_JSON}


def make_site(
    network: Network, node: int, clients: dict[str, tuple[str, ...]], name: str = ""
) -> Site:
    """A custodial EHR member (`name`) on node `node`, enrolled by the organization's admin,
    with SMART clients registered for it."""
    cfg = network.configs[node]
    passphrase = (cfg.home / "keys" / "node.passphrase").read_text().strip()
    custody = Custody(cfg.home / "custody", passphrase, fast_kdf=True)
    ehr = custody.create(name or f"ehr-{node}")
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
    return Site(node, cfg.api_url, f"{cfg.api_url}/fhir", ehr, keys)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with running_network(tmp_path_factory.mktemp("bulk") / "net", BASE_PORT) as net:
        yield net


@pytest.fixture(scope="module")
def sites(network: Network) -> dict[int, Site]:
    """Node 0: the EHR that imports and reads back, and a second system member of the same
    organization that exports (so its export makes access requests of its own); node 1: another
    organization's EHR, with no consent."""
    return {
        0: make_site(network, 0, {"importer-0": ("system/*.c",), "reader-0": ("system/*.rs",)}),
        2: make_site(network, 0, {"exporter-0": ("system/*.rs",)}, "ehr-0-export"),
        1: make_site(network, 1, {"exporter-1": ("system/*.rs",)}),
    }


@dataclass
class Imported:
    files: dict[str, dict[str, Any]]  # name -> bundle
    report: dict[str, Any]
    stdout: str
    ids: dict[str, str]  # source fullUrl -> "<Type>/<new id>"
    patients: dict[str, str]  # file name -> new patient id


@pytest.fixture(scope="module")
def imported(sites: dict[int, Site], tmp_path_factory: pytest.TempPathFactory) -> Imported:
    site = sites[0]
    work = tmp_path_factory.mktemp("bundles")
    files = {
        "large.json": synthea_bundle(101, 150, kind="transaction"),
        "small.json": synthea_bundle(202, 40, kind="collection"),
    }
    for name, bundle in files.items():
        (work / name).write_text(json.dumps(bundle, indent=1))
    key_file = work / "importer.jwk"
    key_file.write_text(jwt.algorithms.OKPAlgorithm.to_jwk(site.keys["importer-0"]))  # type: ignore[attr-defined]
    report_file = work / "report.json"
    started = time.monotonic()
    result = subprocess.run(
        [
            *IMPORT,
            str(work / "large.json"),
            str(work / "small.json"),
            "--fhir",
            site.base,
            "--client-id",
            "importer-0",
            "--key-file",
            str(key_file),
            "--report",
            str(report_file),
            "--chunk-size",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 120
    report = json.loads(report_file.read_text())
    ids = {
        item["fullUrl"]: f"{item['resourceType']}/{item['id']}"
        for file in report["files"]
        for item in file["imported"]
    }
    patients = {
        Path(file["path"]).name: item["id"]
        for file in report["files"]
        for item in file["imported"]
        if item["resourceType"] == "Patient"
    }
    return Imported(files, report, result.stdout, ids, patients)


def expected_resource(resource: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    """The file's resource as the server must give it back (see the module docstring)."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: ids.get(v, v) if k == "reference" and isinstance(v, str) else walk(v)
                for k, v in value.items()
                if k != "id" or value is not resource
            }
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    out = walk(resource)
    assert isinstance(out, dict)
    return out


def canonical(resource: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(validate_resource({**resource, "id": "x"}).canonical)
    assert isinstance(out, dict)
    del out["id"]
    return out


def without_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in resource.items() if k != "id"}
    meta = {k: v for k, v in out.pop("meta", {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        out["meta"] = meta
    return out


def everything(site: Site, headers: dict[str, str], patient: str) -> list[dict[str, Any]]:
    """All of a patient's resources through $everything, page after page."""
    url: str | None = f"{site.base}/Patient/{patient}/$everything?_count=100"
    found: list[dict[str, Any]] = []
    while url:
        answer = httpx.get(url, headers=headers, timeout=120)
        assert answer.status_code == 200, answer.text
        bundle = answer.json()
        found.extend(
            e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"
        )
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    return found


@pytest.fixture(scope="module")
def read_back(sites: dict[int, Site], imported: Imported) -> dict[str, dict[str, Any]]:
    """Every resource of the imported patients as the FHIR API serves it, by `<Type>/<id>`."""
    site = sites[0]
    headers = site.headers("reader-0")
    served: dict[str, dict[str, Any]] = {}
    for patient in imported.patients.values():
        for resource in everything(site, headers, patient):
            served[f"{resource['resourceType']}/{resource['id']}"] = resource
    return served


# --- import -----------------------------------------------------------------------------------


def test_the_import_summary_accounts_for_every_entry(imported: Imported) -> None:
    totals = imported.report["totals"]
    entries = [e["resource"] for b in imported.files.values() for e in b["entry"]]
    records = [r for r in entries if r["resourceType"] not in CLAIM_TYPES]
    claims = Counter(r["resourceType"] for r in entries if r["resourceType"] in CLAIM_TYPES)
    assert totals["files"] == 2 and totals["filesFailed"] == 0
    assert totals["patients"] == 2
    assert len(records) == 1 + 150 + 1 + 1 + 40 + 1
    assert totals["imported"] == len(entries) == len(records) + sum(claims.values())
    assert totals["failed"] == 0 and totals["notSupported"] == 0
    for resource_type, count in claims.items():
        assert totals["byType"][resource_type] == {
            "imported": count,
            "notSupported": 0,
            "failed": 0,
        }
    assert totals["byType"]["Observation"]["imported"] == sum(
        1 for r in records if r["resourceType"] == "Observation"
    )
    large = next(f for f in imported.report["files"] if f["path"].endswith("large.json"))
    assert large["transactions"] == 4  # 166 entries (with 7 claims and their EOBs), 50 each
    assert large["bundleType"] == "transaction"
    small = next(f for f in imported.report["files"] if f["path"].endswith("small.json"))
    assert small["bundleType"] == "collection" and small["transactions"] == 2  # 54 entries
    # The printed summary says the same.
    out = imported.stdout
    assert f"2 file(s), 2 patient(s), {len(entries)} resources imported" in out
    assert "0 not supported, 0 failed" in out
    assert "Resources by type" in out and "ExplanationOfBenefit" in out


def test_every_imported_resource_reads_back_identical(
    sites: dict[int, Site], imported: Imported, read_back: dict[str, dict[str, Any]]
) -> None:
    entries = [e for b in imported.files.values() for e in b["entry"]]
    stored = [e for e in entries if e["resource"]["resourceType"] not in CLAIM_TYPES]
    # Exactly the imported records, no more.
    assert set(read_back) == {imported.ids[e["fullUrl"]] for e in stored}
    for entry in stored:
        served = read_back[imported.ids[entry["fullUrl"]]]
        validate_resource(served)
        assert served["meta"]["versionId"] == "1"
        # Compared in the canonical form validation stores (an instant's +00:00 is Z there).
        assert canonical(without_server_meta(served)) == canonical(
            expected_resource(entry["resource"], imported.ids)
        )
    # Cross-transaction references resolved: the later transaction's records name the patient
    # (given to the server as Patient?identifier=...) and earlier records by their new ids.
    large = imported.patients["large.json"]
    observations = [r for r in read_back.values() if r["resourceType"] == "Observation"]
    assert all(o["subject"]["reference"].startswith("Patient/") for o in observations)
    assert sum(1 for o in observations if o["subject"]["reference"] == f"Patient/{large}") > 100
    reports = [r for r in read_back.values() if r["resourceType"] == "DiagnosticReport"]
    assert all(x["reference"] in read_back for r in reports for x in r["result"])
    # A plain read gives the same resource.
    headers = sites[0].headers("reader-0")
    for kind in ("Patient", "Encounter", "DiagnosticReport", "MedicationRequest"):
        key = next(k for k in read_back if k.startswith(f"{kind}/"))
        answer = httpx.get(f"{sites[0].base}/{key}", headers=headers, timeout=60)
        assert answer.status_code == 200 and answer.json() == read_back[key]


def test_importing_a_file_again_is_refused_for_its_patient(
    sites: dict[int, Site], imported: Imported, tmp_path: Path
) -> None:
    site = sites[0]
    bundle = tmp_path / "again.json"
    bundle.write_text(json.dumps(imported.files["small.json"]))
    key_file = tmp_path / "importer.jwk"
    key_file.write_text(jwt.algorithms.OKPAlgorithm.to_jwk(site.keys["importer-0"]))  # type: ignore[attr-defined]
    result = subprocess.run(
        [
            *IMPORT,
            str(bundle),
            "--fhir",
            site.base,
            "--client-id",
            "importer-0",
            "--key-file",
            str(key_file),
            "--report",
            str(tmp_path / "report.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Failures" in result.stdout and ", 0 resources imported" in result.stdout
    (report,) = json.loads((tmp_path / "report.json").read_text())["files"]
    patient, *records = report["failed"]
    assert patient["resourceType"] == "Patient" and "already names Patient/" in patient["reason"]
    others = [
        e
        for e in imported.files["small.json"]["entry"]
        if e["resource"]["resourceType"] != "Patient"
    ]
    assert len(records) == len(others)  # 40 records, its Provenance, its claims and their EOBs
    assert all(r["reason"].startswith("its Patient was not imported") for r in records)


# --- $export ----------------------------------------------------------------------------------


def kick_off(url: str, headers: dict[str, str]) -> str:
    answer = httpx.get(url, headers={**headers, **ASYNC}, timeout=60)
    assert answer.status_code == 202, answer.text
    return answer.headers["Content-Location"]


def wait_for(status_url: str, headers: dict[str, str], timeout: float = 90) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(status_url, headers=headers, timeout=30)
        if answer.status_code != 202:
            return answer
        assert answer.headers["X-Progress"]
        assert time.monotonic() < deadline, "the export did not finish"
        time.sleep(0.5)


def ndjson(answer: httpx.Response) -> list[dict[str, Any]]:
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("application/fhir+ndjson")
    lines = answer.text.splitlines()
    assert answer.text == "" or answer.text.endswith("\n")
    return [json.loads(line) for line in lines]


def download(manifest: dict[str, Any], headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for output in manifest["output"]:
        resources = ndjson(httpx.get(output["url"], headers=headers, timeout=60))
        assert len(resources) == output["count"]
        for resource in resources:
            assert resource["resourceType"] == output["type"]
            validate_resource(resource)
            found[f"{resource['resourceType']}/{resource['id']}"] = resource
    return found


def test_patient_export_gives_the_patients_resources_as_ndjson(
    network: Network,
    sites: dict[int, Site],
    imported: Imported,
    read_back: dict[str, dict[str, Any]],
) -> None:
    site, reader = sites[2], sites[0]
    headers = site.headers("exporter-0")
    patient = imported.patients["large.json"]
    url = f"{site.base}/Patient/{patient}/$export"
    status_url = kick_off(url, headers)
    answer = wait_for(status_url, headers)
    assert answer.status_code == 200, answer.text
    manifest = answer.json()
    assert manifest["requiresAccessToken"] is True
    assert manifest["request"] == url and manifest["error"] == []
    assert manifest["transactionTime"].endswith("Z")
    assert "Expires" in answer.headers
    exported = download(manifest, headers)
    own = {k: v for k, v in read_back.items() if v is not None and mine(v, patient)}
    assert exported == own  # the same resources, meta and all
    assert Counter(o["type"] for o in manifest["output"]) == Counter(
        {t: 1 for t in {k.split("/")[0] for k in own}}
    )
    # Every resource was read as any read is: this node released its key share for each to
    # the exporting member, under a grant the ledger committed.
    admin = network.admins[0]
    log = httpx.get(
        f"{site.api}/v1/audit/node",
        headers={
            "Authorization": sign_request(
                admin,
                admin.member_id,
                "GET",
                "/v1/audit/node",
                audience=node_audience(network.configs[0].organization),
            )
        },
        timeout=30,
    ).json()
    releases = [
        e
        for e in log
        if e["action"] == "key.release"
        and e["actor"] == site.ehr.member_id
        and e["outcome"] == "released"
    ]
    assert len(releases) >= len(own)
    first = manifest["output"][0]["url"]
    # The files need a bearer token of the client that asked for the export.
    assert httpx.get(first, timeout=30).status_code == 401
    assert httpx.get(first, headers=reader.headers("reader-0"), timeout=30).status_code == 404
    assert httpx.get(status_url, headers=reader.headers("reader-0"), timeout=30).status_code == 404
    # A file is dropped from memory once downloaded: a new token of the same client is let in
    # (no 401/404) and told so.
    again = httpx.get(first, headers=site.headers("exporter-0"), timeout=30)
    assert again.status_code == 410 and "downloaded already" in again.text
    # _type and _since narrow it.
    narrow = kick_off(f"{url}?_type=Condition,MedicationRequest", headers)
    manifest = wait_for(narrow, headers).json()
    assert {o["type"] for o in manifest["output"]} == {"Condition", "MedicationRequest"}
    later = kick_off(f"{url}?_since=2999-01-01T00:00:00Z", headers)
    assert wait_for(later, headers).json()["output"] == []
    # Deleting the job deletes its files.
    deleted = httpx.delete(status_url, headers=headers, timeout=30)
    assert deleted.status_code == 202
    assert httpx.get(status_url, headers=headers, timeout=30).status_code == 404
    assert httpx.get(first, headers=headers, timeout=30).status_code == 404
    # The asynchronous pattern is required, and unknown parameters are refused.
    assert httpx.get(url, headers={**headers, "Accept": FHIR_JSON}, timeout=30).status_code == 400
    refused = httpx.get(f"{url}?_typeFilter=x", headers={**headers, **ASYNC}, timeout=30)
    assert refused.status_code == 400 and refused.json()["resourceType"] == "OperationOutcome"


def mine(resource: dict[str, Any], patient: str) -> bool:
    if resource["resourceType"] == "Patient":
        return bool(resource["id"] == patient)
    if resource["resourceType"] == "Provenance":
        return any(t.get("reference") == f"Patient/{patient}" for t in resource["target"])
    element = resource.get("subject") or resource.get("patient") or {}
    return bool(element.get("reference") == f"Patient/{patient}")


def test_system_export_gives_everything_the_client_may_read(
    sites: dict[int, Site], imported: Imported, read_back: dict[str, dict[str, Any]]
) -> None:
    site = sites[2]
    headers = site.headers("exporter-0")
    status_url = kick_off(f"{site.base}/$export", headers)
    manifest = wait_for(status_url, headers).json()
    assert download(manifest, headers) == read_back
    assert manifest["error"] == []
    # Another organization has no consent: nothing is exported to it, and it is told so.
    other = sites[1]
    other_headers = other.headers("exporter-1")
    status_url = kick_off(f"{other.base}/$export", other_headers)
    manifest = wait_for(status_url, other_headers).json()
    assert manifest["output"] == []
    (errors,) = manifest["error"]
    (note,) = ndjson(httpx.get(errors["url"], headers=other_headers, timeout=30))
    assert note["resourceType"] == "OperationOutcome"
    assert f"{len(read_back)} record(s) left out" in note["issue"][0]["diagnostics"]
    # For one patient the ledger decides the refusal, as for a read.
    patient = imported.patients["small.json"]
    status_url = kick_off(f"{other.base}/Patient/{patient}/$export", other_headers)
    failed = wait_for(status_url, other_headers)
    assert failed.status_code == 403 and failed.json()["resourceType"] == "OperationOutcome"


# --- OpenAPI -----------------------------------------------------------------------------------


def test_the_node_serves_a_valid_openapi_document_of_all_its_routes(
    sites: dict[int, Site],
) -> None:
    api = sites[0].api
    document = httpx.get(f"{api}/openapi.json", timeout=30).json()
    validate(document)
    assert document["info"]["x-undocumented-routes"] == []
    assert "/fhir/Patient/{id}/$export" in document["paths"]
    assert "/v1/keys/release" in document["paths"]
    page = httpx.get(f"{api}/docs", timeout=30)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "<script" not in page.text and "/fhir/$export" in page.text
