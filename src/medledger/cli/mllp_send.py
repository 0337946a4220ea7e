"""`medledger hl7 send`: send HL7 v2 messages from a file to an MLLP listener and print each
acknowledgement, as a laboratory system or an integration engine would send them.

A file of messages (segments separated by CR, LF or CRLF) is sent one message at a time, each
waiting for its acknowledgement; a batch file (beginning with FHS or BHS) is sent whole, as one
MLLP block. Framing and reading use python-hl7's MLLP streams.

Exit codes: 0 every message acknowledged AA or CA, 1 at least one AE, AR, CE or CR (each
printed with its reason), 2 the listener could not be reached or answered no acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

import click
import hl7  # type: ignore[import-untyped]
from hl7.mllp import open_hl7_connection  # type: ignore[import-untyped]

from medledger.config import ConfigError, parse_host_port

ACCEPTED = ("AA", "CA")


@dataclass(frozen=True)
class Acknowledgement:
    code: str  # MSA-1
    control_id: str  # MSA-2: the MSH-10 of the message it answers
    text: str  # MSA-3 and the ERR segments' messages
    raw: str

    @property
    def accepted(self) -> bool:
        return self.code in ACCEPTED


def messages_of(payload: bytes) -> tuple[list[str], str]:
    """The messages a file holds (a batch as one) and the codec to send them in."""
    codec = "latin-1" if b"8859/1" in payload.split(b"\r", 1)[0].split(b"\n", 1)[0] else "utf-8"
    text = payload.decode(codec, errors="replace").lstrip("\ufeff")
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if text.startswith(("FHS", "BHS")):
        return [text + "\r"], codec
    return [
        message.rstrip("\r") + "\r" for message in hl7.split_file(text) if message.strip()
    ], codec


def read_acknowledgement(block: bytes, codec: str) -> Acknowledgement:
    raw = block.decode(codec, errors="replace")
    try:
        message = hl7.parse(raw.replace("\n", "\r"))
        msa = message.segment("MSA")
    except (hl7.ParseException, KeyError, IndexError) as exc:
        raise click.ClickException(
            f"the answer is not an HL7 acknowledgement ({exc}): {raw!r}"
        ) from None
    code = str(msa[1]) if len(msa) > 1 else ""
    control = str(msa[2]) if len(msa) > 2 else ""
    notes = [str(msa[3])] if len(msa) > 3 and str(msa[3]) else []
    for segment in message:
        if str(segment[0]) == "ERR":
            # ERR-8 user message (v2.5+), else ERR-3 error code, else ERR-1 (v2.4 and older).
            for index in (8, 3, 1):
                if len(segment) > index and str(segment[index]):
                    _add_note(notes, str(segment[index]))
                    break
    return Acknowledgement(code, control, "; ".join(notes), raw)


def _add_note(notes: list[str], note: str) -> None:
    """Add an ERR message unless MSA-3 already says it (MSA-3 may be its truncation)."""
    for index, present in enumerate(notes):
        if note.startswith(present.removesuffix("...")):
            notes[index] = note
            return
    notes.append(note)


async def send_messages(
    host: str, port: int, messages: list[str], codec: str, timeout: float
) -> list[Acknowledgement]:
    """Send each message on one connection and wait for its acknowledgement."""
    reader, writer = await asyncio.wait_for(open_hl7_connection(host, port), timeout)
    answers = []
    try:
        for message in messages:
            writer.writeblock(message.encode(codec))
            await writer.drain()
            block = await asyncio.wait_for(reader.readblock(), timeout)
            answers.append(read_acknowledgement(block, codec))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return answers


@click.group("hl7")
def hl7_group() -> None:
    """HL7 v2 over MLLP."""


@hl7_group.command("send")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--to", "address", required=True, help="host:port of the MLLP listener.")
@click.option(
    "--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait per ack."
)
@click.option("--raw", is_flag=True, help="Print each acknowledgement as received.")
def send(file: Path, address: str, timeout: float, raw: bool) -> None:
    """Send the messages of FILE over MLLP and print each acknowledgement."""
    try:
        host, port = parse_host_port(address, "--to")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    messages, codec = messages_of(file.read_bytes())
    if not messages:
        raise click.UsageError(f"{file} holds no HL7 message (no MSH segment)")
    try:
        answers = asyncio.run(send_messages(host, port, messages, codec, timeout))
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        click.echo(f"Error: no acknowledgement from {address}: {exc!r}", err=True)
        raise SystemExit(2) from None
    for answer in answers:
        if raw:
            click.echo(answer.raw.replace("\r", "\n"))
        reason = f" {answer.text}" if answer.text else ""
        click.echo(f"{answer.control_id or '-'}: {answer.code}{reason}")
    if not all(answer.accepted for answer in answers):
        raise SystemExit(1)
