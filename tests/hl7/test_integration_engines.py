"""HL7 v2 as integration engines send it: versions 2.1 to 2.8 and vendor versions, five
encoding characters, a byte-order mark, LF and CRLF separators; the processing-id policy;
unmapped value types kept as text with a warning; ADT registration, update and merge; the
unknown-patient policy; per-sender assigning authorities; enhanced acknowledgements; batches
over MLLP; corrections that amend. The processor, parser, mapping, validator and patient index
(SQLite) are the real ones; the ledger is the stand-in of ledger_doubles."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7_samples import AUTHORITY, MRN, oru
from ledger_doubles import FakeLedger, FakeRegistry

from medledger.config import ConfigError
from medledger.hl7.adt import PatientRegistry
from medledger.hl7.batch import process_batch
from medledger.hl7.config import _parse_table
from medledger.hl7.ingest import Hl7Processor, RecordWriter
from medledger.hl7.mllp import MllpServer, frame, message_handler
from medledger.hl7.oru import MRN_SYSTEM_PREFIX, AckCode
from medledger.services.mpi import PatientIndex

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
SYSTEM = MRN_SYSTEM_PREFIX + AUTHORITY


class Lab:
    def __init__(self, tmp_path: Path, **options: Any) -> None:
        self.ledger = FakeLedger()
        self.registry = FakeRegistry()
        self.index = PatientIndex(tmp_path / f"patients-{id(self)}.db")

        def writer() -> RecordWriter:
            return self.ledger

        def registrar() -> PatientRegistry:
            return self.registry

        self.processor = Hl7Processor(
            writer, self.index, facility="pilot", clock=lambda: NOW, registry=registrar, **options
        )


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Any]:
    labs: list[Lab] = []

    def make(**options: Any) -> Lab:
        lab = Lab(tmp_path, **options)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.index.close()


def adt(
    control_id: str,
    trigger: str = "A04",
    *,
    mrn: str = MRN,
    authority: str = AUTHORITY,
    family: str = "Rivera",
    extra: str = "",
    msh_tail: str = "",
) -> str:
    pid3 = f"{mrn}^^^{authority}^MR" if authority else mrn
    return "\r".join(
        s
        for s in (
            f"MSH|^~\\&|COBAS_LIS|STMARY_LAB|MEDLEDGER|ST_MARY|20261101093000||ADT^{trigger}"
            f"|{control_id}|P|2.5.1{msh_tail}",
            f"EVN|{trigger}|20261101093000",
            f"PID|1||{pid3}||{family}^Ana^M||19780312|F|||12 Elm St^^Springfield^IL^62701",
            extra,
        )
        if s
    )


def msa(outcome_ack: str) -> tuple[str, str, str]:
    segment = hl7.parse(outcome_ack).segment("MSA")
    text = str(segment(3)) if len(segment) > 3 else ""
    return str(segment(1)), str(segment(2)), text


# -- what is accepted --------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.1", "2.2", "2.3", "2.5.1", "2.6", "2.7.1", "2.8", "2.999"])
def test_every_version_from_2_1_is_accepted(make_lab: Any, version: str) -> None:
    lab = make_lab()
    assert lab.processor.process(adt("R1")).code is AckCode.ACCEPT
    outcome = lab.processor.process(oru("V1", version=version))
    assert outcome.code is AckCode.ACCEPT, outcome.reason
    ack = hl7.parse(outcome.ack)
    assert str(ack.segment("MSH")(12)) == version  # answered in the message's version


@pytest.mark.parametrize("version", ["2.0", "1.9", "3.0", "2.x", ""])
def test_what_is_not_an_hl7_v2_version_is_refused(make_lab: Any, version: str) -> None:
    outcome = make_lab().processor.process(oru("V2", version=version))
    assert outcome.code is AckCode.REJECT and "MSH-12" in outcome.reason


def test_five_encoding_characters_bom_and_line_endings(make_lab: Any) -> None:
    lab = make_lab()
    lab.processor.process(adt("R1"))
    five = oru("E1").replace("MSH|^~\\&|", "MSH|^~\\&#|", 1)
    assert lab.processor.process(five).code is AckCode.ACCEPT
    for number, text in enumerate(
        ("\ufeff" + oru("E2"), oru("E3").replace("\r", "\n"), oru("E4").replace("\r", "\r\n"))
    ):
        outcome = lab.processor.process(text)
        assert outcome.code is AckCode.ACCEPT, (number, outcome.reason)
        assert outcome.unchanged and not outcome.written  # the same results as E1


@pytest.mark.parametrize(
    ("msh2", "reason"),
    [
        ("~\\&", "3 encoding characters"),
        ("^~\\&#!", "6 encoding characters"),
        ("^~\\\\&", "repeat a character"),
        ("^~\\^", "repeat a character"),
    ],
)
def test_broken_encoding_characters_are_refused(make_lab: Any, msh2: str, reason: str) -> None:
    text = oru("E5").replace("MSH|^~\\&|", f"MSH|{msh2}|", 1)
    outcome = make_lab().processor.process(text)
    assert outcome.code is AckCode.REJECT and reason in outcome.reason


def test_processing_id_policy(make_lab: Any) -> None:
    production = make_lab()
    production.processor.process(adt("R1"))
    refused = production.processor.process(oru("T1", processing="T"))
    assert refused.code is AckCode.REJECT
    assert "[hl7] processing_ids = ['P']" in refused.reason
    assert production.ledger.commits == []
    pilot = make_lab(processing_ids=("P", "T"))
    pilot.processor.process(adt("R1"))
    assert pilot.processor.process(oru("T1", processing="T")).code is AckCode.ACCEPT
    debug = pilot.processor.process(oru("D1", processing="D"))
    assert debug.code is AckCode.REJECT and "processing_ids = ['P', 'T']" in debug.reason


def test_an_unmapped_value_type_is_text_with_a_warning(make_lab: Any) -> None:
    lab = make_lab()
    lab.processor.process(adt("R1"))
    text = oru("W1").replace("|NM|718-7^", "|XAD|718-7^", 1)
    outcome = lab.processor.process(text)
    assert outcome.code is AckCode.ACCEPT, outcome.reason
    ack = hl7.parse(outcome.ack)
    assert "value type XAD is not mapped" in str(ack.segment("MSA")(3))
    err = ack.segment("ERR")
    assert str(err(4)) == "W" and str(err(2)) == "OBX^3^2"
    hemoglobin = next(
        resource
        for versions in lab.ledger.records.values()
        for _, resource in versions
        if resource["resourceType"] == "Observation"
        and resource["code"]["coding"][0]["code"] == "718-7"
    )
    assert hemoglobin["valueString"] == "11.1"


# -- ADT ---------------------------------------------------------------------------------------


def test_adt_registers_updates_and_links_the_patient(make_lab: Any) -> None:
    lab = make_lab()
    first = lab.processor.process(adt("A1", "A04"))
    assert first.code is AckCode.ACCEPT and first.reason == "patient registered"
    patient = first.patients[0]
    assert lab.index.resolve(SYSTEM, MRN) == patient
    [resource] = lab.registry.patients[patient]
    assert resource["name"] == [{"family": "Rivera", "given": ["Ana", "M"]}]
    assert resource["birthDate"] == "1978-03-12" and resource["gender"] == "female"
    v2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
    assert resource["identifier"][0] == {
        "value": MRN,
        "system": SYSTEM,
        "type": {"coding": [{"system": v2_0203, "code": "MR"}]},
        "assigner": {"display": AUTHORITY},
    }
    # A repeated A04 with the same content: the same patient, nothing new.
    again = lab.processor.process(adt("A1b", "A04"))
    assert again.patients == (patient,) and not again.written
    # A08 with a new family name amends the Patient record.
    updated = lab.processor.process(adt("A2", "A08", family="Rivera-Lopez"))
    assert updated.reason == "patient updated" and updated.written == (patient,)
    assert lab.registry.patients[patient][-1]["name"][0]["family"] == "Rivera-Lopez"
    assert lab.registry.patients[patient][-1]["id"] == patient
    # Results for the registered patient are accepted.
    assert lab.processor.process(oru("O1")).code is AckCode.ACCEPT
    assert len(lab.registry.patients) == 1


def test_adt_update_of_an_unknown_patient_follows_the_policy(make_lab: Any) -> None:
    refusing = make_lab()
    outcome = refusing.processor.process(adt("U1", "A08"))
    assert outcome.code is AckCode.ERROR and 'unknown_patients = "refuse"' in outcome.reason
    assert refusing.registry.patients == {}
    registering = make_lab(unknown_patients="register")
    outcome = registering.processor.process(adt("U1", "A31"))
    assert outcome.code is AckCode.ACCEPT and outcome.reason == "patient registered"


def test_oru_for_an_unknown_patient_follows_the_policy(make_lab: Any) -> None:
    refusing = make_lab()
    outcome = refusing.processor.process(oru("N1"))
    assert outcome.code is AckCode.ERROR and "unknown patient" in outcome.reason
    assert refusing.ledger.commits == [] and refusing.registry.patients == {}
    registering = make_lab(unknown_patients="register")
    outcome = registering.processor.process(oru("N1"))
    assert outcome.code is AckCode.ACCEPT, outcome.reason
    [patient] = registering.registry.patients
    assert outcome.patients == (patient,)
    assert registering.index.resolve(SYSTEM, MRN) == patient
    assert "registered from the PID" in msa(outcome.ack)[2]


def test_a40_merges_the_prior_identifier_into_the_survivor(make_lab: Any) -> None:
    lab = make_lab()
    survivor = lab.processor.process(adt("M1", "A04")).patients[0]
    prior = lab.processor.process(adt("M2", "A04", mrn="OLD-7", family="Rivera")).patients[0]
    assert survivor != prior
    merge = adt("M3", "A40", extra=f"MRG|OLD-7^^^{AUTHORITY}^MR")
    outcome = lab.processor.process(merge)
    assert outcome.code is AckCode.ACCEPT and "merged" in outcome.reason
    assert lab.index.resolve(SYSTEM, "OLD-7") == survivor
    # Results naming the old identifier now reach the survivor.
    results = lab.processor.process(oru("M4", mrn="OLD-7"))
    assert results.code is AckCode.ACCEPT and results.patients == (survivor,)
    # A merge into nobody, or without MRG, is refused.
    unknown = lab.processor.process(adt("M5", "A40", mrn="NOBODY", extra="MRG|OLD-7^^^STMARY"))
    assert unknown.code is AckCode.ERROR and "surviving patient" in unknown.reason
    no_mrg = lab.processor.process(adt("M6", "A40"))
    assert no_mrg.code is AckCode.ERROR and "MRG" in no_mrg.reason


def test_other_adt_events_are_acknowledged_and_write_nothing(make_lab: Any) -> None:
    lab = make_lab()
    outcome = lab.processor.process(adt("X1", "A03"))
    assert outcome.code is AckCode.ACCEPT and "nothing to record" in outcome.reason
    assert str(hl7.parse(outcome.ack).segment("ERR")(4)) == "W"
    assert lab.registry.patients == {}
    assert lab.processor.process(adt("X2", "")).code is AckCode.REJECT


def test_adt_without_a_registration_member_is_refused(make_lab: Any, tmp_path: Path) -> None:
    index = PatientIndex(tmp_path / "bare.db")
    ledger = FakeLedger()

    def writer() -> RecordWriter:
        return ledger

    processor = Hl7Processor(writer, index, clock=lambda: NOW)
    outcome = processor.process(adt("Z1"))
    assert outcome.code is AckCode.REJECT and "registration_member" in outcome.reason
    index.close()


def test_sender_authorities_place_bare_identifiers(make_lab: Any) -> None:
    authorities = {("COBAS_LIS", "STMARY_LAB"): {"": "urn:oid:1.2.3", "STMARY": "urn:oid:9.9"}}
    lab = make_lab(authorities=authorities)
    registered = lab.processor.process(adt("B1", authority=""))
    assert registered.code is AckCode.ACCEPT, registered.reason
    assert lab.index.resolve("urn:oid:1.2.3", MRN) == registered.patients[0]
    # A mapped authority name is linked under its system first.
    other = lab.processor.process(adt("B2", mrn="M-2"))
    assert lab.index.resolve("urn:oid:9.9", "M-2") == other.patients[0]
    results = lab.processor.process(oru("B3", authority=""))
    assert results.code is AckCode.ACCEPT and results.patients == registered.patients
    # Without the map, a bare identifier is not matched.
    plain = make_lab()
    plain.processor.process(adt("B0", authority=""))  # refused: nothing to index it under
    refused = plain.processor.process(oru("B4", authority=""))
    assert refused.code is AckCode.ERROR and "assigning authority" in refused.reason


# -- acknowledgements --------------------------------------------------------------------------


def test_enhanced_mode_answers_with_commit_acks(make_lab: Any) -> None:
    lab = make_lab()
    registered = lab.processor.process(adt("C1", msh_tail="|||AL|NE"))
    assert msa(registered.ack)[:2] == ("CA", "C1")
    refused = lab.processor.process(adt("C2", "A08", mrn="NOBODY", msh_tail="|||AL|NE"))
    assert msa(refused.ack)[0] == "CE"
    broken = lab.processor.process(adt("C3", "", msh_tail="|||AL|AL"))
    assert msa(broken.ack)[0] == "CR"
    original = lab.processor.process(adt("C4"))
    assert msa(original.ack)[:2] == ("AA", "C4")


def test_the_acknowledgement_conditions_of_msh_15_and_16(make_lab: Any) -> None:
    """Enhanced mode: the commit ack when MSH-15's condition holds, else the application ack
    when MSH-16's does, else none — the message is processed all the same."""
    lab = make_lab()
    # Never a commit ack, always an application ack: AA, and AE for an error.
    assert msa(lab.processor.process(adt("N1", msh_tail="|||NE|AL")).ack)[:2] == ("AA", "N1")
    failed = lab.processor.process(adt("N2", "A08", mrn="NOBODY", msh_tail="|||NE|AL"))
    assert msa(failed.ack)[0] == "AE"
    # Commit acks on errors only: a success gets the application ack, an error CE.
    assert msa(lab.processor.process(adt("E1", mrn="E-1", msh_tail="|||ER|AL")).ack)[0] == "AA"
    failed = lab.processor.process(adt("E2", "A08", mrn="NOBODY", msh_tail="|||ER|AL"))
    assert msa(failed.ack)[0] == "CE"
    # Commit acks on success only; nothing for an error that asks for no application ack.
    assert msa(lab.processor.process(adt("S1", mrn="S-1", msh_tail="|||SU|NE")).ack)[0] == "CA"
    silent = lab.processor.process(adt("S2", "A08", mrn="NOBODY", msh_tail="|||SU|NE"))
    assert silent.answer == "" and silent.silent and not silent.accepted
    # Neither: the patient is registered, and no answer is sent.
    quiet = lab.processor.process(adt("Q1", mrn="Q-1", msh_tail="|||NE|NE"))
    assert quiet.answer == "" and quiet.accepted and quiet.patients
    assert msa(quiet.ack)[0] == "AA"  # what a batch acknowledgement would carry for it


