"""A local network of N validator nodes on one machine: create it, grow it, start, stop, inspect.

`init_testnet` writes HOME/node0 … HOME/node{N-1}. Each is a full node home (CometBFT's `config/`
and `data/`, our `medledger.toml`, the organization's keystores in `keys/`). All nodes share ONE
genesis.json: every node is a validator of power 10 run by one founding organization, and the
genesis `app_state` lists those organizations with their admin keys, node encryption key and
validator key. Nodes listen on 127.0.0.1 only, each on its own block of `PORT_STRIDE` ports from
`base_port`, and know every other node as a persistent peer. HOME/testnet.toml records the chain
id, the base port and the node directories.

The same `medledger node run --home HOME/nodeI` command `testnet_up` starts in the background is
what an organization runs on its own host in a real deployment.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tomlkit
from tomlkit.items import Table
from tomlkit.toml_document import TOMLDocument

from medledger.config import (
    MAX_SOCKET_PATH_BYTES,
    ConfigError,
    NodeConfig,
    find_cometbft,
    load_node_config,
    write_node_config,
)
from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import DIR_MODE, save_keystore
from medledger.node.procs import (
    cmdline_contains,
    cmdline_has_arg,
    pid_alive,
    read_pid_file,
    remove_pid_file,
    send_signal,
    terminate_pid,
    wait_dead,
    write_pid_file,
)
from medledger.node.services import write_services_config

MANIFEST_FILE = "testnet.toml"
NODE_LOG = "node.log"
DEFAULT_CHAIN_ID = "medledger-local"
DEFAULT_BASE_PORT = 26600
VALIDATOR_POWER = 10

# Every node owns PORT_STRIDE consecutive ports from base_port + index * PORT_STRIDE.
PORT_STRIDE = 10
P2P_OFFSET = 0
RPC_OFFSET = 1
API_OFFSET = 2
PROMETHEUS_OFFSET = 3

ADMIN_KEYSTORE = "admin"
NODE_KEYSTORE = "node"

# Founding organizations of a local network, in node order; beyond these, generic ones.
SAMPLE_ORGANIZATIONS: tuple[tuple[str, str], ...] = (
    ("St. Mary's Hospital", "hospital"),
    ("Riverside Clinic", "clinic"),
    ("Northside Lab", "lab"),
    ("CarePlus Insurance", "insurer"),
    ("Greenway Pharmacy", "pharmacy"),
)
_GENERIC_KINDS = ("hospital", "clinic", "lab", "pharmacy", "insurer")
ORGANIZATION_KINDS = frozenset(_GENERIC_KINDS)

MiB = 1024 * 1024


class TestnetError(Exception):
    """A local network cannot be created, changed, started or stopped as asked."""

    __test__ = False  # not a pytest test class despite the name


@dataclass(frozen=True)
class CometTuning:
    """CometBFT settings for a small permissioned network of a few organizations on a LAN.

    Each field says why it has its value; `apply_tuning` writes them into config.toml.
    """

    # [consensus] timeout_commit: how long a node waits after committing a block before it
    # starts the next height (collecting late precommits). On a LAN all votes arrive within
    # milliseconds, so 500ms keeps the block time short without spinning; CometBFT's 1s default
    # is tuned for validators spread over the internet.
    timeout_commit: str = "500ms"
    # [consensus] timeout_propose: how long validators wait for the proposal before prevoting
    # nil. With one of four validators down, every fourth height waits this long for the dead
    # proposer; 2s (default 3s) halves that stall but still leaves a Python PrepareProposal
    # over a full mempool ample time.
    timeout_propose: str = "2s"
    # [consensus] create_empty_blocks: keep producing blocks with no transactions, so the chain
    # shows liveness (height and block time advance; monitoring can alert on a stall) ...
    create_empty_blocks: bool = True
    # ... but at most one empty block per interval: a new transaction still gets a block at
    # once, while an idle network writes one block every 2s instead of one per timeout_commit.
    create_empty_blocks_interval: str = "2s"
    # [mempool] size / max_txs_bytes: pending transactions held per node. Ten thousand is
    # several blocks of record batches for a few organizations; 256 MiB (default 1 GiB) bounds
    # the memory a flood can pin on a modest hospital server.
    mempool_size: int = 10_000
    mempool_max_txs_bytes: int = 256 * MiB
    # [mempool] cache_size: hashes of recently seen transactions, so a replayed or re-gossiped
    # transaction is dropped before CheckTx; kept at twice the mempool size.
    mempool_cache_size: int = 20_000
    # [mempool] recheck: after every block, CheckTx runs again on what is left in the mempool,
    # so transactions made invalid by the block (a nonce now used, a member just revoked, a
    # consent just withdrawn) are evicted instead of being proposed. Our CheckTx is
    # state-dependent, so this stays on.
    recheck: bool = True
    # [mempool] max_tx_bytes: hard ceiling on one transaction before CheckTx even sees it. The
    # ledger's own `max_tx_bytes` parameter (512 KiB, changeable by governance) is the real limit;
    # record packages are off-chain, so 1 MiB leaves room for governance without letting a
    # peer push megabyte transactions.
    max_tx_bytes: int = 1 * MiB
    # Consensus parameter block.max_bytes (genesis): 4 MiB per block (default 21 MiB) bounds
    # how long the Python application spends executing one block; it must exceed max_tx_bytes.
    block_max_bytes: int = 4 * MiB
    # [rpc] max_body_bytes: a broadcast_tx request carries the transaction base64-encoded in
    # JSON (4/3 of its size plus framing), so the default 1,000,000 bytes would refuse a
    # maximum-size transaction; 4 MiB accepts it with margin.
    rpc_max_body_bytes: int = 4 * MiB
    # [p2p] send_rate / recv_rate: per-peer bandwidth throttle in bytes/s. The 5 MB/s default
    # is for public networks; on a LAN, 20 MB/s lets a block of record batches propagate in
    # well under timeout_propose.
    send_rate: int = 20_000_000
    recv_rate: int = 20_000_000
    # [p2p] persistent_peers_max_dial_period: with the default 0s, redialing a persistent peer
    # backs off exponentially without bound, so a validator that was down for a while is only
    # reconnected after minutes; capped at 10s, the network heals within seconds of a restart.
    persistent_peers_max_dial_period: str = "10s"
    # [p2p] flush_throttle_timeout: how long a peer connection may hold small messages before
    # writing them. The 100ms default adds up to 100ms to every vote and block part on a LAN;
    # 10ms (CometBFT v1's default) lowered p99 commit latency in BENCHMARKS.md's runs.
    flush_throttle_timeout: str = "10ms"
    # [p2p] addr_book_strict = false: peers on 127.0.0.1 / private LAN addresses are routable
    # for us (the default accepts only public IPs into the address book).
    addr_book_strict: bool = False
    # [p2p] allow_duplicate_ip = true: several nodes of a local network share one IP address.
    allow_duplicate_ip: bool = True
    # [tx_index] indexer = "kv": index transactions by hash and height so the node API can
    # answer /tx and tx_search lookups (the "null" indexer would disable them).
    indexer: str = "kv"
    # log_format = "json": CometBFT's log is machine-readable like our supervisor's log.
    log_format: str = "json"
    log_level: str = "info"
    # [instrumentation] prometheus: CometBFT's own metrics endpoint. Off unless asked for; our
    # node API serves the application's metrics. Its listen address always gets a port of the
    # node's own block, so turning it on can never clash with another node or our API.
    prometheus: bool = False


@dataclass(frozen=True)
class NodePorts:
    """The ports of node `index` of a local network."""

    p2p: int
    rpc: int
    api: int
    prometheus: int

    @classmethod
    def for_index(cls, base_port: int, index: int) -> NodePorts:
        start = base_port + index * PORT_STRIDE
        return cls(
            p2p=start + P2P_OFFSET,
            rpc=start + RPC_OFFSET,
            api=start + API_OFFSET,
            prometheus=start + PROMETHEUS_OFFSET,
        )


@dataclass(frozen=True)
class Manifest:
    """HOME/testnet.toml: what `init_testnet` created, extended by `add_node`."""

    chain_id: str
    base_port: int
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class AddedNode:
    """A node added to a running or stopped network by `add_node`."""

    config: NodeConfig
    validator_pub_key: str  # base64 Ed25519, as in priv_validator_key.json
    node_id: str
    organization: dict[str, Any]  # the organization as a genesis app_state entry would hold it


@dataclass(frozen=True)
class NodeStatus:
    """What a node reports about itself; fields are None when it cannot be asked."""

    name: str
    home: Path
    moniker: str
    running: bool  # the node's supervisor process is alive
    rpc_ok: bool = False
    node_id: str | None = None
    height: int | None = None
    app_hash: str | None = None
    latest_block_time: str | None = None
    catching_up: bool | None = None
    voting_power: int | None = None
    peers: int | None = None
    healthy: bool = False  # our API answered /health with 200
    errors: tuple[str, ...] = field(default=())


# -- CometBFT helpers ------------------------------------------------------------------------


def _run_cometbft(cometbft: Path, args: Sequence[str]) -> str:
    try:
        done = subprocess.run(
            [str(cometbft), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TestnetError(f"cannot run {cometbft} {' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        raise TestnetError(
            f"{cometbft} {' '.join(args)} failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-2000:]}"
        )
    return done.stdout


def _cometbft_init(cometbft: Path, node_home: Path) -> str:
    """Create a CometBFT home (node key, validator key, default config); its node id."""
    _run_cometbft(cometbft, ["init", "--home", str(node_home)])
    node_id = _run_cometbft(cometbft, ["show-node-id", "--home", str(node_home)]).strip()
    if len(node_id) != 40:
        raise TestnetError(f"unexpected node id from cometbft show-node-id: {node_id!r}")
    return node_id


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TestnetError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise TestnetError(f"{path} is not a JSON object")
    return value


def _validator_key(node_home: Path) -> tuple[str, str]:
    """The validator's (address, base64 Ed25519 public key) from priv_validator_key.json."""
    key = _read_json(node_home / "config" / "priv_validator_key.json")
    try:
        address = str(key["address"])
        pub_key = key["pub_key"]
        if pub_key["type"] != "tendermint/PubKeyEd25519":
            raise TestnetError(f"validator key of {node_home} is not Ed25519")
        value = str(pub_key["value"])
    except (KeyError, TypeError) as exc:
        raise TestnetError(f"malformed priv_validator_key.json in {node_home}") from exc
    if len(base64.b64decode(value)) != 32:
        raise TestnetError(f"validator key of {node_home} is not 32 bytes")
    return address, value


