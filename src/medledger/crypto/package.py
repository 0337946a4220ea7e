"""The off-chain encrypted record package and the threshold custody of its data key.

A record version's plaintext is encrypted under a fresh random 32-byte data key K with
XChaCha20-Poly1305 (random 24-byte nonce); the associated data binds the context — a domain tag,
the record id, the record version, the patient id and the author id, each length-prefixed — so a
ciphertext cannot be moved to another record, version, patient or author.

K reaches its readers in three ways, all inside the package:

- sealed (`nacl.public.SealedBox`) to the patient's X25519 encryption key;
- sealed to the author's X25519 encryption key;
- split t-of-n among the custodian nodes with Shamir secret sharing (pycryptodome's `Shamir`,
  which shares 16-byte secrets, so K is shared as two 16-byte halves with the same indices), each
  share sealed to one custodian. Fewer than t shares reveal nothing about K, so no single node
  (for t >= 2) can decrypt a record.

Each share carries a commitment SHA-256(domain || record id || version || index || share) in the
package, so a reader detects a corrupted, swapped or wrongly-indexed share before combining. The
package's digest is on-chain, so these commitments are as trustworthy as the chain. Hash
commitments do not stop a dishonest author from dealing inconsistent shares; that, and any wrong
key, is caught at decryption by the AEAD tag and the on-chain plaintext commitment.

The chain stores a keyed commitment to the plaintext: HMAC-SHA256 under
HKDF-SHA256(K, info="medledger/record-commitment/v1"). Only holders of K can test a guess, so
the chain cannot be brute-forced for content. Because it is computed under K, checking it after
decryption also makes the whole scheme key-committing: a package cannot decrypt to two different
plaintexts under two different keys that both match the chain.

The package is a msgspec Struct encoded canonically as MessagePack (fields in declaration order);
its content address is the SHA-256 hex digest of the encoded bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec
import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.utils
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 24
PUBLIC_KEY_BYTES = 32
COMMITMENT_BYTES = 32
MAX_CUSTODIANS = 255

_HALF_BYTES = 16
_SEAL_OVERHEAD = 48  # SealedBox: 32-byte ephemeral public key + 16-byte Poly1305 tag
_AEAD_TAG_BYTES = 16
_SHARE_WIRE_BYTES = 2 + KEY_BYTES  # index (u16, big-endian) + the two 16-byte halves
_MAX_RECORD_VERSION = 2**64 - 1

AD_DOMAIN = b"medledger/record-package/v1"
SHARE_DOMAIN = b"medledger/record-share/v1"
COMMITMENT_INFO = b"medledger/record-commitment/v1"


class PackageError(ValueError):
    """A package, key, envelope or share is malformed, does not open, or does not verify."""


@dataclass(frozen=True)
class Custodian:
    """A custodian node of an organization: its share index (1..n) and X25519 encryption key."""

    organization: str
    index: int
    encryption_key: bytes


@dataclass(frozen=True)
class Share:
    """One Shamir share of a data key: its index and 32 bytes (the shares of K's two halves)."""

    index: int
    value: bytes

    def to_bytes(self) -> bytes:
        """Wire form: the index as a big-endian u16, then the 32 share bytes."""
        return struct.pack(">H", self.index) + self.value

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != _SHARE_WIRE_BYTES:
            raise PackageError(f"a share is {_SHARE_WIRE_BYTES} bytes, got {len(data)}")
        (index,) = struct.unpack(">H", data[:2])
        if index < 1:
            raise PackageError("a share index starts at 1")
        return cls(index=index, value=data[2:])


@dataclass(frozen=True)
class SealedRecord:
    """The result of sealing: the encoded package, its digest and the plaintext commitment."""

    package: bytes
    digest: str
    commitment: bytes


@dataclass(frozen=True)
class ShareCheck:
    """Shares sorted into the valid ones (one per index) and the indices of the invalid ones."""

    valid: tuple[Share, ...]
    invalid: tuple[int, ...]


class ShareEntry(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One custodian's share in a package: sealed to its key, with the share's commitment."""

    organization: str
    index: int
    sealed: bytes
    commitment: bytes


class RecordPackage(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """The encrypted record package as stored off-chain in every node's blob store."""

    version: int
    record_id: str
    record_version: int
    patient: str
    author: str
    nonce: bytes
    ciphertext: bytes
    patient_envelope: bytes
    author_envelope: bytes
    threshold: int
    shares: tuple[ShareEntry, ...]


_encoder = msgspec.msgpack.Encoder()


# -- sealing ------------------------------------------------------------------------------------


def seal_record(
    plaintext: bytes,
    *,
    record_id: str,
    record_version: int,
    patient: str,
    author: str,
    patient_key: bytes,
    author_key: bytes,
    custodians: Sequence[Custodian],
    threshold: int,
) -> SealedRecord:
    """Encrypt `plaintext` under a fresh data key and build its package (see module docstring).

    Custodian indices must be exactly 1..n, organizations distinct, 1 <= threshold <= n.
    """
    _check_context(record_id, record_version, patient, author)
    _check_public_key(patient_key, "patient")
    _check_public_key(author_key, "author")
    ordered = _check_custodians(custodians)
    if not 1 <= threshold <= len(ordered):
        raise PackageError(f"threshold must be between 1 and {len(ordered)}, got {threshold}")

    data_key = nacl.utils.random(KEY_BYTES)
    nonce = nacl.utils.random(NONCE_BYTES)
    ad = _associated_data(record_id, record_version, patient, author)
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        bytes(plaintext), ad, nonce, data_key
    )
    entries = tuple(
        ShareEntry(
            organization=custodian.organization,
            index=share.index,
            sealed=_seal(share.to_bytes(), custodian.encryption_key, custodian.organization),
            commitment=_share_commitment(record_id, record_version, share),
        )
        for custodian, share in zip(ordered, _split(data_key, threshold, len(ordered)), strict=True)
    )
    package = RecordPackage(
        version=FORMAT_VERSION,
        record_id=record_id,
        record_version=record_version,
        patient=patient,
        author=author,
        nonce=nonce,
        ciphertext=ciphertext,
        patient_envelope=_seal(data_key, patient_key, "patient"),
        author_envelope=_seal(data_key, author_key, "author"),
        threshold=threshold,
        shares=entries,
    )
    _check_package(package)
    encoded = _encoder.encode(package)
    return SealedRecord(
        package=encoded,
        digest=package_digest(encoded),
        commitment=plaintext_commitment(data_key, plaintext),
    )


def plaintext_commitment(data_key: bytes, plaintext: bytes) -> bytes:
    """HMAC-SHA256 of the plaintext under HKDF-SHA256(K, info="medledger/record-commitment/v1")."""
    _check_data_key(data_key)
    mac = crypto_hmac.HMAC(_commitment_key(data_key), hashes.SHA256())
    mac.update(plaintext)
    return mac.finalize()


# -- decoding -----------------------------------------------------------------------------------


def package_digest(data: bytes) -> str:
    """A package's content address: the SHA-256 hex digest of its encoded bytes."""
    return hashlib.sha256(data).hexdigest()


def decode_package(data: bytes) -> RecordPackage:
    """Decode canonical package bytes; anything malformed or non-canonical is a PackageError."""
    try:
        package = msgspec.msgpack.decode(data, type=RecordPackage)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise PackageError(f"not a record package: {exc}") from None
    if _encoder.encode(package) != data:
        raise PackageError("record package is not in canonical encoding")
    _check_package(package)
    return package


# -- opening ------------------------------------------------------------------------------------


def open_envelope(package: RecordPackage, secret_key: bytes) -> bytes:
    """The data key from the patient envelope, else the author envelope, for this secret key."""
    box = nacl.public.SealedBox(_private_key(secret_key))
    for envelope in (package.patient_envelope, package.author_envelope):
        try:
            data_key = box.decrypt(envelope)
        except nacl.exceptions.CryptoError:
            continue
        if len(data_key) == KEY_BYTES:
            return data_key
    raise PackageError("this key opens neither the patient nor the author envelope")


def open_custodian_share(package: RecordPackage, organization: str, node_secret: bytes) -> Share:
    """The share sealed to `organization`'s custodian, opened and checked against its commitment."""
    entry = next((e for e in package.shares if e.organization == organization), None)
    if entry is None:
        raise PackageError(f"the package holds no share for organization {organization!r}")
    share = unseal_share(entry.sealed, node_secret)
    if share.index != entry.index or not share_is_valid(package, share):
        raise PackageError(
            f"share {entry.index} for organization {organization!r} does not match its commitment"
        )
    return share


def reseal_share(share: Share, recipient_key: bytes) -> bytes:
    """The share sealed to a recipient's X25519 key (a custodian releasing it to a grantee)."""
    return _seal(share.to_bytes(), recipient_key, "recipient")


def unseal_share(sealed: bytes, recipient_secret: bytes) -> Share:
    """Open a sealed share with the recipient's X25519 secret key."""
    try:
        data = nacl.public.SealedBox(_private_key(recipient_secret)).decrypt(sealed)
    except nacl.exceptions.CryptoError:
        raise PackageError("the sealed share does not open with this key") from None
    return Share.from_bytes(data)


def share_is_valid(package: RecordPackage, share: Share) -> bool:
    """True when the package holds a share at `share.index` whose commitment matches `share`."""
    entry = next((e for e in package.shares if e.index == share.index), None)
    if entry is None or len(share.value) != KEY_BYTES:
        return False
    expected = _share_commitment(package.record_id, package.record_version, share)
    return hmac.compare_digest(expected, entry.commitment)


def check_shares(package: RecordPackage, shares: Iterable[Share]) -> ShareCheck:
    """Sort shares into valid ones (first of each index, ordered by index) and invalid indices."""
    valid: dict[int, Share] = {}
    invalid: list[int] = []
    for share in shares:
        if share_is_valid(package, share):
            valid.setdefault(share.index, share)
        else:
            invalid.append(share.index)
    return ShareCheck(
        valid=tuple(valid[i] for i in sorted(valid)), invalid=tuple(sorted(set(invalid)))
    )


def combine_shares(package: RecordPackage, shares: Iterable[Share]) -> bytes:
    """Recover the data key from at least `threshold` valid shares; invalid ones are left out.

    Invalid shares are logged; with fewer than `threshold` valid shares left the PackageError
    names the invalid indices.
    """
    check = check_shares(package, shares)
    if check.invalid:
        logger.warning(
            "ignoring invalid shares %s of record %s version %d",
            list(check.invalid),
            package.record_id,
            package.record_version,
        )
    if len(check.valid) < package.threshold:
        message = (
            f"need {package.threshold} valid shares to recover the data key, "
            f"have {len(check.valid)}"
        )
        if check.invalid:
            message += f"; invalid shares: {', '.join(map(str, check.invalid))}"
        raise PackageError(message)
    chosen = check.valid[: package.threshold]  # pycryptodome wants exactly k shares
    low = Shamir.combine([(s.index, s.value[:_HALF_BYTES]) for s in chosen])
    high = Shamir.combine([(s.index, s.value[_HALF_BYTES:]) for s in chosen])
    return low + high


def decrypt_record(package: RecordPackage, data_key: bytes, expected_commitment: bytes) -> bytes:
    """The plaintext, once the AEAD tag and the on-chain plaintext commitment both verify."""
    _check_data_key(data_key)
    ad = _associated_data(
        package.record_id, package.record_version, package.patient, package.author
    )
    try:
        plaintext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            package.ciphertext, ad, package.nonce, data_key
        )
    except nacl.exceptions.CryptoError:
        raise PackageError(
            "record ciphertext does not authenticate: wrong data key or tampered package"
        ) from None
    mac = crypto_hmac.HMAC(_commitment_key(data_key), hashes.SHA256())
    mac.update(plaintext)
    try:
        mac.verify(expected_commitment)
    except InvalidSignature:
        raise PackageError(
            "decrypted record does not match the on-chain plaintext commitment"
        ) from None
    return plaintext