def test_over_mllp_a_message_that_asks_for_no_ack_gets_none(make_lab: Any) -> None:
    lab = make_lab()

    async def send() -> bytes:
        server = MllpServer(message_handler(lab.processor), "127.0.0.1", 0)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(frame(adt("Q2", mrn="Q-2", msh_tail="|||NE|NE").encode()))
            writer.write(frame(adt("Q3", mrn="Q-3").encode()))
            await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 30)
            writer.close()
            return answer
        finally:
            await server.stop()

    # The first answer on the connection is the second message's.
    assert msa(asyncio.run(send())[1:-2].decode())[:2] == ("AA", "Q3")
    assert len(lab.registry.patients) == 2


def test_a_correction_amends_the_preliminary_result(make_lab: Any) -> None:
    lab = make_lab()
    lab.processor.process(adt("R1"))
    preliminary = lab.processor.process(oru("P1", status="P"))
    final = lab.processor.process(oru("P2", status="F"))
    corrected = lab.processor.process(oru("P3", status="C", values={"718-7": "11.4"}))
    assert preliminary.written and set(final.written) == set(preliminary.written)
    assert set(corrected.written) <= set(preliminary.written)
    hemoglobin = [
        record_id
        for record_id, versions in lab.ledger.records.items()
        if versions[0][1]["code"]["coding"][0]["code"] == "718-7"
    ]
    assert len(hemoglobin) == 1  # one record, three versions
    versions = lab.ledger.records[hemoglobin[0]]
    assert [v[1]["status"] for v in versions] == ["preliminary", "final", "corrected"]
    assert versions[-1][1]["valueQuantity"]["value"] == 11.4


