"""Supervised background tasks: a task that crashes is restarted, and its state — alive,
restarts, last error — is in the node's `/health` and in its Prometheus metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import CHAIN_ID, genesis_app_state

from medledger.abci.application import LedgerApplication
from medledger.api.http import build_http_app
from medledger.metrics import Metrics
from medledger.node.inprocess import InProcessChain
from medledger.node.tasks import Supervisor


class Flaky:
    """A background task that crashes on its first run and then runs until stopped."""

    def __init__(self) -> None:
        self.runs = 0
        self.running = asyncio.Event()

    async def __call__(self) -> None:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("malformed input from a peer")
        self.running.set()
        await asyncio.Event().wait()


Node = tuple[TestClient, Supervisor]  # type: ignore[type-arg]


@pytest.fixture
async def start_node(tmp_path: Path) -> AsyncIterator[Callable[[float], Awaitable[Node]]]:
    """A node's HTTP app whose `/health` shows a supervisor's tasks, each restarted after
    `first_pause` seconds."""
    chain = InProcessChain(tmp_path / "state.db", CHAIN_ID, genesis_app_state())
    started: list[Node] = []

    async def start(first_pause: float) -> Node:
        metrics = Metrics()
        supervisor = Supervisor(observer=metrics, first_pause=first_pause)
        app = build_http_app(
            LedgerApplication(chain.store, metrics),
            "http://127.0.0.1:1",
            status=lambda: {"tasks": supervisor.status()},
        )
        client = TestClient(TestServer(app))
        await client.start_server()
        started.append((client, supervisor))
        return started[-1]

    yield start
    for client, supervisor in started:
        await supervisor.stop()
        await client.close()
    chain.close()


async def test_a_crashed_task_is_restarted_and_shows_in_health_and_metrics(
    start_node: Callable[[float], Awaitable[Node]],
) -> None:
    client, supervisor = await start_node(0.01)
    flaky = Flaky()
    supervisor.start("replication", flaky)
    await asyncio.wait_for(flaky.running.wait(), 30)

    health = await (await client.get("/health")).json()
    assert health["status"] == "ok"
    task = health["tasks"]["replication"]
    assert task["alive"] is True and task["restarts"] == 1
    assert task["last_error"] == "RuntimeError: malformed input from a peer"

    text = (await (await client.get("/metrics")).read()).decode()
    assert 'medledger_task_restarts_total{task="replication"} 1.0' in text
    assert 'medledger_task_up{task="replication"} 1.0' in text


async def test_a_task_waiting_to_restart_makes_health_degraded(
    start_node: Callable[[float], Awaitable[Node]],
) -> None:
    # The restart waits long enough to look at the task while it is down.
    client, supervisor = await start_node(600)
    crashed = asyncio.Event()

    async def crash() -> None:
        crashed.set()
        raise ValueError("bad digest")

    supervisor.start("upload-sweep", crash)
    await asyncio.wait_for(crashed.wait(), 30)
    await asyncio.sleep(0)  # let the supervisor record the crash

    health = await (await client.get("/health")).json()
    assert health["status"] == "degraded"
    assert health["tasks"]["upload-sweep"]["alive"] is False
    assert health["tasks"]["upload-sweep"]["last_error"] == "ValueError: bad digest"
    text = (await (await client.get("/metrics")).read()).decode()
    assert 'medledger_task_up{task="upload-sweep"} 0.0' in text
    assert 'medledger_task_restarts_total{task="upload-sweep"} 1.0' in text
