"""The soak benchmark: a year of records on a 4-validator testnet, and what grows with it.

Writers (clinicians of the four organizations, one thread each, each with its own SDK client on
its own organization's node) write realistic 1–3 KB FHIR lab Observations in `record.put-many`
batches until `--records` are committed. At every tenth of the way it measures, on every node:
disk (state DB with its WAL, CometBFT's data directory, the package store), the block time of
the last blocks, the write rate of the last stretch, and query latency (a patient's record list,
a member lookup, and one consented record read end to end: access request, key shares from the
custodians, decryption). Then it stops every node, starts them again, and checks that every
acknowledged record is still there (each patient's record count against what was acknowledged)
and that a sample decrypts to exactly what was written.

    .venv/bin/python bench/soak.py                    # or: make bench-soak (1,000,000 records)
    .venv/bin/python bench/soak.py --records 20000    # a shorter soak

Results go to bench/results/soak-latest.json plus a timestamped copy; the testnet lives in a
temporary directory and is stopped at the end, also on an error or Ctrl-C. Not part of
`make test`.
"""

# ruff: noqa: E402  (imports follow the sys.path set-up below)
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import argparse
import datetime as dt
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench.common import (
    CHAIN_ID,
    RESULTS_DIR,
    TERMINATING,
    Testnet,
    log,
    machine_info,
    medledger_testnet,
    terminate_cleanly,
    write_results,
)
from bench.records import READER_NODE, Cast, make_cast
from medledger.client.records import RecordsClient, RecordWrite
from medledger.client.sdk import LedgerClient
from medledger.node.testnet import testnet_down, testnet_up, wait_for_height
from medledger.samples.fhir import sized_observation


def directory_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def disk_of(net: Testnet) -> list[dict[str, int]]:
    """Per node: the ledger's state (SQLite with WAL), CometBFT's data, the package store."""
    found = []
    for cfg, packages in zip(net.configs, net.package_dirs(), strict=True):
        state = sum(p.stat().st_size for p in cfg.state_dir.glob("state.db*") if p.is_file())
        found.append(
            {
                "state_db": state,
                "cometbft_data": directory_bytes(cfg.home / "data"),
                "packages": directory_bytes(packages),
            }
        )
    return found


def block_seconds(client: LedgerClient, last: int = 30) -> float:
    """The mean interval between the last `last` blocks."""
    status = client.rpc("status")
    top = int(status["sync_info"]["latest_block_height"])
    low = max(2, top - last)
    meta = client.rpc("blockchain", minHeight=str(low), maxHeight=str(top))["block_metas"]
    times = sorted(
        dt.datetime.fromisoformat(m["header"]["time"][:26].rstrip("Z") + "+00:00").timestamp()
        for m in meta
    )
    if len(times) < 2:
        return 0.0
    return (times[-1] - times[0]) / (len(times) - 1)


@dataclass
class Acknowledged:
    counts: dict[str, int] = field(default_factory=dict)  # patient -> records acknowledged
    sample: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    total: int = 0
    failed_batches: int = 0  # batches the SDK gave up on (their records are not counted)
    lock: threading.Lock = field(default_factory=threading.Lock)