# -- batches -----------------------------------------------------------------------------------


def test_a_batch_over_mllp_gets_a_batch_ack(make_lab: Any) -> None:
    lab = make_lab()
    batch = "\r".join(
        [
            "BHS|^~\\&|COBAS_LIS|STMARY_LAB|MEDLEDGER|ST_MARY|20261101||||BATCH-1",
            adt("BA1"),
            oru("BA2"),
            oru("BA3", version="0.1"),
            "BTS|3",
        ]
    )

    async def send() -> bytes:
        server = MllpServer(message_handler(lab.processor), "127.0.0.1", 0)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(frame(batch.encode()))
            await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 30)
            writer.close()
            return answer
        finally:
            await server.stop()

    answer = asyncio.run(send())[1:-2].decode()
    lines = answer.split("\r")
    assert lines[0].startswith("BHS|^~\\&|MEDLEDGER|pilot|COBAS_LIS|STMARY_LAB|")
    assert lines[0].endswith("|BATCH-1")  # BHS-12 names the batch acknowledged
    assert [line.split("|")[1:3] for line in lines if line.startswith("MSA")] == [
        ["AA", "BA1"],
        ["AA", "BA2"],
        ["AR", "BA3"],
    ]
    assert lines[-1] == "BTS|3"
    assert len(lab.ledger.commits) == 1 and len(lab.registry.patients) == 1


