"""The medledger ledger benchmark: one command, and every ratio against a baseline of the same run.

Machines here are noisy (two cores, other work running), so an absolute number means little on
its own; each goal is a ratio to a baseline measured by this very run:

1. in-process: the ledger's execution rate (InProcessChain, blocks of signed valid transactions,
   with the signature cache cold and warmed the way CheckTx warms it) as a fraction of this
   machine's raw Ed25519 verification rate (PyNaCl), sampled just before and after each block.
2. network: a 4-validator local testnet of ours (init_testnet, fast_kdf) under sustained load:
   committed transactions per second, the best of closed loops with growing windows of
   transactions in flight, then commit latency in an open loop paced at a fraction of that
   rate. Latency is the time from broadcast_tx_sync's answer to the NewBlock event (RPC
   websocket) of the block that holds the transaction, on the node it was sent to.
3. baseline: CometBFT's built-in kvstore on a 4-validator testnet with the same homes' config,
   the same load shape and transactions of the same size.

Run it as `.venv/bin/python bench/run.py` (or `make bench`); `--help` lists the knobs and
BENCHMARKS.md explains the results. They go to bench/results/ as JSON (latest.json and a
timestamped copy). Every process it starts is stopped at the end, also on an error, Ctrl-C,
SIGTERM or SIGHUP.
"""

# ruff: noqa: E402  (imports follow the sys.path set-up below)
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ comes first on sys.path: put the repository root there instead, so that
# the shared helpers import as bench.common (and bench/fhir.py cannot shadow the fhir package).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import nacl.signing
import tomlkit

from bench.common import (
    CHAIN_ID,
    ENROLL_WINDOW,
    NODES,
    PASSPHRASE,
    RESULTS_DIR,
    RPC_OFFSET,
    BenchMember,
    CpuMeter,
    LoadDriver,
    RotateWorkload,
    Workload,
    die_with_parent,
    fmt,
    free_base_port,
    log,
    machine_info,
    rpc_ports,
    run_async,
    seed,
    show_log_tails,
    sign_enrollments,
    signed,
    terminate_cleanly,
    wait_rpc_height,
)
from medledger.config import find_cometbft
from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import load_keystore
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.node.inprocess import InProcessChain
from medledger.node.procs import read_pid_file
from medledger.node.testnet import (
    CometTuning,
    _organization_entry,
    init_testnet,
    testnet_down,
    testnet_up,
    wait_for_height,
)

GOAL_INPROCESS = 0.6
GOAL_THROUGHPUT = 0.5
GOAL_P99_S = 2.0


# -- 1. in-process ---------------------------------------------------------------------------


ORGANIZATIONS = (("org-a", "hospital"), ("org-b", "clinic"), ("org-c", "lab"), ("org-d", "insurer"))


def bench_keys(label: str) -> KeyPair:
    return KeyPair(signing_seed=seed(f"sign/{label}"), encryption_secret=seed(f"enc/{label}"))


def genesis_app_state() -> bytes:
    """Four founding organizations, written the way init_testnet writes them."""
    entries = []
    for org_id, kind in ORGANIZATIONS:
        validator = bench_keys(f"{org_id}/validator")
        entries.append(
            _organization_entry(
                org_id,
                org_id,
                kind,
                bench_keys(f"{org_id}/admin"),
                bench_keys(f"{org_id}/node"),
                base64.b64encode(validator.verify_key).decode(),
                10,
            )
        )
    return json.dumps({"organizations": entries, "params": {}}).encode()


def verify_rate(seconds: float) -> float:
    """Raw PyNaCl Ed25519 verifications per second over messages of a transaction's size."""
    pairs = []
    for i in range(64):
        key = nacl.signing.SigningKey(seed(f"verify/{i}"))
        message = seed(f"message/{i}") * 6  # 192 bytes, about a transaction's sign bytes
        pairs.append((key.verify_key, message, key.sign(message).signature))
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for verify_key, message, signature in pairs:
            verify_key.verify(message, signature)
        count += len(pairs)
    return count / (time.perf_counter() - start)


