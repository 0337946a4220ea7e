"""The append-only audit log's Merkle tree, as defined by RFC 6962 §2.1 and RFC 9162 §2.1.

Leaves and interior nodes are hashed with distinct one-byte prefixes so that a leaf can never be
passed off as a node (RFC 6962 §2.1): a leaf is SHA-256(0x00 || data), a node is
SHA-256(0x01 || left || right), and the tree of no leaves has root SHA-256("").

The tree of n > 1 leaves splits at k, the largest power of two smaller than n: its root is the
node over the root of the first k leaves and the root of the remaining n - k (RFC 6962 §2.1).
Every subtree that this recursion reaches is either perfect (2^j leaves starting at a multiple of
2^j) or splits into perfect subtrees by the binary digits of its size. A log therefore keeps the
hash of every perfect subtree it has completed, addressed by (level, index): level 0 holds the
leaf hashes, and (k, i) is the root of leaves [i * 2^k, (i + 1) * 2^k). From those, any root,
inclusion proof or consistency proof for any size up to the current one takes O(log n) look-ups.

Verification follows the iterative algorithms of RFC 9162 §2.1.3.2 and §2.1.4.2 and answers
False, never an exception, for any malformed input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Protocol

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()

NodeGetter = Callable[[int, int], bytes | None]
"""Returns the stored hash of the perfect subtree (level, index), or None if it is missing."""


class MissingNodeError(LookupError):
    """A perfect subtree that the requested tree size covers is not in the store."""


def leaf_hash(data: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d) (RFC 6962 §2.1)."""
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """An interior node is SHA-256(0x01 || MTH(left) || MTH(right)) (RFC 6962 §2.1)."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n, for n > 1 (RFC 6962 §2.1)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over already-hashed leaves (RFC 6962 §2.1); SHA-256("") when n = 0.

    The perfect subtrees of sizes given by the binary digits of n, largest first, are combined
    right to left, which is the same tree as the recursive definition.
    """
    if not leaf_hashes:
        return EMPTY_ROOT
    frontier: list[bytes] = []
    for count, h in enumerate(leaf_hashes):
        frontier.append(h)
        while count & 1:
            right = frontier.pop()
            frontier[-1] = node_hash(frontier[-1], right)
            count >>= 1
    return _fold(frontier)


def _fold(frontier: Sequence[bytes]) -> bytes:
    """Combine perfect-subtree roots, largest (leftmost) first, into the RFC 6962 root."""
    root = frontier[-1]
    for h in reversed(frontier[:-1]):
        root = node_hash(h, root)
    return root


def _fetch(get: NodeGetter, level: int, index: int) -> bytes:
    digest = get(level, index)
    if digest is None:
        raise MissingNodeError(f"merkle node (level {level}, index {index}) is not stored")
    return digest


def _subtree_root(start: int, size: int, get: NodeGetter) -> bytes:
    """MTH(D[start:start+size]) for a subtree reached by the RFC 6962 §2.1 recursion.

    Such a subtree starts at a multiple of the smallest power of two >= size, so it is made of
    the perfect subtrees given by the binary digits of size, largest first.
    """
    parts: list[bytes] = []
    offset = start
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            parts.append(_fetch(get, level, offset >> level))
            offset += 1 << level
    return _fold(parts)


def inclusion_proof(index: int, size: int, get: NodeGetter) -> list[bytes]:
    """PATH(m, D[n]) of RFC 6962 §2.1.1, ordered from the leaf's sibling up to the root.

    PATH(0, {d}) is empty. For n > 1 and k the largest power of two below n: if m < k the path is
    PATH(m, D[0:k]) followed by MTH(D[k:n]); otherwise PATH(m - k, D[k:n]) followed by
    MTH(D[0:k]). Requires 0 <= index < size; raises ValueError otherwise.
    """
    if not 0 <= index < size:
        raise ValueError(f"inclusion proof needs 0 <= index < size, got {index}, {size}")
    path: list[bytes] = []
    start, n, m = 0, size, index
    while n > 1:
        k = _split(n)
        if m < k:
            path.append(_subtree_root(start + k, n - k, get))
            n = k
        else:
            path.append(_subtree_root(start, k, get))
            start, n, m = start + k, n - k, m - k
    path.reverse()
    return path


