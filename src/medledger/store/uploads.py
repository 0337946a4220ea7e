"""Uploads no committed record names yet ("pending" packages), with a time to live and a
quota per uploading member.

Any member who writes records may upload a package, and until a committed record names it the
package is only a promise: the node keeps it for `UploadLimits.ttl_seconds`, then deletes it.
While pending it counts against its uploader's quota (packages and bytes), so no member fills a
node's disk with packages no record ever names. A package stops being pending when a committed
record names it.

Each pending upload is a small file `pending/<digest>` beside the package store holding the
uploader's id and the package's size; its modification time is the upload time, so a restart
keeps both the quota and the clock.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from medledger.store.packages import PackageStore, is_digest


@dataclass(frozen=True)
class UploadLimits:
    ttl_seconds: float = 3600.0
    max_bytes_per_member: int = 256 * 1024 * 1024
    max_packages_per_member: int = 2000


@dataclass(frozen=True)
class PendingUpload:
    digest: str
    member: str  # "" when unknown (a package found on disk that no record names)
    size: int
    uploaded: float  # Unix time


class QuotaExceeded(Exception):
    """The member has too many pending uploads; `retry_after` is when the oldest expires."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PendingUploads:
    def __init__(self, root: Path, limits: UploadLimits | None = None) -> None:
        self.root = root
        self.limits = limits or UploadLimits()
        self.root.mkdir(parents=True, exist_ok=True)
        self.expired_total = 0
        self._pending: dict[str, PendingUpload] = {}
        # Each member's (packages, bytes) pending, kept with `_pending`: a batch of 1,000
        # uploads is admitted one by one against it.
        self._usage: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()  # uploads are admitted in worker threads, settled on the loop
        for path in self.root.iterdir():
            entry = _read_entry(path)
            if entry is None:
                with contextlib.suppress(OSError):
                    path.unlink()
            else:
                self._add(entry)

    def __contains__(self, digest: object) -> bool:
        return digest in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def digests(self) -> list[str]:
        """The digests pending now (a copy: uploads are admitted from worker threads)."""
        with self._lock:
            return list(self._pending)

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self._pending.values())

    def usage(self, member: str) -> tuple[int, int]:
        """(packages, bytes) pending for `member`."""
        return self._usage.get(member, (0, 0))

    def _add(self, entry: PendingUpload) -> None:
        with self._lock:
            self._add_locked(entry)

    def _add_locked(self, entry: PendingUpload) -> None:
        self._remove(entry.digest)
        self._pending[entry.digest] = entry
        count, used = self._usage.get(entry.member, (0, 0))
        self._usage[entry.member] = (count + 1, used + entry.size)

    def _remove(self, digest: str) -> PendingUpload | None:
        entry = self._pending.pop(digest, None)
        if entry is not None:
            count, used = self._usage[entry.member]
            if count == 1:
                del self._usage[entry.member]
            else:
                self._usage[entry.member] = (count - 1, used - entry.size)
        return entry

    def admit(self, member: str, digest: str, size: int, now: float | None = None) -> None:
        """Count an upload against its member's quota, or QuotaExceeded saying why. The check
        and the count are one step under the lock (uploads are admitted from many worker
        threads at once); the entry's file is written after it, outside the lock."""
        now = time.time() if now is None else now
        entry = PendingUpload(digest, member, size, now)
        with self._lock:
            if digest in self._pending:
                return
            count, used = self._usage.get(member, (0, 0))
            limits = self.limits
            problem = ""
            if count + 1 > limits.max_packages_per_member:
                problem = f"{count} packages (at most {limits.max_packages_per_member})"
            elif used + size > limits.max_bytes_per_member:
                problem = f"{used} bytes (at most {limits.max_bytes_per_member} with this one)"
            if problem:
                oldest = min(
                    (e.uploaded for e in self._pending.values() if e.member == member),
                    default=now,
                )
                raise QuotaExceeded(
                    f"member {member} already has {problem} uploaded that no committed record"
                    f" names; commit the records that name them, or wait until they expire"
                    f" ({int(limits.ttl_seconds)} s after upload)",
                    retry_after=max(1.0, oldest + limits.ttl_seconds - now),
                )
            self._add_locked(entry)
        try:
            self._persist(entry)
        except OSError:
            with self._lock:
                self._remove(digest)
            raise

    def adopt(self, digests: Iterable[str], packages: PackageStore) -> int:
        """Treat stored packages that no committed record names as pending uploads of an
        unknown member since their file's time (found at start: uploaded before a crash or
        before this node kept pending uploads)."""
        adopted = 0
        for digest in digests:
            if digest in self._pending or not is_digest(digest):
                continue
            path = packages.root / digest[:2] / digest
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            self._write(PendingUpload(digest, "", stat.st_size, stat.st_mtime))
            adopted += 1
        return adopted

    def settle(self, digest: str) -> bool:
        """A committed record names `digest`: it is no longer pending. True if it was."""
        with self._lock:
            entry = self._remove(digest)
        if entry is None:
            return False
        with contextlib.suppress(FileNotFoundError):
            (self.root / digest).unlink()
        return True

    def sweep(
        self,
        packages: PackageStore,
        is_referenced: Callable[[str], bool],
        now: float | None = None,
    ) -> list[str]:
        """Delete the pending uploads older than the time to live that still no committed
        record names; the digests deleted."""
        now = time.time() if now is None else now
        expired = []
        for entry in sorted(self._pending.values(), key=lambda e: e.uploaded):
            if entry.uploaded + self.limits.ttl_seconds > now:
                break
            self.settle(entry.digest)
            if is_referenced(entry.digest):
                continue
            packages.delete(entry.digest)
            expired.append(entry.digest)
        self.expired_total += len(expired)
        return expired

    def _write(self, entry: PendingUpload) -> None:
        self._persist(entry)
        self._add(entry)

    def _persist(self, entry: PendingUpload) -> None:
        """The entry's file, so that it outlives a restart (its time is the file's mtime)."""
        path = self.root / entry.digest
        tmp = path.with_name(f".{entry.digest}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(f"{entry.member}\n{entry.size}\n", encoding="utf-8")
        os.utime(tmp, (entry.uploaded, entry.uploaded))
        os.replace(tmp, path)


def _read_entry(path: Path) -> PendingUpload | None:
    if not is_digest(path.name):
        return None
    try:
        member, size, *_ = path.read_text(encoding="utf-8").split("\n")
        return PendingUpload(path.name, member, int(size), path.stat().st_mtime)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
