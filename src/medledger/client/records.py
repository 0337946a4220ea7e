"""Health records from the client side: seal and write, request access and read, correct,
erase, consent, audit and export — with keys that never leave the client.

Reading a record another party wrote is three steps: an `access.request` that the ledger
decides and audits; key shares gathered from any t custodian nodes, each re-sealed by its node
to the reader's key and checked against its commitment (a node that is down or lies does not
stop the read); and decryption, checked against the keyed commitment on the chain.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import msgspec

from medledger.auth import node_audience, sign_request
from medledger.client.lightclient import VerifiedHeader
from medledger.client.sdk import (
    ClientError,
    LedgerClient,
    ProofError,
    QueryError,
    TxOutcome,
    TxRejected,
)
from medledger.crypto import package as packaging
from medledger.crypto.keys import KeyPair
from medledger.ledger import merkle
from medledger.ledger.access import Grant, RequestAccess, RequestSession, SessionGrant
from medledger.ledger.app import app_hash_of
from medledger.ledger.bundle import PutBundle
from medledger.ledger.claims import ImportClaims
from medledger.ledger.consent import (
    Consent,
    GrantConsent,
    GranteeKind,
    Purpose,
    RevokeConsent,
    ScopeKind,
    SetDelegate,
)
from medledger.ledger.directory import DirectoryWrite
from medledger.ledger.errors import Code
from medledger.ledger.execution import AuditEntry
from medledger.ledger.model import Member, Organization
from medledger.ledger.records import (
    EraseRecord,
    MarkEnteredInError,
    PutRecord,
    PutRecords,
    RecordHead,
    RecordStatus,
    RecordVersion,
    threshold_for,
)
from medledger.ledger.transactions import EnrollMember
from medledger.validation import ValidatedResource, validate_resource

# Record versions per key release request (the node's bound, MAX_RELEASE_RECORDS).
MAX_RELEASE_RECORDS = 256


class AccessDenied(ClientError):
    def __init__(self, log: str) -> None:
        super().__init__(log)
        self.log = log


class RecordErased(ClientError):
    pass


@dataclass(frozen=True)
class WrittenRecord:
    record_id: str
    version: int
    digest: str
    outcome: TxOutcome


@dataclass(frozen=True)
class Sealing:
    """One snapshot of what records are sealed for (see `RecordsClient.sealing`)."""

    custodians: tuple[packaging.Custodian, ...]
    threshold: int
    author_key: bytes


@dataclass(frozen=True)
class RecordWrite:
    """One entry of `put_many`: a new record (previous 0) or an amendment of the record's
    version `previous`, which must be its latest."""

    resource: Any
    patient_id: str
    record_id: str | None = None
    previous: int = 0


@dataclass(frozen=True)
class ReadRecord:
    resource: dict[str, Any]
    version: RecordVersion
    grant_id: str
    shares_from: tuple[str, ...]
    bad_shares_from: tuple[str, ...]


class RecordHistory(msgspec.Struct, frozen=True):
    head: RecordHead
    versions: list[RecordVersion]


class RecordSummary(msgspec.Struct, frozen=True):
    head: RecordHead
    latest: RecordVersion | None


@dataclass(frozen=True)
class ProvenAuditEntry:
    index: int
    height: int
    time_ns: int
    entry: AuditEntry

    @property
    def granted_access(self) -> bool:
        """A committed access request the ledger granted (its grant id is its tx hash)."""
        return self.entry.type == "access.request" and self.entry.code == Code.OK

    @property
    def opened_session(self) -> bool:
        """A committed session request the ledger granted (its session id is its tx hash)."""
        return self.entry.type == "access.session" and self.entry.code == Code.OK

    @property
    def grant_id(self) -> str:
        return self.entry.tx_hash.hex()[:32]


@dataclass(frozen=True)
class AuditTrail:
    """A patient's audit entries, each proven by Merkle inclusion in the audit log whose root
    and size the app hash in `header` commits to; `header` is the validators' signed header of
    block `height` + 1."""

    patient: str
    entries: list[ProvenAuditEntry]
    height: int
    header: VerifiedHeader


@dataclass(frozen=True)
class Disclosure:
    """One entry of the HIPAA §164.528 accounting of disclosures: a granted access request by
    someone other than the patient, with the grant the ledger recorded for it (what was
    disclosed, to whom, for what purpose, on what basis) and the recipient's identity."""

    entry: ProvenAuditEntry
    grant: Grant
    recipient: Member | None


