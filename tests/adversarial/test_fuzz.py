"""Fuzzing the ledger's real interfaces: signed transactions of every type with hostile bodies
(deep nesting, huge integers and strings, invalid UTF-8, duplicate keys, wrong types), garbage
envelopes, and random queries. Two replicas fed the same blocks never raise and always agree on
the app hash; CheckTx and Query answer every input.

`make test` runs a bounded number of examples; `make fuzz` runs many more
(MEDLEDGER_FUZZ_EXAMPLES, default 5000 there). A failure replays from the seed hypothesis prints.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
from conftest import CHAIN_ID, ORGANIZATIONS, genesis_app_state, keys_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tendermint.abci import types_pb2 as abci

from medledger.abci import queries
from medledger.abci.application import LedgerApplication
from medledger.client.tx import sign_transaction
from medledger.ledger.codec import Envelope
from medledger.ledger.errors import LedgerError
from medledger.ledger.model import Role, nonce_key
from medledger.ledger.rules import TRANSACTION_RULES
from medledger.ledger.state import State
from medledger.ledger.transactions import EnrollMember
from medledger.node.inprocess import InProcessChain
from medledger.store.sqlite import SqliteStore

EXAMPLES = int(os.environ.get("MEDLEDGER_FUZZ_EXAMPLES", "60"))
# Which results the run reached, per type (printed by `make fuzz`: a fuzzer that only ever hits
# MALFORMED proves little).
CODES: Counter[str] = Counter()
ORG_IDS = [org for org, _, _ in ORGANIZATIONS]
CAST = {
    "patient": ("st-mary", Role.PATIENT),
    "clinician": ("st-mary", Role.CLINICIAN),
    "lab": ("northside-lab", Role.LAB),
    "billing": ("st-mary", Role.BILLING),
    "insurer": ("careplus", Role.BILLING),
    "ehr": ("st-mary", Role.EHR),
    "er": ("riverside", Role.EMERGENCY),
}
SENDERS = [f"{org}/admin" for org in ORG_IDS] + list(CAST)
ROLES = {f"{org}/admin": Role.ADMIN for org in ORG_IDS} | {n: r for n, (_, r) in CAST.items()}
KNOWN_IDS = (
    [keys_for(name).member_id for name in SENDERS]
    + ORG_IDS
    + ["rec-1", "rec-2", "claim-1", "0" * 32, "a" * 64]
)

# Hostile msgpack, already encoded: embedded with msgspec.Raw wherever a value goes.
DEEP_ARRAY_BYTES = b"\x91" * 50_000 + b"\xc0"
DEEP_ARRAY = msgspec.Raw(DEEP_ARRAY_BYTES)
DEEP_MAP = msgspec.Raw(b"\x81\xa1k" * 20_000 + b"\xc0")
INVALID_UTF8 = msgspec.Raw(b"\xa3\xff\xfe\xfd")
TRUNCATED = msgspec.Raw(b"\xdb\xff\xff\xff\xff")
HUGE_COUNT = msgspec.Raw(b"\xdd\xff\xff\xff\xff")
hostile = st.one_of(
    st.sampled_from([DEEP_ARRAY, DEEP_MAP, INVALID_UTF8, TRUNCATED, HUGE_COUNT]),
    st.just("x" * 3_000),
    st.sampled_from([2**63, 2**64 - 1, -(2**63), -1, 0]),
    st.floats(allow_nan=True),
    st.none(),
    st.recursive(
        st.one_of(st.integers(), st.text(max_size=5), st.binary(max_size=5), st.booleans()),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=3), children, max_size=3)
        ),
        max_leaves=20,
    ),
)

text = st.one_of(
    st.sampled_from(KNOWN_IDS),
    st.text(max_size=20),
    st.sampled_from(["", " ", "rec-1\n", "a" * 64 + "\n", "Observation", "laboratory"]),
)
integers = st.one_of(
    st.integers(-5, 5),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([2**31, 2**53 + 1, 2**63 - 1, 2**64 - 1, 1_767_225_600 * 10**9]),
)


def value_for(kind: mi.Type, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values of roughly the right type, some of them hostile."""
    if depth > 3:
        return hostile
    match kind:
        case mi.StrType():
            typed: st.SearchStrategy[Any] = text
        case mi.BytesType():
            typed = st.one_of(st.binary(max_size=40), st.binary(min_size=32, max_size=32))
        case mi.IntType():
            typed = integers
        case mi.BoolType():
            typed = st.booleans()
        case mi.EnumType():
            typed = mostly(st.sampled_from([m.value for m in kind.cls]), text, 10)
        case mi.VarTupleType() | mi.ListType():
            typed = st.lists(value_for(kind.item_type, depth + 1), max_size=4)
        case mi.StructType():
            typed = body_for(kind, depth + 1)
        case mi.UnionType():
            typed = st.one_of(*(value_for(t, depth + 1) for t in kind.types))
        case _:
            typed = hostile
    return mostly(typed, hostile, 20)


