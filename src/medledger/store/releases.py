"""This node's own log of key-release decisions (not consensus state: each custodian keeps the
record of what it released or refused, beside the on-chain grants that authorized them)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any


class ReleaseLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS releases (id INTEGER PRIMARY KEY, at REAL NOT NULL,"
            " requester TEXT NOT NULL, grant_id TEXT NOT NULL, outcome TEXT NOT NULL,"
            " reason TEXT NOT NULL)"
        )

    def record(self, requester: str, grant_id: str, outcome: str, reason: str) -> None:
        self._conn.execute(
            "INSERT INTO releases (at, requester, grant_id, outcome, reason) VALUES (?,?,?,?,?)",
            (time.time(), requester, grant_id, outcome, reason),
        )

    def entries(self, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT at, requester, grant_id, outcome, reason FROM releases ORDER BY id DESC"
            " LIMIT ?",
            (limit,),
        )
        return [
            {"at": at, "requester": r, "grant": g, "outcome": o, "reason": why}
            for at, r, g, o, why in rows
        ]

    def close(self) -> None:
        self._conn.close()
