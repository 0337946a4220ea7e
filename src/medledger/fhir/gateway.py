"""The FHIR R4 REST API of a node, over the ledger.

Every request but the CapabilityStatement and the token endpoint carries a SMART Backend
Services bearer token; its scopes must allow the interaction (401 without a valid token, 403
outside the scopes, both in the node's audit log). The token's member is the custodial system
member (an EHR or LIS integration) that acts: the gateway never bypasses the ledger —

- a write validates the resource, seals it (fresh data key, envelopes to patient and author,
  threshold shares to the custodian nodes), uploads the package and commits the record;
- a read is a ledger access request that the ledger decides by its rules and audits, then key
  shares from t custodians, decryption and verification against the on-chain commitment.
  Decrypted resources are kept in memory (never on disk) for the life of their grant and only
  while the grant would still release keys (a revoked consent ends it at once).

A record's FHIR id is its ledger record id; meta.versionId is the ledger version,
meta.lastUpdated the block time of that version, the ETag W/"<version>". Patient.id is the
patient's ledger member id. Consent, AuditEvent and Provenance are views of the ledger's
consents, audit log and record metadata. Every error is an OperationOutcome.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from aiohttp import web

from medledger.client.records import (
    AccessDenied,
    ProvenAuditEntry,
    RecordErased,
    RecordHistory,
    RecordsClient,
    RecordWrite,
)
from medledger.client.sdk import ClientError, QueryError, TxRejected
from medledger.crypto.keys import KeyPair
from medledger.fhir.capability import (
    RECORD_TYPES,
    RESOURCES,
    capability_statement,
    smart_configuration,
)
from medledger.fhir.context import FHIR_CONTEXT, FhirContext
from medledger.fhir.directory import (
    DIRECTORY_ONLY_TYPES,
    Directory,
    existing_entry,
    identifiers_of,
    is_directory_data,
    new_write,
    read_entry,
    resolve_references,
    search_entries,
    served,
)
from medledger.fhir.include import Inclusions, referenced, split_inclusions
from medledger.fhir.outcome import (
    FhirError,
    business_rule,
    exception_summary,
    forbidden,
    from_client,
    from_smart,
    from_validation,
    information,
    internal_error,
    invalid,
    issue,
    not_found,
    not_supported,
    operation_outcome,
    status_line,
    too_costly,
)
from medledger.fhir.search import (
    METADATA,
    PATIENT,
    SEARCH_PARAMS,
    Criterion,
    SearchError,
    SearchQuery,
    Token,
    date_range,
    metadata_matches,
    parse_search,
    parse_token,
    reference_id,
    reference_type,
    rfc3339,
    sort_items,
    unescape,
)
from medledger.fhir.smart import AccessToken, SmartError, scope_permits
from medledger.ledger import codec
from medledger.ledger.access import Grant, SessionGrant, grant_basis, release_problem
from medledger.ledger.consent import (
    Consent,
    ConsentStatus,
    GranteeKind,
    Purpose,
    ScopeKind,
)
from medledger.ledger.directory import (
    DIRECTORY_TYPES,
    DirectoryEntry,
    DirectoryWrite,
    EntryStatus,
)
from medledger.ledger.errors import Code
from medledger.ledger.model import PRACTITIONER_ROLES, SYSTEM_ROLES, Member, Role
from medledger.ledger.records import (
    MAX_RECORDS_PER_TX,
    RECORD_ID,
    RecordStatus,
    RecordVersion,
    record_key,
)
from medledger.ledger.state import State
from medledger.ledger.transactions import EnrollMember
from medledger.services.custody import CustodyError
from medledger.validation import FhirValidationError, validate_resource

log = logging.getLogger("medledger.fhir")

Json = dict[str, Any]
T = TypeVar("T")

FHIR_JSON = "application/fhir+json"
JSON_TYPES = frozenset({FHIR_JSON, "application/json", "application/json+fhir"})
JSON_FORMATS = frozenset({"json", *JSON_TYPES, "application/fhir json", "application/json fhir"})
ACCEPTABLE = frozenset({*JSON_TYPES, "*/*", "application/*"})

ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PURPOSE_CODES: Mapping[Purpose, str] = {
    Purpose.TREATMENT: "TREAT",
    Purpose.PAYMENT: "HPAYMT",
    Purpose.OPERATIONS: "HOPERAT",
    Purpose.RESEARCH: "HRESCH",
}
PURPOSES: Mapping[str, Purpose] = {
    **{code: purpose for purpose, code in PURPOSE_CODES.items()},
    **{purpose.value.upper(): purpose for purpose in Purpose},
}
STATUS_TAG = "urn:medledger:record-status"
ROLE_SYSTEM = "urn:medledger:role"
CATEGORY_SYSTEM = "urn:medledger:record-category"
TX_TYPE_SYSTEM = "urn:medledger:tx-type"
LEDGER_EXTENSION = "urn:medledger:fhir:ledger"
VERIFY_EXTENSION = "urn:medledger:fhir:how-to-verify"
RESOURCE_TYPES_SYSTEM = "http://hl7.org/fhir/resource-types"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
CONSENT_IS_THE_PATIENTS = (
    "a consent must be signed by the patient or their delegate with their own keys: through"
    " the portal, or the CLI (`medledger consent grant` / `medledger consent revoke`) or the SDK"
    " with their own keystore; a system client (EHR, LIS) cannot grant, change or revoke"
    " consent, not even for a patient whose keys this node holds"
)
# HTTP methods that write, as SMART interactions.
WRITE_INTERACTIONS: Mapping[str, str] = {"POST": "c", "PUT": "u", "PATCH": "u", "DELETE": "d"}
READ_WORKERS = 32
REQUEST_WORKERS = 32
CACHE_LIMIT = 4096

TX_ACTIONS: Mapping[str, str] = {
    "record.put": "C",
    "record.put-many": "C",
    "record.amend": "U",
    "record.mark-error": "U",
    "record.erase": "D",
    "access.request": "R",
    "access.session": "R",
    "consent.grant": "C",
    "consent.revoke": "U",
    "delegate.add": "C",
    "delegate.remove": "D",
    "member.enroll": "C",
}


# --- plumbing ---------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: Json | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Caller:
    """The member a token acts as, with its SDK client, and the purpose of use of the request."""

    token: AccessToken
    client: RecordsClient
    purpose: Purpose
    prefer: Mapping[str, str]
    max_grants: int = 0  # new access requests this request may issue (0: no bound)
    grants: int = 0
    _member: Member | None = None
    _members: dict[str, Member | None] = field(default_factory=dict)
    _budget: threading.Lock = field(default_factory=threading.Lock)

    def reserve_grants(self, count: int) -> None:
        """Count `count` new access requests against the request's bound, or refuse (422
        too-costly) before any of them is issued. The entries of a batch share one bound."""
        with self._budget:
            if self.max_grants and self.grants + count > self.max_grants:
                raise too_costly(
                    f"this request would issue {self.grants + count} ledger access requests"
                    f" (one per record to decrypt, each audited on the patient's trail); at most"
                    f" {self.max_grants} are issued per request: narrow the search by patient"
                    " (patient=Patient/<id> or identifier=system|value) or _lastUpdated, or"
                    " ask for a smaller _count"
                )
            self.grants += count

    @property
    def member_id(self) -> str:
        return self.token.member

    def member(self) -> Member:
        if self._member is None:
            self._member = self.client.ledger.query("/member", self.token.member, Member)
        return self._member

    def lookup(self, member_id: str) -> Member | None:
        if member_id not in self._members:
            self._members[member_id] = self.client.member(member_id)
        return self._members[member_id]

    def may(self, resource_type: str, interaction: str) -> bool:
        return scope_permits(self.token.scopes, resource_type, interaction)

    @property
    def strict(self) -> bool:
        return self.prefer.get("handling") != "lenient"


@dataclass(frozen=True)
class Cached:
    resource: Json
    grant: Grant


class ReadCache:
    """Decrypted resources per (member, record, version, purpose), in memory only."""

    def __init__(self, limit: int = CACHE_LIMIT) -> None:
        self._items: OrderedDict[tuple[str, str, int, str], Cached] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, int, str]) -> Cached | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple[str, str, int, str], value: Cached) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._limit:
                self._items.popitem(last=False)

    def drop(self, key: tuple[str, str, int, str]) -> None:
        with self._lock:
            self._items.pop(key, None)


@dataclass
class ReadBatch:
    resources: dict[tuple[str, int], Json]
    withheld: int = 0
    failures: list[str] = field(default_factory=list)


def etag(version: int) -> str:
    return f'W/"{version}"'


def parse_etag(value: str) -> int:
    text = value.strip()
    text = text[2:] if text.startswith("W/") else text
    text = text.strip('"')
    if not text.isdigit():
        raise invalid(f'{value!r} is not a version ETag (W/"<version>")')
    return int(text)


def http_date(time_ns: int) -> str:
    return format_datetime(datetime.fromtimestamp(time_ns // 1_000_000_000, UTC), usegmt=True)


def parse_prefer(header: str | None) -> dict[str, str]:
    prefer: dict[str, str] = {}
    for part in (header or "").split(","):
        for item in part.split(";"):
            name, _, value = item.strip().partition("=")
            if name:
                prefer[name.strip().lower()] = value.strip().strip('"')
    return prefer


def parse_purpose(header: str | None) -> Purpose:
    """The purpose of use: an HL7 v3 ActReason code (TREAT, HPAYMT, HOPERAT, HRESCH), optionally
    as system|code, or the ledger's own name; treatment when absent."""
    if not header or not header.strip():
        return Purpose.TREATMENT
    code = header.strip().split("|")[-1].strip()
    purpose = PURPOSES.get(code.upper())
    if purpose is None:
        raise invalid(
            f"X-Purpose-Of-Use {header!r}: use one of {', '.join(PURPOSE_CODES.values())}"
        )
    return purpose


def member_reference(member_id: str, member: Member | None) -> str:
    """A FHIR reference for a ledger member, by role."""
    if member is None:
        return f"Device/{member_id}"
    if member.role is Role.PATIENT:
        return f"Patient/{member_id}"
    if member.role is Role.DELEGATE:
        return f"RelatedPerson/{member_id}"
    if member.role in SYSTEM_ROLES:
        return f"Device/{member_id}"
    if member.role in PRACTITIONER_ROLES or member.role is Role.ADMIN:
        return f"Practitioner/{member_id}"
    return f"Device/{member_id}"


def with_meta(resource: Mapping[str, Any], version: RecordVersion) -> Json:
    """The resource as the API serves it: id = record id, meta from the ledger."""
    out = dict(resource)
    out["id"] = version.record_id
    meta = dict(out.get("meta") or {})
    meta["versionId"] = str(version.version)
    meta["lastUpdated"] = rfc3339(version.time_ns)
    if version.status is RecordStatus.ENTERED_IN_ERROR:
        tags = [t for t in meta.get("tag", []) if t.get("system") != STATUS_TAG]
        tags.append(
            {
                "system": STATUS_TAG,
                "code": "entered-in-error",
                "display": version.status_reason or "entered in error",
            }
        )
        meta["tag"] = tags
    out["meta"] = meta
    return out


def strip_server_meta(resource: Json) -> Json:
    """The ledger, not the client, decides versionId and lastUpdated."""
    meta = resource.get("meta")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
        if isinstance(meta.get("tag"), list):
            meta["tag"] = [t for t in meta["tag"] if t.get("system") != STATUS_TAG] or None
            if meta["tag"] is None:
                del meta["tag"]
        if meta:
            resource["meta"] = meta
        else:
            del resource["meta"]
    return resource


