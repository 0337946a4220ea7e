"""The node supervisor: one medledger application process and one CometBFT process, as a pair.

Rules (DESIGN §2): the application starts first; CometBFT starts only once the application's ABCI
Unix socket accepts connections, and is pointed at it (`--proxy_app unix://SOCKET`, `--abci
socket`). If either process exits, the other is stopped and both are started again in the same
order, after a back-off that doubles on every quick failure (up to a ceiling) and resets once the
pair has run stably. An application that exits with CONFIG_ERROR_EXIT (78) found its
configuration wrong: the supervisor stops, quoting the application's last line of output,
and returns 78 instead of restarting into the same error. SIGINT or SIGTERM stops the pair —
CometBFT first, then the application, each with SIGTERM and SIGKILL after a timeout — and the
supervisor returns.

Child output is appended to HOME/logs/app.log and HOME/logs/cometbft.log. HOME/app.pid and
HOME/cometbft.pid name the current children; HOME/node.pid names the supervisor. The supervisor
reports every event as one JSON line (python-json-logger) on its log stream.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from medledger.config import (
    CONFIG_ERROR_EXIT,
    CONFIG_ERROR_PREFIX,
    MAX_SOCKET_PATH_BYTES,
    ConfigError,
    NodeConfig,
    find_cometbft,
    load_node_config,
)
from medledger.node.procs import (
    cmdline_contains,
    cmdline_has_arg,
    pid_alive,
    read_pid_file,
    remove_pid_file,
    terminate_pid,
    write_pid_file,
)

LOGGER_NAME = "medledger.node"
log = logging.getLogger(f"{LOGGER_NAME}.supervisor")

APP_LOG = "app.log"
COMETBFT_LOG = "cometbft.log"


class NodeAlreadyRunning(ConfigError):
    """Another supervisor already runs this node home."""


def app_argv(cfg: NodeConfig) -> list[str]:
    """The command that runs the ledger application of a node."""
    return [sys.executable, "-m", "medledger.cli.main", "node", "app", "--home", str(cfg.home)]


def cometbft_argv(cfg: NodeConfig, binary: Path | None = None) -> list[str]:
    """The command that runs CometBFT for a node, connected to the application's socket."""
    exe = binary if binary is not None else find_cometbft()
    return [
        str(exe),
        "start",
        "--home",
        str(cfg.home),
        "--proxy_app",
        f"unix://{cfg.socket_path}",
        "--abci",
        "socket",
    ]


def socket_accepts(path: Path, timeout: float = 0.5) -> bool:
    """True when a Unix stream socket at `path` accepts a connection (closed at once)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def json_log_handler(stream: TextIO) -> logging.Handler:
    """A logging handler that writes one JSON object per line: time, level, logger, message
    and every `extra` field."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    return handler


