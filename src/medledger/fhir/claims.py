"""FHIR Claim, ClaimResponse and ExplanationOfBenefit over the ledger's claims.

A claim is an on-chain object without PHI: organizations, the patient's member id, billed codes,
dates of service and amounts, the decisions and payments, and every step with its block. Its
FHIR Claim and each FHIR ClaimResponse are encrypted records. So:

- Claim.id and ExplanationOfBenefit.id are the ledger's claim id; ClaimResponse.id is the
  decision's record id. A Claim or ClaimResponse is the decrypted document with its meta from
  the ledger (versionId and lastUpdated of its record version) and tags for the claim's ledger
  status, a possible duplicate, and whether a decision is current or was superseded.
- Only the claim's patient, the members of its provider and of its insurer, and auditors see a
  claim (as in the native API); anyone else gets 403, and a search leaves such claims out.
- A document is read through a ledger access request that the ledger decides and audits, for
  payment unless the request's X-Purpose-Of-Use says otherwise; its refusal is a 403 with the
  ledger's reason. A search asks only for what the ledger's rules would grant and counts the
  rest in an OperationOutcome entry.
- The ExplanationOfBenefit is built from the claim's on-chain state — items with submitted,
  eligible and benefit amounts and adjustment reasons, totals, payment, the processing history
  as processNote and as an extension — and, where the ledger lets the caller read them, from
  the Claim document (type, billing period, diagnoses, care team, quantities) and the latest
  ClaimResponse (disposition).
- A claim is submitted (claim.submit, POST /fhir/Claim) by a billing or clinician member or
  the EHR system client of a provider organization; a lab system (lis) gets 403 saying which
  role is needed.
- A provider's claim history comes in transaction Bundles (`fhir.claim_history`): Claims with
  their ExplanationOfBenefits become imported claims with the payer's reported decision. POST
  /fhir/ExplanationOfBenefit adds the payer's decision to a claim imported earlier.

Reads and searches are served on these endpoints only, not inside batch Bundles.
`add_claim_fhir_routes(app)` serves them ahead of the gateway's generic `{type}` routes
(through a middleware, so that the API keeps one route table, documented per type from the
CapabilityStatement).
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from medledger.client.claims import (
    ADJUDICATION_SYSTEM,
    CLAIM_TYPE_SYSTEM,
    DISCRIMINATOR_SYSTEM,
    DISPOSITIONS,
    ClaimError,
    ClaimsClient,
    money,
)
from medledger.client.sdk import QueryError
from medledger.fhir.capability import RESOURCES
from medledger.fhir.gateway import (
    GATEWAY,
    FhirGateway,
)
from medledger.fhir.http import (
    authorize,
    fhir_response,
    query_params,
    read_body,
    run,
)
from medledger.fhir.outcome import (
    FhirError,
    business_rule,
    forbidden,
    invalid,
    not_found,
)
from medledger.fhir.plumbing import (
    Caller,
    Reply,
    etag,
    http_date,
    parse_prefer,
    strip_server_meta,
    with_meta,
)
from medledger.fhir.search import (
    DEFAULT_COUNT,
    MAX_COUNT,
    SearchError,
    SearchQuery,
    Token,
    parse_token,
    reference_id,
    reference_type,
    rfc3339,
    split_escaped,
    unescape,
)
from medledger.fhir.smart import AccessToken
from medledger.ledger.claims import (
    CARC_SYSTEM,
    CDT_SYSTEM,
    PROVIDER_ROLES,
    REASON_CODES,
    SERVICE_CODES,
    SUBMITTER_ROLES,
    Claim,
    ClaimAction,
    ClaimStatus,
    ClaimStep,
    ItemDecision,
    code_system,
    format_amount,
)
from medledger.ledger.consent import Consent, Purpose
from medledger.ledger.errors import Code
from medledger.ledger.model import Member, Role
from medledger.ledger.records import RECORD_ID, RecordStatus, RecordVersion
from medledger.validation import validate_resource

Json = dict[str, Any]
T = TypeVar("T")

CLAIM = "Claim"
RESPONSE = "ClaimResponse"
EOB = "ExplanationOfBenefit"
CLAIM_TYPES = (CLAIM, RESPONSE, EOB)

CLAIM_STATUS_SYSTEM = "urn:medledger:claim-status"
CLAIM_FLAG_SYSTEM = "urn:medledger:claim-flag"
DECISION_SYSTEM = "urn:medledger:claim-decision"
CLAIM_EXTENSION = "urn:medledger:fhir:claim"
PAYMENT_REFERENCE_SYSTEM = "urn:medledger:payment-reference"
# FHIR financial resource status: every claim on the ledger, and each of its documents, is active.
FINANCIAL_STATUS = "active"
FINANCIAL_STATUS_SYSTEMS = frozenset(
    {
        "http://hl7.org/fhir/fm-status",
        "http://hl7.org/fhir/explanationofbenefit-status",
    }
)
PAYMENT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/ex-paymenttype"
RELATED_CLAIM_SYSTEM = "http://terminology.hl7.org/CodeSystem/ex-relatedclaimrelationship"
# Elements of the Claim document that an ExplanationOfBenefit carries over unchanged.
CLAIM_ELEMENTS = ("subType", "billablePeriod", "priority", "careTeam", "diagnosis", "procedure")
ITEM_ELEMENTS = (
    "careTeamSequence",
    "diagnosisSequence",
    "procedureSequence",
    "modifier",
    "quantity",
    "unitPrice",
)
# A claim under review (just submitted, or appealed) is queued; else the decision is complete.
QUEUED = frozenset({ClaimStatus.SUBMITTED, ClaimStatus.APPEALED})

# Search parameter -> (the Reference type its values name, or None for tokens).
REFERENCE_TYPES: Mapping[str, str] = {
    "patient": "Patient",
    "provider": "Organization",
    "insurer": "Organization",
    "requestor": "Organization",
    "request": CLAIM,
    "claim": CLAIM,
}


# --- building the resources (pure) ---------------------------------------------------------


def _concept(system: str, code: str, display: str | None = None) -> Json:
    coding: Json = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def claim_tags(claim: Claim) -> list[Json]:
    """The claim's ledger status (and a possible duplicate) as meta tags."""
    tags: list[Json] = [
        {
            "system": CLAIM_STATUS_SYSTEM,
            "code": claim.status.value,
            "display": f"{claim.status} ({claim.outcome})" if claim.outcome else claim.status,
        }
    ]
    if claim.duplicate_of:
        tags.append(
            {
                "system": CLAIM_FLAG_SYSTEM,
                "code": "possible-duplicate",
                "display": f"bills a service already billed in claim {claim.duplicate_of}",
            }
        )
    return tags


