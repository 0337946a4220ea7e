"""Every public HL7 v2 message of ../shared/testdata/hl7 (test suites of python-hl7, HAPI,
LinuxForHealth and hl7apy; see its SOURCES.md) through the real processor, as an integration
engine would send them to a pilot node (processing ids P, T and D accepted).

- Each ORU^R01 whose PID can register its patient is preceded by an ADT^A04 made of its own MSH
  and PID; at least 95 % of those ORU^R01 must then be acknowledged AA.
- Every refusal must name the defect of the message; the expected refusals are listed below.
- ADT messages register (or update) their patients; batch files are acknowledged message by
  message in a batch ack; the invalid_batch_* files are refused whole, with python-hl7's reason.

The ledger behind the processor is a stand-in (tests/hl7/ledger_doubles.py); the processor,
the parser, the mapping, FHIR validation and the patient index (SQLite) are the real ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import hl7
import pytest
from ledger_doubles import FakeLedger, FakeRegistry

from medledger.hl7.adt import PatientRegistry
from medledger.hl7.batch import is_batch, process_batch
from medledger.hl7.ingest import Hl7Processor, Outcome, RecordWriter, decode_payload
from medledger.hl7.oru import normalize_segments
from medledger.services.mpi import PatientIndex

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "testdata" / "hl7"
NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)

pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"third-party HL7 test data not found at {DATA} (see SOURCES.md)"
)

# ORU^R01 messages that must be refused, and the defect their refusal must name.
ORU_REFUSALS = {
    "oru_hapi_10.hl7": "invalid segment id 'I'",  # a mangled PID line: no patient
    "oru_hapi_11.hl7": "invalid segment id 'String'",  # line breaks inside OBX-3
    "oru_hapi_13.hl7": "MSH-2: 3 encoding characters",  # no component separator
    "oru_hapi_6.hl7": "no PID segment",
    "oru_hapi_12.hl7": "PID-3: a patient identifier is required",  # 'PID|' with nothing
    "oru_hapi_9.hl7": "no PID segment",  # ORC, OBR and OBX only
}
# ADT messages that must be refused, and why.
ADT_REFUSALS = {
    # MSH-2 '^~\\&': the escape character twice (a Java string's escaping left in the file).
    "adt_linuxforhealth_1.hl7": "MSH-2: the encoding characters '^~\\\\&' repeat",
    "adt_linuxforhealth_2.hl7": "MSH-2: the encoding characters '^~\\\\&' repeat",
}
BATCH_REFUSALS = {
    "invalid_batch_pythonhl7_1.hl7": "Segment received before message header",
    "invalid_batch_pythonhl7_2.hl7": "Batch cannot have more than one BHS segment",
    "invalid_batch_pythonhl7_3.hl7": "Segment received before message header",
    "invalid_batch_pythonhl7_4.hl7": "Batch cannot have more than one BHS segment",
    "invalid_batch_pythonhl7_5.hl7": "File cannot have more than one FHS segment",
    "invalid_batch_pythonhl7_6.hl7": "Segment received before message header",
}


def text_of(path: Path) -> str:
    return decode_payload(path.read_bytes())[0]


def files(prefix: str) -> list[Path]:
    return sorted(DATA.glob(f"{prefix}*.hl7"))


def senders() -> set[tuple[str, str]]:
    """(MSH-3, MSH-4) of every message whose header python-hl7 reads."""
    found = set()
    for path in sorted(DATA.glob("*.hl7")):
        for line in normalize_segments(text_of(path)).split("\r"):
            if line.startswith("MSH") and len(line) > 8:
                fields = line.split(line[3])
                found.add((fields[2].strip(), fields[3].strip()) if len(fields) > 3 else ("", ""))
    return found


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Hl7Processor, FakeLedger, FakeRegistry, PatientIndex]]:
    ledger, registry = FakeLedger(), FakeRegistry()
    index = PatientIndex(tmp_path / "patients.db")

    def writer() -> RecordWriter:
        return ledger

    def registrar() -> PatientRegistry:
        return registry

    # What an operator writes in [hl7.authorities] for senders whose PID-3 names no
    # assigning authority: the identifiers are that sender's own.
    authorities = {
        (app, facility): {"": f"urn:medledger:test:{app}:{facility}"} for app, facility in senders()
    }
    processor = Hl7Processor(
        writer,
        index,
        facility="pilot",
        clock=lambda: NOW,
        processing_ids=("P", "T", "D"),
        authorities=authorities,
        registry=registrar,
    )
    yield processor, ledger, registry, index
    index.close()


def admission_of(oru: str) -> list[str]:
    """ADT^A04 messages made of an ORU^R01's MSH and each of its PID segments."""
    segments = normalize_segments(oru).split("\r")
    msh = segments[0]
    separator = msh[3]
    component = msh[4]
    fields = msh.split(separator)
    if len(fields) < 12:
        return []
    fields[8] = f"ADT{component}A04"
    found = []
    for number, pid in enumerate((s for s in segments if s.startswith("PID")), 1):
        fields[9] = f"{fields[9]}-ADT{number}"
        found.append("\r".join([separator.join(fields), pid]))
    return found


