"""Authentication edges against hostile callers, each acting through the real interface (the
node's HTTP API, the portal over HTTP, the FHIR token endpoint): request tokens replayed at
another node, a flood of new tokens, another organization's admin reading this node's audit
log, sign-in floods with random names, a flood of refused requests, and hostile URLs in the
explorer. Threat model: docs/security.md."""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import Consortium, keys_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medledger.api.records import add_record_routes
from medledger.auth import (
    SCHEME,
    TOKEN_TYPE,
    ReplayCache,
    body_hash,
    node_audience,
    sign_request,
)
from medledger.client.records import RecordsClient
from medledger.client.sdk import LedgerClient, QueryError
from medledger.config import NodeConfig
from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import Keyring
from medledger.fhir.context import FHIR_CONTEXT, FhirContext
from medledger.fhir.routes import (
    add_fhir_routes,
)
from medledger.fhir.smart import TokenService
from medledger.ledger.model import Member, Role, Status
from medledger.ledger.transactions import EnrollMember
from medledger.node.replication import Replicator
from medledger.services.custody import Custody
from medledger.services.mpi import PatientIndex
from medledger.services.packages import RecordServices
from medledger.store.node_audit import NodeAuditLog
from medledger.store.packages import PackageStore
from medledger.store.sqlite import CommittedView
from medledger.store.uploads import PendingUploads
from medledger.web.app import add_portal_routes
from medledger.web.common import PORTAL
from medledger.web.context import PortalContext
from medledger.web.settings import PortalSettings
from medledger.web.signin import THREAD_PREFIX


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
        view=CommittedView(consortium.chain.store.path),
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
        uploads=PendingUploads(home / "pending"),
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
    # The SDK signs each request for the node it calls.
    sdk = RecordsClient(
        LedgerClient("http://127.0.0.1:9"),
        str(riverside.client.make_url("")).rstrip("/"),
        doctor,
        node_organization="riverside",
    )
    try:
        assert await asyncio.to_thread(sdk.node_apis) == {"riverside": "http://127.0.0.1:9"}
    finally:
        sdk.close()
        sdk.ledger.close()
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


# --- the portal: sign-in floods and hostile URLs --------------------------------------------

PASSPHRASE = "a long member passphrase"
SIGNIN_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Portal:
    server: TestServer
    context: PortalContext
    queries: list[tuple[str, str]]

    def session(self, source: str = "127.0.0.1") -> aiohttp.ClientSession:
        """A browser on the host `source` (another loopback address is another machine)."""
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(source, 0)),
            cookie_jar=aiohttp.CookieJar(unsafe=True),
        )

    async def sign_in(
        self, browser: aiohttp.ClientSession, name: str, passphrase: str = PASSPHRASE
    ) -> tuple[int, str, dict[str, str]]:
        browser.cookie_jar.clear()  # each attempt as a new visitor
        page = await (await browser.get(self.server.make_url("/portal/login"))).text()
        match = SIGNIN_TOKEN.search(page)
        assert match is not None
        origin = str(self.server.make_url("")).rstrip("/")
        answer = await browser.post(
            self.server.make_url("/portal/login"),
            data={"csrf_token": match.group(1), "name": name, "passphrase": passphrase},
            headers={"Origin": origin},
            allow_redirects=False,
        )
        return answer.status, await answer.text(), dict(answer.headers)


def _member(keys: KeyPair, role: Role) -> Member:
    return Member(
        keys.member_id, "org-1", role, keys.verify_key, keys.encryption_key, Status.ACTIVE, 1, 1, 1
    )


@pytest.fixture
async def portal(tmp_path: Path) -> AsyncIterator[Portal]:
    """The portal of org-1's node, served over a real socket, its ledger answers standing in
    for the node's RPC (the queries it was asked are kept)."""
    home = tmp_path / "node"
    home.mkdir()
    node = NodeConfig(
        home=home,
        moniker="node0",
        chain_id="medledger-test",
        api_listen="127.0.0.1:9",
        cometbft_rpc="http://127.0.0.1:9",
        organization="org-1",
    )
    ring = Keyring(home / "portal-keys")
    members = [
        _member(ring.create("patient-ana", PASSPHRASE, fast=True), Role.PATIENT),
        _member(ring.create("dr-ben", PASSPHRASE, fast=True), Role.CLINICIAN),
    ]
    queries: list[tuple[str, str]] = []

    def query(path: str, data: str | bytes = b"", kind: Any = None) -> Any:
        text = data.decode() if isinstance(data, bytes) else data
        queries.append((path, text))
        if path == "/organizations":
            return []
        if path == "/member":
            for member in members:
                if member.id == text:
                    return member
        raise QueryError(11, f"nothing at {path}")

    settings = PortalSettings(login_failures=3, login_address_failures=5, login_address_attempts=20)
    app = web.Application()
    context = add_portal_routes(app, node, {}, settings)[PORTAL]
    context.reader.query = query  # type: ignore[method-assign]
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield Portal(server, context, queries)
    await server.close()


