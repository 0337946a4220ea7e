"""Acknowledgements (v2 chapter 2): in original mode MSA-1 AA when the message was
committed, AE (application error) or AR (rejected) with the reason otherwise; in enhanced mode
(the message names an accept-ack condition in MSH-15) the answer is the commit ack CA, CE or CR,
sent once the message is committed (or refused) on the ledger. An accepted message that was not
recorded exactly as sent carries an ERR segment of severity W per warning, and the first one in
MSA-3.

The ACK mirrors the message's MSH: the sender becomes the receiver and back, MSH-9 is
ACK^<trigger>^ACK, MSH-10 a new control id, MSH-11 and MSH-12 as received, and MSA-2 the
control id of the message acknowledged. A NAK carries the reason in MSA-3 (80 characters at
most, as v2.3 allows) and an ERR segment in the message's version: v2.5 and later name the
location in ERR-2, the HL7 table 0357 error code in ERR-3, severity E and the full reason in
ERR-8; earlier versions put location and code in ERR-1.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import hl7  # type: ignore[import-untyped]

from medledger.hl7.oru import ERROR_CODES, AckCode, Hl7Error, Hl7Warning, Severity

MSA_TEXT_LENGTH = 80
_ERR_BEFORE_V25 = ("2.1", "2.2", "2.3", "2.3.1", "2.4")


def hl7_timestamp(moment: datetime) -> str:
    """A TS with seconds and UTC offset (YYYYMMDDHHMMSS+ZZZZ)."""
    return moment.strftime("%Y%m%d%H%M%S%z")


def build_ack(
    message: Any,
    code: AckCode,
    *,
    control_id: str,
    now: datetime,
    application: str,
    facility: str,
    error: Hl7Error | None = None,
    text: str = "",
    warnings: tuple[Hl7Warning, ...] = (),
) -> str:
    """The ACK of a parsed python-hl7 message (segments separated by CR)."""
    message = _normalized_header(message)
    msh = message.segment("MSH")
    receiving_application = _raw(msh, 5) or message.escape(application)
    receiving_facility = _raw(msh, 6) or message.escape(facility)
    ack = message.create_ack(
        str(code),
        message_id=control_id,
        application=receiving_application,
        facility=receiving_facility,
    )
    ack_msh = ack.segment("MSH")
    ack_msh.assign_field(hl7_timestamp(now), 7)
    if not _raw(msh, 9, component=2):
        ack_msh.assign_field("ACK", 9)
    reason = error.reason if error is not None else text
    if not reason and warnings:
        reason = warnings[0].reason
    if reason:
        ack.segment("MSA").assign_field(message.escape(_short(reason)), 3)
    version = _raw(msh, 12, component=1)
    if error is not None:
        ack.append(_err_segment(ack, message, error, version=version))
    for warning in warnings:
        ack.append(_err_segment(ack, message, warning, version=version, severity=Severity.WARNING))
    return str(ack)


def build_bare_ack(
    text: str,
    code: AckCode,
    error: Hl7Error,
    *,
    control_id: str,
    now: datetime,
    application: str,
    facility: str,
) -> str:
    """A NAK for text that python-hl7 could not parse: an ACK with the default encoding
    characters, mirroring what can be read of its MSH (sender, control id, version)."""
    fields = _crude_msh(text)
    template = hl7.parse(
        "MSH|^~\\&|||||||ACK|x|P|2.5.1\rMSA|AR|"  # replaced below
    )
    msh = template.segment("MSH")
    msh.assign_field(template.escape(application), 3)
    msh.assign_field(template.escape(facility), 4)
    msh.assign_field(fields.get(3, ""), 5)
    msh.assign_field(fields.get(4, ""), 6)
    msh.assign_field(hl7_timestamp(now), 7)
    msh.assign_field(control_id, 10)
    processing = fields.get(11, "")
    msh.assign_field(processing if re.fullmatch(r"[A-Z]", processing) else "P", 11)
    version = fields.get(12, "")
    msh.assign_field(version if re.fullmatch(r"2\.\d{1,3}(\.\d)?", version) else "2.5.1", 12)
    msa = template.segment("MSA")
    msa.assign_field(str(code), 1)
    msa.assign_field(fields.get(10, ""), 2)
    msa.assign_field(template.escape(_short(error.reason)), 3)
    template.append(_err_segment(template, template, error, version=str(msh(12))))
    return str(template)


def _normalized_header(message: Any) -> Any:
    """The message's MSH alone, re-parsed with every field the ACK copies present and MSH-9
    as type^trigger^structure: python-hl7's create_ack expects both."""
    msh = message.segment("MSH")
    separator, encoding = str(msh(1)), str(msh(2))

    def first(field: int, component: int = 1) -> str:
        try:
            value = msh.extract_field(1, field, 1, component, 1)
        except (IndexError, KeyError):
            return ""
        return str(message.escape(str(value)))

    fields = [_raw(msh, n) for n in range(3, 9)]
    fields.append(encoding[0].join(first(9, c) for c in (1, 2, 3)))
    fields.extend(first(n) for n in (10, 11, 12))
    return hl7.parse("MSH" + separator + encoding + separator + separator.join(fields))


