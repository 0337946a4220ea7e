"""ADT (admission, discharge and transfer) messages: the patient administration feed that
registers, updates and merges patients.

- A01 (admit), A04 (register), A05 (pre-admit), A28 (add person): the PID's patient is
  registered — enrolled on the ledger with keys in this node's custody, its FHIR Patient
  recorded, its PID-3 identifiers linked in the patient index — or, when an identifier already
  names a patient, updated.
- A08 (update patient information), A31 (update person): the patient is updated; one this
  node does not know follows the `[hl7] unknown_patients` policy (refuse, or register).
- A40 (merge patient, identifier list): the MRG-1 identifiers of the prior patient are
  re-linked in the patient index to the PID's surviving patient, so that later messages naming
  either identifier reach the survivor. The prior patient's records stay where they are. An
  A40 whose prior identifiers name no patient this node knows, or name two, is refused (AE)
  and changes nothing.
- Other ADT events (A02 transfer, A03 discharge, ...) carry nothing this ledger records: they
  are acknowledged AA with a warning and write nothing.

PID → FHIR Patient: PID-3 → identifier (system from the assigning authority), PID-5 → name,
PID-7 → birthDate, PID-8 → gender (HL7 table 0001), PID-11 → address, PID-13/14 → telecom.
A demographic field that cannot be read (an impossible birth date) is left out with a warning;
the identifiers and the name are what registration needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from medledger.hl7.oru import (
    AckCode,
    ErrorLocation,
    Header,
    Hl7Error,
    Hl7Warning,
    PatientIdentifier,
    _Segment,
    _segment_name,
    check_envelope,
    fhir_datetime,
    patient_identifiers,
)

REGISTER_TRIGGERS = ("A01", "A04", "A05", "A28")
UPDATE_TRIGGERS = ("A08", "A31")
MERGE_TRIGGERS = ("A40",)

# HL7 table 0001 administrative sex → FHIR AdministrativeGender.
GENDERS: dict[str, str] = {
    "M": "male",
    "F": "female",
    "O": "other",
    "A": "other",
    "N": "other",
    "U": "unknown",
}


class PatientRegistry(Protocol):
    """What ADT needs of the ledger: enroll a patient and record its Patient resource, or
    amend that resource."""

    def register(self, resource: dict[str, Any]) -> str:
        """Enroll a new patient and record `resource` as its Patient (the record id is the
        patient's member id, which is returned)."""
        ...

    def update(self, patient: str, resource: dict[str, Any]) -> bool:
        """Amend the patient's Patient record when `resource` differs; whether it wrote."""
        ...


@dataclass(frozen=True)
class AdtMessage:
    header: Header
    identifiers: tuple[PatientIdentifier, ...]
    resource: dict[str, Any]
    prior: tuple[PatientIdentifier, ...]  # MRG-1, for a merge
    warnings: tuple[Hl7Warning, ...]


def check_adt_header(header: Header, processing_ids: tuple[str, ...]) -> None:
    check_envelope(header, processing_ids)
    if header.message_type != "ADT":
        raise Hl7Error(
            AckCode.REJECT,
            f"MSH-9: message type {header.message_type or '(empty)'} is not ADT",
            "200",
            ErrorLocation("MSH", 1, 9),
        )
    if not header.trigger:
        raise Hl7Error(
            AckCode.REJECT,
            "MSH-9: an ADT message needs its trigger event (MSH-9.2, e.g. ADT^A04)",
            "201",
            ErrorLocation("MSH", 1, 9),
        )


def records_patient(header: Header) -> bool:
    """Whether this ADT event registers, updates or merges a patient."""
    return header.trigger in REGISTER_TRIGGERS + UPDATE_TRIGGERS + MERGE_TRIGGERS


def read_adt(
    message: Any, header: Header, zone: Any, authorities: Mapping[str, str] | None = None
) -> AdtMessage:
    """The patient an ADT message is about, as a FHIR Patient (without id)."""
    pid: _Segment | None = None
    mrg: _Segment | None = None
    for raw in message:
        name = _segment_name(raw)
        if name == "PID" and pid is None:
            pid = _Segment(raw, 1)
        elif name == "MRG" and mrg is None:
            mrg = _Segment(raw, 1)
    if pid is None:
        raise Hl7Error(
            AckCode.ERROR, "no PID segment: the patient is unknown", "101", ErrorLocation("PID")
        )
    identifiers = patient_identifiers(pid)
    warnings: list[Hl7Warning] = []
    resource = patient_resource(pid, identifiers, zone, warnings, authorities)
    prior: tuple[PatientIdentifier, ...] = ()
    if header.trigger in MERGE_TRIGGERS:
        if mrg is None:
            raise Hl7Error(
                AckCode.ERROR,
                "ADT^A40 without an MRG segment: the prior patient is unknown",
                "101",
                ErrorLocation("MRG"),
            )
        prior = patient_identifiers(mrg, field_number=1)
    return AdtMessage(header, identifiers, resource, prior, tuple(warnings))


def patient_resource(
    pid: _Segment,
    identifiers: tuple[PatientIdentifier, ...],
    zone: Any,
    warnings: list[Hl7Warning],
    authorities: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The FHIR Patient of a PID segment."""
    resource: dict[str, Any] = {"resourceType": "Patient"}
    resource["identifier"] = [_identifier(i, authorities) for i in identifiers]
    names = []
    for repeat in range(1, pid.repeats(5) + 1):
        family, given, middle, suffix, prefix = (pid.get(5, repeat, c) for c in range(1, 6))
        name: dict[str, Any] = {}
        if family:
            name["family"] = family
        givens = [g for g in (given, middle) if g]
        if givens:
            name["given"] = givens
        if prefix:
            name["prefix"] = [prefix]
        if suffix:
            name["suffix"] = [suffix]
        if name:
            names.append(name)
    if names:
        resource["name"] = names
    birth = pid.get(7)
    if birth:
        try:
            moment = fhir_datetime(birth, zone, pid.location(7))
        except Hl7Error as error:
            warnings.append(Hl7Warning(f"{error.reason}; the birth date was left out", "102"))
        else:
            resource["birthDate"] = (moment or "")[:10]
    sex = pid.get(8).upper()
    if sex:
        gender = GENDERS.get(sex)
        if gender is None:
            warnings.append(
                Hl7Warning(
                    f"PID-8: administrative sex {sex!r} is not in HL7 table 0001; left out",
                    "103",
                    pid.location(8),
                )
            )
        else:
            resource["gender"] = gender
    addresses = []
    for repeat in range(1, pid.repeats(11) + 1):
        street, other, city, state, postal, country = (pid.get(11, repeat, c) for c in range(1, 7))
        address: dict[str, Any] = {}
        lines = [line for line in (street, other) if line]
        if lines:
            address["line"] = lines
        for key, value in (
            ("city", city),
            ("state", state),
            ("postalCode", postal),
            ("country", country),
        ):
            if value:
                address[key] = value
        if address:
            addresses.append(address)
    if addresses:
        resource["address"] = addresses
    telecom = []
    for field_number, use in ((13, "home"), (14, "work")):
        for repeat in range(1, pid.repeats(field_number) + 1):
            number = pid.get(field_number, repeat, 1)
            if number:
                telecom.append({"system": "phone", "value": number, "use": use})
    if telecom:
        resource["telecom"] = telecom
    return resource


def _identifier(identifier: PatientIdentifier, authorities: Mapping[str, str] | None) -> Any:
    entry: dict[str, Any] = {"value": identifier.value}
    systems = identifier.systems(authorities)
    if systems:
        entry["system"] = systems[0]
    if identifier.type_code:
        entry["type"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                    "code": identifier.type_code,
                }
            ]
        }
    if identifier.authority:
        entry["assigner"] = {"display": identifier.authority}
    return entry


__all__ = [
    "MERGE_TRIGGERS",
    "REGISTER_TRIGGERS",
    "UPDATE_TRIGGERS",
    "AdtMessage",
    "PatientRegistry",
    "check_adt_header",
    "patient_resource",
    "read_adt",
    "records_patient",
]
