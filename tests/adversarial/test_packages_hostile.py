"""Hostile members against a node's package store and key release, through the node's real
HTTP application (aiohttp test server) over an in-process chain.

The threat: an organization that holds a copy of another record's package (its node stores
every package) must not turn that copy into key shares of the other record; uploads must not
bring back what erasure destroyed or fill the node's disk with packages no record names; and
the upload limit is the 16 MiB the ledger allows, not aiohttp's 1 MiB default."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from conftest import ORGANIZATIONS, Consortium, keys_for

from medledger.abci.application import LedgerApplication
from medledger.api.http import build_http_app
from medledger.api.records import add_record_routes
from medledger.auth import ReplayCache, node_audience, sign_request
from medledger.client.records import RecordsClient
from medledger.client.sdk import ClientError, LedgerClient
from medledger.crypto import package as packaging
from medledger.crypto.keys import KeyPair
from medledger.ledger.access import RequestAccess, RequestSession
from medledger.ledger.app import BlockOutcome
from medledger.ledger.consent import Purpose
from medledger.ledger.model import Role
from medledger.ledger.records import EraseRecord, PutRecord, threshold_for
from medledger.ledger.transactions import EnrollMember
from medledger.node.appmain import commit_hook
from medledger.node.replication import Replicator
from medledger.services.commits import CommitNotices
from medledger.services.packages import RecordServices
from medledger.store.node_audit import NodeAuditLog
from medledger.store.packages import ErasedPackage, PackageStore
from medledger.store.sqlite import CommittedView
from medledger.store.uploads import PendingUploads, QuotaExceeded, UploadLimits

CUSTODIANS = tuple(sorted(org for org, _, _ in ORGANIZATIONS))
THRESHOLD = threshold_for(len(CUSTODIANS))
# Custodian nodes the tests run: as many as the threshold, so their shares are enough to
# recover a data key.
NODES = ("careplus", "northside-lab")


@dataclass
class Node:
    """One custodian organization's node: its HTTP API, package store and release log."""

    organization: str
    client: TestClient  # type: ignore[type-arg]
    services: RecordServices
    after_commit: Callable[[BlockOutcome], None]

    async def call(
        self, keys: KeyPair, method: str, path: str, body: bytes = b""
    ) -> ClientResponse:
        header = sign_request(
            keys, keys.member_id, method, path, body, audience=node_audience(self.organization)
        )
        return await self.client.request(method, path, data=body, headers={"Authorization": header})

    async def upload(self, keys: KeyPair, package: bytes) -> ClientResponse:
        return await self.call(
            keys, "PUT", f"/v1/packages/{packaging.package_digest(package)}", package
        )

    async def release(self, keys: KeyPair, grant_id: str) -> ClientResponse:
        body = json.dumps({"grant": grant_id}).encode()
        return await self.call(keys, "POST", "/v1/keys/release", body)

    def releases(self) -> list[dict[str, Any]]:
        return self.services.audit.entries("key.release")


async def start_node(
    consortium: Consortium, root: Path, organization: str, limits: UploadLimits | None = None
) -> Node:
    node_keys = keys_for(f"{organization}/node")
    packages = PackageStore(root / "packages")
    services = RecordServices(
        store=consortium.chain.store,
        view=CommittedView(consortium.chain.store.path),
        packages=packages,
        replicator=Replicator(packages, node_keys, organization, {}),
        node_keys=node_keys,
        organization=organization,
        peers={},
        api_url="http://127.0.0.1:1",
        audit=NodeAuditLog(root / "node-audit.db"),
        replays=ReplayCache(),
        uploads=PendingUploads(root / "packages" / "pending", limits),
    )
    app = build_http_app(LedgerApplication(consortium.chain.store), "http://127.0.0.1:1")
    add_record_routes(app, services)
    client = TestClient(TestServer(app))
    await client.start_server()
    return Node(
        organization,
        client,
        services,
        commit_hook(services.replicator, services.uploads, CommitNotices()),
    )


@pytest.fixture
async def nodes(consortium: Consortium, tmp_path: Path) -> AsyncIterator[dict[str, Node]]:
    started = {org: await start_node(consortium, tmp_path / org, org) for org in NODES}
    yield started
    for node in started.values():
        await node.client.close()
        node.services.audit.close()