def _tagged(resource: Json, tags: Sequence[Json]) -> Json:
    meta = dict(resource.get("meta") or {})
    systems = {t["system"] for t in tags}
    kept = [t for t in meta.get("tag", []) if t.get("system") not in systems]
    meta["tag"] = kept + list(tags)
    resource["meta"] = meta
    return resource


def claim_view(claim: Claim, version: RecordVersion, document: Mapping[str, Any]) -> Json:
    """The Claim as the API serves it: the decrypted document, id = the claim id, meta from the
    record version, tagged with the claim's ledger status."""
    resource = with_meta(document, version)
    resource["id"] = claim.id
    return _tagged(resource, claim_tags(claim))


def response_view(claim: Claim, version: RecordVersion, document: Mapping[str, Any]) -> Json:
    """A ClaimResponse as the API serves it: id = its record id, meta from the ledger, tagged
    current (the claim's latest decision) or superseded (decided again after an appeal)."""
    current = bool(claim.responses) and claim.responses[-1] == version.record_id
    tag = {
        "system": DECISION_SYSTEM,
        "code": "current" if current else "superseded",
        "display": "the claim's current decision"
        if current
        else "superseded by a later decision after an appeal",
    }
    return _tagged(with_meta(document, version), [tag])


def claim_type(claim: Claim) -> Json:
    """A dental claim when every code is CDT, else professional."""
    dental = all(
        (code := SERVICE_CODES.get(i.code)) is not None and code.system == CDT_SYSTEM
        for i in claim.items
    )
    return _concept(CLAIM_TYPE_SYSTEM, "oral" if dental else "professional")


def _amount_entry(category: str, amount: int, currency: str) -> Json:
    return {"category": _concept(ADJUDICATION_SYSTEM, category), "amount": money(amount, currency)}


def _reason_entry(reason: str) -> Json:
    return {
        "category": _concept(DISCRIMINATOR_SYSTEM, "adjustmentreason"),
        "reason": _concept(CARC_SYSTEM, reason, REASON_CODES.get(reason)),
    }


