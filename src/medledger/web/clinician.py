"""The clinician's view: patients who shared with me, their records' metadata, reading a record
through an access request the ledger decides, adding and amending records, and break-the-glass
with a mandatory reason."""

from __future__ import annotations

import json
from dataclasses import dataclass

import msgspec
from aiohttp import web

from medledger.client.records import (
    AccessDenied,
    ReadRecord,
    RecordErased,
    RecordsClient,
    RecordSummary,
)
from medledger.client.sdk import ClientError, QueryError
from medledger.ledger.access import EmergencyReason, Grant
from medledger.ledger.consent import Consent, Purpose, ScopeKind
from medledger.ledger.model import Member, Role
from medledger.validation import FhirValidationError
from medledger.web.common import (
    Audience,
    PageError,
    client_of,
    context_of,
    form_text,
    is_ledger_id,
    path_id,
    redirect,
    render,
    require,
    run,
    when,
)
from medledger.web.context import PortalContext
from medledger.web.fhirview import describe
from medledger.web.forms import KINDS, FormProblem, parse_json, problem_text, resource_from_form
from medledger.web.sessions import Session


@dataclass(frozen=True)
class SharedPatient:
    patient: str
    organization: str
    consents: list[Consent]


def shared_with(context: PortalContext, member: Member) -> list[Consent]:
    """Active consents that name this member, their organization or their role."""
    data = msgspec.json.encode(
        {"member": member.id, "organization": member.organization, "role": str(member.role)}
    )
    return context.reader.query("/consents/granted-to", data, list[Consent])  # type: ignore[no-any-return]


def _home(context: PortalContext, member: Member) -> tuple[list[SharedPatient], list[Member]]:
    grouped: dict[str, list[Consent]] = {}
    for consent in shared_with(context, member):
        grouped.setdefault(consent.patient, []).append(consent)
    shared = []
    for patient_id, consents in sorted(grouped.items()):
        patient = context.member(patient_id)
        organization = context.organization_name(patient.organization) if patient else ""
        shared.append(SharedPatient(patient_id, organization, consents))
    own = [m for m in context.members(member.organization) if m.role is Role.PATIENT]
    return shared, own


def scope_text(consent: Consent) -> str:
    if consent.scope_kind is ScopeKind.ALL:
        return "all records"
    return f"{consent.scope_kind}: {', '.join(consent.scope)}"


async def home(request: web.Request) -> web.StreamResponse:
    session = require(request, Audience.CLINICIAN)
    context = context_of(request)
    query = request.query.get("patient", "").strip()
    if query:
        if not is_ledger_id(query):
            raise PageError(404, "No such patient", "There is no patient with that member id.")
        raise redirect(f"/clinician/patients/{query}")
    shared, own = await run(_home, context, session.member)
    return render(
        request,
        "clinician/home.html",
        shared=shared,
        own=own,
        scope_text=scope_text,
        when=when,
    )


@dataclass(frozen=True)
class PatientPage:
    patient: Member
    records: list[RecordSummary]
    consents: list[Consent]


def _patient(
    context: PortalContext, client: RecordsClient, member: Member, patient_id: str
) -> PatientPage:
    patient = context.member(patient_id)
    if patient is None or patient.role is not Role.PATIENT:
        raise PageError(404, "No such patient", f"No patient has the member id {patient_id!r}.")
    records = [r for r in client.records_of(patient_id) if r.latest is not None]
    records.sort(key=lambda r: r.latest.time_ns if r.latest else 0, reverse=True)
    consents = [c for c in shared_with(context, member) if c.patient == patient_id]
    return PatientPage(patient, records, consents)


def _is_emergency(session: Session) -> bool:
    return session.member.role is Role.EMERGENCY


async def patient(request: web.Request) -> web.StreamResponse:
    session = require(request, Audience.CLINICIAN)
    context = context_of(request)
    patient_id = path_id(request, "patient_id", "patient")
    page = await run(_patient, context, client_of(session), session.member, patient_id)
    return render(
        request,
        "clinician/patient.html",
        page=page,
        purposes=[p.value for p in Purpose],
        reasons=[r.value for r in EmergencyReason],
        emergency_role=_is_emergency(session),
        scope_text=scope_text,
        when=when,
    )


def _purpose(form_value: str) -> Purpose:
    try:
        return Purpose(form_value)
    except ValueError:
        raise PageError(400, "Check the form", "Choose a purpose.") from None


def _denied(request: web.Request, exc: AccessDenied, record_id: str) -> web.Response:
    return render(
        request,
        "clinician/denied.html",
        status=403,
        reason=exc.log,
        record_id=record_id,
    )


def _show_record(
    request: web.Request, session: Session, read: ReadRecord, grant: Grant | None
) -> web.Response:
    return render(
        request,
        "clinician/record.html",
        read=read,
        grant=grant,
        view=describe(read.resource),
        raw=json.dumps(read.resource, indent=2),
        may_amend=read.version.author_organization == session.member.organization,
        when=when,
    )