class People:
    def __init__(self, c: Consortium) -> None:
        self.c = c
        self.patient = self.enroll("st-mary", "patient-maria", Role.PATIENT)
        self.doctor = self.enroll("st-mary", "dr-alice", Role.CLINICIAN)
        # A clinician of another organization, which runs a node that stores every package.
        self.attacker = self.enroll("riverside", "dr-mallory", Role.CLINICIAN)

    def enroll(self, org: str, name: str, role: Role) -> KeyPair:
        keys = keys_for(name)
        body = EnrollMember(keys.verify_key, keys.encryption_key, role)
        assert self.c.submit(self.c.admin(org), "member.enroll", body).ok
        return keys


@pytest.fixture
def people(consortium: Consortium) -> People:
    return People(consortium)


PLAINTEXT = b'{"resourceType":"Condition","code":{"text":"Type 2 diabetes mellitus"}}'


def seal(
    record_id: str, people: People, author: KeyPair, plaintext: bytes = PLAINTEXT, version: int = 1
) -> packaging.SealedRecord:
    return packaging.seal_record(
        plaintext,
        record_id=record_id,
        record_version=version,
        patient=people.patient.member_id,
        author=author.member_id,
        patient_key=people.patient.encryption_key,
        author_key=author.encryption_key,
        custodians=[
            packaging.Custodian(org, i + 1, keys_for(f"{org}/node").encryption_key)
            for i, org in enumerate(CUSTODIANS)
        ],
        threshold=THRESHOLD,
    )


def put_body(record_id: str, patient: str, package: bytes, commitment: bytes) -> PutRecord:
    return PutRecord(
        record_id=record_id,
        patient=patient,
        resource_type="Condition",
        category="problem-list-item",
        package_digest=packaging.package_digest(package),
        package_size=len(package),
        commitment=commitment,
        threshold=THRESHOLD,
        custodians=CUSTODIANS,
    )


def commit(
    c: Consortium, nodes: dict[str, Node], who: KeyPair, tx_type: str, body: object
) -> BlockOutcome:
    """One transaction in its own block, with each node's after-commit work done (as a node
    does after CometBFT's Commit)."""
    outcome = c.run(c.tx(who, tx_type, body))
    assert outcome.results[0].ok, outcome.results[0].log
    for node in nodes.values():
        node.after_commit(outcome)
    return outcome


def grant_of(c: Consortium, who: KeyPair, record_id: str) -> str:
    result = c.submit(who, "access.request", RequestAccess(record_id, Purpose.TREATMENT))
    assert result.ok, result.log
    return result.log.split("grant ")[1].split()[0]


async def write_record(
    c: Consortium, nodes: dict[str, Node], people: People, record_id: str
) -> packaging.SealedRecord:
    sealed = seal(record_id, people, people.doctor)
    for node in nodes.values():
        assert (await node.upload(people.doctor, sealed.package)).status == 201
    body = put_body(record_id, people.patient.member_id, sealed.package, sealed.commitment)
    commit(c, nodes, people.doctor, "record.put", body)
    return sealed


async def shares_released(
    nodes: dict[str, Node], who: KeyPair, grant_id: str
) -> tuple[list[packaging.Share], list[tuple[int, str]]]:
    """The shares the nodes release to `who` for `grant_id`, and the refusals."""
    shares, refusals = [], []
    for node in nodes.values():
        response = await node.release(who, grant_id)
        answer = await response.json()
        if response.status == 200:
            sealed = base64.b64decode(answer["sealed_share"])
            shares.append(packaging.unseal_share(sealed, who.encryption_secret))
        else:
            refusals.append((response.status, answer["error"]))
    return shares, refusals


def transplant(package: bytes) -> bytes:
    """Record A's package with one byte of its patient envelope changed: a new digest, the
    same sealed custodian shares."""
    decoded = packaging.decode_package(package)
    envelope = bytearray(decoded.patient_envelope)
    envelope[-1] ^= 0x01
    copy = msgspec.structs.replace(decoded, patient_envelope=bytes(envelope))
    return msgspec.msgpack.encode(copy)