def step_text(claim: Claim, step: ClaimStep) -> str:
    """One step of a claim's history in words, with its block."""
    where = f"block {step.height}, {rfc3339(step.time_ns)}"
    who = f"{step.actor} ({step.actor_organization})"
    if step.reported:
        who = f"{claim.payer_name}, as reported by {who} from its explanation of benefit"
    currency = claim.currency
    match step.action:
        case ClaimAction.SUBMIT:
            verb = "imported" if claim.imported else "submitted"
            what = f"{verb} by {who}: {format_amount(step.amount, currency)} billed"
        case ClaimAction.ADJUDICATE:
            what = (
                f"adjudicated by {who}: {step.outcome},"
                f" {format_amount(step.amount, currency)} approved"
            )
        case ClaimAction.PAY:
            what = f"paid by {who}: {format_amount(step.amount, currency)} ({step.reference})"
        case ClaimAction.APPEAL:
            what = f"appealed by {who}: {step.appeal_reason}"
    return f"{where}: {what}; status {step.status}"


def _step_extension(claim: Claim, step: ClaimStep) -> Json:
    parts: list[Json] = [
        {"url": "action", "valueCode": step.action.value},
        {"url": "status", "valueCode": step.status.value},
        {"url": "height", "valueInteger": step.height},
        {"url": "time", "valueInstant": rfc3339(step.time_ns)},
        {"url": "actor", "valueString": step.actor},
        {"url": "organization", "valueString": step.actor_organization},
        {"url": "tx", "valueString": step.tx},
    ]
    if step.action is not ClaimAction.APPEAL:
        parts.append({"url": "amount", "valueMoney": money(step.amount, claim.currency)})
    if step.outcome is not None:
        parts.append({"url": "outcome", "valueCode": step.outcome.value})
    if step.record_id:
        parts.append({"url": "record", "valueString": step.record_id})
    if step.reference:
        parts.append({"url": "paymentReference", "valueString": step.reference})
    if step.appeal_reason is not None:
        parts.append({"url": "appealReason", "valueCode": step.appeal_reason.value})
    if step.reported:
        parts.append({"url": "reported", "valueBoolean": True})
    return {"url": "step", "extension": parts}


def _ledger_extension(claim: Claim, with_claim_document: bool) -> Json:
    parts: list[Json] = [
        {"url": "status", "valueCode": claim.status.value},
        {"url": "submittedHeight", "valueInteger": claim.submitted_height},
        {"url": "appeals", "valueInteger": claim.appeals},
        {"url": "claimRecord", "valueString": claim.claim_record},
        {"url": "claimDocumentRead", "valueBoolean": with_claim_document},
    ]
    if claim.outcome is not None:
        parts.insert(1, {"url": "outcome", "valueCode": claim.outcome.value})
    if claim.duplicate_of:
        parts.append({"url": "possibleDuplicateOf", "valueString": claim.duplicate_of})
    if claim.imported:
        parts.append({"url": "imported", "valueBoolean": True})
    if claim.payer:
        parts.append({"url": "outsidePayer", "valueString": claim.payer})
    parts.extend(_step_extension(claim, step) for step in claim.history)
    return {"url": CLAIM_EXTENSION, "extension": parts}


def _eob_items(claim: Claim, document: Mapping[str, Any] | None) -> list[Json]:
    decisions: dict[int, ItemDecision] = {d.sequence: d for d in claim.decisions}
    source: dict[int, Mapping[str, Any]] = {}
    for position, item in enumerate((document or {}).get("item") or [], start=1):
        if isinstance(item, Mapping):
            source[int(item.get("sequence", position))] = item
    items = []
    for item in claim.items:
        system, display = code_system(item)
        coding: Json = {"system": system, "code": item.code} if system else {"code": item.code}
        if display:
            coding["display"] = display
        entry: Json = {"sequence": item.sequence, "productOrService": {"coding": [coding]}}
        for element in ITEM_ELEMENTS:
            if element in source.get(item.sequence, {}):
                entry[element] = copy.deepcopy(source[item.sequence][element])
        entry["servicedDate"] = item.service_date
        entry["net"] = money(item.amount, claim.currency)
        adjudication = [_amount_entry("submitted", item.amount, claim.currency)]
        decision = decisions.get(item.sequence)
        if decision is not None:
            adjudication.append(_amount_entry("eligible", decision.approved, claim.currency))
            adjudication.append(_amount_entry("benefit", decision.approved, claim.currency))
            adjudication.extend(_reason_entry(r) for r in decision.reasons)
        entry["adjudication"] = adjudication
        items.append(entry)
    return items


