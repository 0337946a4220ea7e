"""The shared directory on the ledger: `directory.put` writes signed entries (not PHI) that every
node serves; the entry's organization alone writes later versions; identifiers are unique per
type; shape, size and nesting bounds hold; the queries answer what was committed."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec
import pytest
from conftest import Consortium, keys_for

from medledger.abci.queries import answer
from medledger.crypto.keys import KeyPair
from medledger.ledger.bundle import PutBundle
from medledger.ledger.directory import (
    MAX_ENTRY_BYTES,
    DirectoryEntry,
    DirectoryWrite,
    EntryStatus,
    PutDirectoryEntries,
)
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.model import Role
from medledger.ledger.records import PutRecord
from medledger.ledger.transactions import EnrollMember

NPI = "http://hl7.org/fhir/sid/us-npi"


def canonical(resource: dict[str, Any]) -> bytes:
    return json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def practitioner(entry_id: str, npi: str, family: str = "Okafor") -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "id": entry_id,
        "identifier": [{"system": NPI, "value": npi}],
        "name": [{"family": family}],
    }


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def put(
    resource: dict[str, Any], previous: int = 0, *, retire: bool = False
) -> PutDirectoryEntries:
    write = DirectoryWrite(
        resource["resourceType"], resource["id"], canonical(resource), previous, retire
    )
    return PutDirectoryEntries((write,))


def member(c: Consortium, org: str, role: Role) -> KeyPair:
    keys = keys_for(f"{org}/{role}")
    body = EnrollMember(keys.verify_key, keys.encryption_key, role)
    assert c.submit(c.admin(org), "member.enroll", body).ok
    return keys


def query(c: Consortium, path: str, data: str) -> Any:
    return msgspec.json.decode(answer(c.chain.store, path, data.encode(), False))


def test_an_organization_writes_entries_every_node_reads(consortium: Consortium) -> None:
    c = consortium
    ehr = member(c, "st-mary", Role.EHR)
    result = c.submit(ehr, "directory.put", put(practitioner("dr-okafor", "9999000001")))
    assert result.ok, result.log
    raw = answer(c.chain.store, "/directory/entry", b"Practitioner/dr-okafor", False)
    entry = msgspec.json.decode(raw, type=dict[str, Any])["latest"]
    entry = msgspec.convert(entry, DirectoryEntry)
    assert entry.organization == "st-mary" and entry.author == ehr.member_id
    assert entry.version == 1 and entry.status is EntryStatus.ACTIVE
    assert json.loads(entry.resource) == practitioner("dr-okafor", "9999000001")
    assert entry.identifiers == (f"{NPI}|9999000001",)
    found = query(c, "/directory/identifier", f"Practitioner\n{NPI}|9999000001")
    assert found["entry_id"] == "dr-okafor"
    assert [e["entry_id"] for e in query(c, "/directory/entries", "Practitioner")] == ["dr-okafor"]

    # A new version by the same organization (another of its members) moves the identifier.
    clinician = member(c, "st-mary", Role.CLINICIAN)
    moved = practitioner("dr-okafor", "9999000002")
    assert c.submit(clinician, "directory.put", put(moved, previous=1)).ok
    history = query(c, "/directory/entry", "Practitioner/dr-okafor")["versions"]
    assert [v["version"] for v in history] == [1, 2]
    with pytest.raises(LedgerError):
        query(c, "/directory/identifier", f"Practitioner\n{NPI}|9999000001")
    assert query(c, "/directory/identifier", f"Practitioner\n{NPI}|9999000002")["version"] == 2


def test_another_organization_patients_and_auditors_are_refused(consortium: Consortium) -> None:
    c = consortium
    ehr = member(c, "st-mary", Role.EHR)
    assert c.submit(ehr, "directory.put", put(practitioner("dr-a", "1"))).ok
    # Another organization's member may not write St. Mary's entry...
    other = member(c, "riverside", Role.EHR)
    refused = c.submit(other, "directory.put", put(practitioner("dr-a", "1", "Changed"), 1))
    assert refused.code is Code.UNAUTHORIZED and "belongs to organization st-mary" in refused.log
    # ... nor retire it.
    retired = c.submit(other, "directory.put", put(practitioner("dr-a", "1"), 1, retire=True))
    assert retired.code is Code.UNAUTHORIZED
    # Patients, billing staff and auditors curate nothing.
    for role in (Role.PATIENT, Role.BILLING, Role.AUDITOR):
        keys = member(c, "st-mary", role)
        result = c.submit(keys, "directory.put", put(practitioner(f"dr-{role}", f"x-{role}")))
        assert result.code is Code.UNAUTHORIZED, role
    assert query(c, "/directory/entry", "Practitioner/dr-a")["latest"]["version"] == 1


def test_identifiers_are_unique_per_type(consortium: Consortium) -> None:
    c = consortium
    ehr = member(c, "st-mary", Role.EHR)
    assert c.submit(ehr, "directory.put", put(practitioner("dr-a", "77"))).ok
    taken = c.submit(ehr, "directory.put", put(practitioner("dr-b", "77")))
    assert taken.code is Code.CONFLICT and "already names Practitioner/dr-a" in taken.log
    # The same identifier on an Organization is another type's: allowed.
    organization = {
        "resourceType": "Organization",
        "id": "org-77",
        "identifier": [{"system": NPI, "value": "77"}],
    }
    assert c.submit(ehr, "directory.put", put(organization)).ok
    # Retiring an entry releases its identifiers.
    assert c.submit(ehr, "directory.put", put(practitioner("dr-a", "77"), 1, retire=True)).ok
    latest = query(c, "/directory/entry", "Practitioner/dr-a")["latest"]
    assert latest["status"] == "entered-in-error"
    assert c.submit(ehr, "directory.put", put(practitioner("dr-b", "77"))).ok


def test_versions_are_checked(consortium: Consortium) -> None:
    c = consortium
    ehr = member(c, "st-mary", Role.EHR)
    assert c.submit(ehr, "directory.put", put(practitioner("dr-a", "1"))).ok
    again = c.submit(ehr, "directory.put", put(practitioner("dr-a", "1")))
    assert again.code is Code.CONFLICT and "is at version 1, not 0" in again.log
    missing = c.submit(ehr, "directory.put", put(practitioner("dr-z", "9"), 1))
    assert missing.code is Code.NOT_FOUND


def test_entries_of_one_transaction_are_all_or_none(consortium: Consortium) -> None:
    c = consortium
    ehr = member(c, "st-mary", Role.EHR)
    good = put(practitioner("dr-1", "a")).entries[0]
    bad = DirectoryWrite("Patient", "p-1", canonical({"resourceType": "Patient", "id": "p-1"}))
    result = c.submit(ehr, "directory.put", PutDirectoryEntries((good, bad)))
    assert result.code is Code.INVALID_BODY and result.log.startswith("entry 1:")
    assert "is not a directory type" in result.log
    assert query(c, "/directory/entries", "Practitioner") == []


@pytest.mark.parametrize(
    ("write", "code", "text"),
    [
        (DirectoryWrite("Practitioner", "a/b", b"{}"), Code.INVALID_BODY, "entry_id"),
        (DirectoryWrite("Practitioner", "a", b"not json"), Code.INVALID_BODY, "not JSON"),
        (DirectoryWrite("Practitioner", "a", b"[1]"), Code.INVALID_BODY, "not a JSON object"),
        (DirectoryWrite("Practitioner", "a", b"\xff"), Code.INVALID_BODY, "not UTF-8"),
        (
            DirectoryWrite("Practitioner", "a", b'{"id": "a", "resourceType": "Practitioner"}'),
            Code.INVALID_BODY,
            "canonical JSON",
        ),
        (
            DirectoryWrite("Practitioner", "a", canonical({"resourceType": "Location", "id": "a"})),
            Code.INVALID_BODY,
            "not a Practitioner",
        ),
        (
            DirectoryWrite(
                "Practitioner", "a", canonical({"resourceType": "Practitioner", "id": "x"})
            ),
            Code.INVALID_BODY,
            "id must be",
        ),
        (
            DirectoryWrite(
                "Practitioner",
                "a",
                canonical({"resourceType": "Practitioner", "id": "a", "x": deep(40)}),
            ),
            Code.INVALID_BODY,
            "nests deeper",
        ),
        (
            DirectoryWrite(
                "Practitioner",
                "a",
                canonical({"resourceType": "Practitioner", "id": "a", "t": "x" * MAX_ENTRY_BYTES}),
            ),
            Code.TOO_LARGE,
            "bytes",
        ),
        (
            DirectoryWrite(
                "Practitioner",
                "a",
                canonical(
                    {"id": "a", "identifier": {"value": "1"}, "resourceType": "Practitioner"}
                ),
            ),
            Code.INVALID_BODY,
            "identifier",
        ),
        (
            DirectoryWrite(
                "Practitioner", "a", b'{"id":"a","resourceType":"Practitioner","x":1e400}'
            ),
            Code.INVALID_BODY,
            "cannot hold",
        ),
    ],
)
def test_bad_entries_are_refused(
    consortium: Consortium, write: DirectoryWrite, code: Code, text: str
) -> None:
    ehr = member(consortium, "st-mary", Role.EHR)
    result = consortium.submit(ehr, "directory.put", PutDirectoryEntries((write,)))
    assert result.code is code and text in result.log, result.log


def test_queries_refuse_unknown_types_and_missing_entries(consortium: Consortium) -> None:
    store = consortium.chain.store
    with pytest.raises(LedgerError) as unknown:
        answer(store, "/directory/entries", b"Patient", False)
    assert unknown.value.code is Code.INVALID_BODY
    with pytest.raises(LedgerError) as missing:
        answer(store, "/directory/entry", b"Organization/none", False)
    assert missing.value.code is Code.NOT_FOUND


def observation(record_id: str, patient_id: str) -> PutRecord:
    return PutRecord(
        record_id=record_id,
        patient=patient_id,
        resource_type="Observation",
        category="laboratory",
        package_digest=hashlib.sha256(record_id.encode()).hexdigest(),
        package_size=2048,
        commitment=hashlib.sha256(b"c" + record_id.encode()).digest(),
        threshold=2,
        custodians=("careplus", "northside-lab", "riverside", "st-mary"),
    )


def test_entries_of_a_fhir_transaction_are_kept_only_with_its_records(
    consortium: Consortium,
) -> None:
    """A transaction Bundle's directory entries ride in its record.put-bundle: a refused record
    leaves no entry behind; committed records bring their entries."""
    c = consortium
    ehr = member(c, "st-mary", Role.EHR)
    patient = member(c, "st-mary", Role.PATIENT)
    (entry,) = put(practitioner("dr-ade", "9999000077")).entries

    root = c.chain.store.state_root()
    refused = PutBundle((observation("obs-1", "no-such-patient"),), (entry,))
    result = c.submit(ehr, "record.put-bundle", refused)
    assert not result.ok and "entry 0" in result.log
    assert c.chain.store.state_root() == root
    with pytest.raises(LedgerError, match="no directory entry"):
        answer(c.chain.store, "/directory/entry", b"Practitioner/dr-ade", False)

    bad_entry = PutBundle(
        (observation("obs-2", patient.member_id),), (DirectoryWrite("Patient", "p", b"{}"),)
    )
    result = c.submit(ehr, "record.put-bundle", bad_entry)
    assert not result.ok and result.log.startswith("directory entry 0")
    assert c.chain.store.state_root() == root

    stored = PutBundle((observation("obs-3", patient.member_id),), (entry,))
    result = c.submit(ehr, "record.put-bundle", stored)
    assert result.ok, result.log
    assert result.log == "1 directory entries; 1 records stored"
    assert query(c, "/directory/entry", "Practitioner/dr-ade")["latest"]["version"] == 1


def test_a_bundle_enrolls_its_new_patients_with_its_records_all_or_nothing(
    consortium: Consortium,
) -> None:
    """The patients a FHIR transaction registers are enrolled by its own record.put-bundle
    (one block), by an EHR client only, as patients only; a refusal anywhere leaves no patient
    and no record."""
    c = consortium
    ehr = member(c, "st-mary", Role.EHR)
    clinician = member(c, "st-mary", Role.CLINICIAN)
    new = keys_for("bundle/new-patient")
    enroll = EnrollMember(new.verify_key, new.encryption_key, Role.PATIENT)
    records = (observation("obs-new-1", new.member_id), observation("obs-new-2", new.member_id))
    root = c.chain.store.state_root()

    def refused(who: KeyPair, body: PutBundle, code: Code, words: str) -> None:
        result = c.submit(who, "record.put-bundle", body)
        assert result.code == code and words in result.log, result.log
        assert c.chain.store.state_root() == root  # nothing enrolled, nothing stored
        with pytest.raises(LedgerError):
            answer(c.chain.store, "/member", new.member_id.encode(), False)

    # A clinician writes records but registers no one; nor does anyone through a Bundle
    # enroll a clinician, or more than a Bundle's worth of patients.
    refused(clinician, PutBundle(records, patients=(enroll,)), Code.UNAUTHORIZED, "enroll")
    as_clinician = EnrollMember(new.verify_key, new.encryption_key, Role.CLINICIAN)
    refused(ehr, PutBundle(records, patients=(as_clinician,)), Code.INVALID_BODY, "patients only")
    crowd = tuple(
        EnrollMember(k.verify_key, k.encryption_key, Role.PATIENT)
        for k in (keys_for(f"bundle/crowd-{i}") for i in range(101))
    )
    refused(ehr, PutBundle(records, patients=crowd), Code.INVALID_BODY, "at most 100")
    # A refused record refuses the enrollment with it.
    stray = (*records, observation("obs-stray", "no-such-patient"))
    refused(ehr, PutBundle(stray, patients=(enroll,)), Code.NOT_FOUND, "entry 2")

    result = c.submit(ehr, "record.put-bundle", PutBundle(records, patients=(enroll,)))
    assert result.ok, result.log
    assert result.log == "1 patients enrolled; 2 records stored"
    enrolled = query(c, "/member", new.member_id)
    assert (enrolled["role"], enrolled["organization"]) == ("patient", "st-mary")
    # The same patient twice is a conflict, and the Bundle's record is refused with it.
    again = PutBundle((observation("obs-new-3", new.member_id),), patients=(enroll,))
    result = c.submit(ehr, "record.put-bundle", again)
    assert result.code == Code.CONFLICT and result.log.startswith("patient 0:"), result.log
    with pytest.raises(LedgerError):
        answer(c.chain.store, "/record", b"obs-new-3", False)