async def test_a_transplanted_package_gets_no_shares_of_the_record_it_was_copied_from(
    consortium: Consortium, nodes: dict[str, Node], people: People
) -> None:
    c = consortium
    original = await write_record(c, nodes, people, "condition-a")

    # The attacker uploads the altered copy and commits a record of their own naming it.
    copy = transplant(original.package)
    assert packaging.package_digest(copy) != original.digest
    for node in nodes.values():
        assert (await node.upload(people.attacker, copy)).status == 201
    fake_commitment = hashlib.sha256(b"anything").digest()
    body = put_body("condition-b", people.patient.member_id, copy, fake_commitment)
    assert c.submit(people.attacker, "record.put", body).ok
    # As record B's author, the ledger grants the attacker access to B.
    grant_id = grant_of(c, people.attacker, "condition-b")

    shares, refusals = await shares_released(nodes, people.attacker, grant_id)

    # Had the custodians released, these shares would open record A.
    if len(shares) >= THRESHOLD:
        key = packaging.combine_shares(packaging.decode_package(original.package), shares)
        leaked = packaging.decrypt_record(
            packaging.decode_package(original.package), key, original.commitment
        )
        pytest.fail(f"record A leaked through a transplanted package: {leaked[:30]!r}")
    assert shares == []
    assert [status for status, _ in refusals] == [409] * len(nodes)
    for _, reason in refusals:
        assert "condition-a" in reason and "condition-b" in reason, reason
        assert "no share released" in reason
    for node in nodes.values():
        [entry] = node.releases()
        assert entry["outcome"] == "refused" and entry["target"] == grant_id
        assert entry["actor"] == people.attacker.member_id

    # The record the package really belongs to is still read through its own grant.
    patient_grant = grant_of(c, people.patient, "condition-a")
    shares, refusals = await shares_released(nodes, people.patient, patient_grant)
    assert refusals == []
    package = packaging.decode_package(original.package)
    key = packaging.combine_shares(package, shares)
    assert packaging.decrypt_record(package, key, original.commitment) == PLAINTEXT


async def test_an_erased_record_is_not_read_through_a_copy_of_its_package(
    consortium: Consortium, nodes: dict[str, Node], people: People
) -> None:
    c = consortium
    original = await write_record(c, nodes, people, "condition-erased")
    copy = transplant(original.package)
    assert c.submit(
        people.patient, "record.erase", EraseRecord("condition-erased", "patient request")
    ).ok
    for node in nodes.values():
        assert (await node.upload(people.attacker, copy)).status == 201
    body = put_body("condition-c", people.patient.member_id, copy, original.commitment)
    assert c.submit(people.attacker, "record.put", body).ok
    grant_id = grant_of(c, people.attacker, "condition-c")

    shares, refusals = await shares_released(nodes, people.attacker, grant_id)

    assert shares == []
    assert {status for status, _ in refusals} == {409}
    assert all("condition-erased" in reason for _, reason in refusals)


# -- erasure ------------------------------------------------------------------------------------


async def test_an_erased_package_is_never_stored_again(
    consortium: Consortium, nodes: dict[str, Node], people: People, tmp_path: Path
) -> None:
    c = consortium
    sealed = await write_record(c, nodes, people, "condition-gone")
    commit(c, nodes, people.patient, "record.erase", EraseRecord("condition-gone", "GDPR Art. 17"))
    for node in nodes.values():
        assert not node.services.packages.has(sealed.digest)

    # Someone who kept a copy uploads it again, to every node.
    for node in nodes.values():
        response = await node.upload(people.doctor, sealed.package)
        assert response.status == 410
        assert "erased" in (await response.json())["error"]
        assert not node.services.packages.has(sealed.digest)
        assert sealed.digest not in node.services.uploads

    # The tombstone outlives a restart of the node's package store.
    restarted = PackageStore(tmp_path / NODES[0] / "packages")
    assert restarted.is_erased(sealed.digest)
    with pytest.raises(ErasedPackage, match="erased"):
        restarted.put(sealed.digest, sealed.package)
    assert not restarted.has(sealed.digest)


# -- uploads no record names --------------------------------------------------------------------


@pytest.fixture
async def quota_node(consortium: Consortium, tmp_path: Path) -> AsyncIterator[Node]:
    limits = UploadLimits(ttl_seconds=3600, max_bytes_per_member=10**9, max_packages_per_member=3)
    node = await start_node(consortium, tmp_path / "quota", "careplus", limits)
    yield node
    await node.client.close()
    node.services.audit.close()