def _payment(claim: Claim) -> Json | None:
    payments = [s for s in claim.history if s.action is ClaimAction.PAY]
    if not payments:
        return None
    last = payments[-1]
    complete = claim.paid_total >= claim.approved_total
    return {
        "type": _concept(PAYMENT_TYPE_SYSTEM, "complete" if complete else "partial"),
        "date": rfc3339(last.time_ns)[:10],
        "amount": money(claim.paid_total, claim.currency),
        "identifier": {"system": PAYMENT_REFERENCE_SYSTEM, "value": last.reference},
    }


def explanation_of_benefit(
    claim: Claim,
    claim_document: Mapping[str, Any] | None = None,
    response_document: Mapping[str, Any] | None = None,
) -> Json:
    """The FHIR R4 ExplanationOfBenefit of a claim as it stands on the ledger. `versionId` is
    the number of steps, `lastUpdated` and `created` the block time of the latest one."""
    last = claim.history[-1]
    decided = claim.outcome is not None
    eob: Json = {
        "resourceType": EOB,
        "id": claim.id,
        "meta": {
            "versionId": str(len(claim.history)),
            "lastUpdated": rfc3339(last.time_ns),
            "tag": claim_tags(claim),
        },
        "extension": [_ledger_extension(claim, claim_document is not None)],
        "status": FINANCIAL_STATUS,
        "type": copy.deepcopy(claim_document["type"])
        if claim_document and isinstance(claim_document.get("type"), Mapping)
        else claim_type(claim),
        "use": "claim",
        "patient": {"reference": f"Patient/{claim.patient}"},
        "created": rfc3339(last.time_ns),
        "insurer": {"reference": f"Organization/{claim.insurer}"}
        if claim.insurer
        else {"display": claim.payer},
        "provider": {"reference": f"Organization/{claim.provider}"},
    }
    for element in CLAIM_ELEMENTS:
        if claim_document and element in claim_document:
            eob[element] = copy.deepcopy(claim_document[element])
    if claim.duplicate_of:
        eob["related"] = [
            {
                "claim": {"reference": f"Claim/{claim.duplicate_of}"},
                "relationship": _concept(RELATED_CLAIM_SYSTEM, "associated"),
            }
        ]
    eob["claim"] = {"reference": f"Claim/{claim.id}"}
    if claim.responses:
        eob["claimResponse"] = {"reference": f"{RESPONSE}/{claim.responses[-1]}"}
    eob["outcome"] = "queued" if claim.status in QUEUED or not decided else "complete"
    if claim.outcome is not None:
        disposition = (response_document or {}).get("disposition")
        eob["disposition"] = (
            disposition if isinstance(disposition, str) else DISPOSITIONS[claim.outcome]
        )
    coverage = (
        {"reference": f"Coverage/{claim.coverage}"}
        if claim.coverage
        else {"display": claim.payer or claim.insurer}
    )
    eob["insurance"] = [{"focal": True, "coverage": coverage}]
    eob["item"] = _eob_items(claim, claim_document)
    totals = [_amount_entry("submitted", claim.total, claim.currency)]
    if decided:
        totals.append(_amount_entry("eligible", claim.approved_total, claim.currency))
        totals.append(_amount_entry("benefit", claim.approved_total, claim.currency))
    eob["total"] = totals
    payment = _payment(claim)
    if payment is not None:
        eob["payment"] = payment
    eob["processNote"] = [
        {"number": number, "type": "display", "text": step_text(claim, step)}
        for number, step in enumerate(claim.history, start=1)
    ]
    if response_document and response_document.get("resourceType") == EOB:
        return _as_sent(eob, response_document)
    return eob


def _as_sent(built: Json, document: Mapping[str, Any]) -> Json:
    """An imported claim's ExplanationOfBenefit: the payer's document as the provider sent
    it (ids and references as the import rewrote them), with the claim's ledger id, meta,
    status tags, ledger extension and processing history."""
    eob = copy.deepcopy(dict(document))
    eob["id"] = built["id"]
    eob["meta"] = {**(eob.get("meta") or {}), **built["meta"]}
    eob["extension"] = [*(eob.get("extension") or []), *built["extension"]]
    notes = [*(eob.get("processNote") or []), *built["processNote"]]
    eob["processNote"] = [{**n, "number": i} for i, n in enumerate(notes, start=1)]
    return eob


def is_party(member: Member, claim: Claim) -> bool:
    """Who sees a claim: its patient, members of its provider or insurer, and auditors. (SMART
    clients act as system members, so a patient's delegate never calls here.)"""
    return (
        member.id == claim.patient
        or member.role is Role.AUDITOR
        or member.organization in (claim.provider, claim.insurer)
    )


