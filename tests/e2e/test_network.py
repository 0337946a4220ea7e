"""End to end over a real 4-validator network: CometBFT nodes and ledger application processes
started with testnet_up, driven only through the SDK, the node API and the CLI.

The tests share one network and run in file order: those that only read or send come first,
those that stop, kill or grow nodes come later and leave the network running for the next.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import pytest
from e2e_network import (
    PASSPHRASE,
    Network,
    TxStream,
    enroll_tx,
    height_of,
    rpc_result,
    running_network,
    wait_until,
)

from medledger.client.sdk import ClientError, LedgerClient, TxOutcome, TxRejected
from medledger.client.tx import sign_transaction
from medledger.crypto.keys import KeyPair, member_id_for
from medledger.crypto.keystore import load_keystore
from medledger.ledger import codec
from medledger.ledger.codec import Envelope
from medledger.ledger.errors import Code
from medledger.ledger.model import Member, OrganizationKind, Role, member_key
from medledger.ledger.transactions import (
    AddOrganization,
    AdminKeys,
    EnrollMember,
    Propose,
    SetValidator,
    Vote,
)
from medledger.node.procs import pid_alive, read_pid_file
from medledger.node.testnet import add_node, node_status, testnet_down, testnet_up
from medledger.node.verify import verify_node

pytestmark = pytest.mark.e2e

# This module's block of ports: 27100..27149 (five nodes of PORT_STRIDE ports each).
BASE_PORT = 27100

# How long a network without a 2/3 majority is watched for a commit that must not happen.
STALL_WATCH_S = 8.0


@dataclass(frozen=True)
class Enrolled:
    keys: KeyPair
    org: int  # index of the organization (and node) whose admin enrolled it
    role: Role
    raw: bytes
    tx_hash: str


def enroll_body(keys: KeyPair, role: Role = Role.PATIENT) -> EnrollMember:
    return EnrollMember(keys.verify_key, keys.encryption_key, role)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with running_network(tmp_path_factory.mktemp("net"), BASE_PORT) as network:
        yield network


@pytest.fixture(scope="module")
def enrolled(net: Network) -> list[Enrolled]:
    """Clinicians and patients enrolled by every founding organization's admin, each sent to
    that organization's own node, all in flight at once."""
    plan = [
        (0, Role.CLINICIAN),
        (1, Role.PATIENT),
        (2, Role.LAB),
        (3, Role.BILLING),
        (0, Role.PATIENT),
        (1, Role.CLINICIAN),
    ]
    nonces = {i: net.client(i).next_nonce(net.admins[i].member_id) for i in range(len(net.admins))}
    members = []
    for org, role in plan:
        keys = KeyPair.generate()
        raw = enroll_tx(net.admins[org], net.chain_id, nonces[org], keys, role)
        nonces[org] += 1
        tx_hash = net.client(org).broadcast(raw)
        members.append(Enrolled(keys, org, role, raw, tx_hash))
    return members


def members_list(client: LedgerClient) -> list[dict[str, object]]:
    value = client.query("/members")
    assert isinstance(value, list)
    return value


# -- 1. replication -------------------------------------------------------------------------


def test_transactions_commit_on_every_node_with_one_app_hash(
    net: Network, enrolled: list[Enrolled]
) -> None:
    heights = set()
    for member in enrolled:
        outcomes = [net.client(i).wait_for(member.tx_hash, timeout=60) for i in range(4)]
        assert all(o.ok for o in outcomes), outcomes
        # Every node committed it in the same block.
        assert len({o.height for o in outcomes}) == 1, outcomes
        heights.add(outcomes[0].height)
    last = max(heights)
    # The header of block last+1 carries the app hash after the enrollments.
    net.wait_all_at(last + 1)
    net.assert_same_app_hash(last + 1)
    common = min(h for h in net.heights().values() if h is not None)
    for height in range(1, common + 1):
        net.assert_same_app_hash(height)

    for i in range(4):
        for member in enrolled:
            answer = net.client(i).query("/member", member.keys.member_id)
            assert answer["organization"] == net.configs[member.org].organization
            assert answer["role"] == member.role.value
            assert answer["status"] == "active"


# -- 2. proofs ------------------------------------------------------------------------------


