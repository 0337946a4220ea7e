"""Claims as the portal shows them: each claim with its items, amounts and every step of its
history with the block that committed it, and the per-provider and per-insurer totals the
ledger computes — for the patient's and the auditor's views. Everything here comes from the
ledger's claim objects (no PHI, read through the portal's node like the directory); the Claim
and ClaimResponse documents stay encrypted records, linked from the patient's view. Who sees
which claims follows the native API's rule."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from medledger.client.claims import claim_filter
from medledger.ledger.claims import (
    CODE_SYSTEM_NAMES,
    MAX_APPEALS,
    REASON_CODES,
    AppealReason,
    Claim,
    ClaimAction,
    ClaimStats,
    ClaimStatus,
    ClaimStep,
    CurrencyTotals,
    Outcome,
    PartyStats,
    code_system,
    format_amount,
)
from medledger.ledger.model import Member, Role
from medledger.web.common import when
from medledger.web.context import PortalContext

ACTIONS = {
    ClaimAction.SUBMIT: "Submitted",
    ClaimAction.ADJUDICATE: "Decided",
    ClaimAction.PAY: "Paid",
    ClaimAction.APPEAL: "Appealed",
}
APPEAL_REASONS = {
    AppealReason.DISAGREE: "I disagree with the decision",
    AppealReason.ADDITIONAL_INFORMATION: "There is more information to consider",
    AppealReason.CODING_CORRECTION: "A service was coded wrongly",
    AppealReason.MEDICAL_NECESSITY: "The care was medically necessary",
    AppealReason.BILLING_ERROR: "The insurer made a billing error",
}
APPEALABLE = frozenset({Outcome.PARTIAL, Outcome.DENIED})


@dataclass(frozen=True)
class ItemLine:
    sequence: int
    code: str
    system: str
    description: str
    service_date: str
    billed: str
    approved: str  # "" before the first decision
    reasons: tuple[str, ...]
    reduced: bool


@dataclass(frozen=True)
class StepLine:
    number: int
    action: str
    status: str
    height: int
    time: str
    actor: str
    actor_role: str
    organization: str
    detail: str
    record_id: str


@dataclass(frozen=True)
class ClaimCard:
    claim: Claim
    provider: str
    insurer: str
    submitted: str
    service_dates: str
    billed: str
    approved: str
    paid: str
    outstanding: str
    items: list[ItemLine]
    steps: list[StepLine]
    can_appeal: bool

    @property
    def status_class(self) -> str:
        """The badge style of the claim's state."""
        if self.claim.outcome is Outcome.DENIED:
            return "badge-denied"
        if self.claim.outcome is Outcome.PARTIAL:
            return "badge-abnormal"
        return "badge-ok" if self.claim.status is ClaimStatus.PAID else ""

    @property
    def state(self) -> str:
        claim = self.claim
        if claim.status is ClaimStatus.APPEALED:
            return f"appealed, awaiting a new decision (was {claim.outcome})"
        if claim.outcome is None:
            return "submitted, awaiting a decision"
        return f"{claim.status} — {claim.outcome}"


def may_appeal(claim: Claim) -> bool:
    """The ledger's appeal rule: a partial or denied decision (paid or not), at most
    MAX_APPEALS times."""
    return (
        claim.status in (ClaimStatus.ADJUDICATED, ClaimStatus.PAID)
        and bool(claim.insurer)  # a payer outside the network hears no appeal here
        and claim.outcome in APPEALABLE
        and claim.appeals < MAX_APPEALS
    )


def _step_detail(claim: Claim, step: ClaimStep) -> str:
    amount = format_amount(step.amount, claim.currency)
    reported = (
        f" — as {claim.payer_name} decided it, reported from its explanation of benefit"
        if step.reported
        else ""
    )
    match step.action:
        case ClaimAction.SUBMIT:
            source = " (imported from the provider's history)" if claim.imported else ""
            return f"{amount} billed for {len(claim.items)} service(s){source}"
        case ClaimAction.ADJUDICATE:
            return f"{step.outcome}: {amount} approved{reported}"
        case ClaimAction.PAY:
            return f"{amount} paid (payment {step.reference}){reported}"
        case ClaimAction.APPEAL:
            reason = APPEAL_REASONS.get(step.appeal_reason, "") if step.appeal_reason else ""
            added = len(step.supporting_added)
            extra = f"; {added} record(s) added" if added else ""
            return f"{reason or step.appeal_reason}{extra}"
    return ""


def _items(claim: Claim) -> list[ItemLine]:
    decisions = {d.sequence: d for d in claim.decisions}
    lines = []
    for item in claim.items:
        system, display = code_system(item)
        decision = decisions.get(item.sequence)
        lines.append(
            ItemLine(
                sequence=item.sequence,
                code=item.code,
                system=CODE_SYSTEM_NAMES.get(system, ""),
                description=display,
                service_date=item.service_date,
                billed=format_amount(item.amount, claim.currency),
                approved=format_amount(decision.approved, claim.currency) if decision else "",
                reasons=tuple(f"{r} — {REASON_CODES.get(r, '')}" for r in decision.reasons)
                if decision
                else (),
                reduced=decision is not None and decision.approved < item.amount,
            )
        )
    return lines


