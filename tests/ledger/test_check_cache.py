"""The check cache: a transaction's bytes are decoded and its signature verified once per node,
however often it is checked (CheckTx, every recheck, its block); only speed depends on it."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from conftest import CHAIN_ID, Consortium, genesis_app_state, keys_for

from medledger.client.tx import sign_transaction
from medledger.crypto.keys import KeyPair
from medledger.ledger import codec, execution
from medledger.ledger.codec import Envelope
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.execution import CheckCache
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.node.inprocess import InProcessChain


def enrollment(c: Consortium, name: str) -> bytes:
    keys = keys_for(name)
    body = EnrollMember(keys.verify_key, keys.encryption_key, Role.PATIENT)
    return c.tx(c.admin("st-mary"), "member.enroll", body)


def count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls = [0]
    original = getattr(execution.codec, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(execution.codec, name, counted)
    return calls


def test_a_transaction_is_decoded_once_from_checktx_through_recheck_to_its_block(
    consortium: Consortium, monkeypatch: pytest.MonkeyPatch
) -> None:
    tx = enrollment(consortium, "cache-1")
    nesting = count_calls(monkeypatch, "check_nesting")
    ledger = consortium.chain.ledger
    assert ledger.check_tx(tx).ok
    assert nesting[0] == 2  # the envelope, then the body
    assert ledger.check_tx(tx, recheck=True).ok
    assert ledger.select_for_proposal([tx], 1 << 20) == [tx]
    outcome = consortium.run(tx)
    assert outcome.results[0].ok, outcome.results[0].log
    assert nesting[0] == 2


def signed_raw(keys: KeyPair, nonce: int, body: bytes) -> bytes:
    """A member.enroll transaction carrying `body` exactly as given (canonical or not)."""
    unsigned = Envelope(CHAIN_ID, keys.member_id, nonce, "member.enroll", body, b"")
    signature = keys.sign(unsigned.sign_bytes())
    return codec.encode(Envelope(CHAIN_ID, keys.member_id, nonce, "member.enroll", body, signature))


def test_the_cache_changes_no_result_only_the_work(tmp_path: Path) -> None:
    """The same blocks on a replica that checked every transaction in CheckTx first (and
    rechecked it) and on one that saw none end with the same results and app hash, refusals
    included: a replayed transaction, a signature by the wrong key, a body that is not in
    canonical encoding."""
    warm = Consortium(InProcessChain(tmp_path / "warm.db", CHAIN_ID, genesis_app_state()))
    cold = Consortium(InProcessChain(tmp_path / "cold.db", CHAIN_ID, genesis_app_state()))
    admin = keys_for("st-mary/admin")
    first = enrollment(warm, "cache-2")
    other = keys_for("cache-3")
    body = codec.encode(EnrollMember(other.verify_key, other.encryption_key, Role.PATIENT))
    fields = msgspec.msgpack.decode(body)
    reordered = msgspec.msgpack.encode(dict(reversed(list(fields.items()))))
    assert reordered != body and msgspec.msgpack.decode(reordered) == fields
    by_wrong_key = Envelope(CHAIN_ID, admin.member_id, 2, "member.enroll", body, b"")
    wrong_key = codec.encode(
        Envelope(
            *list(msgspec.structs.astuple(by_wrong_key))[:5], other.sign(by_wrong_key.sign_bytes())
        )
    )
    blocks = [
        [first],
        [first, wrong_key, signed_raw(admin, 2, reordered)],
        [signed_raw(admin, 2, body)],
    ]
    for block in blocks:
        for tx in block:
            warm.chain.ledger.check_tx(tx)
            warm.chain.ledger.check_tx(tx, recheck=True)
        a, b = warm.chain.run_block(block), cold.chain.run_block(block)
        assert [(r.code, r.log) for r in a.results] == [(r.code, r.log) for r in b.results]
        assert a.app_hash == b.app_hash
        if block is blocks[1]:
            codes = [r.code for r in a.results]
            assert codes == [Code.BAD_NONCE, Code.BAD_SIGNATURE, Code.INVALID_BODY]
    assert a.results[0].ok, a.results[0].log


def test_the_cache_is_bounded_by_the_bytes_it_holds_and_forgets_the_oldest() -> None:
    cache = CheckCache(capacity=1000, decoded_bytes=3000)
    admin = keys_for("st-mary/admin")
    txs = []
    for nonce in range(1, 21):
        keys = keys_for(f"bounded-{nonce}")
        body = EnrollMember(keys.verify_key, keys.encryption_key, Role.PATIENT)
        txs.append(sign_transaction(admin, CHAIN_ID, nonce, "member.enroll", body))
    for tx in txs:
        cache.envelope(execution.codec.tx_hash(tx), tx)
    held = sum(len(tx) for tx in txs[-len(cache._decoded) :])
    assert held <= 3000 and cache._decoded_bytes == held
    assert execution.codec.tx_hash(txs[0]) not in cache._decoded
    assert execution.codec.tx_hash(txs[-1]) in cache._decoded


def test_bytes_that_do_not_decode_are_refused_every_time_and_never_cached() -> None:
    cache = CheckCache()
    garbage = b"\x95\x01\x02"
    for _ in range(2):
        with pytest.raises(LedgerError):
            cache.envelope(execution.codec.tx_hash(garbage), garbage)
    assert not cache._decoded
