"""Reading records: ledger metadata, the access rules asked ahead, the cache of decrypted
resources, and reads one by one or a patient's chart at a time through a session."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from concurrent.futures import Future

from medledger.client.records import (
    AccessDenied,
    RecordErased,
    RecordHistory,
)
from medledger.client.sdk import ClientError, QueryError
from medledger.fhir.core import GatewayCore
from medledger.fhir.outcome import (
    FhirError,
    not_found,
)
from medledger.fhir.plumbing import (
    Cached,
    Caller,
    Json,
    ReadBatch,
    Reply,
    etag,
    http_date,
    with_meta,
)
from medledger.ledger.access import Grant, SessionGrant, grant_basis, release_problem
from medledger.ledger.consent import (
    Consent,
)
from medledger.ledger.errors import Code
from medledger.ledger.model import Member, Role
from medledger.ledger.records import (
    RECORD_ID,
    RecordStatus,
    RecordVersion,
)
from medledger.ledger.state import State


class Reading(GatewayCore):
    # --- ledger metadata -------------------------------------------------------------------

    def history(self, caller: Caller, record_id: str) -> RecordHistory | None:
        if not RECORD_ID.match(record_id):
            return None
        try:
            return caller.client.history(record_id)
        except QueryError as exc:
            if exc.code == Code.NOT_FOUND:
                return None
            raise

    def record(self, caller: Caller, resource_type: str, record_id: str) -> RecordHistory:
        """A record of the given type, or 404; 410 when it was erased."""
        history = self.history(caller, record_id)
        if history is None or not history.versions:
            raise not_found(f"{resource_type}/{record_id} is not known")
        if history.versions[0].resource_type != resource_type:
            raise not_found(f"{resource_type}/{record_id} is not known")
        if history.head.erased:
            raise FhirError(
                410,
                "deleted",
                f"{resource_type}/{record_id} was erased at height {history.head.erased_height}",
            )
        return history

    def patient_member(self, caller: Caller, patient_id: str) -> Member | None:
        member = caller.lookup(patient_id)
        return member if member is not None and member.role is Role.PATIENT else None

    def consents_of(
        self, caller: Caller, patient: str, cache: dict[str, list[Consent]]
    ) -> list[Consent]:
        if patient not in cache:
            cache[patient] = caller.client.consents(patient)
            for consent in cache[patient]:
                self.consent_patients[consent.id] = patient
        return cache[patient]

    def may_read(
        self, caller: Caller, version: RecordVersion, consents: dict[str, list[Consent]]
    ) -> bool:
        """Whether the ledger would grant this read now (its own rule, asked of committed state
        at the last block's time), so as not to ask for what it would deny; the ledger still
        decides every read."""
        view = self.ctx.view
        if view is None:
            return True
        member = caller.member()
        with view.snapshot() as reads:
            basis = grant_basis(
                State(reads), member, version, caller.purpose, reads.block_time_ns()
            )
        return not isinstance(basis, str)

    # --- reading ---------------------------------------------------------------------------

    def cached(
        self, caller: Caller, version: RecordVersion, consents: dict[str, list[Consent]]
    ) -> Json | None:
        """The decrypted resource from memory while its grant would still release keys."""
        key = (caller.member_id, version.record_id, version.version, caller.purpose.value)
        hit = self.cache.get(key)
        if hit is None:
            return None
        if self.grant_valid(caller, hit.grant, version, consents):
            return hit.resource
        self.cache.drop(key)
        return None

    def read_version(
        self,
        caller: Caller,
        version: RecordVersion,
        consents: dict[str, list[Consent]] | None = None,
        *,
        reserved: bool = False,
    ) -> Json:
        """The decrypted resource of one version: from memory while its grant would still
        release keys, else through a new access request (counted against the request's bound
        unless the caller `reserved` it already)."""
        key = (caller.member_id, version.record_id, version.version, caller.purpose.value)
        hit = self.cached(caller, version, consents if consents is not None else {})
        if hit is not None:
            return copy.deepcopy(hit)
        if self.covering_session(caller, version.patient, [version]) is not None:
            answer = self.read_chart(caller, version.patient, [version])[
                (version.record_id, version.version)
            ]
            if isinstance(answer, ClientError):
                raise answer
            return copy.deepcopy(answer)
        if not reserved:
            caller.reserve_grants(1)
        read = caller.client.read(version.record_id, caller.purpose, version.version)
        grant = caller.client.grant(read.grant_id)
        self.cache.put(key, Cached(read.resource, grant))
        return copy.deepcopy(read.resource)

    def grant_valid(
        self,
        caller: Caller,
        grant: Grant,
        version: RecordVersion,
        consents: dict[str, list[Consent]],
    ) -> bool:
        """Whether a custodian would still release keys for `grant` (the ledger's rule on
        committed state): only then is the resource it decrypted shown from memory, so a
        revoked consent or an expired grant stops cached reads at the next block."""
        view = self.ctx.view
        if view is None:
            return False
        with view.snapshot() as reads:
            problem = release_problem(State(reads), caller.member(), grant, reads.block_time_ns())
        return problem is None and version.status is not RecordStatus.ERASED

    def read_many(
        self,
        caller: Caller,
        versions: Sequence[RecordVersion],
        consents: dict[str, list[Consent]],
    ) -> ReadBatch:
        """Read versions in parallel. Several records of one patient are read through one
        session (`access.session`: one commit for the patient's chart, key shares for the whole
        page in one request per custodian), or the session the caller already holds; a
        patient's single record through its own access request. Refused (422 too-costly)
        before anything is issued when that takes more access requests than the bound."""
        batch = ReadBatch({})
        uncached = [v for v in versions if self.cached(caller, v, consents) is None]
        by_patient: dict[str, list[RecordVersion]] = {}
        for version in uncached:
            by_patient.setdefault(version.patient, []).append(version)
        charts = {p: vs for p, vs in by_patient.items() if len(vs) > 1 and self.ctx.view}
        caller.reserve_grants(
            sum(1 for p, vs in charts.items() if self.covering_session(caller, p, vs) is None)
            + sum(len(vs) for p, vs in by_patient.items() if p not in charts)
        )
        chart_reads = {
            patient: self.readers.submit(self.read_chart, caller, patient, chart)
            for patient, chart in charts.items()
        }
        in_charts = {(v.record_id, v.version) for chart in charts.values() for v in chart}
        futures: list[tuple[RecordVersion, Future[Json]]] = [
            (v, self.readers.submit(self.read_version, caller, v, consents, reserved=True))
            for v in versions
            if (v.record_id, v.version) not in in_charts
        ]
        for version, future in futures:
            try:
                add_read(batch, version, future.result())
            except ClientError as exc:
                add_read(batch, version, exc)
        for patient, chart_future in chart_reads.items():
            try:
                read = chart_future.result()
            except ClientError as exc:
                for version in charts[patient]:
                    add_read(batch, version, exc)
                continue
            for version in charts[patient]:
                answer = read[(version.record_id, version.version)]
                add_read(
                    batch,
                    version,
                    answer if isinstance(answer, ClientError) else copy.deepcopy(answer),
                )
        return batch

    def covering_session(
        self, caller: Caller, patient: str, versions: Sequence[RecordVersion]
    ) -> SessionGrant | None:
        """The caller's session for the patient and purpose, if a custodian would still release
        shares for every one of `versions` under it (the ledger's rule on committed state: not
        expired, covering them, its consents still active)."""
        key = (caller.member_id, patient, caller.purpose.value)
        with self._sessions_lock:
            session = self.sessions.get(key)
        if session is None or self.ctx.view is None:
            return None
        member = caller.member()
        with self.ctx.view.snapshot() as reads:
            now_ns = reads.block_time_ns()
            if now_ns >= session.expires_ns:
                with self._sessions_lock:
                    self.sessions.pop(key, None)
                return None
            state = State(reads)
            for version in versions:
                grant = session.grant_for(version.record_id, version.version)
                if grant is None or release_problem(state, member, grant, now_ns) is not None:
                    return None
        return session

    def read_chart(
        self, caller: Caller, patient: str, versions: list[RecordVersion]
    ) -> dict[tuple[str, int], Json | ClientError]:
        """Several versions of one patient's records through a session: the caller's current
        one where it covers them, else a new one (whose access request the caller reserved).
        Each version's resource, or why not."""
        session = self.covering_session(caller, patient, versions)
        if session is None:
            session = caller.client.open_session(patient, caller.purpose)
            with self._sessions_lock:
                self.sessions[(caller.member_id, patient, caller.purpose.value)] = session
        answers: dict[tuple[str, int], Json | ClientError] = {}
        for key, read in caller.client.read_session(session, versions).items():
            if isinstance(read, ClientError):
                answers[key] = read
                continue
            grant = session.grant_for(*key)
            assert grant is not None  # read_session reads only what the session covers
            cache_key = (caller.member_id, key[0], key[1], caller.purpose.value)
            self.cache.put(cache_key, Cached(read.resource, grant))
            answers[key] = read.resource
        return answers

    def read(self, caller: Caller, resource_type: str, record_id: str, vid: int = 0) -> Reply:
        history = self.record(caller, resource_type, record_id)
        number = vid or history.head.latest
        version = next((v for v in history.versions if v.version == number), None)
        if version is None:
            raise not_found(f"{resource_type}/{record_id} has no version {number}")
        if version.status is RecordStatus.ERASED:
            raise FhirError(410, "deleted", f"{resource_type}/{record_id} was erased")
        resource = self.read_version(caller, version)
        return self.resource_reply(200, with_meta(resource, version), version)

    def resource_reply(
        self, status: int, resource: Json, version: RecordVersion, *, location: bool = False
    ) -> Reply:
        headers = {"ETag": etag(version.version), "Last-Modified": http_date(version.time_ns)}
        if location:
            headers["Location"] = (
                f"{self.base}/{version.resource_type}/{version.record_id}"
                f"/_history/{version.version}"
            )
        return Reply(status, resource, headers)


def add_read(batch: ReadBatch, version: RecordVersion, outcome: Json | ClientError) -> None:
    """One version's outcome in a batch: its resource; withheld when the ledger denied it;
    left out when it was erased; a failure otherwise."""
    if isinstance(outcome, AccessDenied):
        batch.withheld += 1
    elif isinstance(outcome, RecordErased):
        return
    elif isinstance(outcome, ClientError):
        batch.failures.append(f"{version.resource_type}/{version.record_id}: {outcome}")
    else:
        batch.resources[(version.record_id, version.version)] = outcome
