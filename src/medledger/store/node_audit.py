"""This node's own audit log of decisions made off-chain: key releases granted or refused,
API requests refused for want of authentication or scope. It is not consensus state: each node
keeps the record of what it did, beside the on-chain grants and audit log that authorized it."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any


class NodeAuditLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, at REAL NOT NULL,"
            " actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,"
            " outcome TEXT NOT NULL, reason TEXT NOT NULL)"
        )

    def record(self, actor: str, action: str, target: str, outcome: str, reason: str = "") -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO events (at, actor, action, target, outcome, reason)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), actor, action, target, outcome, reason),
            )

    def entries(self, action: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        query = "SELECT at, actor, action, target, outcome, reason FROM events"
        params: tuple[Any, ...] = ()
        if action is not None:
            query += " WHERE action = ?"
            params = (action,)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY id DESC LIMIT ?", (*params, limit))
            names = ("at", "actor", "action", "target", "outcome", "reason")
            return [dict(zip(names, row, strict=True)) for row in rows.fetchall()]

    def close(self) -> None:
        self._conn.close()
