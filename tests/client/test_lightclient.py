from __future__ import annotations

import base64
import copy
import hashlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nacl.signing
import pytest
from google.protobuf import timestamp_pb2  # type: ignore[import-untyped, unused-ignore]

from medledger.client.lightclient import (
    LightClientError,
    Validator,
    header_hash,
    merkle_root,
    parse_timestamp,
    parse_validators,
    validator_set_hash,
    verify_commit,
    vote_sign_bytes,
)

FIXTURES = Path(__file__).parent / "fixtures"
COMETBFT = Path(__file__).resolve().parents[2] / ".tools" / "bin" / "cometbft"
ZERO_BLOCK_ID: dict[str, Any] = {"hash": "", "parts": {"total": 0, "hash": ""}}


def _load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --- encodings against CometBFT's own test vectors ----------------------------------------------


def test_merkle_root_rfc6962_vectors() -> None:
    assert merkle_root([]) == _sha(b"")
    assert merkle_root([b""]).hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    assert merkle_root([b"L123456"]).hex() == (
        "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    )


def test_merkle_root_splits_at_largest_power_of_two_below_n() -> None:
    def leaf(x: bytes) -> bytes:
        return _sha(b"\x00" + x)

    def inner(left: bytes, right: bytes) -> bytes:
        return _sha(b"\x01" + left + right)

    a, b, c, d, e = (leaf(x) for x in (b"a", b"b", b"c", b"d", b"e"))
    assert merkle_root([b"a", b"b"]) == inner(a, b)
    assert merkle_root([b"a", b"b", b"c"]) == inner(inner(a, b), c)
    assert merkle_root([b"a", b"b", b"c", b"d"]) == inner(inner(a, b), inner(c, d))
    assert merkle_root([b"a", b"b", b"c", b"d", b"e"]) == inner(inner(inner(a, b), inner(c, d)), e)


def test_header_hash_matches_cometbft_vector() -> None:
    # types/block_test.go TestHeaderHash "Generates expected hash".
    header = {
        "version": {"block": "1", "app": "2"},
        "chain_id": "chainId",
        "height": "3",
        "time": "2019-10-13T16:14:44Z",
        "last_block_id": {"hash": "00" * 32, "parts": {"total": 6, "hash": "00" * 32}},
        "last_commit_hash": _sha(b"last_commit_hash").hex(),
        "data_hash": _sha(b"data_hash").hex(),
        "validators_hash": _sha(b"validators_hash").hex(),
        "next_validators_hash": _sha(b"next_validators_hash").hex(),
        "consensus_hash": _sha(b"consensus_hash").hex(),
        "app_hash": _sha(b"app_hash").hex(),
        "last_results_hash": _sha(b"last_results_hash").hex(),
        "evidence_hash": _sha(b"evidence_hash").hex(),
        "proposer_address": _sha(b"proposer_address")[:20].hex(),
    }
    assert header_hash(header).hex().upper() == (
        "F740121F553B5418C3EFBD343C2DBFE9E007BB67B0D020A0741374BAB65242A4"
    )
    header["validators_hash"] = ""
    with pytest.raises(LightClientError, match="no validators_hash"):
        header_hash(header)


def test_vote_sign_bytes_matches_cometbft_vector() -> None:
    # types/vote_test.go TestVoteSignBytesTestVectors case 1: a precommit at height 1, round 1,
    # empty chain id, zero block id and Go's zero time.
    want = bytes.fromhex("2108021101000000000000001901000000000000002a0b088092b8c398feffffff01")
    assert vote_sign_bytes("", 1, 1, ZERO_BLOCK_ID, "0001-01-01T00:00:00Z") == want


def test_vote_sign_bytes_with_block_id_always_encodes_part_set_header() -> None:
    empty_parts = {"hash": "AB" * 32, "parts": {"total": 0, "hash": ""}}
    encoded = vote_sign_bytes("c", 2, 0, empty_parts, "2020-01-01T00:00:00Z")
    # field 4 (block_id) = { field 1: 32-byte hash, field 2: empty part set header }
    assert bytes([0x22, 36, 0x0A, 32]) + b"\xab" * 32 + bytes([0x12, 0]) in encoded


def test_parse_timestamp_is_exact() -> None:
    cases = [
        "2026-11-25T11:21:41.478612005Z",
        "2026-11-25T11:21:41.4786Z",
        "2026-11-25T11:21:41Z",
        "1970-01-01T00:00:00.000000001Z",
        "1969-12-31T23:59:59.999999999Z",
        "0001-01-01T00:00:00Z",
    ]
    for text in cases:
        reference = timestamp_pb2.Timestamp()
        reference.FromJsonString(text)
        parsed = parse_timestamp(text)
        assert (parsed.seconds, parsed.nanos) == (reference.seconds, reference.nanos), text
    shifted = parse_timestamp("2026-11-25T12:21:41.5+01:00")
    assert (shifted.seconds, shifted.nanos) == (
        parse_timestamp("2026-11-25T11:21:41.5Z").seconds,
        500_000_000,
    )
    for bad in ["2026-11-25 11:21:41Z", "2026-11-25T11:21:41.1234567890Z", "2026-13-01T00:00:00Z"]:
        with pytest.raises(LightClientError, match="timestamp"):
            parse_timestamp(bad)


# --- verification against a recorded real commit -------------------------------------------------


@pytest.fixture
def recorded() -> tuple[str, Any, Any]:
    commit = _load("commit_h3.json")
    validators = _load("validators_h3.json")
    chain_id = commit["result"]["signed_header"]["header"]["chain_id"]
    return chain_id, commit, validators


def _header(commit: Any) -> Any:
    return commit["result"]["signed_header"]["header"]


def _commit(commit: Any) -> Any:
    return commit["result"]["signed_header"]["commit"]


def test_recorded_commit_verifies(recorded: tuple[str, Any, Any]) -> None:
    chain_id, commit, validators = recorded
    verified = verify_commit(chain_id, commit, validators)
    header = _header(commit)
    assert verified.height == 3
    assert verified.app_hash == bytes.fromhex(header["app_hash"])
    assert verified.header_hash.hex().upper() == _commit(commit)["block_id"]["hash"]
    assert verified.time == header["time"]
    assert verified.signed_power == verified.total_power == 10

    # The inner objects are accepted as well as whole RPC responses.
    inner = verify_commit(
        chain_id, commit["result"]["signed_header"], validators["result"]["validators"]
    )
    assert inner == verified

    set_hash = validator_set_hash(parse_validators(validators))
    assert set_hash.hex().upper() == header["validators_hash"]
    verify_commit(chain_id, commit, validators, trusted_validators_hash=set_hash)


def test_first_block_with_empty_last_block_id_verifies() -> None:
    commit = _load("commit_h1.json")
    validators = _load("validators_h3.json")  # the set does not change in this chain
    assert _header(commit)["last_block_id"]["hash"] == ""
    verified = verify_commit(_header(commit)["chain_id"], commit, validators)
    assert verified.height == 1


def _tampered(
    recorded: tuple[str, Any, Any], edit: Callable[[Any, Any], None]
) -> tuple[str, Any, Any]:
    chain_id, commit, validators = recorded
    commit, validators = copy.deepcopy(commit), copy.deepcopy(validators)
    edit(commit, validators)
    return chain_id, commit, validators


def _flip_signature_byte(commit: Any, _: Any) -> None:
    sig = _commit(commit)["signatures"][0]
    raw = bytearray(base64.b64decode(sig["signature"]))
    raw[10] ^= 0x01
    sig["signature"] = base64.b64encode(bytes(raw)).decode()


def _set_app_hash(commit: Any, _: Any) -> None:
    _header(commit)["app_hash"] = "00" * 31 + "01"


def _set_power(_: Any, validators: Any) -> None:
    validators["result"]["validators"][0]["voting_power"] = "11"


def _absent(commit: Any, _: Any) -> None:
    _commit(commit)["signatures"][0]["block_id_flag"] = 1


def _other_address(commit: Any, _: Any) -> None:
    _commit(commit)["signatures"][0]["validator_address"] = "AB" * 20


def _incomplete_page(_: Any, validators: Any) -> None:
    validators["result"]["total"] = "2"


def _commit_for_other_height(commit: Any, _: Any) -> None:
    _commit(commit)["height"] = "4"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set_app_hash, "header hash mismatch"),
        (_flip_signature_byte, "bad signature from validator A3DC"),
        (_set_power, "validator set mismatch"),
        (_absent, r"insufficient voting power: 0/10"),
        (_other_address, "validator address mismatch"),
        (_incomplete_page, "incomplete: got 1 of 2"),
        (_commit_for_other_height, "commit is for height 4"),
    ],
)
def test_recorded_tampering_is_detected(
    recorded: tuple[str, Any, Any], edit: Callable[[Any, Any], None], message: str
) -> None:
    chain_id, commit, validators = _tampered(recorded, edit)
    with pytest.raises(LightClientError, match=message):
        verify_commit(chain_id, commit, validators)


