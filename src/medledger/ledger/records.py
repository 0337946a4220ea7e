"""Health records on the ledger: metadata and hashes only, never content.

A record version's content lives off-chain in an encrypted package; the chain keeps who wrote
what about whom, when, the package's digest and a keyed commitment to the plaintext.
Corrections never rewrite: an amendment is a new version linked to the previous one, a wrong
entry is marked entered-in-error, and erasure (GDPR Art. 17) leaves a tombstone while every
node destroys the package and its key shares.
"""

from __future__ import annotations

import re
from enum import StrEnum

import msgspec

from medledger.ledger.context import TxContext
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.governance import active_organizations, load_params
from medledger.ledger.identity import is_active, load_member
from medledger.ledger.model import Member, Role
from medledger.ledger.state import State

# Identifiers are matched whole (`fullmatch`): with `match`, "$" accepts a trailing newline,
# which then breaks every URL and path built from the identifier.
RECORD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
CATEGORY = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
DIGEST = re.compile(r"[0-9a-f]{64}")
COMMITMENT_BYTES = 32
MAX_PACKAGE_BYTES = 16 * 1024 * 1024

AUTHOR_ROLES = frozenset({Role.CLINICIAN, Role.EMERGENCY, Role.LAB, Role.EHR, Role.LIS})


class RecordStatus(StrEnum):
    CURRENT = "current"
    SUPERSEDED = "superseded"
    ENTERED_IN_ERROR = "entered-in-error"
    ERASED = "erased"


class Custody(msgspec.Struct, frozen=True, array_like=True):
    """Organization `organization`'s node holds share number `index` of the data key."""

    organization: str
    index: int


