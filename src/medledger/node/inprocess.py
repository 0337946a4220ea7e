"""An in-process driver: feeds the ledger ordered blocks the way CometBFT would, without
processes or sockets, so healthcare logic and determinism are tested fast."""

from __future__ import annotations

from pathlib import Path

from medledger.ledger.app import BlockOutcome, Ledger
from medledger.store.sqlite import SqliteStore

SECOND_NS = 1_000_000_000


class InProcessChain:
    def __init__(
        self,
        path: Path,
        chain_id: str,
        app_state: bytes,
        genesis_time_ns: int = 1_767_225_600 * SECOND_NS,
        block_interval_ns: int = SECOND_NS,
    ) -> None:
        self.store = SqliteStore(path)
        self.ledger = Ledger(self.store)
        self.time_ns = genesis_time_ns
        self.block_interval_ns = block_interval_ns
        self.blocks: list[list[bytes]] = []
        if self.ledger.height == 0 and not self.ledger.app_hash:
            self.ledger.init_chain(chain_id, genesis_time_ns, app_state)

    def run_block(self, txs: list[bytes]) -> BlockOutcome:
        """Finalize and commit one block holding `txs`, in order."""
        self.time_ns += self.block_interval_ns
        outcome = self.ledger.finalize_block(self.ledger.height + 1, self.time_ns, txs)
        self.ledger.commit()
        self.blocks.append(list(txs))
        return outcome

    def close(self) -> None:
        self.store.close()
