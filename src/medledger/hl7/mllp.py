"""The node's MLLP listener for HL7 v2 laboratory results.

MLLP (HL7 v2 Minimal Lower Layer Protocol) frames each message as 0x0B, the message, 0x1C 0x0D.
A connection carries any number of messages, one after the other; a frame may arrive in many
reads and one read may hold several frames. Each message is answered, in order, on the same
connection with its ACK or NAK before the next one is processed. Bytes between frames are
ignored; a frame larger than the limit is answered with AR and the connection closed.

The listener runs when the node's `medledger.toml` has an `[hl7]` table:

```toml
[hl7]
listen = "127.0.0.1:2575"      # host:port of the MLLP listener
member = "<member id>"         # the custodial laboratory-system (role lis) member that writes
timezone = "Europe/Berlin"     # for HL7 times without a UTC offset (default UTC)
application = "MEDLEDGER"      # MSH-3 of our acknowledgements (MSH-4 is the organization id)
```

The ledger work of a message (queries, sealing, uploading, waiting for the commit) is
synchronous SDK work; it runs in a worker thread so that the event loop, which also serves
ABCI to CometBFT, never waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from medledger.fhir.context import FhirContext
from medledger.hl7.ingest import Hl7Processor, LedgerRecordWriter, RecordWriter, decode_payload
from medledger.hl7.oru import AckCode, Hl7Error
from medledger.node.config import CONFIG_FILE, ConfigError, parse_host_port

log = logging.getLogger("medledger.hl7")

START_BLOCK = 0x0B
END_BLOCK = b"\x1c\x0d"
MAX_MESSAGE_BYTES = 1024 * 1024
READ_SIZE = 64 * 1024


def frame(message: bytes) -> bytes:
    """One MLLP frame."""
    return bytes([START_BLOCK]) + message + END_BLOCK


class FrameTooLarge(Exception):
    pass


class MllpDecoder:
    """Incremental MLLP deframing: feed it what the socket gives, get whole messages."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        self._in_frame = False

    def feed(self, data: bytes) -> list[bytes]:
        """The messages completed by `data`; FrameTooLarge when one exceeds the limit."""
        messages: list[bytes] = []
        self._buffer.extend(data)
        while True:
            if not self._in_frame:
                start = self._buffer.find(START_BLOCK)
                if start < 0:
                    self._buffer.clear()  # bytes between frames are ignored
                    return messages
                del self._buffer[: start + 1]
                self._in_frame = True
            end = self._buffer.find(END_BLOCK)
            if end < 0:
                # Keep a trailing 0x1C: its 0x0D may come in the next read.
                if len(self._buffer) > self.max_message_bytes + 1:
                    self._buffer.clear()
                    self._in_frame = False
                    raise FrameTooLarge(f"an MLLP frame exceeds {self.max_message_bytes} bytes")
                return messages
            if end > self.max_message_bytes:
                del self._buffer[: end + len(END_BLOCK)]
                self._in_frame = False
                raise FrameTooLarge(f"an MLLP frame exceeds {self.max_message_bytes} bytes")
            messages.append(bytes(self._buffer[:end]))
            del self._buffer[: end + len(END_BLOCK)]
            self._in_frame = False

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buffer) if self._in_frame else 0


Handler = Callable[[bytes], Awaitable[bytes]]


class MllpServer:
    """An asyncio MLLP server that answers each message with what `handler` returns."""

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        on_oversize: Callable[[], bytes] | None = None,
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.on_oversize = on_oversize
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        sockets = self._server.sockets
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            for task in list(self._connections):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        peer = writer.get_extra_info("peername")
        decoder = MllpDecoder(self.max_message_bytes)
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                try:
                    messages = decoder.feed(data)
                except FrameTooLarge:
                    log.warning("mllp frame too large", extra={"peer": str(peer)})
                    if self.on_oversize is not None:
                        writer.write(frame(self.on_oversize()))
                        await writer.drain()
                    break
                for message in messages:
                    answer = await self.handler(message)
                    writer.write(frame(answer))
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# -- configuration and the node's listener -------------------------------------------------------


@dataclass(frozen=True)
class Hl7Config:
    """The `[hl7]` table of a node's medledger.toml."""

    listen: str
    member: str
    timezone: str = "UTC"
    application: str = "MEDLEDGER"

    @property
    def address(self) -> tuple[str, int]:
        return parse_host_port(self.listen, "[hl7] listen")

    @property
    def zone(self) -> tzinfo:
        return zone_named(self.timezone)


def zone_named(name: str) -> tzinfo:
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"[hl7] timezone: unknown time zone {name!r}") from None


_HL7_KEYS = ("listen", "member", "timezone", "application")


def load_hl7_config(home: Path) -> Hl7Config | None:
    """The `[hl7]` table of HOME/medledger.toml; None when the node runs no HL7 listener."""
    path = home / CONFIG_FILE
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    table = document.get("hl7")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [hl7] must be a table")
    unknown = sorted(set(table) - set(_HL7_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) in [hl7]: {', '.join(unknown)}")
    for key in _HL7_KEYS:
        if key in table and (not isinstance(table[key], str) or not table[key].strip()):
            raise ConfigError(f"{path}: [hl7] {key} must be a non-empty string")
    for key in ("listen", "member"):
        if key not in table:
            raise ConfigError(f"{path}: [hl7] needs {key}")
    config = Hl7Config(
        listen=table["listen"],
        member=table["member"],
        timezone=table.get("timezone", "UTC"),
        application=table.get("application", "MEDLEDGER"),
    )
    config.address  # noqa: B018 - validates listen
    config.zone  # noqa: B018 - validates timezone
    return config


def processor_for(config: Hl7Config, context: FhirContext) -> Hl7Processor:
    """The node's processor: writes as the configured custodial member."""

    def writer() -> RecordWriter:
        return LedgerRecordWriter(context.records_client(config.member))

    return Hl7Processor(
        writer,
        context.patients,
        zone=config.zone,
        application=config.application,
        facility=context.organization,
    )


def message_handler(processor: Hl7Processor) -> Handler:
    """An MLLP handler: decode, process in a worker thread, encode the answer. Messages from
    all connections take turns here, so that waiting ones hold no worker thread."""
    turn = asyncio.Lock()

    async def handle(payload: bytes) -> bytes:
        text, codec = decode_payload(payload)
        async with turn:
            outcome = await asyncio.to_thread(processor.process, text)
        return outcome.ack.encode(codec, errors="replace")

    return handle


def oversize_nak(processor: Hl7Processor) -> Callable[[], bytes]:
    def answer() -> bytes:
        error = Hl7Error(AckCode.REJECT, f"the message exceeds {MAX_MESSAGE_BYTES} bytes", "207")
        return processor.reject_unreadable("", error).encode("utf-8")

    return answer


async def start_hl7_listener(home: Path, context: FhirContext) -> MllpServer | None:
    """Start the MLLP listener the node's `[hl7]` table asks for (None when there is none)."""
    config = load_hl7_config(home)
    if config is None:
        return None
    if not context.custody.holds(config.member):
        raise ConfigError(f"[hl7] member {config.member}: this node holds no keys for it")
    processor = processor_for(config, context)
    host, port = config.address
    server = MllpServer(message_handler(processor), host, port, on_oversize=oversize_nak(processor))
    await server.start()
    log.info("hl7 listener started", extra={"listen": config.listen, "member": config.member})
    return server
