"""Claims and billing transparency: providers submit claims, insurers adjudicate and pay, and
every step is on the ledger for the patient, the provider and auditors to see.

A claim's content is never on the chain. The FHIR Claim and each FHIR ClaimResponse are
records (resource type Claim or ClaimResponse, category "claim") stored in the same
transaction as the step that produces them, so their sealed packages, key envelopes, threshold
custody, replication, key release and erasure are those of every other record. The claim
itself is an on-chain object without PHI that refers to those records: the provider and
insurer organizations, the patient's member id, an opaque coverage reference, the billed
service codes with their dates of service (day resolution) and amounts, the supporting record
ids, the status and the whole history of steps.

Amounts are integers in the currency's minor unit (cents) with an ISO 4217 code from a short
list; service codes (CPT, HCPCS Level II, CDT) and adjustment reason codes (X12 CARC) come from
the small tables below, and anything else is refused.

The claim's life:

- `claim.submit` by a billing or clinician member or the EHR system client of a provider
  organization (hospital, clinic, lab, pharmacy): status *submitted*. A claim billing a
  service (code and date of service) that the same provider already billed for the same
  patient is accepted and flagged as a possible duplicate of the earlier claim.
- `claim.adjudicate` by a billing or admin member of the claim's insurer, from *submitted* or
  *appealed*: an approved amount per item (never above the billed amount; any reduction
  carries reason codes) and the outcome that the amounts imply: *approved* (every item in
  full), *denied* (nothing) or *partial*. Status *adjudicated*.
- `claim.pay` by the insurer, from *adjudicated* with an approved or partial outcome: the
  payment is exactly the approved amount not yet paid. Status *paid*.
- `claim.appeal` by the patient (or a delegate) or a billing or clinician member of the
  provider, from a *partial* or *denied* outcome (paid or not), at most `MAX_APPEALS` times:
  status *appealed*, and the insurer adjudicates again; a re-adjudication never approves less
  than has already been paid.

A claim's history from before the network (a Synthea or EHR export, with the payer's
ExplanationOfBenefit) comes in through `claim.import`, sent by a member of the provider
organization (billing, clinician, or its EHR system client): each claim with its sealed FHIR
Claim and, when the payer decided it, the payer's decision as its explanation of benefit
states it (approved amount per item, reasons, amount paid) with the sealed
ExplanationOfBenefit. Those steps are marked *reported*: the provider reports what the payer
decided outside the network; the insurer did not sign them. An imported claim keeps its
source's service codes (of any code system named by an absolute URI: CPT, HCPCS, NDC, NUBC,
SNOMED CT, CVX...; each code checked as a token of at most 64 characters), may bill lines at
zero (encounter lines), and its payer is a network insurer or, named in `payer`, an outside
one. A claim whose payer is outside the network is closed history: nobody on the network
adjudicates, pays or hears an appeal of it.

Any other step is refused with the reason, and a refused step changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime
from enum import StrEnum

import msgspec

from medledger.ledger.consent import SECOND_NS, is_delegate
from medledger.ledger.context import TxContext
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.identity import load_organization
from medledger.ledger.model import Member, Organization, OrganizationKind, Role, Status
from medledger.ledger.records import (
    RECORD_ID,
    PutRecord,
    load_head,
    put_record,
)
from medledger.ledger.state import State

CLAIM_CATEGORY = "claim"
CLAIM_RESOURCE = "Claim"
RESPONSE_RESOURCE = "ClaimResponse"
EOB_RESOURCE = "ExplanationOfBenefit"

PROVIDER_KINDS = frozenset(
    {
        OrganizationKind.HOSPITAL,
        OrganizationKind.CLINIC,
        OrganizationKind.LAB,
        OrganizationKind.PHARMACY,
    }
)
# Who acts for the provider (submits, appeals) and for the insurer (adjudicates, pays).
PROVIDER_ROLES = frozenset({Role.BILLING, Role.CLINICIAN})
PAYER_ROLES = frozenset({Role.BILLING, Role.ADMIN})
# Who submits a provider's claims and imports its claim history: its billing and clinical
# members and its EHR system clients.
SUBMITTER_ROLES = frozenset(PROVIDER_ROLES | {Role.EHR})
APPEAL_ROLES = frozenset(PROVIDER_ROLES | {Role.PATIENT, Role.DELEGATE})
# Members who write the sealed Claim and ClaimResponse packages of these steps.
CLAIM_AUTHOR_ROLES = frozenset(PROVIDER_ROLES | PAYER_ROLES)

MAX_ITEMS = 50
MAX_SUPPORTING = 20
MAX_REASONS = 5
MAX_APPEALS = 3
MAX_IMPORTED_PER_TX = 200
MAX_PAYER_NAME = 100
# 1 000 000 000.00 in major units: far above any real claim line, far below 64 bits.
MAX_AMOUNT = 100_000_000_000

SERVICE_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
CURRENCY_CODE = re.compile(r"[A-Z]{3}")

# ISO 4217 currencies a claim may be in; each has two decimal places (amounts are in cents).
CURRENCIES = frozenset({"USD", "EUR", "GBP", "CAD", "AUD", "CHF"})

CPT_SYSTEM = "http://www.ama-assn.org/go/cpt"
HCPCS_SYSTEM = "urn:oid:2.16.840.1.113883.6.285"
CDT_SYSTEM = "http://www.ada.org/cdt"
CARC_SYSTEM = "https://x12.org/codes/claim-adjustment-reason-codes"
SNOMED_SYSTEM = "http://snomed.info/sct"
CVX_SYSTEM = "http://hl7.org/fhir/sid/cvx"
RXNORM_SYSTEM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC_SYSTEM = "http://loinc.org"

# An imported claim's line keeps its source's code: any code system named by an absolute URI
# (CPT, HCPCS, NDC, NUBC revenue codes, SNOMED CT, CVX, RxNorm, ...), the code checked only as a
# token — exports carry codes no terminology server would accept, and the payer decided them.
CODE_SYSTEM_URI = re.compile(r"(https?://|urn:(oid|uuid|iso):)[\x21-\x7e]{1,200}", re.ASCII)
CODE_SYSTEM_NAMES: Mapping[str, str] = {
    CPT_SYSTEM: "CPT",
    HCPCS_SYSTEM: "HCPCS",
    CDT_SYSTEM: "CDT",
    SNOMED_SYSTEM: "SNOMED CT",
    CVX_SYSTEM: "CVX",
    RXNORM_SYSTEM: "RxNorm",
    LOINC_SYSTEM: "LOINC",
}
CODE_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]{0,63}", re.ASCII)


class ServiceCode(msgspec.Struct, frozen=True):
    code: str
    system: str
    display: str


def _codes(system: str, rows: Sequence[tuple[str, str]]) -> dict[str, ServiceCode]:
    return {code: ServiceCode(code, system, display) for code, display in rows}


# The billing codes the network accepts: a small table, not the full code sets.
SERVICE_CODES: Mapping[str, ServiceCode] = {
    **_codes(
        CPT_SYSTEM,
        [
            ("99202", "Office visit, new patient, straightforward"),
            ("99203", "Office visit, new patient, low complexity"),
            ("99213", "Office visit, established patient, low complexity"),
            ("99214", "Office visit, established patient, moderate complexity"),
            ("99215", "Office visit, established patient, high complexity"),
            ("99284", "Emergency department visit, moderate to high severity"),
            ("99285", "Emergency department visit, high severity"),
            ("80053", "Comprehensive metabolic panel"),
            ("80061", "Lipid panel"),
            ("81001", "Urinalysis, automated, with microscopy"),
            ("83036", "Hemoglobin A1c"),
            ("84443", "Thyroid stimulating hormone (TSH)"),
            ("85025", "Complete blood count with automated differential"),
            ("36415", "Routine venipuncture"),
            ("70450", "CT head or brain without contrast"),
            ("71046", "Chest X-ray, 2 views"),
            ("93000", "Electrocardiogram with interpretation and report"),
            ("90471", "Immunization administration, one vaccine"),
            ("90686", "Influenza vaccine, quadrivalent, preservative free"),
            ("97110", "Therapeutic exercise, each 15 minutes"),
        ],
    ),
    **_codes(
        HCPCS_SYSTEM,
        [
            ("G0438", "Annual wellness visit, initial"),
            ("G0439", "Annual wellness visit, subsequent"),
            ("J1100", "Injection, dexamethasone sodium phosphate, 1 mg"),
            ("J3420", "Injection, vitamin B-12 cyanocobalamin, up to 1000 mcg"),
            ("A4253", "Blood glucose test strips, per 50"),
        ],
    ),
    **_codes(
        CDT_SYSTEM,
        [
            ("D0120", "Periodic oral evaluation"),
            ("D1110", "Prophylaxis, adult"),
        ],
    ),
}

# X12 Claim Adjustment Reason Codes (a small subset), with short descriptions.
REASON_CODES: Mapping[str, str] = {
    "1": "Deductible amount",
    "2": "Coinsurance amount",
    "3": "Co-payment amount",
    "4": "Procedure code inconsistent with the modifier used",
    "16": "Claim or service lacks information or has submission or billing errors",
    "18": "Exact duplicate claim or service",
    "22": "Care may be covered by another payer (coordination of benefits)",
    "27": "Expenses incurred after coverage terminated",
    "29": "The time limit for filing has expired",
    "45": "Charge exceeds fee schedule or contracted fee arrangement",
    "50": "Non-covered: not deemed a medical necessity by the payer",
    "96": "Non-covered charge(s)",
    "97": "Benefit included in the payment for another service already adjudicated",
    "109": "Claim or service not covered by this payer",
    "197": "Precertification, authorization or notification absent",
    "204": "Service not covered under the patient's current benefit plan",
}


class ClaimStatus(StrEnum):
    SUBMITTED = "submitted"
    ADJUDICATED = "adjudicated"
    PAID = "paid"
    APPEALED = "appealed"


class Outcome(StrEnum):
    APPROVED = "approved"
    PARTIAL = "partial"
    DENIED = "denied"


class ClaimAction(StrEnum):
    SUBMIT = "submit"
    ADJUDICATE = "adjudicate"
    PAY = "pay"
    APPEAL = "appeal"


class AppealReason(StrEnum):
    DISAGREE = "disagree-with-decision"
    ADDITIONAL_INFORMATION = "additional-information"
    CODING_CORRECTION = "coding-correction"
    MEDICAL_NECESSITY = "medical-necessity"
    BILLING_ERROR = "payer-billing-error"


class ClaimItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One billed line: its sequence number in the Claim, the service code, the date of
    service (YYYY-MM-DD) and the billed amount in minor units. `system` is empty for a code of
    the network's billing table (`SERVICE_CODES`); an imported claim's line may instead keep
    its source's code, of a code system named by an absolute URI (`CODE_SYSTEM_URI`)."""

    sequence: int
    code: str
    service_date: str
    amount: int
    system: str = ""


