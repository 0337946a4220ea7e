"""The ledger application: genesis, blocks in, results and app hash out.

This is the whole state machine CometBFT replicates. It knows nothing of sockets or
protobuf: the ABCI adapter and the in-process driver both call these methods, in the order
CometBFT defines (InitChain once, then FinalizeBlock and Commit per block).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

from medledger.ledger import codec
from medledger.ledger.codec import Envelope
from medledger.ledger.context import BlockContext, BlockEffects
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.execution import (
    AuditEntry,
    CheckCache,
    TxResult,
    check_transaction,
    execute_transaction,
    internal_error,
    order_by_nonce,
)
from medledger.ledger.genesis import apply_genesis, parse_app_state
from medledger.ledger.governance import expire_proposals
from medledger.ledger.mempool import MempoolGuard
from medledger.ledger.model import nonce_key
from medledger.ledger.state import State, StateReader

APP_HASH_DOMAIN = b"medledger/app-hash/v1\x00"


def app_hash_of(state_root: bytes, audit_root: bytes, audit_size: int) -> bytes:
    """The app hash commits to the whole state and to the audit log (its root and size)."""
    return hashlib.sha256(
        APP_HASH_DOMAIN + state_root + audit_root + audit_size.to_bytes(8, "big")
    ).digest()


class LedgerStore(StateReader, Protocol):
    """Durable state under the ledger. A block's writes are staged, then committed at once."""

    def committed(self) -> tuple[int, bytes, str]:
        """(height, app hash, chain id) of the last commit; (0, b"", "") before genesis."""
        ...

    def stage_block(
        self,
        height: int,
        time_ns: int,
        txs: list[bytes],
        results: list[TxResult],
        changes: list[tuple[bytes, bytes | None]],
        audit_leaves: list[bytes],
    ) -> tuple[bytes, bytes, int]:
        """Stage a block's writes without committing; returns (state root, audit root, size)."""
        ...

    def commit_staged(self, height: int, app_hash: bytes, chain_id: str) -> None: ...

    def discard_staged(self) -> None: ...


@dataclass(frozen=True)
class BlockOutcome:
    results: list[TxResult]
    validator_updates: list[tuple[bytes, int]]
    app_hash: bytes
    packages_stored: list[str] = field(default_factory=list)
    packages_erased: list[str] = field(default_factory=list)
    height: int = 0
    # The hash of each transaction, in block order (one per result).
    tx_hashes: list[bytes] = field(default_factory=list)