async def access(request: web.Request) -> web.StreamResponse:
    """Request access (and read, unless only a grant was asked for)."""
    session = require(request, Audience.CLINICIAN)
    form = await request.post()
    record_id = form_text(form, "record_id")
    purpose = _purpose(form_text(form, "purpose"))
    client = client_of(session)
    if form.get("action") == "request":
        try:
            grant_id = await run(client.request_access, record_id, purpose)
        except AccessDenied as exc:
            return _denied(request, exc, record_id)
        except RecordErased as exc:
            raise PageError(410, "The record was erased", str(exc)) from None
        grant = await run(client.grant, grant_id)
        return render(request, "clinician/grant.html", grant=grant, when=when)
    try:
        read = await run(client.read, record_id, purpose)
    except AccessDenied as exc:
        return _denied(request, exc, record_id)
    except RecordErased as exc:
        raise PageError(410, "The record was erased", str(exc)) from None
    grant = await run(client.grant, read.grant_id)
    return _show_record(request, session, read, grant)


async def emergency(request: web.Request) -> web.StreamResponse:
    """Break the glass: a reason from the ledger's list and an explicit confirmation."""
    session = require(request, Audience.CLINICIAN)
    form = await request.post()
    record_id = form_text(form, "record_id")
    reason = form_text(form, "reason")
    if reason not in {r.value for r in EmergencyReason}:
        raise PageError(400, "A reason is required", "Choose why this is an emergency.")
    if form.get("confirm") != "yes":
        raise PageError(
            400,
            "Not confirmed",
            "Confirm that this is an emergency and that the patient will see this access.",
        )
    client = client_of(session)
    try:
        read = await run(lambda: client.read(record_id, Purpose.TREATMENT, 0, reason))
    except AccessDenied as exc:
        return _denied(request, exc, record_id)
    except RecordErased as exc:
        raise PageError(410, "The record was erased", str(exc)) from None
    grant = await run(client.grant, read.grant_id)
    return _show_record(request, session, read, grant)


async def new_record(request: web.Request) -> web.StreamResponse:
    session = require(request, Audience.CLINICIAN)
    patient_id = path_id(request, "patient_id", "patient")
    context = context_of(request)
    patient_member = await run(context.member, patient_id)
    if patient_member is None or patient_member.role is not Role.PATIENT:
        raise PageError(404, "No such patient", f"No patient has the member id {patient_id!r}.")
    problem = ""
    form_values: dict[str, str] = {}
    if request.method == "POST":
        form = await request.post()
        form_values = {k: v for k, v in form.items() if isinstance(v, str) and k != "csrf_token"}
        client = client_of(session)
        try:
            resource = resource_from_form(form, patient_id, session.member.id)
            written = await run(client.put, resource, patient_id)
        except (FormProblem, FhirValidationError) as exc:
            problem = problem_text(exc)
        else:
            session.notify(
                "info",
                f"{resource['resourceType']} record {written.record_id} written"
                f" (block {written.outcome.height}).",
            )
            raise redirect(f"/clinician/patients/{patient_id}")
    return render(
        request,
        "clinician/new.html",
        status=400 if problem else 200,
        patient_id=patient_id,
        kinds=KINDS,
        problem=problem,
        values=form_values,
    )


def _current_json(client: RecordsClient, record_id: str, my_id: str) -> str:
    """The latest version, opened with the author's own envelope when I wrote it, else through
    an (audited) access request as a colleague of the author's organization."""
    history = client.history(record_id)
    latest = next(v for v in history.versions if v.version == history.head.latest)
    read = client.read_own(record_id) if latest.author == my_id else client.read(record_id)
    return json.dumps(read.resource, indent=2)


async def amend(request: web.Request) -> web.StreamResponse:
    session = require(request, Audience.CLINICIAN)
    record_id = path_id(request, "record_id", "record")
    client = client_of(session)
    problem = ""
    if request.method == "POST":
        form = await request.post()
        text = form.get("resource", "")
        current = text if isinstance(text, str) else ""
        try:
            written = await run(client.amend, record_id, parse_json(current))
        except (FormProblem, FhirValidationError) as exc:
            problem = problem_text(exc)
        else:
            session.notify("info", f"Record {record_id} amended: version {written.version}.")
            history = await run(client.history, record_id)
            raise redirect(f"/clinician/patients/{history.head.patient}")
    else:
        try:
            current = await run(_current_json, client, record_id, session.member.id)
        except AccessDenied as exc:
            return _denied(request, exc, record_id)
        except (QueryError, RecordErased) as exc:
            raise PageError(404, "Cannot amend this record", str(exc)) from None
        except ClientError as exc:
            raise PageError(502, "Cannot open this record", str(exc)) from None
    return render(
        request,
        "clinician/amend.html",
        status=400 if problem else 200,
        record_id=record_id,
        current=current,
        problem=problem,
    )


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/clinician", home)
    router.add_get("/clinician/patients/{patient_id}", patient)
    router.add_post("/clinician/access", access)
    router.add_post("/clinician/emergency", emergency)
    router.add_route("GET", "/clinician/patients/{patient_id}/new", new_record)
    router.add_route("POST", "/clinician/patients/{patient_id}/new", new_record)
    router.add_route("GET", "/clinician/records/{record_id}/amend", amend)
    router.add_route("POST", "/clinician/records/{record_id}/amend", amend)
