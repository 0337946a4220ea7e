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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DIGEST = re.compile(r"[0-9a-f]{64}")


def is_digest(text: str) -> bool:
    """64 lowercase hex digits and nothing else (no trailing newline, as `$` would allow)."""
    return DIGEST.fullmatch(text) is not None


# Syncs issued together: the file system groups concurrent fsyncs into shared journal commits.
_SYNCS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="package-sync")


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _erased(digest: str) -> str:
    return f"package {digest[:16]} was erased and is never stored again"


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
        answer = self.put_many([(digest, data)])[0]
        if isinstance(answer, PackageStoreError):
            raise answer
        return answer

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[bool | PackageStoreError]:
        """Store many packages, each answered as `put` would (True stored, False already
        there, or the error). Every file is written first and then all are synced to disk
        together (the file system commits them in a few journal transactions instead of one
        each: a batch of 1,000 synced one by one took longer than a client waits), then
        renamed into place and their directories synced; nothing is answered stored before it
        is on disk."""
        answers: list[bool | PackageStoreError] = []
        written: list[tuple[int, str, Path, Path]] = []  # answer index, digest, temp, final
        claimed: set[str] = set()
        for digest, data in items:
            try:
                path = self._path(digest)
                if digest in self._erased:
                    raise ErasedPackage(_erased(digest))
                actual = hashlib.sha256(data).hexdigest()
                if actual != digest:
                    raise PackageStoreError(
                        f"package bytes hash to {actual[:16]}, not {digest[:16]}"
                    )
            except PackageStoreError as exc:
                answers.append(exc)
                continue
            if digest in claimed or path.exists():
                answers.append(False)
                continue
            claimed.add(digest)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            written.append((len(answers), digest, tmp, path))
            answers.append(True)
        list(_SYNCS.map(_sync_file, [tmp for _, _, tmp, _ in written]))
        for index, digest, tmp, path in written:
            os.replace(tmp, path)
            if digest in self._erased:  # erased by another thread while this one wrote it
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                answers[index] = ErasedPackage(_erased(digest))
        for directory in sorted({path.parent for _, _, _, path in written}):
            _sync_directory(directory)
        return answers

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