def test_proven_query_verifies_against_validator_signatures(
    net: Network, enrolled: list[Enrolled]
) -> None:
    member = enrolled[1]
    client = net.client(2)
    client.wait_for(member.tx_hash, timeout=60)
    proven = client.verified_state(member_key(member.keys.member_id))
    assert proven.value is not None
    stored = codec.decode(proven.value, Member)
    assert stored.id == member.keys.member_id
    assert stored.organization == net.configs[member.org].organization
    assert stored.verify_key == member.keys.verify_key
    header = proven.header
    assert header.chain_id == net.chain_id
    assert header.height == proven.height + 1
    assert header.total_power == 40  # four validators of power 10
    assert 3 * header.signed_power > 2 * header.total_power

    stranger = KeyPair.generate()
    absent = client.verified_state(member_key(stranger.member_id))
    assert absent.value is None
    assert 3 * absent.header.signed_power > 2 * absent.header.total_power


# -- 7. bad input ---------------------------------------------------------------------------


def expect_refusal(client: LedgerClient, raw: bytes, code: Code) -> TxRejected:
    with pytest.raises(TxRejected) as refused:
        client.broadcast(raw)
    assert refused.value.code == code, refused.value
    assert refused.value.height is None  # refused by CheckTx, never in a block
    return refused.value


def test_bad_input_is_refused_and_changes_nothing(net: Network, enrolled: list[Enrolled]) -> None:
    client = net.client(0)
    for member in enrolled:
        client.wait_for(member.tx_hash, timeout=60)
    admin = net.admins[0]
    before = members_list(client)
    nonce = client.next_nonce(admin.member_id)
    newcomer = KeyPair.generate()

    expect_refusal(client, b"\x93not a transaction", Code.MALFORMED)
    expect_refusal(client, b"", Code.MALFORMED)

    expect_refusal(
        client,
        enroll_tx(admin, "some-other-chain", nonce, newcomer, Role.PATIENT),
        Code.WRONG_CHAIN,
    )

    good = codec.decode(enroll_tx(admin, net.chain_id, nonce, newcomer, Role.PATIENT), Envelope)
    forged = bytearray(good.signature)
    forged[0] ^= 0x01
    bad_signature = codec.encode(msgspec.structs.replace(good, signature=bytes(forged)))
    expect_refusal(client, bad_signature, Code.BAD_SIGNATURE)
    # Signed by someone else in the admin's name.
    impostor = KeyPair.generate()
    expect_refusal(
        client,
        sign_transaction(
            impostor,
            net.chain_id,
            nonce,
            "member.enroll",
            enroll_body(newcomer),
            sender=admin.member_id,
        ),
        Code.BAD_SIGNATURE,
    )

    # A nonce the admin already used, on a new transaction ...
    expect_refusal(
        client, enroll_tx(admin, net.chain_id, nonce - 1, newcomer, Role.PATIENT), Code.BAD_NONCE
    )
    # ... and a committed transaction replayed byte for byte to a node (its own mempool cache
    # may already drop it as a duplicate; either way it is refused and not executed again).
    replayed = next(m for m in enrolled if m.org == 0)
    try:
        net.client(3).broadcast(replayed.raw)
    except TxRejected as exc:
        assert exc.code == Code.BAD_NONCE, exc
    except ClientError as exc:
        assert "already exists in cache" in str(exc), exc
    else:
        pytest.fail("a replayed transaction was accepted into the mempool")

    expect_refusal(
        client, enroll_tx(impostor, net.chain_id, 1, newcomer, Role.PATIENT), Code.UNKNOWN_SENDER
    )

    # Nothing changed: no member, no nonce used, not even after more blocks.
    height = client.height()
    net.wait_all_at(height + 2)
    assert members_list(client) == before
    assert client.next_nonce(admin.member_id) == nonce
    with pytest.raises(ClientError):
        client.query("/member", newcomer.member_id)
    # The replayed transaction is still the one result at its first height.
    first = client.tx_status(replayed.tx_hash)
    assert first is not None and first.ok and first.height < height


# -- 8. node API ----------------------------------------------------------------------------


