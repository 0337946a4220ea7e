"""What the benchmarks share: a 4-validator testnet of ours in a temporary directory on its own
ports, the JSON-RPC load driver with its NewBlock listeners, the signed workloads (admins
enrolling members, members rotating their keys) that give the raw ledger throughput every
benchmark reports beside its own numbers, CPU metering, and clean teardown on SIGTERM/SIGHUP.

bench/run.py, bench/records.py and bench/fhir.py import it as `bench.common` (each puts the
repository root on sys.path in place of bench/, so that bench/fhir.py cannot shadow the `fhir`
package).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import ctypes
import hashlib
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

import aiohttp
import httpx
import msgspec
import nacl.signing

from medledger.client.sdk import LedgerClient, TxOutcome
from medledger.client.tx import sign_transaction
from medledger.config import NodeConfig, find_cometbft
from medledger.crypto.keys import KeyPair, member_id_for
from medledger.crypto.keystore import load_keystore
from medledger.ledger import codec
from medledger.ledger.codec import Envelope
from medledger.ledger.mempool import MAX_PENDING_PER_SENDER
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember, RotateKey
from medledger.node.procs import read_pid_file
from medledger.node.services import load_services_config
from medledger.node.testnet import (
    PORT_STRIDE,
    CometTuning,
    init_testnet,
    testnet_down,
    testnet_up,
    wait_for_height,
)

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
CHAIN_ID = "medledger-bench"
PASSPHRASE = "bench passphrase"
NODES = 4
# Enrollments come from one admin per node; CheckTx admits at most MAX_PENDING_PER_SENDER
# pending transactions per sender, so the enrolling admins keep half of that in flight each.
ENROLL_WINDOW = NODES * MAX_PENDING_PER_SENDER // 2
RPC_OFFSET = 1
BATCH = 10  # CometBFT's default [rpc] max_request_batch_size


# -- small helpers -----------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank method; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q * len(ordered) + 0.5)))
    return ordered[rank - 1]


def seed(label: str) -> bytes:
    return hashlib.sha256(b"medledger-bench/" + label.encode()).digest()


def free_base_port(nodes: int, start: int) -> int:
    """A base port whose whole block of ports is free on 127.0.0.1 right now."""
    for base in range(start, 60000, 500):
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + nodes * PORT_STRIDE):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port range on 127.0.0.1")


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def process_children() -> dict[int, list[int]]:
    """Every live process's children, by parent pid (Linux /proc), read once per sample."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def tree_cpu_seconds(root: int, children: dict[int, list[int]]) -> float:
    """CPU time of `root` and of every live descendant (a node's FHIR validation workers,
    PostgreSQL's backends), plus what their exited children used (cutime/cstime), so that
    processes coming and going between two samples are counted; 0 when `root` is gone.
    `children` is `process_children()`."""
    total = 0
    todo = [root]
    seen: set[int] = set()
    while todo and len(seen) < 10_000:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        fields = _stat(pid)
        if fields is None:
            continue
        total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
        todo.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


def show_log_tails(home: Path, names: tuple[str, ...], lines: int = 8) -> None:
    """On failure, the end of every node's logs (the directory is removed afterwards)."""
    for node_dir in sorted(home.glob("node*")):
        for name in names:
            for path in (node_dir / "logs" / name, node_dir / name):
                if path.is_file():
                    tail = path.read_text(errors="replace").splitlines()[-lines:]
                    log(f"--- {path}\n" + "\n".join(line[:300] for line in tail))


