"""The shared directory: the FHIR resources that are not patient data — Organization,
Practitioner, PractitionerRole, Location, a Medication or Device that no patient's record is
about, and an Observation about a Device or a Location (a calibration, a room's temperature)
— which every node serves, so that records refer to them as EHRs do
(`Organization?identifier=...`, `Practitioner/<id>`).

Why signed on-chain entries (and not off-chain packages with on-chain hashes): a directory
entry holds no PHI (a hospital's address, a clinician's NPI, a drug's code), so it needs no
encryption and no key release; every node must resolve the same conditional reference to the
same entry inside a FHIR transaction, which only state that consensus agreed on gives without a
second replication protocol (a node that had missed an off-chain blob could not resolve what
its peers resolved); and consensus already gives what a directory needs — one order, the
author and organization of every version, its block time, history and tamper evidence. The
cost is chain size, so an entry is bounded: at most `MAX_ENTRY_BYTES` of JSON (Synthea's are
under 2 KiB; a US Core Organization or Practitioner rarely passes 4 KiB), nested at most
`codec.MAX_NESTING` levels, at most `MAX_ENTRIES_PER_TX` per transaction, within the chain's
`max_tx_bytes`.

The rules:
- an admin, practitioner or system client of an active organization writes entries; patients,
  delegates, billing staff and auditors do not (the rules table);
- an entry belongs to the organization that first wrote it: only that organization's members
  write its later versions (another organization's member is refused);
- the resource is checked for shape, not for FHIR conformance (the core knows no FHIR models;
  the front doors validate): it is canonical JSON (sorted keys, compact, UTF-8 — one byte form
  per entry), an object whose `resourceType` and `id` are the entry's;
- each top-level `identifier` (system|value) is indexed per type, and an identifier that
  another entry of the type already holds is a conflict, so that a conditional reference names
  one entry on every node;
- a version is `active`, or `entered-in-error` when its organization retires the entry (FHIR
  DELETE): the entry stays readable in its history and its identifiers are released.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from typing import Any

import msgspec

from medledger.ledger import codec
from medledger.ledger.codec import MAX_NESTING
from medledger.ledger.context import TxContext
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.model import PRACTITIONER_ROLES, SYSTEM_ROLES, Role
from medledger.ledger.state import State

DIRECTORY_TYPES = frozenset(
    {
        "Organization",
        "Practitioner",
        "PractitionerRole",
        "Location",
        "Medication",
        "Device",
        "Observation",
    }
)
# Billing staff and auditors read; they do not curate the directory.
DIRECTORY_ROLES = frozenset(
    {Role.ADMIN} | SYSTEM_ROLES | (PRACTITIONER_ROLES - {Role.BILLING, Role.AUDITOR})
)
ENTRY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")  # FHIR ids: 1-64 of A-Z a-z 0-9 - .
MAX_ENTRY_BYTES = 16 * 1024
MAX_ENTRIES_PER_TX = 1000  # as a put-many; the chain's max_tx_bytes bounds the bytes
MAX_IDENTIFIERS = 32
MAX_IDENTIFIER_CHARS = 1024


class EntryStatus(StrEnum):
    ACTIVE = "active"
    ENTERED_IN_ERROR = "entered-in-error"


class DirectoryWrite(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One entry's new version: `previous` is 0 for a new entry, else its latest version.
    `retire` marks the entry entered-in-error (its resource is then the latest one again)."""

    resource_type: str
    entry_id: str
    resource: bytes
    previous: int = 0
    retire: bool = False


