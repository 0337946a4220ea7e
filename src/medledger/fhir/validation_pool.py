"""A transaction Bundle's resources validated in worker processes.

Validation (the R4B models: structure, datatypes, then the model's own JSON dump for the
canonical form) is Python that holds the interpreter's lock: with several clients posting
Bundles, it was over half of the time node0's application held the lock, so the node's FHIR
threads, its ABCI connection and its replication waited on it while the machine's other core had
room. A pool of worker processes validates large Bundles beside the node; small ones (a single
resource, a short transaction) are validated in the calling thread, where shipping them would
cost more than it saves.

The answer is the same either way: each resource's `ValidatedResource` or `FhirValidationError`,
in order. A pool that cannot answer (a worker killed, an unexpected error) is dropped and the
resources are validated in the calling thread; the next large Bundle starts a new pool, unless
pools failed POOL_GIVE_UP times in a row.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from medledger.validation import FhirValidationError, ValidatedResource, validate_resource

log = logging.getLogger("medledger.fhir")

Outcome = ValidatedResource | FhirValidationError

POOL_MIN_RESOURCES = 32  # below this, a Bundle is validated in the calling thread
POOL_WORKERS = 2
# After this many pools failed in a row (workers that cannot start, say), the calling thread
# validates everything for the rest of the process's life rather than spawn again per Bundle.
POOL_GIVE_UP = 3


def validate_each(resources: Sequence[Mapping[str, Any]]) -> list[Outcome]:
    """Each resource's validation outcome, in order (also what a worker runs)."""
    outcomes: list[Outcome] = []
    for resource in resources:
        try:
            outcomes.append(validate_resource(resource))
        except FhirValidationError as refusal:
            outcomes.append(refusal)
    return outcomes


class ValidationPool:
    """Worker processes (spawned on first use, `workers` of them) for large Bundles."""

    def __init__(
        self, workers: int = POOL_WORKERS, min_resources: int = POOL_MIN_RESOURCES
    ) -> None:
        self.workers = workers
        self.min_resources = min_resources
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.fallbacks = 0  # times the pool failed and the calling thread validated instead
        self._failed_in_a_row = 0

    def validate_many(self, resources: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        if (
            self.workers < 1
            or len(resources) < self.min_resources
            or self._failed_in_a_row >= POOL_GIVE_UP
        ):
            return validate_each(resources)
        pool = self._executor()
        size = -(-len(resources) // self.workers)
        chunks = [list(resources[i : i + size]) for i in range(0, len(resources), size)]
        try:
            futures: list[Future[list[Outcome]]] = [
                pool.submit(validate_each, chunk) for chunk in chunks
            ]
            outcomes = [outcome for future in futures for outcome in future.result()]
        except Exception as exc:  # a broken pool or an error no resource explains: see above
            self.fallbacks += 1
            self._failed_in_a_row += 1
            log.warning(
                "validation pool failed; validating in the calling thread",
                extra={"reason": type(exc).__name__, "in_a_row": self._failed_in_a_row},
            )
            self._drop(pool)
            return validate_each(resources)
        self._failed_in_a_row = 0
        return outcomes

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn: a fresh interpreter, not a fork of a threaded server.
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(self.workers, mp_context=context)
            return self._pool

    def _drop(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