async def test_uploads_no_record_names_are_capped_per_member_and_expire(
    consortium: Consortium, quota_node: Node, people: People
) -> None:
    c, node = consortium, quota_node
    uploads = node.services.uploads
    junk = [seal(f"junk-{i}", people, people.attacker).package for i in range(4)]
    for package in junk[:3]:
        response = await node.upload(people.attacker, package)
        assert response.status == 201
        assert (await response.json())["expires_in"] == 3600

    refused = await node.upload(people.attacker, junk[3])
    assert refused.status == 429
    reason = (await refused.json())["error"]
    assert "already has 3 packages" in reason and "no committed record names" in reason
    assert 1 <= int(refused.headers["Retry-After"]) <= 3600
    assert not node.services.packages.has(packaging.package_digest(junk[3]))
    assert uploads.usage(people.attacker.member_id) == (3, sum(len(p) for p in junk[:3]))

    # The quota is the member's own: a colleague elsewhere still uploads.
    honest = seal("honest-1", people, people.doctor)
    assert (await node.upload(people.doctor, honest.package)).status == 201

    # A committed record that names an upload makes it permanent and frees its quota.
    named = junk[0]
    decoded = packaging.decode_package(named)
    body = put_body(decoded.record_id, people.patient.member_id, named, b"\0" * 32)
    commit(c, {"careplus": node}, people.attacker, "record.put", body)
    assert packaging.package_digest(named) not in uploads
    assert (await node.upload(people.attacker, junk[3])).status == 201

    # Past their time to live, the uploads still no record names are deleted; the named one
    # stays.
    expired = uploads.sweep(
        node.services.packages,
        lambda digest: node.services.store.get(f"package/{digest}".encode()) is not None,
        now=time.time() + 3601,
    )
    gone = {packaging.package_digest(p) for p in junk[1:]} | {honest.digest}
    assert set(expired) == gone
    assert not any(node.services.packages.has(d) for d in gone)
    assert node.services.packages.has(packaging.package_digest(named))
    assert uploads.usage(people.attacker.member_id) == (0, 0)


async def test_an_upload_batch_decides_each_package_on_its_own_and_is_bounded(
    consortium: Consortium, quota_node: Node, people: People
) -> None:
    node = quota_node
    mine = [seal(f"batch-{i}", people, people.attacker) for i in range(4)]
    other = seal("batch-other", people, people.attacker)
    pairs = [(s.digest, s.package) for s in mine[:2]]
    pairs.append((other.digest, mine[2].package))  # bytes that do not hash to the digest
    pairs += [(s.digest, s.package) for s in mine[2:]]

    async def batch(who: KeyPair, body: bytes) -> ClientResponse:
        return await node.call(who, "POST", "/v1/packages", body)

    answer = await batch(people.attacker, msgspec.msgpack.encode(pairs))
    assert answer.status == 200
    items = (await answer.json())["packages"]
    assert [i["digest"] for i in items] == [d for d, _ in pairs]
    assert [i["status"] for i in items] == [201, 201, 400, 201, 429]
    assert items[0]["expires_in"] == 3600 and items[0]["referenced"] is False
    assert "do not hash" in items[2]["error"] and 1 <= items[4]["retry_after"] <= 3600
    stored = node.services.packages
    assert [stored.has(s.digest) for s in mine] == [True, True, True, False]
    assert not stored.has(other.digest)
    # The same batch again: what is there is there (200), the quota still holds.
    again = await (await batch(people.attacker, msgspec.msgpack.encode(pairs[:2]))).json()
    assert [i["status"] for i in again["packages"]] == [200, 200]

    # A patient writes no records: every package refused, nothing stored.
    patients = seal("batch-patient", people, people.patient)
    refused = await batch(
        people.patient, msgspec.msgpack.encode([(patients.digest, patients.package)])
    )
    assert refused.status == 200
    assert (await refused.json())["packages"][0]["status"] == 403
    assert not stored.has(patients.digest)
    # A node is no uploader; an unsigned request is no one's.
    body = msgspec.msgpack.encode([(patients.digest, patients.package)])
    as_node = sign_request(
        keys_for("northside-lab/node"),
        "node:northside-lab",
        "POST",
        "/v1/packages",
        body,
        audience=node_audience("careplus"),
    )
    answer = await node.client.post("/v1/packages", data=body, headers={"Authorization": as_node})
    assert answer.status == 403
    assert (await node.client.post("/v1/packages", data=body)).status == 401
    # Bounded: at least one and at most 1,000 packages, MessagePack pairs only, 16 MiB in all.
    for garbage in (
        msgspec.msgpack.encode([]),
        msgspec.msgpack.encode([(patients.digest, b"x")] * 1001),
        msgspec.msgpack.encode({"digests": []}),
        msgspec.msgpack.encode([[1, 2]]),
        b'[["' + patients.digest.encode() + b'", "x"]]',
        b"\xff",
    ):
        answer = await batch(people.doctor, garbage)
        assert answer.status == 400, garbage[:40]
        assert "error" in await answer.json()
    big = msgspec.msgpack.encode([(patients.digest, b"x" * (9 * 1024 * 1024))] * 2)
    assert (await batch(people.doctor, big)).status == 413
    assert not stored.has(patients.digest)


