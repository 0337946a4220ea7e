"""The public Synthea export (../shared/testdata/synthea: 20 patient transaction bundles and the
hospital and practitioner support bundles they reference conditionally) imported with
`medledger import fhir` on a real 4-validator network, every file and every entry: nothing is
refused (Claims and ExplanationOfBenefits become imported claims on the claims ledger, an EOB
that lands in a later transaction than its Claim deciding it there); every imported resource
reads back as the file has it, with ids and references rewritten consistently: `urn:uuid:`
references to the server's ids, and conditional references (`Organization?identifier=...`,
`Practitioner?identifier=...`, `Location?identifier=...`) to the directory entry the support
bundles created.

Skipped, saying so, where the test data folder is absent. The import is ~10,000 entries (about
half of them encrypted records sealed to every custodian): it takes tens of minutes, so the
module runs only with MEDLEDGER_SYNTHEA_E2E=1 (CI sets it), and has a timeout of its own.
"""

from __future__ import annotations

import json
import os
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

from medledger.fhir.directory import identifiers_of
from medledger.ledger.clients import RegisterClient
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.services.custody import Custody
from medledger.validation import validate_resource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_network import Network, running_network

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(5400)]

SYNTHEA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "synthea"
if not SYNTHEA.is_dir():
    pytest.skip(f"third-party test data not found at {SYNTHEA}", allow_module_level=True)
if os.environ.get("MEDLEDGER_SYNTHEA_E2E") != "1":
    pytest.skip(
        "the full public Synthea import takes tens of minutes: set MEDLEDGER_SYNTHEA_E2E=1",
        allow_module_level=True,
    )

BASE_PORT = 32300
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
IMPORT = [sys.executable, "-m", "medledger.cli.main", "import", "fhir"]
# On the claims ledger, read by id rather than in the patient's $everything.
CLAIM_TYPES = {"Claim", "ExplanationOfBenefit"}
Json = dict[str, Any]


def files() -> list[Path]:
    found = sorted(SYNTHEA.glob("*.json"))
    return sorted(found, key=lambda f: "Information" not in f.name)  # support bundles first


@dataclass
class Site:
    base: str
    key: ed25519.Ed25519PrivateKey

    def headers(self) -> dict[str, str]:
        claims = {
            "iss": "importer",
            "sub": "importer",
            "aud": f"{self.base}/auth/token",
            "exp": int(time.time()) + 240,
            "jti": str(uuid.uuid4()),
        }
        form = {
            "grant_type": "client_credentials",
            "scope": "system/*.cruds",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": jwt.encode(claims, self.key, algorithm="EdDSA"),
        }
        answer = httpx.post(f"{self.base}/auth/token", data=form, timeout=10)
        assert answer.status_code == 200, answer.text
        return {"Authorization": f"Bearer {answer.json()['access_token']}"}


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with running_network(tmp_path_factory.mktemp("synthea") / "net", BASE_PORT) as net:
        yield net


