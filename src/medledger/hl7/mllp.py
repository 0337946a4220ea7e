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
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from medledger.config import ConfigError
from medledger.fhir.context import FhirContext
from medledger.hl7.adt import PatientRegistry
from medledger.hl7.batch import answer_frame
from medledger.hl7.config import (
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_MESSAGE_BYTES,
    Hl7Config,
    IpNetwork,
    address_allowed,
    load_hl7_config,
    zone_named,
)
from medledger.hl7.ingest import (
    Hl7Processor,
    LedgerRecordWriter,
    PatientLookup,
    RecordWriter,
    decode_payload,
)
from medledger.hl7.oru import AckCode, Hl7Error
from medledger.hl7.registry import LedgerPatientRegistry

log = logging.getLogger("medledger.hl7")

START_BLOCK = 0x0B
END_BLOCK = b"\x1c\x0d"
MAX_MESSAGE_BYTES = DEFAULT_MAX_MESSAGE_BYTES
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


@dataclass(frozen=True)
class Limits:
    """What one listener allows its peers."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout_seconds: float = DEFAULT_IDLE_TIMEOUT_SECONDS
    max_message_bytes: int = MAX_MESSAGE_BYTES
    allowed_addresses: tuple[IpNetwork, ...] | None = None


@dataclass
class ListenerStats:
    """Counts since start of what the listener refused or cut short."""

    accepted: int = 0
    over_capacity: int = 0
    address_refused: int = 0
    idle_closed: int = 0
    oversize: int = 0
    failed: int = 0


class _Closed(Exception):
    """The connection ends (the reason has been logged and counted)."""


class MllpServer:
    """An asyncio MLLP server that answers each message with what `handler` returns.

    `on_oversize` builds the answer to a frame over the limit, `on_address_refused` the answer
    to the first message from a peer outside `limits.allowed_addresses` (each from the bytes
    received); without them such a connection is closed without an answer. `on_stop` runs once
    the server has stopped (to release what the handler holds)."""

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        *,
        limits: Limits | None = None,
        max_message_bytes: int | None = None,
        on_oversize: Callable[[], bytes] | None = None,
        on_address_refused: Callable[[bytes, str], bytes] | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        limits = limits or Limits()
        if max_message_bytes is not None:
            limits = Limits(
                limits.max_connections,
                limits.idle_timeout_seconds,
                max_message_bytes,
                limits.allowed_addresses,
            )
        self.handler = handler
        self.host = host
        self.port = port
        self.limits = limits
        self.on_oversize = on_oversize
        self.on_address_refused = on_address_refused
        self.on_stop = on_stop
        self.stats = ListenerStats()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def max_message_bytes(self) -> int:
        return self.limits.max_message_bytes

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._connections)

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
            if self.on_stop is not None:
                self.on_stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer_address(writer)
        if len(self._connections) >= self.limits.max_connections:
            self.stats.over_capacity += 1
            log.warning(
                "mllp connection refused: too many connections",
                extra={
                    "peer": peer,
                    "max_connections": self.limits.max_connections,
                    "refused": self.stats.over_capacity,
                },
            )
            writer.transport.abort()
            return
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        self.stats.accepted += 1
        try:
            await self._converse(reader, writer, peer)
        except (_Closed, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels a connection; ending normally keeps asyncio (3.11) from
            # logging the cancelled task as an unhandled exception.
            pass
        except Exception as exc:  # nothing a peer sends may end the listener
            self.stats.failed += 1
            log.error(
                "mllp connection failed", extra={"peer": peer, "exception": type(exc).__name__}
            )
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        """Answer the peer's messages in order until it closes, idles, or is refused."""
        allowed = address_allowed(peer, self.limits.allowed_addresses)
        decoder = MllpDecoder(self.limits.max_message_bytes)
        idle = self.limits.idle_timeout_seconds
        loop = asyncio.get_running_loop()
        # A connection must complete a message within `idle` of connecting or of its last
        # answer: a byte now and then does not keep it open.
        deadline = loop.time() + idle
        while True:
            data = await self._read(reader, deadline, peer)
            if not data:
                return
            try:
                messages = decoder.feed(data)
            except FrameTooLarge:
                self.stats.oversize += 1
                log.warning(
                    "mllp frame too large: connection closed",
                    extra={"peer": peer, "max_message_bytes": self.limits.max_message_bytes},
                )
                if self.on_oversize is not None:
                    await self._send(writer, self.on_oversize(), peer)
                return
            for message in messages:
                if not allowed:
                    self.stats.address_refused += 1
                    log.warning("mllp peer address not allowed", extra={"peer": peer})
                    if self.on_address_refused is not None:
                        await self._send(writer, self.on_address_refused(message, peer), peer)
                    return
                await self._send(writer, await self.handler(message), peer)
            if messages:
                deadline = loop.time() + idle

    async def _read(self, reader: asyncio.StreamReader, deadline: float, peer: str) -> bytes:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(reader.read(READ_SIZE), remaining)
        except TimeoutError:
            self.stats.idle_closed += 1
            log.info(
                "mllp connection closed: no complete message within the idle timeout",
                extra={"peer": peer, "idle_timeout_seconds": self.limits.idle_timeout_seconds},
            )
            raise _Closed from None

    async def _send(self, writer: asyncio.StreamWriter, answer: bytes, peer: str) -> None:
        """Write one answer (none when the message asked for none: MSH-15/16 NE); a peer that
        does not read it within the idle timeout is cut off."""
        if not answer:
            return
        writer.write(frame(answer))
        try:
            await asyncio.wait_for(writer.drain(), self.limits.idle_timeout_seconds)
        except TimeoutError:
            self.stats.idle_closed += 1
            log.info("mllp connection closed: the peer does not read", extra={"peer": peer})
            writer.transport.abort()
            raise _Closed from None