def test_health_ready_and_metrics(net: Network, enrolled: list[Enrolled]) -> None:
    cfg = net.configs[0]
    net.client(0).wait_for(enrolled[0].tx_hash, timeout=60)
    with httpx.Client(base_url=cfg.api_url, timeout=5) as http:
        health = http.get("/health")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "ok"
        assert body["chain_id"] == net.chain_id
        assert body["height"] >= 1
        assert len(bytes.fromhex(body["app_hash"])) == 32

        ready = wait_until(
            lambda: (r := http.get("/ready")).status_code == 200 and r, 60, "node0 /ready"
        )
        assert ready.json()["ready"] is True

        text = http.get("/metrics").text
    height_line = re.search(r"^medledger_height (\S+)$", text, re.MULTILINE)
    assert height_line is not None and float(height_line.group(1)) >= 1
    enrolled_ok = [
        line
        for line in text.splitlines()
        if line.startswith("medledger_transactions_total{")
        and 'type="member.enroll"' in line
        and 'code="0"' in line
    ]
    assert len(enrolled_ok) == 1 and float(enrolled_ok[0].rsplit(" ", 1)[1]) >= 1, text
    assert re.search(r"^medledger_block_commit_seconds_count [1-9]", text, re.MULTILINE), text
    assert re.search(r"^medledger_block_commit_seconds_bucket\{le=", text, re.MULTILINE)
    assert re.search(r"^medledger_mempool_transactions \S+$", text, re.MULTILINE), text


# -- 9a. verify against the running network --------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medledger.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_cli_verify_against_signed_headers(net: Network, enrolled: list[Enrolled]) -> None:
    cfg = net.configs[0]
    net.client(0).wait_for(enrolled[-1].tx_hash, timeout=60)
    done = run_cli("verify", "--home", str(cfg.home), "--node", cfg.cometbft_rpc)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    counts = re.search(r"checked (\d+) blocks, (\d+) transactions, (\d+) signed headers", output)
    assert counts is not None, output
    blocks, transactions, signed = (int(g) for g in counts.groups())
    assert blocks >= 2
    assert transactions >= len(enrolled)
    assert signed > 0
    assert "TAMPERED" not in output


def test_verify_while_the_node_commits_finds_nothing(net: Network) -> None:
    """The node keeps committing while it is verified; what verify reads must still be one
    committed state, never blocks of one height and state or audit log of a later one."""
    cfg = net.configs[0]
    runs = 0
    with TxStream(net, admin=2, node=0, count=40, interval=0.1) as stream:
        wait_until(lambda: stream.hashes, 30, "the stream to start")
        while stream.running:
            report = verify_node(cfg.home)
            assert report.findings == [], report.findings
            runs += 1
    assert not stream.errors, stream.errors
    assert runs >= 3
    last = net.client(0).wait_for(stream.hashes[-1], timeout=60)
    assert last.ok
    net.wait_all_at(last.height + 1)
    report = verify_node(cfg.home, cfg.cometbft_rpc)
    assert report.findings == [], report.findings
    assert report.checked_transactions >= len(stream.keys)


# -- 3. one validator down ------------------------------------------------------------------


def test_one_validator_down_network_commits_then_it_catches_up(net: Network) -> None:
    victim = net.configs[3]
    assert testnet_down(net.home, nodes=[victim.moniker], timeout=20) == [victim.moniker]
    assert height_of(victim) is None

    # Three of four validators (30 of 40) still commit.
    newcomer = KeyPair.generate()
    outcome = net.client(1).submit(
        net.admins[1], "member.enroll", enroll_body(newcomer), timeout=60
    )
    assert outcome.ok
    assert height_of(victim) is None

    testnet_up(net.home, nodes=[victim.moniker])
    target = max(h for h in net.heights([0, 1, 2]).values() if h is not None)
    net.wait_all_at(target, indexes=[3], timeout=90)
    net.assert_same_app_hash(target)
    # It executed the block it missed: its own RPC knows the result and the member.
    assert net.client(3).wait_for(outcome.tx_hash, timeout=30).height == outcome.height
    assert net.client(3).query("/member", newcomer.member_id)["id"] == newcomer.member_id
    with httpx.Client(base_url=victim.api_url, timeout=5) as http:
        wait_until(lambda: http.get("/ready").status_code == 200, 60, "node3 /ready")


# -- 4. two validators down -----------------------------------------------------------------


