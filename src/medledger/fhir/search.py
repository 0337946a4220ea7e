"""FHIR R4 search: which parameters each resource type supports, how a query string is parsed,
and how a resource is matched, sorted and paged.

A search names its parameters once, in `SEARCH_PARAMS`; the gateway evaluates them and the
CapabilityStatement lists them from the same table. Each parameter says where it is evaluated:

- `patient` parameters (patient, subject) choose the candidate records: the ledger's index of a
  patient's records;
- `metadata` parameters (_id, _lastUpdated, and category where the ledger indexes it) are
  decided from the on-chain metadata, without reading a record;
- `content` parameters (code, date, status, ...) need the decrypted resource, which is read
  through an access request like any other read.

Values follow the FHIR search rules: a comma separates alternatives (OR), a repeated parameter
adds a condition (AND), `\\,` `\\|` `\\$` and `\\\\` escape. Dates take the prefixes eq, ne, lt,
gt, le, ge, sa, eb and ap and match by the implicit range of their precision (2024 is the whole
year); a date or time without a time zone is taken as UTC. Tokens are `code`, `system|code`,
`|code` (no system) or `system|` (any code of the system).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

from medledger.validation import DEFAULT_CATEGORIES

Item = TypeVar("Item")

DEFAULT_COUNT = 20
MAX_COUNT = 100
DATE_PREFIXES = ("eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap")
SP = "http://hl7.org/fhir/SearchParameter/"

# How a parameter is evaluated (see the module docstring).
PATIENT = "patient"
METADATA = "metadata"
CONTENT = "content"

# `_totalMethod` is a common client extension (fhirpy's count()); totals here are always exact.
RESULT_PARAMETERS = frozenset(
    {"_count", "_page", "_sort", "_format", "_summary", "_total", "_totalMethod"}
)
MODIFIERS: Mapping[str, frozenset[str]] = {
    "token": frozenset({"", "not", "missing"}),
    "date": frozenset({"", "missing"}),
    "string": frozenset({"", "exact", "contains", "missing"}),
    "reference": frozenset({"", "identifier", "Patient", "missing"}),
}


class SearchError(ValueError):
    """A search the server cannot run as asked (HTTP 400)."""


@dataclass(frozen=True)
class SearchParam:
    name: str
    type: str  # token | date | string | reference
    paths: tuple[str, ...]
    definition: str
    documentation: str
    where: str = CONTENT


def _p(
    name: str,
    kind: str,
    paths: str | tuple[str, ...],
    definition: str,
    documentation: str,
    where: str = CONTENT,
) -> SearchParam:
    return SearchParam(
        name,
        kind,
        (paths,) if isinstance(paths, str) else paths,
        definition if definition.startswith("http") else SP + definition,
        documentation,
        where,
    )


_ID = _p("_id", "token", "id", "Resource-id", "Logical id (the ledger record id).", METADATA)
_LAST_UPDATED = _p(
    "_lastUpdated",
    "date",
    "meta.lastUpdated",
    "Resource-lastUpdated",
    "Block time of the version the ledger committed last.",
    METADATA,
)
_PATIENT_DOC = (
    "The patient (Patient/<id>, or :identifier=system|value through this node's patient"
    " index). Clinical searches need patient, subject or _id; without them the search lists"
    " the records the caller's organization authored about patients it enrolled."
)


def _patient(path: str = "subject", definition: str = "clinical-patient") -> SearchParam:
    return _p("patient", "reference", path, definition, _PATIENT_DOC, PATIENT)


def _subject(definition: str) -> SearchParam:
    return _p(
        "subject", "reference", "subject", definition, "Same as patient (Patient only).", PATIENT
    )


def _category_indexed(definition: str) -> SearchParam:
    return _p(
        "category",
        "token",
        "category",
        definition,
        "Matched against the category the ledger indexes for the record (the code of the first"
        " category coding, case-insensitive); a system given is not compared.",
        METADATA,
    )


def _token(name: str, path: str, definition: str, documentation: str = "") -> SearchParam:
    return _p(name, "token", path, definition, documentation or f"{path} (token).")


def _date(name: str, path: str | tuple[str, ...], definition: str) -> SearchParam:
    paths = (path,) if isinstance(path, str) else path
    return _p(name, "date", paths, definition, f"{' or '.join(paths)} with date prefixes.")


def _table(*params: SearchParam) -> dict[str, SearchParam]:
    return {p.name: p for p in (_ID, _LAST_UPDATED, *params)}


SEARCH_PARAMS: Mapping[str, Mapping[str, SearchParam]] = {
    "Patient": _table(
        _p(
            "identifier",
            "token",
            "identifier",
            "Patient-identifier",
            "system|value, resolved through this node's patient index (identifiers are not on"
            " the ledger).",
            PATIENT,
        ),
        _p("name", "string", "name", "Patient-name", "Any part of a name (starts with)."),
        _p("family", "string", "name.family", "individual-family", "Family name."),
        _p("given", "string", "name.given", "individual-given", "Given name."),
        _token("gender", "gender", "individual-gender"),
        _date("birthdate", "birthDate", "individual-birthdate"),
    ),
    "Observation": _table(
        _patient(),
        _subject("Observation-subject"),
        _token("code", "code", "clinical-code"),
        _category_indexed("Observation-category"),
        _token("status", "status", "Observation-status"),
        _date("date", "effective", "clinical-date"),
    ),
    "Condition": _table(
        _patient(),
        _subject("Condition-subject"),
        _token("code", "code", "clinical-code"),
        _category_indexed("Condition-category"),
        _token("clinical-status", "clinicalStatus", "Condition-clinical-status"),
        _token("verification-status", "verificationStatus", "Condition-verification-status"),
        _date("onset-date", "onset", "Condition-onset-date"),
        _date("recorded-date", "recordedDate", "Condition-recorded-date"),
    ),
    "MedicationRequest": _table(
        _patient(),
        _subject("MedicationRequest-subject"),
        _token("code", "medication", "clinical-code"),
        _token("category", "category", "MedicationRequest-category"),
        _token("status", "status", "medications-status"),
        _token("intent", "intent", "MedicationRequest-intent"),
        _date("authoredon", "authoredOn", "MedicationRequest-authoredon"),
    ),
    "AllergyIntolerance": _table(
        _patient("patient"),
        _token("code", "code", "clinical-code"),
        _token("category", "category", "AllergyIntolerance-category"),
        _token("clinical-status", "clinicalStatus", "AllergyIntolerance-clinical-status"),
        _token("criticality", "criticality", "AllergyIntolerance-criticality"),
        _date("date", "recordedDate", "clinical-date"),
    ),
    "Procedure": _table(
        _patient(),
        _subject("Procedure-subject"),
        _token("code", "code", "clinical-code"),
        _token("category", "category", "Procedure-category"),
        _token("status", "status", "Procedure-status"),
        _date("date", "performed", "clinical-date"),
    ),
    "Encounter": _table(
        _patient(),
        _subject("Encounter-subject"),
        _token("type", "type", "clinical-type"),
        _token("class", "class", "Encounter-class"),
        _token("status", "status", "Encounter-status"),
        _date("date", "period", "clinical-date"),
    ),
    "DiagnosticReport": _table(
        _patient(),
        _subject("DiagnosticReport-subject"),
        _token("code", "code", "clinical-code"),
        _category_indexed("DiagnosticReport-category"),
        _token("status", "status", "DiagnosticReport-status"),
        _date("date", "effective", "clinical-date"),
        _date("issued", "issued", "DiagnosticReport-issued"),
    ),
    "Immunization": _table(
        _patient("patient"),
        _token("vaccine-code", "vaccineCode", "Immunization-vaccine-code"),
        _token("status", "status", "Immunization-status"),
        _date("date", "occurrence", "clinical-date"),
    ),
    "DocumentReference": _table(
        _patient(),
        _subject("DocumentReference-subject"),
        _token("type", "type", "clinical-type"),
        _token("category", "category", "DocumentReference-category"),
        _token("status", "status", "DocumentReference-status"),
        _date("date", "date", "DocumentReference-date"),
        _date("period", "context.period", "DocumentReference-period"),
    ),
    # Further record types: stored, read and searched by patient, _id and _lastUpdated.
    "CarePlan": _table(
        _patient(),
        _subject("CarePlan-subject"),
        # US Core SHALL: patient + category (assess-plan), matched on every category coding.
        _token("category", "category", "CarePlan-category"),
        _token("status", "status", "CarePlan-status"),
        _date("date", "period", "clinical-date"),
    ),
    "CareTeam": _table(_patient(), _token("status", "status", "CareTeam-status")),
    "Goal": _table(
        _patient(), _token("lifecycle-status", "lifecycleStatus", "Goal-lifecycle-status")
    ),
    "MedicationStatement": _table(_patient(), _token("status", "status", "medications-status")),
    "ServiceRequest": _table(_patient(), _token("status", "status", "ServiceRequest-status")),
    "FamilyMemberHistory": _table(
        _patient("patient"), _token("status", "status", "FamilyMemberHistory-status")
    ),
    # Issue 11: the further clinical types Synthea and US Core 6.1 send, each with the US Core
    # search parameters of its profile where it has one (Specimen, Device) or R4's otherwise.
    "MedicationAdministration": _table(
        _patient(),
        _subject("MedicationAdministration-subject"),
        _token("code", "medication", "medications-code"),
        _token("status", "status", "medications-status"),
        _date("effective-time", "effective", "MedicationAdministration-effective-time"),
    ),
    "Device": _table(
        _patient("patient"),
        _token("type", "type", "Device-type"),
        _token("status", "status", "Device-status"),
    ),
    "ImagingStudy": _table(
        _patient(),
        _subject("ImagingStudy-subject"),
        _token("status", "status", "ImagingStudy-status"),
        _token("modality", "series.modality", "ImagingStudy-modality"),
        _date("started", "started", "ImagingStudy-started"),
    ),
    "SupplyDelivery": _table(
        _patient("patient"),
        _token("status", "status", "SupplyDelivery-status"),
    ),
    "Specimen": _table(
        _patient(),
        _subject("Specimen-subject"),
        _token("type", "type", "Specimen-type"),
        _token("status", "status", "Specimen-status"),
        _date("collected", "collection.collected", "Specimen-collected"),
    ),
    # US Core 6.1 MedicationDispense: patient, patient+status, patient+type (SHALL/SHOULD).
    "MedicationDispense": _table(
        _patient(),
        _subject("MedicationDispense-subject"),
        _token("status", "status", "MedicationDispense-status"),
        _token("type", "type", "MedicationDispense-type"),
        _date("whenhandedover", "whenHandedOver", "MedicationDispense-whenhandedover"),
    ),
    # US Core 6.1 QuestionnaireResponse (SDOH assessments): patient, authored, status,
    # questionnaire.
    "QuestionnaireResponse": _table(
        _patient(),
        _subject("QuestionnaireResponse-subject"),
        _token("status", "status", "QuestionnaireResponse-status"),
        _date("authored", "authored", "QuestionnaireResponse-authored"),
        _p(
            "questionnaire",
            "string",
            "questionnaire",
            "QuestionnaireResponse-questionnaire",
            "The Questionnaire's canonical URL (with or without its |version).",
        ),
    ),
    # US Core 6.1 RelatedPerson: a record of the patient it relates to; patient, name.
    "RelatedPerson": _table(
        _patient("patient", "RelatedPerson-patient"),
        _p("name", "string", "name", "RelatedPerson-name", "Any part of a name (starts with)."),
        _token("relationship", "relationship", "RelatedPerson-relationship"),
    ),
    # US Core 6.1 Coverage: patient (SHALL); the beneficiary is the patient whose record it is.
    "Coverage": _table(
        _patient("beneficiary", "Coverage-patient"),
        _p(
            "beneficiary",
            "reference",
            "beneficiary",
            "Coverage-beneficiary",
            "Same as patient (Patient only).",
            PATIENT,
        ),
        _token("status", "status", "Coverage-status"),
        _token("type", "type", "Coverage-type"),
        _token("identifier", "identifier", "Coverage-identifier"),
    ),
    # A Medication has no patient element: it is stored as a record of the patient whose
    # record refers to it in the same transaction (see the gateway's `medication_patient`).
    "Medication": _table(
        _token("code", "code", "medications-code"),
        _token("status", "status", "Medication-status"),
    ),
    # The shared directory (not patient data; see fhir/directory.py), with the US Core 6.1
    # SHALL and SHOULD parameters of each profile; every one is matched on the entry's JSON.
    "Organization": _table(
        _token("identifier", "identifier", "Organization-identifier"),
        _p("name", "string", ("name", "alias"), "Organization-name", "Name or alias."),
        _p("address", "string", "address", "Organization-address", "Any address part."),
        _p("address-city", "string", "address.city", "Organization-address-city", "City."),
        _p("address-state", "string", "address.state", "Organization-address-state", "State."),
        _p(
            "address-postalcode",
            "string",
            "address.postalCode",
            "Organization-address-postalcode",
            "Postal code.",
        ),
    ),
    "Practitioner": _table(
        _token("identifier", "identifier", "Practitioner-identifier"),
        _p("name", "string", "name", "Practitioner-name", "Any part of a name (starts with)."),
        _p("family", "string", "name.family", "individual-family", "Family name."),
        _p("given", "string", "name.given", "individual-given", "Given name."),
    ),
    "PractitionerRole": _table(
        _p(
            "practitioner",
            "reference",
            "practitioner",
            "PractitionerRole-practitioner",
            "Practitioner/<id>.",
        ),
        _p(
            "organization",
            "reference",
            "organization",
            "PractitionerRole-organization",
            "Organization/<id>.",
        ),
        _token("specialty", "specialty", "PractitionerRole-specialty"),
        _token("role", "code", "PractitionerRole-role"),
    ),
    "Location": _table(
        _token("identifier", "identifier", "Location-identifier"),
        _p("name", "string", ("name", "alias"), "Location-name", "Name or alias."),
        _p("address", "string", "address", "Location-address", "Any address part."),
        _p("address-city", "string", "address.city", "Location-address-city", "City."),
        _p("address-state", "string", "address.state", "Location-address-state", "State."),
        _p(
            "address-postalcode",
            "string",
            "address.postalCode",
            "Location-address-postalcode",
            "Postal code.",
        ),
        _p(
            "organization",
            "reference",
            "managingOrganization",
            "Location-organization",
            "Organization/<id>.",
        ),
    ),
    "Consent": {
        "_id": _p("_id", "token", "id", "Resource-id", "Ledger consent id.", METADATA),
        "patient": _p(
            "patient",
            "reference",
            "patient",
            "clinical-patient",
            "The patient whose consents the ledger holds (required).",
            PATIENT,
        ),
        "status": _token("status", "status", "Consent-status", "active or inactive (revoked)."),
        "date": _date("date", "dateTime", "clinical-date"),
    },
    "AuditEvent": {
        "patient": _p(
            "patient",
            "reference",
            "entity.what",
            "AuditEvent-patient",
            "The patient whose audit trail is read (required); every entry is checked by its"
            " Merkle inclusion proof against the validators' signed header.",
            PATIENT,
        ),
        "agent": _p(
            "agent",
            "reference",
            "agent.who",
            "AuditEvent-agent",
            "The ledger member that sent the transaction (Practitioner/, Device/, Patient/ or"
            " a bare member id).",
        ),
        "date": _date("date", "recorded", "AuditEvent-date"),
        "action": _token("action", "action", "AuditEvent-action"),
        "outcome": _token("outcome", "outcome", "AuditEvent-outcome"),
        "subtype": _token("subtype", "subtype", "AuditEvent-subtype", "The ledger tx type."),
    },
    "Provenance": {
        "_id": _ID,
        "_lastUpdated": _LAST_UPDATED,
        "patient": _p(
            "patient",
            "reference",
            "target",
            "Provenance-patient",
            "The patient an EHR's stored Provenance is about (Patient/<id>).",
            PATIENT,
        ),
        "target": _p(
            "target",
            "reference",
            "target",
            "Provenance-target",
            "The record (Type/id) whose versions are described (required).",
            PATIENT,
        ),
    },
}

# The date parameter `_sort=date` stands for, per type.
SORT_DATE: Mapping[str, str] = {
    "Observation": "date",
    "Condition": "onset-date",
    "MedicationRequest": "authoredon",
    "AllergyIntolerance": "date",
    "Procedure": "date",
    "Encounter": "date",
    "DiagnosticReport": "date",
    "Immunization": "date",
    "DocumentReference": "date",
    "CarePlan": "date",
    "MedicationAdministration": "effective-time",
    "ImagingStudy": "started",
    "Specimen": "collected",
    "MedicationDispense": "whenhandedover",
    "QuestionnaireResponse": "authored",
    "Patient": "birthdate",
    "Consent": "date",
    "AuditEvent": "date",
}

# Types whose indexed category is fixed by type, so their `category` is matched on content.
FIXED_CATEGORY_TYPES = frozenset(DEFAULT_CATEGORIES)


# --- dates ------------------------------------------------------------------------------------

MIN_TIME = datetime(1, 1, 1, tzinfo=UTC)
MAX_TIME = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)

_DATE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


@dataclass(frozen=True)
class DateRange:
    """The half-open interval [low, high) a date value stands for."""

    low: datetime
    high: datetime


def date_range(text: str) -> DateRange | None:
    """The implicit range of a FHIR date, dateTime or instant, by its precision; None if it is
    not one."""
    match = _DATE.match(text.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    tz = UTC
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        tz = _offset(sign * (hours * 60 + minutes))
    try:
        if month is None:
            low = datetime(int(year), 1, 1, tzinfo=tz)
            high = _add_months(low, 12)
        elif day is None:
            low = datetime(int(year), int(month), 1, tzinfo=tz)
            high = _add_months(low, 1)
        elif hour is None:
            low = datetime(int(year), int(month), int(day), tzinfo=tz)
            high = low + timedelta(days=1)
        else:
            if int(hour) > 23 or int(minute) > 59 or int(second or 0) > 59:
                return None
            micro = int((fraction[1:] + "000000")[:6]) if fraction else 0
            low = datetime(
                int(year),
                int(month),
                int(day),
                int(hour),
                int(minute),
                int(second or 0),
                micro,
                tzinfo=tz,
            )
            if second is None:
                step = timedelta(minutes=1)
            elif fraction is None:
                step = timedelta(seconds=1)
            else:
                step = timedelta(microseconds=max(1, 10 ** max(0, 6 - (len(fraction) - 1))))
            high = low + step
    except (ValueError, OverflowError):
        return None
    return DateRange(low.astimezone(UTC), high.astimezone(UTC))


def _offset(minutes: int) -> timezone:
    return timezone(timedelta(minutes=minutes))


def _add_months(moment: datetime, months: int) -> datetime:
    total = moment.month - 1 + months
    year, month = moment.year + total // 12, total % 12 + 1
    if year > 9999:
        return MAX_TIME
    return moment.replace(year=year, month=month)


def instant_range(time_ns: int) -> DateRange:
    """A block time as an instant (microsecond precision)."""
    low = from_ns(time_ns)
    return DateRange(low, low + timedelta(microseconds=1))


def from_ns(time_ns: int) -> datetime:
    seconds, rest = divmod(time_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=rest // 1000)


def rfc3339(time_ns: int) -> str:
    """A FHIR instant for a block time."""
    return from_ns(time_ns).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class DateValue:
    prefix: str
    range: DateRange


def parse_date_value(text: str) -> DateValue:
    prefix = "eq"
    if text[:2] in DATE_PREFIXES and not text[:2].isdigit():
        prefix, text = text[:2], text[2:]
    value = date_range(text)
    if value is None:
        raise SearchError(f"{text!r} is not a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD or dateTime)")
    return DateValue(prefix, value)


def date_matches(value: DateValue, target: DateRange, now: datetime) -> bool:
    """Whether a resource's date range satisfies one prefixed search date (FHIR R4 rules)."""
    s, t = value.range, target
    equal = s.low <= t.low and t.high <= s.high
    match value.prefix:
        case "eq":
            return equal
        case "ne":
            return not equal
        case "gt":
            return t.high > s.high
        case "lt":
            return t.low < s.low
        case "ge":
            return t.high > s.high or equal
        case "le":
            return t.low < s.low or equal
        case "sa":
            return t.low >= s.high
        case "eb":
            return t.high <= s.low
        case "ap":
            # Approximately: within 10% of the distance from now, and at least a day.
            gap = max(abs(now - s.low), abs(now - s.high)) / 10
            slack = max(gap, timedelta(days=1))
            low = _shift(s.low, -slack)
            high = _shift(s.high, slack)
            return t.low < high and low < t.high
    raise SearchError(f"unknown date prefix {value.prefix!r}")


