"""A HAPI FHIR JPA server (bench/hapi/, HAPI FHIR 8.8.0 on Spring Boot) on a PostgreSQL 15
cluster of its own, both on free loopback ports, for bench/fhir.py to measure beside medledger.

`hapi_server()` is a context manager:

1. it makes sure Java 17, Maven and the PostgreSQL 15 server binaries are there, installing
   `openjdk-17-jdk-headless`, `maven` and `postgresql-15` with apt-get when they are missing
   (with the Debian default cluster turned off first, so that the install starts no server);
2. it builds bench/hapi/target/hapi-bench.jar with `mvn -q -B package -DskipTests` unless the
   jar is newer than every file of bench/hapi/ (minutes the first time: Maven downloads HAPI,
   Spring Boot and Hibernate);
3. it creates a cluster with initdb in a temporary directory and starts it on 127.0.0.1 only,
   with PostgreSQL's durability defaults (fsync and synchronous_commit on), as an unprivileged
   user when this runs as root, and creates the database;
4. it starts the jar on another free loopback port with a bounded heap and waits until
   `GET /fhir/metadata` answers;
5. on exit, also on an error, Ctrl-C, SIGTERM or SIGHUP (under bench.common's
   terminate_cleanly), it stops HAPI and then PostgreSQL and removes the directory. Both
   children also get SIGTERM if the benchmark process dies (PR_SET_PDEATHSIG).

`python bench/hapi_server.py` starts it, reads the CapabilityStatement and stops it again: a
smoke test of the set-up.
"""

# ruff: noqa: E402  (imports follow the sys.path set-up below)
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ comes first on sys.path, where bench/fhir.py would shadow the `fhir`
# package that medledger (imported by bench.common) validates with: the repository root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from bench.common import ROOT, CpuMeter, die_with_parent, log, terminate_cleanly

HAPI_DIR = ROOT / "bench" / "hapi"
JAR = HAPI_DIR / "target" / "hapi-bench.jar"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
JVM_DIR = Path("/usr/lib/jvm")
DATABASE = "hapi"
DB_USER = "hapi"
HEAP = "2g"
BUILD_TIMEOUT = 1800.0
INSTALL_TIMEOUT = 1200.0
START_TIMEOUT = 420.0
STOP_TIMEOUT = 30.0
# Debian's postgresql-common reads this directory: with it, installing postgresql-15 creates
# (and starts) no default cluster.
CREATECLUSTER_DROPIN = Path("/etc/postgresql-common/createcluster.d/medledger-bench.conf")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- tools -------------------------------------------------------------------------------------


def java17_home() -> Path | None:
    for candidate in sorted(JVM_DIR.glob("java-17-openjdk-*")):
        if (candidate / "bin" / "javac").is_file():
            return candidate
    return None


def apt_install(packages: list[str]) -> None:
    if os.geteuid() != 0:
        raise RuntimeError(
            f"missing {', '.join(packages)}: install them (apt-get install -y "
            f"{' '.join(packages)}) or run the benchmark as root"
        )
    if "postgresql-15" in packages and not CREATECLUSTER_DROPIN.exists():
        CREATECLUSTER_DROPIN.parent.mkdir(parents=True, exist_ok=True)
        CREATECLUSTER_DROPIN.write_text(
            "# medledger bench/hapi_server.py: clusters of its own, no default one\n"
            "create_main_cluster = false\n"
        )
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    log(f"installing {', '.join(packages)} with apt-get")
    subprocess.run(["apt-get", "update"], check=True, env=env, timeout=INSTALL_TIMEOUT)
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *packages],
        check=True,
        env=env,
        timeout=INSTALL_TIMEOUT,
    )


def ensure_tools() -> Path:
    """Java 17 (its home), Maven and the PostgreSQL 15 server, installed when missing."""
    missing = []
    if java17_home() is None:
        missing.append("openjdk-17-jdk-headless")
    if shutil.which("mvn") is None:
        missing.append("maven")
    if not (PG_BIN / "postgres").is_file() or not (PG_BIN / "initdb").is_file():
        missing.append("postgresql-15")
    if missing:
        apt_install(missing)
    home = java17_home()
    if home is None or shutil.which("mvn") is None or not (PG_BIN / "postgres").is_file():
        raise RuntimeError("Java 17, Maven or PostgreSQL 15 still missing after apt-get install")
    return home


