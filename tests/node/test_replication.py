"""Replication against hostile and broken peers, over real sockets: a digest no peer has, a
malformed digest, a peer that trickles or floods its answer, and an erasure that commits while
a fetch is under way. Each must cost only the digest concerned, and the replication task
keeps running."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import keys_for

from medledger.node.replication import Replicator
from medledger.store.packages import ErasedPackage, PackageStore, PackageStoreError

NOTHING = "0" * 64  # sorts before every other digest, as the first a replicator tries


def package(tag: str) -> tuple[str, bytes]:
    data = f"sealed package {tag} ".encode() + os.urandom(512)
    return hashlib.sha256(data).hexdigest(), data


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Peer:
    """A peer node's package API played by the test: `packages` are served as they are,
    `handlers` answer for particular digests however the test likes."""

    packages: dict[str, bytes] = field(default_factory=dict)
    handlers: dict[str, Handler] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)
    # Batch requests (the digests of each); with `batches_served` False the peer lacks the
    # endpoint (404), as a node of an older release would.
    batches: list[list[str]] = field(default_factory=list)
    batches_served: bool = True
    batch_answer: Callable[[list[str]], list[tuple[str, bytes]]] | None = None
    server: TestServer | None = None

    async def _batch(self, request: web.Request) -> web.StreamResponse:
        asked = json.loads(await request.read())["digests"]
        self.batches.append(asked)
        if not self.batches_served:
            return web.json_response({"error": "not found"}, status=404)
        if self.batch_answer is not None:
            found = self.batch_answer(asked)
        else:
            found = [(d, self.packages[d]) for d in asked if d in self.packages]
        return web.Response(body=msgspec.msgpack.encode(found))

    async def _get(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        self.asked.append(digest)
        if digest in self.handlers:
            return await self.handlers[digest](request)
        if digest in self.packages:
            return web.Response(body=self.packages[digest])
        return web.json_response({"error": "not here"}, status=404)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/packages/batch", self._batch)
        app.router.add_get("/v1/packages/{digest}", self._get)
        self.server = TestServer(app)
        await self.server.start_server()
        return str(self.server.make_url("/"))


async def eventually(predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
    """Wait until `predicate()` holds (the deadline only keeps a broken build from hanging)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Harness:
    store: PackageStore
    replicator: Replicator
    task: asyncio.Task[None]
    peers: list[Peer]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    started: list[Harness] = []

    async def start(*peers: Peer, **options: object) -> Harness:
        urls = {f"peer-{i}": await p.start() for i, p in enumerate(peers)}
        store = PackageStore(tmp_path / "packages")
        replicator = Replicator(store, keys_for("st-mary/node"), "st-mary", urls, **options)  # type: ignore[arg-type]
        task = asyncio.create_task(replicator.run())
        started.append(Harness(store, replicator, task, list(peers)))
        return started[-1]

    yield start
    for h in started:
        h.task.cancel()
        await asyncio.gather(h.task, return_exceptions=True)
        for peer in h.peers:
            assert peer.server is not None
            await peer.server.close()


async def test_a_malformed_digest_does_not_stop_replication(
    harness: Callable[..., Awaitable[Harness]],
) -> None:
    digest, data = package("real")
    h = await harness(Peer(packages={digest: data}))

    # A digest with a trailing newline (which `re.match("^...$")` lets through) would make
    # httpx raise InvalidURL.
    h.replicator.want([NOTHING + "\n", digest])

    await eventually(lambda: h.store.has(digest) or h.task.done(), "the real package")
    assert not h.task.done(), h.task.exception()
    assert h.store.get(digest) == data
    assert h.replicator.status()["invalid_digests"] == 1
    assert h.replicator.missing == set()


async def test_a_digest_no_peer_has_waits_on_its_own(
    harness: Callable[..., Awaitable[Harness]],
) -> None:
    digest, data = package("real")
    peer = Peer(packages={digest: data})
    h = await harness(peer, first_backoff=30.0)
    h.replicator.want([NOTHING])
    await eventually(lambda: h.replicator.next_try_in(NOTHING) > 0, "the first failed round")

    h.replicator.want([digest])
    await eventually(lambda: h.store.has(digest), "the real package")

    # The missing digest was asked for once and waits at least its backoff before the next
    # round; the real one did not wait for it.
    assert peer.asked.count(NOTHING) == 1
    assert h.replicator.next_try_in(NOTHING) > 20
    assert h.replicator.missing == {NOTHING}
    assert h.replicator.status()["retrying"] == 1
    assert not h.task.done()