@dataclass(frozen=True)
class NodeAnswer:
    """A home node's answer: HTTP status, and the package or sealed share (the reason when the
    status is not 200)."""

    status: int
    body: bytes
    retry_after: float | None = None  # seconds, with a 429

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class HomeNode(Protocol):
    """The record services of the node a member's client talks to, when the client runs inside
    that node (the node's own services acting for its custodial members): the same decisions as
    the node's HTTP API, without the round trip. External clients leave it out and use HTTP."""

    def node_apis(self) -> dict[str, str]: ...

    def put_package(self, member_id: str, digest: str, data: bytes) -> NodeAnswer: ...

    def put_packages(self, member_id: str, uploads: list[tuple[str, bytes]]) -> list[NodeAnswer]:
        """Each upload's answer, in order."""
        ...

    def get_package(self, member_id: str, digest: str, grant_id: str) -> NodeAnswer: ...

    def release_share(self, member_id: str, grant_id: str) -> NodeAnswer: ...

    def release_shares(
        self, member_id: str, grant_id: str, records: list[tuple[str, int]]
    ) -> list[NodeAnswer]: ...


# Upload batches (`POST /v1/packages`): under the node's limits of 1,000 packages and 16 MiB.
UPLOAD_PATH = "/v1/packages"
UPLOAD_CHUNK_PACKAGES = 500
UPLOAD_CHUNK_BYTES = 8 * 1024 * 1024
# Answers worth sending the same packages again for: the member's pending-upload quota is full
# (it frees as records naming the uploads commit), the node is overloaded or restarting.
TRANSIENT_UPLOAD_STATUSES = frozenset({429, 502, 503, 504})
UPLOAD_RETRY_SECONDS = 60.0  # how long upload_many keeps retrying before it gives up
UPLOAD_BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)  # seconds between attempts, the last repeated


class NodeUnreachable(ClientError):
    """A node's API did not answer (refused connection, timeout, lost connection): a request
    that writes may or may not have taken effect."""


def _upload_chunks(
    sealed: Sequence[packaging.SealedRecord],
) -> Iterable[list[packaging.SealedRecord]]:
    chunk: list[packaging.SealedRecord] = []
    size = 0
    for package in sealed:
        if chunk and (
            len(chunk) == UPLOAD_CHUNK_PACKAGES or size + len(package.package) > UPLOAD_CHUNK_BYTES
        ):
            yield chunk
            chunk, size = [], 0
        chunk.append(package)
        size += len(package.package)
    if chunk:
        yield chunk


