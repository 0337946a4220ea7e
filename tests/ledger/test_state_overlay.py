"""The layered state: a scan through overlays yields exactly what a plain sorted dictionary
holding the same writes would, whatever order puts, deletes, scans and merges come in (the
overlay keeps its keys in order once scanned, and merges keep the parent's order up to date)."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.ledger.state import State


class DictReader:
    def __init__(self, data: dict[bytes, bytes]) -> None:
        self.data = data

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        for key in sorted(self.data):
            if key.startswith(prefix):
                yield key, self.data[key]


KEY = st.sampled_from([bytes([a, b]) for a in b"abc" for b in b"abc"] + [b"a", b"b", b""])
PREFIX = st.sampled_from([b"", b"a", b"b", b"c", b"ab", b"ca", b"d"])
STEP = st.one_of(
    st.tuples(st.just("put"), KEY, st.binary(min_size=1, max_size=2)),
    st.tuples(st.just("delete"), KEY, st.just(b"")),
    st.tuples(st.just("scan"), PREFIX, st.just(b"")),
    st.tuples(st.just("child"), st.just(b""), st.just(b"")),
    st.tuples(st.just("merge"), st.just(b""), st.just(b"")),
    st.tuples(st.just("drop"), st.just(b""), st.just(b"")),
)


@settings(max_examples=300, deadline=None)
@given(
    base=st.dictionaries(KEY, st.binary(min_size=1, max_size=2), max_size=8),
    steps=st.lists(STEP, max_size=60),
)
def test_scans_through_overlays_match_a_sorted_dictionary(
    base: dict[bytes, bytes], steps: list[tuple[str, bytes, bytes]]
) -> None:
    layers = [State(DictReader(dict(base)))]
    models = [dict(base)]
    for action, key, value in steps:
        top, model = layers[-1], models[-1]
        if action == "put":
            top.put(key, value)
            model[key] = value
        elif action == "delete":
            top.delete(key)
            model.pop(key, None)
        elif action == "scan":
            expected = sorted((k, v) for k, v in model.items() if k.startswith(key))
            assert list(top.scan(key)) == expected
        elif action == "child":
            layers.append(top.child())
            models.append(dict(model))
        elif action == "merge" and len(layers) > 1:
            layers.pop().merge_into_parent()
            models.pop()
            models[-1] = dict(model)
        elif action == "drop" and len(layers) > 1:
            layers.pop()
            models.pop()
    for layer, model in zip(layers, models, strict=True):
        assert list(layer.scan(b"")) == sorted(model.items())
        for key in model:
            assert layer.get(key) == model[key]


def test_a_scan_sees_writes_made_after_an_earlier_scan() -> None:
    state = State(DictReader({b"org/1": b"x"}))
    assert [k for k, _ in state.scan(b"org/")] == [b"org/1"]
    state.put(b"org/0", b"y")
    state.put(b"org/2", b"z")
    state.delete(b"org/1")
    child = state.child()
    assert [k for k, _ in child.scan(b"org/")] == [b"org/0", b"org/2"]
    child.put(b"org/1", b"again")
    child.merge_into_parent()
    assert [k for k, _ in state.scan(b"org/")] == [b"org/0", b"org/1", b"org/2"]


def test_a_small_merge_into_a_large_scanned_overlay_keeps_its_order() -> None:
    block = State(DictReader({}))
    for n in range(0, 40, 2):
        block.put(f"k/{n:02d}".encode(), b"v")
    assert len(list(block.scan(b"k/"))) == 20
    tx = block.child()
    tx.put(b"k/07", b"new")
    tx.put(b"k/08", b"changed")
    tx.merge_into_parent()
    keys = [k for k, _ in block.scan(b"k/")]
    assert keys == sorted(keys) and len(keys) == 21 and b"k/07" in keys
    assert dict(block.scan(b"k/08")) == {b"k/08": b"changed"}