def rewrite_references(value: Any, mapping: Mapping[str, str]) -> Any:
    """Replace every Reference.reference found in `mapping` (urn:uuid: fullUrls, etc.)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "reference" and isinstance(item, str) and item in mapping:
                out[key] = mapping[item]
            else:
                out[key] = rewrite_references(item, mapping)
        return out
    if isinstance(value, list):
        return [rewrite_references(item, mapping) for item in value]
    return value


def patient_element(resource_type: str) -> str:
    param = SEARCH_PARAMS.get(resource_type, {}).get("patient")
    return param.paths[0] if param is not None else "subject"


# Record types without a patient element: a resource of one is a record of the patient whose
# records in the same transaction refer to it (a Synthea or EHR Medication beside its
# MedicationRequest).
CONTEXT_BOUND_TYPES = frozenset({"Medication", "Provenance"})


def context_patient(plan_key: str, plans: Sequence[Mapping[str, Any]]) -> str:
    """The one patient whose other records in `plans` refer to `plan_key` (`Type/id`)."""
    patients = sorted(
        {
            str(plan["patient"])
            for plan in plans
            if plan.get("patient") and plan_key in set(references_in(plan["resource"]))
        }
    )
    if not patients:
        raise unbound(plan_key.split("/")[0])
    if len(patients) > 1:
        raise business_rule(
            f"{plan_key.split('/')[0]} is referred to by records of {len(patients)} patients;"
            " a record belongs to one patient: send one copy per patient"
        )
    return patients[0]


def unbound(resource_type: str) -> FhirError:
    return business_rule(
        f"{resource_type} is stored as a record of the patient whose records refer to it: send"
        " it in a transaction Bundle with a record that refers to it (MedicationRequest,"
        " MedicationAdministration, MedicationDispense, ...)"
    )


def references_in(value: Any) -> Iterable[str]:
    """Every Reference.reference string in a resource."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                yield item
            else:
                yield from references_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from references_in(item)


def in_entry(error: FhirError, position: int) -> FhirError:
    """An error about a resource, re-located into entry `position` of a Bundle."""
    where = f"Bundle.entry[{position}]"
    issues = []
    for item in error.issues:
        moved = {**item, "diagnostics": f"{where}: {item.get('diagnostics', '')}"}
        if item.get("expression"):
            moved["expression"] = [
                f"{where}.resource" + (f".{e.split('.', 1)[1]}" if "." in e else "")
                for e in item["expression"]
            ]
        issues.append(moved)
    return FhirError(error.status, error.code, f"{where}: {error.diagnostics}", issues=issues)


def ns_of(text: str, what: str) -> int:
    found = date_range(text)
    if found is None:
        raise invalid(f"{what} {text!r} is not a FHIR dateTime")
    return int(found.low.timestamp()) * 1_000_000_000 + found.low.microsecond * 1000


# --- the gateway ------------------------------------------------------------------------------