async def test_random_names_from_one_address_are_refused_after_its_limit(portal: Portal) -> None:
    async with portal.session("127.0.0.1") as attacker, portal.session("127.0.0.2") as patient:
        for _ in range(5):  # each name is new: the per-name limit never sees it twice
            status, page, _ = await portal.sign_in(attacker, f"guess-{secrets.token_hex(4)}")
            assert status == 401 and "Wrong name or passphrase." in page
        for name in (f"guess-{secrets.token_hex(4)}", "patient-ana"):
            status, page, _ = await portal.sign_in(attacker, name)
            assert status == 429
            assert "Too many sign-in attempts from your network" in page
        assert len(portal.context.sessions) == 0
        # A patient at another address signs in as usual.
        status, _, headers = await portal.sign_in(patient, "patient-ana")
        assert status == 303 and headers["Location"] == "/portal/"
        assert len(portal.context.sessions) == 1


async def test_sign_in_attempts_of_any_outcome_are_limited_per_address(portal: Portal) -> None:
    """Right passphrases cost a key derivation too: an address gets 20 per window."""
    async with portal.session("127.0.0.3") as browser:
        for i in range(20):
            assert (await portal.sign_in(browser, ("dr-ben", "patient-ana")[i % 2]))[0] == 303
        status, page, _ = await portal.sign_in(browser, "dr-ben")
        assert status == 429 and "Too many sign-in attempts from your network" in page
    async with portal.session("127.0.0.4") as other:
        assert (await portal.sign_in(other, "dr-ben"))[0] == 303


async def test_key_derivations_have_their_own_bounded_pool(portal: Portal) -> None:
    derivations = portal.context.derivations
    loop = asyncio.get_running_loop()
    assert derivations.workers == 2
    assert isinstance(derivations.executor, ThreadPoolExecutor)
    assert derivations.executor is not getattr(loop, "_default_executor", None)
    # Slow derivations fill the pool and its queue ...
    release = threading.Event()
    held = [asyncio.ensure_future(derivations.run(release.wait)) for _ in range(10)]
    await asyncio.sleep(0)
    assert derivations.pending == derivations.capacity == 10
    async with portal.session() as browser:
        status, page, headers = await portal.sign_in(browser, "patient-ana")
        assert status == 503 and "Too many sign-ins at this moment" in page
        assert headers["Retry-After"] == "5"
        assert len(portal.context.sessions) == 0
        # ... while the executor FHIR, HL7 and export share still answers.
        assert await asyncio.to_thread(lambda: "free") == "free"
        release.set()
        await asyncio.gather(*held)
        # Unknown names and real ones are derived on that pool.
        assert (await portal.sign_in(browser, "nobody-at-all"))[0] == 401
        assert (await portal.sign_in(browser, "patient-ana"))[0] == 303
    names = {thread.name for thread in threading.enumerate()}
    assert any(name.startswith(f"{THREAD_PREFIX}_") for name in names)


HOSTILE_HEIGHTS = [
    "99999999999999999999",
    str(2**63),
    "-1",
    "0",
    "abc",
    "\u00b2",  # a digit to str.isdigit(), not to int()
    "1e5",
    "%201",
    "0x10",
]


async def test_hostile_numbers_and_ids_in_portal_urls_are_refused_plainly(
    portal: Portal,
) -> None:
    async with portal.session() as browser:
        assert (await portal.sign_in(browser, "patient-ana"))[0] == 303
        portal.queries.clear()
        for height in HOSTILE_HEIGHTS:
            answer = await browser.get(portal.server.make_url(f"/portal/explorer/blocks/{height}"))
            assert answer.status == 404, height
            page = await answer.text()
            assert "whole number from 1 to 9223372036854775807" in page
        for version in ("99999999999999999999", "\u00b2", "-3", "0"):
            answer = await browser.get(
                portal.server.make_url("/portal/patient/records/rec-1"),
                params={"version": version},
            )
            assert answer.status == 400, version
            assert "record version is a whole number" in await answer.text()
        for path in ("/portal/patient/records/" + "r" * 500, "/portal/patient/records/.hidden"):
            answer = await browser.get(portal.server.make_url(path))
            assert answer.status == 404
            assert "There is no record with that id" in await answer.text()
        # None of it reached the ledger.
        assert not [q for q in portal.queries if q[0] not in ("/organizations", "/member")]
