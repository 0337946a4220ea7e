"""HL7 v2 batches (v2 chapter 2.10): a file (FHS ... FTS) of batches (BHS ... BTS) of
messages, over MLLP as one frame or from a file.

The structure is read by python-hl7 (`hl7.parse_file`): a header or trailer segment out of
place (a BHS inside a message, a second FHS, a segment before any MSH) refuses the whole batch
with AR and writes nothing. A well-formed batch has each message processed as if it came alone
(its own transaction and acknowledgement); the answer is a batch of those acknowledgements,
wrapped in a BHS/BTS (and FHS/FTS when the batch came in a file header) that name the batch
acknowledged (BHS-12, FHS-12) and count the messages (BTS-1, FTS-1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import hl7  # type: ignore[import-untyped]

from medledger.hl7.ack import hl7_timestamp
from medledger.hl7.bounds import check_bounds
from medledger.hl7.ingest import Hl7Processor, Outcome
from medledger.hl7.oru import AckCode, ErrorLocation, Hl7Error, normalize_segments

BATCH_HEADERS = ("FHS", "BHS")


def is_batch(text: str) -> bool:
    """Whether a frame or file is a batch (it begins with FHS or BHS)."""
    return normalize_segments(text)[:3] in BATCH_HEADERS


@dataclass(frozen=True)
class BatchOutcome:
    """What became of a batch: each message's outcome (none when the batch was refused),
    the batch acknowledgement, and the refusal's reason."""

    outcomes: tuple[Outcome, ...]
    ack: str
    refusal: str = ""

    @property
    def accepted(self) -> bool:
        return not self.refusal and all(o.accepted for o in self.outcomes)


def process_batch(processor: Hl7Processor, text: str, now: datetime | None = None) -> BatchOutcome:
    """Process every message of a batch; AR for the whole batch when its structure is broken."""
    text = normalize_segments(text)
    moment = now or processor.clock()
    try:
        # FHS-1/FHS-2 and BHS-1/BHS-2 hold the separators as MSH-1/MSH-2 do: the node's
        # bounds apply to the batch as to one message.
        check_bounds("MSH" + text[3:])
        parsed = hl7.parse_file(text)
    except Hl7Error as error:
        return _refused(processor, text, error)
    except Exception as exc:  # python-hl7's ParseException, and what its parser may raise
        reason = f"invalid batch: {exc}" if str(exc) else "invalid batch"
        return _refused(processor, text, Hl7Error(AckCode.REJECT, reason, "100"))
    messages = [message for batch in parsed for message in batch]
    if not messages:
        empty = Hl7Error(
            AckCode.REJECT, "the batch holds no message (no MSH)", "100", ErrorLocation("MSH")
        )
        return _refused(processor, text, empty)
    outcomes = tuple(processor.process(str(message)) for message in messages)
    ack = _batch_ack(processor, parsed, outcomes, moment)
    return BatchOutcome(outcomes, ack)


def answer_frame(processor: Hl7Processor, text: str) -> str:
    """The acknowledgement of one MLLP frame: a batch ack for a batch (every message's ack in
    it, whatever MSH-15/16 ask: the batch ack is the answer the sender waits for), else the
    message's — none when it asked for none."""
    if is_batch(text):
        return process_batch(processor, text).ack
    return processor.process(text).answer


def _refused(processor: Hl7Processor, text: str, error: Hl7Error) -> BatchOutcome:
    # The AR mirrors the first MSH that can be read (or none).
    first = text.find("\rMSH")
    answer = processor.reject_unreadable(text[first + 1 :] if first >= 0 else "", error)
    return BatchOutcome((), answer, error.reason)


def _batch_ack(
    processor: Hl7Processor, parsed: Any, outcomes: tuple[Outcome, ...], now: datetime
) -> str:
    segments: list[str] = []
    stamp = hl7_timestamp(now)
    application = _safe(processor.application)
    facility = _safe(processor.facility)

    def header(name: str, received: Any) -> str:
        fields = _fields(received)
        return "|".join(
            [
                name,
                "^~\\&",
                application,
                facility,
                fields.get(3, ""),
                fields.get(4, ""),
                stamp,
                "",
                "",
                "",
                str(hl7.generate_message_control_id()),
                fields.get(11, ""),  # the control id of the batch (or file) acknowledged
            ]
        )

    if parsed.header is not None:
        segments.append(header("FHS", parsed.header))
    position = 0
    for batch in parsed:
        segments.append(header("BHS", batch.header))
        for _ in batch:
            segments.extend(s for s in outcomes[position].ack.split("\r") if s)
            position += 1
        segments.append(f"BTS|{len(batch)}")
    if parsed.header is not None:
        segments.append(f"FTS|{len(parsed)}")
    return "\r".join(segments)


def _fields(segment: Any) -> dict[int, str]:
    """FHS/BHS fields by number (FHS-3 is the sending application), made safe to copy."""
    if segment is None:
        return {}
    found: dict[int, str] = {}
    for number in range(3, 13):
        if number < len(segment):
            found[number] = _safe(str(segment(number)))
    return found


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9 ._:/-]", "", value)[:64]


__all__ = ["BatchOutcome", "answer_frame", "is_batch", "process_batch"]
