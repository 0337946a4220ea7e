"""`make demo` on a real 4-validator network of its own (a temporary home, its own ports): the
integration commands it prints — a token request, a FHIR search and two MLLP sends, a
laboratory result and an ADT^A04 that registers a patient (node 0's `[hl7]` table names the
demo's custodial EHR member as `registration_member`) — work exactly as printed, and the
identities they use are refused what they must not do: the demo EHR client cannot write a
Consent, a token request signed with another key is refused, and an ADT from a sender the
listener does not allow registers nobody. A second run on a node 0 that lost its listener
restarts it and changes nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomlkit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_network import choose_ports

from medledger.config import load_node_config
from medledger.node.testnet import node_down, node_homes, node_up, testnet_down

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BASE_PORT = 32600
INTEGRATION_HEADER = "EHR and LIS integration"


@dataclass(frozen=True)
class Demo:
    home: Path
    output: str

    @property
    def commands(self) -> list[str]:
        """The integration block's command lines, as printed (comments left out)."""
        block = self.output.split(INTEGRATION_HEADER, 1)[1].splitlines()[1:]
        return [line.strip() for line in block if line.strip() and not line.strip().startswith("#")]

    @property
    def api_url(self) -> str:
        return load_node_config(node_homes(self.home)[0]).api_url


def run_demo(home: Path, base_port: int | None = None) -> str:
    ports = [] if base_port is None else ["--base-port", str(base_port)]
    result = subprocess.run(
        [sys.executable, "-m", "medledger.cli.demo", "--home", str(home), *ports],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout


def run_bash(script: str) -> subprocess.CompletedProcess[str]:
    """Run shell lines from the repository root, as the demo tells a user to."""
    return subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    home = tmp_path_factory.mktemp("demo") / "testnet"
    try:
        yield Demo(home, run_demo(home, choose_ports(BASE_PORT)))
    finally:
        if (home / "testnet.toml").exists():
            testnet_down(home, timeout=20)


def test_the_printed_token_request_search_and_mllp_send_work(demo: Demo, tmp_path: Path) -> None:
    token, search, send, _register = demo.commands
    assert token.startswith("TOKEN=$(.venv/bin/medledger client token --jwk ")
    assert search.startswith("curl ")
    assert send.startswith(".venv/bin/medledger hl7 send ")
    before, after, ack, issued = (tmp_path / n for n in ("before", "after", "ack", "token"))
    script = "\n".join(
        [
            token,
            f'printf %s "$TOKEN" > {issued}',
            f"{search} > {before}",
            f"{send} > {ack}",
            f"{search} > {after}",
        ]
    )
    result = run_bash(script)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert len(issued.read_text()) >= 32
    first = json.loads(before.read_text())
    assert first["resourceType"] == "Bundle" and first["type"] == "searchset"
    assert first["total"] == 0
    assert ack.read_text().strip() == "DEMO-ORU-0001: AA"
    second = json.loads(after.read_text())
    assert second["resourceType"] == "Bundle"
    codes = sorted(
        entry["resource"]["code"]["coding"][0]["code"] for entry in second.get("entry", [])
    )
    assert codes == ["6690-2", "718-7", "777-3"]
    jwk = demo.home.parent / "ehr-client.jwk"
    assert jwk.stat().st_mode & 0o777 == 0o600
    assert json.loads(jwk.read_text())["client_id"] == "demo-ehr"


def fhir_search(token_line: str, url: str) -> dict[str, Any]:
    """A FHIR search with the demo EHR client's token, as a user runs it from the shell."""
    result = run_bash(
        f'{token_line}\ncurl -sf -H "Authorization: Bearer $TOKEN"'
        f' -H "Accept: application/fhir+json" "{url}"'
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    bundle: dict[str, Any] = json.loads(result.stdout)
    assert bundle["resourceType"] == "Bundle"
    return bundle


def test_the_printed_adt_send_registers_a_patient_as_the_ehr_member(demo: Demo) -> None:
    token, _, _, register = demo.commands
    assert register.startswith(".venv/bin/medledger hl7 send ") and "sample-adt.hl7" in register
    node0 = node_homes(demo.home)[0]
    table = tomlkit.parse((node0 / "medledger.toml").read_text(encoding="utf-8"))["hl7"]
    custody = run_bash(f".venv/bin/medledger custody list --home {node0}")
    assert custody.returncode == 0, custody.stderr
    custodial = dict(line.split("\t", 1) for line in custody.stdout.splitlines())
    assert table["registration_member"] == custodial["ehr"]
    search = f"{demo.api_url}/fhir/Patient?identifier=urn:oid:2.16.840.1.113883.19.5|DEMO-0002"
    assert fhir_search(token, search)["total"] == 0

    # From a registration system the listener does not allow: AR, nobody registered.
    adt_file = demo.home.parent / "sample-adt.hl7"
    stranger = adt_file.with_name("stranger-adt.hl7")
    stranger.write_text(
        adt_file.read_text().replace("|DEMO_ADT|STMARY|", "|OTHER_ADT|ELSEWHERE|", 1)
    )
    refused = run_bash(register.replace(str(adt_file), str(stranger)))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stdout.startswith("DEMO-ADT-0001: AR ")
    assert "is not allowed on this node" in refused.stdout
    assert fhir_search(token, search)["total"] == 0

    result = run_bash(register)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "DEMO-ADT-0001: AA patient registered"
    found = fhir_search(token, search)
    assert found["total"] == 1
    patient = found["entry"][0]["resource"]
    assert patient["name"] == [{"family": "Okafor", "given": ["Grace"]}]
    assert patient["birthDate"] == "1985-07-04"


def test_the_demo_ehr_client_cannot_write_a_consent(demo: Demo) -> None:
    token_line = demo.commands[0]
    result = run_bash(f'{token_line}\nprintf %s "$TOKEN"')
    assert result.returncode == 0, result.stderr
    patient = demo.commands[1].split("patient=", 1)[1].split("&", 1)[0]
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
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient}"},
    }
    answer = httpx.post(
        f"{demo.api_url}/fhir/Consent",
        json=consent,
        headers={
            "Authorization": f"Bearer {result.stdout}",
            "Content-Type": "application/fhir+json",
        },
        timeout=60,
    )
    assert answer.status_code == 403
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "cannot grant, change or revoke consent" in json.dumps(outcome)