def _shift(moment: datetime, delta: timedelta) -> datetime:
    try:
        return moment + delta
    except OverflowError:
        return MIN_TIME if delta < timedelta(0) else MAX_TIME


# --- element access ---------------------------------------------------------------------------

_DATE_SUFFIXES = ("DateTime", "Instant", "Date", "Period")


def values_at(resource: Mapping[str, Any], path: str) -> list[Any]:
    """Every value at a dotted element path; the last step may name a choice element
    (`effective` finds effectiveDateTime, effectivePeriod, ...); lists are flattened."""
    current: list[Any] = [resource]
    steps = path.split(".")
    for position, step in enumerate(steps):
        found: list[Any] = []
        last = position == len(steps) - 1
        for node in current:
            if not isinstance(node, Mapping):
                continue
            keys = [step] if step in node else []
            if last and not keys:
                keys = [
                    k for k in node if k.startswith(step) and k[len(step) : len(step) + 1].isupper()
                ]
            for key in keys:
                value = node[key]
                found.extend(value if isinstance(value, list) else [value])
        current = found
    return current


def dates_at(resource: Mapping[str, Any], paths: Iterable[str]) -> list[DateRange]:
    ranges = []
    for path in paths:
        for value in values_at(resource, path):
            found = _as_range(value)
            if found is not None:
                ranges.append(found)
    return ranges


