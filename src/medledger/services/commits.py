"""Commits as the node's own application sees them: who waits for a transaction learns of its
block from the Commit that made it durable, not by polling CometBFT's transaction index."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from medledger.ledger.app import BlockOutcome

# Results of the most recent transactions kept for a waiter that asks after its block
# committed (a block can commit between the mempool's answer and the wait).
RECENT_RESULTS = 50_000


@dataclass(frozen=True)
class CommittedTx:
    tx_hash: str  # upper-case hex, as CometBFT names transactions
    height: int
    code: int
    log: str


class CommitNotices:
    """Committed transaction results, published by the ABCI application after each Commit and
    awaited by the node's services in worker threads."""

    def __init__(self, capacity: int = RECENT_RESULTS) -> None:
        self._capacity = capacity
        self._recent: OrderedDict[str, CommittedTx] = OrderedDict()
        self._changed = threading.Condition()

    def block_committed(self, outcome: BlockOutcome) -> None:
        """Called on the event loop right after Commit: cheap, never blocks on a waiter."""
        with self._changed:
            for tx_hash, result in zip(outcome.tx_hashes, outcome.results, strict=True):
                name = tx_hash.hex().upper()
                self._recent[name] = CommittedTx(name, outcome.height, int(result.code), result.log)
                self._recent.move_to_end(name)
            while len(self._recent) > self._capacity:
                self._recent.popitem(last=False)
            self._changed.notify_all()

    def result(self, tx_hash: str) -> CommittedTx | None:
        with self._changed:
            return self._recent.get(tx_hash.upper())

    def wait(self, tx_hash: str, timeout: float) -> CommittedTx | None:
        """The transaction's committed result, or None if no block held it within `timeout`
        seconds."""
        name = tx_hash.upper()
        with self._changed:
            self._changed.wait_for(lambda: name in self._recent, timeout)
            return self._recent.get(name)
