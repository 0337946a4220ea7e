"""The organization's patient index: its own identifiers (an MRN, say) to ledger patient ids.

Identifiers are PHI and stay on the node that assigned them, never on the chain. HL7 v2
messages, FHIR clients and bulk imports name patients by identifier; the index resolves them.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class PatientIndex:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS identifiers (system TEXT NOT NULL, value TEXT NOT NULL,"
            " patient TEXT NOT NULL, PRIMARY KEY (system, value))"
        )
        self._conn.execute("CREATE INDEX IF NOT EXISTS by_patient ON identifiers (patient)")

    def resolve(self, system: str, value: str) -> str | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT patient FROM identifiers WHERE system = ? AND value = ?", (system, value)
            ).fetchone()
        return None if row is None else str(row[0])

    def resolve_any(self, value: str) -> str | None:
        """A bare identifier value (HL7 v2 PID-3 often has no assigning authority)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT DISTINCT patient FROM identifiers WHERE value = ?", (value,)
            ).fetchall()
        return str(rows[0][0]) if len(rows) == 1 else None

    def link(self, system: str, value: str, patient: str) -> None:
        with self._lock:
            existing = self._conn.execute(
                "SELECT patient FROM identifiers WHERE system = ? AND value = ?", (system, value)
            ).fetchone()
            if existing is not None and existing[0] != patient:
                raise ValueError(f"identifier {system}|{value} already names another patient")
            self._conn.execute(
                "INSERT OR IGNORE INTO identifiers (system, value, patient) VALUES (?, ?, ?)",
                (system, value, patient),
            )

    def reassign(self, system: str, value: str, patient: str) -> str | None:
        """Link an identifier to `patient` whichever patient it named before (a merge: HL7
        ADT^A40); the patient it named before, if any."""
        with self._lock:
            existing = self._conn.execute(
                "SELECT patient FROM identifiers WHERE system = ? AND value = ?", (system, value)
            ).fetchone()
            self._conn.execute(
                "INSERT INTO identifiers (system, value, patient) VALUES (?, ?, ?)"
                " ON CONFLICT (system, value) DO UPDATE SET patient = excluded.patient",
                (system, value, patient),
            )
        return None if existing is None else str(existing[0])

    def identifiers_of(self, patient: str) -> list[tuple[str, str]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT system, value FROM identifiers WHERE patient = ? ORDER BY system, value",
                (patient,),
            ).fetchall()
        return [(str(s), str(v)) for s, v in rows]

    def close(self) -> None:
        self._conn.close()