def _as_range(value: Any) -> DateRange | None:
    if isinstance(value, str):
        return date_range(value)
    if isinstance(value, Mapping) and ("start" in value or "end" in value):
        start = date_range(value["start"]) if isinstance(value.get("start"), str) else None
        end = date_range(value["end"]) if isinstance(value.get("end"), str) else None
        low = start.low if start is not None else MIN_TIME
        high = end.high if end is not None else MAX_TIME
        return DateRange(low, high) if low < high else None
    return None


@dataclass(frozen=True)
class Token:
    system: str | None  # None: any system; "": no system
    code: str | None  # None: any code of the system


def parse_token(text: str) -> Token:
    parts = split_escaped(text, "|")
    if len(parts) == 1:
        return Token(None, unescape(parts[0]))
    if len(parts) != 2:
        raise SearchError(f"token {text!r} has more than one '|'")
    system, code = unescape(parts[0]), unescape(parts[1])
    if not system and not code:
        raise SearchError("an empty token")
    return Token(system, code or None)


def _codings(value: Any) -> list[tuple[str | None, str | None]]:
    """(system, code) pairs of a CodeableConcept, Coding, Identifier or code."""
    if isinstance(value, str):
        return [(None, value)]
    if not isinstance(value, Mapping):
        return []
    if "coding" in value:
        return [(c.get("system"), c.get("code")) for c in value["coding"] if isinstance(c, Mapping)]
    if "code" in value:
        return [(value.get("system"), value.get("code"))]
    if "value" in value and isinstance(value.get("value"), str):
        return [(value.get("system"), value["value"])]
    return []


