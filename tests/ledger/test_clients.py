"""SMART Backend Services clients registered on the ledger."""

from __future__ import annotations

import json

import pytest
from conftest import Consortium, keys_for

from medledger.ledger.clients import RegisterClient, RevokeClient, SmartClient, client_key
from medledger.ledger.errors import Code
from medledger.ledger.model import Role
from medledger.ledger.state import State
from medledger.ledger.transactions import EnrollMember

ED25519_JWK = json.dumps(
    {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
)


@pytest.fixture
def ehr(consortium: Consortium) -> str:
    keys = keys_for("st-mary/ehr")
    body = EnrollMember(keys.verify_key, keys.encryption_key, Role.EHR)
    assert consortium.submit(consortium.admin("st-mary"), "member.enroll", body).ok
    return keys.member_id


def test_register_and_revoke(consortium: Consortium, ehr: str) -> None:
    c = consortium
    admin = c.admin("st-mary")
    scopes = ("system/Observation.rs", "system/Patient.read", "system/*.cruds")
    assert c.submit(
        admin, "client.register", RegisterClient("epic-prod", ehr, ED25519_JWK, scopes)
    ).ok
    client = State(c.chain.store).read(client_key("epic-prod"), SmartClient)
    assert client is not None and client.member == ehr and client.status == "active"
    assert (
        c.submit(c.admin("riverside"), "client.revoke", RevokeClient("epic-prod", "x")).code
        is Code.UNAUTHORIZED
    )
    assert c.submit(admin, "client.revoke", RevokeClient("epic-prod", "key leaked")).ok
    revoked = State(c.chain.store).read(client_key("epic-prod"), SmartClient)
    assert revoked is not None and revoked.status == "revoked"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"client_id": "bad id!"}, Code.INVALID_BODY),
        ({"member": "nobody"}, Code.NOT_FOUND),
        ({"jwk": "{"}, Code.INVALID_BODY),
        ({"jwk": json.dumps({"kty": "RSA", "n": "x", "e": "AQAB"})}, Code.INVALID_BODY),
        (
            {"jwk": json.dumps({"kty": "OKP", "crv": "Ed25519", "x": "a", "d": "secret"})},
            Code.INVALID_BODY,
        ),
        ({"scopes": ("patient/Observation.rs",)}, Code.INVALID_BODY),
        ({"scopes": ()}, Code.INVALID_BODY),
    ],
)
def test_bad_registrations_are_refused(
    consortium: Consortium, ehr: str, change: dict[str, object], code: Code
) -> None:
    fields: dict[str, object] = {
        "client_id": "lis-1",
        "member": ehr,
        "jwk": ED25519_JWK,
        "scopes": ("system/Observation.c",),
        **change,
    }
    root = consortium.chain.store.state_root()
    result = consortium.submit(
        consortium.admin("st-mary"), "client.register", RegisterClient(**fields)
    )  # type: ignore[arg-type]
    assert result.code is code, result.log
    assert consortium.chain.store.state_root() == root


def test_client_must_act_as_a_system_member_of_the_same_organization(
    consortium: Consortium, ehr: str
) -> None:
    c = consortium
    body = RegisterClient("x", ehr, ED25519_JWK, ("system/Observation.rs",))
    assert c.submit(c.admin("riverside"), "client.register", body).code is Code.UNAUTHORIZED
    doctor = keys_for("doc")
    assert c.submit(
        c.admin("st-mary"),
        "member.enroll",
        EnrollMember(doctor.verify_key, doctor.encryption_key, Role.CLINICIAN),
    ).ok
    human = RegisterClient("y", doctor.member_id, ED25519_JWK, ("system/Observation.rs",))
    assert c.submit(c.admin("st-mary"), "client.register", human).code is Code.INVALID_BODY
