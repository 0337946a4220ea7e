"""A node's record services: package upload and download, and key release.

Every route is authenticated (see `medledger.api.auth`) and authorized against committed
ledger state. Key release hands this node's share of a record's data key, re-sealed to the
grantee's current encryption key, only to the grantee of a committed, unexpired grant — so no
disclosure happens before its audit entry is committed, and a revoked consent stops it.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass

import msgspec
from aiohttp import web

from medledger.api.auth import (
    AuthError,
    Caller,
    ReplayCache,
    may_read_node_audit,
    node_audience,
    unverified_issuer,
    verify_request,
)
from medledger.crypto import package as packaging
from medledger.crypto.keys import KeyPair
from medledger.ledger.access import Basis, Grant, consent_problem, load_grant
from medledger.ledger.claims import CLAIM_AUTHOR_ROLES
from medledger.ledger.consent import Consent, consent_key
from medledger.ledger.identity import is_active
from medledger.ledger.model import Member, Organization, member_key, organization_key
from medledger.ledger.records import (
    AUTHOR_ROLES,
    MAX_PACKAGE_BYTES,
    Custody,
    PackageRef,
    RecordStatus,
    RecordVersion,
    package_key,
    record_key,
)
from medledger.ledger.state import State
from medledger.node.replication import Replicator
from medledger.store.node_audit import NodeAuditLog
from medledger.store.packages import (
    CorruptPackage,
    ErasedPackage,
    PackageStore,
    PackageStoreError,
    is_digest,
)
from medledger.store.sqlite import SqliteStore
from medledger.store.uploads import PendingUploads, QuotaExceeded

log = logging.getLogger("medledger.records")


@dataclass
class RecordServices:
    store: SqliteStore
    packages: PackageStore
    replicator: Replicator
    node_keys: KeyPair
    organization: str
    peers: dict[str, str]
    api_url: str
    audit: NodeAuditLog
    replays: ReplayCache
    uploads: PendingUploads


SERVICES = web.AppKey("record_services", RecordServices)

# Who may upload a sealed package: record authors, and the members who write a claim's Claim
# (provider billing and clinicians) or ClaimResponse (insurer billing and admins).
UPLOADER_ROLES = frozenset(AUTHOR_ROLES | CLAIM_AUTHOR_ROLES)


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


async def put_package(request: web.Request) -> web.Response:
    """An author uploads a sealed package before submitting the record that names it.

    Until a committed record names it the upload is pending: it expires after the node's
    upload time to live and counts against the uploader's quota. An erased package is never
    stored again (410)."""
    services = request.app[SERVICES]
    too_large = _problem(413, f"a package is at most {MAX_PACKAGE_BYTES} bytes")
    if (request.content_length or 0) > MAX_PACKAGE_BYTES:
        return too_large
    try:
        _, member = await _authenticate(request, services)
        data = await request.read()
    except AuthError as exc:
        return _problem(exc.status, str(exc))
    except web.HTTPRequestEntityTooLarge:
        return too_large
    if member is None or member.role not in UPLOADER_ROLES:
        return _problem(403, "only members who write records or claims upload packages")
    if len(data) > MAX_PACKAGE_BYTES:
        return too_large
    digest = request.match_info["digest"]
    if not is_digest(digest):
        return _problem(400, "a package digest is 64 lowercase hex digits")
    state = State(services.store)
    ref = state.read(package_key(digest), PackageRef)
    version = state.read(record_key(ref.record_id, ref.version), RecordVersion) if ref else None
    if services.packages.is_erased(digest) or (
        version is not None and version.status is RecordStatus.ERASED
    ):
        return _problem(410, "this package was erased with its record; it is never stored again")
    if packaging.package_digest(data) != digest:
        return _problem(400, "the package's bytes do not hash to the digest in the URL")
    try:
        packaging.decode_package(data)
    except packaging.PackageError as exc:
        return _problem(400, str(exc))
    pending = ref is None and not services.packages.has(digest)
    if pending:
        try:
            services.uploads.admit(member.id, digest, len(data))
        except QuotaExceeded as exc:
            response = _problem(429, str(exc))
            response.headers["Retry-After"] = str(int(exc.retry_after))
            return response
    try:
        created = services.packages.put(digest, data)
    except ErasedPackage:
        services.uploads.settle(digest)
        return _problem(410, "this package was erased with its record; it is never stored again")
    except PackageStoreError as exc:
        services.uploads.settle(digest)
        return _problem(400, str(exc))
    body: dict[str, object] = {"digest": digest, "referenced": ref is not None}
    if digest in services.uploads:
        body["expires_in"] = int(services.uploads.limits.ttl_seconds)
    return web.json_response(body, status=201 if created else 200)


async def get_package(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        caller, member = await _authenticate(request, services)
    except AuthError as exc:
        return _problem(exc.status, str(exc))
    digest = request.match_info["digest"]
    state = State(services.store)
    ref = state.read(package_key(digest), PackageRef)
    if member is not None:
        if ref is None:
            return _problem(404, "no committed record holds this package")
        version = state.read(record_key(ref.record_id, ref.version), RecordVersion)
        grant_id = request.query.get("grant", "")
        if version is None or not _may_download(state, services, member, version, grant_id):
            return _problem(403, "the package is released to its patient, author and grantees")
    elif caller.node_organization is None:
        return _problem(403, "unknown caller")
    try:
        data = services.packages.get(digest)
    except CorruptPackage:
        services.replicator.heal(digest)
        return _problem(503, "this node's copy failed its integrity check; it is being repaired")
    except PackageStoreError as exc:
        return _problem(400, str(exc))
    if data is None:
        return _problem(404, "this node does not hold that package (yet)")
    return web.Response(body=data, content_type="application/octet-stream")


def _may_download(
    state: State, services: RecordServices, member: Member, version: RecordVersion, grant_id: str
) -> bool:
    if version.status is RecordStatus.ERASED:
        return False
    if member.id in (version.patient, version.author):
        return True
    if not grant_id:
        return False
    grant = load_grant(state, grant_id)
    return (
        grant is not None
        and _grant_problem(state, services, member, grant) is None
        and (grant.record_id == version.record_id and grant.version == version.version)
    )


def _latest_block_time(store: SqliteStore) -> int:
    height, _, _ = store.committed()
    block = store.block(height)
    return block.time_ns if block is not None else 0


def _grant_problem(
    state: State, services: RecordServices, member: Member, grant: Grant
) -> str | None:
    if grant.requester != member.id:
        return "the grant belongs to another member"
    now = _latest_block_time(services.store)
    if now >= grant.expires_ns:
        return "the grant has expired"
    version = state.read(record_key(grant.record_id, grant.version), RecordVersion)
    if version is None or version.status is RecordStatus.ERASED:
        return "the record was erased"
    if grant.basis is Basis.CONSENT:
        consent = state.read(consent_key(grant.patient, grant.consent_id), Consent)
        if consent is None:
            return "the consent behind the grant is gone"
        problem = consent_problem(consent, member, version, grant.purpose, now)
        if problem is not None:
            return f"consent {consent.id} {problem or 'no longer covers the grantee'}"
    return None


class ReleaseRequest(msgspec.Struct, frozen=True):
    grant: str


async def release_key(request: web.Request) -> web.Response:
    """Release this node's key share for a committed grant to its grantee."""
    services = request.app[SERVICES]
    started = time.time()
    requester = "?"
    grant_id = ""
    try:
        _, member = await _authenticate(request, services)
        if member is None:
            raise AuthError("key shares are released to members, not nodes")
        requester = member.id
        try:
            grant_id = msgspec.json.decode(await request.read(), type=ReleaseRequest).grant
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _refuse(services, requester, grant_id, 400, f"bad request body: {exc}", started)
        state = State(services.store)
        grant = load_grant(state, grant_id)
        if grant is None:
            return _refuse(
                services, requester, grant_id, 404, "no committed grant with that id", started
            )
        problem = _grant_problem(state, services, member, grant)
        if problem is not None:
            return _refuse(services, requester, grant_id, 403, problem, started)
        version = state.read(record_key(grant.record_id, grant.version), RecordVersion)
        assert version is not None
        custody = next(
            (c for c in version.custodians if c.organization == services.organization), None
        )
        if custody is None:
            return _refuse(
                services, requester, grant_id, 404, "this node is not a custodian", started
            )
        try:
            data = services.packages.get(version.package_digest)
        except CorruptPackage:
            services.replicator.heal(version.package_digest)
            return _problem(503, "this node's copy failed its integrity check; retry shortly")
        if data is None:
            services.replicator.want([version.package_digest])
            return _problem(503, "this node has not received the package yet; retry shortly")
        try:
            package = packaging.decode_package(data)
            problem = package_mismatch(state, data, package, version, custody)
            if problem is not None:
                return _refuse(services, requester, grant_id, 409, problem, started)
            share = packaging.open_custodian_share(
                package, services.organization, services.node_keys.encryption_secret
            )
        except packaging.PackageError as exc:
            reason = f"this node's share of the package does not open ({exc}); no share released"
            return _refuse(services, requester, grant_id, 409, reason, started)
        sealed = packaging.reseal_share(share, member.encryption_key)
    except AuthError as exc:
        services.audit.record(requester, "key.release", grant_id, "refused", str(exc))
        log.warning("key release refused", extra={"requester": requester, "reason": str(exc)})
        return _problem(exc.status, str(exc))
    except Exception as exc:  # nothing a caller sends may take the handler down
        reason = f"internal error ({type(exc).__name__}); no share released"
        return _refuse(services, requester, grant_id, 500, reason, started)
    services.audit.record(requester, "key.release", grant_id, "released")
    log.info("key share released", extra={"requester": requester, "grant": grant_id})
    return web.json_response(
        {
            "grant": grant_id,
            "organization": services.organization,
            "index": custody.index,
            "sealed_share": base64.b64encode(sealed).decode(),
            "package_digest": version.package_digest,
        }
    )