def token_matches(token: Token, value: Any) -> bool:
    for system, code in _codings(value):
        if token.code is not None and code != token.code:
            continue
        if token.system is None:
            return True
        if token.system == "" and system is None:
            return True
        if token.system and system == token.system:
            return True
    return False


def split_escaped(text: str, separator: str) -> list[str]:
    """Split at separators that are not escaped with a backslash (escapes are kept)."""
    parts, current, escaped = [], "", False
    for char in text:
        if escaped:
            current += "\\" + char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append(current)
            current = ""
        else:
            current += char
    if escaped:
        current += "\\"
    parts.append(current)
    return parts


def unescape(text: str) -> str:
    return re.sub(r"\\([\\,|$])", r"\1", text)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        found: list[str] = []
        for key in (
            "text",
            "family",
            "given",
            "prefix",
            "suffix",
            "line",
            "city",
            "district",
            "state",
            "postalCode",
            "country",
        ):
            item = value.get(key)
            for part in item if isinstance(item, list) else [item]:
                if isinstance(part, str):
                    found.append(part)
        return found
    return []


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def string_matches(modifier: str, wanted: str, value: Any) -> bool:
    for text in _strings(value):
        if modifier == "exact":
            if text == wanted:
                return True
        elif modifier == "contains":
            if _fold(wanted) in _fold(text):
                return True
        elif any(_fold(word).startswith(_fold(wanted)) for word in [text, *text.split()]):
            return True
    return False


