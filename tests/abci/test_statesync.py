"""State sync in-process: a snapshot taken on one replica restores an empty one to the same
app hash, and the two go on agreeing; a snapshot from a lying peer is refused and leaves the
joiner empty."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import pytest
from conftest import CHAIN_ID, Consortium, genesis_app_state, keys_for
from tendermint.abci import types_pb2 as abci

from medledger.abci.application import LedgerApplication
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.node.inprocess import InProcessChain
from medledger.store import snapshots as snapshot_module
from medledger.store.snapshots import (
    Metadata,
    Snapshot,
    SnapshotSettings,
    SnapshotStore,
    decode_chunk,
    encode_chunk,
)
from medledger.store.sqlite import SqliteStore

Offer = abci.ResponseOfferSnapshot
Apply = abci.ResponseApplySnapshotChunk


def busy_chain(path: Path, members: int = 30) -> Consortium:
    c = Consortium(InProcessChain(path, CHAIN_ID, genesis_app_state()))
    for block in range(3):
        txs = []
        for i in range(members // 3):
            keys = keys_for(f"member-{block}-{i}")
            body = EnrollMember(keys.verify_key, keys.encryption_key, Role.PATIENT)
            txs.append(c.tx(c.admin("st-mary"), "member.enroll", body))
        c.run(*txs)
    return c


def offer(app: LedgerApplication, snapshot: Snapshot, app_hash: bytes) -> int:
    proto = abci.Snapshot(
        height=snapshot.height,
        format=snapshot.format,
        chunks=snapshot.chunks,
        hash=snapshot.hash,
        metadata=snapshot.metadata,
    )
    request = abci.RequestOfferSnapshot(snapshot=proto, app_hash=app_hash)
    return int(app.offer_snapshot(request).result)


def chunks_of(store: SnapshotStore, snapshot: Snapshot) -> list[bytes]:
    return [store.chunk(snapshot.height, snapshot.format, i) for i in range(snapshot.chunks)]


@pytest.fixture
def source(tmp_path: Path) -> tuple[Consortium, SnapshotStore, Snapshot]:
    c = busy_chain(tmp_path / "a.db")
    store = SnapshotStore(tmp_path / "snapshots-a", SnapshotSettings(interval=1, keep=2))
    return c, store, store.take(c.chain.store.path)


def test_a_snapshot_restores_an_empty_node_to_the_same_app_hash(
    tmp_path: Path,
    source: tuple[Consortium, SnapshotStore, Snapshot],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c, store, snapshot = source
    assert snapshot.height == c.chain.ledger.height
    joiner_store = SqliteStore(tmp_path / "b.db")
    restored: list[int] = []
    joiner = LedgerApplication(joiner_store, on_restore=restored.append)
    assert offer(joiner, snapshot, c.chain.ledger.app_hash) == Offer.ACCEPT
    for index, chunk in enumerate(chunks_of(store, snapshot)):
        request = abci.RequestApplySnapshotChunk(index=index, chunk=chunk, sender="peer-a")
        assert joiner.apply_snapshot_chunk(request).result == Apply.ACCEPT
    assert restored == [snapshot.height]
    info = joiner.info(abci.RequestInfo())
    assert info.last_block_height == snapshot.height
    assert info.last_block_app_hash == c.chain.ledger.app_hash
    assert joiner_store.state_root() == c.chain.store.state_root()
    assert joiner_store.audit_log().root() == c.chain.store.audit_log().root()

    # The two replicas go on agreeing, block after block.
    keys = keys_for("after-sync")
    tx = c.tx(
        c.admin("riverside"),
        "member.enroll",
        EnrollMember(keys.verify_key, keys.encryption_key, Role.CLINICIAN),
    )
    outcome = c.run(tx)
    time_ns = c.chain.time_ns
    joined = joiner.ledger.finalize_block(snapshot.height + 1, time_ns, [tx])
    joiner.ledger.commit()
    assert joined.app_hash == outcome.app_hash
    joiner_store.close()


def test_snapshots_of_equal_states_are_byte_identical(tmp_path: Path) -> None:
    a = busy_chain(tmp_path / "a.db")
    b = busy_chain(tmp_path / "b.db")
    first = SnapshotStore(tmp_path / "sa", SnapshotSettings()).take(a.chain.store.path)
    second = SnapshotStore(tmp_path / "sb", SnapshotSettings()).take(b.chain.store.path)
    assert first.hash == second.hash and first.metadata == second.metadata


def test_chunks_split_a_large_state_and_old_snapshots_are_pruned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshot_module, "CHUNK_BYTES", 2048)
    c = busy_chain(tmp_path / "a.db", members=60)
    store = SnapshotStore(tmp_path / "s", SnapshotSettings(interval=1, keep=2))
    taken = [store.take(c.chain.store.path)]
    assert taken[0].chunks > 3
    for _ in range(2):
        c.run()
        taken.append(store.take(c.chain.store.path))
    assert [s.height for s in store.list()] == [s.height for s in taken[1:]]
    joiner_store = SqliteStore(tmp_path / "b.db")
    joiner = LedgerApplication(joiner_store)
    last = taken[-1]
    assert offer(joiner, last, c.chain.ledger.app_hash) == Offer.ACCEPT
    results = [
        joiner.apply_snapshot_chunk(abci.RequestApplySnapshotChunk(index=i, chunk=chunk)).result
        for i, chunk in enumerate(chunks_of(store, last))
    ]
    assert results == [Apply.ACCEPT] * last.chunks
    assert joiner.ledger.app_hash == c.chain.ledger.app_hash
    joiner_store.close()


def test_a_chunk_that_does_not_match_the_metadata_is_fetched_again_from_another_peer(
    tmp_path: Path, source: tuple[Consortium, SnapshotStore, Snapshot]
) -> None:
    c, store, snapshot = source
    joiner = LedgerApplication(SqliteStore(tmp_path / "b.db"))
    assert offer(joiner, snapshot, c.chain.ledger.app_hash) == Offer.ACCEPT
    chunk = chunks_of(store, snapshot)[0]
    bad = abci.RequestApplySnapshotChunk(index=0, chunk=chunk[:-1] + b"\x00", sender="liar")
    response = joiner.apply_snapshot_chunk(bad)
    assert response.result == Apply.RETRY
    assert list(response.refetch_chunks) == [0] and list(response.reject_senders) == ["liar"]
    assert joiner.ledger.height == 0


def test_a_snapshot_whose_metadata_names_another_app_hash_is_refused(
    tmp_path: Path, source: tuple[Consortium, SnapshotStore, Snapshot]
) -> None:
    _, _, snapshot = source
    joiner = LedgerApplication(SqliteStore(tmp_path / "b.db"))
    assert offer(joiner, snapshot, b"\x01" * 32) == Offer.REJECT
    wrong_format = Snapshot(snapshot.height, 2, snapshot.chunks, snapshot.hash, snapshot.metadata)
    assert offer(joiner, wrong_format, b"\x01" * 32) == Offer.REJECT_FORMAT


def test_a_consistent_but_forged_snapshot_is_refused_whole(
    tmp_path: Path, source: tuple[Consortium, SnapshotStore, Snapshot]
) -> None:
    """A lying peer rewrites a row and recomputes every chunk hash and the metadata: each chunk
    matches, but the state does not hash to the app hash the light client trusts."""
    c, store, snapshot = source
    rows = [row for chunk in chunks_of(store, snapshot) for row in decode_chunk(chunk)]
    forged_rows = [
        ("kv", row[1], row[2] + b"\x00")
        if row[0] == "kv" and row[1].startswith(b"member/")
        else row
        for row in rows
    ]
    chunk = encode_chunk(forged_rows)
    trusted = c.chain.ledger.app_hash
    metadata = msgspec.msgpack.encode(
        Metadata([hashlib.sha256(chunk).digest()], trusted, len(rows))
    )
    forged = Snapshot(snapshot.height, 1, 1, hashlib.sha256(metadata).digest(), metadata)
    joiner_store = SqliteStore(tmp_path / "b.db")
    joiner = LedgerApplication(joiner_store)
    assert offer(joiner, forged, trusted) == Offer.ACCEPT
    response = joiner.apply_snapshot_chunk(
        abci.RequestApplySnapshotChunk(index=0, chunk=chunk, sender="liar")
    )
    assert response.result == Apply.REJECT_SNAPSHOT and list(response.reject_senders) == ["liar"]
    assert joiner_store.committed() == (0, b"", "")
    assert list(joiner_store.scan(b"")) == []
    # The honest snapshot still restores afterwards.
    assert offer(joiner, snapshot, trusted) == Offer.ACCEPT
    for index, good in enumerate(chunks_of(store, snapshot)):
        joiner.apply_snapshot_chunk(abci.RequestApplySnapshotChunk(index=index, chunk=good))
    assert joiner.ledger.app_hash == trusted
    joiner_store.close()


def test_a_node_with_state_of_its_own_takes_no_snapshot(
    tmp_path: Path, source: tuple[Consortium, SnapshotStore, Snapshot]
) -> None:
    c, _, snapshot = source
    other = busy_chain(tmp_path / "other.db")
    app = LedgerApplication(other.chain.store)
    assert offer(app, snapshot, c.chain.ledger.app_hash) == Offer.ABORT


def test_garbage_chunk_requests_are_answered_empty(
    source: tuple[Consortium, SnapshotStore, Snapshot],
) -> None:
    _, store, snapshot = source
    assert store.chunk(snapshot.height, 1, 10_000) == b""
    assert store.chunk(snapshot.height, 7, 0) == b""
    assert store.chunk(-1, 1, 0) == b""