def package_mismatch(
    state: State,
    data: bytes,
    package: packaging.RecordPackage,
    version: RecordVersion,
    custody: Custody,
) -> str | None:
    """Why this package may not yield a share for the committed record `version`, or None.

    A share is released for exactly the record version a grant names, and only the ledger says
    which that is: the package must be the one the committed version names (its digest), and
    its header — which its share commitments and its ciphertext's associated data are bound to
    — must name that record id, version, patient and author, with this node's share at the
    committed index. Otherwise a copy of another record's package (one byte changed, so a new
    digest) committed under a record of one's own would release the other record's key."""
    if packaging.package_digest(data) != version.package_digest:
        return "this node's copy is not the package the committed record names"
    ref = state.read(package_key(version.package_digest), PackageRef)
    if ref != PackageRef(version.record_id, version.version):
        return "the ledger does not name this package as the grant's record version"
    named = f"record {version.record_id} v{version.version}"
    if (package.record_id, package.record_version) != (version.record_id, version.version):
        return (
            f"the package is sealed for record {_quote(package.record_id)}"
            f" v{package.record_version},"
            f" not for {named} that the grant names; no share released"
        )
    if package.patient != version.patient:
        return f"the package is sealed for another patient than {named}'s; no share released"
    if package.author != version.author:
        return f"the package is sealed by another author than {named}'s; no share released"
    if package.threshold != version.threshold:
        return (
            f"the package's threshold {package.threshold} is not the committed"
            f" {version.threshold}; no share released"
        )
    entry = next((e for e in package.shares if e.organization == custody.organization), None)
    if entry is None or entry.index != custody.index:
        return (
            f"the package does not hold share {custody.index} for {custody.organization}"
            " where the ledger says; no share released"
        )
    return None


def _quote(text: str, limit: int = 64) -> str:
    """Text a sender chose, safe to put in an answer and a log line."""
    return repr(text[:limit])


def _refuse(
    services: RecordServices,
    requester: str,
    grant_id: str,
    status: int,
    reason: str,
    started: float,
) -> web.Response:
    services.audit.record(requester, "key.release", grant_id, "refused", reason)
    log.warning(
        "key release refused", extra={"requester": requester, "grant": grant_id, "reason": reason}
    )
    return _problem(status, reason)


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
    app.router.add_get("/v1/packages/{digest}", get_package)
    app.router.add_post("/v1/keys/release", release_key)
    app.router.add_get("/v1/nodes", nodes)
    app.router.add_get("/v1/audit/node", release_log)