@dataclass
class InProcessResult:
    block_txs: int
    blocks_per_kind: int
    verify_samples: list[float]
    verify_per_s: float
    rates: dict[str, float]  # kind -> median tx/s over its blocks
    samples: dict[str, list[float]]
    checktx_per_s: float  # first CheckTx of a transaction (verifies its signature)
    recheck_per_s: float  # CheckTx again with the signature cached (mempool recheck)
    ratios: dict[str, float]  # median over blocks of rate / adjacent verify rate
    tx_bytes: float


def run_inprocess(block_txs: int, blocks_per_kind: int, verify_seconds: float) -> InProcessResult:
    """Blocks of `block_txs` valid transactions: member.enroll by the four admins (round robin,
    sequential nonces), then member.rotate by distinct enrolled members. Cold and warm blocks
    alternate; a warm block is first passed through CheckTx (untimed except for the CheckTx
    rates), as the mempool would, so FinalizeBlock finds every signature cached."""
    admins = [bench_keys(f"{org_id}/admin") for org_id, _ in ORGANIZATIONS]
    admin_keys = [nacl.signing.SigningKey(a.signing_seed) for a in admins]
    admin_ids = [a.member_id for a in admins]
    nonces = [0] * len(admins)
    members: list[BenchMember] = []

    enroll_blocks: list[list[bytes]] = []
    for b in range(2 * blocks_per_kind):
        txs = []
        for j in range(block_txs):
            a = j % len(admins)
            nonces[a] += 1
            member = BenchMember(f"{b}/{j}")
            members.append(member)
            body = EnrollMember(member.verify_key, seed(f"enc/{b}/{j}"), Role.CLINICIAN)
            txs.append(signed(admin_keys[a], admin_ids[a], nonces[a], "member.enroll", body))
        enroll_blocks.append(txs)
    rotate_blocks = [
        [m.rotate_tx() for m in members[b * block_txs : (b + 1) * block_txs]]
        for b in range(2 * blocks_per_kind)
    ]
    sizes = [len(tx) for block in enroll_blocks + rotate_blocks for tx in block]

    verify_samples: list[float] = []
    samples: dict[str, list[float]] = collections.defaultdict(list)
    paired: dict[str, list[float]] = collections.defaultdict(list)
    checks: list[float] = []
    rechecks: list[float] = []
    with tempfile.TemporaryDirectory(prefix="mlb-inproc-") as tmp:
        chain = InProcessChain(Path(tmp) / "state.db", CHAIN_ID, genesis_app_state())
        try:
            before = verify_rate(verify_seconds)
            verify_samples.append(before)
            for kind, blocks in (("enroll", enroll_blocks), ("rotate", rotate_blocks)):
                for index, txs in enumerate(blocks):
                    warm = index % 2 == 1
                    if warm:
                        start = time.perf_counter()
                        for tx in txs:
                            result = chain.ledger.check_tx(tx)
                            if not result.ok:
                                raise RuntimeError(f"CheckTx refused a {kind} tx: {result.log}")
                        checks.append(len(txs) / (time.perf_counter() - start))
                        start = time.perf_counter()
                        for tx in txs:
                            chain.ledger.check_tx(tx)
                        rechecks.append(len(txs) / (time.perf_counter() - start))
                    start = time.perf_counter()
                    outcome = chain.run_block(txs)
                    elapsed = time.perf_counter() - start
                    bad = [r for r in outcome.results if not r.ok]
                    if bad:
                        raise RuntimeError(f"{len(bad)} {kind} txs failed: {bad[0].log}")
                    # Each block is paired with the verify rates sampled just before and after
                    # it, so that a machine slowed down for a while slows both sides.
                    after = verify_rate(verify_seconds)
                    verify_samples.append(after)
                    name = f"{kind}_{'warm' if warm else 'cold'}"
                    samples[name].append(len(txs) / elapsed)
                    paired[name].append(len(txs) / elapsed / ((before + after) / 2))
                    before = after
        finally:
            chain.close()
    return InProcessResult(
        block_txs=block_txs,
        blocks_per_kind=blocks_per_kind,
        verify_samples=verify_samples,
        verify_per_s=statistics.median(verify_samples),
        rates={kind: statistics.median(values) for kind, values in samples.items()},
        samples=dict(samples),
        checktx_per_s=statistics.median(checks),
        recheck_per_s=statistics.median(rechecks),
        ratios={kind: statistics.median(values) for kind, values in paired.items()},
        tx_bytes=statistics.mean(sizes),
    )