# -- internals ----------------------------------------------------------------------------------


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _associated_data(record_id: str, record_version: int, patient: str, author: str) -> bytes:
    return (
        _lp(AD_DOMAIN)
        + _lp(record_id.encode())
        + struct.pack(">Q", record_version)
        + _lp(patient.encode())
        + _lp(author.encode())
    )


def _share_commitment(record_id: str, record_version: int, share: Share) -> bytes:
    return hashlib.sha256(
        _lp(SHARE_DOMAIN)
        + _lp(record_id.encode())
        + struct.pack(">Q", record_version)
        + struct.pack(">H", share.index)
        + share.value
    ).digest()


def _commitment_key(data_key: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=COMMITMENT_INFO)
    return hkdf.derive(data_key)


def _split(data_key: bytes, threshold: int, n: int) -> list[Share]:
    low = Shamir.split(threshold, n, data_key[:_HALF_BYTES])
    high = Shamir.split(threshold, n, data_key[_HALF_BYTES:])
    shares = []
    for (index, low_share), (high_index, high_share) in zip(low, high, strict=True):
        if index != high_index:  # pycryptodome numbers shares 1..n in both calls
            raise PackageError("secret sharing returned mismatched share indices")
        shares.append(Share(index=index, value=low_share + high_share))
    return shares


