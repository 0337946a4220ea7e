"""Packages and key shares on this node: storing an author's sealed package, serving a copy,
and releasing this node's share of a record's data key.

The node's HTTP API (`medledger.api.records`) calls these for clients elsewhere, after it has
authenticated the request; the node's own services call them in-process for the custodial
members they act for. Either way the decision is made here, against committed ledger state read
through `reads` (the store's own reader on the event loop, a `CommittedView` snapshot in a
worker thread).

Key release hands this node's share, re-sealed to the grantee's current encryption key, only to
the grantee of a committed, unexpired grant — so no disclosure happens before its audit entry
is committed, and a revoked consent stops it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from medledger.auth import ReplayCache
from medledger.crypto import package as packaging
from medledger.crypto.keys import KeyPair
from medledger.ledger.access import Grant, grant_for, load_grant, release_problem
from medledger.ledger.claims import CLAIM_AUTHOR_ROLES
from medledger.ledger.model import Member
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
from medledger.store.node_audit import NodeAuditLog
from medledger.store.packages import (
    CorruptPackage,
    ErasedPackage,
    PackageStore,
    PackageStoreError,
    is_digest,
)
from medledger.store.sqlite import CommittedReads, CommittedView, SqliteStore
from medledger.store.uploads import PendingUploads, QuotaExceeded

log = logging.getLogger("medledger.records")

# Who may upload a sealed package: record authors, and the members who write a claim's Claim
# (provider billing and clinicians) or ClaimResponse (insurer billing and admins).
UPLOADER_ROLES = frozenset(AUTHOR_ROLES | CLAIM_AUTHOR_ROLES)

# Replication in batches: digests per request, and the most bytes a node puts in one answer
# (it stops adding packages there; the peer fetches the rest one by one).
BATCH_PATH = "/v1/packages/batch"
BATCH_SIZE = 64
BATCH_BYTES = MAX_PACKAGE_BYTES

# Uploads in batches: an author's packages for one put-many or Bundle in a few requests (a
# MessagePack array of [digest, bytes] pairs), each package decided on its own.
UPLOAD_PATH = "/v1/packages"
UPLOAD_BATCH_SIZE = 1000  # as many records as one record.put-many holds
UPLOAD_BATCH_BYTES = MAX_PACKAGE_BYTES  # package bytes per request


class Replication(Protocol):
    """What package decisions ask of replication: fetch what is missing, repair what is bad."""

    def want(self, digests: Iterable[str]) -> None: ...

    def heal(self, digest: str) -> None: ...


@dataclass
class RecordServices:
    store: SqliteStore
    # Snapshots of committed state for work done off the event loop (package writes wait for
    # the disk; the event loop also answers CometBFT).
    view: CommittedView
    packages: PackageStore
    replicator: Replication
    node_keys: KeyPair
    organization: str
    peers: dict[str, str]
    api_url: str
    audit: NodeAuditLog
    replays: ReplayCache
    uploads: PendingUploads


class PackageRefused(Exception):
    """A refusal with the HTTP status the API answers it with."""

    def __init__(self, status: int, reason: str, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class StoredPackage:
    created: bool
    referenced: bool
    expires_in: int | None


@dataclass(frozen=True)
class ReleasedShare:
    organization: str
    index: int
    sealed_share: bytes
    package_digest: str


ERASED_FOR_GOOD = "this package was erased with its record; it is never stored again"


def store_package(
    services: RecordServices, reads: CommittedReads, member: Member, digest: str, data: bytes
) -> StoredPackage:
    """An author's sealed package, stored before the record that names it is submitted.

    Until a committed record names it the upload is pending: it expires after the node's
    upload time to live and counts against the uploader's quota. An erased package is never
    stored again (410)."""
    answer = store_packages(services, reads, member, [(digest, data)])[0]
    if isinstance(answer, PackageRefused):
        raise answer
    return answer


def store_packages(
    services: RecordServices,
    reads: CommittedReads,
    member: Member,
    uploads: Sequence[tuple[str, bytes]],
) -> list[StoredPackage | PackageRefused]:
    """Many packages of one member, each decided as `store_package` decides it alone; those
    admitted are written to disk together (`PackageStore.put_many`)."""
    answers: list[StoredPackage | PackageRefused] = []
    admitted: list[tuple[int, str, bytes, bool]] = []  # answer index, digest, data, referenced
    for digest, data in uploads:
        try:
            referenced = _admit(services, reads, member, digest, data)
        except PackageRefused as refusal:
            answers.append(refusal)
            continue
        admitted.append((len(answers), digest, data, referenced))
        answers.append(PackageRefused(500, "not stored"))  # replaced below
    written = services.packages.put_many([(digest, data) for _, digest, data, _ in admitted])
    for (index, digest, _, referenced), put in zip(admitted, written, strict=True):
        if isinstance(put, PackageStoreError):
            services.uploads.settle(digest)
            erased = isinstance(put, ErasedPackage)
            answers[index] = (
                PackageRefused(410, ERASED_FOR_GOOD) if erased else PackageRefused(400, str(put))
            )
            continue
        ttl = int(services.uploads.limits.ttl_seconds) if digest in services.uploads else None
        answers[index] = StoredPackage(put, referenced, ttl)
    return answers


def _admit(
    services: RecordServices, reads: CommittedReads, member: Member, digest: str, data: bytes
) -> bool:
    """Every check of an upload before it is written, and its admission against the member's
    quota; whether a committed record already names the package."""
    if member.role not in UPLOADER_ROLES:
        raise PackageRefused(403, "only members who write records or claims upload packages")
    if len(data) > MAX_PACKAGE_BYTES:
        raise PackageRefused(413, f"a package is at most {MAX_PACKAGE_BYTES} bytes")
    if not is_digest(digest):
        raise PackageRefused(400, "a package digest is 64 lowercase hex digits")
    state = State(reads)
    ref = state.read(package_key(digest), PackageRef)
    version = state.read(record_key(ref.record_id, ref.version), RecordVersion) if ref else None
    if services.packages.is_erased(digest) or (
        version is not None and version.status is RecordStatus.ERASED
    ):
        raise PackageRefused(410, ERASED_FOR_GOOD)
    if packaging.package_digest(data) != digest:
        raise PackageRefused(400, "the package's bytes do not hash to the digest in the URL")
    try:
        packaging.decode_package(data)
    except packaging.PackageError as exc:
        raise PackageRefused(400, str(exc)) from None
    if ref is None and not services.packages.has(digest):
        try:
            services.uploads.admit(member.id, digest, len(data))  # one step: check and count
        except QuotaExceeded as exc:
            raise PackageRefused(429, str(exc), int(exc.retry_after)) from None
    return ref is not None


def package_copy(
    services: RecordServices,
    reads: CommittedReads,
    member: Member | None,
    digest: str,
    grant_id: str = "",
) -> bytes:
    """This node's copy of a committed record's package, for its patient, its author and the
    grantee of a grant for that version; `member` None is a peer node (replication), whose
    request the API has authenticated as a node's."""
    state = State(reads)
    if member is not None:
        ref = state.read(package_key(digest), PackageRef)
        if ref is None:
            raise PackageRefused(404, "no committed record holds this package")
        version = state.read(record_key(ref.record_id, ref.version), RecordVersion)
        if version is None or not _may_download(reads, services, member, version, grant_id):
            raise PackageRefused(403, "the package is released to its patient, author and grantees")
    try:
        data = services.packages.get(digest)
    except CorruptPackage:
        services.replicator.heal(digest)
        raise PackageRefused(
            503, "this node's copy failed its integrity check; it is being repaired"
        ) from None
    except PackageStoreError as exc:
        raise PackageRefused(400, str(exc)) from None
    if data is None:
        raise PackageRefused(404, "this node does not hold that package (yet)")
    return data


