"""From an HL7 v2 message to the ledger and back to an acknowledgement.

ORU^R01 results are written as below; ADT messages register, update or merge patients
(`medledger.hl7.adt`) through the node's registration member and its patient index. A message
sent again with the same sender, control id and content is answered again with its first
acknowledgement and writes nothing.

A message is parsed, checked, its patients resolved through the node's patient index, mapped
to FHIR and validated; then its records are sealed, uploaded and committed in one
`record.put-many` transaction authored by the laboratory system's custodial member, and the
answer is AA. A record already on the ledger under its derived id is compared with the new
content (the author can open its own key envelope): an unchanged one is not written again (a
retransmitted message is acknowledged without a second write), a changed one — a corrected or
final result after a preliminary one — is written as an amendment of that record.

Any failure before the commit writes nothing: AR for a message that is not an acceptable
ORU^R01, AE for content that cannot be recorded or a ledger that refuses the transaction (its
reason in the NAK). Packages sealed and uploaded for a transaction the ledger then refuses stay
unreferenced in the node's package store; no record points to them.

Messages from different connections are processed side by side. The upsert decision reads the
ledger, and two messages about the same order must not decide on the same state: the decision
and the commit hold a lock on each record id the message writes (ids derive from the sender and
the order), so messages about the same records take turns and all others do not wait.

Before anything is parsed a message is held to the node's bounds (`hl7.bounds`); after its MSH is
read, to the sender allow-list; a patient is matched on the assigning authority and value of a
PID-3 identifier, never on a bare value that another authority may have issued to someone else,
unless the operator asked for that (`match_without_authority`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, Protocol

import hl7  # type: ignore[import-untyped]

from medledger.client.errors import classify
from medledger.client.records import RecordsClient
from medledger.client.sdk import ClientError, QueryError, TxRejected
from medledger.crypto.package import PackageError
from medledger.hl7.ack import build_ack, build_bare_ack
from medledger.hl7.adt import (
    MERGE_TRIGGERS,
    UPDATE_TRIGGERS,
    AdtMessage,
    PatientRegistry,
    check_adt_header,
    patient_resource,
    read_adt,
    records_patient,
)
from medledger.hl7.bounds import check_bounds, loggable, summary, withhold_library_content
from medledger.hl7.oru import (
    DEFAULT_PROCESSING_IDS,
    AckCode,
    ErrorLocation,
    Header,
    Hl7Error,
    Hl7Warning,
    MappedRecord,
    PatientIdentifier,
    PatientResults,
    check_header,
    map_message,
    normalize_segments,
    parse_message,
    read_header,
    read_oru,
    resolve_patient,
    trigger_warning,
)
from medledger.ledger.errors import Code
from medledger.ledger.records import PutRecord, PutRecords, RecordStatus
from medledger.validation import FhirValidationError, validate_resource


def ack_for(error: ClientError) -> AckCode:
    """AR (send again later) for what is transient — the network, a mempool that is full —
    and AE for a refusal the message would meet again (`medledger.client.errors`)."""
    return AckCode.REJECT if classify(error).transient else AckCode.ERROR


log = logging.getLogger("medledger.hl7")
withhold_library_content()


class PatientLookup(Protocol):
    """The node's patient index (`medledger.services.mpi.PatientIndex`)."""

    def resolve(self, system: str, value: str) -> str | None: ...

    def resolve_any(self, value: str) -> str | None: ...

    def link(self, system: str, value: str, patient: str) -> None: ...

    def reassign(self, system: str, value: str, patient: str) -> str | None: ...


@dataclass(frozen=True)
class StoredRecord:
    """The latest version of a record already on the ledger."""

    patient: str
    version: int
    erased: bool
    current: bool = True  # False when the latest version was marked entered-in-error


class RecordWriter(Protocol):
    """What the processor needs of the ledger, as one custodial member."""

    def stored(self, record_id: str) -> StoredRecord | None: ...

    def content(self, record_id: str) -> dict[str, Any] | None: ...

    def seal(
        self, resource: dict[str, Any], patient: str, record_id: str, previous: int
    ) -> PutRecord: ...

    def commit(self, records: list[PutRecord]) -> str: ...