def body_for(info: mi.StructType, depth: int = 0) -> st.SearchStrategy[Any]:
    fields = {f.encode_name: value_for(f.type, depth) for f in info.fields}
    base = st.fixed_dictionaries(
        {name: s for name, s in fields.items()}
        | ({info.tag_field: st.just(info.tag)} if info.tag_field else {})
    )
    # Now and then a field left out, or an unknown one added.
    odd = st.one_of(
        base.map(lambda d: dict(list(d.items())[1:])),
        base.map(lambda d: d | {"unexpected": 1}),
    )
    return mostly(base, odd, 10)


def mostly(usual: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], odds: int) -> Any:
    """`rare` once in `odds` draws (st.one_of would pick each branch equally often)."""
    return st.integers(1, odds).flatmap(lambda n: rare if n == 1 else usual)


def encode_body(body: Any, duplicate: bool) -> bytes:
    raw = msgspec.msgpack.encode(body)
    if duplicate and isinstance(body, dict) and body:
        # The same key twice: a map header with one more entry, the first pair repeated.
        key, value = next(iter(body.items()))
        pair = msgspec.msgpack.encode(key) + msgspec.msgpack.encode(value)
        count = len(body) + 1
        if count < 16:
            raw = bytes([0x80 | count]) + pair + raw[1:]
    return raw


tx_spec = st.tuples(
    st.sampled_from(SENDERS),
    st.sampled_from(sorted(TRANSACTION_RULES)),
    st.data(),
    st.sampled_from(["next"] * 8 + ["random", "garbage", "envelope", "hostile"]),
    st.integers(0, 9).map(lambda n: n == 0),  # now and then a key twice
)
blocks = st.lists(st.lists(tx_spec, max_size=6), min_size=1, max_size=6)


class Factory:
    """Signs transactions with the nonce each sender needs next: the committed one plus those
    already in the block being built (refused transactions leave theirs unused)."""

    def __init__(self) -> None:
        self.nonces: dict[str, int] = {}

    def start_block(self, store: SqliteStore) -> None:
        state = State(store)
        self.nonces = {
            keys_for(name).member_id: state.read(nonce_key(keys_for(name).member_id), int) or 0
            for name in SENDERS
        }

    def signed(self, name: str, tx_type: str, body: bytes, nonce: int | None = None) -> bytes:
        keys = keys_for(name)
        if nonce is None:
            nonce = self.nonces.get(keys.member_id, 0) + 1
            self.nonces[keys.member_id] = nonce
        envelope = Envelope(CHAIN_ID, keys.member_id, nonce, tx_type, body, b"")
        signature = keys.sign(envelope.sign_bytes())
        return msgspec.msgpack.encode(
            Envelope(CHAIN_ID, keys.member_id, nonce, tx_type, body, signature)
        )

    def setup(self) -> list[bytes]:
        txs = []
        for name, (org, role) in CAST.items():
            keys = keys_for(name)
            body = EnrollMember(keys.verify_key, keys.encryption_key, role)
            txs.append(
                sign_transaction(
                    keys_for(f"{org}/admin"),
                    CHAIN_ID,
                    self.next(f"{org}/admin"),
                    "member.enroll",
                    body,
                )
            )
        return txs

    def next(self, name: str) -> int:
        member_id = keys_for(name).member_id
        self.nonces[member_id] = self.nonces.get(member_id, 0) + 1
        return self.nonces[member_id]


def build(factory: Factory, spec: tuple[str, str, Any, str, bool]) -> bytes:
    sender, tx_type, data, mode, duplicate = spec
    allowed = [name for name in SENDERS if ROLES[name] in TRANSACTION_RULES[tx_type].roles]
    if allowed and data.draw(st.integers(0, 4), "fit"):
        # Mostly a sender whose role may send the type, so that handlers run.
        sender = allowed[SENDERS.index(sender) % len(allowed)]
    if mode == "garbage":
        return data.draw(st.one_of(st.binary(max_size=200), st.just(DEEP_ARRAY_BYTES)), "garbage")
    info = mi.type_info(TRANSACTION_RULES[tx_type].body)
    assert isinstance(info, mi.StructType)
    body = data.draw(hostile if mode == "hostile" else body_for(info), "body")
    try:
        raw_body = encode_body(body, duplicate)
    except (OverflowError, TypeError, ValueError, RecursionError):
        raw_body = b"\xc1"
    if mode == "envelope":
        # A hostile envelope: its fields replaced by hostile values, still signed-looking.
        fields = data.draw(st.lists(hostile, min_size=6, max_size=6), "envelope")
        try:
            return msgspec.msgpack.encode(fields)
        except (OverflowError, TypeError, ValueError, RecursionError):
            return b"\x96" + b"\xc0" * 6
    nonce = data.draw(integers, "nonce") if mode == "random" else None
    if nonce is not None and not 0 <= nonce < 2**64:
        nonce = 2**64 - 1
    return factory.signed(sender, tx_type, raw_body, nonce)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(chain_blocks=blocks)
