"""A node's own configuration file, `HOME/medledger.toml`, and where the CometBFT binary is.

A node home directory holds CometBFT's `config/` and `data/` (CometBFT runs with `--home HOME`)
and our `medledger.toml`, whose `[node]` table names the node (moniker), the chain it belongs to,
the organization that runs it, the Unix socket the ledger application serves ABCI on, the address
of our HTTP API and the URL of the CometBFT RPC. Relative paths in it are relative to HOME. Other
tables in the file are kept untouched when the `[node]` table is rewritten.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit

import medledger

CONFIG_FILE = "medledger.toml"
COMETBFT_ENV = "MEDLEDGER_COMETBFT"

APP_PID_FILE = "app.pid"
COMETBFT_PID_FILE = "cometbft.pid"
NODE_PID_FILE = "node.pid"

# CometBFT refuses chain ids longer than this (types.MaxChainIDLen).
MAX_CHAIN_ID_LEN = 50
# sun_path of a Unix socket address holds 108 bytes on Linux, including the final NUL.
MAX_SOCKET_PATH_BYTES = 107

_FIELDS = ("moniker", "chain_id", "abci_socket", "api_listen", "cometbft_rpc", "organization")
# Keys of [node] that may be left out. public_url: the base URL clients reach this node's API
# at (a reverse proxy's), when it is not the listen address.
_OPTIONAL = ("public_url",)


# The exit status of a node process stopped by a configuration error (sysexits.h EX_CONFIG):
# the supervisor does not restart it, since the same file would fail the same way.
CONFIG_ERROR_EXIT = 78
# How a node process that stops on a configuration error begins its last line of output.
CONFIG_ERROR_PREFIX = "configuration error: "


class ConfigError(Exception):
    """A node configuration is missing or invalid, or a required tool cannot be found."""


def parse_host_port(value: str, what: str = "address") -> tuple[str, int]:
    """A listen address is `host:port` with a port in 1..65535 (IPv6 hosts in brackets)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"{what} must be host:port, got {value!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigError(f"{what} port must be in 1..65535, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


@dataclass(frozen=True)
class NodeConfig:
    """One node's settings from `HOME/medledger.toml`, plus the home directory itself."""

    home: Path
    moniker: str
    chain_id: str
    abci_socket: str = "abci.sock"
    api_listen: str = "127.0.0.1:26660"
    cometbft_rpc: str = "http://127.0.0.1:26657"
    organization: str = "org-1"
    public_url: str = ""

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def config_path(self) -> Path:
        return self.home / CONFIG_FILE

    @property
    def socket_path(self) -> Path:
        """The ABCI Unix socket; a relative `abci_socket` is relative to HOME."""
        path = Path(self.abci_socket)
        return path if path.is_absolute() else self.home / path

    @property
    def state_dir(self) -> Path:
        """Where the ledger application keeps its state (HOME/app)."""
        return self.home / "app"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def cometbft_config_dir(self) -> Path:
        return self.home / "config"

    @property
    def genesis_path(self) -> Path:
        return self.home / "config" / "genesis.json"

    @property
    def app_pid_file(self) -> Path:
        return self.home / APP_PID_FILE

    @property
    def cometbft_pid_file(self) -> Path:
        return self.home / COMETBFT_PID_FILE

    @property
    def node_pid_file(self) -> Path:
        return self.home / NODE_PID_FILE

    @property
    def api_address(self) -> tuple[str, int]:
        """`api_listen` split into host and port."""
        return parse_host_port(self.api_listen, "api_listen")

    @property
    def api_url(self) -> str:
        """The base URL of our HTTP API (a wildcard listen host is reached on loopback)."""
        host, port = self.api_address
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    @property
    def public_api_url(self) -> str:
        """The base URL clients use for our HTTP API: `public_url`, else `api_url`. SMART token
        audiences and the URLs in FHIR answers are built from it."""
        return self.public_url.rstrip("/") or self.api_url


def _validate(cfg: NodeConfig) -> None:
    for name in _FIELDS:
        value = getattr(cfg, name)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"[node] {name} must be a non-empty string")
    if not isinstance(cfg.home, Path):
        raise ConfigError("home must be a Path")
    if len(cfg.chain_id) > MAX_CHAIN_ID_LEN:
        raise ConfigError(f"[node] chain_id must be at most {MAX_CHAIN_ID_LEN} characters")
    if any(ch.isspace() for ch in cfg.chain_id):
        raise ConfigError("[node] chain_id must not contain whitespace")
    parse_host_port(cfg.api_listen, "[node] api_listen")
    if cfg.public_url and not cfg.public_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"[node] public_url must be an http:// or https:// URL, got {cfg.public_url!r}"
        )
    if not cfg.cometbft_rpc.startswith(("http://", "https://")):
        raise ConfigError(
            f"[node] cometbft_rpc must be an http:// or https:// URL, got {cfg.cometbft_rpc!r}"
        )


