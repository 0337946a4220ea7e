"""ORU^R01 parsing and mapping to FHIR R4, and the processor's acknowledgements, with a fake
ledger: what a laboratory system's messages become, and what is refused (and not written)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import hl7
import pytest
from hl7_samples import AUTHORITY, BMP, CBC, MRN, bmp, oru
from ledger_doubles import FakeLedger

from medledger.hl7.ingest import Hl7Processor, Outcome, RecordWriter, decode_payload
from medledger.hl7.oru import (
    MRN_SYSTEM_PREFIX,
    AckCode,
    ErrorLocation,
    Hl7Error,
    check_header,
    fhir_datetime,
    map_message,
    parse_message,
    read_header,
    read_oru,
    split_messages,
)
from medledger.validation import validate_resource

PATIENT = "p" + "1" * 39
OTHER_PATIENT = "p" + "2" * 39
NOW = datetime(2026, 11, 1, 15, 0, 0, tzinfo=UTC)


def mapped(text: str, zone: Any = UTC) -> list[dict[str, Any]]:
    message = parse_message(text)
    header = read_header(message)
    check_header(header)
    records = map_message(read_oru(message, header), [PATIENT], zone)
    return [r.resource for r in records]


def ucum(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}


def observations(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        r["code"]["coding"][0]["code"]: r for r in resources if r["resourceType"] == "Observation"
    }


# -- mapping -------------------------------------------------------------------------------------


def test_cbc_maps_to_observations_and_a_report() -> None:
    resources = mapped(oru("CBC0001"))
    assert [r["resourceType"] for r in resources] == ["Observation"] * 6 + ["DiagnosticReport"]
    for resource in resources:
        validate_resource(resource)  # valid FHIR R4
        assert resource["subject"] == {"reference": f"Patient/{PATIENT}"}

    obs = observations(resources)
    hgb = obs["718-7"]
    assert hgb["status"] == "final"
    assert hgb["code"]["coding"][0]["system"] == "http://loinc.org"
    assert hgb["valueQuantity"] == {
        "value": 11.1,
        "unit": "g/dL",
        "system": "http://unitsofmeasure.org",
        "code": "g/dL",
    }
    assert hgb["referenceRange"] == [{"low": ucum(12.0, "g/dL"), "high": ucum(15.5, "g/dL")}]
    assert hgb["interpretation"][0]["coding"][0]["code"] == "L"
    assert hgb["effectiveDateTime"] == "2026-11-01T08:45:00-05:00"
    assert hgb["issued"] == "2026-11-01T09:28:00-05:00"
    assert hgb["category"][0]["coding"][0]["code"] == "laboratory"

    wbc = obs["6690-2"]
    assert wbc["valueQuantity"]["code"] == "10*3/uL"  # x10E3/uL in UCUM
    assert wbc["valueQuantity"]["unit"] == "x10E3/uL"
    assert wbc["interpretation"][0]["coding"][0]["code"] == "H"
    assert obs["789-8"]["valueQuantity"]["code"] == "10*6/uL"
    assert obs["4544-3"]["valueQuantity"]["code"] == "%"
    assert "interpretation" not in obs["777-3"]  # no flag sent
    assert obs["777-3"]["valueQuantity"]["value"] == 250
    assert obs["777-3"]["note"] == [{"text": "Result verified by Platelets repeat analysis."}]

    report = resources[-1]
    assert report["status"] == "final"
    assert report["code"]["coding"][0] == {
        "code": "58410-2",
        "system": "http://loinc.org",
        "display": "CBC panel - Blood by Automated count",
    }
    assert [c["coding"][0]["code"] for c in report["category"]] == ["LAB", "HM"]
    assert report["effectiveDateTime"] == "2026-11-01T07:15:00-05:00"
    assert {i["type"]["coding"][0]["code"]: i["value"] for i in report["identifier"]} == {
        "PLAC": "ORD-778812",
        "FILL": "LAB-20261101-0042",
    }
    assert [ref["reference"] for ref in report["result"]] == [
        f"Observation/{r['id']}" for r in resources[:-1]
    ]
    assert validate_resource(report).category == "lab"


def test_basic_metabolic_panel_flags_and_ranges() -> None:
    obs = observations(mapped(bmp("BMP0001")))
    assert len(obs) == len(BMP)
    assert obs["2345-7"]["valueQuantity"]["value"] == 182
    assert obs["2345-7"]["interpretation"][0]["coding"][0]["display"] == "High"
    assert obs["2823-3"]["interpretation"][0]["coding"][0]["code"] == "L"
    assert obs["2823-3"]["referenceRange"][0]["low"]["value"] == 3.5
    assert obs["2823-3"]["valueQuantity"]["code"] == "mmol/L"
    assert obs["2160-0"]["referenceRange"][0]["high"]["value"] == 1.0


def test_record_ids_are_stable_per_order_and_test() -> None:
    first = mapped(oru("A1"))
    again = mapped(oru("A2", values={"718-7": "11.4"}, status="C"))
    assert [r["id"] for r in first] == [r["id"] for r in again]
    other_order = mapped(oru("A3", filler="LAB-20261101-0099"))
    assert not {r["id"] for r in first} & {r["id"] for r in other_order}
    for resource in first:
        assert resource["id"].startswith("hl7-") and len(resource["id"]) <= 64
        assert MRN not in resource["id"]


def test_corrected_and_preliminary_statuses() -> None:
    corrected = mapped(oru("C1", status="C"))
    assert {r["status"] for r in corrected} == {"corrected"}
    preliminary = mapped(oru("P1", status="P"))
    assert {r["status"] for r in preliminary} == {"preliminary"}


def test_value_types() -> None:
    text = "\r".join(
        [
            "MSH|^~\\&|LIS|LAB|ML|HOSP|20261101||ORU^R01|V1|P|2.4",
            "PID|1||M1^^^HOSP",
            "OBR|1||F1|24356-8^Urinalysis complete^LN|||202611010800",
            "OBX|1|SN|5811-5^Specific gravity^LN||^1.015|||N|||F",
            "OBX|2|SN|2514-8^Ketones^LN||<^5|mg/dL|<5||||F",
            "OBX|3|SN|5182-1^Hepatitis A Ab titer^LN||^1^:^128||||||F",
            "OBX|4|SN|2888-6^Protein^LN||^10^-^20|mg/dL|||||F",
            "OBX|5|CWE|5778-6^Color^LN||YEL^Yellow^L|||N|||F",
            "OBX|6|ST|5767-9^Appearance^LN||Clear||||||F",
            "OBX|7|TX|8251-1^Comment^LN||Line one~Line two with \\T\\ escaped ampersand||||||P",
            "OBX|8|NM|5803-2^pH^LN||6.5||5.0-8.0|N|||F",
            "OBX|9|NM|2349-9^Glucose^LN||||||||X",
        ]
    )
    obs = observations(mapped(text))
    assert obs["5811-5"]["valueQuantity"] == {"value": 1.015}
    assert obs["2514-8"]["valueQuantity"]["comparator"] == "<"
    assert obs["2514-8"]["referenceRange"] == [{"high": ucum(5, "mg/dL")}]
    assert obs["5182-1"]["valueRatio"] == {"numerator": {"value": 1}, "denominator": {"value": 128}}
    assert obs["2888-6"]["valueRange"]["low"]["value"] == 10
    assert obs["2888-6"]["valueRange"]["high"]["value"] == 20
    color = obs["5778-6"]["valueCodeableConcept"]
    assert color["text"] == "Yellow"
    assert color["coding"][0]["system"] == "urn:medledger:hl7:LAB:L"
    assert obs["5767-9"]["valueString"] == "Clear"
    assert obs["8251-1"]["valueString"] == "Line one\nLine two with & escaped ampersand"
    assert obs["8251-1"]["status"] == "preliminary"
    assert obs["5803-2"]["valueQuantity"] == {"value": 6.5}
    assert obs["5803-2"]["referenceRange"][0]["low"] == {"value": 5.0}
    assert obs["2349-9"]["status"] == "cancelled"
    assert "valueQuantity" not in obs["2349-9"] and "dataAbsentReason" not in obs["2349-9"]
    for resource in obs.values():
        validate_resource(resource)


def test_times_take_the_configured_zone_when_they_have_no_offset() -> None:
    here = ErrorLocation("OBX", 1, 14)
    berlin = ZoneInfo("Europe/Berlin")
    assert fhir_datetime("202611010845", berlin, here) == "2026-11-01T08:45:00+01:00"
    assert fhir_datetime("202607010845", berlin, here) == "2026-07-01T08:45:00+02:00"
    assert fhir_datetime("20261101084512.25+0530", berlin, here) == "2026-11-01T08:45:12.25+05:30"
    assert fhir_datetime("20261101", berlin, here) == "2026-11-01"
    assert fhir_datetime("202611", berlin, here) == "2026-11"
    assert fhir_datetime("20261101", berlin, here, instant=True) is None
    assert fhir_datetime("202611010845", berlin, here, instant=True) is None
    for bad in ("2026-11-01", "20261301", "20261101256000", "yesterday", "2026110108451"):
        with pytest.raises(Hl7Error) as caught:
            fhir_datetime(bad, berlin, here)
        assert caught.value.ack is AckCode.ERROR and caught.value.error_code == "102"


def test_a_file_splits_into_messages_on_msh() -> None:
    text = oru("F1").replace("\r", "\n") + "\n\n" + bmp("F2").replace("\r", "\r\n")
    messages = split_messages("FHS|^~\\&|LIS\nBHS|^~\\&|LIS\n" + text + "BTS|2\nFTS|1\n")
    assert len(messages) == 2
    assert [read_header(parse_message(m)).control_id for m in messages] == ["F1", "F2"]
    assert len(mapped(messages[1])) == len(BMP) + 1


@pytest.mark.parametrize(
    ("text", "code", "error_code"),
    [
        (oru("X1", message_type="ADT^A01^ADT_A01"), AckCode.REJECT, "200"),
        (oru("X2", message_type="ORU^R30"), AckCode.REJECT, "201"),
        (oru("X3", version="3.0"), AckCode.REJECT, "203"),
        (oru("X3b", version="2.0"), AckCode.REJECT, "203"),
        (oru("X4", processing="T"), AckCode.REJECT, "202"),
        (oru("X5", values={"718-7": "eleven"}), AckCode.ERROR, "102"),
        (oru("X6", values={"718-7": ">20"}), AckCode.ERROR, "102"),
        (oru("X7").replace("|L|||F|", "|LX|||F|", 1), AckCode.ERROR, "103"),
        (oru("X8").replace("|||F|||", "|||Q|||", 1), AckCode.ERROR, "103"),
        (oru("X10").replace("|58410-2^CBC panel - Blood by Automated count^LN|", "||"),
         AckCode.ERROR, "101"),
        ("\r".join(s for s in oru("X13").split("\r") if not s.startswith("PID")), AckCode.ERROR,
         "101"),
        (oru("X14").replace(f"|{MRN}^^^{AUTHORITY}^MR~123-45-6789^^^SSA^SS|", "||"),
         AckCode.ERROR, "101"),
        ("MSH|^~\\&|LIS|LAB|ML|H|2026||ORU^R01|X11|P|2.5\rPID|1||M1\rOBX|1|NM|1^a^LN||1||||||F",
         AckCode.REJECT, "100"),
        ("MSH|^~\\&|LIS|LAB|ML|H|2026||ORU^R01||P|2.5\rPID|1||M1", AckCode.REJECT, "101"),
    ],
)  # fmt: skip
def test_refusals(text: str, code: AckCode, error_code: str) -> None:
    with pytest.raises(Hl7Error) as caught:
        mapped(text)
    assert caught.value.ack is code, caught.value.reason
    assert caught.value.error_code == error_code, caught.value.reason


@pytest.mark.parametrize(
    "text",
    ["", "hello", "MSH", "MSH|", "MSH|^~", "MSHX^~\\&|a", "PID|1||x", "MSH|^~\\&|A\rpid|1"],
)
def test_unparseable_text_is_rejected(text: str) -> None:
    with pytest.raises(Hl7Error) as caught:
        parse_message(text)
    assert caught.value.ack is AckCode.REJECT


# -- the processor, over a fake ledger -----------------------------------------------------------


class FakePatients:
    def __init__(self) -> None:
        self.links: dict[tuple[str, str], str] = {
            (MRN_SYSTEM_PREFIX + AUTHORITY, MRN): PATIENT,
            (MRN_SYSTEM_PREFIX + "OTHER", "M9"): OTHER_PATIENT,
        }

    def resolve(self, system: str, value: str) -> str | None:
        return self.links.get((system, value))

    def resolve_any(self, value: str) -> str | None:
        found = {p for (_, v), p in self.links.items() if v == value}
        return found.pop() if len(found) == 1 else None


@pytest.fixture
def ledger() -> FakeLedger:
    return FakeLedger()


@pytest.fixture
def processor(ledger: FakeLedger) -> Hl7Processor:
    def writer() -> RecordWriter:
        return ledger

    return Hl7Processor(
        writer,
        FakePatients(),
        zone=UTC,
        application="MEDLEDGER",
        facility="st-mary",
        clock=lambda: NOW,
    )


def ack_of(outcome: Outcome) -> Any:
    assert "\n" not in outcome.ack
    return hl7.parse(outcome.ack)


def test_accepted_message_is_one_transaction_and_an_aa(
    processor: Hl7Processor, ledger: FakeLedger
) -> None:
    outcome = processor.process(oru("CBC0001"))
    assert outcome.code is AckCode.ACCEPT, outcome.reason
    assert len(ledger.commits) == 1 and len(ledger.commits[0]) == len(CBC) + 1
    assert outcome.written == tuple(b.record_id for b in ledger.commits[0])
    ack = ack_of(outcome)
    msh = ack.segment("MSH")
    # Sender and receiver swapped; the message type, version and processing id as the standard says.
    assert [str(msh(n)) for n in (3, 4, 5, 6)] == [
        "MEDLEDGER",
        "ST_MARY",
        "COBAS_LIS",
        "STMARY_LAB",
    ]
    assert str(msh(9)) == "ACK^R01^ACK"
    assert str(msh(7)) == "20261101150000+0000"
    assert str(msh(10)) and str(msh(10)) != "CBC0001"
    assert str(msh(11)) == "P" and str(msh(12)) == "2.5.1"
    assert str(ack.segment("MSA")(1)) == "AA" and str(ack.segment("MSA")(2)) == "CBC0001"
    with pytest.raises(KeyError):
        ack.segment("ERR")


def test_a_retransmission_writes_nothing(processor: Hl7Processor, ledger: FakeLedger) -> None:
    first = processor.process(oru("CBC0001"))
    again = processor.process(oru("CBC0001"))
    # The same control id and content: acknowledged again with the first answer.
    assert again.code is AckCode.ACCEPT and again.ack == first.ack
    assert again.written == () and len(again.unchanged) == len(CBC) + 1
    assert "already answered" in again.reason
    assert len(ledger.commits) == 1
    # The same results under a new control id: compared with the ledger, nothing written.
    resent = processor.process(oru("CBC0001-RESENT"))
    assert resent.code is AckCode.ACCEPT and resent.written == ()
    assert len(ledger.commits) == 1
    assert "already recorded" in str(ack_of(resent).segment("MSA")(3))
    assert str(ack_of(resent).segment("MSA")(2)) == "CBC0001-RESENT"


def test_a_corrected_result_amends_the_changed_records(
    processor: Hl7Processor, ledger: FakeLedger
) -> None:
    first = processor.process(oru("CBC0001", status="P"))
    assert first.code is AckCode.ACCEPT
    final = processor.process(oru("CBC0002", status="F", values={"718-7": "11.3"}))
    assert final.code is AckCode.ACCEPT, final.reason
    assert len(final.written) == len(CBC) + 1  # every status changed from preliminary
    assert all(b.previous == 1 for b in ledger.commits[1])
    corrected = processor.process(oru("CBC0003", status="F", values={"718-7": "11.5"}))
    assert corrected.code is AckCode.ACCEPT
    # Only hemoglobin changed; the report's content did not.
    assert len(corrected.written) == 1
    hgb_id = corrected.written[0]
    assert ledger.records[hgb_id][-1][1]["valueQuantity"]["value"] == 11.5
    assert len(ledger.records[hgb_id]) == 3


def test_unknown_patient_is_an_ae_and_writes_nothing(
    processor: Hl7Processor, ledger: FakeLedger
) -> None:
    outcome = processor.process(oru("U1", mrn="MRN00000"))
    assert outcome.code is AckCode.ERROR
    assert outcome.reason == "unknown patient identifier"
    assert not ledger.sealed and not ledger.commits
    ack = ack_of(outcome)
    assert str(ack.segment("MSA")(1)) == "AE" and str(ack.segment("MSA")(2)) == "U1"
    assert str(ack.segment("MSA")(3)) == "unknown patient identifier"
    err = ack.segment("ERR")
    assert str(err(2)) == "PID^1^3"
    assert str(err(3)) == "204^Unknown key identifier^HL70357"
    assert str(err(4)) == "E"


def test_identifier_without_authority_is_not_matched_by_default(
    processor: Hl7Processor, ledger: FakeLedger
) -> None:
    outcome = processor.process(oru("B0", authority=""))
    assert outcome.code is AckCode.ERROR
    assert outcome.reason == (
        "unknown patient identifier (identifiers without an assigning authority, PID-3.4,"
        " are not matched on this node)"
    )
    only_bare = oru("B0", authority="").replace("~123-45-6789^^^SSA^SS", "")
    outcome = processor.process(only_bare)
    assert outcome.code is AckCode.ERROR and "names its assigning authority" in outcome.reason
    assert not ledger.sealed


def test_identifier_without_authority_resolves_by_value_when_configured(
    ledger: FakeLedger,
) -> None:
    processor = Hl7Processor(lambda: ledger, FakePatients(), match_without_authority=True)
    assert processor.process(oru("B1", authority="")).code is AckCode.ACCEPT
    # ... but one with a different authority is not the same patient.
    assert processor.process(oru("B2", authority="OTHERHOSP")).code is AckCode.ERROR


def test_wrong_type_is_an_ar_in_the_messages_version(
    processor: Hl7Processor, ledger: FakeLedger
) -> None:
    outcome = processor.process(oru("W1", message_type="ADT^A01^ADT_A01", version="2.3"))
    assert outcome.code is AckCode.REJECT
    ack = ack_of(outcome)
    assert str(ack.segment("MSH")(9)) == "ACK^A01^ACK"
    assert str(ack.segment("MSA")(1)) == "AR"
    # v2.3: location and code in ERR-1.
    assert str(ack.segment("ERR")(1)) == "MSH^1^9^200&Unsupported message type&HL70357"
    assert not ledger.sealed


def test_invalid_value_is_an_ae_naming_the_field(
    processor: Hl7Processor, ledger: FakeLedger
) -> None:
    outcome = processor.process(oru("V1", values={"718-7": "11^1"}))  # components in an NM
    assert outcome.code is AckCode.ERROR
    outcome = processor.process(oru("V2", values={"789-8": "4.5.2"}))
    assert outcome.code is AckCode.ERROR
    err = ack_of(outcome).segment("ERR")
    assert str(err(2)) == "OBX^2^5" and str(err(3)).startswith("102^")
    assert "OBX-5" in str(err(8))
    assert not ledger.sealed


def test_ledger_refusal_is_an_ae_with_its_reason(
    processor: Hl7Processor, ledger: FakeLedger
) -> None:
    ledger.refuse = "entry 0: patient p1 is suspended"
    outcome = processor.process(oru("L1"))
    assert outcome.code is AckCode.ERROR
    assert "patient p1 is suspended" in outcome.reason
    assert "suspended" in str(ack_of(outcome).segment("ERR")(8))
    assert not ledger.records


def test_results_recorded_for_another_patient_are_refused(
    processor: Hl7Processor, ledger: FakeLedger
) -> None:
    assert processor.process(oru("R1")).code is AckCode.ACCEPT
    outcome = processor.process(oru("R2", mrn="M9", authority="OTHER"))
    assert outcome.code is AckCode.ERROR
    assert "another patient" in outcome.reason
    assert len(ledger.commits) == 1


def test_unparseable_message_gets_a_bare_ar(processor: Hl7Processor, ledger: FakeLedger) -> None:
    outcome = processor.process("MSH|^~|COBAS|LAB|ML|H|2026||ORU^R01|BAD1|P|2.5.1\rPID|1")
    assert outcome.code is AckCode.REJECT
    ack = ack_of(outcome)
    assert str(ack.segment("MSA")(1)) == "AR" and str(ack.segment("MSA")(2)) == "BAD1"
    assert str(ack.segment("MSH")(5)) == "COBAS"
    garbage = processor.process("\x00\x01 not hl7 at all")
    assert str(ack_of(garbage).segment("MSA")(1)) == "AR"
    assert not ledger.sealed


def test_several_patients_in_one_message(processor: Hl7Processor, ledger: FakeLedger) -> None:
    first = oru("M1")
    second = oru("M1", mrn="M9", authority="OTHER", filler="LAB-OTHER-1").split("\r", 1)[1]
    outcome = processor.process(first + second)
    assert outcome.code is AckCode.ACCEPT, outcome.reason
    assert set(outcome.patients) == {PATIENT, OTHER_PATIENT}
    assert len(ledger.commits) == 1 and len(ledger.commits[0]) == 2 * (len(CBC) + 1)


def test_payload_decoding() -> None:
    latin = "MSH|^~\\&|A|B|C|D|2026||ORU^R01|1|P|2.5|||||8859/1\rPID|1||x||Müller".encode("latin-1")
    assert decode_payload(latin) == (latin.decode("latin-1"), "latin-1")
    utf8 = "MSH|^~\\&|A\rPID|1||x||Müller".encode()
    assert decode_payload(utf8)[1] == "utf-8"
    assert decode_payload(b"MSH|^~\\&|A\rPID|1||x||M\xfcller")[1] == "latin-1"


@pytest.mark.parametrize(
    ("text", "control_id"),
    [
        ("MSH|^~\\&|A|B|C|D|2026||ORU^R01|G2|P", "G2"),
        ("MSH|^~\\&|A|B|C|D|2026||ORU|G3|P|1.0", "G3"),
        ("MSH|^~\\&|A|B|C|D|2026||ORU~ADT|G4", "G4"),
        ("MSH|^~\\&|A|B|C|D|2026|||G5", "G5"),
        ("MSH|^~\\&|A|B", ""),
        ("MSH#$%*@#A#B#C#D#2026##ORU$R01#G6#P#1.9\rPID#1##M1", "G6"),
    ],
)
def test_short_or_odd_headers_still_get_a_nak(
    processor: Hl7Processor, ledger: FakeLedger, text: str, control_id: str
) -> None:
    outcome = processor.process(text)
    assert outcome.code is AckCode.REJECT, outcome.reason
    ack = hl7.parse(outcome.ack)
    assert str(ack.segment("MSA")(1)) == "AR"
    assert ack.extract_field("MSA", 1, 2) == control_id
    assert ack.extract_field("MSH", 1, 9, 1, 1) == "ACK"
    assert not ledger.sealed


def test_a_defect_still_answers(ledger: FakeLedger) -> None:
    def broken() -> RecordWriter:
        raise RuntimeError("boom")

    processor = Hl7Processor(broken, FakePatients(), clock=lambda: NOW)
    outcome = processor.process(oru("D1"))
    assert outcome.code is AckCode.ERROR
    # The sender learns the kind of failure, not its text (which may quote internals).
    assert outcome.reason == "the results could not be recorded: RuntimeError"
