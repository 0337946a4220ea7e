"""Claims from the client side: a provider submits a FHIR Claim, the insurer adjudicates with a
FHIR ClaimResponse and records payment, the provider or patient appeals; anyone reads a claim's
history and the per-organization statistics.

The FHIR Claim and each ClaimResponse are sealed and stored as records (resource types Claim and
ClaimResponse, category "claim") in the same transaction as the ledger step they belong to, so
they are read like any record: the patient and the author open their own key envelopes; the
claim's insurer and provider obtain key shares through an access request for payment (see
`medledger.ledger.access.claim_party_basis`); everyone else needs the patient's consent.

The ledger keeps only the billing summary that this module extracts from the FHIR resources:
codes, dates of service, amounts in minor units, organizations and the patient's member id.
The functions `extract_claim`, `extract_decisions` and `build_claim_response` are pure, for
other front ends (FHIR API, portal) to reuse.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import msgspec

from medledger.client.records import RecordsClient
from medledger.client.sdk import ClientError, TxOutcome
from medledger.crypto.package import SealedRecord
from medledger.ledger.claims import (
    CARC_SYSTEM,
    CDT_SYSTEM,
    CLAIM_CATEGORY,
    CLAIM_RESOURCE,
    CODE_SYSTEM_URI,
    CODE_TOKEN,
    CPT_SYSTEM,
    HCPCS_SYSTEM,
    MAX_IMPORTED_PER_TX,
    MAX_ITEMS,
    MAX_PAYER_NAME,
    PARTIES,
    REASON_CODES,
    RESPONSE_RESOURCE,
    SERVICE_CODES,
    AdjudicateClaim,
    AppealClaim,
    AppealReason,
    Claim,
    ClaimItem,
    ClaimRemittance,
    ClaimStats,
    ImportClaims,
    ImportedClaim,
    ItemDecision,
    Outcome,
    PayClaim,
    Remittance,
    SubmitClaim,
    outcome_of,
)
from medledger.ledger.consent import Purpose
from medledger.ledger.model import Member
from medledger.ledger.records import RECORD_ID, PutRecord
from medledger.validation import ValidatedResource, validate_resource

SERVICE_SYSTEMS = frozenset(
    {CPT_SYSTEM, HCPCS_SYSTEM, CDT_SYSTEM, "https://bluebutton.cms.gov/resources/codesystem/hcpcs"}
)
ADJUDICATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/adjudication"
# CARIN Blue Button's discriminator for adjudication entries that carry an adjustment reason.
DISCRIMINATOR_SYSTEM = "http://hl7.org/fhir/us/carin-bb/CodeSystem/C4BBAdjudicationDiscriminator"
CLAIM_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/claim-type"

DISPOSITIONS = {
    Outcome.APPROVED: "Claim approved",
    Outcome.PARTIAL: "Claim partially approved",
    Outcome.DENIED: "Claim denied",
}


class ClaimError(ClientError):
    """A FHIR Claim or ClaimResponse cannot become a ledger claim step; the message says why."""


@dataclass(frozen=True)
class ClaimContent:
    """What the ledger keeps of a FHIR Claim: no clinical content, only the billing summary."""

    patient: str
    provider: str
    insurer: str
    coverage: str
    currency: str
    items: tuple[ClaimItem, ...]
    total: int
    # An imported claim's payer outside the network, by name (then `insurer` is "").
    payer: str = ""
    # What an import kept differently from the document (e.g. a total that is not the sum).
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClaimResult:
    """A committed claim step: the claim as it stands after it, and the record it stored
    (the Claim for a submission, the ClaimResponse for an adjudication; else "")."""

    claim: Claim
    outcome: TxOutcome
    record_id: str = ""


# --- FHIR <-> ledger -------------------------------------------------------------------------


def to_minor_units(value: Any, what: str, *, rounded: bool = False) -> int:
    """A FHIR decimal money value as an integer number of cents: more precision is refused,
    or with `rounded` rounded half to even (exports often carry binary floating-point noise
    such as 28.104000000000003)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ClaimError(f"{what}: not a number")
    try:
        cents = Decimal(str(value)) * 100
        if rounded:
            cents = cents.quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
    except ArithmeticError:  # InvalidOperation, Overflow (decimal)
        raise ClaimError(f"{what}: {value!r} is not a number") from None
    if not cents.is_finite():
        raise ClaimError(f"{what}: {value!r} is not a number")
    if cents != cents.to_integral_value():
        raise ClaimError(f"{what}: {value} has more than two decimal places")
    return int(cents)