def die_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM when this benchmark dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        comet = subprocess.run(
            [str(find_cometbft()), "version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:
        comet = "?"
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except Exception:
        rev = "?"
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cometbft_version": comet,
        "git_rev": rev,
        "load_average_at_start": list(os.getloadavg()),
    }


def signed(
    key: nacl.signing.SigningKey, sender: str, nonce: int, tx_type: str, body: object
) -> bytes:
    """A transaction signed with an already-expanded key (what sign_transaction does, minus
    re-deriving the key from its seed for every signature)."""
    unsigned = Envelope(CHAIN_ID, sender, nonce, tx_type, codec.encode(body), b"")
    signature = key.sign(unsigned.sign_bytes()).signature
    return codec.encode(msgspec.structs.replace(unsigned, signature=signature))


class BenchMember:
    def __init__(self, label: str) -> None:
        self.key = nacl.signing.SigningKey(seed(f"member/{label}"))
        self.verify_key = bytes(self.key.verify_key)
        self.member_id = member_id_for(self.verify_key)
        self.label = label
        self.nonce = 0

    def rotate_tx(self) -> bytes:
        """The member rotates its own key: signed by the current key, to the next one."""
        self.nonce += 1
        new = nacl.signing.SigningKey(seed(f"member/{self.label}/{self.nonce}"))
        body = RotateKey(self.member_id, bytes(new.verify_key), seed(f"enc/{self.label}"))
        raw = signed(self.key, self.member_id, self.nonce, "member.rotate", body)
        self.key = new
        return raw


class _TxResult(msgspec.Struct):
    code: int = 0


class _FinalizeResult(msgspec.Struct):
    tx_results: list[_TxResult] | None = None


class _Header(msgspec.Struct):
    height: str
    time: str


class _Data(msgspec.Struct):
    txs: list[str] | None = None


class _Block(msgspec.Struct):
    header: _Header
    data: _Data


class _NewBlock(msgspec.Struct):
    block: _Block
    result_finalize_block: _FinalizeResult


class _EventData(msgspec.Struct):
    type: str
    value: _NewBlock


class _EventResult(msgspec.Struct):
    data: _EventData | None = None


class _EventMessage(msgspec.Struct):
    result: _EventResult | None = None
    error: dict[str, Any] | None = None


_event_decoder = msgspec.json.Decoder(_EventMessage)


class Workload(Protocol):
    """Where transactions come from and what happens to them (txs are base64 strings, as the
    JSON-RPC carries them and as NewBlock events list them)."""

    def take(self, node: int, count: int) -> list[str]: ...
    def committed(self, node: int, tx: str, code: int) -> None: ...
    def refused(self, node: int, tx: str, code: int, log: str) -> None: ...
    def retry(self, node: int, tx: str) -> None: ...


class EnrollWorkload:
    """Each node's admin enrolls its share of the members, nonces in order, all to its own node
    (one sender per node keeps them in order)."""

    def __init__(self, per_node: list[list[str]], members: list[list[BenchMember]]) -> None:
        self.queues = [collections.deque(txs) for txs in per_node]
        self.owner: dict[str, BenchMember] = {}
        for txs, node_members in zip(per_node, members, strict=True):
            self.owner.update(zip(txs, node_members, strict=True))
        self.enrolled: list[list[BenchMember]] = [[] for _ in per_node]
        self.failed: list[list[BenchMember]] = [[] for _ in per_node]
        self.codes: collections.Counter[str] = collections.Counter()
        self.retries: list[list[str]] = [[] for _ in per_node]

    def take(self, node: int, count: int) -> list[str]:
        out = self.retries[node][:count]
        del self.retries[node][:count]
        queue = self.queues[node]
        out += [queue.popleft() for _ in range(min(count - len(out), len(queue)))]
        return out

    def committed(self, node: int, tx: str, code: int) -> None:
        if code == 0:
            self.enrolled[node].append(self.owner[tx])
        else:
            self.failed[node].append(self.owner[tx])
            self.codes[f"code {code} in block"] += 1

    def refused(self, node: int, tx: str, code: int, log: str) -> None:
        self.failed[node].append(self.owner[tx])
        self.codes[f"CheckTx code {code}: {log[:80]}"] += 1

    def retry(self, node: int, tx: str) -> None:
        self.retries[node].append(tx)

    def done(self) -> bool:
        return not any(self.queues) and not any(self.retries)


def sign_enrollments(
    admins: list[KeyPair], rpc_urls: list[str], members: list[list[BenchMember]]
) -> EnrollWorkload:
    """member.enroll for every member, by its node's admin, from the admin's next nonce on."""
    per_node: list[list[str]] = []
    for admin, url, node_members in zip(admins, rpc_urls, members, strict=True):
        with LedgerClient(url, CHAIN_ID) as client:
            nonce = client.next_nonce(admin.member_id)
        txs = []
        for j, member in enumerate(node_members):
            body = EnrollMember(member.verify_key, seed(f"enc/{member.label}"), Role.CLINICIAN)
            raw = sign_transaction(
                admin, CHAIN_ID, nonce + j, "member.enroll", body, sender=admin.member_id
            )
            txs.append(base64.b64encode(raw).decode())
        per_node.append(txs)
    return EnrollWorkload(per_node, members)


class RotateWorkload:
    """Every member rotates its own key again and again: one transaction in flight per member
    (the next one is signed by the key the previous one installed), always to the same node."""

    def __init__(self, nodes: int) -> None:
        self.idle: list[collections.deque[BenchMember]] = [
            collections.deque() for _ in range(nodes)
        ]
        self.owner: dict[str, BenchMember] = {}
        self.unsent: dict[int, str] = {}  # id(member) -> signed tx not yet accepted
        self.failed = 0
        self.last_failure = ""

    def add(self, members: list[list[BenchMember]]) -> None:
        for queue, node_members in zip(self.idle, members, strict=True):
            queue.extend(node_members)

    def take(self, node: int, count: int) -> list[str]:
        idle = self.idle[node]
        out = []
        for _ in range(min(count, len(idle))):
            member = idle.popleft()
            tx = self.unsent.pop(id(member), None)
            if tx is None:
                tx = base64.b64encode(member.rotate_tx()).decode()
            self.owner[tx] = member
            out.append(tx)
        return out

    def committed(self, node: int, tx: str, code: int) -> None:
        member = self.owner.pop(tx)
        if code == 0:
            self.idle[node].append(member)
        else:
            self.failed += 1
            self.last_failure = f"code {code} in block"

    def refused(self, node: int, tx: str, code: int, log: str) -> None:
        self.owner.pop(tx)
        self.failed += 1
        self.last_failure = f"CheckTx code {code}: {log}"

    def retry(self, node: int, tx: str) -> None:
        member = self.owner.pop(tx)
        self.unsent[id(member)] = tx
        self.idle[node].appendleft(member)


@dataclass
class BlockSeen:
    received: float
    height: int
    txs: int
    ok: int
    time: str


@dataclass
class Accepted:
    at: float
    workload: Workload


class LoadDriver:
    """Senders (JSON-RPC batches of broadcast_tx_sync) and NewBlock listeners on every node."""

    def __init__(self, rpc_ports: list[int]) -> None:
        self.ports = rpc_ports
        self.pending: list[dict[str, Accepted]] = [{} for _ in rpc_ports]
        self.unacked: list[dict[str, float]] = [{} for _ in rpc_ports]
        self.early: list[dict[str, tuple[float, int]]] = [{} for _ in rpc_ports]
        self.latencies: list[tuple[float, float]] = []  # (accepted at, latency)
        self.accepted_at: list[float] = []
        self.rtts: list[tuple[float, float]] = []  # (answered at, broadcast batch round trip)
        self.in_flight_samples: list[tuple[float, int]] = []
        self.blocks: list[BlockSeen] = []  # as node 0 saw them
        self.in_flight = 0
        self.refused = 0
        self.rpc_errors = 0
        self.last_rpc_error = ""
        self.commit_event = asyncio.Event()
        self.heights = [0] * len(rpc_ports)
        self._listeners: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._clients = [
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                timeout=httpx.Timeout(60.0),
                limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
            )
            for port in rpc_ports
        ]

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        ready = [asyncio.get_running_loop().create_future() for _ in self.ports]
        for node, port in enumerate(self.ports):
            self._listeners.append(asyncio.create_task(self._listen(node, port, ready[node])))
        await asyncio.wait_for(asyncio.gather(*ready), 30)

    async def close(self) -> None:
        for task in self._listeners:
            task.cancel()
        for task in self._listeners:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for client in self._clients:
            await client.aclose()
        if self._session is not None:
            await self._session.close()

    async def _listen(self, node: int, port: int, ready: asyncio.Future[None]) -> None:
        assert self._session is not None
        async with self._session.ws_connect(
            f"ws://127.0.0.1:{port}/websocket", max_msg_size=0, autoping=True
        ) as ws:
            await ws.send_str(
                json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "method": "subscribe",
                        "id": 1,
                        "params": {"query": "tm.event='NewBlock'"},
                    }
                )
            )
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break
                    continue
                received = time.monotonic()
                event = _event_decoder.decode(message.data)
                if event.error is not None:
                    raise RuntimeError(f"node {node} websocket: {event.error}")
                if not ready.done():
                    ready.set_result(None)
                if event.result is None or event.result.data is None:
                    continue
                self._on_block(node, received, event.result.data.value)
        if not ready.done():
            ready.set_exception(RuntimeError(f"node {node} websocket closed"))

    def _on_block(self, node: int, received: float, value: _NewBlock) -> None:
        txs = value.block.data.txs or []
        codes = [r.code for r in value.result_finalize_block.tx_results or []]
        height = int(value.block.header.height)
        self.heights[node] = height
        pending = self.pending[node]
        unacked = self.unacked[node]
        for tx, code in zip(txs, codes, strict=True):
            accepted = pending.pop(tx, None)
            if accepted is not None:
                self.latencies.append((accepted.at, received - accepted.at))
                self.in_flight -= 1
                accepted.workload.committed(node, tx, code)
            elif tx in unacked:
                self.early[node][tx] = (received, code)
        if node == 0:
            ok = sum(1 for code in codes if code == 0)
            self.blocks.append(BlockSeen(received, height, len(txs), ok, value.block.header.time))
        self.commit_event.set()

    async def wait_commit(self, timeout: float) -> None:
        self.commit_event.clear()
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives as its timeout expires.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.commit_event.wait()

    async def send(self, node: int, workload: Workload, txs: list[str]) -> None:
        """One JSON-RPC batch of broadcast_tx_sync; each answer is recorded."""
        self.in_flight += len(txs)
        sent_at = time.monotonic()
        unacked = self.unacked[node]
        for tx in txs:
            unacked[tx] = sent_at
        body = (
            "["
            + ",".join(
                f'{{"jsonrpc":"2.0","id":{i},"method":"broadcast_tx_sync","params":{{"tx":"{tx}"}}}}'
                for i, tx in enumerate(txs)
            )
            + "]"
        )
        answers: list[Any] = []
        try:
            response = await self._clients[node].post(
                "/", content=body, headers={"content-type": "application/json"}
            )
            decoded = msgspec.json.decode(response.content)
            answers = decoded if isinstance(decoded, list) else [decoded]
        except (httpx.HTTPError, msgspec.DecodeError) as exc:
            self.last_rpc_error = repr(exc)
        now = time.monotonic()
        self.rtts.append((now, now - sent_at))
        by_id = {a.get("id"): a for a in answers if isinstance(a, dict)}
        for i, tx in enumerate(txs):
            unacked.pop(tx, None)
            answer = by_id.get(i)
            if answer is None or "error" in answer:
                self.rpc_errors += 1
                if answer is not None:
                    self.last_rpc_error = str(answer["error"])[:300]
                self.in_flight -= 1
                workload.retry(node, tx)
                continue
            result = answer["result"]
            code = int(result.get("code", 0))
            if code != 0:
                self.refused += 1
                self.in_flight -= 1
                workload.refused(node, tx, code, str(result.get("log", ""))[:300])
                continue
            self.accepted_at.append(now)
            early = self.early[node].pop(tx, None)
            if early is not None:
                self.latencies.append((now, max(0.0, early[0] - now)))
                self.in_flight -= 1
                workload.committed(node, tx, early[1])
            else:
                self.pending[node][tx] = Accepted(now, workload)

    async def run(
        self,
        workload: Workload,
        *,
        seconds: float,
        senders_per_node: int,
        window: int,
        rate: float | None = None,
        until: Callable[[], bool] | None = None,
    ) -> None:
        """Keep sending for `seconds` (or until `until()`): closed loop with at most `window`
        transactions in flight, or paced at `rate` tx/s in total (still capped by `window`)."""
        deadline = time.monotonic() + seconds
        total_senders = senders_per_node * len(self.ports)

        async def sender(node: int, index: int) -> None:
            interval = BATCH * total_senders / rate if rate else 0.0
            next_at = time.monotonic() + interval * index / total_senders
            while time.monotonic() < deadline and not (until is not None and until()):
                if any(TERMINATING.values()):
                    raise Terminated()
                if rate:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_at += interval
                room = window - self.in_flight
                if room < 1:
                    await self.wait_commit(0.1)
                    continue
                txs = workload.take(node, min(BATCH, room))
                if not txs:
                    await self.wait_commit(0.1)
                    continue
                await self.send(node, workload, txs)

        async def sample() -> None:
            while True:
                self.in_flight_samples.append((time.monotonic(), self.in_flight))
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        try:
            await asyncio.gather(
                *(
                    sender(node, i)
                    for node in range(len(self.ports))
                    for i in range(senders_per_node)
                )
            )
        finally:
            sampler.cancel()

    async def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.in_flight > 0 and time.monotonic() < deadline:
            await self.wait_commit(0.2)
        return self.in_flight == 0

    def committed_ok(self, start: float, end: float) -> int:
        return sum(b.ok for b in self.blocks if start <= b.received < end)

    def window_stats(self, start: float, end: float) -> dict[str, Any]:
        """Throughput (node 0's committed blocks) and latency (txs accepted in the window)."""
        seconds = end - start
        blocks = [b for b in self.blocks if start <= b.received < end]
        latencies = [lat for at, lat in self.latencies if start <= at < end]
        accepted = sum(1 for at in self.accepted_at if start <= at < end)
        ok = sum(b.ok for b in blocks)
        txs = sum(b.txs for b in blocks)
        intervals = [b.received - a.received for a, b in itertools.pairwise(blocks)]
        rtts = [rtt for at, rtt in self.rtts if start <= at < end]
        in_flight = [n for at, n in self.in_flight_samples if start <= at < end]
        return {
            "seconds": round(seconds, 2),
            "committed_ok": ok,
            "committed_failed": txs - ok,
            "tps": ok / seconds if seconds > 0 else 0.0,
            "accepted_tps": accepted / seconds if seconds > 0 else 0.0,
            "blocks": len(blocks),
            "mean_block_txs": txs / len(blocks) if blocks else 0.0,
            "max_block_txs": max((b.txs for b in blocks), default=0),
            "mean_block_interval_s": statistics.mean(intervals) if intervals else None,
            "latency_samples": len(latencies),
            "latency_p50_s": percentile(latencies, 0.50),
            "latency_p90_s": percentile(latencies, 0.90),
            "latency_p99_s": percentile(latencies, 0.99),
            "latency_max_s": max(latencies, default=float("nan")),
            "latency_mean_s": statistics.mean(latencies) if latencies else float("nan"),
            "mean_in_flight": statistics.mean(in_flight) if in_flight else 0.0,
            "broadcast_batch_p50_s": percentile(rtts, 0.5),
            "broadcast_batch_p99_s": percentile(rtts, 0.99),
        }