def code_system(item: ClaimItem) -> tuple[str, str]:
    """A line's code system URI and short name, and (for the network's table) its display."""
    if item.system:
        return item.system, ""
    code = SERVICE_CODES.get(item.code)
    return (code.system, code.display) if code else ("", "")


class ItemDecision(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The insurer's decision on one item: the approved amount and, for any reduction, the
    CARC reason codes."""

    sequence: int
    approved: int
    reasons: tuple[str, ...] = ()


class ClaimStep(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One committed step of a claim's history. `amount` is the total billed (submit), the
    total approved (adjudicate) or the amount paid (pay); `record_id` is the Claim (submit) or
    ClaimResponse (adjudicate) record."""

    action: ClaimAction
    status: ClaimStatus
    height: int
    time_ns: int
    actor: str
    actor_organization: str
    tx: str
    amount: int = 0
    outcome: Outcome | None = None
    decisions: tuple[ItemDecision, ...] = ()
    record_id: str = ""
    reference: str = ""
    appeal_reason: AppealReason | None = None
    supporting_added: tuple[str, ...] = ()
    # A step the provider reported from the payer's explanation of benefit (claim.import),
    # not one the insurer took on the ledger.
    reported: bool = False


class Claim(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    provider: str
    submitter: str
    patient: str
    insurer: str
    coverage: str
    currency: str
    items: tuple[ClaimItem, ...]
    total: int
    supporting: tuple[str, ...]
    claim_record: str
    status: ClaimStatus
    submitted_height: int
    submitted_ns: int
    history: tuple[ClaimStep, ...]
    outcome: Outcome | None = None
    decisions: tuple[ItemDecision, ...] = ()
    approved_total: int = 0
    paid_total: int = 0
    responses: tuple[str, ...] = ()
    appeals: int = 0
    duplicate_of: str = ""
    first_adjudicated_ns: int = 0
    last_adjudicated_ns: int = 0
    # An imported claim (claim.import); `payer` names its payer when that is outside the
    # network (then `insurer` is "").
    imported: bool = False
    payer: str = ""

    @property
    def outstanding(self) -> int:
        """Approved but not yet paid, in minor units."""
        return self.approved_total - self.paid_total

    @property
    def payer_name(self) -> str:
        """The insurer organization's id, or the outside payer's name."""
        return self.insurer or f"{self.payer} (outside the network)"


# --- transaction bodies ----------------------------------------------------------------------


class SubmitClaim(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`claim.submit`: the claim's billing summary and, in `record`, the sealed FHIR Claim
    (whose patient is the claim's patient). Both are committed together or not at all."""

    claim_id: str
    insurer: str
    coverage: str
    currency: str
    items: tuple[ClaimItem, ...]
    total: int
    supporting: tuple[str, ...]
    record: PutRecord


class AdjudicateClaim(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`claim.adjudicate`: a decision on every item, the outcome those amounts imply, and in
    `record` the sealed FHIR ClaimResponse."""

    claim_id: str
    outcome: Outcome
    decisions: tuple[ItemDecision, ...]
    record: PutRecord


class PayClaim(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`claim.pay`: `reference` is the payer's opaque payment id (e.g. the EFT trace number)."""

    claim_id: str
    amount: int
    currency: str
    reference: str


class Remittance(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The payer's decision on an imported claim as its ExplanationOfBenefit states it: a
    decision per item, the outcome those amounts imply, the amount paid (at most the approved
    total) with the payer's payment reference, and in `record` the sealed EOB."""

    outcome: Outcome
    decisions: tuple[ItemDecision, ...]
    paid: int
    reference: str
    record: PutRecord


class ImportedClaim(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One claim of a provider's history: as `SubmitClaim`, but its payer is a network insurer
    (`insurer`) or an outside one (`payer`, with `insurer` ""), and `remittance` is the payer's
    decision when it made one."""

    claim_id: str
    insurer: str
    payer: str
    coverage: str
    currency: str
    items: tuple[ClaimItem, ...]
    total: int
    supporting: tuple[str, ...]
    record: PutRecord
    remittance: Remittance | None = None


class ClaimRemittance(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The payer's decision on a claim imported earlier without one (its ExplanationOfBenefit
    arrived later)."""

    claim_id: str
    remittance: Remittance


class ImportClaims(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`claim.import`: up to `MAX_IMPORTED_PER_TX` claims of the sender's organization and
    payer decisions on its earlier imported claims, all stored or none."""

    claims: tuple[ImportedClaim, ...]
    remittances: tuple[ClaimRemittance, ...] = ()


class AppealClaim(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`claim.appeal`, optionally naming further supporting records."""

    claim_id: str
    reason: AppealReason
    supporting: tuple[str, ...] = ()


# --- keys ------------------------------------------------------------------------------------

CLAIM_PREFIX = b"claim/"


def claim_key(claim_id: str) -> bytes:
    return CLAIM_PREFIX + claim_id.encode()


def party_index_prefix(party: str, party_id: str) -> bytes:
    """Index of claims by `party`: "patient", "provider" or "insurer"."""
    return f"{party}-claim/{party_id}/".encode()


def claim_record_key(record_id: str) -> bytes:
    """Which claim a Claim or ClaimResponse record belongs to."""
    return f"claim-record/{record_id}".encode()


def service_key(provider: str, patient: str, item: ClaimItem) -> bytes:
    """The first claim of a provider billing a service for a patient on a day."""
    code = f"{item.code}@{item.system}" if item.system else item.code
    return f"claim-service/{provider}/{patient}/{item.service_date}/{code}".encode()


PARTIES = ("patient", "provider", "insurer")


# --- reading ---------------------------------------------------------------------------------


def load_claim(state: State, claim_id: str) -> Claim:
    claim = state.read(claim_key(claim_id), Claim)
    if claim is None:
        raise LedgerError(Code.NOT_FOUND, f"unknown claim {claim_id}")
    return claim


def claim_for_record(state: State, record_id: str) -> Claim | None:
    """The claim whose FHIR Claim or ClaimResponse is record `record_id`, if any."""
    claim_id = state.read(claim_record_key(record_id), str)
    return None if claim_id is None else state.read(claim_key(claim_id), Claim)


def claims_of(state: State, party: str, party_id: str) -> list[Claim]:
    """The claims of a patient, a provider organization or an insurer, by claim id."""
    if party not in PARTIES:
        raise LedgerError(Code.INVALID_BODY, f"claims are listed by one of {list(PARTIES)}")
    prefix = party_index_prefix(party, party_id)
    found = []
    for key, _ in state.scan(prefix):
        claim = state.read(claim_key(key[len(prefix) :].decode()), Claim)
        if claim is not None:
            found.append(claim)
    return found


def all_claims(state: State) -> list[Claim]:
    return state.read_all(CLAIM_PREFIX, Claim)


# --- amounts and outcomes --------------------------------------------------------------------


def format_amount(amount: int, currency: str) -> str:
    """Minor units as a decimal amount with its currency: 12345, USD -> "123.45 USD"."""
    sign = "-" if amount < 0 else ""
    whole, cents = divmod(abs(amount), 100)
    return f"{sign}{whole}.{cents:02d} {currency}"


def outcome_of(items: Sequence[ClaimItem], decisions: Sequence[ItemDecision]) -> Outcome:
    """Approved when every item is approved in full, denied when nothing is, else partial."""
    if all(d.approved == i.amount for i, d in zip(items, decisions, strict=True)):
        return Outcome.APPROVED
    if sum(d.approved for d in decisions) == 0:
        return Outcome.DENIED
    return Outcome.PARTIAL


# --- checks ----------------------------------------------------------------------------------


def _invalid(message: str) -> LedgerError:
    return LedgerError(Code.INVALID_BODY, message)


def _check_id(what: str, value: str) -> None:
    if not RECORD_ID.fullmatch(value):
        raise _invalid(f"{what}: 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit")


def _check_amount(what: str, amount: int) -> None:
    if amount < 0:
        raise _invalid(f"{what}: amount {amount} is negative")
    if amount > MAX_AMOUNT:
        raise _invalid(f"{what}: amount {amount} exceeds the limit {MAX_AMOUNT} (minor units)")


def _check_currency(currency: str) -> None:
    if not CURRENCY_CODE.fullmatch(currency) or currency not in CURRENCIES:
        raise _invalid(f"currency {currency!r} is not one of {sorted(CURRENCIES)} (ISO 4217)")


def _block_date(ctx: TxContext) -> date:
    return datetime.fromtimestamp(ctx.block.time_ns // SECOND_NS, tz=UTC).date()


def _check_code(item: ClaimItem, imported: bool) -> None:
    what = f"item {item.sequence}"
    if not item.system:
        if item.code not in SERVICE_CODES:
            raise _invalid(f"{what}: unknown service code {item.code!r}")
        return
    if not imported:
        raise _invalid(f"{what}: a submitted claim bills codes of the network's table only")
    if not CODE_SYSTEM_URI.fullmatch(item.system):
        raise _invalid(
            f"{what}: code system {item.system[:80]!r} is not an absolute URI (http, https,"
            " urn:oid, urn:uuid) of at most 200 characters"
        )
    if not CODE_TOKEN.fullmatch(item.code):
        raise _invalid(f"{what}: {item.code[:40]!r} is not a code of {item.system}")


def _check_items(
    ctx: TxContext, items: Sequence[ClaimItem], total: int, *, imported: bool = False
) -> None:
    if not 0 < len(items) <= MAX_ITEMS:
        raise _invalid(f"a claim has 1-{MAX_ITEMS} items")
    today = _block_date(ctx)
    for position, item in enumerate(items, start=1):
        what = f"item {item.sequence}"
        if item.sequence != position:
            raise _invalid(f"item sequences must be 1..{len(items)} in order; got {item.sequence}")
        _check_code(item, imported)
        if not SERVICE_DATE.fullmatch(item.service_date):
            raise _invalid(f"{what}: date of service must be YYYY-MM-DD")
        try:
            served = date.fromisoformat(item.service_date)
        except ValueError:
            raise _invalid(f"{what}: {item.service_date} is not a calendar date") from None
        if served > today:
            raise _invalid(f"{what}: date of service {item.service_date} is after {today}")
        _check_amount(what, item.amount)
    if total != sum(i.amount for i in items):
        raise _invalid(f"total {total} is not the sum of the item amounts")
    if total <= 0 and not imported:
        raise _invalid("a claim's total must be more than zero")


def _check_supporting(
    state: State, patient: str, supporting: Sequence[str], already: Sequence[str] = ()
) -> None:
    if len(supporting) + len(already) > MAX_SUPPORTING:
        raise _invalid(f"a claim names at most {MAX_SUPPORTING} supporting records")
    if len(set(supporting)) != len(supporting):
        raise _invalid("supporting records must be distinct")
    for record_id in supporting:
        if record_id in already:
            raise LedgerError(Code.CONFLICT, f"record {record_id} already supports this claim")
        head = load_head(state, record_id)
        if head.patient != patient:
            raise _invalid(f"supporting record {record_id} is about another patient")
        if head.erased:
            raise LedgerError(Code.ERASED, f"supporting record {record_id} was erased")


def _check_record(body: PutRecord, resource_type: str, patient: str) -> None:
    if body.resource_type != resource_type:
        raise _invalid(f"the sealed record must be a {resource_type}, not {body.resource_type}")
    if body.category != CLAIM_CATEGORY:
        raise _invalid(f"the sealed {resource_type} record must have category {CLAIM_CATEGORY!r}")
    if body.patient != patient:
        raise _invalid(f"the sealed {resource_type} is about another patient")
    if body.previous != 0:
        raise _invalid(f"the sealed {resource_type} is a new record, not an amendment")


def _require_insurer(sender: Member, claim: Claim, step: str) -> None:
    if not claim.insurer:
        raise LedgerError(
            Code.CONFLICT,
            f"claim {claim.id} was imported with its payer {claim.payer!r} outside the network;"
            f" nobody here may {step} it",
        )
    if sender.organization != claim.insurer:
        raise LedgerError(
            Code.UNAUTHORIZED,
            f"only billing or admin members of {claim.insurer}, the claim's insurer, may {step}"
            f" claim {claim.id}; {sender.id} acts for {sender.organization}",
        )
    if sender.role not in PAYER_ROLES:
        raise LedgerError(Code.UNAUTHORIZED, f"role {sender.role} may not {step} claims")


def _step(
    ctx: TxContext,
    action: ClaimAction,
    status: ClaimStatus,
    *,
    amount: int = 0,
    outcome: Outcome | None = None,
    decisions: tuple[ItemDecision, ...] = (),
    record_id: str = "",
    reference: str = "",
    appeal_reason: AppealReason | None = None,
    supporting_added: tuple[str, ...] = (),
    reported: bool = False,
) -> ClaimStep:
    return ClaimStep(
        action=action,
        status=status,
        height=ctx.block.height,
        time_ns=ctx.block.time_ns,
        actor=ctx.sender.id,
        actor_organization=ctx.sender.organization,
        tx=ctx.tx_hash.hex(),
        amount=amount,
        outcome=outcome,
        decisions=decisions,
        record_id=record_id,
        reference=reference,
        appeal_reason=appeal_reason,
        supporting_added=supporting_added,
        reported=reported,
    )


def _save(state: State, claim: Claim) -> None:
    state.write(claim_key(claim.id), claim)


# --- transitions -----------------------------------------------------------------------------


def _provider_of(state: State, ctx: TxContext, roles: frozenset[Role], step: str) -> Organization:
    provider = load_organization(state, ctx.sender.organization)
    if provider.kind not in PROVIDER_KINDS:
        raise LedgerError(
            Code.UNAUTHORIZED,
            f"only providers (hospital, clinic, lab, pharmacy) {step} claims;"
            f" {provider.id} is of kind {provider.kind}",
        )
    if ctx.sender.role not in roles:
        raise LedgerError(Code.UNAUTHORIZED, f"role {ctx.sender.role} may not {step} claims")
    return provider


def _open_claim(
    state: State, ctx: TxContext, provider: Organization, body: SubmitClaim | ImportedClaim
) -> Claim:
    """Check and store a new claim with its Claim record (submitted or imported)."""
    imported = isinstance(body, ImportedClaim)
    patient = body.record.patient
    _check_id("claim_id", body.claim_id)
    if state.get(claim_key(body.claim_id)) is not None:
        raise LedgerError(Code.CONFLICT, f"claim {body.claim_id} exists")
    payer = body.payer if isinstance(body, ImportedClaim) else ""
    if payer and body.insurer:
        raise _invalid("payer names an outside payer; a network insurer is named in insurer")
    if (
        imported
        and not body.insurer
        and (not 0 < len(payer) <= MAX_PAYER_NAME or not payer.isprintable())
    ):
        raise _invalid(f"payer: the outside payer's name, 1-{MAX_PAYER_NAME} characters")
    insurer = _load_insurer(state, body.insurer).id if body.insurer else ""
    if body.coverage or not imported:
        _check_id("coverage", body.coverage)
    _check_currency(body.currency)
    _check_items(ctx, body.items, body.total, imported=imported)
    _check_record(body.record, CLAIM_RESOURCE, patient)
    put_record(state, ctx, body.record)
    _check_supporting(state, patient, body.supporting)

    duplicate_of = ""
    for item in body.items:
        key = service_key(provider.id, patient, item)
        earlier = state.read(key, str)
        if earlier is None:
            state.write(key, body.claim_id)
        elif not duplicate_of and earlier != body.claim_id:
            duplicate_of = earlier
    claim = Claim(
        id=body.claim_id,
        provider=provider.id,
        submitter=ctx.sender.id,
        patient=patient,
        insurer=insurer,
        coverage=body.coverage,
        currency=body.currency,
        items=body.items,
        total=body.total,
        supporting=body.supporting,
        claim_record=body.record.record_id,
        status=ClaimStatus.SUBMITTED,
        submitted_height=ctx.block.height,
        submitted_ns=ctx.block.time_ns,
        history=(
            _step(
                ctx,
                ClaimAction.SUBMIT,
                ClaimStatus.SUBMITTED,
                amount=body.total,
                record_id=body.record.record_id,
            ),
        ),
        duplicate_of=duplicate_of,
        imported=imported,
        payer=payer,
    )
    _save(state, claim)
    parties = (("patient", patient), ("provider", provider.id), ("insurer", insurer))
    for party, party_id in parties:
        if party_id:
            state.put(party_index_prefix(party, party_id) + claim.id.encode(), b"")
    state.write(claim_record_key(body.record.record_id), claim.id)
    return claim


def submit_claim(state: State, ctx: TxContext, body: SubmitClaim) -> str:
    """A provider organization's billing or clinician member or EHR submits a claim to an insurer,
    with its sealed FHIR Claim; a service the provider already billed for the patient on the
    same day flags the claim as a possible duplicate (it is accepted, not refused)."""
    ctx.effects.subject = body.record.patient
    provider = _provider_of(state, ctx, SUBMITTER_ROLES, "submit")
    if not body.insurer:
        raise LedgerError(Code.NOT_FOUND, "unknown insurer ''")
    claim = _open_claim(state, ctx, provider, body)
    flag = (
        f"; flagged as a possible duplicate of claim {claim.duplicate_of}"
        if claim.duplicate_of
        else ""
    )
    return (
        f"claim {claim.id} submitted by {provider.id} to {claim.insurer}: {len(body.items)}"
        f" items, total {format_amount(body.total, body.currency)}{flag}"
    )


def import_claims(state: State, ctx: TxContext, body: ImportClaims) -> str:
    """A provider's member (billing, clinician, or its EHR system client) imports claims of
    its history, each with the payer's reported decision and payment when there is one, and
    the payer's decisions on claims it imported earlier; any refusal refuses them all."""
    if not 0 < len(body.claims) + len(body.remittances) <= MAX_IMPORTED_PER_TX:
        raise _invalid(f"1-{MAX_IMPORTED_PER_TX} claims and decisions per import")
    subjects = {c.record.patient for c in body.claims} | {
        r.remittance.record.patient for r in body.remittances
    }
    ctx.effects.subject = next(iter(subjects)) if len(subjects) == 1 else ""
    provider = _provider_of(state, ctx, SUBMITTER_ROLES, "import")
    reported = 0
    for position, imported in enumerate(body.claims):
        try:
            claim = _open_claim(state, ctx, provider, imported)
            if imported.remittance is not None:
                _report_remittance(state, ctx, claim, imported.remittance)
                reported += 1
        except LedgerError as err:
            raise LedgerError(err.code, f"claim {position}: {err.message}") from None
    for position, later in enumerate(body.remittances):
        try:
            claim = load_claim(state, later.claim_id)
            if not claim.imported or claim.provider != provider.id:
                raise LedgerError(
                    Code.UNAUTHORIZED,
                    f"claim {claim.id} is not one {provider.id} imported; its payer decides it",
                )
            if claim.outcome is not None or claim.status is not ClaimStatus.SUBMITTED:
                raise LedgerError(Code.CONFLICT, f"claim {claim.id} is already {claim.status}")
            _report_remittance(state, ctx, claim, later.remittance)
            reported += 1
        except LedgerError as err:
            raise LedgerError(err.code, f"decision {position}: {err.message}") from None
    ctx.effects.subject = next(iter(subjects)) if len(subjects) == 1 else ""
    return (
        f"{len(body.claims)} claims imported by {provider.id}, {reported} payer decisions reported"
    )


def _report_remittance(state: State, ctx: TxContext, claim: Claim, body: Remittance) -> None:
    """Record the payer's decision (and payment) on an imported claim as reported steps."""
    approved = _check_decisions(claim, body.decisions, body.outcome)
    if body.paid:
        _check_amount("paid", body.paid)
        _check_id("payment reference", body.reference)
    if body.paid > approved:
        raise _invalid(
            f"paid {format_amount(body.paid, claim.currency)} exceeds the approved"
            f" {format_amount(approved, claim.currency)}"
        )
    _check_record(body.record, EOB_RESOURCE, claim.patient)
    put_record(state, ctx, body.record)
    state.write(claim_record_key(body.record.record_id), claim.id)
    history = [
        _step(
            ctx,
            ClaimAction.ADJUDICATE,
            ClaimStatus.ADJUDICATED,
            amount=approved,
            outcome=body.outcome,
            decisions=body.decisions,
            record_id=body.record.record_id,
            reported=True,
        )
    ]
    status = ClaimStatus.PAID if 0 < body.paid == approved else ClaimStatus.ADJUDICATED
    if body.paid:
        history.append(
            _step(
                ctx,
                ClaimAction.PAY,
                status,
                amount=body.paid,
                reference=body.reference,
                reported=True,
            )
        )
    _save(
        state,
        msgspec.structs.replace(
            claim,
            status=status,
            outcome=body.outcome,
            decisions=body.decisions,
            approved_total=approved,
            paid_total=body.paid,
            responses=(body.record.record_id,),
            first_adjudicated_ns=ctx.block.time_ns,
            last_adjudicated_ns=ctx.block.time_ns,
            history=(*claim.history, *history),
        ),
    )


def _load_insurer(state: State, org_id: str) -> Organization:
    try:
        insurer = load_organization(state, org_id)
    except LedgerError:
        raise LedgerError(Code.NOT_FOUND, f"unknown insurer {org_id}") from None
    if insurer.kind is not OrganizationKind.INSURER:
        raise _invalid(f"organization {org_id} is of kind {insurer.kind}, not an insurer")
    if insurer.status is not Status.ACTIVE:
        raise LedgerError(Code.CONFLICT, f"insurer {org_id} is {insurer.status}")
    return insurer


def _check_decisions(claim: Claim, decisions: Sequence[ItemDecision], stated: Outcome) -> int:
    """Check a decision on every item (approved amounts never above the billed ones, reason
    codes for every reduction, the outcome those amounts imply); the approved total."""
    if len(decisions) != len(claim.items):
        raise _invalid(f"decide each of the claim's {len(claim.items)} items, once, in order")
    for item, decision in zip(claim.items, decisions, strict=True):
        what = f"item {item.sequence}"
        if decision.sequence != item.sequence:
            raise _invalid(f"decisions must follow the items in order; expected {what}")
        _check_amount(what, decision.approved)
        if decision.approved > item.amount:
            raise _invalid(
                f"{what}: approved {format_amount(decision.approved, claim.currency)} exceeds"
                f" the {format_amount(item.amount, claim.currency)} billed"
            )
        if len(decision.reasons) > MAX_REASONS or len(set(decision.reasons)) != len(
            decision.reasons
        ):
            raise _invalid(f"{what}: at most {MAX_REASONS} distinct reason codes")
        for reason in decision.reasons:
            if reason not in REASON_CODES:
                raise _invalid(f"{what}: unknown adjustment reason code {reason!r} (X12 CARC)")
        if decision.approved < item.amount and not decision.reasons:
            raise _invalid(f"{what}: a reduction needs at least one reason code (X12 CARC)")
    outcome = outcome_of(claim.items, decisions)
    if stated is not outcome:
        raise _invalid(f"the approved amounts make the outcome {outcome}, not {stated}")
    return sum(d.approved for d in decisions)


def adjudicate_claim(state: State, ctx: TxContext, body: AdjudicateClaim) -> str:
    """The claim's insurer decides every item of a submitted or appealed claim: approved amounts
    never above the billed ones, reason codes for every reduction, and the outcome those
    amounts imply; the sealed FHIR ClaimResponse is stored with the decision."""
    claim = load_claim(state, body.claim_id)
    ctx.effects.subject = claim.patient
    _require_insurer(ctx.sender, claim, "adjudicate")
    if claim.status not in (ClaimStatus.SUBMITTED, ClaimStatus.APPEALED):
        raise LedgerError(
            Code.CONFLICT,
            f"claim {claim.id} is {claim.status}; it is adjudicated after submission or an appeal",
        )
    approved = _check_decisions(claim, body.decisions, body.outcome)
    outcome = body.outcome
    if approved < claim.paid_total:
        raise LedgerError(
            Code.CONFLICT,
            f"{format_amount(claim.paid_total, claim.currency)} is already paid; a new decision"
            " cannot approve less",
        )
    _check_record(body.record, RESPONSE_RESOURCE, claim.patient)
    put_record(state, ctx, body.record)
    state.write(claim_record_key(body.record.record_id), claim.id)
    step = _step(
        ctx,
        ClaimAction.ADJUDICATE,
        ClaimStatus.ADJUDICATED,
        amount=approved,
        outcome=outcome,
        decisions=body.decisions,
        record_id=body.record.record_id,
    )
    _save(
        state,
        msgspec.structs.replace(
            claim,
            status=ClaimStatus.ADJUDICATED,
            outcome=outcome,
            decisions=body.decisions,
            approved_total=approved,
            responses=(*claim.responses, body.record.record_id),
            first_adjudicated_ns=claim.first_adjudicated_ns or ctx.block.time_ns,
            last_adjudicated_ns=ctx.block.time_ns,
            history=(*claim.history, step),
        ),
    )
    return (
        f"claim {claim.id} adjudicated {outcome}: approved"
        f" {format_amount(approved, claim.currency)} of"
        f" {format_amount(claim.total, claim.currency)}"
    )


def pay_claim(state: State, ctx: TxContext, body: PayClaim) -> str:
    """The claim's insurer records payment of an approved or partially approved claim: exactly
    the approved amount not yet paid, in the claim's currency."""
    claim = load_claim(state, body.claim_id)
    ctx.effects.subject = claim.patient
    _require_insurer(ctx.sender, claim, "pay")
    if claim.status is not ClaimStatus.ADJUDICATED:
        hint = "already paid" if claim.status is ClaimStatus.PAID else "not adjudicated"
        raise LedgerError(Code.CONFLICT, f"claim {claim.id} is {claim.status} ({hint})")
    if claim.outcome is Outcome.DENIED:
        raise LedgerError(Code.CONFLICT, f"claim {claim.id} was denied; there is nothing to pay")
    if claim.outstanding <= 0:
        raise LedgerError(Code.CONFLICT, f"claim {claim.id} has nothing outstanding")
    _check_id("payment reference", body.reference)
    if body.currency != claim.currency:
        raise _invalid(f"claim {claim.id} is in {claim.currency}, not {body.currency}")
    if body.amount != claim.outstanding:
        outstanding = format_amount(claim.outstanding, claim.currency)
        raise _invalid(
            f"the payment must be the outstanding {outstanding},"
            f" not {format_amount(body.amount, body.currency)}"
        )
    step = _step(
        ctx, ClaimAction.PAY, ClaimStatus.PAID, amount=body.amount, reference=body.reference
    )
    _save(
        state,
        msgspec.structs.replace(
            claim,
            status=ClaimStatus.PAID,
            paid_total=claim.paid_total + body.amount,
            history=(*claim.history, step),
        ),
    )
    return f"claim {claim.id} paid {format_amount(body.amount, claim.currency)} ({body.reference})"


def appeal_claim(state: State, ctx: TxContext, body: AppealClaim) -> str:
    """The patient (or a delegate) or the provider appeals a partial or denied decision (paid or
    not); the claim goes back to its insurer for a new decision."""
    claim = load_claim(state, body.claim_id)
    ctx.effects.subject = claim.patient
    sender = ctx.sender
    by_patient = sender.id == claim.patient or is_delegate(state, claim.patient, sender.id)
    by_provider = sender.organization == claim.provider and sender.role in PROVIDER_ROLES
    if not (by_patient or by_provider):
        raise LedgerError(
            Code.UNAUTHORIZED,
            f"only the patient, a delegate, or billing or clinician members of {claim.provider}"
            f" may appeal claim {claim.id}",
        )
    if claim.status not in (ClaimStatus.ADJUDICATED, ClaimStatus.PAID):
        raise LedgerError(
            Code.CONFLICT,
            f"claim {claim.id} is {claim.status}; only an adjudicated decision can be appealed",
        )
    if not claim.insurer:
        raise LedgerError(
            Code.CONFLICT,
            f"claim {claim.id}'s payer {claim.payer!r} is outside the network; appeal to it"
            " directly",
        )
    if claim.outcome not in (Outcome.PARTIAL, Outcome.DENIED):
        raise LedgerError(
            Code.CONFLICT, f"claim {claim.id} was {claim.outcome} in full; there is no appeal"
        )
    if claim.appeals >= MAX_APPEALS:
        raise LedgerError(
            Code.CONFLICT, f"claim {claim.id} was already appealed {MAX_APPEALS} times"
        )
    _check_supporting(state, claim.patient, body.supporting, claim.supporting)
    step = _step(
        ctx,
        ClaimAction.APPEAL,
        ClaimStatus.APPEALED,
        appeal_reason=body.reason,
        supporting_added=body.supporting,
    )
    _save(
        state,
        msgspec.structs.replace(
            claim,
            status=ClaimStatus.APPEALED,
            appeals=claim.appeals + 1,
            supporting=(*claim.supporting, *body.supporting),
            history=(*claim.history, step),
        ),
    )
    return f"claim {claim.id} appealed ({body.reason}); back with {claim.insurer}"


def check_claim_record_unchanged(state: State, record_id: str) -> None:
    """A Claim or ClaimResponse record changes only through the claim's own steps."""
    claim_id = state.read(claim_record_key(record_id), str)
    if claim_id is not None:
        raise LedgerError(
            Code.CONFLICT,
            f"record {record_id} belongs to claim {claim_id}; it changes only through claim steps",
        )


# --- statistics ------------------------------------------------------------------------------


class Ratio(msgspec.Struct, frozen=True):
    numerator: int
    denominator: int


class CurrencyTotals(msgspec.Struct, frozen=True):
    """Amounts in one currency, in minor units: billed, approved by the latest decisions, and
    paid."""

    currency: str
    submitted: int
    approved: int
    paid: int


class PartyStats(msgspec.Struct, frozen=True):
    """One provider's or insurer's claims. Counts by current status and by latest outcome;
    `decided` claims have been adjudicated at least once; time to adjudication is from the
    submission's block to the first decision's block; the denial rate is denied / decided."""

    organization: str
    claims: int
    submitted: int
    adjudicated: int
    paid: int
    appealed: int
    approved_outcomes: int
    partial_outcomes: int
    denied_outcomes: int
    duplicates: int
    appeals: int
    decided: int
    adjudication_ns_total: int
    mean_seconds_to_adjudication: int
    denial_rate: Ratio
    totals: tuple[CurrencyTotals, ...]


class ClaimStats(msgspec.Struct, frozen=True):
    providers: tuple[PartyStats, ...]
    insurers: tuple[PartyStats, ...]


def party_stats(organization: str, claims: Iterable[Claim]) -> PartyStats:
    """Totals over `claims` (integers only: amounts in minor units, times in nanoseconds)."""
    chosen = list(claims)
    status_count = {s: sum(1 for c in chosen if c.status is s) for s in ClaimStatus}
    outcome_count = {o: sum(1 for c in chosen if c.outcome is o) for o in Outcome}
    decided = [c for c in chosen if c.first_adjudicated_ns]
    waited = sum(c.first_adjudicated_ns - c.submitted_ns for c in decided)
    currencies = sorted({c.currency for c in chosen})
    totals = tuple(
        CurrencyTotals(
            currency,
            sum(c.total for c in chosen if c.currency == currency),
            sum(c.approved_total for c in chosen if c.currency == currency),
            sum(c.paid_total for c in chosen if c.currency == currency),
        )
        for currency in currencies
    )
    return PartyStats(
        organization=organization,
        claims=len(chosen),
        submitted=status_count[ClaimStatus.SUBMITTED],
        adjudicated=status_count[ClaimStatus.ADJUDICATED],
        paid=status_count[ClaimStatus.PAID],
        appealed=status_count[ClaimStatus.APPEALED],
        approved_outcomes=outcome_count[Outcome.APPROVED],
        partial_outcomes=outcome_count[Outcome.PARTIAL],
        denied_outcomes=outcome_count[Outcome.DENIED],
        duplicates=sum(1 for c in chosen if c.duplicate_of),
        appeals=sum(c.appeals for c in chosen),
        decided=len(decided),
        adjudication_ns_total=waited,
        mean_seconds_to_adjudication=waited // (len(decided) * SECOND_NS) if decided else 0,
        denial_rate=Ratio(outcome_count[Outcome.DENIED], len(decided)),
        totals=totals,
    )


def claim_stats(claims: Iterable[Claim]) -> ClaimStats:
    """Per provider and per insurer statistics of `claims`, each list by organization id (an
    outside payer of imported claims by its name, marked as outside the network)."""
    chosen = list(claims)
    providers = sorted({c.provider for c in chosen})
    insurers = sorted({c.payer_name for c in chosen})
    return ClaimStats(
        providers=tuple(party_stats(p, (c for c in chosen if c.provider == p)) for p in providers),
        insurers=tuple(party_stats(i, (c for c in chosen if c.payer_name == i)) for i in insurers),
    )