# --- queries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Criterion:
    """One search parameter occurrence: its alternatives are OR-ed."""

    param: SearchParam
    modifier: str
    raw: str
    values: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.param.name}:{self.modifier}" if self.modifier else self.param.name

    def dates(self) -> list[DateValue]:
        return [parse_date_value(v) for v in self.values]

    def tokens(self) -> list[Token]:
        return [parse_token(v) for v in self.values]

    def missing(self) -> bool:
        return self.values[0] == "true"

    def matches(self, resource: Mapping[str, Any], now: datetime) -> bool:
        """Whether a resource satisfies this criterion (content parameters)."""
        found = [v for path in self.param.paths for v in values_at(resource, path)]
        if self.modifier == "missing":
            return (not found) == self.missing()
        kind = self.param.type
        if kind == "date":
            ranges = dates_at(resource, self.param.paths)
            return any(date_matches(d, r, now) for d in self.dates() for r in ranges)
        if kind == "token":
            hit = any(token_matches(t, v) for t in self.tokens() for v in found)
            return not hit if self.modifier == "not" else hit
        if kind == "string":
            return any(
                string_matches(self.modifier, unescape(w), v) for w in self.values for v in found
            )
        if kind == "reference":
            refs = [v.get("reference") for v in found if isinstance(v, Mapping)]
            wanted = {reference_id(w) for w in self.values}
            return any(
                isinstance(r, str) and (r in self.values or reference_id(r) in wanted) for r in refs
            )
        raise SearchError(f"cannot match a {kind} parameter")


