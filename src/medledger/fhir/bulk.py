"""FHIR Bulk Data Access (IG v2.0.0) `$export`: a patient's, all patients' or the whole system's
permitted records as NDJSON, by the asynchronous request pattern.

- Kick-off: `GET [base]/$export` (system), `[base]/Patient/$export` (all patients: the same
  here, as every record is about a patient) or `[base]/Patient/<id>/$export` (one patient),
  with `Accept: application/fhir+json` and `Prefer: respond-async`, answers 202 Accepted with
  `Content-Location`: the status URL.
  Parameters: `_type` (comma-separated resource types; default every record type the token may
  read), `_since` (an instant: only resources whose current version was committed at or after
  it), `_outputFormat` (NDJSON only). Other parameters are refused (400) unless `Prefer:
  handling=lenient`, which ignores them and says so in the manifest's error file.
- Status: `GET` answers 202 with `X-Progress` while the export runs; then 200 with the manifest
  (`transactionTime`, `request`, `requiresAccessToken: true`, `output: [{type, url, count}]`,
  `error: [{type: OperationOutcome, url}]`), or the failure as an OperationOutcome (4xx/5xx).
  `DELETE` cancels a running export or deletes a finished one: 202, and its files are gone.
- Output: `GET` each manifest url with a bearer token of the client that asked for the export
  (a new token once the first has expired) → `application/fhir+ndjson`, one resource per line.

The export never bypasses the ledger. It reads as the token's member through the gateway's read
path: for each record the ledger decides an access request (audited on the patient's trail) and
t custodians release key shares; records the rules do not let the caller read are left out and
counted in an informational OperationOutcome. A line is served only while its grant would still
release keys: each download re-checks the grants (expiry, a consent revoked or ended since) and
the records (erased since) and leaves out lines that no longer pass.

Protected health information is never written to disk, and is kept in memory as briefly as the
pattern allows: a file's lines are dropped as soon as it has been downloaded in full once (a
second download answers 410: start a new export); a `DELETE` drops the job and its output at
once (a running export stops); a finished job not collected is dropped after the retention of
the node's FHIR settings (ten minutes by default), or earlier when the first grant it depends on
expires. A sweeper drops expired jobs every 15 seconds, and every job is dropped when the node
stops. The export's reads do not fill the gateway's read cache, so that dropping a job drops
its plaintext.

A client holds at most `max_exports_per_client` unfinished jobs (running, or finished and
holding output), the node at most `max_exports_per_node`; beyond that the kick-off answers 429
with an OperationOutcome that says which bound was reached and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from aiohttp import web

from medledger.client.records import AccessDenied, RecordErased, RecordSummary
from medledger.client.sdk import ClientError
from medledger.fhir.capability import RECORD_TYPES
from medledger.fhir.gateway import (
    GATEWAY,
    FhirGateway,
)
from medledger.fhir.http import (
    error_response,
    query_params,
    run,
)
from medledger.fhir.outcome import (
    FhirError,
    exception_summary,
    forbidden,
    from_client,
    from_smart,
    information,
    internal_error,
    invalid,
    issue,
    not_found,
    operation_outcome,
)
from medledger.fhir.plumbing import (
    FHIR_JSON,
    Caller,
    Json,
    http_date,
    ns_of,
    parse_prefer,
    parse_purpose,
    with_meta,
)
from medledger.fhir.search import rfc3339
from medledger.fhir.smart import AccessToken, SmartError, scope_permits
from medledger.ledger.access import Grant
from medledger.ledger.consent import Consent, Purpose
from medledger.ledger.model import Member, Organization, Role
from medledger.ledger.records import RecordStatus, RecordVersion

log = logging.getLogger("medledger.fhir.bulk")
T = TypeVar("T")

NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = frozenset({NDJSON, "application/ndjson", "ndjson"})
OUTPUT_ACCEPT = frozenset({*OUTPUT_FORMATS, FHIR_JSON, "application/json", "*/*", "application/*"})
KICKOFF_PARAMS = ("_type", "_since", "_outputFormat")

# Routes (aiohttp path templates).
KICKOFF_SYSTEM = "/fhir/$export"
KICKOFF_PATIENTS = "/fhir/Patient/$export"
KICKOFF_PATIENT = "/fhir/Patient/{id}/$export"
STATUS = "/fhir/$export-status/{job}"
OUTPUT = "/fhir/$export-output/{job}/{file}"

SWEEP_INTERVAL = 15.0
MAX_RUNNING = 4  # exports running at once on this node (more wait in the runner's queue)
EXPORT_READERS = 8
MAX_LINES_PER_FILE = 10_000
MAX_EXPORT_BYTES = 256 * 1024 * 1024
RETRY_AFTER = "2"
ERRORS_FILE = "errors.ndjson"


class JobState(StrEnum):
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass(frozen=True)
class Line:
    """One exported resource (JSON without a newline) and what it was read under."""

    version: RecordVersion
    grant: Grant
    data: bytes


@dataclass
class OutputFile:
    name: str
    resource_type: str
    lines: list[Line]
    count: int = -1  # lines exported (kept in the manifest once the lines are dropped)
    downloaded: bool = False

    def __post_init__(self) -> None:
        if self.count < 0:
            self.count = len(self.lines)


@dataclass
class ExportJob:
    id: str
    token: AccessToken
    check_type: str  # a type the kick-off token could read; status and output check it
    request: str
    level: str  # system | patients | patient
    patient: str | None
    types: tuple[str, ...]
    since_ns: int | None
    purpose: Purpose
    prefer: dict[str, str]
    notes: list[Json] = field(default_factory=list)  # issues known at kick-off
    transaction_ns: int = 0
    state: JobState = JobState.RUNNING
    total: int = 0
    done: int = 0
    files: dict[str, OutputFile] = field(default_factory=dict)
    errors: list[Json] = field(default_factory=list)  # OperationOutcome resources
    failure: FhirError | None = None
    expires_at: float = 0.0
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def progress(self) -> str:
        if not self.total:
            return "selecting the records to export"
        return f"read {self.done} of {self.total} resources"

    @property
    def unfinished(self) -> bool:
        """Running, or holding output the client has not collected: counts against the caps."""
        return self.state is JobState.RUNNING or (
            self.state is JobState.COMPLETE and any(not f.downloaded for f in self.files.values())
        )

    def drop_output(self) -> None:
        for output in self.files.values():
            output.lines.clear()
        self.files.clear()


class BulkExports:
    """This node's export jobs, in memory only."""

    def __init__(self, gateway: FhirGateway) -> None:
        self.gateway = gateway
        self.retention = gateway.ctx.export_retention
        self.per_client = gateway.ctx.max_exports_per_client
        self.per_node = gateway.ctx.max_exports_per_node
        self._jobs: dict[str, ExportJob] = {}
        self._lock = threading.Lock()
        self.runner = ThreadPoolExecutor(MAX_RUNNING, thread_name_prefix="fhir-export")
        self.readers = ThreadPoolExecutor(EXPORT_READERS, thread_name_prefix="fhir-export-read")

    @property
    def base(self) -> str:
        return self.gateway.base

    def status_url(self, job: ExportJob) -> str:
        return f"{self.base}/$export-status/{job.id}"

    def output_url(self, job: ExportJob, name: str) -> str:
        return f"{self.base}/$export-output/{job.id}/{name}"

    # --- the registry ------------------------------------------------------------------------

    def start(self, job: ExportJob) -> None:
        """Register and run `job`, or 429 when its client or the node holds as many unfinished
        jobs as it may."""
        with self._lock:
            unfinished = [j for j in self._jobs.values() if j.unfinished]
            own = sum(1 for j in unfinished if j.token.client_id == job.token.client_id)
            if own >= self.per_client:
                raise FhirError(
                    429,
                    "throttled",
                    f"client {job.token.client_id} already has {own} unfinished export(s), the"
                    f" most one client may have: download their files or DELETE them (or let"
                    " them finish) before starting another",
                    headers={"Retry-After": "30"},
                )
            if len(unfinished) >= self.per_node:
                raise FhirError(
                    429,
                    "throttled",
                    f"this node holds {len(unfinished)} unfinished exports, the most it runs or"
                    " keeps at once: retry later",
                    headers={"Retry-After": "30"},
                )
            self._jobs[job.id] = job
        self.runner.submit(self.execute, job)

    def get(self, job_id: str) -> ExportJob:
        self.sweep()
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise not_found(f"no export job {job_id!r} (it may have been deleted or expired)")
        return job

    def delete(self, job: ExportJob) -> None:
        job.cancelled.set()
        with self._lock:
            self._jobs.pop(job.id, None)
        job.drop_output()

    def downloaded(self, job: ExportJob, name: str) -> None:
        """One file was served in full: drop its lines. (The manifest and the error file, which
        hold no PHI, stay until the job is deleted or expires; a job whose every file was
        downloaded no longer counts against the caps.)"""
        output = job.files.get(name)
        if output is not None:
            output.downloaded = True
            output.lines.clear()

    def sweep(self, now: float | None = None) -> int:
        """Drop the jobs whose output has expired; how many were dropped."""
        moment = time.time() if now is None else now
        with self._lock:
            expired = [
                j
                for j in self._jobs.values()
                if j.state is not JobState.RUNNING and j.expires_at <= moment
            ]
            for job in expired:
                del self._jobs[job.id]
        for job in expired:
            job.drop_output()
        return len(expired)

    def close(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for job in jobs:
            job.cancelled.set()
            job.drop_output()
        self.runner.shutdown(wait=False, cancel_futures=True)
        self.readers.shutdown(wait=False, cancel_futures=True)

    # --- running an export -------------------------------------------------------------------

    def execute(self, job: ExportJob) -> None:
        try:
            caller = self.gateway.caller(job.token, job.purpose, job.prefer)
            self.export(caller, job)
        except FhirError as exc:
            self.fail(job, exc)
        except ClientError as exc:
            self.fail(job, from_client(exc))
        except Exception as exc:
            log.error("export failed: %s", exception_summary(exc), extra={"job": job.id})
            self.fail(job, internal_error())

    def fail(self, job: ExportJob, error: FhirError) -> None:
        job.failure = error
        job.drop_output()
        job.expires_at = time.time() + self.retention
        job.state = JobState.FAILED

    def patients(self, caller: Caller, job: ExportJob) -> list[str]:
        if job.patient is not None:
            return [job.patient]
        found: set[str] = set()
        organizations = caller.client.ledger.query("/organizations", b"", list[Organization])
        for organization in organizations:
            members = caller.client.ledger.query("/members", organization.id, list[Member])
            found.update(m.id for m in members if m.role is Role.PATIENT)
        return sorted(found)

    def select(
        self, caller: Caller, job: ExportJob, consents: dict[str, list[Consent]]
    ) -> tuple[list[RecordVersion], list[RecordVersion]]:
        """The current versions the export covers: (readable, withheld by the access rules)."""
        chosen: list[RecordVersion] = []
        withheld: list[RecordVersion] = []
        for patient in self.patients(caller, job):
            if job.cancelled.is_set():
                break
            for summary in caller.client.records_of(patient):
                latest = summary.latest
                if summary.head.erased or latest is None or latest.status is RecordStatus.ERASED:
                    continue
                if latest.resource_type not in job.types:
                    continue
                if job.since_ns is not None and latest.time_ns < job.since_ns:
                    continue
                if latest.time_ns > job.transaction_ns:
                    continue  # committed after the export began: the next _since export has it
                if self.gateway.may_read(caller, latest, consents):
                    chosen.append(latest)
                else:
                    withheld.append(latest)
        order = {t: i for i, t in enumerate(job.types)}
        chosen.sort(key=lambda v: (order[v.resource_type], v.patient, v.time_ns, v.record_id))
        return chosen, withheld

    def read(
        self, caller: Caller, version: RecordVersion, consents: dict[str, list[Consent]]
    ) -> tuple[Json, Grant]:
        """The gateway's read path (its cache while the grant would still release keys, else a
        new access request, key shares and decryption), keeping the grant. What the export
        decrypts is not added to the cache: it lives in the job only, and goes with it."""
        gateway = self.gateway
        key = (caller.member_id, version.record_id, version.version, caller.purpose.value)
        hit = gateway.cache.get(key)
        if hit is not None:
            if gateway.grant_valid(caller, hit.grant, version, consents):
                return copy.deepcopy(hit.resource), hit.grant
            gateway.cache.drop(key)
        read = caller.client.read(version.record_id, caller.purpose, version.version)
        return read.resource, caller.client.grant(read.grant_id)

    def export(self, caller: Caller, job: ExportJob) -> None:
        job.transaction_ns = time.time_ns()
        consents: dict[str, list[Consent]] = {}
        versions, withheld = self.select(caller, job, consents)
        if job.cancelled.is_set():
            return
        if job.level == "patient" and withheld and not versions:
            # Nothing is readable: the ledger decides (and audits) the refusal, as $everything.
            self.read(caller, withheld[0], consents)
        job.total = len(versions)
        futures: list[tuple[RecordVersion, Future[tuple[Json, Grant]]]] = [
            (v, self.readers.submit(self.read, caller, v, consents)) for v in versions
        ]
        lines: dict[str, list[Line]] = {}
        failures: list[str] = []
        denied = 0
        size = 0
        try:
            for version, future in futures:
                if job.cancelled.is_set():
                    return
                try:
                    resource, grant = future.result()
                except AccessDenied:
                    denied += 1
                    continue
                except RecordErased:
                    continue
                except ClientError as exc:
                    failures.append(f"{version.resource_type}/{version.record_id}: {exc}")
                    continue
                finally:
                    job.done += 1
                data = json.dumps(
                    with_meta(resource, version), ensure_ascii=False, separators=(",", ":")
                ).encode("utf-8")
                size += len(data) + 1
                if size > MAX_EXPORT_BYTES:
                    raise FhirError(
                        413,
                        "too-costly",
                        f"the export exceeds {MAX_EXPORT_BYTES // (1024 * 1024)} MiB: narrow it"
                        " with _type or _since, or export patient by patient",
                    )
                lines.setdefault(version.resource_type, []).append(Line(version, grant, data))
        finally:
            for _, future in futures:
                future.cancel()
        files: dict[str, OutputFile] = {}
        for resource_type, items in lines.items():
            for n, start in enumerate(range(0, len(items), MAX_LINES_PER_FILE), 1):
                name = f"{resource_type}-{n}.ndjson"
                files[name] = OutputFile(
                    name, resource_type, items[start : start + MAX_LINES_PER_FILE]
                )
        errors: list[Json] = []
        if job.notes:
            errors.append(operation_outcome(job.notes))
        left_out = len(withheld) + denied
        if left_out:
            errors.append(
                operation_outcome(
                    [
                        issue(
                            "information",
                            "suppressed",
                            f"{left_out} record(s) left out: the ledger's access rules do not let"
                            " this client read them (no consent covers them for this purpose)",
                        )
                    ]
                )
            )
        errors.extend(
            operation_outcome([issue("error", "transient", f"could not be read: {f}")])
            for f in failures
        )
        grants = [line.grant.expires_ns / 1e9 for items in lines.values() for line in items]
        if job.cancelled.is_set():
            return
        job.files = files
        job.errors = errors
        job.expires_at = min([time.time() + self.retention, *grants])
        job.state = JobState.COMPLETE
        log.info(
            "export complete",
            extra={"job": job.id, "resources": sum(len(i) for i in lines.values())},
        )

    # --- serving -----------------------------------------------------------------------------

    def manifest(self, job: ExportJob) -> Json:
        return {
            "transactionTime": rfc3339(job.transaction_ns),
            "request": job.request,
            "requiresAccessToken": True,
            "output": [
                {
                    "type": f.resource_type,
                    "url": self.output_url(job, f.name),
                    "count": f.count,
                }
                for f in job.files.values()
            ],
            "error": (
                [{"type": "OperationOutcome", "url": self.output_url(job, ERRORS_FILE)}]
                if job.errors
                else []
            ),
        }

    def current_lines(self, caller: Caller, job: ExportJob, lines: Sequence[Line]) -> bytes:
        """The lines whose grant would still release keys, of records not erased since."""
        consents: dict[str, list[Consent]] = {}
        records: dict[str, dict[str, RecordSummary]] = {}
        kept: list[bytes] = []
        for line in lines:
            version = line.version
            if not self.gateway.grant_valid(caller, line.grant, version, consents):
                continue
            if version.patient not in records:
                records[version.patient] = {
                    s.head.record_id: s for s in caller.client.records_of(version.patient)
                }
            summary = records[version.patient].get(version.record_id)
            if summary is None or summary.head.erased:
                continue
            kept.append(line.data)
        return b"".join(item + b"\n" for item in kept)


EXPORTS = web.AppKey("fhir_bulk_exports", BulkExports)


# --- HTTP -------------------------------------------------------------------------------------


def requested_types(
    params: Sequence[tuple[str, str]], notes: list[Json], lenient: bool
) -> list[str]:
    """`_type` as a list (every exportable type when absent); types that are not stored as
    records are refused, or noted and ignored when lenient."""
    named = [t.strip() for k, v in params if k == "_type" for t in v.split(",") if t.strip()]
    if not named:
        return ["Patient", *sorted(t for t in RECORD_TYPES if t != "Patient")]
    unknown = [t for t in dict.fromkeys(named) if t not in RECORD_TYPES]
    if unknown:
        reason = (
            f"_type {', '.join(unknown)}: not exported here (exported: records of the types"
            f" {', '.join(sorted(RECORD_TYPES))})"
        )
        if not lenient:
            raise invalid(reason)
        notes.append(issue("warning", "not-supported", f"ignored {reason}"))
    chosen = [t for t in dict.fromkeys(named) if t in RECORD_TYPES]
    if not chosen:
        raise invalid("_type names no resource type this server exports")
    return chosen


def parse_kickoff(
    params: Sequence[tuple[str, str]], lenient: bool
) -> tuple[list[str], int | None, list[Json]]:
    """(types, _since in ns, notes) of a kick-off request's parameters."""
    notes: list[Json] = []
    unknown = sorted({k for k, _ in params if k not in KICKOFF_PARAMS})
    if unknown:
        reason = f"$export here supports {', '.join(KICKOFF_PARAMS)}, not {', '.join(unknown)}"
        if not lenient:
            raise invalid(reason)
        notes.append(issue("warning", "not-supported", f"ignored parameters: {reason}"))
    for key, value in params:
        if key == "_outputFormat" and value not in OUTPUT_FORMATS:
            raise invalid(f"_outputFormat {value!r}: this server writes {NDJSON} only")
    types = requested_types(params, notes, lenient)
    sinces = [v for k, v in params if k == "_since"]
    if len(sinces) > 1:
        raise invalid("_since is given more than once")
    since = ns_of(sinces[0], "_since") if sinces else None
    return types, since, notes


def check_token(request: web.Request, resource_type: str) -> AccessToken:
    """The bearer token, valid, and allowed to read `resource_type` (401/403 otherwise)."""
    try:
        return request.app[GATEWAY].ctx.tokens.check(
            request.headers.get("Authorization"), resource_type, "r"
        )
    except SmartError as exc:
        raise from_smart(exc) from None


def authorize_types(
    request: web.Request, types: Sequence[str], explicit: bool, notes: list[Json]
) -> tuple[AccessToken, list[str]]:
    """The token and the requested types its scopes allow it to read. Types asked for by
    `_type` that the scopes do not allow are refused (and audited) one by one and noted; by
    default the export is just limited to what the scopes allow."""
    token: AccessToken | None = None
    refusal: FhirError | None = None
    allowed: list[str] = []
    for resource_type in types:
        if token is not None and not explicit:
            if scope_permits(token.scopes, resource_type, "r"):
                allowed.append(resource_type)
            continue
        try:
            token = check_token(request, resource_type)
        except FhirError as exc:
            if exc.status != 403:
                raise
            refusal = exc
            if explicit:
                notes.append(issue("warning", "forbidden", f"{resource_type}: {exc.diagnostics}"))
            continue
        allowed.append(resource_type)
    if token is None or not allowed:
        raise refusal or forbidden("the token's scopes allow reading none of the requested types")
    return token, allowed


async def kickoff(request: web.Request, level: str, patient: str | None) -> web.Response:
    gateway = request.app[GATEWAY]
    exports = request.app[EXPORTS]
    exports.sweep()
    prefer = parse_prefer(request.headers.get("Prefer"))
    if "respond-async" not in prefer:
        raise invalid("$export runs asynchronously: send Prefer: respond-async")
    lenient = prefer.get("handling") == "lenient"
    params = query_params(request)
    types, since, notes = parse_kickoff(params, lenient)
    explicit = any(k == "_type" for k, _ in params)
    token, allowed = authorize_types(request, types, explicit, notes)
    purpose = parse_purpose(request.headers.get("X-Purpose-Of-Use"))
    if patient is not None:
        found = await run(request, token, lambda c: gateway.patient_member(c, patient))
        if found is None:
            raise not_found(f"Patient/{patient} is not known")
    else:
        # Acting needs this node to hold the member's keys (403 otherwise), as every request.
        await run(request, token, lambda c: c.member_id)
    job = ExportJob(
        id=uuid.uuid4().hex,
        token=token,
        check_type=allowed[0],
        request=f"{gateway.ctx.public_url}{request.path_qs}",
        level=level,
        patient=patient,
        types=tuple(allowed),
        since_ns=since,
        purpose=purpose,
        prefer=prefer,
        notes=notes,
    )
    exports.start(job)
    return web.Response(
        status=202,
        text=json.dumps(information(f"export {job.id} started; poll {exports.status_url(job)}")),
        content_type=FHIR_JSON,
        charset="utf-8",
        headers={"Content-Location": exports.status_url(job)},
    )


async def system_kickoff(request: web.Request) -> web.Response:
    return await kickoff(request, "system", None)


async def patients_kickoff(request: web.Request) -> web.Response:
    return await kickoff(request, "patients", None)


async def patient_kickoff(request: web.Request) -> web.Response:
    return await kickoff(request, "patient", request.match_info["id"])


def owned_job(request: web.Request) -> ExportJob:
    """The job in the URL, for a valid token of the client that started it (others get 404:
    a job's existence is not disclosed)."""
    exports = request.app[EXPORTS]
    job = exports.get(request.match_info["job"])
    token = check_token(request, job.check_type)
    if token.client_id != job.token.client_id:
        raise not_found(f"no export job {job.id!r} (it may have been deleted or expired)")
    return job


async def status_handler(request: web.Request) -> web.Response:
    exports = request.app[EXPORTS]
    job = owned_job(request)
    if job.state is JobState.RUNNING:
        return web.Response(
            status=202, headers={"X-Progress": job.progress, "Retry-After": RETRY_AFTER}
        )
    if job.state is JobState.FAILED:
        assert job.failure is not None
        return error_response(job.failure)
    return web.json_response(
        exports.manifest(job), headers={"Expires": http_date(int(job.expires_at * 1e9))}
    )


async def delete_handler(request: web.Request) -> web.Response:
    exports = request.app[EXPORTS]
    job = owned_job(request)
    exports.delete(job)
    return web.Response(
        status=202,
        text=json.dumps(information(f"export {job.id} deleted")),
        content_type=FHIR_JSON,
        charset="utf-8",
    )


def negotiate_output(request: web.Request) -> None:
    accept = request.headers.get("Accept")
    if not accept:
        return
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if not types & OUTPUT_ACCEPT:
        raise FhirError(406, "not-supported", f"Accept {accept!r}: export files are {NDJSON}")


async def output_handler(request: web.Request) -> web.StreamResponse:
    exports = request.app[EXPORTS]
    job = owned_job(request)
    negotiate_output(request)
    name = request.match_info["file"]
    if job.state is not JobState.COMPLETE:
        raise not_found(f"export {job.id} has no files (it is {job.state})")
    if name == ERRORS_FILE and job.errors:
        body = b"".join(
            json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            for e in job.errors
        )
        return web.Response(body=body, content_type=NDJSON)
    output = job.files.get(name)
    if output is None:
        raise not_found(f"export {job.id} has no file {name!r}")
    token = check_token(request, output.resource_type)
    if output.downloaded:
        raise FhirError(
            410,
            "deleted",
            f"{name} of export {job.id} was downloaded already and dropped from memory: start a"
            " new export to get it again",
        )
    lines = list(output.lines)
    body = await in_thread(
        request, token, job.purpose, lambda c: exports.current_lines(c, job, lines)
    )
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body)
    await response.write_eof()
    exports.downloaded(job, name)
    return response


