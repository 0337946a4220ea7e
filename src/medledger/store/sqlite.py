"""The node's durable ledger state in one SQLite file.

Writes of a block are staged in one SQLite transaction on the writer connection and become
durable, together with the height and app hash, only at Commit, so a crash at any moment leaves
the last committed block intact and CometBFT's handshake replays the rest. Reads (CheckTx,
queries, execution's base state) go through a second connection that sees committed data only.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from medledger.ledger import merkle, statetree
from medledger.ledger.execution import TxResult
from medledger.ledger.statetree import BucketTree, StateProof

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY, value BLOB NOT NULL, value_hash BLOB NOT NULL, bucket INTEGER NOT NULL
) WITHOUT ROWID;
-- A bucket's listing (its keys in order with their value hashes) is read from this index alone:
-- every block rehashes each bucket it touched, and the buckets fill as the state grows. Without
-- value_hash here, each listed key cost a lookup in kv (4 million keys: 9.5 s per block of 20,000
-- changed keys instead of 0.64 s).
CREATE INDEX IF NOT EXISTS kv_bucket_listing ON kv (bucket, key, value_hash);
DROP INDEX IF EXISTS kv_bucket;
CREATE TABLE IF NOT EXISTS buckets (bucket INTEGER PRIMARY KEY, leaf BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS audit_nodes (
    level INTEGER NOT NULL, idx INTEGER NOT NULL, digest BLOB NOT NULL, PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit_leaves (
    idx INTEGER PRIMARY KEY, height INTEGER NOT NULL, subject TEXT NOT NULL, data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_subject ON audit_leaves (subject, idx);
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, txs BLOB NOT NULL,
    results BLOB NOT NULL, audit_size INTEGER NOT NULL, app_hash BLOB
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


READ_CACHE_ENTRIES = 100_000
BUCKETS_PER_QUERY = 500  # well under SQLite's limit on bound parameters


def bucket_listing_sql(buckets: int) -> str:
    """The listings of `buckets` buckets in (bucket, key) order, from kv_bucket_listing alone."""
    marks = ",".join("?" * buckets)
    return f"SELECT bucket, key, value_hash FROM kv WHERE bucket IN ({marks}) ORDER BY bucket, key"


class StoredResult(msgspec.Struct, frozen=True, array_like=True):
    code: int
    log: str
    type: str
    sender: str


class StoredBlock(msgspec.Struct, frozen=True):
    height: int
    time_ns: int
    txs: list[bytes]
    results: list[StoredResult]
    audit_size: int
    app_hash: bytes


class _NodeTable:
    """The audit log's perfect-subtree hashes, as rows of one connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def get_node(self, level: int, index: int) -> bytes | None:
        row = self._conn.execute(
            "SELECT digest FROM audit_nodes WHERE level = ? AND idx = ?", (level, index)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def put_node(self, level: int, index: int, digest: bytes) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO audit_nodes (level, idx, digest) VALUES (?, ?, ?)",
            (level, index, digest),
        )