def reference_id(text: str) -> str:
    """The id of `Type/id`, `base/Type/id`, `Type/id/_history/n` or a bare id."""
    parts = text.rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    return parts[-1]


def reference_type(text: str) -> str | None:
    parts = text.rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    return parts[-2] if len(parts) >= 2 else None


@dataclass(frozen=True)
class SortKey:
    name: str  # "_lastUpdated", "_id" or a date parameter name
    descending: bool
    param: SearchParam | None


@dataclass(frozen=True)
class SearchQuery:
    resource_type: str
    criteria: tuple[Criterion, ...]
    count: int
    offset: int
    sort: tuple[SortKey, ...]
    summary_count: bool = False
    ignored: tuple[str, ...] = ()

    def by(self, where: str) -> list[Criterion]:
        return [c for c in self.criteria if c.param.where == where]

    def named(self, *names: str) -> list[Criterion]:
        return [c for c in self.criteria if c.param.name in names]

    @property
    def content(self) -> list[Criterion]:
        return self.by(CONTENT)

    @property
    def needs_content(self) -> bool:
        """Whether matching or ordering needs the decrypted resources of every candidate."""
        return bool(self.content) or any(k.param is not None for k in self.sort)

    def matches(self, resource: Mapping[str, Any], now: datetime) -> bool:
        return all(c.matches(resource, now) for c in self.content)

    def link_params(self) -> list[tuple[str, str]]:
        """The query as the server understood it, for the Bundle's self/next/prev links."""
        params = [(c.key, c.raw) for c in self.criteria]
        if self.sort:
            params.append(
                ("_sort", ",".join(("-" if k.descending else "") + k.name for k in self.sort))
            )
        if self.summary_count:
            params.append(("_summary", "count"))
        return params


