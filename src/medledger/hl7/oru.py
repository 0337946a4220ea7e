"""ORU^R01 (unsolicited observation result) messages of HL7 v2.1 to v2.8 (a later vendor
"2.x" is read as 2.8.2), and their FHIR R4 form.

A message is MSH, then for each patient a PID with its orders: an OBR (the order and its
report) followed by its OBX results, each optionally followed by NTE comments. Other segments
(PV1, ORC, SPM, Z-segments, ...) are allowed and not used.

Each OBX becomes one Observation and each OBR one DiagnosticReport whose `result` references
them, all about the ledger patient the PID-3 identifiers resolve to:

- OBR-4 universal service id → DiagnosticReport.code; OBR-2/OBR-3 placer/filler order numbers →
  identifiers; OBR-7 (and OBR-8) → effective[x]; OBR-22 → issued; OBR-25 → status.
- OBX-3 → Observation.code (LN is LOINC); OBX-5 by OBX-2 value type: NM → valueQuantity,
  SN → valueQuantity with a comparator, valueRange or valueRatio, ST/TX/FT → valueString,
  CE/CWE → valueCodeableConcept, DT/TS/DTM → valueDateTime, any other type (FN, XAD, ED, ...)
  or a repeated non-text value → valueString with a warning; OBX-6 units → UCUM when known;
  OBX-7 "low-high", "<high" or ">low" → referenceRange (other text as its text); OBX-8 abnormal
  flags (HL7 table 0078) → interpretation; OBX-11 (table 0085) → status (none: "unknown", with
  a warning); OBX-14 (else OBR-7) → effectiveDateTime; NTE after an OBX → note. An OBX without
  OBX-3 (report text lines) is recorded under its order's OBR-4, with a warning.

Record ids are derived from the sending application and facility, the order (filler, else
placer order number, else the message control id) and the test, so that a result sent again
(a retransmission, or a corrected or final result after a preliminary one) lands on the same
record: unchanged it is not written again, changed it becomes a new version of that record.

HL7 times without a UTC offset are taken in the listener's configured time zone (FHIR needs an
offset on every time of day). Nothing here reads the clock.

A message that is not an ORU^R01 of a supported version and an accepted processing id, or
whose structure or syntax is broken, is rejected (AR); one whose content cannot be recorded (an
invalid value, an unknown code in a table, an unknown patient) is an application error (AE).
What is recorded otherwise than sent is accepted with a warning (`Hl7Warning`), never silently.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import hl7  # type: ignore[import-untyped]

# HL7 v2 is backward compatible: a receiver reads every version from 2.1 on, and a vendor's
# version above the highest it knows (HAPI's "2.999") as that highest version.
SUPPORTED_VERSIONS = (
    "2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8",
    "2.8.1", "2.8.2",
)  # fmt: skip
HIGHEST_VERSION = "2.8.2"
DEFAULT_PROCESSING_IDS = ("P",)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
TERMINOLOGY = "http://terminology.hl7.org/CodeSystem"
INTERPRETATION_SYSTEM = f"{TERMINOLOGY}/v3-ObservationInterpretation"
MRN_SYSTEM_PREFIX = "urn:medledger:mrn:"


class AckCode(StrEnum):
    """HL7 table 0008: application acknowledgements (original mode, and enhanced mode's
    application ack) and enhanced mode's commit acknowledgements."""

    ACCEPT = "AA"
    ERROR = "AE"
    REJECT = "AR"
    COMMIT_ACCEPT = "CA"
    COMMIT_ERROR = "CE"
    COMMIT_REJECT = "CR"

    @property
    def commit(self) -> AckCode:
        """The enhanced-mode commit ack of an outcome (CA, CE, CR)."""
        return _COMMIT[self.value[1]]


_COMMIT = {"A": AckCode.COMMIT_ACCEPT, "E": AckCode.COMMIT_ERROR, "R": AckCode.COMMIT_REJECT}


# HL7 table 0357, message error condition codes (ERR-3, or ERR-1.4 before v2.5).
ERROR_CODES: dict[str, str] = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}


class Severity(StrEnum):
    """HL7 table 0516, the severity of an ERR segment."""

    ERROR = "E"
    WARNING = "W"
    INFORMATION = "I"


@dataclass(frozen=True)
class ErrorLocation:
    """Where an error is: segment id, its occurrence in the message (1-based), field number."""

    segment: str
    sequence: int = 1
    field: int = 0


class Hl7Error(Exception):
    """A message that is not accepted: rejected (AR) or an application error (AE), with an
    HL7 table 0357 error code and, where known, the segment and field at fault."""

    def __init__(
        self,
        ack: AckCode,
        reason: str,
        error_code: str = "207",
        location: ErrorLocation | None = None,
    ) -> None:
        super().__init__(reason)
        self.ack = ack
        self.reason = reason
        self.error_code = error_code
        self.location = location


@dataclass(frozen=True)
class Hl7Warning:
    """Something of an accepted message that was not recorded as sent (an ERR segment of
    severity W in the AA): e.g. an OBX value type kept as text."""

    reason: str
    error_code: str = "102"
    location: ErrorLocation | None = None


def _reject(reason: str, code: str, location: ErrorLocation | None = None) -> Hl7Error:
    return Hl7Error(AckCode.REJECT, reason, code, location)


def _invalid(reason: str, code: str, location: ErrorLocation | None = None) -> Hl7Error:
    return Hl7Error(AckCode.ERROR, reason, code, location)


# -- the parsed message --------------------------------------------------------------------------


