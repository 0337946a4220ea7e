"""Re-verify a node from genesis and name what was tampered with.

The node's own database is read, never written. Every stored block is executed again on a
fresh ledger built from the CometBFT genesis, so every signature is checked again; the
results and app hash of each block must equal those stored; the audit log is recomputed leaf by
leaf and must match the stored log node for node; the final state must match row for row. With
a running node, each block's app hash is also checked against the header the validators signed.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from medledger.client.lightclient import LightClientError, verify_commit
from medledger.client.sdk import ClientError, LedgerClient
from medledger.ledger import merkle
from medledger.ledger.app import Ledger
from medledger.store.sqlite import SqliteStore, StoredBlock, StoredResult

SECOND_NS = 1_000_000_000


@dataclass
class VerifyReport:
    checked_blocks: int = 0
    checked_transactions: int = 0
    signed_headers: int = 0
    findings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


def _genesis(home: Path) -> tuple[str, int, bytes]:
    document = json.loads((home / "config" / "genesis.json").read_text())
    genesis_time = _parse_time_ns(document["genesis_time"])
    return document["chain_id"], genesis_time, json.dumps(document["app_state"]).encode()


def _parse_time_ns(text: str) -> int:
    from medledger.client.lightclient import parse_timestamp

    ts = parse_timestamp(text)
    return ts.seconds * SECOND_NS + ts.nanos


def _read_only(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise FileNotFoundError(f"no ledger database at {path}")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _stored_blocks(conn: sqlite3.Connection) -> list[StoredBlock]:
    rows = conn.execute(
        "SELECT height, time_ns, txs, results, audit_size, app_hash FROM blocks ORDER BY height"
    ).fetchall()
    return [
        StoredBlock(
            height=int(r[0]),
            time_ns=int(r[1]),
            txs=msgspec.msgpack.decode(r[2], type=list[bytes]),
            results=msgspec.msgpack.decode(r[3], type=list[StoredResult]),
            audit_size=int(r[4]),
            app_hash=bytes(r[5] or b""),
        )
        for r in rows
    ]


def verify_node(
    home: Path,
    rpc_url: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    report = VerifyReport()
    chain_id, genesis_time_ns, app_state = _genesis(home)
    node_db = _read_only(home / "app" / "state.db")
    # A running node keeps committing blocks while it is verified: every table is read in one
    # read transaction, so blocks, meta, audit log and state are those of one committed height.
    node_db.execute("BEGIN")
    blocks = _stored_blocks(node_db)
    committed = dict(node_db.execute("SELECT name, value FROM meta").fetchall())
    last_height = int(committed.get("height", 0))
    client = LedgerClient(rpc_url, chain_id) if rpc_url else None

    with tempfile.TemporaryDirectory() as scratch:
        replay_store = SqliteStore(Path(scratch) / "replay.db")
        ledger = Ledger(replay_store)
        genesis_hash = ledger.init_chain(chain_id, genesis_time_ns, app_state).app_hash
        by_height = {b.height: b for b in blocks}
        diverged = False
        if 0 in by_height and by_height[0].app_hash != genesis_hash:
            report.findings.append("genesis state differs from config/genesis.json")
        for height in range(1, last_height + 1):
            stored = by_height.get(height)
            if stored is None:
                report.findings.append(f"block {height} is missing from the ledger database")
                break
            if not _verify_block(report, ledger, stored, diverged):
                diverged = True
            if client is not None:
                _verify_signed_header(report, client, stored)
            report.checked_blocks += 1
            if progress is not None:
                progress(height, last_height)
        _compare_audit_log(report, node_db, replay_store)
        _compare_state(report, node_db, replay_store)
        if bytes(committed.get("app_hash", b"")) != ledger.app_hash:
            report.findings.append("the committed app hash in meta differs from the replay")
        replay_store.close()
    if client is not None:
        client.close()
    node_db.close()
    return report


def _verify_block(
    report: VerifyReport, ledger: Ledger, stored: StoredBlock, diverged: bool
) -> bool:
    """Re-execute one block; False when its app hash differs from the stored one. After a
    first divergence later app hashes differ as a consequence and are not reported again."""
    outcome = ledger.finalize_block(stored.height, stored.time_ns, stored.txs)
    ledger.commit()
    report.checked_transactions += len(stored.txs)
    for index, (replayed, kept) in enumerate(zip(outcome.results, stored.results, strict=False)):
        if (int(replayed.code), replayed.log) != (kept.code, kept.log):
            report.findings.append(
                f"block {stored.height} tx {index}: stored result (code {kept.code}) differs"
                f" from re-execution (code {int(replayed.code)}: {replayed.log});"
                " the transaction bytes or its stored result were altered"
            )
    if len(outcome.results) != len(stored.results):
        report.findings.append(f"block {stored.height}: result count differs from its txs")
    if outcome.app_hash == stored.app_hash:
        return True
    if not diverged:
        report.findings.append(
            f"block {stored.height}: app hash {stored.app_hash.hex()[:16]} stored,"
            f" {outcome.app_hash.hex()[:16]} on re-execution (later blocks follow from it)"
        )
    return False


def _verify_signed_header(report: VerifyReport, client: LedgerClient, stored: StoredBlock) -> None:
    """The app hash after block h is in the header of block h+1, signed by the validators."""
    try:
        commit = client.rpc("commit", height=stored.height + 1)
        validators = client.rpc("validators", height=stored.height + 1, per_page=100)
        header = verify_commit(client.chain_id, commit, validators)
    except ClientError:
        return  # the next block is not committed yet
    except LightClientError as exc:
        report.findings.append(f"header {stored.height + 1} does not verify: {exc}")
        return
    report.signed_headers += 1
    if header.app_hash != stored.app_hash:
        report.findings.append(
            f"block {stored.height}: stored app hash is not the one the validators signed"
        )


def _compare_audit_log(
    report: VerifyReport, node_db: sqlite3.Connection, replay: SqliteStore
) -> None:
    log = replay.audit_log()
    leaves = node_db.execute("SELECT idx, data FROM audit_leaves ORDER BY idx").fetchall()
    for idx, data in leaves:
        expected = replay.audit_leaf(int(idx))
        if expected is None or expected[1] != bytes(data):
            report.findings.append(f"audit log entry {idx} differs from the replayed entry")
    if len(leaves) != log.size:
        report.findings.append(f"audit log holds {len(leaves)} entries; replay gives {log.size}")
    for level, idx, digest in node_db.execute("SELECT level, idx, digest FROM audit_nodes"):
        if replay.audit_node(int(level), int(idx)) != bytes(digest):
            report.findings.append(f"audit log node (level {level}, index {idx}) was altered")
    stored_sizes = [
        int(r[0]) for r in node_db.execute("SELECT audit_size FROM blocks ORDER BY height")
    ]
    for size in sorted(set(stored_sizes)):
        if 0 < size < log.size:
            proof = log.consistency_proof(size)
            if not merkle.verify_consistency(size, log.size, log.root_at(size), log.root(), proof):
                report.findings.append(f"audit log at size {size} is not a prefix of the final log")


def _compare_state(report: VerifyReport, node_db: sqlite3.Connection, replay: SqliteStore) -> None:
    node_rows = {bytes(k): bytes(v) for k, v in node_db.execute("SELECT key, value FROM kv")}
    replay_rows = dict(replay.scan(b""))
    for key in sorted(node_rows.keys() | replay_rows.keys()):
        if node_rows.get(key) != replay_rows.get(key):
            what = (
                "missing"
                if key not in node_rows
                else ("unexpected" if key not in replay_rows else "altered")
            )
            report.findings.append(f"state key {key.decode(errors='replace')} is {what}")
