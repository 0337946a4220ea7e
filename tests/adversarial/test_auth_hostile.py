"""Authentication edges against hostile callers, each acting through the real interface (the
node's HTTP API, the portal over HTTP, the FHIR token endpoint): request tokens replayed at
another node, a flood of new tokens, another organization's admin reading this node's audit
log, sign-in floods with random names, a flood of refused requests, and hostile URLs in the
explorer. Threat model: docs/security.md."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import Consortium, keys_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medledger.api.auth import (
    SCHEME,
    TOKEN_TYPE,
    ReplayCache,
    body_hash,
    node_audience,
    sign_request,
)
from medledger.api.records import RecordServices, add_record_routes
from medledger.crypto.keys import KeyPair
from medledger.fhir.context import FHIR_CONTEXT, FhirContext
from medledger.fhir.gateway import add_fhir_routes
from medledger.fhir.smart import TokenService
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.node.custody import Custody
from medledger.node.mpi import PatientIndex
from medledger.node.replication import Replicator
from medledger.store.node_audit import NodeAuditLog
from medledger.store.packages import PackageStore


def enroll(c: Consortium, org: str, name: str, role: Role) -> KeyPair:
    keys = keys_for(name)
    result = c.submit(
        c.admin(org), "member.enroll", EnrollMember(keys.verify_key, keys.encryption_key, role)
    )
    assert result.ok, result.log
    return keys


# --- the node's API: two nodes on one committed state --------------------------------------


@dataclass
class Node:
    organization: str
    client: TestClient[Any, Any]
    services: RecordServices

    async def get(self, path: str, header: str) -> Any:
        return await self.client.get(path, headers={"Authorization": header})


async def start_node(
    consortium: Consortium, tmp_path: Path, organization: str, replay_capacity: int = 1000
) -> Node:
    home = tmp_path / organization
    services = RecordServices(
        store=consortium.chain.store,
        packages=PackageStore(home / "packages"),
        replicator=Replicator(
            PackageStore(home / "packages"), keys_for(f"{organization}/node"), organization, {}
        ),
        node_keys=keys_for(f"{organization}/node"),
        organization=organization,
        peers={},
        api_url="http://127.0.0.1:9",
        audit=NodeAuditLog(home / "node-audit.db"),
        replays=ReplayCache(capacity=replay_capacity),
    )
    app = web.Application()
    add_record_routes(app, services)
    client = TestClient(TestServer(app))
    await client.start_server()
    return Node(organization, client, services)


@pytest.fixture
async def nodes(consortium: Consortium, tmp_path: Path) -> AsyncIterator[dict[str, Node]]:
    started = {
        "st-mary": await start_node(consortium, tmp_path, "st-mary"),
        "riverside": await start_node(consortium, tmp_path, "riverside"),
        "small": await start_node(consortium, tmp_path, "st-mary", replay_capacity=3),
    }
    yield started
    for node in started.values():
        await node.client.close()
        node.services.audit.close()


async def test_a_token_made_for_one_node_is_refused_at_another(
    consortium: Consortium, nodes: dict[str, Node]
) -> None:
    doctor = enroll(consortium, "st-mary", "dr-who", Role.CLINICIAN)
    st_mary, riverside = nodes["st-mary"], nodes["riverside"]
    header = sign_request(
        doctor, doctor.member_id, "GET", "/v1/nodes", audience=node_audience("st-mary")
    )
    # St. Mary's node (or anyone who saw the request on its way) replays it at Riverside's.
    replayed = await riverside.get("/v1/nodes", header)
    assert replayed.status == 401
    reason = (await replayed.json())["error"]
    assert "made for another node" in reason and "node:st-mary" in reason
    assert "node:riverside" in reason
    assert len(riverside.services.replays) == 0  # nothing was remembered or changed
    # The token is good where it was meant to go.
    assert (await st_mary.get("/v1/nodes", header)).status == 200
    # A token with no audience at all is refused too.
    now = int(time.time())
    claims = {
        "iss": doctor.member_id,
        "iat": now,
        "exp": now + 60,
        "jti": "no-audience",
        "htm": "GET",
        "htu": "/v1/nodes",
        "bh": body_hash(b""),
    }
    signing_key = Ed25519PrivateKey.from_private_bytes(doctor.signing_seed)
    token = jwt.encode(claims, signing_key, algorithm="EdDSA", headers={"typ": TOKEN_TYPE})
    unbound = await riverside.get("/v1/nodes", f"{SCHEME} {token}")
    assert unbound.status == 401
    assert "no 'aud' claim" in (await unbound.json())["error"]


async def test_a_full_replay_cache_refuses_new_tokens_and_never_forgets_a_used_one(
    consortium: Consortium, nodes: dict[str, Node]
) -> None:
    doctor = enroll(consortium, "st-mary", "dr-who", Role.CLINICIAN)
    node = nodes["small"]  # remembers at most 3 unexpired token ids

    def token() -> str:
        return sign_request(
            doctor, doctor.member_id, "GET", "/v1/nodes", audience=node_audience("st-mary")
        )

    first = token()
    assert (await node.get("/v1/nodes", first)).status == 200
    for _ in range(2):
        assert (await node.get("/v1/nodes", token())).status == 200
    # The attacker floods with fresh tokens, hoping to push the first id out of the cache.
    for _ in range(5):
        busy = await node.get("/v1/nodes", token())
        assert busy.status == 503
        assert "too many requests" in (await busy.json())["error"]
    assert len(node.services.replays) == 3
    replay = await node.get("/v1/nodes", first)
    assert replay.status == 401
    assert "already used" in (await replay.json())["error"]


async def test_only_auditors_and_this_nodes_admin_read_its_audit_log(
    consortium: Consortium, nodes: dict[str, Node]
) -> None:
    auditor = enroll(consortium, "riverside", "riverside-auditor", Role.AUDITOR)
    node = nodes["st-mary"]
    node.services.audit.record("someone", "key.release", "grant-1", "released")

    def header(keys: KeyPair) -> str:
        return sign_request(
            keys, keys.member_id, "GET", "/v1/audit/node", audience=node_audience("st-mary")
        )

    other_admin = consortium.admin("riverside")
    refused = await node.get("/v1/audit/node", header(other_admin))
    assert refused.status == 403
    assert "admin of this node's organization" in (await refused.json())["error"]
    own = await node.get("/v1/audit/node", header(consortium.admin("st-mary")))
    assert own.status == 200
    assert [e["target"] for e in await own.json()] == ["grant-1"]
    audited = await node.get("/v1/audit/node", header(auditor))
    assert audited.status == 200 and len(await audited.json()) == 1


# --- the refusal log under a flood ----------------------------------------------------------


async def test_a_flood_of_refused_requests_leaves_a_bounded_log_and_every_key_release(
    consortium: Consortium, tmp_path: Path
) -> None:
    """10,000 refused requests with random issuers — SMART token requests naming a random
    client, anonymous key-release calls — leave a bounded number of rows with bounded fields;
    every key release refused to an authenticated member is kept."""
    doctor = enroll(consortium, "st-mary", "dr-who", Role.CLINICIAN)
    audit = NodeAuditLog(tmp_path / "node-audit.db", max_refusal_rows=100, max_pending_groups=16)
    app = web.Application()
    node = await start_node(consortium, tmp_path, "st-mary")
    node.services.audit.close()
    node.services.audit = audit
    await node.client.close()
    add_record_routes(app, node.services)
    app[FHIR_CONTEXT] = FhirContext(
        rpc_url="http://127.0.0.1:9",
        chain_id="medledger-test",
        api_url="http://127.0.0.1:9",
        organization="st-mary",
        custody=Custody(tmp_path / "custody", "node passphrase", fast_kdf=True),
        patients=PatientIndex(tmp_path / "patients.db"),
        tokens=TokenService(consortium.chain.store, "http://127.0.0.1:9/fhir/auth/token", audit),
        audit=audit,
    )
    add_fhir_routes(app)
    attacker_key = Ed25519PrivateKey.generate()
    async with TestClient(TestServer(app)) as client:
        for i in range(10_000):
            if i % 5 == 0:
                answer = await client.post("/v1/keys/release", data=b'{"grant": "x"}')
                assert answer.status == 401
                continue
            issuer = secrets.token_hex(8) * 64  # 1,024 characters of the attacker's choosing
            claims = {"iss": issuer, "sub": issuer, "aud": "x", "exp": 1, "jti": str(i)}
            form = {
                "grant_type": "client_credentials",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": jwt.encode(claims, attacker_key, algorithm="EdDSA"),
            }
            answer = await client.post("/fhir/auth/token", data=form)
            assert answer.status in (400, 401)
            if i % 200 == 1:  # an authenticated member asks for a share it has no grant for
                path = "/v1/keys/release"
                body = f'{{"grant": "no-such-grant-{i}"}}'.encode()
                header = sign_request(
                    doctor, doctor.member_id, "POST", path, body, audience="node:st-mary"
                )
                refused = await client.post(path, data=body, headers={"Authorization": header})
                assert refused.status == 404
    entries = audit.entries(limit=100_000)
    audit.close()
    refusals = [e for e in entries if e["actor"] != doctor.member_id]
    kept = [e for e in entries if e["actor"] == doctor.member_id]
    assert len(refusals) <= 100
    assert sum(e["count"] for e in refusals) > len(refusals)  # alike refusals were counted
    assert all(len(e[f]) <= 128 for e in entries for f in ("actor", "target", "reason"))
    assert len(kept) == 50  # every key release to a member, none aggregated or dropped
    assert all(e["action"] == "key.release" and e["count"] == 1 for e in kept)
    assert {e["target"] for e in kept} == {f"no-such-grant-{i}" for i in range(1, 10_000, 200)}
