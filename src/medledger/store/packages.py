"""The content-addressed package store: encrypted record packages, one file per digest.

A package's name is the SHA-256 of its bytes, so every read is checked: a file whose bytes no
longer match its name was damaged or tampered with, and is moved aside to be fetched again from
a peer. Erasure deletes the file; with it go the key envelopes and this node's key share.
An erased digest leaves a tombstone (an empty file under `erased/`), so no upload, late fetch
or restart ever stores that package again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

DIGEST = re.compile(r"[0-9a-f]{64}")


def is_digest(text: str) -> bool:
    """64 lowercase hex digits and nothing else (no trailing newline, as `$` would allow)."""
    return DIGEST.fullmatch(text) is not None


class PackageStoreError(Exception):
    pass


class CorruptPackage(PackageStoreError):
    """A stored package no longer matches its digest."""


class ErasedPackage(PackageStoreError):
    """The package was erased: it is never stored again."""


class PackageStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "quarantine").mkdir(exist_ok=True)
        self._tombstones = self.root / "erased"
        self._tombstones.mkdir(exist_ok=True)
        self._erased = {p.name for p in self._tombstones.iterdir() if is_digest(p.name)}

    def _path(self, digest: str) -> Path:
        if not is_digest(digest):
            raise PackageStoreError(f"not a package digest: {digest[:80]!r}")
        return self.root / digest[:2] / digest

    def is_erased(self, digest: str) -> bool:
        return digest in self._erased

    def erased(self) -> frozenset[str]:
        return frozenset(self._erased)

    def has(self, digest: str) -> bool:
        return self._path(digest).exists()

    def put(self, digest: str, data: bytes) -> bool:
        """Store `data` under `digest` if it matches; False if it was already there. Safe
        from worker threads: a digest erased meanwhile does not stay stored."""
        path = self._path(digest)
        if digest in self._erased:
            raise ErasedPackage(f"package {digest[:16]} was erased and is never stored again")
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise PackageStoreError(f"package bytes hash to {actual[:16]}, not {digest[:16]}")
        if path.exists():
            return False
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        if digest in self._erased:  # erased by another thread while this one wrote it
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise ErasedPackage(f"package {digest[:16]} was erased and is never stored again")
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
        """Remove a package that may be stored again (an unreferenced upload that expired)."""
        path = self._path(digest)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def erase(self, digest: str) -> bool:
        """Destroy a package for good: the tombstone is written (and synced) before the file
        goes, so a crash in between leaves it erased. True if a copy was deleted."""
        self._path(digest)  # refuses what is not a digest
        if digest not in self._erased:
            tombstone = self._tombstones / digest
            with open(tombstone, "wb") as handle:
                os.fsync(handle.fileno())
            _sync_directory(self._tombstones)
            self._erased.add(digest)
        deleted = self.delete(digest)
        quarantined = self.root / "quarantine" / digest
        with contextlib.suppress(FileNotFoundError):
            quarantined.unlink()
        return deleted

    def digests(self) -> Iterator[str]:
        for directory in sorted(self.root.iterdir()):
            if directory.is_dir() and len(directory.name) == 2:
                for path in sorted(directory.iterdir()):
                    if is_digest(path.name):
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


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