def status_matches(claim: Claim | None, token: Token) -> bool:
    """A `status` token against the FHIR financial status (always active) and, for a Claim or
    ExplanationOfBenefit, the claim's ledger status."""
    if token.code is None:
        return True
    financial = token.system is None or token.system in FINANCIAL_STATUS_SYSTEMS
    if financial and token.code == FINANCIAL_STATUS:
        return True
    if claim is not None and token.system in (None, CLAIM_STATUS_SYSTEM):
        return token.code == claim.status.value
    return False


# --- search parameters ---------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimSearch:
    """A search on one of the claim types: per parameter, the AND of ORs of its values."""

    resource_type: str
    criteria: Mapping[str, tuple[tuple[str, ...], ...]]
    page: SearchQuery
    link: tuple[tuple[str, str], ...]
    ignored: tuple[str, ...]

    def first(self, name: str) -> tuple[str, ...] | None:
        groups = self.criteria.get(name)
        return groups[0] if groups else None


def _non_negative(name: str, value: str) -> int:
    if not value.isdigit():
        raise SearchError(f"{name} must be a non-negative integer")
    return int(value)


def parse_claim_search(
    resource_type: str, params: Sequence[tuple[str, str]], *, strict: bool = True
) -> ClaimSearch:
    """The parameters the CapabilityStatement lists for the type, plus _count, _page and
    _summary=count; others are refused (strict) or ignored (Prefer: handling=lenient)."""
    table = {p.name: p for p in RESOURCES[resource_type].search}
    criteria: dict[str, list[tuple[str, ...]]] = {}
    link: list[tuple[str, str]] = []
    ignored: list[str] = []
    count, offset, summary = DEFAULT_COUNT, 0, False
    for name, value in params:
        if name == "_count":
            count = min(_non_negative(name, value), MAX_COUNT)
        elif name == "_page":
            offset = _non_negative(name, value)
        elif name == "_summary" and value in ("count", "false"):
            summary = summary or value == "count"
        elif name == "_total":
            continue
        elif name in table and value != "":
            values = tuple(unescape(v) for v in split_escaped(value, ","))
            expected = REFERENCE_TYPES.get(name)
            for item in values:
                if expected is not None and reference_type(item) not in (None, expected):
                    raise SearchError(f"{name}: {item!r} is not a {expected} reference")
                if table[name].type == "token":
                    parse_token(item)
            criteria.setdefault(name, []).append(values)
            link.append((name, value))
        elif strict:
            supported = ", ".join(sorted(table))
            raise SearchError(
                f"{resource_type} has no search parameter {name!r} here (supported: {supported},"
                " _count, _page, _summary=count)"
            )
        else:
            ignored.append(name)
    page = SearchQuery(resource_type, (), 0 if summary else count, offset, (), summary)
    return ClaimSearch(
        resource_type,
        {k: tuple(v) for k, v in criteria.items()},
        page,
        tuple(link),
        tuple(ignored),
    )


def _value_of(claim: Claim, item_id: str, name: str) -> str:
    match name:
        case "_id":
            return item_id
        case "patient":
            return claim.patient
        case "provider" | "requestor":
            return claim.provider
        case "insurer":
            return claim.insurer
    return claim.id  # claim, request


def search_matches(search: ClaimSearch, claim: Claim, item_id: str) -> bool:
    """Whether a claim (or, for ClaimResponse, one of its decisions) meets every criterion."""
    for name, groups in search.criteria.items():
        for values in groups:
            if name == "status":
                subject = None if search.resource_type == RESPONSE else claim
                if not any(status_matches(subject, parse_token(v)) for v in values):
                    return False
            elif _value_of(claim, item_id, name) not in {reference_id(v) for v in values}:
                return False
    return True


# --- serving -------------------------------------------------------------------------------


