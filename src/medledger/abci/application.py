"""The ABCI adapter: protobuf requests in, ledger calls, protobuf responses out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from tendermint.abci import types_pb2 as abci
from tendermint.crypto import keys_pb2

from medledger import __version__
from medledger.abci import queries
from medledger.abci.statesync import StateSync
from medledger.ledger.app import BlockOutcome, Ledger
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.execution import TxResult
from medledger.metrics import Metrics
from medledger.store.snapshots import SnapshotStore
from medledger.store.sqlite import SqliteStore

log = logging.getLogger("medledger.app")

APP_VERSION = 1


def _time_ns(ts: object) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)  # type: ignore[attr-defined]


def _events(result: TxResult) -> list[abci.Event]:
    """Indexed attributes let CometBFT's /tx_search find transactions by type and sender."""
    if not result.type:
        return []
    return [
        abci.Event(
            type="medledger",
            attributes=[
                abci.EventAttribute(key="type", value=result.type, index=True),
                abci.EventAttribute(key="sender", value=result.sender, index=True),
            ],
        )
    ]


CommitHook = Callable[[BlockOutcome], None]
RestoreHook = Callable[[int], None]


class LedgerApplication:
    def __init__(
        self,
        store: SqliteStore,
        metrics: Metrics | None = None,
        on_commit: CommitHook | None = None,
        snapshots: SnapshotStore | None = None,
        on_restore: RestoreHook | None = None,
    ) -> None:
        self.store = store
        self.ledger = Ledger(store)
        self.snapshots = snapshots
        self.state_sync = StateSync(store, snapshots)
        # Called after a state sync restored the state at a height: the node then fetches the
        # packages the restored records name.
        self.on_restore = on_restore
        self.metrics = metrics or Metrics()
        # Called after each Commit with the block's outcome: the node then fetches the packages
        # the block's records name and destroys those it erased.
        self.on_commit = on_commit
        self._pending: BlockOutcome | None = None
        self._block_started = 0.0
        self._pending_results: list[TxResult] = []

    def info(self, req: abci.RequestInfo) -> abci.ResponseInfo:
        return abci.ResponseInfo(
            data="medledger",
            version=__version__,
            app_version=APP_VERSION,
            last_block_height=self.ledger.height,
            last_block_app_hash=self.ledger.app_hash,
        )

    def init_chain(self, req: abci.RequestInitChain) -> abci.ResponseInitChain:
        outcome = self.ledger.init_chain(req.chain_id, _time_ns(req.time), req.app_state_bytes)
        genesis_keys = sorted((v.pub_key.ed25519, v.power) for v in req.validators)
        if genesis_keys != outcome.validator_updates:
            raise ValueError("genesis validators differ from the organizations' validators")
        log.info("chain initialized", extra={"chain_id": req.chain_id})
        return abci.ResponseInitChain(app_hash=outcome.app_hash)

    def query(self, req: abci.RequestQuery) -> abci.ResponseQuery:
        try:
            value = queries.answer(self.store, req.path, req.data, req.prove)
        except LedgerError as err:
            return abci.ResponseQuery(
                code=int(err.code), log=err.message, height=self.ledger.height
            )
        except Exception as exc:  # `answer` turns failures into LedgerError; this is the net
            log.exception("query failed")
            return abci.ResponseQuery(
                code=int(Code.INTERNAL),
                log=f"query failed ({type(exc).__name__})",
                height=self.ledger.height,
            )
        return abci.ResponseQuery(code=0, value=value, height=self.ledger.height)

    def check_tx(self, req: abci.RequestCheckTx) -> abci.ResponseCheckTx:
        result = self.ledger.check_tx(req.tx, recheck=req.type == abci.RECHECK)
        self.metrics.check_tx(result)
        return abci.ResponseCheckTx(code=int(result.code), log=result.log)

    def prepare_proposal(self, req: abci.RequestPrepareProposal) -> abci.ResponsePrepareProposal:
        """Propose the mempool's transactions that can execute, within the block's byte
        budget, each sender's in nonce order (see `Ledger.select_for_proposal`)."""
        return abci.ResponsePrepareProposal(
            txs=self.ledger.select_for_proposal(list(req.txs), req.max_tx_bytes)
        )

    def process_proposal(self, req: abci.RequestProcessProposal) -> abci.ResponseProcessProposal:
        # Invalid transactions in a block are recorded with an error result, not rejected
        # here: the proposal is accepted so that every replica executes the same block.
        return abci.ResponseProcessProposal(status=abci.ResponseProcessProposal.ACCEPT)

    def finalize_block(self, req: abci.RequestFinalizeBlock) -> abci.ResponseFinalizeBlock:
        self._block_started = time.perf_counter()
        outcome = self.ledger.finalize_block(req.height, _time_ns(req.time), list(req.txs))
        self._pending_results = outcome.results
        self._pending = outcome
        return abci.ResponseFinalizeBlock(
            tx_results=[
                abci.ExecTxResult(code=int(r.code), log=r.log, events=_events(r))
                for r in outcome.results
            ],
            validator_updates=[
                abci.ValidatorUpdate(pub_key=keys_pb2.PublicKey(ed25519=key), power=power)
                for key, power in outcome.validator_updates
            ],
            app_hash=outcome.app_hash,
        )

    def commit(self, req: abci.RequestCommit) -> abci.ResponseCommit:
        height = self.ledger.commit()
        self.metrics.block_committed(height, time.perf_counter() - self._block_started)
        self.metrics.tx_results(self._pending_results)
        self._pending_results = []
        if self.on_commit is not None and self._pending is not None:
            self.on_commit(self._pending)
        self._pending = None
        if self.snapshots is not None and self.snapshots.due(height):
            try:
                self.snapshots.take_in_background(self.store.path, height)
            except Exception:  # a failed snapshot must not stop consensus
                log.exception("snapshot could not start", extra={"height": height})
        return abci.ResponseCommit()

    # --- state sync (the snapshot connection) --------------------------------------------

    def list_snapshots(self, req: abci.RequestListSnapshots) -> abci.ResponseListSnapshots:
        return self.state_sync.list_snapshots()

    def load_snapshot_chunk(
        self, req: abci.RequestLoadSnapshotChunk
    ) -> abci.ResponseLoadSnapshotChunk:
        return self.state_sync.load_snapshot_chunk(req)

    def offer_snapshot(self, req: abci.RequestOfferSnapshot) -> abci.ResponseOfferSnapshot:
        if self.ledger.height != 0 or self.ledger.app_hash:
            # A node with state of its own does not take someone else's.
            return abci.ResponseOfferSnapshot(result=abci.ResponseOfferSnapshot.ABORT)
        return self.state_sync.offer_snapshot(req)

    def apply_snapshot_chunk(
        self, req: abci.RequestApplySnapshotChunk
    ) -> abci.ResponseApplySnapshotChunk:
        response = self.state_sync.apply_snapshot_chunk(req)
        if self.state_sync.restored_height and self.ledger.height == 0:
            self.ledger.reload_committed()
            self.metrics.height.set(self.ledger.height)
            if self.on_restore is not None:
                self.on_restore(self.ledger.height)
        return response