def _seal(message: bytes, public_key: bytes, whose: str) -> bytes:
    _check_public_key(public_key, whose)
    try:
        return nacl.public.SealedBox(nacl.public.PublicKey(public_key)).encrypt(message)
    except nacl.exceptions.CryptoError as exc:
        raise PackageError(f"cannot seal to the {whose} key: {exc}") from None


def _private_key(secret: bytes) -> nacl.public.PrivateKey:
    if not isinstance(secret, bytes) or len(secret) != KEY_BYTES:
        raise PackageError(f"an X25519 secret key is {KEY_BYTES} bytes")
    return nacl.public.PrivateKey(secret)


def _check_public_key(key: bytes, whose: str) -> None:
    if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
        raise PackageError(f"the {whose} encryption key must be {PUBLIC_KEY_BYTES} bytes")


def _check_data_key(data_key: bytes) -> None:
    if not isinstance(data_key, bytes) or len(data_key) != KEY_BYTES:
        raise PackageError(f"a data key is {KEY_BYTES} bytes")


def _check_context(record_id: str, record_version: int, patient: str, author: str) -> None:
    for name, value in (("record_id", record_id), ("patient", patient), ("author", author)):
        if not isinstance(value, str) or not value:
            raise PackageError(f"{name} must be a non-empty string")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise PackageError(f"{name} is not valid Unicode") from None
    if not 0 <= record_version <= _MAX_RECORD_VERSION:
        raise PackageError(f"record_version must fit in 64 unsigned bits, got {record_version}")


