"""The content-addressed package store: encrypted record packages, one file per digest.

A package's name is the SHA-256 of its bytes, so every read is checked: a file whose bytes no
longer match its name was damaged or tampered with, and is moved aside to be fetched again from
a peer. Erasure deletes the file; with it go the key envelopes and this node's key share.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

DIGEST = re.compile(r"^[0-9a-f]{64}$")


class PackageStoreError(Exception):
    pass


class CorruptPackage(PackageStoreError):
    """A stored package no longer matches its digest."""


class PackageStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "quarantine").mkdir(exist_ok=True)

    def _path(self, digest: str) -> Path:
        if not DIGEST.match(digest):
            raise PackageStoreError(f"not a package digest: {digest!r}")
        return self.root / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self._path(digest).exists()

    def put(self, digest: str, data: bytes) -> bool:
        """Store `data` under `digest` if it matches; False if it was already there."""
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise PackageStoreError(f"package bytes hash to {actual[:16]}, not {digest[:16]}")
        path = self._path(digest)
        if path.exists():
            return False
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{digest}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return True

    def get(self, digest: str) -> bytes | None:
        """The package's bytes, checked against its digest; None if absent. A damaged file is
        quarantined and CorruptPackage raised, so the caller fetches it again."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            os.replace(path, self.root / "quarantine" / digest)
            raise CorruptPackage(f"package {digest[:16]} failed its digest check")
        return data

    def delete(self, digest: str) -> bool:
        path = self._path(digest)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def digests(self) -> Iterator[str]:
        for directory in sorted(self.root.iterdir()):
            if directory.is_dir() and len(directory.name) == 2:
                for path in sorted(directory.iterdir()):
                    if DIGEST.match(path.name):
                        yield path.name

    def verify_all(self) -> list[str]:
        """Check every package; the digests found damaged (and quarantined)."""
        damaged = []
        for digest in list(self.digests()):
            try:
                self.get(digest)
            except CorruptPackage:
                damaged.append(digest)
        return damaged