def parse_search(
    resource_type: str,
    params: Sequence[tuple[str, str]],
    *,
    strict: bool = True,
) -> SearchQuery:
    """Parse a search's query parameters for a resource type; `strict` refuses parameters the
    server does not support (Prefer: handling=strict, the default here), otherwise they are
    ignored and left out of the self link."""
    table = SEARCH_PARAMS.get(resource_type, {})
    criteria: list[Criterion] = []
    ignored: list[str] = []
    count, offset = DEFAULT_COUNT, 0
    sort: tuple[SortKey, ...] = ()
    summary_count = False
    for name, value in params:
        base, _, modifier = name.partition(":")
        if base in RESULT_PARAMETERS:
            if base == "_count":
                count = min(_non_negative(name, value), MAX_COUNT)
            elif base == "_page":
                offset = _non_negative(name, value)
            elif base == "_sort":
                sort = _parse_sort(resource_type, table, value)
            elif base == "_summary":
                if value == "count":
                    summary_count = True
                elif value != "false":
                    _refuse(strict, ignored, name, "_summary supports count and false only")
            elif base == "_total" and value not in ("none", "estimate", "accurate"):
                _refuse(strict, ignored, name, "_total is none, estimate or accurate")
            continue
        param = table.get(base)
        if param is None:
            _refuse(strict, ignored, name, f"{resource_type} has no search parameter {base!r}")
            continue
        if modifier not in MODIFIERS.get(param.type, frozenset({""})):
            _refuse(strict, ignored, name, f"modifier :{modifier} is not supported on {base}")
            continue
        if value == "":
            _refuse(strict, ignored, name, f"{name} has an empty value")
            continue
        values = tuple(split_escaped(value, ","))
        criterion = Criterion(param, modifier, value, values)
        if modifier == "missing":
            if value not in ("true", "false"):
                raise SearchError(f"{name} is true or false")
        elif param.type == "date":
            criterion.dates()
        elif param.type == "token":
            criterion.tokens()
        criteria.append(criterion)
    if summary_count:
        count = 0
    return SearchQuery(
        resource_type, tuple(criteria), count, offset, sort, summary_count, tuple(ignored)
    )