async def test_pending_uploads_and_their_quota_survive_a_restart(
    consortium: Consortium, quota_node: Node, people: People, tmp_path: Path
) -> None:
    node = quota_node
    for i in range(3):
        package = seal(f"junk-{i}", people, people.attacker).package
        assert (await node.upload(people.attacker, package)).status == 201
    restarted = PendingUploads(
        tmp_path / "quota" / "packages" / "pending", node.services.uploads.limits
    )
    assert restarted.usage(people.attacker.member_id)[0] == 3


# -- the SDK's upload batches under a full quota or a slow node ----------------------------------


def sdk_client(node_url: str, keys: KeyPair, **options: Any) -> RecordsClient:
    """The SDK's records client for `keys` against a node API (nothing here asks the chain)."""
    ledger = LedgerClient("http://127.0.0.1:1", "medledger-test")
    return RecordsClient(ledger, node_url, keys, node_organization="careplus", **options)


async def test_the_sdk_sends_a_refused_batch_again_once_the_quota_frees_and_gives_up_in_time(
    consortium: Consortium, quota_node: Node, people: People
) -> None:
    c, node = consortium, quota_node
    pending = [seal(f"pending-{i}", people, people.doctor) for i in range(3)]
    for sealed in pending:
        assert (await node.upload(people.doctor, sealed.package)).status == 201
    fresh = seal("fresh", people, people.doctor)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        # While the SDK waits, a record naming one pending upload commits and frees a place.
        waits.append(seconds)
        if len(waits) == 1:
            named = pending[0]
            body = put_body("pending-0", people.patient.member_id, named.package, b"\0" * 32)
            commit(c, {"careplus": node}, people.doctor, "record.put", body)

    client = sdk_client(str(node.client.make_url("")), people.doctor, sleep=sleep)
    try:
        await asyncio.to_thread(client.upload_many, [fresh])
    finally:
        client.close()
    # One wait, capped well under the quota's Retry-After (when the oldest upload expires).
    assert waits == [8.0]
    assert node.services.packages.has(fresh.digest) and fresh.digest in node.services.uploads

    # The quota is full again, and nothing will free it in the time the caller gives.
    late = seal("late", people, people.doctor)
    impatient = sdk_client(
        str(node.client.make_url("")), people.doctor, upload_retry_seconds=1.0, sleep=sleep
    )
    try:
        with pytest.raises(ClientError, match=r"HTTP 429.*still refused after 1 attempts"):
            await asyncio.to_thread(impatient.upload_many, [late])
    finally:
        impatient.close()
    assert len(waits) == 1 and not node.services.packages.has(late.digest)

    # A refusal that sending again cannot change (a patient writes no records) is not retried.
    patient = sdk_client(str(node.client.make_url("")), people.patient, sleep=sleep)
    try:
        with pytest.raises(ClientError, match="HTTP 403"):
            await asyncio.to_thread(patient.upload_many, [seal("p", people, people.patient)])
    finally:
        patient.close()
    assert len(waits) == 1


