"""Determinism as a property: replicas fed the same blocks reach the same app hash, whatever
the blocks hold (valid, refused or garbage transactions) and wherever a replica restarts."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from conftest import CHAIN_ID, ORGANIZATIONS, genesis_app_state, keys_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medledger.client.tx import sign_transaction
from medledger.ledger.access import RequestAccess
from medledger.ledger.consent import GrantConsent, GranteeKind, Purpose, RevokeConsent, ScopeKind
from medledger.ledger.model import Role
from medledger.ledger.records import EraseRecord, PutRecord
from medledger.ledger.transactions import (
    ChangeMemberStatus,
    EnrollMember,
    Propose,
    RotateKey,
    SetParameter,
    Vote,
)
from medledger.node.inprocess import InProcessChain

ORG_IDS = [org_id for org_id, _, _ in ORGANIZATIONS]

# Participants enrolled in the first block of every run, so records have patients and authors.
CAST = {
    "patient": ("st-mary", Role.PATIENT),
    "author-a": ("st-mary", Role.CLINICIAN),
    "author-b": ("riverside", Role.LAB),
    "reader": ("careplus", Role.CLINICIAN),
    "er": ("northside-lab", Role.EMERGENCY),
}
READERS = ["author-a", "author-b", "reader", "er", "patient"]
CUSTODIANS = tuple(sorted(ORG_IDS))
HOUR_NS = 3600 * 1_000_000_000


operation = st.one_of(
    st.tuples(
        st.just("enroll"), st.sampled_from(ORG_IDS), st.integers(0, 5), st.sampled_from(list(Role))
    ),
    st.tuples(st.just("rotate"), st.integers(0, 5), st.integers(0, 3)),
    st.tuples(
        st.just("status"),
        st.sampled_from(ORG_IDS),
        st.integers(0, 5),
        st.sampled_from(["member.suspend", "member.reinstate", "member.revoke"]),
    ),
    st.tuples(st.just("propose"), st.sampled_from(ORG_IDS), st.integers(1, 5000)),
    st.tuples(st.just("vote"), st.sampled_from(ORG_IDS), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("garbage"), st.binary(max_size=40)),
    st.tuples(st.just("put"), st.integers(0, 3), st.integers(0, 2)),
    st.tuples(st.just("amend"), st.integers(0, 3), st.integers(0, 2), st.integers(1, 3)),
    st.tuples(st.just("consent"), st.sampled_from(ORG_IDS), st.sampled_from(list(Purpose))),
    st.tuples(st.just("revoke"), st.integers(0, 3)),
    st.tuples(
        st.just("access"),
        st.integers(0, 3),
        st.sampled_from(READERS),
        st.sampled_from(list(Purpose)),
    ),
    st.tuples(st.just("emergency"), st.integers(0, 3)),
    st.tuples(st.just("erase"), st.integers(0, 3)),
    st.tuples(st.just("stale"), st.sampled_from(ORG_IDS)),
)
blocks_strategy = st.lists(st.lists(operation, max_size=8), min_size=1, max_size=10)


def setup_block(factory: TxFactory) -> list[bytes]:
    txs = []
    for name, (org, role) in CAST.items():
        keys = keys_for(name)
        body = EnrollMember(keys.verify_key, keys.encryption_key, role)
        txs.append(factory.signed(f"{org}/admin", "member.enroll", body))
    return txs


def record_body(record: int, variant: int, previous: int = 0) -> PutRecord:
    digest = hashlib.sha256(f"{record}/{variant}/{previous}".encode()).hexdigest()
    return PutRecord(
        record_id=f"rec-{record}",
        patient=keys_for("patient").member_id,
        resource_type="Observation",
        category=("laboratory", "vital-signs", "imaging")[variant],
        package_digest=digest,
        package_size=1000 + variant,
        commitment=hashlib.sha256(digest.encode()).digest(),
        threshold=2,
        custodians=CUSTODIANS,
        previous=previous,
    )


class TxFactory:
    """Turns drawn operations into signed transactions; nonces advance optimistically, so some
    transactions are refused — which is part of what replicas must agree on."""

    def __init__(self) -> None:
        self.nonces: dict[str, int] = {}

    def signed(self, name: str, tx_type: str, body: object, sender: str = "") -> bytes:
        keys = keys_for(name)
        sender_id = sender or keys.member_id
        nonce = self.nonces.get(sender_id, 0) + 1
        self.nonces[sender_id] = nonce
        return sign_transaction(keys, CHAIN_ID, nonce, tx_type, body, sender=sender_id)

    def build(self, op: tuple[object, ...]) -> bytes:
        match op:
            case ("enroll", org, i, role):
                keys = keys_for(f"member-{i}")
                body = EnrollMember(keys.verify_key, keys.encryption_key, role)  # type: ignore[arg-type]
                return self.signed(f"{org}/admin", "member.enroll", body)
            case ("rotate", i, generation):
                new = keys_for(f"member-{i}/gen-{generation}")
                member = keys_for(f"member-{i}").member_id
                return self.signed(
                    f"member-{i}",
                    "member.rotate",
                    RotateKey(member, new.verify_key, new.encryption_key),
                )
            case ("status", org, i, tx_type):
                member = keys_for(f"member-{i}").member_id
                return self.signed(
                    f"{org}/admin", str(tx_type), ChangeMemberStatus(member, "audit")
                )
            case ("propose", org, value):
                body = Propose(SetParameter("proposal_period_blocks", value), reason="tune")  # type: ignore[arg-type]
                return self.signed(f"{org}/admin", "gov.propose", body)
            case ("vote", org, proposal, approve):
                return self.signed(f"{org}/admin", "gov.vote", Vote(proposal, approve))  # type: ignore[arg-type]
            case ("garbage", data):
                return data  # type: ignore[return-value]
            case ("put", record, variant):
                author = ("author-a", "author-b", "author-a")[variant]  # type: ignore[index]
                return self.signed(author, "record.put", record_body(record, variant))  # type: ignore[arg-type]
            case ("amend", record, variant, previous):
                body = record_body(record, variant, previous)  # type: ignore[arg-type]
                return self.signed("author-a", "record.amend", body)
            case ("consent", org, purpose):
                patient = keys_for("patient").member_id
                start = 1_767_225_600 * 1_000_000_000
                body = GrantConsent(
                    patient,
                    GranteeKind.ORGANIZATION,
                    org,
                    ScopeKind.ALL,
                    (),
                    (purpose,),  # type: ignore[arg-type]
                    start,
                    start + 6 * HOUR_NS,
                )
                return self.signed("patient", "consent.grant", body)
            case ("revoke", which):
                body = RevokeConsent(keys_for("patient").member_id, f"{which:032x}")
                return self.signed("patient", "consent.revoke", body)
            case ("access", record, reader, purpose):
                body = RequestAccess(f"rec-{record}", purpose)  # type: ignore[arg-type]
                return self.signed(str(reader), "access.request", body)
            case ("emergency", record):
                body = RequestAccess(
                    f"rec-{record}",
                    Purpose.TREATMENT,
                    emergency=True,
                    emergency_reason="life-threatening",
                )
                return self.signed("er", "access.request", body)
            case ("erase", record):
                return self.signed(
                    "patient", "record.erase", EraseRecord(f"rec-{record}", "request")
                )
            case ("stale", org):
                return sign_transaction(
                    keys_for(f"{org}/admin"), CHAIN_ID, 1, "gov.vote", Vote(1, True)
                )
        raise AssertionError(op)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=blocks_strategy, restart_after=st.integers(0, 10))
def test_replicas_fed_the_same_blocks_agree(
    blocks: list[list[tuple[object, ...]]], restart_after: int
) -> None:
    factory = TxFactory()
    block_txs = [setup_block(factory)] + [[factory.build(op) for op in block] for block in blocks]
    app_state = genesis_app_state()
    with tempfile.TemporaryDirectory() as tmp:
        a = InProcessChain(Path(tmp) / "a.db", CHAIN_ID, app_state)
        b = InProcessChain(Path(tmp) / "b.db", CHAIN_ID, app_state)
        assert a.ledger.app_hash == b.ledger.app_hash
        for number, txs in enumerate(block_txs):
            if number == restart_after:
                # Replica b stops and starts again from its database.
                b.close()
                time_ns = b.time_ns
                b = InProcessChain(Path(tmp) / "b.db", CHAIN_ID, app_state)
                b.time_ns = time_ns
            outcome_a = a.run_block(txs)
            outcome_b = b.run_block(txs)
            assert outcome_a.app_hash == outcome_b.app_hash
            assert [(r.code, r.log) for r in outcome_a.results] == [
                (r.code, r.log) for r in outcome_b.results
            ]
        a.close()
        b.close()
