"""The ABCI snapshot connection: offering this node's snapshots, and restoring a joining node
from a peer's (see `medledger.store.snapshots` for the format and what is verified)."""

from __future__ import annotations

import hashlib
import logging

import msgspec
from tendermint.abci import types_pb2 as abci

from medledger.ledger.app import app_hash_of
from medledger.store.snapshots import (
    FORMAT,
    MAX_CHUNKS,
    Metadata,
    SnapshotError,
    SnapshotStore,
    decode_chunk,
)
from medledger.store.sqlite import Restore, RestoreError, SqliteStore

log = logging.getLogger("medledger.statesync")

Offer = abci.ResponseOfferSnapshot
Apply = abci.ResponseApplySnapshotChunk


class StateSync:
    def __init__(self, store: SqliteStore, snapshots: SnapshotStore | None) -> None:
        self.store = store
        self.snapshots = snapshots
        self._restore: Restore | None = None
        self._metadata: Metadata | None = None
        self._trusted_app_hash = b""
        self._height = 0
        self._applied = 0
        self.restored_height = 0

    def list_snapshots(self) -> abci.ResponseListSnapshots:
        if self.snapshots is None:
            return abci.ResponseListSnapshots()
        return abci.ResponseListSnapshots(
            snapshots=[
                abci.Snapshot(
                    height=s.height,
                    format=s.format,
                    chunks=s.chunks,
                    hash=s.hash,
                    metadata=s.metadata,
                )
                for s in self.snapshots.list()
            ]
        )

    def load_snapshot_chunk(
        self, req: abci.RequestLoadSnapshotChunk
    ) -> abci.ResponseLoadSnapshotChunk:
        if self.snapshots is None:
            return abci.ResponseLoadSnapshotChunk()
        return abci.ResponseLoadSnapshotChunk(
            chunk=self.snapshots.chunk(int(req.height), int(req.format), int(req.chunk))
        )

    def offer_snapshot(self, req: abci.RequestOfferSnapshot) -> abci.ResponseOfferSnapshot:
        snapshot = req.snapshot
        if snapshot.format != FORMAT:
            return Offer(result=Offer.REJECT_FORMAT)
        try:
            metadata = msgspec.msgpack.decode(snapshot.metadata, type=Metadata)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("snapshot refused: unreadable metadata", extra={"height": snapshot.height})
            return Offer(result=Offer.REJECT)
        if (
            hashlib.sha256(snapshot.metadata).digest() != snapshot.hash
            or len(metadata.chunk_hashes) != snapshot.chunks
            or not 0 < snapshot.chunks <= MAX_CHUNKS
            or metadata.app_hash != req.app_hash
        ):
            log.warning(
                "snapshot refused: metadata does not match", extra={"height": snapshot.height}
            )
            return Offer(result=Offer.REJECT)
        self._abort()
        try:
            self._restore = Restore(self.store)
        except RestoreError as exc:
            log.warning("snapshot refused", extra={"reason": str(exc)})
            return Offer(result=Offer.ABORT)
        self._metadata = metadata
        self._trusted_app_hash = bytes(req.app_hash)
        self._height = int(snapshot.height)
        self._applied = 0
        log.info("restoring snapshot", extra={"height": snapshot.height, "chunks": snapshot.chunks})
        return Offer(result=Offer.ACCEPT)

    def apply_snapshot_chunk(
        self, req: abci.RequestApplySnapshotChunk
    ) -> abci.ResponseApplySnapshotChunk:
        restore, metadata = self._restore, self._metadata
        if restore is None or metadata is None:
            return Apply(result=Apply.ABORT)
        index = int(req.index)
        if index != self._applied:
            # CometBFT applies chunks in order; anything else is a retry of a refused one.
            return Apply(result=Apply.RETRY, refetch_chunks=[self._applied])
        if hashlib.sha256(req.chunk).digest() != metadata.chunk_hashes[index]:
            log.warning("chunk refused: digest", extra={"index": index, "sender": req.sender})
            return Apply(result=Apply.RETRY, refetch_chunks=[index], reject_senders=[req.sender])
        try:
            restore.add(decode_chunk(req.chunk))
        except (
            SnapshotError,
            RestoreError,
            msgspec.DecodeError,
            msgspec.ValidationError,
            ValueError,
        ) as exc:
            # The chunk matched the metadata: the snapshot itself is bad.
            log.warning("snapshot refused", extra={"reason": str(exc), "sender": req.sender})
            self._abort()
            return Apply(result=Apply.REJECT_SNAPSHOT, reject_senders=[req.sender])
        self._applied += 1
        if self._applied < len(metadata.chunk_hashes):
            return Apply(result=Apply.ACCEPT)
        return self._finish(req.sender)

    def _finish(self, sender: str) -> abci.ResponseApplySnapshotChunk:
        restore = self._restore
        assert restore is not None
        try:
            state_root, audit_root, size = restore.finish()
        except RestoreError as exc:
            log.warning("snapshot refused", extra={"reason": str(exc)})
            self._abort()
            return Apply(result=Apply.REJECT_SNAPSHOT, reject_senders=[sender])
        computed = app_hash_of(state_root, audit_root, size)
        meta = restore.meta
        assert meta is not None
        if computed != self._trusted_app_hash or meta[0] != self._height or meta[1] != computed:
            log.warning(
                "snapshot refused: its state does not hash to the trusted app hash",
                extra={"height": self._height},
            )
            self._abort()
            return Apply(result=Apply.REJECT_SNAPSHOT, reject_senders=[sender])
        restore.commit()
        self._restore = None
        self.restored_height = self._height
        log.info("state restored from snapshot", extra={"height": self._height})
        return Apply(result=Apply.ACCEPT)

    def _abort(self) -> None:
        if self._restore is not None:
            self._restore.abort()
        self._restore = None
        self._metadata = None