def test_recorded_wrong_chain(recorded: tuple[str, Any, Any]) -> None:
    _, commit, validators = recorded
    with pytest.raises(LightClientError, match="wrong chain"):
        verify_commit("other-chain", commit, validators)

    # Relabelling the header for another chain changes its hash.
    _header(commit)["chain_id"] = "other-chain"
    with pytest.raises(LightClientError, match="header hash mismatch"):
        verify_commit("other-chain", commit, validators)


def test_recorded_untrusted_validator_set(recorded: tuple[str, Any, Any]) -> None:
    chain_id, commit, validators = recorded
    with pytest.raises(LightClientError, match="trusted validators hash"):
        verify_commit(chain_id, commit, validators, trusted_validators_hash=b"\x00" * 32)


def test_validator_address_must_match_key(recorded: tuple[str, Any, Any]) -> None:
    _, _, validators = recorded
    validators["result"]["validators"][0]["address"] = "00" * 20
    with pytest.raises(LightClientError, match="does not match its public key"):
        parse_validators(validators)


def _synthetic_chain(powers: list[int], signers: set[int]) -> tuple[Any, list[Any]]:
    """A header signed by the validators at `signers`, built with this module's own encodings
    (the recorded and live tests pin those encodings to CometBFT's)."""
    keys = [nacl.signing.SigningKey(_sha(b"validator %d" % i)) for i in range(len(powers))]
    members = [
        Validator(_sha(bytes(k.verify_key))[:20], bytes(k.verify_key), p)
        for k, p in zip(keys, powers, strict=True)
    ]
    header = copy.deepcopy(_header(_load("commit_h3.json")))
    header["chain_id"] = "synthetic"
    header["validators_hash"] = validator_set_hash(members).hex().upper()
    block_id = {
        "hash": header_hash(header).hex().upper(),
        "parts": {"total": 1, "hash": "CD" * 32},
    }
    signatures = []
    for index, (key, member) in enumerate(zip(keys, members, strict=True)):
        if index not in signers:
            signatures.append(
                {
                    "block_id_flag": 1,
                    "validator_address": "",
                    "timestamp": "0001-01-01T00:00:00Z",
                    "signature": None,
                }
            )
            continue
        stamp = f"2026-01-01T00:00:0{index}.5Z"
        message = vote_sign_bytes("synthetic", int(header["height"]), 0, block_id, stamp)
        signatures.append(
            {
                "block_id_flag": 2,
                "validator_address": member.address.hex().upper(),
                "timestamp": stamp,
                "signature": base64.b64encode(key.sign(message).signature).decode(),
            }
        )
    commit = {
        "height": header["height"],
        "round": 0,
        "block_id": block_id,
        "signatures": signatures,
    }
    validators = [
        {
            "address": v.address.hex().upper(),
            "pub_key": {
                "type": "tendermint/PubKeyEd25519",
                "value": base64.b64encode(v.pub_key).decode(),
            },
            "voting_power": str(v.voting_power),
        }
        for v in members
    ]
    return {"header": header, "commit": commit}, validators


