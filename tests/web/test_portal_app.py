"""The portal's HTTP behaviour with aiohttp's test client and a stand-in for the ledger's
answers: sign-in, cookies, CSRF and origin checks, timeouts, roles, headers, templates."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import CookieJar, web
from aiohttp.test_utils import TestClient, TestServer

from medledger.client.sdk import QueryError
from medledger.config import NodeConfig
from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import Keyring
from medledger.ledger.model import Member, Organization, OrganizationKind, Role, Status
from medledger.web.app import add_portal_routes, templates
from medledger.web.common import PORTAL
from medledger.web.context import PortalContext
from medledger.web.settings import PortalSettings

PASSPHRASE = "a long member passphrase"


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Portal:
    client: TestClient[Any, Any]
    context: PortalContext
    members: dict[str, Member]
    clock: Clock

    @property
    def origin(self) -> str:
        return f"http://{self.client.host}:{self.client.port}"

    async def signin_token(self) -> str:
        page = await (await self.client.get("/portal/login")).text()
        match = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert match is not None
        return match.group(1)

    async def sign_in(self, name: str, passphrase: str = PASSPHRASE, **headers: str) -> Any:
        token = await self.signin_token()
        return await self.client.post(
            "/portal/login",
            data={"csrf_token": token, "name": name, "passphrase": passphrase},
            headers={"Origin": self.origin, **headers},
            allow_redirects=False,
        )

    async def csrf_token(self, path: str = "/portal/patient/claims") -> str:
        page = await (await self.client.get(path)).text()
        match = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert match is not None
        return match.group(1)


def _member(keys: KeyPair, role: Role, organization: str = "org-1") -> Member:
    return Member(
        keys.member_id, organization, role, keys.verify_key, keys.encryption_key,
        Status.ACTIVE, 1, 1, 1,
    )  # fmt: skip


def _ledger(members: dict[str, Member]) -> Callable[..., Any]:
    """Answers the two queries sign-in needs, as the node's RPC would."""
    organizations = [
        Organization(
            f"org-{i}",
            name,
            OrganizationKind.HOSPITAL,
            "admin",
            b"k" * 32,
            b"v" * 32,
            Status.ACTIVE,
            0,
        )
        for i, name in ((1, "St. Mary's Hospital"), (2, "Riverside Clinic"))
    ]

    def query(path: str, data: str | bytes = b"", kind: Any = None) -> Any:
        if path == "/organizations":
            return organizations
        if path == "/member":
            member_id = data.decode() if isinstance(data, bytes) else data
            for member in members.values():
                if member.id == member_id:
                    return member
            raise QueryError(11, f"unknown member {member_id}")
        if path == "/claims":
            return []
        raise QueryError(11, f"no stand-in for {path}")

    return query


@pytest.fixture
async def portal(tmp_path: Path) -> AsyncIterator[Portal]:
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
    members = {
        "patient-ana": _member(ring.create("patient-ana", PASSPHRASE, fast=True), Role.PATIENT),
        "dr-ben": _member(ring.create("dr-ben", PASSPHRASE, fast=True), Role.CLINICIAN),
        "dr-elsewhere": _member(
            ring.create("dr-elsewhere", PASSPHRASE, fast=True), Role.CLINICIAN, "org-2"
        ),
    }
    app = web.Application()
    settings = PortalSettings(idle_timeout_seconds=60, login_failures=3)
    portal_app = add_portal_routes(app, node, {}, settings)
    context = portal_app[PORTAL]
    context.reader.query = _ledger(members)  # type: ignore[method-assign]
    clock = Clock()
    context.sessions.clock = clock
    client = TestClient(TestServer(app), cookie_jar=CookieJar(unsafe=True))
    await client.start_server()
    yield Portal(client, context, members, clock)
    await client.close()


async def test_the_sign_in_page_sets_a_strict_http_only_token_cookie(portal: Portal) -> None:
    response = await portal.client.get("/portal/login")
    assert response.status == 200
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("medledger_signin=")
    for attribute in ("HttpOnly", "Path=/portal", "SameSite=Strict"):
        assert attribute in cookie
    assert "Secure" not in cookie  # plain http here; Secure is set when served over https
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Cache-Control"] == "no-store"
    page = await response.text()
    assert 'for="passphrase"' in page and "St. Mary&#39;s Hospital" in page


async def test_a_wrong_passphrase_or_unknown_name_is_refused_alike(portal: Portal) -> None:
    wrong = await portal.sign_in("patient-ana", "not it")
    unknown = await portal.sign_in("nobody-here", "not it")
    for response in (wrong, unknown):
        assert response.status == 401
        assert "Wrong name or passphrase." in await response.text()
        assert "medledger_portal=" not in response.headers.get("Set-Cookie", "")
    assert len(portal.context.sessions) == 0


async def test_repeated_wrong_passphrases_lock_the_name(portal: Portal) -> None:
    for _ in range(3):
        assert (await portal.sign_in("patient-ana", "guess")).status == 401
    locked = await portal.sign_in("patient-ana")  # even the right passphrase, for now
    assert locked.status == 429
    assert "Too many wrong passphrases" in await locked.text()
    assert (await portal.sign_in("dr-ben")).status == 303  # another name is not locked


