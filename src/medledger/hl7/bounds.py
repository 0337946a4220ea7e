"""Bounds on what a sender can make the node parse, and what of a message the node log may say.

python-hl7 builds an object per field, component and repetition: a frame of a megabyte that is
all separators costs seconds of CPU. A laboratory result is far smaller — at most 100 records in
one message, each a few dozen fields — so a message is refused (AR) before it is parsed when it
has more segments, more fields in one segment or more separators than any real ORU^R01 needs.

Messages carry PHI in nearly every field. The node log names a message by what identifies it
to its sender (control id, type, sending application and facility), cut to a short run of
plain characters, and never quotes any other field or an exception's text.
"""

from __future__ import annotations

import logging
import re

from medledger.hl7.oru import AckCode, ErrorLocation, Hl7Error, normalize_segments

MAX_SEGMENTS = 2000
MAX_FIELDS_PER_SEGMENT = 256
MAX_SEPARATORS_PER_SEGMENT = 4096
MAX_SEPARATORS = 65_536
LOGGED_FIELD_LENGTH = 40

_SEGMENT_BREAK = re.compile(r"\r\n|\r|\n")
_UNSAFE = re.compile(r"[^A-Za-z0-9 ._:/^-]")


def check_bounds(text: str) -> None:
    """AR when a message has more segments, fields or separators than the node parses."""
    text = normalize_segments(text)  # as the parser will see it
    if not text.startswith("MSH") or len(text) < 8:
        return  # not an HL7 message at all: the parser rejects it without splitting it
    # The field separator and MSH-2's component, repetition and subcomponent separators (its
    # third character is the escape character).
    separators = set(text[3] + text[4:6] + text[7]) - {"\r"}
    total = sum(text.count(s) for s in separators)
    if total > MAX_SEPARATORS:
        raise Hl7Error(
            AckCode.REJECT,
            f"the message has {total} field, component and repetition separators; this node"
            f" reads at most {MAX_SEPARATORS}",
            "207",
        )
    segments = text.split("\r")
    if len(segments) > MAX_SEGMENTS:
        raise Hl7Error(
            AckCode.REJECT,
            f"the message has {len(segments)} segments; this node reads at most {MAX_SEGMENTS}",
            "207",
        )
    field_separator = text[3]
    for number, segment in enumerate(segments, 1):
        name = _UNSAFE.sub("", segment[:3]) or "?"
        # MSH-1 is the field separator itself.
        fields = segment.count(field_separator) + (1 if name == "MSH" else 0)
        if fields > MAX_FIELDS_PER_SEGMENT:
            raise Hl7Error(
                AckCode.REJECT,
                f"segment {number} ({name}) has {fields} fields; this node reads at most"
                f" {MAX_FIELDS_PER_SEGMENT} in a segment",
                "207",
                ErrorLocation(name, number),
            )
        count = sum(segment.count(s) for s in separators)
        if count > MAX_SEPARATORS_PER_SEGMENT:
            raise Hl7Error(
                AckCode.REJECT,
                f"segment {number} ({name}) has {count} separators (components and"
                f" repetitions); this node reads at most {MAX_SEPARATORS_PER_SEGMENT} in a"
                " segment",
                "207",
                ErrorLocation(name, number),
            )


def loggable(value: str) -> str:
    """A header field as the node log may show it: plain characters, short."""
    return _UNSAFE.sub("", value[: LOGGED_FIELD_LENGTH * 4])[:LOGGED_FIELD_LENGTH]


def summary(text: str) -> dict[str, str]:
    """What identifies a message in the node log (from its MSH as received, without parsing
    it): control id, message type and sender; empty values when there is no MSH."""
    first = _SEGMENT_BREAK.split(text[:4096].lstrip(), 1)[0]
    if not first.startswith("MSH") or len(first) < 4:
        return {"control_id": "", "message_type": "", "sender": ""}
    parts = first.split(first[3], 12)

    def part(number: int) -> str:
        return parts[number - 1] if number - 1 < len(parts) else ""

    component = first[4:5] or "^"
    return {
        "control_id": loggable(part(10)),
        "message_type": loggable(part(9)),
        "sender": loggable(part(3).split(component, 1)[0] + "^" + part(4).split(component, 1)[0]),
    }


class _WithholdContent(logging.Filter):
    """python-hl7 logs the field it cannot unescape (a name, an identifier, a result value)
    and the exception that quotes it; the record keeps its level and origin, not the text."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = "python-hl7 could not read an escape sequence (content withheld)"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


def withhold_library_content() -> None:
    """Install the filter on python-hl7's loggers (named after its source files)."""
    import hl7.containers  # type: ignore[import-untyped]
    import hl7.util  # type: ignore[import-untyped]

    for module in (hl7.util, hl7.containers):
        logger = logging.getLogger(module.__file__)
        if not any(isinstance(f, _WithholdContent) for f in logger.filters):
            logger.addFilter(_WithholdContent())
