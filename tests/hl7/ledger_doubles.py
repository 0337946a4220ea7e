"""Stand-ins for the ledger behind the HL7 processor (the processor itself is always the real
one): records by id with their content, and patients enrolled with their Patient records."""

from __future__ import annotations

import hashlib
from typing import Any

from medledger.client.sdk import TxRejected
from medledger.hl7.ingest import StoredRecord
from medledger.ledger.records import PutRecord
from medledger.validation import validate_resource


class FakeLedger:
    """Records by id, with content; commits are all or nothing."""

    def __init__(self) -> None:
        self.records: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self.sealed: list[PutRecord] = []
        self.commits: list[list[PutRecord]] = []
        self.refuse: str | None = None
        self._pending: dict[str, tuple[str, dict[str, Any]]] = {}

    def stored(self, record_id: str) -> StoredRecord | None:
        versions = self.records.get(record_id)
        if not versions:
            return None
        return StoredRecord(versions[-1][0], len(versions), False)

    def content(self, record_id: str) -> dict[str, Any] | None:
        versions = self.records.get(record_id)
        return versions[-1][1] if versions else None

    def seal(
        self, resource: dict[str, Any], patient: str, record_id: str, previous: int
    ) -> PutRecord:
        body = PutRecord(
            record_id, patient, resource["resourceType"], "lab", "0" * 64, 1, b"0" * 32, 2, (),
            previous=previous,
        )  # fmt: skip
        self.sealed.append(body)
        self._pending[record_id] = (patient, resource)
        return body

    def commit(self, records: list[PutRecord]) -> str:
        if self.refuse is not None:
            raise TxRejected(12, self.refuse, "ab" * 32)
        for body in records:
            assert len(self.records.get(body.record_id, [])) == body.previous
            self.records.setdefault(body.record_id, []).append(self._pending[body.record_id])
        self.commits.append(records)
        return "cd" * 32


class FakeRegistry:
    """Patients enrolled in order, each with the versions of its Patient record."""

    def __init__(self) -> None:
        self.patients: dict[str, list[dict[str, Any]]] = {}

    def register(self, resource: dict[str, Any]) -> str:
        patient = "p" + hashlib.sha256(str(len(self.patients)).encode()).hexdigest()[:39]
        stored = {**resource, "id": patient}
        validate_resource(stored)
        self.patients[patient] = [stored]
        return patient

    def update(self, patient: str, resource: dict[str, Any]) -> bool:
        versions = self.patients[patient]
        if versions[-1] == resource:
            return False
        validate_resource(resource)
        versions.append(resource)
        return True
