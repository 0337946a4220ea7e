"""The portal as an aiohttp sub-application under /portal of the node's HTTP app.

`add_portal_routes(app, node, peers)` mounts it. Pages are rendered on the server (Jinja2,
autoescaped); the only scripts are the portal's own files under /portal/static, which a
Content-Security-Policy enforces, so pages work without JavaScript except the in-page proof
check.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import jinja2
from aiohttp import web

from medledger.client.errors import classify
from medledger.client.records import HomeNode
from medledger.client.sdk import ClientError, LedgerClient, ProofError, TxRejected
from medledger.config import NodeConfig
from medledger.web import auditor, clinician, explorer, patient
from medledger.web.common import (
    PORTAL,
    PREFIX,
    SESSION,
    Audience,
    PageError,
    audiences_of,
    context_of,
    redirect,
    render,
    run,
    session_of,
)
from medledger.web.context import PortalContext, SignInError
from medledger.web.sessions import (
    CSRF_FIELD,
    SESSION_COOKIE,
    SIGNIN_COOKIE,
    SessionStore,
    SignInLimiter,
    clear_cookie,
    same_origin,
    set_cookie,
    tokens_match,
)
from medledger.web.settings import PORTAL_KEYS_DIR, PortalSettings, load_portal_settings
from medledger.web.signin import AddressLimiter, KeyDerivations, SignInBusy, address_key

log = logging.getLogger("medledger.portal")

PACKAGE_DIR = Path(__file__).parent
STATIC_DIR = PACKAGE_DIR / "static"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# No inline script or style anywhere: only the portal's own files run.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
# Paths that need no session.
PUBLIC = (f"{PREFIX}/login", f"{PREFIX}/static/")


def templates() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("medledger.web", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return environment


def _error_page(request: web.Request, status: int, title: str, message: str) -> web.Response:
    return render(request, "error.html", status=status, title=title, message=message)


def _csrf_refused(request: web.Request) -> web.Response:
    return _error_page(
        request,
        403,
        "This form could not be accepted",
        "The form did not come from this portal's own page, or it is from an earlier"
        " session (the security check against cross-site request forgery failed). Nothing"
        " was changed. Go back, reload the page and try again.",
    )


@web.middleware
async def portal_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Sessions, CSRF checks, error pages and security headers for every portal request."""
    context = context_of(request)
    is_public = request.path.startswith(PUBLIC)
    cookie = request.cookies.get(SESSION_COOKIE)
    session = context.sessions.get(cookie) if cookie else None
    if session is not None:
        request[SESSION] = session
    response: web.StreamResponse
    if context.directory_stale():
        with contextlib.suppress(ClientError):
            await run(context.organizations)
    try:
        if not is_public and session is None:
            target = f"{PREFIX}/login?expired=1" if cookie else f"{PREFIX}/login"
            refusal = web.HTTPSeeOther(target)
            if cookie:
                clear_cookie(refusal, SESSION_COOKIE)
            raise refusal
        if request.method == "POST" and session is not None and not is_public:
            form = await request.post()
            submitted = form.get(CSRF_FIELD)
            if not same_origin(request, context.settings.public_origin) or not tokens_match(
                session.csrf_token, submitted if isinstance(submitted, str) else None
            ):
                log.warning("portal csrf refusal", extra={"path": request.path})
                response = _csrf_refused(request)
            else:
                response = await handler(request)
        else:
            response = await handler(request)
    except PageError as exc:
        response = _error_page(request, exc.status, exc.title, exc.message)
    except ClientError as exc:
        kind = classify(exc)
        if isinstance(exc, TxRejected):
            message = exc.log or str(exc)
        elif isinstance(exc, ProofError):
            message = f"{exc} — try another node."
        else:
            message = str(exc)
        response = _error_page(request, kind.status, kind.title, message)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("portal error", extra={"path": request.path})
        response = _error_page(
            request,
            500,
            "Something went wrong",
            "The portal could not complete this request. The node's log has the details.",
        )
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "same-origin")
    if not request.path.startswith(f"{PREFIX}/static/"):
        headers.setdefault("Cache-Control", "no-store")
    return response


# --- sign-in -------------------------------------------------------------------------------


def _signin_page(
    request: web.Request, *, status: int = 200, error: str = "", name: str = ""
) -> web.Response:
    token = secrets.token_urlsafe(32)
    notices = []
    if request.query.get("expired"):
        notices.append(("warning", "Your session has expired. Please sign in again."))
    if request.query.get("signed_out"):
        notices.append(("info", "You are signed out. Your keys were dropped from memory."))
    response = render(
        request,
        "signin.html",
        status=status,
        error=error,
        name=name,
        signin_token=token,
        notices=notices,
    )
    set_cookie(response, request, SIGNIN_COOKIE, token, context_of(request).settings.public_origin)
    return response


async def signin_form(request: web.Request) -> web.StreamResponse:
    if session_of(request) is not None:
        raise redirect("/")
    return _signin_page(request)


