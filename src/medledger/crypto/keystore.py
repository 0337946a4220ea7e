"""Passphrase-encrypted keystore files holding one participant's private keys.

A keystore file is a JSON object: format version 1, the participant's name, ledger id and public
keys in clear, the Argon2id parameters and salt, and the private keys (Ed25519 signing seed and
X25519 secret) sealed with XSalsa20-Poly1305 (`nacl.secret.SecretBox`) under a key derived from
the passphrase. The sealed plaintext repeats every public field, so a file whose clear fields were
edited or swapped with another file's is rejected on load. Files are created with mode 0600 and
appear atomically (a temporary file in the same directory, then a link or rename), and an
existing keystore is never replaced unless the caller explicitly asks for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.pwhash.argon2id as argon2id
import nacl.secret

from medledger.crypto.keys import KeyPair, member_id_for

KEYSTORE_VERSION = 1
KDF_NAME = "argon2id"
# A keystore sealed directly under a node's custody key (see medledger.services.custody).
SEALING_KEY_KDF = "custody-key"
CIPHER_NAME = "xsalsa20poly1305"
FILE_SUFFIX = ".json"
FILE_MODE = 0o600
DIR_MODE = 0o700

# Parameters a file may ask for are bounded: below the library minimum is not Argon2id, above
# the SENSITIVE profile a hostile file could make loading exhaust memory or time.
_MAX_OPSLIMIT = argon2id.OPSLIMIT_SENSITIVE
_MAX_MEMLIMIT = argon2id.MEMLIMIT_SENSITIVE
_KEY_BYTES = 32
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class KeystoreError(Exception):
    """A keystore file could not be written, parsed or opened."""


@dataclass(frozen=True)
class KeystorePublic:
    """The clear part of a keystore: who it belongs to and their public keys."""

    name: str
    member_id: str
    verify_key: bytes
    encryption_key: bytes
    path: Path


def validate_name(name: str) -> str:
    """A keystore name is 1–64 characters of letters, digits, `_`, `.`, `-`, starting with a
    letter or digit, so it is always a safe single file name."""
    if not _NAME_RE.fullmatch(name):
        raise KeystoreError(
            f"invalid keystore name {name!r}: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def _public_fields(name: str, keys: KeyPair) -> dict[str, str]:
    return {
        "name": name,
        "member_id": keys.member_id,
        "verify_key": keys.verify_key.hex(),
        "encryption_key": keys.encryption_key.hex(),
    }


def _derive_key(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE,
        passphrase.encode("utf-8"),
        salt,
        opslimit=opslimit,
        memlimit=memlimit,
    )


def encode_keystore(name: str, keys: KeyPair, passphrase: str, *, fast: bool = False) -> bytes:
    """The keystore document for `keys`, as UTF-8 JSON bytes.

    `fast` selects the library-minimum Argon2id cost (for tests only); otherwise the MODERATE
    profile is used.
    """
    validate_name(name)
    opslimit, memlimit = _kdf_cost(fast)
    salt = secrets.token_bytes(argon2id.SALTBYTES)
    kdf = {"name": KDF_NAME, "opslimit": opslimit, "memlimit": memlimit, "salt": salt.hex()}
    return _encode(name, keys, _derive_key(passphrase, salt, opslimit, memlimit), kdf)


def encode_keystore_under_key(name: str, keys: KeyPair, sealing_key: bytes) -> bytes:
    """The keystore document for `keys` sealed directly under a 32-byte key (a node's custody
    key, itself sealed under the node passphrase): no key derivation per keystore."""
    validate_name(name)
    kdf = {"name": SEALING_KEY_KDF, "key_id": sealing_key_id(sealing_key)}
    return _encode(name, keys, sealing_key, kdf)


def sealing_key_id(sealing_key: bytes) -> str:
    """Names a sealing key in the files it sealed (a digest, revealing nothing of the key), so
    that a file sealed under another key is refused with a clear reason."""
    return hashlib.sha256(b"medledger/sealing-key-id/v1" + sealing_key).hexdigest()[:16]


def _kdf_cost(fast: bool) -> tuple[int, int]:
    if fast:
        return argon2id.OPSLIMIT_MIN, argon2id.MEMLIMIT_MIN
    return argon2id.OPSLIMIT_MODERATE, argon2id.MEMLIMIT_MODERATE


def _encode(name: str, keys: KeyPair, box_key: bytes, kdf: dict[str, Any]) -> bytes:
    nonce = secrets.token_bytes(nacl.secret.SecretBox.NONCE_SIZE)
    public = _public_fields(name, keys)
    plaintext = json.dumps(
        {
            **public,
            "signing_seed": keys.signing_seed.hex(),
            "encryption_secret": keys.encryption_secret.hex(),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode("utf-8")
    ciphertext = nacl.secret.SecretBox(box_key).encrypt(plaintext, nonce).ciphertext
    document: dict[str, Any] = {
        "version": KEYSTORE_VERSION,
        **public,
        "kdf": kdf,
        "cipher": CIPHER_NAME,
        "nonce": nonce.hex(),
        "ciphertext": ciphertext.hex(),
    }
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def encode_secret(secret: bytes, passphrase: str, *, fast: bool = False) -> bytes:
    """A secret (such as a custody key) sealed under a passphrase, as a small JSON document."""
    opslimit, memlimit = _kdf_cost(fast)
    salt = secrets.token_bytes(argon2id.SALTBYTES)
    nonce = secrets.token_bytes(nacl.secret.SecretBox.NONCE_SIZE)
    box = nacl.secret.SecretBox(_derive_key(passphrase, salt, opslimit, memlimit))
    document = {
        "version": KEYSTORE_VERSION,
        "kdf": {"name": KDF_NAME, "opslimit": opslimit, "memlimit": memlimit, "salt": salt.hex()},
        "cipher": CIPHER_NAME,
        "nonce": nonce.hex(),
        "ciphertext": box.encrypt(secret, nonce).ciphertext.hex(),
    }
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def load_secret(path: Path, passphrase: str) -> bytes:
    """Open a secret written by `encode_secret`."""
    document = _read_document(path)
    box = nacl.secret.SecretBox(_passphrase_key(document, path, passphrase))
    nonce = _hex_field(document, "nonce", path, nacl.secret.SecretBox.NONCE_SIZE)
    try:
        return bytes(box.decrypt(_hex_field(document, "ciphertext", path, None), nonce))
    except nacl.exceptions.CryptoError:
        raise KeystoreError(f"wrong passphrase or corrupted file: {path}") from None


def write_new_file(path: Path, data: bytes) -> None:
    """Make `data` appear at `path` in one step with mode 0600; KeystoreError if it exists."""
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    _write_new_file(path, data, overwrite=False)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_new_file(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Make `data` appear at `path` in one step, with mode 0600, via a temporary file."""
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails when the target exists, so an existing keystore is never replaced,
            # even by a concurrent writer.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeystoreError(
                    f"keystore already exists, refusing to overwrite: {path}"
                ) from None
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def save_keystore(
    path: Path,
    name: str,
    keys: KeyPair,
    passphrase: str,
    *,
    fast: bool = False,
    overwrite: bool = False,
) -> None:
    """Write `keys` to a new keystore file at `path`, sealed under `passphrase`.

    The file is created with mode 0600 and appears atomically. An existing file at `path` is an
    error unless `overwrite` is set. `fast` selects the minimum Argon2id cost (tests only).
    """
    path = Path(path)
    if not passphrase:
        raise KeystoreError("the keystore passphrase must not be empty")
    data = encode_keystore(name, keys, passphrase, fast=fast)
    if not overwrite and path.exists():
        raise KeystoreError(f"keystore already exists, refusing to overwrite: {path}")
    _write_new_file(path, data, overwrite=overwrite)


