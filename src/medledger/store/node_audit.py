"""This node's own audit log of decisions made off-chain: key releases granted or refused,
API requests refused for want of authentication or scope. It is not consensus state: each node
keeps the record of what it did, beside the on-chain grants and audit log that authorized it.

Anyone on the network can make the node refuse requests, with text of their choosing (a
claimed client id, a resource type in the URL). So refusals are bounded: every field is cut
to FIELD_LIMIT characters; refusals alike in everything are counted in memory and written as
one row (with `count`, and the first and last time) by a background thread every
`flush_seconds`, never by the request that caused them; at most `max_pending_groups` distinct
refusals are told apart per interval, the rest counted per action and outcome; and only the
last `max_refusal_rows` refusal rows are kept. Key releases to an authenticated member —
granted or refused — are disclosure decisions: each is written at once, as its own row, and
never dropped. A key release refused before its caller was authenticated (actor `?`) names
nobody and is bounded like any other refusal.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("medledger.node_audit")

FIELD_LIMIT = 128
MAX_REFUSAL_ROWS = 10_000
MAX_PENDING_GROUPS = 256
FLUSH_SECONDS = 1.0
# Actions whose every entry is kept as written: they record disclosures.
KEPT_ACTIONS = frozenset({"key.release"})
REFUSED = "refused"
UNAUTHENTICATED = "?"
MANY = "*"
AGGREGATED_REASON = "more distinct refusals in one interval than the log tells apart"

_COLUMNS = ("at", "actor", "action", "target", "outcome", "reason", "count", "last_at")
_ADDED_COLUMNS = {
    "count": "INTEGER NOT NULL DEFAULT 1",
    "last_at": "REAL",
    "refusal": "INTEGER NOT NULL DEFAULT 0",
}

GroupKey = tuple[str, str, str, str, str]


def bounded(text: str) -> str:
    """`text` cut to FIELD_LIMIT characters (the cut marked with an ellipsis)."""
    return text if len(text) <= FIELD_LIMIT else text[: FIELD_LIMIT - 1] + "…"


def is_bounded_refusal(actor: str, action: str, outcome: str) -> bool:
    """A refusal that is aggregated and subject to retention: any but a key release refused
    to an authenticated caller."""
    return outcome == REFUSED and (action not in KEPT_ACTIONS or actor == UNAUTHENTICATED)


@dataclass
class _Group:
    first: float
    last: float
    count: int


class NodeAuditLog:
    def __init__(
        self,
        path: Path,
        *,
        max_refusal_rows: int = MAX_REFUSAL_ROWS,
        max_pending_groups: int = MAX_PENDING_GROUPS,
        flush_seconds: float = FLUSH_SECONDS,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_refusal_rows = max_refusal_rows
        self.max_pending_groups = max_pending_groups
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: dict[GroupKey, _Group] = {}
        self._create()
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_periodically, args=(flush_seconds,), daemon=True
        )
        self._flusher.start()

    def _create(self) -> None:
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, at REAL NOT NULL,"
            " actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,"
            " outcome TEXT NOT NULL, reason TEXT NOT NULL)"
        )
        present = {row[1] for row in self._conn.execute("PRAGMA table_info(events)")}
        for column, definition in _ADDED_COLUMNS.items():
            if column not in present:
                self._conn.execute(f"ALTER TABLE events ADD COLUMN {column} {definition}")
        self._conn.execute("CREATE INDEX IF NOT EXISTS events_refusal ON events (refusal, id)")

    def record(self, actor: str, action: str, target: str, outcome: str, reason: str = "") -> None:
        """Note one decision. A refusal only updates a counter in memory; a key release is
        written before this returns."""
        self.record_many([(actor, action, target, outcome, reason)])

    def record_many(self, decisions: list[tuple[str, str, str, str, str]]) -> None:
        """Note decisions (actor, action, target, outcome, reason) — those that are written
        (key releases) in one transaction, before this returns."""
        now = time.time()
        written = []
        for actor, action, target, outcome, reason in decisions:
            key = (
                bounded(actor),
                bounded(action),
                bounded(target),
                bounded(outcome),
                bounded(reason),
            )
            if is_bounded_refusal(actor, action, outcome):
                self._count_refusal(key, now)
            else:
                written.append((now, *key, now))
        if not written:
            return
        with self._db_lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(
                    "INSERT INTO events (at, actor, action, target, outcome, reason, count,"
                    " last_at, refusal) VALUES (?, ?, ?, ?, ?, ?, 1, ?, 0)",
                    written,
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _count_refusal(self, key: GroupKey, now: float) -> None:
        with self._pending_lock:
            group = self._pending.get(key)
            if group is None and len(self._pending) >= self.max_pending_groups:
                key = (MANY, key[1], MANY, key[3], AGGREGATED_REASON)
                group = self._pending.get(key)
            if group is None:
                self._pending[key] = _Group(now, now, 1)
            else:
                group.last = now
                group.count += 1

    def flush(self) -> None:
        """Write the refusals counted so far, then drop the oldest refusal rows beyond
        `max_refusal_rows`."""
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        rows = [(g.first, *key, g.count, g.last) for key, g in pending.items()]
        with self._db_lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(
                    "INSERT INTO events (at, actor, action, target, outcome, reason, count,"
                    " last_at, refusal) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)",
                    rows,
                )
                self._conn.execute(
                    "DELETE FROM events WHERE refusal = 1 AND id < (SELECT id FROM events"
                    " WHERE refusal = 1 ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (self.max_refusal_rows - 1,),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _flush_periodically(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            try:
                self.flush()
            except sqlite3.Error as exc:
                log.warning("node audit log write failed", extra={"error": str(exc)})

    def entries(self, action: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """The latest entries first (refusals counted so far included)."""
        self.flush()
        query = f"SELECT {', '.join(_COLUMNS)} FROM events"
        params: tuple[Any, ...] = ()
        if action is not None:
            query += " WHERE action = ?"
            params = (action,)
        with self._db_lock:
            rows = self._conn.execute(query + " ORDER BY id DESC LIMIT ?", (*params, limit))
            return [dict(zip(_COLUMNS, row, strict=True)) for row in rows.fetchall()]

    def close(self) -> None:
        self._stop.set()
        self._flusher.join()
        self.flush()
        with self._db_lock:
            self._conn.close()