class PutDirectoryEntries(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`directory.put`: entries written in order, all or none."""

    entries: tuple[DirectoryWrite, ...]


class DirectoryEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    resource_type: str
    entry_id: str
    version: int
    organization: str
    author: str
    resource: bytes
    identifiers: tuple[str, ...]
    status: EntryStatus
    height: int
    time_ns: int


def entry_key(resource_type: str, entry_id: str, version: int) -> bytes:
    return f"directory/{resource_type}/{entry_id}/{version:08d}".encode()


def head_key(resource_type: str, entry_id: str) -> bytes:
    return f"directory-head/{resource_type}/{entry_id}".encode()


def identifier_key(resource_type: str, identifier: str) -> bytes:
    """Identifiers are URLs and free text: the key holds their SHA-256, so that no character
    of an identifier can reach into another key's prefix."""
    digest = hashlib.sha256(identifier.encode("utf-8")).hexdigest()
    return f"directory-identifier/{resource_type}/{digest}".encode()


def latest_entry(state: State, resource_type: str, entry_id: str) -> DirectoryEntry | None:
    version = state.read(head_key(resource_type, entry_id), int)
    if version is None:
        return None
    return state.read(entry_key(resource_type, entry_id, version), DirectoryEntry)


def entry_history(state: State, resource_type: str, entry_id: str) -> list[DirectoryEntry]:
    return state.read_all(f"directory/{resource_type}/{entry_id}/".encode(), DirectoryEntry)


def entry_by_identifier(state: State, resource_type: str, identifier: str) -> str | None:
    """The id of the active entry of `resource_type` holding `identifier` (system|value)."""
    raw = state.get(identifier_key(resource_type, identifier))
    return None if raw is None else raw.decode()


def entries_of_type(state: State, resource_type: str) -> list[DirectoryEntry]:
    """The latest version of every entry of a type, by id."""
    found = []
    for key, raw in state.scan(f"directory-head/{resource_type}/".encode()):
        entry_id = key.decode().rsplit("/", 1)[1]
        version = codec.decode(raw, int)
        entry = state.read(entry_key(resource_type, entry_id, version), DirectoryEntry)
        if entry is not None:
            found.append(entry)
    return found


def put_directory_entries(state: State, ctx: TxContext, body: PutDirectoryEntries) -> str:
    """Write each entry's new version in order; any refusal refuses them all."""
    if not 0 < len(body.entries) <= MAX_ENTRIES_PER_TX:
        raise LedgerError(Code.INVALID_BODY, f"1-{MAX_ENTRIES_PER_TX} entries per transaction")
    for position, write in enumerate(body.entries):
        try:
            _put_entry(state, ctx, write)
        except LedgerError as exc:
            raise LedgerError(exc.code, f"entry {position}: {exc.message}") from None
    return f"{len(body.entries)} directory entries written"


def _put_entry(state: State, ctx: TxContext, write: DirectoryWrite) -> None:
    if write.resource_type not in DIRECTORY_TYPES:
        raise LedgerError(
            Code.INVALID_BODY,
            f"{write.resource_type!r} is not a directory type"
            f" ({', '.join(sorted(DIRECTORY_TYPES))})",
        )
    if not ENTRY_ID.fullmatch(write.entry_id):
        raise LedgerError(Code.INVALID_BODY, "entry_id: 1-64 of A-Z a-z 0-9 - .")
    identifiers = _checked_identifiers(write)
    where = f"{write.resource_type}/{write.entry_id}"
    latest = latest_entry(state, write.resource_type, write.entry_id)
    if latest is None:
        if write.previous != 0 or write.retire:
            raise LedgerError(Code.NOT_FOUND, f"{where} does not exist")
    else:
        if latest.organization != ctx.sender.organization:
            raise LedgerError(
                Code.UNAUTHORIZED,
                f"{where} belongs to organization {latest.organization}: only its members write it",
            )
        if write.previous != latest.version:
            raise LedgerError(
                Code.CONFLICT, f"{where} is at version {latest.version}, not {write.previous}"
            )
        for identifier in latest.identifiers:
            state.delete(identifier_key(write.resource_type, identifier))
    status = EntryStatus.ENTERED_IN_ERROR if write.retire else EntryStatus.ACTIVE
    if status is EntryStatus.ACTIVE:
        for identifier in identifiers:
            key = identifier_key(write.resource_type, identifier)
            holder = state.get(key)
            if holder is not None and holder.decode() != write.entry_id:
                raise LedgerError(
                    Code.CONFLICT,
                    f"identifier {identifier} already names {write.resource_type}/"
                    f"{holder.decode()}",
                )
            state.put(key, write.entry_id.encode())
    version = 1 if latest is None else latest.version + 1
    state.write(
        entry_key(write.resource_type, write.entry_id, version),
        DirectoryEntry(
            resource_type=write.resource_type,
            entry_id=write.entry_id,
            version=version,
            organization=ctx.sender.organization,
            author=ctx.sender.id,
            resource=write.resource,
            identifiers=identifiers,
            status=status,
            height=ctx.block.height,
            time_ns=ctx.block.time_ns,
        ),
    )
    state.write(head_key(write.resource_type, write.entry_id), version)


def _checked_identifiers(write: DirectoryWrite) -> tuple[str, ...]:
    """The resource's identifiers (system|value), after checking its shape."""
    if not 0 < len(write.resource) <= MAX_ENTRY_BYTES:
        raise LedgerError(Code.TOO_LARGE, f"a directory entry is 1..{MAX_ENTRY_BYTES} bytes")
    try:
        text = write.resource.decode("utf-8")
    except UnicodeDecodeError:
        raise LedgerError(Code.INVALID_BODY, "the resource is not UTF-8") from None
    _check_json_nesting(text)
    try:
        resource = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise LedgerError(Code.INVALID_BODY, "the resource is not JSON") from None
    if not isinstance(resource, dict):
        raise LedgerError(Code.INVALID_BODY, "the resource is not a JSON object")
    try:
        canonical = json.dumps(
            resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        # A number beyond a double's range (1e400 reads as inf), or a lone surrogate escape.
        raise LedgerError(Code.INVALID_BODY, "the resource has a value JSON cannot hold") from None
    if canonical != write.resource:
        raise LedgerError(
            Code.INVALID_BODY, "the resource must be canonical JSON (sorted keys, compact, UTF-8)"
        )
    if resource.get("resourceType") != write.resource_type:
        raise LedgerError(Code.INVALID_BODY, f"the resource is not a {write.resource_type}")
    if resource.get("id") != write.entry_id:
        raise LedgerError(Code.INVALID_BODY, f"the resource's id must be {write.entry_id!r}")
    found = resource.get("identifier", [])
    if not isinstance(found, list) or len(found) > MAX_IDENTIFIERS:
        raise LedgerError(Code.INVALID_BODY, f"identifier: a list of at most {MAX_IDENTIFIERS}")
    identifiers: list[str] = []
    for item in found:
        if not isinstance(item, dict):
            raise LedgerError(Code.INVALID_BODY, "identifier: each item is an object")
        system, value = item.get("system", ""), item.get("value")
        if not isinstance(system, str) or not isinstance(value, str) or not value:
            continue  # an identifier without a value names nothing to index
        identifier = f"{system}|{value}"
        if len(identifier) > MAX_IDENTIFIER_CHARS:
            raise LedgerError(
                Code.INVALID_BODY, f"identifier: at most {MAX_IDENTIFIER_CHARS} characters"
            )
        if identifier not in identifiers:
            identifiers.append(identifier)
    return tuple(sorted(identifiers))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_json_nesting(text: str, limit: int = MAX_NESTING) -> None:
    """Refuse JSON nested deeper than `limit` before the parser recurses into it: as for
    MessagePack (see `codec.check_nesting`), a recursion limit would make replicas disagree."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                raise LedgerError(Code.INVALID_BODY, f"the resource nests deeper than {limit}")
        elif char in "]}":
            depth -= 1