def _load_toml(path: Path) -> TOMLDocument:
    try:
        return tomlkit.parse(path.read_text(encoding="utf-8"))
    except Exception as exc:
        raise TestnetError(f"cannot read {path}: {exc}") from exc


def _save_toml(path: Path, document: TOMLDocument) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tomlkit.dumps(document), encoding="utf-8")
    os.replace(tmp, path)


def _table(document: TOMLDocument, name: str) -> Table:
    table = document.get(name)
    if not isinstance(table, Table):
        raise TestnetError(f"CometBFT config.toml has no [{name}] table")
    return table


def apply_tuning(document: TOMLDocument, tuning: CometTuning) -> None:
    """Write the network-wide settings of `tuning` into a CometBFT config.toml document."""
    document["log_level"] = tuning.log_level
    document["log_format"] = tuning.log_format
    # The application is a separate process reached over a socket (not gRPC, not built in).
    document["abci"] = "socket"
    # Never expose profiling; nobody on the LAN needs pprof on a health-records node.
    _table(document, "rpc")["pprof_laddr"] = ""
    _table(document, "rpc")["max_body_bytes"] = tuning.rpc_max_body_bytes
    p2p = _table(document, "p2p")
    p2p["addr_book_strict"] = tuning.addr_book_strict
    p2p["allow_duplicate_ip"] = tuning.allow_duplicate_ip
    p2p["send_rate"] = tuning.send_rate
    p2p["recv_rate"] = tuning.recv_rate
    p2p["persistent_peers_max_dial_period"] = tuning.persistent_peers_max_dial_period
    p2p["flush_throttle_timeout"] = tuning.flush_throttle_timeout
    mempool = _table(document, "mempool")
    mempool["recheck"] = tuning.recheck
    mempool["size"] = tuning.mempool_size
    mempool["max_txs_bytes"] = tuning.mempool_max_txs_bytes
    mempool["cache_size"] = tuning.mempool_cache_size
    mempool["max_tx_bytes"] = tuning.max_tx_bytes
    consensus = _table(document, "consensus")
    consensus["timeout_commit"] = tuning.timeout_commit
    consensus["timeout_propose"] = tuning.timeout_propose
    consensus["create_empty_blocks"] = tuning.create_empty_blocks
    consensus["create_empty_blocks_interval"] = tuning.create_empty_blocks_interval
    _table(document, "tx_index")["indexer"] = tuning.indexer
    _table(document, "instrumentation")["prometheus"] = tuning.prometheus


