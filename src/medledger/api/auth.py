"""Authenticated requests to a node's API: each request carries a short-lived JWT signed with
the caller's Ed25519 ledger key (EdDSA), bound to the method, the path and the body's hash, with
a unique id — in the manner of OAuth DPoP proofs (RFC 9449). The node checks it against the
caller's current key on the ledger, so a rotated or revoked key stops working at its height.

Issuers are member ids, or `node:<organization>` for a node calling its peers.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medledger.crypto.keys import KeyPair

SCHEME = "MedledgerRequest"
TOKEN_TYPE = "medledger-request+jwt"
MAX_LIFETIME = 300
CLOCK_SKEW = 60
NODE_PREFIX = "node:"


class AuthError(Exception):
    """The request is not authenticated; the message says why (never echoing secrets)."""


def body_hash(body: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()


def sign_request(keys: KeyPair, issuer: str, method: str, path: str, body: bytes = b"") -> str:
    """The Authorization header value for one request."""
    now = int(time.time())
    claims = {
        "iss": issuer,
        "iat": now,
        "exp": now + 60,
        "jti": secrets.token_urlsafe(16),
        "htm": method.upper(),
        "htu": path,
        "bh": body_hash(body),
    }
    key = Ed25519PrivateKey.from_private_bytes(keys.signing_seed)
    token = jwt.encode(claims, key, algorithm="EdDSA", headers={"typ": TOKEN_TYPE})
    return f"{SCHEME} {token}"


@dataclass(frozen=True)
class Caller:
    issuer: str

    @property
    def node_organization(self) -> str | None:
        return self.issuer[len(NODE_PREFIX) :] if self.issuer.startswith(NODE_PREFIX) else None


class ReplayCache:
    """Token ids seen while they are still valid; a second use is a replay."""

    def __init__(self, capacity: int = 200_000) -> None:
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._capacity = capacity

    def check_and_add(self, jti: str, exp: int, now: int) -> bool:
        while self._seen and next(iter(self._seen.values())) < now - CLOCK_SKEW:
            self._seen.popitem(last=False)
        if jti in self._seen:
            return False
        self._seen[jti] = exp
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return True


def unverified_issuer(header: str | None) -> str:
    token = _token(header)
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise AuthError(f"malformed request token: {exc}") from None
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or not issuer:
        raise AuthError("request token has no issuer")
    return issuer


def verify_request(
    header: str | None,
    verify_key: bytes,
    method: str,
    path: str,
    body: bytes,
    replays: ReplayCache,
) -> Caller:
    token = _token(header)
    try:
        if jwt.get_unverified_header(token).get("typ") != TOKEN_TYPE:
            raise AuthError(f"request token type must be {TOKEN_TYPE}")
        claims = jwt.decode(
            token,
            Ed25519PublicKey.from_public_bytes(verify_key),
            algorithms=["EdDSA"],
            options={"require": ["iss", "iat", "exp", "jti", "htm", "htu", "bh"]},
            leeway=CLOCK_SKEW,
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("request token expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("request token signature does not verify with the caller's key") from None
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid request token: {exc}") from None
    if int(claims["exp"]) - int(claims["iat"]) > MAX_LIFETIME:
        raise AuthError(f"request token lifetime exceeds {MAX_LIFETIME}s")
    if claims["htm"] != method.upper() or claims["htu"] != path:
        raise AuthError("request token was made for another method or path")
    if claims["bh"] != body_hash(body):
        raise AuthError("request body does not match the token's body hash")
    if not replays.check_and_add(str(claims["jti"]), int(claims["exp"]), int(time.time())):
        raise AuthError("request token was already used")
    return Caller(str(claims["iss"]))


def _token(header: str | None) -> str:
    if not header:
        raise AuthError(f"missing Authorization header ({SCHEME} <token>)")
    scheme, _, token = header.partition(" ")
    if scheme != SCHEME or not token:
        raise AuthError(f"Authorization must use the {SCHEME} scheme")
    return token.strip()
