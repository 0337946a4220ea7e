"""HL7 v2 as integration engines speak it, end to end: a real 4-validator network whose node 0
runs the MLLP listener of test_mllp.py (its `lab` fixture: results written by a custodial LIS
member, patients registered by a custodial EHR member), every message over a real socket, and
everything read back through the node's FHIR API as a SMART client of that EHR member.

What is asserted, as src/medledger/hl7/ implements it:
- ADT^A04, A28 and A01 enroll a new patient, record its FHIR Patient under its member id and
  link its PID-3 identifier in node 0's patient index (FHIR `Patient?identifier=` finds it);
  A08 amends the Patient record (version 2), and the same A08 again writes nothing.
- ADT^A40 re-links the prior patient's MRG-1 identifier to the surviving patient (PID-3): a
  later ORU naming the prior identifier is filed under the survivor; the prior patient's own
  records stay where they are (nothing is moved or copied).
- Enhanced mode (MSH-15 AL, MSH-16 AL): the one answer is the commit ack, CA once the results
  are committed (they are on the ledger when it arrives), CE or CR when refused. No separate
  application ack (AA/AE/AR) follows on the connection: the next frame answers the next message.
- A batch file (FHS/BHS, two ORU^R01, BTS/FTS) in one MLLP frame is answered with a batch of
  acks naming the file and batch (FHS-12, BHS-12) and counting them (BTS-1, FTS-1); both
  results are on the ledger.
- Refused, writing nothing: an ADT with processing id T on this P-only node (AR; no patient
  keys, no index entry), an A40 whose prior patient is unknown (AE 204; the identifier names
  nobody after it), one whose prior identifiers name two patients (AE 205) and one whose
  surviving patient is unknown (AE 204)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import hl7
import httpx
import pytest
import test_mllp
from hl7.client import MLLPClient
from hl7_samples import AUTHORITY, BMP, CBC, bmp, oru
from test_mllp import Lab, msa

from medledger.client.smart import ClientKey, generate_client_key, request_token
from medledger.hl7.oru import MRN_SYSTEM_PREFIX
from medledger.ledger.clients import RegisterClient
from medledger.ledger.model import Member, Role
from medledger.services.custody import Custody

pytestmark = pytest.mark.e2e

# test_mllp.py's network fixture: this module starts its own network with it.
lab = test_mllp.lab

SYSTEM = MRN_SYSTEM_PREFIX + AUTHORITY
CLIENT_ID = "adt-e2e-ehr"
SCOPES = ("system/*.rs",)
REPORT_AND_CBC = len(CBC) + 1


def adt(
    control_id: str,
    trigger: str,
    mrn: str,
    family: str,
    *,
    given: str = "Maria",
    processing: str = "P",
    acks: str = "",
    prior: str = "",
    address: str = "",
) -> str:
    """An ADT message of the hospital's registration system; `acks` is MSH-15 and MSH-16 as
    "AL|AL", `prior` the MRNs of an A40's MRG-1 (repeats separated by ~)."""
    structure = {"A28": "ADT_A05", "A31": "ADT_A05", "A40": "ADT_A39"}.get(trigger, "ADT_A01")
    segments = [
        f"MSH|^~\\&|EPIC_ADT|ST_MARY|MEDLEDGER|ST_MARY|20261101080000||ADT^{trigger}^{structure}"
        f"|{control_id}|{processing}|2.5.1" + (f"|||{acks}" if acks else ""),
        f"EVN|{trigger}|20261101080000",
        f"PID|1||{mrn}^^^{AUTHORITY}^MR||{family}^{given}||19900101|F|||{address}",
    ]
    if prior:
        segments.append("MRG|" + "~".join(f"{m}^^^{AUTHORITY}^MR" for m in prior.split("~")))
    return "\r".join(segments)


def enhanced(message: str) -> str:
    """The message with MSH-15 and MSH-16 AL (the samples leave 13 to 17 empty)."""
    return message.replace("|2.5.1||||||UNICODE UTF-8", "|2.5.1|||AL|AL||UNICODE UTF-8", 1)


def exchange(client: MLLPClient, message: str) -> str:
    answer: bytes = client.send_message(message)
    assert answer.startswith(b"\x0b") and answer.endswith(b"\x1c\r"), answer
    return answer[1:-2].decode("utf-8")