def money(amount: int, currency: str) -> dict[str, Any]:
    """A FHIR Money from cents."""
    whole, cents = divmod(amount, 100)
    value: int | float = whole if cents == 0 else float(Decimal(amount) / 100)
    return {"value": value, "currency": currency}


def reference_id(element: Any, resource_type: str, what: str) -> str:
    """The id in a Reference "<resource_type>/<id>", or its identifier's value."""
    if not isinstance(element, Mapping):
        raise ClaimError(f"{what}: a reference to a {resource_type} is required")
    reference = element.get("reference")
    if isinstance(reference, str) and reference:
        kind, _, ident = reference.rpartition("/")
        if kind.rsplit("/", 1)[-1] != resource_type or not ident:
            raise ClaimError(f"{what}: {reference!r} is not a {resource_type} reference")
        return ident
    identifier = element.get("identifier")
    if isinstance(identifier, Mapping) and isinstance(identifier.get("value"), str):
        return str(identifier["value"])
    raise ClaimError(f"{what}: a reference to a {resource_type} is required")


def _service_code(item: Mapping[str, Any], what: str) -> str:
    codings = [
        c
        for c in (item.get("productOrService") or {}).get("coding", [])
        if isinstance(c, Mapping) and isinstance(c.get("code"), str)
    ]
    if not codings:
        raise ClaimError(f"{what}: productOrService needs a coded billing code (CPT/HCPCS/CDT)")
    billing = [c for c in codings if c.get("system") in SERVICE_SYSTEMS]
    return str((billing or codings)[0]["code"])


def _service_date(item: Mapping[str, Any], claim: Mapping[str, Any], what: str) -> str:
    for value in (
        item.get("servicedDate"),
        (item.get("servicedPeriod") or {}).get("start"),
        (claim.get("billablePeriod") or {}).get("start"),
    ):
        if isinstance(value, str) and len(value) >= 10:
            return value[:10]
    raise ClaimError(f"{what}: a date of service (servicedDate or servicedPeriod) is required")


def _item_amount(
    item: Mapping[str, Any], what: str, *, rounded: bool = False
) -> tuple[int, str | None]:
    net = item.get("net")
    if isinstance(net, Mapping) and "value" in net:
        return to_minor_units(net["value"], f"{what}.net", rounded=rounded), net.get("currency")
    price = item.get("unitPrice")
    if not isinstance(price, Mapping) or "value" not in price:
        raise ClaimError(f"{what}: net or unitPrice is required")
    try:
        quantity = Decimal(str((item.get("quantity") or {}).get("value", 1)))
        factor = Decimal(str(item.get("factor", 1)))
        value = Decimal(str(price["value"])) * quantity * factor
    except ArithmeticError:  # InvalidOperation, Overflow (decimal)
        raise ClaimError(f"{what}: unitPrice x quantity x factor is not a number") from None
    amount = to_minor_units(value, f"{what}.unitPrice x quantity", rounded=rounded)
    return amount, price.get("currency")