async def test_a_batch_whose_answer_timed_out_is_sent_again_and_held_once(
    quota_node: Node, people: People
) -> None:
    """The node stored the batch but its answer came after the SDK stopped waiting (a loaded
    node): sent again, the packages are already there, and the quota counts them once."""
    node = quota_node
    calls: list[int] = []

    async def slow_first_answer(request: web.Request) -> web.Response:
        body = await request.read()
        answer = await node.client.post(
            "/v1/packages", data=body, headers={"Authorization": request.headers["Authorization"]}
        )
        calls.append(answer.status)
        if len(calls) == 1:
            await asyncio.sleep(1.5)  # past the SDK's timeout
        return web.Response(
            status=answer.status, body=await answer.read(), content_type="application/json"
        )

    proxy_app = web.Application()
    proxy_app.router.add_post("/v1/packages", slow_first_answer)
    proxy = TestClient(TestServer(proxy_app))
    await proxy.start_server()
    batch = [seal(f"slow-{i}", people, people.doctor) for i in range(2)]
    waits: list[float] = []
    client = sdk_client(str(proxy.make_url("")), people.doctor, timeout=0.5, sleep=waits.append)
    try:
        await asyncio.to_thread(client.upload_many, batch)
    finally:
        client.close()
        await proxy.close()
    assert calls == [200, 200] and waits == [0.5]
    assert all(node.services.packages.has(s.digest) for s in batch)
    assert node.services.uploads.usage(people.doctor.member_id) == (
        2,
        sum(len(s.package) for s in batch),
    )


# -- the upload limit ---------------------------------------------------------------------------


async def test_the_upload_limit_is_the_ledgers_16_mib_not_aiohttps_1_mib(
    nodes: dict[str, Node], people: People
) -> None:
    node = nodes[NODES[0]]
    big = seal("imaging-1", people, people.doctor, plaintext=b"x" * (2 * 1024 * 1024))
    assert len(big.package) > 2 * 1024 * 1024
    response = await node.upload(people.doctor, big.package)
    assert response.status == 201, await response.text()
    assert node.services.packages.has(big.digest)

    oversized = b"\0" * (17 * 1024 * 1024)
    digest = hashlib.sha256(oversized).hexdigest()
    response = await node.call(people.doctor, "PUT", f"/v1/packages/{digest}", oversized)
    assert response.status == 413
    assert "at most 16777216 bytes" in (await response.json())["error"]
    assert not node.services.packages.has(digest)

    # Without a Content-Length (chunked), the body is cut off at the limit too.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(17):
            yield b"\0" * (1024 * 1024)

    path = f"/v1/packages/{digest}"
    header = sign_request(
        people.doctor,
        people.doctor.member_id,
        "PUT",
        path,
        oversized,
        audience=node_audience(node.organization),
    )
    response = await node.client.put(path, data=chunks(), headers={"Authorization": header})
    assert response.status == 413
    assert "at most 16777216 bytes" in (await response.json())["error"]
    assert not node.services.packages.has(digest)


async def test_a_digest_with_a_trailing_newline_is_not_a_digest(
    nodes: dict[str, Node], people: People
) -> None:
    node = nodes[NODES[0]]
    sealed = seal("obs-nl", people, people.doctor)
    response = await node.call(
        people.doctor, "PUT", f"/v1/packages/{sealed.digest}%0A", sealed.package
    )
    assert response.status == 400
    assert "64 lowercase hex digits" in (await response.json())["error"]
    assert list(node.services.packages.digests()) == []


