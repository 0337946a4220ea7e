"""Canonical encoding and signatures."""

from __future__ import annotations

import pytest
from conftest import CHAIN_ID, keys_for
from hypothesis import given
from hypothesis import strategies as st

from medledger.client.tx import sign_transaction
from medledger.crypto.keys import verify_signature
from medledger.ledger import codec
from medledger.ledger.codec import Envelope
from medledger.ledger.errors import LedgerError

envelopes = st.builds(
    Envelope,
    chain_id=st.text(max_size=20),
    sender=st.text(max_size=40),
    nonce=st.integers(0, 2**63 - 1),
    type=st.text(max_size=20),
    body=st.binary(max_size=200),
    signature=st.binary(max_size=64),
)


@given(envelopes)
def test_envelope_round_trips_through_canonical_bytes(envelope: Envelope) -> None:
    raw = codec.encode(envelope)
    assert codec.decode(raw, Envelope) == envelope
    assert codec.encode(codec.decode(raw, Envelope)) == raw


@given(st.binary(max_size=100))
def test_arbitrary_bytes_decode_or_fail_cleanly(raw: bytes) -> None:
    try:
        envelope = codec.decode(raw, Envelope)
    except LedgerError:
        return
    assert codec.encode(envelope) == raw


@given(position=st.integers(min_value=0), flip=st.integers(1, 255))
def test_a_tampered_byte_breaks_the_signature(position: int, flip: int) -> None:
    keys = keys_for("signer")
    raw = sign_transaction(keys, CHAIN_ID, 7, "member.rotate", {"member": "m"})
    envelope = codec.decode(raw, Envelope)
    signed = bytearray(envelope.sign_bytes())
    signed[position % len(signed)] ^= flip
    assert verify_signature(keys.verify_key, envelope.sign_bytes(), envelope.signature)
    assert not verify_signature(keys.verify_key, bytes(signed), envelope.signature)


def test_tampered_transaction_bytes_fail_decoding_or_signature() -> None:
    keys = keys_for("signer")
    raw = sign_transaction(keys, CHAIN_ID, 7, "member.rotate", {"member": "m"})
    for position in range(len(raw)):
        tampered = bytearray(raw)
        tampered[position] ^= 0x01
        try:
            envelope = codec.decode(bytes(tampered), Envelope)
        except LedgerError:
            continue
        assert not verify_signature(keys.verify_key, envelope.sign_bytes(), envelope.signature)


def test_decode_rejects_trailing_bytes() -> None:
    raw = sign_transaction(keys_for("signer"), CHAIN_ID, 1, "member.rotate", {})
    with pytest.raises(LedgerError):
        codec.decode(raw + b"\x00", Envelope)
