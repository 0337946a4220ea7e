"""Consortium governance: organizations and validators join or leave, and parameters change,
only by a vote of at least two thirds of the active member organizations."""

from __future__ import annotations

import msgspec

from medledger.crypto.keys import member_id_for
from medledger.ledger.context import BlockContext, BlockEffects, TxContext
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.identity import check_key, load_organization
from medledger.ledger.model import (
    PARAMS_KEY,
    PROPOSAL_SEQ_KEY,
    Member,
    Organization,
    Params,
    ProposalStatus,
    Role,
    Status,
    Validator,
    member_key,
    organization_key,
    proposal_key,
    validator_key,
)
from medledger.ledger.state import State
from medledger.ledger.transactions import (
    Action,
    AddOrganization,
    Propose,
    RemoveOrganization,
    RemoveValidator,
    SetParameter,
    SetValidator,
    Vote,
)

OPEN_PREFIX = b"proposal-open/"
KIB = 1024
HOUR = 3600
# Each parameter's allowed range: a vote cannot brick the chain (a `max_tx_bytes` too small for
# a governance transaction could never be undone) or make grants outlive their purpose.
PARAMETER_BOUNDS: dict[str, tuple[int, int]] = {
    "max_tx_bytes": (16 * KIB, 1024 * KIB),  # CometBFT's mempool refuses more than 1 MiB
    "proposal_period_blocks": (100, 1_000_000),
    "max_validators": (4, 150),
    "access_grant_seconds": (60, 7 * 24 * HOUR),
    "session_grant_seconds": (60, 24 * HOUR),
    "emergency_grant_seconds": (60, 24 * HOUR),
    "erasure_by_organization_admin": (0, 1),
}
# CometBFT caps the total voting power at 2**60 / 8; one validator's power stays far below.
MAX_VALIDATOR_POWER = 1_000_000
# Fewer custodians than this and a single node could decrypt (see `threshold_for`).
MIN_ORGANIZATIONS = 2


class Ballot(msgspec.Struct, frozen=True, array_like=True):
    organization: str
    approve: bool


class Proposal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: int
    proposer: str
    action: Action
    reason: str
    submitted_height: int
    expires_height: int
    ballots: tuple[Ballot, ...]
    status: ProposalStatus
    decided_height: int = 0
    outcome: str = ""


def load_params(state: State) -> Params:
    return state.read(PARAMS_KEY, Params) or Params()


def active_organizations(state: State) -> list[Organization]:
    return [o for o in state.read_all(b"org/", Organization) if o.status is Status.ACTIVE]


def votes_needed(organization_count: int) -> int:
    """At least two thirds of the organizations: ceil(2n/3)."""
    return (2 * organization_count + 2) // 3


def propose(state: State, ctx: TxContext, body: Propose) -> str:
    if not body.reason.strip():
        raise LedgerError(Code.INVALID_BODY, "a proposal needs a reason")
    check_action(state, body.action)
    proposal_id = (state.read(PROPOSAL_SEQ_KEY, int) or 0) + 1
    state.write(PROPOSAL_SEQ_KEY, proposal_id)
    proposal = Proposal(
        id=proposal_id,
        proposer=ctx.sender.organization,
        action=body.action,
        reason=body.reason,
        submitted_height=ctx.block.height,
        expires_height=ctx.block.height + load_params(state).proposal_period_blocks,
        ballots=(Ballot(ctx.sender.organization, True),),
        status=ProposalStatus.OPEN,
    )
    state.put(OPEN_PREFIX + f"{proposal_id:012d}".encode(), b"")
    outcome = _tally(state, ctx.block, ctx.effects, proposal)
    return f"proposal {proposal_id} {outcome}"


def vote(state: State, ctx: TxContext, body: Vote) -> str:
    proposal = state.read(proposal_key(body.proposal), Proposal)
    if proposal is None:
        raise LedgerError(Code.NOT_FOUND, f"unknown proposal {body.proposal}")
    if proposal.status is not ProposalStatus.OPEN:
        raise LedgerError(Code.CONFLICT, f"proposal {proposal.id} is {proposal.status}")
    if ctx.block.height > proposal.expires_height:
        raise LedgerError(Code.EXPIRED, f"proposal {proposal.id} expired")
    voter = ctx.sender.organization
    if any(b.organization == voter for b in proposal.ballots):
        raise LedgerError(Code.CONFLICT, f"{voter} already voted on proposal {proposal.id}")
    ballots = tuple(
        sorted((*proposal.ballots, Ballot(voter, body.approve)), key=lambda b: b.organization)
    )
    outcome = _tally(
        state, ctx.block, ctx.effects, msgspec.structs.replace(proposal, ballots=ballots)
    )
    return f"vote on proposal {proposal.id} recorded; {outcome}"


def expire_proposals(state: State, block: BlockContext) -> None:
    """At the end of each block, open proposals past their voting period expire."""
    for key, _ in list(state.scan(OPEN_PREFIX)):
        proposal_id = int(key[len(OPEN_PREFIX) :])
        proposal = state.read(proposal_key(proposal_id), Proposal)
        if proposal is not None and block.height > proposal.expires_height:
            _close(state, block, proposal, ProposalStatus.EXPIRED, "voting period ended")