@dataclass
class ClaimsView:
    """One request's work on claims, as the token's member."""

    gateway: FhirGateway
    caller: Caller
    consents: dict[str, list[Consent]] = field(default_factory=dict)

    @property
    def client(self) -> ClaimsClient:
        return ClaimsClient(self.caller.client)

    @property
    def member(self) -> Member:
        return self.caller.member()

    # --- the ledger's claims -------------------------------------------------------------

    def find(self, claim_id: str) -> Claim | None:
        if not RECORD_ID.match(claim_id):
            return None
        try:
            return self.client.show(claim_id)
        except QueryError as exc:
            if exc.code == Code.NOT_FOUND:
                return None
            raise

    def require_party(self, claim: Claim, what: str) -> None:
        if not is_party(self.member, claim):
            raise forbidden(
                f"{what} is shown to the claim's patient, the members of its provider"
                f" ({claim.provider}) and insurer ({claim.insurer}), and auditors; this client"
                f" acts for {self.member.organization}"
            )

    def claim(self, claim_id: str, what: str) -> Claim:
        claim = self.find(claim_id)
        if claim is None:
            raise not_found(f"{what} is not known")
        self.require_party(claim, what)
        return claim

    def claims_of(self, party: str, party_id: str) -> list[Claim]:
        if party == "patient":
            return self.client.list_claims(patient=party_id)
        if party == "provider":
            return self.client.list_claims(provider=party_id)
        return self.client.list_claims(insurer=party_id)

    def claim_of_response(self, record_id: str) -> Claim | None:
        history = self.gateway.history(self.caller, record_id)
        if history is None or not history.versions:
            return None
        if history.versions[0].resource_type != RESPONSE:
            return None
        return next(
            (
                c
                for c in self.claims_of("patient", history.head.patient)
                if record_id in c.responses
            ),
            None,
        )

    def candidates(self, search: ClaimSearch) -> list[Claim]:
        """The claims a search considers (those the caller may see), from the ledger's claim
        indexes: by claim id, by a decision's id, by patient, else the caller's organization's
        claims as provider and as insurer."""
        found: dict[str, Claim] = {}
        by_claim = search.first("claim" if search.resource_type == EOB else "request")
        ids = search.first("_id")
        if search.resource_type != RESPONSE and ids is not None:
            by_claim = ids
        if by_claim is not None:
            for value in by_claim:
                claim = self.find(reference_id(value))
                if claim is not None:
                    found[claim.id] = claim
        elif ids is not None:
            for value in ids:
                claim = self.claim_of_response(value)
                if claim is not None:
                    found[claim.id] = claim
        elif (patients := search.first("patient")) is not None:
            for value in patients:
                found.update((c.id, c) for c in self.claims_of("patient", reference_id(value)))
        else:
            organization = self.member.organization
            for party in ("provider", "insurer"):
                found.update((c.id, c) for c in self.claims_of(party, organization))
        visible = [c for c in found.values() if is_party(self.member, c)]
        return sorted(visible, key=lambda c: (c.submitted_ns, c.id))

    # --- documents -----------------------------------------------------------------------

    def version_of(self, record_id: str, what: str) -> RecordVersion:
        history = self.gateway.history(self.caller, record_id)
        if history is None or not history.versions:
            raise not_found(f"{what} is not known")
        if history.head.erased:
            raise FhirError(
                410,
                "deleted",
                f"{what}: its record {record_id} was erased at height {history.head.erased_height}",
            )
        version = next(v for v in history.versions if v.version == history.head.latest)
        if version.status is RecordStatus.ERASED:
            raise FhirError(410, "deleted", f"{what}: its record {record_id} was erased")
        return version

    def latest_version(self, record_id: str) -> RecordVersion | None:
        try:
            return self.version_of(record_id, record_id)
        except FhirError:
            return None

    def may_read(self, claim: Claim, version: RecordVersion) -> bool:
        """The ledger's rules, evaluated ahead so that a search asks only for what the ledger
        would grant (patient, author organization, consent, or a claims examiner or reviewer of
        the claim's insurer or provider reading for payment)."""
        if self.gateway.may_read(self.caller, version, self.consents):
            return True
        member = self.member
        return (
            self.caller.purpose is Purpose.PAYMENT
            and member.role in PROVIDER_ROLES
            and member.organization in (claim.insurer, claim.provider)
        )

    def read_documents(
        self, wanted: Iterable[tuple[Claim, RecordVersion]]
    ) -> tuple[dict[str, Json], int, list[str]]:
        """Decrypted documents by record id, with the number withheld by the ledger's rules
        and the failures."""
        chosen = list(wanted)
        allowed = [v for c, v in chosen if self.may_read(c, v)]
        batch = self.gateway.read_many(self.caller, allowed, self.consents)
        documents = {rid: resource for (rid, _), resource in batch.resources.items()}
        return documents, len(chosen) - len(allowed) + batch.withheld, batch.failures

    # --- interactions --------------------------------------------------------------------

    def read_claim(self, claim_id: str) -> Reply:
        claim = self.claim(claim_id, f"Claim/{claim_id}")
        version = self.version_of(claim.claim_record, f"Claim/{claim_id}")
        document = self.gateway.read_version(self.caller, version, self.consents)
        return self.gateway.resource_reply(200, claim_view(claim, version, document), version)

    def read_response(self, record_id: str) -> Reply:
        what = f"{RESPONSE}/{record_id}"
        claim = self.claim_of_response(record_id) if RECORD_ID.match(record_id) else None
        if claim is None:
            raise not_found(f"{what} is not known")
        self.require_party(claim, what)
        version = self.version_of(record_id, what)
        document = self.gateway.read_version(self.caller, version, self.consents)
        return self.gateway.resource_reply(200, response_view(claim, version, document), version)

    def eobs(self, claims: Sequence[Claim]) -> list[Json]:
        """ExplanationOfBenefits of claims, with the documents the ledger lets the caller
        read (asked for together)."""
        wanted: list[tuple[Claim, RecordVersion]] = []
        for claim in claims:
            for record_id in (claim.claim_record, *claim.responses[-1:]):
                version = self.latest_version(record_id)
                if version is not None:
                    wanted.append((claim, version))
        documents, _, _ = self.read_documents(wanted)
        return [
            explanation_of_benefit(
                claim,
                documents.get(claim.claim_record),
                documents.get(claim.responses[-1]) if claim.responses else None,
            )
            for claim in claims
        ]

    def read_eob(self, claim_id: str) -> Reply:
        claim = self.claim(claim_id, f"{EOB}/{claim_id}")
        (eob,) = self.eobs([claim])
        last = claim.history[-1]
        headers = {"ETag": etag(len(claim.history)), "Last-Modified": http_date(last.time_ns)}
        return Reply(200, eob, headers)

    def search(self, search: ClaimSearch) -> Json:
        claims = self.candidates(search)
        kind = search.resource_type
        entries: list[tuple[str, Json]] = []
        withheld = 0
        failures: list[str] = []
        if kind == EOB:
            matched = [c for c in claims if search_matches(search, c, c.id)]
            total = len(matched)
            page = matched[search.page.offset : search.page.offset + search.page.count]
            entries = [(e["id"], e) for e in self.eobs(page)]
        else:
            items: list[tuple[Claim, str]] = []
            for claim in claims:
                ids = claim.responses if kind == RESPONSE else (claim.claim_record,)
                items.extend(
                    (claim, i) for i in ids if search_matches(search, claim, _item_id(claim, i))
                )
            versions = [(c, v) for c, i in items if (v := self.latest_version(i)) is not None]
            readable = [(c, v) for c, v in versions if self.may_read(c, v)]
            withheld = len(items) - len(readable)
            total = len(readable)
            page_items = readable[search.page.offset : search.page.offset + search.page.count]
            documents, more, failures = self.read_documents(page_items)
            withheld += more
            for claim, version in page_items:
                document = documents.get(version.record_id)
                if document is None:
                    continue
                if kind == CLAIM:
                    entries.append((claim.id, claim_view(claim, version, document)))
                else:
                    entries.append((version.record_id, response_view(claim, version, document)))
        notes = self.gateway.notes(withheld, failures, search.ignored)
        return self.gateway.searchset(
            f"{self.gateway.base}/{kind}",
            list(search.link),
            search.page,
            total,
            [self.gateway.entry(kind, i, r, "match") for i, r in entries],
            notes,
        )

    def import_explanation(self, body: Any) -> Reply:
        """POST /ExplanationOfBenefit: the payer's decision on a claim this organization
        imported earlier, as a transaction of that one entry (see `fhir.claim_history`)."""
        if not isinstance(body, dict) or body.get("resourceType") != EOB:
            raise invalid("POST /ExplanationOfBenefit takes an ExplanationOfBenefit")
        entry = {"request": {"method": "POST", "url": EOB}, "resource": body}
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
        answer = self.gateway.transaction(self.caller, bundle)
        claim_id = str(answer["entry"][0]["fullUrl"]).rsplit("/", 1)[1]
        reply = self.read_eob(claim_id)
        reply.status = 201
        reply.headers["Location"] = f"{self.gateway.base}/{EOB}/{claim_id}"
        return reply

    def submit(self, body: Any) -> Reply:
        if not isinstance(body, dict) or body.get("resourceType") != CLAIM:
            raise invalid("POST /Claim takes a FHIR Claim", ["resourceType"])
        member = self.member
        if member.role not in SUBMITTER_ROLES:
            raise forbidden(
                "submitting a claim (claim.submit) needs a billing or clinician member or the"
                " EHR system client (role ehr) of a provider organization (hospital, clinic, lab"
                f" or pharmacy); this client acts as member {member.id}, role {member.role}."
            )
        resource = strip_server_meta(copy.deepcopy(body))
        resource.pop("id", None)
        stored = validate_resource(resource).resource
        result = self.client.submit(stored)
        version = self.gateway.written(self.caller, result.record_id, 1)
        reply = self.gateway.write_reply(self.caller, 201, stored, version)
        reply.headers["Location"] = f"{self.gateway.base}/{CLAIM}/{result.claim.id}"
        if reply.body is not None and reply.body.get("resourceType") == CLAIM:
            reply.body = claim_view(result.claim, version, stored)
        return reply


