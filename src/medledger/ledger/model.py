"""The values the ledger keeps in its state, and where each one lives (its key)."""

from __future__ import annotations

from enum import StrEnum

import msgspec


class Role(StrEnum):
    ADMIN = "admin"
    CLINICIAN = "clinician"
    EMERGENCY = "emergency"
    LAB = "lab"
    BILLING = "billing"
    AUDITOR = "auditor"
    PATIENT = "patient"
    DELEGATE = "delegate"
    EHR = "ehr"
    LIS = "lis"


PRACTITIONER_ROLES = frozenset(
    {Role.CLINICIAN, Role.EMERGENCY, Role.LAB, Role.BILLING, Role.AUDITOR}
)
SYSTEM_ROLES = frozenset({Role.EHR, Role.LIS})


class Status(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"


class OrganizationKind(StrEnum):
    HOSPITAL = "hospital"
    CLINIC = "clinic"
    LAB = "lab"
    PHARMACY = "pharmacy"
    INSURER = "insurer"


class ProposalStatus(StrEnum):
    OPEN = "open"
    PASSED = "passed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    # Passed the vote, but could no longer be applied when it did (say, a second proposal to
    # add an organization that an earlier one added meanwhile): nothing was changed.
    FAILED = "failed"


class Member(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A ledger identity: practitioner, patient, system client or organization admin."""

    id: str
    organization: str
    role: Role
    verify_key: bytes
    encryption_key: bytes
    status: Status
    enrolled_height: int
    status_height: int
    key_height: int


class Organization(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    name: str
    kind: OrganizationKind
    admin: str
    node_encryption_key: bytes
    # The node's own signing key: it authenticates the node to its peers (package replication).
    node_verify_key: bytes
    status: Status
    joined_height: int


class Validator(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pub_key: bytes
    power: int
    organization: str


class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Chain parameters; governance may change each of them by name."""

    # Room for a put-many of MAX_RECORDS_PER_TX records (record packages are off-chain).
    max_tx_bytes: int = 512 * 1024
    proposal_period_blocks: int = 2000
    max_validators: int = 50
    # How long a granted access request lets its grantee obtain key shares.
    access_grant_seconds: int = 86_400
    # How long a session (`access.session`, a patient's records at once) lasts.
    session_grant_seconds: int = 900
    # Break-the-glass grants are short-lived.
    emergency_grant_seconds: int = 4 * 3600
    # 1: besides the patient, the admin of the author's organization may erase a record
    # (for instance on a patient's written request at the desk); 0: the patient only.
    erasure_by_organization_admin: int = 1


# Key layout. Every key is ASCII so that a state dump reads well.
PARAMS_KEY = b"params"
PROPOSAL_SEQ_KEY = b"proposal-seq"


def organization_key(org_id: str) -> bytes:
    return b"org/" + org_id.encode()


def member_key(member_id: str) -> bytes:
    return b"member/" + member_id.encode()


def nonce_key(member_id: str) -> bytes:
    return b"nonce/" + member_id.encode()


def validator_key(pub_key: bytes) -> bytes:
    return b"validator/" + pub_key.hex().encode()


def proposal_key(proposal_id: int) -> bytes:
    return b"proposal/" + f"{proposal_id:012d}".encode()