def _raw(segment: Any, field: int, component: int | None = None) -> str:
    """A field of a python-hl7 segment as received (still escaped), "" when absent."""
    if field >= len(segment):
        return ""
    value = segment(field)
    if component is None:
        return str(value)
    try:
        return str(segment.extract_field(1, field, 1, component, 1))
    except (IndexError, KeyError):
        return ""


def _short(reason: str) -> str:
    line = " ".join(reason.split())
    return line if len(line) <= MSA_TEXT_LENGTH else line[: MSA_TEXT_LENGTH - 3] + "..."


def _err_segment(
    ack: Any,
    message: Any,
    error: Hl7Error | Hl7Warning,
    *,
    version: str,
    severity: Severity = Severity.ERROR,
) -> Any:
    segment = ack.create_segment([ack.create_field(["ERR"])])
    code_text = ERROR_CODES.get(error.error_code, "Application internal error")
    location = error.location
    if version in _ERR_BEFORE_V25:
        if location is not None:
            segment.assign_field(location.segment, 1, 1, 1)
            segment.assign_field(str(location.sequence), 1, 1, 2)
            if location.field:
                segment.assign_field(str(location.field), 1, 1, 3)
        segment.assign_field(error.error_code, 1, 1, 4, 1)
        segment.assign_field(code_text, 1, 1, 4, 2)
        segment.assign_field("HL70357", 1, 1, 4, 3)
        return segment
    if location is not None:
        segment.assign_field(location.segment, 2, 1, 1)
        segment.assign_field(str(location.sequence), 2, 1, 2)
        if location.field:
            segment.assign_field(str(location.field), 2, 1, 3)
    segment.assign_field(error.error_code, 3, 1, 1)
    segment.assign_field(code_text, 3, 1, 2)
    segment.assign_field("HL70357", 3, 1, 3)
    segment.assign_field(str(severity), 4)
    segment.assign_field(message.escape(" ".join(error.reason.split())), 8)
    return segment


def _crude_msh(text: str) -> dict[int, str]:
    """What can be read of an MSH that python-hl7 refused: its fields by number, made safe to
    copy into an ACK with the default encoding characters."""
    first = text.lstrip().split("\r", 1)[0].split("\n", 1)[0]
    if not first.startswith("MSH") or len(first) < 4:
        return {}
    separator = first[3]
    parts = first.split(separator)
    fields: dict[int, str] = {}
    for number in range(3, 13):
        if number - 1 < len(parts):
            value = parts[number - 1]
            fields[number] = re.sub(r"[^A-Za-z0-9 ._:/-]", "", value)[:64]
    return fields
