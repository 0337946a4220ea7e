"""Package replication: after a block commits, every node fetches the packages it lacks from
its peers, checks each against its digest, and retries with backoff until it has them.
Erasure deletes a package as soon as the block that erases it commits.

Each digest has its own schedule: a digest no peer has (a record naming a package that was
never uploaded) waits longer after each failed round, up to `max_backoff`, and is then retried
at that slow pace for as long as a committed record names it; it never delays other digests,
since fetches run concurrently (at most `concurrency` at once) and digests never tried go
first. Whatever a peer answers or a digest contains, a fetch fails only for itself: every
error is caught and the digest rescheduled. A peer's answer is read as a stream and abandoned
as soon as it is longer than the record's declared package size (at most `MAX_PACKAGE_BYTES`),
or when the whole exchange takes longer than `peer_timeout`.

A fetch that completes after the package was erased is dropped: the package store keeps a
tombstone of every erased digest and refuses to store it again.

To keep up with ingest, packages are fetched in batches: due digests are grouped by the
organization whose node most likely holds them (the record's author's, `source`), and each
group of up to `batch_size` is asked of that node in one request (`POST /v1/packages/batch`).
Whatever it does not return is then fetched digest by digest from every peer, concurrently,
as before — so a peer that lacks the batch endpoint, or a package, costs one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

import httpx
import msgspec

from medledger.auth import node_audience, sign_request
from medledger.crypto.keys import KeyPair
from medledger.ledger.records import MAX_PACKAGE_BYTES
from medledger.services.packages import BATCH_PATH, BATCH_SIZE
from medledger.store.packages import ErasedPackage, PackageStore, PackageStoreError, is_digest

log = logging.getLogger("medledger.replication")

BATCH_FRAMING = 72  # bytes of MessagePack framing around each package of a batch answer


class PeerAnswerError(Exception):
    """A peer's answer was refused (too large, wrong bytes)."""