@pytest.mark.parametrize(
    ("powers", "signers", "error"),
    [
        ([10, 5], {0}, "insufficient voting power: 10/15"),  # exactly 2/3 is not enough
        ([10, 4], {0}, None),
        ([1, 1, 1, 1], {0, 1, 2}, None),
        ([1, 1, 1, 1], {0, 1}, "insufficient voting power: 2/4"),
        ([3, 3, 3], {0, 1}, "insufficient voting power: 6/9"),
        ([3, 3, 3], {0, 1, 2}, None),
    ],
)
def test_power_threshold_is_strictly_more_than_two_thirds(
    powers: list[int], signers: set[int], error: str | None
) -> None:
    signed_header, validators = _synthetic_chain(powers, signers)
    if error is None:
        verified = verify_commit("synthetic", signed_header, validators)
        assert verified.signed_power == sum(powers[i] for i in signers)
        assert verified.total_power == sum(powers)
    else:
        with pytest.raises(LightClientError, match=error):
            verify_commit("synthetic", signed_header, validators)


def test_bad_signature_names_the_validator() -> None:
    signed_header, validators = _synthetic_chain([1, 1, 1], {0, 1, 2})
    sigs = signed_header["commit"]["signatures"]
    sigs[1]["signature"], sigs[2]["signature"] = sigs[2]["signature"], sigs[1]["signature"]
    with pytest.raises(LightClientError) as info:
        verify_commit("synthetic", signed_header, validators)
    assert str(info.value) == (f"bad signature from validator {validators[1]['address']} (index 1)")


