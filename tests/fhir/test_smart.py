"""SMART Backend Services: token issue from a signed assertion, scope checks, refusals."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import jwt
import pytest
from conftest import Consortium, keys_for
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from medledger.fhir.smart import SmartError, TokenService, covered, scope_permits
from medledger.ledger.clients import RegisterClient, RevokeClient
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.store.node_audit import NodeAuditLog

TOKEN_URL = "http://127.0.0.1:26602/fhir/auth/token"


def public_jwk(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> str:
    jwk = json.loads(
        jwt.algorithms.get_default_algorithms()[
            "EdDSA" if isinstance(key, ed25519.Ed25519PrivateKey) else "ES384"
        ].to_jwk(key.public_key())
    )
    return json.dumps(jwk)


def assertion(
    key: object,
    client_id: str,
    *,
    aud: str = TOKEN_URL,
    exp: int = 240,
    alg: str = "EdDSA",
    sub: str | None = None,
    jti: str | None = None,
) -> str:
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": sub or client_id,
        "aud": aud,
        "exp": now + exp,
        "jti": jti or str(uuid.uuid4()),
    }
    return jwt.encode(claims, key, algorithm=alg)  # type: ignore[arg-type]


def form(token: str, scope: str = "system/Observation.rs") -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": token,
    }


@pytest.fixture
def service(
    consortium: Consortium, tmp_path: Path
) -> tuple[TokenService, ed25519.Ed25519PrivateKey, NodeAuditLog]:
    c = consortium
    ehr = keys_for("st-mary/ehr")
    assert c.submit(
        c.admin("st-mary"),
        "member.enroll",
        EnrollMember(ehr.verify_key, ehr.encryption_key, Role.EHR),
    ).ok
    key = ed25519.Ed25519PrivateKey.generate()
    scopes = ("system/Observation.rs", "system/Patient.cruds", "system/Condition.read")
    assert c.submit(
        c.admin("st-mary"),
        "client.register",
        RegisterClient("ehr-1", ehr.member_id, public_jwk(key), scopes),
    ).ok
    audit = NodeAuditLog(tmp_path / "audit.db")
    return TokenService(c.chain.store, TOKEN_URL, audit), key, audit


def test_token_grants_the_allowed_part_of_the_requested_scopes(
    service: tuple[TokenService, ed25519.Ed25519PrivateKey, NodeAuditLog],
) -> None:
    tokens, key, _ = service
    issued = tokens.issue(
        form(assertion(key, "ehr-1"), "system/Observation.rs system/Observation.c system/Patient.r")
    )
    assert issued.scopes == {"system/Observation.rs", "system/Patient.r"}
    header = f"Bearer {issued.token}"
    assert tokens.check(header, "Observation", "r").client_id == "ehr-1"
    with pytest.raises(SmartError) as refused:
        tokens.check(header, "Observation", "c")
    assert refused.value.status == 403
    with pytest.raises(SmartError) as missing:
        tokens.check(None, "Observation", "r")
    assert missing.value.status == 401


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda k: assertion(k, "ehr-1", aud="http://elsewhere/token"), "audience"),
        (lambda k: assertion(k, "ehr-1", exp=-120), "expired"),
        (lambda k: assertion(k, "ehr-1", exp=3600), "five minutes"),
        (lambda k: assertion(ed25519.Ed25519PrivateKey.generate(), "ehr-1"), "signature"),
        (lambda k: assertion(k, "ehr-1", sub="someone-else"), "sub must equal"),
        (lambda k: assertion(k, "nobody"), "no active client"),
        (lambda k: "not-a-jwt", "not a JWT"),
    ],
)
def test_bad_assertions_are_refused_and_audited(
    service: tuple[TokenService, ed25519.Ed25519PrivateKey, NodeAuditLog], make: object, error: str
) -> None:
    tokens, key, audit = service
    with pytest.raises(SmartError, match=error):
        tokens.issue(form(make(key)))  # type: ignore[operator]
    assert audit.entries("smart.token")[0]["outcome"] == "refused"


def test_replayed_assertion_and_revoked_client(
    consortium: Consortium, service: tuple[TokenService, ed25519.Ed25519PrivateKey, NodeAuditLog]
) -> None:
    tokens, key, _ = service
    once = assertion(key, "ehr-1", jti="same")
    issued = tokens.issue(form(once))
    with pytest.raises(SmartError, match="already used"):
        tokens.issue(form(once))
    assert consortium.submit(
        consortium.admin("st-mary"), "client.revoke", RevokeClient("ehr-1", "retired")
    ).ok
    with pytest.raises(SmartError, match="revoked"):
        tokens.check(f"Bearer {issued.token}", "Observation", "r")
    with pytest.raises(SmartError, match="no active client"):
        tokens.issue(form(assertion(key, "ehr-1")))


def test_es384_keys_are_accepted(
    consortium: Consortium, service: tuple[TokenService, ed25519.Ed25519PrivateKey, NodeAuditLog]
) -> None:
    tokens, _, _ = service
    lis = keys_for("st-mary/lis")
    c = consortium
    assert c.submit(
        c.admin("st-mary"),
        "member.enroll",
        EnrollMember(lis.verify_key, lis.encryption_key, Role.LIS),
    ).ok
    key = ec.generate_private_key(ec.SECP384R1())
    body = RegisterClient("lis-1", lis.member_id, public_jwk(key), ("system/Observation.c",))
    assert c.submit(c.admin("st-mary"), "client.register", body).ok
    issued = tokens.issue(form(assertion(key, "lis-1", alg="ES384"), "system/Observation.c"))
    assert issued.scopes == {"system/Observation.c"}


def test_scope_grammar() -> None:
    assert scope_permits(frozenset({"system/*.rs"}), "Condition", "s")
    assert not scope_permits(frozenset({"system/*.rs"}), "Condition", "c")
    assert scope_permits(frozenset({"system/Observation.write"}), "Observation", "u")
    assert covered("system/Observation.r", frozenset({"system/*.cruds"}))
    assert not covered("system/*.r", frozenset({"system/Observation.r"}))
    assert not covered("patient/Observation.r", frozenset({"system/*.cruds"}))