@dataclass(frozen=True)
class Code:
    """One coded value: identifier, text and HL7 coding system name (table 0396)."""

    code: str
    display: str
    system: str


@dataclass(frozen=True)
class CodedElement:
    """A CE or CWE: its primary and alternate codes, and the text to show."""

    codes: tuple[Code, ...]
    text: str

    @property
    def empty(self) -> bool:
        return not self.codes and not self.text

    @property
    def key(self) -> str:
        """What identifies the concept (its first code with its system, else its text)."""
        if self.codes:
            return f"{self.codes[0].system}|{self.codes[0].code}"
        return self.text


@dataclass(frozen=True)
class EntityId:
    """An EI: entity identifier, namespace id, universal id and its type."""

    value: str
    namespace: str = ""
    universal_id: str = ""
    universal_id_type: str = ""

    @property
    def key(self) -> str:
        return "^".join((self.value, self.namespace, self.universal_id, self.universal_id_type))


@dataclass(frozen=True)
class Header:
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    message_time: str
    message_type: str
    trigger: str
    structure: str
    control_id: str
    processing_id: str
    version: str
    accept_ack: str = ""  # MSH-15: set, the sender asks for enhanced-mode acknowledgements
    application_ack: str = ""  # MSH-16


@dataclass(frozen=True)
class PatientIdentifier:
    """A PID-3 repetition (CX): the id and its assigning authority (HD)."""

    value: str
    authority: str = ""
    authority_id: str = ""
    authority_id_type: str = ""
    type_code: str = ""

    def systems(self, authorities: Mapping[str, str] | None = None) -> list[str]:
        """The patient-index systems this identifier may be linked under, most specific
        first; none when it names no assigning authority. `authorities` maps the sender's
        assigning authority names (PID-3.4.1; "" for identifiers that name none) to the
        systems the node knows them as (`[hl7.authorities]`)."""
        found = []
        mapped = (authorities or {}).get(self.authority)
        if mapped is not None:
            found.append(mapped)
        if self.authority_id and self.authority_id_type.upper() == "ISO":
            found.append(f"urn:oid:{self.authority_id}")
        elif self.authority_id and self.authority_id_type.upper() in ("URI", "URL"):
            found.append(self.authority_id)
        if self.authority:
            found.append(MRN_SYSTEM_PREFIX + self.authority)
        return found


@dataclass(frozen=True)
class Result:
    """One OBX segment (`sequence`: its occurrence among the message's OBX segments)."""

    sequence: int
    value_type: str
    code: CodedElement
    sub_id: str
    values: tuple[tuple[str, ...], ...]
    units: CodedElement
    reference_range: str
    flags: tuple[str, ...]
    status: str
    observed: str
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Order:
    """One OBR segment and its results."""

    sequence: int
    placer: EntityId
    filler: EntityId
    service: CodedElement
    observed: str
    observed_end: str
    reported: str
    section: str
    status: str
    results: list[Result] = field(default_factory=list)


@dataclass(frozen=True)
class PatientResults:
    """One PID segment and the orders that follow it."""

    sequence: int
    identifiers: tuple[PatientIdentifier, ...]
    orders: list[Order] = field(default_factory=list)
    segment: Any = None  # the PID (a _Segment), to register the patient from


@dataclass(frozen=True)
class OruMessage:
    header: Header
    patients: tuple[PatientResults, ...]
    warnings: tuple[Hl7Warning, ...] = ()


# -- reading with python-hl7 ---------------------------------------------------------------------


_ENCODING_SPECIALS = frozenset("|^~\\&")


def parse_message(text: str) -> Any:
    """The python-hl7 Message of one message's text (segments separated by CR, LF or CRLF, a
    UTF-8 byte-order mark before MSH ignored); AR when it is not an HL7 v2 message.

    MSH-2 holds four encoding characters (component, repetition, escape, subcomponent) or,
    from v2.7 on, five: the fifth is the truncation character (`^~\\&#`), which python-hl7
    reads as part of MSH-2 and which no field of ours uses."""
    text = normalize_segments(text)
    if not text.startswith("MSH") or len(text) < 8:
        raise _reject("not an HL7 v2 message: it does not begin with an MSH segment", "100")
    separator = text[3]
    end = text.find(separator, 4)
    encoding = text[4:] if end < 0 else text[4:end]
    encoding = encoding.split("\r", 1)[0]
    location = ErrorLocation("MSH", 1, 2)
    if separator.isalnum() or separator.isspace():
        raise _reject(f"MSH-1: {separator!r} cannot be the field separator", "102", location)
    if len(encoding) not in (4, 5):
        raise _reject(
            f"MSH-2: {len(encoding)} encoding characters '{encoding[:8]}'; HL7 v2 needs 4"
            " (component, repetition, escape, subcomponent: ^~\\&) or, from v2.7, 5 with the"
            " truncation character (^~\\&#)",
            "102",
            location,
        )
    if len(set(encoding + separator)) != len(encoding) + 1:
        raise _reject(
            f"MSH-2: the encoding characters '{encoding}' repeat a character or the field"
            " separator; each delimiter must be different",
            "102",
            location,
        )
    if any(c.isalnum() or c.isspace() for c in encoding):
        raise _reject(
            f"MSH-2: encoding characters '{encoding}' must not be letters, digits or spaces",
            "102",
            location,
        )
    try:
        message = hl7.parse(text)
    except Exception as exc:  # python-hl7 raises ParseException, IndexError, ValueError
        raise _reject(f"unparseable HL7 v2 message: {exc}", "100") from None
    for segment in message:
        name = _segment_name(segment)
        if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", name):
            raise _reject(
                f"invalid segment id {name[:10]!r} (a segment id is three capitals or digits:"
                " a line break inside a field, or a damaged segment)",
                "100",
            )
    return message


