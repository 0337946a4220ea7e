"""Support for end-to-end tests: one real local network of CometBFT validators and ledger
application processes per test module, with the founding organizations' admin keys unlocked,
and helpers that poll the nodes' RPCs with deadlines.

This is a plain module, not a conftest.py: tests/ has no packages, so every conftest.py is
imported as the one module `conftest`, and a second one would shadow tests/conftest.py for the
test modules that import from it. A test module makes its own module-scoped fixture from
`running_network`, on a block of ports of its own."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from medledger.client.sdk import LedgerClient
from medledger.client.tx import sign_transaction
from medledger.config import NodeConfig, load_node_config
from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import load_keystore
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.node.testnet import (
    PORT_STRIDE,
    init_testnet,
    node_homes,
    read_manifest,
    testnet_down,
    testnet_up,
    wait_for_height,
)

PASSPHRASE = "e2e network passphrase"
CHAIN_ID = "medledger-e2e"
# Room for the founding validators plus the nodes a module adds later.
MAX_NODES = 5


def ports_free(base_port: int, nodes: int = MAX_NODES) -> bool:
    for port in range(base_port, base_port + nodes * PORT_STRIDE):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As CometBFT and aiohttp do: connections of a previous run in TIME_WAIT do not
            # keep a listener from binding.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def choose_ports(preferred: int, nodes: int = MAX_NODES) -> int:
    """The module's own port block, or another free one when something else holds it (a
    second test run on the same machine, say)."""
    if ports_free(preferred, nodes):
        return preferred
    for base in range(30000, 60000, 500):
        if ports_free(base, nodes):
            return base
    pytest.fail("no free block of ports on 127.0.0.1")


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2
) -> Any:
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def rpc_result(cfg: NodeConfig, method: str, **params: Any) -> dict[str, Any]:
    response = httpx.get(f"{cfg.cometbft_rpc}/{method}", params=params, timeout=5)
    response.raise_for_status()
    body = response.json()
    if "error" in body:
        raise RuntimeError(f"{cfg.moniker} /{method}: {body['error']}")
    result = body["result"]
    assert isinstance(result, dict)
    return result


def height_of(cfg: NodeConfig) -> int | None:
    """The node's latest committed height, or None when its RPC does not answer."""
    try:
        status = rpc_result(cfg, "status")
    except (httpx.HTTPError, RuntimeError, ValueError):
        return None
    return int(status["sync_info"]["latest_block_height"])


def header_app_hash(cfg: NodeConfig, height: int) -> str:
    """The app hash in the header of block `height` (the state after block height - 1)."""
    result = rpc_result(cfg, "commit", height=height)
    value = result["signed_header"]["header"]["app_hash"]
    assert isinstance(value, str)
    return value


def services_counters(cfg: NodeConfig) -> dict[str, float]:
    """What the node's own services (FHIR, HL7, portal) asked, from its Prometheus metrics:
    `rpc:<method>` for CometBFT RPC calls, `query:<path>` for ledger queries answered
    in-process."""
    text = httpx.get(f"{cfg.api_url}/metrics", timeout=10).text
    counters: dict[str, float] = {}
    for line in text.splitlines():
        for metric, kind in (
            ("medledger_services_rpc_calls_total", "rpc"),
            ("medledger_services_queries_total", "query"),
        ):
            if line.startswith(metric + "{"):
                label = line.split('"')[1]
                counters[f"{kind}:{label}"] = float(line.rsplit(" ", 1)[1])
    return counters


def assert_own_state_read_in_process(before: dict[str, float], after: dict[str, float]) -> None:
    """Between two readings of `services_counters`: the services read ledger state in-process
    and called CometBFT's RPC for nothing but submitting transactions (and the signed headers
    and validator sets that proofs are checked against)."""
    grown = {k: v - before.get(k, 0.0) for k, v in after.items() if v > before.get(k, 0.0)}
    rpc = {k: v for k, v in grown.items() if k.startswith("rpc:")}
    assert set(rpc) <= {"rpc:broadcast_tx_sync", "rpc:commit", "rpc:validators"}, rpc
    assert any(k.startswith("query:") for k in grown), grown


