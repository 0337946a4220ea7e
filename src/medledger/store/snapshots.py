"""State-sync snapshots: the committed state and audit log at a height, in chunks a joining node
fetches from its peers (CometBFT's ABCI snapshot protocol).

A snapshot is taken after the Commit of every `interval`-th block, from a read transaction of
its own, so consensus does not wait for it. Its rows (`medledger.store.sqlite.SnapshotReader`)
are packed in key order into chunks of about `CHUNK_BYTES`, each a zlib-compressed MessagePack
array, written under `HOME/state/snapshots/<height>/`; the metadata lists every chunk's SHA-256,
and the snapshot's hash is the SHA-256 of the metadata. Equal states give byte-identical
snapshots on every node, so a joiner can fetch each chunk from any peer.

A joining node checks each chunk against the metadata as it arrives and, once all are in,
rebuilds the state tree and audit log and compares the app hash with the one CometBFT's light
client verified for that height; a snapshot that does not match is refused whole, so a lying
peer can waste a joiner's time but cannot give it a wrong state.

```toml
[snapshots]
interval = 1000   # blocks between snapshots (0: take none)
keep = 2          # the newest snapshots kept
```
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import tomllib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from medledger.store.sqlite import SnapshotReader, SnapshotRecord

log = logging.getLogger("medledger.snapshots")

FORMAT = 1
CHUNK_BYTES = 4 * 1024 * 1024
MAX_CHUNKS = 100_000
DEFAULT_INTERVAL = 1000
DEFAULT_KEEP = 2


class SnapshotError(Exception):
    pass


class Metadata(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    chunk_hashes: list[bytes]
    app_hash: bytes
    records: int


@dataclass(frozen=True)
class Snapshot:
    height: int
    format: int
    chunks: int
    hash: bytes
    metadata: bytes


@dataclass(frozen=True)
class SnapshotSettings:
    interval: int = DEFAULT_INTERVAL
    keep: int = DEFAULT_KEEP


def load_snapshot_settings(home: Path) -> SnapshotSettings:
    """The `[snapshots]` table of HOME/medledger.toml (defaults when absent)."""
    path = home / "medledger.toml"
    table: dict[str, Any] = {}
    if path.exists():
        table = tomllib.loads(path.read_text()).get("snapshots", {})
    unknown = sorted(set(table) - {"interval", "keep"})
    if unknown:
        raise SnapshotError(f"unknown key(s) in [snapshots]: {', '.join(unknown)}")
    interval = table.get("interval", DEFAULT_INTERVAL)
    keep = table.get("keep", DEFAULT_KEEP)
    if type(interval) is not int or interval < 0:
        raise SnapshotError(
            f"[snapshots] interval must be a whole number of blocks, not {interval!r}"
        )
    if type(keep) is not int or keep < 1:
        raise SnapshotError(f"[snapshots] keep must be a whole number >= 1, not {keep!r}")
    return SnapshotSettings(interval, keep)


def encode_chunk(records: list[SnapshotRecord]) -> bytes:
    return zlib.compress(msgspec.msgpack.encode(records), 6)


def decode_chunk(data: bytes) -> list[SnapshotRecord]:
    """A chunk's rows; a chunk is at most CHUNK_BYTES of rows plus one row when unpacked."""
    decompressor = zlib.decompressobj()
    raw = decompressor.decompress(data, 2 * CHUNK_BYTES + 32 * 1024 * 1024)
    if decompressor.unconsumed_tail or not decompressor.eof:
        raise SnapshotError("chunk does not unpack within its bound")
    rows = msgspec.msgpack.decode(raw, type=list[tuple[Any, ...]])
    return rows


class SnapshotStore:
    """The snapshots this node offers its peers."""

    def __init__(self, directory: Path, settings: SnapshotSettings) -> None:
        self.directory = directory
        self.settings = settings
        self._lock = threading.Lock()
        self._taking: threading.Thread | None = None

    def due(self, height: int) -> bool:
        return self.settings.interval > 0 and height > 0 and height % self.settings.interval == 0

    def take_in_background(self, db_path: Path, height: int) -> None:
        """Start taking the snapshot of `height` (just committed) without holding up consensus.
        The read transaction is opened now, so later commits do not change what it reads."""
        reader = SnapshotReader(db_path)
        if reader.height != height:
            reader.close()
            return
        with self._lock:
            if self._taking is not None and self._taking.is_alive():
                reader.close()
                log.warning(
                    "snapshot skipped: the previous one is still being written",
                    extra={"height": height},
                )
                return
            self._taking = threading.Thread(
                target=self._take, args=(reader,), name=f"snapshot-{height}", daemon=True
            )
            self._taking.start()

    def take(self, db_path: Path) -> Snapshot:
        """Take a snapshot of the committed state now (in this thread)."""
        return self._take(SnapshotReader(db_path))

    def _take(self, reader: SnapshotReader) -> Snapshot:
        height = reader.height
        final = self.directory / str(height)
        work = self.directory / f".{height}.partial"
        try:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            hashes: list[bytes] = []
            batch: list[SnapshotRecord] = []
            size = records = 0
            for record in reader.records():
                batch.append(record)
                records += 1
                size += sum(len(v) if isinstance(v, bytes | str) else 8 for v in record)
                if size >= CHUNK_BYTES:
                    hashes.append(self._write_chunk(work, len(hashes), batch))
                    batch, size = [], 0
            hashes.append(self._write_chunk(work, len(hashes), batch))
            metadata = msgspec.msgpack.encode(Metadata(hashes, reader.app_hash, records))
            (work / "metadata").write_bytes(metadata)
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            log.exception("snapshot failed", extra={"height": height})
            raise
        finally:
            reader.close()
        self.prune()
        snapshot = self._snapshot(final)
        assert snapshot is not None
        log.info("snapshot taken", extra={"height": height, "chunks": snapshot.chunks})
        return snapshot

    @staticmethod
    def _write_chunk(directory: Path, index: int, records: list[SnapshotRecord]) -> bytes:
        data = encode_chunk(records)
        (directory / f"chunk-{index:06d}").write_bytes(data)
        return hashlib.sha256(data).digest()

    def prune(self) -> None:
        heights = sorted(self._heights(), reverse=True)
        for height in heights[self.settings.keep :]:
            shutil.rmtree(self.directory / str(height), ignore_errors=True)

    def _heights(self) -> list[int]:
        if not self.directory.exists():
            return []
        return [int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir()]

    def _snapshot(self, directory: Path) -> Snapshot | None:
        try:
            metadata = (directory / "metadata").read_bytes()
            meta = msgspec.msgpack.decode(metadata, type=Metadata)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None
        return Snapshot(
            int(directory.name),
            FORMAT,
            len(meta.chunk_hashes),
            hashlib.sha256(metadata).digest(),
            metadata,
        )

    def list(self) -> list[Snapshot]:
        found = (self._snapshot(self.directory / str(h)) for h in sorted(self._heights()))
        return [s for s in found if s is not None]

    def chunk(self, height: int, format: int, index: int) -> bytes:
        """One chunk, or b"" when this node does not have it (CometBFT asks another peer)."""
        if format != FORMAT or not 0 <= index < MAX_CHUNKS or height <= 0:
            return b""
        try:
            return (self.directory / str(height) / f"chunk-{index:06d}").read_bytes()
        except OSError:
            return b""
