"""Identities: organizations enroll their members; keys rotate; members are suspended,
reinstated or revoked. Each change takes effect at the height of the block that commits it."""

from __future__ import annotations

import msgspec

from medledger.crypto.keys import member_id_for
from medledger.ledger.context import TxContext
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.model import Member, Organization, Role, Status, member_key, organization_key
from medledger.ledger.state import State
from medledger.ledger.transactions import ChangeMemberStatus, EnrollMember, RotateKey

KEY_BYTES = 32


def check_key(name: str, key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise LedgerError(Code.INVALID_BODY, f"{name} must be {KEY_BYTES} bytes, got {len(key)}")


def load_member(state: State, member_id: str) -> Member:
    member = state.read(member_key(member_id), Member)
    if member is None:
        raise LedgerError(Code.NOT_FOUND, f"unknown member {member_id}")
    return member


def load_organization(state: State, org_id: str) -> Organization:
    org = state.read(organization_key(org_id), Organization)
    if org is None:
        raise LedgerError(Code.NOT_FOUND, f"unknown organization {org_id}")
    return org


def is_active(state: State, member: Member) -> bool:
    """A member may act while it and its organization are both active."""
    if member.status is not Status.ACTIVE:
        return False
    org = state.read(organization_key(member.organization), Organization)
    return org is not None and org.status is Status.ACTIVE


def enroll_member(state: State, ctx: TxContext, body: EnrollMember) -> str:
    """An organization's admin enrolls a member into that organization. An EHR system client
    may register patients (as a registration desk does), and nothing else."""
    if ctx.sender.role is Role.EHR and body.role is not Role.PATIENT:
        raise LedgerError(Code.UNAUTHORIZED, "an EHR client may enroll patients only")
    check_key("verify_key", body.verify_key)
    check_key("encryption_key", body.encryption_key)
    member_id = member_id_for(body.verify_key)
    if state.get(member_key(member_id)) is not None:
        raise LedgerError(Code.CONFLICT, f"member {member_id} is already enrolled")
    height = ctx.block.height
    state.write(
        member_key(member_id),
        Member(
            id=member_id,
            organization=ctx.sender.organization,
            role=body.role,
            verify_key=body.verify_key,
            encryption_key=body.encryption_key,
            status=Status.ACTIVE,
            enrolled_height=height,
            status_height=height,
            key_height=height,
        ),
    )
    return f"enrolled {member_id} as {body.role} of {ctx.sender.organization}"


def rotate_key(state: State, ctx: TxContext, body: RotateKey) -> str:
    """A member replaces its own keys, or its organization's admin does it for the member.
    The member's id stays the same; signatures by the old key fail from this height on."""
    check_key("verify_key", body.verify_key)
    check_key("encryption_key", body.encryption_key)
    member = load_member(state, body.member)
    ctx.effects.subject = member.id
    _require_self_or_admin(ctx.sender, member)
    if member.status is Status.REVOKED:
        raise LedgerError(Code.CONFLICT, f"member {member.id} is revoked; its keys cannot change")
    if body.verify_key == member.verify_key:
        raise LedgerError(Code.INVALID_BODY, "the new verify key equals the current one")
    state.write(
        member_key(member.id),
        _replace(
            member,
            verify_key=body.verify_key,
            encryption_key=body.encryption_key,
            key_height=ctx.block.height,
        ),
    )
    by = "" if ctx.sender.id == member.id else f" by admin {ctx.sender.id}"
    return f"rotated keys of {member.id}{by}"


def suspend_member(state: State, ctx: TxContext, body: ChangeMemberStatus) -> str:
    return _change_status(state, ctx, body, Status.SUSPENDED, allowed_from={Status.ACTIVE})


def reinstate_member(state: State, ctx: TxContext, body: ChangeMemberStatus) -> str:
    return _change_status(state, ctx, body, Status.ACTIVE, allowed_from={Status.SUSPENDED})


def revoke_member(state: State, ctx: TxContext, body: ChangeMemberStatus) -> str:
    """Revocation is final: a revoked identity can sign nothing after this height."""
    return _change_status(
        state, ctx, body, Status.REVOKED, allowed_from={Status.ACTIVE, Status.SUSPENDED}
    )


def _change_status(
    state: State,
    ctx: TxContext,
    body: ChangeMemberStatus,
    new_status: Status,
    allowed_from: set[Status],
) -> str:
    if not body.reason.strip():
        raise LedgerError(Code.INVALID_BODY, "a reason is required")
    member = load_member(state, body.member)
    ctx.effects.subject = member.id
    if member.organization != ctx.sender.organization:
        raise LedgerError(Code.UNAUTHORIZED, f"member {member.id} belongs to another organization")
    if member.id == ctx.sender.id:
        raise LedgerError(Code.UNAUTHORIZED, "an admin cannot change its own status")
    if member.status not in allowed_from:
        raise LedgerError(Code.CONFLICT, f"member {member.id} is {member.status}")
    state.write(
        member_key(member.id),
        _replace(member, status=new_status, status_height=ctx.block.height),
    )
    return f"{member.id} is now {new_status} (by admin {ctx.sender.id})"


def _require_self_or_admin(sender: Member, member: Member) -> None:
    if sender.id == member.id:
        return
    if sender.role is Role.ADMIN and sender.organization == member.organization:
        return
    raise LedgerError(
        Code.UNAUTHORIZED, "only the member or its organization's admin may rotate its keys"
    )


def _replace(member: Member, **changes: object) -> Member:
    return msgspec.structs.replace(member, **changes)