async def test_batches_of_packages_go_to_peer_nodes_only_and_are_bounded(
    consortium: Consortium, nodes: dict[str, Node], people: People
) -> None:
    sealed = await write_record(consortium, nodes, people, "rec-batch")
    node = nodes["careplus"]
    asked = json.dumps({"digests": [sealed.digest, "0" * 64]}).encode()
    # A member — even the record's author — gets packages one by one, as each is authorized.
    refused = await node.call(people.doctor, "POST", "/v1/packages/batch", asked)
    assert refused.status == 403
    peer = keys_for("northside-lab/node")

    async def as_peer(body: bytes) -> ClientResponse:
        header = sign_request(
            peer,
            "node:northside-lab",
            "POST",
            "/v1/packages/batch",
            body,
            audience=node_audience("careplus"),
        )
        return await node.client.post(
            "/v1/packages/batch", data=body, headers={"Authorization": header}
        )

    served = await as_peer(asked)
    assert served.status == 200
    assert msgspec.msgpack.decode(await served.read()) == [[sealed.digest, sealed.package]]
    too_many = json.dumps({"digests": ["0" * 64] * 65}).encode()
    assert (await as_peer(too_many)).status == 400
    for garbage in (b"[]", b'{"digests": "x"}', b'{"digests": [1]}', b"\xff"):
        assert (await as_peer(garbage)).status == 400
    # A forged node signature is refused.
    forged = sign_request(
        keys_for("nobody"),
        "node:northside-lab",
        "POST",
        "/v1/packages/batch",
        asked,
        audience=node_audience("careplus"),
    )
    answer = await node.client.post(
        "/v1/packages/batch", data=asked, headers={"Authorization": forged}
    )
    assert answer.status == 401


async def test_a_sessions_shares_go_to_its_requester_only_and_requests_are_bounded(
    consortium: Consortium, nodes: dict[str, Node], people: People
) -> None:
    sealed = await write_record(consortium, nodes, people, "rec-session")
    opened = consortium.submit(
        people.doctor,
        "access.session",
        RequestSession(people.patient.member_id, Purpose.TREATMENT),
    )
    assert opened.ok, opened.log
    session_id = opened.log.split("session ")[1].split()[0]
    node = nodes["careplus"]

    async def release(who: KeyPair, body: object) -> tuple[int, Any]:
        response = await node.call(who, "POST", "/v1/keys/release", json.dumps(body).encode())
        return response.status, await response.json()

    status, answer = await release(
        people.doctor, {"grant": session_id, "records": [["rec-session", 1], ["other", 1]]}
    )
    assert status == 200
    first, second = answer["shares"]
    assert first["status"] == 200 and second["status"] == 404
    share = packaging.unseal_share(
        base64.b64decode(first["sealed_share"]), people.doctor.encryption_secret
    )
    assert packaging.share_is_valid(packaging.decode_package(sealed.package), share)
    # The attacker names the session: every share is refused, each with its reason.
    status, answer = await release(
        people.attacker, {"grant": session_id, "records": [["rec-session", 1]]}
    )
    assert status == 200 and answer["shares"][0]["status"] == 403
    assert "another member" in answer["shares"][0]["error"]
    for body in (
        {"grant": session_id, "records": [["rec-session", "1"]]},
        {"grant": session_id, "records": "rec-session"},
        {"grant": session_id, "records": [["rec-session"]]},
    ):
        assert (await release(people.doctor, body))[0] == 400
    status, answer = await release(
        people.doctor, {"grant": session_id, "records": [["rec-session", 1]] * 257}
    )
    assert status == 400 and "at most 256" in answer["error"]
    refusals = [e for e in node.releases() if e["outcome"] == "refused"]
    assert any(e["actor"] == people.attacker.member_id for e in refusals)


def test_a_members_quota_holds_against_uploads_admitted_from_many_threads_at_once(
    tmp_path: Path,
) -> None:
    """Batches are admitted in worker threads with no lock around them: the check and the
    count are one step, so racing uploads never take a member past the quota."""
    limits = UploadLimits(ttl_seconds=3600, max_bytes_per_member=10**9, max_packages_per_member=100)
    uploads = PendingUploads(tmp_path / "pending", limits)
    admitted: list[str] = []
    refused: list[str] = []
    start = threading.Barrier(8)

    def upload(thread: int) -> None:
        start.wait()
        for i in range(40):
            digest = hashlib.sha256(f"{thread}/{i}".encode()).hexdigest()
            try:
                uploads.admit("m-racer", digest, 10)
            except QuotaExceeded:
                refused.append(digest)
            else:
                admitted.append(digest)

    threads = [threading.Thread(target=upload, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(admitted), len(refused)) == (100, 220)
    assert uploads.usage("m-racer") == (100, 1000)
    # Every admitted upload, and only those, is on disk: a restart counts the same.
    assert PendingUploads(tmp_path / "pending", limits).usage("m-racer") == (100, 1000)
    assert sorted(p.name for p in (tmp_path / "pending").iterdir()) == sorted(admitted)