def normalize_segments(text: str) -> str:
    """One message's segments separated by CR alone, without blank lines or MLLP bytes."""
    text = text.replace("\x0b", "").replace("\x1c", "").lstrip("\ufeff")
    lines = re.split(r"\r\n|\r|\n", text)
    return "\r".join(line for line in lines if line.strip())


def split_messages(text: str) -> list[str]:
    """The messages of a file: split at each MSH segment; batch and file header and trailer
    segments (FHS, BHS, BTS, FTS) are dropped."""
    return [m.rstrip("\r") for m in hl7.split_file(normalize_segments(text)) if m.strip()]


def _segment_name(segment: Any) -> str:
    return str(segment[0]) if len(segment) else ""


class _Segment:
    """Typed access to a python-hl7 segment: unescaped leaf values, "" when absent."""

    def __init__(self, segment: Any, sequence: int) -> None:
        self._segment = segment
        self.name = _segment_name(segment)
        self.sequence = sequence

    def location(self, field_number: int) -> ErrorLocation:
        return ErrorLocation(self.name, self.sequence, field_number)

    def get(self, field_number: int, repeat: int = 1, component: int = 1, sub: int = 1) -> str:
        try:
            value = self._segment.extract_field(1, field_number, repeat, component, sub)
        except (IndexError, KeyError):
            return ""
        return str(value).strip()

    def repeats(self, field_number: int) -> int:
        """How many repetitions field `field_number` has (0 when it is empty)."""
        if field_number >= len(self._segment):
            return 0
        value = self._segment[field_number]
        if len(value) and isinstance(value[0], hl7.Repetition):
            return len(value)
        return 1 if str(value) else 0

    def components(self, field_number: int, repeat: int = 1) -> tuple[str, ...]:
        """The components of one repetition (subcomponents joined by '&'), trailing empty
        components dropped."""
        if field_number >= len(self._segment):
            return ()
        value = self._segment[field_number]
        if not (len(value) and isinstance(value[0], hl7.Repetition)):
            text = self.get(field_number)
            return (text,) if text else ()
        count = len(value[repeat - 1])
        parts = []
        for number in range(1, count + 1):
            component = value[repeat - 1][number - 1]
            if isinstance(component, hl7.Component):
                subs = [
                    self.get(field_number, repeat, number, s) for s in range(1, len(component) + 1)
                ]
                parts.append("&".join(subs).rstrip("&"))
            else:
                parts.append(self.get(field_number, repeat, number))
        while parts and not parts[-1]:
            parts.pop()
        return tuple(parts)

    def coded(self, field_number: int, repeat: int = 1) -> CodedElement:
        parts = self.components(field_number, repeat) + ("",) * 9
        codes = []
        for start in (0, 3):
            code, display, system = parts[start : start + 3]
            if code:
                codes.append(Code(code, display, system))
        text = parts[1] or parts[4] or parts[8]
        return CodedElement(tuple(codes), text)

    def entity(self, field_number: int) -> EntityId:
        parts = self.components(field_number) + ("",) * 4
        return EntityId(parts[0], parts[1], parts[2], parts[3])


def read_header(message: Any) -> Header:
    msh = _Segment(message.segment("MSH"), 1)
    return Header(
        sending_application=msh.get(3),
        sending_facility=msh.get(4),
        receiving_application=msh.get(5),
        receiving_facility=msh.get(6),
        message_time=msh.get(7),
        message_type=msh.get(9, 1, 1),
        trigger=msh.get(9, 1, 2),
        structure=msh.get(9, 1, 3),
        control_id=msh.get(10),
        processing_id=msh.get(11, 1, 1),
        version=msh.get(12, 1, 1),
        accept_ack=msh.get(15).upper() if len(message.segment("MSH")) > 15 else "",
        application_ack=msh.get(16).upper() if len(message.segment("MSH")) > 16 else "",
    )


def known_version(version: str) -> str | None:
    """The HL7 version a message's MSH-12 is read as: a listed one as itself, a later
    "2.x" (a vendor's "2.999", a version newer than this node) as the highest known; None for
    what is not an HL7 v2 version at all or is older than 2.1."""
    if version in SUPPORTED_VERSIONS:
        return version
    match = re.fullmatch(r"2\.(\d{1,4})(?:\.(\d{1,4}))?", version)
    if match is None:
        return None
    number = (2, int(match.group(1)), int(match.group(2) or 0))
    if number > (2, 8, 2):
        return HIGHEST_VERSION
    return None


def check_envelope(header: Header, processing_ids: Sequence[str] = DEFAULT_PROCESSING_IDS) -> None:
    """AR unless the message has a control id, an HL7 v2 version from 2.1 on, and a
    processing id (MSH-11) the node's policy accepts."""
    if not header.control_id:
        raise _reject(
            "MSH-10: the message control id is required", "101", ErrorLocation("MSH", 1, 10)
        )
    if known_version(header.version) is None:
        raise _reject(
            f"MSH-12: version {header.version or '(empty)'} is not an HL7 v2 version this"
            " node reads (2.1 to 2.8.2, or a later 2.x)",
            "203",
            ErrorLocation("MSH", 1, 12),
        )
    if header.processing_id not in processing_ids:
        raise _reject(
            f"MSH-11: processing id {header.processing_id or '(empty)'} is not accepted by"
            f" this node's policy ([hl7] processing_ids = {list(processing_ids)})",
            "202",
            ErrorLocation("MSH", 1, 11),
        )