def test_a_token_request_signed_with_another_key_is_refused(demo: Demo, tmp_path: Path) -> None:
    other = tmp_path / "other.jwk"
    made = run_bash(f".venv/bin/medledger client keygen --client-id demo-ehr --out {other}")
    assert made.returncode == 0, made.stderr
    printed = demo.commands[0]
    assert str(demo.home.parent / "ehr-client.jwk") in printed
    forged = printed.replace(str(demo.home.parent / "ehr-client.jwk"), str(other))
    result = run_bash(f'{forged}\nprintf %s "$TOKEN"')
    assert result.returncode == 1
    assert result.stdout == ""
    assert "HTTP 401 invalid_client" in result.stderr
    assert "signature does not verify" in result.stderr


def test_a_second_run_restarts_a_node_0_without_its_listener(demo: Demo) -> None:
    node0 = node_homes(demo.home)[0]
    config = node0 / "medledger.toml"
    document = tomlkit.parse(config.read_text(encoding="utf-8"))
    del document["hl7"]
    config.write_text(tomlkit.dumps(document), encoding="utf-8")
    node_down(node0)
    node_up(node0)
    again = run_demo(demo.home)
    assert "restarting node0 so that its HL7 listener runs" in again
    assert Demo(demo.home, again).commands == demo.commands
    integration = again.split("integration: ", 1)[1].split("\n\n", 1)[0]
    assert " enrolled" not in integration and "(registered)" not in integration
    assert "registered by the EHR through FHIR" not in integration
    # The same result again: acknowledged, nothing written twice.
    result = run_bash(demo.commands[2])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("DEMO-ORU-0001: ")
