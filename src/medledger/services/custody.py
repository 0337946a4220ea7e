"""Custodial identities: members whose keys the node holds for them.

EHR and laboratory integrations (system clients), and patients whose organization runs their
portal account, act through the node, which signs their ledger transactions and opens their
key shares. Their keys live in HOME/custody, apart from anything the SDK's client-side keys
touch, and are unlocked into memory at start.

Each keystore is sealed (XSalsa20-Poly1305) under the node's **custody key**: 32 random bytes in
`HOME/custody/.custody-key.json`, sealed with Argon2id under the node passphrase and unlocked
once per process. Registering a patient therefore costs one authenticated encryption, not an
Argon2id derivation (0.5-0.7 s and 256 MiB each), and registrations do not queue behind one
another: the lock guards only the in-memory table. Keystores written before the custody key
existed (sealed under the passphrase itself) still open. What this means for someone who steals
a custody directory is in docs/security.md.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from pathlib import Path

from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import (
    Keyring,
    KeystoreError,
    KeystorePublic,
    encode_keystore_under_key,
    encode_secret,
    is_sealed_under_key,
    load_keystore_under_key,
    load_secret,
    write_new_file,
)

CUSTODY_KEY_FILE = ".custody-key.json"  # a dot file: the keyring does not list it
CUSTODY_KEY_BYTES = 32


class CustodyError(Exception):
    pass


class Custody:
    def __init__(self, directory: Path, passphrase: str, *, fast_kdf: bool = False) -> None:
        self.ring = Keyring(directory)
        self._passphrase = passphrase
        self._fast = fast_kdf
        self._unlocked: dict[str, KeyPair] = {}
        self._lock = threading.Lock()
        self._key_lock = threading.Lock()
        self._custody_key: bytes | None = None

    @property
    def key_path(self) -> Path:
        return self.ring.directory / CUSTODY_KEY_FILE

    def custody_key(self) -> bytes:
        """The node's custody key, unlocked once (created at first need)."""
        with self._key_lock:
            if self._custody_key is None:
                if not self.key_path.exists():
                    sealed = encode_secret(
                        secrets.token_bytes(CUSTODY_KEY_BYTES), self._passphrase, fast=self._fast
                    )
                    # Another process may have made it first: then theirs is the one.
                    with contextlib.suppress(KeystoreError):
                        write_new_file(self.key_path, sealed)
                key = load_secret(self.key_path, self._passphrase)
                if len(key) != CUSTODY_KEY_BYTES:
                    raise KeystoreError(f"the custody key must be 32 bytes: {self.key_path}")
                self._custody_key = key
            return self._custody_key

    def _load(self, public: KeystorePublic) -> KeyPair:
        if is_sealed_under_key(public.path):
            return load_keystore_under_key(public.path, self.custody_key())
        return self.ring.load(public.name, self._passphrase)

    def unlock_all(self) -> int:
        """Unlock every custodial keystore once, at start; the number unlocked."""
        for public in self.ring.list():
            keys = self._load(public)
            with self._lock:
                self._unlocked[public.member_id] = keys
        return len(self._unlocked)

    def create(self, name: str) -> KeyPair:
        """New keys held in custody under `name`; enroll their public part on the ledger."""
        keys = KeyPair.generate()
        write_new_file(
            self.ring.path_for(name), encode_keystore_under_key(name, keys, self.custody_key())
        )
        with self._lock:
            self._unlocked[keys.member_id] = keys
        return keys

    def keys_for(self, member_id: str) -> KeyPair:
        """The member's keys; keystores added to HOME/custody since start (by `medledger
        custody new`) are picked up on first use."""
        with self._lock:
            keys = self._unlocked.get(member_id)
        if keys is None:
            for public in self.ring.list():
                if public.member_id == member_id:
                    keys = self._load(public)
                    with self._lock:
                        self._unlocked[member_id] = keys
                    break
        if keys is None:
            raise CustodyError(f"this node holds no keys for member {member_id}")
        return keys

    def holds(self, member_id: str) -> bool:
        try:
            self.keys_for(member_id)
        except CustodyError:
            return False
        return True

    def members(self) -> list[KeystorePublic]:
        return self.ring.list()
