"""SMART Backend Services authorization (SMART App Launch v2, "Backend Services").

A registered system client asks the token endpoint for an access token with a JWT assertion
signed by its private key (RFC 7523 client authentication: `iss` = `sub` = client_id, `aud` =
the token endpoint, a unique `jti`, an `exp` at most five minutes ahead). The node checks the
signature against the public JWK registered on the ledger, grants the requested SMART scopes
that the registration allows, and returns a short-lived bearer token. Each FHIR request is then
checked against the token's scopes (and, for records, against the ledger's access rules).
Refusals are answered 401 (no valid token) or 403 (outside the scopes) and written to the
node's audit log.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass

import jwt

from medledger.auth import Admission, ReplayCache
from medledger.ledger.clients import ClientStatus, SmartClient, jwk_algorithm, load_client
from medledger.ledger.errors import LedgerError
from medledger.ledger.identity import is_active, load_member
from medledger.ledger.state import State, StateReader
from medledger.store.node_audit import NodeAuditLog

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_LIFETIME = 300
MAX_ASSERTION_LIFETIME = 300
SCOPE = re.compile(r"^system/(\*|[A-Z][A-Za-z]+)\.(c?r?u?d?s?|read|write|\*)$")
INTERACTIONS = "cruds"


class SmartError(Exception):
    """An OAuth error: `error` is the RFC 6749 code, `status` the HTTP status."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


def scope_permissions(scope: str) -> tuple[str, frozenset[str]] | None:
    """(resource type or "*", interactions) of one system scope; v1 `read` is `rs`, `write`
    is `cud`, `*` is all five."""
    match = SCOPE.match(scope)
    if match is None:
        return None
    resource, permission = match.groups()
    expanded = {"read": "rs", "write": "cud", "*": INTERACTIONS}.get(permission, permission)
    return resource, frozenset(expanded)


def scope_permits(scopes: frozenset[str], resource_type: str, interaction: str) -> bool:
    for scope in scopes:
        parsed = scope_permissions(scope)
        if parsed is not None and parsed[0] in ("*", resource_type) and interaction in parsed[1]:
            return True
    return False


def covered(requested: str, allowed: frozenset[str]) -> bool:
    """Whether every interaction a requested scope names is allowed by the registration."""
    parsed = scope_permissions(requested)
    if parsed is None:
        return False
    resource, interactions = parsed
    targets = [resource] if resource != "*" else ["*"]
    return all(
        any(
            (p := scope_permissions(a)) is not None and p[0] in ("*", target) and i in p[1]
            for a in allowed
        )
        for target in targets
        for i in interactions
    )


@dataclass(frozen=True)
class AccessToken:
    token: str
    client_id: str
    member: str
    organization: str
    scopes: frozenset[str]
    expires_at: float