def _die_with_parent() -> None:
    """In a child before exec (Linux): receive SIGTERM when the supervisor dies, so that a
    SIGKILLed supervisor leaves no orphaned node processes behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    pid_file: Path


class NodeSupervisor:
    """Runs one node's application and CometBFT as a supervised pair until asked to stop."""

    def __init__(
        self,
        cfg: NodeConfig,
        *,
        app_command: Sequence[str] | None = None,
        cometbft_command: Sequence[str] | None = None,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        stable_after: float = 30.0,
        socket_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        max_restarts: int | None = None,
        poll_interval: float = 0.1,
    ) -> None:
        if not len(os.fsencode(str(cfg.socket_path))) <= MAX_SOCKET_PATH_BYTES:
            raise ConfigError(
                f"ABCI socket path is longer than {MAX_SOCKET_PATH_BYTES} bytes: "
                f"{cfg.socket_path} (set a shorter absolute abci_socket in medledger.toml)"
            )
        self.cfg = cfg
        self.app_command = list(app_command) if app_command is not None else app_argv(cfg)
        self.cometbft_command = (
            list(cometbft_command) if cometbft_command is not None else cometbft_argv(cfg)
        )
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stable_after = stable_after
        self.socket_timeout = socket_timeout
        self.stop_timeout = stop_timeout
        self.max_restarts = max_restarts
        self.poll_interval = poll_interval
        self.restarts = 0
        self.stop_reason: str | None = None
        # The application's message when it exited with CONFIG_ERROR_EXIT.
        self.config_error: str | None = None
        self._stop_logged = False
        self._stop = threading.Event()
        self._app: _Child | None = None
        self._cometbft: _Child | None = None

    # -- control -----------------------------------------------------------------------------

    def request_stop(self, why: str = "requested") -> None:
        """Ask `run` to stop both processes and return (safe from signal handlers/threads)."""
        if not self._stop.is_set():
            self.stop_reason = why
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def app_pid(self) -> int | None:
        return self._app.proc.pid if self._app is not None else None

    @property
    def cometbft_pid(self) -> int | None:
        return self._cometbft.proc.pid if self._cometbft is not None else None

    def _event(self, event: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
        log.log(
            level,
            message,
            extra={"event": event, "node": self.cfg.moniker, "home": str(self.cfg.home), **fields},
        )

    # -- main loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise the pair until `request_stop`; 0 after a requested stop, 1 when
        `max_restarts` was exceeded, CONFIG_ERROR_EXIT when the application found its
        configuration wrong."""
        cfg = self.cfg
        self._claim_home()
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        write_pid_file(cfg.node_pid_file, os.getpid())
        self._event("node.supervisor_started", "supervisor started", pid=os.getpid())
        delay = self.backoff
        status = 0
        try:
            while not self.stopping:
                started_at = time.monotonic()
                reason = self._start_pair()
                if reason is None and not self.stopping:
                    self._event(
                        "node.running",
                        "application and CometBFT running",
                        app_pid=self.app_pid,
                        cometbft_pid=self.cometbft_pid,
                        restarts=self.restarts,
                    )
                    reason = self._monitor()
                self._log_stopping()
                self._stop_pair()
                if reason is None or self.stopping:
                    break
                if self.config_error is not None:
                    self._event(
                        "node.config_error",
                        f"stopped: {self.config_error}",
                        logging.ERROR,
                        error=self.config_error,
                    )
                    status = CONFIG_ERROR_EXIT
                    break
                if self.max_restarts is not None and self.restarts >= self.max_restarts:
                    self._event(
                        "node.gave_up",
                        "too many restarts, giving up",
                        logging.ERROR,
                        reason=reason,
                        restarts=self.restarts,
                    )
                    status = 1
                    break
                ran_for = time.monotonic() - started_at
                delay = self.backoff if ran_for >= self.stable_after else delay
                self.restarts += 1
                self._event(
                    "node.restarting",
                    "restarting application and CometBFT",
                    logging.WARNING,
                    reason=reason,
                    restarts=self.restarts,
                    delay_s=round(delay, 3),
                )
                if self._stop.wait(delay):
                    break
                delay = min(max(delay, self.backoff) * 2, self.max_backoff)
        finally:
            self._log_stopping()
            self._stop_pair()
            remove_pid_file(cfg.node_pid_file, os.getpid())
            self._event("node.supervisor_stopped", "supervisor stopped", restarts=self.restarts)
        return status

    def _log_stopping(self) -> None:
        if self.stopping and not self._stop_logged:
            self._stop_logged = True
            self._event("node.stopping", "stop requested", reason=self.stop_reason)

    def _claim_home(self) -> None:
        """Refuse a home another live supervisor runs; stop children a dead supervisor left."""
        cfg = self.cfg
        other = read_pid_file(cfg.node_pid_file)
        if (
            other is not None
            and other != os.getpid()
            and pid_alive(other)
            and cmdline_contains(other, "medledger")
        ):
            raise NodeAlreadyRunning(f"node {cfg.home} is already running (supervisor pid {other})")
        for pid_file in (cfg.cometbft_pid_file, cfg.app_pid_file):
            pid = read_pid_file(pid_file)
            if pid is not None and pid_alive(pid) and cmdline_has_arg(pid, str(cfg.home)):
                self._event("node.orphan_stopped", "stopping a leftover process", pid=pid)
                terminate_pid(pid, self.stop_timeout)
            remove_pid_file(pid_file)

    def _spawn(self, name: str, argv: list[str], log_name: str, pid_file: Path) -> _Child:
        preexec: Callable[[], None] | None = (
            _die_with_parent if sys.platform.startswith("linux") else None
        )
        with open(self.cfg.log_dir / log_name, "ab") as out:
            proc = subprocess.Popen(
                argv,
                cwd=self.cfg.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Own process group: a Ctrl-C on the terminal reaches only the supervisor,
                # which then stops the pair in the right order.
                process_group=0,
                preexec_fn=preexec,
            )
        write_pid_file(pid_file, proc.pid)
        self._event(f"{name}.started", f"{name} started", pid=proc.pid, argv=argv)
        return _Child(name, proc, pid_file)

    def _start_pair(self) -> str | None:
        """Start the application, wait for its socket, start CometBFT; None on success, else
        why it failed."""
        cfg = self.cfg
        sock = cfg.socket_path
        if sock.is_dir():
            raise ConfigError(f"ABCI socket path is a directory: {sock}")
        if os.path.lexists(sock):
            sock.unlink()
            self._event("app.stale_socket_removed", "removed stale socket", socket=str(sock))
        sock.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._app = self._spawn("app", self.app_command, APP_LOG, cfg.app_pid_file)
        except OSError as exc:
            self._event(
                "app.spawn_failed", "cannot start application", logging.ERROR, error=str(exc)
            )
            return f"app spawn failed: {exc}"
        deadline = time.monotonic() + self.socket_timeout
        while True:
            if self.stopping:
                return None
            code = self._app.proc.poll()
            if code is not None:
                self._note_config_error(self._app, code)
                self._event(
                    "app.exited", "application exited before serving", logging.ERROR, code=code
                )
                return f"app exited with code {code} before serving"
            if socket_accepts(sock):
                break
            if time.monotonic() >= deadline:
                self._event(
                    "app.socket_timeout",
                    "application socket not ready in time",
                    logging.ERROR,
                    timeout_s=self.socket_timeout,
                )
                return "app socket timeout"
            time.sleep(0.05)
        self._event("app.ready", "application socket accepts connections", socket=str(sock))
        try:
            self._cometbft = self._spawn(
                "cometbft", self.cometbft_command, COMETBFT_LOG, cfg.cometbft_pid_file
            )
        except OSError as exc:
            self._event(
                "cometbft.spawn_failed", "cannot start CometBFT", logging.ERROR, error=str(exc)
            )
            return f"cometbft spawn failed: {exc}"
        return None

    def _monitor(self) -> str | None:
        """Wait until stop is requested (None) or a child exits (why)."""
        while not self._stop.wait(self.poll_interval):
            for child in (self._app, self._cometbft):
                if child is None:
                    continue
                code = child.proc.poll()
                if code is not None:
                    self._note_config_error(child, code)
                    self._event(
                        f"{child.name}.exited",
                        f"{child.name} exited",
                        logging.ERROR,
                        pid=child.proc.pid,
                        code=code,
                    )
                    return f"{child.name} exited with code {code}"
        return None

    def _note_config_error(self, child: _Child, code: int) -> None:
        if child.name == "app" and code == CONFIG_ERROR_EXIT:
            self.config_error = _config_error_line(self.cfg.log_dir / APP_LOG)

    def _stop_child(self, child: _Child | None) -> None:
        if child is None:
            return
        proc = child.proc
        if proc.poll() is not None:
            self._event(
                f"{child.name}.reaped",
                f"{child.name} had already exited",
                pid=proc.pid,
                code=proc.returncode,
            )
        else:
            killed = False
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                killed = True
                self._event(
                    f"{child.name}.kill",
                    f"{child.name} ignored SIGTERM, sending SIGKILL",
                    logging.WARNING,
                    pid=proc.pid,
                    timeout_s=self.stop_timeout,
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
            self._event(
                f"{child.name}.stopped",
                f"{child.name} stopped",
                pid=proc.pid,
                code=proc.returncode,
                killed=killed,
            )
        remove_pid_file(child.pid_file, proc.pid)

    def _stop_pair(self) -> None:
        """CometBFT first (it stops calling the application), then the application."""
        self._stop_child(self._cometbft)
        self._cometbft = None
        self._stop_child(self._app)
        self._app = None


def _config_error_line(log_file: Path) -> str:
    """The application's configuration error: the last line of its log that reports one."""
    try:
        with open(log_file, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        tail = ""
    for line in reversed(tail.splitlines()):
        if line.startswith(CONFIG_ERROR_PREFIX):
            return line
    return (
        f"{CONFIG_ERROR_PREFIX}the application exited with status {CONFIG_ERROR_EXIT}"
        f" (see {log_file})"
    )


@contextlib.contextmanager
def _stop_on_signals(supervisor: NodeSupervisor) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        supervisor.request_stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _json_logging(stream: TextIO | None) -> Iterator[None]:
    if stream is None:
        yield
        return
    logger = logging.getLogger(LOGGER_NAME)
    handler = json_log_handler(stream)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def run_node(home: Path | str, *, log_stream: TextIO | None = None, **options: Any) -> int:
    """Run one node in the foreground until SIGINT/SIGTERM; the exit status (0 after a clean
    stop). Events go as JSON lines to `log_stream` (default: stderr). `options` are passed to
    `NodeSupervisor` (back-off, timeouts, commands)."""
    cfg = load_node_config(home)
    supervisor = NodeSupervisor(cfg, **options)
    stream = log_stream if log_stream is not None else sys.stderr
    with _json_logging(stream), _stop_on_signals(supervisor):
        return supervisor.run()
