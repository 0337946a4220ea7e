"""Shared fixtures: a founding consortium with deterministic keys, run in-process."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medledger.client.tx import sign_transaction
from medledger.crypto.keys import KeyPair
from medledger.ledger.app import BlockOutcome
from medledger.ledger.errors import Code
from medledger.ledger.execution import TxResult
from medledger.node.inprocess import InProcessChain

CHAIN_ID = "medledger-test"
ORGANIZATIONS = [
    ("st-mary", "St. Mary's Hospital", "hospital"),
    ("riverside", "Riverside Clinic", "clinic"),
    ("northside-lab", "Northside Lab", "lab"),
    ("careplus", "CarePlus Insurance", "insurer"),
]


def keys_for(name: str) -> KeyPair:
    """Deterministic keys, so that replicas and replays see identical transactions."""
    return KeyPair(
        signing_seed=hashlib.sha256(b"sign/" + name.encode()).digest(),
        encryption_secret=hashlib.sha256(b"enc/" + name.encode()).digest(),
    )


def genesis_app_state(orgs: list[tuple[str, str, str]] = ORGANIZATIONS) -> bytes:
    entries = []
    for org_id, name, kind in orgs:
        admin = keys_for(f"{org_id}/admin")
        validator = keys_for(f"{org_id}/validator")
        entries.append(
            {
                "id": org_id,
                "name": name,
                "kind": kind,
                "admin": {
                    "verify_key": admin.verify_key.hex(),
                    "encryption_key": admin.encryption_key.hex(),
                },
                "node_encryption_key": keys_for(f"{org_id}/node").encryption_key.hex(),
                "node_verify_key": keys_for(f"{org_id}/node").verify_key.hex(),
                "validator": {
                    "pub_key": __import__("base64").b64encode(validator.verify_key).decode(),
                    "power": 10,
                },
            }
        )
    return json.dumps({"organizations": entries, "params": {}}).encode()


@dataclass
class Consortium:
    """An in-process chain plus the keys of its participants and their next nonces."""

    chain: InProcessChain
    nonces: dict[str, int] = field(default_factory=dict)

    def admin(self, org_id: str) -> KeyPair:
        return keys_for(f"{org_id}/admin")

    def tx(self, keys: KeyPair, tx_type: str, body: object, *, sender: str = "") -> bytes:
        sender_id = sender or keys.member_id
        nonce = self.nonces.get(sender_id, 0) + 1
        self.nonces[sender_id] = nonce
        return sign_transaction(keys, CHAIN_ID, nonce, tx_type, body, sender=sender_id)

    def run(self, *txs: bytes) -> BlockOutcome:
        return self.chain.run_block(list(txs))

    def submit(self, keys: KeyPair, tx_type: str, body: object, *, sender: str = "") -> TxResult:
        """One transaction in its own block."""
        sender_id = sender or keys.member_id
        result = self.run(self.tx(keys, tx_type, body, sender=sender))
        # A refused transaction leaves the nonce unused, except a denied access request,
        # which is a recorded decision.
        if not result.results[0].ok and result.results[0].code is not Code.ACCESS_DENIED:
            self.nonces[sender_id] -= 1
        return result.results[0]


@pytest.fixture
def consortium(tmp_path: Path) -> Iterator[Consortium]:
    chain = InProcessChain(tmp_path / "state.db", CHAIN_ID, genesis_app_state())
    yield Consortium(chain)
    chain.close()


def free_base_port(nodes: int, stride: int = 10) -> int:
    """A base port whose whole block of ports is free on 127.0.0.1 right now."""
    for base in range(30000, 60000, 500):
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + nodes * stride):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port range")
