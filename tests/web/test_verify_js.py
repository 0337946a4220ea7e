"""static/verify.js, the in-page proof check, run under Node (the same WebCrypto the browser
has) against what the Python SDK computes: CometBFT's recorded header and commit, a synthetic
signed header whose app hash commits to a real Merkle log, and tampered variants of each."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import nacl.signing
import pytest

from medledger.client.lightclient import (
    Validator,
    header_hash,
    validator_set_hash,
    vote_sign_bytes,
)
from medledger.ledger import merkle
from medledger.ledger.app import app_hash_of
from medledger.ledger.execution import AuditEntry

ROOT = Path(__file__).resolve().parents[2]
VERIFY_JS = ROOT / "src" / "medledger" / "web" / "static" / "verify.js"
FIXTURES = ROOT / "tests" / "client" / "fixtures"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not installed")

RUNNER = """
const V = require(process.argv[1]);
let input = "";
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", async () => {
  const job = JSON.parse(input);
  const out = {};
  try {
    if (job.header) {
      out.header_hash = V.toHex(await V.headerHash(job.header));
    }
    if (job.vote) {
      const v = job.vote;
      out.vote = V.toHex(V.voteSignBytes(v.chain_id, BigInt(v.height), BigInt(v.round),
                                          v.block_id, v.timestamp));
    }
    if (job.commit) {
      const h = await V.checkHeader(job.chain_id, job.commit, job.validators);
      out.signed = `${h.signedPower}/${h.total}`;
    }
    if (job.anchor) {
      const anchor = await V.checkAnchor(job.anchor);
      out.rows = [];
      for (const row of job.rows) {
        try { await V.checkEntry(row, anchor); out.rows.push("ok"); }
        catch (err) { out.rows.push(err.message); }
      }
    }
  } catch (err) {
    out.error = err.message;
  }
  process.stdout.write(JSON.stringify(out));
});
"""


def run_js(job: dict[str, Any]) -> dict[str, Any]:
    assert NODE is not None
    done = subprocess.run(
        [NODE, "-e", RUNNER, str(VERIFY_JS)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _recorded() -> tuple[dict[str, Any], dict[str, Any]]:
    commit = json.loads((FIXTURES / "commit_h3.json").read_text())["result"]
    validators = json.loads((FIXTURES / "validators_h3.json").read_text())["result"]
    return commit, validators


def test_header_hash_and_signatures_agree_with_cometbft() -> None:
    commit, validators = _recorded()
    header = commit["signed_header"]["header"]
    signature = commit["signed_header"]["commit"]["signatures"][0]
    block_id = commit["signed_header"]["commit"]["block_id"]
    result = run_js(
        {
            "header": header,
            "vote": {
                "chain_id": header["chain_id"],
                "height": int(header["height"]),
                "round": 0,
                "block_id": block_id,
                "timestamp": signature["timestamp"],
            },
            "chain_id": header["chain_id"],
            "commit": commit,
            "validators": validators,
        }
    )
    assert "error" not in result, result
    assert result["header_hash"] == header_hash(header).hex() == block_id["hash"].lower()
    expected_vote = vote_sign_bytes(
        header["chain_id"], int(header["height"]), 0, block_id, signature["timestamp"]
    )
    assert result["vote"] == expected_vote.hex()
    assert result["signed"] == "10/10"


def test_a_tampered_recorded_header_is_refused() -> None:
    commit, validators = _recorded()
    chain_id = commit["signed_header"]["header"]["chain_id"]
    altered = copy.deepcopy(commit)
    altered["signed_header"]["header"]["app_hash"] = "00" * 32
    result = run_js({"chain_id": chain_id, "commit": altered, "validators": validators})
    assert "does not hash to the block the validators signed" in result["error"]
    wrong_chain = run_js({"chain_id": "other", "commit": commit, "validators": validators})
    assert "not other" in wrong_chain["error"]


# --- a synthetic chain: a real audit log, its app hash in a header signed by 4 validators ----


def _entries(count: int) -> list[AuditEntry]:
    return [
        AuditEntry(
            10 + i,
            0,
            hashlib.sha256(b"tx %d" % i).digest(),
            "access.request",
            "ab" * 20,
            14 if i % 3 == 0 else 0,
            f"granted: grant {i}" + " é" * (i % 2),
            "cd" * 20,
        )
        for i in range(count)
    ]


def _signed_anchor(
    state_root: bytes, audit_root: bytes, size: int, signers: set[int]
) -> dict[str, Any]:
    keys = [nacl.signing.SigningKey(hashlib.sha256(b"val %d" % i).digest()) for i in range(4)]
    members = [
        Validator(hashlib.sha256(bytes(k.verify_key)).digest()[:20], bytes(k.verify_key), 10)
        for k in keys
    ]
    commit_doc, _ = _recorded()
    header = copy.deepcopy(commit_doc["signed_header"]["header"])
    header.update(
        chain_id="medledger-test",
        height="42",
        validators_hash=validator_set_hash(members).hex().upper(),
        app_hash=app_hash_of(state_root, audit_root, size).hex().upper(),
    )
    block_id = {"hash": header_hash(header).hex().upper(), "parts": {"total": 1, "hash": "AB" * 32}}
    signatures = []
    for index, (key, member) in enumerate(zip(keys, members, strict=True)):
        stamp = f"2026-11-25T10:00:0{index}.123456789Z"
        message = vote_sign_bytes("medledger-test", 42, 0, block_id, stamp)
        signed = index in signers
        signatures.append(
            {
                "block_id_flag": 2 if signed else 1,
                "validator_address": member.address.hex().upper() if signed else "",
                "timestamp": stamp if signed else "0001-01-01T00:00:00Z",
                "signature": base64.b64encode(key.sign(message).signature).decode()
                if signed
                else None,
            }
        )
    return {
        "chain_id": "medledger-test",
        "height": 41,
        "state_root": base64.b64encode(state_root).decode(),
        "audit_root": base64.b64encode(audit_root).decode(),
        "audit_size": size,
        "commit": {
            "signed_header": {
                "header": header,
                "commit": {
                    "height": "42",
                    "round": 0,
                    "block_id": block_id,
                    "signatures": signatures,
                },
            }
        },
        "validators": {
            "validators": [
                {
                    "address": m.address.hex().upper(),
                    "pub_key": {
                        "type": "tendermint/PubKeyEd25519",
                        "value": base64.b64encode(m.pub_key).decode(),
                    },
                    "voting_power": "10",
                }
                for m in members
            ],
            "total": "4",
        },
    }


def _audit_page(signers: frozenset[int] = frozenset({0, 1, 2, 3})) -> dict[str, Any]:
    log = merkle.MerkleLog(merkle.DictNodeStore())
    entries = _entries(11)
    leaves = [msgspec.msgpack.encode(e) for e in entries]
    for leaf in leaves:
        log.append(leaf)
    state_root = hashlib.sha256(b"state").digest()
    anchor = _signed_anchor(state_root, log.root(), log.size, set(signers))
    rows = [
        {
            "index": str(i),
            "height": str(entry.height),
            "leaf": base64.b64encode(leaf).decode(),
            "proof": ",".join(base64.b64encode(p).decode() for p in log.inclusion_proof(i)),
            "tx": entry.tx_hash.hex(),
            "type": entry.type,
            "sender": entry.sender,
            "code": str(entry.code),
        }
        for i, (entry, leaf) in enumerate(zip(entries, leaves, strict=True))
    ]
    return {"anchor": anchor, "rows": rows}


def test_every_entry_of_a_signed_audit_log_verifies() -> None:
    result = run_js(_audit_page())
    assert "error" not in result, result
    assert result["rows"] == ["ok"] * 11


def test_tampered_entries_fail_alone() -> None:
    page = _audit_page()
    rows = page["rows"]
    first = rows[3]["proof"].split(",")
    rows[3]["proof"] = ",".join([base64.b64encode(bytes(32)).decode(), *first[1:]])
    rows[5]["code"] = "0" if rows[5]["code"] != "0" else "14"  # the row misreports the decision
    rows[7]["index"] = "8"  # the proof of another position
    rows[9]["proof"] = ""
    result = run_js(page)
    assert "error" not in result, result
    for index, outcome in enumerate(result["rows"]):
        if index == 5:
            assert "does not say what its proven audit entry says" in outcome
        elif index in (3, 7, 9):
            assert "inclusion proof" in outcome, (index, outcome)
        else:
            assert outcome == "ok"


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        (lambda a: a.update(audit_size=a["audit_size"] + 1), "not the one in the signed app hash"),
        (lambda a: a.update(height=40), "not the one after the answer's height"),
        (
            lambda a: a["commit"]["signed_header"]["header"].update(time="2026-11-25T10:00:00Z"),
            "does not hash to the block",
        ),
        (
            lambda a: a["validators"]["validators"][1].update(voting_power="11"),
            "validator set is not the one the header names",
        ),
        (
            lambda a: a["commit"]["signed_header"]["commit"]["signatures"][2].update(
                timestamp="2026-11-25T10:00:09Z"
            ),
            "bad signature",
        ),
    ],
)
def test_a_tampered_anchor_fails_every_entry(tamper: Any, error: str) -> None:
    page = _audit_page()
    tamper(page["anchor"])
    assert error in run_js(page).get("error", "")


def test_two_thirds_of_the_power_is_not_enough() -> None:
    assert "voting power" in run_js(_audit_page(frozenset({0, 1}))).get("error", "")
    assert run_js(_audit_page(frozenset({0, 1, 3})))["rows"] == ["ok"] * 11
