"""The commands the demo prints, without a network: `medledger client keygen` and `client
token` refuse unusable key files, `medledger hl7 send` splits files into messages as a
laboratory system sends them and answers exit status 2 when no listener answers. (The same
commands against a real network: tests/cli/test_demo_integration.py.)"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from click.testing import CliRunner

from medledger.cli.main import cli
from medledger.cli.mllp_send import messages_of, read_acknowledgement
from medledger.client.smart import client_assertion, read_client_key

MESSAGE = (
    "MSH|^~\\&|DEMO_LIS|STMARY_LAB|MEDLEDGER|org-1|20261203093000||ORU^R01|{id}|P|2.5.1\n"
    "PID|1||DEMO-0001^^^STMARY&2.16.840.1.113883.19.5&ISO^MR||Rivera^Ana\n"
    "OBX|1|NM|718-7^Hemoglobin^LN||11.1|g/dL|12.0-15.5|L|||F\n"
)


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    out = tmp_path / "client.jwk"
    runner = CliRunner()
    made = runner.invoke(
        cli,
        [
            *("client", "keygen", "--client-id", "lab-7"),
            *("--scope", "system/Observation.rs", "--out", str(out)),
        ],
    )
    assert made.exit_code == 0, made.output
    assert out.stat().st_mode & 0o777 == 0o600
    key = read_client_key(out)
    assert (key.client_id, key.scope, key.algorithm) == ("lab-7", "system/Observation.rs", "EdDSA")
    public = json.loads((tmp_path / "client.jwk.pub").read_text())
    assert "d" not in public and public["kty"] == "OKP" and public["kid"] == "lab-7"
    again = runner.invoke(cli, ["client", "keygen", "--client-id", "x", "--out", str(out)])
    assert again.exit_code == 1 and "exists" in again.output
    assertion = client_assertion(key, "http://node/fhir/auth/token")
    assert assertion.count(".") == 2


def test_token_refuses_a_public_key_file_and_one_without_client_id(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "client.jwk"
    runner.invoke(cli, ["client", "keygen", "--client-id", "lab-7", "--out", str(out)])
    public = runner.invoke(
        cli, ["client", "token", "--jwk", str(tmp_path / "client.jwk.pub"), "--api", "http://x"]
    )
    assert public.exit_code == 1
    assert "holds a public key" in public.output
    anonymous = tmp_path / "anonymous.jwk"
    document = json.loads(out.read_text())
    del document["client_id"]
    anonymous.write_text(json.dumps(document))
    nameless = runner.invoke(cli, ["client", "token", "--jwk", str(anonymous), "--api", "http://x"])
    assert nameless.exit_code == 1
    assert "names no client_id: pass --client-id" in nameless.output


def test_token_names_the_node_it_cannot_reach(tmp_path: Path) -> None:
    out = tmp_path / "client.jwk"
    runner = CliRunner()
    runner.invoke(cli, ["client", "keygen", "--client-id", "lab-7", "--out", str(out)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answer = runner.invoke(
        cli, ["client", "token", "--jwk", str(out), "--api", f"http://127.0.0.1:{port}"]
    )
    assert answer.exit_code == 1
    assert f"cannot read http://127.0.0.1:{port}/fhir/.well-known/smart-configuration" in (
        answer.output
    )


def test_a_file_of_messages_is_sent_one_message_at_a_time() -> None:
    payload = ("\ufeff" + MESSAGE.format(id="A1") + MESSAGE.format(id="A2")).encode()
    messages, codec = messages_of(payload.replace(b"\n", b"\r\n"))
    assert codec == "utf-8"
    assert len(messages) == 2
    assert all(m.startswith("MSH|") and "\n" not in m and m.endswith("\r") for m in messages)
    assert "|A2|" in messages[1]


def test_a_batch_file_is_sent_whole() -> None:
    batch = "FHS|^~\\&|DEMO_LIS\nBHS|^~\\&|DEMO_LIS\n" + MESSAGE.format(id="B1") + "BTS|1\nFTS|1\n"
    messages, _codec = messages_of(batch.encode())
    assert len(messages) == 1
    assert messages[0].startswith("FHS|") and "BTS|1\rFTS|1\r" in messages[0]


def test_an_acknowledgement_reads_its_code_control_id_and_reasons() -> None:
    ack = read_acknowledgement(
        b"MSH|^~\\&|MEDLEDGER|org-1|DEMO_LIS|STMARY_LAB|20261203||ACK^R01|9|P|2.5.1\r"
        b"MSA|AE|A1|unknown patient identifier\r"
        b"ERR||PID^1^3|204^Unknown key identifier^HL70357|E||||unknown patient identifier\r",
        "utf-8",
    )
    assert (ack.code, ack.control_id, ack.accepted) == ("AE", "A1", False)
    assert ack.text == "unknown patient identifier"
    truncated = read_acknowledgement(
        b"MSH|^~\\&|MEDLEDGER|org-1|LIS|LAB|20261203||ACK^R01|9|P|2.5.1\r"
        b"MSA|AR|A2|MSH-11: processing id T is not...\r"
        b"ERR||MSH^1^11|202^Unsupported^HL70357|E||||MSH-11: processing id T is not accepted\r"
        b"ERR||PID^1^3|204^Unknown key identifier^HL70357|E||||unknown patient identifier\r",
        "utf-8",
    )
    assert truncated.text == ("MSH-11: processing id T is not accepted; unknown patient identifier")


def test_send_without_a_listener_exits_2(tmp_path: Path) -> None:
    message = tmp_path / "oru.hl7"
    message.write_text(MESSAGE.format(id="C1"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(cli, ["hl7", "send", str(message), "--to", f"127.0.0.1:{port}"])
    assert result.exit_code == 2
    assert f"no acknowledgement from 127.0.0.1:{port}" in result.output


def test_send_refuses_a_file_without_messages_and_a_bad_address(tmp_path: Path) -> None:
    empty = tmp_path / "empty.hl7"
    empty.write_text("not hl7\n")
    runner = CliRunner()
    nothing = runner.invoke(cli, ["hl7", "send", str(empty), "--to", "127.0.0.1:2575"])
    assert nothing.exit_code == 2 and "holds no HL7 message" in nothing.output
    address = runner.invoke(cli, ["hl7", "send", str(empty), "--to", "localhost"])
    assert address.exit_code == 2 and "--to must be host:port" in address.output