def _item_id(claim: Claim, record_id: str) -> str:
    """The FHIR id of a search item: the claim id for a Claim, the record id for a decision."""
    return claim.id if record_id == claim.claim_record else record_id


# --- HTTP ----------------------------------------------------------------------------------


async def _run(request: web.Request, token: AccessToken, work: Callable[[ClaimsView], T]) -> T:
    """Run the SDK work off the event loop, as the token's member, reading for payment unless
    X-Purpose-Of-Use names another purpose."""
    gateway = request.app[GATEWAY]

    def in_view(caller: Caller) -> T:
        try:
            return work(ClaimsView(gateway, caller))
        except ClaimError as exc:
            raise business_rule(str(exc)) from None

    return await run(request, token, in_view, default_purpose=Purpose.PAYMENT)


async def _search(request: web.Request, resource_type: str) -> web.Response:
    token = authorize(request, resource_type, "s")
    params = query_params(request)
    if request.method == "POST":
        if request.content_type != "application/x-www-form-urlencoded":
            raise FhirError(415, "not-supported", "POST _search takes a form-encoded body")
        form = await request.post()
        params += [(k, v) for k, v in form.items() if isinstance(v, str) and k != "_format"]
    strict = parse_prefer(request.headers.get("Prefer")).get("handling") != "lenient"
    try:
        search = parse_claim_search(resource_type, params, strict=strict)
    except SearchError as exc:
        raise invalid(str(exc)) from None
    body = await _run(request, token, lambda view: view.search(search))
    return fhir_response(Reply(200, body))