class FhirGateway:
    def __init__(self, ctx: FhirContext) -> None:
        if ctx.tokens.token_url != ctx.token_url:
            # A client assertion's aud must be this node's token endpoint as clients reach it:
            # the token service and the URLs the API hands out must agree on it.
            raise ValueError(
                f"the token service checks assertions for {ctx.tokens.token_url}, but this"
                f" node's FHIR token endpoint is {ctx.token_url}: build the TokenService with"
                " FhirContext.token_url (the public URL)"
            )
        self.ctx = ctx
        self.cache = ReadCache()
        # The latest session each member opened per (patient, purpose): reads of that patient's
        # records it covers need no new commit while a custodian would still release for it.
        self.sessions: dict[tuple[str, str, str], SessionGrant] = {}
        self._sessions_lock = threading.Lock()
        self.readers = ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="fhir-read")
        self.entries = ThreadPoolExecutor(4, thread_name_prefix="fhir-batch")
        # FHIR requests run here, not on the loop's default executor (min(32, cores + 4)
        # threads, shared with the portal and HL7): a request mostly waits for a commit, so
        # concurrent clients are not held to the number of cores.
        self.requests = ThreadPoolExecutor(REQUEST_WORKERS, thread_name_prefix="fhir-request")
        self.consent_patients: dict[str, str] = {}
        self.started = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    @property
    def base(self) -> str:
        return self.ctx.base_url

    @property
    def token_url(self) -> str:
        return self.ctx.tokens.token_url

    def close(self) -> None:
        self.requests.shutdown(wait=False, cancel_futures=True)
        self.entries.shutdown(wait=False, cancel_futures=True)
        self.readers.shutdown(wait=False, cancel_futures=True)

    def caller(self, token: AccessToken, purpose: Purpose, prefer: Mapping[str, str]) -> Caller:
        try:
            client = self.ctx.records_client(token.member)
        except CustodyError:
            raise forbidden(
                f"this node does not hold the keys of member {token.member}; use the node of"
                f" organization {token.organization}"
            ) from None
        return Caller(token, client, purpose, prefer, max_grants=self.ctx.max_search_grants)

    def refuse_scope(self, caller: Caller, resource_type: str, interaction: str) -> FhirError:
        reason = f"scope does not allow {interaction} on {resource_type}"
        self.ctx.audit.record(
            caller.token.client_id,
            "fhir.request",
            f"{resource_type}.{interaction}",
            "refused",
            reason,
        )
        return FhirError(403, "forbidden", reason)

    def require_scope(self, caller: Caller, resource_type: str, interaction: str) -> None:
        if not caller.may(resource_type, interaction):
            raise self.refuse_scope(caller, resource_type, interaction)

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
        futures: list[tuple[RecordVersion, Future[Json]]] = [
            (v, self.readers.submit(self.read_version, caller, v, consents, reserved=True))
            for v in versions
            if v.patient not in charts or v not in uncached
        ]
        for version, future in futures:
            try:
                batch.resources[(version.record_id, version.version)] = future.result()
            except AccessDenied:
                batch.withheld += 1
            except RecordErased:
                continue
            except ClientError as exc:
                batch.failures.append(f"{version.resource_type}/{version.record_id}: {exc}")
        for patient, chart_future in chart_reads.items():
            try:
                read = chart_future.result()
            except AccessDenied:
                batch.withheld += len(charts[patient])
                continue
            except ClientError as exc:
                batch.failures.extend(
                    f"{v.resource_type}/{v.record_id}: {exc}" for v in charts[patient]
                )
                continue
            for version in charts[patient]:
                answer = read[(version.record_id, version.version)]
                if isinstance(answer, AccessDenied):
                    batch.withheld += 1
                elif isinstance(answer, RecordErased):
                    continue
                elif isinstance(answer, ClientError):
                    batch.failures.append(f"{version.resource_type}/{version.record_id}: {answer}")
                else:
                    batch.resources[(version.record_id, version.version)] = copy.deepcopy(answer)
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

    # --- search ----------------------------------------------------------------------------

    def patients_for(self, caller: Caller, criteria: Sequence[Criterion]) -> set[str] | None:
        """The patients the patient/subject/identifier criteria name (AND of ORs), or None."""
        chosen: set[str] | None = None
        for criterion in criteria:
            found: set[str] = set()
            name = criterion.param.name
            if name == "identifier" or criterion.modifier == "identifier":
                if criterion.modifier not in ("", "identifier"):
                    raise invalid(f"{criterion.key} is not supported")
                for token in criterion.tokens():
                    patient = self.resolve_identifier(token)
                    if patient is not None:
                        found.add(patient)
            else:
                if criterion.modifier not in ("", "Patient"):
                    raise invalid(f"{criterion.key} is not supported")
                for value in criterion.values:
                    if reference_type(value) not in (None, "Patient"):
                        raise invalid(f"{name}: only Patient references are supported")
                    found.add(reference_id(value))
            chosen = found if chosen is None else chosen & found
        return chosen

    def resolve_identifier(
        self, token: Token, local: Mapping[tuple[str, str], str] | None = None
    ) -> str | None:
        """The patient an identifier names: first among the new patients of a transaction
        (`local`), then in this node's patient index; a bare value must name one patient."""
        if token.code is None:
            raise invalid("an identifier search needs a value")
        if not isinstance(token.code, str) or not isinstance(token.system, str | None):
            raise invalid("an identifier's system and value are strings")
        if local:
            if token.system:
                if (token.system, token.code) in local:
                    return local[(token.system, token.code)]
            else:
                named = {p for (_, value), p in local.items() if value == token.code}
                if len(named) == 1:
                    return named.pop()
        if token.system:
            return self.ctx.patients.resolve(token.system, token.code)
        return self.ctx.patients.resolve_any(token.code)

    def organization_patients(self, caller: Caller) -> list[str]:
        members = caller.client.ledger.query("/members", caller.token.organization, list[Member])
        return [m.id for m in members if m.role is Role.PATIENT]

    def candidates(self, caller: Caller, query: SearchQuery) -> list[RecordVersion]:
        """Latest versions of the records a search considers, from the ledger's indexes."""
        resource_type = query.resource_type
        patients = self.patients_for(caller, query.by(PATIENT))
        ids = [c for c in query.named("_id") if c.modifier == ""]
        found: list[RecordVersion] = []

        def consider(version: RecordVersion) -> None:
            if version.resource_type != resource_type or version.status is RecordStatus.ERASED:
                return
            found.append(version)
            if len(found) > self.ctx.max_search_candidates:
                raise too_costly(
                    f"this search would examine more than {self.ctx.max_search_candidates}"
                    f" {resource_type} records: narrow it by patient (patient=Patient/<id> or"
                    " identifier=system|value) or by _id"
                )

        if patients is None and ids:
            values = sorted({unescape(v) for v in ids[0].values})
            if len(values) > self.ctx.max_search_candidates:
                raise too_costly(
                    f"_id names {len(values)} records; at most"
                    f" {self.ctx.max_search_candidates} are examined per search"
                )
            for record_id in values:
                history = self.history(caller, record_id)
                if history is not None and not history.head.erased and history.versions:
                    consider(history.versions[-1])
        elif resource_type == "Patient" and patients is not None:
            for patient in sorted(patients):
                history = self.history(caller, patient)
                if history is not None and not history.head.erased and history.versions:
                    consider(history.versions[-1])
        else:
            own = patients is None
            for patient in sorted(
                patients if patients is not None else self.organization_patients(caller)
            ):
                for summary in caller.client.records_of(patient):
                    latest = summary.latest
                    if summary.head.erased or latest is None:
                        continue
                    if own and latest.author_organization != caller.token.organization:
                        continue
                    consider(latest)
        return found

    def search(self, caller: Caller, query: SearchQuery) -> Json:
        now = datetime.now(UTC)
        versions = [
            v
            for v in self.candidates(caller, query)
            if all(
                metadata_matches(c, v.record_id, v.time_ns, v.category, now)
                for c in query.by(METADATA)
            )
        ]
        consents: dict[str, list[Consent]] = {}
        allowed = [v for v in versions if self.may_read(caller, v, consents)]
        withheld = len(versions) - len(allowed)
        page: list[tuple[RecordVersion, Json]]
        if query.needs_content:
            batch = self.read_many(caller, allowed, consents)
            items = [
                (v, batch.resources[(v.record_id, v.version)])
                for v in allowed
                if (v.record_id, v.version) in batch.resources
                and query.matches(batch.resources[(v.record_id, v.version)], now)
            ]
            items = sort_items(
                items,
                query.sort,
                metadata=lambda i: (i[0].time_ns, i[0].record_id),
                content=lambda i: i[1],
            )
            total = len(items)
            page = items[query.offset : query.offset + query.count]
        else:
            query = self.paged(query)
            ordered = sort_items(
                allowed, query.sort, metadata=lambda v: (v.time_ns, v.record_id), content=None
            )
            total = len(ordered)
            chosen = ordered[query.offset : query.offset + query.count]
            batch = self.read_many(caller, chosen, consents)
            page = [
                (v, batch.resources[(v.record_id, v.version)])
                for v in chosen
                if (v.record_id, v.version) in batch.resources
            ]
        notes = self.notes(withheld + batch.withheld, batch.failures, query.ignored)
        entries = [
            self.entry(v.resource_type, v.record_id, with_meta(r, v), "match") for v, r in page
        ]
        return self.searchset(
            f"{self.base}/{query.resource_type}", query.link_params(), query, total, entries, notes
        )

    def paged(self, query: SearchQuery) -> SearchQuery:
        """A page whose records are chosen by metadata holds at most as many as one request
        may issue access requests for (a server may serve fewer than _count; the Bundle's
        links follow the page size it chose)."""
        if 0 < self.ctx.max_search_grants < query.count:
            return dataclasses.replace(query, count=self.ctx.max_search_grants)
        return query

    def notes(self, withheld: int, failures: Sequence[str], ignored: Sequence[str]) -> list[Json]:
        issues = []
        if withheld:
            issues.append(
                issue(
                    "warning",
                    "suppressed",
                    f"{withheld} matching record(s) left out: the ledger's access rules do not"
                    " let this caller read them (no consent covers them for this purpose)",
                )
            )
        issues.extend(issue("warning", "transient", f"could not be read: {f}") for f in failures)
        if ignored:
            issues.append(
                issue("warning", "not-supported", f"ignored parameters: {', '.join(ignored)}")
            )
        return issues

    def entry(self, resource_type: str, resource_id: str, resource: Json, mode: str) -> Json:
        return {
            "fullUrl": f"{self.base}/{resource_type}/{resource_id}",
            "resource": resource,
            "search": {"mode": mode},
        }

    def searchset(
        self,
        link_base: str,
        params: list[tuple[str, str]],
        query: SearchQuery,
        total: int,
        entries: list[Json],
        notes: list[Json],
    ) -> Json:
        def url(offset: int) -> str:
            return f"{link_base}?" + urlencode(
                [*params, ("_count", str(query.count)), ("_page", str(offset))]
            )

        links = [{"relation": "self", "url": url(query.offset)}]
        if query.count > 0:
            if query.offset + query.count < total:
                links.append({"relation": "next", "url": url(query.offset + query.count)})
            if query.offset > 0:
                links.append(
                    {"relation": "previous", "url": url(max(0, query.offset - query.count))}
                )
        bundle: Json = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "meta": {"lastUpdated": rfc3339(time.time_ns())},
            "type": "searchset",
            "total": total,
            "link": links,
            "entry": list(entries),
        }
        if notes:
            bundle["entry"].append(
                {"resource": operation_outcome(notes), "search": {"mode": "outcome"}}
            )
        if not bundle["entry"]:
            del bundle["entry"]
        return bundle

    # --- history ---------------------------------------------------------------------------

    def history_entry(self, version: RecordVersion, resource: Json | None) -> Json:
        first = version.version == 1
        entry: Json = {"fullUrl": f"{self.base}/{version.resource_type}/{version.record_id}"}
        if resource is not None:
            entry["resource"] = with_meta(resource, version)
        entry["request"] = {
            "method": "POST" if first else "PUT",
            "url": version.resource_type
            if first
            else f"{version.resource_type}/{version.record_id}",
        }
        entry["response"] = {
            "status": "201 Created" if first else "200 OK",
            "etag": etag(version.version),
            "lastModified": rfc3339(version.time_ns),
        }
        if resource is None:
            entry["response"]["status"] = "410 Gone"
        return entry

    def history_bundle(
        self,
        caller: Caller,
        versions: list[RecordVersion],
        link_base: str,
        params: Sequence[tuple[str, str]],
        strict: bool,
    ) -> Json:
        query = self.paged(
            parse_search("_history", [p for p in params if p[0] in ("_count", "_page")])
        )
        since = next((v for k, v in params if k == "_since"), None)
        unknown = [k for k, _ in params if k not in ("_count", "_page", "_since", "patient", "_id")]
        if unknown and strict:
            raise invalid(f"history supports _count, _page and _since, not {', '.join(unknown)}")
        if since is not None:
            low = ns_of(since, "_since")
            versions = [v for v in versions if v.time_ns >= low]
        ordered = sorted(versions, key=lambda v: (v.time_ns, v.version, v.record_id), reverse=True)
        consents: dict[str, list[Consent]] = {}
        readable = [
            v
            for v in ordered
            if v.status is RecordStatus.ERASED or self.may_read(caller, v, consents)
        ]
        withheld = len(ordered) - len(readable)
        chosen = readable[query.offset : query.offset + query.count]
        batch = self.read_many(
            caller, [v for v in chosen if v.status is not RecordStatus.ERASED], consents
        )
        entries = [
            self.history_entry(v, batch.resources.get((v.record_id, v.version)))
            for v in chosen
            if v.status is RecordStatus.ERASED or (v.record_id, v.version) in batch.resources
        ]
        bundle = self.searchset(
            link_base,
            [p for p in params if p[0] in ("_since", "patient", "_id")],
            query,
            len(readable),
            entries,
            self.notes(withheld + batch.withheld, batch.failures, ()),
        )
        bundle["type"] = "history"
        for entry in bundle.get("entry", []):
            entry.pop("search", None)
        return bundle

    def instance_history(
        self, caller: Caller, resource_type: str, record_id: str, params: list[tuple[str, str]]
    ) -> Json:
        history = self.record(caller, resource_type, record_id)
        denied_all = all(not self.may_read(caller, v, {}) for v in history.versions)
        if denied_all:
            # Let the ledger decide (and audit) the refusal.
            self.read_version(caller, history.versions[-1])
        return self.history_bundle(
            caller,
            list(history.versions),
            f"{self.base}/{resource_type}/{record_id}/_history",
            params,
            caller.strict,
        )

    def type_history(
        self, caller: Caller, resource_type: str, params: list[tuple[str, str]]
    ) -> Json:
        selection = [p for p in params if p[0] in ("patient", "_id")]
        query = parse_search(resource_type, selection)
        versions: list[RecordVersion] = []
        for latest in self.candidates(caller, query):
            history = self.history(caller, latest.record_id)
            if history is not None:
                versions.extend(history.versions)
        return self.history_bundle(
            caller, versions, f"{self.base}/{resource_type}/_history", params, caller.strict
        )

    # --- $everything -----------------------------------------------------------------------

    def everything(self, caller: Caller, patient_id: str, params: list[tuple[str, str]]) -> Json:
        query = self.paged(
            parse_search("$everything", [p for p in params if p[0] in ("_count", "_page")])
        )
        allowed_params = ("_count", "_page", "_since", "_type")
        unknown = [k for k, _ in params if k not in allowed_params]
        if unknown and caller.strict:
            raise invalid(f"$everything supports {', '.join(allowed_params)}, not {unknown}")
        if self.patient_member(caller, patient_id) is None:
            raise not_found(f"Patient/{patient_id} is not known")
        types = {t for k, v in params if k == "_type" for t in v.split(",") if t} or set(
            RECORD_TYPES
        )
        since = next((ns_of(v, "_since") for k, v in params if k == "_since"), None)
        versions = []
        for summary in caller.client.records_of(patient_id):
            latest = summary.latest
            if summary.head.erased or latest is None or latest.status is RecordStatus.ERASED:
                continue
            if latest.resource_type not in types or not caller.may(latest.resource_type, "r"):
                continue
            if since is not None and latest.time_ns < since:
                continue
            versions.append(latest)
        versions.sort(key=lambda v: (v.resource_type != "Patient", v.time_ns, v.record_id))
        consents: dict[str, list[Consent]] = {}
        allowed = [v for v in versions if self.may_read(caller, v, consents)]
        if versions and not allowed:
            # Nothing is readable: let the ledger decide (and audit) the refusal of the first.
            self.read_version(caller, versions[0])
        chosen = allowed[query.offset : query.offset + query.count]
        batch = self.read_many(caller, chosen, consents)
        entries = [
            self.entry(v.resource_type, v.record_id, with_meta(batch.resources[key], v), "match")
            for v in chosen
            if (key := (v.record_id, v.version)) in batch.resources
        ]
        notes = self.notes(len(versions) - len(allowed) + batch.withheld, batch.failures, ())
        kept = [(k, v) for k, v in params if k in ("_since", "_type")]
        return self.searchset(
            f"{self.base}/Patient/{patient_id}/$everything",
            kept,
            query,
            len(allowed),
            entries,
            notes,
        )

    # --- writing ---------------------------------------------------------------------------

    def incoming(self, resource_type: str, body: Any) -> Json:
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object (a FHIR resource)")
        if body.get("resourceType") != resource_type:
            raise invalid(
                f"the body is a {body.get('resourceType')!r}, not a {resource_type}",
                ["resourceType"],
            )
        if resource_type not in RECORD_TYPES and resource_type not in DIRECTORY_TYPES:
            raise not_supported(f"{resource_type} cannot be stored here", 404)
        return strip_server_meta(copy.deepcopy(body))

    def resolve_patient(
        self,
        caller: Caller,
        resource: Json,
        pending: Iterable[str] = (),
        local: Mapping[tuple[str, str], str] | None = None,
    ) -> str:
        """The enrolled patient a clinical resource is about; its reference is rewritten to
        `Patient/<ledger id>` (a conditional `Patient?identifier=` or a logical identifier
        reference is resolved through the transaction's new patients and this node's patient
        index)."""
        resource_type = resource["resourceType"]
        element = patient_element(resource_type)
        ref = resource.get(element)
        where = f"{resource_type}.{element}"
        if not isinstance(ref, dict):
            raise business_rule(f"{where} must reference the patient (Patient/<id>)")
        reference = ref.get("reference")
        patient: str | None
        if isinstance(reference, str) and reference:
            if reference.startswith("Patient?"):
                patient = self.conditional_patient(reference.split("?", 1)[1], local)
                if patient is None:
                    raise business_rule(f"{where}: {reference} names no patient this node knows")
            else:
                if reference.startswith(self.base + "/"):
                    reference = reference[len(self.base) + 1 :]
                if reference_type(reference) != "Patient" or reference.count("/") != 1:
                    raise business_rule(f"{where} must be a Patient/<id> reference")
                patient = reference_id(reference)
        elif isinstance(ref.get("identifier"), dict):
            identifier = ref["identifier"]
            token = Token(identifier.get("system"), identifier.get("value"))
            patient = self.resolve_identifier(token, local) if token.code else None
            if patient is None:
                raise business_rule(f"{where}: the identifier names no patient this node knows")
        else:
            raise business_rule(f"{where} must reference the patient (Patient/<id>)")
        if patient not in set(pending) and self.patient_member(caller, patient) is None:
            raise business_rule(
                f"{where}: Patient/{patient} is not a patient enrolled on the ledger"
            )
        ref["reference"] = f"Patient/{patient}"
        return patient

    def conditional_patient(
        self, query: Any, local: Mapping[tuple[str, str], str] | None = None
    ) -> str | None:
        """`identifier=system|value` → the patient it names."""
        if not isinstance(query, str):
            raise invalid("a conditional create's condition is a string: identifier=system|value")
        pairs = parse_qsl(query, keep_blank_values=True)
        if len(pairs) != 1 or pairs[0][0] != "identifier":
            raise invalid("conditional patient references support identifier=system|value only")
        try:
            token = parse_token(pairs[0][1])
        except SearchError as exc:
            raise invalid(str(exc)) from None
        return self.resolve_identifier(token, local)

    def identifiers(self, resource: Json) -> list[tuple[str, str]]:
        found = []
        for identifier in resource.get("identifier") or []:
            if (
                isinstance(identifier, dict)
                and isinstance(identifier.get("system"), str)
                and isinstance(identifier.get("value"), str)
            ):
                found.append((identifier["system"], identifier["value"]))
        return found

    def check_identifiers(self, resource: Json, patient: str | None) -> None:
        for system, value in self.identifiers(resource):
            existing = self.ctx.patients.resolve(system, value)
            if existing is not None and existing != patient:
                raise FhirError(
                    409,
                    "duplicate",
                    f"identifier {system}|{value} already names Patient/{existing}",
                )

    def link_identifiers(self, resource: Json, patient: str) -> None:
        for system, value in self.identifiers(resource):
            try:
                self.ctx.patients.link(system, value, patient)
            except ValueError as exc:
                raise FhirError(409, "duplicate", str(exc)) from None

    def require_registration_desk(self, caller: Caller) -> None:
        if caller.member().role is not Role.EHR:
            raise forbidden(
                f"member {caller.member_id} is {caller.member().role}: only an EHR client"
                " enrolls patients"
            )

    def new_patient_keys(self, caller: Caller) -> KeyPair:
        """Keys for a new patient, held in this node's custody, enrolled by the EHR member."""
        keys = self.ctx.custody.create(f"patient-{uuid.uuid4()}")
        body = EnrollMember(keys.verify_key, keys.encryption_key, Role.PATIENT)
        caller.client.ledger.submit(
            caller.client.keys, "member.enroll", body, sender=caller.client.member_id
        )
        return keys

    def written(self, caller: Caller, record_id: str, version: int) -> RecordVersion:
        history = caller.client.history(record_id)
        return next(v for v in history.versions if v.version == version)

    def write_reply(
        self, caller: Caller, status: int, resource: Json, version: RecordVersion
    ) -> Reply:
        reply = self.resource_reply(status, with_meta(resource, version), version, location=True)
        preference = caller.prefer.get("return", "representation")
        if preference == "minimal":
            reply.body = None
        elif preference.lower() == "operationoutcome":
            reply.body = information(
                f"{version.resource_type}/{version.record_id} version {version.version} committed"
                f" at height {version.height}"
            )
        return reply

    def create(
        self, caller: Caller, resource_type: str, body: Any, if_none_exist: str | None
    ) -> Reply:
        resource = self.incoming(resource_type, body)
        validate_resource(resource)
        if is_directory_data(resource_type, resource):
            return self.directory_create(caller, resource_type, resource, if_none_exist)
        if resource_type == "Patient":
            if if_none_exist:
                existing = self.conditional_patient(if_none_exist)
                if existing is not None:
                    return self.existing_patient(caller, existing)
            self.check_identifiers(resource, None)
            self.require_registration_desk(caller)
            keys = self.new_patient_keys(caller)
            patient = record_id = keys.member_id
            resource["id"] = record_id
            stored = validate_resource(resource).resource
            caller.client.put(stored, patient, record_id)
            self.link_identifiers(resource, patient)
        else:
            if if_none_exist:
                raise not_supported("conditional create is supported for Patient only", 400)
            if resource_type == "Provenance":
                patient = self.provenance_patient(caller, resource, [])
            else:
                patient = self.resolve_patient(caller, resource)
            record_id = str(uuid.uuid4())
            resource["id"] = record_id
            stored = validate_resource(resource).resource
            caller.client.put(stored, patient, record_id)
        version = self.written(caller, record_id, 1)
        return self.write_reply(caller, 201, stored, version)

    def existing_patient(self, caller: Caller, patient: str) -> Reply:
        """A conditional create that matched: 200 with the Location of the patient it found.
        The Patient itself is returned only to a token that may read it (and is then read
        through the ledger as any read); with the create scope alone, the answer names the
        patient and says no more."""
        preference = caller.prefer.get("return", "representation").lower()
        history = self.record(caller, "Patient", patient)
        version = next(v for v in history.versions if v.version == history.head.latest)
        if preference == "representation" and caller.may("Patient", "r"):
            resource = self.read_version(caller, version)
            return self.resource_reply(200, with_meta(resource, version), version, location=True)
        reply = self.resource_reply(200, {}, version, location=True)
        reply.body = (
            None
            if preference == "minimal"
            else information(
                f"Patient/{patient} already has this identifier: nothing was created (the"
                " Patient is returned only to a token that may read it)"
            )
        )
        return reply

    def update(
        self, caller: Caller, resource_type: str, record_id: str, body: Any, if_match: str | None
    ) -> Reply:
        resource = self.incoming(resource_type, body)
        if resource.get("id") != record_id:
            raise invalid(f"the resource's id must be {record_id!r}, as in the URL", ["id"])
        validate_resource(resource)
        if self.in_directory(caller, resource_type, record_id):
            return self.directory_update(caller, resource_type, record_id, resource, if_match)
        history = self.history(caller, record_id)
        if history is None or history.versions[0].resource_type != resource_type:
            raise not_supported(
                f"{resource_type}/{record_id} does not exist, and update as create is not"
                " supported: POST to create (the server assigns the id)"
            )
        if history.head.erased:
            raise FhirError(410, "deleted", f"{resource_type}/{record_id} was erased")
        expected = parse_etag(if_match) if if_match else None
        if expected is not None and expected != history.head.latest:
            raise FhirError(
                412,
                "conflict",
                f"{resource_type}/{record_id} is at version {history.head.latest}, not {expected}",
            )
        if resource_type == "Patient":
            self.check_identifiers(resource, record_id)
        elif resource_type not in CONTEXT_BOUND_TYPES:  # stays with its patient
            patient = self.resolve_patient(caller, resource)
            if patient != history.head.patient:
                raise business_rule("a record cannot move to another patient")
        stored = validate_resource(resource).resource
        try:
            written = caller.client.amend(record_id, stored, previous=expected)
        except TxRejected as exc:
            if exc.code == Code.CONFLICT and expected is not None and "is at version" in exc.log:
                raise FhirError(412, "conflict", f"ledger: {exc.log}") from None
            raise
        if resource_type == "Patient":
            self.link_identifiers(resource, record_id)
        version = self.written(caller, record_id, written.version)
        return self.write_reply(caller, 200, stored, version)

    # --- the shared directory ---------------------------------------------------------------

    def directory(self, caller: Caller) -> Directory:
        return Directory(caller.client.ledger)

    def is_record(self, caller: Caller, resource_type: str, resource_id: str) -> bool:
        history = self.history(caller, resource_id)
        return history is not None and history.versions[0].resource_type == resource_type

    def provenance_patient(self, caller: Caller, resource: Json, plans: Sequence[Json]) -> str:
        """The one patient a Provenance's targets are about: a target Patient, or the
        patient of each target record (one of the transaction's, or a committed one)."""
        planned = {f"{p['type']}/{p['id']}": p.get("patient") for p in plans}
        patients: set[str] = set()
        for target in resource.get("target") or []:
            reference = target.get("reference") if isinstance(target, dict) else None
            if not isinstance(reference, str):
                continue
            if reference.startswith(self.base + "/"):
                reference = reference[len(self.base) + 1 :]
            kind, _, rest = reference.partition("/")
            record_id = rest.split("/", 1)[0]
            if f"{kind}/{record_id}" in planned:
                patient = planned[f"{kind}/{record_id}"]
                if patient:
                    patients.add(str(patient))
                continue
            if kind == "Patient" and self.patient_member(caller, record_id) is not None:
                patients.add(record_id)
                continue
            history = self.history(caller, record_id) if record_id else None
            if history is not None and history.versions[0].resource_type == kind:
                patients.add(history.head.patient)
        if len(patients) != 1:
            raise business_rule(
                "Provenance.target must name records of one patient this node knows"
                f" ({len(patients)} found): a Provenance is stored with that patient's records"
            )
        return patients.pop()

    def in_directory(self, caller: Caller, resource_type: str, resource_id: str) -> bool:
        """Whether `resource_type/resource_id` is (or would be) a directory entry: always for
        the directory types; for Medication and Device when no record has the id."""
        if resource_type in DIRECTORY_ONLY_TYPES:
            return True
        if resource_type not in DIRECTORY_TYPES:
            return False
        history = self.history(caller, resource_id)
        return history is None or history.versions[0].resource_type != resource_type

    def entry_reply(self, status: int, entry: DirectoryEntry, *, location: bool = False) -> Reply:
        headers = {"ETag": etag(entry.version), "Last-Modified": http_date(entry.time_ns)}
        if location:
            headers["Location"] = (
                f"{self.base}/{entry.resource_type}/{entry.entry_id}/_history/{entry.version}"
            )
        return Reply(status, served(entry), headers)

    def entry_written(self, caller: Caller, status: int, entry: DirectoryEntry) -> Reply:
        reply = self.entry_reply(status, entry, location=True)
        preference = caller.prefer.get("return", "representation")
        if preference == "minimal":
            reply.body = None
        elif preference.lower() == "operationoutcome":
            reply.body = information(
                f"{entry.resource_type}/{entry.entry_id} version {entry.version} committed at"
                f" height {entry.height}"
            )
        return reply

    def read_version_any(
        self, caller: Caller, resource_type: str, resource_id: str, vid: int
    ) -> Reply:
        if self.in_directory(caller, resource_type, resource_id):
            entry = read_entry(self.directory(caller), resource_type, resource_id, vid)
            return self.entry_reply(200, entry)
        return self.read(caller, resource_type, resource_id, vid)

    def directory_create(
        self, caller: Caller, resource_type: str, resource: Json, if_none_exist: str | None
    ) -> Reply:
        directory = self.directory(caller)
        if if_none_exist:
            existing = existing_entry(directory, resource_type, if_none_exist)
            if existing is not None:
                return self.entry_written(caller, 200, existing)
        resource = resolve_references(resource, directory, {})
        entry_id = str(uuid.uuid4())
        directory.write(
            caller.client.keys, caller.client.member_id, [new_write(resource, entry_id)]
        )
        return self.entry_written(caller, 201, read_entry(directory, resource_type, entry_id))

    def directory_update(
        self,
        caller: Caller,
        resource_type: str,
        entry_id: str,
        resource: Json,
        if_match: str | None,
    ) -> Reply:
        directory = self.directory(caller)
        found = directory.entry(resource_type, entry_id)
        if found is None:
            raise not_supported(
                f"{resource_type}/{entry_id} does not exist, and update as create is not"
                " supported: POST to create (the server assigns the id)"
            )
        current = found.latest.version
        expected = parse_etag(if_match) if if_match else None
        if expected is not None and expected != current:
            raise FhirError(
                412,
                "conflict",
                f"{resource_type}/{entry_id} is at version {current}, not {expected}",
            )
        resource = resolve_references(resource, directory, {})
        write = new_write(resource, entry_id, current)
        directory.write(caller.client.keys, caller.client.member_id, [write])
        return self.entry_written(caller, 200, read_entry(directory, resource_type, entry_id))

    def directory_search(self, caller: Caller, query: SearchQuery) -> Json:
        matches = search_entries(self.directory(caller), query)
        page = matches[query.offset : query.offset + query.count]
        entries = [self.entry(e.resource_type, e.entry_id, served(e), "match") for e in page]
        notes = self.notes(0, (), query.ignored)
        return self.searchset(
            f"{self.base}/{query.resource_type}",
            query.link_params(),
            query,
            len(matches),
            entries,
            notes,
        )

    # --- delete ----------------------------------------------------------------------------

    def delete(self, caller: Caller, resource_type: str, resource_id: str) -> Reply:
        """FHIR DELETE in the ledger's terms: nothing is removed. A record's latest version
        is marked entered-in-error (record.mark-error: the author's organization only); a
        directory entry gets an entered-in-error version (its organization only) and its
        identifiers are released. Both stay readable in their history, flagged by meta.tag.
        Deleting what is already entered-in-error succeeds and changes nothing, as FHIR
        allows."""
        reason = f"deleted through FHIR DELETE by client {caller.token.client_id}"
        if self.in_directory(caller, resource_type, resource_id):
            directory = self.directory(caller)
            latest = read_entry(directory, resource_type, resource_id)
            if latest.status is EntryStatus.ACTIVE:
                retire = DirectoryWrite(
                    resource_type, resource_id, latest.resource, latest.version, retire=True
                )
                directory.write(caller.client.keys, caller.client.member_id, [retire])
            return Reply(200, information(f"{resource_type}/{resource_id} is entered-in-error"))
        history = self.record(caller, resource_type, resource_id)
        if history.head.erased:
            raise FhirError(410, "deleted", f"{resource_type}/{resource_id} was erased")
        latest_version = next(v for v in history.versions if v.version == history.head.latest)
        if latest_version.status is not RecordStatus.ENTERED_IN_ERROR:
            caller.client.mark_entered_in_error(resource_id, latest_version.version, reason)
        return Reply(
            200,
            information(
                f"{resource_type}/{resource_id} version {latest_version.version} is marked"
                " entered-in-error (records are never removed; the patient may erase one)"
            ),
        )

    # --- transaction and batch -------------------------------------------------------------

    def transaction(self, caller: Caller, bundle: Json) -> Json:
        """All entries validated, references to the bundle's fullUrls resolved, new patients
        enrolled, then every record committed in one `record.put-many` (all or none)."""
        entries = bundle.get("entry") or []
        if not isinstance(entries, list) or not entries:
            raise invalid("a transaction needs at least one entry")
        if len(entries) > MAX_RECORDS_PER_TX:
            raise FhirError(
                413, "too-costly", f"a transaction holds at most {MAX_RECORDS_PER_TX} entries"
            )
        mapping: dict[str, str] = {}
        plans: list[Json] = []
        directory = self.directory(caller)
        for position, entry in enumerate(entries):
            where = f"Bundle.entry[{position}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
                raise invalid(f"{where} needs a request", [where])
            request = entry["request"]
            method = str(request.get("method", "")).upper()
            url = str(request.get("url", "")).strip("/")
            resource = entry.get("resource")
            full_url = entry.get("fullUrl")
            if url.split("/")[0].split("?")[0] == "Consent" and method in WRITE_INTERACTIONS:
                refusal = self.refuse_consent_write(
                    caller.token.client_id, WRITE_INTERACTIONS[method]
                )
                raise in_entry(refusal, position)
            if method == "POST":
                resource_type = url.split("?")[0]
                self.require_scope(caller, resource_type, "c")
                resource = self.incoming(resource_type, resource)
                plan: Json = {"method": "POST", "type": resource_type, "resource": resource}
                condition = request.get("ifNoneExist")
                if resource_type in DIRECTORY_TYPES and (
                    resource_type != "Device" or is_directory_data(resource_type, resource)
                ):
                    if resource_type != "Medication":  # bound to a patient by context, maybe
                        plan["directory"] = True
                    found = (
                        existing_entry(directory, resource_type, str(condition))
                        if condition
                        else None
                    )
                    if found is not None:
                        plan.update(id=found.entry_id, existing=True, directory=True)
                    else:
                        plan["id"] = str(uuid.uuid4())
                elif resource_type == "Patient":
                    condition = request.get("ifNoneExist")
                    existing = self.conditional_patient(condition) if condition else None
                    if existing is not None:
                        plan.update(id=existing, existing=True)
                    else:
                        plan.update(id=f"pending-{position}", pending=True)
                else:
                    plan["id"] = str(uuid.uuid4())
            elif method == "PUT":
                resource_type, _, record_id = url.partition("/")
                self.require_scope(caller, resource_type, "u")
                resource = self.incoming(resource_type, resource)
                if resource.get("id") != record_id:
                    raise invalid(f"{where}: the resource's id must be {record_id!r}", [where])
                if self.in_directory(caller, resource_type, record_id):
                    current = read_entry(directory, resource_type, record_id)
                    if request.get("ifMatch") and parse_etag(str(request["ifMatch"])) != (
                        current.version
                    ):
                        raise FhirError(
                            412, "conflict", f"{where}: {url} is at version {current.version}"
                        )
                    plan = {
                        "method": "PUT",
                        "type": resource_type,
                        "resource": resource,
                        "id": record_id,
                        "previous": current.version,
                        "directory": True,
                    }
                    if isinstance(full_url, str) and full_url:
                        mapping[full_url] = f"{resource_type}/{record_id}"
                    plans.append(plan)
                    continue
                history = self.history(caller, record_id)
                if history is None or history.versions[0].resource_type != resource_type:
                    raise not_supported(
                        f"{where}: {url} does not exist (update as create is not supported)"
                    )
                if history.head.erased:
                    raise FhirError(410, "deleted", f"{where}: {url} was erased")
                latest = history.head.latest
                if request.get("ifMatch") and parse_etag(str(request["ifMatch"])) != latest:
                    raise FhirError(412, "conflict", f"{where}: {url} is at version {latest}")
                plan = {
                    "method": "PUT",
                    "type": resource_type,
                    "resource": resource,
                    "id": record_id,
                    "previous": latest,
                    "patient": history.head.patient,
                }
            else:
                raise invalid(f"{where}: a transaction here takes POST and PUT entries", [where])
            if isinstance(full_url, str) and full_url:
                mapping[full_url] = f"{plan['type']}/{plan['id']}"
            plans.append(plan)

        pending = {p["id"] for p in plans if p.get("pending")}
        local: dict[tuple[str, str], str] = {}
        for position, plan in enumerate(plans):
            if plan.get("pending"):
                for identifier in self.identifiers(plan["resource"]):
                    if identifier in local:
                        raise in_entry(
                            FhirError(
                                409,
                                "duplicate",
                                f"identifier {'|'.join(identifier)} names two new patients",
                            ),
                            position,
                        )
                    local[identifier] = plan["id"]
        if pending:
            self.require_registration_desk(caller)
        # Conditional references name the transaction's new directory entries first.
        named: dict[tuple[str, str], str] = {}
        for plan in plans:
            if plan["type"] in DIRECTORY_TYPES and not plan.get("existing"):
                for system_value in identifiers_of(plan["resource"]):
                    named.setdefault((plan["type"], system_value), plan["id"])
        for position, plan in enumerate(plans):
            plan["resource"] = resolve_references(
                rewrite_references(plan["resource"], mapping), directory, named
            )
            resource = plan["resource"]
            try:
                if plan.get("directory"):
                    resource["id"] = plan["id"]
                elif plan["type"] == "Patient":
                    resource["id"] = plan["id"]
                    self.check_identifiers(resource, None if plan.get("pending") else plan["id"])
                    plan["patient"] = plan["id"]
                elif plan["type"] in CONTEXT_BOUND_TYPES:
                    if plan["method"] == "POST":
                        resource["id"] = plan["id"]
                        plan["context_bound"] = True  # its patient is decided below
                else:
                    if plan["method"] == "POST":
                        resource["id"] = plan["id"]
                    patient = self.resolve_patient(caller, resource, pending, local)
                    if plan["method"] == "PUT" and patient != plan["patient"]:
                        raise business_rule("a record cannot move to another patient")
                    plan["patient"] = patient
                validate_resource(resource)
            except FhirValidationError as exc:
                raise in_entry(from_validation(exc), position) from None
            except FhirError as exc:
                raise in_entry(exc, position) from None
        for position, plan in enumerate(plans):
            if plan.get("context_bound") and plan["type"] == "Provenance":
                try:
                    plan["patient"] = self.provenance_patient(caller, plan["resource"], plans)
                except FhirError as exc:
                    raise in_entry(exc, position) from None
            elif plan.get("context_bound"):
                key = f"{plan['type']}/{plan['id']}"
                if not any(
                    p.get("patient") and key in set(references_in(p["resource"])) for p in plans
                ):
                    plan["directory"] = True  # no patient's record is about it
                    continue
                try:
                    plan["patient"] = context_patient(key, plans)
                except FhirError as exc:
                    raise in_entry(exc, position) from None

        # Enroll the new patients, then put their real ids everywhere.
        enrolled: dict[str, str] = {}
        for plan in plans:
            if plan.get("pending"):
                enrolled[plan["id"]] = self.new_patient_keys(caller).member_id
        if enrolled:
            renames = {f"Patient/{old}": f"Patient/{new}" for old, new in enrolled.items()}
            for plan in plans:
                plan["resource"] = rewrite_references(plan["resource"], renames)
                for key in ("id", "patient"):
                    if key in plan:  # a directory entry has no patient
                        plan[key] = enrolled.get(plan[key], plan[key])
                if plan["type"] == "Patient":
                    plan["resource"]["id"] = plan["id"]

        # Directory entries first (shared reference data, in their own directory.put), then
        # the records in one record.put-many.
        entry_writes = [
            new_write(p["resource"], p["id"], p.get("previous", 0))
            for p in plans
            if p.get("directory") and not p.get("existing")
        ]
        if entry_writes:
            directory.write(caller.client.keys, caller.client.member_id, entry_writes)
        writes = [
            RecordWrite(
                validate_resource(p["resource"]).resource,
                p["patient"],
                p["id"],
                p.get("previous", 0),
            )
            for p in plans
            if not p.get("existing") and not p.get("directory")
        ]
        done = caller.client.put_many(writes) if writes else []
        for plan in plans:
            if plan["type"] == "Patient" and not plan.get("existing"):
                self.link_identifiers(plan["resource"], plan["id"])
        versions = {w.record_id: self.written(caller, w.record_id, w.version) for w in done}
        results = []
        for plan in plans:
            if plan.get("directory"):
                entry = read_entry(directory, plan["type"], plan["id"])
                status = 200 if plan.get("existing") or plan["method"] == "PUT" else 201
                results.append(
                    {
                        "fullUrl": f"{self.base}/{plan['type']}/{plan['id']}",
                        "response": {
                            "status": status_line(status),
                            "location": f"{plan['type']}/{plan['id']}/_history/{entry.version}",
                            "etag": etag(entry.version),
                            "lastModified": rfc3339(entry.time_ns),
                        },
                    }
                )
                continue
            if plan.get("existing"):
                history = caller.client.history(plan["id"])
                version = history.versions[-1]
                status = 200
            else:
                version = versions[plan["id"]]
                status = 201 if plan["method"] == "POST" else 200
            results.append(
                {
                    "fullUrl": f"{self.base}/{plan['type']}/{plan['id']}",
                    "response": {
                        "status": status_line(status),
                        "location": f"{plan['type']}/{plan['id']}/_history/{version.version}",
                        "etag": etag(version.version),
                        "lastModified": rfc3339(version.time_ns),
                    },
                }
            )
        return {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "transaction-response",
            "entry": results,
        }

    def batch(self, caller: Caller, bundle: Json) -> Json:
        """Each entry on its own, with its own response status."""
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            raise invalid("Bundle.entry must be a list")
        if len(entries) > MAX_RECORDS_PER_TX:
            raise FhirError(
                413, "too-costly", f"a batch holds at most {MAX_RECORDS_PER_TX} entries"
            )
        futures = [self.entries.submit(self.batch_entry, caller, e) for e in entries]
        results = []
        for future in futures:
            try:
                reply = future.result()
            except FhirError as exc:
                results.append({"response": {"status": exc.status_line, "outcome": exc.outcome}})
                continue
            response: Json = {"status": status_line(reply.status)}
            if "Location" in reply.headers:
                response["location"] = reply.headers["Location"].removeprefix(self.base + "/")
            if "ETag" in reply.headers:
                response["etag"] = reply.headers["ETag"]
            if (
                reply.body is not None
                and "meta" in reply.body
                and "lastUpdated" in reply.body["meta"]
            ):
                response["lastModified"] = reply.body["meta"]["lastUpdated"]
            result: Json = {"response": response}
            if reply.body is not None:
                result["resource"] = reply.body
            results.append(result)
        return {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "batch-response",
            "entry": results,
        }

    def batch_entry(self, caller: Caller, entry: Any) -> Reply:
        try:
            return self._batch_entry(caller, entry)
        except FhirValidationError as exc:
            raise from_validation(exc) from None
        except SearchError as exc:
            raise invalid(str(exc)) from None
        except ClientError as exc:
            raise from_client(exc) from None

    def _batch_entry(self, caller: Caller, entry: Any) -> Reply:
        if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
            raise invalid("a batch entry needs a request")
        request = entry["request"]
        method = str(request.get("method", "")).upper()
        parts = urlsplit(str(request.get("url", "")))
        path = parts.path.strip("/")
        if path.startswith(self.base.split("://", 1)[-1].split("/", 1)[-1] + "/"):
            path = path.split("/", 1)[1]
        segments = [s for s in path.split("/") if s]
        params = parse_qsl(parts.query, keep_blank_values=True)
        if not segments:
            raise invalid("a batch entry's request.url names a resource type")
        resource_type = segments[0]
        known = resource_type in RESOURCES
        if not known:
            raise not_supported(f"{resource_type} is not supported", 404)
        if method == "GET":
            if len(segments) == 1:
                self.require_scope(caller, resource_type, "s")
                return Reply(200, self.search_type(caller, resource_type, params))
            if len(segments) == 3 and segments[2] == "$everything" and resource_type == "Patient":
                self.require_scope(caller, "Patient", "r")
                return Reply(200, self.everything(caller, segments[1], params))
            self.require_scope(caller, resource_type, "r")
            if len(segments) == 2:
                return self.read_any(caller, resource_type, segments[1])
            if len(segments) == 4 and segments[2] == "_history" and segments[3].isdigit():
                return self.read(caller, resource_type, segments[1], int(segments[3]))
            if len(segments) == 3 and segments[2] == "_history":
                return Reply(200, self.instance_history(caller, resource_type, segments[1], params))
            raise invalid(f"unsupported batch GET {request.get('url')!r}")
        if resource_type == "Consent" and method in WRITE_INTERACTIONS:
            raise self.refuse_consent_write(caller.token.client_id, WRITE_INTERACTIONS[method])
        if method == "POST" and len(segments) == 1:
            self.require_scope(caller, resource_type, "c")
            return self.create(
                caller, resource_type, entry.get("resource"), request.get("ifNoneExist")
            )
        if method == "PUT" and len(segments) == 2:
            self.require_scope(caller, resource_type, "u")
            return self.update(
                caller, resource_type, segments[1], entry.get("resource"), request.get("ifMatch")
            )
        raise not_supported(f"{method} {request.get('url')!r} is not supported in a batch")

    def read_any(self, caller: Caller, resource_type: str, resource_id: str) -> Reply:
        if resource_type == "Consent":
            return Reply(200, self.consent_read(caller, resource_id))
        if resource_type == "Provenance" and not self.is_record(caller, "Provenance", resource_id):
            return Reply(200, self.provenance_read(caller, resource_id))
        if self.in_directory(caller, resource_type, resource_id):
            entry = read_entry(self.directory(caller), resource_type, resource_id)
            return self.entry_reply(200, entry)
        if resource_type not in RECORD_TYPES:
            raise not_supported(f"read is not supported on {resource_type}")
        return self.read(caller, resource_type, resource_id)

    def search_type(
        self, caller: Caller, resource_type: str, params: list[tuple[str, str]]
    ) -> Json:
        if resource_type == "Consent":
            return self.consent_search(caller, params)
        if resource_type == "AuditEvent":
            return self.audit_search(caller, params)
        if resource_type == "Provenance":
            return self.provenance_search(caller, params)
        if resource_type not in RECORD_TYPES and resource_type not in DIRECTORY_TYPES:
            raise not_supported(f"search is not supported on {resource_type}", 404)
        try:
            params, inclusions = split_inclusions(resource_type, params)
            query = parse_search(resource_type, params, strict=caller.strict)
        except SearchError as exc:
            raise invalid(str(exc)) from None
        found = None
        if resource_type in DIRECTORY_TYPES and not query.by(PATIENT):
            found = self.directory_search(caller, query)
            # A Medication or Device found by _id may be a patient's record instead.
            if not (resource_type in DIRECTORY_ONLY_TYPES or found["total"]) and query.named("_id"):
                found = None
        bundle = found if found is not None else self.search(caller, query)
        return self.with_inclusions(caller, bundle, inclusions) if inclusions else bundle

    def with_inclusions(self, caller: Caller, bundle: Json, inclusions: Inclusions) -> Json:
        """`bundle` with the resources its matches' `_include`s name and, for
        `_revinclude=Provenance:target`, the ledger's Provenance of each matched record."""
        entries = bundle.get("entry", [])
        matches = [e["resource"] for e in entries if e["search"]["mode"] == "match"]
        extra: list[Json] = []
        left_out: list[str] = []
        for reference in referenced(matches, inclusions.includes):
            kind, _, resource_id = reference.partition("/")
            try:
                reply = self.read_any(caller, kind, resource_id)
            except (FhirError, ClientError) as exc:
                left_out.append(f"{reference} ({exc})")
                continue
            if reply.body is not None:
                extra.append(self.entry(kind, resource_id, reply.body, "include"))
        if inclusions.provenance:
            for resource in matches:
                if self.in_directory(caller, resource["resourceType"], resource["id"]):
                    continue
                history = self.history(caller, resource["id"])
                if history is None:
                    continue
                latest = next(v for v in history.versions if v.version == history.head.latest)
                provenance = self.provenance(caller, latest)
                extra.append(self.entry("Provenance", provenance["id"], provenance, "include"))
        outcome = [e for e in entries if e["search"]["mode"] == "outcome"]
        if left_out:
            note = issue(
                "warning",
                "suppressed",
                f"{len(left_out)} included resource(s) left out: {'; '.join(left_out)[:2000]}",
            )
            if outcome:
                outcome[0]["resource"]["issue"].append(note)
            else:
                outcome = [{"resource": operation_outcome([note]), "search": {"mode": "outcome"}}]
        merged = [e for e in entries if e["search"]["mode"] == "match"] + extra + outcome
        if merged:
            bundle["entry"] = merged
        return bundle

    # --- Consent ---------------------------------------------------------------------------

    def consent_resource(self, caller: Caller, consent: Consent) -> Json:
        grantee: Json
        if consent.grantee_kind is GranteeKind.ORGANIZATION:
            grantee = {"reference": f"Organization/{consent.grantee}"}
        elif consent.grantee_kind is GranteeKind.ROLE:
            grantee = {
                "identifier": {"system": ROLE_SYSTEM, "value": consent.grantee},
                "display": f"every member in the role {consent.grantee}",
            }
        else:
            grantee = {
                "reference": member_reference(consent.grantee, caller.lookup(consent.grantee))
            }
        provision: Json = {
            "type": "permit",
            "period": {"start": rfc3339(consent.start_ns), "end": rfc3339(consent.end_ns)},
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "IRCP",
                                "display": "information recipient",
                            }
                        ]
                    },
                    "reference": grantee,
                }
            ],
            "purpose": [
                {"system": ACT_REASON, "code": PURPOSE_CODES[p], "display": p.value}
                for p in consent.purposes
            ],
        }
        if consent.scope_kind is ScopeKind.RESOURCE_TYPES:
            provision["class"] = [
                {"system": RESOURCE_TYPES_SYSTEM, "code": t} for t in consent.scope
            ]
        elif consent.scope_kind is ScopeKind.CATEGORIES:
            provision["code"] = [
                {"coding": [{"system": CATEGORY_SYSTEM, "code": c}]} for c in consent.scope
            ]
        elif consent.scope_kind is ScopeKind.RECORDS:
            data = []
            for record_id in consent.scope:
                history = self.history(caller, record_id)
                kind = history.versions[0].resource_type if history and history.versions else None
                reference: Json = (
                    {"reference": f"{kind}/{record_id}"}
                    if kind
                    else {"identifier": {"system": "urn:medledger:record", "value": record_id}}
                )
                data.append({"meaning": "instance", "reference": reference})
            provision["data"] = data
        granted = self.block_time(caller, consent.granted_height)
        ledger: list[Json] = [{"url": "grantedHeight", "valueInteger": consent.granted_height}]
        changed = granted
        if consent.status is ConsentStatus.REVOKED:
            ledger.append({"url": "revokedHeight", "valueInteger": consent.revoked_height})
            if consent.revoke_reason:
                ledger.append({"url": "revokeReason", "valueString": consent.revoke_reason})
            changed = self.block_time(caller, consent.revoked_height)
        resource: Json = {
            "resourceType": "Consent",
            "id": consent.id,
            "meta": {"versionId": "2" if consent.status is ConsentStatus.REVOKED else "1"},
            "status": "inactive" if consent.status is ConsentStatus.REVOKED else "active",
            "scope": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                        "code": "patient-privacy",
                    }
                ]
            },
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://loinc.org",
                            "code": "59284-0",
                            "display": "Patient Consent",
                        }
                    ]
                }
            ],
            "patient": {"reference": f"Patient/{consent.patient}"},
            "performer": [
                {"reference": member_reference(consent.grantor, caller.lookup(consent.grantor))}
            ],
            "policyRule": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
                ]
            },
            "provision": provision,
            "extension": [{"url": LEDGER_EXTENSION, "extension": ledger}],
        }
        if granted is not None:
            resource["dateTime"] = rfc3339(granted)
        if changed is not None:
            resource["meta"]["lastUpdated"] = rfc3339(changed)
        return resource

    def block_time(self, caller: Caller, height: int) -> int | None:
        try:
            return int(caller.client.ledger.query("/block", str(height))["time_ns"])
        except (ClientError, KeyError, ValueError, TypeError):
            return None

    def consent_search(self, caller: Caller, params: list[tuple[str, str]]) -> Json:
        try:
            query = parse_search("Consent", params, strict=caller.strict)
        except SearchError as exc:
            raise invalid(str(exc)) from None
        patients = self.patients_for(caller, query.by(PATIENT))
        if patients is None:
            raise invalid("Consent search needs patient")
        consents: list[Consent] = []
        for patient in sorted(patients):
            consents.extend(self.consents_of(caller, patient, {}))
        ids = query.named("_id")
        now = datetime.now(UTC)
        resources = [
            self.consent_resource(caller, c)
            for c in consents
            if all(metadata_matches(i, c.id, 0, "", now) for i in ids)
        ]
        matched = [r for r in resources if query.matches(r, now)]
        matched = sort_items(
            matched,
            query.sort,
            metadata=lambda r: (r["provision"]["period"]["start"], r["id"]),
            content=lambda r: r,
        )
        page = matched[query.offset : query.offset + query.count]
        entries = [self.entry("Consent", r["id"], r, "match") for r in page]
        return self.searchset(
            f"{self.base}/Consent",
            query.link_params(),
            query,
            len(matched),
            entries,
            self.notes(0, (), query.ignored),
        )

    def find_consent(self, caller: Caller, consent_id: str) -> Consent:
        patient = self.consent_patients.get(consent_id)
        candidates = [patient] if patient else self.organization_patients(caller)
        for candidate in candidates:
            for consent in self.consents_of(caller, candidate, {}):
                if consent.id == consent_id:
                    return consent
        raise not_found(f"Consent/{consent_id} is not known to this node")

    def consent_read(self, caller: Caller, consent_id: str) -> Json:
        return self.consent_resource(caller, self.find_consent(caller, consent_id))

    def refuse_consent_write(self, client_id: str, interaction: str) -> FhirError:
        """A consent is the patient's decision: the ledger takes a consent.grant or
        consent.revoke signed by the patient or their delegate only. A SMART client acts as a
        system member (an EHR or LIS integration), so the gateway never signs one for it, even
        for a patient whose keys this node holds in custody."""
        self.ctx.audit.record(
            client_id, "fhir.request", f"Consent.{interaction}", "refused", CONSENT_IS_THE_PATIENTS
        )
        return FhirError(403, "forbidden", CONSENT_IS_THE_PATIENTS)

    # --- AuditEvent ------------------------------------------------------------------------

    def audit_event(
        self, caller: Caller, proven: ProvenAuditEntry, height: int, app_hash: bytes
    ) -> Json:
        entry = proven.entry
        sender = member_reference(entry.sender, caller.lookup(entry.sender))
        if entry.code == Code.OK:
            outcome = "0"
        elif entry.code in (Code.ACCESS_DENIED, Code.UNAUTHORIZED):
            outcome = "4"
        else:
            outcome = "8"
        event: Json = {
            "resourceType": "AuditEvent",
            "id": f"ledger-{proven.index}",
            "type": {"system": DCM, "code": "110110", "display": "Patient Record"},
            "subtype": [{"system": TX_TYPE_SYSTEM, "code": entry.type}],
            "action": TX_ACTIONS.get(entry.type, "E"),
            "recorded": rfc3339(proven.time_ns),
            "outcome": outcome,
            "outcomeDesc": entry.log,
            "agent": [{"who": {"reference": sender}, "requestor": True}],
            "source": {
                "site": self.ctx.chain_id,
                "observer": {"display": f"medledger ledger {self.ctx.chain_id}"},
                "type": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                        "code": "4",
                        "display": "Application Server",
                    }
                ],
            },
            "entity": [
                {
                    "what": {"reference": f"Patient/{entry.subject}"},
                    "type": {
                        "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                        "code": "1",
                        "display": "Person",
                    },
                    "role": {
                        "system": "http://terminology.hl7.org/CodeSystem/object-role",
                        "code": "1",
                        "display": "Patient",
                    },
                }
            ],
            "extension": [
                {
                    "url": LEDGER_EXTENSION,
                    "extension": [
                        {"url": "auditIndex", "valueInteger": proven.index},
                        {"url": "height", "valueInteger": proven.height},
                        {"url": "txHash", "valueString": entry.tx_hash.hex()},
                        {"url": "provenAtHeight", "valueInteger": height},
                        {"url": "appHash", "valueString": app_hash.hex()},
                        {"url": "inclusionProofVerified", "valueBoolean": True},
                    ],
                }
            ],
        }
        return event

    def enrich_access(self, caller: Caller, event: Json, proven: ProvenAuditEntry) -> None:
        """What a granted access request or session disclosed: each record version as an
        entity, and the purpose of use."""
        try:
            if proven.granted_access:
                grants = [caller.client.grant(proven.grant_id)]
            elif proven.opened_session:
                session = caller.client.session(proven.grant_id)
                grants = [
                    grant
                    for c in session.records
                    if (grant := session.grant_for(c.record_id, c.version)) is not None
                ]
            else:
                return
        except ClientError:
            return
        for grant in grants:
            event["entity"].append(
                {
                    "what": {
                        "reference": (
                            f"{grant.resource_type}/{grant.record_id}/_history/{grant.version}"
                        )
                    },
                    "type": {
                        "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                        "code": "2",
                        "display": "System Object",
                    },
                }
            )
        if not grants:
            return
        reason = [{"system": ACT_REASON, "code": PURPOSE_CODES[grants[0].purpose]}]
        if grants[0].emergency:
            reason.append(
                {"system": ACT_REASON, "code": "ETREAT", "display": grants[0].emergency_reason}
            )
        event["purposeOfEvent"] = [{"coding": reason}]

    def audit_search(self, caller: Caller, params: list[tuple[str, str]]) -> Json:
        try:
            query = parse_search("AuditEvent", params, strict=caller.strict)
        except SearchError as exc:
            raise invalid(str(exc)) from None
        patients = self.patients_for(caller, query.by(PATIENT))
        if not patients:
            raise invalid("AuditEvent search needs patient")
        now = datetime.now(UTC)
        items: list[tuple[ProvenAuditEntry, Json]] = []
        for patient in sorted(patients):
            trail = caller.client.verified_audit_trail(patient)
            for proven in trail.entries:
                event = self.audit_event(caller, proven, trail.height, trail.header.app_hash)
                if query.matches(event, now):
                    items.append((proven, event))
        items = sort_items(
            items,
            query.sort or (),
            metadata=lambda i: (i[0].time_ns, f"{i[0].index:012d}"),
            content=lambda i: i[1],
        )
        page = items[query.offset : query.offset + query.count]
        for proven, event in page:
            self.enrich_access(caller, event, proven)
        entries = [self.entry("AuditEvent", e["id"], e, "match") for _, e in page]
        return self.searchset(
            f"{self.base}/AuditEvent",
            query.link_params(),
            query,
            len(items),
            entries,
            self.notes(0, (), query.ignored),
        )

    # --- Provenance ------------------------------------------------------------------------

    def provenance(self, caller: Caller, version: RecordVersion) -> Json:
        proof: list[Json] = []
        try:
            verified = caller.client.ledger.verified_state(
                record_key(version.record_id, version.version)
            )
            proven = codec.decode(verified.value, RecordVersion) if verified.value else None
            if proven is not None and proven.package_digest == version.package_digest:
                proof = [
                    {
                        "url": "stateKey",
                        "valueString": record_key(version.record_id, version.version).decode(),
                    },
                    {"url": "provenAtHeight", "valueInteger": verified.height},
                    {"url": "appHash", "valueString": verified.header.app_hash.hex()},
                    {"url": "stateProofVerified", "valueBoolean": True},
                ]
        except ClientError as exc:
            proof = [{"url": "stateProofError", "valueString": str(exc)}]
        author = caller.lookup(version.author)
        ledger = [
            {"url": "height", "valueInteger": version.height},
            {"url": "packageDigest", "valueString": version.package_digest},
            {
                "url": "commitment",
                "valueBase64Binary": base64.b64encode(version.commitment).decode(),
            },
            {"url": "status", "valueCode": version.status.value},
            {"url": "threshold", "valueInteger": version.threshold},
            {
                "url": "custodians",
                "valueString": ",".join(c.organization for c in version.custodians),
            },
            *proof,
        ]
        if version.status_reason:
            ledger.append({"url": "statusReason", "valueString": version.status_reason})
        return {
            "resourceType": "Provenance",
            "id": f"{version.record_id}-v{version.version}",
            "target": [
                {
                    "reference": f"{version.resource_type}/{version.record_id}"
                    f"/_history/{version.version}"
                }
            ],
            "recorded": rfc3339(version.time_ns),
            "activity": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                        "code": "CREATE" if version.version == 1 else "UPDATE",
                    }
                ]
            },
            "agent": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                "code": "author",
                            }
                        ]
                    },
                    "who": {"reference": member_reference(version.author, author)},
                    "onBehalfOf": {"reference": f"Organization/{version.author_organization}"},
                }
            ],
            "extension": [
                {"url": LEDGER_EXTENSION, "extension": ledger},
                {
                    "url": VERIFY_EXTENSION,
                    "valueString": "The author signed the ledger transaction that committed this"
                    " version at the height above; the package digest and commitment bind its"
                    " content. Re-check the whole chain with `medledger verify`, and this"
                    " version's content by reading it and comparing its keyed commitment.",
                },
            ],
        }

    def provenance_search(self, caller: Caller, params: list[tuple[str, str]]) -> Json:
        try:
            query = parse_search("Provenance", params, strict=caller.strict)
        except SearchError as exc:
            raise invalid(str(exc)) from None
        targets = query.named("target")
        if not targets and (query.by(PATIENT) or query.named("_id")):
            return self.search(caller, query)  # the Provenance records EHRs sent
        if not targets:
            raise invalid("Provenance search needs target=<Type>/<id> or patient=Patient/<id>")
        items: list[Json] = []
        for value in targets[0].values:
            kind = reference_type(value)
            record_id = reference_id(value)
            history = self.history(caller, record_id)
            if history is None or (kind and history.versions[0].resource_type != kind):
                continue
            items.extend(self.provenance(caller, v) for v in reversed(history.versions))
        page = items[query.offset : query.offset + query.count]
        entries = [self.entry("Provenance", p["id"], p, "match") for p in page]
        return self.searchset(
            f"{self.base}/Provenance",
            query.link_params(),
            query,
            len(items),
            entries,
            self.notes(0, (), query.ignored),
        )

    def provenance_read(self, caller: Caller, provenance_id: str) -> Json:
        record_id, _, number = provenance_id.rpartition("-v")
        history = self.history(caller, record_id) if number.isdigit() else None
        version = (
            next((v for v in history.versions if v.version == int(number)), None)
            if history
            else None
        )
        if version is None:
            raise not_found(f"Provenance/{provenance_id} is not known")
        return self.provenance(caller, version)


