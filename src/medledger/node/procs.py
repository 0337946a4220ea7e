"""Process helpers shared by the node supervisor and the local-network tooling: pid files,
liveness checks that see through zombies, and stopping a process with a SIGKILL fallback."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path


def write_pid_file(path: Path, pid: int) -> None:
    """Make `path` hold `pid` and a newline, replacing it in one step."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{pid}\n", encoding="ascii")
    os.replace(tmp, path)


def read_pid_file(path: Path) -> int | None:
    """The pid in `path`, or None when the file is missing or does not hold a positive pid."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if pid > 0 else None


def remove_pid_file(path: Path, pid: int | None = None) -> None:
    """Remove `path`; when `pid` is given, only if the file still names that pid."""
    if pid is not None and read_pid_file(path) != pid:
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _reap(pid: int) -> bool:
    """Reap `pid` if it is an exited child of ours; True when it was reaped."""
    try:
        done, _status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    except OSError:
        return False
    return done == pid


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie (our own exited children are reaped
    on the way, so a stopped child never looks alive)."""
    if pid <= 0:
        return False
    if _reap(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if sys.platform.startswith("linux"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            return False
        # The state letter follows the parenthesized command name, which may contain spaces.
        state = stat.rpartition(")")[2].split()
        if state and state[0] in ("Z", "X"):
            return False
    return True


def process_cmdline(pid: int) -> list[str] | None:
    """The argument vector of `pid` (Linux /proc), or None when it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def cmdline_has_arg(pid: int, arg: str) -> bool:
    """True when one argument of `pid`'s command line is exactly `arg`; where the command line
    cannot be read (not Linux), a live process is assumed to match."""
    argv = process_cmdline(pid)
    if argv is None:
        return not sys.platform.startswith("linux") and pid_alive(pid)
    return arg in argv


def cmdline_contains(pid: int, text: str) -> bool:
    """True when some argument of `pid`'s command line contains `text`; where the command line
    cannot be read (not Linux), a live process is assumed to match."""
    argv = process_cmdline(pid)
    if argv is None:
        return not sys.platform.startswith("linux") and pid_alive(pid)
    return any(text in part for part in argv)


def wait_dead(pid: int, timeout: float, poll: float = 0.05) -> bool:
    """Wait up to `timeout` seconds for `pid` to exit; True when it did."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


def send_signal(pid: int, sig: signal.Signals) -> bool:
    """Send `sig` to `pid`; False when there is no such process."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def terminate_pid(pid: int, timeout: float) -> bool:
    """SIGTERM `pid`, wait up to `timeout` seconds, then SIGKILL it; True when it needed the
    SIGKILL."""
    if not pid_alive(pid):
        return False
    send_signal(pid, signal.SIGTERM)
    if wait_dead(pid, timeout):
        return False
    send_signal(pid, signal.SIGKILL)
    wait_dead(pid, 5.0)
    return True
