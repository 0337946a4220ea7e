"""A typed, layered view of the ledger state.

Execution reads through a stack of overlays: the committed store at the bottom, the block's
writes above it, and one transaction's writes on top. A transaction that fails is dropped with
its overlay, so a refused transaction changes nothing.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Protocol, TypeVar

from medledger.ledger import codec

T = TypeVar("T")


class StateReader(Protocol):
    """Read access to committed state: point lookups and key-ordered prefix scans."""

    def get(self, key: bytes) -> bytes | None: ...

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]: ...


class State:
    """An overlay of pending writes over a reader; `None` in the overlay marks a deletion."""

    def __init__(self, base: StateReader | State) -> None:
        self._base = base
        self._writes: dict[bytes, bytes | None] = {}
        # The overlay's keys in order, built by the first scan and kept up to date after it, so
        # a scan costs log n plus what it yields, not a pass over every write (a put-many
        # writes thousands of keys and scans between them).
        self._keys: list[bytes] | None = None

    def get(self, key: bytes) -> bytes | None:
        if key in self._writes:
            return self._writes[key]
        return self._base.get(key)

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Entries under `prefix` in key order, overlay merged over the base."""
        if self._keys is None:
            self._keys = sorted(self._writes)
        keys = self._keys
        start = end = bisect.bisect_left(keys, prefix)
        while end < len(keys) and keys[end].startswith(prefix):
            end += 1
        mine = keys[start:end]
        base = self._base.scan(prefix)
        pending = next(base, None)
        for key in mine:
            while pending is not None and pending[0] < key:
                yield pending
                pending = next(base, None)
            if pending is not None and pending[0] == key:
                pending = next(base, None)
            value = self._writes[key]
            if value is not None:
                yield key, value
        while pending is not None:
            yield pending
            pending = next(base, None)

    def _note_key(self, key: bytes) -> None:
        if self._keys is not None and key not in self._writes:
            bisect.insort(self._keys, key)

    def put(self, key: bytes, value: bytes) -> None:
        self._note_key(key)
        self._writes[key] = value

    def delete(self, key: bytes) -> None:
        self._note_key(key)
        self._writes[key] = None

    def read(self, key: bytes, kind: type[T]) -> T | None:
        raw = self.get(key)
        return None if raw is None else codec.decode_stored(raw, kind)

    def write(self, key: bytes, value: object) -> None:
        self.put(key, codec.encode(value))

    def read_all(self, prefix: bytes, kind: type[T]) -> list[T]:
        return [codec.decode_stored(raw, kind) for _, raw in self.scan(prefix)]

    def child(self) -> State:
        return State(self)

    def merge_into_parent(self) -> None:
        """Apply this overlay's writes to the overlay below it."""
        parent = self._base
        if not isinstance(parent, State):
            raise TypeError("only a child overlay can be merged")
        if parent._keys is not None:
            fresh = [k for k in self._writes if k not in parent._writes]
            if len(fresh) * 8 > len(parent._keys):
                parent._keys = None  # sorted again by the next scan
            else:
                for key in fresh:
                    bisect.insort(parent._keys, key)
        parent._writes.update(self._writes)

    def changes(self) -> list[tuple[bytes, bytes | None]]:
        """This overlay's writes in key order, ready to be applied to the store."""
        return sorted(self._writes.items())