def check_header(header: Header, processing_ids: Sequence[str] = DEFAULT_PROCESSING_IDS) -> None:
    """AR unless the message is an ORU^R01 (check_envelope's rules apply)."""
    check_envelope(header, processing_ids)
    if header.message_type != "ORU":
        raise _reject(
            f"MSH-9: message type {header.message_type or '(empty)'} is not accepted here"
            " (ORU^R01 laboratory results and ADT patient administration)",
            "200",
            ErrorLocation("MSH", 1, 9),
        )
    # An MSH-9 of "ORU" alone (v2.1/2.2 style, and some senders still) is read as ORU^R01,
    # with a warning (trigger_warning).
    if header.trigger not in ("R01", ""):
        raise _reject(
            f"MSH-9: trigger event {header.trigger} is not accepted (ORU^R01 only)",
            "201",
            ErrorLocation("MSH", 1, 9),
        )


def trigger_warning(header: Header) -> list[Hl7Warning]:
    if header.trigger:
        return []
    return [
        Hl7Warning(
            "MSH-9: no trigger event (MSH-9.2); read as ORU^R01", "101", ErrorLocation("MSH", 1, 9)
        )
    ]


def read_oru(message: Any, header: Header) -> OruMessage:
    """The patients, orders and results of a checked ORU^R01 message."""
    patients: list[PatientResults] = []
    warnings: list[Hl7Warning] = []
    counts: dict[str, int] = {}
    last_result: Result | None = None
    order: Order | None = None
    for position, raw in enumerate(message):
        name = _segment_name(raw)
        counts[name] = counts.get(name, 0) + 1
        segment = _Segment(raw, counts[name])
        if name == "MSH":
            if position != 0:
                raise _reject("a second MSH segment in one message", "100", segment.location(0))
        elif name == "PID":
            patients.append(
                PatientResults(segment.sequence, patient_identifiers(segment), segment=segment)
            )
            order, last_result = None, None
        elif name == "OBR":
            if not patients:
                raise _invalid(
                    "no PID segment before the OBR: the patient is unknown",
                    "101",
                    segment.location(0),
                )
            order = _order(segment)
            patients[-1].orders.append(order)
            last_result = None
        elif name == "OBX":
            if order is None:
                raise _reject("an OBX segment before any OBR segment", "100", segment.location(0))
            last_result = _result(segment, order, warnings)
            order.results.append(last_result)
        elif name == "NTE" and last_result is not None:
            comment = "\n".join(
                segment.get(3, r) for r in range(1, segment.repeats(3) + 1) if segment.get(3, r)
            )
            if comment:
                last_result.notes.append(comment)
    if not patients:
        raise _invalid("no PID segment: the patient is unknown", "101", ErrorLocation("PID"))
    if not any(p.orders for p in patients):
        # Acknowledged (nothing to write) rather than refused: a sender's empty result is no
        # reason to stop its queue, and the warning tells it.
        warnings.append(
            Hl7Warning(
                "no OBR segment: the message carries no results; nothing was recorded",
                "100",
                ErrorLocation("OBR"),
            )
        )
    return OruMessage(header, tuple(p for p in patients if p.orders), tuple(warnings))


def patient_identifiers(segment: _Segment, field_number: int = 3) -> tuple[PatientIdentifier, ...]:
    """The CX identifiers of PID-3 (or MRG-1); AE when there is none."""
    found = []
    for repeat in range(1, segment.repeats(field_number) + 1):
        value = segment.get(field_number, repeat, 1)
        if not value:
            continue
        found.append(
            PatientIdentifier(
                value=value,
                authority=segment.get(field_number, repeat, 4, 1),
                authority_id=segment.get(field_number, repeat, 4, 2),
                authority_id_type=segment.get(field_number, repeat, 4, 3),
                type_code=segment.get(field_number, repeat, 5),
            )
        )
    if not found:
        raise _invalid(
            f"{segment.name}-{field_number}: a patient identifier is required",
            "101",
            segment.location(field_number),
        )
    return tuple(found)


def _order(obr: _Segment) -> Order:
    service = obr.coded(4)
    if service.empty:
        raise _invalid(
            "OBR-4: the universal service identifier is required", "101", obr.location(4)
        )
    return Order(
        sequence=obr.sequence,
        placer=obr.entity(2),
        filler=obr.entity(3),
        service=service,
        observed=obr.get(7),
        observed_end=obr.get(8),
        reported=obr.get(22),
        section=obr.get(24),
        status=obr.get(25),
    )


def _result(obx: _Segment, order: Order, warnings: list[Hl7Warning]) -> Result:
    code = obx.coded(3)
    if code.empty:
        # Report text is often sent as OBX lines without an identifier of their own: they are
        # results of the order, recorded under its code (OBR-4).
        warnings.append(
            Hl7Warning(
                "OBX-3: no observation identifier; recorded under the order's code (OBR-4)",
                "101",
                obx.location(3),
            )
        )
        code = order.service
    values = tuple(
        parts
        for parts in (obx.components(5, r) for r in range(1, obx.repeats(5) + 1))
        if any(parts)
    )
    return Result(
        sequence=obx.sequence,
        value_type=obx.get(2).upper(),
        code=code,
        sub_id=obx.get(4),
        values=values,
        units=obx.coded(6),
        reference_range=obx.get(7),
        flags=tuple(f for f in (obx.get(8, r) for r in range(1, obx.repeats(8) + 1)) if f),
        status=obx.get(11).upper(),
        observed=obx.get(14),
    )


