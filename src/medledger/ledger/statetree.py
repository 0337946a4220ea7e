"""The authenticated state map: one root hash commits to every (key, value) pair of the ledger.

Keys fall into 2^depth buckets by the first `depth` bits of SHA-256(key), most significant bit
first. A bucket with entries has leaf SHA-256(0x00 || E1 || ... || Em), where the entries are
taken in ascending byte order of key and each is u32be(len(key)) || key || SHA-256(value); a
bucket with no entries has the fixed leaf SHA-256("medledger/empty-bucket"). Interior nodes are
SHA-256(0x01 || left || right) over the complete binary tree of depth `depth` whose leaves are
the buckets in order, and its top node is the state root.

A proof for a key lists its bucket's entries (key, SHA-256(value)) in full, plus the `depth`
sibling hashes from the bucket up to the root. It shows presence (the key's entry carries the
value's hash) or absence (the complete listing lacks the key), and in both cases that the listing
hashes, with the siblings, to the root.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from medledger.ledger.merkle import LEAF_PREFIX, NODE_PREFIX, node_hash

HASH_SIZE = 32
DEFAULT_DEPTH = 16
MAX_DEPTH = 24
EMPTY_BUCKET = hashlib.sha256(b"medledger/empty-bucket").digest()
MAX_KEY_LEN = 0xFFFFFFFF


def _check_depth(depth: int) -> None:
    if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"state tree depth must be an int in [0, {MAX_DEPTH}], got {depth!r}")


def value_hash(value: bytes) -> bytes:
    """A value enters its bucket's leaf as SHA-256(value)."""
    return hashlib.sha256(value).digest()


def bucket_of(key: bytes, depth: int) -> int:
    """The bucket of a key: the first `depth` bits of SHA-256(key), read as a big-endian number."""
    _check_depth(depth)
    digest = int.from_bytes(hashlib.sha256(key).digest(), "big")
    return digest >> (256 - depth)