class Replicator:
    def __init__(
        self,
        packages: PackageStore,
        node_keys: KeyPair,
        organization: str,
        peers: dict[str, str],
        on_change: Callable[[], None] | None = None,
        max_backoff: float = 300.0,
        *,
        first_backoff: float = 1.0,
        concurrency: int = 8,
        peer_timeout: float = 60.0,
        expected_size: Callable[[str], int | None] | None = None,
        source: Callable[[str], str | None] | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self.packages = packages
        self.node_keys = node_keys
        self.issuer = f"node:{organization}"
        self.peers = peers
        self.missing: set[str] = set()
        self.fetched = 0
        self.fetched_in_batches = 0
        self.batch_requests = 0
        self.failed_attempts = 0
        self.invalid_digests = 0
        self._wake = asyncio.Event()
        self._on_change = on_change
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._concurrency = max(1, concurrency)
        self._peer_timeout = peer_timeout
        self._expected_size = expected_size
        self._source = source
        self._batch_size = max(1, min(batch_size, BATCH_SIZE))
        self._tasks: set[asyncio.Task[None]] = set()
        self._attempts: dict[str, int] = {}
        self._next_try: dict[str, float] = {}
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        # Each missing digest's source, looked up once: the fetch loop groups every due digest
        # by source whenever it wakes, and a lookup is three state reads.
        self._sources: dict[str, str | None] = {}

    @property
    def erased(self) -> frozenset[str]:
        return self.packages.erased()

    def want(self, digests: Iterable[str]) -> None:
        """Packages that committed records reference; fetch those we lack."""
        for digest in digests:
            if not is_digest(digest):
                # The ledger only commits full-matched digests; whatever reaches here otherwise
                # can name no package and must not reach a URL.
                self.invalid_digests += 1
                log.warning("ignoring a malformed package digest", extra={"digest": digest[:80]})
                continue
            if not self.packages.is_erased(digest) and not self.packages.has(digest):
                self.missing.add(digest)
        self._changed()

    def erase(self, digests: Iterable[str]) -> None:
        for digest in digests:
            self._forget(digest)
            if not is_digest(digest):
                continue
            if self.packages.erase(digest):
                log.info("package erased", extra={"digest": digest})
        self._changed()

    def heal(self, digest: str) -> None:
        """A stored package failed its digest check: fetch a good copy again."""
        if is_digest(digest) and not self.packages.is_erased(digest):
            self.missing.add(digest)
            self._attempts.pop(digest, None)
            self._next_try.pop(digest, None)
            log.warning("package damaged; fetching it again", extra={"digest": digest})
            self._changed()

    def next_try_in(self, digest: str) -> float:
        """Seconds until `digest` is tried again (0: now, or not scheduled)."""
        due = self._next_try.get(digest)
        if due is None:
            return 0.0
        return max(0.0, due - asyncio.get_running_loop().time())

    def status(self) -> dict[str, Any]:
        return {
            "missing": len(self.missing),
            "retrying": sum(1 for d in self.missing if self._attempts.get(d)),
            "in_flight": len(self._in_flight),
            "requests_in_flight": len(self._tasks),
            "fetched": self.fetched,
            "fetched_in_batches": self.fetched_in_batches,
            "batch_requests": self.batch_requests,
            "failed_attempts": self.failed_attempts,
            "invalid_digests": self.invalid_digests,
        }

    def _forget(self, digest: str) -> None:
        self.missing.discard(digest)
        self._sources.pop(digest, None)
        self._attempts.pop(digest, None)
        self._next_try.pop(digest, None)

    def _changed(self) -> None:
        self._wake.set()
        if self._on_change is not None:
            self._on_change()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = httpx.Timeout(10.0)
        limits = httpx.Limits(max_connections=self._concurrency * 2)
        async with httpx.AsyncClient(
            timeout=timeout, limits=limits, follow_redirects=False
        ) as client:
            try:
                while True:
                    self._wake.clear()
                    self._start_due(client, loop.time())
                    delay = self._next_delay(loop.time())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
            finally:
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self._tasks.clear()
                self._in_flight.clear()

    def _start_due(self, client: httpx.AsyncClient, now: float) -> None:
        # Digests never tried (0) first, then the longest waiting: a new package is not held
        # up by many that no peer has.
        waiting = sorted(
            (self._next_try.get(d, 0.0), d) for d in self.missing if d not in self._in_flight
        )
        groups: dict[str | None, list[str]] = {}
        for due, digest in waiting:
            if due > now:
                break
            groups.setdefault(self._source_of(digest), []).append(digest)
        for source, digests in groups.items():
            for start in range(0, len(digests), self._batch_size):
                if len(self._tasks) >= self._concurrency:
                    return
                batch = digests[start : start + self._batch_size]
                task = asyncio.create_task(
                    self._attempt(client, source, batch), name=f"fetch {batch[0][:16]}"
                )
                self._tasks.add(task)
                for digest in batch:
                    self._in_flight[digest] = task

    def _next_delay(self, now: float) -> float | None:
        if len(self._tasks) >= self._concurrency:
            return None  # a finishing fetch wakes the loop
        dues = [self._next_try.get(d, 0.0) for d in self.missing if d not in self._in_flight]
        return max(0.0, min(dues) - now) if dues else None

    def _source_of(self, digest: str) -> str | None:
        """The peer to ask first: the one the record's author uploaded to, when known."""
        if self._source is None:
            return None
        if digest in self._sources:
            return self._sources[digest]
        try:
            source = self._source(digest)
        except Exception:  # a hint only
            source = None
        known = source if source in self.peers else None
        self._sources[digest] = known
        return known

    async def _attempt(
        self, client: httpx.AsyncClient, source: str | None, digests: list[str]
    ) -> None:
        try:
            stored: set[str] = set()
            if source is not None and len(digests) > 1:
                stored = await self._fetch_batch(client, source, digests)
            rest = [d for d in digests if d not in stored]
            fetched = await asyncio.gather(*(self._attempt_one(client, d, source) for d in rest))
            stored.update(d for d, ok in zip(rest, fetched, strict=True) if ok)
        finally:
            for digest in digests:
                self._in_flight.pop(digest, None)
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)
        for digest in digests:
            self._settle(digest, digest in stored)
        self._changed()

    async def _attempt_one(
        self, client: httpx.AsyncClient, digest: str, source: str | None
    ) -> bool:
        try:
            return await self._fetch(client, digest, source)
        except Exception as exc:  # whatever happens, only this digest waits
            self.failed_attempts += 1
            log.warning(
                "package fetch failed",
                extra={"digest": digest, "error": f"{type(exc).__name__}: {exc}"[:200]},
            )
            return False

    def _settle(self, digest: str, stored: bool) -> None:
        if stored or self.packages.is_erased(digest) or self.packages.has(digest):
            self._forget(digest)
        elif digest in self.missing:
            attempts = self._attempts.get(digest, 0) + 1
            self._attempts[digest] = attempts
            delay = min(self._first_backoff * 2 ** min(attempts - 1, 30), self._max_backoff)
            delay *= random.uniform(1.0, 1.25)  # nodes that failed together retry apart
            self._next_try[digest] = asyncio.get_running_loop().time() + delay

    def _size_limit(self, digest: str) -> int:
        expected = self._expected_size(digest) if self._expected_size is not None else None
        if expected is None or not 0 < expected <= MAX_PACKAGE_BYTES:
            return MAX_PACKAGE_BYTES
        return expected

    async def _fetch_batch(
        self, client: httpx.AsyncClient, organization: str, digests: list[str]
    ) -> set[str]:
        """Ask one peer for many packages at once; the digests stored. A peer without the
        batch endpoint, or any failure, stores nothing and is not an error of any digest."""
        limits = {d: self._size_limit(d) for d in digests}
        body = json.dumps({"digests": digests}).encode()
        headers = {
            "Authorization": sign_request(
                self.node_keys,
                self.issuer,
                "POST",
                BATCH_PATH,
                body,
                audience=node_audience(organization),
            ),
            "Accept-Encoding": "identity",
            "Content-Type": "application/json",
        }
        url = self.peers[organization].rstrip("/") + BATCH_PATH
        self.batch_requests += 1
        # MessagePack framing: an array header, then per package a 2-array, the digest as a
        # str 8 (2 + 64 bytes) and the bytes' bin header (at most 5).
        ceiling = sum(limits.values()) + BATCH_FRAMING * len(digests) + 8
        try:
            async with asyncio.timeout(self._peer_timeout):
                async with client.stream("POST", url, content=body, headers=headers) as response:
                    if response.status_code != 200:
                        return set()
                    raw = await read_bounded(response, ceiling)
            answer = msgspec.msgpack.decode(raw, type=list[tuple[str, bytes]])
        except Exception as exc:  # a bad peer or answer: fetch one by one instead
            self.failed_attempts += 1
            log.warning(
                "peer did not serve a batch",
                extra={"peer": organization, "error": f"{type(exc).__name__}: {exc}"[:200]},
            )
            return set()
        # Written in a worker thread: each package is synced to disk, and the event loop also
        # answers CometBFT.
        stored = await asyncio.to_thread(self._store_batch, answer, limits)
        self.fetched += len(stored)
        self.fetched_in_batches += len(stored)
        return stored

    def _store_batch(self, answer: list[tuple[str, bytes]], limits: dict[str, int]) -> set[str]:
        asked: dict[str, bytes] = {}
        for digest, data in answer:
            if digest in limits and digest not in asked and len(data) <= limits[digest]:
                asked[digest] = data
        written = self.packages.put_many(list(asked.items()))
        # Erased meanwhile, or bytes not matching: not stored, the single fetch decides.
        return {
            digest
            for digest, put in zip(asked, written, strict=True)
            if not isinstance(put, PackageStoreError)
        }

    async def _fetch(
        self, client: httpx.AsyncClient, digest: str, source: str | None = None
    ) -> bool:
        """Try each peer in turn, `source` first; True once a copy matching the digest is
        stored."""
        limit = self._size_limit(digest)
        peers = sorted(self.peers.items(), key=lambda item: item[0] != source)
        for organization, base in peers:
            if self.packages.is_erased(digest):
                return False
            try:
                async with asyncio.timeout(self._peer_timeout):
                    data = await self._fetch_from(client, organization, base, digest, limit)
            except Exception as exc:  # a bad peer, URL or answer: try the next peer
                self.failed_attempts += 1
                log.warning(
                    "peer did not serve a package",
                    extra={
                        "peer": organization,
                        "digest": digest,
                        "error": f"{type(exc).__name__}: {exc}"[:200],
                    },
                )
                continue
            if data is None:
                self.failed_attempts += 1
                continue
            try:
                # The store refuses an erased digest, also when the erasure committed while
                # this fetch was waiting for the peer.
                await asyncio.to_thread(self.packages.put, digest, data)
            except ErasedPackage:
                log.info("dropped a package erased while it was fetched", extra={"digest": digest})
                return False
            except PackageStoreError as exc:
                # A peer that serves bytes not matching the digest is faulty; try the next.
                log.warning(
                    "peer served a bad package", extra={"peer": organization, "error": str(exc)}
                )
                self.failed_attempts += 1
                continue
            self.fetched += 1
            return True
        return False

    async def _fetch_from(
        self, client: httpx.AsyncClient, organization: str, base: str, digest: str, limit: int
    ) -> bytes | None:
        """The peer's copy of the package, or None when it has none; PeerAnswerError when its
        answer is longer than `limit` bytes."""
        path = f"/v1/packages/{digest}"
        headers = {
            "Authorization": sign_request(
                self.node_keys, self.issuer, "GET", path, audience=node_audience(organization)
            ),
            # The bytes must hash to the digest as sent; and no decompression bomb.
            "Accept-Encoding": "identity",
        }
        async with client.stream("GET", base.rstrip("/") + path, headers=headers) as response:
            if response.status_code != 200:
                return None
            return await read_bounded(response, limit)


async def read_bounded(response: httpx.Response, limit: int) -> bytes:
    """A peer's answer, abandoned (PeerAnswerError) as soon as it announces or sends more than
    `limit` bytes."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PeerAnswerError(f"peer announced {declared} bytes, more than {limit}")
    chunks: list[bytes] = []
    received = 0
    async for chunk in response.aiter_raw():
        received += len(chunk)
        if received > limit:
            raise PeerAnswerError(f"peer sent more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