async def _read(request: web.Request, resource_type: str, resource_id: str) -> web.Response:
    token = authorize(request, resource_type, "r")
    readers: Mapping[str, Callable[[ClaimsView], Reply]] = {
        CLAIM: lambda view: view.read_claim(resource_id),
        RESPONSE: lambda view: view.read_response(resource_id),
        EOB: lambda view: view.read_eob(resource_id),
    }
    return fhir_response(await _run(request, token, readers[resource_type]))


async def _create(request: web.Request, resource_type: str) -> web.Response:
    token = authorize(request, resource_type, "c")
    body = await read_body(request)
    if resource_type == EOB:
        return fhir_response(await _run(request, token, lambda view: view.import_explanation(body)))
    return fhir_response(await _run(request, token, lambda view: view.submit(body)))


def claim_handler(request: web.Request) -> Callable[[], Awaitable[web.Response]] | None:
    """The handler of a request on a claim type, or None to leave it to the gateway (which
    answers what these types do not support)."""
    segments = request.path.split("/")
    if len(segments) < 3 or segments[1] != "fhir" or segments[2] not in CLAIM_TYPES:
        return None
    resource_type, rest = segments[2], [s for s in segments[3:] if s]
    method = request.method
    if not rest and method == "GET":
        return lambda: _search(request, resource_type)
    if rest == ["_search"] and method == "POST":
        return lambda: _search(request, resource_type)
    if len(rest) == 1 and not rest[0].startswith(("_", "$")) and method == "GET":
        return lambda: _read(request, resource_type, rest[0])
    if not rest and method == "POST" and resource_type in (CLAIM, EOB):
        return lambda: _create(request, resource_type)
    return None


@web.middleware
async def claims_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Claim, ClaimResponse and ExplanationOfBenefit requests go to this module's handlers;
    the gateway's middleware (outside this one) turns their errors into OperationOutcomes."""
    chosen = claim_handler(request)
    if chosen is None:
        return await handler(request)
    return await chosen()


def add_claim_fhir_routes(app: web.Application) -> None:
    """Serve the claim types under /fhir (after `add_fhir_routes` has set up the gateway)."""
    app.middlewares.append(claims_middleware)