def package_copies(
    services: RecordServices, digests: list[str], max_bytes: int
) -> list[tuple[str, bytes]]:
    """This node's copies of many packages, for a peer node replicating them: those it holds
    and can vouch for (a damaged copy is repaired, not served), in the order asked, until
    `max_bytes` (always at least one)."""
    found: list[tuple[str, bytes]] = []
    total = 0
    for digest in dict.fromkeys(digests):
        if not is_digest(digest):
            continue
        try:
            data = services.packages.get(digest)
        except CorruptPackage:
            services.replicator.heal(digest)
            continue
        except PackageStoreError:
            continue
        if data is None:
            continue
        if found and total + len(data) > max_bytes:
            break
        found.append((digest, data))
        total += len(data)
    return found


def _may_download(
    reads: CommittedReads,
    services: RecordServices,
    member: Member,
    version: RecordVersion,
    grant_id: str,
) -> bool:
    if version.status is RecordStatus.ERASED:
        return False
    if member.id in (version.patient, version.author):
        return True
    if not grant_id:
        return False
    grant = grant_for(State(reads), grant_id, version.record_id, version.version)
    return grant is not None and grant_problem(reads, member, grant) is None


def grant_problem(reads: CommittedReads, member: Member, grant: Grant) -> str | None:
    """Why `member` may not use `grant` now (the last committed block's time), or None."""
    return release_problem(State(reads), member, grant, reads.block_time_ns())


# Record versions one key release request may name (a session's search page or chart).
MAX_RELEASE_RECORDS = 256

