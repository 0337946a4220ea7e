"""A SMART Backend Services client's side: its key pair as a JWK, the signed JWT assertion
that authenticates it (RFC 7523), and the token request (SMART App Launch v2, "Backend
Services").

The private JWK file an EHR or LIS keeps is a plain JWK (RFC 7517) with two more members that
JWK readers ignore (RFC 7517 §4: members that are not understood are ignored): `client_id`,
the id it was registered under, and `scope`, the scopes it asks for by default. Only the public
part (`kty`, `crv`, `x`, `kid`, `alg`) is registered on the ledger.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519

from medledger.ledger.clients import JWK_ALGORITHMS

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# The node refuses an assertion whose exp is more than five minutes ahead.
ASSERTION_LIFETIME = 240
PUBLIC_MEMBERS = ("kty", "crv", "x", "y", "kid", "alg")


class SmartClientError(Exception):
    """The key file is unusable, or the node refused the token request (with its reason)."""


@dataclass(frozen=True)
class ClientKey:
    """A client's private JWK with the client id and default scope kept beside it."""

    jwk: dict[str, str]
    client_id: str
    scope: str

    @property
    def algorithm(self) -> str:
        kty, crv = str(self.jwk.get("kty")), str(self.jwk.get("crv"))
        algorithm = JWK_ALGORITHMS.get((kty, crv))
        if algorithm is None:
            raise SmartClientError(f"unsupported key type {kty}/{crv} (Ed25519, P-256 or P-384)")
        return algorithm

    def public_jwk(self) -> str:
        """The JSON of the public part, as `medledger client register --jwk` takes it."""
        return json.dumps({k: self.jwk[k] for k in PUBLIC_MEMBERS if k in self.jwk})

    def file_text(self) -> str:
        return json.dumps({**self.jwk, "client_id": self.client_id, "scope": self.scope}, indent=2)


def generate_client_key(client_id: str, scope: str) -> ClientKey:
    """A new Ed25519 key pair for a client."""
    key = ed25519.Ed25519PrivateKey.generate()
    jwk: dict[str, str] = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key))
    jwk.update(kid=client_id, alg="EdDSA")
    return ClientKey(jwk, client_id, scope)


def write_client_key(path: Path, key: ClientKey) -> None:
    """Write the private JWK file, readable by its owner only (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key.file_text() + "\n")
    path.chmod(0o600)


def read_client_key(path: Path, client_id: str | None = None) -> ClientKey:
    """A private JWK file; `client_id` overrides (or supplies) the one kept in the file."""
    try:
        document: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SmartClientError(f"cannot read the client key {path}: {exc}") from None
    if not isinstance(document, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in document.items()
    ):
        raise SmartClientError(f"{path} is not a JWK (a flat JSON object of strings)")
    if "d" not in document:
        raise SmartClientError(f"{path} holds a public key; the token request needs the private")
    chosen = client_id or document.pop("client_id", None)
    document.pop("client_id", None)
    scope = document.pop("scope", "system/*.rs")
    if not chosen:
        raise SmartClientError(f"{path} names no client_id: pass --client-id")
    return ClientKey(document, chosen, scope)


def client_assertion(key: ClientKey, token_url: str, now: float | None = None) -> str:
    """The signed JWT that authenticates the client at `token_url` (its audience)."""
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": key.client_id,
        "sub": key.client_id,
        "aud": token_url,
        "exp": issued + ASSERTION_LIFETIME,
        "jti": str(uuid.uuid4()),
    }
    signing_key = jwt.PyJWK(key.jwk, algorithm=key.algorithm)
    return jwt.encode(claims, signing_key, algorithm=key.algorithm, headers={"kid": key.client_id})


def token_endpoint(api_url: str, client: httpx.Client) -> str:
    """The token endpoint the node's SMART configuration names (the assertion's audience)."""
    url = f"{api_url.rstrip('/')}/fhir/.well-known/smart-configuration"
    try:
        answer = client.get(url)
        answer.raise_for_status()
        endpoint = answer.json()["token_endpoint"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise SmartClientError(f"cannot read {url}: {exc}") from None
    if not isinstance(endpoint, str):
        raise SmartClientError(f"{url} names no token_endpoint")
    return endpoint


def request_token(api_url: str, key: ClientKey, scope: str | None = None) -> dict[str, Any]:
    """Ask the node for an access token; the token response (access_token, scope,
    expires_in). A refusal raises SmartClientError with the node's error and description."""
    with httpx.Client(timeout=30) as client:
        url = token_endpoint(api_url, client)
        form = {
            "grant_type": "client_credentials",
            "scope": scope or key.scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion(key, url),
        }
        try:
            answer = client.post(url, data=form)
        except httpx.HTTPError as exc:
            raise SmartClientError(f"cannot reach {url}: {exc}") from None
    try:
        body: Any = answer.json()
    except ValueError:
        body = {}
    if answer.status_code != 200 or not isinstance(body, dict) or "access_token" not in body:
        error = body.get("error", "?") if isinstance(body, dict) else "?"
        description = body.get("error_description", answer.text) if isinstance(body, dict) else ""
        raise SmartClientError(
            f"the token endpoint refused (HTTP {answer.status_code} {error}): {description}"
        )
    return body