class CpuMeter:
    """CPU time of process groups between two samples, as cores used on average."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _sample(self) -> dict[str, float]:
        """Each group's CPU seconds: process trees, this process alone (without children)."""
        children = process_children()
        return {
            name: sum(
                sum(os.times()[:2]) if pid == os.getpid() else tree_cpu_seconds(pid, children)
                for pid in pids
            )
            for name, pids in self.groups.items()
        }

    def start(self) -> None:
        self._start = self._sample()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        seconds = max(1e-9, time.monotonic() - self._t0)
        return {name: round((end[name] - self._start[name]) / seconds, 3) for name in end}


def rpc_ports(base_port: int) -> list[int]:
    return [base_port + i * PORT_STRIDE + RPC_OFFSET for i in range(NODES)]


def wait_rpc_height(ports: list[int], height: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            heights = []
            for port in ports:
                try:
                    status = client.get(f"http://127.0.0.1:{port}/status").json()
                    heights.append(int(status["result"]["sync_info"]["latest_block_height"]))
                except (httpx.HTTPError, ValueError, KeyError):
                    heights.append(-1)
            if all(h >= height for h in heights):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes did not reach height {height}: {heights}")
            time.sleep(0.3)


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


TERMINATING = {sig: False for sig in (signal.SIGTERM, signal.SIGHUP)}


class Terminated(Exception):
    """SIGTERM or SIGHUP arrived during an asyncio phase."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    TERMINATING[signal.Signals(signum)] = True
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every `finally` stops its network (inside
    asyncio, run_async cancels the run instead of raising from an arbitrary frame)."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in TERMINATING}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, where SIGTERM or SIGHUP cancels the whole run and then raises
    KeyboardInterrupt, after every `finally` of the run has been through."""

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def stop(sig: signal.Signals) -> None:
            TERMINATING[sig] = True
            task.cancel()

        for sig in TERMINATING:
            loop.add_signal_handler(sig, stop, sig)
        try:
            return await coro
        finally:
            for sig in TERMINATING:
                loop.remove_signal_handler(sig)
                signal.signal(sig, _interrupt)

    try:
        result = asyncio.run(guarded())
    except (asyncio.CancelledError, Terminated):
        raise KeyboardInterrupt("terminated") from None
    if any(TERMINATING.values()):
        raise KeyboardInterrupt("terminated")
    return result


# -- a testnet of ours, and the raw ledger baseline --------------------------------------------


@dataclass
class Testnet:
    """A running 4-validator testnet of ours: node configurations (node order), the founding
    organizations' admin keys, and its base port."""

    home: Path
    base_port: int
    configs: list[NodeConfig]
    admins: list[KeyPair]

    @property
    def ports(self) -> list[int]:
        return rpc_ports(self.base_port)

    def rpc(self, node: int) -> str:
        return self.configs[node].cometbft_rpc

    def api(self, node: int) -> str:
        return self.configs[node].api_url

    def package_dirs(self) -> list[Path]:
        return [load_services_config(cfg.home).packages_path for cfg in self.configs]

    def cpu_groups(self, focus: int | None = None) -> dict[str, list[int]]:
        """Process groups for CpuMeter: the ledger applications (node `focus`'s apart, when
        given), CometBFT, and this process (load generator, clients)."""
        apps = "app (python)" if focus is None else "other apps"
        groups: dict[str, list[int]] = {apps: [], "cometbft": [], "bench process": []}
        if focus is not None:
            groups = {f"app node{focus}": [], **groups}
        for node, cfg in enumerate(self.configs):
            app_pid = read_pid_file(cfg.app_pid_file)
            comet_pid = read_pid_file(cfg.cometbft_pid_file)
            if app_pid:
                groups[f"app node{focus}" if node == focus else apps].append(app_pid)
            if comet_pid:
                groups["cometbft"].append(comet_pid)
        groups["bench process"].append(os.getpid())
        return groups

    def replication_status(self) -> list[dict[str, Any]]:
        """Each node's replication counters (/health): packages fetched, how many in batches
        from the author's node, failed attempts."""
        found: list[dict[str, Any]] = []
        for cfg in self.configs:
            status: dict[str, Any] = {}
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                status = dict(httpx.get(f"{cfg.api_url}/health", timeout=5).json()["replication"])
            found.append(status)
        return found

    def packages_missing(self) -> list[float | None]:
        """Each node's medledger_packages_missing gauge (/metrics), None if unreadable."""
        found: list[float | None] = []
        for cfg in self.configs:
            value: float | None = None
            with contextlib.suppress(httpx.HTTPError, ValueError):
                text = httpx.get(f"{cfg.api_url}/metrics", timeout=5).text
                for line in text.splitlines():
                    if line.startswith("medledger_packages_missing"):
                        value = float(line.split()[-1])
            found.append(value)
        return found


@contextlib.contextmanager
def medledger_testnet(
    label: str, start_port: int, tuning: CometTuning | None = None
) -> Iterator[Testnet]:
    """A 4-validator testnet (init_testnet, fast KDF) in a temporary directory, on a free block
    of ports from `start_port`; stopped and removed on exit, whatever happened."""
    tmp = Path(tempfile.mkdtemp(prefix=f"mlb-{label}-", dir="/tmp"))
    home = tmp / "net"
    base_port = free_base_port(NODES + 1, start_port)
    log(f"{label}: 4-validator testnet in {home}, base port {base_port}")
    try:
        configs = init_testnet(
            home,
            NODES,
            CHAIN_ID,
            passphrase=PASSPHRASE,
            base_port=base_port,
            fast_kdf=True,
            tuning=tuning,
        )
        admins = [load_keystore(cfg.keys_dir / "admin.json", PASSPHRASE) for cfg in configs]
        testnet_up(home)
        wait_for_height(home, 2, timeout=120)
        yield Testnet(home, base_port, configs, admins)
    except BaseException:
        show_log_tails(home, ("node.log", "app.log", "cometbft.log"))
        raise
    finally:
        log(f"{label}: stopping the testnet")
        with contextlib.suppress(Exception):
            testnet_down(home, timeout=20)
        shutil.rmtree(tmp, ignore_errors=True)


def submit_pipelined(
    rpc_url: str, txs: list[tuple[KeyPair, str, object]], timeout: float = 90.0
) -> list[TxOutcome]:
    """Sign and broadcast every (signer, tx type, body) in order, consecutive nonces per signer
    (the proposer keeps each sender's transactions in nonce order), then wait until all are
    committed; raise if any failed."""
    with LedgerClient(rpc_url, CHAIN_ID) as client:
        nonces: dict[str, int] = {}
        hashes: list[str] = []
        for keys, tx_type, body in txs:
            sender = keys.member_id
            if sender not in nonces:
                nonces[sender] = client.next_nonce(sender)
            raw = sign_transaction(keys, CHAIN_ID, nonces[sender], tx_type, body, sender=sender)
            nonces[sender] += 1
            hashes.append(client.broadcast(raw))
        deadline = time.monotonic() + timeout
        outcomes = [client.wait_for(h, max(1.0, deadline - time.monotonic())) for h in hashes]
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(txs)} transactions failed: {failed[0].log}")
    return outcomes