def test_every_public_oru_after_adt_registration(
    lab: tuple[Hl7Processor, FakeLedger, FakeRegistry, PatientIndex],
) -> None:
    processor, ledger, registry, _ = lab
    results: dict[str, Outcome] = {}
    registered: set[str] = set()
    for path in files("oru_"):
        text = text_of(path)
        admissions = [processor.process(adt) for adt in admission_of(text)]
        if admissions and all(a.accepted for a in admissions):
            registered.add(path.name)
        results[path.name] = processor.process(text)
    report = "\n".join(
        f"{name}: {o.code} {o.reason}"
        + (" (patient registered by ADT)" if name in registered else "")
        for name, o in results.items()
    )
    print(report)
    eligible = [n for n in results if n in registered]
    accepted = [n for n in eligible if results[n].accepted]
    print(f"{len(accepted)}/{len(eligible)} ORU^R01 with ADT-registered patients acknowledged AA")
    assert len(results) == len(files("oru_")) == 19, report
    assert len(accepted) >= 0.95 * len(eligible), report
    refused = {n: o.reason for n, o in results.items() if not o.accepted}
    assert set(refused) == set(ORU_REFUSALS), report
    for name, expected in ORU_REFUSALS.items():
        assert expected in refused[name], (name, refused[name])
    # Each accepted message wrote its records about the patient its ADT registered.
    assert ledger.records and set(registry.patients)
    for name in accepted:
        if results[name].written or results[name].unchanged:
            assert set(results[name].patients) <= set(registry.patients), name
    # MSH-15 AL (accept acknowledgement always): enhanced mode, answered with the commit ack.
    ack = hl7.parse(results["oru_hapi_15.hl7"].ack)
    assert str(ack.segment("MSA")(1)) == "CA"
    assert str(ack.segment("MSA")(2)) == "1994050216163360"  # MSA-2 echoes MSH-10
    # FN (v2.4 sample) is not mapped: stored as text, with a warning in the AA.
    ack = hl7.parse(results["oru_pythonhl7_1.hl7"].ack)
    assert str(ack.segment("MSA")(1)) == "AA"
    assert "value type FN is not mapped" in str(ack.segment("MSA")(3))
    assert str(ack.segments("ERR")[0](1)).startswith("OBX^2^2")


def test_every_public_oru_is_answered_again_without_a_second_write(
    lab: tuple[Hl7Processor, FakeLedger, FakeRegistry, PatientIndex],
) -> None:
    processor, ledger, _, _ = lab
    for path in files("oru_"):
        for adt in admission_of(text_of(path)):
            processor.process(adt)
        first = processor.process(text_of(path))
        commits = len(ledger.commits)
        again = processor.process(text_of(path))
        assert again.code == first.code and again.written == ()
        assert len(ledger.commits) == commits
        if first.accepted:
            assert again.ack == first.ack


def test_every_public_adt(lab: tuple[Hl7Processor, FakeLedger, FakeRegistry, PatientIndex]) -> None:
    processor, _, registry, index = lab
    results = {path.name: processor.process(text_of(path)) for path in files("adt_")}
    report = "\n".join(f"{n}: {o.code} {o.reason}" for n, o in results.items())
    print(report)
    refused = {n: o.reason for n, o in results.items() if not o.accepted}
    assert set(refused) == set(ADT_REFUSALS), report
    for name, expected in ADT_REFUSALS.items():
        assert expected in refused[name], (name, refused[name])
    # A03 (discharge) is acknowledged and records nothing; the A01s register their patients.
    assert "nothing to record" in results["adt_hapi_1.hl7"].reason
    registered = [o for n, o in results.items() if o.accepted and n != "adt_hapi_1.hl7"]
    assert len(registered) == 2 and len(registry.patients) == 2
    ack = hl7.parse(results["adt_hl7apy_1.hl7"].ack)
    # MSH-15 empty, MSH-16 AL: the application acknowledgement.
    assert str(ack.segment("MSA")(1)) == "AA"
    assert str(ack.segment("MSA")(2)) == "0123456789"
    patient = results["adt_hl7apy_1.hl7"].patients[0]
    assert registry.patients[patient][0]["name"] == [{"family": "SURNAME", "given": ["NAME", "A"]}]
    assert registry.patients[patient][0]["gender"] == "male"
    assert index.resolve("urn:medledger:mrn:HOSPITAL", "123-456-789") == patient


def test_every_public_batch(
    lab: tuple[Hl7Processor, FakeLedger, FakeRegistry, PatientIndex],
) -> None:
    processor, _, registry, _ = lab
    for path in files("batch_"):
        text = text_of(path)
        outcome = process_batch(processor, text) if is_batch(text) else None
        if outcome is None:  # messages without a batch header: processed one by one
            continue
        assert outcome.accepted, (path.name, [o.reason for o in outcome.outcomes])
        parsed = hl7.parse_file(normalize_segments(text))
        expected = sum(len(batch) for batch in parsed)
        ack_lines = outcome.ack.split("\r")
        assert sum(1 for line in ack_lines if line.startswith("MSA|")) == expected
        assert ack_lines[0][:3] == normalize_segments(text)[:3]
        assert sum(1 for line in ack_lines if line.startswith("BTS|")) == len(parsed)
    # Every batch names the same Victorian sample patient: registered once, then updated.
    assert len(registry.patients) == 1


@pytest.mark.parametrize("name", sorted(BATCH_REFUSALS))
def test_invalid_batches_are_refused_with_the_reason(
    lab: tuple[Hl7Processor, FakeLedger, FakeRegistry, PatientIndex], name: str
) -> None:
    processor, ledger, registry, _ = lab
    outcome = process_batch(processor, text_of(DATA / name))
    assert not outcome.accepted and outcome.outcomes == ()
    assert BATCH_REFUSALS[name] in outcome.refusal
    ack = hl7.parse(outcome.ack)
    assert str(ack.segment("MSA")(1)) == "AR"
    assert BATCH_REFUSALS[name] in str(ack.segment("ERR")(8))
    assert ledger.commits == [] and registry.patients == {}
