"""The table of transaction types: body, who may send it, and its state transition."""

from __future__ import annotations

from medledger.ledger import governance, identity
from medledger.ledger.context import TransactionRule
from medledger.ledger.model import Role
from medledger.ledger.transactions import (
    ChangeMemberStatus,
    EnrollMember,
    Propose,
    RotateKey,
    Vote,
)

ADMINS = frozenset({Role.ADMIN})
EVERYONE = frozenset(Role)

TRANSACTION_RULES: dict[str, TransactionRule] = {
    "member.enroll": TransactionRule(EnrollMember, ADMINS, identity.enroll_member),
    "member.rotate": TransactionRule(RotateKey, EVERYONE, identity.rotate_key),
    "member.suspend": TransactionRule(ChangeMemberStatus, ADMINS, identity.suspend_member),
    "member.reinstate": TransactionRule(ChangeMemberStatus, ADMINS, identity.reinstate_member),
    "member.revoke": TransactionRule(ChangeMemberStatus, ADMINS, identity.revoke_member),
    "gov.propose": TransactionRule(Propose, ADMINS, governance.propose),
    "gov.vote": TransactionRule(Vote, ADMINS, governance.vote),
}