@dataclass
class Fhir:
    """Node 0's FHIR API as a SMART system client of the EHR member that registers patients."""

    api_url: str
    key: ClientKey

    def search(self, resource: str, **params: str) -> list[dict[str, Any]]:
        token = request_token(self.api_url, self.key)["access_token"]
        answer = httpx.get(
            f"{self.api_url}/fhir/{resource}",
            params=params,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        bundle = answer.json()
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
        return [entry["resource"] for entry in bundle.get("entry", [])]

    def patients(self, mrn: str) -> list[dict[str, Any]]:
        return self.search("Patient", identifier=f"{SYSTEM}|{mrn}")

    def patient(self, mrn: str) -> dict[str, Any]:
        [found] = self.patients(mrn)
        return found


@pytest.fixture(scope="module")
def fhir(lab: Lab) -> Fhir:
    key = generate_client_key(CLIENT_ID, " ".join(SCOPES))
    body = RegisterClient(CLIENT_ID, lab.ehr.member_id, key.public_jwk(), SCOPES)
    lab.network.client(0).submit(lab.network.admins[0], "client.register", body)
    return Fhir(lab.network.configs[0].api_url, key)


def custodial_members(lab: Lab) -> int:
    home = lab.network.configs[0].home
    passphrase = (home / "keys" / "node.passphrase").read_text().strip()
    return len(Custody(home / "custody", passphrase, fast_kdf=True).members())


def test_adt_registers_and_updates_patients(lab: Lab, fhir: Fhir) -> None:
    ack = lab.send(adt("REG-1", "A04", "E2E-A", "Rivera"))
    assert msa(ack) == ("AA", "REG-1", "patient registered"), msa(ack)
    assert str(ack.segment("MSH")(9)) == "ACK^A04^ACK"
    ack = lab.send(adt("REG-2", "A28", "E2E-B", "Okafor", given="Grace"))
    assert msa(ack) == ("AA", "REG-2", "patient registered"), msa(ack)

    rivera, okafor = fhir.patient("E2E-A"), fhir.patient("E2E-B")
    assert rivera["id"] != okafor["id"]
    assert rivera["name"] == [{"family": "Rivera", "given": ["Maria"]}]
    assert (rivera["birthDate"], rivera["gender"]) == ("1990-01-01", "female")
    assert [(i["system"], i["value"]) for i in rivera["identifier"]] == [(SYSTEM, "E2E-A")]
    assert okafor["name"][0]["given"] == ["Grace"]
    client = lab.network.client(0)
    for patient in (rivera, okafor):
        # Enrolled on the ledger as a patient; its Patient record, under its own member id,
        # written by the registration member.
        assert client.query("/member", patient["id"], Member).role is Role.PATIENT
        [version] = lab.records.history(patient["id"]).versions
        assert (version.resource_type, version.author) == ("Patient", lab.ehr.member_id)

    moved = "1 Lake Rd^^Springfield^IL^62704"
    ack = lab.send(adt("UPD-1", "A08", "E2E-A", "Rivera-Lopez", address=moved))
    assert msa(ack) == ("AA", "UPD-1", "patient updated"), msa(ack)
    updated = fhir.patient("E2E-A")
    assert updated["id"] == rivera["id"]
    assert updated["name"][0]["family"] == "Rivera-Lopez"
    assert updated["address"] == [
        {"line": ["1 Lake Rd"], "city": "Springfield", "state": "IL", "postalCode": "62704"}
    ]
    assert [v.version for v in lab.records.history(rivera["id"]).versions] == [1, 2]

    ack = lab.send(adt("UPD-2", "A08", "E2E-A", "Rivera-Lopez", address=moved))
    assert msa(ack) == ("AA", "UPD-2", "already recorded: the patient is unchanged"), msa(ack)
    assert [v.version for v in lab.records.history(rivera["id"]).versions] == [1, 2]


def test_a40_files_later_results_for_the_prior_identifier_under_the_survivor(
    lab: Lab,
    fhir: Fhir,
) -> None:
    assert msa(lab.send(adt("MRG-1", "A01", "E2E-SURVIVOR", "Chen")))[0] == "AA"
    assert msa(lab.send(adt("MRG-2", "A04", "E2E-PRIOR", "Chen")))[0] == "AA"
    survivor, prior = fhir.patient("E2E-SURVIVOR")["id"], fhir.patient("E2E-PRIOR")["id"]
    assert survivor != prior

    ack = lab.send(adt("MRG-3", "A40", "E2E-SURVIVOR", "Chen", prior="E2E-PRIOR"))
    assert msa(ack) == (
        "AA",
        "MRG-3",
        "merged: 1 prior identifiers now name the surviving patient",
    ), msa(ack)
    assert fhir.patient("E2E-PRIOR")["id"] == survivor

    results = oru("MRG-ORU-1", mrn="E2E-PRIOR", filler="LAB-MRG-1", placer="ORD-MRG-1")
    assert msa(lab.send(results))[:2] == ("AA", "MRG-ORU-1")
    assert len(lab.records.records_of(survivor)) == 1 + REPORT_AND_CBC
    observations = fhir.search("Observation", patient=survivor)
    assert sorted(o["code"]["coding"][0]["code"] for o in observations) == sorted(
        a.loinc for a in CBC
    )
    assert {o["subject"]["reference"] for o in observations} == {f"Patient/{survivor}"}
    # The prior patient keeps its own Patient record and receives nothing more.
    assert [s.head.record_id for s in lab.records.records_of(prior)] == [prior]
    assert lab.network.client(0).query("/member", prior, Member).role is Role.PATIENT


def test_enhanced_mode_answers_the_commit_ack_once_committed(
    lab: Lab,
    fhir: Fhir,
) -> None:
    assert msa(lab.send(adt("ENH-0", "A04", "E2E-ENH", "Novak")))[0] == "AA"
    patient = fhir.patient("E2E-ENH")["id"]
    first = enhanced(oru("ENH-1", mrn="E2E-ENH", filler="LAB-ENH-1", placer="ORD-ENH-1"))
    unknown = enhanced(oru("ENH-2", mrn="E2E-NOBODY", filler="LAB-ENH-2", placer="ORD-ENH-2"))
    not_production = adt("ENH-3", "A04", "E2E-TRAINING", "Novak", processing="T", acks="AL|AL")
    with MLLPClient("127.0.0.1", lab.hl7_port) as client:
        client.socket.settimeout(60)
        committed = hl7.parse(exchange(client, first))
        # CA is sent once the results are committed: they are on the ledger as it arrives.
        assert msa(committed)[:2] == ("CA", "ENH-1"), msa(committed)
        assert len(lab.records.records_of(patient)) == 1 + REPORT_AND_CBC
        assert str(committed.segment("MSH")(9)) == "ACK^R01^ACK"
        # The same connection's next frame answers the next message: no application ack
        # (MSH-16) was queued behind the CA.
        refused = hl7.parse(exchange(client, unknown))
        assert msa(refused) == ("CE", "ENH-2", "unknown patient identifier"), msa(refused)
        rejected = hl7.parse(exchange(client, not_production))
        assert msa(rejected)[:2] == ("CR", "ENH-3"), msa(rejected)
    assert fhir.patients("E2E-NOBODY") == [] and fhir.patients("E2E-TRAINING") == []


def test_a_batch_file_over_mllp_gets_a_batch_ack_and_both_results_are_recorded(
    lab: Lab,
    fhir: Fhir,
) -> None:
    assert msa(lab.send(adt("BAT-0", "A04", "E2E-BATCH-1", "Silva")))[0] == "AA"
    assert msa(lab.send(adt("BAT-00", "A04", "E2E-BATCH-2", "Haddad")))[0] == "AA"
    first, second = fhir.patient("E2E-BATCH-1")["id"], fhir.patient("E2E-BATCH-2")["id"]
    messages = [
        oru("BAT-1", mrn="E2E-BATCH-1", filler="LAB-BAT-1", placer="ORD-BAT-1"),
        bmp("BAT-2", mrn="E2E-BATCH-2"),
    ]
    batch = "\r".join(
        [
            "FHS|^~\\&|COBAS_LIS|STMARY_LAB|MEDLEDGER|ST_MARY|20261101100000||||FILE-7",
            "BHS|^~\\&|COBAS_LIS|STMARY_LAB|MEDLEDGER|ST_MARY|20261101100000||||BATCH-7",
            *(m.rstrip("\r") for m in messages),
            "BTS|2",
            "FTS|1",
        ]
    )
    with MLLPClient("127.0.0.1", lab.hl7_port) as client:
        client.socket.settimeout(120)
        answer = exchange(client, batch)
    lines = answer.split("\r")
    assert [line[:3] for line in lines] == [
        *("FHS", "BHS"),
        *("MSH", "MSA", "MSH", "MSA"),
        *("BTS", "FTS"),
    ], answer
    assert lines[0].startswith("FHS|^~\\&|MEDLEDGER|")
    assert lines[0].endswith("|FILE-7") and lines[1].endswith("|BATCH-7")
    assert (lines[-2], lines[-1]) == ("BTS|2", "FTS|1")
    acks = [line.split("|")[1:3] for line in lines if line.startswith("MSA")]
    assert acks == [["AA", "BAT-1"], ["AA", "BAT-2"]], answer
    assert len(lab.records.records_of(first)) == 1 + REPORT_AND_CBC
    assert len(lab.records.records_of(second)) == 1 + len(BMP) + 1
    glucose = fhir.search("Observation", patient=second, code="2345-7")
    assert [o["valueQuantity"]["value"] for o in glucose] == [182]


def test_what_must_not_pass_changes_nothing(lab: Lab, fhir: Fhir) -> None:
    keys = custodial_members(lab)
    # A training message on a production-only node: refused before anything is read.
    ack = lab.send(adt("NOP-1", "A04", "E2E-T", "Test", processing="T"))
    code, control_id, _ = msa(ack)
    assert (code, control_id) == ("AR", "NOP-1")
    assert "[hl7] processing_ids = ['P']" in str(ack.segment("ERR")(8))
    assert fhir.patients("E2E-T") == []
    assert custodial_members(lab) == keys  # no patient keys were made

    assert msa(lab.send(adt("NOP-2", "A04", "E2E-KEEP", "Keller")))[0] == "AA"
    keep = fhir.patient("E2E-KEEP")
    keys = custodial_members(lab)
    # A merge whose prior patient nobody registered: the unknown identifier is not linked.
    ack = lab.send(adt("NOP-3", "A40", "E2E-KEEP", "Keller", prior="E2E-TYPO"))
    assert msa(ack)[:2] == ("AE", "NOP-3"), msa(ack)
    assert "the prior patient (MRG-1) is not known on this node" in msa(ack)[2]
    assert str(ack.segment("ERR")(3)).startswith("204^")
    assert fhir.patients("E2E-TYPO") == []
    # A merge whose prior identifiers name two patients would merge three charts.
    for number, mrn in enumerate(("E2E-TWIN-1", "E2E-TWIN-2")):
        assert msa(lab.send(adt(f"NOP-T{number}", "A04", mrn, "Keller")))[0] == "AA"
    twins = [fhir.patient(mrn)["id"] for mrn in ("E2E-TWIN-1", "E2E-TWIN-2")]
    keys = custodial_members(lab)
    ack = lab.send(adt("NOP-4", "A40", "E2E-KEEP", "Keller", prior="E2E-TWIN-1~E2E-TWIN-2"))
    assert msa(ack)[:2] == ("AE", "NOP-4"), msa(ack)
    assert "the MRG-1 identifiers name different patients" in msa(ack)[2]
    assert [fhir.patient(mrn)["id"] for mrn in ("E2E-TWIN-1", "E2E-TWIN-2")] == twins
    # A merge into a surviving patient nobody registered: the prior keeps its identifier.
    ack = lab.send(adt("NOP-5", "A40", "E2E-NOBODY", "Keller", prior="E2E-KEEP"))
    assert msa(ack)[:2] == ("AE", "NOP-5") and "surviving patient" in msa(ack)[2], msa(ack)
    assert fhir.patients("E2E-NOBODY") == []
    assert fhir.patient("E2E-KEEP") == keep
    assert [v.version for v in lab.records.history(keep["id"]).versions] == [1]
    assert custodial_members(lab) == keys