def sources() -> list[Path]:
    return [
        p for p in [HAPI_DIR / "pom.xml", *sorted((HAPI_DIR / "src").rglob("*"))] if p.is_file()
    ]


def build_jar(java_home: Path) -> Path:
    """bench/hapi/target/hapi-bench.jar, built unless it is newer than every source file."""
    newest = max(p.stat().st_mtime for p in sources())
    if JAR.is_file() and JAR.stat().st_mtime > newest:
        return JAR
    log("building bench/hapi (HAPI FHIR JPA server; the first build downloads for minutes)")
    started = time.monotonic()
    env = os.environ | {"JAVA_HOME": str(java_home)}
    result = subprocess.run(
        ["mvn", "-q", "-B", "package", "-DskipTests"],
        cwd=HAPI_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if result.returncode != 0 or not JAR.is_file():
        tail = (result.stdout + result.stderr).strip().splitlines()[-40:]
        raise RuntimeError("mvn package failed:\n" + "\n".join(tail))
    log(f"built {JAR.relative_to(ROOT)} in {time.monotonic() - started:.0f}s")
    return JAR


# -- processes ---------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes], sig: int, label: str) -> None:
    """Signal `proc`, wait, then SIGKILL if it is still there."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log(f"{label} did not stop in {STOP_TIMEOUT:.0f}s: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def log_tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@dataclass
class ServerUser:
    """Who the PostgreSQL server runs as: this user, or an unprivileged one under root."""

    uid: int | None = None
    gid: int | None = None
    name: str = ""

    @staticmethod
    def pick() -> ServerUser:
        if os.geteuid() != 0:
            return ServerUser()
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return ServerUser(entry.pw_uid, entry.pw_gid, name)
        raise RuntimeError("running as root and found neither a postgres nor a nobody user")

    def own(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def run(self, args: list[str], timeout: float) -> None:
        result = subprocess.run(
            args,
            user=self.uid,
            group=self.gid,
            extra_groups=[] if self.uid is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
        )
        if result.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {result.stdout}{result.stderr}")

    def popen(self, args: list[str], log_file: Path) -> subprocess.Popen[bytes]:
        with log_file.open("ab") as out:
            return subprocess.Popen(
                args,
                user=self.uid,
                group=self.gid,
                extra_groups=[] if self.uid is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # After the change of user (which clears PR_SET_PDEATHSIG): CPython runs
                # preexec_fn after setuid/setgid.
                preexec_fn=die_with_parent,
                cwd="/",
            )


@dataclass
class HapiServer:
    """A running HAPI FHIR JPA server and its PostgreSQL."""

    base: str  # http://127.0.0.1:PORT/fhir
    java_pid: int
    postgres_pid: int
    pg_port: int
    home: Path
    startup_s: float
    settings: dict[str, str] = field(default_factory=dict)

    def cpu_meter(self) -> CpuMeter:
        """Process trees: the JVM, and PostgreSQL with its backends."""
        return CpuMeter(
            {
                "hapi (java)": [self.java_pid],
                "postgres": [self.postgres_pid],
                "bench process": [os.getpid()],
            }
        )


def wait_for_postgres(port: int, proc: subprocess.Popen[bytes], log_file: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        ready = subprocess.run(
            [
                str(PG_BIN / "pg_isready"),
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                DB_USER,
                "-d",
                "postgres",
            ],
            timeout=10,
            check=False,
        )
        if ready.returncode == 0:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL did not start:\n{log_tail(log_file)}")
        time.sleep(0.3)


def wait_for_hapi(base: str, proc: subprocess.Popen[bytes], log_file: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(timeout=10) as http:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                answer = http.get(f"{base}/metadata", headers={"Accept": "application/fhir+json"})
                if answer.status_code == 200:
                    return
            if proc.poll() is not None:
                raise RuntimeError(f"HAPI exited with {proc.returncode}:\n{log_tail(log_file)}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"HAPI did not answer /fhir/metadata in {START_TIMEOUT:.0f}s:\n"
                    f"{log_tail(log_file)}"
                )
            time.sleep(1.0)


@contextlib.contextmanager
def hapi_server(label: str = "hapi", heap: str = HEAP) -> Iterator[HapiServer]:
    """HAPI FHIR JPA on a PostgreSQL cluster of its own (see the module's docstring)."""
    java_home = ensure_tools()
    jar = build_jar(java_home)
    user = ServerUser.pick()
    home = Path(tempfile.mkdtemp(prefix=f"mlb-{label}-", dir="/tmp"))
    postgres: subprocess.Popen[bytes] | None = None
    java: subprocess.Popen[bytes] | None = None
    pg_log = home / "postgres.log"
    hapi_log = home / "hapi.log"
    started = time.monotonic()
    try:
        home.chmod(0o755)
        data = home / "pgdata"
        data.mkdir(mode=0o700)
        user.own(data)
        pg_log.touch()
        user.own(pg_log)
        # --no-sync: initdb itself does not wait for its files to reach the disk; the server
        # runs with PostgreSQL's defaults (fsync = on, synchronous_commit = on).
        user.run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                DB_USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            timeout=120,
        )
        pg_port = free_port()
        postgres = user.popen(
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(data),
                "-p",
                str(pg_port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={data}",
                "-c",
                "max_connections=60",
            ],
            pg_log,
        )
        wait_for_postgres(pg_port, postgres, pg_log)
        subprocess.run(
            [
                str(PG_BIN / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(pg_port),
                "-U",
                DB_USER,
                DATABASE,
            ],
            check=True,
            timeout=60,
            capture_output=True,
        )
        http_port = free_port()
        base = f"http://127.0.0.1:{http_port}/fhir"
        log(
            f"{label}: PostgreSQL 15 on 127.0.0.1:{pg_port} (as {user.name or 'this user'}), "
            f"HAPI FHIR JPA starting on {base}, heap {heap}"
        )
        tmp = home / "java-tmp"
        tmp.mkdir()
        java = ServerUser().popen(
            [
                str(java_home / "bin" / "java"),
                f"-Xmx{heap}",
                f"-Xms{heap}",
                f"-Djava.io.tmpdir={tmp}",
                "-jar",
                str(jar),
                f"--server.port={http_port}",
                f"--spring.datasource.url=jdbc:postgresql://127.0.0.1:{pg_port}/{DATABASE}",
            ],
            hapi_log,
        )
        wait_for_hapi(base, java, hapi_log)
        startup = time.monotonic() - started
        log(f"{label}: HAPI answered /fhir/metadata after {startup:.0f}s")
        settings = {
            "hapi_fhir": "8.8.0",
            "postgresql": subprocess.run(
                [str(PG_BIN / "postgres"), "--version"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip(),
            "java_heap": heap,
            "postgres_settings": "defaults (fsync on, synchronous_commit on)",
        }
        yield HapiServer(base, java.pid, postgres.pid, pg_port, home, round(startup, 1), settings)
    except BaseException:
        for name, path in (("hapi.log", hapi_log), ("postgres.log", pg_log)):
            tail = log_tail(path, 20)
            if tail:
                log(f"--- {label} {name}\n{tail}")
        raise
    finally:
        log(f"{label}: stopping HAPI and PostgreSQL")
        if java is not None:
            stop_process(java, signal.SIGTERM, "HAPI")
        if postgres is not None:
            stop_process(postgres, signal.SIGINT, "PostgreSQL")  # SIGINT: fast shutdown
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    with terminate_cleanly(), hapi_server("hapi-smoke") as server:
        answer = httpx.get(f"{server.base}/metadata", timeout=30)
        statement = answer.json()
        resources = statement["rest"][0]["resource"]
        print(
            f"{server.base}: {statement['software']['name']} {statement['software']['version']}"
            f", FHIR {statement['fhirVersion']}, {len(resources)} resource types, "
            f"started in {server.startup_s}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