# -- 2./3. network load ----------------------------------------------------------------------


class KvWorkload:
    """kvstore transactions: unique `key=value` bytes padded to `size`."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.counter = 0
        self.retries: list[str] = []
        self.failed = 0

    def take(self, node: int, count: int) -> list[str]:
        out = self.retries[:count]
        del self.retries[:count]
        while len(out) < count:
            self.counter += 1
            head = f"bench{self.counter:012d}=".encode()
            out.append(base64.b64encode(head + b"v" * max(1, self.size - len(head))).decode())
        return out

    def committed(self, node: int, tx: str, code: int) -> None:
        if code:
            self.failed += 1

    def refused(self, node: int, tx: str, code: int, log: str) -> None:
        self.failed += 1

    def retry(self, node: int, tx: str) -> None:
        self.retries.append(tx)


@dataclass
class NetworkOptions:
    warmup: float  # before the first saturation step
    step: float  # measured seconds of each saturation step
    settle: float  # unmeasured seconds before every later step and the paced window
    windows: list[int]  # closed-loop windows (transactions in flight), one step each
    paced: float
    paced_fraction: float
    senders_per_node: int
    members: int
    tx_bytes: int  # kvstore transactions are padded to this size
    profile_dir: Path | None = None  # take CometBFT CPU profiles (pprof) of node0 here


@dataclass
class NetworkResult:
    app: str
    tuning: dict[str, Any]
    config_overrides: dict[str, str]
    steps: list[dict[str, Any]]
    saturation: dict[str, Any]
    paced: dict[str, Any]
    paced_rate: float
    refused: int
    rpc_errors: int
    last_rpc_error: str
    workload_failures: int
    last_failure: str
    uncommitted_at_end: int
    setup_s: float
    notes: list[str] = field(default_factory=list)


@dataclass
class LoadOutcome:
    steps: list[dict[str, Any]]  # one per closed-loop window, in order
    saturation: dict[str, Any]  # the step with the highest committed rate
    paced: dict[str, Any]
    paced_rate: float
    uncommitted_at_end: int


async def drive_load(
    ports: list[int],
    workload: Workload,
    options: NetworkOptions,
    meter: CpuMeter,
    prepare: Callable[[LoadDriver], Awaitable[None]] | None = None,
) -> tuple[LoadDriver, LoadOutcome]:
    """Saturation: closed loops with growing windows of transactions in flight; the best
    committed rate is the network's throughput. Then, after the backlog drains, an open loop
    paced at a fraction of that rate gives the commit latency under sustained load."""
    driver = LoadDriver(ports)
    await driver.start()
    try:
        if prepare is not None:
            await prepare(driver)
        steps: list[dict[str, Any]] = []
        for number, window in enumerate(options.windows):
            settle = options.warmup if number == 0 else options.settle
            await driver.run(
                workload,
                seconds=settle,
                senders_per_node=options.senders_per_node,
                window=window,
            )
            t0 = time.monotonic()
            meter.start()
            profile = None
            if options.profile_dir is not None and number == len(options.windows) - 1:
                profile = asyncio.create_task(
                    take_pprof(ports[0] + PPROF_OFFSET, options.step * 0.8, options.profile_dir)
                )
            await driver.run(
                workload,
                seconds=options.step,
                senders_per_node=options.senders_per_node,
                window=window,
            )
            t1 = time.monotonic()
            cpu = meter.stop()
            if profile is not None:
                await profile
            stats = driver.window_stats(t0, t1) | {"window": window, "cpu_cores_used": cpu}
            steps.append(stats)
            log(
                f"window {window}: {stats['tps']:.0f} tx/s committed, latency p50 "
                f"{stats['latency_p50_s']:.2f}s p99 {stats['latency_p99_s']:.2f}s, "
                f"{stats['mean_in_flight']:.0f} in flight, {stats['mean_block_txs']:.0f} "
                f"txs/block, block every {stats['mean_block_interval_s'] or 0:.2f}s, "
                f"broadcast batch p50 {stats['broadcast_batch_p50_s']:.3f}s, cores {cpu}"
            )
        saturation = max(steps, key=lambda step: float(step["tps"]))
        await driver.drain(40)
        rate = max(20.0, options.paced_fraction * saturation["tps"])
        log(f"paced: {rate:.0f} tx/s for {options.settle + options.paced:.0f}s")
        await driver.run(
            workload,
            seconds=options.settle,
            senders_per_node=options.senders_per_node,
            window=max(options.windows),
            rate=rate,
        )
        t2 = time.monotonic()
        meter.start()
        await driver.run(
            workload,
            seconds=options.paced,
            senders_per_node=options.senders_per_node,
            window=max(options.windows),
            rate=rate,
        )
        t3 = time.monotonic()
        cpu = meter.stop()
        await driver.drain(15)
        paced = driver.window_stats(t2, t3) | {"cpu_cores_used": cpu}
        log(
            f"paced: {paced['tps']:.0f} tx/s committed, latency p50 "
            f"{paced['latency_p50_s']:.2f}s p99 {paced['latency_p99_s']:.2f}s, cores {cpu}"
        )
        return driver, LoadOutcome(steps, saturation, paced, rate, driver.in_flight)
    finally:
        await driver.close()


PPROF_OFFSET = 4 - RPC_OFFSET  # node0's pprof port: base_port + 4 (inside its block)


def enable_pprof(node_home: Path, port: int) -> None:
    """Diagnostics only: let node0's CometBFT serve pprof on 127.0.0.1."""
    path = node_home / "config" / "config.toml"
    document = tomlkit.parse(path.read_text())
    rpc = document["rpc"]
    assert isinstance(rpc, dict)
    rpc["pprof_laddr"] = f"127.0.0.1:{port}"
    path.write_text(tomlkit.dumps(document))


