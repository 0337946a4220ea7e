"""Pure-Python verification that a CometBFT block header was committed by its validators.

A header is accepted when (CometBFT v0.38 rules, `types.VerifyCommitLightAllSignatures`):

* its chain id is the expected one;
* the commit is for this header: the commit's height equals the header's height and the commit's
  block id hash equals `Header.Hash()`, the RFC 6962 Merkle root over the protobuf encodings of
  the 14 header fields;
* the given validator set is the one the header names: `ValidatorSet.Hash()`, the Merkle root
  over each validator's `SimpleValidator{pub_key, voting_power}` encoding, equals the header's
  `validators_hash` (and, when the caller pins one, the trusted validator set hash);
* the commit has exactly one entry per validator, and every entry flagged COMMIT comes from the
  validator at the same index (same address) and carries a valid Ed25519 signature over the
  length-prefixed `CanonicalVote` of a precommit for the block;
* the voting power of those signers is more than 2/3 of the set's total voting power.

Inputs are the JSON documents CometBFT's RPC returns from `/commit` and `/validators`; the whole
RPC response, its `result`, or the inner object are all accepted. All validators must be given
(the `/validators` endpoint pages; fetch every page). Only Ed25519 validator keys are supported.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

# The generated CometBFT classes and protobuf ship without typing markers in this environment;
# `unused-ignore` keeps these lines valid once stubs are configured.
from google.protobuf import (  # type: ignore[import-untyped, unused-ignore]
    timestamp_pb2,
    wrappers_pb2,
)
from tendermint.crypto import keys_pb2  # type: ignore[import-untyped, unused-ignore]
from tendermint.types import (  # type: ignore[import-untyped, unused-ignore]
    canonical_pb2,
    validator_pb2,
)
from tendermint.types import (  # type: ignore[import-untyped, unused-ignore]
    types_pb2 as cmt_types_pb2,
)
from tendermint.version import (  # type: ignore[import-untyped, unused-ignore]
    types_pb2 as version_pb2,
)

from medledger.crypto.keys import verify_signature

BLOCK_ID_FLAG_ABSENT = 1
BLOCK_ID_FLAG_COMMIT = 2
BLOCK_ID_FLAG_NIL = 3
ED25519_KEY_TYPE = "tendermint/PubKeyEd25519"
ADDRESS_BYTES = 20
ED25519_PUBKEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
HASH_BYTES = 32
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
UINT32_MAX = (1 << 32) - 1
INT32_MAX = (1 << 31) - 1
# CometBFT caps the total voting power of a validator set at MaxInt64 / 8.
MAX_TOTAL_VOTING_POWER = INT64_MAX // 8

_HEX_RE = re.compile(r"(?:[0-9A-Fa-f]{2})*")
_UINT_RE = re.compile(r"0|[1-9][0-9]*")
_RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# google.protobuf.Timestamp is valid from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS = -62135596800
_MAX_SECONDS = 253402300799

JSON = Any


class LightClientError(Exception):
    """A header, commit or validator set failed verification or could not be parsed."""


@dataclass(frozen=True)
class Validator:
    """One member of a validator set, as it is hashed into `validators_hash`."""

    address: bytes
    pub_key: bytes
    voting_power: int


@dataclass(frozen=True)
class VerifiedHeader:
    """The facts a verified header establishes about the chain at `height`."""

    chain_id: str
    height: int
    time: str
    header_hash: bytes
    app_hash: bytes
    validators_hash: bytes
    next_validators_hash: bytes
    signed_power: int
    total_power: int
    # Public keys of the validators whose commit signatures verified.
    signers: tuple[bytes, ...] = ()


# --- generic helpers ---------------------------------------------------------------------------


def merkle_root(items: Sequence[bytes]) -> bytes:
    """RFC 6962 Merkle root: SHA-256 of the empty string for no items, SHA-256(0x00 || item) for
    a leaf, SHA-256(0x01 || left || right) for an inner node, splitting n > 1 items at the largest
    power of two strictly less than n."""
    count = len(items)
    if count == 0:
        return hashlib.sha256(b"").digest()
    if count == 1:
        return hashlib.sha256(b"\x00" + items[0]).digest()
    split = 1 << ((count - 1).bit_length() - 1)
    left = merkle_root(items[:split])
    right = merkle_root(items[split:])
    return hashlib.sha256(b"\x01" + left + right).digest()


def _encode(message: Any) -> bytes:
    """The protobuf encoding of `message`, fields in field-number order as gogoproto writes them."""
    return bytes(message.SerializeToString(deterministic=True))


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(obj: JSON, key: str, where: str) -> JSON:
    if not isinstance(obj, Mapping):
        raise LightClientError(f"{where}: expected a JSON object")
    if key not in obj:
        raise LightClientError(f"{where}: missing field {key!r}")
    return obj[key]


def _str(obj: JSON, key: str, where: str) -> str:
    value = _field(obj, key, where)
    if not isinstance(value, str):
        raise LightClientError(f"{where}.{key}: expected a string")
    return value


def _int(obj: JSON, key: str, where: str, high: int) -> int:
    """A non-negative integer given as a JSON number or a decimal string (CometBFT writes 64-bit
    integers as strings)."""
    value = _field(obj, key, where)
    if isinstance(value, bool):
        raise LightClientError(f"{where}.{key}: expected an integer")
    if isinstance(value, str) and _UINT_RE.fullmatch(value):
        number = int(value)
    elif isinstance(value, int):
        number = value
    else:
        raise LightClientError(f"{where}.{key}: expected a non-negative integer, got {value!r}")
    if not 0 <= number <= high:
        raise LightClientError(f"{where}.{key}: {number} is out of range")
    return number


def _hex(obj: JSON, key: str, where: str, size: int | None = None) -> bytes:
    text = _str(obj, key, where)
    if not _HEX_RE.fullmatch(text):
        raise LightClientError(f"{where}.{key}: expected hex, got {text!r}")
    value = bytes.fromhex(text)
    if size is not None and len(value) != size:
        raise LightClientError(f"{where}.{key}: expected {size} bytes, got {len(value)}")
    return value


def _b64(obj: JSON, key: str, where: str) -> bytes:
    text = _str(obj, key, where)
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise LightClientError(f"{where}.{key}: expected base64") from None


def _unwrap(doc: JSON, key: str) -> JSON:
    """Accept a whole JSON-RPC response, its `result`, or the object under `key`."""
    if isinstance(doc, Mapping) and "result" in doc and "jsonrpc" in doc:
        doc = doc["result"]
    if isinstance(doc, Mapping) and key in doc:
        return doc[key]
    return doc


# --- encodings ---------------------------------------------------------------------------------


def parse_timestamp(text: str) -> timestamp_pb2.Timestamp:
    """The google.protobuf.Timestamp for an RFC 3339 time with up to nanosecond precision,
    exactly (no floating point): seconds since the Unix epoch in UTC and the nanosecond part."""
    match = _RFC3339_RE.fullmatch(text)
    if match is None:
        raise LightClientError(f"invalid RFC 3339 timestamp: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = match.group(7) or ""
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        raise LightClientError(f"invalid RFC 3339 timestamp: {text!r}") from None
    seconds = (moment - _EPOCH) // timedelta(seconds=1)
    if match.group(9) is not None:
        offset = int(match.group(10)) * 3600 + int(match.group(11)) * 60
        seconds += -offset if match.group(9) == "+" else offset
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise LightClientError(f"timestamp out of range: {text!r}")
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=int(fraction.ljust(9, "0")))


def _block_id_parts(block_id_json: JSON, where: str) -> tuple[bytes, int, bytes]:
    block_hash = _hex(block_id_json, "hash", where)
    parts = _field(block_id_json, "parts", where)
    total = _int(parts, "total", f"{where}.parts", UINT32_MAX)
    parts_hash = _hex(parts, "hash", f"{where}.parts")
    return block_hash, total, parts_hash


def _block_id_proto(block_id_json: JSON, where: str) -> cmt_types_pb2.BlockID:
    block_hash, total, parts_hash = _block_id_parts(block_id_json, where)
    proto = cmt_types_pb2.BlockID(hash=block_hash)
    # part_set_header is non-nullable in gogoproto, so it is always encoded, even when empty.
    proto.part_set_header.SetInParent()
    proto.part_set_header.total = total
    proto.part_set_header.hash = parts_hash
    return proto


def header_field_encodings(header_json: JSON) -> list[bytes]:
    """The 14 leaves of `Header.Hash()`, in header field order: the version as a
    tendermint.version.Consensus, the chain id as a StringValue, the height as an Int64Value, the
    time as a google.protobuf.Timestamp, the last block id as a tendermint.types.BlockID, and the
    nine hashes and the proposer address each as a BytesValue."""
    where = "header"
    version = _field(header_json, "version", where)
    consensus = version_pb2.Consensus(
        block=_int(version, "block", f"{where}.version", UINT64_MAX),
        app=_int(version, "app", f"{where}.version", UINT64_MAX) if "app" in version else 0,
    )
    chain_id = wrappers_pb2.StringValue(value=_str(header_json, "chain_id", where))
    height = wrappers_pb2.Int64Value(value=_int(header_json, "height", where, INT64_MAX))
    time = parse_timestamp(_str(header_json, "time", where))
    last_block_id = _block_id_proto(
        _field(header_json, "last_block_id", where), f"{where}.last_block_id"
    )
    leaves = [_encode(consensus), _encode(chain_id), _encode(height), _encode(time)]
    leaves.append(_encode(last_block_id))
    for key in (
        "last_commit_hash",
        "data_hash",
        "validators_hash",
        "next_validators_hash",
        "consensus_hash",
        "app_hash",
        "last_results_hash",
        "evidence_hash",
        "proposer_address",
    ):
        leaves.append(_encode(wrappers_pb2.BytesValue(value=_hex(header_json, key, where))))
    return leaves


def header_hash(header_json: JSON) -> bytes:
    """CometBFT's `Header.Hash()`: the Merkle root of the header's 14 field encodings. A header
    without a validators hash has no hash."""
    header_json = _unwrap(_unwrap(header_json, "signed_header"), "header")
    if not _hex(header_json, "validators_hash", "header"):
        raise LightClientError("header has no validators_hash, so it has no hash")
    return merkle_root(header_field_encodings(header_json))


def vote_sign_bytes(
    chain_id: str, height: int, round: int, block_id_json: JSON, timestamp: str
) -> bytes:
    """The bytes a validator signs for a precommit: the CanonicalVote {type PRECOMMIT, height and
    round as sfixed64, canonical block id (omitted for the zero block id), timestamp, chain id}
    encoded as protobuf and prefixed with its length as a uvarint."""
    if not 0 <= height <= INT64_MAX or not 0 <= round <= INT32_MAX:
        raise LightClientError(f"vote height/round out of range: {height}/{round}")
    block_hash, total, parts_hash = _block_id_parts(block_id_json, "block_id")
    vote = canonical_pb2.CanonicalVote(
        type=cmt_types_pb2.SignedMsgType.SIGNED_MSG_TYPE_PRECOMMIT,
        height=height,
        round=round,
        chain_id=chain_id,
    )
    vote.timestamp.CopyFrom(parse_timestamp(timestamp))  # non-nullable: always encoded
    if block_hash or total or parts_hash:
        vote.block_id.hash = block_hash
        vote.block_id.part_set_header.SetInParent()  # non-nullable: always encoded
        vote.block_id.part_set_header.total = total
        vote.block_id.part_set_header.hash = parts_hash
    body = _encode(vote)
    return _uvarint(len(body)) + body


def parse_validators(validators_json: JSON) -> list[Validator]:
    """The validator set from a `/validators` response, in the given order (the set's order).

    Refuses a paged response that does not hold the whole set, keys other than Ed25519, an
    address that is not SHA-256(public key)[:20], and duplicate addresses."""
    validators_json = _unwrap(validators_json, "validators")
    if isinstance(validators_json, Mapping):
        raise LightClientError("validators: expected a list of validators")
    if not isinstance(validators_json, Sequence) or isinstance(validators_json, str | bytes):
        raise LightClientError("validators: expected a list of validators")
    validators: list[Validator] = []
    seen: set[bytes] = set()
    for index, entry in enumerate(validators_json):
        where = f"validators[{index}]"
        pub_key = _field(entry, "pub_key", where)
        key_type = _str(pub_key, "type", f"{where}.pub_key")
        if key_type != ED25519_KEY_TYPE:
            raise LightClientError(f"{where}: unsupported validator key type {key_type!r}")
        key = _b64(pub_key, "value", f"{where}.pub_key")
        if len(key) != ED25519_PUBKEY_BYTES:
            raise LightClientError(f"{where}: Ed25519 public key must be 32 bytes")
        address = _hex(entry, "address", where, ADDRESS_BYTES)
        if address != hashlib.sha256(key).digest()[:ADDRESS_BYTES]:
            raise LightClientError(
                f"{where}: address {address.hex().upper()} does not match its public key"
            )
        if address in seen:
            raise LightClientError(f"{where}: duplicate validator {address.hex().upper()}")
        seen.add(address)
        power = _int(entry, "voting_power", where, MAX_TOTAL_VOTING_POWER)
        validators.append(Validator(address=address, pub_key=key, voting_power=power))
    return validators


def _check_complete(validators_json: JSON, count: int) -> None:
    doc = validators_json
    if isinstance(doc, Mapping) and "result" in doc and "jsonrpc" in doc:
        doc = doc["result"]
    if isinstance(doc, Mapping) and "total" in doc:
        total = _int(doc, "total", "validators", INT64_MAX)
        if total != count:
            raise LightClientError(
                f"validator set is incomplete: got {count} of {total} validators "
                "(fetch every page of /validators)"
            )


def validator_set_hash(validators: Sequence[Validator]) -> bytes:
    """CometBFT's `ValidatorSet.Hash()`: the Merkle root over each validator's SimpleValidator
    {pub_key as tendermint.crypto.PublicKey, voting_power} encoding, in set order."""
    leaves = []
    for validator in validators:
        simple = validator_pb2.SimpleValidator(
            pub_key=keys_pb2.PublicKey(ed25519=validator.pub_key),
            voting_power=validator.voting_power,
        )
        leaves.append(_encode(simple))
    return merkle_root(leaves)


# --- verification ------------------------------------------------------------------------------


def verify_commit(
    chain_id: str,
    signed_header_json: JSON,
    validators_json: JSON,
    *,
    trusted_validators_hash: bytes | None = None,
) -> VerifiedHeader:
    """Check that the header in `signed_header_json` was committed on `chain_id` by more than 2/3
    of the voting power of the validator set in `validators_json` (see the module docstring for
    the full rule). When `trusted_validators_hash` is given, the validator set must also hash to
    it; without it the caller is trusting the validator set it passes in."""
    signed_header = _unwrap(signed_header_json, "signed_header")
    header = _field(signed_header, "header", "signed_header")
    commit = _field(signed_header, "commit", "signed_header")

    header_chain = _str(header, "chain_id", "header")
    if header_chain != chain_id:
        raise LightClientError(
            f"wrong chain: expected {chain_id!r}, header is for {header_chain!r}"
        )

    height = _int(header, "height", "header", INT64_MAX)
    commit_height = _int(commit, "height", "commit", INT64_MAX)
    if commit_height != height:
        raise LightClientError(f"commit is for height {commit_height}, header is for {height}")

    computed = header_hash(header)
    commit_block_id = _field(commit, "block_id", "commit")
    signed = _hex(commit_block_id, "hash", "commit.block_id")
    if signed != computed:
        raise LightClientError(
            f"header hash mismatch: commit signs {signed.hex().upper()}, "
            f"header hashes to {computed.hex().upper()}"
        )

    validators = parse_validators(validators_json)
    _check_complete(validators_json, len(validators))
    set_hash = validator_set_hash(validators)
    header_vals_hash = _hex(header, "validators_hash", "header")
    if set_hash != header_vals_hash:
        raise LightClientError(
            f"validator set mismatch: header validators_hash is {header_vals_hash.hex().upper()}, "
            f"given validator set hashes to {set_hash.hex().upper()}"
        )
    if trusted_validators_hash is not None and set_hash != trusted_validators_hash:
        raise LightClientError(
            f"validator set mismatch: trusted validators hash is "
            f"{trusted_validators_hash.hex().upper()}, given set hashes to {set_hash.hex().upper()}"
        )
    total_power = sum(v.voting_power for v in validators)
    if total_power <= 0 or total_power > MAX_TOTAL_VOTING_POWER:
        raise LightClientError(f"validator set has invalid total voting power {total_power}")

    signatures = _field(commit, "signatures", "commit")
    if not isinstance(signatures, Sequence) or isinstance(signatures, str | bytes):
        raise LightClientError("commit.signatures: expected a list")
    if len(signatures) != len(validators):
        raise LightClientError(
            f"commit has {len(signatures)} signatures for {len(validators)} validators"
        )
    round_ = _int(commit, "round", "commit", INT32_MAX)

    signed_power = 0
    signers: list[bytes] = []
    for index, (sig, validator) in enumerate(zip(signatures, validators, strict=True)):
        where = f"commit.signatures[{index}]"
        flag = _int(sig, "block_id_flag", where, 255)
        if flag not in (BLOCK_ID_FLAG_ABSENT, BLOCK_ID_FLAG_COMMIT, BLOCK_ID_FLAG_NIL):
            raise LightClientError(f"{where}: unknown block_id_flag {flag}")
        if flag != BLOCK_ID_FLAG_COMMIT:
            continue
        name = validator.address.hex().upper()
        address = _hex(sig, "validator_address", where, ADDRESS_BYTES)
        if address != validator.address:
            raise LightClientError(
                f"{where}: validator address mismatch: expected {name}, got {address.hex().upper()}"
            )
        signature = _b64(sig, "signature", where)
        message = vote_sign_bytes(
            chain_id, height, round_, commit_block_id, _str(sig, "timestamp", where)
        )
        if len(signature) != ED25519_SIGNATURE_BYTES or not verify_signature(
            validator.pub_key, message, signature
        ):
            raise LightClientError(f"bad signature from validator {name} (index {index})")
        signed_power += validator.voting_power
        signers.append(validator.pub_key)

    if 3 * signed_power <= 2 * total_power:
        raise LightClientError(
            f"insufficient voting power: {signed_power}/{total_power} signed, need more than 2/3"
        )

    return VerifiedHeader(
        chain_id=chain_id,
        height=height,
        time=_str(header, "time", "header"),
        header_hash=computed,
        app_hash=_hex(header, "app_hash", "header"),
        validators_hash=header_vals_hash,
        next_validators_hash=_hex(header, "next_validators_hash", "header"),
        signed_power=signed_power,
        total_power=total_power,
        signers=tuple(signers),
    )