def _peer_address(writer: asyncio.StreamWriter) -> str:
    peername = writer.get_extra_info("peername")
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return str(peername or "")


# -- the node's listener ---------------------------------------------------------------------------


def processor_for(config: Hl7Config, context: FhirContext) -> Hl7Processor:
    """The node's processor: writes as the configured custodial member."""

    def writer() -> RecordWriter:
        return LedgerRecordWriter(context.records_client(config.member))

    registry: Callable[[], PatientRegistry] | None = None
    member = config.registration_member
    if member is not None:
        registrar = LedgerPatientRegistry(lambda: context.records_client(member), context.custody)

        def registry() -> PatientRegistry:
            return registrar

    return processor_from(config, writer, context.patients, context.organization, registry)


def processor_from(
    config: Hl7Config,
    writer: Callable[[], RecordWriter],
    patients: PatientLookup,
    organization: str,
    registry: Callable[[], PatientRegistry] | None = None,
) -> Hl7Processor:
    """A processor with the `[hl7]` table's rules, writing through `writer` (and registering
    patients through `registry`)."""
    return Hl7Processor(
        writer,
        patients,
        zone=config.zone,
        application=config.application,
        facility=organization,
        allowed_senders=config.allowed_senders,
        match_without_authority=config.match_without_authority,
        processing_ids=config.processing_ids,
        unknown_patients=config.unknown_patients,
        authorities=config.authorities,
        registry=registry,
    )


def message_handler(processor: Hl7Processor, executor: ThreadPoolExecutor | None = None) -> Handler:
    """An MLLP handler: decode, process on a worker thread (of `executor`, else the loop's
    default), encode the answer. It never raises: whatever fails becomes an AE."""

    async def handle(payload: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        try:
            text, codec = decode_payload(payload)
            ack = await loop.run_in_executor(executor, answer_frame, processor, text)
            return ack.encode(codec, errors="replace")
        except Exception as exc:
            log.error("hl7 message handling failed", extra={"exception": type(exc).__name__})
            error = Hl7Error(AckCode.ERROR, f"internal error: {type(exc).__name__}", "207")
            return processor.reject_unreadable("", error).encode("utf-8")

    return handle


def oversize_nak(
    processor: Hl7Processor, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> Callable[[], bytes]:
    def answer() -> bytes:
        error = Hl7Error(AckCode.REJECT, f"the message exceeds {max_message_bytes} bytes", "207")
        return processor.reject_unreadable("", error).encode("utf-8")

    return answer


def address_nak(processor: Hl7Processor) -> Callable[[bytes, str], bytes]:
    def answer(payload: bytes, peer: str) -> bytes:
        error = Hl7Error(
            AckCode.REJECT,
            f"this node does not accept HL7 messages from address {peer}",
            "207",
        )
        text, codec = decode_payload(payload[:4096])
        return processor.reject_unreadable(text, error).encode(codec, errors="replace")

    return answer


def listener_for(config: Hl7Config, processor: Hl7Processor) -> MllpServer:
    """The MLLP server the `[hl7]` table describes, on its own worker threads (not started)."""
    executor = ThreadPoolExecutor(config.workers, thread_name_prefix="hl7")
    host, port = config.address
    limits = Limits(
        config.max_connections,
        config.idle_timeout_seconds,
        config.max_message_bytes,
        config.allowed_addresses,
    )
    return MllpServer(
        message_handler(processor, executor),
        host,
        port,
        limits=limits,
        on_oversize=oversize_nak(processor, config.max_message_bytes),
        on_address_refused=address_nak(processor),
        on_stop=lambda: executor.shutdown(wait=False, cancel_futures=True),
    )


async def start_hl7_listener(home: Path, context: FhirContext) -> MllpServer | None:
    """Start the MLLP listener the node's `[hl7]` table asks for (None when there is none)."""
    config = load_hl7_config(home)
    if config is None:
        return None
    if not context.custody.holds(config.member):
        raise ConfigError(f"[hl7] member {config.member}: this node holds no keys for it")
    member = config.registration_member
    if member is not None and not context.custody.holds(member):
        raise ConfigError(f"[hl7] registration_member {member}: this node holds no keys for it")
    server = listener_for(config, processor_for(config, context))
    await server.start()
    log.info("hl7 listener started", extra={"listen": config.listen, "member": config.member})
    return server


__all__ = [
    "FrameTooLarge",
    "Hl7Config",
    "Limits",
    "ListenerStats",
    "MllpDecoder",
    "MllpServer",
    "frame",
    "listener_for",
    "load_hl7_config",
    "message_handler",
    "oversize_nak",
    "processor_from",
    "start_hl7_listener",
    "zone_named",
]