class Ledger:
    def __init__(self, store: LedgerStore) -> None:
        self.store = store
        self.checks = CheckCache()
        self.mempool = MempoolGuard()
        self._staged: tuple[int, bytes] | None = None
        height, app_hash, chain_id = store.committed()
        self.height = height
        self.app_hash = app_hash
        self.chain_id = chain_id

    def reload_committed(self) -> None:
        """Take the store's committed height and app hash as ours (after a state sync wrote a
        snapshot's state into the store)."""
        self.height, self.app_hash, self.chain_id = self.store.committed()
        self._staged = None

    def init_chain(self, chain_id: str, time_ns: int, app_state: bytes) -> BlockOutcome:
        """Write the genesis state at height 0 and commit it at once. CometBFT calls InitChain
        again if it restarts before the first block, so a repeat starts from scratch."""
        self.store.discard_staged()
        app = parse_app_state(app_state)
        state = State(self.store)
        block = BlockContext(chain_id, 0, time_ns)
        validators = apply_genesis(state, block, app)
        state_root, audit_root, size = self.store.stage_block(
            0, time_ns, [], [], state.changes(), []
        )
        app_hash = app_hash_of(state_root, audit_root, size)
        self.store.commit_staged(0, app_hash, chain_id)
        self.height, self.app_hash, self.chain_id = 0, app_hash, chain_id
        updates = [(v.pub_key, v.power) for v in validators]
        return BlockOutcome([], sorted(updates), app_hash)

    def check_tx(self, raw: bytes, *, recheck: bool = False) -> TxResult:
        """CheckTx: refuse what cannot be valid against committed state, and what would take
        more than the sender's share of the mempool (see `medledger.ledger.mempool`)."""
        tx_hash = codec.tx_hash(raw)
        try:
            checked = check_transaction(
                State(self.store),
                raw,
                self.chain_id,
                tx_hash,
                self.checks,
                exact_nonce=False,
            )
        except LedgerError as err:
            return TxResult(err.code, err.message)
        except Exception as exc:  # CheckTx answers every input; see `internal_error`
            return internal_error(exc)
        envelope = checked.envelope
        refusal = self.mempool.admit(
            tx_hash, envelope.sender, envelope.nonce, self.height, recheck=recheck
        )
        if refusal is not None:
            return TxResult(Code.BAD_NONCE, refusal, envelope.type, envelope.sender)
        return TxResult(Code.OK, "", envelope.type, envelope.sender)

    def select_for_proposal(self, txs: list[bytes], max_bytes: int) -> list[bytes]:
        """PrepareProposal: the mempool's transactions within `max_bytes`, each sender's in
        nonce order, leaving out those that cannot execute for want of a predecessor (a nonce
        gap, or a nonce already used) and those that do not decode. Everything else CheckTx
        (and its recheck after every block) has already checked against committed state."""
        expected: dict[str, int] = {}
        chosen: list[bytes] = []
        budget = max_bytes
        for raw in order_by_nonce(txs, self.envelope_of):
            if len(raw) > budget:
                continue
            try:
                envelope = self.envelope_of(raw)
            except LedgerError:
                continue
            sender = envelope.sender
            if sender not in expected:
                expected[sender] = (self.store_nonce(sender)) + 1
            if envelope.nonce != expected[sender]:
                continue
            expected[sender] += 1
            chosen.append(raw)
            budget -= len(raw)
        return chosen

    def envelope_of(self, raw: bytes) -> Envelope:
        """`codec.decode(raw, Envelope)`, decoded once per transaction (see CheckCache)."""
        return self.checks.envelope(codec.tx_hash(raw), raw)

    def store_nonce(self, member_id: str) -> int:
        """The last nonce `member_id` used, in committed state."""
        return State(self.store).read(nonce_key(member_id), int) or 0

    def finalize_block(self, height: int, time_ns: int, txs: list[bytes]) -> BlockOutcome:
        """FinalizeBlock: execute every transaction in order and stage the block's writes."""
        if height != self.height + 1:
            raise RuntimeError(f"block {height} follows committed height {self.height}")
        self.store.discard_staged()
        block = BlockContext(self.chain_id, height, time_ns)
        state = State(self.store)
        effects = BlockEffects()
        results: list[TxResult] = []
        leaves: list[bytes] = []
        hashes: list[bytes] = []
        for index, raw in enumerate(txs):
            tx_hash = codec.tx_hash(raw)
            result = execute_transaction(state, block, effects, raw, tx_hash, self.checks)
            results.append(result)
            hashes.append(tx_hash)
            leaves.append(
                codec.encode(
                    AuditEntry(
                        height,
                        index,
                        tx_hash,
                        result.type,
                        result.sender,
                        int(result.code),
                        result.log,
                        result.subject,
                    )
                )
            )
        expire_proposals(state, block)
        state_root, audit_root, size = self.store.stage_block(
            height, time_ns, txs, results, state.changes(), leaves
        )
        app_hash = app_hash_of(state_root, audit_root, size)
        self._staged = (height, app_hash)
        return BlockOutcome(
            results,
            effects.sorted_validator_updates(),
            app_hash,
            effects.packages_stored,
            effects.packages_erased,
            height,
            hashes,
        )

    def commit(self) -> int:
        """Commit: make the staged block durable with its height and app hash, atomically."""
        if self._staged is None:
            raise RuntimeError("commit without a finalized block")
        height, app_hash = self._staged
        self.store.commit_staged(height, app_hash, self.chain_id)
        self.height, self.app_hash, self._staged = height, app_hash, None
        self.mempool.block_committed()
        return height