# -- mapping to FHIR R4 ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MappedRecord:
    """One FHIR resource to record about a patient, under its derived record id."""

    record_id: str
    patient: str
    resource: dict[str, Any]


CODE_SYSTEMS: dict[str, str] = {
    "LN": LOINC,
    "LOINC": LOINC,
    "SCT": "http://snomed.info/sct",
    "SNOMED": "http://snomed.info/sct",
    "SNOMEDCT": "http://snomed.info/sct",
    "UCUM": UCUM,
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "C4": "http://www.ama-assn.org/go/cpt",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "NDC": "http://hl7.org/fhir/sid/ndc",
}

# Common laboratory unit spellings (case-insensitive) and their UCUM codes.
UCUM_UNITS: dict[str, str] = {
    "%": "%",
    "/ul": "/uL",
    "cells/ul": "/uL",
    "fl": "fL",
    "g/dl": "g/dL",
    "g/l": "g/L",
    "iu/l": "[IU]/L",
    "k/mm3": "10*3/uL",
    "k/ul": "10*3/uL",
    "10*3/ul": "10*3/uL",
    "10^3/ul": "10*3/uL",
    "x10e3/ul": "10*3/uL",
    "thou/ul": "10*3/uL",
    "m/ul": "10*6/uL",
    "10*6/ul": "10*6/uL",
    "10^6/ul": "10*6/uL",
    "x10e6/ul": "10*6/uL",
    "mill/ul": "10*6/uL",
    "10*9/l": "10*9/L",
    "x10e9/l": "10*9/L",
    "10*12/l": "10*12/L",
    "x10e12/l": "10*12/L",
    "meq/l": "meq/L",
    "mg/dl": "mg/dL",
    "mg/l": "mg/L",
    "miu/l": "m[IU]/L",
    "miu/ml": "m[IU]/mL",
    "uiu/ml": "u[IU]/mL",
    "ml/min/1.73m2": "mL/min/{1.73_m2}",
    "ml/min/1.73 m2": "mL/min/{1.73_m2}",
    "mm/h": "mm/h",
    "mm/hr": "mm/h",
    "mmhg": "mm[Hg]",
    "mm[hg]": "mm[Hg]",
    "mmol/l": "mmol/L",
    "mosm/kg": "mosm/kg",
    "ng/dl": "ng/dL",
    "ng/ml": "ng/mL",
    "nmol/l": "nmol/L",
    "pg": "pg",
    "pg/ml": "pg/mL",
    "pmol/l": "pmol/L",
    "s": "s",
    "sec": "s",
    "u/l": "U/L",
    "ug/dl": "ug/dL",
    "ug/l": "ug/L",
    "ug/ml": "ug/mL",
    "umol/l": "umol/L",
    "{ratio}": "{ratio}",
    "ratio": "{ratio}",
}

# HL7 table 0078 abnormal flags → v3 ObservationInterpretation (same codes), with displays.
INTERPRETATIONS: dict[str, str] = {
    "L": "Low",
    "H": "High",
    "LL": "Critical low",
    "HH": "Critical high",
    "<": "Off scale low",
    ">": "Off scale high",
    "N": "Normal",
    "A": "Abnormal",
    "AA": "Critical abnormal",
    "U": "Significant change up",
    "D": "Significant change down",
    "B": "Better",
    "W": "Worse",
    "S": "Susceptible",
    "R": "Resistant",
    "I": "Intermediate",
    "MS": "Moderately susceptible",
    "VS": "Very susceptible",
    "POS": "Positive",
    "NEG": "Negative",
    "IND": "Indeterminate",
}

# HL7 table 0085 observation result status → Observation.status.
OBSERVATION_STATUS: dict[str, str] = {
    "F": "final",
    "C": "corrected",
    "A": "amended",
    "P": "preliminary",
    "R": "preliminary",
    "S": "preliminary",
    "I": "registered",
    "X": "cancelled",
}

# HL7 table 0123 result status → DiagnosticReport.status.
REPORT_STATUS: dict[str, str] = {
    "O": "registered",
    "I": "registered",
    "S": "registered",
    "A": "partial",
    "P": "preliminary",
    "R": "preliminary",
    "C": "corrected",
    "F": "final",
    "X": "cancelled",
}

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_TS = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?)?)?)?"
    r"([+-]\d{4})?"
)
_RANGE = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*-\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*")
_BOUND = re.compile(r"\s*(<=?|>=?)\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*")
MAX_RECORDS = 100
# OBX-2 value types mapped to a FHIR value[x] of their own; others are kept as valueString.
MAPPED_VALUE_TYPES = ("NM", "SN", "ST", "TX", "FT", "CE", "CWE", "DT", "TS", "DTM")


