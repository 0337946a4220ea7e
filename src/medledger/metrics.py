"""Prometheus metrics of one node, in a registry of its own."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ResultLike(Protocol):
    @property
    def code(self) -> int: ...
    @property
    def type(self) -> str: ...


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.height = Gauge(
            "medledger_height", "Last committed block height", registry=self.registry
        )
        self.txs = Counter(
            "medledger_transactions",
            "Transactions executed in committed blocks, by type and result code",
            ["type", "code"],
            registry=self.registry,
        )
        self.checks = Counter(
            "medledger_check_tx",
            "CheckTx answers, by result code",
            ["code"],
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "medledger_block_commit_seconds",
            "Time from FinalizeBlock start to the end of Commit",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.mempool = Gauge(
            "medledger_mempool_transactions",
            "Transactions waiting in CometBFT's mempool",
            registry=self.registry,
        )
        self.services_rpc_calls = Counter(
            "medledger_services_rpc_calls",
            "CometBFT RPC calls made by the node's own services (FHIR, HL7, portal), by method:"
            " broadcast_tx_sync to submit, commit/validators for proofs; never queries of the"
            " node's own state",
            ["method"],
            registry=self.registry,
        )
        self.services_queries = Counter(
            "medledger_services_queries",
            "Ledger queries the node's services answered in-process from committed state",
            ["path"],
            registry=self.registry,
        )
        self.peers = Gauge("medledger_peers", "Connected CometBFT peers", registry=self.registry)
        self.packages_missing = Gauge(
            "medledger_packages_missing",
            "Packages of committed records this node has not yet received (replication lag)",
            registry=self.registry,
        )
        self.packages_fetched = Gauge(
            "medledger_packages_fetched",
            "Packages fetched from peers since start",
            registry=self.registry,
        )

        self.package_fetch_failures = Gauge(
            "medledger_package_fetch_failures",
            "Failed attempts to fetch a package from a peer since start",
            registry=self.registry,
        )
        self.packages_retrying = Gauge(
            "medledger_packages_retrying",
            "Missing packages that no peer has served yet after at least one attempt",
            registry=self.registry,
        )
        self.uploads_pending = Gauge(
            "medledger_uploads_pending",
            "Uploaded packages that no committed record names yet",
            registry=self.registry,
        )
        self.uploads_pending_bytes = Gauge(
            "medledger_uploads_pending_bytes",
            "Bytes of uploaded packages that no committed record names yet",
            registry=self.registry,
        )
        self.uploads_expired = Gauge(
            "medledger_uploads_expired",
            "Uploaded packages deleted since start because no record named them in time",
            registry=self.registry,
        )
        self.task_up = Gauge(
            "medledger_task_up",
            "1 while the background task runs, 0 while it waits to be restarted",
            ["task"],
            registry=self.registry,
        )
        self.task_restarts = Counter(
            "medledger_task_restarts",
            "Times a background task crashed and was restarted",
            ["task"],
            registry=self.registry,
        )

        self.hl7_connections = Gauge(
            "medledger_hl7_connections",
            "MLLP connections since start, by what became of them (accepted, over_capacity,"
            " address_refused, idle_closed, oversize, failed)",
            ["event"],
            registry=self.registry,
        )
        # Read at every scrape: counts kept by components that know nothing of Prometheus.
        self.collectors: list[Callable[[], None]] = []
        # The labelled children counted once per transaction, looked up once per label value:
        # `labels()` takes a lock and builds a key on every call, a few percent of an
        # application's CPU at a thousand transactions a second.
        self._check_children: dict[int, Counter] = {}
        self._tx_children: dict[tuple[str, int], Counter] = {}

    def task_state(self, name: str, alive: bool, restarted: bool) -> None:
        self.task_up.labels(task=name).set(1 if alive else 0)
        counter = self.task_restarts.labels(task=name)
        if restarted:
            counter.inc()

    def check_tx(self, result: ResultLike) -> None:
        code = int(result.code)
        child = self._check_children.get(code)
        if child is None:
            child = self._check_children[code] = self.checks.labels(code=str(code))
        child.inc()

    def block_committed(self, height: int, seconds: float) -> None:
        self.height.set(height)
        self.commit_seconds.observe(seconds)

    def tx_results(self, results: Iterable[ResultLike]) -> None:
        """Count a block's results: one increment per (type, code), not per transaction."""
        tally = Tally((result.type or "invalid", int(result.code)) for result in results)
        for label, count in tally.items():
            child = self._tx_children.get(label)
            if child is None:
                kind, code = label
                child = self._tx_children[label] = self.txs.labels(type=kind, code=str(code))
            child.inc(count)

    def hl7_listener(self, counts: dict[str, int]) -> None:
        for event, count in counts.items():
            self.hl7_connections.labels(event=event).set(count)

    def render(self) -> bytes:
        for collect in self.collectors:
            collect()
        return generate_latest(self.registry)