def _focal_insurance(resource: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The Claim's focal insurance (else its first), or None."""
    insurance = [i for i in resource.get("insurance") or [] if isinstance(i, Mapping)]
    return next((i for i in insurance if i.get("focal")), insurance[0] if insurance else None)


def extract_claim(resource: Mapping[str, Any]) -> ClaimContent:
    """The billing summary of a valid FHIR R4 Claim (use "claim"): patient, provider and insurer
    organizations, focal coverage, and per item its billing code, date of service and net
    amount in cents (net, else unitPrice x quantity x factor). The currency must be given and be
    the same throughout; the total is Claim.total when present (the ledger checks the sum)."""
    if resource.get("resourceType") != CLAIM_RESOURCE:
        raise ClaimError(f"expected a FHIR Claim, got {resource.get('resourceType')!r}")
    if resource.get("use") != "claim":
        raise ClaimError(f"Claim.use is {resource.get('use')!r}; only 'claim' is submitted")
    patient = reference_id(resource.get("patient"), "Patient", "Claim.patient")
    provider = reference_id(resource.get("provider"), "Organization", "Claim.provider")
    insurer = reference_id(resource.get("insurer"), "Organization", "Claim.insurer")
    focal = _focal_insurance(resource)
    if focal is None:
        raise ClaimError("Claim.insurance: the coverage is required")
    coverage = reference_id(focal.get("coverage"), "Coverage", "Claim.insurance.coverage")
    currencies: set[str] = set()
    items = []
    for position, item in enumerate(resource.get("item", []), start=1):
        what = f"Claim.item[{position}]"
        amount, currency = _item_amount(item, what)
        if currency:
            currencies.add(str(currency))
        items.append(
            ClaimItem(
                sequence=int(item.get("sequence", position)),
                code=_service_code(item, what),
                service_date=_service_date(item, resource, what),
                amount=amount,
            )
        )
    if not items:
        raise ClaimError("Claim.item: at least one item is required")
    total_element = resource.get("total")
    if isinstance(total_element, Mapping) and "value" in total_element:
        total = to_minor_units(total_element["value"], "Claim.total")
        if total_element.get("currency"):
            currencies.add(str(total_element["currency"]))
    else:
        total = sum(i.amount for i in items)
    if len(currencies) != 1:
        found = ", ".join(sorted(currencies)) or "none"
        raise ClaimError(f"a claim has exactly one currency on its amounts (found: {found})")
    return ClaimContent(
        patient=patient,
        provider=provider,
        insurer=insurer,
        coverage=coverage,
        currency=currencies.pop(),
        items=tuple(items),
        total=total,
    )


def _concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def build_claim_response(
    claim: Claim,
    decisions: Sequence[ItemDecision],
    *,
    created: str | None = None,
    claim_type: Mapping[str, Any] | None = None,
    response_id: str | None = None,
) -> dict[str, Any]:
    """A FHIR R4 ClaimResponse for a decision on every item of `claim`: per item the submitted
    and benefit (approved) amounts and an adjudication entry per CARC reason code; totals; the
    disposition in words. `claim_type` defaults to professional."""
    outcome = outcome_of(claim.items, decisions)
    items = []
    for item, decision in zip(claim.items, decisions, strict=True):
        adjudication: list[dict[str, Any]] = [
            {
                "category": _concept(ADJUDICATION_SYSTEM, "submitted"),
                "amount": money(item.amount, claim.currency),
            },
            {
                "category": _concept(ADJUDICATION_SYSTEM, "benefit"),
                "amount": money(decision.approved, claim.currency),
            },
        ]
        adjudication.extend(
            {
                "category": _concept(DISCRIMINATOR_SYSTEM, "adjustmentreason"),
                "reason": _concept(CARC_SYSTEM, reason, REASON_CODES.get(reason)),
            }
            for reason in decision.reasons
        )
        items.append({"itemSequence": item.sequence, "adjudication": adjudication})
    resource: dict[str, Any] = {
        "resourceType": RESPONSE_RESOURCE,
        "status": "active",
        "type": dict(claim_type) if claim_type else _concept(CLAIM_TYPE_SYSTEM, "professional"),
        "use": "claim",
        "patient": {"reference": f"Patient/{claim.patient}"},
        "created": created or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "insurer": {"reference": f"Organization/{claim.insurer}"},
        "requestor": {"reference": f"Organization/{claim.provider}"},
        "request": {"reference": f"Claim/{claim.id}"},
        "outcome": "complete",
        "disposition": DISPOSITIONS[outcome],
        "item": items,
        "total": [
            {
                "category": _concept(ADJUDICATION_SYSTEM, "submitted"),
                "amount": money(claim.total, claim.currency),
            },
            {
                "category": _concept(ADJUDICATION_SYSTEM, "benefit"),
                "amount": money(sum(d.approved for d in decisions), claim.currency),
            },
        ],
    }
    if response_id:
        resource["id"] = response_id
    return resource


def extract_decisions(resource: Mapping[str, Any]) -> tuple[ItemDecision, ...]:
    """The per-item decisions of a FHIR ClaimResponse: the "benefit" adjudication amount of
    each item (0 when absent) and the CARC codes of its adjudication reasons."""
    if resource.get("resourceType") != RESPONSE_RESOURCE:
        raise ClaimError(f"expected a FHIR ClaimResponse, got {resource.get('resourceType')!r}")
    decisions = []
    for position, item in enumerate(resource.get("item", []), start=1):
        what = f"ClaimResponse.item[{position}]"
        approved = 0
        reasons: list[str] = []
        for entry in item.get("adjudication", []):
            codes = {c.get("code") for c in (entry.get("category") or {}).get("coding", [])}
            if "benefit" in codes and isinstance(entry.get("amount"), Mapping):
                approved = to_minor_units(entry["amount"].get("value"), f"{what} benefit")
            for coding in (entry.get("reason") or {}).get("coding", []):
                code = coding.get("code")
                if isinstance(code, str) and code not in reasons:
                    reasons.append(code)
        decisions.append(
            ItemDecision(int(item.get("itemSequence", position)), approved, tuple(reasons))
        )
    return tuple(decisions)


def approve_in_full(claim: Claim) -> tuple[ItemDecision, ...]:
    return tuple(ItemDecision(i.sequence, i.amount) for i in claim.items)


def deny_all(claim: Claim, reasons: Sequence[str]) -> tuple[ItemDecision, ...]:
    return tuple(ItemDecision(i.sequence, 0, tuple(reasons)) for i in claim.items)


def claim_filter(
    patient: str | None = None, provider: str | None = None, insurer: str | None = None
) -> bytes:
    """Query data for /claims and /claims/stats: at most one party."""
    chosen = [(p, v) for p, v in zip(PARTIES, (patient, provider, insurer), strict=True) if v]
    if len(chosen) > 1:
        raise ClaimError("filter claims by one of patient, provider and insurer")
    return f"{chosen[0][0]}:{chosen[0][1]}".encode() if chosen else b""


# --- claim history (claim.import) -----------------------------------------------------------

# Adjudication categories of an ExplanationOfBenefit, by the last segment of their code: FHIR's
# adjudication code system and CMS Blue Button's line variables (Synthea writes those).
BENEFIT_CATEGORIES = frozenset({"benefit", "line_prvdr_pmt_amt"})
# The X12 CARC reason a reduction of each kind stands for.
REDUCTION_REASONS = (
    (frozenset({"deductible", "line_bene_ptb_ddctbl_amt", "line_bene_pmt_amt_ddctbl"}), "1"),
    (frozenset({"line_coinsrnc_amt", "coinsurance"}), "2"),
    (frozenset({"copay"}), "3"),
)
UNEXPLAINED_REDUCTION = "45"  # charge exceeds the fee schedule or contracted arrangement
UNPAID_LINE = "96"  # non-covered charge: the payer's line names no benefit


@dataclass(frozen=True)
class ReportedDecision:
    """The payer's decision on a claim as its ExplanationOfBenefit states it."""

    outcome: Outcome
    decisions: tuple[ItemDecision, ...]
    paid: int
    reference: str


@dataclass(frozen=True)
class HistoryClaim:
    """One claim of a provider's history ready to import: its FHIR Claim (and the payer's
    ExplanationOfBenefit, when the payer decided) validated, the record ids they are stored
    under, and the billing summary and decision extracted from them. With `claim` None it is
    the decision on claim `claim_id` imported earlier."""

    claim_id: str
    patient: str
    claim: ValidatedResource | None
    content: ClaimContent | None
    record_id: str = ""
    supporting: tuple[str, ...] = ()
    eob: ValidatedResource | None = None
    eob_record_id: str = ""
    decision: ReportedDecision | None = None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _history_code(item: Mapping[str, Any], what: str) -> tuple[str, str]:
    """A line's code: one of the network's billing table (system ""), else the first coding
    in a code system an imported claim may keep."""
    codings = [
        c
        for c in (item.get("productOrService") or {}).get("coding", [])
        if isinstance(c, Mapping) and isinstance(c.get("code"), str)
    ]
    for coding in codings:
        if coding.get("system") in SERVICE_SYSTEMS and coding["code"] in SERVICE_CODES:
            return str(coding["code"]), ""
    for coding in codings:
        system = coding.get("system")
        if (
            isinstance(system, str)
            and CODE_SYSTEM_URI.fullmatch(system)
            and CODE_TOKEN.fullmatch(coding["code"])
        ):
            return str(coding["code"]), str(coding["system"])
    raise ClaimError(
        f"{what}: productOrService has no coding with a code system (an absolute URI) and a"
        " code (letters, digits, '.', '-'; at most 64)"
    )


def claim_payer(
    resource: Mapping[str, Any], payers: Mapping[str, str], insurers: Collection[str]
) -> tuple[str, str]:
    """Who pays a claim: (a network insurer's organization id, "") when Claim.insurer is one
    or the payer's identifier (system|value) or name is mapped in `payers`; else ("", the
    outside payer's name: Claim.insurer's display or the focal coverage's)."""
    insurer = _mapping(resource.get("insurer"))
    reference = str(insurer.get("reference") or "")
    if reference.startswith("Organization/") and reference[13:] in insurers:
        return reference[13:], ""
    coverage = _mapping((_focal_insurance(resource) or {}).get("coverage"))
    identifier = _mapping(insurer.get("identifier"))
    names = [
        f"{identifier.get('system', '')}|{identifier.get('value', '')}" if identifier else "",
        str(insurer.get("display") or ""),
        str(coverage.get("display") or ""),
    ]
    for name in names:
        if name and name in payers:
            return payers[name], ""
    outside = next((n for n in names[1:] if n), str(identifier.get("value") or ""))
    if not outside:
        raise ClaimError(
            "the payer is not named: Claim.insurer (a reference, identifier or display) or"
            " Claim.insurance.coverage.display is required"
        )
    if len(outside) > MAX_PAYER_NAME or not outside.isprintable():
        raise ClaimError(f"the payer's name is 1-{MAX_PAYER_NAME} printable characters")
    return "", outside


def extract_history_claim(
    resource: Mapping[str, Any], payers: Mapping[str, str], insurers: Collection[str]
) -> ClaimContent:
    """The billing summary of a FHIR Claim from a provider's history (a Synthea or EHR export):
    as `extract_claim`, but a line may keep its source's code (see `_history_code`), a line
    without a net amount or unit price bills nothing (an encounter line), amounts are rounded
    to cents, and the payer may be outside the network (see `claim_payer`). The total is the
    sum of the lines; a Claim.total that differs is kept in the document and noted."""
    if resource.get("resourceType") != CLAIM_RESOURCE:
        raise ClaimError(f"expected a FHIR Claim, got {resource.get('resourceType')!r}")
    if resource.get("use") != "claim":
        raise ClaimError(f"Claim.use is {resource.get('use')!r}; only 'claim' is imported")
    patient = reference_id(resource.get("patient"), "Patient", "Claim.patient")
    insurer, payer = claim_payer(resource, payers, insurers)
    focal = _focal_insurance(resource) or {}
    coverage_ref = str(_mapping(focal.get("coverage")).get("reference") or "")
    coverage = coverage_ref.rpartition("/")[2] if coverage_ref.startswith("Coverage/") else ""
    raw_items = [i for i in resource.get("item") or [] if isinstance(i, Mapping)]
    if not 0 < len(raw_items) <= MAX_ITEMS:
        raise ClaimError(f"Claim.item: 1-{MAX_ITEMS} items")
    currencies: set[str] = set()
    items = []
    for position, item in enumerate(raw_items, start=1):
        what = f"Claim.item[{position}]"
        priced = any("value" in _mapping(item.get(k)) for k in ("net", "unitPrice"))
        amount, currency = _item_amount(item, what, rounded=True) if priced else (0, None)
        if currency:
            currencies.add(str(currency))
        code, system = _history_code(item, what)
        items.append(
            ClaimItem(
                sequence=position,
                code=code,
                service_date=_service_date(item, resource, what),
                amount=amount,
                system=system,
            )
        )
    notes = []
    total = sum(i.amount for i in items)
    stated = resource.get("total")
    if isinstance(stated, Mapping) and "value" in stated:
        if stated.get("currency"):
            currencies.add(str(stated["currency"]))
        if to_minor_units(stated["value"], "Claim.total", rounded=True) != total:
            notes.append(
                f"Claim.total {stated['value']} is not the sum of its lines; the ledger keeps"
                f" the lines' sum {Decimal(total) / 100}"
            )
    if len(currencies) != 1:
        found = ", ".join(sorted(currencies)) or "none"
        raise ClaimError(f"a claim has exactly one currency on its amounts (found: {found})")
    return ClaimContent(
        patient=patient,
        provider="",
        insurer=insurer,
        coverage=coverage,
        currency=currencies.pop(),
        items=tuple(items),
        total=total,
        payer=payer,
        notes=tuple(notes),
    )


def _category(entry: Mapping[str, Any]) -> str:
    for coding in (entry.get("category") or {}).get("coding") or []:
        if isinstance(coding, Mapping) and isinstance(coding.get("code"), str):
            return str(coding["code"]).rstrip("/").rsplit("/", 1)[-1]
    return ""


def extract_reported_decision(
    resource: Mapping[str, Any], items: Sequence[ClaimItem], record_id: str
) -> ReportedDecision | None:
    """The payer's decision in an ExplanationOfBenefit about a claim with `items` (None when
    the EOB's outcome says the claim is not decided yet): per line the benefit (the payer's
    payment; 0 when the line names none), reasons for any reduction (deductible 1,
    coinsurance 2, copay 3, else 45; 96 for a billed line without a benefit), and the amount
    paid — the EOB's payment, equal to the approved total when they differ by no more than
    the rounding of its lines to cents. `record_id` is the reference when the payment has no
    identifier."""
    if resource.get("resourceType") != "ExplanationOfBenefit":
        raise ClaimError(f"expected an ExplanationOfBenefit, got {resource.get('resourceType')!r}")
    if resource.get("outcome") not in ("complete", "partial"):
        return None
    lines: dict[int, Mapping[str, Any]] = {}
    for position, line in enumerate(resource.get("item") or [], start=1):
        if isinstance(line, Mapping):
            lines[int(line.get("sequence", position))] = line
    decisions = []
    for item in items:
        what = f"ExplanationOfBenefit.item[{item.sequence}]"
        amounts: dict[str, int] = {}
        for entry in (lines.get(item.sequence) or {}).get("adjudication") or []:
            if isinstance(entry, Mapping) and isinstance(entry.get("amount"), Mapping):
                category = _category(entry)
                cents = to_minor_units(
                    entry["amount"].get("value"), f"{what} {category}", rounded=True
                )
                amounts[category] = amounts.get(category, 0) + cents
        benefit = [v for k, v in amounts.items() if k in BENEFIT_CATEGORIES]
        approved = max(0, min(item.amount, benefit[0] if benefit else 0))
        reasons: tuple[str, ...] = ()
        if approved < item.amount:
            reasons = tuple(
                code for kinds, code in REDUCTION_REASONS if any(amounts.get(k) for k in kinds)
            ) or ((UNPAID_LINE,) if not benefit else (UNEXPLAINED_REDUCTION,))
        decisions.append(ItemDecision(item.sequence, approved, reasons))
    approved_total = sum(d.approved for d in decisions)
    payment = _mapping(resource.get("payment"))
    paid = 0
    amount = payment.get("amount")
    if isinstance(amount, Mapping) and "value" in amount:
        paid = max(
            0, to_minor_units(amount["value"], "ExplanationOfBenefit.payment.amount", rounded=True)
        )
        if abs(paid - approved_total) <= len(items):
            paid = approved_total
        paid = min(paid, approved_total)
    identifier = _mapping(payment.get("identifier"))
    reference = str(identifier.get("value") or "")
    if not RECORD_ID.fullmatch(reference):
        reference = record_id
    return ReportedDecision(outcome_of(items, decisions), tuple(decisions), paid, reference)


# --- the client ------------------------------------------------------------------------------


class ClaimsClient:
    """One member's claims: built on their records client (same keys, node and API)."""

    def __init__(self, records: RecordsClient) -> None:
        self.records = records
        self.ledger = records.ledger

    def _submit(self, tx_type: str, body: object) -> TxOutcome:
        return self.ledger.submit(self.records.keys, tx_type, body, sender=self.records.member_id)

    def _seal(self, resource: Mapping[str, Any], patient_id: str) -> PutRecord:
        put = self.records.seal_and_upload(dict(resource), patient_id, str(uuid.uuid4()))
        return msgspec.structs.replace(put, category=CLAIM_CATEGORY)

    # --- steps -----------------------------------------------------------------------------

    def submit(
        self,
        resource: Mapping[str, Any],
        supporting: Sequence[str] = (),
        claim_id: str | None = None,
    ) -> ClaimResult:
        """Validate a FHIR Claim, seal and store it as a record and submit the claim, in one
        transaction. The Claim's provider must be the submitter's organization."""
        validated = validate_resource(resource)
        content = extract_claim(validated.resource)
        me = self.ledger.query("/member", self.records.member_id, Member)
        if content.provider != me.organization:
            raise ClaimError(
                f"Claim.provider is Organization/{content.provider}, but you act for"
                f" {me.organization}"
            )
        put = self._seal(validated.resource, content.patient)
        body = SubmitClaim(
            claim_id=claim_id or str(uuid.uuid4()),
            insurer=content.insurer,
            coverage=content.coverage,
            currency=content.currency,
            items=content.items,
            total=content.total,
            supporting=tuple(supporting),
            record=put,
        )
        outcome = self._submit("claim.submit", body)
        return ClaimResult(self.show(body.claim_id), outcome, put.record_id)

    def history_bodies(
        self, claims: Sequence[HistoryClaim], patient_keys: Mapping[str, bytes] | None = None
    ) -> list[ImportClaims]:
        """Seal every Claim and ExplanationOfBenefit of `claims` against one snapshot and make
        the `claim.import` bodies that import them, in order: each of at most
        MAX_IMPORTED_PER_TX claims and about three quarters of the chain's max_tx_bytes.
        `patient_keys` as for `RecordsClient.seal_many`."""
        if not claims:
            return []
        sealing = self.records.sealing()
        keys = self.records.patient_encryption_keys((c.patient for c in claims), patient_keys)

        packages: list[SealedRecord] = []

        def seal(resource: ValidatedResource, patient: str, record_id: str) -> PutRecord:
            put, sealed = self.records.seal_version(
                resource, patient, record_id, 1, 0, sealing, keys[patient]
            )
            packages.append(sealed)
            return msgspec.structs.replace(put, category=CLAIM_CATEGORY)

        bodies: list[ImportedClaim | ClaimRemittance] = []
        for claim in claims:
            remittance = None
            if claim.decision is not None and claim.eob is not None:
                decision = claim.decision
                remittance = Remittance(
                    decision.outcome,
                    decision.decisions,
                    decision.paid,
                    decision.reference,
                    seal(claim.eob, claim.patient, claim.eob_record_id),
                )
            if claim.claim is None or claim.content is None:
                if remittance is not None:
                    bodies.append(ClaimRemittance(claim.claim_id, remittance))
                continue
            content = claim.content
            bodies.append(
                ImportedClaim(
                    claim_id=claim.claim_id,
                    insurer=content.insurer,
                    payer=content.payer,
                    coverage=content.coverage,
                    currency=content.currency,
                    items=content.items,
                    total=content.total,
                    supporting=claim.supporting,
                    record=seal(claim.claim, claim.patient, claim.record_id),
                    remittance=remittance,
                )
            )
        self.records.upload_many(packages)
        max_bytes = int(self.ledger.query("/params")["max_tx_bytes"]) * 3 // 4
        batches: list[list[ImportedClaim | ClaimRemittance]] = []
        size = 0
        for body in bodies:
            cost = len(msgspec.msgpack.encode(body)) + 16
            if not batches or len(batches[-1]) >= MAX_IMPORTED_PER_TX or size + cost > max_bytes:
                batches.append([])
                size = 0
            batches[-1].append(body)
            size += cost
        return [
            ImportClaims(
                tuple(b for b in batch if isinstance(b, ImportedClaim)),
                tuple(b for b in batch if isinstance(b, ClaimRemittance)),
            )
            for batch in batches
        ]

    def import_history(
        self, claims: Sequence[HistoryClaim], patient_keys: Mapping[str, bytes] | None = None
    ) -> list[TxOutcome]:
        """Import `claims` (see `history_bodies`)."""
        return self.send_imports(self.history_bodies(claims, patient_keys))

    def send_imports(self, bodies: Sequence[ImportClaims]) -> list[TxOutcome]:
        """`claim.import` transactions, sent together (consecutive nonces: they execute in
        order) and then waited for."""
        member = self.records.member_id
        sent = [
            self.ledger.send(self.records.keys, "claim.import", body, sender=member)
            for body in bodies
        ]
        return [self.ledger.outcome_of(tx_hash, member) for tx_hash in sent]

    def adjudicate(
        self,
        claim_id: str,
        decisions: Sequence[ItemDecision] | None = None,
        response: Mapping[str, Any] | None = None,
    ) -> ClaimResult:
        """Decide a claim: from item decisions (a ClaimResponse is built from them), from a
        FHIR ClaimResponse (the decisions are read from it), or, with neither, approve every
        item in full. The ClaimResponse is sealed and stored with the decision."""
        claim = self.show(claim_id)
        if response is not None:
            validated = validate_resource(response).resource
            if reference_id(validated.get("patient"), "Patient", "ClaimResponse.patient") != (
                claim.patient
            ):
                raise ClaimError("ClaimResponse.patient is not the claim's patient")
            chosen = tuple(decisions) if decisions is not None else extract_decisions(validated)
        else:
            chosen = tuple(decisions) if decisions is not None else approve_in_full(claim)
        if len(chosen) != len(claim.items):
            raise ClaimError(f"claim {claim_id} has {len(claim.items)} items; decide each once")
        if response is None:
            validated = validate_resource(build_claim_response(claim, chosen)).resource
        put = self._seal(validated, claim.patient)
        body = AdjudicateClaim(claim_id, outcome_of(claim.items, chosen), chosen, put)
        outcome = self._submit("claim.adjudicate", body)
        return ClaimResult(self.show(claim_id), outcome, put.record_id)

    def pay(self, claim_id: str, reference: str, amount: int | None = None) -> ClaimResult:
        """Record payment of the outstanding approved amount (or `amount`, which the ledger
        then requires to be exactly that)."""
        claim = self.show(claim_id)
        body = PayClaim(
            claim_id, claim.outstanding if amount is None else amount, claim.currency, reference
        )
        outcome = self._submit("claim.pay", body)
        return ClaimResult(self.show(claim_id), outcome)

    def appeal(
        self, claim_id: str, reason: AppealReason, supporting: Sequence[str] = ()
    ) -> ClaimResult:
        outcome = self._submit("claim.appeal", AppealClaim(claim_id, reason, tuple(supporting)))
        return ClaimResult(self.show(claim_id), outcome)

    # --- reading ---------------------------------------------------------------------------

    def show(self, claim_id: str) -> Claim:
        """A claim with its whole history, from the ledger."""
        return self.ledger.query("/claim", claim_id, Claim)  # type: ignore[no-any-return]

    def list_claims(
        self, patient: str | None = None, provider: str | None = None, insurer: str | None = None
    ) -> list[Claim]:
        data = claim_filter(patient, provider, insurer)
        return self.ledger.query("/claims", data, list[Claim])  # type: ignore[no-any-return]

    def stats(
        self, patient: str | None = None, provider: str | None = None, insurer: str | None = None
    ) -> ClaimStats:
        """Per provider and insurer totals, computed by the ledger from committed claims."""
        data = claim_filter(patient, provider, insurer)
        return self.ledger.query("/claims/stats", data, ClaimStats)  # type: ignore[no-any-return]

    def read_record(self, record_id: str) -> dict[str, Any]:
        """A Claim or ClaimResponse record: through one's own key envelope (patient, author),
        else through an access request for payment and key shares."""
        history = self.records.history(record_id)
        latest = next(v for v in history.versions if v.version == history.head.latest)
        if self.records.member_id in (latest.patient, latest.author):
            return self.records.read_own(record_id).resource
        return self.records.read(record_id, Purpose.PAYMENT).resource

    def read_claim(self, claim_id: str) -> dict[str, Any]:
        """The FHIR Claim of a claim."""
        return self.read_record(self.show(claim_id).claim_record)

    def read_responses(self, claim_id: str) -> list[dict[str, Any]]:
        """Every FHIR ClaimResponse of a claim, oldest first."""
        return [self.read_record(r) for r in self.show(claim_id).responses]