async def signin(request: web.Request) -> web.StreamResponse:
    context = context_of(request)
    form = await request.post()
    submitted = form.get(CSRF_FIELD)
    if not same_origin(request, context.settings.public_origin) or not tokens_match(
        request.cookies.get(SIGNIN_COOKIE, ""), submitted if isinstance(submitted, str) else None
    ):
        return _csrf_refused(request)
    name = str(form.get("name", "")).strip()
    passphrase = str(form.get("passphrase", ""))
    if not name or not passphrase:
        return _signin_page(request, status=400, error="Enter your name and passphrase.", name=name)
    address = address_key(request.remote)
    wait = context.addresses.locked_for(address)
    if wait:
        log.warning("portal sign-in refused: too many attempts from one address")
        return _signin_page(
            request,
            status=429,
            error="Too many sign-in attempts from your network. Try again in"
            f" {_minutes(wait)} minute(s).",
            name=name,
        )
    context.addresses.attempted(address)
    wait = context.limiter.locked_for(name)
    if wait:
        return _signin_page(
            request,
            status=429,
            error="Too many wrong passphrases for this name. Try again in"
            f" {_minutes(wait)} minute(s).",
            name=name,
        )
    try:
        keys = await context.derivations.run(context.open_keystore, name, passphrase)
        member = await run(context.enrolled_member, keys)
    except SignInBusy:
        response = _signin_page(
            request,
            status=503,
            error="Too many sign-ins at this moment. Please retry in a few seconds.",
            name=name,
        )
        response.headers["Retry-After"] = "5"
        return response
    except SignInError as exc:
        context.limiter.failed(name)
        context.addresses.failed(address)
        log.info("portal sign-in refused", extra={"keystore": name})
        return _signin_page(request, status=401, error=str(exc), name=name)
    context.limiter.succeeded(name)
    old = request.cookies.get(SESSION_COOKIE)
    if old:
        context.sessions.drop(old)
    session = context.sessions.create(name, member, keys, context.client_for(keys, member.id))
    log.info("portal sign-in", extra={"member": member.id, "role": str(member.role)})
    response = web.HTTPSeeOther(f"{PREFIX}/")
    set_cookie(response, request, SESSION_COOKIE, session.id, context.settings.public_origin)
    clear_cookie(response, SIGNIN_COOKIE)
    raise response


def _minutes(seconds: float) -> int:
    return max(1, round(seconds / 60))


async def signout(request: web.Request) -> web.StreamResponse:
    context = context_of(request)
    session = session_of(request)
    if session is not None:
        context.sessions.drop(session.id)
    response = web.HTTPSeeOther(f"{PREFIX}/login?signed_out=1")
    clear_cookie(response, SESSION_COOKIE)
    raise response


async def home(request: web.Request) -> web.StreamResponse:
    """Each member lands on their own view."""
    session = session_of(request)
    assert session is not None
    audiences = audiences_of(session.member.role)
    for audience in (Audience.PATIENT, Audience.CLINICIAN, Audience.AUDITOR):
        if audience in audiences:
            raise redirect(f"/{audience}")
    raise redirect("/explorer")


async def not_found(request: web.Request) -> web.StreamResponse:
    raise PageError(404, "Not found", "There is no such page in the portal.")


def build_portal(
    node: NodeConfig,
    peers: Mapping[str, str],
    settings: PortalSettings,
    ledger: Callable[[], LedgerClient] | None = None,
    home_node: HomeNode | None = None,
) -> web.Application:
    context = PortalContext(
        organization=node.organization,
        chain_id=node.chain_id,
        rpc_url=node.cometbft_rpc,
        api_url=node.api_url,
        peers=dict(peers),
        keys_dir=node.home / PORTAL_KEYS_DIR,
        settings=settings,
        sessions=SessionStore(
            settings.idle_timeout_seconds,
            settings.absolute_timeout_seconds,
            settings.max_sessions,
        ),
        limiter=SignInLimiter(settings.login_failures, settings.login_window_seconds),
        addresses=AddressLimiter(
            settings.login_address_attempts,
            settings.login_address_failures,
            settings.login_window_seconds,
        ),
        derivations=KeyDerivations(settings.signin_workers, settings.signin_queue),
        templates=templates(),
        reader=ledger() if ledger else LedgerClient(node.cometbft_rpc, node.chain_id),
        ledger=ledger,
        home=home_node,
    )
    portal = web.Application(middlewares=[portal_middleware])
    portal[PORTAL] = context
    router = portal.router
    router.add_get("/", home)
    router.add_get("/login", signin_form)
    router.add_post("/login", signin)
    router.add_post("/logout", signout)
    router.add_static("/static", STATIC_DIR, append_version=False)
    patient.add_routes(router)
    clinician.add_routes(router)
    auditor.add_routes(router)
    explorer.add_routes(router)
    router.add_route("*", "/{tail:.*}", not_found)

    async def close(_: web.Application) -> None:
        context.close()

    portal.on_cleanup.append(close)
    return portal


def add_portal_routes(
    app: web.Application,
    node: NodeConfig,
    peers: Mapping[str, str],
    settings: PortalSettings | None = None,
    ledger: Callable[[], LedgerClient] | None = None,
    home_node: HomeNode | None = None,
) -> web.Application:
    """Mount the portal under /portal of the node's HTTP app (settings from the node's
    `[portal]` table unless given); `ledger` and `home` as in `PortalContext`."""
    portal = build_portal(
        node, peers, settings or load_portal_settings(node.home), ledger, home_node
    )

    async def to_portal(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{PREFIX}/")

    app.router.add_get(PREFIX, to_portal)
    app.add_subapp(PREFIX, portal)
    return portal
