"""Authenticated requests to a node's API: each request carries a short-lived JWT signed with
the caller's Ed25519 ledger key (EdDSA), bound to the method, the path and the body's hash, with
a unique id — in the manner of OAuth DPoP proofs (RFC 9449). The node checks it against the
caller's current key on the ledger, so a rotated or revoked key stops working at its height.

Issuers are member ids, or `node:<organization>` for a node calling its peers. The audience
(`aud`, RFC 7519 §4.1.3) names the node the token is for, in the same form
`node:<organization>`: a token one node received cannot be replayed at another. Both sides
know it without asking the network: the SDK from the custodian table (`/v1/nodes`) or the
organization it was told its home node belongs to, replication from its peer table.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medledger.crypto.keys import KeyPair
from medledger.ledger.model import Member, Role

SCHEME = "MedledgerRequest"
TOKEN_TYPE = "medledger-request+jwt"
MAX_LIFETIME = 300
CLOCK_SKEW = 60
NODE_PREFIX = "node:"
# Ids of tokens still valid are remembered until they expire. At most this many at once: a
# token is valid for at most MAX_LIFETIME + 2 * CLOCK_SKEW seconds, so this allows about 480
# authenticated requests a second, sustained; beyond it new tokens are refused (503), never
# an unexpired id forgotten.
REPLAY_CAPACITY = 200_000
# Attacker-chosen text quoted in a refusal is cut to this many characters.
QUOTE_LIMIT = 64


class AuthError(Exception):
    """The request is not authenticated; the message says why (never echoing secrets).
    `status` is the HTTP status to answer with."""

    status = 401


class AuthBusy(AuthError):
    """The node cannot take new request tokens right now; the caller should retry."""

    status = 503


def node_audience(organization: str) -> str:
    """The audience of request tokens for the node of `organization`."""
    return f"{NODE_PREFIX}{organization}"


def body_hash(body: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()


def sign_request(
    keys: KeyPair, issuer: str, method: str, path: str, body: bytes = b"", *, audience: str
) -> str:
    """The Authorization header value for one request to the node named by `audience`
    (`node_audience(<its organization>)`)."""
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": audience,
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


class Admission(enum.Enum):
    NEW = "new"
    REPLAYED = "replayed"
    FULL = "full"


class ReplayCache:
    """Token ids seen while they are still valid; a second use is a replay.

    An id is kept until its token has expired (with the clock skew allowed): forgetting it
    earlier would let the token be used again. When `capacity` unexpired ids are held, new
    tokens are refused (`Admission.FULL`) until some expire."""

    def __init__(self, capacity: int = REPLAY_CAPACITY) -> None:
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._capacity = capacity

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, jti: str, exp: int, now: int) -> Admission:
        """Remember `jti` (valid until `exp`) unless it was seen or there is no room."""
        self._forget_expired(now)
        if jti in self._seen:
            return Admission.REPLAYED
        if len(self._seen) >= self._capacity:
            # Ids arrive roughly in expiry order; sweep the whole cache before refusing.
            self._seen = OrderedDict(
                (seen, until) for seen, until in self._seen.items() if until >= now - CLOCK_SKEW
            )
            if len(self._seen) >= self._capacity:
                return Admission.FULL
        self._seen[jti] = exp
        return Admission.NEW

    def check_and_add(self, jti: str, exp: int, now: int) -> bool:
        """True when `jti` is new and now remembered; False when it was seen (or the cache is
        full — the token is refused either way, and no unexpired id is forgotten)."""
        return self.admit(jti, exp, now) is Admission.NEW

    def _forget_expired(self, now: int) -> None:
        while self._seen and next(iter(self._seen.values())) < now - CLOCK_SKEW:
            self._seen.popitem(last=False)


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
    *,
    audience: str,
) -> Caller:
    """The caller of a request to the node named `audience`, if its token is valid: signed
    by `verify_key`, for this node, method, path and body, unexpired and not seen before."""
    token = _token(header)
    try:
        if jwt.get_unverified_header(token).get("typ") != TOKEN_TYPE:
            raise AuthError(f"request token type must be {TOKEN_TYPE}")
        claims = jwt.decode(
            token,
            Ed25519PublicKey.from_public_bytes(verify_key),
            algorithms=["EdDSA"],
            audience=audience,
            options={"require": ["iss", "aud", "iat", "exp", "jti", "htm", "htu", "bh"]},
            leeway=CLOCK_SKEW,
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("request token expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("request token signature does not verify with the caller's key") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(f"request token has no {exc.claim!r} claim") from None
    except jwt.InvalidAudienceError:
        raise AuthError(
            f"request token was made for another node (audience {_audience_of(token)}), not"
            f" for this node ({audience}): sign each request for the node it is sent to"
        ) from None
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid request token: {exc}") from None
    if int(claims["exp"]) - int(claims["iat"]) > MAX_LIFETIME:
        raise AuthError(f"request token lifetime exceeds {MAX_LIFETIME}s")
    if int(claims["iat"]) > time.time() + CLOCK_SKEW:
        raise AuthError("request token was issued in the future (check the caller's clock)")
    if claims["htm"] != method.upper() or claims["htu"] != path:
        raise AuthError("request token was made for another method or path")
    if claims["bh"] != body_hash(body):
        raise AuthError("request body does not match the token's body hash")
    admission = replays.admit(str(claims["jti"]), int(claims["exp"]), int(time.time()))
    if admission is Admission.REPLAYED:
        raise AuthError("request token was already used")
    if admission is Admission.FULL:
        raise AuthBusy(
            "too many requests: this node holds the maximum of unexpired request tokens;"
            " retry in a minute"
        )
    return Caller(str(claims["iss"]))


def may_read_node_audit(member: Member, node_organization: str) -> bool:
    """Who may read a node's own audit log (key releases, refused requests): auditors of any
    organization — they audit the consortium — and the admin of the organization that runs
    the node. Admins of other organizations may not: the log names this node's callers."""
    if member.role is Role.AUDITOR:
        return True
    return member.role is Role.ADMIN and member.organization == node_organization


def _audience_of(token: str) -> str:
    try:
        value = jwt.decode(token, options={"verify_signature": False}).get("aud")
    except jwt.PyJWTError:
        return "unreadable"
    return repr(value)[:QUOTE_LIMIT]


def _token(header: str | None) -> str:
    if not header:
        raise AuthError(f"missing Authorization header ({SCHEME} <token>)")
    scheme, _, token = header.partition(" ")
    if scheme != SCHEME or not token:
        raise AuthError(f"Authorization must use the {SCHEME} scheme")
    return token.strip()
