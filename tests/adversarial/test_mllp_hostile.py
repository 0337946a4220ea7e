"""Hostile peers against the node's HL7 v2 MLLP listener, over real TCP sockets.

The listener is the one the node runs: built from an `[hl7]` table in a real medledger.toml by
`listener_for`, with the node's processor and a real patient index (SQLite). Behind it, instead
of a CometBFT network, the ledger as the laboratory-system member sees it: records by id, each
commit naming the previous version of what it writes (as `record.put-many` does) and refused
when that is stale.

The threats: a peer that holds connections or grows a frame until the node runs out of memory
or slots; a connection that is slow or blocked and so stops every other sender; a system that is
not the laboratory sending results; a result filed in the chart of another authority's patient
with the same MRN; message content (PHI) in the node log; and a frame that ends the listener.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hl7
import pytest

from medledger.client.sdk import TxRejected
from medledger.config import ConfigError
from medledger.hl7.config import load_hl7_config
from medledger.hl7.ingest import Hl7Processor, RecordWriter, StoredRecord
from medledger.hl7.mllp import MllpDecoder, MllpServer, frame, listener_for, processor_from
from medledger.hl7.oru import MRN_SYSTEM_PREFIX
from medledger.ledger.records import PutRecord
from medledger.services.mpi import PatientIndex

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hl7"))

from hl7_samples import AUTHORITY, CBC, MRN, bmp, oru

PATIENT = "p" + "1" * 39  # St. Mary's patient with MRN48213
OTHER_PATIENT = "p" + "2" * 39  # another hospital's patient who has the same MRN
WAIT = 60.0  # generous bound on anything the listener must do; never a performance limit


class LabLedger:
    """The ledger as the custodial LIS member sees it: versions of records by id; a commit is
    all or nothing and refused when a record's previous version is not the latest. `hold`
    makes commits for a patient wait, as a commit waits for a slow block."""

    def __init__(self) -> None:
        self.records: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self.sealed: list[PutRecord] = []
        self.commits: list[list[PutRecord]] = []
        self.fail_seal: Callable[[dict[str, Any]], None] | None = None
        self._pending: dict[tuple[str, int], tuple[str, dict[str, Any]]] = {}
        self._held: dict[str, threading.Event] = {}
        self.waiting = threading.Event()
        self._guard = threading.Lock()

    def hold(self, patient: str) -> threading.Event:
        release = threading.Event()
        self._held[patient] = release
        return release

    def stored(self, record_id: str) -> StoredRecord | None:
        with self._guard:
            versions = self.records.get(record_id)
            if not versions:
                return None
            return StoredRecord(versions[-1][0], len(versions), False)

    def content(self, record_id: str) -> dict[str, Any] | None:
        with self._guard:
            versions = self.records.get(record_id)
            return versions[-1][1] if versions else None

    def seal(
        self, resource: dict[str, Any], patient: str, record_id: str, previous: int
    ) -> PutRecord:
        if self.fail_seal is not None:
            self.fail_seal(resource)
        body = PutRecord(
            record_id, patient, resource["resourceType"], "lab", "0" * 64, 1, b"0" * 32, 2, (),
            previous=previous,
        )  # fmt: skip
        with self._guard:
            self.sealed.append(body)
            self._pending[(record_id, previous)] = (patient, resource)
        return body

    def commit(self, records: list[PutRecord]) -> str:
        for body in records:
            release = self._held.get(body.patient)
            if release is not None:
                self.waiting.set()
                assert release.wait(WAIT), "the test never released the held commit"
        with self._guard:
            for body in records:
                if len(self.records.get(body.record_id, [])) != body.previous:
                    raise TxRejected(9, f"record {body.record_id}: stale version", "ab" * 32)
            for body in records:
                entry = self._pending.pop((body.record_id, body.previous))
                self.records.setdefault(body.record_id, []).append(entry)
            self.commits.append(records)
        return "cd" * 32

    def versions(self) -> dict[str, int]:
        with self._guard:
            return {record_id: len(v) for record_id, v in self.records.items()}


@dataclass
class Lab:
    """A running listener and what stands behind it."""

    server: MllpServer
    processor: Hl7Processor
    ledger: LabLedger
    index: PatientIndex

    @property
    def port(self) -> int:
        return self.server.port


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_config(home: Path, table: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "medledger.toml").write_text(
        '[node]\nmoniker = "n"\n\n[hl7]\n' + table, encoding="utf-8"
    )
    return home


@asynccontextmanager
async def running_lab(tmp_path: Path, settings: str = "") -> AsyncIterator[Lab]:
    """The node's listener with `settings` added to its [hl7] table."""
    home = _write_config(
        tmp_path / "node",
        f'listen = "127.0.0.1:{_free_port()}"\nmember = "lis1"\n{settings}',
    )
    config = load_hl7_config(home)
    assert config is not None
    ledger = LabLedger()
    index = PatientIndex(tmp_path / "patients.db")
    index.link(MRN_SYSTEM_PREFIX + AUTHORITY, MRN, PATIENT)
    index.link(MRN_SYSTEM_PREFIX + "OTHERHOSP", "MRN77001", OTHER_PATIENT)

    def writer() -> RecordWriter:
        return ledger

    processor = processor_from(config, writer, index, "st-mary")
    server = listener_for(config, processor)
    await server.start()
    try:
        yield Lab(server, processor, ledger, index)
    finally:
        await server.stop()
        index.close()