def log_tail(cfg: NodeConfig, name: str = "node.log", lines: int = 30) -> str:
    try:
        text = (cfg.log_dir / name).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no {name})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Network:
    """A running local network: its nodes' configurations, the founding organizations' admin
    keys (node order) and one SDK client per node."""

    home: Path
    configs: list[NodeConfig]
    admins: list[KeyPair]
    chain_id: str
    _clients: dict[str, LedgerClient] = field(default_factory=dict)

    def client(self, index: int) -> LedgerClient:
        cfg = self.configs[index]
        if cfg.moniker not in self._clients:
            self._clients[cfg.moniker] = LedgerClient(cfg.cometbft_rpc, self.chain_id)
        return self._clients[cfg.moniker]

    def names(self, indexes: list[int] | None = None) -> list[str]:
        chosen = range(len(self.configs)) if indexes is None else indexes
        return [self.configs[i].moniker for i in chosen]

    def refresh(self) -> None:
        """Pick up nodes added to the manifest since the fixture started."""
        self.configs = [load_node_config(h) for h in node_homes(self.home)]

    def heights(self, indexes: list[int] | None = None) -> dict[int, int | None]:
        chosen = range(len(self.configs)) if indexes is None else indexes
        return {i: height_of(self.configs[i]) for i in chosen}

    def wait_all_at(
        self, height: int, indexes: list[int] | None = None, timeout: float = 90
    ) -> None:
        """Wait until every chosen node has committed `height`; the failure names the laggards
        and shows the end of their logs."""
        try:
            wait_for_height(self.home, height, timeout=timeout, nodes=self.names(indexes))
        except Exception as exc:
            tails = "\n".join(
                f"--- {self.configs[i].moniker} node.log ---\n{log_tail(self.configs[i])}"
                for i in (range(len(self.configs)) if indexes is None else indexes)
            )
            raise AssertionError(f"{exc}\n{tails}") from None

    def app_hashes_at(self, height: int, indexes: list[int] | None = None) -> dict[int, str]:
        chosen = range(len(self.configs)) if indexes is None else indexes
        return {i: header_app_hash(self.configs[i], height) for i in chosen}

    def assert_same_app_hash(self, height: int, indexes: list[int] | None = None) -> str:
        hashes = self.app_hashes_at(height, indexes)
        assert len(set(hashes.values())) == 1, f"app hashes differ at height {height}: {hashes}"
        return next(iter(hashes.values()))

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


def enroll_tx(admin: KeyPair, chain_id: str, nonce: int, keys: KeyPair, role: Role) -> bytes:
    """A signed `member.enroll` of `keys` by an organization admin."""
    body = EnrollMember(keys.verify_key, keys.encryption_key, role)
    return sign_transaction(admin, chain_id, nonce, "member.enroll", body)


class TxStream:
    """A steady stream of transactions: `count` patient enrollments by one admin, broadcast
    through one node from a background thread every `interval` seconds with consecutive
    nonces, without waiting for them to commit. Use it as a context manager; on exit the
    thread has ended, and `errors` holds what it failed with."""

    def __init__(
        self, network: Network, admin: int, node: int, count: int, interval: float = 0.2
    ) -> None:
        self.network = network
        self.admin = network.admins[admin]
        self.rpc_url = network.configs[node].cometbft_rpc
        self.keys = [KeyPair.generate() for _ in range(count)]
        self.interval = interval
        self.hashes: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, name="tx-stream", daemon=True)

    def _send(self) -> None:
        chain_id = self.network.chain_id
        try:
            with LedgerClient(self.rpc_url, chain_id) as client:
                nonce = client.next_nonce(self.admin.member_id)
                for keys in self.keys:
                    if self._stop.is_set():
                        return
                    raw = enroll_tx(self.admin, chain_id, nonce, keys, Role.PATIENT)
                    self.hashes.append(client.broadcast(raw))
                    nonce += 1
                    self._stop.wait(self.interval)
        except BaseException as exc:
            self.errors.append(exc)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> TxStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the transaction stream did not end"


def start_network(home: Path, base_port: int, validators: int = 4) -> Network:
    base_port = choose_ports(base_port)
    init_testnet(
        home, validators, CHAIN_ID, passphrase=PASSPHRASE, base_port=base_port, fast_kdf=True
    )
    manifest = read_manifest(home)
    configs = [load_node_config(h) for h in node_homes(home)]
    admins = [load_keystore(cfg.keys_dir / "admin.json", PASSPHRASE) for cfg in configs]
    assert manifest.chain_id == CHAIN_ID
    network = Network(home, configs, admins, CHAIN_ID)
    testnet_up(home)
    network.wait_all_at(2, timeout=120)
    return network


@contextlib.contextmanager
def running_network(home: Path, base_port: int) -> Iterator[Network]:
    """A 4-validator network in `home` on ports from `base_port`, stopped on exit whatever
    happened (also when starting it failed half-way)."""
    network: Network | None = None
    try:
        network = start_network(home, base_port)
        yield network
    finally:
        if network is not None:
            network.close()
        if (home / "testnet.toml").exists():
            testnet_down(home, timeout=20)