GATEWAY = web.AppKey("fhir_gateway", FhirGateway)


# --- HTTP -------------------------------------------------------------------------------------


def fhir_response(reply: Reply) -> web.Response:
    headers = dict(reply.headers)
    if reply.body is None:
        return web.Response(status=reply.status, headers=headers)
    return web.Response(
        status=reply.status,
        text=json.dumps(reply.body, ensure_ascii=False),
        content_type=FHIR_JSON,
        charset="utf-8",
        headers=headers,
    )


def error_response(error: FhirError) -> web.Response:
    return fhir_response(Reply(error.status, error.outcome, error.headers))


def negotiate(request: web.Request) -> None:
    """JSON only: `_format` and Accept must allow it (406 otherwise)."""
    fmt = request.query.get("_format")
    if fmt is not None and fmt.lower() not in JSON_FORMATS:
        raise FhirError(406, "not-supported", f"_format {fmt!r}: this server speaks JSON only")
    accept = request.headers.get("Accept")
    if not accept or fmt is not None:
        return
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if not types & ACCEPTABLE:
        raise FhirError(406, "not-supported", f"Accept {accept!r}: this server speaks JSON only")


@web.middleware
async def fhir_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Under /fhir every error is an OperationOutcome."""
    if not (request.path == "/fhir" or request.path.startswith("/fhir/")):
        return await handler(request)
    try:
        if request.path != "/fhir/auth/token":
            negotiate(request)
        return await handler(request)
    except FhirError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status == 404:
            return error_response(not_found(f"no FHIR endpoint {request.path}"))
        if exc.status == 405:
            return error_response(
                not_supported(f"{request.method} {request.path} is not supported")
            )
        return error_response(FhirError(exc.status, "processing", exc.reason))
    except Exception as exc:
        # Neither the answer nor the log quotes the exception: its message may hold PHI.
        log.error("FHIR request failed: %s", exception_summary(exc), extra={"path": request.path})
        return error_response(internal_error())


async def read_body(request: web.Request) -> Any:
    """The JSON body: 415 unless JSON, 413 beyond the size bound, 400 if it is not JSON or
    nests deeper than any FHIR resource does (the parser is recursive)."""
    if request.content_type not in JSON_TYPES:
        raise FhirError(
            415,
            "not-supported",
            f"Content-Type {request.content_type!r}: send application/fhir+json",
        )
    ctx = request.app[GATEWAY].ctx
    limit = ctx.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except RecursionError:
        raise too_deep(ctx.max_json_depth) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the body is not valid JSON: {exc}") from None
    if json_depth(body, ctx.max_json_depth) > ctx.max_json_depth:
        raise too_deep(ctx.max_json_depth)
    return body


def body_too_large(limit: int) -> FhirError:
    return FhirError(
        413, "too-costly", f"the body is larger than {limit // (1024 * 1024)} MiB: send less"
    )


def too_deep(limit: int) -> FhirError:
    return invalid(f"the body nests JSON more than {limit} levels deep; no FHIR resource does")


def json_depth(value: Any, limit: int) -> int:
    """How deep `value` nests arrays and objects, counted without recursion, up to limit + 1."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def authorize(request: web.Request, resource_type: str, interaction: str) -> AccessToken:
    gateway = request.app[GATEWAY]
    try:
        return gateway.ctx.tokens.check(
            request.headers.get("Authorization"), resource_type, interaction
        )
    except SmartError as exc:
        raise from_smart(exc) from None