def load_node_config(home: Path | str) -> NodeConfig:
    """Read `HOME/medledger.toml`; a missing file, bad TOML, a missing or unknown key in its
    `[node]` table, or an invalid value is a `ConfigError` naming the file."""
    home = Path(home).expanduser().resolve()
    path = home / CONFIG_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"no node configuration at {path} (is {home} a node home directory?)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    table = document.get("node")
    if not isinstance(table, dict):
        raise ConfigError(f"{path} has no [node] table")
    unknown = sorted(set(table) - set(_FIELDS) - set(_OPTIONAL))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) in [node]: {', '.join(unknown)}")
    missing = [name for name in _FIELDS if name not in table]
    if missing:
        raise ConfigError(f"{path}: missing key(s) in [node]: {', '.join(missing)}")
    values: dict[str, Any] = {name: table[name] for name in (*_FIELDS, *_OPTIONAL) if name in table}
    for name, value in values.items():
        if not isinstance(value, str):
            raise ConfigError(f"{path}: [node] {name} must be a string")
    try:
        return NodeConfig(home=home, **values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


MAX_PAYERS = 1000


def load_payers(home: Path | str) -> dict[str, str]:
    """The `[claims] payers` table of `HOME/medledger.toml`: how imported claims name payers
    that are network insurers — a payer's identifier (`system|value`) or name -> the insurer
    organization's id. Empty when absent; anything but a table of strings is a ConfigError."""
    path = Path(home).expanduser().resolve() / CONFIG_FILE
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    claims = document.get("claims", {})
    if not isinstance(claims, dict):
        raise ConfigError(f"{path}: [claims] must be a table")
    unknown = sorted(set(claims) - {"payers"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) in [claims]: {', '.join(unknown)}")
    payers = claims.get("payers", {})
    if not isinstance(payers, dict) or len(payers) > MAX_PAYERS:
        raise ConfigError(f"{path}: [claims] payers is a table of at most {MAX_PAYERS} entries")
    for name, organization in payers.items():
        if not name or not isinstance(organization, str) or not organization:
            raise ConfigError(
                f"{path}: [claims] payers maps a payer's name or system|value to an insurer"
                f" organization id; {name!r} = {organization!r} is not that"
            )
    return dict(payers)


def write_node_config(cfg: NodeConfig) -> Path:
    """Write `cfg` as the `[node]` table of `HOME/medledger.toml` (creating HOME if needed),
    keeping any other tables and comments already in the file; returns the file's path."""
    cfg.home.mkdir(parents=True, exist_ok=True)
    path = cfg.config_path
    if path.exists():
        try:
            document = tomlkit.parse(path.read_text(encoding="utf-8"))
        except Exception as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    else:
        document = tomlkit.document()
        document.add(tomlkit.comment("medledger node configuration (paths relative to HOME)"))
    table = tomlkit.table()
    for name in _FIELDS:
        table[name] = getattr(cfg, name)
    if cfg.public_url:
        table["public_url"] = cfg.public_url
    document["node"] = table
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tomlkit.dumps(document), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_cometbft() -> Path:
    """The CometBFT binary: `$MEDLEDGER_COMETBFT` if set, else `.tools/bin/cometbft` in the
    nearest directory above the installed package that has one (the project root), else
    `cometbft` on PATH."""
    override = os.environ.get(COMETBFT_ENV)
    if override:
        path = Path(override).expanduser()
        if not _is_executable(path):
            raise ConfigError(f"{COMETBFT_ENV}={override} is not an executable file")
        return path.resolve()
    package_dir = Path(medledger.__file__).resolve().parent
    for directory in package_dir.parents:
        candidate = directory / ".tools" / "bin" / "cometbft"
        if _is_executable(candidate):
            return candidate
    found = shutil.which("cometbft")
    if found:
        return Path(found).resolve()
    raise ConfigError(
        "cannot find the cometbft binary: run scripts/setup.sh, put cometbft on PATH, "
        f"or set {COMETBFT_ENV}"
    )