async def test_a_missing_packages_author_is_looked_up_once_however_often_it_is_retried(
    harness: Callable[..., Awaitable[Harness]],
) -> None:
    """The fetch loop groups every due digest by its author's node each time it wakes; the
    lookup reads committed state three times, so with thousands of packages missing it took
    nearly half of a node's event loop before it was remembered."""
    digest, data = package("found-later")
    peer = Peer(packages={})
    lookups: list[str] = []

    def source(wanted: str) -> str:
        lookups.append(wanted)
        return "peer-0"

    h = await harness(peer, first_backoff=0.02, source=source)
    h.replicator.want([NOTHING, digest])
    await eventually(lambda: peer.asked.count(digest) >= 3, "three rounds for the missing one")
    assert sorted(lookups) == sorted([NOTHING, digest])

    peer.packages[digest] = data  # it turns up on the peer; once fetched, it is forgotten
    await eventually(lambda: h.store.has(digest) and digest not in h.replicator.missing, "stored")
    assert digest not in h.replicator._sources and NOTHING in h.replicator._sources


async def test_a_peer_that_trickles_its_answer_does_not_hold_up_other_packages(
    harness: Callable[..., Awaitable[Harness]],
) -> None:
    digest, data = package("real")
    stop = asyncio.Event()

    async def trickle(request: web.Request) -> web.StreamResponse:
        # One byte every 100 ms: never idle long enough for a read timeout.
        response = web.StreamResponse()
        await response.prepare(request)
        while not stop.is_set():
            try:
                await response.write(b"x")
            except ConnectionError:
                break
            await asyncio.sleep(0.1)
        return response

    h = await harness(Peer(packages={digest: data}, handlers={NOTHING: trickle}))
    h.replicator.want([NOTHING, digest])
    try:
        await eventually(lambda: h.store.has(digest), "the real package")
        assert NOTHING in h.replicator.missing
        assert not h.task.done()
    finally:
        stop.set()


async def test_a_peer_answer_longer_than_the_package_is_cut_off(
    harness: Callable[..., Awaitable[Harness]],
) -> None:
    digest, data = package("real")
    flood_total = 64 * 1024 * 1024
    flood = {"sent": 0, "cut_off": False}

    async def flood_answer(request: web.Request) -> web.StreamResponse:
        # Chunked, so there is no Content-Length to refuse up front.
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b"\0" * 65536
        try:
            while flood["sent"] < flood_total:
                await response.write(chunk)
                flood["sent"] += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            # aiohttp cancels a handler whose client went away.
            flood["cut_off"] = True
            raise
        return response

    flooder = Peer(handlers={digest: flood_answer})
    honest = Peer(packages={digest: data})
    h = await harness(flooder, honest, expected_size=lambda d: len(data))
    h.replicator.want([digest])

    await eventually(lambda: h.store.has(digest), "the honest peer's copy")
    await eventually(lambda: flood["cut_off"], "the flooding peer to be cut off")
    assert flood["sent"] < flood_total
    assert h.store.get(digest) == data
    assert h.replicator.failed_attempts >= 1


async def test_a_fetch_finishing_after_an_erasure_does_not_bring_the_package_back(
    harness: Callable[..., Awaitable[Harness]], tmp_path: Path
) -> None:
    digest, data = package("to-erase")
    asked = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        asked.set()
        await release.wait()
        return web.Response(body=data)

    h = await harness(Peer(handlers={digest: slow}))
    h.replicator.want([digest])
    await asyncio.wait_for(asked.wait(), 30)

    # The erasure commits while the peer is still answering.
    h.replicator.erase([digest])
    release.set()
    await eventually(lambda: h.replicator.status()["in_flight"] == 0, "the fetch to end")

    assert not h.store.has(digest)
    assert h.replicator.missing == set()
    # Nor does a restart, or an upload, store it again.
    restarted = PackageStore(tmp_path / "packages")
    with pytest.raises(ErasedPackage):
        restarted.put(digest, data)
    assert not restarted.has(digest)
    h.replicator.want([digest])
    assert h.replicator.missing == set()