class RecordsClient:
    """One member's view of the network: their keys, a node's RPC and its API.

    `node_organization` is the organization whose node serves `api_url` (each request token
    names the node it is for); by default the member's own organization, as on the ledger.
    With `home`, the home node's record services are called in-process instead of over
    `api_url` (see `HomeNode`)."""

    def __init__(
        self,
        ledger: LedgerClient,
        api_url: str,
        keys: KeyPair,
        member_id: str | None = None,
        timeout: float = 15.0,
        node_organization: str | None = None,
        home: HomeNode | None = None,
        upload_retry_seconds: float = UPLOAD_RETRY_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.ledger = ledger
        self.home = home
        self.upload_retry_seconds = upload_retry_seconds
        self._sleep = sleep
        self.api_url = api_url.rstrip("/")
        self.keys = keys
        self.member_id = member_id or keys.member_id
        self._http = httpx.Client(timeout=timeout)
        self._node_apis: dict[str, str] | None = None
        self._node_organization = node_organization

    def close(self) -> None:
        self._http.close()

    # --- HTTP to node APIs ---------------------------------------------------------------

    @property
    def node_organization(self) -> str:
        """The organization of the home node (`api_url`)."""
        if self._node_organization is None:
            member = self.ledger.query("/member", self.member_id, Member)
            self._node_organization = member.organization
        return self._node_organization

    def _request(
        self, method: str, base: str, path: str, body: bytes = b"", organization: str = ""
    ) -> httpx.Response:
        """A signed request to the node of `organization` (the home node by default) at
        `base`."""
        audience = node_audience(organization or self.node_organization)
        headers = {
            "Authorization": sign_request(
                self.keys, self.member_id, method, path, body, audience=audience
            )
        }
        try:
            return self._http.request(method, base + path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise NodeUnreachable(f"cannot reach {base}: {exc!r}") from None

    def node_apis(self) -> dict[str, str]:
        """Each custodian organization's node API, as the home node knows them."""
        if self._node_apis is None and self.home is not None:
            self._node_apis = self.home.node_apis()
        if self._node_apis is None:
            response = self._request("GET", self.api_url, "/v1/nodes")
            if response.status_code != 200:
                raise ClientError(f"/v1/nodes: HTTP {response.status_code}: {response.text}")
            self._node_apis = {str(k): str(v).rstrip("/") for k, v in response.json().items()}
        return self._node_apis

    # --- writing -------------------------------------------------------------------------

    def sealing(self) -> Sealing:
        """What every record this member writes now is sealed for: the active organizations'
        nodes as custodians (in id order), the threshold, and the author's encryption key."""
        organizations = sorted(
            (
                o
                for o in self.ledger.query("/organizations", b"", list[Organization])
                if o.status == "active"
            ),
            key=lambda o: o.id,
        )
        author = self.ledger.query("/member", self.member_id, Member)
        return Sealing(
            custodians=tuple(
                packaging.Custodian(o.id, i + 1, o.node_encryption_key)
                for i, o in enumerate(organizations)
            ),
            threshold=threshold_for(len(organizations)),
            author_key=author.encryption_key,
        )

    def _upload(self, sealed: packaging.SealedRecord) -> None:
        if self.home is not None:
            answer = self.home.put_package(self.member_id, sealed.digest, sealed.package)
            status, text = answer.status, answer.text
        else:
            response = self._request(
                "PUT", self.api_url, f"/v1/packages/{sealed.digest}", sealed.package
            )
            status, text = response.status_code, response.text
        if status not in (200, 201):
            raise ClientError(f"package upload refused: HTTP {status}: {text}")

    def seal_and_upload(
        self,
        resource: Any,
        patient_id: str,
        record_id: str | None = None,
        version: int = 1,
        previous: int = 0,
        *,
        sealing: Sealing | None = None,
        patient_key: bytes | None = None,
    ) -> PutRecord:
        """Validate, seal and upload one record version without committing it: the body of a
        new record (`previous` 0) or of an amendment of version `previous`, for a `record.put`,
        `record.amend` or an entry of a `record.put-many`. A batch passes one `sealing` (and
        the patient's encryption key) for all its records; a resource already validated is not
        validated again."""
        body, sealed = self.seal_version(
            resource, patient_id, record_id, version, previous, sealing, patient_key
        )
        self._upload(sealed)
        return body

    def seal_version(
        self,
        resource: Any,
        patient_id: str,
        record_id: str | None,
        version: int,
        previous: int,
        sealing: Sealing | None,
        patient_key: bytes | None,
    ) -> tuple[PutRecord, packaging.SealedRecord]:
        """Validate and seal one record version, not uploaded yet (`upload_many` does, for
        a batch): its `PutRecord` body and its sealed package."""
        validated = (
            resource if isinstance(resource, ValidatedResource) else validate_resource(resource)
        )
        record_id = record_id or str(uuid.uuid4())
        if patient_key is None:
            patient_key = self.ledger.query("/member", patient_id, Member).encryption_key
        sealing = sealing or self.sealing()
        sealed = packaging.seal_record(
            validated.canonical,
            record_id=record_id,
            record_version=version,
            patient=patient_id,
            author=self.member_id,
            patient_key=patient_key,
            author_key=sealing.author_key,
            custodians=list(sealing.custodians),
            threshold=sealing.threshold,
        )
        body = PutRecord(
            record_id,
            patient_id,
            validated.resource_type,
            validated.category,
            sealed.digest,
            len(sealed.package),
            sealed.commitment,
            sealing.threshold,
            tuple(c.organization for c in sealing.custodians),
            previous=previous,
        )
        return body, sealed

    def upload_many(self, sealed: Sequence[packaging.SealedRecord]) -> None:
        """Upload sealed packages in batches (`POST /v1/packages`, or the home node's services
        in-process): a few requests for a put-many or a Bundle instead of one per record.

        A batch the node did not answer (timeout, lost connection) or answered with a
        transient refusal (quota of pending uploads full, node overloaded) is sent again, the
        packages it has not yet accepted only, with backoff, for up to `upload_retry_seconds`.
        Giving up on a batch at its first timeout would leave what the node did store pending
        against the member's quota until it expires, and the next batches refused for it."""
        for chunk in _upload_chunks(sealed):
            self._upload_chunk([(s.digest, s.package) for s in chunk])

    def _upload_chunk(self, pairs: list[tuple[str, bytes]]) -> None:
        deadline = time.monotonic() + self.upload_retry_seconds
        attempt = 0
        while True:
            try:
                answers = self._post_uploads(pairs)
            except NodeUnreachable as unanswered:
                # It may have stored them: sent again, they are "already there" (200).
                answers = [NodeAnswer(503, str(unanswered).encode())] * len(pairs)
            again: list[tuple[str, bytes]] = []
            wait = UPLOAD_BACKOFF[min(attempt, len(UPLOAD_BACKOFF) - 1)]
            last = ""
            for (digest, data), answer in zip(pairs, answers, strict=True):
                if answer.status in (200, 201):
                    continue
                last = f"package upload refused for {digest[:16]}: HTTP {answer.status}: "
                last += answer.text
                if answer.status not in TRANSIENT_UPLOAD_STATUSES:
                    raise ClientError(last)
                again.append((digest, data))
                if answer.retry_after is not None:
                    # Advisory: a full quota also frees as soon as records naming uploads commit.
                    wait = min(max(wait, answer.retry_after), UPLOAD_BACKOFF[-1])
            if not again:
                return
            if time.monotonic() + wait > deadline:
                raise ClientError(f"{last} (still refused after {attempt + 1} attempts)")
            self._sleep(wait)
            pairs, attempt = again, attempt + 1

    def _post_uploads(self, pairs: list[tuple[str, bytes]]) -> list[NodeAnswer]:
        """One upload request: each package's answer, in order."""
        if self.home is not None:
            answers = self.home.put_packages(self.member_id, pairs)
        else:
            body = msgspec.msgpack.encode(pairs)
            response = self._request("POST", self.api_url, UPLOAD_PATH, body)
            if response.status_code != 200:
                retry = response.headers.get("Retry-After", "")
                whole = NodeAnswer(
                    response.status_code,
                    response.content,
                    float(retry) if retry.isdigit() else None,
                )
                return [whole] * len(pairs)
            try:
                answers = [
                    NodeAnswer(
                        int(item["status"]),
                        str(item.get("error", "")).encode(),
                        float(item["retry_after"]) if "retry_after" in item else None,
                    )
                    for item in response.json()["packages"]
                ]
            except (ValueError, KeyError, TypeError) as exc:
                raise ClientError(f"the node's upload answer is malformed: {exc!r}") from None
        if len(answers) != len(pairs):
            raise ClientError(f"the node answered {len(answers)} of {len(pairs)} uploads")
        return answers

    def put(self, resource: Any, patient_id: str, record_id: str | None = None) -> WrittenRecord:
        """Validate, seal, upload and commit a new record about a patient."""
        body = self.seal_and_upload(resource, patient_id, record_id)
        outcome = self.ledger.submit(self.keys, "record.put", body, sender=self.member_id)
        return WrittenRecord(body.record_id, 1, body.package_digest, outcome)

    def amend(self, record_id: str, resource: Any, previous: int | None = None) -> WrittenRecord:
        """A new version linked to the latest one (or to `previous`, which the ledger then
        requires to be the latest: an optimistic lock, as HTTP If-Match)."""
        history = self.history(record_id)
        latest = history.head.latest if previous is None else previous
        body = self.seal_and_upload(
            resource, history.head.patient, record_id, latest + 1, previous=latest
        )
        outcome = self.ledger.submit(self.keys, "record.amend", body, sender=self.member_id)
        return WrittenRecord(record_id, latest + 1, body.package_digest, outcome)

    def patient_encryption_keys(
        self, patient_ids: Iterable[str], known: Mapping[str, bytes] | None = None
    ) -> dict[str, bytes]:
        """Each patient's encryption key: from `known` (patients whose enrollment this member
        sent but that may not be committed yet), else from the ledger."""
        given = dict(known or {})
        return {
            pid: given.get(pid) or self.ledger.query("/member", pid, Member).encryption_key
            for pid in dict.fromkeys(patient_ids)
        }

    def seal_many(
        self, writes: Sequence[RecordWrite], patient_keys: Mapping[str, bytes] | None = None
    ) -> list[PutRecord]:
        """Validate, seal and upload every record or amendment against one snapshot of the
        custodians, the threshold, the author and each patient, without committing them.
        `patient_keys` gives the encryption keys of patients whose enrollment this member sent
        but that may not be committed yet (it executes first: same sender, earlier nonce)."""
        sealing = self.sealing()
        patients = self.patient_encryption_keys((w.patient_id for w in writes), patient_keys)
        sealed = [
            self.seal_version(
                w.resource,
                w.patient_id,
                w.record_id,
                w.previous + 1,
                w.previous,
                sealing,
                patients[w.patient_id],
            )
            for w in writes
        ]
        self.upload_many([package for _, package in sealed])
        return [body for body, _ in sealed]

    def put_many(
        self, writes: Sequence[RecordWrite], patient_keys: Mapping[str, bytes] | None = None
    ) -> list[WrittenRecord]:
        """Seal and upload every record or amendment (`seal_many`), then commit them all in
        one `record.put-many` transaction: all are stored, or none is."""
        bodies = self.seal_many(writes, patient_keys)
        outcome = self.ledger.submit(
            self.keys, "record.put-many", PutRecords(tuple(bodies)), sender=self.member_id
        )
        return [
            WrittenRecord(b.record_id, b.previous + 1, b.package_digest, outcome) for b in bodies
        ]

    def put_bundle(
        self,
        records: Sequence[PutRecord],
        entries: Sequence[DirectoryWrite] = (),
        claims: ImportClaims | None = None,
        patients: Sequence[EnrollMember] = (),
    ) -> list[WrittenRecord]:
        """Commit new patients' enrollments (an EHR client's), sealed records (`seal_many`),
        directory entries and imported claims in one `record.put-bundle` transaction (a FHIR
        transaction Bundle): all, or nothing."""
        body = PutBundle(tuple(records), tuple(entries), claims, tuple(patients))
        outcome = self.ledger.submit(self.keys, "record.put-bundle", body, sender=self.member_id)
        return [
            WrittenRecord(b.record_id, b.previous + 1, b.package_digest, outcome) for b in records
        ]

    def mark_entered_in_error(self, record_id: str, version: int, reason: str) -> TxOutcome:
        body = MarkEnteredInError(record_id, version, reason)
        return self.ledger.submit(self.keys, "record.mark-error", body, sender=self.member_id)

    def erase(self, record_id: str, reason: str) -> TxOutcome:
        body = EraseRecord(record_id, reason)
        return self.ledger.submit(self.keys, "record.erase", body, sender=self.member_id)

    # --- reading -------------------------------------------------------------------------

    def history(self, record_id: str) -> RecordHistory:
        return self.ledger.query("/record", record_id, RecordHistory)  # type: ignore[no-any-return]

    def records_of(self, patient_id: str) -> list[RecordSummary]:
        return self.ledger.query("/records", patient_id, list[RecordSummary])  # type: ignore[no-any-return]

    def request_access(
        self,
        record_id: str,
        purpose: Purpose = Purpose.TREATMENT,
        version: int = 0,
        emergency_reason: str | None = None,
    ) -> str:
        """Submit an access request; the grant id, or AccessDenied with the ledger's reason."""
        body = RequestAccess(
            record_id,
            purpose,
            version,
            emergency=emergency_reason is not None,
            emergency_reason=emergency_reason or "",
        )
        try:
            outcome = self.ledger.submit(self.keys, "access.request", body, sender=self.member_id)
        except TxRejected as exc:
            if exc.code == Code.ACCESS_DENIED:
                raise AccessDenied(exc.log) from None
            if exc.code == Code.ERASED:
                raise RecordErased(exc.log) from None
            raise
        return outcome.tx_hash.lower()[:32]

    def _package(self, version: RecordVersion, grant_id: str = "") -> packaging.RecordPackage:
        query = f"?grant={grant_id}" if grant_id else ""
        path = f"/v1/packages/{version.package_digest}{query}"
        apis = self.node_apis()
        home = self.node_organization
        ordered = [(home, self.api_url)] + [
            (organization, url) for organization, url in apis.items() if url != self.api_url
        ]
        errors = []
        if self.home is not None:
            answer = self.home.get_package(self.member_id, version.package_digest, grant_id)
            if answer.status == 200 and (
                packaging.package_digest(answer.body) == version.package_digest
            ):
                return packaging.decode_package(answer.body)
            errors.append(f"{self.api_url}: HTTP {answer.status} ({answer.text[:120]})")
            ordered = ordered[1:]
        for organization, base in ordered:
            response = self._request("GET", base, path, organization=organization)
            if (
                response.status_code == 200
                and packaging.package_digest(response.content) == version.package_digest
            ):
                return packaging.decode_package(response.content)
            errors.append(f"{base}: HTTP {response.status_code}")
        raise ClientError(
            f"no node served package {version.package_digest[:16]}: {'; '.join(errors)}"
        )

    def read(
        self,
        record_id: str,
        purpose: Purpose = Purpose.TREATMENT,
        version: int = 0,
        emergency_reason: str | None = None,
    ) -> ReadRecord:
        """Request access, gather t key shares from the custodians, decrypt and verify."""
        grant_id = self.request_access(record_id, purpose, version, emergency_reason)
        grant = self.ledger.query("/grant", grant_id)
        record = self._version(record_id, int(grant["version"]))
        package = self._package(record, grant_id)
        shares, good, bad, refused = self._gather_shares(record, package, grant_id)
        if len(shares) < record.threshold:
            raise ClientError(
                f"only {len(shares)} of the {record.threshold} key shares needed could be"
                f" obtained (wrong shares from: {bad or 'none'}; no share from: "
                f"{'; '.join(refused) or 'none'})"
            )
        data_key = packaging.combine_shares(package, shares)
        plaintext = packaging.decrypt_record(package, data_key, record.commitment)
        return ReadRecord(json.loads(plaintext), record, grant_id, tuple(good), tuple(bad))

    # --- sessions: a patient's records in one access decision ----------------------------

    def open_session(
        self,
        patient_id: str,
        purpose: Purpose = Purpose.TREATMENT,
        resource_types: Sequence[str] = (),
    ) -> SessionGrant:
        """One `access.session` for the patient's records in scope (all types when none are
        named): the session the ledger granted, listing the record versions it covers, or
        AccessDenied with the ledger's reason when it covers none."""
        body = RequestSession(patient_id, purpose, tuple(sorted(set(resource_types))))
        try:
            outcome = self.ledger.submit(self.keys, "access.session", body, sender=self.member_id)
        except TxRejected as exc:
            if exc.code == Code.ACCESS_DENIED:
                raise AccessDenied(exc.log) from None
            raise
        return self.session(outcome.tx_hash.lower()[:32])

    def session(self, session_id: str) -> SessionGrant:
        return self.ledger.query("/session", session_id, SessionGrant)  # type: ignore[no-any-return]

    def read_session(
        self, session: SessionGrant, versions: Sequence[RecordVersion], patience: float = 10.0
    ) -> dict[tuple[str, int], ReadRecord | ClientError]:
        """Decrypt many record versions a session covers: each package from the home node
        first, the key shares from the custodians in one request per custodian (not one per
        record), each share checked against its commitment and each plaintext against the
        chain's. Every version gets its own answer: a resource, or why not."""
        results: dict[tuple[str, int], ReadRecord | ClientError] = {}
        pending: dict[tuple[str, int], tuple[RecordVersion, packaging.RecordPackage]] = {}
        for version in versions:
            key = (version.record_id, version.version)
            if session.grant_for(*key) is None:
                results[key] = AccessDenied(
                    f"session {session.id} does not cover {version.record_id} v{version.version}"
                )
                continue
            try:
                pending[key] = (version, self._package(version, session.id))
            except ClientError as exc:
                results[key] = exc
        shares: dict[tuple[str, int], list[packaging.Share]] = {k: [] for k in pending}
        good: dict[tuple[str, int], list[str]] = {k: [] for k in pending}
        bad: dict[tuple[str, int], list[str]] = {k: [] for k in pending}
        refused: dict[tuple[str, int], dict[str, str]] = {k: {} for k in pending}
        apis = self.node_apis()
        home = self.node_organization
        order = sorted(apis, key=lambda organization: (organization != home, organization))
        deadline = time.monotonic() + patience
        while True:
            retry = False
            for organization in order:
                asked = [
                    key
                    for key, (version, _) in pending.items()
                    if len(shares[key]) < version.threshold
                    and organization not in good[key]
                    and organization not in bad[key]
                    and any(c.organization == organization for c in version.custodians)
                    and not refused[key].get(organization, "").startswith("final:")
                ]
                for start in range(0, len(asked), MAX_RELEASE_RECORDS):
                    chunk = asked[start : start + MAX_RELEASE_RECORDS]
                    answers = self._release_many(organization, apis, session.id, chunk)
                    for key, (status, text, sealed) in zip(chunk, answers, strict=True):
                        version, package = pending[key]
                        if status in (404, 503):
                            refused[key][organization] = f"HTTP {status}"
                            retry = True
                            continue
                        if status != 200 or sealed is None:
                            refused[key][organization] = f"final:HTTP {status}: {text}"
                            continue
                        custody = next(
                            c for c in version.custodians if c.organization == organization
                        )
                        try:
                            share = packaging.unseal_share(sealed, self.keys.encryption_secret)
                        except packaging.PackageError:
                            bad[key].append(organization)
                            continue
                        if share.index != custody.index or not packaging.share_is_valid(
                            package, share
                        ):
                            bad[key].append(organization)
                            continue
                        refused[key].pop(organization, None)
                        shares[key].append(share)
                        good[key].append(organization)
            done = all(len(shares[k]) >= v.threshold for k, (v, _) in pending.items())
            if done or not retry or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        for key, (version, package) in pending.items():
            if len(shares[key]) < version.threshold:
                why = "; ".join(
                    f"{org} ({reason.removeprefix('final:')})"
                    for org, reason in sorted(refused[key].items())
                )
                results[key] = ClientError(
                    f"only {len(shares[key])} of the {version.threshold} key shares needed for"
                    f" {version.record_id} v{version.version} could be obtained (wrong shares"
                    f" from: {bad[key] or 'none'}; no share from: {why or 'none'})"
                )
                continue
            try:
                data_key = packaging.combine_shares(package, shares[key][: version.threshold])
                plaintext = packaging.decrypt_record(package, data_key, version.commitment)
            except packaging.PackageError as exc:
                results[key] = ClientError(f"{version.record_id} v{version.version}: {exc}")
                continue
            results[key] = ReadRecord(
                json.loads(plaintext), version, session.id, tuple(good[key]), tuple(bad[key])
            )
        return results

    def _release_many(
        self, organization: str, apis: dict[str, str], grant_id: str, records: list[tuple[str, int]]
    ) -> list[tuple[int, str, bytes | None]]:
        """One custodian's answers for many record versions of a session: (status, reason,
        the sealed share) each."""
        if self.home is not None and organization == self.node_organization:
            return [
                (a.status, a.text, a.body if a.status == 200 else None)
                for a in self.home.release_shares(self.member_id, grant_id, records)
            ]
        body = json.dumps({"grant": grant_id, "records": records}).encode()
        try:
            response = self._request(
                "POST", apis[organization], "/v1/keys/release", body, organization=organization
            )
        except ClientError as exc:
            return [(0, str(exc), None)] * len(records)
        if response.status_code != 200:
            return [(response.status_code, response.text, None)] * len(records)
        try:
            items = response.json()["shares"]
            answers: list[tuple[int, str, bytes | None]] = []
            for item, (record_id, version) in zip(items, records, strict=True):
                if (item["record_id"], item["version"]) != (record_id, version):
                    raise ValueError("answers out of order")
                status = int(item["status"])
                sealed = base64.b64decode(item["sealed_share"]) if status == 200 else None
                answers.append((status, str(item.get("error", "")), sealed))
        except (KeyError, ValueError, TypeError):
            return [(502, "a custodian answered something else than shares", None)] * len(records)
        return answers

    def _gather_shares(
        self,
        record: RecordVersion,
        package: packaging.RecordPackage,
        grant_id: str,
        patience: float = 10.0,
    ) -> tuple[list[packaging.Share], list[str], list[str], list[str]]:
        """Ask custodians for their shares until t valid ones are in hand: (shares, from whom,
        who sent a wrong share, who gave none and why). A custodian that has not yet committed
        the grant's block or received the package answers 404/503 and is asked again, for up
        to `patience` seconds; one that is down or refuses is passed over; a wrong share is
        detected by its commitment and set aside."""
        shares: list[packaging.Share] = []
        good: list[str] = []
        bad: list[str] = []
        apis = self.node_apis()
        body = json.dumps({"grant": grant_id}).encode()
        pending = [c for c in record.custodians if c.organization in apis]
        refused: dict[str, str] = {}
        deadline = time.monotonic() + patience
        while pending and len(shares) < record.threshold:
            retry = []
            for custody in pending:
                if len(shares) >= record.threshold:
                    break
                try:
                    status, text, sealed = self._release(custody.organization, apis, body)
                except ClientError as exc:
                    refused[custody.organization] = str(exc)
                    continue
                if status in (404, 503):
                    refused[custody.organization] = f"HTTP {status}"
                    retry.append(custody)
                    continue
                if status != 200:
                    refused[custody.organization] = f"HTTP {status}: {text}"
                    continue
                try:
                    share = packaging.unseal_share(sealed(), self.keys.encryption_secret)
                except (KeyError, ValueError, packaging.PackageError):
                    bad.append(custody.organization)
                    continue
                if share.index != custody.index or not packaging.share_is_valid(package, share):
                    bad.append(custody.organization)
                    continue
                refused.pop(custody.organization, None)
                shares.append(share)
                good.append(custody.organization)
            if len(shares) >= record.threshold or not retry or time.monotonic() > deadline:
                break
            pending = retry
            time.sleep(0.3)
        return shares, good, bad, [f"{org} ({why})" for org, why in sorted(refused.items())]

    def _release(
        self, organization: str, apis: dict[str, str], body: bytes
    ) -> tuple[int, str, Callable[[], bytes]]:
        """One custodian's answer to a key release request: (status, reason, the sealed share
        — which raises KeyError or ValueError if the answer does not hold one)."""
        if self.home is not None and organization == self.node_organization:
            answer = self.home.release_share(self.member_id, json.loads(body)["grant"])
            return answer.status, answer.text, lambda: answer.body
        response = self._request(
            "POST", apis[organization], "/v1/keys/release", body, organization=organization
        )
        return (
            response.status_code,
            response.text,
            lambda: base64.b64decode(response.json()["sealed_share"]),
        )

    def read_own(self, record_id: str, version: int = 0) -> ReadRecord:
        """The patient or the author opens their own key envelope (no shares needed)."""
        record = self._version(record_id, version)
        if record.status is RecordStatus.ERASED:
            raise RecordErased(f"record {record_id} was erased")
        package = self._package(record)
        data_key = packaging.open_envelope(package, self.keys.encryption_secret)
        plaintext = packaging.decrypt_record(package, data_key, record.commitment)
        return ReadRecord(json.loads(plaintext), record, "", (), ())

    def _version(self, record_id: str, version: int) -> RecordVersion:
        history = self.history(record_id)
        number = version or history.head.latest
        for candidate in history.versions:
            if candidate.version == number:
                return candidate
        raise ClientError(f"record {record_id} has no version {number}")

    # --- consent -------------------------------------------------------------------------

    def grant_consent(
        self,
        patient_id: str,
        grantee_kind: GranteeKind,
        grantee: str,
        purposes: tuple[Purpose, ...],
        start_ns: int,
        end_ns: int,
        scope_kind: ScopeKind = ScopeKind.ALL,
        scope: tuple[str, ...] = (),
    ) -> str:
        body = GrantConsent(
            patient_id, grantee_kind, grantee, scope_kind, scope, purposes, start_ns, end_ns
        )
        outcome = self.ledger.submit(self.keys, "consent.grant", body, sender=self.member_id)
        return outcome.tx_hash.lower()[:32]

    def revoke_consent(self, patient_id: str, consent_id: str, reason: str = "") -> TxOutcome:
        body = RevokeConsent(patient_id, consent_id, reason)
        return self.ledger.submit(self.keys, "consent.revoke", body, sender=self.member_id)

    def add_delegate(self, patient_id: str, delegate_id: str, relationship: str) -> TxOutcome:
        """Name a delegate (guardian, proxy, ...): signed by the patient themselves only."""
        body = SetDelegate(patient_id, delegate_id, relationship)
        return self.ledger.submit(self.keys, "delegate.add", body, sender=self.member_id)

    def remove_delegate(self, patient_id: str, delegate_id: str) -> TxOutcome:
        body = SetDelegate(patient_id, delegate_id)
        return self.ledger.submit(self.keys, "delegate.remove", body, sender=self.member_id)

    def consents(self, patient_id: str) -> list[Consent]:
        return self.ledger.query("/consents", patient_id, list[Consent])  # type: ignore[no-any-return]

    # --- audit and export ----------------------------------------------------------------

    def audit_trail(self, patient_id: str) -> list[ProvenAuditEntry]:
        """Every audit entry about a patient, each checked by its Merkle inclusion proof in the
        audit log whose root the validators signed (through the app hash)."""
        return self.verified_audit_trail(patient_id).entries

    def verified_audit_trail(self, patient_id: str) -> AuditTrail:
        """The patient's audit entries together with the signed header that proves them."""
        height, raw = self.ledger.query_raw("/audit/patient", patient_id.encode())
        answer = msgspec.json.decode(raw)
        size = int(answer["audit_size"])
        root = base64.b64decode(answer["audit_root"])
        header = self.ledger.verified_header(height + 1)
        expected = app_hash_of(base64.b64decode(answer["state_root"]), root, size)
        if expected != header.app_hash:
            raise ProofError(f"audit root at height {height} is not the one the validators signed")
        proven = []
        for item in answer["entries"]:
            leaf = base64.b64decode(item["leaf"])
            proof = [base64.b64decode(p) for p in item["inclusion_proof"]]
            if not merkle.verify_inclusion(
                merkle.leaf_hash(leaf), int(item["index"]), size, proof, root
            ):
                raise ProofError(f"audit entry {item['index']} fails its inclusion proof")
            entry = msgspec.msgpack.decode(leaf, type=AuditEntry)
            proven.append(
                ProvenAuditEntry(
                    int(item["index"]), int(item["height"]), int(item["time_ns"]), entry
                )
            )
        return AuditTrail(patient_id, proven, height, header)

    def grant(self, grant_id: str) -> Grant:
        """The grant the ledger recorded for a granted access request."""
        return self.ledger.query("/grant", grant_id, Grant)  # type: ignore[no-any-return]

    def member(self, member_id: str) -> Member | None:
        try:
            return self.ledger.query("/member", member_id, Member)  # type: ignore[no-any-return]
        except QueryError:
            return None

    def disclosures(self, patient_id: str, trail: AuditTrail | None = None) -> list[Disclosure]:
        """The accounting of disclosures (HIPAA §164.528): every access to the patient's
        records that the ledger granted to someone other than the patient, oldest first.

        The audit entries are proven against a signed header; each grant must agree with its
        proven entry (same requester, patient and block), or the answer is refused."""
        trail = trail or self.verified_audit_trail(patient_id)
        recipients: dict[str, Member | None] = {}
        found = []
        for proven in trail.entries:
            if proven.entry.sender == patient_id:
                continue
            if proven.granted_access:
                grants = [self.grant(proven.grant_id)]
            elif proven.opened_session:
                # A session disclosed every record version it covered: one entry each.
                session = self.session(proven.grant_id)
                grants = [
                    grant
                    for c in session.records
                    if (grant := session.grant_for(c.record_id, c.version)) is not None
                ]
            else:
                continue
            for grant in grants:
                if (
                    grant.requester != proven.entry.sender
                    or grant.patient != patient_id
                    or grant.height != proven.height
                ):
                    raise ProofError(
                        f"grant {grant.id} does not match its proven audit entry {proven.index}"
                    )
                if grant.requester not in recipients:
                    recipients[grant.requester] = self.member(grant.requester)
                found.append(Disclosure(proven, grant, recipients[grant.requester]))
        return found

    def export_bundle(self, patient_id: str) -> dict[str, Any]:
        """The patient's records, decrypted here, as a FHIR `collection` Bundle."""
        entries = []
        for summary in self.records_of(patient_id):
            if summary.head.erased or summary.latest is None:
                continue
            record = self.read_own(summary.head.record_id)
            resource = record.resource
            entries.append(
                {
                    "fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, summary.head.record_id)}",
                    "resource": resource,
                }
            )
        return {
            "resourceType": "Bundle",
            "id": secrets.token_hex(8),
            "type": "collection",
            "entry": entries,
        }