def _refuse(strict: bool, ignored: list[str], name: str, reason: str) -> None:
    if strict:
        raise SearchError(reason)
    ignored.append(name)


def _non_negative(name: str, value: str) -> int:
    if not value.isdigit():
        raise SearchError(f"{name} must be a non-negative integer")
    return int(value)


def _parse_sort(
    resource_type: str, table: Mapping[str, SearchParam], value: str
) -> tuple[SortKey, ...]:
    keys = []
    for item in value.split(","):
        name = item.strip()
        descending = name.startswith("-")
        name = name.lstrip("-")
        if name in ("_lastUpdated", "_id"):
            keys.append(SortKey(name, descending, None))
            continue
        if name == "date" and "date" not in table and resource_type in SORT_DATE:
            name = SORT_DATE[resource_type]
        param = table.get(name)
        if param is None or param.type != "date" or param.where != CONTENT:
            raise SearchError(
                f"_sort supports _lastUpdated, _id and the date parameters of {resource_type}"
            )
        keys.append(SortKey(name, descending, param))
    return tuple(keys)


def metadata_matches(
    criterion: Criterion, record_id: str, time_ns: int, category: str, now: datetime
) -> bool:
    """Whether a record's on-chain metadata satisfies a metadata parameter."""
    name = criterion.param.name
    if name == "_id":
        hit = record_id in {unescape(v) for v in criterion.values}
    elif name == "_lastUpdated":
        moment = instant_range(time_ns)
        hit = any(date_matches(d, moment, now) for d in criterion.dates())
    elif name == "category":
        hit = any(t.code is not None and t.code.lower() == category for t in criterion.tokens())
    else:
        raise SearchError(f"{name} is not decided from ledger metadata")
    if criterion.modifier == "missing":
        return not criterion.missing()
    return not hit if criterion.modifier == "not" else hit


def date_sort_value(resource: Mapping[str, Any], param: SearchParam) -> datetime | None:
    ranges = dates_at(resource, param.paths)
    return min(r.low for r in ranges) if ranges else None


def sort_items(
    items: Sequence[Item],
    keys: Sequence[SortKey],
    metadata: Callable[[Item], tuple[Any, str]],
    content: Callable[[Item], Mapping[str, Any]] | None,
) -> list[Item]:
    """Order items by the sort keys (the first key first); `metadata(item)` gives (time, id),
    `content(item)` the resource, for date keys. Items without the date sort last."""
    ordered = sorted(items, key=metadata)
    for key in reversed(keys):
        if key.param is None:
            position = 0 if key.name == "_lastUpdated" else 1

            def by_metadata(item: Item, p: int = position) -> Any:
                return metadata(item)[p]

            ordered.sort(key=by_metadata, reverse=key.descending)
            continue
        if content is None:
            raise SearchError(f"cannot sort by {key.name} here")
        present: list[tuple[datetime, Item]] = []
        absent: list[Item] = []
        for item in ordered:
            moment = date_sort_value(content(item), key.param)
            if moment is None:
                absent.append(item)
            else:
                present.append((moment, item))
        present.sort(key=lambda pair: pair[0], reverse=key.descending)
        ordered = [item for _, item in present] + absent
    return ordered