async def in_thread(
    request: web.Request, token: AccessToken, purpose: Purpose, work: Callable[[Caller], T]
) -> T:
    """Sync SDK work off the event loop as the token's member under `purpose` (a download
    re-checks grants under the purpose the export was asked for)."""
    gateway = request.app[GATEWAY]

    def job() -> T:
        try:
            return work(gateway.caller(token, purpose, {}))
        except ClientError as exc:
            raise from_client(exc) from None

    return await asyncio.get_running_loop().run_in_executor(gateway.requests, job)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def output_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Export files are NDJSON, not FHIR JSON: their downloads skip the FHIR API's JSON-only
    negotiation (they negotiate NDJSON themselves); errors are OperationOutcomes all the same."""
    if request.match_info.handler is not output_handler:
        return await handler(request)
    try:
        return await output_handler(request)
    except FhirError as exc:
        return error_response(exc)
    except (ConnectionError, asyncio.CancelledError):
        raise  # the client went away mid-download: its file is kept for another try
    except Exception as exc:
        log.error(
            "export download failed: %s", exception_summary(exc), extra={"path": request.path}
        )
        return error_response(internal_error())


def add_bulk_routes(app: web.Application) -> None:
    """Mount `$export` (reads `app[GATEWAY]`). Call before the FHIR API's generic routes, which
    would otherwise take these paths, and before its middleware (this one sits outside it)."""
    exports = BulkExports(app[GATEWAY])
    app[EXPORTS] = exports
    app.middlewares.append(output_middleware)
    router = app.router
    router.add_get(KICKOFF_SYSTEM, system_kickoff)
    router.add_get(KICKOFF_PATIENTS, patients_kickoff)
    router.add_get(KICKOFF_PATIENT, patient_kickoff)
    router.add_get(STATUS, status_handler)
    router.add_delete(STATUS, delete_handler)
    router.add_get(OUTPUT, output_handler)
    sweeper: list[asyncio.Task[None]] = []

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            exports.sweep()

    async def start(_: web.Application) -> None:
        sweeper.append(asyncio.create_task(sweep_forever()))

    async def stop(_: web.Application) -> None:
        for task in sweeper:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        exports.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
