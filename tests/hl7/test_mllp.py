"""HL7 v2 end to end on a real 4-validator network: node 0 runs an MLLP listener acting as its
custodial laboratory-system member; an HL7 client (python-hl7's MLLP client) sends ORU^R01
results and gets AA once they are committed, and the patient reads them back decrypted;
a retransmission writes nothing, a corrected result amends; malformed messages, the wrong
message type, an unknown patient and invalid values get NAKs (AR/AE) and write nothing; and
`medledger import hl7` takes the same messages from a file."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hl7
import pytest
from click.testing import CliRunner
from hl7.client import MLLPClient
from hl7_samples import AUTHORITY, BMP, CBC, MRN, bmp, oru

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_network import (
    CHAIN_ID,
    PASSPHRASE,
    Network,
    assert_own_state_read_in_process,
    choose_ports,
    services_counters,
)

from medledger.cli.hl7 import import_group
from medledger.client.records import RecordsClient
from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import load_keystore
from medledger.hl7.mllp import MllpDecoder, frame
from medledger.hl7.oru import MRN_SYSTEM_PREFIX
from medledger.ledger.model import Member, Role
from medledger.ledger.transactions import EnrollMember
from medledger.node.testnet import init_testnet, testnet_down, testnet_up
from medledger.services.custody import Custody
from medledger.services.mpi import PatientIndex

pytestmark = pytest.mark.e2e

BASE_PORT = 29300
HL7_OFFSET = 4  # the listener's port in node 0's block of ports, which uses offsets 0-3


@dataclass
class Lab:
    network: Network
    lis: KeyPair
    patient: KeyPair
    records: RecordsClient
    hl7_port: int
    ehr: KeyPair

    def send(self, message: str) -> Any:
        """Send one message with python-hl7's MLLP client; its parsed acknowledgement."""
        with MLLPClient("127.0.0.1", self.hl7_port) as client:
            client.socket.settimeout(60)
            answer = client.send_message(message)
        assert answer.startswith(b"\x0b") and answer.endswith(b"\x1c\r"), answer
        return hl7.parse(answer[1:-2].decode("utf-8"))

    def count(self) -> int:
        return len(self.records.records_of(self.patient.member_id))

    def resources(self) -> dict[str, dict[str, Any]]:
        return {
            s.head.record_id: self.records.read_own(s.head.record_id).resource
            for s in self.records.records_of(self.patient.member_id)
        }


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    home = tmp_path_factory.mktemp("hl7") / "net"
    base_port = choose_ports(BASE_PORT)
    hl7_port = base_port + HL7_OFFSET
    network: Network | None = None
    records: RecordsClient | None = None
    try:
        configs = init_testnet(
            home, 4, CHAIN_ID, passphrase=PASSPHRASE, base_port=base_port, fast_kdf=True
        )
        node0 = configs[0]
        # The node's custodial LIS member and its [hl7] listener, configured before it starts.
        node_passphrase = (node0.home / "keys" / "node.passphrase").read_text().strip()
        custody = Custody(node0.home / "custody", node_passphrase, fast_kdf=True)
        lis = custody.create("lis")
        ehr = custody.create("ehr")  # the registration desk: ADT enrolls patients as it
        with (node0.home / "medledger.toml").open("a", encoding="utf-8") as handle:
            handle.write(
                f'\n[hl7]\nlisten = "127.0.0.1:{hl7_port}"\nmember = "{lis.member_id}"\n'
                f'registration_member = "{ehr.member_id}"\n'
                'timezone = "America/Chicago"\n'
            )
        # The patient, known to the hospital by its MRN in the node's patient index.
        patient = KeyPair.generate()
        index = PatientIndex(node0.state_dir / "patients.db")
        index.link(MRN_SYSTEM_PREFIX + AUTHORITY, MRN, patient.member_id)
        index.close()

        admins = [load_keystore(cfg.keys_dir / "admin.json", PASSPHRASE) for cfg in configs]
        network = Network(home, configs, admins, CHAIN_ID)
        testnet_up(home)
        network.wait_all_at(2, timeout=120)
        client = network.client(0)
        for keys, role in ((lis, Role.LIS), (ehr, Role.EHR), (patient, Role.PATIENT)):
            body = EnrollMember(keys.verify_key, keys.encryption_key, role)
            client.submit(admins[0], "member.enroll", body)
        records = RecordsClient(client, node0.api_url, patient)
        yield Lab(network, lis, patient, records, hl7_port, ehr)
    finally:
        if records is not None:
            records.close()
        if network is not None:
            network.close()
        if (home / "testnet.toml").exists():
            testnet_down(home, timeout=20)


def msa(ack: Any) -> tuple[str, str, str]:
    segment = ack.segment("MSA")
    return str(segment(1)), str(segment(2)), str(segment(3)) if len(segment) > 3 else ""


