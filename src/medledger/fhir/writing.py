"""Writing records: create, update, conditional references to patients, the shared directory
(Organization, Practitioner, ...) and FHIR DELETE."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from medledger.client.sdk import TxRejected
from medledger.crypto.keys import KeyPair
from medledger.fhir.capability import (
    CONDITIONAL_UPDATE_TYPES,
    RECORD_TYPES,
)
from medledger.fhir.claim_history import HISTORY_TYPES
from medledger.fhir.directory import (
    DIRECTORY_ONLY_TYPES,
    Directory,
    existing_entry,
    is_directory_data,
    new_write,
    read_entry,
    resolve_references,
    search_entries,
    served,
)
from medledger.fhir.outcome import (
    FhirError,
    business_rule,
    forbidden,
    information,
    invalid,
    not_supported,
)
from medledger.fhir.plumbing import (
    CONTEXT_BOUND_TYPES,
    Caller,
    Json,
    Reply,
    etag,
    http_date,
    parse_etag,
    patient_element,
    strip_server_meta,
    with_meta,
)
from medledger.fhir.search import (
    SearchError,
    SearchQuery,
    Token,
    parse_token,
    reference_id,
    reference_type,
)
from medledger.fhir.searching import Searching
from medledger.ledger.directory import (
    DIRECTORY_TYPES,
    DirectoryEntry,
    DirectoryWrite,
    EntryStatus,
)
from medledger.ledger.errors import Code
from medledger.ledger.model import Role
from medledger.ledger.records import (
    RecordStatus,
    RecordVersion,
)
from medledger.ledger.transactions import EnrollMember
from medledger.validation import validate_resource


class Writing(Searching):
    # --- writing ---------------------------------------------------------------------------

    def incoming(self, resource_type: str, body: Any, *, in_transaction: bool = False) -> Json:
        """The body of a create or update, checked to be a resource this node stores (Claims
        and ExplanationOfBenefits only in a transaction: see `fhir.claim_history`)."""
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object (a FHIR resource)")
        if body.get("resourceType") != resource_type:
            raise invalid(
                f"the body is a {body.get('resourceType')!r}, not a {resource_type}",
                ["resourceType"],
            )
        stored = resource_type in RECORD_TYPES or resource_type in DIRECTORY_TYPES
        if not stored and not (in_transaction and resource_type in HISTORY_TYPES):
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
                if reference_type(reference) == "Group":
                    raise business_rule(
                        f"{where}: a Group is not stored here — data about a group of patients"
                        " belongs to no one patient's records and consent; send one resource per"
                        " patient (an Observation about a Device or Location goes to the"
                        " shared directory)"
                    )
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
        keys = self.patient_keys_in_custody()
        tx_hash = self.send_enrollment(caller, keys)
        caller.client.ledger.outcome_of(tx_hash, caller.client.member_id)
        return keys

    def patient_keys_in_custody(self) -> KeyPair:
        """Keys for a new patient, held in this node's custody (not enrolled yet)."""
        return self.ctx.custody.create(f"patient-{uuid.uuid4()}")

    def send_enrollment(self, caller: Caller, keys: KeyPair) -> str:
        """The hash of the patient's enrollment by the EHR member, sent but not waited for:
        the member's next transaction (its records) may follow it into the same block."""
        body = EnrollMember(keys.verify_key, keys.encryption_key, Role.PATIENT)
        return caller.client.ledger.send(
            caller.client.keys, "member.enroll", body, sender=caller.client.member_id
        )

    def written(self, caller: Caller, record_id: str, version: int) -> RecordVersion:
        history = caller.client.history(record_id)
        return next(v for v in history.versions if v.version == version)

    def write_reply(
        self, caller: Caller, status: int, resource: Json, version: RecordVersion
    ) -> Reply:
        reply = self.resource_reply(status, with_meta(resource, version), version, location=True)
        return as_preferred(
            caller,
            reply,
            f"{version.resource_type}/{version.record_id} version {version.version} committed"
            f" at height {version.height}",
        )

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

    def conditional_target(self, caller: Caller, resource_type: str, condition: str) -> str | None:
        """The id a conditional update (`PUT <Type>?identifier=system|value`) names: the
        patient the identifier names in this node's patient index, or the directory entry
        holding it; None when nothing does (the update then creates). Conditional update is
        offered where identifiers are unique on the ledger: Patient and the directory types
        (so more than one match, HAPI's 412, cannot happen)."""
        if resource_type == "Patient":
            return self.conditional_patient(condition)
        if resource_type in DIRECTORY_ONLY_TYPES:
            found = existing_entry(self.directory(caller), resource_type, condition)
            return None if found is None else found.entry_id
        raise not_supported(
            f"conditional update is supported on {', '.join(sorted(CONDITIONAL_UPDATE_TYPES))}"
            " (identifier=system|value): update a record by its id",
            400,
        )

    def conditional_update(
        self, caller: Caller, resource_type: str, condition: str, body: Any, if_match: str | None
    ) -> Reply:
        """`PUT <Type>?identifier=system|value`, as HAPI FHIR does it: the resource the
        identifier names is updated (200); when none, the body is created (201)."""
        found = self.conditional_target(caller, resource_type, condition)
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object (a FHIR resource)")
        if found is None:
            if body.get("id"):
                raise invalid(
                    f"nothing matches {resource_type}?{condition}; a new resource's id is"
                    " assigned by the server (leave id out)",
                    ["id"],
                )
            return self.create(caller, resource_type, body, condition)
        if body.get("id") not in (None, found):
            raise invalid(
                f"{resource_type}?{condition} names {resource_type}/{found}, not the body's id",
                ["id"],
            )
        return self.update(caller, resource_type, found, {**body, "id": found}, if_match)

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
        return as_preferred(
            caller,
            reply,
            f"{entry.resource_type}/{entry.entry_id} version {entry.version} committed at"
            f" height {entry.height}",
        )

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


def as_preferred(caller: Caller, reply: Reply, committed: str) -> Reply:
    """A write's reply as the client's `Prefer: return=` asks: the resource (the default),
    nothing, or an OperationOutcome saying what was committed."""
    preference = caller.prefer.get("return", "representation")
    if preference == "minimal":
        reply.body = None
    elif preference.lower() == "operationoutcome":
        reply.body = information(committed)
    return reply
