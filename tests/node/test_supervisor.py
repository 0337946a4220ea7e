"""The supervisor starts the app, then CometBFT once the socket serves; restarts both when one
dies; stops CometBFT first, then the app. Stand-in processes replace both here, so these tests
need neither CometBFT nor the ledger application (tests/node/test_testnet_e2e.py runs the real
ones)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from medledger.config import ConfigError, NodeConfig, write_node_config
from medledger.node.procs import pid_alive, read_pid_file
from medledger.node.supervisor import NodeAlreadyRunning, NodeSupervisor, socket_accepts

# A stand-in application: serves a Unix socket at HOME/abci.sock (binding fails if a file is
# already there), notes its life in HOME/events.txt. Modes: normal, no-socket, ignore-term.
FAKE_APP = r"""
import os, signal, socket, sys, time
home, mode = sys.argv[sys.argv.index("--home") + 1], sys.argv[sys.argv.index("--mode") + 1]
def note(what):
    with open(os.path.join(home, "events.txt"), "a") as f:
        f.write(f"{what} {os.getpid()}\n")
def on_term(*_):
    note("app-term")
    if mode != "ignore-term":
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
note("app-start")
print("fake app starting", flush=True)
if mode == "no-socket":
    while True:
        time.sleep(0.1)
time.sleep(0.2)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(os.path.join(home, "abci.sock"))
s.listen(16)
s.settimeout(0.1)
while True:
    try:
        s.accept()[0].close()
    except (socket.timeout, InterruptedError):
        pass
"""

# A stand-in CometBFT: notes whether the app's socket already accepted it when it started.
FAKE_COMETBFT = r"""
import os, signal, socket, sys, time
home = sys.argv[sys.argv.index("--home") + 1]
def note(what):
    with open(os.path.join(home, "events.txt"), "a") as f:
        f.write(f"{what} {os.getpid()}\n")
def on_term(*_):
    note("cometbft-term")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(os.path.join(home, "abci.sock"))
    note("cometbft-start-socket-ok")
except OSError:
    note("cometbft-start-no-socket")
print("fake cometbft running", flush=True)
while True:
    time.sleep(0.1)
