"""Portal sessions: server-side, in memory, and short-lived.

A session holds the member's keys, unlocked from their keystore with their passphrase at
sign-in, and nothing else secret; it lives only in this process's memory and is dropped —
keys and all — at sign-out, after `idle_timeout` without a request, or `absolute_timeout`
after sign-in. The browser holds only a random session id, in a cookie that scripts cannot
read (HttpOnly), that other sites' requests never carry (SameSite=Strict), that travels only
over TLS when the portal is served over https (Secure), and only to /portal.

Every state-changing request (POST) must carry the session's CSRF token in a form field and
come from this portal's own origin (the Origin header, or failing it the Referer). Sign-in
has no session yet, so its form carries a token that must equal the one in a short-lived
sign-in cookie (double submit) — and sign-in attempts per name and per source address are
rate-limited (see `medledger.web.signin`).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from aiohttp import web

from medledger.crypto.keys import KeyPair
from medledger.ledger.model import Member
from medledger.web.signin import RecentEvents

SESSION_COOKIE = "medledger_portal"
SIGNIN_COOKIE = "medledger_signin"
CSRF_FIELD = "csrf_token"
COOKIE_PATH = "/portal"

Clock = Callable[[], float]


class Closeable(Protocol):
    def close(self) -> None: ...


@dataclass
class Session:
    """One signed-in member. `client` is the member's SDK client, built on their keys."""

    id: str
    csrf_token: str
    name: str
    member: Member
    keys: KeyPair
    client: Closeable
    created: float
    last_seen: float
    notices: list[tuple[str, str]] = field(default_factory=list)

    def notify(self, kind: str, text: str) -> None:
        """A message for the next page this session sees (after a redirect)."""
        self.notices.append((kind, text))

    def take_notices(self) -> list[tuple[str, str]]:
        taken, self.notices = self.notices, []
        return taken


class SessionStore:
    """Sessions by id; expired ones are dropped when next seen and by `sweep`."""

    def __init__(
        self,
        idle_timeout: float,
        absolute_timeout: float,
        max_sessions: int = 1000,
        clock: Clock = time.monotonic,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.absolute_timeout = absolute_timeout
        self.max_sessions = max_sessions
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, name: str, member: Member, keys: KeyPair, client: Closeable) -> Session:
        """A new session with fresh random id and CSRF token (never reusing an id the browser
        sent before sign-in, so a planted id cannot become a signed-in session)."""
        self.sweep()
        while len(self._sessions) >= self.max_sessions:
            _, oldest = self._sessions.popitem(last=False)
            oldest.client.close()
        now = self.clock()
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf_token=secrets.token_urlsafe(32),
            name=name,
            member=member,
            keys=keys,
            client=client,
            created=now,
            last_seen=now,
        )
        self._sessions[session.id] = session
        return session

    def _expired(self, session: Session, now: float) -> bool:
        return (
            now - session.last_seen > self.idle_timeout
            or now - session.created > self.absolute_timeout
        )

    def get(self, session_id: str) -> Session | None:
        """The live session with this id, its idle timer restarted; None when there is none
        (never was, signed out, or expired — an expired one is dropped here)."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self.clock()
        if self._expired(session, now):
            self.drop(session_id)
            return None
        session.last_seen = now
        self._sessions.move_to_end(session_id)
        return session

    def drop(self, session_id: str) -> None:
        """End a session: its keys and client are released here and nowhere kept."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.client.close()

    def sweep(self) -> None:
        now = self.clock()
        for session_id in [s.id for s in self._sessions.values() if self._expired(s, now)]:
            self.drop(session_id)

    def close(self) -> None:
        for session_id in list(self._sessions):
            self.drop(session_id)


class SignInLimiter:
    """At most `failures` wrong passphrases per name within `window` seconds; after that the
    name is locked until the window has passed (a guessing attacker gets a handful of tries
    per window, a patient who mistyped waits a few minutes). Per-address limits are in
    `medledger.web.signin`."""

    def __init__(self, failures: int, window: float, clock: Clock = time.monotonic) -> None:
        self.failures = failures
        self._failures = RecentEvents(window, clock)

    @property
    def clock(self) -> Clock:
        return self._failures.clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        self._failures.clock = clock

    def locked_for(self, name: str) -> float:
        """Seconds until `name` may try again; 0 when it may try now."""
        return self._failures.wait(name, self.failures)

    def failed(self, name: str) -> None:
        self._failures.add(name)

    def succeeded(self, name: str) -> None:
        self._failures.clear(name)


def set_cookie(
    response: web.StreamResponse, request: web.Request, name: str, value: str, public_origin: str
) -> None:
    response.set_cookie(
        name,
        value,
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=request.secure or public_origin.startswith("https://"),
    )


def clear_cookie(response: web.StreamResponse, name: str) -> None:
    response.del_cookie(name, path=COOKIE_PATH)


def tokens_match(expected: str, submitted: str | None) -> bool:
    return bool(expected) and submitted is not None and hmac.compare_digest(expected, submitted)


def same_origin(request: web.Request, public_origin: str = "") -> bool:
    """The request came from a page of this portal: its Origin header (or, when a browser
    sent none, its Referer) names this host with this scheme — or the configured public
    origin, when a proxy serves the portal. A request with neither is refused: every browser
    sends Origin with a form POST."""
    own = public_origin or f"{request.scheme}://{request.host}"
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin == own
    referer = request.headers.get("Referer")
    if referer:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}" == own
    return False