class _BufferedNodeTable(_NodeTable):
    """Holds a block's new audit nodes until flush(), writing them in one batch; reads see
    them meanwhile."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__(conn)
        self._pending: dict[tuple[int, int], bytes] = {}

    def get_node(self, level: int, index: int) -> bytes | None:
        digest = self._pending.get((level, index))
        return digest if digest is not None else super().get_node(level, index)

    def put_node(self, level: int, index: int, digest: bytes) -> None:
        self._pending[(level, index)] = digest

    def flush(self) -> None:
        self._conn.executemany(
            "INSERT OR REPLACE INTO audit_nodes (level, idx, digest) VALUES (?, ?, ?)",
            [(level, index, digest) for (level, index), digest in self._pending.items()],
        )
        self._pending.clear()


class CommittedReads:
    """Reads of committed state through one connection: what queries, CheckTx and the node's
    services read. The connection never sees a block's writes before its Commit (they are staged
    in a transaction of the writer connection)."""

    def __init__(self, reader: sqlite3.Connection) -> None:
        self._reader = reader

    def get(self, key: bytes) -> bytes | None:
        row = self._reader.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        rows = self._reader.execute(
            "SELECT key, value FROM kv WHERE key >= ? ORDER BY key", (prefix,)
        )
        for key, value in rows:
            if not bytes(key).startswith(prefix):
                break
            yield bytes(key), bytes(value)

    def committed(self) -> tuple[int, bytes, str]:
        meta = dict(self._reader.execute("SELECT name, value FROM meta").fetchall())
        if "height" not in meta:
            return 0, b"", ""
        return int(meta["height"]), bytes(meta["app_hash"]), bytes(meta["chain_id"]).decode()

    def audit_size(self) -> int:
        row = self._reader.execute("SELECT value FROM meta WHERE name = 'audit_size'").fetchone()
        return 0 if row is None else int(row[0])

    def audit_log(self) -> merkle.MerkleLog:
        """The committed audit log, read-only."""
        return merkle.MerkleLog(_NodeTable(self._reader), self.audit_size())

    def audit_node(self, level: int, index: int) -> bytes | None:
        return _NodeTable(self._reader).get_node(level, index)

    def audit_leaf(self, index: int) -> tuple[int, bytes] | None:
        row = self._reader.execute(
            "SELECT height, data FROM audit_leaves WHERE idx = ?", (index,)
        ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def audit_entries_about(self, subject: str) -> list[tuple[int, int, bytes]]:
        """(index, height, leaf) of every audit entry concerning one patient, oldest first."""
        rows = self._reader.execute(
            "SELECT idx, height, data FROM audit_leaves WHERE subject = ? ORDER BY idx", (subject,)
        )
        return [(int(i), int(h), bytes(d)) for i, h, d in rows]

    def audit_leaves_of_block(self, height: int) -> list[tuple[int, bytes]]:
        rows = self._reader.execute(
            "SELECT idx, data FROM audit_leaves WHERE height = ? ORDER BY idx", (height,)
        )
        return [(int(i), bytes(d)) for i, d in rows]

    def block(self, height: int) -> StoredBlock | None:
        row = self._reader.execute(
            "SELECT height, time_ns, txs, results, audit_size, app_hash FROM blocks"
            " WHERE height = ?",
            (height,),
        ).fetchone()
        if row is None:
            return None
        return StoredBlock(
            height=int(row[0]),
            time_ns=int(row[1]),
            txs=msgspec.msgpack.decode(row[2], type=list[bytes]),
            results=msgspec.msgpack.decode(row[3], type=list[StoredResult]),
            audit_size=int(row[4]),
            app_hash=bytes(row[5] or b""),
        )

    def block_time_ns(self) -> int:
        """The time of the last committed block (0 before the first): the ledger's "now"."""
        height, _, _ = self.committed()
        block = self.block(height)
        return block.time_ns if block is not None else 0


