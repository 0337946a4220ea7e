"""The SQLite store at scale: a block's bucket listings come from one covering index, and a
store written by an earlier version (without it) is brought up to date on open."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conftest import CHAIN_ID, Consortium, genesis_app_state, keys_for

from medledger.ledger import statetree
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.node.inprocess import InProcessChain
from medledger.store.sqlite import SqliteStore, bucket_listing_sql


def enrolled_chain(path: Path, blocks: int = 2, members: int = 8) -> Consortium:
    c = Consortium(InProcessChain(path, CHAIN_ID, genesis_app_state()))
    for block in range(blocks):
        txs = []
        for i in range(members):
            keys = keys_for(f"listing-{block}-{i}")
            body = EnrollMember(keys.verify_key, keys.encryption_key, Role.PATIENT)
            txs.append(c.tx(c.admin("st-mary"), "member.enroll", body))
        c.run(*txs)
    return c


def indexes(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'kv'"
        )
        return {name for (name,) in rows}


def test_a_blocks_bucket_listings_are_read_from_the_covering_index_alone(tmp_path: Path) -> None:
    c = enrolled_chain(tmp_path / "a.db")
    path = c.chain.store.path
    with sqlite3.connect(path) as conn:
        plan = " ".join(
            str(row[-1])
            for row in conn.execute("EXPLAIN QUERY PLAN " + bucket_listing_sql(3), (1, 2, 3))
        )
    # Any lookup in kv itself per listed key would be a random read per key at every block.
    assert "COVERING INDEX kv_bucket_listing" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # already in (bucket, key) order


def test_a_store_with_the_old_index_is_migrated_on_open_and_keeps_its_state(tmp_path: Path) -> None:
    c = enrolled_chain(tmp_path / "a.db")
    store = c.chain.store
    path, root = store.path, store.state_root()
    member = keys_for("listing-1-3").member_id
    key = next(k for k, _ in store.scan(b"member/") if member.encode() in k)
    c.chain.close()
    with sqlite3.connect(path) as conn:  # as an earlier version left it
        conn.execute("DROP INDEX kv_bucket_listing")
        conn.execute("CREATE INDEX kv_bucket ON kv (bucket, key)")
    assert indexes(path) == {"kv_bucket"}
    reopened = SqliteStore(path)
    try:
        assert indexes(path) == {"kv_bucket_listing"}
        assert reopened.state_root() == root
        proof = reopened.state_proof(key)
        assert statetree.verify_state_proof(root, proof, reopened.depth)
    finally:
        reopened.close()