async def take_pprof(port: int, seconds: float, directory: Path) -> None:
    url = f"http://127.0.0.1:{port}/debug/pprof/profile?seconds={max(1, int(seconds))}"
    try:
        async with httpx.AsyncClient(timeout=seconds + 30) as client:
            response = await client.get(url)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"cometbft-node0-{port}.pprof"
        path.write_bytes(response.content)
        log(f"CometBFT CPU profile of node0: {path} (go tool pprof -top {path})")
    except httpx.HTTPError as exc:
        log(f"pprof failed: {exc!r}")


def tuning_dict(tuning: CometTuning) -> dict[str, Any]:
    return dataclasses.asdict(tuning)


def apply_overrides(node_home: Path, overrides: dict[str, str]) -> None:
    """Raw config.toml settings outside CometTuning (section.key -> TOML value text)."""
    if not overrides:
        return
    path = node_home / "config" / "config.toml"
    document = tomlkit.parse(path.read_text())
    for dotted, raw in overrides.items():
        section, _, key = dotted.rpartition(".")
        table: Any = document[section] if section else document
        if key not in table:
            raise ValueError(f"config.toml has no {dotted}")
        try:
            table[key] = tomlkit.parse(f"v = {raw}")["v"]
        except Exception:
            table[key] = raw
    path.write_text(tomlkit.dumps(document))