def apply_node_settings(
    document: TOMLDocument, cfg: NodeConfig, ports: NodePorts, peers: Sequence[str]
) -> None:
    """Write one node's own settings (name, socket, listen addresses, peers) into config.toml."""
    document["moniker"] = cfg.moniker
    document["proxy_app"] = f"unix://{cfg.socket_path}"
    _table(document, "rpc")["laddr"] = f"tcp://127.0.0.1:{ports.rpc}"
    p2p = _table(document, "p2p")
    p2p["laddr"] = f"tcp://127.0.0.1:{ports.p2p}"
    p2p["external_address"] = ""
    p2p["persistent_peers"] = ",".join(peers)
    _table(document, "instrumentation")["prometheus_listen_addr"] = f"127.0.0.1:{ports.prometheus}"


def _set_peers(node_home: Path, peers: Sequence[str]) -> None:
    path = node_home / "config" / "config.toml"
    document = _load_toml(path)
    _table(document, "p2p")["persistent_peers"] = ",".join(peers)
    _save_toml(path, document)


def enable_state_sync(
    node_home: Path | str,
    rpc_servers: Sequence[str],
    trust_height: int,
    trust_hash: str,
    trust_period: str = "168h",
) -> None:
    """Make a new node join by state sync: at its first start CometBFT asks its peers for
    snapshots, verifies the header of the snapshot's height with its light client (from the
    trusted height and hash, through two RPC servers), and the application restores the
    snapshot's state only if it hashes to that header's app hash. Then it block-syncs the rest."""
    if len(rpc_servers) < 2:
        raise TestnetError("state sync needs at least two RPC servers to check headers against")
    path = Path(node_home) / "config" / "config.toml"
    document = _load_toml(path)
    statesync = _table(document, "statesync")
    statesync["enable"] = True
    statesync["rpc_servers"] = ",".join(rpc_servers)
    statesync["trust_height"] = trust_height
    statesync["trust_hash"] = trust_hash
    statesync["trust_period"] = trust_period
    _save_toml(path, document)


