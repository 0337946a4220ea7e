"""The FHIR gateway's HTTP edge, in process: CapabilityStatement, token endpoint, 401/403/404/
405/406/415 as OperationOutcomes, error mapping when the network is unreachable; and its pure
helpers (ETags, purpose of use, meta, references in Bundles)."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import Consortium
from cryptography.hazmat.primitives.asymmetric import ed25519

from medledger.fhir.context import FHIR_CONTEXT, FhirContext
from medledger.fhir.outcome import FhirError
from medledger.fhir.plumbing import (
    in_entry,
    parse_etag,
    parse_prefer,
    parse_purpose,
    rewrite_references,
    strip_server_meta,
    with_meta,
)
from medledger.fhir.routes import (
    add_fhir_routes,
)
from medledger.fhir.smart import TokenService
from medledger.ledger.clients import RegisterClient
from medledger.ledger.consent import Purpose
from medledger.ledger.model import Role
from medledger.ledger.records import Custody as Share
from medledger.ledger.records import RecordStatus, RecordVersion
from medledger.ledger.transactions import EnrollMember
from medledger.services.custody import Custody
from medledger.services.mpi import PatientIndex
from medledger.store.node_audit import NodeAuditLog
from medledger.validation import validate_resource

API = "http://127.0.0.1:9"  # nothing listens there: the ledger is unreachable
TOKEN_URL = f"{API}/fhir/auth/token"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class Harness:
    def __init__(self, consortium: Consortium, tmp_path: Path) -> None:
        self.audit = NodeAuditLog(tmp_path / "audit.db")
        self.custody = Custody(tmp_path / "custody", "pw", fast_kdf=True)
        self.context = FhirContext(
            rpc_url=API,
            chain_id="medledger-test",
            api_url=API,
            organization="st-mary",
            custody=self.custody,
            patients=PatientIndex(tmp_path / "patients.db"),
            tokens=TokenService(consortium.chain.store, TOKEN_URL, self.audit),
            audit=self.audit,
        )
        self.keys: dict[str, ed25519.Ed25519PrivateKey] = {}
        held = self.custody.create("ehr")
        stranger = Custody(tmp_path / "elsewhere", "pw", fast_kdf=True).create("ehr")
        admin = consortium.admin("st-mary")
        for name, member, scopes in [
            ("ehr", held, ("system/*.cruds",)),
            ("reader", held, ("system/Patient.r",)),
            ("remote", stranger, ("system/*.cruds",)),
        ]:
            if name != "reader":
                body = EnrollMember(member.verify_key, member.encryption_key, Role.EHR)
                assert consortium.submit(admin, "member.enroll", body).ok
            self.keys[name] = ed25519.Ed25519PrivateKey.generate()
            jwk = str(jwt.algorithms.OKPAlgorithm.to_jwk(self.keys[name].public_key()))
            register = RegisterClient(name, member.member_id, jwk, scopes)
            assert consortium.submit(admin, "client.register", register).ok

    def form(self, client_id: str, scope: str = "system/*.cruds") -> dict[str, str]:
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": TOKEN_URL,
            "exp": int(time.time()) + 120,
            "jti": str(uuid.uuid4()),
        }
        return {
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": jwt.encode(claims, self.keys[client_id], algorithm="EdDSA"),
        }


@pytest.fixture
async def harness(
    consortium: Consortium, tmp_path: Path
) -> AsyncIterator[tuple[Harness, TestClient[web.Request, web.Application]]]:
    setup = Harness(consortium, tmp_path)
    app = web.Application()
    app[FHIR_CONTEXT] = setup.context
    add_fhir_routes(app)
    async with TestClient(TestServer(app)) as client:
        yield setup, client
    setup.context.close()
    setup.context.patients.close()
    setup.audit.close()


Fixture = tuple[Harness, "TestClient[web.Request, web.Application]"]


async def bearer(harness: Fixture, client_id: str = "ehr", scope: str = "system/*.cruds") -> str:
    setup, client = harness
    answer = await client.post("/fhir/auth/token", data=setup.form(client_id, scope))
    assert answer.status == 200, await answer.text()
    assert answer.headers["Cache-Control"] == "no-store"
    return f"Bearer {(await answer.json())['access_token']}"


async def outcome(answer: Any, status: int) -> dict[str, Any]:
    assert answer.status == status, await answer.text()
    assert answer.headers["Content-Type"].startswith("application/fhir+json")
    body: dict[str, Any] = json.loads(await answer.text())
    assert body["resourceType"] == "OperationOutcome"
    validate_resource(body)
    return body


async def test_metadata_needs_no_token(harness: Fixture) -> None:
    _, client = harness
    answer = await client.get("/fhir/metadata")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("application/fhir+json")
    statement = json.loads(await answer.text())
    validate_resource(statement)
    smart = await (await client.get("/fhir/.well-known/smart-configuration")).json()
    assert smart["token_endpoint"] == TOKEN_URL


async def test_token_endpoint_answers_oauth_json(harness: Fixture) -> None:
    setup, client = harness
    answer = await client.post("/fhir/auth/token", data=setup.form("ehr", "system/Observation.rs"))
    body = await answer.json()
    assert answer.status == 200
    assert body["token_type"] == "bearer" and body["scope"] == "system/Observation.rs"
    assert 0 < body["expires_in"] <= 300
    refused = await client.post("/fhir/auth/token", data={**setup.form("ehr"), "grant_type": "x"})
    assert refused.status == 400
    assert (await refused.json())["error"] == "unsupported_grant_type"
    forged = setup.form("ehr")
    forged["client_assertion"] = setup.form("reader")["client_assertion"].replace("reader", "ehr")
    assert (await client.post("/fhir/auth/token", data=forged)).status in (400, 401)
    not_form = await client.post("/fhir/auth/token", json=setup.form("ehr"))
    assert not_form.status == 400


async def test_missing_and_bad_tokens_get_401(harness: Fixture) -> None:
    _, client = harness
    missing = await client.get("/fhir/Observation", params={"patient": "p"})
    await outcome(missing, 401)
    assert missing.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    garbage = await client.get("/fhir/Observation/x", headers={"Authorization": "Bearer nope"})
    body = await outcome(garbage, 401)
    assert body["issue"][0]["code"] == "login"
    # A token past its lifetime.
    token = await bearer(harness)
    tokens = harness[0].context.tokens
    value = token.split(" ", 1)[1]
    tokens._tokens[value] = dataclasses.replace(tokens._tokens[value], expires_at=time.time() - 1)
    expired = await client.get("/fhir/Observation/x", headers={"Authorization": token})
    assert "expired" in (await outcome(expired, 401))["issue"][0]["diagnostics"]


async def test_outside_the_scopes_gets_403_and_is_audited(harness: Fixture) -> None:
    setup, client = harness
    token = await bearer(harness, "reader", "system/Patient.r")
    answer = await client.get("/fhir/Observation/x", headers={"Authorization": token})
    await outcome(answer, 403)
    create = await client.post(
        "/fhir/Patient", json={"resourceType": "Patient"}, headers={"Authorization": token}
    )
    await outcome(create, 403)
    refused = [e for e in setup.audit.entries("fhir.request") if e["outcome"] == "refused"]
    assert {e["target"] for e in refused} >= {"Observation.r", "Patient.c"}


async def test_routing_and_format_errors_are_operation_outcomes(harness: Fixture) -> None:
    _, client = harness
    token = {"Authorization": await bearer(harness)}
    await outcome(await client.get("/fhir/Basic/1", headers=token), 404)
    await outcome(await client.get("/fhir/Basic", headers=token), 404)
    await outcome(await client.delete("/fhir/Observation", headers=token), 405)  # conditional
    await outcome(await client.patch("/fhir/Observation/1", headers=token), 405)
    await outcome(await client.get("/fhir/AuditEvent/1", headers=token), 405)
    await outcome(
        await client.get("/fhir/metadata", headers={"Accept": "application/fhir+xml"}), 406
    )
    await outcome(await client.get("/fhir/metadata", params={"_format": "xml"}), 406)
    plain = await client.post(
        "/fhir/Observation",
        data=b"{}",
        headers={**token, "Content-Type": "text/plain"},
    )
    await outcome(plain, 415)
    broken = await client.post(
        "/fhir/Observation",
        data=b"{not json",
        headers={**token, "Content-Type": "application/fhir+json"},
    )
    await outcome(broken, 400)
    wrong = await client.post("/fhir/Observation", json={"resourceType": "Patient"}, headers=token)
    await outcome(wrong, 400)
    bundle = await client.post("/fhir", json={"resourceType": "Bundle", "type": "collection"})
    await outcome(bundle, 400)
    purpose = await client.get(
        "/fhir/Observation/x", headers={**token, "X-Purpose-Of-Use": "MARKETING"}
    )
    await outcome(purpose, 400)


async def test_an_unreachable_ledger_is_503_and_a_member_held_elsewhere_is_403(
    harness: Fixture,
) -> None:
    _, client = harness
    token = {"Authorization": await bearer(harness)}
    answer = await client.get("/fhir/Observation/abc", headers=token)
    body = await outcome(answer, 503)
    assert body["issue"][0]["code"] == "transient"
    remote = {"Authorization": await bearer(harness, "remote")}
    held_elsewhere = await outcome(await client.get("/fhir/Observation/abc", headers=remote), 403)
    assert "does not hold the keys" in held_elsewhere["issue"][0]["diagnostics"]


# --- helpers --------------------------------------------------------------------------------


def test_etags() -> None:
    assert parse_etag('W/"3"') == 3
    assert parse_etag('"3"') == 3
    assert parse_etag("3") == 3
    with pytest.raises(FhirError) as caught:
        parse_etag('W/"abc"')
    assert caught.value.status == 400


def test_purpose_of_use() -> None:
    assert parse_purpose(None) is Purpose.TREATMENT
    assert parse_purpose("HPAYMT") is Purpose.PAYMENT
    assert parse_purpose("http://terminology.hl7.org/CodeSystem/v3-ActReason|HRESCH") is (
        Purpose.RESEARCH
    )
    assert parse_purpose("operations") is Purpose.OPERATIONS
    with pytest.raises(FhirError):
        parse_purpose("ETREAT")


def test_prefer() -> None:
    assert parse_prefer("return=minimal, handling=lenient") == {
        "return": "minimal",
        "handling": "lenient",
    }
    assert parse_prefer(None) == {}


def version(status: RecordStatus = RecordStatus.CURRENT) -> RecordVersion:
    return RecordVersion(
        record_id="r1",
        version=2,
        patient="p1",
        author="a1",
        author_organization="st-mary",
        resource_type="Observation",
        category="laboratory",
        package_digest="0" * 64,
        package_size=10,
        commitment=b"\0" * 32,
        previous=1,
        status=status,
        height=7,
        time_ns=1_780_000_000_123_456_789,
        threshold=2,
        custodians=(Share("st-mary", 1),),
        status_reason="wrong patient" if status is RecordStatus.ENTERED_IN_ERROR else "",
    )


def test_meta_comes_from_the_ledger() -> None:
    resource = {"resourceType": "Observation", "id": "other", "meta": {"profile": ["x"]}}
    served = with_meta(resource, version())
    assert served["id"] == "r1"
    assert served["meta"] == {
        "profile": ["x"],
        "versionId": "2",
        "lastUpdated": "2026-05-28T20:26:40.123456Z",
    }
    flagged = with_meta(resource, version(RecordStatus.ENTERED_IN_ERROR))
    assert flagged["meta"]["tag"][0]["code"] == "entered-in-error"
    incoming = {"resourceType": "Observation", "meta": {"versionId": "9", "lastUpdated": "x"}}
    assert strip_server_meta(incoming) == {"resourceType": "Observation"}


def test_bundle_references_are_rewritten() -> None:
    resource = {
        "subject": {"reference": "urn:uuid:1"},
        "result": [{"reference": "urn:uuid:2"}, {"reference": "Observation/kept"}],
    }
    mapping = {"urn:uuid:1": "Patient/p", "urn:uuid:2": "Observation/o"}
    assert rewrite_references(resource, mapping) == {
        "subject": {"reference": "Patient/p"},
        "result": [{"reference": "Observation/o"}, {"reference": "Observation/kept"}],
    }
    moved = in_entry(
        FhirError(
            400,
            "invalid",
            "bad",
            issues=[
                {
                    "severity": "error",
                    "code": "invalid",
                    "diagnostics": "x",
                    "expression": ["Observation.status"],
                }
            ],
        ),
        3,
    )
    assert moved.issues[0]["expression"] == ["Bundle.entry[3].resource.status"]
    assert moved.diagnostics.startswith("Bundle.entry[3]")
