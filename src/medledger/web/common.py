"""What every portal view shares: the context, the session, rendering, role checks, and
running the synchronous SDK off the event loop (the same loop serves ABCI to CometBFT)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from aiohttp import web

from medledger.client.records import RecordsClient
from medledger.ledger.model import Role
from medledger.web.context import PortalContext
from medledger.web.sessions import CSRF_FIELD, Session

T = TypeVar("T")

PORTAL = web.AppKey("portal", PortalContext)
SESSION = web.RequestKey("medledger.portal.session", Session)
PREFIX = "/portal"
# Heights and versions are SQLite INTEGERs and CometBFT int64s: nothing above this exists.
MAX_WHOLE_NUMBER = 2**63 - 1
_WHOLE_NUMBER = re.compile(r"[0-9]{1,19}")
# Every id the ledger assigns or accepts (member ids, record, consent and claim ids) fits this.
_LEDGER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class Audience(StrEnum):
    PATIENT = "patient"
    CLINICIAN = "clinician"
    AUDITOR = "auditor"
    MEMBER = "member"


_AUDIENCES: dict[Role, frozenset[Audience]] = {
    Role.PATIENT: frozenset({Audience.PATIENT}),
    Role.CLINICIAN: frozenset({Audience.CLINICIAN}),
    Role.EMERGENCY: frozenset({Audience.CLINICIAN}),
    Role.LAB: frozenset({Audience.CLINICIAN}),
    Role.AUDITOR: frozenset({Audience.AUDITOR}),
    Role.ADMIN: frozenset({Audience.AUDITOR}),
}


def audiences_of(role: Role) -> frozenset[Audience]:
    """Which views a role may open; every signed-in member may open the explorer."""
    return _AUDIENCES.get(role, frozenset()) | {Audience.MEMBER}


class PageError(Exception):
    """Shown to the member as a page with this status, title and explanation."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


def context_of(request: web.Request) -> PortalContext:
    return request.app[PORTAL]


def session_of(request: web.Request) -> Session | None:
    return request.get(SESSION)


def require(request: web.Request, audience: Audience) -> Session:
    """The signed-in member, if their role may open this view (the middleware has already
    sent anyone without a session to sign in)."""
    session = session_of(request)
    if session is None:
        raise web.HTTPSeeOther(f"{PREFIX}/login")
    if audience not in audiences_of(session.member.role):
        raise PageError(
            403,
            "Not available for your role",
            f"This page is for {audience}s; you are signed in as a {session.member.role}.",
        )
    return session


async def run(function: Callable[..., T], *args: Any) -> T:
    """Run a blocking SDK call in a worker thread."""
    return await asyncio.to_thread(function, *args)


def redirect(path: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(PREFIX + path)


def when(time_ns: int, seconds: bool = False) -> str:
    """A block time as people read it (UTC)."""
    if not time_ns:
        return ""
    moment = datetime.fromtimestamp(time_ns // 1_000_000_000, tz=UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC")


def render(
    request: web.Request, template: str, *, status: int = 200, **values: Any
) -> web.Response:
    context = context_of(request)
    session = session_of(request)
    audiences = audiences_of(session.member.role) if session else frozenset()
    page = context.templates.get_template(template).render(
        prefix=PREFIX,
        session=session,
        audiences={str(a) for a in audiences},
        csrf_field=CSRF_FIELD,
        csrf_token=session.csrf_token if session else values.pop("signin_token", ""),
        organization=context.organization,
        home_name=context.organization_name(context.organization),
        organization_name=context.organization_name,
        notices=session.take_notices() if session else values.pop("notices", []),
        path=request.path,
        **values,
    )
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8")


def client_of(session: Session) -> RecordsClient:
    """The signed-in member's SDK client (their keys, this node's RPC and API)."""
    client = session.client
    assert isinstance(client, RecordsClient)
    return client


def form_text(form: Mapping[str, Any], name: str, limit: int = 200) -> str:
    value = form.get(name, "")
    return value.strip()[:limit] if isinstance(value, str) else ""


def whole_number(text: str, what: str, *, lowest: int = 1, status: int = 404) -> int:
    """`text` as a whole number from `lowest` to MAX_WHOLE_NUMBER (ASCII digits only), or a
    PageError that says so — never an exception from int() or from the ledger's storage."""
    if not _WHOLE_NUMBER.fullmatch(text) or not lowest <= int(text) <= MAX_WHOLE_NUMBER:
        raise PageError(
            status,
            f"No such {what}" if status == 404 else f"Not a valid {what}",
            f"A {what} is a whole number from {lowest} to {MAX_WHOLE_NUMBER}.",
        )
    return int(text)


def is_ledger_id(text: str) -> bool:
    return _LEDGER_ID.fullmatch(text) is not None


def path_id(request: web.Request, name: str, what: str) -> str:
    """The id in the URL's `{name}` part, if it has the form of a ledger id; else a 404 page
    (an id of another form names nothing, and is not sent on to the ledger)."""
    text = request.match_info[name]
    if not is_ledger_id(text):
        raise PageError(404, f"No such {what}", f"There is no {what} with that id.")
    return text
