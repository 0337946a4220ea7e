"""Custodial identities: members whose keys the node holds for them.

EHR and laboratory integrations (system clients), and patients whose organization runs their
portal account, act through the node, which signs their ledger transactions and opens their
key shares. Their keys live in HOME/custody as keystores sealed under the node's passphrase,
apart from anything the SDK's client-side keys touch; they are unlocked into memory at start.
"""

from __future__ import annotations

import threading
from pathlib import Path

from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import Keyring, KeystorePublic


class CustodyError(Exception):
    pass


class Custody:
    def __init__(self, directory: Path, passphrase: str, *, fast_kdf: bool = False) -> None:
        self.ring = Keyring(directory)
        self._passphrase = passphrase
        self._fast = fast_kdf
        self._unlocked: dict[str, KeyPair] = {}
        self._lock = threading.Lock()

    def unlock_all(self) -> int:
        """Unlock every custodial keystore once, at start; the number unlocked."""
        for public in self.ring.list():
            self._unlocked[public.member_id] = self.ring.load(public.name, self._passphrase)
        return len(self._unlocked)

    def create(self, name: str) -> KeyPair:
        """New keys held in custody under `name`; enroll their public part on the ledger."""
        with self._lock:
            keys = self.ring.create(name, self._passphrase, fast=self._fast)
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
                        keys = self.ring.load(public.name, self._passphrase)
                        self._unlocked[member_id] = keys
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
