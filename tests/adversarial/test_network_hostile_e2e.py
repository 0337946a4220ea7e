"""The attacks that took the demo network down, replayed on a real 4-validator network.

1. An organization admin's `client.register` with a JWK of 60,000 nested `[` passed CheckTx and
   raised RecursionError in FinalizeBlock on every validator at the same height, for good.
2. An unauthenticated `abci_query` on `/block` or `/audit/entry` with a 20-digit height raised
   OverflowError in SQLite and took the application process down.

Now the transaction is refused with its reason and the chain goes on with equal app hashes; the
queries are answered with an error and no application process restarts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from medledger.client.sdk import QueryError, TxRejected
from medledger.config import APP_PID_FILE
from medledger.crypto.keys import KeyPair
from medledger.ledger.clients import RegisterClient
from medledger.ledger.codec import Envelope
from medledger.ledger.errors import Code
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_network import Network, running_network, wait_until

pytestmark = pytest.mark.e2e

BASE_PORT = 31800


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with running_network(tmp_path_factory.mktemp("hostile") / "net", BASE_PORT) as net:
        yield net


def app_pids(network: Network) -> list[str]:
    return [(cfg.home / APP_PID_FILE).read_text().strip() for cfg in network.configs]


def enroll(network: Network, role: Role) -> KeyPair:
    """A new member, enrolled through node 0 and committed on every node (so the admin's next
    transaction, through any node, takes the next nonce)."""
    keys = KeyPair.generate()
    body = EnrollMember(keys.verify_key, keys.encryption_key, role)
    outcome = network.client(0).submit(network.admins[0], "member.enroll", body)
    network.wait_all_at(outcome.height)
    return keys


def test_a_deeply_nested_jwk_does_not_halt_the_chain(network: Network) -> None:
    pids = app_pids(network)
    ehr = enroll(network, Role.EHR)
    body = RegisterClient("evil", ehr.member_id, "[" * 60_000, ("system/*.rs",))
    with pytest.raises(TxRejected) as refused:
        network.client(1).submit(network.admins[0], "client.register", body)
    assert refused.value.code == Code.INVALID_BODY, refused.value
    assert "jwk" in str(refused.value)
    # The chain goes on: a later transaction commits, every validator agrees on it. (Sent to
    # node 0 once it has the refused transaction's block too: until then node 0's mempool
    # still holds that transaction, whose nonce the admin's next one reuses.)
    assert refused.value.height is not None
    network.wait_all_at(refused.value.height)
    after = enroll(network, Role.CLINICIAN)
    member = network.client(2).query("/member", after.member_id)
    assert member["id"] == after.member_id
    height = max(h for h in network.heights().values() if h is not None)
    network.wait_all_at(height + 1)
    network.assert_same_app_hash(height + 1)
    assert app_pids(network) == pids, "an application process was restarted"


def test_a_deeply_nested_proposal_is_refused_in_checktx(network: Network) -> None:
    """The tagged union of governance actions made msgspec recurse into the skipped values of
    a map; the nesting bound refuses such a body before any decoder sees it."""
    client = network.client(0)
    admin = network.admins[0]
    body = b"\x82\xa6action" + b"\x81\xa1k" * 20_000 + b"\xc0\xa6reason\xa1x"
    nonce = client.next_nonce(admin.member_id)
    unsigned = Envelope(network.chain_id, admin.member_id, nonce, "gov.propose", body, b"")
    raw = msgspec.msgpack.encode(
        Envelope(
            network.chain_id,
            admin.member_id,
            nonce,
            "gov.propose",
            body,
            admin.sign(unsigned.sign_bytes()),
        )
    )
    with pytest.raises(TxRejected) as refused:
        client.broadcast(raw)
    assert refused.value.code == Code.INVALID_BODY
    assert "nest" in str(refused.value)


@pytest.mark.parametrize(
    "path,data",
    [
        ("/block", b"9" * 20),
        ("/audit/entry", b"9" * 20),
        ("/audit/consistency", b"9" * 20),
        ("/block", b"-1"),
        ("/audit/entry", b"\xff\xfe"),
        ("/consents/granted-to", b"[" * 4000),
        ("/claims", b"patient"),
        ("/nonexistent", b""),
    ],
)
def test_hostile_queries_get_errors_and_the_application_stays_up(
    network: Network, path: str, data: bytes
) -> None:
    pids = app_pids(network)
    client = network.client(3)
    for _ in range(20):
        with pytest.raises(QueryError) as refused:
            client.query_raw(path, data)
        assert refused.value.code != 0 and str(refused.value)
    # Still answering, still committing, never restarted.
    height = max(h for h in network.heights().values() if h is not None)
    wait_until(
        lambda: (network.heights([3])[3] or 0) > height, 60, "node 3 to commit another block"
    )
    assert client.query("/params")["max_tx_bytes"] > 0
    assert app_pids(network) == pids, "an application process was restarted"