def _check_custodians(custodians: Sequence[Custodian]) -> list[Custodian]:
    n = len(custodians)
    if not 1 <= n <= MAX_CUSTODIANS:
        raise PackageError(f"there must be 1 to {MAX_CUSTODIANS} custodians, got {n}")
    ordered = sorted(custodians, key=lambda c: c.index)
    if [c.index for c in ordered] != list(range(1, n + 1)):
        raise PackageError(f"custodian indices must be exactly 1..{n}")
    if len({c.organization for c in ordered}) != n or not all(c.organization for c in ordered):
        raise PackageError("custodian organizations must be distinct and non-empty")
    for custodian in ordered:
        _check_public_key(custodian.encryption_key, f"custodian {custodian.organization!r}")
    return ordered


def _check_package(package: RecordPackage) -> None:
    """Structural rules every package obeys; a package breaking one is refused on decode."""
    if package.version != FORMAT_VERSION:
        raise PackageError(f"unsupported package version {package.version}")
    _check_context(package.record_id, package.record_version, package.patient, package.author)
    if len(package.nonce) != NONCE_BYTES:
        raise PackageError(f"the nonce must be {NONCE_BYTES} bytes")
    if len(package.ciphertext) < _AEAD_TAG_BYTES:
        raise PackageError("the ciphertext is shorter than its authentication tag")
    for name, envelope in (
        ("patient", package.patient_envelope),
        ("author", package.author_envelope),
    ):
        if len(envelope) != KEY_BYTES + _SEAL_OVERHEAD:
            raise PackageError(f"the {name} envelope has the wrong length")
    n = len(package.shares)
    if not 1 <= n <= MAX_CUSTODIANS:
        raise PackageError(f"a package holds 1 to {MAX_CUSTODIANS} shares, got {n}")
    if not 1 <= package.threshold <= n:
        raise PackageError(f"threshold {package.threshold} is not between 1 and {n}")
    if [e.index for e in package.shares] != list(range(1, n + 1)):
        raise PackageError(f"share indices must be 1..{n} in order")
    if len({e.organization for e in package.shares}) != n:
        raise PackageError("share organizations must be distinct")
    for entry in package.shares:
        if not entry.organization:
            raise PackageError(f"share {entry.index} has no organization")
        if len(entry.sealed) != _SHARE_WIRE_BYTES + _SEAL_OVERHEAD:
            raise PackageError(f"sealed share {entry.index} has the wrong length")
        if len(entry.commitment) != COMMITMENT_BYTES:
            raise PackageError(f"share {entry.index} commitment must be {COMMITMENT_BYTES} bytes")
