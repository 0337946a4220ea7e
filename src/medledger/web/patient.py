"""The patient's view: my records as a timeline, their versions, my consents, who accessed my
data, my claims and their appeals, export and erasure — each through the patient's own keys and
the ledger's own rules."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiohttp import web

from medledger.client.claims import ClaimsClient
from medledger.client.records import RecordErased, RecordsClient, RecordSummary
from medledger.client.sdk import ClientError, QueryError
from medledger.ledger.claims import AppealReason
from medledger.ledger.consent import Consent, ConsentStatus, GranteeKind, Purpose, ScopeKind
from medledger.ledger.model import PRACTITIONER_ROLES, Member, Organization, Role
from medledger.ledger.records import RecordStatus, RecordVersion
from medledger.web.claims import APPEAL_REASONS, patient_claims
from medledger.web.common import (
    Audience,
    PageError,
    client_of,
    context_of,
    form_text,
    path_id,
    redirect,
    render,
    require,
    run,
    when,
    whole_number,
)
from medledger.web.context import PortalContext
from medledger.web.fhirview import ResourceView, describe
from medledger.web.proofs import AuditEvidence, audit_evidence
from medledger.web.trail import ACCESS_TYPES, TrailRow, trail_rows

SECOND_NS = 1_000_000_000
DAY_NS = 86_400 * SECOND_NS


@dataclass(frozen=True)
class TimelineItem:
    record_id: str
    version: RecordVersion
    view: ResourceView | None
    problem: str

    @property
    def date(self) -> str:
        if self.view is not None and self.view.when:
            return self.view.when[:10]
        return when(self.version.time_ns)[:10]

    @property
    def kind(self) -> str:
        return self.view.kind if self.view is not None else self.version.resource_type


def _timeline(client: RecordsClient, patient: str) -> list[TimelineItem]:
    items = []
    for summary in client.records_of(patient):
        latest = summary.latest
        if latest is None or summary.head.erased or latest.status is RecordStatus.ERASED:
            continue
        try:
            view: ResourceView | None = describe(client.read_own(summary.head.record_id).resource)
            problem = ""
        except ClientError as exc:
            view, problem = None, str(exc)
        items.append(TimelineItem(summary.head.record_id, latest, view, problem))
    items.sort(key=lambda item: (item.date, item.version.time_ns), reverse=True)
    return items


async def timeline(request: web.Request) -> web.StreamResponse:
    session = require(request, Audience.PATIENT)
    items = await run(_timeline, client_of(session), session.member.id)
    kinds = sorted({item.kind for item in items})
    chosen = request.query.get("kind", "")
    shown = [item for item in items if not chosen or item.kind == chosen]
    days: dict[str, list[TimelineItem]] = {}
    for item in shown:
        days.setdefault(item.date, []).append(item)
    return render(
        request,
        "patient/timeline.html",
        days=days,
        kinds=kinds,
        chosen=chosen,
        count=len(items),
    )


@dataclass(frozen=True)
class RecordPage:
    versions: list[RecordVersion]
    shown: RecordVersion
    resource: dict[str, object] | None
    view: ResourceView | None
    problem: str


def _record(client: RecordsClient, patient: str, record_id: str, number: int) -> RecordPage:
    history = client.history(record_id)
    if history.head.patient != patient:
        raise PageError(404, "Not one of your records", "This record is about someone else.")
    versions = sorted(history.versions, key=lambda v: v.version, reverse=True)
    shown = next((v for v in versions if v.version == (number or history.head.latest)), None)
    if shown is None:
        raise PageError(404, "No such version", f"Record {record_id} has no version {number}.")
    try:
        read = client.read_own(record_id, shown.version)
        return RecordPage(versions, shown, read.resource, describe(read.resource), "")
    except RecordErased:
        return RecordPage(versions, shown, None, None, "This record was erased.")
    except ClientError as exc:
        return RecordPage(versions, shown, None, None, str(exc))


async def record(request: web.Request) -> web.StreamResponse:
    session = require(request, Audience.PATIENT)
    record_id = path_id(request, "record_id", "record")
    asked = request.query.get("version", "")
    number = whole_number(asked, "record version", status=400) if asked else 0
    page = await run(_record, client_of(session), session.member.id, record_id, number)
    return render(
        request,
        "patient/record.html",
        record_id=record_id,
        page=page,
        when=when,
        raw=json.dumps(page.resource, indent=2) if page.resource else "",
    )


async def erase(request: web.Request) -> web.StreamResponse:
    session = require(request, Audience.PATIENT)
    form = await request.post()
    record_id = path_id(request, "record_id", "record")
    if form.get("confirm") != "yes":
        raise PageError(
            400,
            "Erasure not confirmed",
            "Tick the box that confirms you understand erasure cannot be undone.",
        )
    reason = form_text(form, "reason") or "patient's request (GDPR Art. 17)"
    client = client_of(session)
    history = await run(client.history, record_id)
    if history.head.patient != session.member.id:
        raise PageError(404, "Not one of your records", "This record is about someone else.")
    outcome = await run(client.erase, record_id, reason)
    session.notify("info", f"Record erased in block {outcome.height}: every node deletes it now.")
    raise redirect("/patient")


# --- consents ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsentRow:
    consent: Consent
    grantee: str
    scope: str
    state: str

    @property
    def active(self) -> bool:
        return self.state == "active"


def _consent_state(consent: Consent, now_ns: int) -> str:
    if consent.status is ConsentStatus.REVOKED:
        return f"revoked at block {consent.revoked_height}"
    if now_ns >= consent.end_ns:
        return "expired"
    if now_ns < consent.start_ns:
        return "not yet valid"
    return "active"


def _grantee_text(context: PortalContext, kind: GranteeKind, grantee: str) -> str:
    match kind:
        case GranteeKind.ORGANIZATION:
            return f"everyone at {context.organization_name(grantee)}"
        case GranteeKind.ROLE:
            return f"everyone in the {grantee} role"
    member = context.member(grantee)
    if member is None:
        return f"member {grantee[:12]}…"
    where = context.organization_name(member.organization)
    return f"{member.role} {grantee[:12]}… at {where}"


@dataclass(frozen=True)
class ConsentsPage:
    rows: list[ConsentRow]
    organizations: list[Organization]
    practitioners: list[Member]
    categories: list[str]


def _consents(context: PortalContext, client: RecordsClient, patient: str) -> ConsentsPage:
    now = time.time_ns()
    rows = []
    for consent in client.consents(patient):
        scope = (
            "all records"
            if consent.scope_kind is ScopeKind.ALL
            else f"{consent.scope_kind}: {', '.join(consent.scope)}"
        )
        rows.append(
            ConsentRow(
                consent,
                _grantee_text(context, consent.grantee_kind, consent.grantee),
                scope,
                _consent_state(consent, now),
            )
        )
    rows.sort(key=lambda r: (not r.active, -r.consent.granted_height))
    organizations = sorted(context.organizations().values(), key=lambda o: o.name)
    practitioners = [m for m in context.members() if m.role in PRACTITIONER_ROLES]
    practitioners.sort(key=lambda m: (m.organization, str(m.role), m.id))
    records: list[RecordSummary] = client.records_of(patient)
    categories = sorted({r.latest.category for r in records if r.latest is not None})
    return ConsentsPage(rows, organizations, practitioners, categories)


async def consents(request: web.Request) -> web.StreamResponse:
    session = require(request, Audience.PATIENT)
    context = context_of(request)
    page = await run(_consents, context, client_of(session), session.member.id)
    default_end = (datetime.now(UTC) + timedelta(days=90)).strftime("%Y-%m-%d")
    return render(
        request,
        "patient/consents.html",
        page=page,
        purposes=[p.value for p in Purpose],
        roles=[r.value for r in (Role.EMERGENCY, Role.CLINICIAN, Role.LAB, Role.BILLING)],
        default_end=default_end,
        when=when,
    )


def _end_of_day_ns(text: str) -> int:
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise PageError(400, "Check the end date", "Give the end date as YYYY-MM-DD.") from None
    return int((day + timedelta(days=1)).timestamp()) * SECOND_NS - 1


async def grant(request: web.Request) -> web.StreamResponse:
    session = require(request, Audience.PATIENT)
    form = await request.post()
    kind_text, _, grantee = form_text(form, "grantee").partition(":")
    try:
        kind = GranteeKind(kind_text)
        purposes = tuple(Purpose(str(p)) for p in form.getall("purpose", []))
    except ValueError:
        raise PageError(400, "Check the form", "Choose who may read, and why.") from None
    if not grantee:
        raise PageError(400, "Check the form", "Choose who may read your records.")
    if not purposes:
        raise PageError(400, "Check the form", "Choose at least one purpose.")
    scope_kind = ScopeKind.ALL
    scope: tuple[str, ...] = ()
    if form.get("scope") == "categories":
        scope_kind = ScopeKind.CATEGORIES
        scope = tuple(sorted({str(c) for c in form.getall("category", [])}))
        if not scope:
            raise PageError(400, "Check the form", "Choose the kinds of records to share.")
    end_ns = _end_of_day_ns(form_text(form, "until"))
    start_ns = time.time_ns() - 60 * SECOND_NS
    client = client_of(session)
    consent_id = await run(
        lambda: client.grant_consent(
            session.member.id, kind, grantee, purposes, start_ns, end_ns, scope_kind, scope
        )
    )
    who = await run(_grantee_text, context_of(request), kind, grantee)
    session.notify("info", f"Consent {consent_id[:12]}… granted: {who} may now read.")
    raise redirect("/patient/consents")


async def revoke(request: web.Request) -> web.StreamResponse:
    session = require(request, Audience.PATIENT)
    consent_id = path_id(request, "consent_id", "consent")
    client = client_of(session)
    outcome = await run(
        client.revoke_consent, session.member.id, consent_id, "revoked in the portal"
    )
    session.notify(
        "info", f"Consent {consent_id[:12]}… revoked in block {outcome.height}: it has ended."
    )
    raise redirect("/patient/consents")


# --- who accessed my data, claims, export --------------------------------------------------


async def accesses(request: web.Request) -> web.StreamResponse:
    session = require(request, Audience.PATIENT)
    context = context_of(request)
    client = client_of(session)

    def load() -> tuple[AuditEvidence, list[TrailRow]]:
        evidence = audit_evidence(client, session.member.id)
        return evidence, trail_rows(context, client, evidence, ACCESS_TYPES)

    evidence, rows = await run(load)
    return render(
        request, "patient/accesses.html", evidence=evidence, rows=rows, anchor=evidence.anchor
    )


async def claims(request: web.Request) -> web.StreamResponse:
    session = require(request, Audience.PATIENT)
    cards = await run(patient_claims, context_of(request), session.member.id)
    return render(
        request,
        "patient/claims.html",
        cards=cards,
        reasons=APPEAL_REASONS,
    )


async def appeal(request: web.Request) -> web.StreamResponse:
    """The patient appeals a partial or denied decision, signed with their own keys; the
    claim goes back to the insurer."""
    session = require(request, Audience.PATIENT)
    form = await request.post()
    claim_id = path_id(request, "claim_id", "claim")
    try:
        reason = AppealReason(form_text(form, "reason"))
    except ValueError:
        raise PageError(400, "Check the form", "Choose why you appeal the decision.") from None
    claims_client = ClaimsClient(client_of(session))
    try:
        claim = await run(claims_client.show, claim_id)
    except QueryError:
        claim = None
    if claim is None or claim.patient != session.member.id:
        raise PageError(404, "Not one of your claims", f"You have no claim {claim_id!r}.")
    result = await run(claims_client.appeal, claim_id, reason)
    insurer = context_of(request).organization_name(claim.insurer)
    session.notify(
        "info",
        f"Claim {claim_id} appealed in block {result.outcome.height}: it is back with"
        f" {insurer} for a new decision.",
    )
    raise redirect("/patient/claims")


async def export(request: web.Request) -> web.StreamResponse:
    session = require(request, Audience.PATIENT)
    bundle = await run(client_of(session).export_bundle, session.member.id)
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    return web.Response(
        body=json.dumps(bundle, indent=2).encode(),
        content_type="application/fhir+json",
        headers={"Content-Disposition": f'attachment; filename="my-records-{day}.json"'},
    )


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/patient", timeline)
    router.add_get("/patient/records/{record_id}", record)
    router.add_post("/patient/records/{record_id}/erase", erase)
    router.add_get("/patient/consents", consents)
    router.add_post("/patient/consents", grant)
    router.add_post("/patient/consents/{consent_id}/revoke", revoke)
    router.add_get("/patient/access", accesses)
    router.add_get("/patient/claims", claims)
    router.add_post("/patient/claims/{claim_id}/appeal", appeal)
    router.add_get("/patient/export", export)