class CommittedView:
    """Committed state for the node's own services, read in worker threads while the ABCI
    server executes and commits blocks on the event loop.

    Each thread reads through a read-only connection of its own, inside one read transaction per
    `snapshot()`: everything read in it is the state at one committed height, whatever Commit
    does meanwhile (SQLite WAL). The store's shared reader connection and its cache belong to
    the event loop; they are never touched from here."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[CommittedReads]:
        """The committed state at one height, for the duration of the block."""
        conn = self._connection()
        if conn.in_transaction:  # a nested snapshot reads the enclosing one's height
            yield CommittedReads(conn)
            return
        conn.execute("BEGIN")
        try:
            yield CommittedReads(conn)
        finally:
            conn.execute("ROLLBACK")

    def height(self) -> int:
        with self.snapshot() as reads:
            return reads.committed()[0]


class SqliteStore(CommittedReads):
    def __init__(self, path: Path, depth: int = statetree.DEFAULT_DEPTH) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.depth = depth
        self._writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._writer.execute("PRAGMA journal_mode=WAL")
        self._writer.execute("PRAGMA synchronous=FULL")
        self._writer.executescript(SCHEMA)
        super().__init__(sqlite3.connect(path, isolation_level=None, check_same_thread=False))
        self._staged: list[tuple[int, bytes]] | None = None
        self._staged_audit_size = 0
        self._staged_changes: list[tuple[bytes, bytes | None]] = []
        # Committed values by key (None: absent), filled by get() and brought up to date at
        # every commit; kv is written nowhere but stage_block/commit_staged.
        self._cache: dict[bytes, bytes | None] = {}
        self._committed_tree = self._load_tree()
        self._working_tree = self._load_tree()

    def close(self) -> None:
        self.discard_staged()
        self._writer.close()
        self._reader.close()

    # --- reads of committed state (cached point reads, proofs) -----------------------------

    def get(self, key: bytes) -> bytes | None:
        try:
            return self._cache[key]
        except KeyError:
            pass
        value = super().get(key)
        if len(self._cache) >= READ_CACHE_ENTRIES:
            self._cache.clear()
        self._cache[key] = value
        return value

    def state_root(self) -> bytes:
        return self._committed_tree.root()

    def state_proof(self, key: bytes) -> StateProof:
        """A proof of `key`'s committed value, or of its absence, under the state root."""
        bucket = statetree.bucket_of(key, self.depth)
        entries = [
            (bytes(k), bytes(h))
            for k, h in self._reader.execute(
                "SELECT key, value_hash FROM kv WHERE bucket = ? ORDER BY key", (bucket,)
            )
        ]
        return statetree.prove(self._committed_tree, key, self.get(key), entries)

    # --- staging and committing a block --------------------------------------------------

    def stage_block(
        self,
        height: int,
        time_ns: int,
        txs: list[bytes],
        results: list[TxResult],
        changes: list[tuple[bytes, bytes | None]],
        audit_leaves: list[bytes],
    ) -> tuple[bytes, bytes, int]:
        self.discard_staged()
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        self._staged = []
        self._staged_changes = changes
        dirty: set[int] = set()
        upserts: list[tuple[bytes, bytes, bytes, int]] = []
        deletes: list[tuple[bytes]] = []
        for key, value in changes:
            bucket = statetree.bucket_of(key, self.depth)
            dirty.add(bucket)
            if value is None:
                deletes.append((key,))
            else:
                upserts.append((key, value, statetree.value_hash(value), bucket))
        conn.executemany("DELETE FROM kv WHERE key = ?", deletes)
        conn.executemany(
            "INSERT OR REPLACE INTO kv (key, value, value_hash, bucket) VALUES (?,?,?,?)", upserts
        )
        # Every dirty bucket's full listing, read back in a few queries rather than one each.
        ordered = sorted(dirty)
        listings: dict[int, list[tuple[bytes, bytes]]] = {bucket: [] for bucket in ordered}
        for start in range(0, len(ordered), BUCKETS_PER_QUERY):
            chunk = ordered[start : start + BUCKETS_PER_QUERY]
            for bucket, key, vhash in conn.execute(bucket_listing_sql(len(chunk)), chunk):
                listings[bucket].append((key, vhash))
        filled: list[tuple[int, bytes]] = []
        emptied: list[tuple[int]] = []
        for bucket in ordered:
            entries = listings[bucket]
            leaf = statetree.ordered_bucket_leaf(entries)
            if entries:
                filled.append((bucket, leaf))
            else:
                emptied.append((bucket,))
            self._staged.append((bucket, self._working_tree.bucket_leaf(bucket)))
            self._working_tree.set_bucket_leaf(bucket, leaf)
        conn.executemany("INSERT OR REPLACE INTO buckets (bucket, leaf) VALUES (?, ?)", filled)
        conn.executemany("DELETE FROM buckets WHERE bucket = ?", emptied)
        nodes = _BufferedNodeTable(conn)
        log = merkle.MerkleLog(nodes, self._writer_audit_size())
        leaf_rows = [
            (log.append(data), height, result.subject, data)
            for data, result in zip(audit_leaves, results, strict=True)
        ]
        conn.executemany(
            "INSERT INTO audit_leaves (idx, height, subject, data) VALUES (?, ?, ?, ?)", leaf_rows
        )
        nodes.flush()
        stored = [StoredResult(int(r.code), r.log, r.type, r.sender) for r in results]
        conn.execute(
            "INSERT OR REPLACE INTO blocks (height, time_ns, txs, results, audit_size)"
            " VALUES (?, ?, ?, ?, ?)",
            (
                height,
                time_ns,
                msgspec.msgpack.encode(txs),
                msgspec.msgpack.encode(stored),
                log.size,
            ),
        )
        self._staged_audit_size = log.size
        return self._working_tree.root(), log.root(), log.size

    def _writer_audit_size(self) -> int:
        row = self._writer.execute("SELECT value FROM meta WHERE name = 'audit_size'").fetchone()
        return 0 if row is None else int(row[0])

    def commit_staged(self, height: int, app_hash: bytes, chain_id: str) -> None:
        if self._staged is None:
            raise RuntimeError("nothing staged to commit")
        conn = self._writer
        # The staged log's size is the number of audit leaves (indices 0..size-1) once this
        # commits; counting the table instead would scan the whole log at every block.
        size = self._staged_audit_size
        conn.executemany(
            "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
            [
                ("height", height),
                ("app_hash", app_hash),
                ("chain_id", chain_id.encode()),
                ("audit_size", size),
            ],
        )
        conn.execute("UPDATE blocks SET app_hash = ? WHERE height = ?", (app_hash, height))
        conn.execute("COMMIT")
        # The committed tree now equals the working tree, whose root stage_block computed.
        self._committed_tree.assign(self._working_tree)
        for key, value in self._staged_changes:
            if key in self._cache:
                self._cache[key] = value
        self._staged_changes = []
        self._staged = None

    def discard_staged(self) -> None:
        if self._staged is None:
            return
        self._writer.execute("ROLLBACK")
        self._staged_changes = []
        for bucket, old_leaf in reversed(self._staged):
            self._working_tree.set_bucket_leaf(bucket, old_leaf)
        self._working_tree.root()
        self._staged = None

    def _load_tree(self) -> BucketTree:
        tree = BucketTree(self.depth)
        rows = self._writer.execute("SELECT bucket, leaf FROM buckets ORDER BY bucket").fetchall()
        if not rows:
            return tree
        leaves = bytearray(tree.leaves_bytes())
        for bucket, leaf in rows:
            leaves[bucket * 32 : (bucket + 1) * 32] = leaf
        return BucketTree.from_leaves_bytes(self.depth, bytes(leaves))