class LedgerRecordWriter:
    """A RecordWriter through the SDK: sealed packages uploaded to the node, one
    `record.put-many` transaction."""

    def __init__(self, client: RecordsClient) -> None:
        self.client = client

    def stored(self, record_id: str) -> StoredRecord | None:
        try:
            history = self.client.history(record_id)
        except QueryError as exc:
            if exc.code == Code.NOT_FOUND:
                return None
            raise
        latest = next((v for v in history.versions if v.version == history.head.latest), None)
        current = latest is None or latest.status is not RecordStatus.ENTERED_IN_ERROR
        return StoredRecord(history.head.patient, history.head.latest, history.head.erased, current)

    def content(self, record_id: str) -> dict[str, Any] | None:
        """The latest version's resource when this member can open it (it wrote it)."""
        try:
            return self.client.read_own(record_id).resource
        except (ClientError, PackageError, ValueError):
            return None

    def seal(
        self, resource: dict[str, Any], patient: str, record_id: str, previous: int
    ) -> PutRecord:
        return self.client.seal_and_upload(
            resource, patient, record_id, version=previous + 1, previous=previous
        )

    def commit(self, records: list[PutRecord]) -> str:
        outcome = self.client.ledger.submit(
            self.client.keys,
            "record.put-many",
            PutRecords(tuple(records)),
            sender=self.client.member_id,
        )
        return outcome.tx_hash


@dataclass(frozen=True)
class Outcome:
    """What became of one message: its acknowledgement and, when committed, what was
    written (record ids) and in which transaction."""

    code: AckCode
    control_id: str
    reason: str
    ack: str
    written: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    tx_hash: str = ""
    patients: tuple[str, ...] = field(default=())
    warnings: tuple[Hl7Warning, ...] = ()
    # The message asked for no acknowledgement (MSH-15/16): on its own it gets no answer; in a
    # batch its ack is still part of the batch acknowledgement.
    silent: bool = False

    @property
    def answer(self) -> str:
        """What is sent back for this message on its own: its ack, or nothing when silent."""
        return "" if self.silent else self.ack

    @property
    def accepted(self) -> bool:
        return self.code in (AckCode.ACCEPT, AckCode.COMMIT_ACCEPT)


