"""Portal sessions, sign-in rate limits and origin checks, without a network."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from medledger.config import ConfigError
from medledger.crypto.keys import KeyPair
from medledger.ledger.model import Member, Role, Status
from medledger.web.sessions import SessionStore, SignInLimiter, same_origin, tokens_match
from medledger.web.settings import PortalSettings, load_portal_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Client:
    closed: bool = False

    def close(self) -> None:
        self.closed = True


def _member() -> Member:
    keys = KeyPair.generate()
    return Member(
        keys.member_id, "org-1", Role.PATIENT, keys.verify_key, keys.encryption_key,
        Status.ACTIVE, 1, 1, 1,
    )  # fmt: skip


def test_a_session_ends_after_idle_time_and_its_keys_go_with_it() -> None:
    clock = Clock()
    store = SessionStore(idle_timeout=60, absolute_timeout=3600, clock=clock)
    client = Client()
    session = store.create("ana", _member(), KeyPair.generate(), client)
    clock.now += 59
    assert store.get(session.id) is session  # each request restarts the idle timer
    clock.now += 59
    assert store.get(session.id) is session
    clock.now += 61
    assert store.get(session.id) is None
    assert client.closed and len(store) == 0


def test_a_session_ends_at_its_absolute_timeout_however_busy() -> None:
    clock = Clock()
    store = SessionStore(idle_timeout=60, absolute_timeout=150, clock=clock)
    session = store.create("ana", _member(), KeyPair.generate(), Client())
    for _ in range(3):
        clock.now += 50
        assert store.get(session.id) is session
    clock.now += 1
    assert store.get(session.id) is None


def test_sessions_have_fresh_random_ids_and_tokens_and_are_bounded() -> None:
    store = SessionStore(idle_timeout=60, absolute_timeout=600, max_sessions=2)
    clients = [Client() for _ in range(3)]
    sessions = [store.create("x", _member(), KeyPair.generate(), c) for c in clients]
    assert len({s.id for s in sessions}) == 3 and len({s.csrf_token for s in sessions}) == 3
    assert all(len(s.id) >= 40 for s in sessions)
    # The oldest is dropped (and its keys released) to make room.
    assert len(store) == 2 and clients[0].closed
    assert store.get(sessions[0].id) is None
    store.drop(sessions[1].id)
    assert clients[1].closed and store.get("no such id") is None


def test_sign_in_is_locked_after_repeated_failures_for_that_name_only() -> None:
    clock = Clock()
    limiter = SignInLimiter(failures=3, window=300, clock=clock)
    for _ in range(3):
        assert limiter.locked_for("ana") == 0
        limiter.failed("ana")
    assert limiter.locked_for("ana") == pytest.approx(300)
    assert limiter.locked_for("ben") == 0
    clock.now += 299
    assert limiter.locked_for("ana") == pytest.approx(1)
    clock.now += 2
    assert limiter.locked_for("ana") == 0
    limiter.failed("ana")
    limiter.succeeded("ana")
    assert limiter.locked_for("ana") == 0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Origin": "http://node.example:26602"}, True),
        ({"Origin": "http://evil.example"}, False),
        ({"Origin": "https://node.example:26602"}, False),
        ({"Origin": "null"}, False),
        ({"Referer": "http://node.example:26602/portal/patient"}, True),
        ({"Referer": "http://evil.example/portal"}, False),
        ({}, False),
    ],
)
def test_a_post_must_come_from_the_portals_own_origin(
    headers: dict[str, str], expected: bool
) -> None:
    request = make_mocked_request(
        "POST", "/portal/logout", headers={"Host": "node.example:26602", **headers}
    )
    assert same_origin(request) is expected


def test_tokens_are_compared_exactly() -> None:
    assert tokens_match("abc", "abc")
    assert not tokens_match("abc", "abd")
    assert not tokens_match("abc", None)
    assert not tokens_match("", "")


def test_portal_settings_come_from_the_node_configuration(tmp_path: Path) -> None:
    home = tmp_path
    config = home / "medledger.toml"
    config.write_text('[node]\nmoniker = "n"\n')
    assert load_portal_settings(home) == PortalSettings()
    config.write_text("[portal]\nidle_timeout_seconds = 3\n")
    assert load_portal_settings(home).idle_timeout_seconds == 3
    config.write_text("[portal]\nidle_timeout = 3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_portal_settings(home)
    config.write_text("[portal]\nidle_timeout_seconds = 0\n")
    with pytest.raises(ConfigError, match="positive"):
        load_portal_settings(home)


def test_behind_a_tls_proxy_the_public_origin_is_the_one_checked(tmp_path: Path) -> None:
    request = make_mocked_request(
        "POST",
        "/portal/logout",
        headers={"Host": "10.0.0.5:26602", "Origin": "https://portal.st-mary.example"},
    )
    assert not same_origin(request)
    assert same_origin(request, "https://portal.st-mary.example")
    assert not same_origin(request, "https://other.example")
    config = tmp_path / "medledger.toml"
    config.write_text('[portal]\npublic_origin = "https://portal.st-mary.example"\n')
    assert load_portal_settings(tmp_path).public_origin == "https://portal.st-mary.example"
    config.write_text('[portal]\npublic_origin = "portal.example/path"\n')
    with pytest.raises(ConfigError, match="public_origin"):
        load_portal_settings(tmp_path)