def test_a_broken_batch_is_refused_whole(make_lab: Any) -> None:
    lab = make_lab()
    batch = "\r".join(["BHS|^~\\&|A|B", adt("BB1"), "BHS|^~\\&|A|B", oru("BB2"), "BTS|2"])
    outcome = process_batch(lab.processor, batch)
    assert not outcome.accepted and "more than one BHS" in outcome.refusal
    assert msa(outcome.ack)[0] == "AR"
    assert lab.registry.patients == {} and lab.ledger.commits == []
    empty = process_batch(lab.processor, "BHS|^~\\&|A|B\rBTS|0")
    assert "no message" in empty.refusal


# -- configuration -----------------------------------------------------------------------------


def test_hl7_keys_are_read_and_checked() -> None:
    base = {"listen": "127.0.0.1:2575", "member": "m1"}
    config = _parse_table(
        {
            **base,
            "processing_ids": ["P", "T"],
            "unknown_patients": "register",
            "registration_member": "ehr1",
            "authorities": {"LAB^FAC": {"MRN": "urn:oid:1.2.3"}},
        }
    )
    assert config.processing_ids == ("P", "T") and config.unknown_patients == "register"
    assert config.registration_member == "ehr1"
    assert config.authorities == {("LAB", "FAC"): {"MRN": "urn:oid:1.2.3"}}
    defaults = _parse_table(base)
    assert defaults.processing_ids == ("P",) and defaults.unknown_patients == "refuse"
    assert defaults.registration_member is None and defaults.authorities == {}
    for bad, key in (
        ({"processing_ids": ["X"]}, "processing_ids"),
        ({"processing_ids": []}, "processing_ids"),
        ({"processing_ids": "P"}, "processing_ids"),
        ({"unknown_patients": "accept"}, "unknown_patients"),
        ({"unknown_patients": "register"}, "needs registration_member"),
        ({"registration_member": ""}, "registration_member"),
        ({"authorities": {"LABFAC": {"MRN": "urn:x"}}}, "hl7.authorities"),
        ({"authorities": {"LAB^FAC": {"MRN": 3}}}, "hl7.authorities"),
        ({"authorities": ["LAB^FAC"]}, "hl7.authorities"),
    ):
        with pytest.raises(ConfigError) as caught:
            _parse_table({**base, **bad})
        assert key in str(caught.value)


def test_a_batch_is_held_to_the_message_bounds(make_lab: Any) -> None:
    lab = make_lab()
    many = "\r".join(["BHS|^~\\&|A|B", *(adt(f"BN{n}") for n in range(700)), "BTS|700"])
    outcome = process_batch(lab.processor, many)
    assert outcome.outcomes == () and "segments; this node reads at most" in outcome.refusal
    assert lab.registry.patients == {}
