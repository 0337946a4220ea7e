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
    check_nesting(data)
    try:
        value = msgspec.msgpack.decode(data, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise LedgerError(Code.MALFORMED, f"cannot decode {_name(kind)}: {exc}") from None
    if _encoder.encode(value) != data:
        raise LedgerError(Code.MALFORMED, f"{_name(kind)} is not in canonical encoding")
    return value


_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}  # one per stored type (a few dozen)


def _decoder(kind: Any) -> msgspec.msgpack.Decoder[Any]:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    return decoder


def decode_stored(data: bytes, kind: type[T]) -> T:
    """Decode a value this ledger encoded itself (a state row; the state was checked against
    the app hash when it came from a snapshot). Its bytes came from a value of `kind`, so they
    are canonical and nest no deeper than `kind` does: `decode`'s checks for sender-controlled
    bytes are not repeated on every state read. Bytes that do not decode are still refused."""
    try:
        value: T = _decoder(kind).decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise LedgerError(Code.MALFORMED, f"cannot decode stored {_name(kind)}: {exc}") from None
    return value


MAX_NESTING = 32

# MessagePack headers: for each first byte, how many bytes of length (or payload) follow it.
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_FIXED |= {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}  # bin and str: length bytes
_EXT = {0xC7: 1, 0xC8: 2, 0xC9: 4}  # ext: length bytes, then a type byte
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # array and map


def check_nesting(data: bytes, limit: int = MAX_NESTING) -> None:
    """Refuse MessagePack nested deeper than `limit` before a decoder sees it.

    The decoder recurses, and Python's recursion limit counts the frames already on the stack,
    which differ between the ABCI server and the in-process driver: a value nested near the
    limit could be refused by one replica and accepted by another. This walk is iterative, so
    its answer depends only on the bytes."""
    pending: list[int] = []  # items still to read in each open container
    position, end = 0, len(data)
    while position < end:
        byte = data[position]
        position += 1
        count = 0
        if byte <= 0x7F or byte >= 0xE0:
            pass
        elif 0x80 <= byte <= 0x8F:
            count = 2 * (byte & 0x0F)
        elif 0x90 <= byte <= 0x9F:
            count = byte & 0x0F
        elif 0xA0 <= byte <= 0xBF:
            position += byte & 0x1F
        elif byte in _FIXED:
            position += _FIXED[byte]
        elif byte in _SIZED:
            width = _SIZED[byte]
            position += width + int.from_bytes(data[position : position + width], "big")
        elif byte in _EXT:
            width = _EXT[byte]
            position += width + 1 + int.from_bytes(data[position : position + width], "big")
        elif byte in _CONTAINERS:
            width, per_item = _CONTAINERS[byte]
            count = per_item * int.from_bytes(data[position : position + width], "big")
            position += width
        else:
            raise LedgerError(Code.MALFORMED, f"invalid MessagePack byte 0x{byte:02x}")
        while pending and pending[-1] == 0:
            pending.pop()
        if pending:
            pending[-1] -= 1
        if count:
            if count > end - position:
                raise LedgerError(Code.MALFORMED, "MessagePack container longer than its data")
            pending.append(count)
            if len(pending) > limit:
                raise LedgerError(Code.MALFORMED, f"values nest at most {limit} levels deep")


def tx_hash(raw: bytes) -> bytes:
    """A transaction's id, the same SHA-256 CometBFT uses for /tx lookups."""
    return hashlib.sha256(raw).digest()


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))
