"""What every part of the FHIR facade shares: the caller of a request, replies, the cache of
decrypted resources, ETags, meta and references."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, TypeVar

from medledger.client.records import (
    RecordsClient,
)
from medledger.fhir.outcome import (
    FhirError,
    business_rule,
    invalid,
    too_costly,
)
from medledger.fhir.search import (
    SEARCH_PARAMS,
    date_range,
    rfc3339,
)
from medledger.fhir.smart import AccessToken, scope_permits
from medledger.ledger.access import Grant
from medledger.ledger.consent import (
    Purpose,
)
from medledger.ledger.model import PRACTITIONER_ROLES, SYSTEM_ROLES, Member, Role
from medledger.ledger.records import (
    RecordStatus,
    RecordVersion,
)

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
    "record.put-bundle": "C",
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


# The patient element of types served outside the records' search tables (the claims').
PATIENT_ELEMENTS = {"Claim": "patient", "ExplanationOfBenefit": "patient"}


def patient_element(resource_type: str) -> str:
    if resource_type in PATIENT_ELEMENTS:
        return PATIENT_ELEMENTS[resource_type]
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