def refuse_consent_write(request: web.Request, interaction: str) -> FhirError:
    """403 for a Consent write by a SMART client (after the usual 401 without a valid token)."""
    token = authorize(request, "Consent", interaction)
    return request.app[GATEWAY].refuse_consent_write(token.client_id, interaction)


def known_type(resource_type: str) -> None:
    if resource_type not in RESOURCES:
        raise not_supported(f"resource type {resource_type!r} is not supported here", 404)


async def run(request: web.Request, token: AccessToken, work: Callable[[Caller], T]) -> T:
    """Run sync SDK work off the event loop (which also serves the ABCI connection)."""
    gateway = request.app[GATEWAY]
    purpose = parse_purpose(request.headers.get("X-Purpose-Of-Use"))
    prefer = parse_prefer(request.headers.get("Prefer"))

    def job() -> T:
        caller = gateway.caller(token, purpose, prefer)
        try:
            return work(caller)
        except FhirValidationError as exc:
            raise from_validation(exc) from None
        except SearchError as exc:
            raise invalid(str(exc)) from None
        except CustodyError as exc:
            raise forbidden(str(exc)) from None
        except ClientError as exc:
            raise from_client(exc) from None

    return await asyncio.get_running_loop().run_in_executor(gateway.requests, job)


def query_params(request: web.Request) -> list[tuple[str, str]]:
    return [(k, v) for k, v in request.query.items() if k != "_format"]


