"""MLLP framing and the asyncio listener: frames split over many reads, several in one read,
noise between frames, oversize frames; answers in order on the same connection; the [hl7]
configuration; and a python-hl7 MLLP client talking to the listener and its processor."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7.mllp import open_hl7_connection
from hl7_samples import oru
from test_oru import FakeLedger, FakePatients

from medledger.config import ConfigError
from medledger.hl7.config import address_allowed
from medledger.hl7.ingest import Hl7Processor, RecordWriter
from medledger.hl7.mllp import (
    FrameTooLarge,
    MllpDecoder,
    MllpServer,
    frame,
    load_hl7_config,
    message_handler,
    oversize_nak,
)


def test_frame_split_at_every_byte() -> None:
    decoder = MllpDecoder()
    data = frame(b"MSH|first") + frame(b"MSH|second")
    got: list[bytes] = []
    for i in range(len(data)):
        got.extend(decoder.feed(data[i : i + 1]))
    assert got == [b"MSH|first", b"MSH|second"]
    assert decoder.pending == 0


def test_several_frames_in_one_read_and_noise_between() -> None:
    decoder = MllpDecoder()
    data = b"\r\n" + frame(b"one") + b"\n" + frame(b"two") + frame(b"thr")[:-1]
    assert decoder.feed(data) == [b"one", b"two"]
    assert decoder.pending == len(b"thr\x1c")
    assert decoder.feed(b"\r") == [b"thr"]


def test_end_block_split_between_reads() -> None:
    decoder = MllpDecoder()
    assert decoder.feed(b"\x0bMSH|a\x1c") == []
    assert decoder.feed(b"\r\x0bMSH|b") == [b"MSH|a"]
    assert decoder.feed(b"\x1c\r") == [b"MSH|b"]


def test_oversize_frame() -> None:
    decoder = MllpDecoder(max_message_bytes=10)
    assert decoder.feed(b"\x0b" + b"x" * 10) == []
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"yy")
    decoder = MllpDecoder(max_message_bytes=10)
    with pytest.raises(FrameTooLarge):
        decoder.feed(frame(b"z" * 11))


async def _echo(message: bytes) -> bytes:
    await asyncio.sleep(0)
    return b"ACK:" + message


def _read_frames(sock: socket.socket, count: int) -> list[bytes]:
    decoder = MllpDecoder()
    got: list[bytes] = []
    while len(got) < count:
        data = sock.recv(4096)
        if not data:
            break
        got.extend(decoder.feed(data))
    return got


async def test_server_answers_in_order_across_split_and_joined_reads() -> None:
    server = MllpServer(_echo, "127.0.0.1", 0)
    await server.start()
    try:

        def client() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(frame(b"m1") + frame(b"m2"))  # two messages, one write
                first = _read_frames(sock, 2)
                whole = frame(b"m3-split")
                for part in (whole[:1], whole[1:4], whole[4:-1], whole[-1:]):
                    sock.sendall(part)
                return first + _read_frames(sock, 1)

        answers = await asyncio.to_thread(client)
        assert answers == [b"ACK:m1", b"ACK:m2", b"ACK:m3-split"]
    finally:
        await server.stop()


async def test_server_closes_after_an_oversize_frame() -> None:
    server = MllpServer(_echo, "127.0.0.1", 0, max_message_bytes=16, on_oversize=lambda: b"NAK")
    await server.start()
    try:

        def client() -> tuple[list[bytes], bytes]:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(frame(b"x" * 40))
                answers = _read_frames(sock, 1)
                return answers, sock.recv(10)

        answers, rest = await asyncio.to_thread(client)
        assert answers == [b"NAK"] and rest == b""
    finally:
        await server.stop()


def _processor(ledger: FakeLedger) -> Hl7Processor:
    def writer() -> RecordWriter:
        return ledger

    return Hl7Processor(writer, FakePatients(), clock=lambda: datetime(2026, 11, 1, 12, tzinfo=UTC))


async def test_python_hl7_client_gets_aa_and_ar() -> None:
    ledger = FakeLedger()
    processor = _processor(ledger)
    server = MllpServer(message_handler(processor), "127.0.0.1", 0)
    await server.start()
    try:
        reader, writer = await open_hl7_connection("127.0.0.1", server.port, encoding="utf-8")
        writer.writemessage(hl7.parse(oru("CLIENT1")))
        await writer.drain()
        ack: Any = await asyncio.wait_for(reader.readmessage(), 10)
        assert str(ack.segment("MSA")(1)) == "AA" and str(ack.segment("MSA")(2)) == "CLIENT1"
        writer.writemessage(hl7.parse(oru("CLIENT2", message_type="ADT^A08")))
        await writer.drain()
        nak: Any = await asyncio.wait_for(reader.readmessage(), 10)
        assert str(nak.segment("MSA")(1)) == "AR" and str(nak.segment("MSA")(2)) == "CLIENT2"
        writer.close()
        await writer.wait_closed()
    finally:
        await server.stop()
    assert len(ledger.commits) == 1


async def test_oversize_nak_is_a_bare_ar_naming_the_limit() -> None:
    answer = oversize_nak(_processor(FakeLedger()), 2048)()
    message = hl7.parse(answer.decode())
    assert str(message.segment("MSA")(1)) == "AR"
    assert str(message.segment("MSA")(3)) == "the message exceeds 2048 bytes"


def test_peer_addresses_against_the_allow_list() -> None:
    allowed = (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8"))
    assert address_allowed("10.1.2.3", allowed)
    assert address_allowed("::ffff:10.1.2.3", allowed)  # IPv4 on a dual-stack socket
    assert address_allowed("fd00::5", allowed)
    assert not address_allowed("10.2.0.1", allowed)
    assert not address_allowed("127.0.0.1", allowed)
    assert not address_allowed("", allowed)
    assert address_allowed("192.0.2.1", None)


def _write_config(home: Path, table: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "medledger.toml").write_text('[node]\nmoniker = "n"\n\n' + table, encoding="utf-8")
    return home


def test_hl7_config(tmp_path: Path) -> None:
    assert load_hl7_config(_write_config(tmp_path / "a", "")) is None
    config = load_hl7_config(
        _write_config(
            tmp_path / "b",
            '[hl7]\nlisten = "127.0.0.1:2575"\nmember = "lis1"\ntimezone = "America/Chicago"\n',
        )
    )
    assert config is not None
    assert config.address == ("127.0.0.1", 2575) and config.member == "lis1"
    assert config.application == "MEDLEDGER"
    assert (config.max_connections, config.idle_timeout_seconds, config.workers) == (32, 60.0, 8)
    assert config.max_message_bytes == 1024 * 1024
    assert config.allowed_senders is None and config.allowed_addresses is None
    assert config.match_without_authority is False
    limited = load_hl7_config(
        _write_config(
            tmp_path / "d",
            '[hl7]\nlisten = "127.0.0.1:2575"\nmember = "lis1"\nmax_connections = 4\n'
            'idle_timeout_seconds = 2.5\nallowed_senders = ["LIS^LAB"]\n'
            'allowed_addresses = ["10.0.0.0/8", "fd00::1"]\nmatch_without_authority = true\n',
        )
    )
    assert limited is not None
    assert (limited.max_connections, limited.idle_timeout_seconds) == (4, 2.5)
    assert limited.allowed_senders == frozenset({("LIS", "LAB")})
    assert [str(n) for n in limited.allowed_addresses or ()] == ["10.0.0.0/8", "fd00::1/128"]
    assert limited.match_without_authority is True
    assert config.zone.utcoffset(datetime(2026, 1, 1)) is not None
    for table in (
        '[hl7]\nlisten = "127.0.0.1:2575"\n',
        '[hl7]\nmember = "x"\n',
        '[hl7]\nlisten = "nowhere"\nmember = "x"\n',
        '[hl7]\nlisten = "127.0.0.1:1"\nmember = "x"\nport = 3\n',
        '[hl7]\nlisten = "127.0.0.1:1"\nmember = "x"\ntimezone = "Mars/Olympus"\n',
        '[hl7]\nlisten = "127.0.0.1:1"\nmember = ""\n',
    ):
        with pytest.raises(ConfigError):
            load_hl7_config(_write_config(tmp_path / "c", table))