def run_medledger(
    tuning: CometTuning, overrides: dict[str, str], options: NetworkOptions
) -> NetworkResult:
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="mlb-", dir="/tmp"))
    home = tmp / "net"
    base_port = free_base_port(NODES + 1, 31000)
    log(f"medledger: 4-validator testnet in {home}, base port {base_port}")
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
        for cfg in configs:
            apply_overrides(cfg.home, overrides)
        if options.profile_dir is not None:
            enable_pprof(configs[0].home, base_port + 4)
        admins = [load_keystore(cfg.keys_dir / "admin.json", PASSPHRASE) for cfg in configs]
        testnet_up(home)
        wait_for_height(home, 2, timeout=120)
        ports = rpc_ports(base_port)
        groups: dict[str, list[int]] = {"app (python)": [], "cometbft": [], "load generator": []}
        for cfg in configs:
            app_pid = read_pid_file(cfg.app_pid_file)
            comet_pid = read_pid_file(cfg.cometbft_pid_file)
            if app_pid:
                groups["app (python)"].append(app_pid)
            if comet_pid:
                groups["cometbft"].append(comet_pid)
        groups["load generator"].append(os.getpid())

        # Members to rotate their keys: enrolled first by the four admins, each streaming its
        # enrollments (sequential nonces, pipelined) to its own node. A stream can lose its
        # order on the way to the proposer (see BENCHMARKS.md), which fails the rest of it
        # with BAD_NONCE; those members are enrolled again in a further round.
        per_node = max(1, options.members // NODES)
        pending = [[BenchMember(f"n{node}/{j}") for j in range(per_node)] for node in range(NODES)]
        rpc_urls = [cfg.cometbft_rpc for cfg in configs]
        rotate = RotateWorkload(NODES)
        enroll_rounds: list[dict[str, Any]] = []

        async def prepare(driver: LoadDriver) -> None:
            nonlocal pending
            for _ in range(4):
                count = sum(len(m) for m in pending)
                if not count:
                    break
                t = time.monotonic()
                enroll = sign_enrollments(admins, rpc_urls, pending)
                await driver.run(
                    enroll, seconds=120, senders_per_node=1, window=ENROLL_WINDOW, until=enroll.done
                )
                await driver.drain(60)
                rotate.add(enroll.enrolled)
                pending = enroll.failed
                failed = sum(len(m) for m in pending)
                enroll_rounds.append(
                    {"sent": count, "failed": failed, "failures": dict(enroll.codes)}
                )
                log(
                    f"enrolled {count - failed} of {count} members in "
                    f"{time.monotonic() - t:.1f}s; failed: {dict(enroll.codes) or 0}"
                )

        setup = time.monotonic() - started
        meter = CpuMeter(groups)
        driver, outcome = run_async(drive_load(ports, rotate, options, meter, prepare))
        notes = [f"enrollment rounds: {enroll_rounds}"]
        return NetworkResult(
            app="medledger",
            tuning=tuning_dict(tuning),
            config_overrides=overrides,
            steps=outcome.steps,
            saturation=outcome.saturation,
            paced=outcome.paced,
            paced_rate=outcome.paced_rate,
            refused=driver.refused,
            rpc_errors=driver.rpc_errors,
            last_rpc_error=driver.last_rpc_error,
            workload_failures=rotate.failed,
            last_failure=rotate.last_failure,
            uncommitted_at_end=outcome.uncommitted_at_end,
            setup_s=round(setup, 1),
            notes=notes,
        )
    except BaseException:
        show_log_tails(home, ("node.log", "app.log", "cometbft.log"))
        raise
    finally:
        log("medledger: stopping the testnet")
        with contextlib.suppress(Exception):
            testnet_down(home, timeout=20)
        shutil.rmtree(tmp, ignore_errors=True)


def run_kvstore(
    tuning: CometTuning, overrides: dict[str, str], options: NetworkOptions
) -> NetworkResult:
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="mlb-kv-", dir="/tmp"))
    home = tmp / "net"
    base_port = free_base_port(NODES + 1, 41000)
    procs: list[subprocess.Popen[bytes]] = []
    log(f"kvstore: 4-validator testnet in {home}, base port {base_port}")
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
        for cfg in configs:
            apply_overrides(cfg.home, overrides)
        if options.profile_dir is not None:
            enable_pprof(configs[0].home, base_port + 4)
        cometbft = str(find_cometbft())
        for cfg in configs:
            with open(cfg.home / "kvstore.log", "ab") as out:
                procs.append(
                    subprocess.Popen(
                        [cometbft, "start", "--home", str(cfg.home), "--proxy_app", "kvstore"],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        preexec_fn=die_with_parent,
                    )
                )
        ports = rpc_ports(base_port)
        wait_rpc_height(ports, 2, timeout=120)
        setup = time.monotonic() - started
        groups = {"cometbft+kvstore": [p.pid for p in procs], "load generator": [os.getpid()]}
        workload = KvWorkload(options.tx_bytes)
        meter = CpuMeter(groups)
        driver, outcome = run_async(drive_load(ports, workload, options, meter))
        return NetworkResult(
            app="kvstore",
            tuning=tuning_dict(tuning),
            config_overrides=overrides,
            steps=outcome.steps,
            saturation=outcome.saturation,
            paced=outcome.paced,
            paced_rate=outcome.paced_rate,
            refused=driver.refused,
            rpc_errors=driver.rpc_errors,
            last_rpc_error=driver.last_rpc_error,
            workload_failures=workload.failed,
            last_failure="",
            uncommitted_at_end=outcome.uncommitted_at_end,
            setup_s=round(setup, 1),
        )
    except BaseException:
        show_log_tails(home, ("kvstore.log",))
        raise
    finally:
        log("kvstore: stopping the testnet")
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