class TokenService:
    def __init__(self, state: StateReader, token_url: str, audit: NodeAuditLog) -> None:
        self._state = state
        self.token_url = token_url
        self._audit = audit
        self._tokens: dict[str, AccessToken] = {}
        self._replays = ReplayCache()
        self._lock = threading.Lock()

    def issue(self, form: dict[str, str]) -> AccessToken:
        client_id = "?"
        try:
            token = self._issue(form)
        except SmartError as exc:
            with contextlib.suppress(SmartError):
                client_id = _claimed_client(form.get("client_assertion", ""))
            self._audit.record(client_id, "smart.token", self.token_url, "refused", exc.description)
            raise
        self._audit.record(token.client_id, "smart.token", " ".join(sorted(token.scopes)), "issued")
        return token

    def _issue(self, form: dict[str, str]) -> AccessToken:
        if form.get("grant_type") != "client_credentials":
            raise SmartError(400, "unsupported_grant_type", "grant_type must be client_credentials")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise SmartError(
                400, "invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}"
            )
        assertion = form.get("client_assertion", "")
        client_id = _claimed_client(assertion)
        state = State(self._state)
        client = load_client(state, client_id)
        if client is None or client.status is not ClientStatus.ACTIVE:
            raise SmartError(401, "invalid_client", f"no active client {client_id!r} is registered")
        try:
            member = load_member(state, client.member)
        except LedgerError:
            raise SmartError(
                401, "invalid_client", "the client's ledger member is unknown"
            ) from None
        if not is_active(state, member):
            raise SmartError(401, "invalid_client", f"the client's member is {member.status}")
        claims = self._verify_assertion(assertion, client)
        requested = form.get("scope", "").split()
        if not requested:
            raise SmartError(400, "invalid_scope", "no scope requested")
        allowed = frozenset(client.scopes)
        granted = frozenset(s for s in requested if covered(s, allowed))
        if not granted:
            raise SmartError(
                400, "invalid_scope", f"none of {requested} is allowed for this client"
            )
        del claims
        token = AccessToken(
            token=secrets.token_urlsafe(32),
            client_id=client.client_id,
            member=client.member,
            organization=client.organization,
            scopes=granted,
            expires_at=time.time() + TOKEN_LIFETIME,
        )
        with self._lock:
            self._expire()
            self._tokens[token.token] = token
        return token

    def _verify_assertion(self, assertion: str, client: SmartClient) -> dict[str, object]:
        algorithm = jwk_algorithm(client.jwk)
        key = jwt.PyJWK(json.loads(client.jwk), algorithm=algorithm)
        try:
            claims: dict[str, object] = jwt.decode(
                assertion,
                key,
                algorithms=[algorithm],
                audience=self.token_url,
                issuer=client.client_id,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
                leeway=30,
            )
        except jwt.ExpiredSignatureError:
            raise SmartError(401, "invalid_client", "the client assertion has expired") from None
        except jwt.InvalidAudienceError:
            raise SmartError(
                401, "invalid_client", f"assertion audience must be {self.token_url}"
            ) from None
        except jwt.InvalidSignatureError:
            raise SmartError(
                401, "invalid_client", "the client assertion signature does not verify"
            ) from None
        except jwt.PyJWTError as exc:
            raise SmartError(401, "invalid_client", f"invalid client assertion: {exc}") from None
        if claims.get("sub") != client.client_id:
            raise SmartError(401, "invalid_client", "assertion sub must equal iss (the client_id)")
        now = int(time.time())
        expires = int(claims["exp"])  # type: ignore[call-overload]
        if expires - now > MAX_ASSERTION_LIFETIME + 30:
            raise SmartError(401, "invalid_client", "assertion exp is more than five minutes ahead")
        admission = self._replays.admit(str(claims["jti"]), expires, now)
        if admission is Admission.FULL:
            raise SmartError(
                503, "temporarily_unavailable", "too many token requests in flight; retry shortly"
            )
        if admission is not Admission.NEW:
            raise SmartError(401, "invalid_client", "assertion jti was already used")
        return claims

    def check(self, authorization: str | None, resource_type: str, interaction: str) -> AccessToken:
        """The token behind a request, if it is valid and its scopes allow the interaction."""
        if not authorization or not authorization.startswith(("Bearer ", "bearer ")):
            self._audit.record(
                "?", "fhir.request", f"{resource_type}.{interaction}", "refused", "no bearer token"
            )
            raise SmartError(401, "invalid_token", "a bearer access token is required")
        value = authorization.split(" ", 1)[1].strip()
        with self._lock:
            token = self._tokens.get(value)
        if token is None or token.expires_at <= time.time():
            self._audit.record(
                "?",
                "fhir.request",
                f"{resource_type}.{interaction}",
                "refused",
                "invalid or expired token",
            )
            raise SmartError(401, "invalid_token", "the access token is invalid or has expired")
        client = load_client(State(self._state), token.client_id)
        if client is None or client.status is not ClientStatus.ACTIVE:
            raise SmartError(401, "invalid_token", "the client was revoked")
        if not scope_permits(token.scopes, resource_type, interaction):
            reason = f"scope does not allow {interaction} on {resource_type}"
            self._audit.record(
                token.client_id, "fhir.request", f"{resource_type}.{interaction}", "refused", reason
            )
            raise SmartError(403, "insufficient_scope", reason)
        return token

    def _expire(self) -> None:
        now = time.time()
        for value in [v for v, t in self._tokens.items() if t.expires_at <= now]:
            del self._tokens[value]


def _claimed_client(assertion: str) -> str:
    try:
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise SmartError(400, "invalid_request", "client_assertion is not a JWT") from None
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or not issuer:
        raise SmartError(400, "invalid_request", "client_assertion has no iss")
    return issuer