def _read_document(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeystoreError(f"keystore not found: {path}") from None
    except OSError as exc:
        raise KeystoreError(f"cannot read keystore {path}: {exc.strerror}") from exc
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise KeystoreError(f"keystore is not valid JSON: {path}") from None
    if not isinstance(document, dict):
        raise KeystoreError(f"keystore is not a JSON object: {path}")
    version = document.get("version")
    if version != KEYSTORE_VERSION:
        raise KeystoreError(f"unsupported keystore version {version!r}: {path}")
    return document


def _str_field(document: dict[str, Any], key: str, path: Path) -> str:
    value = document.get(key)
    if not isinstance(value, str):
        raise KeystoreError(f"keystore field {key!r} is missing or not a string: {path}")
    return value


def _hex_field(document: dict[str, Any], key: str, path: Path, size: int | None) -> bytes:
    text = _str_field(document, key, path)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise KeystoreError(f"keystore field {key!r} is not hex: {path}") from None
    if size is not None and len(value) != size:
        raise KeystoreError(f"keystore field {key!r} must be {size} bytes: {path}")
    return value


def _int_field(document: dict[str, Any], key: str, path: Path, low: int, high: int) -> int:
    value = document.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise KeystoreError(f"keystore field {key!r} must be an integer in [{low}, {high}]: {path}")
    return value


def _public_from_document(document: dict[str, Any], path: Path) -> KeystorePublic:
    name = _str_field(document, "name", path)
    if not _NAME_RE.fullmatch(name):
        raise KeystoreError(f"keystore has an invalid name {name!r}: {path}")
    verify_key = _hex_field(document, "verify_key", path, _KEY_BYTES)
    encryption_key = _hex_field(document, "encryption_key", path, _KEY_BYTES)
    member_id = _str_field(document, "member_id", path)
    if member_id != member_id_for(verify_key):
        raise KeystoreError(f"keystore member_id does not match its verify_key: {path}")
    return KeystorePublic(
        name=name,
        member_id=member_id,
        verify_key=verify_key,
        encryption_key=encryption_key,
        path=path,
    )


def read_public(path: Path) -> KeystorePublic:
    """The clear fields of a keystore (no passphrase needed, nothing authenticated yet)."""
    path = Path(path)
    return _public_from_document(_read_document(path), path)


def load_keystore(path: Path, passphrase: str) -> KeyPair:
    """Open a keystore with its passphrase and return the private keys.

    A wrong passphrase and a modified ciphertext, nonce, salt or KDF parameter are
    indistinguishable and both raise "wrong passphrase or corrupted keystore"; clear fields that
    disagree with the sealed copy raise a tampering error.
    """
    path = Path(path)
    document = _read_document(path)
    return _open(document, path, _passphrase_key(document, path, passphrase))


def load_keystore_under_key(path: Path, sealing_key: bytes) -> KeyPair:
    """Open a keystore sealed by `encode_keystore_under_key` with its sealing key."""
    path = Path(path)
    document = _read_document(path)
    kdf = document.get("kdf")
    if not isinstance(kdf, dict) or kdf.get("name") != SEALING_KEY_KDF:
        raise KeystoreError(f"keystore is not sealed under a custody key: {path}")
    if kdf.get("key_id") != sealing_key_id(sealing_key):
        raise KeystoreError(f"keystore is sealed under another custody key: {path}")
    return _open(document, path, sealing_key)


def is_sealed_under_key(path: Path) -> bool:
    """Whether the keystore at `path` is sealed under a custody key (not a passphrase)."""
    kdf = _read_document(Path(path)).get("kdf")
    return isinstance(kdf, dict) and kdf.get("name") == SEALING_KEY_KDF


def _passphrase_key(document: dict[str, Any], path: Path, passphrase: str) -> bytes:
    kdf = document.get("kdf")
    if isinstance(kdf, dict) and kdf.get("name") == SEALING_KEY_KDF:
        raise KeystoreError(
            f"keystore is sealed under the node's custody key, not a passphrase: {path}"
        )
    if not isinstance(kdf, dict) or kdf.get("name") != KDF_NAME:
        raise KeystoreError(f"unsupported keystore kdf (expected {KDF_NAME}): {path}")
    if document.get("cipher") != CIPHER_NAME:
        raise KeystoreError(f"unsupported keystore cipher (expected {CIPHER_NAME}): {path}")
    opslimit = _int_field(kdf, "opslimit", path, argon2id.OPSLIMIT_MIN, _MAX_OPSLIMIT)
    memlimit = _int_field(kdf, "memlimit", path, argon2id.MEMLIMIT_MIN, _MAX_MEMLIMIT)
    salt = _hex_field(kdf, "salt", path, argon2id.SALTBYTES)
    return _derive_key(passphrase, salt, opslimit, memlimit)


def _open(document: dict[str, Any], path: Path, box_key: bytes) -> KeyPair:
    public = _public_from_document(document, path)
    if document.get("cipher") != CIPHER_NAME:
        raise KeystoreError(f"unsupported keystore cipher (expected {CIPHER_NAME}): {path}")
    nonce = _hex_field(document, "nonce", path, nacl.secret.SecretBox.NONCE_SIZE)
    ciphertext = _hex_field(document, "ciphertext", path, None)
    box = nacl.secret.SecretBox(box_key)
    try:
        plaintext = box.decrypt(ciphertext, nonce)
        sealed = json.loads(plaintext)
        if not isinstance(sealed, dict):
            raise ValueError("sealed part is not an object")
        keys = KeyPair(
            signing_seed=_hex_field(sealed, "signing_seed", path, _KEY_BYTES),
            encryption_secret=_hex_field(sealed, "encryption_secret", path, _KEY_BYTES),
        )
    except (nacl.exceptions.CryptoError, ValueError, UnicodeDecodeError, KeystoreError):
        raise KeystoreError(f"wrong passphrase or corrupted keystore: {path}") from None

    expected = _public_fields(public.name, keys)
    sealed_public = {key: sealed.get(key) for key in expected}
    clear_public = {key: document.get(key) for key in expected}
    if sealed_public != expected or clear_public != expected:
        raise KeystoreError(
            f"keystore public fields do not match its sealed contents (tampered?): {path}"
        )
    return keys


class Keyring:
    """A directory of keystore files, one per name, stored as `<name>.json`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path_for(self, name: str) -> Path:
        """The file that holds the keystore called `name`."""
        return self.directory / f"{validate_name(name)}{FILE_SUFFIX}"

    def list(self) -> list[KeystorePublic]:
        """The public part of every keystore in the directory, ordered by name."""
        if not self.directory.is_dir():
            return []
        found = [
            read_public(entry)
            for entry in sorted(self.directory.iterdir())
            if entry.name.endswith(FILE_SUFFIX) and not entry.name.startswith(".")
        ]
        return sorted(found, key=lambda public: public.name)

    def exists(self, name: str) -> bool:
        return self.path_for(name).exists()

    def public(self, name: str) -> KeystorePublic:
        """The clear fields of the keystore called `name`; its file must carry that name."""
        public = read_public(self.path_for(name))
        if public.name != name:
            raise KeystoreError(
                f"keystore file is named {name!r} but holds {public.name!r}: {public.path}"
            )
        return public

    def load(self, name: str, passphrase: str) -> KeyPair:
        """Open the keystore called `name` with its passphrase."""
        return load_keystore(self.public(name).path, passphrase)

    def create(self, name: str, passphrase: str, *, fast: bool = False) -> KeyPair:
        """Generate fresh keys and store them under `name`; an existing name is an error."""
        path = self.path_for(name)
        self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        keys = KeyPair.generate()
        save_keystore(path, name, keys, passphrase, fast=fast)
        return keys

    def add(self, name: str, keys: KeyPair, passphrase: str, *, fast: bool = False) -> None:
        """Store existing keys under `name`; an existing name is an error."""
        path = self.path_for(name)
        self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        save_keystore(path, name, keys, passphrase, fast=fast)