def enroll_keys(net: Testnet, entries: list[tuple[int, KeyPair, Role]]) -> None:
    """Enroll (node, keys, role) members, each by its node's organization admin."""
    for node in range(NODES):
        mine = [(keys, role) for n, keys, role in entries if n == node]
        if mine:
            admin = net.admins[node]
            submit_pipelined(
                net.rpc(node),
                [
                    (admin, "member.enroll", EnrollMember(k.verify_key, k.encryption_key, role))
                    for k, role in mine
                ],
            )


@dataclass
class RawLedger:
    """Raw signed ledger transactions on a running testnet: `member.rotate` by members enrolled
    for it, each rotating its own key with one transaction in flight (as bench/run.py does)."""

    net: Testnet
    rotate: RotateWorkload
    members: int
    enroll_s: float
    enroll_rounds: list[dict[str, Any]]


def enroll_rotators(net: Testnet, count: int) -> RawLedger:
    """Enroll `count` members (a quarter per node, streamed by each node's admin); members whose
    enrollment failed are enrolled again in a further round."""
    per_node = max(1, count // NODES)
    pending = [[BenchMember(f"n{node}/{j}") for j in range(per_node)] for node in range(NODES)]
    rpc_urls = [cfg.cometbft_rpc for cfg in net.configs]
    rotate = RotateWorkload(NODES)
    rounds: list[dict[str, Any]] = []
    started = time.monotonic()

    async def go() -> None:
        nonlocal pending
        driver = LoadDriver(net.ports)
        await driver.start()
        try:
            for _ in range(4):
                sent = sum(len(m) for m in pending)
                if not sent:
                    break
                enroll = sign_enrollments(net.admins, rpc_urls, pending)
                await driver.run(
                    enroll, seconds=120, senders_per_node=1, window=ENROLL_WINDOW, until=enroll.done
                )
                await driver.drain(60)
                rotate.add(enroll.enrolled)
                pending = enroll.failed
                failed = sum(len(m) for m in pending)
                rounds.append({"sent": sent, "failed": failed, "failures": dict(enroll.codes)})
        finally:
            await driver.close()

    run_async(go())
    enrolled = sum(len(q) for q in rotate.idle)
    seconds = time.monotonic() - started
    log(f"raw ledger: enrolled {enrolled} members to rotate their keys in {seconds:.1f}s")
    return RawLedger(net, rotate, enrolled, round(seconds, 1), rounds)


def measure_raw(
    raw: RawLedger,
    label: str,
    *,
    warmup: float,
    seconds: float,
    window: int,
    senders_per_node: int = 8,
) -> dict[str, Any]:
    """Committed `member.rotate` per second in a closed loop with at most `window` in flight
    (JSON-RPC batches of broadcast_tx_sync spread over the 4 nodes), after `warmup` seconds;
    then the backlog drains, so that what follows starts on a quiet network."""
    meter = CpuMeter(raw.net.cpu_groups())
    failed_before = raw.rotate.failed

    async def go() -> dict[str, Any]:
        driver = LoadDriver(raw.net.ports)
        await driver.start()
        try:
            await driver.run(
                raw.rotate, seconds=warmup, senders_per_node=senders_per_node, window=window
            )
            t0 = time.monotonic()
            meter.start()
            await driver.run(
                raw.rotate, seconds=seconds, senders_per_node=senders_per_node, window=window
            )
            t1 = time.monotonic()
            cpu = meter.stop()
            await driver.drain(40)
            return driver.window_stats(t0, t1) | {
                "label": label,
                "window": window,
                "cpu_cores_used": cpu,
                "failed": raw.rotate.failed - failed_before,
                "last_failure": raw.rotate.last_failure,
                "refused": driver.refused,
                "uncommitted_at_end": driver.in_flight,
            }
        finally:
            await driver.close()

    stats = run_async(go())
    log(
        f"raw ledger ({label}): {stats['tps']:.0f} tx/s committed (member.rotate, window "
        f"{window}), p50 {stats['latency_p50_s']:.2f}s p99 {stats['latency_p99_s']:.2f}s, "
        f"{stats['mean_block_txs']:.0f} txs/block, cores {stats['cpu_cores_used']}"
    )
    return stats


def write_results(results: dict[str, Any], out: Path, name: str) -> Path:
    """`<name>-latest.json` and a timestamped copy in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = str(results["started"]).replace(":", "").replace("-", "")
    text = json.dumps(results, indent=2, default=str) + "\n"
    (out / f"{name}-{stamp}.json").write_text(text)
    latest = out / f"{name}-latest.json"
    latest.write_text(text)
    return latest


def summary(values: list[float]) -> dict[str, float]:
    """p50, p90, p99 (nearest rank), mean and max of a list of seconds; NaN when empty."""
    return {
        "n": float(len(values)),
        "p50": percentile(values, 0.50),
        "p90": percentile(values, 0.90),
        "p99": percentile(values, 0.99),
        "mean": statistics.mean(values) if values else float("nan"),
        "max": max(values, default=float("nan")),
    }