def by_code(resources: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    observations = [r for r in resources.values() if r["resourceType"] == "Observation"]
    return {r["code"]["coding"][0]["code"]: r for r in observations}


def test_results_over_mllp_are_acknowledged_and_recorded(lab: Lab) -> None:
    before = services_counters(lab.network.configs[0])
    ack = lab.send(oru("CBC-0001"))
    assert msa(ack)[:2] == ("AA", "CBC-0001"), msa(ack)
    # The listener looked the patient up and learned of the commit in-process.
    assert_own_state_read_in_process(before, services_counters(lab.network.configs[0]))
    msh = ack.segment("MSH")
    assert str(msh(9)) == "ACK^R01^ACK"
    assert [str(msh(n)) for n in (3, 5, 6)] == ["MEDLEDGER", "COBAS_LIS", "STMARY_LAB"]

    summaries = lab.records.records_of(lab.patient.member_id)
    assert len(summaries) == len(CBC) + 1
    # One transaction, authored by the node's LIS member.
    assert {s.latest.height for s in summaries if s.latest} == {summaries[0].latest.height}  # type: ignore[union-attr]
    assert {s.latest.author for s in summaries if s.latest} == {lab.lis.member_id}

    resources = lab.resources()
    obs = by_code(resources)
    hgb = obs["718-7"]
    assert hgb["valueQuantity"]["value"] == 11.1
    assert hgb["valueQuantity"]["code"] == "g/dL"
    assert hgb["interpretation"][0]["coding"][0]["code"] == "L"
    assert hgb["referenceRange"][0]["low"]["value"] == 12.0
    assert hgb["subject"]["reference"] == f"Patient/{lab.patient.member_id}"
    assert hgb["effectiveDateTime"] == "2026-11-01T08:45:00-05:00"
    assert obs["6690-2"]["interpretation"][0]["coding"][0]["code"] == "H"
    reports = [r for r in resources.values() if r["resourceType"] == "DiagnosticReport"]
    assert len(reports) == 1
    referenced = {ref["reference"].split("/", 1)[1] for ref in reports[0]["result"]}
    assert referenced == {r["id"] for r in obs.values()}
    assert referenced <= set(resources)  # the references are the record ids


def test_a_retransmission_writes_nothing_and_a_correction_amends(lab: Lab) -> None:
    before = lab.count()
    ack = lab.send(oru("CBC-0001"))  # the same control id: answered again
    assert msa(ack)[:2] == ("AA", "CBC-0001")
    assert lab.count() == before
    ack = lab.send(oru("CBC-0001-RESENT"))  # the same results: compared, nothing written
    assert msa(ack)[0] == "AA" and "already recorded" in msa(ack)[2]
    assert lab.count() == before

    ack = lab.send(oru("CBC-0002", status="C", values={"718-7": "11.4"}))
    assert msa(ack)[:2] == ("AA", "CBC-0002"), msa(ack)
    assert lab.count() == before
    hgb_id = next(
        k for k, r in lab.resources().items() if r["code"]["coding"][0]["code"] == "718-7"
    )
    history = lab.records.history(hgb_id)
    assert [v.version for v in history.versions] == [1, 2]
    latest = lab.records.read_own(hgb_id).resource
    assert latest["status"] == "corrected" and latest["valueQuantity"]["value"] == 11.4


def test_naks_write_nothing(lab: Lab) -> None:
    before = lab.count()
    cases = [
        ("MSH|^~\\&|COBAS_LIS|STMARY_LAB|ML|ST_MARY|2026||ORU^R01|BAD-1|P|2.5.1\rOBX|1|NM|x", "AR"),
        (oru("BAD-2", message_type="ORM^O01^ORM_O01"), "AR"),
        (oru("BAD-3", version="3.0"), "AR"),
        (oru("BAD-4", mrn="MRN99999"), "AE"),
        (oru("BAD-5", values={"718-7": "11,1"}), "AE"),
    ]
    for message, expected in cases:
        code, control_id, text = msa(lab.send(message))
        assert (code, control_id) == (expected, message.split("|")[9]), text
    assert msa(lab.send(oru("BAD-4", mrn="MRN99999")))[2] == "unknown patient identifier"

    # Two unreadable frames in one write: two ARs, in order, on the same connection.
    with socket.create_connection(("127.0.0.1", lab.hl7_port), timeout=30) as sock:
        sock.sendall(frame(b"garbage one") + frame(b"MSH|^~\\&|A|B|C|D|2026||ORU^R01|G2|P"))
        decoder = MllpDecoder()
        answers: list[bytes] = []
        while len(answers) < 2:
            data = sock.recv(4096)
            assert data, "the listener closed the connection"
            answers.extend(decoder.feed(data))
    codes = [msa(hl7.parse(a.decode()))[:2] for a in answers]
    assert codes == [("AR", ""), ("AR", "G2")]
    assert lab.count() == before


def test_import_hl7_from_a_file(lab: Lab, tmp_path: Path) -> None:
    before = lab.count()
    path = tmp_path / "results.hl7"
    path.write_text(
        bmp("BMP-0001").replace("\r", "\n") + oru("BMP-0002", mrn="MRN99999").replace("\r", "\n"),
        encoding="utf-8",
    )
    home = lab.network.configs[0].home
    result = CliRunner().invoke(import_group, ["hl7", str(path), "--home", str(home)])
    assert result.exit_code == 1, result.output
    assert (
        f"2 messages: 1 accepted ({len(BMP) + 1} records written, 0 unchanged), 1 rejected"
        in result.output
    )
    assert "BMP-0002: AE unknown patient identifier" in result.output
    assert lab.count() == before + len(BMP) + 1
    glucose = by_code(lab.resources())["2345-7"]
    assert glucose["valueQuantity"]["value"] == 182
    assert glucose["interpretation"][0]["coding"][0]["code"] == "H"

    again = CliRunner().invoke(import_group, ["hl7", str(path), "--home", str(home), "--json"])
    assert again.exit_code == 1
    assert '"ack": "AA"' in again.output and '"written": []' in again.output
    assert lab.count() == before + len(BMP) + 1


def admission(control_id: str, mrn: str, family: str, trigger: str = "A04") -> str:
    return "\r".join(
        [
            f"MSH|^~\\&|EPIC_ADT|ST_MARY|MEDLEDGER|ST_MARY|20261101080000||ADT^{trigger}^ADT_A01"
            f"|{control_id}|P|2.5.1",
            f"EVN|{trigger}|20261101080000",
            f"PID|1||{mrn}^^^{AUTHORITY}^MR||{family}^Maria||19900101|F",
        ]
    )


def test_adt_registers_a_patient_whose_results_follow(lab: Lab, tmp_path: Path) -> None:
    ack = lab.send(admission("ADT-1", "MRN-NEW-1", "Lopez"))
    assert msa(ack)[:3] == ("AA", "ADT-1", "patient registered"), msa(ack)
    index = PatientIndex(lab.network.configs[0].state_dir / "patients.db")
    try:
        patient = index.resolve(MRN_SYSTEM_PREFIX + AUTHORITY, "MRN-NEW-1")
    finally:
        index.close()
    assert patient is not None
    client = lab.network.client(0)
    assert client.query("/member", patient, Member).role is Role.PATIENT
    # Its Patient record, written by the registration member, under the patient's id.
    history = lab.records.history(patient)
    assert history.versions[0].resource_type == "Patient"
    assert history.versions[0].author == lab.ehr.member_id

    ack = lab.send(oru("ADT-ORU-1", mrn="MRN-NEW-1", filler="LAB-NEW-1", placer="ORD-NEW-1"))
    assert msa(ack)[0] == "AA", msa(ack)
    assert len(lab.records.records_of(patient)) == 1 + len(CBC) + 1

    ack = lab.send(admission("ADT-2", "MRN-NEW-1", "Lopez-Garcia", trigger="A08"))
    assert msa(ack)[:3] == ("AA", "ADT-2", "patient updated"), msa(ack)
    assert [v.version for v in lab.records.history(patient).versions] == [1, 2]

    # A batch file of two admissions, from `medledger import hl7`.
    path = tmp_path / "admissions.hl7"
    path.write_text(
        "\n".join(
            [
                "BHS|^~\\&|EPIC_ADT|ST_MARY|MEDLEDGER|ST_MARY|20261101||||B-1",
                admission("ADT-3", "MRN-NEW-2", "Okafor"),
                admission("ADT-4", "MRN-NEW-3", "Chen"),
                "BTS|2",
            ]
        ),
        encoding="utf-8",
    )
    home = lab.network.configs[0].home
    result = CliRunner().invoke(import_group, ["hl7", str(path), "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert "2 messages: 2 accepted" in result.output

    # A broken batch file is refused whole, with python-hl7's reason.
    broken = tmp_path / "broken.hl7"
    broken.write_text(
        "\n".join(
            [
                "BHS|^~\\&|EPIC_ADT|ST_MARY|MEDLEDGER|ST_MARY|20261101||||B-2",
                admission("ADT-5", "MRN-NEW-4", "Silva"),
                "BHS|^~\\&|EPIC_ADT|ST_MARY|MEDLEDGER|ST_MARY|20261101||||B-3",
                "BTS|1",
            ]
        ),
        encoding="utf-8",
    )
    result = CliRunner().invoke(import_group, ["hl7", str(broken), "--home", str(home)])
    assert result.exit_code == 1, result.output
    assert "Batch cannot have more than one BHS segment" in result.output
