"""What CheckTx admits to the mempool beyond validity: a bounded share per sender.

A signed transaction whose nonce is ahead of the committed one passes CheckTx (earlier ones may
still be on their way), so without bounds one member could fill blocks with transactions that
can never execute — each refused at no cost, each kept in the audit log forever. CheckTx
therefore admits nonces at most `MAX_NONCE_AHEAD` past the committed one, one transaction per
pending nonce, at most `MAX_PENDING_PER_SENDER` per sender, and drops at recheck a transaction
that has waited `MAX_PENDING_BLOCKS` blocks for its predecessor. Proposals also leave out what
cannot execute (`Ledger.select_for_proposal`), so such transactions never reach a block.

None of this is consensus state: it is each node's view of its own mempool, rebuilt after every
block from CometBFT's rechecks of the transactions that are still pending.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_NONCE_AHEAD = 256
MAX_PENDING_PER_SENDER = 256
MAX_PENDING_BLOCKS = 600


@dataclass(frozen=True)
class Pending:
    sender: str
    nonce: int
    since_height: int


class MempoolGuard:
    def __init__(
        self,
        per_sender: int = MAX_PENDING_PER_SENDER,
        max_pending_blocks: int = MAX_PENDING_BLOCKS,
    ) -> None:
        self.per_sender = per_sender
        self.max_pending_blocks = max_pending_blocks
        self._pending: dict[bytes, Pending] = {}
        self._previous: dict[bytes, Pending] = {}
        self._by_sender: dict[str, dict[int, bytes]] = {}

    def admit(
        self, tx_hash: bytes, sender: str, nonce: int, height: int, *, recheck: bool
    ) -> str | None:
        """Admit a transaction that passed every check; returns why not, or None."""
        known = self._pending.get(tx_hash)
        if known is not None:
            return None
        since = height
        if recheck and tx_hash in self._previous:
            since = self._previous[tx_hash].since_height
            if height - since >= self.max_pending_blocks:
                return (
                    f"nonce {nonce} waited {height - since} blocks for the transactions before"
                    " it; dropped from the mempool"
                )
        nonces = self._by_sender.setdefault(sender, {})
        if nonce in nonces:
            return f"nonce {nonce} of {sender} is already pending in another transaction"
        if len(nonces) >= self.per_sender:
            return f"{sender} has {len(nonces)} transactions pending; wait for a block"
        nonces[nonce] = tx_hash
        self._pending[tx_hash] = Pending(sender, nonce, since)
        return None

    def block_committed(self) -> None:
        """After a block, CometBFT rechecks every transaction still in its mempool: start
        counting again from those rechecks, remembering how long each has waited."""
        self._previous = self._pending
        self._pending = {}
        self._by_sender = {}