async def test_packages_come_in_one_batch_from_the_authors_node(
    harness: Callable[..., Awaitable[Harness]],
) -> None:
    written = dict(package(f"batch-{i}") for i in range(5))
    digests = sorted(written)
    elsewhere = digests[0]  # the author's node lacks this one; another peer has it
    other = Peer(packages={elsewhere: written[elsewhere]})
    author = Peer(packages={d: written[d] for d in digests[1:]})
    # Each package exactly as large as its committed record declares: the answer's framing
    # must not count against the packages' sizes.
    h = await harness(
        other,
        author,
        source=lambda digest: "peer-1",
        expected_size=lambda digest: len(written[digest]),
    )
    h.replicator.want(digests)

    # Stored, and settled: a package is in the store a moment before the replicator forgets it.
    await eventually(
        lambda: all(h.store.has(d) for d in digests) and not h.replicator.missing,
        "every package, none missing",
    )
    assert author.batches == [digests]
    # What the author's node returned was not asked again one by one; the one it lacked was
    # asked of it once and then of the other peer.
    assert author.asked == [elsewhere]
    assert other.asked == [elsewhere] and other.batches == []
    assert h.replicator.status()["fetched"] == 5
    assert h.replicator.status()["fetched_in_batches"] == 4
    assert h.replicator.missing == set()


async def test_a_batch_with_wrong_bytes_stores_none_of_them(
    harness: Callable[..., Awaitable[Harness]],
) -> None:
    good, good_data = package("good")
    forged, forged_data = package("forged")
    honest = Peer(packages={forged: forged_data})
    liar = Peer(
        packages={good: good_data},
        batch_answer=lambda asked: [
            (good, good_data),
            (forged, b"not the package"),
            ("f" * 64, b"never asked for"),
        ],
    )
    h = await harness(honest, liar, source=lambda digest: "peer-1")
    h.replicator.want([good, forged])

    await eventually(lambda: h.store.has(good) and h.store.has(forged), "both packages")
    assert h.store.get(forged) == forged_data
    assert not h.store.has("f" * 64)
    assert honest.asked == [forged]


async def test_a_peer_without_the_batch_endpoint_serves_one_by_one(
    harness: Callable[..., Awaitable[Harness]],
) -> None:
    written = dict(package(f"old-{i}") for i in range(3))
    old = Peer(packages=written, batches_served=False)
    h = await harness(old, source=lambda digest: "peer-0")
    h.replicator.want(written)

    await eventually(lambda: all(h.store.has(d) for d in written), "every package")
    assert len(old.batches) == 1
    assert sorted(old.asked) == sorted(written)


def test_a_package_erased_while_a_worker_thread_writes_it_does_not_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploads and replication write packages in worker threads; an erasure committing on the
    event loop meanwhile (between the store's erased check and its rename) still wins."""
    store = PackageStore(tmp_path / "packages")
    data = b"sealed bytes"
    digest = hashlib.sha256(data).hexdigest()
    real_fsync = os.fsync
    erasing = []

    def fsync_then_erase(fd: int) -> None:
        real_fsync(fd)
        if not erasing:  # the package's own fsync: the erasure comes now
            erasing.append(True)
            store.erase(digest)

    monkeypatch.setattr("medledger.store.packages.os.fsync", fsync_then_erase)
    with pytest.raises(ErasedPackage):
        store.put(digest, data)
    assert not store.has(digest)
    assert not any(p.is_file() for p in (tmp_path / "packages" / digest[:2]).iterdir())


def test_a_batch_of_packages_is_answered_item_by_item_and_synced_together(tmp_path: Path) -> None:
    store = PackageStore(tmp_path / "packages")
    packages = [f"package {i}".encode() for i in range(5)]
    digests = [hashlib.sha256(p).hexdigest() for p in packages]
    store.put(digests[0], packages[0])
    store.erase(digests[4])
    items = [
        (digests[0], packages[0]),  # already there
        (digests[1], packages[1]),
        (digests[2], packages[3]),  # bytes of another package
        (digests[1], packages[1]),  # twice in one batch
        (digests[4], packages[4]),  # erased
        ("not-a-digest", b"x"),
        (digests[3], packages[3]),
    ]
    answers = store.put_many(items)
    assert answers[:2] == [False, True] and answers[3] is False and answers[6] is True
    assert isinstance(answers[2], PackageStoreError) and "hash to" in str(answers[2])
    assert isinstance(answers[4], ErasedPackage)
    assert isinstance(answers[5], PackageStoreError) and not isinstance(answers[5], ErasedPackage)
    assert [store.get(d) for d in digests[:4]] == [packages[0], packages[1], None, packages[3]]
    assert not store.has(digests[4])
    leftovers = [p for p in (tmp_path / "packages").rglob(".*.tmp")]
    assert leftovers == []