def _tally(state: State, block: BlockContext, effects: BlockEffects, proposal: Proposal) -> str:
    voters = {o.id for o in active_organizations(state)}
    approvals = sum(1 for b in proposal.ballots if b.approve and b.organization in voters)
    rejections = sum(1 for b in proposal.ballots if not b.approve and b.organization in voters)
    needed = votes_needed(len(voters))
    if approvals >= needed:
        # Checked again when it executes: the state may have changed since it was proposed.
        try:
            check_action(state, proposal.action)
        except LedgerError as err:
            outcome = f"could not be applied: {err.message}"
            _close(state, block, proposal, ProposalStatus.FAILED, outcome)
            return f"passed ({approvals}/{len(voters)}) but {outcome}"
        outcome = apply_action(state, block, effects, proposal.action)
        _close(state, block, proposal, ProposalStatus.PASSED, outcome)
        return f"passed ({approvals}/{len(voters)}): {outcome}"
    if rejections > len(voters) - needed:
        _close(state, block, proposal, ProposalStatus.REJECTED, "rejected by vote")
        return f"rejected ({rejections}/{len(voters)} against)"
    state.write(proposal_key(proposal.id), proposal)
    return f"open ({approvals}/{needed} approvals needed)"


def _close(
    state: State, block: BlockContext, proposal: Proposal, status: ProposalStatus, outcome: str
) -> None:
    state.write(
        proposal_key(proposal.id),
        msgspec.structs.replace(
            proposal, status=status, decided_height=block.height, outcome=outcome
        ),
    )
    state.delete(OPEN_PREFIX + f"{proposal.id:012d}".encode())


def check_action(state: State, action: Action) -> None:
    """Refuse at proposal time what could never be applied."""
    match action:
        case AddOrganization():
            if not action.id or len(action.id) > 64 or not action.id.isascii():
                raise LedgerError(Code.INVALID_BODY, "organization id must be 1-64 ASCII chars")
            if state.get(organization_key(action.id)) is not None:
                raise LedgerError(Code.CONFLICT, f"organization {action.id} exists")
            check_key("admin verify_key", action.admin.verify_key)
            check_key("admin encryption_key", action.admin.encryption_key)
            check_key("node_encryption_key", action.node_encryption_key)
            check_key("node_verify_key", action.node_verify_key)
            if state.get(member_key(member_id_for(action.admin.verify_key))) is not None:
                raise LedgerError(Code.CONFLICT, "the admin key is already enrolled")
        case RemoveOrganization():
            org = load_organization(state, action.id)
            if org.status is not Status.ACTIVE:
                raise LedgerError(Code.CONFLICT, f"organization {org.id} is not active")
            if len(active_organizations(state)) - 1 < MIN_ORGANIZATIONS:
                raise LedgerError(
                    Code.CONFLICT,
                    f"the network needs at least {MIN_ORGANIZATIONS} active organizations, so"
                    " that no single node holds enough key shares to decrypt a record",
                )
        case SetValidator():
            check_key("validator pub_key", action.pub_key)
            if not 0 < action.power <= MAX_VALIDATOR_POWER:
                raise LedgerError(
                    Code.INVALID_BODY, f"validator power must be in 1..{MAX_VALIDATOR_POWER}"
                )
            org = load_organization(state, action.organization)
            if org.status is not Status.ACTIVE:
                raise LedgerError(Code.CONFLICT, f"organization {org.id} is not active")
        case RemoveValidator():
            if state.get(validator_key(action.pub_key)) is None:
                raise LedgerError(Code.NOT_FOUND, "no such validator")
        case SetParameter():
            if action.name not in Params.__struct_fields__:
                raise LedgerError(Code.INVALID_BODY, f"unknown parameter {action.name}")
            low, high = PARAMETER_BOUNDS[action.name]
            if not low <= action.value <= high:
                raise LedgerError(Code.INVALID_BODY, f"{action.name} must be in {low}..{high}")


def apply_action(state: State, block: BlockContext, effects: BlockEffects, action: Action) -> str:
    match action:
        case AddOrganization():
            admin_id = member_id_for(action.admin.verify_key)
            state.write(
                organization_key(action.id),
                Organization(
                    id=action.id,
                    name=action.name,
                    kind=action.kind,
                    admin=admin_id,
                    node_encryption_key=action.node_encryption_key,
                    node_verify_key=action.node_verify_key,
                    status=Status.ACTIVE,
                    joined_height=block.height,
                ),
            )
            state.write(
                member_key(admin_id),
                Member(
                    id=admin_id,
                    organization=action.id,
                    role=Role.ADMIN,
                    verify_key=action.admin.verify_key,
                    encryption_key=action.admin.encryption_key,
                    status=Status.ACTIVE,
                    enrolled_height=block.height,
                    status_height=block.height,
                    key_height=block.height,
                ),
            )
            return f"organization {action.id} added"
        case RemoveOrganization():
            org = load_organization(state, action.id)
            state.write(
                organization_key(org.id), msgspec.structs.replace(org, status=Status.REVOKED)
            )
            for validator in validators(state):
                if validator.organization == org.id:
                    _remove_validator(state, effects, validator.pub_key)
            return f"organization {org.id} removed"
        case SetValidator():
            state.write(
                validator_key(action.pub_key),
                Validator(action.pub_key, action.power, action.organization),
            )
            effects.validator_updates[action.pub_key] = action.power
            return f"validator {action.pub_key.hex()[:16]} power {action.power}"
        case RemoveValidator():
            _remove_validator(state, effects, action.pub_key)
            return f"validator {action.pub_key.hex()[:16]} removed"
        case SetParameter():
            params = msgspec.structs.replace(load_params(state), **{action.name: action.value})
            state.write(PARAMS_KEY, params)
            return f"parameter {action.name} = {action.value}"


def validators(state: State) -> list[Validator]:
    return state.read_all(b"validator/", Validator)


def _remove_validator(state: State, effects: BlockEffects, pub_key: bytes) -> None:
    remaining = [v for v in validators(state) if v.pub_key != pub_key]
    if not remaining:
        raise LedgerError(Code.CONFLICT, "cannot remove the last validator")
    state.delete(validator_key(pub_key))
    effects.validator_updates[pub_key] = 0