def test_two_validators_down_halts_without_divergence_then_resumes(net: Network) -> None:
    down = [2, 3]
    live = [0, 1]
    stopped = testnet_down(net.home, nodes=net.names(down), timeout=20)
    assert sorted(stopped) == net.names(down)
    halted_at = max(h for h in net.heights(live).values() if h is not None)

    # 20 of 40 is not more than 2/3: the transaction enters node0's mempool but no block
    # commits it, and the live nodes add at most the one block that was in flight.
    client = net.client(0)
    newcomer = KeyPair.generate()
    nonce = client.next_nonce(net.admins[0].member_id)
    tx_hash = client.broadcast(enroll_tx(net.admins[0], net.chain_id, nonce, newcomer, Role.LAB))
    deadline = time.monotonic() + STALL_WATCH_S
    while time.monotonic() < deadline:
        assert client.tx_status(tx_hash) is None
        heights = net.heights(live)
        assert all(h is not None and h <= halted_at + 1 for h in heights.values()), heights
        time.sleep(0.5)
    assert client.tx_status(tx_hash) is None
    assert int(client.rpc("num_unconfirmed_txs")["total"]) >= 1

    common = min(h for h in net.heights(live).values() if h is not None)
    for height in range(1, common + 1):
        net.assert_same_app_hash(height, live)

    # Both back: the pending transaction commits from node0's mempool, the chain moves on.
    testnet_up(net.home, nodes=net.names(down))
    outcome = client.wait_for(tx_hash, timeout=120)
    assert outcome.ok, outcome
    assert outcome.height > halted_at
    net.wait_all_at(outcome.height + 2, timeout=120)
    for height in range(halted_at - 2, outcome.height + 3):
        net.assert_same_app_hash(height)
    assert net.client(2).query("/member", newcomer.member_id)["role"] == Role.LAB.value


# -- 5. application crash under load ---------------------------------------------------------


def test_app_sigkill_under_load_recovers_and_verifies(net: Network) -> None:
    victim = net.configs[1]
    old_app = read_pid_file(victim.app_pid_file)
    old_comet = read_pid_file(victim.cometbft_pid_file)
    assert old_app is not None and old_comet is not None

    with TxStream(net, admin=0, node=0, count=16, interval=0.25) as stream:
        # Kill the application once the stream is being committed.
        wait_until(
            lambda: stream.hashes and net.client(0).tx_status(stream.hashes[0]),
            60,
            "a first commit of the stream",
        )
        os.kill(old_app, signal.SIGKILL)
    assert not stream.errors, stream.errors
    assert len(stream.hashes) == len(stream.keys)
    outcomes = [net.client(0).wait_for(h, timeout=90) for h in stream.hashes]
    assert all(o.ok for o in outcomes), outcomes

    # The supervisor restarts the pair; the node catches up to the others with the same hash.
    wait_until(
        lambda: read_pid_file(victim.cometbft_pid_file) not in (None, old_comet),
        60,
        "a restarted CometBFT on node1",
    )
    assert read_pid_file(victim.app_pid_file) not in (None, old_app)
    assert not pid_alive(old_app)
    others = [h for h in net.heights([0, 2, 3]).values() if h is not None]
    target = max(*others, *(o.height for o in outcomes))
    net.wait_all_at(target + 1, timeout=120)
    net.assert_same_app_hash(target + 1)
    for keys in stream.keys:
        assert net.client(1).query("/member", keys.member_id)["id"] == keys.member_id
    assert '"event": "node.restarting"' in (victim.log_dir / "node.log").read_text("utf-8")

    report = verify_node(victim.home, victim.cometbft_rpc)
    assert report.findings == [], report.findings
    assert report.checked_blocks >= target
    assert report.checked_transactions >= len(stream.keys)
    assert report.signed_headers > 0


# -- 6. the consortium grows -----------------------------------------------------------------


def proposal_id(outcome: TxOutcome) -> int:
    found = re.match(r"proposal (\d+) ", outcome.log)
    assert found is not None, outcome.log
    return int(found.group(1))