def claim_card(context: PortalContext, claim: Claim) -> ClaimCard:
    """A claim for display (blocking: looks up the members who acted; call it in a worker)."""
    steps = []
    for number, step in enumerate(claim.history, start=1):
        actor = context.member(step.actor)
        steps.append(
            StepLine(
                number=number,
                action=ACTIONS[step.action],
                status=step.status.value,
                height=step.height,
                time=when(step.time_ns),
                actor=step.actor,
                actor_role=actor.role.value if actor else "",
                organization=context.organization_name(step.actor_organization),
                detail=_step_detail(claim, step),
                record_id=step.record_id,
            )
        )
    dates = sorted({i.service_date for i in claim.items})
    decided = claim.outcome is not None
    return ClaimCard(
        claim=claim,
        provider=context.organization_name(claim.provider),
        insurer=context.organization_name(claim.insurer) if claim.insurer else claim.payer_name,
        submitted=when(claim.submitted_ns),
        service_dates=dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}",
        billed=format_amount(claim.total, claim.currency),
        approved=format_amount(claim.approved_total, claim.currency) if decided else "",
        paid=format_amount(claim.paid_total, claim.currency),
        outstanding=format_amount(claim.outstanding, claim.currency) if decided else "",
        items=_items(claim),
        steps=steps,
        can_appeal=may_appeal(claim),
    )


def claim_cards(context: PortalContext, claims: Iterable[Claim]) -> list[ClaimCard]:
    """Newest first."""
    ordered = sorted(claims, key=lambda c: (c.submitted_ns, c.id), reverse=True)
    return [claim_card(context, c) for c in ordered]


# --- statistics ----------------------------------------------------------------------------


def percentage(numerator: int, denominator: int) -> str:
    if denominator == 0:
        return "—"
    return f"{100 * numerator / denominator:.1f}%"


def duration(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} d {hours % 24} h"


@dataclass(frozen=True)
class StatsRow:
    organization: str
    name: str
    stats: PartyStats

    @property
    def denial_rate(self) -> str:
        return percentage(self.stats.denial_rate.numerator, self.stats.denial_rate.denominator)

    @property
    def denial_detail(self) -> str:
        rate = self.stats.denial_rate
        return f"{rate.numerator} of {rate.denominator} decided" if rate.denominator else ""

    @property
    def mean_time(self) -> str:
        if not self.stats.decided:
            return "—"
        return duration(self.stats.mean_seconds_to_adjudication)

    def amounts(self, kind: str) -> list[str]:
        def pick(totals: CurrencyTotals) -> int:
            return {"billed": totals.submitted, "approved": totals.approved}.get(kind, totals.paid)

        return [format_amount(pick(t), t.currency) for t in self.stats.totals]


def stats_rows(context: PortalContext, rows: Sequence[PartyStats]) -> list[StatsRow]:
    return [StatsRow(r.organization, context.organization_name(r.organization), r) for r in rows]


@dataclass(frozen=True)
class ClaimsOverview:
    """What an auditor (every claim) or an admin (network totals, their organization's claims)
    sees of the network's claims."""

    providers: list[StatsRow]
    insurers: list[StatsRow]
    cards: list[ClaimCard]
    scope: str


def list_claims(
    context: PortalContext,
    patient: str | None = None,
    provider: str | None = None,
    insurer: str | None = None,
) -> list[Claim]:
    """Claims from the ledger, by one party or all (blocking)."""
    data = claim_filter(patient, provider, insurer)
    return context.reader.query("/claims", data, list[Claim])  # type: ignore[no-any-return]


def patient_claims(context: PortalContext, patient: str) -> list[ClaimCard]:
    """A patient's own claims, newest first (blocking)."""
    return claim_cards(context, list_claims(context, patient=patient))


def claims_overview(context: PortalContext, member: Member) -> ClaimsOverview:
    """As the native API: auditors see every claim; others the claims of their organization
    (as provider or insurer), and admins the network-wide totals too (blocking)."""
    stats: ClaimStats = context.reader.query("/claims/stats", b"", ClaimStats)
    if member.role is Role.AUDITOR:
        chosen = list_claims(context)
        scope = "every claim on the ledger"
    else:
        found = {c.id: c for c in list_claims(context, provider=member.organization)}
        found.update((c.id, c) for c in list_claims(context, insurer=member.organization))
        chosen = list(found.values())
        scope = f"the claims of {context.organization_name(member.organization)}"
    return ClaimsOverview(
        providers=stats_rows(context, stats.providers),
        insurers=stats_rows(context, stats.insurers),
        cards=claim_cards(context, chosen),
        scope=scope,
    )
