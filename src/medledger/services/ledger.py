"""The ledger as the node's own services see it: the SDK's `LedgerClient` with every query of
committed state answered in-process and every commit learned from the application.

What still crosses CometBFT's RPC is what only CometBFT can do: admitting a transaction to the
mempool (`broadcast_tx_sync`, which runs CheckTx and gossips it), and the signed headers and
validator sets that proofs are checked against. Each such call is counted in the node's metrics
(`medledger_services_rpc_calls`), so that a query of the node's own state through the RPC would
show."""

from __future__ import annotations

from typing import Any

from medledger.abci import queries
from medledger.client.sdk import ClientError, LedgerClient, QueryError, TxOutcome
from medledger.ledger.errors import LedgerError
from medledger.metrics import Metrics
from medledger.services.commits import CommitNotices
from medledger.store.sqlite import CommittedView


class NodeLedger(LedgerClient):
    def __init__(
        self,
        view: CommittedView,
        notices: CommitNotices,
        rpc_url: str,
        chain_id: str,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(rpc_url, chain_id)
        self.view = view
        self.notices = notices
        self.metrics = metrics

    # --- what still goes to CometBFT -----------------------------------------------------

    def rpc(self, method: str, **params: Any) -> Any:
        self._count(method)
        return super().rpc(method, **params)

    def rpc_post(self, method: str, **params: Any) -> Any:
        self._count(method)
        return super().rpc_post(method, **params)

    def _count(self, method: str) -> None:
        if self.metrics is not None:
            self.metrics.services_rpc_calls.labels(method).inc()

    # --- committed state, in-process -----------------------------------------------------

    def height(self) -> int:
        return self.view.height()

    def query_raw(self, path: str, data: bytes = b"", prove: bool = False) -> tuple[int, bytes]:
        """Answered from a snapshot of committed state; an answer that carries a proof (for a
        client to check against a signed header) needs the store's state tree and goes through
        the RPC like any client's."""
        if prove or path not in queries.QUERIES:
            return super().query_raw(path, data, prove)
        if self.metrics is not None:  # answered in-process, found or not
            self.metrics.services_queries.labels(path).inc()
        with self.view.snapshot() as reads:
            try:
                value = queries.answer_from(reads, path, data)
            except LedgerError as err:
                raise QueryError(int(err.code), err.message) from None
            height = reads.committed()[0]
        return height, value

    # --- commits, from the application ---------------------------------------------------

    def tx_status(self, tx_hash: str) -> TxOutcome | None:
        committed = self.notices.result(tx_hash)
        if committed is None:
            # Committed before this process started (or long ago): CometBFT's index knows.
            return super().tx_status(tx_hash)
        return TxOutcome(tx_hash, committed.height, committed.code, committed.log)

    def wait_for(self, tx_hash: str, timeout: float = 30.0) -> TxOutcome:
        committed = self.notices.wait(tx_hash, timeout)
        if committed is None:
            raise ClientError(f"transaction {tx_hash[:16]} not committed within {timeout}s")
        return TxOutcome(tx_hash, committed.height, committed.code, committed.log)