class Peer:
    """One MLLP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = MllpDecoder(64 * 1024 * 1024)
        self.answers: list[bytes] = []

    @classmethod
    async def connect(cls, lab: Lab) -> Peer:
        reader, writer = await asyncio.open_connection("127.0.0.1", lab.port)
        return cls(reader, writer)

    async def send(self, message: str | bytes) -> None:
        self.writer.write(frame(message.encode() if isinstance(message, str) else message))
        await self.writer.drain()

    async def answer(self) -> Any:
        """The next acknowledgement, parsed."""
        while not self.answers:
            data = await asyncio.wait_for(self.reader.read(65536), WAIT)
            assert data, "the listener closed the connection"
            self.answers.extend(self.decoder.feed(data))
        return hl7.parse(self.answers.pop(0).decode("utf-8", errors="replace"))

    async def ask(self, message: str | bytes) -> Any:
        await self.send(message)
        return await self.answer()

    async def closed_by_listener(self) -> bool:
        """True once the listener has closed the connection (what it sent before is kept);
        False if it is still open after WAIT seconds."""
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), WAIT)
                if not data:
                    return True
                self.answers.extend(self.decoder.feed(data))
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def msa(ack: Any) -> tuple[str, str, str]:
    segment = ack.segment("MSA")
    return str(segment(1)), str(segment(2)), str(segment(3)) if len(segment) > 3 else ""


async def assert_good_message_acknowledged(lab: Lab, control_id: str) -> None:
    peer = await Peer.connect(lab)
    try:
        code, acked, text = msa(await peer.ask(oru(control_id)))
        assert (code, acked) == ("AA", control_id), text
    finally:
        await peer.close()


# -- 1. connection cap ------------------------------------------------------------------------


async def test_connections_over_the_cap_are_closed_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_lab(tmp_path, "max_connections = 2\n") as lab:
        first, second = await Peer.connect(lab), await Peer.connect(lab)
        assert msa(await first.ask(oru("CAP-1")))[0] == "AA"
        assert msa(await second.ask(bmp("CAP-2")))[0] == "AA"

        third = await Peer.connect(lab)
        await third.send(oru("CAP-3"))
        assert await third.closed_by_listener(), "a connection over the cap was served"
        assert third.answers == []
        assert lab.server.stats.over_capacity == 1
        assert any("too many connections" in r.getMessage() for r in caplog.records)

        # The connections within the cap keep working; CAP-3 wrote nothing.
        code, control_id, _ = msa(await first.ask(oru("CAP-4", values={"718-7": "11.6"})))
        assert (code, control_id) == ("AA", "CAP-4")
        assert len(lab.ledger.commits) == 3
        await third.close()
        for peer in (first, second):
            await peer.close()


# -- 2. idle timeout and frame bound ------------------------------------------------------------


async def test_a_slow_loris_and_an_idle_peer_are_dropped(tmp_path: Path) -> None:
    async with running_lab(tmp_path, "idle_timeout_seconds = 0.5\n") as lab:
        idle = await Peer.connect(lab)
        loris = await Peer.connect(lab)

        async def dribble() -> None:
            # One byte at a time, far more often than the idle timeout, never ending the frame.
            message = b"\x0b" + oru("LORIS-1").encode() * 1000
            for byte in message:
                loris.writer.write(bytes([byte]))
                await loris.writer.drain()
                await asyncio.sleep(0.05)

        dribbling = asyncio.create_task(dribble())
        try:
            assert await loris.closed_by_listener(), "a slow-loris connection stayed open"
        finally:
            dribbling.cancel()
            with suppress(asyncio.CancelledError, ConnectionError):
                await dribbling
        assert await idle.closed_by_listener(), "an idle connection stayed open"
        assert lab.server.stats.idle_closed == 2
        assert lab.server.connections == 0
        assert lab.ledger.sealed == []
        await assert_good_message_acknowledged(lab, "AFTER-LORIS")
        await idle.close()
        await loris.close()


async def test_a_frame_without_end_block_is_refused_at_the_configured_bound(
    tmp_path: Path,
) -> None:
    async with running_lab(tmp_path, "max_message_bytes = 65536\n") as lab:
        peer = await Peer.connect(lab)
        try:
            peer.writer.write(b"\x0bMSH|^~\\&|" + b"A" * 300_000)  # never an end block
            await peer.writer.drain()
        except ConnectionError:
            pass  # the listener may already have closed
        assert await peer.closed_by_listener()
        for answer in peer.answers:
            code, _, text = msa(hl7.parse(answer.decode()))
            assert code == "AR" and text == "the message exceeds 65536 bytes"
        assert lab.server.stats.oversize == 1
        await peer.close()
        await assert_good_message_acknowledged(lab, "AFTER-UNENDED")


# -- 3. per-connection processing ---------------------------------------------------------------


async def test_a_blocked_connection_does_not_stop_another(tmp_path: Path) -> None:
    async with running_lab(tmp_path) as lab:
        lab.index.link(MRN_SYSTEM_PREFIX + AUTHORITY, "MRN50000", OTHER_PATIENT)
        release = lab.ledger.hold(PATIENT)
        blocked = await Peer.connect(lab)
        await blocked.send(oru("SLOW-1"))
        assert await asyncio.to_thread(lab.ledger.waiting.wait, WAIT)

        # Another laboratory connection, another patient: acknowledged while SLOW-1 waits.
        other = await Peer.connect(lab)
        code, control_id, text = msa(await other.ask(bmp("FAST-1", mrn="MRN50000")))
        assert (code, control_id) == ("AA", "FAST-1"), text

        # A correction of the same order on a third connection must not decide on the state
        # SLOW-1 has not committed yet: it waits for SLOW-1, then amends what SLOW-1 wrote.
        third = await Peer.connect(lab)
        await third.send(oru("SLOW-2", status="C", values={"718-7": "11.4"}))
        for _ in range(int(WAIT / 0.01)):
            if lab.processor.locks.contended():
                break
            await asyncio.sleep(0.01)
        assert lab.processor.locks.contended(), "SLOW-2 does not wait for SLOW-1's records"
        # Only SLOW-1's records are sealed for this patient so far.
        assert sum(body.patient == PATIENT for body in lab.ledger.sealed) == len(CBC) + 1
        release.set()
        assert msa(await blocked.answer())[:2] == ("AA", "SLOW-1")
        code, control_id, text = msa(await third.answer())
        assert (code, control_id) == ("AA", "SLOW-2"), text
        hemoglobin = [
            versions
            for versions in lab.ledger.records.values()
            if versions[-1][1]["code"]["coding"][0]["code"] == "718-7"
        ]
        assert len(hemoglobin) == 1 and len(hemoglobin[0]) == 2
        assert hemoglobin[0][-1][1]["valueQuantity"]["value"] == 11.4

        # Messages on one connection are answered in order, each processed after the last.
        await other.send(bmp("ORDER-1", mrn="MRN50000", status="P"))
        await other.send(bmp("ORDER-2", mrn="MRN50000", status="C", values={"2345-7": "190"}))
        assert msa(await other.answer())[:2] == ("AA", "ORDER-1")
        assert msa(await other.answer())[:2] == ("AA", "ORDER-2")
        assert len(lab.ledger.commits) == 5
        for peer in (blocked, other, third):
            await peer.close()


# -- 4. allow-lists -------------------------------------------------------------------------------


async def test_a_sender_not_on_the_allow_list_gets_an_ar_and_writes_nothing(
    tmp_path: Path,
) -> None:
    async with running_lab(tmp_path, 'allowed_senders = ["COBAS_LIS^STMARY_LAB"]\n') as lab:
        peer = await Peer.connect(lab)
        forged = oru("EVIL-1").replace("|COBAS_LIS|STMARY_LAB|", "|ROGUE_LIS|STMARY_LAB|", 1)
        code, control_id, text = msa(await peer.ask(forged))
        assert (code, control_id) == ("AR", "EVIL-1")
        assert text == "MSH-3/4: sender ROGUE_LIS at STMARY_LAB is not allowed on this node"
        other_facility = oru("EVIL-2").replace("|STMARY_LAB|", "|ELSEWHERE|", 1)
        code, _, text = msa(await peer.ask(other_facility))
        assert code == "AR" and "COBAS_LIS at ELSEWHERE is not allowed" in text
        assert lab.ledger.sealed == [] and lab.ledger.commits == []

        # The laboratory on the list, on the same connection.
        assert msa(await peer.ask(oru("GOOD-1")))[:2] == ("AA", "GOOD-1")
        await peer.close()


async def test_a_peer_address_not_on_the_allow_list_gets_an_ar_and_is_closed(
    tmp_path: Path,
) -> None:
    async with running_lab(tmp_path / "a", 'allowed_addresses = ["10.20.0.0/16", "::1"]\n') as lab:
        peer = await Peer.connect(lab)
        code, control_id, text = msa(await peer.ask(oru("FROM-LOOPBACK")))
        assert (code, control_id) == ("AR", "FROM-LOOPBACK")
        assert text == "this node does not accept HL7 messages from address 127.0.0.1"
        assert await peer.closed_by_listener()
        assert lab.ledger.sealed == [] and lab.server.stats.address_refused == 1
        await peer.close()
    async with running_lab(tmp_path / "b", 'allowed_addresses = ["127.0.0.0/8"]\n') as lab:
        await assert_good_message_acknowledged(lab, "FROM-ALLOWED")


def test_hl7_configuration_errors_name_the_key_and_what_it_expects(tmp_path: Path) -> None:
    base = 'listen = "127.0.0.1:2575"\nmember = "lis1"\n'
    cases = {
        "max_connections = 0": "[hl7] max_connections must be an integer from 1 to 10000, not 0",
        'max_connections = "32"': "[hl7] max_connections must be an integer from 1 to 10000",
        "max_connections = true": "[hl7] max_connections must be an integer from 1 to 10000",
        "idle_timeout_seconds = -1": "[hl7] idle_timeout_seconds must be a number of seconds",
        "idle_timeout_seconds = nan": "[hl7] idle_timeout_seconds must be a number of seconds",
        "max_message_bytes = 10": "[hl7] max_message_bytes must be an integer from 1024",
        "workers = 0": "[hl7] workers must be an integer from 1 to 256, not 0",
        'allowed_senders = "LIS^LAB"': "[hl7] allowed_senders must be a list of strings",
        'allowed_senders = ["LIS"]': "[hl7] allowed_senders: 'LIS' must be \"MSH-3^MSH-4\"",
        'allowed_senders = ["^LAB"]': "[hl7] allowed_senders: '^LAB' must be \"MSH-3^MSH-4\"",
        'allowed_addresses = ["10.0.0.1/8"]': "[hl7] allowed_addresses: '10.0.0.1/8' must be",
        'allowed_addresses = ["lab.example"]': "[hl7] allowed_addresses: 'lab.example' must be",
        'match_without_authority = "yes"': "[hl7] match_without_authority must be true or false",
        "max_conections = 5": "unknown key(s) in [hl7]: max_conections",
    }
    for number, (line, expected) in enumerate(cases.items()):
        home = _write_config(tmp_path / str(number), base + line + "\n")
        with pytest.raises(ConfigError) as refused:
            load_hl7_config(home)
        assert expected in str(refused.value), (line, str(refused.value))


# -- 5. patient matching ----------------------------------------------------------------------


def _bare_pid3(message: str, mrn: str) -> str:
    """The message with PID-3 reduced to a bare MRN (no assigning authority, no SSN)."""
    return message.replace(f"|{mrn}~123-45-6789^^^SSA^SS|", f"|{mrn}|", 1)


async def test_a_result_is_never_filed_in_another_authoritys_chart(tmp_path: Path) -> None:
    async with running_lab(tmp_path / "strict") as lab:
        peer = await Peer.connect(lab)
        # MRN77001 exists only as OTHERHOSP's MRN (another patient). St. Mary's laboratory
        # sends a result for its own MRN77001, without naming the authority...
        bare = _bare_pid3(oru("AUTH-1", mrn="MRN77001", authority=""), "MRN77001")
        code, _, text = msa(await peer.ask(bare))
        assert code == "AE" and text.startswith("PID-3: no patient identifier names its")
        # ... or naming its own authority: not OTHERHOSP's patient either.
        code, _, text = msa(await peer.ask(oru("AUTH-2", mrn="MRN77001", authority="STMARY")))
        assert (code, text) == ("AE", "unknown patient identifier")
        code, _, text = msa(await peer.ask(oru("AUTH-3", mrn="MRN77001", authority="")))
        assert code == "AE" and "without an assigning authority" in text
        assert lab.ledger.sealed == []
        # The right authority and value: filed in that patient's chart.
        assert msa(await peer.ask(oru("AUTH-4", mrn="MRN77001", authority="OTHERHOSP")))[0] == "AA"
        assert {body.patient for body in lab.ledger.sealed} == {OTHER_PATIENT}
        await peer.close()

    async with running_lab(tmp_path / "bare", "match_without_authority = true\n") as lab:
        # An operator who asked for bare matching gets it (a unique value across authorities).
        peer = await Peer.connect(lab)
        bare = _bare_pid3(oru("BARE-1", mrn="MRN77001", authority=""), "MRN77001")
        assert msa(await peer.ask(bare))[0] == "AA"
        assert {body.patient for body in lab.ledger.sealed} == {OTHER_PATIENT}
        await peer.close()


# -- 6. no PHI in the node log ------------------------------------------------------------------

PHI = ("Rivera", "MRN48213", "123-45-6789", "Elm St", "19780312", "Okafor")


def _logged_text(records: list[logging.LogRecord]) -> str:
    """Everything a log handler could write of these records: message, arguments, extra
    fields and exception text."""
    formatter = logging.Formatter()
    parts = []
    for record in records:
        parts.append(record.getMessage())
        parts.extend(repr(value) for value in vars(record).values())
        if record.exc_info:
            parts.append(formatter.formatException(record.exc_info))
    return "\n".join(parts)


async def test_the_node_log_never_quotes_message_content(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_lab(tmp_path) as lab:
        peer = await Peer.connect(lab)
        # Escape sequences python-hl7 cannot read, in the patient's identifier and name.
        escaped = oru("PHI-1").replace("Rivera^Ana", "Rivera\\Z99\\^Ana", 1)
        escaped = escaped.replace("123-45-6789^^^SSA", "123-45-6789\\XGG\\^^^SSA", 1)
        assert msa(await peer.ask(escaped))[0] in ("AA", "AE")

        # A defect behind the processor whose exception quotes the resource it was given.
        def broken(resource: dict[str, Any]) -> None:
            raise RuntimeError(f"cannot seal {resource} for Rivera MRN48213 123-45-6789")

        lab.ledger.fail_seal = broken
        before = lab.ledger.versions()
        code, _, text = msa(await peer.ask(oru("PHI-2", filler="LAB-20261101-0099")))
        assert lab.ledger.versions() == before
        await peer.close()
    logged = _logged_text(caplog.records)
    assert "PHI-2" in logged and "RuntimeError" in logged  # the failure is logged ...
    for value in PHI:
        assert value not in logged, f"{value!r} appears in the node log"  # ... without PHI
    # The sender learns the kind of failure, not the defect's text.
    assert (code, text) == ("AE", "the results could not be recorded: RuntimeError")


# -- 7. hostile frames never end the listener ---------------------------------------------------


async def test_hostile_frames_get_naks_and_the_listener_keeps_acknowledging(
    tmp_path: Path,
) -> None:
    good = oru("GOOD-0")
    many_fields = good.replace("|UNICODE UTF-8", "|UNICODE UTF-8" + "|x" * 10_000, 1)
    many_repetitions = good.replace("|COBAS_LIS|", "|" + "~".join(["LIS"] * 10_000) + "|", 1)
    many_segments = good + "\r".join("NTE|1|L|x" for _ in range(5000))
    hostile: list[tuple[str, bytes, str]] = [
        ("garbage", bytes(range(256)) * 4, "not an HL7 v2 message"),
        ("invalid UTF-8", b"MSH|^~\\&|\xff\xfe\xc3(|LAB|||||ORU^R01|U8|P|2.5.1\rPID|\xc0\xaf", ""),
        ("10,000 fields", many_fields.encode(), "segment 1 (MSH) has 10018 fields"),
        ("10,000 repetitions", many_repetitions.encode(), "segment 1 (MSH) has"),
        ("5,000 segments", many_segments.encode(), "the message has 5012 segments"),
        ("only MSH", b"MSH|", "not an HL7 v2 message"),
        ("NUL bytes", b"MSH|^~\\&|\x00\x00|||||ORU^R01|NUL|P|2.5.1\r\x00", ""),
    ]
    async with running_lab(tmp_path) as lab:
        for number, (name, payload, expected) in enumerate(hostile):
            peer = await Peer.connect(lab)
            code, _, text = msa(await peer.ask(payload))
            assert code in ("AR", "AE"), (name, code, text)
            assert expected in text, (name, text)
            # The same connection still takes a good message.
            control_id = f"GOOD-{number}"
            assert msa(await peer.ask(oru(control_id)))[:2] == ("AA", control_id), name
            await peer.close()

        # 20 MB in one frame: an AR or a closed connection, never a listener that dies.
        peer = await Peer.connect(lab)
        try:
            peer.writer.write(frame(b"MSH|^~\\&|" + b"X" * (20 * 1024 * 1024)))
            await peer.writer.drain()
        except ConnectionError:
            pass
        assert await peer.closed_by_listener()
        for answer in peer.answers:
            assert msa(hl7.parse(answer.decode()))[0] == "AR"
        await peer.close()
        assert lab.server.stats.oversize == 1

        await assert_good_message_acknowledged(lab, "AFTER-ALL")
        assert lab.server.stats.failed == 0