def test_replicas_never_raise_and_agree_on_hostile_blocks(
    chain_blocks: list[list[tuple[str, str, Any, str, bool]]],
) -> None:
    factory = Factory()
    app_state = genesis_app_state()
    with tempfile.TemporaryDirectory() as tmp:
        a = InProcessChain(Path(tmp) / "a.db", CHAIN_ID, app_state)
        b = InProcessChain(Path(tmp) / "b.db", CHAIN_ID, app_state)
        app = LedgerApplication(a.store)
        try:
            for number in range(len(chain_blocks) + 1):
                if number == 0:
                    txs = factory.setup()
                else:
                    factory.start_block(a.store)
                    txs = [build(factory, spec) for spec in chain_blocks[number - 1]]
                for tx in txs:
                    app.ledger.check_tx(tx)  # answers; never raises
                proposed = app.ledger.select_for_proposal(txs, 4 << 20)
                assert set(proposed) <= set(txs)
                outcome_a = a.run_block(txs)
                outcome_b = b.run_block(txs)
                assert len(outcome_a.results) == len(txs)
                assert outcome_a.app_hash == outcome_b.app_hash
                assert [r.code for r in outcome_a.results] == [r.code for r in outcome_b.results]
                CODES.update(f"{r.type or '?'}:{r.code.name}" for r in outcome_a.results)
        finally:
            a.close()
            b.close()


query_paths = st.one_of(st.sampled_from(sorted(queries.QUERIES)), st.text(max_size=30))
query_data = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"9" * 20, b"-1", b"1e9", b"\xff\xfe", b"{}", b"[" * 5000, b"9" * 5000]),
    st.sampled_from([k.encode() for k in KNOWN_IDS]),
    st.sampled_from([b"patient:", b"provider:st-mary", b"insurer:" + b"\x00"]),
)


@settings(max_examples=EXAMPLES * 4, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=query_paths, data=query_data, prove=st.booleans())
def test_queries_answer_every_input(path: str, data: bytes, prove: bool) -> None:
    try:
        queries.answer(STORE_CHAIN.store, path, data, prove)
    except LedgerError as err:
        assert err.message
    response = STORE_APP.query(abci.RequestQuery(path=path, data=data, prove=prove))
    assert response.code == 0 or response.log


_tmp = tempfile.TemporaryDirectory()
STORE_CHAIN = InProcessChain(Path(_tmp.name) / "q.db", CHAIN_ID, genesis_app_state())
STORE_CHAIN.run_block(Factory().setup())
STORE_APP = LedgerApplication(STORE_CHAIN.store)


def test_fuzz_reached_the_handlers() -> None:
    """Printed with -s; the bounded run in `make test` must at least reach some handlers."""
    if not CODES:
        return
    print("\nfuzz results:", dict(sorted(CODES.items())))
    assert any(not name.startswith("?") for name in CODES)


@settings(max_examples=EXAMPLES * 4, deadline=None)
@given(
    value=st.recursive(
        st.one_of(
            st.integers(-(2**63), 2**64 - 1),
            st.text(max_size=5),
            st.binary(max_size=5),
            st.booleans(),
            st.none(),
            st.floats(),
        ),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=3), children, max_size=3)
        ),
        max_leaves=40,
    )
)
def test_the_nesting_check_walks_any_msgpack_value(value: Any) -> None:
    """The iterative walk agrees with the real encoder on every value: it accepts what nests
    at most MAX_NESTING deep and refuses deeper values, and never reads past the end."""
    from medledger.ledger.codec import MAX_NESTING, check_nesting

    raw = msgspec.msgpack.encode(value)
    deep = raw
    for _ in range(MAX_NESTING):
        deep = b"\x91" + deep
    check_nesting(raw)
    if isinstance(value, (list, dict)) and value:
        try:
            check_nesting(deep)
        except LedgerError:
            pass
        else:
            raise AssertionError("a value nested beyond the limit passed")
    for cut in range(1, min(len(raw), 8)):
        with contextlib.suppress(LedgerError):
            check_nesting(raw[:-cut])