class RecordVersion(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    record_id: str
    version: int
    patient: str
    author: str
    author_organization: str
    resource_type: str
    category: str
    package_digest: str
    package_size: int
    commitment: bytes
    previous: int
    status: RecordStatus
    height: int
    time_ns: int
    threshold: int
    custodians: tuple[Custody, ...]
    status_reason: str = ""
    status_height: int = 0


class RecordHead(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    record_id: str
    patient: str
    latest: int
    erased: bool = False
    erased_height: int = 0


class PackageRef(msgspec.Struct, frozen=True, array_like=True):
    """Which record version a package holds."""

    record_id: str
    version: int


class PutRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`record.put` (a new record) and `record.amend` (a new version of one)."""

    record_id: str
    patient: str
    resource_type: str
    category: str
    package_digest: str
    package_size: int
    commitment: bytes
    threshold: int
    custodians: tuple[str, ...]
    previous: int = 0


class PutRecords(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`record.put-many`: several new records or amendments, all committed or none."""

    records: tuple[PutRecord, ...]


# A FHIR transaction Bundle is one put-many, atomically: Synthea's patient Bundles hold 250-400
# entries, so a put-many holds up to 1,000 (about 300 KB, under max_tx_bytes).
MAX_RECORDS_PER_TX = 1000


class MarkEnteredInError(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    record_id: str
    version: int
    reason: str


class EraseRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    record_id: str
    reason: str


MIN_CUSTODIANS = 2


def threshold_for(custodian_count: int) -> int:
    """t = f + 1 where n = 3f + 1 custodians tolerate f faulty ones: f + 1 shares are needed,
    so no f nodes together can decrypt, and any f + 1 honest ones can. Never fewer than 2 once
    there are 2 custodians: with n <= 3, f + 1 would be 1, and one node could decrypt alone."""
    if custodian_count < MIN_CUSTODIANS:
        return 1
    return max(MIN_CUSTODIANS, (custodian_count - 1) // 3 + 1)


def custodians_now(state: State) -> tuple[str, ...]:
    """The custodian organizations for a new version: every active organization, by id."""
    return tuple(sorted(o.id for o in active_organizations(state)))


def record_key(record_id: str, version: int) -> bytes:
    return f"record/{record_id}/{version:08d}".encode()


def head_key(record_id: str) -> bytes:
    return f"record-head/{record_id}".encode()


def patient_index_key(patient: str, record_id: str) -> bytes:
    return f"patient-record/{patient}/{record_id}".encode()


def package_key(digest: str) -> bytes:
    return f"package/{digest}".encode()


def load_head(state: State, record_id: str) -> RecordHead:
    head = state.read(head_key(record_id), RecordHead)
    if head is None:
        raise LedgerError(Code.NOT_FOUND, f"unknown record {record_id}")
    return head


def load_version(state: State, record_id: str, version: int) -> RecordVersion:
    """A version of a record; version 0 means the latest."""
    head = load_head(state, record_id)
    number = head.latest if version == 0 else version
    found = state.read(record_key(record_id, number), RecordVersion)
    if found is None:
        raise LedgerError(Code.NOT_FOUND, f"record {record_id} has no version {number}")
    return found


def versions_of(state: State, record_id: str) -> list[RecordVersion]:
    return state.read_all(f"record/{record_id}/".encode(), RecordVersion)


def load_patient(state: State, patient_id: str) -> Member:
    try:
        patient = load_member(state, patient_id)
    except LedgerError:
        raise LedgerError(Code.NOT_FOUND, f"unknown patient {patient_id}") from None
    if patient.role is not Role.PATIENT:
        raise LedgerError(Code.INVALID_BODY, f"member {patient_id} is not a patient")
    if not is_active(state, patient):
        raise LedgerError(Code.CONFLICT, f"patient {patient_id} is {patient.status}")
    return patient


def _check_put(state: State, body: PutRecord, custodians: tuple[str, ...] | None) -> None:
    if not RECORD_ID.fullmatch(body.record_id):
        raise LedgerError(Code.INVALID_BODY, "record_id: 1-64 of A-Z a-z 0-9 . _ -")
    if not RESOURCE_TYPE.fullmatch(body.resource_type):
        raise LedgerError(Code.INVALID_BODY, f"invalid resource type {body.resource_type!r}")
    if not CATEGORY.fullmatch(body.category):
        raise LedgerError(Code.INVALID_BODY, f"invalid category {body.category!r}")
    if not DIGEST.fullmatch(body.package_digest):
        raise LedgerError(Code.INVALID_BODY, "package_digest must be 64 lowercase hex digits")
    if not 0 < body.package_size <= MAX_PACKAGE_BYTES:
        raise LedgerError(Code.INVALID_BODY, f"package_size must be 1..{MAX_PACKAGE_BYTES}")
    if len(body.commitment) != COMMITMENT_BYTES:
        raise LedgerError(Code.INVALID_BODY, f"commitment must be {COMMITMENT_BYTES} bytes")
    expected = custodians_now(state) if custodians is None else custodians
    if body.custodians != expected:
        raise LedgerError(
            Code.CONFLICT,
            f"custodians must be the active organizations {list(expected)}; seal again",
        )
    if body.threshold != threshold_for(len(expected)):
        raise LedgerError(
            Code.INVALID_BODY,
            f"threshold must be {threshold_for(len(expected))} of {len(expected)}",
        )


def _write_version(state: State, ctx: TxContext, body: PutRecord, version: int) -> RecordVersion:
    record = RecordVersion(
        record_id=body.record_id,
        version=version,
        patient=body.patient,
        author=ctx.sender.id,
        author_organization=ctx.sender.organization,
        resource_type=body.resource_type,
        category=body.category,
        package_digest=body.package_digest,
        package_size=body.package_size,
        commitment=body.commitment,
        previous=body.previous,
        status=RecordStatus.CURRENT,
        height=ctx.block.height,
        time_ns=ctx.block.time_ns,
        threshold=body.threshold,
        custodians=tuple(Custody(org, i + 1) for i, org in enumerate(body.custodians)),
    )
    state.write(record_key(body.record_id, version), record)
    state.write(head_key(body.record_id), RecordHead(body.record_id, body.patient, version))
    state.put(patient_index_key(body.patient, body.record_id), b"")
    if state.get(package_key(body.package_digest)) is not None:
        raise LedgerError(Code.CONFLICT, "this package is already stored for another version")
    state.write(package_key(body.package_digest), PackageRef(body.record_id, version))
    ctx.effects.packages_stored.append(body.package_digest)
    ctx.effects.subject = body.patient
    return record


def put_record(
    state: State, ctx: TxContext, body: PutRecord, custodians: tuple[str, ...] | None = None
) -> str:
    """A practitioner or system client stores a new record about a patient. `custodians` are
    `custodians_now(state)` when the caller already has them (one lookup per batch)."""
    ctx.effects.subject = body.patient
    load_patient(state, body.patient)
    _check_put(state, body, custodians)
    if body.previous != 0:
        raise LedgerError(Code.INVALID_BODY, "a new record has no previous version; amend it")
    if state.get(head_key(body.record_id)) is not None:
        raise LedgerError(Code.CONFLICT, f"record {body.record_id} exists; amend it instead")
    _write_version(state, ctx, body, 1)
    return f"record {body.record_id} v1 stored ({body.resource_type}/{body.category})"


def amend_record(
    state: State, ctx: TxContext, body: PutRecord, custodians: tuple[str, ...] | None = None
) -> str:
    """An amendment is a new version linked to the latest one, which becomes superseded."""
    head = load_head(state, body.record_id)
    ctx.effects.subject = head.patient
    if head.erased:
        raise LedgerError(Code.ERASED, f"record {body.record_id} was erased")
    if body.patient != head.patient:
        raise LedgerError(Code.INVALID_BODY, f"record {body.record_id} is about another patient")
    latest = load_version(state, body.record_id, head.latest)
    _require_author_organization(ctx, latest)
    from medledger.ledger.claims import check_claim_record_unchanged

    check_claim_record_unchanged(state, body.record_id)
    if body.previous != head.latest:
        raise LedgerError(
            Code.CONFLICT,
            f"record {body.record_id} is at version {head.latest}, not {body.previous}",
        )
    if body.resource_type != latest.resource_type:
        raise LedgerError(Code.INVALID_BODY, "an amendment keeps the record's resource type")
    load_patient(state, body.patient)
    _check_put(state, body, custodians)
    if latest.status is RecordStatus.CURRENT:
        state.write(
            record_key(body.record_id, latest.version),
            msgspec.structs.replace(
                latest, status=RecordStatus.SUPERSEDED, status_height=ctx.block.height
            ),
        )
    _write_version(state, ctx, body, head.latest + 1)
    return f"record {body.record_id} amended to v{head.latest + 1}"


def put_records(state: State, ctx: TxContext, body: PutRecords) -> str:
    """Apply each new record or amendment in order; any refusal refuses them all (the
    transaction's overlay is then dropped whole)."""
    if not 0 < len(body.records) <= MAX_RECORDS_PER_TX:
        raise LedgerError(Code.INVALID_BODY, f"1-{MAX_RECORDS_PER_TX} records per transaction")
    subjects = {r.patient for r in body.records}
    ctx.effects.subject = next(iter(subjects)) if len(subjects) == 1 else ""
    custodians = custodians_now(state)  # records change no organization: one lookup for all
    for position, record in enumerate(body.records):
        try:
            if record.previous == 0:
                put_record(state, ctx, record, custodians)
            else:
                amend_record(state, ctx, record, custodians)
        except LedgerError as err:
            raise LedgerError(err.code, f"entry {position}: {err.message}") from None
    ctx.effects.subject = next(iter(subjects)) if len(subjects) == 1 else ""
    return f"{len(body.records)} records stored"


def mark_entered_in_error(state: State, ctx: TxContext, body: MarkEnteredInError) -> str:
    """FHIR's entered-in-error: the version stays readable but is flagged as wrong."""
    if not body.reason.strip():
        raise LedgerError(Code.INVALID_BODY, "a reason is required")
    version = load_version(state, body.record_id, body.version)
    ctx.effects.subject = version.patient
    _require_author_organization(ctx, version)
    if version.status in (RecordStatus.ENTERED_IN_ERROR, RecordStatus.ERASED):
        raise LedgerError(Code.CONFLICT, f"version {version.version} is {version.status}")
    state.write(
        record_key(body.record_id, version.version),
        msgspec.structs.replace(
            version,
            status=RecordStatus.ENTERED_IN_ERROR,
            status_reason=body.reason,
            status_height=ctx.block.height,
        ),
    )
    return f"record {body.record_id} v{version.version} marked entered-in-error"


def erase_record(state: State, ctx: TxContext, body: EraseRecord) -> str:
    """Erasure: every version becomes a tombstone and every node destroys the packages."""
    head = load_head(state, body.record_id)
    ctx.effects.subject = head.patient
    if head.erased:
        raise LedgerError(Code.ERASED, f"record {body.record_id} was already erased")
    versions = versions_of(state, body.record_id)
    if not _may_erase(state, ctx.sender, head.patient, versions[0]):
        raise LedgerError(
            Code.UNAUTHORIZED,
            "only the patient, a delegate, or (if policy allows) the author organization's"
            " admin may erase a record",
        )
    if not body.reason.strip():
        raise LedgerError(Code.INVALID_BODY, "a reason is required")
    for version in versions:
        state.write(
            record_key(body.record_id, version.version),
            msgspec.structs.replace(
                version,
                status=RecordStatus.ERASED,
                status_reason=body.reason,
                status_height=ctx.block.height,
            ),
        )
        ctx.effects.packages_erased.append(version.package_digest)
    state.write(
        head_key(body.record_id),
        msgspec.structs.replace(head, erased=True, erased_height=ctx.block.height),
    )
    return f"record {body.record_id} erased ({len(versions)} versions)"


def _may_erase(state: State, sender: Member, patient: str, first: RecordVersion) -> bool:
    from medledger.ledger.consent import is_delegate

    if sender.id == patient or is_delegate(state, patient, sender.id):
        return True
    return (
        sender.role is Role.ADMIN
        and sender.organization == first.author_organization
        and load_params(state).erasure_by_organization_admin == 1
    )


def _require_author_organization(ctx: TxContext, version: RecordVersion) -> None:
    if ctx.sender.organization != version.author_organization:
        raise LedgerError(
            Code.UNAUTHORIZED,
            f"only {version.author_organization}, the author's organization, may correct it",
        )