def test_missing_validator_is_detected() -> None:
    signed_header, validators = _synthetic_chain([1, 1, 1], {0, 1, 2})
    with pytest.raises(LightClientError, match="validator set mismatch"):
        verify_commit("synthetic", signed_header, validators[:2])
    signed_header["commit"]["signatures"].pop()
    with pytest.raises(LightClientError, match="2 signatures for 3 validators"):
        verify_commit("synthetic", signed_header, validators)


# --- a real single-validator CometBFT node ------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _latest_height(client: httpx.Client) -> int:
    try:
        response = client.get("/status")
        return int(response.json()["result"]["sync_info"]["latest_block_height"])
    except (httpx.HTTPError, KeyError, ValueError):
        return 0


@dataclass
class Node:
    client: httpx.Client
    process: subprocess.Popen[bytes]
    log: Path

    def wait_for_height(self, height: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while _latest_height(self.client) < height:
            if self.process.poll() is not None:
                pytest.fail(f"cometbft exited with {self.process.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"cometbft did not reach height {height}:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def kvstore_node(tmp_path: Path) -> Iterator[Node]:
    """A single-validator CometBFT node running the built-in kvstore app, with its RPC client."""
    if not COMETBFT.exists() and shutil.which("cometbft") is None:
        pytest.skip("cometbft binary not installed (run scripts/setup.sh)")
    binary = str(COMETBFT) if COMETBFT.exists() else "cometbft"
    home = tmp_path / "node"
    subprocess.run(
        [binary, "init", "--home", str(home)], check=True, capture_output=True, timeout=60
    )
    rpc_port, p2p_port = _free_port(), _free_port()
    while p2p_port == rpc_port:
        p2p_port = _free_port()
    log = tmp_path / "cometbft.log"
    with log.open("wb") as log_file:
        node = subprocess.Popen(
            [
                binary,
                "start",
                "--home",
                str(home),
                "--proxy_app=kvstore",
                f"--rpc.laddr=tcp://127.0.0.1:{rpc_port}",
                f"--p2p.laddr=tcp://127.0.0.1:{p2p_port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{rpc_port}", timeout=10) as client:
            running = Node(client, node, log)
            running.wait_for_height(3)
            yield running
    finally:
        node.terminate()
        try:
            node.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(timeout=20)


def _fetch(client: httpx.Client, height: int) -> tuple[Any, Any]:
    commit = client.get("/commit", params={"height": height}).json()
    validators = client.get("/validators", params={"height": height, "per_page": 100}).json()
    return commit, validators


@pytest.mark.e2e
def test_live_node_commit_verifies_and_tampering_fails(kvstore_node: Node) -> None:
    client = kvstore_node.client
    status = client.get("/status").json()["result"]
    chain_id = status["node_info"]["network"]

    # Plain empty blocks.
    for height in (1, 2, 3):
        commit, validators = _fetch(client, height)
        verified = verify_commit(chain_id, commit, validators)
        assert verified.height == height
        assert (
            verified.header_hash.hex().upper()
            == (commit["result"]["signed_header"]["commit"]["block_id"]["hash"])
        )

    # A block after a transaction: its header carries the new app hash.
    tx = client.get("/broadcast_tx_commit", params={"tx": '"medledger=lightclient"'}).json()
    tx_height = int(tx["result"]["height"])
    kvstore_node.wait_for_height(tx_height + 2)
    commit, validators = _fetch(client, tx_height + 1)
    verified = verify_commit(chain_id, commit, validators)
    assert verified.app_hash == bytes.fromhex(_header(commit)["app_hash"])
    assert verified.app_hash != verify_commit(chain_id, *_fetch(client, 1)).app_hash

    recorded = (chain_id, commit, validators)
    for edit, message in [
        (_set_app_hash, "header hash mismatch"),
        (_flip_signature_byte, "bad signature from validator"),
        (_set_power, "validator set mismatch"),
    ]:
        bad_chain, bad_commit, bad_validators = _tampered(recorded, edit)
        with pytest.raises(LightClientError, match=message):
            verify_commit(bad_chain, bad_commit, bad_validators)
    with pytest.raises(LightClientError, match="wrong chain"):
        verify_commit(chain_id + "-x", commit, validators)
    relabelled = copy.deepcopy(commit)
    _header(relabelled)["chain_id"] = chain_id + "-x"
    with pytest.raises(LightClientError, match="header hash mismatch"):
        verify_commit(chain_id + "-x", relabelled, validators)