def test_governance_vote_adds_a_fifth_validator(net: Network) -> None:
    added = add_node(net.home, PASSPHRASE, fast_kdf=True)
    net.refresh()
    assert len(net.configs) == 5
    new_cfg = net.configs[4]
    assert new_cfg.home == added.config.home
    testnet_up(net.home, nodes=[new_cfg.moniker])
    top = max(h for h in net.heights([0, 1, 2, 3]).values() if h is not None)
    net.wait_all_at(top, indexes=[4], timeout=120)
    assert node_status(new_cfg.home).voting_power == 0

    client = net.client(0)
    org = added.organization
    new_admin = load_keystore(new_cfg.keys_dir / "admin.json", PASSPHRASE)
    assert new_admin.verify_key.hex() == org["admin"]["verify_key"]

    # 1. The founders admit the new organization: 3 of 4 approvals (ceil(2n/3)).
    admit = AddOrganization(
        org["id"],
        org["name"],
        OrganizationKind(org["kind"]),
        AdminKeys(
            bytes.fromhex(org["admin"]["verify_key"]), bytes.fromhex(org["admin"]["encryption_key"])
        ),
        bytes.fromhex(org["node_encryption_key"]),
        bytes.fromhex(org["node_verify_key"]),
    )
    proposed = client.submit(net.admins[0], "gov.propose", Propose(admit, reason="new member"))
    number = proposal_id(proposed)
    assert "open" in proposed.log
    client.submit(net.admins[1], "gov.vote", Vote(number, True))
    passed = client.submit(net.admins[2], "gov.vote", Vote(number, True))
    assert "passed" in passed.log, passed.log
    admin_record = client.query("/member", member_id_for(new_admin.verify_key))
    assert admin_record["organization"] == org["id"] and admin_record["role"] == "admin"

    # 2. Its admin proposes its validator; now 4 of 5 organizations must approve.
    validator = SetValidator(base64.b64decode(added.validator_pub_key), 10, org["id"])
    proposed = net.client(4).submit(new_admin, "gov.propose", Propose(validator, reason="our node"))
    number = proposal_id(proposed)
    assert "open" in proposed.log
    client.submit(net.admins[0], "gov.vote", Vote(number, True))
    client.submit(net.admins[1], "gov.vote", Vote(number, True))
    passed = client.submit(net.admins[2], "gov.vote", Vote(number, True))
    assert "passed" in passed.log, passed.log

    # CometBFT applies the update two blocks later; every node sees five validators.
    address = hashlib.sha256(base64.b64decode(added.validator_pub_key)).digest()[:20].hex().upper()

    def validator_addresses(index: int) -> set[str]:
        result = rpc_result(net.configs[index], "validators", per_page=100)
        return {v["address"] for v in result["validators"]}

    for index in range(5):
        wait_until(
            lambda i=index: (
                (found := validator_addresses(i)) and len(found) == 5 and address in found
            ),
            60,
            f"five validators, the new one among them, on node{index}",
        )

    # A later block is signed by the new validator.
    def signed_by_new_validator() -> bool:
        height = height_of(net.configs[0]) or 0
        commit = rpc_result(net.configs[0], "commit", height=height)
        return any(
            s["validator_address"] == address and s["block_id_flag"] == 2
            for s in commit["signed_header"]["commit"]["signatures"]
        )

    wait_until(signed_by_new_validator, 60, "a commit signed by the new validator")
    assert node_status(new_cfg.home).voting_power == 10

    # Proofs still verify against the grown validator set.
    proven = net.client(4).verified_state(member_key(new_admin.member_id))
    assert proven.value is not None
    assert proven.header.total_power == 50
    assert 3 * proven.header.signed_power > 2 * proven.header.total_power


# -- 9b. tampering is found ------------------------------------------------------------------


def copy_node_for_verify(home: Path, into: Path) -> Path:
    """What `verify --offline` reads of a node: its genesis and its ledger database."""
    (into / "config").mkdir(parents=True)
    (into / "app").mkdir()
    shutil.copy2(home / "config" / "genesis.json", into / "config" / "genesis.json")
    for db_file in (home / "app").glob("state.db*"):
        shutil.copy2(db_file, into / "app" / db_file.name)
    return into


def test_offline_verify_names_a_tampered_state_key(
    net: Network, enrolled: list[Enrolled], tmp_path: Path
) -> None:
    victim = net.configs[3]
    assert testnet_down(net.home, nodes=[victim.moniker], timeout=20) == [victim.moniker]
    try:
        copy = copy_node_for_verify(victim.home, tmp_path / "copy")
    finally:
        testnet_up(net.home, nodes=[victim.moniker])

    intact = run_cli("verify", "--home", str(copy), "--offline")
    assert intact.returncode == 0, intact.stdout + intact.stderr

    member = enrolled[0]
    key = member_key(member.keys.member_id)
    # An insider makes a clinician an admin in the node's database, behind the ledger's back.
    with contextlib.closing(sqlite3.connect(copy / "app" / "state.db")) as db:
        (value,) = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        stored = codec.decode(bytes(value), Member)
        assert stored.role is Role.CLINICIAN
        forged = codec.encode(msgspec.structs.replace(stored, role=Role.ADMIN))
        changed = db.execute("UPDATE kv SET value = ? WHERE key = ?", (forged, key)).rowcount
        db.commit()
    assert changed == 1

    tampered = run_cli("verify", "--home", str(copy), "--offline")
    output = tampered.stdout + tampered.stderr
    assert tampered.returncode == 1, output
    assert f"state key {key.decode()} is altered" in output, output

    # The node that was stopped for the copy is back with the others.
    top = max(h for i, h in net.heights().items() if h is not None and i != 3)
    net.wait_all_at(top, indexes=[3], timeout=90)
    net.assert_same_app_hash(top)