def consistency_proof(old_size: int, new_size: int, get: NodeGetter) -> list[bytes]:
    """PROOF(m, D[n]) = SUBPROOF(m, D[n], true) of RFC 6962 §2.1.2.

    SUBPROOF(m, D[m], true) is empty and SUBPROOF(m, D[m], false) is {MTH(D[m])}. For m < n and k
    the largest power of two below n: if m <= k it is SUBPROOF(m, D[0:k], b) followed by
    MTH(D[k:n]); otherwise SUBPROOF(m - k, D[k:n], false) followed by MTH(D[0:k]).
    The proof from the empty tree, and from a tree to itself, is empty.
    Requires 0 <= old_size <= new_size; raises ValueError otherwise.
    """
    if not 0 <= old_size <= new_size:
        raise ValueError(f"consistency proof needs 0 <= old <= new, got {old_size}, {new_size}")
    if old_size in (0, new_size):
        return []
    path: list[bytes] = []
    start, n, m, whole = 0, new_size, old_size, True
    while m != n:
        k = _split(n)
        if m <= k:
            path.append(_subtree_root(start + k, n - k, get))
            n = k
        else:
            path.append(_subtree_root(start, k, get))
            start, n, m, whole = start + k, n - k, m - k, False
    if not whole:
        path.append(_subtree_root(start, n, get))
    path.reverse()
    return path


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Verify an inclusion proof by the algorithm of RFC 9162 §2.1.3.2.

    Fail if leaf_index >= tree_size. Set fn = leaf_index, sn = tree_size - 1, r = hash. For each
    p in the path: fail if sn = 0; if LSB(fn) is set or fn = sn, set r = HASH(0x01 || p || r) and,
    if LSB(fn) is not set, shift fn and sn right until LSB(fn) is set or fn = 0; otherwise set
    r = HASH(0x01 || r || p); then shift fn and sn right once. Succeed iff sn = 0 and r = root.
    """
    if not (_is_size(index) and _is_size(size) and _is_hash(leaf_hash) and _is_hash(root)):
        return False
    if index >= size or not all(_is_hash(p) for p in proof):
        return False
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Verify a consistency proof by the algorithm of RFC 9162 §2.1.4.2.

    For 0 < first < second: fail on an empty path; if first is a power of two, prepend
    first_hash to the path. Set fn = first - 1, sn = second - 1 and shift both right while LSB(fn)
    is set. Set fr = sr = the path's first value. For each later c: fail if sn = 0; if LSB(fn) is
    set or fn = sn, set fr = HASH(0x01 || c || fr), sr = HASH(0x01 || c || sr) and, if LSB(fn) is
    not set, shift fn and sn right until LSB(fn) is set or fn = 0; otherwise set
    sr = HASH(0x01 || sr || c); then shift both right once. Succeed iff fr = first_hash,
    sr = second_hash and sn = 0.

    The sizes the RFC leaves out have empty proofs (RFC 6962 §2.1.2): a tree is consistent with
    itself when the roots are equal, and every tree extends the empty tree, whose root is
    SHA-256("").
    """
    if not (_is_size(old_size) and _is_size(new_size)):
        return False
    if not (_is_hash(old_root) and _is_hash(new_root) and all(_is_hash(p) for p in proof)):
        return False
    if old_size > new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


class NodeStore(Protocol):
    """Where a MerkleLog keeps the hash of every perfect subtree, keyed by (level, index)."""

    def get_node(self, level: int, index: int) -> bytes | None:
        """The root of leaves [index * 2^level, (index + 1) * 2^level), or None if not stored."""
        ...

    def put_node(self, level: int, index: int, digest: bytes) -> None:
        """Remember the root of leaves [index * 2^level, (index + 1) * 2^level)."""
        ...


class DictNodeStore:
    """A NodeStore held in memory, for tests and offline verification tools."""

    def __init__(self) -> None:
        self.nodes: dict[tuple[int, int], bytes] = {}

    def get_node(self, level: int, index: int) -> bytes | None:
        return self.nodes.get((level, index))

    def put_node(self, level: int, index: int, digest: bytes) -> None:
        self.nodes[(level, index)] = digest

    def __len__(self) -> int:
        return len(self.nodes)


class MerkleLog:
    """An RFC 6962 log whose perfect subtrees live in a NodeStore; the caller keeps its size.

    Appending leaf number i stores its hash at (0, i) and the root of every perfect subtree it
    completes, i.e. (k, i >> k) for each k while bit k - 1 of i is set. While this object is in
    use it must be the only writer of the store; it keeps the roots of the current size's
    perfect subtrees in memory so that appends and root() read nothing back.
    """

    def __init__(self, store: NodeStore, size: int = 0) -> None:
        if not _is_size(size):
            raise ValueError(f"log size must be a non-negative int, got {size!r}")
        self._store = store
        self._size = size
        self._frontier: list[bytes] | None = None

    @property
    def size(self) -> int:
        """The number of leaves appended so far."""
        return self._size

    def _get(self, level: int, index: int) -> bytes | None:
        return self._store.get_node(level, index)

    def _load_frontier(self) -> list[bytes]:
        """The roots of the perfect subtrees that make up the current tree, largest first."""
        if self._frontier is None:
            frontier: list[bytes] = []
            offset = 0
            for level in range(self._size.bit_length() - 1, -1, -1):
                if self._size >> level & 1:
                    frontier.append(_fetch(self._get, level, offset >> level))
                    offset += 1 << level
            self._frontier = frontier
        return self._frontier

    def append(self, leaf_data: bytes) -> int:
        """Append the leaf SHA-256(0x00 || leaf_data); return its index."""
        return self.append_leaf_hash(leaf_hash(leaf_data))

    def append_leaf_hash(self, digest: bytes) -> int:
        """Append an already-hashed leaf; return its index."""
        if not _is_hash(digest):
            raise ValueError("a leaf hash is 32 bytes")
        frontier = self._load_frontier()
        index = self._size
        self._store.put_node(0, index, digest)
        current, level = digest, 0
        while index >> level & 1:
            current = node_hash(frontier.pop(), current)
            level += 1
            self._store.put_node(level, index >> level, current)
        frontier.append(current)
        self._size = index + 1
        return index

    def root(self) -> bytes:
        """MTH of every leaf appended so far (RFC 6962 §2.1)."""
        frontier = self._load_frontier()
        return _fold(frontier) if frontier else EMPTY_ROOT

    def root_at(self, size: int) -> bytes:
        """MTH(D[size]) of the log's first `size` leaves, for 0 <= size <= self.size."""
        self._check_size(size)
        if size == self._size:
            return self.root()
        return _subtree_root(0, size, self._get) if size else EMPTY_ROOT

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[size]) (RFC 6962 §2.1.1); size defaults to the current size."""
        n = self._size if size is None else size
        self._check_size(n)
        return inclusion_proof(index, n, self._get)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """PROOF(old_size, D[new_size]) (RFC 6962 §2.1.2); new_size defaults to the current."""
        n = self._size if new_size is None else new_size
        self._check_size(n)
        return consistency_proof(old_size, n, self._get)

    def _check_size(self, size: int) -> None:
        if not _is_size(size) or size > self._size:
            raise ValueError(f"tree size must be in [0, {self._size}], got {size!r}")
