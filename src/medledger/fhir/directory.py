"""The FHIR face of the shared directory (`medledger.ledger.directory`): Organization,
Practitioner, PractitionerRole and Location — and a Medication or Device that is not bound to a
patient — read from committed state on this node and written with `directory.put`.

A directory resource is served as it was sent, with `id` the entry id and `meta.versionId` /
`meta.lastUpdated` from the ledger. Conditional references in a Bundle
(`Organization?identifier=system|value`, `Practitioner?identifier=...`) are resolved as HAPI
FHIR resolves them: to the entry holding the identifier (among the transaction's own new
entries first), rewritten to `<Type>/<id>`; a conditional reference that names no entry is left
as sent (the records it appears in are still stored). A conditional create (`ifNoneExist:
identifier=system|value`) that matches an entry returns it and writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import msgspec

from medledger.client.sdk import LedgerClient
from medledger.crypto.keys import KeyPair
from medledger.fhir.outcome import invalid, not_found
from medledger.fhir.search import (
    METADATA,
    PATIENT,
    SearchQuery,
    metadata_matches,
    reference_type,
    rfc3339,
    sort_items,
)
from medledger.ledger.directory import (
    DIRECTORY_TYPES,
    ENTRY_ID,
    MAX_ENTRIES_PER_TX,
    DirectoryEntry,
    DirectoryWrite,
    EntryStatus,
    PutDirectoryEntries,
)
from medledger.validation import validate_resource

Json = dict[str, Any]

# Types that are always directory data; Medication and Device are directory data only when
# no patient's record is about them (see the gateway).
DIRECTORY_ONLY_TYPES = frozenset({"Organization", "Practitioner", "PractitionerRole", "Location"})
assert DIRECTORY_ONLY_TYPES <= DIRECTORY_TYPES
STATUS_TAG = "urn:medledger:record-status"
# A directory.put is filled up to three quarters of the chain's max_tx_bytes, leaving room for
# the envelope and the framing of the entries.


class DirectoryEntries(msgspec.Struct, frozen=True):
    latest: DirectoryEntry
    versions: list[DirectoryEntry]


def canonical(resource: Mapping[str, Any]) -> bytes:
    """The one byte form the ledger accepts (as `validation` writes canonical JSON)."""
    return json.dumps(
        resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def served(entry: DirectoryEntry) -> Json:
    """The resource as the API serves it: meta from the ledger."""
    resource: Json = json.loads(entry.resource)
    meta = dict(resource.get("meta") or {})
    meta["versionId"] = str(entry.version)
    meta["lastUpdated"] = rfc3339(entry.time_ns)
    if entry.status is EntryStatus.ENTERED_IN_ERROR:
        tags = [t for t in meta.get("tag", []) if t.get("system") != STATUS_TAG]
        tags.append({"system": STATUS_TAG, "code": "entered-in-error"})
        meta["tag"] = tags
    resource["meta"] = meta
    return resource


def conditional_target(reference: str) -> tuple[str, str] | None:
    """(type, system|value) of `Type?identifier=system|value` naming a directory type."""
    resource_type, mark, query = reference.partition("?")
    if not mark or resource_type not in DIRECTORY_TYPES:
        return None
    name, equals, value = query.partition("=")
    if name != "identifier" or not equals or "&" in value:
        return None
    value = unquote(value)
    return (resource_type, value) if "|" in value else None


def if_none_exist_identifier(condition: str) -> str | None:
    """system|value of an `ifNoneExist: identifier=system|value` condition."""
    name, equals, value = condition.partition("=")
    if name != "identifier" or not equals or "&" in value:
        return None
    value = unquote(value)
    return value if "|" in value else None


def identifiers_of(resource: Mapping[str, Any]) -> list[str]:
    found = []
    for item in resource.get("identifier") or []:
        if isinstance(item, dict) and isinstance(item.get("value"), str) and item["value"]:
            system = item.get("system") if isinstance(item.get("system"), str) else ""
            found.append(f"{system}|{item['value']}")
    return found


class Directory:
    """Directory reads over one node's ledger client."""

    def __init__(self, ledger: LedgerClient) -> None:
        self.ledger = ledger

    def entry(self, resource_type: str, entry_id: str) -> DirectoryEntries | None:
        return self.ledger.query_found(
            "/directory/entry", f"{resource_type}/{entry_id}", DirectoryEntries
        )

    def by_identifier(self, resource_type: str, identifier: str) -> DirectoryEntry | None:
        return self.ledger.query_found(
            "/directory/identifier", f"{resource_type}\n{identifier}", DirectoryEntry
        )

    def entries(self, resource_type: str) -> list[DirectoryEntry]:
        found: list[DirectoryEntry] = self.ledger.query(
            "/directory/entries", resource_type, list[DirectoryEntry]
        )
        return found

    def fits_with_records(self, writes: Sequence[DirectoryWrite]) -> bool:
        """Whether `writes` fit in a quarter of a transaction (the records take the rest), so
        that a FHIR transaction can write them in its `record.put-bundle`."""
        max_tx_bytes = int(self.ledger.query("/params")["max_tx_bytes"])
        return len(batches(writes, max_tx_bytes // 4)) <= 1

    def write(self, keys: KeyPair, sender: str, writes: Sequence[DirectoryWrite]) -> None:
        """Commit `writes` in order, in as few `directory.put` transactions as the chain's
        size bound allows (each transaction all or none)."""
        max_tx_bytes = int(self.ledger.query("/params")["max_tx_bytes"])
        for batch in batches(writes, max_tx_bytes * 3 // 4):
            self.ledger.submit(
                keys, "directory.put", PutDirectoryEntries(tuple(batch)), sender=sender
            )


def batches(writes: Iterable[DirectoryWrite], max_bytes: int) -> list[list[DirectoryWrite]]:
    """`writes` in order, in batches of at most MAX_ENTRIES_PER_TX entries and about
    `max_bytes`."""
    out: list[list[DirectoryWrite]] = []
    size = 0
    for write in writes:
        cost = len(write.resource) + len(write.entry_id) + 64
        if not out or len(out[-1]) >= MAX_ENTRIES_PER_TX or size + cost > max_bytes:
            out.append([])
            size = 0
        out[-1].append(write)
        size += cost
    return out


# --- the interactions ---------------------------------------------------------------------------


# What an Observation may be about, besides a patient, as directory data (R4 also allows a
# Group: a group of patients is patient data of no single patient, and is refused).
NON_PATIENT_SUBJECTS = frozenset({"Device", "Location"})


def subject_type(resource: Mapping[str, Any], types: Mapping[str, str] | None = None) -> str:
    """The resource type an Observation's subject names: from a literal or conditional
    reference (`Device/x`, `Location?identifier=...`) or, in a transaction, from the type of the
    entry whose fullUrl it names (`types`)."""
    subject = resource.get("subject")
    reference = subject.get("reference") if isinstance(subject, Mapping) else None
    if not isinstance(reference, str):
        return ""
    if types and reference in types:
        return types[reference]
    if "?" in reference:  # conditional: Type?identifier=...
        return reference.split("?", 1)[0].rsplit("/", 1)[-1]
    return reference_type(reference) or ""


def is_directory_data(
    resource_type: str, resource: Mapping[str, Any], types: Mapping[str, str] | None = None
) -> bool:
    """Whether a resource goes to the directory rather than a patient's records: the
    directory types always; a Device only when it names no patient; an Observation when its
    subject is a Device or a Location; a Medication sent on its own (in a transaction, one that
    a patient's record refers to is that patient's record)."""
    if resource_type in DIRECTORY_ONLY_TYPES or resource_type == "Medication":
        return True
    if resource_type == "Observation":
        return subject_type(resource, types) in NON_PATIENT_SUBJECTS
    return resource_type == "Device" and not isinstance(resource.get("patient"), dict)


def new_write(resource: Json, entry_id: str, previous: int = 0) -> DirectoryWrite:
    """The ledger write for a validated resource under `entry_id`."""
    resource = dict(resource)
    resource["id"] = entry_id
    stored = validate_resource(resource).resource
    return DirectoryWrite(stored["resourceType"], entry_id, canonical(stored), previous)


def existing_entry(
    directory: Directory, resource_type: str, condition: str
) -> DirectoryEntry | None:
    """The entry a conditional create (`identifier=system|value`) matches, or None."""
    identifier = if_none_exist_identifier(condition)
    if identifier is None:
        raise invalid(
            f"conditional create on {resource_type} takes identifier=system|value, not"
            f" {condition!r}"
        )
    return directory.by_identifier(resource_type, identifier)


def read_entry(
    directory: Directory, resource_type: str, entry_id: str, vid: int = 0
) -> DirectoryEntry:
    found = directory.entry(resource_type, entry_id) if ENTRY_ID.fullmatch(entry_id) else None
    if found is None:
        raise not_found(f"{resource_type}/{entry_id} is not known")
    if not vid:
        return found.latest
    version = next((v for v in found.versions if v.version == vid), None)
    if version is None:
        raise not_found(f"{resource_type}/{entry_id} has no version {vid}")
    return version


def resolve_references(
    value: Any,
    directory: Directory,
    local: Mapping[tuple[str, str], str],
    committed: dict[tuple[str, str], str | None] | None = None,
) -> Any:
    """`value` with every conditional reference to a directory type that names an entry (one
    of the transaction's new entries in `local`, else a committed one) as `<Type>/<id>`.
    `committed` remembers the committed lookups across calls: a transaction's entries name the
    same few practitioners, organizations and locations again and again (a Synthea patient
    file: ~1,000 conditional references to a dozen entries)."""
    if committed is None:
        committed = {}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                target = conditional_target(item)
                if target is not None:
                    named = local.get(target)
                    if named is None:
                        if target not in committed:
                            entry = directory.by_identifier(*target)
                            committed[target] = entry.entry_id if entry is not None else None
                        named = committed[target]
                    if named is not None:
                        item = f"{target[0]}/{named}"
                out[key] = item
            else:
                out[key] = resolve_references(item, directory, local, committed)
        return out
    if isinstance(value, list):
        return [resolve_references(item, directory, local, committed) for item in value]
    return value


def search_entries(directory: Directory, query: SearchQuery) -> list[DirectoryEntry]:
    """The active entries of the query's type that match every criterion, in id order (or as
    `_sort` asks)."""
    now = datetime.now(UTC)
    found = []
    for entry in directory.entries(query.resource_type):
        if entry.status is not EntryStatus.ACTIVE:
            continue
        if not all(
            metadata_matches(c, entry.entry_id, entry.time_ns, "", now) for c in query.by(METADATA)
        ):
            continue
        resource = json.loads(entry.resource)
        # An Observation's subject (Device/x, Location/y) is matched on the entry as well.
        if query.matches(resource, now) and all(
            c.matches(resource, now) for c in query.by(PATIENT)
        ):
            found.append((entry, resource))
    ordered = sort_items(
        found,
        query.sort,
        metadata=lambda item: (item[0].time_ns, item[0].entry_id),
        content=lambda item: item[1],
    )
    return [entry for entry, _ in ordered]
