"""The node's HTTP API for records: package upload and download, and key release.

Every route is authenticated (see `medledger.auth`); what an authenticated caller may do is
decided by `medledger.services.packages`, which the node's own services call in-process.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from typing import TypeVar

import msgspec
from aiohttp import web

from medledger.auth import (
    AuthError,
    Caller,
    may_read_node_audit,
    node_audience,
    unverified_issuer,
    verify_request,
)
from medledger.ledger.identity import is_active
from medledger.ledger.model import Member, Organization, member_key, organization_key
from medledger.ledger.records import MAX_PACKAGE_BYTES
from medledger.ledger.state import State
from medledger.services.packages import (
    BATCH_BYTES,
    BATCH_PATH,
    BATCH_SIZE,
    UPLOAD_BATCH_BYTES,
    UPLOAD_BATCH_SIZE,
    UPLOAD_PATH,
    PackageRefused,
    RecordServices,
    ReleasedShare,
    StoredPackage,
    package_copies,
    package_copy,
    refuse,
    release_share,
    release_shares,
    store_package,
    store_packages,
)
from medledger.store.sqlite import CommittedReads

log = logging.getLogger("medledger.records")


SERVICES = web.AppKey("record_services", RecordServices)
T = TypeVar("T")
# MessagePack framing around each package of an upload batch (as around each of a batch
# answer: a 2-array, the digest as a str 8, the bytes' bin header), and the array's header.
UPLOAD_FRAMING = 72


async def _off_the_loop(services: RecordServices, work: Callable[[CommittedReads], T]) -> T:
    """Run `work` in a worker thread against a snapshot of committed state: package writes
    wait for the disk (fsync), and the event loop also answers CometBFT."""

    def job() -> T:
        with services.view.snapshot() as reads:
            return work(reads)

    return await asyncio.to_thread(job)


def _stored_json(digest: str, stored: StoredPackage) -> dict[str, object]:
    body: dict[str, object] = {"digest": digest, "referenced": stored.referenced}
    if stored.expires_in is not None:
        body["expires_in"] = stored.expires_in
    return body


def _problem(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


async def _authenticate(
    request: web.Request, services: RecordServices
) -> tuple[Caller, Member | None]:
    body = await request.read()
    state = State(services.store)
    header = request.headers.get("Authorization")
    issuer = unverified_issuer(header)
    member: Member | None = None
    if issuer.startswith("node:"):
        org = state.read(organization_key(issuer[5:]), Organization)
        if org is None or org.status != "active":
            raise AuthError(f"no active organization runs node {issuer}")
        key = org.node_verify_key
    else:
        member = state.read(member_key(issuer), Member)
        if member is None:
            raise AuthError(f"unknown member {issuer}")
        if not is_active(state, member):
            raise AuthError(f"member {issuer} is {member.status} or its organization is")
        key = member.verify_key
    caller = verify_request(
        header,
        key,
        request.method,
        request.path_qs,
        body,
        services.replays,
        audience=node_audience(services.organization),
    )
    return caller, member


def _refused(refusal: PackageRefused) -> web.Response:
    response = _problem(refusal.status, refusal.reason)
    if refusal.retry_after is not None:
        response.headers["Retry-After"] = str(refusal.retry_after)
    return response


async def _uploader(
    request: web.Request, services: RecordServices, limit: int, too_large: str
) -> tuple[Member, bytes] | web.Response:
    """The authenticated member who uploads, and the body of at most `limit` bytes; else the
    answer refusing the request."""
    if (request.content_length or 0) > limit:
        return _problem(413, too_large)
    try:
        _, member = await _authenticate(request, services)
        body = await request.read()
    except AuthError as exc:
        return _problem(exc.status, str(exc))
    except web.HTTPRequestEntityTooLarge:
        return _problem(413, too_large)
    if member is None:
        return _problem(403, "only members who write records or claims upload packages")
    return member, body


async def put_package(request: web.Request) -> web.Response:
    """An author uploads a sealed package before submitting the record that names it."""
    services = request.app[SERVICES]
    uploader = await _uploader(
        request, services, MAX_PACKAGE_BYTES, f"a package is at most {MAX_PACKAGE_BYTES} bytes"
    )
    if isinstance(uploader, web.Response):
        return uploader
    member, data = uploader
    digest = request.match_info["digest"]
    try:
        stored = await _off_the_loop(
            services, lambda reads: store_package(services, reads, member, digest, data)
        )
    except PackageRefused as refusal:
        return _refused(refusal)
    return web.json_response(_stored_json(digest, stored), status=201 if stored.created else 200)


async def put_packages(request: web.Request) -> web.Response:
    """An author uploads many sealed packages in one request (those of one put-many or
    Bundle): a MessagePack array of [digest, bytes] pairs, at most UPLOAD_BATCH_SIZE of them
    and UPLOAD_BATCH_BYTES of packages. Each is decided on its own; the answer lists each
    one's status (201 stored, 200 already there, else the refusal's) in the order sent."""
    services = request.app[SERVICES]
    too_large = f"an upload batch holds at most {UPLOAD_BATCH_BYTES} bytes"
    ceiling = UPLOAD_BATCH_BYTES + UPLOAD_FRAMING * UPLOAD_BATCH_SIZE + 8
    uploader = await _uploader(request, services, ceiling, too_large)
    if isinstance(uploader, web.Response):
        return uploader
    member, raw = uploader
    try:
        uploads = msgspec.msgpack.decode(raw, type=list[tuple[str, bytes]])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return _problem(400, f"bad request body: a MessagePack array of [digest, bytes]: {exc}")
    if not 0 < len(uploads) <= UPLOAD_BATCH_SIZE:
        return _problem(400, f"1-{UPLOAD_BATCH_SIZE} packages per upload batch")
    if sum(len(data) for _, data in uploads) > UPLOAD_BATCH_BYTES:
        return _problem(413, too_large)
    answers = await _off_the_loop(
        services, lambda reads: store_packages(services, reads, member, uploads)
    )
    items: list[dict[str, object]] = []
    for (digest, _), answer in zip(uploads, answers, strict=True):
        if isinstance(answer, PackageRefused):
            item: dict[str, object] = {
                "digest": digest,
                "status": answer.status,
                "error": answer.reason,
            }
            if answer.retry_after is not None:
                item["retry_after"] = answer.retry_after
            items.append(item)
        else:
            status = 201 if answer.created else 200
            items.append({**_stored_json(digest, answer), "status": status})
    return web.json_response({"packages": items})


async def get_package(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        caller, member = await _authenticate(request, services)
    except AuthError as exc:
        return _problem(exc.status, str(exc))
    if member is None and caller.node_organization is None:
        return _problem(403, "unknown caller")
    try:
        data = package_copy(
            services,
            services.store,
            member,
            request.match_info["digest"],
            request.query.get("grant", ""),
        )
    except PackageRefused as refusal:
        return _refused(refusal)
    return web.Response(body=data, content_type="application/octet-stream")


class BatchRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    digests: list[str]


async def get_package_batch(request: web.Request) -> web.Response:
    """Many packages in one answer, for a peer node replicating them: a MessagePack array of
    [digest, bytes] pairs, for those of the digests asked that this node holds (at most
    BATCH_SIZE asked, BATCH_BYTES answered)."""
    services = request.app[SERVICES]
    try:
        caller, member = await _authenticate(request, services)
    except AuthError as exc:
        return _problem(exc.status, str(exc))
    if member is not None or caller.node_organization is None:
        return _problem(403, "packages are served in batches to peer nodes only")
    try:
        asked = msgspec.json.decode(await request.read(), type=BatchRequest).digests
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return _problem(400, f"bad request body: {exc}")
    if len(asked) > BATCH_SIZE:
        return _problem(400, f"at most {BATCH_SIZE} digests per batch")
    found = package_copies(services, asked, BATCH_BYTES)
    return web.Response(body=msgspec.msgpack.encode(found), content_type="application/msgpack")


class ReleaseRequest(msgspec.Struct, frozen=True):
    """A grant id; for a session, also the record versions (`[record id, version]` pairs) of
    it whose shares are asked for."""

    grant: str
    records: list[tuple[str, int]] | None = None


def _share_json(released: ReleasedShare) -> dict[str, object]:
    return {
        "organization": released.organization,
        "index": released.index,
        "sealed_share": base64.b64encode(released.sealed_share).decode(),
        "package_digest": released.package_digest,
    }


async def release_key(request: web.Request) -> web.Response:
    """Release this node's key share for a committed grant to its grantee — or, for a
    session, its shares for the record versions named, each decided on its own."""
    services = request.app[SERVICES]
    requester = "?"
    grant_id = ""
    try:
        _, member = await _authenticate(request, services)
        if member is None:
            raise AuthError("key shares are released to members, not nodes")
        requester = member.id
        try:
            asked = msgspec.json.decode(await request.read(), type=ReleaseRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            reason = f"bad request body: {exc}"
            refuse(services, requester, grant_id, reason)
            return _problem(400, reason)
        grant_id = asked.grant
        if asked.records is not None:
            answers = release_shares(services, services.store, member, grant_id, asked.records)
            shares: list[dict[str, object]] = []
            for (record_id, version), answer in zip(asked.records, answers, strict=True):
                item: dict[str, object] = {"record_id": record_id, "version": version}
                if isinstance(answer, PackageRefused):
                    item |= {"status": answer.status, "error": answer.reason}
                else:
                    item |= {"status": 200, **_share_json(answer)}
                shares.append(item)
            return web.json_response({"grant": grant_id, "shares": shares})
        released = release_share(services, services.store, member, grant_id)
    except AuthError as exc:
        services.audit.record(requester, "key.release", grant_id, "refused", str(exc))
        log.warning("key release refused", extra={"requester": requester, "reason": str(exc)})
        return _problem(exc.status, str(exc))
    except PackageRefused as refusal:
        return _refused(refusal)
    return web.json_response({"grant": grant_id, **_share_json(released)})


async def nodes(request: web.Request) -> web.Response:
    """Where each custodian organization's node API is, as this node knows it."""
    services = request.app[SERVICES]
    try:
        await _authenticate(request, services)
    except AuthError as exc:
        return _problem(exc.status, str(exc))
    return web.json_response({services.organization: services.api_url, **services.peers})


async def release_log(request: web.Request) -> web.Response:
    """This node's off-chain decisions (key releases, refused API requests), for auditors and
    the node's own organization admin."""
    services = request.app[SERVICES]
    try:
        _, member = await _authenticate(request, services)
    except AuthError as exc:
        return _problem(exc.status, str(exc))
    if member is None or not may_read_node_audit(member, services.organization):
        return _problem(
            403, "the node audit log is for auditors and for the admin of this node's organization"
        )
    return web.json_response(services.audit.entries())


def add_record_routes(app: web.Application, services: RecordServices) -> None:
    app[SERVICES] = services
    app.router.add_put("/v1/packages/{digest}", put_package)
    app.router.add_post(UPLOAD_PATH, put_packages)
    app.router.add_post(BATCH_PATH, get_package_batch)
    app.router.add_get("/v1/packages/{digest}", get_package)
    app.router.add_post("/v1/keys/release", release_key)
    app.router.add_get("/v1/nodes", nodes)
    app.router.add_get("/v1/audit/node", release_log)
