"""init_testnet writes N nodes sharing one genesis, with distinct ports, full-mesh peers, tuned
CometBFT settings and keystores that open with the passphrase; add_node grows the network."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from conftest import free_base_port

from medledger.config import NodeConfig, find_cometbft, load_node_config
from medledger.crypto.keystore import KeystoreError, load_keystore
from medledger.ledger.genesis import parse_app_state
from medledger.node.testnet import (
    SAMPLE_ORGANIZATIONS,
    AddedNode,
    CometTuning,
    TestnetError,
    add_node,
    init_testnet,
    node_homes,
    read_manifest,
)
from medledger.node.testnet import testnet_status as network_status

PASSPHRASE = "correct horse battery staple"
# Nothing listens here during these tests: the statuses of a stopped network are checked.
BASE_PORT = free_base_port(4)


def comet_config(node_home: Path) -> dict[str, Any]:
    path = node_home / "config" / "config.toml"
    return tomlkit.parse(path.read_text(encoding="utf-8")).unwrap()


def genesis(node_home: Path) -> dict[str, Any]:
    value = json.loads((node_home / "config" / "genesis.json").read_text(encoding="utf-8"))
    assert isinstance(value, dict)
    return value


def show_node_id(node_home: Path) -> str:
    return subprocess.run(
        [str(find_cometbft()), "show-node-id", "--home", str(node_home)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def validator_pub_key(node_home: Path) -> str:
    key = json.loads((node_home / "config" / "priv_validator_key.json").read_text("utf-8"))
    value = key["pub_key"]["value"]
    assert isinstance(value, str)
    return value


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[NodeConfig]]]:
    home = tmp_path_factory.mktemp("net")
    configs = init_testnet(home, 4, passphrase=PASSPHRASE, base_port=BASE_PORT, fast_kdf=True)
    yield home, configs


def test_four_nodes_with_their_configs(network: tuple[Path, list[NodeConfig]]) -> None:
    home, configs = network
    assert [cfg.home for cfg in configs] == [home / f"node{i}" for i in range(4)]
    assert node_homes(home) == [cfg.home for cfg in configs]
    manifest = read_manifest(home)
    assert manifest.nodes == ("node0", "node1", "node2", "node3")
    assert manifest.chain_id == "medledger-local"
    assert manifest.base_port == BASE_PORT
    for i, cfg in enumerate(configs):
        assert load_node_config(cfg.home) == cfg
        assert cfg.moniker == f"node{i}"
        assert cfg.organization == f"org-{i + 1}"
        assert cfg.chain_id == "medledger-local"
        for sub in ("config", "data", "keys", "logs", "app"):
            assert (cfg.home / sub).is_dir()


def test_one_identical_genesis(network: tuple[Path, list[NodeConfig]]) -> None:
    _, configs = network
    raw = {(cfg.home / "config" / "genesis.json").read_bytes() for cfg in configs}
    assert len(raw) == 1
    doc = genesis(configs[0].home)
    assert doc["chain_id"] == "medledger-local"
    assert doc["consensus_params"]["block"]["max_bytes"] == str(CometTuning().block_max_bytes)
    pub_keys = [validator_pub_key(cfg.home) for cfg in configs]
    assert [v["pub_key"]["value"] for v in doc["validators"]] == pub_keys
    assert all(v["power"] == "10" for v in doc["validators"])
    assert all(v["pub_key"]["type"] == "tendermint/PubKeyEd25519" for v in doc["validators"])
    assert [v["name"] for v in doc["validators"]] == [n for n, _ in SAMPLE_ORGANIZATIONS[:4]]


def test_app_state_lists_one_founding_organization_per_node(
    network: tuple[Path, list[NodeConfig]],
) -> None:
    _, configs = network
    app_state = genesis(configs[0].home)["app_state"]
    assert app_state["params"] == {}
    orgs = app_state["organizations"]
    assert [o["id"] for o in orgs] == ["org-1", "org-2", "org-3", "org-4"]
    assert [(o["name"], o["kind"]) for o in orgs] == list(SAMPLE_ORGANIZATIONS[:4])
    for org, cfg in zip(orgs, configs, strict=True):
        admin = load_keystore(cfg.keys_dir / "admin.json", PASSPHRASE)
        node = load_keystore(cfg.keys_dir / "node.json", PASSPHRASE)
        assert org["admin"] == {
            "verify_key": admin.verify_key.hex(),
            "encryption_key": admin.encryption_key.hex(),
        }
        assert org["node_encryption_key"] == node.encryption_key.hex()
        assert org["validator"] == {"pub_key": validator_pub_key(cfg.home), "power": 10}
        assert len(base64.b64decode(org["validator"]["pub_key"])) == 32
    # The ledger accepts it.
    parsed = parse_app_state(json.dumps(app_state).encode())
    assert len(parsed.organizations) == 4


def test_keystores_need_the_passphrase(network: tuple[Path, list[NodeConfig]]) -> None:
    _, configs = network
    path = configs[0].keys_dir / "admin.json"
    assert path.stat().st_mode & 0o077 == 0
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        load_keystore(path, "not the passphrase")


def test_distinct_ports_and_no_clashes(network: tuple[Path, list[NodeConfig]]) -> None:
    _, configs = network
    addresses: list[str] = []
    for cfg in configs:
        doc = comet_config(cfg.home)
        assert doc["rpc"]["laddr"].startswith("tcp://127.0.0.1:")
        assert doc["p2p"]["laddr"].startswith("tcp://127.0.0.1:")
        assert doc["rpc"]["pprof_laddr"] == ""
        assert doc["rpc"]["grpc_laddr"] == ""
        assert cfg.cometbft_rpc == doc["rpc"]["laddr"].replace("tcp://", "http://")
        addresses += [
            doc["rpc"]["laddr"].removeprefix("tcp://"),
            doc["p2p"]["laddr"].removeprefix("tcp://"),
            doc["instrumentation"]["prometheus_listen_addr"],
            cfg.api_listen,
        ]
    ports = [int(address.rsplit(":", 1)[1]) for address in addresses]
    assert len(set(ports)) == len(ports) == 16
    assert min(ports) == BASE_PORT


def test_full_mesh_of_persistent_peers(network: tuple[Path, list[NodeConfig]]) -> None:
    _, configs = network
    ids = [show_node_id(cfg.home) for cfg in configs]
    p2p = [comet_config(cfg.home)["p2p"]["laddr"].removeprefix("tcp://") for cfg in configs]
    for i, cfg in enumerate(configs):
        peers = comet_config(cfg.home)["p2p"]["persistent_peers"].split(",")
        expected = [f"{ids[j]}@{p2p[j]}" for j in range(4) if j != i]
        assert peers == expected


def test_cometbft_settings(network: tuple[Path, list[NodeConfig]]) -> None:
    _, configs = network
    for cfg in configs:
        doc = comet_config(cfg.home)
        assert doc["moniker"] == cfg.moniker
        assert doc["proxy_app"] == f"unix://{cfg.socket_path}"
        assert doc["abci"] == "socket"
        assert doc["log_format"] == "json"
        assert doc["p2p"]["addr_book_strict"] is False
        assert doc["p2p"]["allow_duplicate_ip"] is True
        assert doc["p2p"]["send_rate"] == doc["p2p"]["recv_rate"] == 20_000_000
        assert doc["consensus"]["timeout_commit"] == "500ms"
        assert doc["consensus"]["create_empty_blocks"] is True
        assert doc["consensus"]["create_empty_blocks_interval"] == "2s"
        assert doc["mempool"]["recheck"] is True
        assert doc["mempool"]["max_tx_bytes"] == 1024 * 1024
        assert doc["mempool"]["size"] == 10_000
        assert doc["rpc"]["max_body_bytes"] > doc["mempool"]["max_tx_bytes"] * 4 // 3
        assert doc["tx_index"]["indexer"] == "kv"
        assert doc["instrumentation"]["prometheus"] is False
        # CometBFT's own file is patched in place, comments and all.
        text = (cfg.home / "config" / "config.toml").read_text(encoding="utf-8")
        assert text.startswith("# This is a TOML config file.")


def test_status_tolerates_nodes_that_are_down(network: tuple[Path, list[NodeConfig]]) -> None:
    home, _ = network
    statuses = network_status(home, timeout=0.5)
    assert [s.name for s in statuses] == ["node0", "node1", "node2", "node3"]
    for s in statuses:
        assert not s.running and not s.rpc_ok and not s.healthy
        assert s.height is None and s.peers is None
        assert s.errors


def test_refuses_an_existing_network(network: tuple[Path, list[NodeConfig]]) -> None:
    home, _ = network
    with pytest.raises(TestnetError, match="already holds a network"):
        init_testnet(home, 4, passphrase=PASSPHRASE, base_port=27100, fast_kdf=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"validators": 0}, "at least one validator"),
        ({"validators": 2, "base_port": 65530}, "outside 1024..65535"),
        ({"validators": 2, "passphrase": ""}, "passphrase"),
    ],
)
def test_invalid_requests(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    options: dict[str, Any] = {"passphrase": PASSPHRASE, "fast_kdf": True, **kwargs}
    with pytest.raises(TestnetError, match=message):
        init_testnet(tmp_path / "net", **options)
    assert not (tmp_path / "net" / "node0").exists()


def test_single_validator_network_has_no_peers(tmp_path: Path) -> None:
    (cfg,) = init_testnet(tmp_path, 1, "solo-chain", passphrase=PASSPHRASE, fast_kdf=True)
    assert comet_config(cfg.home)["p2p"]["persistent_peers"] == ""
    assert genesis(cfg.home)["chain_id"] == "solo-chain"
    assert cfg.chain_id == "solo-chain"


def test_prometheus_on_request(tmp_path: Path) -> None:
    tuning = CometTuning(prometheus=True, timeout_commit="1s")
    (cfg,) = init_testnet(tmp_path, 1, passphrase=PASSPHRASE, fast_kdf=True, tuning=tuning)
    doc = comet_config(cfg.home)
    assert doc["instrumentation"]["prometheus"] is True
    assert doc["instrumentation"]["prometheus_listen_addr"] == "127.0.0.1:26603"
    assert doc["consensus"]["timeout_commit"] == "1s"


def test_add_node(tmp_path: Path) -> None:
    home = tmp_path / "net"
    configs = init_testnet(home, 4, passphrase=PASSPHRASE, base_port=27200, fast_kdf=True)
    added = add_node(home, PASSPHRASE, fast_kdf=True)
    assert isinstance(added, AddedNode)
    cfg = added.config
    assert cfg.home == home / "node4"
    assert cfg.organization == "org-5"
    assert load_node_config(cfg.home) == cfg
    assert read_manifest(home).nodes[-1] == "node4"
    # Same genesis, not a validator in it.
    genesis_bytes = (configs[0].home / "config" / "genesis.json").read_bytes()
    assert (cfg.home / "config" / "genesis.json").read_bytes() == genesis_bytes
    assert added.validator_pub_key == validator_pub_key(cfg.home)
    validators = [v["pub_key"]["value"] for v in genesis(cfg.home)["validators"]]
    assert added.validator_pub_key not in validators
    assert added.node_id == show_node_id(cfg.home)
    # Its peers are the four founders, and they now know it too.
    doc = comet_config(cfg.home)
    peers = doc["p2p"]["persistent_peers"].split(",")
    assert [peer.split("@")[0] for peer in peers] == [show_node_id(c.home) for c in configs]
    new_peer = f"{added.node_id}@127.0.0.1:27240"
    assert doc["p2p"]["laddr"] == "tcp://127.0.0.1:27240"
    for founder in configs:
        founder_peers = comet_config(founder.home)["p2p"]["persistent_peers"].split(",")
        assert founder_peers[-1] == new_peer
        assert len(founder_peers) == 4
    # Network tuning copied, own settings its own.
    assert doc["consensus"]["timeout_commit"] == "500ms"
    assert doc["moniker"] == "node4"
    assert doc["proxy_app"] == f"unix://{cfg.socket_path}"
    assert cfg.api_listen == "127.0.0.1:27242"
    # The organization, ready for a governance proposal.
    org = added.organization
    admin = load_keystore(cfg.keys_dir / "admin.json", PASSPHRASE)
    node = load_keystore(cfg.keys_dir / "node.json", PASSPHRASE)
    assert org["id"] == "org-5"
    assert org["admin"]["verify_key"] == admin.verify_key.hex()
    assert org["node_encryption_key"] == node.encryption_key.hex()
    assert org["validator"] == {"pub_key": added.validator_pub_key, "power": 10}
    assert org["kind"] in {"hospital", "clinic", "lab", "pharmacy", "insurer"}


def test_add_node_needs_a_network(tmp_path: Path) -> None:
    with pytest.raises(TestnetError, match="not a local network"):
        add_node(tmp_path, PASSPHRASE, fast_kdf=True)
