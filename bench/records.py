"""Health records end to end on a 4-validator testnet, beside the raw ledger throughput of the
same run and the same network.

1. baseline: raw signed ledger transactions per second (`member.rotate`, the closed loop of
   bench/run.py), measured before the records phases and again after them.
2. records/s with `RecordsClient.put`: concurrent writers (clinicians of the four
   organizations, each with its own client on its own organization's node, one thread each, as
   the SDK is synchronous) write ~2 KB FHIR lab Observations (`sized_observation`): validate,
   seal (fresh data key, envelopes to patient and author, threshold shares for the 4
   custodians), upload, commit. A record counts once it is committed and its package is on the
   disk of all 4 nodes.
3. the same with `put_many`: batches of records in one `record.put-many` transaction.
4. read latency: a clinician at another organization, under the patients' consent, reads
   records one after the other: access request committed, key shares from t custodians,
   decryption and verification; p50/p99 and where the time goes.

Every rate is reported as a ratio to the raw ledger rate. Run it as `.venv/bin/python
bench/records.py` (or `make bench-records`); `--help` lists the knobs. Results go to
bench/results/records-latest.json plus a timestamped copy. The testnet lives in a temporary
directory on its own ports and is stopped at the end, also on an error, Ctrl-C, SIGTERM or
SIGHUP.
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
import collections
import contextlib
import dataclasses
import datetime as dt
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.common import (
    CHAIN_ID,
    NODES,
    RESULTS_DIR,
    TERMINATING,
    CpuMeter,
    Testnet,
    enroll_keys,
    enroll_rotators,
    fmt,
    log,
    machine_info,
    measure_raw,
    medledger_testnet,
    submit_pipelined,
    summary,
    terminate_cleanly,
    write_results,
)
from medledger.auth import node_audience, sign_request
from medledger.client.records import RecordsClient, RecordWrite, Sealing
from medledger.client.sdk import ClientError, LedgerClient, TxOutcome
from medledger.crypto import package as packaging
from medledger.crypto.keys import KeyPair
from medledger.ledger.consent import GrantConsent, GranteeKind, Purpose, ScopeKind
from medledger.ledger.model import Role
from medledger.ledger.records import PutRecord, RecordVersion
from medledger.node.services import load_services_config
from medledger.samples.fhir import canonical_json, sized_observation

SECOND_NS = 1_000_000_000
READER_NODE = 1  # the reader's organization (org-2); it reads what the other three wrote


# -- clients that time their steps ------------------------------------------------------------


class TimedLedgerClient(LedgerClient):
    """The SDK's ledger client, adding up the time spent in ABCI queries and in submissions
    (sign, broadcast, wait for the commit) outside the queries they make."""

    def __init__(self, rpc_url: str) -> None:
        super().__init__(rpc_url, CHAIN_ID, timeout=30.0)
        self.timings: collections.defaultdict[str, float] = collections.defaultdict(float)

    def query_raw(self, path: str, data: bytes = b"", prove: bool = False) -> tuple[int, bytes]:
        start = time.perf_counter()
        try:
            return super().query_raw(path, data, prove)
        finally:
            self.timings["ledger queries"] += time.perf_counter() - start
            self.timings["query count"] += 1

    def submit(
        self,
        keys: KeyPair,
        tx_type: str,
        body: object,
        *,
        sender: str = "",
        timeout: float = 30.0,
        check: bool = True,
    ) -> TxOutcome:
        start = time.perf_counter()
        queries = self.timings["ledger queries"]
        try:
            return super().submit(keys, tx_type, body, sender=sender, timeout=timeout, check=check)
        finally:
            inner = self.timings["ledger queries"] - queries
            self.timings["commit"] += time.perf_counter() - start - inner


class TimedRecordsClient(RecordsClient):
    """RecordsClient with its steps timed: validate + seal, upload, and on reads the access
    request, the package download and the key release (with the custodians' 404/503 answers
    counted: a custodian that has not committed the grant's block yet is asked again)."""

    def __init__(self, rpc_url: str, api_url: str, keys: KeyPair) -> None:
        self.timed = TimedLedgerClient(rpc_url)
        super().__init__(self.timed, api_url, keys, timeout=30.0)
        self.last_read: tuple[packaging.RecordPackage, list[packaging.Share]] | None = None

    @property
    def timings(self) -> collections.defaultdict[str, float]:
        return self.timed.timings

    def _timed(self, name: str, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        queries = self.timings["ledger queries"]
        try:
            return work()
        finally:
            inner = self.timings["ledger queries"] - queries
            self.timings[name] += time.perf_counter() - start - inner

    def seal_version(
        self,
        resource: Any,
        patient_id: str,
        record_id: str | None,
        version: int,
        previous: int,
        sealing: Sealing | None,
        patient_key: bytes | None,
    ) -> tuple[PutRecord, packaging.SealedRecord]:
        # "validate + seal" is this step less its queries (timed by the ledger client).
        return self._timed(
            "validate + seal",
            lambda: super(TimedRecordsClient, self).seal_version(
                resource, patient_id, record_id, version, previous, sealing, patient_key
            ),
        )

    def _upload(self, sealed: packaging.SealedRecord) -> None:
        self._timed("upload", lambda: super(TimedRecordsClient, self)._upload(sealed))

    def upload_many(self, sealed: Sequence[packaging.SealedRecord]) -> None:
        self._timed("upload", lambda: super(TimedRecordsClient, self).upload_many(sealed))

    def request_access(
        self,
        record_id: str,
        purpose: Purpose = Purpose.TREATMENT,
        version: int = 0,
        emergency_reason: str | None = None,
    ) -> str:
        start = time.perf_counter()
        try:
            return super().request_access(record_id, purpose, version, emergency_reason)
        finally:
            self.timings["access request"] += time.perf_counter() - start

    def _package(self, version: RecordVersion, grant_id: str = "") -> packaging.RecordPackage:
        start = time.perf_counter()
        try:
            return super()._package(version, grant_id)
        finally:
            self.timings["package download"] += time.perf_counter() - start

    def _gather_shares(
        self,
        record: RecordVersion,
        package: packaging.RecordPackage,
        grant_id: str,
        patience: float = 10.0,
    ) -> tuple[list[packaging.Share], list[str], list[str], list[str]]:
        start = time.perf_counter()
        try:
            found = super()._gather_shares(record, package, grant_id, patience)
            self.last_read = (package, found[0])
            return found
        finally:
            self.timings["key release"] += time.perf_counter() - start

    def _request(
        self, method: str, base: str, path: str, body: bytes = b"", organization: str = ""
    ) -> httpx.Response:
        response = super()._request(method, base, path, body, organization)
        if path == "/v1/keys/release":
            self.timings["key release requests"] += 1
            if response.status_code in (404, 503):
                self.timings["key release not yet"] += 1
        return response


# -- replication -------------------------------------------------------------------------------


class ReplicationWatch:
    """Polls every node's package directory for the packages of committed records, and notes
    when each one is on the disk of every node."""

    def __init__(self, dirs: list[Path], interval: float = 0.05) -> None:
        self.dirs = dirs
        self.interval = interval
        self.pending: dict[str, tuple[float, list[Path]]] = {}  # digest -> (at, dirs lacking)
        self.done: dict[str, tuple[float, float]] = {}  # digest -> (committed, replicated) at
        self.latest = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replication-watch", daemon=True)
        self._thread.start()

    def add(self, digests: list[str], committed_at: float) -> None:
        with self._lock:
            if digests:
                self.latest = digests[-1]
            for digest in digests:
                self.pending[digest] = (committed_at, list(self.dirs))

    def _run(self) -> None:
        backlog = 0
        # A long backlog is polled less often: the lag is then seconds, and this process also
        # runs the writers.
        while not self._stop.wait(self.interval if backlog < 200 else 4 * self.interval):
            with self._lock:
                waiting = list(self.pending.items())
            backlog = len(waiting)
            now = time.monotonic()
            finished: dict[str, tuple[float, float]] = {}
            for digest, (committed, lacking) in waiting:
                lacking[:] = [d for d in lacking if not (d / digest[:2] / digest).exists()]
                if not lacking:
                    finished[digest] = (committed, now)
            with self._lock:
                for digest, times in finished.items():
                    self.pending.pop(digest, None)
                    self.done[digest] = times

    def wait_all(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self.pending:
                    return True
            time.sleep(self.interval)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class FetchProbe:
    """What one replication fetch costs under the load of a phase: node1's node identity asks
    node0's API for a recently committed package, four times a second, one at a time (the way
    a node's replicator fetches), and the round trips are kept."""

    def __init__(self, net: Testnet, watch: ReplicationWatch, interval: float = 0.25) -> None:
        cfg = net.configs[1]
        self.keys = load_services_config(cfg.home).unlock_node_keys()
        self.issuer = f"node:{cfg.organization}"
        self.base = net.api(0)
        self.audience = node_audience(net.configs[0].organization)
        self.watch = watch
        self.interval = interval
        self.round_trips: list[tuple[float, float]] = []  # (at, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fetch-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=30.0) as http:
            while not self._stop.wait(self.interval):
                digest = self.watch.latest
                if not digest:
                    continue
                path = f"/v1/packages/{digest}"
                header = sign_request(self.keys, self.issuer, "GET", path, audience=self.audience)
                headers = {"Authorization": header}
                start = time.monotonic()
                with contextlib.suppress(httpx.HTTPError):
                    http.get(self.base + path, headers=headers)
                    self.round_trips.append((start, time.monotonic() - start))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(35)


# -- the cast ----------------------------------------------------------------------------------


@dataclass
class Cast:
    writers: list[tuple[int, KeyPair]]  # (node, keys)
    patients: list[KeyPair]
    reader: KeyPair


def make_cast(net: Testnet, writers: int, patients: int) -> Cast:
    """Clinicians spread over the four organizations, patients at org-1 who consent to
    treatment reads by the reader's organization, and the reader (a clinician there)."""
    cast = Cast(
        writers=[(i % NODES, KeyPair.generate()) for i in range(writers)],
        patients=[KeyPair.generate() for _ in range(patients)],
        reader=KeyPair.generate(),
    )
    entries = [(node, keys, Role.CLINICIAN) for node, keys in cast.writers]
    entries += [(0, keys, Role.PATIENT) for keys in cast.patients]
    entries.append((READER_NODE, cast.reader, Role.CLINICIAN))
    enroll_keys(net, entries)
    now = time.time_ns()
    organization = net.configs[READER_NODE].organization
    submit_pipelined(
        net.rpc(0),
        [
            (
                keys,
                "consent.grant",
                GrantConsent(
                    keys.member_id,
                    GranteeKind.ORGANIZATION,
                    organization,
                    ScopeKind.ALL,
                    (),
                    (Purpose.TREATMENT,),
                    now - 3600 * SECOND_NS,
                    now + 86_400 * SECOND_NS,
                ),
            )
            for keys in cast.patients
        ],
    )
    return cast


# -- writing -----------------------------------------------------------------------------------


@dataclass
class Written:
    record_id: str
    digest: str
    patient: str
    author_node: int


@dataclass
class Call:
    started: float
    finished: float
    records: int
    steps: dict[str, float]
    queries: float


@dataclass
class WriterState:
    node: int
    client: TimedRecordsClient
    calls: list[Call] = field(default_factory=list)
    written: list[Written] = field(default_factory=list)
    failures: int = 0
    last_failure: str = ""


STEPS = ("ledger queries", "validate + seal", "upload", "commit")


def write_phase(
    net: Testnet,
    cast: Cast,
    *,
    label: str,
    batch: int,
    warmup: float,
    seconds: float,
    target_bytes: int,
    seed_base: int,
) -> tuple[dict[str, Any], list[Written]]:
    """Every writer writes records for `warmup + seconds` in a closed loop: `put` one record
    (batch 1) or `put_many` of `batch` records; then no new call starts, and the phase waits
    until every record is committed and on every node's disk. The rate counts the records
    that became replicated on all 4 nodes inside the measured window."""
    watch = ReplicationWatch(net.package_dirs())
    probe = FetchProbe(net, watch)
    states = [
        WriterState(node, TimedRecordsClient(net.rpc(node), net.api(node), keys))
        for node, keys in cast.writers
    ]
    patients = [p.member_id for p in cast.patients]
    start = time.monotonic()
    window = (start + warmup, start + warmup + seconds)
    stop_at = window[1]
    meter = CpuMeter(net.cpu_groups())
    cpu: dict[str, float] = {}
    stop = threading.Event()

    def writer(index: int, state: WriterState) -> None:
        rng = random.Random(seed_base + index)
        author = f"Practitioner/{state.client.member_id}"
        counter = 0
        while time.monotonic() < stop_at and not stop.is_set() and not any(TERMINATING.values()):
            writes: list[RecordWrite] = []
            for _ in range(batch):
                counter += 1
                patient = rng.choice(patients)
                resource = sized_observation(
                    seed_base + index * 100_000 + counter,
                    target_bytes,
                    patient_ref=f"Patient/{patient}",
                    author_ref=author,
                )
                writes.append(RecordWrite(resource, patient))
            before = dict(state.client.timings)
            began = time.monotonic()
            try:
                if batch == 1:
                    one = state.client.put(writes[0].resource, writes[0].patient_id)
                    done = [one]
                else:
                    done = state.client.put_many(writes)
            except ClientError as exc:
                state.failures += 1
                state.last_failure = str(exc)[:300]
                time.sleep(0.2)
                continue
            finished = time.monotonic()
            watch.add([w.digest for w in done], finished)
            after = state.client.timings
            steps = {name: after[name] - before.get(name, 0.0) for name in STEPS}
            queries = after["query count"] - before.get("query count", 0.0)
            state.calls.append(Call(began, finished, len(done), steps, queries))
            state.written += [
                Written(w.record_id, w.digest, p.patient_id, state.node)
                for w, p in zip(done, writes, strict=True)
            ]

    def metered() -> None:
        time.sleep(max(0.0, window[0] - time.monotonic()))
        meter.start()
        time.sleep(max(0.0, window[1] - time.monotonic()))
        cpu.update(meter.stop())

    threads = [
        threading.Thread(target=writer, args=(i, s), name=f"writer-{i}", daemon=True)
        for i, s in enumerate(states)
    ]
    threads.append(threading.Thread(target=metered, name="cpu-meter", daemon=True))
    log(
        f"{label}: {len(states)} writers, {batch} record(s) per transaction, "
        f"{warmup:.0f}s warm-up + {seconds:.0f}s measured"
    )
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
        ended = time.monotonic()
        complete = watch.wait_all(90)
        drained = time.monotonic()
    finally:
        stop.set()
        probe.close()
        watch.close()
        for state in states:
            state.client.close()
            state.client.timed.close()

    calls = [c for s in states for c in s.calls]
    written = [w for s in states for w in s.written]
    done = dict(watch.done)
    in_window = [c for c in calls if window[0] <= c.finished < window[1]]
    replicated = [t for t in done.values() if window[0] <= t[1] < window[1]]
    committed_records = sum(c.records for c in in_window)
    lags = [r - c for c, r in done.values() if window[0] <= c < window[1]]
    steps = {
        name: statistics.mean(c.steps[name] for c in in_window) if in_window else float("nan")
        for name in STEPS
    }
    missing = net.packages_missing()
    sizes = [len(canonical_json(sized_observation(seed_base + i, target_bytes))) for i in range(20)]

    result: dict[str, Any] = {
        "label": label,
        "writers": len(states),
        "records_per_tx": batch,
        "window_s": seconds,
        "records_written": len(written),
        "records_committed_in_window": committed_records,
        "records_replicated_in_window": len(replicated),
        "committed_records_per_s": committed_records / seconds,
        "records_per_s": len(replicated) / seconds,
        "transactions_per_s": len(in_window) / seconds,
        # the whole phase: every record written, until the last one is on all 4 nodes
        "phase_records_per_s": len(done) / (max(r for _, r in done.values()) - start)
        if done
        else 0.0,
        "call_latency_s": summary([c.finished - c.started for c in in_window]),
        "call_steps_mean_s": steps,
        "ledger_queries_per_call_mean": statistics.mean(c.queries for c in in_window)
        if in_window
        else float("nan"),
        "replication_lag_s": summary(lags),
        "package_fetch_round_trip_s": summary(
            [rtt for at, rtt in probe.round_trips if window[0] <= at < window[1]]
        ),
        "all_replicated": complete and len(done) == len(written),
        "replicated_total": len(done),
        "drain_s": round(drained - ended, 2),
        "packages_missing_metric_after": missing,
        "failures": sum(s.failures for s in states),
        "last_failure": next((s.last_failure for s in states if s.last_failure), ""),
        "resource_bytes_mean": statistics.mean(sizes),
        "cpu_cores_used": cpu,
    }
    log(
        f"{label}: {result['records_per_s']:.1f} records/s committed and replicated "
        f"({result['transactions_per_s']:.1f} tx/s), call p50 "
        f"{result['call_latency_s']['p50']:.2f}s p99 {result['call_latency_s']['p99']:.2f}s, "
        f"replication lag p50 {result['replication_lag_s']['p50']:.2f}s (one package fetch "
        f"p50 {result['package_fetch_round_trip_s']['p50'] * 1000:.0f} ms), "
        f"steps {', '.join(f'{k} {v:.3f}s' for k, v in steps.items())}, cores {cpu}; "
        f"failures {result['failures']}; all on 4 nodes: {result['all_replicated']}, "
        f"packages_missing {missing}"
    )
    return result, written


# -- reading -----------------------------------------------------------------------------------


READ_PARTS = ("access request", "package download", "key release")


def read_phase(net: Testnet, cast: Cast, written: list[Written], count: int) -> dict[str, Any]:
    """The reader (another organization, under consent) reads `count` records one after the
    other, each through the whole path of `RecordsClient.read`."""
    pool = [w for w in written if w.author_node != READER_NODE]
    chosen = random.Random(7).sample(pool, min(count, len(pool)))
    client = TimedRecordsClient(net.rpc(READER_NODE), net.api(READER_NODE), cast.reader)
    samples: list[dict[str, float]] = []
    failures: list[str] = []
    meter = CpuMeter(net.cpu_groups())
    log(f"reads: {len(chosen)} records, one after the other, by a clinician of org-2")
    meter.start()
    try:
        for item in chosen:
            if any(TERMINATING.values()):
                raise KeyboardInterrupt("terminated")
            before = dict(client.timings)
            start = time.perf_counter()
            try:
                read = client.read(item.record_id)
            except ClientError as exc:
                failures.append(str(exc)[:300])
                continue
            total = time.perf_counter() - start
            after = client.timings
            sample = {name: after[name] - before.get(name, 0.0) for name in READ_PARTS}
            assert client.last_read is not None
            package, shares = client.last_read
            t = time.perf_counter()
            key = packaging.combine_shares(package, shares)
            packaging.decrypt_record(package, key, read.version.commitment)
            sample["combine + decrypt + verify"] = time.perf_counter() - t
            sample["other (grant and record lookups)"] = (
                total - sum(sample[n] for n in READ_PARTS) - sample["combine + decrypt + verify"]
            )
            sample["total"] = total
            sample["key release requests"] = after["key release requests"] - before.get(
                "key release requests", 0.0
            )
            sample["key release not yet"] = after["key release not yet"] - before.get(
                "key release not yet", 0.0
            )
            samples.append(sample)
    finally:
        cpu = meter.stop()
        client.close()
        client.timed.close()
    parts = [*READ_PARTS, "combine + decrypt + verify", "other (grant and record lookups)"]
    result: dict[str, Any] = {
        "reads": len(samples),
        "failures": len(failures),
        "last_failure": failures[-1] if failures else "",
        "latency_s": summary([s["total"] for s in samples]),
        "breakdown_p50_s": {p: summary([s[p] for s in samples])["p50"] for p in parts},
        "breakdown_mean_s": {
            p: statistics.mean(s[p] for s in samples) if samples else float("nan") for p in parts
        },
        "access_request_s": summary([s["access request"] for s in samples]),
        "key_release_s": summary([s["key release"] for s in samples]),
        "key_release_requests_mean": statistics.mean(s["key release requests"] for s in samples)
        if samples
        else float("nan"),
        "reads_with_a_custodian_not_yet_ready": sum(
            1 for s in samples if s["key release not yet"] > 0
        ),
        "cpu_cores_used": cpu,
    }
    log(
        f"reads: p50 {result['latency_s']['p50']:.3f}s p99 {result['latency_s']['p99']:.3f}s; "
        + ", ".join(f"{k} {v:.3f}s" for k, v in result["breakdown_p50_s"].items())
        + f"; failures {len(failures)}"
    )
    return result


# -- report ------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    add = lines.append
    machine = results["machine"]
    add(f"medledger records benchmark  {results['started']}  ({results['wall_seconds']:.0f}s)")
    add(f"machine: {machine['cores']} cores, {machine['cpu']}, Python {machine['python']}")
    loads = [machine.get("load_average_at_start"), machine.get("load_average_at_end")]
    add(
        "load average (1 min) at start / end: "
        + " / ".join(fmt(v[0], 1) if v else "-" for v in loads)
    )
    raw = results.get("raw", [])
    base = results.get("raw_tps")
    add("")
    add("Raw ledger baseline (member.rotate, closed loop, same network)")
    for step in raw:
        add(
            f"  {step['label']:<8} {fmt(step['tps']):>6} tx/s  p50 {fmt(step['latency_p50_s'], 2)}s"
            f"  p99 {fmt(step['latency_p99_s'], 2)}s  {fmt(step['mean_block_txs'])} txs/block"
        )
    if base:
        add(f"  baseline (mean)  {fmt(base)} tx/s")
    phases = results.get("writes", [])
    if phases:
        add("")
        add(
            f"  {'records written':<24} {'records/s':>9} {'÷ raw':>7} {'tx/s':>6} "
            f"{'call p50':>8} {'p99':>6} {'repl lag p50':>12}  cores app/comet/bench"
        )
        for phase in phases:
            ratio = phase["records_per_s"] / base if base else float("nan")
            used = " ".join(f"{v:.2f}" for v in phase["cpu_cores_used"].values())
            add(
                f"  {phase['label']:<24} {fmt(phase['records_per_s'], 1):>9} "
                f"{fmt(ratio, 3):>7} {fmt(phase['transactions_per_s'], 1):>6} "
                f"{fmt(phase['call_latency_s']['p50'], 2):>8} "
                f"{fmt(phase['call_latency_s']['p99'], 2):>6} "
                f"{fmt(phase['replication_lag_s']['p50'], 2):>12}  {used}"
            )
            steps = ", ".join(f"{k} {v:.3f}" for k, v in phase["call_steps_mean_s"].items())
            add(f"  {'':<24} mean s per call: {steps}")
            add(
                f"  {'':<24} ABCI queries per call: {fmt(phase['ledger_queries_per_call_mean'], 1)}"
            )
            fetch = phase["package_fetch_round_trip_s"]
            add(
                f"  {'':<24} one package fetch (node to node, under this load): p50 "
                f"{fmt(fetch['p50'] * 1000)} ms, p99 {fmt(fetch['p99'] * 1000)} ms; committed "
                f"{fmt(phase['committed_records_per_s'], 1)} records/s "
                f"(÷ raw {fmt(phase['committed_records_per_s'] / base if base else None, 3)})"
            )
            add(
                f"  {'':<24} whole phase, until the last record is on 4 nodes: "
                f"{phase['records_written']} records, "
                f"{fmt(phase['phase_records_per_s'], 1)} records/s "
                f"(÷ raw {fmt(phase['phase_records_per_s'] / base if base else None, 3)})"
            )
            add(
                f"  {'':<24} all on 4 nodes: {phase['all_replicated']}, "
                f"medledger_packages_missing {phase['packages_missing_metric_after']}, "
                f"failures {phase['failures']}"
            )
    reads = results.get("reads")
    if reads:
        add("")
        lat = reads["latency_s"]
        add(
            f"Record reads by another organization under consent ({reads['reads']} reads, "
            f"sequential): p50 {fmt(lat['p50'], 3)}s  p99 {fmt(lat['p99'], 3)}s  "
            f"max {fmt(lat['max'], 3)}s"
        )
        for part, value in reads["breakdown_p50_s"].items():
            mean = reads["breakdown_mean_s"][part]
            add(f"  {part:<36} p50 {fmt(value, 3)}s  mean {fmt(mean, 3)}s")
        add(
            f"  key release requests per read {fmt(reads['key_release_requests_mean'], 2)}; "
            f"reads where a custodian had not committed the grant yet: "
            f"{reads['reads_with_a_custodian_not_yet_ready']}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--writers", type=int, default=16, help="concurrent writer threads")
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--batch", type=int, default=20, help="records per put_many")
    parser.add_argument("--warmup", type=float, default=4.0, help="s before each measured window")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured s per write phase")
    parser.add_argument("--reads", type=int, default=40)
    parser.add_argument("--target-bytes", type=int, default=2048)
    parser.add_argument("--raw-members", type=int, default=2400)
    parser.add_argument("--raw-window", type=int, default=2000)
    parser.add_argument("--raw-warmup", type=float, default=3.0)
    parser.add_argument("--raw-seconds", type=float, default=8.0)
    parser.add_argument("--skip-put", action="store_true")
    parser.add_argument("--skip-put-many", action="store_true")
    parser.add_argument("--skip-reads", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    started = time.monotonic()
    results: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([".venv/bin/python", "bench/records.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "settings": vars(args) | {"out": str(args.out)},
        "raw": [],
        "writes": [],
    }
    with terminate_cleanly(), medledger_testnet("records", 32000) as net:
        raw = enroll_rotators(net, args.raw_members)
        results["raw_enrollment"] = dataclasses.asdict(raw)["enroll_rounds"]

        def baseline(label: str) -> None:
            results["raw"].append(
                measure_raw(
                    raw,
                    label,
                    warmup=args.raw_warmup,
                    seconds=args.raw_seconds,
                    window=args.raw_window,
                )
            )

        baseline("before")
        cast = make_cast(net, args.writers, args.patients)
        written: list[Written] = []
        if not args.skip_put:
            phase, done = write_phase(
                net,
                cast,
                label="put (1 per tx)",
                batch=1,
                warmup=args.warmup,
                seconds=args.seconds,
                target_bytes=args.target_bytes,
                seed_base=1_000_000,
            )
            results["writes"].append(phase)
            written += done
        if not args.skip_put_many:
            phase, done = write_phase(
                net,
                cast,
                label=f"put_many ({args.batch} per tx)",
                batch=args.batch,
                warmup=args.warmup,
                seconds=args.seconds,
                target_bytes=args.target_bytes,
                seed_base=50_000_000,
            )
            results["writes"].append(phase)
            written += done
        if not args.skip_reads and written:
            results["reads"] = read_phase(net, cast, written, args.reads)
        baseline("after")
    results["raw_tps"] = statistics.mean(step["tps"] for step in results["raw"])
    for phase in results["writes"]:
        phase["ratio_to_raw"] = phase["records_per_s"] / results["raw_tps"]
    results["wall_seconds"] = time.monotonic() - started
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    print("\n".join(report(results)))
    path = write_results(results, args.out, "records")
    log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); every testnet this run started has been stopped")
        sys.exit(130)