class RecordLocks:
    """A lock per record id, held while a message decides on and commits its records; a lock
    lives only while some message holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def holding(self, record_ids: Iterable[str]) -> Iterator[None]:
        # Taken in sorted order, so that two messages sharing some records cannot deadlock.
        ids = sorted(set(record_ids))
        with self._guard:
            locks = []
            for record_id in ids:
                lock, users = self._locks.get(record_id, (threading.Lock(), 0))
                self._locks[record_id] = (lock, users + 1)
                locks.append(lock)
        taken: list[threading.Lock] = []
        try:
            for lock in locks:
                lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()
            with self._guard:
                for record_id in ids:
                    lock, users = self._locks[record_id]
                    if users == 1:
                        del self._locks[record_id]
                    else:
                        self._locks[record_id] = (lock, users - 1)

    def contended(self) -> int:
        """How many records a message waits for (another holds them)."""
        with self._guard:
            return sum(1 for _, users in self._locks.values() if users > 1)


@dataclass(frozen=True)
class _Committed:
    written: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    tx_hash: str = ""
    patients: tuple[str, ...] = ()
    warnings: tuple[Hl7Warning, ...] = ()
    summary: str = ""


Authorities = Mapping[tuple[str, str], Mapping[str, str]]
UNKNOWN_PATIENT_POLICIES = ("refuse", "register")
ANSWERED_KEPT = 4096


class Hl7Processor:
    """Processes ORU^R01 and ADT messages for one node, acting as its laboratory system's
    member (results) and its registration desk's member (patients, through `registry`).

    `allowed_senders` holds the (MSH-3, MSH-4) pairs that may send (None: any);
    `match_without_authority` lets a PID-3 identifier without an assigning authority match a
    patient on its value alone (when exactly one patient has that value under any authority);
    `processing_ids` the MSH-11 values accepted; `unknown_patients` what an ORU or an ADT
    update about a patient nobody registered does ("refuse": AE; "register": the PID registers
    the patient first); `authorities` maps each sender (MSH-3, MSH-4) to its assigning
    authorities' systems (see `PatientIdentifier.systems`).
    """

    def __init__(
        self,
        writer: Callable[[], RecordWriter],
        patients: PatientLookup,
        *,
        zone: tzinfo = UTC,
        application: str = "MEDLEDGER",
        facility: str = "",
        clock: Callable[[], datetime] | None = None,
        allowed_senders: frozenset[tuple[str, str]] | None = None,
        match_without_authority: bool = False,
        processing_ids: tuple[str, ...] = DEFAULT_PROCESSING_IDS,
        unknown_patients: str = "refuse",
        authorities: Authorities | None = None,
        registry: Callable[[], PatientRegistry] | None = None,
    ) -> None:
        if unknown_patients not in UNKNOWN_PATIENT_POLICIES:
            raise ValueError(f"unknown_patients must be one of {UNKNOWN_PATIENT_POLICIES}")
        self._writer = writer
        self._patients = patients
        self._registry = registry
        self.zone = zone
        self.application = application
        self.facility = facility
        self.allowed_senders = allowed_senders
        self.match_without_authority = match_without_authority
        self.processing_ids = processing_ids
        self.unknown_patients = unknown_patients
        self.authorities: Authorities = authorities or {}
        self._clock = clock or (lambda: datetime.now(UTC).astimezone())
        self.locks = RecordLocks()
        # Accepted messages by (MSH-3, MSH-4, MSH-10): a message sent again with the same
        # control id and content is acknowledged again, as it was, without a second write.
        self._answered: OrderedDict[tuple[str, str, str], tuple[str, Outcome]] = OrderedDict()
        self._answered_lock = threading.Lock()

    def clock(self) -> datetime:
        return self._clock()

    @staticmethod
    def _control_id() -> str:
        return str(hl7.generate_message_control_id())

    def reject_unreadable(self, text: str, error: Hl7Error) -> str:
        """The AR for bytes that are not a message this node can read (e.g. too large), or that
        it will not read (from a peer address that is not allowed)."""
        return self._bare_ack(text, error, self._control_id(), self._clock())

    def _bare_ack(self, text: str, error: Hl7Error, control_id: str, now: datetime) -> str:
        return build_bare_ack(
            text,
            error.ack,
            error,
            control_id=control_id,
            now=now,
            application=self.application,
            facility=self.facility,
        )

    def process(self, text: str) -> Outcome:
        """Parse, map, commit and acknowledge one message (never raises)."""
        try:
            return self._process(text)
        except Exception as exc:  # a defect here must still answer the sender
            log.error(
                "hl7 message processing failed", extra={**summary(text), **_log_exception(exc)}
            )
            error = Hl7Error(AckCode.ERROR, f"internal error: {type(exc).__name__}", "207")
            try:
                ack = self._bare_ack(text, error, self._control_id(), self._clock())
            except Exception:
                ack = self._bare_ack("", error, self._control_id(), self._clock())
            return Outcome(AckCode.ERROR, "", error.reason, ack)

    def _process(self, text: str) -> Outcome:
        now = self._clock()
        control_id = self._control_id()
        try:
            check_bounds(text)
            message = parse_message(text)
        except Hl7Error as error:
            log.info("hl7 message not parsed", extra={**summary(text), **_log_fields(error)})
            ack = self._bare_ack(text, error, control_id, now)
            return Outcome(error.ack, "", error.reason, ack)
        header = read_header(message)
        key = (header.sending_application, header.sending_facility, header.control_id)
        digest = hashlib.sha256(normalize_segments(text).encode("utf-8")).hexdigest()
        with self._answered_lock:
            answered = self._answered.get(key)
        if answered is not None and answered[0] == digest and header.control_id:
            log.info("hl7 message answered again", extra=_log_header(header))
            first = answered[1]
            return dataclasses.replace(
                first,
                reason="already answered: the same message with this control id was accepted",
                written=(),
                unchanged=first.written + first.unchanged,
                tx_hash="",
            )
        try:
            committed = self._commit(message, header)
        except Hl7Error as error:
            log.info(
                "hl7 message not accepted", extra={**_log_header(header), **_log_fields(error)}
            )
            code, send = _answer_code(header, error.ack)
            ack = build_ack(
                message,
                code,
                control_id=control_id,
                now=now,
                application=self.application,
                facility=self.facility,
                error=error,
            )
            return Outcome(code, header.control_id, error.reason, ack, silent=not send)
        written = committed.written
        reason = committed.summary or (
            f"{len(written)} records written"
            if written
            else "already recorded: the results are unchanged"
        )
        code, send = _answer_code(header, AckCode.ACCEPT)
        ack = build_ack(
            message,
            code,
            control_id=control_id,
            now=now,
            application=self.application,
            facility=self.facility,
            text="" if written and not committed.summary else reason,
            warnings=committed.warnings,
        )
        log.info(
            "hl7 message accepted",
            extra={**_log_header(header), "written": len(written), "tx": committed.tx_hash},
        )
        outcome = Outcome(
            code,
            header.control_id,
            reason,
            ack,
            written,
            committed.unchanged,
            committed.tx_hash,
            committed.patients,
            committed.warnings,
            silent=not send,
        )
        if header.control_id:
            with self._answered_lock:
                self._answered[key] = (digest, outcome)
                self._answered.move_to_end(key)
                while len(self._answered) > ANSWERED_KEPT:
                    self._answered.popitem(last=False)
        return outcome

    def _check_sender(self, header: Header) -> None:
        """AR unless MSH-3^MSH-4 is on the allow-list (when there is one)."""
        if self.allowed_senders is None:
            return
        if (header.sending_application, header.sending_facility) not in self.allowed_senders:
            raise Hl7Error(
                AckCode.REJECT,
                f"MSH-3/4: sender {loggable(header.sending_application)} at"
                f" {loggable(header.sending_facility)} is not allowed on this node",
                "207",
                ErrorLocation("MSH", 1, 3),
            )

    def _sender_authorities(self, header: Header) -> Mapping[str, str]:
        return self.authorities.get((header.sending_application, header.sending_facility), {})

    def _resolve(
        self,
        identifiers: tuple[PatientIdentifier, ...],
        sequence: int,
        header: Header,
        segment: str = "PID",
    ) -> str:
        """The ledger patient of a PID's identifiers. Without `match_without_authority`,
        identifiers that name no assigning authority (and that the sender's authority map does
        not place) are not used: the same MRN may belong to another patient of another
        authority."""
        authorities = self._sender_authorities(header)
        if self.match_without_authority:
            return resolve_patient(
                identifiers,
                self._patients.resolve,
                self._patients.resolve_any,
                sequence,
                authorities,
            )
        named = tuple(i for i in identifiers if i.systems(authorities))
        location = ErrorLocation(segment, sequence, 3 if segment == "PID" else 1)
        if not named:
            raise Hl7Error(
                AckCode.ERROR,
                f"{segment}-{location.field}: no patient identifier names its assigning"
                " authority (CX.4), and [hl7.authorities] maps none for this sender; this"
                " node matches patients on assigning authority and identifier",
                "101",
                location,
            )
        try:
            return resolve_patient(
                named, self._patients.resolve, _no_bare_match, sequence, authorities
            )
        except Hl7Error as error:
            if error.error_code != "204" or len(named) == len(identifiers):
                raise
            raise Hl7Error(
                error.ack,
                f"{error.reason} (identifiers without an assigning authority, PID-3.4, are"
                " not matched on this node)",
                error.error_code,
                error.location,
            ) from None

    def _known(
        self, identifiers: tuple[PatientIdentifier, ...], sequence: int, header: Header
    ) -> str | None:
        """The patient the identifiers name, None when none is known (AE on conflicts)."""
        try:
            return self._resolve(identifiers, sequence, header)
        except Hl7Error as error:
            if error.error_code == "204":
                return None
            raise

    def _commit(self, message: Any, header: Header) -> _Committed:
        self._check_sender(header)
        if header.message_type == "ADT":
            return self._commit_adt(message, header)
        check_header(header, self.processing_ids)
        oru = read_oru(message, header)
        warnings: list[Hl7Warning] = trigger_warning(header) + list(oru.warnings)
        patients = [self._patient_of(group, header, warnings) for group in oru.patients]
        records = map_message(oru, patients, self.zone, warnings)
        resources = [(record, _validated(record)) for record in records]
        try:
            with self.locks.holding(record.record_id for record in records):
                writer = self._writer()
                bodies: list[PutRecord] = []
                written: list[str] = []
                unchanged: list[str] = []
                for record, resource in resources:
                    previous = self._previous_version(writer, record, resource)
                    if previous is None:
                        unchanged.append(record.record_id)
                        continue
                    bodies.append(writer.seal(resource, record.patient, record.record_id, previous))
                    written.append(record.record_id)
                tx_hash = writer.commit(bodies) if bodies else ""
        except Hl7Error:
            raise
        except TxRejected as exc:
            raise Hl7Error(ack_for(exc), f"the ledger refused the results: {exc.log}") from None
        except ClientError as exc:
            raise Hl7Error(ack_for(exc), f"the results could not be recorded: {exc}") from None
        except (PackageError, FhirValidationError) as exc:
            raise Hl7Error(AckCode.ERROR, f"the results could not be recorded: {exc}") from None
        except Exception as exc:  # a custody or configuration problem of this node
            log.error(
                "hl7 message not recorded", extra={**_log_header(header), **_log_exception(exc)}
            )
            raise Hl7Error(
                AckCode.ERROR, f"the results could not be recorded: {type(exc).__name__}"
            ) from None
        return _Committed(
            tuple(written),
            tuple(unchanged),
            tx_hash,
            tuple(dict.fromkeys(patients)),
            tuple(warnings),
            "" if records else "nothing recorded: the message carries no results",
        )

    def _patient_of(self, group: PatientResults, header: Header, warnings: list[Hl7Warning]) -> str:
        """The patient of an ORU's PID group; one nobody registered is refused or, under the
        "register" policy, registered from the PID."""
        if self.unknown_patients == "refuse":
            return self._resolve(group.identifiers, group.sequence, header)
        with self._patient_locks(group.identifiers, header):
            patient = self._known(group.identifiers, group.sequence, header)
            if patient is not None:
                return patient
            resource = patient_resource(
                group.segment,
                group.identifiers,
                self.zone,
                warnings,
                self._sender_authorities(header),
            )
            patient = self._register(group.identifiers, resource, header, group.sequence)
        warnings.append(
            Hl7Warning(
                "the patient was not known and was registered from the PID",
                "204",
                ErrorLocation("PID", group.sequence, 3),
            )
        )
        return patient

    # -- ADT ----------------------------------------------------------------------------------

    def _commit_adt(self, message: Any, header: Header) -> _Committed:
        check_adt_header(header, self.processing_ids)
        if not records_patient(header):
            return _Committed(
                warnings=(
                    Hl7Warning(
                        f"ADT^{header.trigger} is acknowledged and not recorded (this node"
                        " records A01, A04, A05, A08, A28, A31 and A40)",
                        "201",
                        ErrorLocation("MSH", 1, 9),
                    ),
                ),
                summary=f"ADT^{header.trigger}: nothing to record",
            )
        adt = read_adt(message, header, self.zone, self._sender_authorities(header))
        warnings = list(adt.warnings)
        _validated_patient(adt.resource)
        try:
            if header.trigger in MERGE_TRIGGERS:
                return self._merge(adt, header, warnings)
            with self._patient_locks(adt.identifiers, header):
                patient = self._known(adt.identifiers, 1, header)
                if patient is None:
                    if header.trigger in UPDATE_TRIGGERS and self.unknown_patients == "refuse":
                        raise Hl7Error(
                            AckCode.ERROR,
                            f"ADT^{header.trigger} updates a patient this node does not know"
                            ' ([hl7] unknown_patients = "refuse"; register it with A04 or'
                            " A28 first)",
                            "204",
                            ErrorLocation("PID", 1, 3),
                        )
                    patient = self._register(adt.identifiers, adt.resource, header, 1)
                    return _Committed(
                        written=(patient,),
                        patients=(patient,),
                        warnings=tuple(warnings),
                        summary="patient registered",
                    )
                changed = self._update(patient, adt, header)
        except Hl7Error:
            raise
        except TxRejected as exc:
            raise Hl7Error(ack_for(exc), f"the ledger refused the patient: {exc.log}") from None
        except ClientError as exc:
            raise Hl7Error(ack_for(exc), f"the patient could not be recorded: {exc}") from None
        except (PackageError, FhirValidationError, ValueError) as exc:
            raise Hl7Error(AckCode.ERROR, f"the patient could not be recorded: {exc}") from None
        except Exception as exc:  # a custody or configuration problem of this node
            log.error(
                "hl7 patient not recorded", extra={**_log_header(header), **_log_exception(exc)}
            )
            raise Hl7Error(
                AckCode.ERROR, f"the patient could not be recorded: {type(exc).__name__}"
            ) from None
        return _Committed(
            written=(patient,) if changed else (),
            unchanged=() if changed else (patient,),
            patients=(patient,),
            warnings=tuple(warnings),
            summary="patient updated" if changed else "already recorded: the patient is unchanged",
        )

    def _registry_or_refuse(self) -> PatientRegistry:
        if self._registry is None:
            raise Hl7Error(
                AckCode.REJECT,
                "this node registers no patients from HL7 (no [hl7] registration_member)",
                "200",
                ErrorLocation("MSH", 1, 9),
            )
        return self._registry()

    def _register(
        self,
        identifiers: tuple[PatientIdentifier, ...],
        resource: dict[str, Any],
        header: Header,
        sequence: int,
    ) -> str:
        """Enroll the patient, record its Patient and link its identifiers (the caller holds
        the identifiers' locks)."""
        authorities = self._sender_authorities(header)
        links = [(system, i.value) for i in identifiers for system in i.systems(authorities)]
        if not links:
            raise Hl7Error(
                AckCode.ERROR,
                "PID-3: no patient identifier names its assigning authority (CX.4), and"
                " [hl7.authorities] maps none for this sender: the patient cannot be indexed",
                "101",
                ErrorLocation("PID", sequence, 3),
            )
        registry = self._registry_or_refuse()
        _validated_patient(resource)
        patient = registry.register(resource)
        for system, value in links:
            self._patients.link(system, value, patient)
        return patient

    def _update(self, patient: str, adt: AdtMessage, header: Header) -> bool:
        registry = self._registry_or_refuse()
        resource = {**adt.resource, "id": patient}
        changed = registry.update(patient, _validated_patient(resource))
        authorities = self._sender_authorities(header)
        for identifier in adt.identifiers:
            for system in identifier.systems(authorities):
                if self._patients.resolve(system, identifier.value) is None:
                    self._patients.link(system, identifier.value, patient)
        return changed

    def _merge(self, adt: AdtMessage, header: Header, warnings: list[Hl7Warning]) -> _Committed:
        """A40: the prior identifiers (MRG-1) now name the surviving patient (PID-3)."""
        authorities = self._sender_authorities(header)
        every = adt.identifiers + adt.prior
        with self._patient_locks(every, header):
            survivor = self._known(adt.identifiers, 1, header)
            if survivor is None:
                raise Hl7Error(
                    AckCode.ERROR,
                    "ADT^A40: the surviving patient (PID-3) is not known on this node",
                    "204",
                    ErrorLocation("PID", 1, 3),
                )
            links = [(s, i.value) for i in adt.prior for s in i.systems(authorities)]
            if not links:
                raise Hl7Error(
                    AckCode.ERROR,
                    "MRG-1: no prior identifier names its assigning authority (CX.4)",
                    "101",
                    ErrorLocation("MRG", 1, 1),
                )
            # A prior patient nobody registered is a typo or a message out of order: merging
            # it would link identifiers to the survivor that may later be issued to someone
            # else, and a prior that names two patients would merge three charts.
            priors = {self._patients.resolve(s, v) for s, v in links} - {None}
            if not priors:
                raise Hl7Error(
                    AckCode.ERROR,
                    "ADT^A40: the prior patient (MRG-1) is not known on this node",
                    "204",
                    ErrorLocation("MRG", 1, 1),
                )
            if len(priors) > 1:
                raise Hl7Error(
                    AckCode.ERROR,
                    "ADT^A40: the MRG-1 identifiers name different patients",
                    "205",
                    ErrorLocation("MRG", 1, 1),
                )
            for system, value in links:
                self._patients.reassign(system, value, survivor)
        return _Committed(
            patients=(survivor,),
            warnings=tuple(warnings),
            summary=f"merged: {len(links)} prior identifiers now name the surviving patient",
        )

    @contextmanager
    def _patient_locks(
        self, identifiers: tuple[PatientIdentifier, ...], header: Header
    ) -> Iterator[None]:
        """Messages about the same identifiers register or merge one at a time."""
        authorities = self._sender_authorities(header)
        keys = [
            f"patient:{system}|{i.value}" for i in identifiers for system in i.systems(authorities)
        ]
        with self.locks.holding(keys or [f"patient:{header.sending_facility}"]):
            yield

    def _previous_version(
        self, writer: RecordWriter, record: MappedRecord, resource: dict[str, Any]
    ) -> int | None:
        """0 for a new record, the latest version for a changed one (or one marked
        entered-in-error, which the same result sent again restores), None if unchanged."""
        stored = writer.stored(record.record_id)
        if stored is None:
            return 0
        if stored.erased:
            raise Hl7Error(
                AckCode.ERROR,
                f"record {record.record_id} of this result was erased and cannot be written again",
                "207",
            )
        if stored.patient != record.patient:
            raise Hl7Error(
                AckCode.ERROR,
                "this order's results are recorded for another patient",
                "205",
                ErrorLocation("PID", 1, 3),
            )
        if stored.current and writer.content(record.record_id) == resource:
            return None
        return stored.version


def _no_bare_match(value: str) -> str | None:
    return None


def _log_header(header: Header) -> dict[str, str]:
    return {
        "control_id": loggable(header.control_id),
        "message_type": loggable(f"{header.message_type}^{header.trigger}"),
        "sender": loggable(f"{header.sending_application}^{header.sending_facility}"),
    }


def _log_exception(exc: BaseException) -> dict[str, str]:
    """An unexpected exception as the node log may show it: its type and the line of our code
    (or a library's) it came from, never its text, which may quote the message."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return {"exception": type(exc).__name__, "where": where}


def _log_fields(error: Hl7Error) -> dict[str, str]:
    """What the node log says of a refusal: codes and where, never the reason's text (it
    may quote a result value or an identifier)."""
    where = ""
    if error.location is not None:
        where = f"{error.location.segment}:{error.location.sequence}"
        if error.location.field:
            where += f"-{error.location.field}"
    return {"ack": str(error.ack), "error_code": error.error_code, "location": where}


def _answer_code(header: Header, code: AckCode) -> tuple[AckCode, bool]:
    """The acknowledgement a message asks for, and whether to send it at all. Original mode
    (neither MSH-15 nor MSH-16 valued): AA, AE or AR, always. Enhanced mode: the commit ack
    (CA, CE, CR — sent once the message is committed or refused) when MSH-15's condition holds
    (AL; ER on an error or rejection; SU on success); else the application ack (AA, AE, AR)
    when MSH-16's does; else none (NE, or a condition not met). An unvalued field of the two
    is NE."""
    if not header.accept_ack and not header.application_ack:
        return code, True
    success = code is AckCode.ACCEPT

    def wanted(condition: str) -> bool:
        return (
            condition == "AL"
            or (condition == "ER" and not success)
            or (condition == "SU" and success)
        )

    if wanted(header.accept_ack):
        return code.commit, True
    return code, wanted(header.application_ack)


def _validated_patient(resource: dict[str, Any]) -> dict[str, Any]:
    try:
        return validate_resource(resource).resource
    except FhirValidationError as exc:
        problems = "; ".join(exc.problems) or exc.message
        raise Hl7Error(
            AckCode.ERROR, f"the PID is not a valid FHIR R4 Patient: {problems}", "102"
        ) from None


def _validated(record: MappedRecord) -> dict[str, Any]:
    try:
        return validate_resource(record.resource).resource
    except FhirValidationError as exc:
        problems = "; ".join(exc.problems) or exc.message
        raise Hl7Error(
            AckCode.ERROR,
            f"{record.resource['resourceType']} is not valid FHIR R4: {problems}",
            "102",
        ) from None


def decode_payload(payload: bytes) -> tuple[str, str]:
    """The text of a message and the codec to answer in: MSH-18 8859/1 is Latin-1, anything
    else (ASCII, UNICODE UTF-8 or none) UTF-8; bytes that are not valid UTF-8 are read as
    Latin-1 so that the message can still be parsed and answered."""
    head = payload.split(b"\r", 1)[0]
    if b"8859/1" in head:
        return payload.decode("latin-1"), "latin-1"
    try:
        return payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return payload.decode("latin-1"), "latin-1"


__all__ = [
    "Hl7Processor",
    "LedgerRecordWriter",
    "Outcome",
    "PatientLookup",
    "RecordWriter",
    "StoredRecord",
    "decode_payload",
]