def bucket_leaf(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A bucket's leaf: SHA-256(0x00 || u32be(len(key)) || key || value_hash ...) by key order.

    `entries` are (key, SHA-256(value)) in any order; an empty bucket hashes to EMPTY_BUCKET.
    Raises ValueError on a repeated key, a value hash that is not 32 bytes or a key of 2^32 bytes
    or more.
    """
    ordered = sorted(entries)
    if not ordered:
        return EMPTY_BUCKET
    h = hashlib.sha256(LEAF_PREFIX)
    previous: bytes | None = None
    for key, vhash in ordered:
        if key == previous:
            raise ValueError(f"key {key.hex()} appears twice in one bucket")
        if len(vhash) != HASH_SIZE:
            raise ValueError("a value hash is 32 bytes")
        if len(key) > MAX_KEY_LEN:
            raise ValueError("a key is shorter than 2^32 bytes")
        h.update(len(key).to_bytes(4, "big"))
        h.update(key)
        h.update(vhash)
        previous = key
    return h.digest()


def ordered_bucket_leaf(entries: list[tuple[bytes, bytes]]) -> bytes:
    """`bucket_leaf` of entries the store lists itself: already in key order, each key once,
    every value hash 32 bytes (its own rows). One hash over one joined buffer: a block
    rehashes every bucket it touched, and the buckets fill as the state grows."""
    if not entries:
        return EMPTY_BUCKET
    body = b"".join([len(key).to_bytes(4, "big") + key + vhash for key, vhash in entries])
    return hashlib.sha256(LEAF_PREFIX + body).digest()


class BucketTree:
    """Every node hash of the bucket tree, in one bytearray laid out as a binary heap.

    Node 1 is the root and node j has children 2j and 2j + 1, so bucket b is node 2^depth + b.
    Setting a leaf only marks it dirty; root() recomputes the paths above dirty leaves once, so a
    block's many updates cost one pass.
    """

    def __init__(self, depth: int = DEFAULT_DEPTH) -> None:
        _check_depth(depth)
        self.depth = depth
        self._nodes = bytearray(HASH_SIZE << (depth + 1))
        self._dirty: set[int] = set()
        level_hash = EMPTY_BUCKET
        for level in range(depth, -1, -1):
            first = 1 << level
            self._nodes[first * HASH_SIZE : 2 * first * HASH_SIZE] = level_hash * first
            level_hash = node_hash(level_hash, level_hash)

    @property
    def bucket_count(self) -> int:
        return 1 << self.depth

    def _node(self, index: int) -> bytes:
        return bytes(self._nodes[index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def _set_node(self, index: int, digest: bytes) -> None:
        self._nodes[index * HASH_SIZE : (index + 1) * HASH_SIZE] = digest

    def _rehash(self, node: int) -> None:
        # Children 2j and 2j + 1 are adjacent in the heap, so left || right is one 64-byte slice
        # and this is node_hash(left, right) without copying the halves apart.
        start = 2 * node * HASH_SIZE
        self._nodes[node * HASH_SIZE : (node + 1) * HASH_SIZE] = hashlib.sha256(
            NODE_PREFIX + self._nodes[start : start + 2 * HASH_SIZE]
        ).digest()

    def _check_bucket(self, bucket: int) -> None:
        if not isinstance(bucket, int) or not 0 <= bucket < self.bucket_count:
            raise ValueError(f"bucket must be in [0, {self.bucket_count}), got {bucket!r}")

    def bucket_leaf(self, bucket: int) -> bytes:
        """The current leaf hash of a bucket."""
        self._check_bucket(bucket)
        return self._node(self.bucket_count + bucket)

    def set_bucket_leaf(self, bucket: int, leaf: bytes) -> None:
        """Replace a bucket's leaf hash; the root reflects it at the next root()."""
        self._check_bucket(bucket)
        if len(leaf) != HASH_SIZE:
            raise ValueError("a bucket leaf is 32 bytes")
        node = self.bucket_count + bucket
        self._set_node(node, leaf)
        self._dirty.add(node)

    def root(self) -> bytes:
        """The state root, after recomputing every node above a leaf set since the last call."""
        level = sorted(self._dirty)
        self._dirty.clear()
        nodes, sha256, width = self._nodes, hashlib.sha256, 2 * HASH_SIZE
        while level and level[0] > 1:
            # The parents of a sorted level, each once and still sorted.
            parents = list(dict.fromkeys(node >> 1 for node in level))
            for parent in parents:
                at, children = parent * HASH_SIZE, parent * width  # see _rehash
                nodes[at : at + HASH_SIZE] = sha256(
                    NODE_PREFIX + nodes[children : children + width]
                ).digest()
            level = parents
        return self._node(1)

    def assign(self, other: BucketTree) -> None:
        """Become equal to `other` (same depth), in place: the store's committed tree takes the
        working tree's hashes at every commit, and copying into the buffer it already has
        costs no fresh 2^(depth+6)-byte allocation (and its page faults) per block."""
        if other.depth != self.depth:
            raise ValueError(f"a depth-{other.depth} tree into a depth-{self.depth} one")
        self._nodes[:] = other._nodes
        self._dirty = set(other._dirty)

    def siblings(self, bucket: int) -> list[bytes]:
        """The sibling hashes on the path from a bucket to the root, the bucket's own first."""
        self._check_bucket(bucket)
        self.root()
        node = self.bucket_count + bucket
        path: list[bytes] = []
        while node > 1:
            path.append(self._node(node ^ 1))
            node >>= 1
        return path

    def leaves_bytes(self) -> bytes:
        """All bucket leaves, in bucket order, 32 bytes each: enough to rebuild the tree."""
        start = self.bucket_count * HASH_SIZE
        return bytes(self._nodes[start:])

    @classmethod
    def from_leaves_bytes(cls, depth: int, data: bytes) -> BucketTree:
        """Rebuild the whole tree from the output of leaves_bytes()."""
        tree = cls(depth)
        if len(data) != tree.bucket_count * HASH_SIZE:
            raise ValueError(f"depth {depth} needs {tree.bucket_count * HASH_SIZE} leaf bytes")
        tree._nodes[tree.bucket_count * HASH_SIZE :] = data
        for node in range(tree.bucket_count - 1, 0, -1):
            tree._rehash(node)
        return tree


@dataclass(frozen=True)
class StateProof:
    """A key's value (None for absence), its bucket's complete listing and the root siblings.

    `entries` are (key, SHA-256(value)) in ascending key order; `siblings` run from the bucket's
    sibling up to the root's child.
    """

    key: bytes
    value: bytes | None
    entries: tuple[tuple[bytes, bytes], ...]
    siblings: tuple[bytes, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready object with every byte string in lowercase hex."""
        return {
            "key": self.key.hex(),
            "value": None if self.value is None else self.value.hex(),
            "entries": [[k.hex(), v.hex()] for k, v in self.entries],
            "siblings": [s.hex() for s in self.siblings],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str | bytes) -> StateProof:
        """Parse to_json()'s object (or its JSON text); raises ValueError if malformed."""
        try:
            obj = json.loads(data) if isinstance(data, str | bytes) else data
            value = obj["value"]
            entries = tuple(_entry(item) for item in obj["entries"])
            return cls(
                key=_unhex(obj["key"]),
                value=None if value is None else _unhex(value),
                entries=entries,
                siblings=tuple(_unhex(s) for s in obj["siblings"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed state proof: {exc}") from exc


def _unhex(text: object) -> bytes:
    if not isinstance(text, str):
        raise TypeError("expected a hex string")
    return bytes.fromhex(text)


def _entry(item: object) -> tuple[bytes, bytes]:
    if not isinstance(item, list | tuple) or len(item) != 2:
        raise TypeError("an entry is a [key, value_hash] pair")
    return _unhex(item[0]), _unhex(item[1])


def prove(
    tree: BucketTree, key: bytes, value: bytes | None, entries: Iterable[tuple[bytes, bytes]]
) -> StateProof:
    """Build the proof for `key` from its bucket's full listing of (key, SHA-256(value)).

    Raises ValueError if the listing disagrees with `value` (wrong hash, or the key listed although
    `value` is None) or does not hash to the bucket's leaf in `tree`.
    """
    listing = tuple(sorted(entries))
    bucket = bucket_of(key, tree.depth)
    listed = dict(listing)
    if value is None and key in listed:
        raise ValueError("the key is listed in its bucket but no value was given")
    if value is not None and listed.get(key) != value_hash(value):
        raise ValueError("the bucket listing does not carry this value's hash")
    if bucket_leaf(listing) != tree.bucket_leaf(bucket):
        raise ValueError("the bucket listing does not match the tree's leaf")
    return StateProof(key, value, listing, tuple(tree.siblings(bucket)))


def verify_state_proof(root: bytes, proof: StateProof, depth: int) -> bool:
    """Whether `proof` shows, under `root`, that its key maps to its value (or is absent).

    Succeeds iff every listed key is in the proved key's bucket, the listing is in strictly
    ascending key order, the key's entry carries SHA-256(value) (or, for absence, no entry has the
    key), there are exactly `depth` 32-byte siblings, and hashing the bucket leaf up with them
    (as the left child where the bucket number's bit at that height is 0) gives `root`.
    Answers False, never raises, on malformed input.
    """
    try:
        return _verify(root, proof, depth)
    except (TypeError, ValueError, AttributeError):
        return False


def _verify(root: bytes, proof: StateProof, depth: int) -> bool:
    _check_depth(depth)
    if not isinstance(root, bytes) or len(root) != HASH_SIZE:
        return False
    if len(proof.siblings) != depth or any(len(s) != HASH_SIZE for s in proof.siblings):
        return False
    bucket = bucket_of(proof.key, depth)
    previous: bytes | None = None
    found: bytes | None = None
    for key, vhash in proof.entries:
        if previous is not None and key <= previous:
            return False
        if bucket_of(key, depth) != bucket:
            return False
        if key == proof.key:
            found = vhash
        previous = key
    if proof.value is None:
        if found is not None:
            return False
    elif found != value_hash(proof.value):
        return False
    current = bucket_leaf(proof.entries)
    for height, sibling in enumerate(proof.siblings):
        if bucket >> height & 1:
            current = node_hash(sibling, current)
        else:
            current = node_hash(current, sibling)
    return current == root


class MemoryStateTree:
    """A whole state map held in memory with its BucketTree: for tests and offline tools."""

    def __init__(self, depth: int = DEFAULT_DEPTH) -> None:
        self.tree = BucketTree(depth)
        self._values: dict[bytes, bytes] = {}
        self._buckets: dict[int, dict[bytes, bytes]] = {}

    @property
    def depth(self) -> int:
        return self.tree.depth

    def get(self, key: bytes) -> bytes | None:
        return self._values.get(key)

    def set(self, key: bytes, value: bytes) -> None:
        bucket = bucket_of(key, self.depth)
        self._values[key] = value
        listing = self._buckets.setdefault(bucket, {})
        listing[key] = value_hash(value)
        self.tree.set_bucket_leaf(bucket, bucket_leaf(listing.items()))

    def delete(self, key: bytes) -> None:
        if key not in self._values:
            return
        bucket = bucket_of(key, self.depth)
        del self._values[key]
        listing = self._buckets[bucket]
        del listing[key]
        if not listing:
            del self._buckets[bucket]
        self.tree.set_bucket_leaf(bucket, bucket_leaf(listing.items()))

    def root(self) -> bytes:
        return self.tree.root()

    def prove(self, key: bytes) -> StateProof:
        listing = self._buckets.get(bucket_of(key, self.depth), {})
        return prove(self.tree, key, self._values.get(key), listing.items())