RecordRef = tuple[str, int]


def release_share(
    services: RecordServices,
    reads: CommittedReads,
    member: Member,
    grant_id: str,
    record: RecordRef | None = None,
) -> ReleasedShare:
    """This node's share of the data key of the record version `grant_id` names — or, for a
    session, of `record` among those it covers — re-sealed to `member`'s encryption key. Every
    release and every refusal is in the node audit log."""
    answer, decision = _decide_release(services, reads, member, grant_id, record)
    if decision is not None:
        services.audit.record_many([decision])
    if isinstance(answer, PackageRefused):
        raise answer
    return answer


def release_shares(
    services: RecordServices,
    reads: CommittedReads,
    member: Member,
    grant_id: str,
    records: list[RecordRef],
) -> list[ReleasedShare | PackageRefused]:
    """`release_share` for many record versions of one session, each decided on its own; the
    node audit log takes the decisions in one write."""
    if len(records) > MAX_RELEASE_RECORDS:
        raise PackageRefused(400, f"at most {MAX_RELEASE_RECORDS} records per request")
    answers: list[ReleasedShare | PackageRefused] = []
    decisions: list[AuditDecision] = []
    for record in records:
        answer, decision = _decide_release(services, reads, member, grant_id, record)
        answers.append(answer)
        if decision is not None:
            decisions.append(decision)
    services.audit.record_many(decisions)
    return answers


AuditDecision = tuple[str, str, str, str, str]


def _decide_release(
    services: RecordServices,
    reads: CommittedReads,
    member: Member,
    grant_id: str,
    record: RecordRef | None,
) -> tuple[ReleasedShare | PackageRefused, AuditDecision | None]:
    """The share or the refusal, and what the node audit log notes of it (nothing for a
    "retry shortly", which is not a decision)."""
    target = grant_id if record is None else f"{grant_id} {record[0]} v{record[1]}"
    try:
        released = _release(services, reads, member, grant_id, record)
    except PackageRefused as refusal:
        if refusal.status == 503:
            return refusal, None
        _log_refusal(member.id, target, refusal.reason)
        return refusal, (member.id, "key.release", target, "refused", refusal.reason)
    except Exception as exc:  # nothing a caller sends may take the node down
        reason = f"internal error ({type(exc).__name__}); no share released"
        _log_refusal(member.id, target, reason)
        return PackageRefused(500, reason), (member.id, "key.release", target, "refused", reason)
    log.info("key share released", extra={"requester": member.id, "grant": grant_id})
    return released, (member.id, "key.release", target, "released", "")


def _release(
    services: RecordServices,
    reads: CommittedReads,
    member: Member,
    grant_id: str,
    record: RecordRef | None,
) -> ReleasedShare:
    state = State(reads)
    grant = load_grant(state, grant_id) if record is None else grant_for(state, grant_id, *record)
    if grant is None:
        what = "no committed grant with that id"
        raise PackageRefused(404, what if record is None else f"{what} for that record version")
    problem = grant_problem(reads, member, grant)
    if problem is not None:
        raise PackageRefused(403, problem)
    version = state.read(record_key(grant.record_id, grant.version), RecordVersion)
    assert version is not None  # grant_problem found it
    custody = next((c for c in version.custodians if c.organization == services.organization), None)
    if custody is None:
        raise PackageRefused(404, "this node is not a custodian")
    try:
        data = services.packages.get(version.package_digest)
    except CorruptPackage:
        services.replicator.heal(version.package_digest)
        raise PackageRefused(
            503, "this node's copy failed its integrity check; retry shortly"
        ) from None
    if data is None:
        services.replicator.want([version.package_digest])
        raise PackageRefused(503, "this node has not received the package yet; retry shortly")
    try:
        package = packaging.decode_package(data)
        problem = package_mismatch(state, data, package, version, custody)
        if problem is not None:
            raise PackageRefused(409, problem)
        share = packaging.open_custodian_share(
            package, services.organization, services.node_keys.encryption_secret
        )
    except packaging.PackageError as exc:
        reason = f"this node's share of the package does not open ({exc}); no share released"
        raise PackageRefused(409, reason) from None
    return ReleasedShare(
        services.organization,
        custody.index,
        packaging.reseal_share(share, member.encryption_key),
        version.package_digest,
    )


def refuse(services: RecordServices, requester: str, grant_id: str, reason: str) -> None:
    services.audit.record(requester, "key.release", grant_id, "refused", reason)
    _log_refusal(requester, grant_id, reason)


def _log_refusal(requester: str, grant_id: str, reason: str) -> None:
    log.warning(
        "key release refused", extra={"requester": requester, "grant": grant_id, "reason": reason}
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
