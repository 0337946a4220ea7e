"""The records CLI end to end, as a person would use it: each command a separate
`medledger` process with its own keystore, against a real 4-validator network.

Write a record, read it back as the patient, consent, let another organization's clinician
request and read it, revoke, see the denial (exit code 3), account for the disclosures in CSV
and JSON, export a FHIR Bundle; and the error paths: invalid FHIR, bad JSON, a missing file, an
unknown record, a wrong passphrase — each one clear line, a non-zero exit, nothing written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_network import Network, running_network

from medledger.crypto.keystore import Keyring
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.samples.fhir import generate_patient_record_set
from medledger.validation import validate_resource

pytestmark = pytest.mark.e2e

BASE_PORT = 28600
PASSPHRASE = "cli test passphrase"

# (keystore name, node index of the member's organization, role)
PEOPLE = [
    ("patient", 0, Role.PATIENT),
    ("doctor", 0, Role.CLINICIAN),
    ("outsider", 1, Role.CLINICIAN),
]


@dataclass
class Cli:
    """Runs `medledger` as a subprocess for one of the people, on their organization's node."""

    network: Network
    keys_dir: Path
    ids: dict[str, str]
    nodes: dict[str, int]

    def run(
        self, *args: str, who: str = "patient", passphrase: str = PASSPHRASE
    ) -> subprocess.CompletedProcess[str]:
        cfg = self.network.configs[self.nodes[who]]
        env = {
            **os.environ,
            "MEDLEDGER_PASSPHRASE": passphrase,
            "MEDLEDGER_KEYS": str(self.keys_dir),
            "MEDLEDGER_NODE": cfg.cometbft_rpc,
            "MEDLEDGER_API": cfg.api_url,
        }
        env.pop("MEDLEDGER_DEBUG", None)
        return subprocess.run(
            [sys.executable, "-m", "medledger.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def ok(self, *args: str, who: str = "patient") -> str:
        result = self.run(*args, who=who)
        assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stderr}"
        return result.stdout

    def fails(self, *args: str, who: str = "patient", code: int = 1, **kw: Any) -> str:
        """Run a command that must fail with `code`: one clear line on stderr, no traceback."""
        result = self.run(*args, who=who, **kw)
        assert result.returncode == code, (
            f"{args}: exit {result.returncode}, expected {code}\n{result.stdout}{result.stderr}"
        )
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        return lines[0]


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with running_network(tmp_path_factory.mktemp("cli") / "net", BASE_PORT) as net:
        yield net


@pytest.fixture(scope="module")
def cli(network: Network, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    keys_dir = tmp_path_factory.mktemp("keys")
    runner = Cli(network, keys_dir, {}, {name: node for name, node, _ in PEOPLE})
    ring = Keyring(keys_dir)
    for name, node, role in PEOPLE:
        out = runner.ok("keys", "new", name, "--keys-dir", str(keys_dir))
        public = ring.public(name)
        assert public.member_id in out
        body = EnrollMember(public.verify_key, public.encryption_key, role)
        network.client(node).submit(network.admins[node], "member.enroll", body)
        runner.ids[name] = public.member_id
    return runner


def _resource(cli: Cli, kind: str, seed: int) -> dict[str, Any]:
    resources = generate_patient_record_set(
        seed,
        f"Patient/{cli.ids['patient']}",
        f"Practitioner/{cli.ids['doctor']}",
        when="2026-11-01T09:00:00Z",
        count=12,
    )
    return next(r for r in resources if r["resourceType"] == kind)


def _record_count(cli: Cli) -> int:
    out = cli.ok("record", "list", "--patient", cli.ids["patient"])
    match = re.search(r"^(\d+) records of patient", out, re.MULTILINE)
    assert match, out
    return int(match.group(1))


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_consented_read_revocation_audit_and_export(cli: Cli, tmp_path: Path) -> None:
    patient, outsider = cli.ids["patient"], cli.ids["outsider"]
    org2 = cli.network.configs[1].organization
    resource = _resource(cli, "Observation", 7)
    source = tmp_path / "observation.json"
    source.write_text(json.dumps(resource))

    put = ("record", "put", "--key", "doctor", "--patient", patient, str(source))
    out = cli.ok(*put, who="doctor")
    match = re.search(r"^record (\S+) v1 committed", out, re.MULTILINE)
    assert match and re.search(r"digest +[0-9a-f]{64}", out) and re.search(r"block +\d+", out)
    record_id = match.group(1)
    expected = validate_resource(resource).resource

    # The patient opens their own envelope; stdout is exactly the FHIR JSON.
    assert json.loads(cli.ok("record", "get", "--key", "patient", "--own", record_id)) == expected

    # Another organization's clinician is denied (exit code 3) until the patient consents.
    denied = cli.fails(
        "access", "request", "--key", "outsider", record_id, "--purpose", "treatment",
        who="outsider", code=3,
    )  # fmt: skip
    assert "access denied" in denied and "no consent" in denied
    out = cli.ok(
        "consent", "grant", "--key", "patient", "--patient", patient, "--org", org2,
        "--purpose", "treatment", "--until", "30d",
    )  # fmt: skip
    consent_match = re.search(r"^consent ([0-9a-f]{32}) granted in block \d+", out, re.MULTILINE)
    assert consent_match, out
    consent_id = consent_match.group(1)
    assert consent_id in cli.ok("consent", "list", "--patient", patient)

    out = cli.ok(
        "access", "request", "--key", "outsider", record_id, "--purpose", "treatment",
        who="outsider",
    )  # fmt: skip
    assert re.search(r"^granted: grant [0-9a-f]{32}", out) and f"consent {consent_id}" in out
    read = cli.run("record", "get", "--key", "outsider", record_id, who="outsider")
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout) == expected
    assert "key shares from" in read.stderr

    history = cli.ok("record", "history", record_id)
    assert "current" in history and cli.ids["doctor"] in history

    cli.ok(
        "consent", "revoke", "--key", "patient", "--patient", patient, consent_id,
        "--reason", "second opinion done",
    )  # fmt: skip
    denied = cli.fails(
        "access", "request", "--key", "outsider", record_id, "--purpose", "treatment",
        who="outsider", code=3,
    )  # fmt: skip
    assert "revoked" in denied
    assert "revoked at block" in cli.ok("consent", "list", "--patient", patient)

    # The whole trail: every access request by the outsider, each with its decision.
    result = cli.run("audit", "--key", "patient", "--patient", patient, "--format", "csv")
    assert result.returncode == 0, result.stderr
    assert re.search(r"proven against header \d+ signed by \d+/\d+ voting power", result.stderr)
    requests = [r for r in _csv(result.stdout) if r["action"] == "access.request"]
    assert [(r["member"], r["outcome"]) for r in requests] == [
        (outsider, "denied"),
        (outsider, "granted"),
        (outsider, "granted"),
        (outsider, "denied"),
    ]
    assert all(r["organization"] == org2 and r["emergency"] == "no" for r in requests)

    # The accounting of disclosures: only the granted requests, with the grant's details.
    result = cli.run(
        "audit", "--key", "patient", "--patient", patient, "--format", "csv", "--disclosures"
    )
    assert result.returncode == 0, result.stderr
    disclosures = _csv(result.stdout)
    assert len(disclosures) == 2
    for row in disclosures:
        assert row["recipient_member"] == outsider
        assert row["recipient_organization"] == org2
        assert row["recipient_role"] == "clinician"
        assert row["purpose"] == "treatment"
        assert row["record_id"] == record_id and row["version"] == "1"
        assert row["basis"] == "consent" and row["consent_id"] == consent_id
        assert row["emergency"] == "no"
        assert f"Observation record {record_id} v1" in row["description"]
    document = json.loads(
        cli.ok("audit", "--key", "patient", "--patient", patient, "--format", "json",
               "--disclosures")
    )  # fmt: skip
    assert document["proof"]["signed_power"] * 3 > document["proof"]["total_power"] * 2
    assert [d["grant_id"] for d in document["disclosures"]] == [d["grant_id"] for d in disclosures]
    table = cli.ok("audit", "--key", "patient", "--patient", patient)
    assert "proven against header" in table and "denied" in table
    # A period before anything happened holds no entries.
    early = cli.ok(
        "audit", "--key", "patient", "--patient", patient, "--format", "json",
        "--from", "2001-01-01", "--until", "2001-12-31",
    )  # fmt: skip
    assert json.loads(early)["entries"] == []

    bundle_path = tmp_path / "bundle.json"
    result = cli.run(
        "export", "--key", "patient", "--patient", patient, "--output", str(bundle_path)
    )
    assert result.returncode == 0, result.stderr
    bundle = json.loads(bundle_path.read_text())
    validate_resource(bundle)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    assert [e["resource"] for e in bundle["entry"]] == [expected]


def test_errors_are_one_clear_line_and_change_nothing(cli: Cli, tmp_path: Path) -> None:
    patient = cli.ids["patient"]
    before = _record_count(cli)

    invalid = _resource(cli, "Observation", 8)
    invalid["status"] = "finalised"
    del invalid["code"]
    path = tmp_path / "invalid.json"
    path.write_text(json.dumps(invalid))
    line = cli.fails("record", "put", "--key", "doctor", "--patient", patient, str(path))
    assert "invalid FHIR Observation resource" in line and "code" in line

    path.write_text('{"resourceType": "Observation", ')
    line = cli.fails("record", "put", "--key", "doctor", "--patient", patient, str(path))
    assert "not valid JSON" in line

    missing = tmp_path / "missing.json"
    line = cli.fails("record", "put", "--key", "doctor", "--patient", patient, str(missing))
    assert f"no such file: {missing}" in line
    assert _record_count(cli) == before

    line = cli.fails("record", "get", "--key", "patient", "--own", "no-such-record")
    assert "unknown record no-such-record" in line
    assert "unknown record" in cli.fails("record", "history", "no-such-record")

    line = cli.fails(
        "record", "get", "--key", "patient", "--own", "no-such-record", passphrase="wrong"
    )
    assert "wrong passphrase" in line
    line = cli.fails("record", "list", "--patient", patient, "--node", "http://127.0.0.1:1")
    assert "cannot reach" in line


def test_a_patient_names_a_delegate_and_nobody_else_can(cli: Cli) -> None:
    patient, outsider = cli.ids["patient"], cli.ids["outsider"]
    # The doctor cannot make anyone the patient's delegate, themselves included.
    result = cli.run(
        "consent",
        "add-delegate",
        "--key",
        "doctor",
        "--relationship",
        "proxy",
        "doctor",
        who="doctor",
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "role clinician may not send delegate.add" in result.stderr
    out = cli.ok(
        "consent", "add-delegate", "--key", "patient", "--relationship", "caregiver", "outsider"
    )
    assert f"{outsider} is your delegate (caregiver)" in out
    trail = cli.ok("audit", "--key", "patient", "--patient", patient, "--format", "json")
    assert "delegate.add" in trail
    out = cli.ok("consent", "remove-delegate", "--key", "patient", "outsider")
    assert f"{outsider} is no longer a delegate of {patient}" in out
