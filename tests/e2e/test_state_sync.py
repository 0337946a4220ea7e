"""State sync and restarts on a real network: four validators take snapshots every few blocks;
a fifth organization, admitted by governance, joins well above genesis by state sync instead of
replaying every block, ends with the same app hash as the others, and receives the packages of
the records written before it joined through replication. Then every node is stopped under load
and started again, and no committed transaction is lost."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medledger.client.records import RecordsClient
from medledger.client.sdk import QueryError
from medledger.config import load_node_config
from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import load_keystore
from medledger.ledger.model import OrganizationKind, Role
from medledger.ledger.transactions import AddOrganization, AdminKeys, EnrollMember, Propose, Vote
from medledger.node.testnet import (
    add_node,
    enable_state_sync,
    init_testnet,
    node_homes,
    read_manifest,
    testnet_down,
    testnet_up,
    write_snapshot_settings,
)
from medledger.samples.fhir import generate_patient_record_set

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_network import (
    CHAIN_ID,
    PASSPHRASE,
    Network,
    TxStream,
    choose_ports,
    rpc_result,
    wait_until,
)

pytestmark = pytest.mark.e2e

BASE_PORT = 32100
INTERVAL = 10


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    home = tmp_path_factory.mktemp("statesync") / "net"
    base_port = choose_ports(BASE_PORT)
    init_testnet(home, 4, CHAIN_ID, passphrase=PASSPHRASE, base_port=base_port, fast_kdf=True)
    for node_home in node_homes(home):
        write_snapshot_settings(node_home, INTERVAL, keep=2)
    configs = [load_node_config(h) for h in node_homes(home)]
    admins = [load_keystore(cfg.keys_dir / "admin.json", PASSPHRASE) for cfg in configs]
    assert read_manifest(home).chain_id == CHAIN_ID
    net = Network(home, configs, admins, CHAIN_ID)
    try:
        testnet_up(home)
        net.wait_all_at(2, timeout=120)
        yield net
    finally:
        net.close()
        testnet_down(home)


def observation(patient: KeyPair, author: KeyPair) -> dict[str, Any]:
    resources = generate_patient_record_set(
        7,
        f"Patient/{patient.member_id}",
        f"Practitioner/{author.member_id}",
        when="2026-11-01T09:00:00Z",
        count=12,
    )
    return next(r for r in resources if r["resourceType"] == "Observation")


def test_a_new_member_joins_by_state_sync_well_above_genesis(network: Network) -> None:
    client = network.client(0)
    patient, author = KeyPair.generate(), KeyPair.generate()
    for keys, role in ((patient, Role.PATIENT), (author, Role.CLINICIAN)):
        body = EnrollMember(keys.verify_key, keys.encryption_key, role)
        client.submit(network.admins[0], "member.enroll", body)
    records = RecordsClient(client, network.configs[0].api_url, author)
    try:
        written = records.put(observation(patient, author), patient.member_id)
    finally:
        records.close()

    added = add_node(network.home, PASSPHRASE, fast_kdf=True)
    org = added.organization
    admit = AddOrganization(
        org["id"],
        org["name"],
        OrganizationKind(org["kind"]),
        AdminKeys(
            bytes.fromhex(org["admin"]["verify_key"]),
            bytes.fromhex(org["admin"]["encryption_key"]),
        ),
        bytes.fromhex(org["node_encryption_key"]),
        bytes.fromhex(org["node_verify_key"]),
    )
    proposed = client.submit(network.admins[0], "gov.propose", Propose(admit, reason="joins"))
    number = int(proposed.log.split()[1])
    client.submit(network.admins[1], "gov.vote", Vote(number, True))
    assert "passed" in client.submit(network.admins[2], "gov.vote", Vote(number, True)).log

    # A snapshot well above genesis, on the founders' nodes.
    target = 3 * INTERVAL
    network.wait_all_at(target + 2, indexes=[0, 1, 2, 3], timeout=240)
    founders = network.configs[:4]
    trust_height = target
    trust_hash = rpc_result(founders[0], "commit", height=trust_height)["signed_header"]["commit"][
        "block_id"
    ]["hash"]
    enable_state_sync(
        added.config.home,
        [founders[0].cometbft_rpc, founders[1].cometbft_rpc],
        trust_height,
        trust_hash,
    )
    network.refresh()
    joiner = network.configs[4]
    testnet_up(network.home, nodes=[joiner.moniker])
    top = max(h for h in network.heights([0, 1, 2, 3]).values() if h is not None)
    network.wait_all_at(top + 1, indexes=[4], timeout=240)
    network.assert_same_app_hash(top + 1, indexes=[0, 1, 2, 3, 4])

    # It did not replay from genesis: it has no block below its snapshot, the founders do.
    joined = network.client(4)
    with pytest.raises(QueryError):
        joined.query("/block", "1")
    assert network.client(0).query("/block", "1")["height"] == 1
    assert "state restored from snapshot" in (joiner.log_dir / "app.log").read_text("utf-8")
    # The restored state answers like the others, and the packages arrive by replication.
    assert joined.query("/member", patient.member_id)["id"] == patient.member_id
    package = joiner.home / "packages" / written.digest[:2] / written.digest
    wait_until(package.exists, 90, "the record's package on the state-synced node")


def test_a_restart_of_every_node_under_load_loses_no_committed_transaction(
    network: Network,
) -> None:
    """Stop every node while transactions are still streaming in, start them again: every
    transaction that had committed is there, on every node, with one app hash."""
    committed: list[KeyPair] = []
    with TxStream(network, admin=1, node=1, count=400, interval=0.02) as stream:
        wait_until(lambda: len(stream.hashes) >= 60, 120, "sixty transactions broadcast")
        for keys, tx_hash in zip(stream.keys, list(stream.hashes), strict=False):
            with contextlib.suppress(Exception):
                if rpc_result(network.configs[0], "tx", hash="0x" + tx_hash)["tx_result"]:
                    committed.append(keys)
        assert len(committed) >= 20, "too few transactions committed before the stop"
        testnet_down(network.home)
    testnet_up(network.home)

    def every_height() -> int:
        heights = network.heights()
        return max(heights.values()) if None not in heights.values() else 0  # type: ignore[type-var]

    top = wait_until(every_height, 120, "every node's RPC after the restart")
    network.wait_all_at(top + 2, timeout=240)
    network.assert_same_app_hash(top + 2)
    for index in range(len(network.configs)):
        client = network.client(index)
        for keys in committed:
            assert client.query("/member", keys.member_id)["id"] == keys.member_id