def write_snapshot_settings(node_home: Path | str, interval: int, keep: int = 2) -> None:
    """The `[snapshots]` table of a node's medledger.toml (see medledger.store.snapshots)."""
    path = Path(node_home) / "medledger.toml"
    document = _load_toml(path)
    table = tomlkit.table()
    table["interval"] = interval
    table["keep"] = keep
    document["snapshots"] = table
    _save_toml(path, document)


# -- manifest --------------------------------------------------------------------------------


def read_manifest(home: Path) -> Manifest:
    """HOME/testnet.toml; a directory without one is not a local network."""
    path = Path(home) / MANIFEST_FILE
    if not path.is_file():
        raise TestnetError(f"{home} is not a local network (no {MANIFEST_FILE})")
    document = _load_toml(path).unwrap()
    table = document.get("testnet")
    if not isinstance(table, dict):
        raise TestnetError(f"{path} has no [testnet] table")
    chain_id, base_port, nodes = table.get("chain_id"), table.get("base_port"), table.get("nodes")
    if (
        not isinstance(chain_id, str)
        or not isinstance(base_port, int)
        or not isinstance(nodes, list)
        or not all(isinstance(n, str) and n and "/" not in n for n in nodes)
    ):
        raise TestnetError(f"{path} is malformed (chain_id, base_port, nodes)")
    return Manifest(chain_id, base_port, tuple(nodes))


def _write_manifest(home: Path, manifest: Manifest) -> None:
    document = tomlkit.document()
    document.add(tomlkit.comment("medledger local network (written by init_testnet/add_node)"))
    table = tomlkit.table()
    table["chain_id"] = manifest.chain_id
    table["base_port"] = manifest.base_port
    table["port_stride"] = PORT_STRIDE
    table["nodes"] = list(manifest.nodes)
    document["testnet"] = table
    _save_toml(home / MANIFEST_FILE, document)


def node_homes(home: Path) -> list[Path]:
    """The node home directories of the local network at HOME, in node order."""
    home = Path(home).expanduser().resolve()
    return [home / name for name in read_manifest(home).nodes]


# -- creating a network ----------------------------------------------------------------------


def _organization_sample(index: int) -> tuple[str, str]:
    if index < len(SAMPLE_ORGANIZATIONS):
        return SAMPLE_ORGANIZATIONS[index]
    return f"Member Organization {index + 1}", _GENERIC_KINDS[index % len(_GENERIC_KINDS)]


def _check_socket_path(cfg: NodeConfig) -> None:
    if len(os.fsencode(str(cfg.socket_path))) > MAX_SOCKET_PATH_BYTES:
        raise TestnetError(
            f"node directory {cfg.home} is too deep: its ABCI socket path would exceed "
            f"{MAX_SOCKET_PATH_BYTES} bytes; choose a shorter network directory"
        )


