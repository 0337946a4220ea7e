"""Tests for the RFC 6962 / RFC 9162 audit-log Merkle tree."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.ledger.merkle import (
    EMPTY_ROOT,
    DictNodeStore,
    MerkleLog,
    MissingNodeError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)

# ---------------------------------------------------------------------------------------------
# Published RFC 6962 test vectors: the 8-leaf tree used by certificate-transparency, Trillian and
# transparency-dev/merkle (testonly/constants.go, proof/verify_test.go).

VECTOR_LEAVES = [
    bytes.fromhex(""),
    bytes.fromhex("00"),
    bytes.fromhex("10"),
    bytes.fromhex("2021"),
    bytes.fromhex("3031"),
    bytes.fromhex("40414243"),
    bytes.fromhex("5051525354555657"),
    bytes.fromhex("606162636465666768696a6b6c6d6e6f"),
]

VECTOR_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]

# Hashes of every perfect subtree, by level then index.
VECTOR_NODES = [
    [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ],
    [
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ],
    [
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    ["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
]

# (leaf index, tree size, proof); the published table numbers leaves from 1, these from 0.
VECTOR_INCLUSION = [
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]

VECTOR_CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]


def _unhex(items: Sequence[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in items]


# ---------------------------------------------------------------------------------------------
# A reference written straight from the recursive definitions of RFC 6962 §2.1, over ranges.


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(hashes: Sequence[bytes]) -> bytes:
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = _k(len(hashes))
    return node_hash(ref_mth(hashes[:k]), ref_mth(hashes[k:]))


Range = tuple[int, int]


def ref_path_ranges(m: int, start: int, end: int) -> list[Range]:
    """PATH(m, D[start:end]) as the ranges whose MTH makes each proof element."""
    n = end - start
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*ref_path_ranges(m, start, start + k), (start + k, end)]
    return [*ref_path_ranges(m - k, start + k, end), (start, start + k)]


def ref_subproof_ranges(m: int, start: int, end: int, whole: bool) -> list[Range]:
    n = end - start
    if m == n:
        return [] if whole else [(start, end)]
    k = _k(n)
    if m <= k:
        return [*ref_subproof_ranges(m, start, start + k, whole), (start + k, end)]
    return [*ref_subproof_ranges(m - k, start + k, end, False), (start, start + k)]


Formula = str | tuple["Formula", "Formula"]


def _formula(start: int, end: int, symbols: dict[Range, str]) -> Formula:
    """The RFC 6962 tree over [start, end) with the given ranges as opaque symbols."""
    if (start, end) in symbols:
        return symbols[(start, end)]
    if end - start <= 1:
        return "?"  # a leaf not covered by the proof: cannot be recomputed
    k = _k(end - start)
    return (_formula(start, start + k, symbols), _formula(start + k, end, symbols))


@cache
def inclusion_shape(index: int, size: int) -> Formula:
    """How the root is built from proof elements p0, p1, ... and the leaf."""
    if not 0 <= index < size:
        return "invalid"
    symbols = {r: f"p{i}" for i, r in enumerate(ref_path_ranges(index, 0, size))}
    symbols[(index, index + 1)] = "leaf"
    return _formula(0, size, symbols)


@cache
def consistency_shape(old: int, new: int) -> tuple[Formula, Formula]:
    """How the old and new roots are built from proof elements p0, p1, ... (and the old root)."""
    if not 0 < old < new:
        return ("invalid", "invalid")
    symbols = {r: f"p{i}" for i, r in enumerate(ref_subproof_ranges(old, 0, new, True))}
    symbols.setdefault((0, old), "old")
    return _formula(0, old, symbols), _formula(0, new, symbols)


def data(i: int) -> bytes:
    return b"leaf-" + i.to_bytes(4, "big")


@cache
def big_log() -> tuple[MerkleLog, tuple[bytes, ...]]:
    log = MerkleLog(DictNodeStore(), 0)
    for i in range(1100):
        log.append(data(i))
    hashes = tuple(leaf_hash(data(i)) for i in range(1100))
    return log, hashes


class CountingStore(DictNodeStore):
    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    def get_node(self, level: int, index: int) -> bytes | None:
        self.gets += 1
        return super().get_node(level, index)


# ---------------------------------------------------------------------------------------------
# Hashing and the published vectors.


def test_hash_prefixes() -> None:
    assert hashlib.sha256(b"").digest() == EMPTY_ROOT
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    left, right = b"L" * 32, b"R" * 32
    assert node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()


def test_vector_roots() -> None:
    hashes = [leaf_hash(d) for d in VECTOR_LEAVES]
    for size, expected in enumerate(VECTOR_ROOTS):
        assert root_of(hashes[:size]).hex() == expected


def test_vector_log_roots_and_stored_nodes() -> None:
    store = DictNodeStore()
    log = MerkleLog(store, 0)
    assert log.root().hex() == VECTOR_ROOTS[0]
    for size, leaf in enumerate(VECTOR_LEAVES, start=1):
        assert log.append(leaf) == size - 1
        assert log.root().hex() == VECTOR_ROOTS[size]
    for size, expected in enumerate(VECTOR_ROOTS):
        assert log.root_at(size).hex() == expected
    expected_nodes = {
        (level, index): bytes.fromhex(h)
        for level, row in enumerate(VECTOR_NODES)
        for index, h in enumerate(row)
    }
    assert store.nodes == expected_nodes


def _vector_log() -> MerkleLog:
    log = MerkleLog(DictNodeStore(), 0)
    for leaf in VECTOR_LEAVES:
        log.append(leaf)
    return log


@pytest.mark.parametrize(("index", "size", "proof"), VECTOR_INCLUSION)
def test_vector_inclusion(index: int, size: int, proof: list[str]) -> None:
    log = _vector_log()
    expected = _unhex(proof)
    assert log.inclusion_proof(index, size) == expected
    root = bytes.fromhex(VECTOR_ROOTS[size])
    assert verify_inclusion(leaf_hash(VECTOR_LEAVES[index]), index, size, expected, root)


@pytest.mark.parametrize(("old", "new", "proof"), VECTOR_CONSISTENCY)
def test_vector_consistency(old: int, new: int, proof: list[str]) -> None:
    log = _vector_log()
    expected = _unhex(proof)
    assert log.consistency_proof(old, new) == expected
    old_root, new_root = bytes.fromhex(VECTOR_ROOTS[old]), bytes.fromhex(VECTOR_ROOTS[new])
    assert verify_consistency(old, new, old_root, new_root, expected)


# ---------------------------------------------------------------------------------------------
# Exhaustive agreement with the recursive reference for small trees.

SMALL = 40


def test_root_of_matches_reference() -> None:
    hashes = [leaf_hash(data(i)) for i in range(130)]
    for n in range(131):
        assert root_of(hashes[:n]) == ref_mth(hashes[:n])


def test_incremental_root_equals_root_of_every_size() -> None:
    hashes = [leaf_hash(data(i)) for i in range(300)]
    log = MerkleLog(DictNodeStore(), 0)
    assert log.root() == root_of([]) == EMPTY_ROOT
    for n in range(1, 301):
        log.append_leaf_hash(hashes[n - 1])
        assert log.size == n
        assert log.root() == root_of(hashes[:n])
    for n in range(301):
        assert log.root_at(n) == root_of(hashes[:n])


def test_small_trees_every_proof_matches_reference_and_verifies() -> None:
    hashes = [leaf_hash(data(i)) for i in range(SMALL)]
    log = MerkleLog(DictNodeStore(), 0)
    for h in hashes:
        log.append_leaf_hash(h)
    for n in range(1, SMALL + 1):
        root = root_of(hashes[:n])
        for i in range(n):
            proof = log.inclusion_proof(i, n)
            assert proof == [ref_mth(hashes[a:b]) for a, b in ref_path_ranges(i, 0, n)]
            assert verify_inclusion(hashes[i], i, n, proof, root)
        for m in range(0, n + 1):
            proof = log.consistency_proof(m, n)
            if 0 < m < n:
                want = [ref_mth(hashes[a:b]) for a, b in ref_subproof_ranges(m, 0, n, True)]
            else:
                want = []
            assert proof == want
            assert verify_consistency(m, n, root_of(hashes[:m]), root, proof)


def test_small_trees_changed_index_or_size_verifies_only_if_rfc_implies_it() -> None:
    """RFC 9162 verification cannot bind the tree size by itself (a signed tree head does).

    Verification with changed parameters must succeed exactly when the recursive RFC 6962
    structure of the new parameters combines the same proof elements in the same way.
    """
    limit = 20
    hashes = [leaf_hash(data(i)) for i in range(limit)]
    log = MerkleLog(DictNodeStore(), 0)
    for h in hashes:
        log.append_leaf_hash(h)
    for n in range(1, limit + 1):
        root = root_of(hashes[:n])
        for i in range(n):
            proof = log.inclusion_proof(i, n)
            shape = inclusion_shape(i, n)
            for i2 in range(-1, n + 2):
                for n2 in range(0, 2 * limit + 1):
                    if (i2, n2) == (i, n):
                        continue
                    ok = verify_inclusion(hashes[i], i2, n2, proof, root)
                    assert ok == (inclusion_shape(i2, n2) == shape), (i, n, i2, n2)
        for m in range(1, n):
            proof = log.consistency_proof(m, n)
            old_root = root_of(hashes[:m])
            cshape = consistency_shape(m, n)
            for m2 in range(-1, 2 * limit + 1):
                for n2 in range(0, 2 * limit + 1):
                    if (m2, n2) == (m, n):
                        continue
                    ok = verify_consistency(m2, n2, old_root, root, proof)
                    assert ok == (consistency_shape(m2, n2) == cshape), (m, n, m2, n2)


# ---------------------------------------------------------------------------------------------
# Property tests on a larger log.


@st.composite
def index_and_size(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(1, 1100))
    return draw(st.integers(0, size - 1)), size


@st.composite
def two_sizes(draw: st.DrawFn) -> tuple[int, int]:
    new = draw(st.integers(1, 1100))
    return draw(st.integers(1, new)), new


@settings(max_examples=300, deadline=None)
@given(index_and_size())
def test_inclusion_proofs_verify(case: tuple[int, int]) -> None:
    index, size = case
    log, hashes = big_log()
    proof = log.inclusion_proof(index, size)
    assert len(proof) <= size.bit_length()
    assert verify_inclusion(hashes[index], index, size, proof, log.root_at(size))
    assert verify_inclusion(hashes[index], index, size, proof, root_of(hashes[:size]))


@settings(max_examples=300, deadline=None)
@given(two_sizes())
def test_consistency_proofs_verify(case: tuple[int, int]) -> None:
    old, new = case
    log, hashes = big_log()
    proof = log.consistency_proof(old, new)
    assert verify_consistency(old, new, root_of(hashes[:old]), root_of(hashes[:new]), proof)


def _flip(value: bytes, position: int, bit: int) -> bytes:
    out = bytearray(value)
    out[position % len(out)] ^= 1 << bit
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(index_and_size(), st.data())
def test_tampered_inclusion_fails(case: tuple[int, int], draw: st.DataObject) -> None:
    index, size = case
    log, hashes = big_log()
    proof = log.inclusion_proof(index, size)
    root, leaf = log.root_at(size), hashes[index]
    pos, bit = draw.draw(st.integers(0, 31)), draw.draw(st.integers(0, 7))
    assert not verify_inclusion(_flip(leaf, pos, bit), index, size, proof, root)
    assert not verify_inclusion(leaf, index, size, proof, _flip(root, pos, bit))
    if proof:
        k = draw.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[k] = _flip(bad[k], pos, bit)
        assert not verify_inclusion(leaf, index, size, bad, root)
        assert not verify_inclusion(leaf, index, size, proof[:-1], root)
        assert not verify_inclusion(leaf, index, size, proof[1:], root)
        assert not verify_inclusion(leaf, index, size, [*proof[:k], *proof[k + 1 :]], root)
    assert not verify_inclusion(leaf, index, size, [*proof, root], root)
    assert not verify_inclusion(leaf, index, size, [root, *proof], root)
    other_index = draw.draw(st.integers(-2, 1200))
    other_size = draw.draw(st.integers(-2, 2300))
    for i2, n2 in ((other_index, size), (index, other_size), (other_index, other_size)):
        if (i2, n2) != (index, size):
            expect = inclusion_shape(i2, n2) == inclusion_shape(index, size)
            assert verify_inclusion(leaf, i2, n2, proof, root) == expect


@settings(max_examples=300, deadline=None)
@given(two_sizes(), st.data())
def test_tampered_consistency_fails(case: tuple[int, int], draw: st.DataObject) -> None:
    old, new = case
    log, _ = big_log()
    proof = log.consistency_proof(old, new)
    old_root, new_root = log.root_at(old), log.root_at(new)
    pos, bit = draw.draw(st.integers(0, 31)), draw.draw(st.integers(0, 7))
    assert not verify_consistency(old, new, _flip(old_root, pos, bit), new_root, proof)
    assert not verify_consistency(old, new, old_root, _flip(new_root, pos, bit), proof)
    if proof:
        k = draw.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[k] = _flip(bad[k], pos, bit)
        assert not verify_consistency(old, new, old_root, new_root, bad)
        assert not verify_consistency(old, new, old_root, new_root, proof[:-1])
        assert not verify_consistency(old, new, old_root, new_root, proof[1:])
        assert not verify_consistency(old, new, old_root, new_root, [proof[0], *proof])
    assert not verify_consistency(old, new, old_root, new_root, [*proof, new_root])
    if old != new:
        assert not verify_consistency(old, new, new_root, old_root, proof)
        other_old = draw.draw(st.integers(-2, 1200))
        other_new = draw.draw(st.integers(-2, 2300))
        for m2, n2 in ((other_old, new), (old, other_new), (other_old, other_new)):
            if (m2, n2) != (old, new):
                expect = consistency_shape(m2, n2) == consistency_shape(old, new)
                assert verify_consistency(m2, n2, old_root, new_root, proof) == expect


# ---------------------------------------------------------------------------------------------
# Edge cases and malformed input.


def test_inclusion_edge_cases() -> None:
    h = leaf_hash(b"data")
    assert verify_inclusion(h, 0, 1, [], h)
    assert not verify_inclusion(h, 0, 1, [], b"")
    assert not verify_inclusion(b"", 0, 1, [], h)
    assert not verify_inclusion(h, 0, 0, [], h)
    assert not verify_inclusion(h, 1, 1, [], h)
    assert not verify_inclusion(h, -1, 1, [], h)
    assert not verify_inclusion(h, 0, 1, [b""], h)
    assert not verify_inclusion(h, 0, 2, [h[:31]], node_hash(h, h))
    assert not verify_inclusion(h, True, 2, [h], node_hash(h, h))
    assert verify_inclusion(h, 1, 2, [h], node_hash(h, h))


def test_consistency_edge_cases() -> None:
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert verify_consistency(0, 5, EMPTY_ROOT, a, [])
    assert not verify_consistency(0, 5, a, a, [])
    assert not verify_consistency(0, 5, EMPTY_ROOT, a, [a])
    assert verify_consistency(3, 3, a, a, [])
    assert not verify_consistency(3, 3, a, b, [])
    assert not verify_consistency(3, 3, a, a, [a])
    assert not verify_consistency(2, 1, a, b, [a])
    assert not verify_consistency(1, 2, a, node_hash(a, b), [])
    assert verify_consistency(1, 2, a, node_hash(a, b), [b])
    assert not verify_consistency(-1, 2, a, b, [b])
    assert not verify_consistency(1, 2, a, node_hash(a, b), [b[:-1]])
    assert not verify_consistency(1, 2, a[:-1], node_hash(a, b), [b])


def test_proof_argument_errors() -> None:
    log = _vector_log()
    for bad_index, bad_size in ((0, 0), (8, 8), (-1, 8), (0, 9)):
        with pytest.raises(ValueError):
            log.inclusion_proof(bad_index, bad_size)
    for bad_old, bad_new in ((3, 2), (-1, 4), (2, 9)):
        with pytest.raises(ValueError):
            log.consistency_proof(bad_old, bad_new)
    with pytest.raises(ValueError):
        log.root_at(9)
    with pytest.raises(ValueError):
        log.append_leaf_hash(b"short")
    with pytest.raises(ValueError):
        MerkleLog(DictNodeStore(), -1)
    assert log.consistency_proof(0) == []
    assert log.consistency_proof(8) == []
    assert log.inclusion_proof(7) == log.inclusion_proof(7, 8)


def test_module_functions_read_store_directly() -> None:
    store = DictNodeStore()
    log = MerkleLog(store, 0)
    for i in range(21):
        log.append(data(i))
    assert inclusion_proof(5, 13, store.get_node) == log.inclusion_proof(5, 13)
    assert consistency_proof(6, 13, store.get_node) == log.consistency_proof(6, 13)


def test_missing_node_raises() -> None:
    store = DictNodeStore()
    log = MerkleLog(store, 0)
    for i in range(5):
        log.append(data(i))
    del store.nodes[(2, 0)]
    with pytest.raises(MissingNodeError):
        log.inclusion_proof(4, 5)
    with pytest.raises(MissingNodeError):
        MerkleLog(store, 5).root()


def test_reopen_continues_from_store() -> None:
    store = DictNodeStore()
    log = MerkleLog(store, 0)
    hashes = [leaf_hash(data(i)) for i in range(100)]
    for h in hashes[:37]:
        log.append_leaf_hash(h)
    reopened = MerkleLog(store, 37)
    assert reopened.root() == log.root()
    for h in hashes[37:]:
        reopened.append_leaf_hash(h)
    assert reopened.root() == root_of(hashes)
    fresh = DictNodeStore()
    straight = MerkleLog(fresh, 0)
    for h in hashes:
        straight.append_leaf_hash(h)
    assert store.nodes == fresh.nodes


def test_lookups_are_logarithmic() -> None:
    store = CountingStore()
    log = MerkleLog(store, 0)
    n = 5000
    for i in range(n):
        log.append(data(i))
    assert store.gets == 0  # appends and root() work from the in-memory frontier
    log.root()
    assert store.gets == 0
    bound = 2 * n.bit_length() + 2
    for index, size in ((0, n), (n - 1, n), (2047, 4097), (3333, 4999), (1, 3)):
        store.gets = 0
        log.inclusion_proof(index, size)
        assert store.gets <= bound
    for old, new in ((1, n), (n - 1, n), (2047, 4097), (3333, 4999), (1000, 1001)):
        store.gets = 0
        log.consistency_proof(old, new)
        assert store.gets <= bound
    for size in (1, 1000, 4095, 4999):
        store.gets = 0
        log.root_at(size)
        assert store.gets <= n.bit_length()
    store.gets = 0
    MerkleLog(store, n).root()
    assert store.gets == bin(n).count("1")