async def metadata(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    return fhir_response(
        Reply(200, capability_statement(gateway.base, gateway.token_url, gateway.started))
    )


async def smart_config(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    return web.json_response(smart_configuration(gateway.token_url))


async def token_endpoint(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    no_store = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if request.content_type != "application/x-www-form-urlencoded":
        return web.json_response(
            {"error": "invalid_request", "error_description": "send a form-encoded body"},
            status=400,
            headers=no_store,
        )
    form = await request.post()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        token = gateway.ctx.tokens.issue(fields)
    except SmartError as exc:
        return web.json_response(
            {"error": exc.error, "error_description": exc.description},
            status=exc.status,
            headers=no_store,
        )
    return web.json_response(
        {
            "access_token": token.token,
            "token_type": "bearer",
            "expires_in": max(0, int(token.expires_at - time.time())),
            "scope": " ".join(sorted(token.scopes)),
        },
        headers=no_store,
    )


async def read_handler(request: web.Request) -> web.Response:
    resource_type, resource_id = request.match_info["type"], request.match_info["id"]
    known_type(resource_type)
    token = authorize(request, resource_type, "r")
    gateway = request.app[GATEWAY]
    reply = await run(request, token, lambda c: gateway.read_any(c, resource_type, resource_id))
    if_none_match = request.headers.get("If-None-Match")
    if (
        if_none_match
        and reply.headers.get("ETag")
        and _same_etag(if_none_match, reply.headers["ETag"])
    ):
        return web.Response(status=304, headers={"ETag": reply.headers["ETag"]})
    return fhir_response(reply)


def _same_etag(given: str, current: str) -> bool:
    try:
        return parse_etag(given) == parse_etag(current)
    except FhirError:
        return False


async def vread_handler(request: web.Request) -> web.Response:
    resource_type, resource_id = request.match_info["type"], request.match_info["id"]
    vid = request.match_info["vid"]
    known_type(resource_type)
    if resource_type not in RECORD_TYPES and resource_type not in DIRECTORY_TYPES:
        raise not_supported(f"vread is not supported on {resource_type}")
    if not vid.isdigit() or int(vid) < 1:
        raise not_found(f"{resource_type}/{resource_id} has no version {vid!r}")
    token = authorize(request, resource_type, "r")
    gateway = request.app[GATEWAY]
    reply = await run(
        request, token, lambda c: gateway.read_version_any(c, resource_type, resource_id, int(vid))
    )
    return fhir_response(reply)


async def instance_history_handler(request: web.Request) -> web.Response:
    resource_type, resource_id = request.match_info["type"], request.match_info["id"]
    known_type(resource_type)
    if resource_type not in RECORD_TYPES:
        raise not_supported(f"history is not supported on {resource_type}")
    token = authorize(request, resource_type, "r")
    gateway = request.app[GATEWAY]
    params = query_params(request)
    body = await run(
        request, token, lambda c: gateway.instance_history(c, resource_type, resource_id, params)
    )
    return fhir_response(Reply(200, body))


async def type_history_handler(request: web.Request) -> web.Response:
    resource_type = request.match_info["type"]
    known_type(resource_type)
    if resource_type not in RECORD_TYPES:
        raise not_supported(f"history is not supported on {resource_type}")
    token = authorize(request, resource_type, "r")
    gateway = request.app[GATEWAY]
    params = query_params(request)
    body = await run(request, token, lambda c: gateway.type_history(c, resource_type, params))
    return fhir_response(Reply(200, body))


async def _search(request: web.Request, params: list[tuple[str, str]]) -> web.Response:
    resource_type = request.match_info["type"]
    known_type(resource_type)
    token = authorize(request, resource_type, "s")
    gateway = request.app[GATEWAY]
    body = await run(request, token, lambda c: gateway.search_type(c, resource_type, params))
    return fhir_response(Reply(200, body))


async def search_handler(request: web.Request) -> web.Response:
    return await _search(request, query_params(request))


async def search_post_handler(request: web.Request) -> web.Response:
    if request.content_type != "application/x-www-form-urlencoded":
        raise FhirError(415, "not-supported", "POST _search takes a form-encoded body")
    form = await request.post()
    params = query_params(request) + [
        (k, v) for k, v in form.items() if isinstance(v, str) and k != "_format"
    ]
    return await _search(request, params)


async def create_handler(request: web.Request) -> web.Response:
    resource_type = request.match_info["type"]
    known_type(resource_type)
    if resource_type == "Consent":
        raise refuse_consent_write(request, "c")
    if "create" not in RESOURCES[resource_type].interactions:
        raise not_supported(f"create is not supported on {resource_type}")
    token = authorize(request, resource_type, "c")
    body = await read_body(request)
    gateway = request.app[GATEWAY]
    condition = request.headers.get("If-None-Exist")
    reply = await run(request, token, lambda c: gateway.create(c, resource_type, body, condition))
    return fhir_response(reply)


async def update_handler(request: web.Request) -> web.Response:
    resource_type, resource_id = request.match_info["type"], request.match_info["id"]
    known_type(resource_type)
    if resource_type == "Consent":
        raise refuse_consent_write(request, "u")
    if "update" not in RESOURCES[resource_type].interactions:
        raise not_supported(f"update is not supported on {resource_type}")
    token = authorize(request, resource_type, "u")
    body = await read_body(request)
    gateway = request.app[GATEWAY]
    if_match = request.headers.get("If-Match")
    reply = await run(
        request, token, lambda c: gateway.update(c, resource_type, resource_id, body, if_match)
    )
    return fhir_response(reply)


async def delete_handler(request: web.Request) -> web.Response:
    resource_type, resource_id = request.match_info["type"], request.match_info["id"]
    known_type(resource_type)
    if resource_type == "Consent":
        raise refuse_consent_write(request, "d")
    if "delete" not in RESOURCES[resource_type].interactions:
        raise not_supported(f"delete is not supported on {resource_type}", 405)
    token = authorize(request, resource_type, "d")
    gateway = request.app[GATEWAY]
    reply = await run(request, token, lambda c: gateway.delete(c, resource_type, resource_id))
    return fhir_response(reply)


async def everything_handler(request: web.Request) -> web.Response:
    patient = request.match_info["id"]
    token = authorize(request, "Patient", "r")
    gateway = request.app[GATEWAY]
    params = query_params(request)
    body = await run(request, token, lambda c: gateway.everything(c, patient, params))
    return fhir_response(Reply(200, body))


async def bundle_handler(request: web.Request) -> web.Response:
    body = await read_body(request)
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise invalid("POST to the base takes a transaction or batch Bundle")
    kind = body.get("type")
    if kind not in ("transaction", "batch"):
        raise invalid(f"Bundle.type {kind!r}: the base accepts transaction and batch")
    entries = body.get("entry") or []
    first = entries[0] if isinstance(entries, list) and entries else {}
    request_part = first.get("request") if isinstance(first, dict) else None
    if not isinstance(request_part, dict):
        request_part = {}
    method = str(request_part.get("method", "GET")).upper()
    url = str(request_part.get("url", "Patient")).strip("/")
    resource_type = url.split("/")[0].split("?")[0] or "Patient"
    interaction = {"POST": "c", "PUT": "u", "DELETE": "d"}.get(method, "r" if "/" in url else "s")
    # The token is checked (401, 403) against the first entry; every entry is then checked
    # against the token's scopes.
    token = authorize(request, resource_type, interaction)
    gateway = request.app[GATEWAY]
    if kind == "transaction":
        result = await run(request, token, lambda c: gateway.transaction(c, body))
    else:
        result = await run(request, token, lambda c: gateway.batch(c, body))
    return fhir_response(Reply(200, result))


async def unsupported_handler(request: web.Request) -> web.Response:
    segments = [s for s in request.path.split("/")[2:] if s]
    if segments and segments[0] == "Consent" and request.method in WRITE_INTERACTIONS:
        raise refuse_consent_write(request, WRITE_INTERACTIONS[request.method])
    if segments and segments[0] in RESOURCES and request.method in ("DELETE", "PATCH"):
        raise not_supported(
            f"{request.method} {request.path} is not supported: DELETE takes <Type>/<id> and"
            " marks the record entered-in-error (records are never removed; a patient may"
            " erase one with record.erase)"
        )
    if segments and segments[0] not in RESOURCES and not segments[0].startswith(("$", "_")):
        raise not_supported(f"resource type {segments[0]!r} is not supported here", 404)
    raise not_supported(f"{request.method} {request.path} is not supported", 405)


def add_fhir_routes(app: web.Application) -> None:
    """Mount the FHIR API under /fhir (reads `app[FHIR_CONTEXT]`)."""
    gateway = FhirGateway(app[FHIR_CONTEXT])
    app[GATEWAY] = gateway
    from medledger.fhir.bulk import add_bulk_routes  # imports this module

    add_bulk_routes(app)  # $export: ahead of the generic routes below and of this middleware
    app.middlewares.append(fhir_middleware)
    router = app.router
    router.add_get("/fhir/metadata", metadata)
    router.add_get("/fhir/.well-known/smart-configuration", smart_config)
    router.add_post("/fhir/auth/token", token_endpoint)
    router.add_post("/fhir", bundle_handler)
    router.add_post("/fhir/", bundle_handler)
    router.add_get("/fhir/Patient/{id}/$everything", everything_handler)
    router.add_get("/fhir/{type}/_history", type_history_handler)
    router.add_post("/fhir/{type}/_search", search_post_handler)
    router.add_get("/fhir/{type}/{id}/_history/{vid}", vread_handler)
    router.add_get("/fhir/{type}/{id}/_history", instance_history_handler)
    router.add_get("/fhir/{type}", search_handler)
    router.add_post("/fhir/{type}", create_handler)
    router.add_get("/fhir/{type}/{id}", read_handler)
    router.add_put("/fhir/{type}/{id}", update_handler)
    router.add_delete("/fhir/{type}/{id}", delete_handler)
    router.add_route("*", "/fhir/{tail:.*}", unsupported_handler)

    async def close(_: web.Application) -> None:
        gateway.close()

    app.on_cleanup.append(close)
    from medledger.fhir.claims import add_claim_fhir_routes  # imports this module

    add_claim_fhir_routes(app)  # Claim, ClaimResponse, ExplanationOfBenefit: before {type}