# --- state sync: reading a snapshot's rows, restoring them --------------------------------------

# One snapshot record: ("kv", key, value), ("audit", index, height, subject, data),
# ("block", height, time_ns, txs, results, audit_size, app_hash) for the snapshot's own block, and
# last ("meta", height, app_hash, chain_id, audit_size).
SnapshotRecord = tuple[Any, ...]


class SnapshotReader:
    """Committed state at one height, read through a connection of its own that holds a read
    transaction: commits that follow do not change what it reads (SQLite WAL)."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("BEGIN")
        meta = dict(self._conn.execute("SELECT name, value FROM meta").fetchall())
        self.height = int(meta.get("height", 0))
        self.app_hash = bytes(meta.get("app_hash", b""))
        self.chain_id = bytes(meta.get("chain_id", b"")).decode()
        self.audit_size = int(meta.get("audit_size", 0))

    def records(self) -> Iterator[SnapshotRecord]:
        """Every row the state at this height consists of, in one deterministic order."""
        for key, value in self._conn.execute("SELECT key, value FROM kv ORDER BY key"):
            yield ("kv", bytes(key), bytes(value))
        for idx, height, subject, data in self._conn.execute(
            "SELECT idx, height, subject, data FROM audit_leaves WHERE idx < ? ORDER BY idx",
            (self.audit_size,),
        ):
            yield ("audit", int(idx), int(height), str(subject), bytes(data))
        row = self._conn.execute(
            "SELECT height, time_ns, txs, results, audit_size, app_hash FROM blocks"
            " WHERE height = ?",
            (self.height,),
        ).fetchone()
        if row is not None:
            yield (
                "block",
                int(row[0]),
                int(row[1]),
                bytes(row[2]),
                bytes(row[3]),
                int(row[4]),
                bytes(row[5] or b""),
            )
        yield ("meta", self.height, self.app_hash, self.chain_id, self.audit_size)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")
        self._conn.close()


class RestoreError(Exception):
    """A snapshot's rows do not make a consistent state (out of order, missing, malformed)."""