async def test_sign_in_needs_its_form_token_and_this_origin(portal: Portal) -> None:
    no_token = await portal.client.post(
        "/portal/login",
        data={"name": "patient-ana", "passphrase": PASSPHRASE},
        headers={"Origin": portal.origin},
    )
    assert no_token.status == 403
    assert "could not be accepted" in await no_token.text()
    cross_site = await portal.sign_in("patient-ana", Origin="http://evil.example")
    assert cross_site.status == 403
    assert len(portal.context.sessions) == 0


async def test_sign_in_opens_a_session_with_a_strict_cookie(portal: Portal) -> None:
    response = await portal.sign_in("patient-ana")
    assert response.status == 303 and response.headers["Location"] == "/portal/"
    cookies = response.headers.getall("Set-Cookie")
    session_cookie = next(c for c in cookies if c.startswith("medledger_portal="))
    for attribute in ("HttpOnly", "Path=/portal", "SameSite=Strict"):
        assert attribute in session_cookie
    home = await portal.client.get("/portal/", allow_redirects=False)
    assert home.headers["Location"] == "/portal/patient"
    claims = await portal.client.get("/portal/patient/claims")
    assert claims.status == 200 and "My claims" in await claims.text()
    session = next(iter(portal.context.sessions._sessions.values()))
    assert session.member == portal.members["patient-ana"] and session.name == "patient-ana"


async def test_members_sign_in_only_at_their_own_organizations_node(portal: Portal) -> None:
    response = await portal.sign_in("dr-elsewhere")
    assert response.status == 401
    assert "your own organization" in await response.text()
    assert "Riverside Clinic" in await response.text()


async def test_every_post_needs_the_session_token_and_this_origin(portal: Portal) -> None:
    await portal.sign_in("patient-ana")
    token = await portal.csrf_token()
    refusals = [
        ({}, {"Origin": portal.origin}),
        ({"csrf_token": "forged"}, {"Origin": portal.origin}),
        ({"csrf_token": token}, {"Origin": "http://evil.example"}),
        ({"csrf_token": token}, {}),
    ]
    for data, headers in refusals:
        response = await portal.client.post(
            "/portal/logout", data=data, headers=headers, allow_redirects=False
        )
        assert response.status == 403, (data, headers)
        assert "could not be accepted" in await response.text()
    assert len(portal.context.sessions) == 1
    # A state-changing route behind the check is not reached either.
    revoke = await portal.client.post(
        "/portal/patient/consents/abc/revoke",
        data={"csrf_token": "forged"},
        headers={"Origin": portal.origin},
    )
    assert revoke.status == 403
    signed_out = await portal.client.post(
        "/portal/logout",
        data={"csrf_token": token},
        headers={"Origin": portal.origin},
        allow_redirects=False,
    )
    assert signed_out.status == 303
    assert signed_out.headers["Location"] == "/portal/login?signed_out=1"
    assert len(portal.context.sessions) == 0
    after = await portal.client.get("/portal/patient/claims", allow_redirects=False)
    assert after.headers["Location"].startswith("/portal/login")


async def test_an_idle_session_expires_and_says_so(portal: Portal) -> None:
    await portal.sign_in("patient-ana")
    portal.clock.now += 59
    assert (await portal.client.get("/portal/patient/claims")).status == 200
    portal.clock.now += 61
    expired = await portal.client.get("/portal/patient/claims", allow_redirects=False)
    assert expired.status == 303
    assert expired.headers["Location"] == "/portal/login?expired=1"
    page = await (await portal.client.get(expired.headers["Location"])).text()
    assert "Your session has expired" in page
    assert len(portal.context.sessions) == 0


async def test_views_are_open_to_their_roles_only(portal: Portal) -> None:
    anonymous = await portal.client.get("/portal/explorer", allow_redirects=False)
    assert anonymous.headers["Location"] == "/portal/login"
    await portal.sign_in("patient-ana")
    for path in ("/portal/auditor", "/portal/clinician"):
        response = await portal.client.get(path)
        assert response.status == 403
        assert "Not available for your role" in await response.text()
    missing = await portal.client.get("/portal/no/such/page")
    assert missing.status == 404


async def test_the_portal_and_its_static_files_are_served_under_portal(portal: Portal) -> None:
    bare = await portal.client.get("/portal", allow_redirects=False)
    assert bare.headers["Location"] == "/portal/"
    for name, kind in (
        ("verify.js", "javascript"),
        ("portal.js", "javascript"),
        ("portal.css", "text/css"),
    ):
        response = await portal.client.get(f"/portal/static/{name}")
        assert response.status == 200 and kind in response.headers["Content-Type"]
        assert "Cache-Control" not in response.headers


def test_every_template_compiles() -> None:
    environment = templates()
    names = environment.list_templates()
    assert {"base.html", "signin.html", "patient/timeline.html", "auditor/home.html"} <= set(names)
    for name in names:
        environment.get_template(name)


async def test_cookies_are_secure_when_the_public_origin_is_https(portal: Portal) -> None:
    portal.context.settings = PortalSettings(public_origin="https://portal.example")
    response = await portal.client.get("/portal/login")
    assert "Secure" in response.headers["Set-Cookie"]