"""


def fake_commands(tmp_path: Path, home: Path, mode: str = "normal") -> dict[str, list[str]]:
    app = tmp_path / "fake_app.py"
    comet = tmp_path / "fake_cometbft.py"
    app.write_text(FAKE_APP, encoding="utf-8")
    comet.write_text(FAKE_COMETBFT, encoding="utf-8")
    return {
        "app_command": [sys.executable, str(app), "--home", str(home), "--mode", mode],
        "cometbft_command": [sys.executable, str(comet), "--home", str(home)],
    }


def make_home(tmp_path: Path) -> NodeConfig:
    cfg = NodeConfig(home=tmp_path / "node0", moniker="node0", chain_id="medledger-test")
    write_node_config(cfg)
    return cfg


def events(cfg: NodeConfig) -> list[str]:
    path = cfg.home / "events.txt"
    if not path.exists():
        return []
    return [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines()]


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


class Running:
    """A supervisor running in a background thread (no signal handlers off the main thread)."""

    def __init__(self, supervisor: NodeSupervisor) -> None:
        self.supervisor = supervisor
        self.status: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.status = self.supervisor.run()

    def stop(self) -> int | None:
        self.supervisor.request_stop()
        self.thread.join(30)
        assert not self.thread.is_alive()
        return self.status


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(cfg: NodeConfig, mode: str = "normal", **options: object) -> Running:
        settings: dict[str, object] = {
            "backoff": 0.1,
            "max_backoff": 0.5,
            "stop_timeout": 3.0,
            "socket_timeout": 10.0,
            "poll_interval": 0.05,
            **fake_commands(tmp_path, cfg.home, mode),
            **options,
        }
        run = Running(NodeSupervisor(cfg, **settings))  # type: ignore[arg-type]
        run.thread.start()
        started.append(run)
        return run

    yield start
    for run in started:
        if run.thread.is_alive():
            run.stop()


def both_running(cfg: NodeConfig) -> bool:
    return read_pid_file(cfg.app_pid_file) is not None and (
        read_pid_file(cfg.cometbft_pid_file) is not None
    )


def test_app_first_then_cometbft_and_pid_files(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    cfg = make_home(tmp_path)
    run = running(cfg)
    wait_until(lambda: both_running(cfg), what="both processes")
    assert read_pid_file(cfg.node_pid_file) == os.getpid()
    assert read_pid_file(cfg.app_pid_file) == run.supervisor.app_pid
    assert read_pid_file(cfg.cometbft_pid_file) == run.supervisor.cometbft_pid
    wait_until(lambda: len(events(cfg)) >= 2)
    assert events(cfg) == ["app-start", "cometbft-start-socket-ok"]
    assert socket_accepts(cfg.socket_path)

    assert run.stop() == 0
    # CometBFT is stopped before the application.
    assert events(cfg) == ["app-start", "cometbft-start-socket-ok", "cometbft-term", "app-term"]
    for pid_file in (cfg.app_pid_file, cfg.cometbft_pid_file, cfg.node_pid_file):
        assert not pid_file.exists()
    assert "fake app starting" in (cfg.log_dir / "app.log").read_text(encoding="utf-8")
    assert "fake cometbft running" in (cfg.log_dir / "cometbft.log").read_text(encoding="utf-8")


@pytest.mark.parametrize("victim", ["app", "cometbft"])
def test_a_crash_restarts_both_in_order(
    tmp_path: Path, running: Callable[..., Running], victim: str
) -> None:
    cfg = make_home(tmp_path)
    run = running(cfg)
    wait_until(lambda: both_running(cfg) and len(events(cfg)) >= 2)
    old_app, old_comet = read_pid_file(cfg.app_pid_file), read_pid_file(cfg.cometbft_pid_file)
    assert old_app is not None and old_comet is not None
    os.kill(old_app if victim == "app" else old_comet, signal.SIGKILL)

    def restarted() -> bool:
        app, comet = read_pid_file(cfg.app_pid_file), read_pid_file(cfg.cometbft_pid_file)
        return app not in (None, old_app) and comet not in (None, old_comet)

    wait_until(restarted, what="a restarted pair")
    wait_until(lambda: events(cfg).count("cometbft-start-socket-ok") == 2)
    assert run.supervisor.restarts == 1
    survivor = "app-term" if victim == "cometbft" else "cometbft-term"
    assert events(cfg) == [
        "app-start",
        "cometbft-start-socket-ok",
        survivor,  # the one still alive was stopped
        "app-start",
        "cometbft-start-socket-ok",
    ]
    assert not pid_alive(old_app) and not pid_alive(old_comet)
    assert run.stop() == 0
    # Appended, not truncated, across restarts.
    assert (cfg.log_dir / "app.log").read_text(encoding="utf-8").count("fake app starting") == 2


def test_stale_socket_file_is_removed(tmp_path: Path, running: Callable[..., Running]) -> None:
    cfg = make_home(tmp_path)
    cfg.socket_path.write_text("left over from a crash", encoding="utf-8")
    run = running(cfg)
    wait_until(lambda: both_running(cfg))
    assert socket_accepts(cfg.socket_path)
    assert run.supervisor.restarts == 0
    run.stop()


def test_app_that_never_serves_is_restarted_then_given_up(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    cfg = make_home(tmp_path)
    run = running(cfg, mode="no-socket", socket_timeout=0.5, max_restarts=2)
    run.thread.join(30)
    assert run.status == 1
    assert run.supervisor.restarts == 2
    assert events(cfg) == ["app-start", "app-term"] * 3  # never started CometBFT
    assert not cfg.node_pid_file.exists()


def test_sigkill_after_timeout(tmp_path: Path, running: Callable[..., Running]) -> None:
    cfg = make_home(tmp_path)
    run = running(cfg, mode="ignore-term", stop_timeout=0.5)
    wait_until(lambda: both_running(cfg))
    app_pid = read_pid_file(cfg.app_pid_file)
    assert app_pid is not None
    started = time.monotonic()
    assert run.stop() == 0
    assert time.monotonic() - started < 10
    assert not pid_alive(app_pid)
    assert events(cfg)[-1] == "app-term"


def test_socket_path_too_long(tmp_path: Path) -> None:
    cfg = NodeConfig(
        home=tmp_path, moniker="n", chain_id="c", abci_socket="/tmp/" + "s" * 120 + ".sock"
    )
    with pytest.raises(ConfigError, match="longer than 107 bytes"):
        NodeSupervisor(cfg, app_command=["true"], cometbft_command=["true"])


def test_refuses_a_home_another_supervisor_runs(tmp_path: Path) -> None:
    cfg = make_home(tmp_path)
    other = subprocess.Popen(
        [sys.executable, "-c", "import time  # medledger supervisor\ntime.sleep(30)"]
    )
    try:
        cfg.node_pid_file.write_text(f"{other.pid}\n", encoding="ascii")
        commands = fake_commands(tmp_path, cfg.home)
        sup = NodeSupervisor(
            cfg, app_command=commands["app_command"], cometbft_command=commands["cometbft_command"]
        )
        with pytest.raises(NodeAlreadyRunning, match="already running"):
            sup.run()
    finally:
        other.kill()
        other.wait()


def test_leftover_children_of_a_dead_supervisor_are_stopped(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    cfg = make_home(tmp_path)
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time\ntime.sleep(60)", "--home", str(cfg.home)]
    )
    try:
        cfg.cometbft_pid_file.write_text(f"{orphan.pid}\n", encoding="ascii")
        cfg.node_pid_file.write_text("999999999\n", encoding="ascii")  # a dead supervisor
        run = running(cfg)
        wait_until(lambda: both_running(cfg) and read_pid_file(cfg.cometbft_pid_file) != orphan.pid)
        assert orphan.wait(10) is not None
        run.stop()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


RUN_NODE = r"""
import json, sys
from medledger.node.supervisor import run_node
options = json.loads(sys.argv[2])
sys.exit(run_node(sys.argv[1], **options))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_node_stops_cleanly_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    cfg = make_home(tmp_path)
    options = {"backoff": 0.1, **fake_commands(tmp_path, cfg.home)}
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_NODE, str(cfg.home), json.dumps(options)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: both_running(cfg) and len(events(cfg)) >= 2)
        assert read_pid_file(cfg.node_pid_file) == proc.pid
        app_pid, comet_pid = read_pid_file(cfg.app_pid_file), read_pid_file(cfg.cometbft_pid_file)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert events(cfg)[-2:] == ["cometbft-term", "app-term"]
    assert app_pid is not None and not pid_alive(app_pid)
    assert comet_pid is not None and not pid_alive(comet_pid)
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    kinds = [record["event"] for record in records]
    assert kinds[0] == "node.supervisor_started"
    assert "node.running" in kinds
    assert kinds[-1] == "node.supervisor_stopped"
    stopping = next(record for record in records if record["event"] == "node.stopping")
    assert stopping["reason"] == sig.name
    assert all({"time", "level", "message", "node"} <= record.keys() for record in records)
    assert not cfg.node_pid_file.exists()