def _write_keystores(cfg: NodeConfig, passphrase: str, fast_kdf: bool) -> tuple[KeyPair, KeyPair]:
    """The organization admin's keys and the node's encryption key, sealed in HOME/keys."""
    cfg.keys_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    admin = KeyPair.generate()
    node = KeyPair.generate()
    save_keystore(
        cfg.keys_dir / f"{ADMIN_KEYSTORE}.json", ADMIN_KEYSTORE, admin, passphrase, fast=fast_kdf
    )
    save_keystore(
        cfg.keys_dir / f"{NODE_KEYSTORE}.json", NODE_KEYSTORE, node, passphrase, fast=fast_kdf
    )
    return admin, node


def _organization_entry(
    org_id: str, name: str, kind: str, admin: KeyPair, node: KeyPair, pub_key: str, power: int
) -> dict[str, Any]:
    return {
        "id": org_id,
        "name": name,
        "kind": kind,
        "admin": {
            "verify_key": admin.verify_key.hex(),
            "encryption_key": admin.encryption_key.hex(),
        },
        "node_encryption_key": node.encryption_key.hex(),
        "node_verify_key": node.verify_key.hex(),
        "validator": {"pub_key": pub_key, "power": power},
    }


def _genesis_time() -> str:
    now = dt.datetime.now(dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_ports(base_port: int, count: int) -> None:
    last = base_port + count * PORT_STRIDE - 1
    if base_port < 1024 or last > 65535:
        raise TestnetError(
            f"ports {base_port}..{last} needed for {count} node(s) are outside 1024..65535"
        )


def _node_config(home: Path, index: int, chain_id: str, base_port: int) -> NodeConfig:
    ports = NodePorts.for_index(base_port, index)
    return NodeConfig(
        home=home / f"node{index}",
        moniker=f"node{index}",
        chain_id=chain_id,
        abci_socket="abci.sock",
        api_listen=f"127.0.0.1:{ports.api}",
        cometbft_rpc=f"http://127.0.0.1:{ports.rpc}",
        organization=f"org-{index + 1}",
    )


def init_testnet(
    home: Path | str,
    validators: int = 4,
    chain_id: str = DEFAULT_CHAIN_ID,
    *,
    passphrase: str,
    base_port: int = DEFAULT_BASE_PORT,
    fast_kdf: bool = False,
    tuning: CometTuning | None = None,
) -> list[NodeConfig]:
    """Create a local network of `validators` nodes under HOME, one founding organization per
    node, all sharing one genesis; the node configurations in node order.

    Every organization's admin keys and node encryption key are sealed under `passphrase`
    (`fast_kdf`: minimum Argon2id cost, for tests only). Nothing is started.
    """
    home = Path(home).expanduser().resolve()
    tuning = tuning or CometTuning()
    if validators < 1:
        raise TestnetError("a network needs at least one validator")
    if not passphrase:
        raise TestnetError("the keystore passphrase must not be empty")
    if tuning.block_max_bytes < tuning.max_tx_bytes:
        raise TestnetError("block_max_bytes must be at least max_tx_bytes")
    _check_ports(base_port, validators)
    configs = [_node_config(home, i, chain_id, base_port) for i in range(validators)]
    for cfg in configs:
        _check_socket_path(cfg)
    if (home / MANIFEST_FILE).exists() or any(cfg.home.exists() for cfg in configs):
        raise TestnetError(f"{home} already holds a network; choose an empty directory")
    cometbft = find_cometbft()
    home.mkdir(parents=True, exist_ok=True)
    try:
        _init_nodes(home, configs, chain_id, base_port, passphrase, fast_kdf, tuning, cometbft)
    except BaseException:
        for cfg in configs:
            shutil.rmtree(cfg.home, ignore_errors=True)
        (home / MANIFEST_FILE).unlink(missing_ok=True)
        raise
    return configs


def _init_nodes(
    home: Path,
    configs: list[NodeConfig],
    chain_id: str,
    base_port: int,
    passphrase: str,
    fast_kdf: bool,
    tuning: CometTuning,
    cometbft: Path,
) -> None:
    node_ids = [_cometbft_init(cometbft, cfg.home) for cfg in configs]
    organizations: list[dict[str, Any]] = []
    genesis_validators: list[dict[str, Any]] = []
    for index, cfg in enumerate(configs):
        name, kind = _organization_sample(index)
        address, pub_key = _validator_key(cfg.home)
        admin, node = _write_keystores(cfg, passphrase, fast_kdf)
        organizations.append(
            _organization_entry(cfg.organization, name, kind, admin, node, pub_key, VALIDATOR_POWER)
        )
        genesis_validators.append(
            {
                "address": address,
                "pub_key": {"type": "tendermint/PubKeyEd25519", "value": pub_key},
                "power": str(VALIDATOR_POWER),
                "name": name,
            }
        )

    genesis = _read_json(configs[0].genesis_path)
    genesis["genesis_time"] = _genesis_time()
    genesis["chain_id"] = chain_id
    genesis["initial_height"] = "1"
    genesis["consensus_params"]["block"]["max_bytes"] = str(tuning.block_max_bytes)
    genesis["validators"] = genesis_validators
    genesis["app_hash"] = ""
    genesis["app_state"] = {"params": {}, "organizations": organizations}
    genesis_bytes = (json.dumps(genesis, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    for index, cfg in enumerate(configs):
        ports = NodePorts.for_index(base_port, index)
        peers = [
            f"{node_ids[j]}@127.0.0.1:{NodePorts.for_index(base_port, j).p2p}"
            for j in range(len(configs))
            if j != index
        ]
        cfg.genesis_path.write_bytes(genesis_bytes)
        path = cfg.cometbft_config_dir / "config.toml"
        document = _load_toml(path)
        apply_tuning(document, tuning)
        apply_node_settings(document, cfg, ports, peers)
        _save_toml(path, document)
        for directory in (cfg.log_dir, cfg.state_dir):
            directory.mkdir(parents=True, exist_ok=True)
        write_node_config(cfg)
    _write_peer_apis(configs, passphrase)
    _write_manifest(home, Manifest(chain_id, base_port, tuple(cfg.home.name for cfg in configs)))


def _write_peer_apis(configs: Sequence[NodeConfig], passphrase: str) -> None:
    """Each node's [peers] table (the other organizations' node APIs, for package replication)
    and the file that lets the node unlock its own keys unattended."""
    for cfg in configs:
        peers = {o.organization: o.api_url for o in configs if o.home != cfg.home}
        write_services_config(cfg.home, peers, passphrase)


def add_node(
    home: Path | str,
    passphrase: str,
    *,
    name: str | None = None,
    kind: str | None = None,
    power: int = VALIDATOR_POWER,
    fast_kdf: bool = False,
) -> AddedNode:
    """Add one node to the local network at HOME: a new organization's node with its own keys,
    the network's genesis and tuning (copied from node0), every existing node as a persistent
    peer (and it as theirs). It is not a validator until a governance vote adds its validator
    key (`AddedNode.validator_pub_key`, with `power`); until then it follows the chain."""
    home = Path(home).expanduser().resolve()
    manifest = read_manifest(home)
    index = len(manifest.nodes)
    if not manifest.nodes:
        raise TestnetError(f"{home} has no nodes to copy the genesis from")
    _check_ports(manifest.base_port, index + 1)
    sample_name, sample_kind = _organization_sample(index)
    name = name or sample_name
    kind = kind or sample_kind
    if kind not in ORGANIZATION_KINDS:
        raise TestnetError(f"unknown organization kind {kind!r}")
    cfg = _node_config(home, index, manifest.chain_id, manifest.base_port)
    _check_socket_path(cfg)
    if cfg.home.exists():
        raise TestnetError(f"{cfg.home} already exists")
    existing = [home / node for node in manifest.nodes]
    cometbft = find_cometbft()
    try:
        node_id = _cometbft_init(cometbft, cfg.home)
        peer_ids = [
            _run_cometbft(cometbft, ["show-node-id", "--home", str(node_home)]).strip()
            for node_home in existing
        ]
        peers = [
            f"{peer_id}@127.0.0.1:{NodePorts.for_index(manifest.base_port, j).p2p}"
            for j, peer_id in enumerate(peer_ids)
        ]
        _, pub_key = _validator_key(cfg.home)
        admin, node = _write_keystores(cfg, passphrase, fast_kdf)
        shutil.copyfile(existing[0] / "config" / "genesis.json", cfg.genesis_path)
        # node0's config.toml carries the network's tuning; only this node's own settings
        # (name, socket, addresses, peers) differ.
        document = _load_toml(existing[0] / "config" / "config.toml")
        apply_node_settings(document, cfg, NodePorts.for_index(manifest.base_port, index), peers)
        _save_toml(cfg.cometbft_config_dir / "config.toml", document)
        for directory in (cfg.log_dir, cfg.state_dir):
            directory.mkdir(parents=True, exist_ok=True)
        write_node_config(cfg)
    except BaseException:
        shutil.rmtree(cfg.home, ignore_errors=True)
        raise
    _write_peer_apis([*(load_node_config(h) for h in existing), cfg], passphrase)
    new_peer = f"{node_id}@127.0.0.1:{NodePorts.for_index(manifest.base_port, index).p2p}"
    for j, node_home in enumerate(existing):
        others = [peer for k, peer in enumerate(peers) if k != j]
        _set_peers(node_home, [*others, new_peer])
    _write_manifest(
        home, Manifest(manifest.chain_id, manifest.base_port, (*manifest.nodes, cfg.home.name))
    )
    organization = _organization_entry(cfg.organization, name, kind, admin, node, pub_key, power)
    return AddedNode(cfg, pub_key, node_id, organization)


# -- running a network -----------------------------------------------------------------------


def default_node_command(node_home: Path) -> list[str]:
    """The command that runs one supervised node: `medledger node run --home NODE`."""
    return [sys.executable, "-m", "medledger.cli.main", "node", "run", "--home", str(node_home)]


def _supervisor_pid(node_home: Path) -> int | None:
    """The pid of the live supervisor of `node_home`, if any."""
    pid = read_pid_file(node_home / "node.pid")
    if pid is None or not pid_alive(pid):
        return None
    if cmdline_contains(pid, "medledger") or cmdline_has_arg(pid, str(node_home)):
        return pid
    return None


def node_up(
    node_home: Path | str, *, command: Callable[[Path], Sequence[str]] | None = None
) -> int:
    """Start one node's supervisor in the background (its own session, output appended to
    NODE/logs/node.log); its pid. A node already running is left alone."""
    node_home = Path(node_home).expanduser().resolve()
    cfg = load_node_config(node_home)
    running = _supervisor_pid(cfg.home)
    if running is not None:
        return running
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    argv = list((command or default_node_command)(cfg.home))
    with open(cfg.log_dir / NODE_LOG, "ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=cfg.home,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # The supervisor writes node.pid itself; writing it here too means a `testnet_down` that
    # follows at once still finds it.
    write_pid_file(cfg.node_pid_file, proc.pid)
    return proc.pid


def testnet_up(
    home: Path | str,
    *,
    nodes: Iterable[str] | None = None,
    command: Callable[[Path], Sequence[str]] | None = None,
) -> list[int]:
    """Start every node of the local network (or the named ones) in the background; their
    supervisor pids. Use `wait_for_height` to wait until the chain runs."""
    homes = _select(home, nodes)
    return [node_up(node_home, command=command) for node_home in homes]


def _select(home: Path | str, nodes: Iterable[str] | None) -> list[Path]:
    homes = node_homes(Path(home))
    if nodes is None:
        return homes
    by_name = {node_home.name: node_home for node_home in homes}
    selected = []
    for name in nodes:
        if name not in by_name:
            raise TestnetError(f"no node {name!r} in {home} (nodes: {', '.join(by_name)})")
        selected.append(by_name[name])
    return selected


def _stop_leftovers(node_home: Path, timeout: float) -> None:
    """Stop an application or CometBFT process of this node that outlived its supervisor."""
    for pid_name in ("cometbft.pid", "app.pid"):
        pid_file = node_home / pid_name
        pid = read_pid_file(pid_file)
        if pid is not None and pid_alive(pid) and cmdline_has_arg(pid, str(node_home)):
            terminate_pid(pid, timeout)
        remove_pid_file(pid_file)


def node_down(node_home: Path | str, *, timeout: float = 30.0) -> bool:
    """Stop one node: SIGTERM to its supervisor (which stops CometBFT, then the application),
    SIGKILL after `timeout`, then any child left behind; True when it was running."""
    return bool(_down([Path(node_home).expanduser().resolve()], timeout))


def testnet_down(
    home: Path | str, *, nodes: Iterable[str] | None = None, timeout: float = 30.0
) -> list[str]:
    """Stop every node of the local network (or the named ones), all at once; the names of the
    nodes that were running."""
    return _down(_select(home, nodes), timeout)


def _down(homes: list[Path], timeout: float) -> list[str]:
    signalled: list[tuple[Path, int]] = []
    for node_home in homes:
        pid = _supervisor_pid(node_home)
        if pid is not None and send_signal(pid, signal.SIGTERM):
            signalled.append((node_home, pid))
    deadline = time.monotonic() + timeout
    for _node_home, pid in signalled:
        if not wait_dead(pid, max(0.0, deadline - time.monotonic())):
            send_signal(pid, signal.SIGKILL)
            wait_dead(pid, 5.0)
    for node_home in homes:
        _stop_leftovers(node_home, 10.0)
        remove_pid_file(node_home / "node.pid")
    return [node_home.name for node_home, _pid in signalled]


# -- inspecting a network --------------------------------------------------------------------


def _rpc_result(client: httpx.Client, base: str, method: str) -> dict[str, Any]:
    response = client.get(f"{base.rstrip('/')}/{method}")
    response.raise_for_status()
    body = response.json()
    result = body.get("result") if isinstance(body, dict) else None
    if not isinstance(result, dict):
        raise ValueError(f"/{method}: no result in response")
    return result


def _int_or_none(value: Any) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def node_status(node_home: Path | str, *, timeout: float = 2.0) -> NodeStatus:
    """Ask one node's CometBFT RPC (/status, /net_info) and our API (/health); a node that is
    down yields a status with `rpc_ok` and `healthy` false and the errors met."""
    node_home = Path(node_home).expanduser().resolve()
    cfg = load_node_config(node_home)
    errors: list[str] = []
    values: dict[str, Any] = {}
    with httpx.Client(timeout=timeout) as client:
        try:
            status = _rpc_result(client, cfg.cometbft_rpc, "status")
            sync = status.get("sync_info", {})
            values.update(
                rpc_ok=True,
                node_id=status.get("node_info", {}).get("id"),
                height=_int_or_none(sync.get("latest_block_height")),
                app_hash=sync.get("latest_app_hash"),
                latest_block_time=sync.get("latest_block_time"),
                catching_up=sync.get("catching_up"),
                voting_power=_int_or_none(status.get("validator_info", {}).get("voting_power")),
            )
            net_info = _rpc_result(client, cfg.cometbft_rpc, "net_info")
            values["peers"] = _int_or_none(net_info.get("n_peers"))
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            errors.append(f"cometbft rpc: {exc}")
        try:
            response = client.get(f"{cfg.api_url}/health")
            values["healthy"] = response.status_code == 200
            if response.status_code != 200:
                errors.append(f"api /health: HTTP {response.status_code}")
        except httpx.HTTPError as exc:
            errors.append(f"api /health: {exc}")
    return NodeStatus(
        name=node_home.name,
        home=node_home,
        moniker=cfg.moniker,
        running=_supervisor_pid(node_home) is not None,
        errors=tuple(errors),
        **values,
    )


def testnet_status(home: Path | str, *, timeout: float = 2.0) -> list[NodeStatus]:
    """The status of every node of the local network, in node order, down nodes included."""
    return [node_status(node_home, timeout=timeout) for node_home in node_homes(Path(home))]


def _log_tail(node_home: Path, lines: int = 20) -> str:
    try:
        text = (node_home / "logs" / NODE_LOG).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no node.log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_for_height(
    home: Path | str,
    height: int,
    *,
    timeout: float = 60.0,
    nodes: Iterable[str] | None = None,
    poll: float = 0.5,
) -> list[NodeStatus]:
    """Wait until every selected node reports a block height of at least `height`; their
    statuses. On timeout, a `TestnetError` says which nodes lag and shows the tail of the log
    of any whose supervisor died."""
    homes = _select(home, nodes)
    deadline = time.monotonic() + timeout
    while True:
        statuses = [node_status(node_home) for node_home in homes]
        if all(s.height is not None and s.height >= height for s in statuses):
            return statuses
        if time.monotonic() >= deadline:
            lines = [f"nodes did not reach height {height} within {timeout}s:"]
            for s in statuses:
                lines.append(f"  {s.name}: height={s.height} running={s.running} {s.errors}")
                if not s.running:
                    lines.append(_log_tail(s.home))
            raise TestnetError("\n".join(lines))
        time.sleep(poll)


# pytest collects module-level callables named test*; these are tools, not tests, also when a
# test module imports them by name.
for _tool in (testnet_up, testnet_down, testnet_status):
    _tool.__test__ = False  # type: ignore[union-attr]

__all__ = [
    "AddedNode",
    "CometTuning",
    "ConfigError",
    "Manifest",
    "NodePorts",
    "NodeStatus",
    "TestnetError",
    "add_node",
    "apply_node_settings",
    "apply_tuning",
    "default_node_command",
    "init_testnet",
    "node_down",
    "node_homes",
    "node_status",
    "node_up",
    "read_manifest",
    "testnet_down",
    "testnet_status",
    "testnet_up",
    "wait_for_height",
]
