"""Tests for the bucketed authenticated state map."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.ledger.statetree import (
    DEFAULT_DEPTH,
    EMPTY_BUCKET,
    BucketTree,
    MemoryStateTree,
    StateProof,
    bucket_leaf,
    bucket_of,
    ordered_bucket_leaf,
    prove,
    value_hash,
    verify_state_proof,
)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def ref_root(leaves: Sequence[bytes]) -> bytes:
    """The complete binary tree over the bucket leaves, SHA-256(0x01 || l || r) per node."""
    level = list(leaves)
    while len(level) > 1:
        level = [sha(b"\x01" + level[i] + level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def ref_leaf(entries: dict[bytes, bytes]) -> bytes:
    if not entries:
        return sha(b"medledger/empty-bucket")
    body = b"".join(len(k).to_bytes(4, "big") + k + sha(v) for k, v in sorted(entries.items()))
    return sha(b"\x00" + body)


def ref_state_root(state: dict[bytes, bytes], depth: int) -> bytes:
    buckets: list[dict[bytes, bytes]] = [{} for _ in range(1 << depth)]
    for k, v in state.items():
        buckets[bucket_of(k, depth)][k] = v
    return ref_root([ref_leaf(b) for b in buckets])


keys = st.binary(min_size=0, max_size=12)
values = st.binary(min_size=0, max_size=20)
states = st.dictionaries(keys, values, max_size=40)


# ---------------------------------------------------------------------------------------------
# Buckets and leaves.


def test_bucket_of_takes_leading_bits() -> None:
    for key in (b"", b"a", b"patient/123", bytes(range(40))):
        digest = sha(key)
        assert bucket_of(key, 0) == 0
        assert bucket_of(key, 8) == digest[0]
        assert bucket_of(key, 16) == int.from_bytes(digest[:2], "big")
        assert bucket_of(key, 3) == digest[0] >> 5
        assert bucket_of(key, 24) == int.from_bytes(digest[:3], "big")
    for bad in (-1, 25, True):
        with pytest.raises(ValueError):
            bucket_of(b"x", bad)


def test_bucket_leaf_encoding() -> None:
    assert sha(b"medledger/empty-bucket") == EMPTY_BUCKET
    assert bucket_leaf([]) == EMPTY_BUCKET
    entries = [(b"zz", sha(b"2")), (b"a", sha(b"1")), (b"", sha(b""))]
    expected = sha(
        b"\x00"
        + b"\x00\x00\x00\x00" + sha(b"")
        + b"\x00\x00\x00\x01a" + sha(b"1")
        + b"\x00\x00\x00\x02zz" + sha(b"2")
    )  # fmt: skip
    assert bucket_leaf(entries) == expected
    assert bucket_leaf(reversed(entries)) == expected
    assert bucket_leaf(iter(sorted(entries))) == expected


def test_bucket_leaf_rejects_bad_entries() -> None:
    with pytest.raises(ValueError):
        bucket_leaf([(b"a", sha(b"1")), (b"a", sha(b"2"))])
    with pytest.raises(ValueError):
        bucket_leaf([(b"a", sha(b"1")), (b"a", sha(b"1"))])
    with pytest.raises(ValueError):
        bucket_leaf([(b"a", b"short")])


# ---------------------------------------------------------------------------------------------
# BucketTree.


def test_empty_tree_roots() -> None:
    for depth in (0, 1, 2, 5, 10):
        tree = BucketTree(depth)
        assert tree.root() == ref_root([EMPTY_BUCKET] * (1 << depth))
    h = EMPTY_BUCKET
    for _ in range(DEFAULT_DEPTH):
        h = sha(b"\x01" + h + h)
    assert BucketTree().depth == DEFAULT_DEPTH
    assert BucketTree().root() == h


def test_batched_updates_match_reference() -> None:
    depth = 6
    tree = BucketTree(depth)
    leaves = [EMPTY_BUCKET] * (1 << depth)
    for step in range(200):
        bucket = (step * 37 + step // 7) % (1 << depth)
        leaf = sha(step.to_bytes(2, "big"))
        tree.set_bucket_leaf(bucket, leaf)
        leaves[bucket] = leaf
        if step % 13 == 0:
            assert tree.root() == ref_root(leaves)
    assert tree.root() == ref_root(leaves)
    assert tree.root() == ref_root(leaves)  # idempotent
    for b in range(1 << depth):
        assert tree.bucket_leaf(b) == leaves[b]


@settings(max_examples=50, deadline=None)
@given(
    st.integers(0, 8),
    st.lists(st.tuples(st.integers(0, 255), st.binary(min_size=32, max_size=32)), max_size=60),
)
def test_tree_root_and_siblings(depth: int, updates: list[tuple[int, bytes]]) -> None:
    tree = BucketTree(depth)
    leaves = [EMPTY_BUCKET] * (1 << depth)
    for bucket, leaf in updates:
        bucket %= 1 << depth
        tree.set_bucket_leaf(bucket, leaf)
        leaves[bucket] = leaf
    root = tree.root()
    assert root == ref_root(leaves)
    for bucket in {b % (1 << depth) for b, _ in updates} | {0, (1 << depth) - 1}:
        siblings = tree.siblings(bucket)
        assert len(siblings) == depth
        h = leaves[bucket]
        for height, sib in enumerate(siblings):
            h = sha(b"\x01" + sib + h) if bucket >> height & 1 else sha(b"\x01" + h + sib)
        assert h == root
    rebuilt = BucketTree.from_leaves_bytes(depth, tree.leaves_bytes())
    assert rebuilt.root() == root
    assert rebuilt.leaves_bytes() == tree.leaves_bytes() == b"".join(leaves)


def test_siblings_flush_pending_updates() -> None:
    tree = BucketTree(4)
    tree.set_bucket_leaf(3, sha(b"x"))
    siblings = tree.siblings(2)
    assert siblings[0] == sha(b"x")


def test_assign_makes_an_independent_equal_tree() -> None:
    working, committed = BucketTree(4), BucketTree(4)
    working.set_bucket_leaf(5, sha(b"a"))
    working.root()
    working.set_bucket_leaf(9, sha(b"pending"))  # set but not yet hashed into the root
    committed.assign(working)
    assert committed.root() == working.root()
    assert committed.siblings(9) == working.siblings(9)
    working.set_bucket_leaf(5, sha(b"b"))
    assert committed.bucket_leaf(5) == sha(b"a")
    assert committed.root() != working.root()
    with pytest.raises(ValueError, match="depth"):
        BucketTree(3).assign(working)


def test_default_depth_rebuild() -> None:
    tree = BucketTree()
    state = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(300)}
    buckets: dict[int, dict[bytes, bytes]] = {}
    for k, v in state.items():
        buckets.setdefault(bucket_of(k, DEFAULT_DEPTH), {})[k] = value_hash(v)
    for b, listing in sorted(buckets.items()):
        tree.set_bucket_leaf(b, bucket_leaf(listing.items()))
    data = tree.leaves_bytes()
    assert len(data) == 32 << DEFAULT_DEPTH
    assert BucketTree.from_leaves_bytes(DEFAULT_DEPTH, data).root() == tree.root()


def test_tree_argument_errors() -> None:
    tree = BucketTree(3)
    for bad in (-1, 8):
        with pytest.raises(ValueError):
            tree.set_bucket_leaf(bad, EMPTY_BUCKET)
        with pytest.raises(ValueError):
            tree.siblings(bad)
    with pytest.raises(ValueError):
        tree.set_bucket_leaf(0, b"short")
    with pytest.raises(ValueError):
        BucketTree.from_leaves_bytes(3, b"\x00" * 32 * 7)
    with pytest.raises(ValueError):
        BucketTree(25)


# ---------------------------------------------------------------------------------------------
# The state map: roots, proofs and tampering.


def build(state: dict[bytes, bytes], order: Sequence[bytes], depth: int) -> MemoryStateTree:
    tree = MemoryStateTree(depth)
    for k in order:
        tree.set(k, state[k])
    return tree


@settings(max_examples=60, deadline=None)
@given(states, st.data(), st.integers(0, 6))
def test_root_independent_of_insertion_order(
    state: dict[bytes, bytes], draw: st.DataObject, depth: int
) -> None:
    order = sorted(state)
    shuffled = draw.draw(st.permutations(order))
    a = build(state, order, depth)
    b = build(state, shuffled, depth)
    assert a.root() == b.root() == ref_state_root(state, depth)


@settings(max_examples=60, deadline=None)
@given(states, keys, values, st.integers(0, 6))
def test_delete_restores_earlier_root(
    state: dict[bytes, bytes], key: bytes, value: bytes, depth: int
) -> None:
    state.pop(key, None)
    tree = build(state, sorted(state), depth)
    before = tree.root()
    tree.set(key, value)
    assert tree.root() == ref_state_root({**state, key: value}, depth)
    assert tree.root() != before
    tree.set(key, value + b"!")
    assert tree.root() != before
    tree.delete(key)
    assert tree.root() == before
    tree.delete(key)  # deleting an absent key changes nothing
    assert tree.root() == before


@settings(max_examples=80, deadline=None)
@given(states, st.lists(keys, max_size=5), st.integers(0, 5))
def test_proofs_verify_for_present_and_absent_keys(
    state: dict[bytes, bytes], probes: list[bytes], depth: int
) -> None:
    tree = build(state, sorted(state), depth)
    root = tree.root()
    for key in [*sorted(state), *probes]:
        proof = tree.prove(key)
        assert proof.value == state.get(key)
        assert verify_state_proof(root, proof, depth)
        assert StateProof.from_json(proof.to_json()) == proof
        assert StateProof.from_json(json.dumps(proof.to_json())) == proof
        assert verify_state_proof(root, StateProof.from_json(proof.to_json()), depth)


def _tampered(proof: StateProof, other_key: bytes) -> list[StateProof]:
    """Variants of a valid proof, each of which claims something the root does not say."""
    out: list[StateProof] = []
    r = dataclasses.replace
    if proof.value is None:
        out.append(r(proof, value=b""))
        out.append(r(proof, value=b"forged"))
    else:
        out.append(r(proof, value=None))
        out.append(r(proof, value=proof.value + b"\x00"))
        out.append(r(proof, value=b"x" + proof.value))
    entries = proof.entries
    for i, (k, vh) in enumerate(entries):
        flipped = bytes([vh[0] ^ 1]) + vh[1:]
        out.append(r(proof, entries=(*entries[:i], (k, flipped), *entries[i + 1 :])))
        out.append(r(proof, entries=entries[:i] + entries[i + 1 :]))
        out.append(r(proof, entries=(*entries[:i], (k + b"\x00", vh), *entries[i + 1 :])))
        out.append(r(proof, entries=(*entries[: i + 1], (k, vh), *entries[i + 1 :])))
    if len(entries) > 1:
        out.append(r(proof, entries=tuple(reversed(entries))))
    out.append(r(proof, entries=(*entries, (b"\xff" * 40, value_hash(b"")))))
    out.append(r(proof, entries=((b"", value_hash(b"")), *entries)))
    sibs = proof.siblings
    for i, s in enumerate(sibs):
        for pos in (0, 31):
            bad = bytearray(s)
            bad[pos] ^= 0x80
            out.append(r(proof, siblings=(*sibs[:i], bytes(bad), *sibs[i + 1 :])))
    if sibs:
        out.append(r(proof, siblings=sibs[:-1]))
        out.append(r(proof, siblings=sibs[1:]))
        out.append(r(proof, siblings=(sibs[-1], *sibs[:-1])))
    out.append(r(proof, siblings=(*sibs, sibs[0] if sibs else EMPTY_BUCKET)))
    if other_key != proof.key:
        out.append(r(proof, key=other_key))
    return [p for p in out if p != proof]


@settings(max_examples=80, deadline=None)
@given(states, keys, keys, st.integers(0, 5))
def test_tampered_proofs_fail(
    state: dict[bytes, bytes], probe: bytes, other: bytes, depth: int
) -> None:
    tree = build(state, sorted(state), depth)
    root = tree.root()
    for key in [*sorted(state)[:6], probe]:
        proof = tree.prove(key)
        assert verify_state_proof(root, proof, depth)
        for bad in _tampered(proof, other):
            # Another key with the same listing and siblings may state a true fact (for example
            # absence, when the subtrees on both sides are empty): it must never state a false one.
            if bad.key != proof.key:
                if verify_state_proof(root, bad, depth):
                    assert bad.value == state.get(bad.key)
                continue
            assert not verify_state_proof(root, bad, depth), bad
        flipped = bytes([root[0] ^ 1]) + root[1:]
        assert not verify_state_proof(flipped, proof, depth)
        assert not verify_state_proof(root[:31], proof, depth)
        assert not verify_state_proof(root, proof, depth + 1)
        if depth:
            assert not verify_state_proof(root, proof, depth - 1)


def test_absent_key_in_shared_bucket() -> None:
    tree = MemoryStateTree(1)
    for i in range(10):
        tree.set(f"k{i}".encode(), b"v")
    root = tree.root()
    proof = tree.prove(b"missing")
    assert proof.value is None and proof.entries  # the bucket is not empty
    assert verify_state_proof(root, proof, 1)
    present = next(k for k, _ in proof.entries)
    lie = dataclasses.replace(proof, key=present)
    assert not verify_state_proof(root, lie, 1)  # listed, so it cannot be absent


def test_prove_checks_its_inputs() -> None:
    tree = MemoryStateTree(2)
    tree.set(b"a", b"1")
    bucket = bucket_of(b"a", 2)
    with pytest.raises(ValueError):
        prove(tree.tree, b"a", b"2", [(b"a", value_hash(b"1"))])
    with pytest.raises(ValueError):
        prove(tree.tree, b"a", None, [(b"a", value_hash(b"1"))])
    with pytest.raises(ValueError):
        prove(tree.tree, b"a", b"1", [(b"a", value_hash(b"1")), (b"zz", value_hash(b"2"))])
    good = prove(tree.tree, b"a", b"1", [(b"a", value_hash(b"1"))])
    assert good.siblings == tuple(tree.tree.siblings(bucket))
    assert verify_state_proof(tree.root(), good, 2)


def test_malformed_proofs_are_rejected_without_raising() -> None:
    tree = MemoryStateTree(2)
    tree.set(b"a", b"1")
    root = tree.root()
    proof = tree.prove(b"a")
    bad_values: list[StateProof] = [
        dataclasses.replace(proof, key="a"),  # type: ignore[arg-type]
        dataclasses.replace(proof, value="1"),  # type: ignore[arg-type]
        dataclasses.replace(proof, entries=((b"a",),)),  # type: ignore[arg-type]
        dataclasses.replace(proof, entries=((b"a", b"short"),)),
        dataclasses.replace(proof, entries=(("a", value_hash(b"1")),)),  # type: ignore[arg-type]
        dataclasses.replace(proof, siblings=(b"x" * 31, b"y" * 32)),
        dataclasses.replace(proof, siblings=("x" * 32, "y" * 32)),  # type: ignore[arg-type]
        dataclasses.replace(proof, siblings=None),  # type: ignore[arg-type]
    ]
    for bad in bad_values:
        assert not verify_state_proof(root, bad, 2)
    assert not verify_state_proof("00" * 32, proof, 2)  # type: ignore[arg-type]
    assert not verify_state_proof(root, proof, -1)
    assert not verify_state_proof(root, proof, 99)


def test_json_form_and_errors() -> None:
    proof = StateProof(b"\x01", None, ((b"\x02", b"\x03" * 32),), (b"\x04" * 32,))
    assert proof.to_json() == {
        "key": "01",
        "value": None,
        "entries": [["02", "03" * 32]],
        "siblings": ["04" * 32],
    }
    malformed: list[str | dict[str, object]] = [
        "not json",
        "[]",
        {"key": "01", "value": None, "entries": [], "siblings": ["zz"]},
        {"key": 1, "value": None, "entries": [], "siblings": []},
        {"key": "01", "value": None, "entries": [["02"]], "siblings": []},
        {"key": "01", "entries": [], "siblings": []},
    ]
    for bad in malformed:
        with pytest.raises(ValueError):
            StateProof.from_json(bad)


def test_absence_proof_cannot_be_reused_for_a_present_key() -> None:
    tree = MemoryStateTree(3)
    tree.set(b"present", b"value")
    root = tree.root()
    present_bucket = bucket_of(b"present", 3)
    absent = next(
        k for k in (f"probe-{i}".encode() for i in range(100)) if bucket_of(k, 3) != present_bucket
    )
    proof = tree.prove(absent)
    assert proof.value is None and proof.entries == ()
    assert verify_state_proof(root, proof, 3)
    assert not verify_state_proof(root, dataclasses.replace(proof, key=b"present"), 3)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.binary(min_size=0, max_size=40), st.binary(min_size=32, max_size=32), max_size=30
    )
)
def test_the_stores_one_pass_leaf_equals_the_checked_leaf(entries: dict[bytes, bytes]) -> None:
    ordered = sorted(entries.items())
    assert ordered_bucket_leaf(ordered) == bucket_leaf(list(entries.items()))
