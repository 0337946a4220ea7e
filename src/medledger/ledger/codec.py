"""Canonical byte encoding of transactions and ledger values.

Everything the ledger signs, hashes or stores is MessagePack produced by msgspec from typed
structs, whose fields are always written in declaration order with the shortest integer form.
Decoding re-encodes and compares, so each value has exactly one accepted byte form: a
transaction cannot be re-encoded into a second id for the same content.
"""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

import msgspec

from medledger.ledger.errors import Code, LedgerError

T = TypeVar("T")

SIGN_DOMAIN = b"medledger/tx/v1\x00"

_encoder = msgspec.msgpack.Encoder()


class Envelope(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A signed transaction: who sends what, to which chain, with which nonce."""

    chain_id: str
    sender: str
    nonce: int
    type: str
    body: bytes
    signature: bytes

    def sign_bytes(self) -> bytes:
        """The bytes the sender signs: a domain tag, then every field but the signature."""
        return SIGN_DOMAIN + _encoder.encode(
            (self.chain_id, self.sender, self.nonce, self.type, self.body)
        )


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def decode(data: bytes, kind: type[T]) -> T:
    """Decode canonical bytes into `kind`; non-canonical or malformed input is refused."""
    try:
        value = msgspec.msgpack.decode(data, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise LedgerError(Code.MALFORMED, f"cannot decode {_name(kind)}: {exc}") from None
    if _encoder.encode(value) != data:
        raise LedgerError(Code.MALFORMED, f"{_name(kind)} is not in canonical encoding")
    return value


def tx_hash(raw: bytes) -> bytes:
    """A transaction's id, the same SHA-256 CometBFT uses for /tx lookups."""
    return hashlib.sha256(raw).digest()


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))