def record_id_for(*parts: str) -> str:
    """A record id derived from what identifies a result (no PHI in it)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return f"hl7-{digest[:40]}"


def map_message(
    message: OruMessage,
    patient_ids: Sequence[str],
    zone: tzinfo,
    warnings: list[Hl7Warning] | None = None,
) -> list[MappedRecord]:
    """The Observation and DiagnosticReport records of a message, given the ledger patient of
    each of its PID groups; in each order the Observations come before their report. What is
    kept otherwise than sent (an unmapped value type as text) is added to `warnings`."""
    if warnings is None:
        warnings = []
    header = message.header
    records: list[MappedRecord] = []
    seen: set[str] = set()
    for group, patient in zip(message.patients, patient_ids, strict=True):
        for order in group.orders:
            order_key = _order_key(header, order)
            report_id = record_id_for("report", *order_key)
            if report_id in seen:
                raise _invalid(
                    f"OBR-4: order {order.service.key} appears twice for the same order number",
                    "205",
                    ErrorLocation("OBR", order.sequence, 4),
                )
            seen.add(report_id)
            occurrences: dict[str, int] = {}
            result_ids = []
            for result in order.results:
                key = f"{result.code.key}#{result.sub_id}"
                occurrences[key] = occurrences.get(key, 0) + 1
                record_id = record_id_for("observation", *order_key, key, str(occurrences[key]))
                seen.add(record_id)
                resource = _observation(header, order, result, patient, record_id, zone, warnings)
                records.append(MappedRecord(record_id, patient, resource))
                result_ids.append((record_id, result))
            report = _report(header, order, patient, report_id, result_ids, zone)
            records.append(MappedRecord(report_id, patient, report))
    if len(records) > MAX_RECORDS:
        raise _invalid(
            f"the message holds {len(records)} results and reports; at most {MAX_RECORDS}"
            " are recorded in one transaction",
            "207",
        )
    return records


def _order_key(header: Header, order: Order) -> tuple[str, ...]:
    if order.filler.value:
        number = "filler:" + order.filler.key
    elif order.placer.value:
        number = "placer:" + order.placer.key
    else:
        number = f"message:{header.control_id}#{order.sequence}"
    return (header.sending_application, header.sending_facility, number, order.service.key)


def _coding_system(header: Header, name: str) -> str | None:
    if not name:
        return None
    known = CODE_SYSTEMS.get(name.upper())
    if known is not None:
        return known
    if re.fullmatch(r"HL7\d{4}", name.upper()):
        return f"{TERMINOLOGY}/v2-{name[3:]}"
    return (
        f"urn:medledger:hl7:{quote(header.sending_facility or header.sending_application, safe='')}"
        f":{quote(name, safe='')}"
    )


def _concept(header: Header, element: CodedElement) -> dict[str, Any]:
    concept: dict[str, Any] = {}
    codings = []
    for code in element.codes:
        coding: dict[str, Any] = {"code": code.code}
        system = _coding_system(header, code.system)
        if system is not None:
            coding["system"] = system
        if code.display:
            coding["display"] = code.display
        codings.append(coding)
    if codings:
        concept["coding"] = codings
    if element.text:
        concept["text"] = element.text
    return concept


def fhir_datetime(
    value: str, zone: tzinfo, location: ErrorLocation, *, instant: bool = False
) -> str | None:
    """An HL7 TS/DTM as a FHIR dateTime (or instant: None unless precise to the second)."""
    match = _TS.fullmatch(value)
    if match is None:
        raise _invalid(f"{_where(location)}: {value!r} is not an HL7 date/time", "102", location)
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        datetime(int(year), int(month or 1), int(day or 1))
    except ValueError:
        raise _invalid(
            f"{_where(location)}: {value!r} is not a valid date", "102", location
        ) from None
    if hour is None:
        if instant:
            return None
        return "-".join(part for part in (year, month, day) if part)
    if instant and second is None:
        return None
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute or 0), int(second or 0)
        )
    except ValueError:
        raise _invalid(
            f"{_where(location)}: {value!r} is not a valid time", "102", location
        ) from None
    if offset is not None:
        sign = 1 if offset[0] == "+" else -1
        hours, minutes = int(offset[1:3]), int(offset[3:5])
        if hours > 14 or minutes > 59:
            raise _invalid(f"{_where(location)}: invalid UTC offset {offset}", "102", location)
        utc_offset: timedelta | None = sign * timedelta(hours=hours, minutes=minutes)
    else:
        utc_offset = moment.replace(tzinfo=zone).utcoffset()
    total = int(utc_offset.total_seconds()) // 60 if utc_offset is not None else 0
    sign_text = "-" if total < 0 else "+"
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if fraction:
        text += "." + fraction
    return f"{text}{sign_text}{abs(total) // 60:02d}:{abs(total) % 60:02d}"


def _where(location: ErrorLocation) -> str:
    if location.field:
        return f"{location.segment}-{location.field}"
    return location.segment


def _number(text: str, location: ErrorLocation) -> int | float:
    if not _NUMBER.fullmatch(text):
        raise _invalid(f"{_where(location)}: {text!r} is not a number", "102", location)
    try:
        decimal = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise _invalid(f"{_where(location)}: {text!r} is not a number", "102", location) from None
    if decimal == decimal.to_integral_value() and "." not in text:
        return int(decimal)
    return float(decimal)


def _quantity(value: int | float, units: CodedElement) -> dict[str, Any]:
    quantity: dict[str, Any] = {"value": value}
    if not units.codes:
        if units.text:
            quantity["unit"] = units.text
        return quantity
    unit = units.codes[0]
    quantity["unit"] = unit.display or unit.code
    if unit.system.upper() == "UCUM":
        code: str | None = unit.code
    elif unit.code in UCUM_UNITS.values():
        code = unit.code
    else:
        code = UCUM_UNITS.get(unit.code.lower())
    if code is not None:
        quantity["system"] = UCUM
        quantity["code"] = code
    return quantity


def _as_text(result: Result) -> dict[str, Any]:
    return {"valueString": "\n".join("^".join(parts) for parts in result.values)}


def _value(
    header: Header, result: Result, zone: tzinfo, warnings: list[Hl7Warning]
) -> dict[str, Any]:
    location = ErrorLocation("OBX", result.sequence, 5)
    if not result.values:
        return {}
    kind = result.value_type
    if not kind:
        raise _invalid(
            "OBX-2: the value type is required when OBX-5 has a value",
            "101",
            ErrorLocation("OBX", result.sequence, 2),
        )
    if kind in ("ST", "TX", "FT"):
        return _as_text(result)
    if kind not in MAPPED_VALUE_TYPES:
        warnings.append(
            Hl7Warning(
                f"OBX-2: value type {kind} is not mapped ({', '.join(MAPPED_VALUE_TYPES)});"
                " the value was stored as text",
                "102",
                ErrorLocation("OBX", result.sequence, 2),
            )
        )
        return _as_text(result)
    if len(result.values) > 1:
        warnings.append(
            Hl7Warning(
                f"OBX-5: a {kind} value repeats; the repetitions were stored as text",
                "102",
                location,
            )
        )
        return _as_text(result)
    parts = result.values[0]
    if kind == "NM":
        if len(parts) > 1:
            raise _invalid(f"OBX-5: {'^'.join(parts)!r} is not a number", "102", location)
        return {"valueQuantity": _quantity(_number(parts[0], location), result.units)}
    if kind == "SN":
        return _structured_numeric(parts, result.units, location)
    if kind in ("CE", "CWE"):
        padded = (*parts, *("",) * 9)
        codes = tuple(Code(*padded[start : start + 3]) for start in (0, 3) if padded[start])
        element = CodedElement(codes, padded[1] or padded[4] or padded[8])
        return {"valueCodeableConcept": _concept(header, element)}
    moment = fhir_datetime(parts[0], zone, location)  # DT, TS, DTM
    return {"valueDateTime": moment}


def _structured_numeric(
    parts: tuple[str, ...], units: CodedElement, location: ErrorLocation
) -> dict[str, Any]:
    comparator, first, separator, second = (*parts, "", "", "", "")[:4]
    if len(parts) > 4 or not first:
        raise _invalid(f"OBX-5: {'^'.join(parts)!r} is not a structured numeric", "102", location)
    if comparator not in ("", "=", "<", ">", "<=", ">="):
        raise _invalid(f"OBX-5: SN comparator {comparator!r} is not supported", "102", location)
    low = _number(first, location)
    if not separator and not second:
        quantity = _quantity(low, units)
        if comparator not in ("", "="):
            quantity["comparator"] = comparator
        return {"valueQuantity": quantity}
    if comparator not in ("", "="):
        raise _invalid("OBX-5: an SN range or ratio takes no comparator", "102", location)
    if separator == "+" and not second:
        return {"valueString": f"{first}+"}
    high = _number(second, location)
    if separator == "-":
        return {"valueRange": {"low": _quantity(low, units), "high": _quantity(high, units)}}
    if separator in (":", "/"):
        return {"valueRatio": {"numerator": {"value": low}, "denominator": {"value": high}}}
    raise _invalid(f"OBX-5: SN separator {separator!r} is not supported", "102", location)


def _reference_range(result: Result, numeric: bool) -> list[dict[str, Any]]:
    text = result.reference_range
    if not text:
        return []
    location = ErrorLocation("OBX", result.sequence, 7)
    if numeric:
        both = _RANGE.fullmatch(text)
        if both is not None:
            return [
                {
                    "low": _quantity(_number(both.group(1), location), result.units),
                    "high": _quantity(_number(both.group(2), location), result.units),
                }
            ]
        bound = _BOUND.fullmatch(text)
        if bound is not None:
            side = "high" if bound.group(1).startswith("<") else "low"
            return [{side: _quantity(_number(bound.group(2), location), result.units)}]
    return [{"text": text}]


def _interpretation(result: Result) -> list[dict[str, Any]]:
    found = []
    for flag in result.flags:
        display = INTERPRETATIONS.get(flag.upper())
        if display is None:
            raise _invalid(
                f"OBX-8: abnormal flag {flag!r} is not in HL7 table 0078",
                "103",
                ErrorLocation("OBX", result.sequence, 8),
            )
        found.append(
            {
                "coding": [
                    {"system": INTERPRETATION_SYSTEM, "code": flag.upper(), "display": display}
                ]
            }
        )
    return found


def _observation(
    header: Header,
    order: Order,
    result: Result,
    patient: str,
    record_id: str,
    zone: tzinfo,
    warnings: list[Hl7Warning],
) -> dict[str, Any]:
    status = OBSERVATION_STATUS.get(result.status)
    if not result.status:
        warnings.append(
            Hl7Warning(
                "OBX-11: no result status; recorded with status unknown",
                "101",
                ErrorLocation("OBX", result.sequence, 11),
            )
        )
        status = "unknown"
    if status is None:
        reason = (
            "OBX-11: the result status is required"
            if not result.status
            else f"OBX-11: result status {result.status!r} is not supported"
            f" ({', '.join(OBSERVATION_STATUS)})"
        )
        raise _invalid(
            reason, "101" if not result.status else "103", ErrorLocation("OBX", result.sequence, 11)
        )
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": record_id,
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": f"{TERMINOLOGY}/observation-category",
                        "code": "laboratory",
                        "display": "Laboratory",
                    }
                ]
            }
        ],
        "code": _concept(header, result.code),
        "subject": {"reference": f"Patient/{patient}"},
    }
    if result.observed:
        resource["effectiveDateTime"] = fhir_datetime(
            result.observed, zone, ErrorLocation("OBX", result.sequence, 14)
        )
    elif order.observed:
        resource["effectiveDateTime"] = fhir_datetime(
            order.observed, zone, ErrorLocation("OBR", order.sequence, 7)
        )
    if order.reported:
        issued = fhir_datetime(
            order.reported, zone, ErrorLocation("OBR", order.sequence, 22), instant=True
        )
        if issued is not None:
            resource["issued"] = issued
    value = _value(header, result, zone, warnings)
    if value:
        resource.update(value)
    elif status not in ("registered", "cancelled"):
        resource["dataAbsentReason"] = {
            "coding": [{"system": f"{TERMINOLOGY}/data-absent-reason", "code": "unknown"}]
        }
    interpretation = _interpretation(result)
    if interpretation:
        resource["interpretation"] = interpretation
    numeric = "valueQuantity" in resource or "valueRange" in resource
    ranges = _reference_range(result, numeric)
    if ranges:
        resource["referenceRange"] = ranges
    if result.notes:
        resource["note"] = [{"text": note} for note in result.notes]
    return resource


def _identifier(kind: str, display: str, entity: EntityId) -> dict[str, Any]:
    identifier: dict[str, Any] = {
        "type": {
            "coding": [{"system": f"{TERMINOLOGY}/v2-0203", "code": kind, "display": display}]
        },
        "value": entity.value,
    }
    if entity.universal_id and entity.universal_id_type.upper() == "ISO":
        identifier["system"] = f"urn:oid:{entity.universal_id}"
    elif entity.universal_id and entity.universal_id_type.upper() in ("URI", "URL"):
        identifier["system"] = entity.universal_id
    if entity.namespace:
        identifier["assigner"] = {"display": entity.namespace}
    return identifier


def _report_status(order: Order) -> str:
    if order.status:
        status = REPORT_STATUS.get(order.status.upper())
        if status is None:
            raise _invalid(
                f"OBR-25: result status {order.status!r} is not supported"
                f" ({', '.join(REPORT_STATUS)})",
                "103",
                ErrorLocation("OBR", order.sequence, 25),
            )
        return status
    statuses = {OBSERVATION_STATUS.get(r.status, "") for r in order.results}
    if not statuses:
        return "registered"
    if statuses <= {"final"}:
        return "final"
    if statuses <= {"final", "corrected", "amended"}:
        return "corrected"
    return "preliminary"


def _report(
    header: Header,
    order: Order,
    patient: str,
    record_id: str,
    results: list[tuple[str, Result]],
    zone: tzinfo,
) -> dict[str, Any]:
    categories: list[dict[str, Any]] = [
        {"coding": [{"system": f"{TERMINOLOGY}/v2-0074", "code": "LAB", "display": "Laboratory"}]}
    ]
    if order.section and order.section.upper() != "LAB":
        categories.append(
            {"coding": [{"system": f"{TERMINOLOGY}/v2-0074", "code": order.section.upper()}]}
        )
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": record_id,
        "status": _report_status(order),
        "category": categories,
        "code": _concept(header, order.service),
        "subject": {"reference": f"Patient/{patient}"},
    }
    identifiers = []
    if order.placer.value:
        identifiers.append(_identifier("PLAC", "Placer Identifier", order.placer))
    if order.filler.value:
        identifiers.append(_identifier("FILL", "Filler Identifier", order.filler))
    if identifiers:
        resource["identifier"] = identifiers
    if order.observed:
        start = fhir_datetime(order.observed, zone, ErrorLocation("OBR", order.sequence, 7))
        if order.observed_end:
            end = fhir_datetime(order.observed_end, zone, ErrorLocation("OBR", order.sequence, 8))
            resource["effectivePeriod"] = {"start": start, "end": end}
        else:
            resource["effectiveDateTime"] = start
    if order.reported:
        issued = fhir_datetime(
            order.reported, zone, ErrorLocation("OBR", order.sequence, 22), instant=True
        )
        if issued is not None:
            resource["issued"] = issued
    if results:
        resource["result"] = [
            {"reference": f"Observation/{record_id}", "display": result.code.text}
            if result.code.text
            else {"reference": f"Observation/{record_id}"}
            for record_id, result in results
        ]
    return resource


# -- patients -----------------------------------------------------------------------------------


def resolve_patient(
    identifiers: Sequence[PatientIdentifier],
    resolve: Callable[[str, str], str | None],
    resolve_any: Callable[[str], str | None],
    sequence: int = 1,
    authorities: Mapping[str, str] | None = None,
) -> str:
    """The ledger patient that the PID-3 identifiers name: an identifier with an assigning
    authority is looked up under that authority's system only, a bare one by its value alone;
    AE when none is known, or when they name different patients."""
    found: set[str] = set()
    for identifier in identifiers:
        systems = identifier.systems(authorities)
        if systems:
            for system in systems:
                patient = resolve(system, identifier.value)
                if patient is not None:
                    found.add(patient)
                    break
        else:
            patient = resolve_any(identifier.value)
            if patient is not None:
                found.add(patient)
    location = ErrorLocation("PID", sequence, 3)
    if not found:
        raise _invalid("unknown patient identifier", "204", location)
    if len(found) > 1:
        raise _invalid("the PID-3 identifiers name different patients", "205", location)
    return found.pop()
