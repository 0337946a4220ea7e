"""The ledger driven in-process: identities, governance, bad input, crash recovery."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from conftest import CHAIN_ID, Consortium, genesis_app_state, keys_for

from medledger.client.tx import sign_transaction
from medledger.crypto.keys import KeyPair
from medledger.ledger import codec
from medledger.ledger.codec import Envelope
from medledger.ledger.errors import Code
from medledger.ledger.governance import Proposal
from medledger.ledger.model import (
    Member,
    Organization,
    OrganizationKind,
    Role,
    Status,
    member_key,
    organization_key,
    proposal_key,
)
from medledger.ledger.state import State
from medledger.ledger.transactions import (
    AddOrganization,
    AdminKeys,
    ChangeMemberStatus,
    EnrollMember,
    Propose,
    RemoveValidator,
    RotateKey,
    SetParameter,
    SetValidator,
    Vote,
)
from medledger.node.inprocess import InProcessChain


def enroll(c: Consortium, org: str, name: str, role: Role) -> KeyPair:
    keys = keys_for(name)
    result = c.submit(
        c.admin(org), "member.enroll", EnrollMember(keys.verify_key, keys.encryption_key, role)
    )
    assert result.ok, result.log
    return keys


def member(c: Consortium, member_id: str) -> Member | None:
    return State(c.chain.store).read(member_key(member_id), Member)


def test_genesis_creates_founding_organizations(consortium: Consortium) -> None:
    state = State(consortium.chain.store)
    org = state.read(organization_key("st-mary"), Organization)
    assert org is not None and org.kind is OrganizationKind.HOSPITAL
    admin = member(consortium, org.admin)
    assert admin is not None and admin.role is Role.ADMIN
    assert consortium.chain.ledger.height == 0 and len(consortium.chain.ledger.app_hash) == 32


def test_enroll_rotate_suspend_reinstate_revoke(consortium: Consortium) -> None:
    c = consortium
    doc = enroll(c, "st-mary", "dr-house", Role.CLINICIAN)
    assert member(c, doc.member_id).organization == "st-mary"  # type: ignore[union-attr]

    new_keys = keys_for("dr-house/2")
    rotate = RotateKey(doc.member_id, new_keys.verify_key, new_keys.encryption_key)
    assert c.submit(doc, "member.rotate", rotate).ok
    # The old key signs nothing from now on; the new one signs for the same id.
    again = RotateKey(doc.member_id, keys_for("x").verify_key, keys_for("x").encryption_key)
    assert c.submit(doc, "member.rotate", again, sender=doc.member_id).code is Code.BAD_SIGNATURE

    reason = ChangeMemberStatus(doc.member_id, "on leave")
    assert c.submit(c.admin("st-mary"), "member.suspend", reason).ok
    assert member(c, doc.member_id).status is Status.SUSPENDED  # type: ignore[union-attr]
    assert c.submit(c.admin("st-mary"), "member.reinstate", reason).ok
    assert c.submit(c.admin("st-mary"), "member.revoke", reason).ok
    assert c.submit(c.admin("st-mary"), "member.reinstate", reason).code is Code.CONFLICT
    revoked = member(c, doc.member_id)
    assert revoked is not None and revoked.status is Status.REVOKED
    assert revoked.status_height == c.chain.ledger.height - 1


def test_admin_cannot_manage_another_organizations_member(consortium: Consortium) -> None:
    c = consortium
    doc = enroll(c, "st-mary", "dr-grey", Role.CLINICIAN)
    result = c.submit(
        c.admin("riverside"), "member.suspend", ChangeMemberStatus(doc.member_id, "x")
    )
    assert result.code is Code.UNAUTHORIZED


def _state_root(c: Consortium) -> bytes:
    return c.chain.store.state_root()


BAD_INPUT_CASES = [
    "malformed",
    "wrong_chain",
    "bad_signature",
    "replayed_nonce",
    "unknown_sender",
    "unknown_type",
    "revoked_key",
    "oversized",
    "unauthorized_role",
    "invalid_body",
    "non_canonical",
]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_gets_clear_code_and_changes_nothing(consortium: Consortium, case: str) -> None:
    c = consortium
    admin = c.admin("st-mary")
    doc = enroll(c, "st-mary", "dr-who", Role.CLINICIAN)
    body = EnrollMember(keys_for("p").verify_key, keys_for("p").encryption_key, Role.PATIENT)
    nonce = c.nonces[admin.member_id] + 1
    expected: Code
    if case == "malformed":
        raw, expected = b"\x93not a transaction", Code.MALFORMED
    elif case == "wrong_chain":
        raw = sign_transaction(admin, "other-chain", nonce, "member.enroll", body)
        expected = Code.WRONG_CHAIN
    elif case == "bad_signature":
        good = sign_transaction(admin, CHAIN_ID, nonce, "member.enroll", body)
        envelope = codec.decode(good, Envelope)
        tampered = bytes([envelope.signature[0] ^ 1]) + envelope.signature[1:]
        raw = codec.encode(msgspec.structs.replace(envelope, signature=tampered))
        expected = Code.BAD_SIGNATURE
    elif case == "replayed_nonce":
        raw = sign_transaction(admin, CHAIN_ID, nonce - 1, "member.enroll", body)
        expected = Code.BAD_NONCE
    elif case == "unknown_sender":
        raw = sign_transaction(keys_for("stranger"), CHAIN_ID, 1, "member.enroll", body)
        expected = Code.UNKNOWN_SENDER
    elif case == "unknown_type":
        raw = sign_transaction(admin, CHAIN_ID, nonce, "record.teleport", body)
        expected = Code.UNKNOWN_TYPE
    elif case == "revoked_key":
        assert c.submit(admin, "member.revoke", ChangeMemberStatus(doc.member_id, "left")).ok
        rotate = RotateKey(doc.member_id, keys_for("y").verify_key, keys_for("y").encryption_key)
        raw = sign_transaction(doc, CHAIN_ID, 1, "member.rotate", rotate)
        expected = Code.SENDER_INACTIVE
    elif case == "oversized":
        big = RotateKey(doc.member_id, b"\x00" * 600_000, b"\x00" * 32)
        raw = sign_transaction(doc, CHAIN_ID, 1, "member.rotate", big)
        expected = Code.TOO_LARGE
    elif case == "unauthorized_role":
        raw = sign_transaction(doc, CHAIN_ID, 1, "member.enroll", body)
        expected = Code.UNAUTHORIZED
    elif case == "invalid_body":
        raw = sign_transaction(admin, CHAIN_ID, nonce, "member.enroll", {"role": "wizard"})
        expected = Code.INVALID_BODY
    else:
        good = sign_transaction(admin, CHAIN_ID, nonce, "member.enroll", body)
        fields = msgspec.msgpack.decode(good)
        # The same array with a 2-byte integer where 1 byte suffices: valid MessagePack,
        # but not the canonical form.
        raw = b"\x96" + msgspec.msgpack.encode(fields[0]) + msgspec.msgpack.encode(fields[1])
        raw += b"\xcd" + fields[2].to_bytes(2, "big")
        raw += b"".join(msgspec.msgpack.encode(f) for f in fields[3:])
        expected = Code.MALFORMED
    root_before = _state_root(c)
    checked = c.chain.ledger.check_tx(raw)
    assert checked.code is expected, checked.log
    outcome = c.run(raw)
    assert len(outcome.results) == 1
    assert outcome.results[0].code is expected
    assert outcome.results[0].log
    assert _state_root(c) == root_before


def test_each_transaction_gets_exactly_one_result(consortium: Consortium) -> None:
    c = consortium
    admin = c.admin("st-mary")
    txs = [
        c.tx(
            admin,
            "member.enroll",
            EnrollMember(keys_for(f"n{i}").verify_key, b"\x01" * 32, Role.PATIENT),
        )
        for i in range(5)
    ]
    outcome = c.run(txs[0], b"junk", *txs[1:], txs[1])
    assert [r.code for r in outcome.results] == [Code.OK, Code.MALFORMED] + [Code.OK] * 4 + [
        Code.BAD_NONCE
    ]


def _add_org_proposal(name: str) -> Propose:
    admin = keys_for(f"{name}/admin")
    return Propose(
        AddOrganization(
            id=name,
            name="Harbor Pharmacy",
            kind=OrganizationKind.PHARMACY,
            admin=AdminKeys(admin.verify_key, admin.encryption_key),
            node_encryption_key=keys_for(f"{name}/node").encryption_key,
            node_verify_key=keys_for(f"{name}/node").verify_key,
        ),
        reason="joins the pilot",
    )


def test_governance_needs_two_thirds_of_organizations(consortium: Consortium) -> None:
    c = consortium
    assert c.submit(c.admin("st-mary"), "gov.propose", _add_org_proposal("harbor")).ok
    assert c.submit(c.admin("riverside"), "gov.vote", Vote(1, True)).ok
    state = State(c.chain.store)
    assert state.read(organization_key("harbor"), Organization) is None  # 2 of 4: not yet
    assert c.submit(c.admin("riverside"), "gov.vote", Vote(1, True)).code is Code.CONFLICT
    assert c.submit(c.admin("careplus"), "gov.vote", Vote(1, True)).ok  # 3 of 4 >= 2/3
    assert state.read(organization_key("harbor"), Organization) is not None
    proposal = state.read(proposal_key(1), Proposal)
    assert proposal is not None and proposal.status == "passed"
    assert c.submit(c.admin("northside-lab"), "gov.vote", Vote(1, True)).code is Code.CONFLICT
    # The new organization's admin can act at once.
    enroll(c, "harbor", "pharmacist", Role.CLINICIAN)


def test_governance_rejection_and_validator_updates(consortium: Consortium) -> None:
    c = consortium
    new_validator = keys_for("validator-5").verify_key
    proposal = Propose(SetValidator(new_validator, 10, "riverside"), reason="second node")
    assert c.submit(c.admin("riverside"), "gov.propose", proposal).ok
    assert c.submit(c.admin("st-mary"), "gov.vote", Vote(1, False)).ok
    assert c.submit(c.admin("careplus"), "gov.vote", Vote(1, False)).ok  # 2 against of 4
    assert State(c.chain.store).read(proposal_key(1), Proposal).status == "rejected"  # type: ignore[union-attr]

    assert c.submit(c.admin("riverside"), "gov.propose", proposal).ok
    assert c.submit(c.admin("st-mary"), "gov.vote", Vote(2, True)).ok
    outcome = c.run(c.tx(c.admin("careplus"), "gov.vote", Vote(2, True)))
    assert outcome.results[0].ok
    assert outcome.validator_updates == [(new_validator, 10)]
    removal = Propose(RemoveValidator(new_validator), reason="decommissioned")
    assert c.submit(c.admin("riverside"), "gov.propose", removal).ok
    assert c.submit(c.admin("st-mary"), "gov.vote", Vote(3, True)).ok
    outcome = c.run(c.tx(c.admin("careplus"), "gov.vote", Vote(3, True)))
    assert outcome.validator_updates == [(new_validator, 0)]


def test_invalid_proposals_are_refused(consortium: Consortium) -> None:
    c = consortium
    admin = c.admin("st-mary")
    bad = [
        Propose(SetParameter("no_such_param", 3), reason="x"),
        Propose(SetParameter("max_tx_bytes", 0), reason="x"),
        Propose(SetValidator(b"\x01" * 31, 10, "st-mary"), reason="x"),
        Propose(SetValidator(b"\x01" * 32, 10, "no-such-org"), reason="x"),
        Propose(RemoveValidator(b"\x02" * 32), reason="x"),
        Propose(SetParameter("max_tx_bytes", 1000), reason=" "),
    ]
    for proposal in bad:
        assert not c.submit(admin, "gov.propose", proposal).ok
    assert c.submit(admin, "gov.vote", Vote(99, True)).code is Code.NOT_FOUND


def test_proposals_expire(tmp_path: Path) -> None:
    # Governance keeps the voting period within bounds (100 blocks at least); a genesis may
    # set a short one, as this test network does.
    app_state = json.loads(genesis_app_state())
    app_state["params"] = {"proposal_period_blocks": 2}
    chain = InProcessChain(tmp_path / "s.db", CHAIN_ID, json.dumps(app_state).encode())
    c = Consortium(chain)
    assert c.submit(c.admin("st-mary"), "gov.propose", _add_org_proposal("late")).ok
    c.run()
    c.run()
    c.run()
    assert c.submit(c.admin("riverside"), "gov.vote", Vote(1, True)).code is Code.CONFLICT
    assert State(chain.store).read(proposal_key(1), Proposal).status == "expired"  # type: ignore[union-attr]
    chain.close()


def test_crash_between_finalize_and_commit_recovers(tmp_path: Path) -> None:
    """A block finalized but not committed is gone after a restart; replaying it gives the
    same app hash, as CometBFT's handshake replay would."""
    c = Consortium(InProcessChain(tmp_path / "s.db", CHAIN_ID, genesis_app_state()))
    enroll(c, "st-mary", "dr-a", Role.CLINICIAN)
    committed = (c.chain.ledger.height, c.chain.ledger.app_hash)
    tx = c.tx(
        c.admin("st-mary"),
        "member.enroll",
        EnrollMember(keys_for("b").verify_key, b"\x02" * 32, Role.PATIENT),
    )
    ledger = c.chain.ledger
    staged = ledger.finalize_block(ledger.height + 1, c.chain.time_ns + 1, [tx])
    c.chain.store._writer.close()  # the process dies here: no Commit
    c.chain.store._reader.close()

    reopened = InProcessChain(tmp_path / "s.db", CHAIN_ID, genesis_app_state())
    assert (reopened.ledger.height, reopened.ledger.app_hash) == committed
    replayed = reopened.ledger.finalize_block(committed[0] + 1, c.chain.time_ns + 1, [tx])
    reopened.ledger.commit()
    assert replayed.app_hash == staged.app_hash
    assert State(reopened.store).read(member_key(keys_for("b").member_id), Member) is not None
    reopened.close()
