"""The auditor's view: a patient's accounting of disclosures, denied requests and emergency
accesses over a period — every entry with its proof, which the page checks against the block
header the validators signed (static/verify.js) — and the network's claims: totals per provider
and insurer (counts, amounts, mean time to adjudication, denial rate) and every claim with its
history, from the ledger."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiohttp import web

from medledger.client.records import RecordsClient
from medledger.ledger.model import Member, Role
from medledger.web.claims import ClaimsOverview, claims_overview
from medledger.web.common import (
    Audience,
    PageError,
    client_of,
    context_of,
    is_ledger_id,
    render,
    require,
    run,
)
from medledger.web.context import PortalContext
from medledger.web.proofs import AuditEvidence, audit_evidence
from medledger.web.trail import ACCESS_TYPES, TrailRow, trail_rows

SECOND_NS = 1_000_000_000


def _day_ns(text: str, *, end: bool) -> int | None:
    if not text:
        return None
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
        if end:
            day += timedelta(days=1)
    except (ValueError, OverflowError):
        raise PageError(400, "Check the period", "Give dates as YYYY-MM-DD.") from None
    return int(day.timestamp()) * SECOND_NS


@dataclass(frozen=True)
class Accounting:
    evidence: AuditEvidence
    disclosures: list[TrailRow]
    denied: list[TrailRow]
    emergencies: list[TrailRow]


def _accounting(
    context: PortalContext,
    session_client: RecordsClient,
    patient: str,
    start_ns: int | None,
    end_ns: int | None,
) -> Accounting:
    evidence = audit_evidence(session_client, patient)
    rows = [
        row
        for row in trail_rows(context, session_client, evidence, ACCESS_TYPES)
        if (start_ns is None or row.time_ns >= start_ns)
        and (end_ns is None or row.time_ns < end_ns)
    ]
    return Accounting(
        evidence,
        disclosures=[r for r in rows if r.granted and r.sender != patient],
        denied=[r for r in rows if r.denied],
        emergencies=[r for r in rows if r.emergency],
    )


def _patients(context: PortalContext) -> list[Member]:
    return sorted(
        (m for m in context.members() if m.role is Role.PATIENT),
        key=lambda m: (m.organization, m.id),
    )


async def home(request: web.Request) -> web.StreamResponse:
    session = require(request, Audience.AUDITOR)
    context = context_of(request)
    patient = request.query.get("patient", "").strip()
    start_text = request.query.get("from", "").strip()
    end_text = request.query.get("until", "").strip()
    start_ns = _day_ns(start_text, end=False)
    end_ns = _day_ns(end_text, end=True)
    patients = await run(_patients, context)
    accounting = None
    if patient:
        if not is_ledger_id(patient) or await run(context.member, patient) is None:
            raise PageError(404, "No such patient", f"No member has the id {patient!r}.")
        accounting = await run(_accounting, context, client_of(session), patient, start_ns, end_ns)
    claims: ClaimsOverview = await run(claims_overview, context, session.member)
    return render(
        request,
        "auditor/home.html",
        patients=patients,
        patient=patient,
        start=start_text,
        until=end_text,
        accounting=accounting,
        anchor=accounting.evidence.anchor if accounting else None,
        claims=claims,
    )


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/auditor", home)
