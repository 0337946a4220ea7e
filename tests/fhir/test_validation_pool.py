"""Large Bundles are validated in worker processes: the same outcome, in order, as validating
each resource in the calling thread — for resources nobody here wrote (a public Synthea patient
file, ../shared/testdata/synthea) and for refused ones — and a pool that breaks is replaced by
the calling thread without a wrong answer."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from medledger.fhir.validation_pool import POOL_GIVE_UP, ValidationPool, validate_each
from medledger.validation import FhirValidationError, ValidatedResource

SYNTHEA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "synthea"


def synthea_resources(limit: int) -> list[dict[str, Any]]:
    files = sorted(SYNTHEA.glob("*.json")) if SYNTHEA.is_dir() else []
    for path in files:
        bundle = json.loads(path.read_text())
        if bundle.get("type") == "transaction":
            return [entry["resource"] for entry in bundle["entry"]][:limit]
    pytest.skip(f"no Synthea transaction Bundle in {SYNTHEA} (see ../shared/testdata/SOURCES.md)")


REFUSED: list[dict[str, Any]] = [
    {"resourceType": "Observation", "status": "final"},  # code is 1..1
    {"resourceType": "Observation", "status": "maybe", "code": {"text": "x"}},
    {"resourceType": "NoSuchType"},
    {"resourceType": "Patient", "gender": "female", "birthDate": "not a date"},
]


def same(left: list[Any], right: list[Any]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert type(a) is type(b)
        if isinstance(a, ValidatedResource):
            assert a == b
        else:
            assert isinstance(a, FhirValidationError) and isinstance(b, FhirValidationError)
            assert (a.message, a.problems) == (b.message, b.problems)


def test_the_pool_answers_as_the_calling_thread_does() -> None:
    resources = synthea_resources(120)
    mixed = resources[:40] + REFUSED + resources[40:]
    pool = ValidationPool(workers=2, min_resources=8)
    try:
        outcomes = pool.validate_many(mixed)
        assert pool._pool is not None  # the workers answered
    finally:
        pool.close()
    same(outcomes, validate_each(mixed))
    assert [isinstance(o, FhirValidationError) for o in outcomes].count(True) == len(REFUSED)
    assert pool.fallbacks == 0


def test_a_small_bundle_is_validated_in_the_calling_thread() -> None:
    pool = ValidationPool(workers=2, min_resources=32)
    outcomes = pool.validate_many(REFUSED)
    assert pool._pool is None
    same(outcomes, validate_each(REFUSED))


def test_a_broken_pool_falls_back_to_the_calling_thread_and_is_replaced() -> None:
    resources = synthea_resources(40)
    pool = ValidationPool(workers=2, min_resources=8)
    try:
        pool.validate_many(resources)  # the workers are up
        executor = pool._pool
        assert executor is not None
        worker = next(iter(executor._processes.values()))  # type: ignore[union-attr]
        os.kill(worker.pid, signal.SIGKILL)  # as the kernel's OOM killer would
        worker.join()
        deadline = time.monotonic() + 30
        while not executor._broken and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)  # the executor notices its worker's death in its own thread
        same(pool.validate_many(resources), validate_each(resources))
        assert pool.fallbacks == 1 and pool._pool is None
        # The next large Bundle gets a new pool.
        same(pool.validate_many(resources), validate_each(resources))
        assert pool._pool is not None and pool._pool is not executor
    finally:
        pool.close()


def test_pools_that_keep_failing_are_given_up_for_the_calling_thread() -> None:
    # Not JSON, and no worker can be sent it: every pool fails, every answer is still given.
    odd = [{"resourceType": "Observation", "note": lambda: None} for _ in range(8)]
    pool = ValidationPool(workers=1, min_resources=4)
    try:
        for _ in range(POOL_GIVE_UP):
            same(pool.validate_many(odd), validate_each(odd))
        assert pool.fallbacks == POOL_GIVE_UP and pool._pool is None
        same(pool.validate_many(odd), validate_each(odd))
        assert pool.fallbacks == POOL_GIVE_UP and pool._pool is None  # no pool tried again
    finally:
        pool.close()
