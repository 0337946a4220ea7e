"""Package replication: after a block commits, every node fetches the packages it lacks from
its peers, checks each against its digest, and retries with backoff until it has them.
Erasure deletes a package as soon as the block that erases it commits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import httpx

from medledger.api.auth import node_audience, sign_request
from medledger.crypto.keys import KeyPair
from medledger.store.packages import PackageStore, PackageStoreError

log = logging.getLogger("medledger.replication")


class Replicator:
    def __init__(
        self,
        packages: PackageStore,
        node_keys: KeyPair,
        organization: str,
        peers: dict[str, str],
        on_change: Callable[[], None] | None = None,
        max_backoff: float = 30.0,
    ) -> None:
        self.packages = packages
        self.node_keys = node_keys
        self.issuer = f"node:{organization}"
        self.peers = peers
        self.missing: set[str] = set()
        self.erased: set[str] = set()
        self.fetched = 0
        self.failed_attempts = 0
        self._wake = asyncio.Event()
        self._on_change = on_change
        self._max_backoff = max_backoff

    def want(self, digests: list[str]) -> None:
        """Packages that committed records reference; fetch those we lack."""
        for digest in digests:
            if digest not in self.erased and not self.packages.has(digest):
                self.missing.add(digest)
        self._changed()

    def erase(self, digests: list[str]) -> None:
        for digest in digests:
            self.erased.add(digest)
            self.missing.discard(digest)
            if self.packages.delete(digest):
                log.info("package erased", extra={"digest": digest})
        self._changed()

    def heal(self, digest: str) -> None:
        """A stored package failed its digest check: fetch a good copy again."""
        if digest not in self.erased:
            self.missing.add(digest)
            log.warning("package damaged; fetching it again", extra={"digest": digest})
            self._changed()

    def _changed(self) -> None:
        self._wake.set()
        if self._on_change is not None:
            self._on_change()

    async def run(self) -> None:
        backoff = 0.5
        async with httpx.AsyncClient(timeout=10.0) as client:
            while True:
                if not self.missing:
                    self._wake.clear()
                    await self._wake.wait()
                    backoff = 0.5
                    continue
                progress = False
                for digest in sorted(self.missing):
                    if await self._fetch(client, digest):
                        self.missing.discard(digest)
                        progress = True
                self._changed()
                if self.missing and not progress:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), backoff)
                    backoff = min(backoff * 2, self._max_backoff)

    async def _fetch(self, client: httpx.AsyncClient, digest: str) -> bool:
        path = f"/v1/packages/{digest}"
        for organization, base in self.peers.items():
            try:
                response = await client.get(
                    base.rstrip("/") + path,
                    headers={
                        "Authorization": sign_request(
                            self.node_keys,
                            self.issuer,
                            "GET",
                            path,
                            audience=node_audience(organization),
                        )
                    },
                )
            except httpx.HTTPError:
                self.failed_attempts += 1
                continue
            if response.status_code != 200:
                self.failed_attempts += 1
                continue
            try:
                self.packages.put(digest, response.content)
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