class Restore:
    """Rows of a snapshot written into an empty store inside one transaction; nothing is
    visible until `commit`, and `abort` leaves the store empty again."""

    def __init__(self, store: SqliteStore) -> None:
        if store.committed()[0] != 0 or store.audit_size() != 0:
            raise RestoreError("state sync needs an empty state database")
        self._store = store
        self._conn = store._writer
        store.discard_staged()
        self._conn.execute("BEGIN IMMEDIATE")
        self._next_audit = 0
        self.meta: tuple[int, bytes, str, int] | None = None

    def add(self, records: list[SnapshotRecord]) -> None:
        kv: list[tuple[bytes, bytes, bytes, int]] = []
        leaves: list[tuple[int, int, str, bytes]] = []
        depth = self._store.depth
        for record in records:
            if self.meta is not None:
                raise RestoreError("rows after the snapshot's last record")
            match record:
                case ("kv", bytes() as key, bytes() as value):
                    kv.append(
                        (key, value, statetree.value_hash(value), statetree.bucket_of(key, depth))
                    )
                case ("audit", int() as idx, int() as height, str() as subject, bytes() as data):
                    if idx != self._next_audit:
                        raise RestoreError(f"audit entry {idx} where {self._next_audit} was due")
                    self._next_audit += 1
                    leaves.append((idx, height, subject, data))
                case (
                    "block",
                    int() as height,
                    int() as time_ns,
                    bytes() as txs,
                    bytes() as results,
                    int() as audit_size,
                    bytes() as app_hash,
                ):
                    self._conn.execute(
                        "INSERT OR REPLACE INTO blocks"
                        " (height, time_ns, txs, results, audit_size, app_hash)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (height, time_ns, txs, results, audit_size, app_hash),
                    )
                case (
                    "meta",
                    int() as height,
                    bytes() as app_hash,
                    str() as chain_id,
                    int() as audit_size,
                ):
                    self.meta = (height, app_hash, chain_id, audit_size)
                case _:
                    raise RestoreError("a snapshot row of unknown shape")
        try:
            self._conn.executemany(
                "INSERT INTO kv (key, value, value_hash, bucket) VALUES (?, ?, ?, ?)", kv
            )
        except sqlite3.IntegrityError:
            raise RestoreError("a state key appears twice") from None
        self._conn.executemany(
            "INSERT INTO audit_leaves (idx, height, subject, data) VALUES (?, ?, ?, ?)", leaves
        )

    def finish(self) -> tuple[bytes, bytes, int]:
        """Rebuild the state tree and the audit log's nodes from the rows; returns (state root,
        audit root, audit size) for the caller to check against the app hash it trusts."""
        if self.meta is None:
            raise RestoreError("the snapshot ended before its last record")
        audit_size = self.meta[3]
        if audit_size != self._next_audit:
            raise RestoreError(f"{self._next_audit} audit entries; the snapshot says {audit_size}")
        tree = BucketTree(self._store.depth)
        filled: list[tuple[int, bytes]] = []
        current: int | None = None
        entries: list[tuple[bytes, bytes]] = []
        rows = self._conn.execute("SELECT bucket, key, value_hash FROM kv ORDER BY bucket, key")
        for bucket, key, vhash in [*rows, (None, b"", b"")]:
            if bucket != current and current is not None:
                leaf = statetree.bucket_leaf(entries)
                filled.append((current, leaf))
                tree.set_bucket_leaf(current, leaf)
                entries = []
            current = bucket
            entries.append((bytes(key), bytes(vhash)))
        self._conn.executemany("INSERT INTO buckets (bucket, leaf) VALUES (?, ?)", filled)
        nodes = _BufferedNodeTable(self._conn)
        log = merkle.MerkleLog(nodes, 0)
        for (data,) in self._conn.execute("SELECT data FROM audit_leaves ORDER BY idx"):
            log.append(bytes(data))
        nodes.flush()
        return tree.root(), log.root(), log.size

    def commit(self) -> None:
        assert self.meta is not None
        height, app_hash, chain_id, audit_size = self.meta
        self._conn.executemany(
            "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
            [
                ("height", height),
                ("app_hash", app_hash),
                ("chain_id", chain_id.encode()),
                ("audit_size", audit_size),
            ],
        )
        self._conn.execute("COMMIT")
        self._store._committed_tree = self._store._load_tree()
        self._store._working_tree = self._store._load_tree()
        self._store._cache.clear()

    def abort(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")
