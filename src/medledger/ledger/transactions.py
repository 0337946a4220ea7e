"""Transaction bodies: one struct per transaction type, named after what it does."""

from __future__ import annotations

import msgspec

from medledger.ledger.model import OrganizationKind, Role


class EnrollMember(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`member.enroll`: an organization admin enrolls a practitioner, patient or system client."""

    verify_key: bytes
    encryption_key: bytes
    role: Role


class RotateKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`member.rotate`: a member (or its organization's admin) replaces its keys."""

    member: str
    verify_key: bytes
    encryption_key: bytes


class ChangeMemberStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`member.suspend`, `member.reinstate`, `member.revoke`."""

    member: str
    reason: str


class AdminKeys(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    verify_key: bytes
    encryption_key: bytes


class AddOrganization(msgspec.Struct, frozen=True, tag="org.add", forbid_unknown_fields=True):
    id: str
    name: str
    kind: OrganizationKind
    admin: AdminKeys
    node_encryption_key: bytes
    node_verify_key: bytes


class RemoveOrganization(msgspec.Struct, frozen=True, tag="org.remove", forbid_unknown_fields=True):
    id: str


class SetValidator(msgspec.Struct, frozen=True, tag="validator.set", forbid_unknown_fields=True):
    """Add a validator or change its power; `organization` is the node operator."""

    pub_key: bytes
    power: int
    organization: str


class RemoveValidator(
    msgspec.Struct, frozen=True, tag="validator.remove", forbid_unknown_fields=True
):
    pub_key: bytes


class SetParameter(msgspec.Struct, frozen=True, tag="param.set", forbid_unknown_fields=True):
    name: str
    value: int


Action = AddOrganization | RemoveOrganization | SetValidator | RemoveValidator | SetParameter


class Propose(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`gov.propose`: an organization admin proposes one change to the consortium."""

    action: Action
    reason: str


class Vote(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`gov.vote`: an organization admin votes on an open proposal."""

    proposal: int
    approve: bool
