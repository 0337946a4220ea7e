"""End to end: a local network of real CometBFT nodes and ledger application processes, started
with testnet_up, inspected with testnet_status, crashed, grown and stopped with testnet_down."""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_base_port

from medledger.config import NodeConfig
from medledger.node.procs import pid_alive, read_pid_file
from medledger.node.testnet import (
    add_node,
    init_testnet,
    node_status,
    testnet_down,
    testnet_up,
    wait_for_height,
)
from medledger.node.testnet import testnet_status as network_status


def _lead_app_missing() -> str | None:
    for module in ("medledger.abci.server", "medledger.cli.main", "medledger.node.appmain"):
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ModuleNotFoundError:
            return module
    return None


_missing = _lead_app_missing()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        _missing is not None,
        reason=f"the ledger application is not available yet ({_missing} missing)",
    ),
]

PASSPHRASE = "e2e passphrase"


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode("utf-8", "replace")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def block_app_hash(cfg: NodeConfig, height: int) -> str:
    response = httpx.get(f"{cfg.cometbft_rpc}/block", params={"height": height}, timeout=5)
    response.raise_for_status()
    value = response.json()["result"]["block"]["header"]["app_hash"]
    assert isinstance(value, str)
    return value


def wait_for(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[tuple[Path, list[NodeConfig]]]:
    home = tmp_path / "net"
    configs = init_testnet(
        home, 4, passphrase=PASSPHRASE, base_port=free_base_port(5), fast_kdf=True
    )
    try:
        yield home, configs
    finally:
        testnet_down(home, timeout=20)


def test_up_status_crash_grow_down(network: tuple[Path, list[NodeConfig]]) -> None:
    home, configs = network
    supervisors = testnet_up(home)
    assert len(set(supervisors)) == 4
    assert testnet_up(home) == supervisors  # already running: left alone

    statuses = wait_for_height(home, 3, timeout=120)
    for s in statuses:
        assert s.running and s.rpc_ok and s.healthy, s
        assert s.catching_up is False
        assert s.voting_power == 10
    wait_for(lambda: all(s.peers == 3 for s in network_status(home)), 60, "a full mesh of peers")
    hashes = {block_app_hash(cfg, 3) for cfg in configs}
    assert len(hashes) == 1

    # Crash the application of node1 mid-chain: the supervisor restarts the pair and the node
    # catches up with the others.
    victim = configs[1]
    old_app = read_pid_file(victim.app_pid_file)
    old_comet = read_pid_file(victim.cometbft_pid_file)
    assert old_app is not None and old_comet is not None
    os.kill(old_app, signal.SIGKILL)
    wait_for(
        lambda: read_pid_file(victim.cometbft_pid_file) not in (None, old_comet),
        60,
        "a restarted CometBFT on node1",
    )
    assert read_pid_file(victim.app_pid_file) not in (None, old_app)
    assert not pid_alive(old_comet)
    height = max(s.height or 0 for s in network_status(home))
    wait_for_height(home, height + 2, timeout=120)
    assert len({block_app_hash(cfg, height + 2) for cfg in configs}) == 1
    node_log = (victim.log_dir / "node.log").read_text(encoding="utf-8")
    assert '"event": "node.restarting"' in node_log

    # A fifth organization's node joins the running network and follows the chain.
    added = add_node(home, PASSPHRASE, fast_kdf=True)
    assert testnet_up(home, nodes=["node4"])
    height = max(s.height or 0 for s in network_status(home))
    wait_for_height(home, height, nodes=["node4"], timeout=120)
    fifth = node_status(added.config.home)
    assert fifth.voting_power == 0
    assert fifth.node_id == added.node_id
    assert block_app_hash(added.config, height) == block_app_hash(configs[0], height)

    # Everything stops, nothing is left behind.
    children = [
        pid
        for cfg in [*configs, added.config]
        for pid in (read_pid_file(cfg.app_pid_file), read_pid_file(cfg.cometbft_pid_file))
        if pid is not None
    ]
    assert len(children) == 10
    stopped = testnet_down(home)
    assert sorted(stopped) == ["node0", "node1", "node2", "node3", "node4"]
    for pid in [*supervisors, *children]:
        assert not pid_alive(pid)
    assert processes_mentioning(str(home)) == []
    for cfg in [*configs, added.config]:
        for pid_file in (cfg.node_pid_file, cfg.app_pid_file, cfg.cometbft_pid_file):
            assert not pid_file.exists()
    for s in network_status(home):
        assert not s.running and not s.rpc_ok and not s.healthy
    assert testnet_down(home) == []


def test_supervisor_sigkilled_leaves_no_orphans(network: tuple[Path, list[NodeConfig]]) -> None:
    home, configs = network
    testnet_up(home)
    wait_for_height(home, 1, timeout=120)
    cfg = configs[0]
    supervisor = read_pid_file(cfg.node_pid_file)
    app, comet = read_pid_file(cfg.app_pid_file), read_pid_file(cfg.cometbft_pid_file)
    assert supervisor is not None and app is not None and comet is not None
    os.kill(supervisor, signal.SIGKILL)
    # The children die with their supervisor, and testnet_down cleans up whatever remains.
    wait_for(lambda: not pid_alive(app) and not pid_alive(comet), 30, "the orphaned children")
    testnet_down(home)
    assert processes_mentioning(str(home)) == []
