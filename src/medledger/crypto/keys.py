"""Ed25519 signing keys and X25519 encryption keys, as thin wrappers over PyNaCl.

A participant's ledger id is derived from the Ed25519 public key it enrolled with, so it stays
the same when the key is rotated later.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import nacl.exceptions
import nacl.public
import nacl.signing

ID_BYTES = 20


def member_id_for(verify_key: bytes) -> str:
    """The ledger id of a participant: hex of the first 20 bytes of SHA-256(public key)."""
    return hashlib.sha256(verify_key).digest()[:ID_BYTES].hex()


def verify_signature(verify_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `message` by `verify_key`."""
    try:
        nacl.signing.VerifyKey(verify_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class KeyPair:
    """A participant's private keys: an Ed25519 signing seed and an X25519 secret key."""

    signing_seed: bytes
    encryption_secret: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(
            signing_seed=bytes(nacl.signing.SigningKey.generate()),
            encryption_secret=bytes(nacl.public.PrivateKey.generate()),
        )

    # Derived once per key pair (a writer signs and names itself for every request).
    @cached_property
    def _signing_key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.signing_seed)

    @cached_property
    def verify_key(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    @cached_property
    def encryption_key(self) -> bytes:
        return bytes(nacl.public.PrivateKey(self.encryption_secret).public_key)

    @cached_property
    def member_id(self) -> str:
        return member_id_for(self.verify_key)

    def sign(self, message: bytes) -> bytes:
        return self._signing_key.sign(message).signature