def write_until(
    net: Testnet,
    cast: Cast,
    acked: Acknowledged,
    target: int,
    batch: int,
    per_patient: int,
    seed_base: int,
    sample_every: int,
) -> float:
    """Write until `target` records are acknowledged in all; returns the seconds it took."""
    started = time.monotonic()
    patients = [p.member_id for p in cast.patients]
    stop = threading.Event()
    errors: list[str] = []

    def writer(index: int, node: int, keys: Any) -> None:
        rng = random.Random(seed_base + index)
        client = RecordsClient(LedgerClient(net.rpc(node), CHAIN_ID), net.api(node), keys)
        counter = 0
        try:
            while not stop.is_set() and not any(TERMINATING.values()):
                with acked.lock:
                    if acked.total >= target:
                        return
                writes = []
                # One batch, as a lab's or a ward's: a few records each for some patients.
                batch_patients = rng.sample(patients, min(len(patients), -(-batch // per_patient)))
                for position in range(batch):
                    counter += 1
                    patient = batch_patients[position % len(batch_patients)]
                    resource = sized_observation(
                        seed_base + index * 10_000_000 + counter,
                        rng.randint(1000, 3000),
                        patient_ref=f"Patient/{patient}",
                        author_ref=f"Practitioner/{keys.member_id}",
                    )
                    writes.append(RecordWrite(resource, patient))
                try:
                    written = client.put_many(writes)
                except Exception as exc:  # counted, and the writer goes on
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with acked.lock:
                    for write, record in zip(writes, written, strict=True):
                        acked.counts[write.patient_id] = acked.counts.get(write.patient_id, 0) + 1
                        acked.total += 1
                        if acked.total % sample_every == 0:
                            acked.sample[record.record_id] = (write.patient_id, write.resource)
        finally:
            client.close()
            client.ledger.close()

    threads = [
        threading.Thread(target=writer, args=(i, node, keys), daemon=True)
        for i, (node, keys) in enumerate(cast.writers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        acked.failed_batches += len(errors)
        log(f"{len(errors)} failed batches, e.g. {errors[0][:200]}")
    return time.monotonic() - started


def timed(call: Any, repeat: int = 5) -> dict[str, Any]:
    """p50 and max of `repeat` calls; a call that fails is reported, and the soak goes on."""
    seconds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        try:
            call()
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"[:300], "p50_s": float("nan")}
        seconds.append(time.perf_counter() - t0)
    return {"p50_s": statistics.median(seconds), "max_s": max(seconds)}


def node_heights(net: Testnet) -> list[int]:
    """Every node's latest committed height (-1 where the node does not answer)."""
    heights = []
    for node in range(len(net.configs)):
        try:
            with LedgerClient(net.rpc(node), CHAIN_ID) as client:
                heights.append(int(client.rpc("status")["sync_info"]["latest_block_height"]))
        except Exception:
            heights.append(-1)
    return heights


def wait_caught_up(net: Testnet, timeout: float = 600.0) -> float:
    """Seconds until every node is within two blocks of the highest; a lagging node would
    otherwise time its queries' commit waits, not the queries."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        heights = node_heights(net)
        if min(heights) >= max(heights) - 2:
            break
        time.sleep(1.0)
    return time.monotonic() - started


def query_latency(net: Testnet, cast: Cast, acked: Acknowledged) -> dict[str, Any]:
    ledger = LedgerClient(net.rpc(READER_NODE), CHAIN_ID)
    reader = RecordsClient(ledger, net.api(READER_NODE), cast.reader)
    try:
        patient = cast.patients[0].member_id
        record_id = next(iter(acked.sample), None)
        answer: dict[str, Any] = {
            "patient_records": timed(lambda: ledger.query("/records", patient)),
            "member": timed(lambda: ledger.query("/member", patient)),
        }
        if record_id is not None:
            answer["consented_read"] = timed(lambda: reader.read(record_id), repeat=3)
        return answer
    finally:
        reader.close()
        ledger.close()


def checkpoint(
    net: Testnet, cast: Cast, acked: Acknowledged, seconds: float, done: int
) -> dict[str, Any]:
    heights = node_heights(net)  # as the writers stop: how far behind the slowest node is
    catch_up_s = wait_caught_up(net)
    with LedgerClient(net.rpc(0), CHAIN_ID) as client:
        interval = block_seconds(client)
        height = int(client.rpc("status")["sync_info"]["latest_block_height"])
    point: dict[str, Any] = {
        "records": acked.total,
        "height": height,
        "heights_when_writers_stopped": heights,
        "catch_up_s": catch_up_s,
        "stretch_records_per_s": done / seconds if seconds else 0.0,
        "failed_batches_so_far": acked.failed_batches,
        "block_seconds": interval,
        "disk": disk_of(net),
        "queries": query_latency(net, cast, acked),
    }
    per_node = point["disk"][0]
    log(
        f"{acked.total:,} records, height {height}: {point['stretch_records_per_s']:.0f} rec/s,"
        f" block {interval:.2f}s, node0 state {per_node['state_db'] / 1e6:.0f} MB, cometbft"
        f" {per_node['cometbft_data'] / 1e6:.0f} MB, packages {per_node['packages'] / 1e6:.0f} MB,"
        f" read p50 {point['queries'].get('consented_read', {}).get('p50_s', 0):.2f}s;"
        f" heights as writers stopped {heights}, all caught up after {catch_up_s:.0f} s"
    )
    return point


def restart_and_check(net: Testnet, cast: Cast, acked: Acknowledged) -> dict[str, Any]:
    with LedgerClient(net.rpc(0), CHAIN_ID) as client:
        top = int(client.rpc("status")["sync_info"]["latest_block_height"])
    log("stopping every node, then starting them again")
    testnet_down(net.home, timeout=60)
    started = time.monotonic()
    testnet_up(net.home)
    wait_for_height(net.home, top + 2, timeout=900)
    back_s = time.monotonic() - started
    log(f"committing again {back_s:.0f} s after the start")
    missing = 0
    with LedgerClient(net.rpc(2), CHAIN_ID) as client:
        for patient, count in acked.counts.items():
            present = len(client.query("/records", patient))
            missing += max(0, count - present)
    ledger = LedgerClient(net.rpc(READER_NODE), CHAIN_ID)
    reader = RecordsClient(ledger, net.api(READER_NODE), cast.reader)
    mismatched = 0
    try:
        for record_id, (_, resource) in acked.sample.items():
            if reader.read(record_id).resource != resource:
                mismatched += 1
    finally:
        reader.close()
        ledger.close()
    return {
        "restart_to_new_blocks_s": back_s,
        "acknowledged": acked.total,
        "missing_after_restart": missing,
        "sample_read": len(acked.sample),
        "sample_mismatched": mismatched,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000, help="records per record.put-many")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--patients", type=int, default=5000)
    parser.add_argument(
        "--per-patient", type=int, default=20, help="records per patient in one batch"
    )
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--samples", type=int, default=50, help="records decrypted at the end")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": vars(args),
    }
    started = time.monotonic()
    with terminate_cleanly(), medledger_testnet("soak", 33000) as net:
        cast = make_cast(net, args.writers, args.patients)
        acked = Acknowledged()
        sample_every = max(1, args.records // args.samples)
        points = [checkpoint(net, cast, acked, 0.0, 0)]
        step = max(1, args.records // args.checkpoints)
        for number in range(1, args.checkpoints + 1):
            before = acked.total
            seconds = write_until(
                net,
                cast,
                acked,
                min(args.records, number * step),
                args.batch,
                args.per_patient,
                number * 7919,
                sample_every,
            )
            points.append(checkpoint(net, cast, acked, seconds, acked.total - before))
            results["checkpoints"] = points  # kept as it goes: a long soak is not lost to a crash
            write_results(results, RESULTS_DIR, "soak")
            if acked.total >= args.records or any(TERMINATING.values()):
                break
        results["checkpoints"] = points
        results["restart"] = restart_and_check(net, cast, acked)
    results["wall_s"] = time.monotonic() - started
    path = write_results(results, RESULTS_DIR, "soak")
    first, last = results["checkpoints"][1], results["checkpoints"][-1]
    print(f"\nsoak: {last['records']:,} records in {results['wall_s'] / 60:.0f} min ({path})")
    for name, point in (("first stretch", first), ("last stretch", last)):
        disk = point["disk"][0]
        per_million = 1e6 / max(1, point["records"])
        print(
            f"  {name}: {point['stretch_records_per_s']:.0f} records/s, block"
            f" {point['block_seconds']:.2f} s, read p50"
            f" {point['queries'].get('consented_read', {}).get('p50_s', 0):.2f} s, records query"
            f" p50 {point['queries']['patient_records']['p50_s'] * 1000:.0f} ms; node0 per 1M"
            f" records: state {disk['state_db'] * per_million / 1e9:.1f} GB, CometBFT"
            f" {disk['cometbft_data'] * per_million / 1e9:.1f} GB, packages"
            f" {disk['packages'] * per_million / 1e9:.1f} GB"
        )
    restart = results["restart"]
    print(
        f"  after stopping and restarting every node: {restart['missing_after_restart']} of"
        f" {restart['acknowledged']:,} acknowledged records missing; {restart['sample_mismatched']}"
        f" of {restart['sample_read']} sampled records differ"
    )
    return 0 if restart["missing_after_restart"] == 0 and restart["sample_mismatched"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