@pytest.fixture(scope="module")
def site(network: Network) -> Site:
    cfg = network.configs[0]
    passphrase = (cfg.home / "keys" / "node.passphrase").read_text().strip()
    ehr = Custody(cfg.home / "custody", passphrase, fast_kdf=True).create("ehr-synthea")
    ledger = network.client(0)
    admin = network.admins[0]
    ledger.submit(
        admin, "member.enroll", EnrollMember(ehr.verify_key, ehr.encryption_key, Role.EHR)
    )
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = str(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
    ledger.submit(
        admin,
        "client.register",
        RegisterClient("importer", ehr.member_id, jwk, ("system/*.cruds",)),
    )
    return Site(f"{cfg.api_url}/fhir", key)


@dataclass
class Imported:
    report: Json
    ids: dict[tuple[str, str], str]  # (file name, source fullUrl) -> "<Type>/<new id>"


@pytest.fixture(scope="module")
def imported(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Imported:
    work = tmp_path_factory.mktemp("import")
    key_file = work / "importer.jwk"
    key_file.write_text(jwt.algorithms.OKPAlgorithm.to_jwk(site.key))  # type: ignore[attr-defined]
    report_file = work / "report.json"
    result = subprocess.run(
        [
            *IMPORT,
            *map(str, files()),
            "--fhir",
            site.base,
            "--client-id",
            "importer",
            "--key-file",
            str(key_file),
            "--report",
            str(report_file),
            "--chunk-size",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    report = json.loads(report_file.read_text())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    ids = {
        (Path(file["path"]).name, item["fullUrl"]): f"{item['resourceType']}/{item['id']}"
        for file in report["files"]
        for item in file["imported"]
    }
    return Imported(report, ids)


def test_every_entry_is_imported(imported: Imported) -> None:
    expected: Counter[str] = Counter()
    for path in files():
        for entry in json.loads(path.read_text())["entry"]:
            expected[entry["resource"]["resourceType"]] += 1
    totals = imported.report["totals"]
    assert totals["failed"] == 0 and totals["filesFailed"] == 0
    assert totals["imported"] == sum(expected.values())
    assert totals["notSupported"] == 0
    for kind, count in expected.items():
        assert totals["byType"][kind] == {"imported": count, "notSupported": 0, "failed": 0}


def expected(resource: Json, ids: dict[str, str], directory: dict[str, str]) -> Json:
    """The file's resource as the server must give it back."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if key == "reference" and isinstance(item, str):
                    out[key] = ids.get(item, directory.get(item, item))
                elif key == "id" and value is resource:
                    continue
                else:
                    out[key] = walk(item)
            return out
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    out = walk(resource)
    assert isinstance(out, dict)
    return json.loads(validate_resource({**out, "id": "x"}).canonical)


# What an ExplanationOfBenefit of an imported claim adds to the payer's document.
CLAIM_ADDITIONS = ("extension", "processNote")


def as_served(resource: Json) -> Json:
    out = {k: v for k, v in resource.items() if k != "id"}
    meta = {
        k: v
        for k, v in out.pop("meta", {}).items()
        if k not in ("versionId", "lastUpdated", "tag")  # tags: the ledger's claim status
    }
    if meta:
        out["meta"] = meta
    return json.loads(validate_resource({**out, "id": "x"}).canonical)


class Tokens:
    """Fresh access tokens for a long read-back (a token lives 240 s)."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.issued = 0.0
        self.current: dict[str, str] = {}

    def headers(self) -> dict[str, str]:
        if time.monotonic() - self.issued > 120:
            self.current = self.site.headers()
            self.issued = time.monotonic()
        return self.current


def everything(site: Site, tokens: Tokens, patient: str) -> list[Json]:
    url: str | None = f"{site.base}/{patient}/$everything?_count=100"
    found: list[Json] = []
    while url:
        answer = httpx.get(url, headers=tokens.headers(), timeout=300)
        assert answer.status_code == 200, answer.text
        bundle = answer.json()
        found.extend(
            e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"
        )
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    return found


def test_every_imported_resource_reads_back_as_the_file_has_it(
    site: Site, imported: Imported
) -> None:
    tokens = Tokens(site)
    # Conditional references name the support bundles' entries by identifier.
    directory: dict[str, str] = {}
    patients: dict[str, str] = {}
    checked = 0
    for path in files():
        bundle = json.loads(path.read_text())
        ids = {url: new for (name, url), new in imported.ids.items() if name == path.name}
        if "Information" in path.name:
            for entry in bundle["entry"]:
                resource, new = entry["resource"], ids[entry["fullUrl"]]
                for identifier in identifiers_of(resource):
                    directory[f"{resource['resourceType']}?identifier={identifier}"] = new
                answer = httpx.get(f"{site.base}/{new}", headers=tokens.headers(), timeout=60)
                assert answer.status_code == 200, answer.text
                assert as_served(answer.json()) == expected(resource, ids, directory)
                checked += 1
            continue
        patient = next(new for new in ids.values() if new.startswith("Patient/"))
        patients[path.name] = patient
        served = {f"{r['resourceType']}/{r['id']}": r for r in everything(site, tokens, patient)}
        stored = [e for e in bundle["entry"] if e["resource"]["resourceType"] not in CLAIM_TYPES]
        assert set(served) == {ids[e["fullUrl"]] for e in stored}, path.name
        for entry in stored:
            returned = served[ids[entry["fullUrl"]]]
            assert as_served(returned) == expected(entry["resource"], ids, directory), (
                path.name,
                entry["fullUrl"],
            )
            checked += 1
        for entry in bundle["entry"]:
            kind = entry["resource"]["resourceType"]
            if kind not in CLAIM_TYPES:
                continue
            location = ids[entry["fullUrl"]]
            answer = httpx.get(f"{site.base}/{location}", headers=tokens.headers(), timeout=60)
            assert answer.status_code == 200, answer.text
            returned = answer.json()
            if kind == "ExplanationOfBenefit":
                # The ledger's status and history ride along; the payer's document is as sent.
                assert "as reported by" in returned["processNote"][-1]["text"]
                returned = {k: v for k, v in returned.items() if k not in CLAIM_ADDITIONS}
            assert as_served(returned) == expected(entry["resource"], ids, directory), location
            checked += 1
    assert checked == imported.report["totals"]["imported"]
    assert len(patients) == 20