# -- command line and report -----------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    tuning: CometTuning
    overrides: dict[str, str]  # raw config.toml settings, section.key -> TOML value


def parse_variant(text: str) -> Variant:
    """NAME=field:value[,field:value...]: a CometTuning field, or section.key of config.toml
    for a setting CometTuning does not cover (value as TOML, bare words taken as strings)."""
    name, _, spec = text.partition("=")
    if not name or not spec:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected NAME=field:value,...")
    known = {f.name: f for f in dataclasses.fields(CometTuning)}
    changes: dict[str, Any] = {}
    overrides: dict[str, str] = {}
    for item in spec.split(","):
        key, _, raw = item.partition(":")
        if "." in key:
            overrides[key] = raw
            continue
        if key not in known:
            raise argparse.ArgumentTypeError(f"variant {name}: unknown CometTuning field {key!r}")
        kind = str(known[key].type)
        if kind == "bool":
            changes[key] = raw.lower() in ("1", "true", "yes", "on")
        elif kind == "int":
            changes[key] = int(raw)
        else:
            changes[key] = raw
    return Variant(name, dataclasses.replace(CometTuning(), **changes), overrides)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    add = lines.append
    machine = results["machine"]
    add(f"medledger benchmark  {results['started']}  ({results['wall_seconds']:.0f}s)")
    add(f"machine: {machine['cores']} cores, {machine['cpu']}, Python {machine['python']}")
    loads = [machine.get("load_average_at_start"), machine.get("load_average_at_end")]
    add(
        "load average (1 min) at start / end: "
        + " / ".join(fmt(v[0], 1) if v else "-" for v in loads)
    )
    inproc = results.get("inprocess")
    if inproc:
        add("")
        add(f"In-process execution (blocks of {inproc['block_txs']} txs, finalize + commit)")
        add(f"  raw Ed25519 verify (PyNaCl)   {fmt(inproc['verify_per_s'])} /s")
        add(f"  CheckTx, first (verifies)      {fmt(inproc['checktx_per_s'])} tx/s")
        add(f"  CheckTx, recheck (cached sig)  {fmt(inproc['recheck_per_s'])} tx/s")
        add(f"  {'block kind':<28} {'tx/s':>10} {'÷ verify':>9}  goal ≥ {GOAL_INPROCESS}")
        for kind in ("enroll_cold", "enroll_warm", "rotate_cold", "rotate_warm"):
            rate = inproc["rates"].get(kind)
            ratio = inproc["ratios"].get(kind)
            if rate is None:
                continue
            add(
                f"  {kind:<28} {fmt(rate):>10} {fmt(ratio, 2):>9}  "
                f"{verdict(ratio >= GOAL_INPROCESS)}"
            )
    nets: list[dict[str, Any]] = results.get("network", [])
    if nets:
        add("")
        add("4-validator local testnets: closed-loop steps (window = txs in flight), then paced")
        add(
            f"  {'run':<26} {'window':>6} {'tx/s':>7} {'p50 s':>6} {'p99 s':>6} "
            f"{'txs/blk':>7} {'blk s':>5}  cores used"
        )
        for net in nets:
            best = net["saturation"]["window"]
            rows = [*net["steps"], net["paced"] | {"window": "paced"}]
            for step in rows:
                mark = "*" if step["window"] == best else " "
                used = " ".join(f"{v:.2f}" for v in step["cpu_cores_used"].values())
                add(
                    f"  {net['label']:<26} {step['window']:>6}{mark}{fmt(step['tps']):>6} "
                    f"{fmt(step['latency_p50_s'], 2):>6} {fmt(step['latency_p99_s'], 2):>6} "
                    f"{fmt(step['mean_block_txs']):>7} {fmt(step['mean_block_interval_s'], 2):>5}"
                    f"  {used}"
                )
            groups = " / ".join(net["saturation"]["cpu_cores_used"])
            failures = net["workload_failures"] + net["refused"]
            add(f"  {'':<26} cores: {groups}; failed or refused txs: {failures}")
        add("  * = best step (the run's throughput); paced = open loop at 0.7 × that rate")
    for comparison in results.get("comparisons", []):
        add("")
        add(f"Goals ({comparison['label']})")
        ratio = comparison["throughput_ratio"]
        add(
            f"  throughput medledger ÷ kvstore  {ratio:.2f}"
            f"   goal ≥ {GOAL_THROUGHPUT}  {verdict(ratio >= GOAL_THROUGHPUT)}"
        )
        add(
            f"  p99 at paced load: medledger {comparison['medledger_paced_p99_s']:.2f}s, kvstore "
            f"{comparison['kvstore_paced_p99_s']:.2f}s   goal ≤ {GOAL_P99_S}s  "
            f"{verdict(comparison['medledger_paced_p99_s'] <= GOAL_P99_S)}"
        )
    if inproc:
        for kind in ("enroll_warm", "rotate_warm"):
            ratio = inproc["ratios"].get(kind, 0.0)
            add(
                f"  in-process {kind} execution ÷ raw verify  {ratio:.2f}   goal ≥ "
                f"{GOAL_INPROCESS}  {verdict(ratio >= GOAL_INPROCESS)}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--skip-inprocess", action="store_true")
    parser.add_argument("--skip-network", action="store_true", help="no testnets at all")
    parser.add_argument("--skip-kvstore", action="store_true")
    parser.add_argument("--skip-medledger", action="store_true")
    parser.add_argument("--block-txs", type=int, default=500)
    parser.add_argument("--blocks", type=int, default=8, help="in-process blocks per kind")
    parser.add_argument("--warmup", type=float, default=5.0, help="s before the first step")
    parser.add_argument("--step", type=float, default=8.0, help="measured s per window step")
    parser.add_argument("--settle", type=float, default=3.0, help="s before later steps")
    parser.add_argument(
        "--windows",
        type=lambda text: [int(w) for w in text.split(",")],
        default=[1000, 2000, 4000],
        help="closed-loop windows (txs in flight), comma-separated",
    )
    parser.add_argument("--paced", type=float, default=20.0, help="paced window, s")
    parser.add_argument("--paced-fraction", type=float, default=0.7)
    parser.add_argument("--senders", type=int, default=8, help="concurrent senders per node")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=parse_variant,
        metavar="NAME=field:value,...",
        help="also run both networks with these changes (repeatable): a CometTuning field, "
        "or section.key of config.toml for settings CometTuning lacks, e.g. "
        "fast=timeout_commit:200ms,p2p.flush_throttle_timeout:10ms",
    )
    parser.add_argument("--no-default", action="store_true", help="run only the variants")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--pprof", action="store_true", help="diagnostics: CPU-profile node0's CometBFT"
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    results: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([".venv/bin/python", "bench/run.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "network": [],
        "comparisons": [],
    }
    with terminate_cleanly():
        # kvstore transactions are padded to the size of the medledger transactions sent.
        tx_bytes = len(BenchMember("size-probe").rotate_tx())
        if not args.skip_inprocess:
            log("in-process: signing blocks, then raw verify vs. ledger execution")
            inproc = run_inprocess(args.block_txs, args.blocks, verify_seconds=0.3)
            results["inprocess"] = dataclasses.asdict(inproc)
            log(
                f"in-process: verify {inproc.verify_per_s:,.0f}/s; "
                + ", ".join(f"{k} {v:,.0f} tx/s" for k, v in inproc.rates.items())
            )
        if not args.skip_network:
            options = NetworkOptions(
                warmup=args.warmup,
                step=args.step,
                settle=args.settle,
                windows=args.windows,
                paced=args.paced,
                paced_fraction=args.paced_fraction,
                senders_per_node=args.senders,
                # one rotate in flight per member: enough members for the largest window
                members=max(args.windows) + 400,
                tx_bytes=tx_bytes,
                profile_dir=args.out / "pprof" if args.pprof else None,
            )
            results["network_options"] = dataclasses.asdict(options)
            runs: list[Variant] = [] if args.no_default else [Variant("default", CometTuning(), {})]
            runs += list(args.variant)
            for variant in runs:
                name = variant.name
                ours = kv = None
                if not args.skip_medledger:
                    ours = run_medledger(variant.tuning, variant.overrides, options)
                    entry = dataclasses.asdict(ours) | {"label": f"medledger/{name}"}
                    results["network"].append(entry)
                if not args.skip_kvstore:
                    kv = run_kvstore(variant.tuning, variant.overrides, options)
                    kv_entry = dataclasses.asdict(kv) | {"label": f"kvstore/{name}"}
                    results["network"].append(kv_entry)
                if ours is None or kv is None:
                    continue
                kv_tps = kv.saturation["tps"] or float("nan")
                results["comparisons"].append(
                    {
                        "label": name,
                        "throughput_ratio": ours.saturation["tps"] / kv_tps,
                        "medledger_paced_p99_s": ours.paced["latency_p99_s"],
                        "kvstore_paced_p99_s": kv.paced["latency_p99_s"],
                        "medledger_saturation_p99_s": ours.saturation["latency_p99_s"],
                        "kvstore_saturation_p99_s": kv.saturation["latency_p99_s"],
                    }
                )
    results["wall_seconds"] = time.monotonic() - started
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    lines = report(results)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = results["started"].replace(":", "").replace("-", "")
    text = json.dumps(results, indent=2, default=str) + "\n"
    (args.out / f"bench-{stamp}.json").write_text(text)
    (args.out / "latest.json").write_text(text)
    log(f"results written to {args.out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); every testnet this run started has been stopped")
        sys.exit(130)
