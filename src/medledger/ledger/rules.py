"""The table of transaction types: body, who may send it, and its state transition."""

from __future__ import annotations

from medledger.ledger import (
    access,
    bundle,
    claims,
    clients,
    consent,
    directory,
    governance,
    identity,
    records,
)
from medledger.ledger.access import RequestAccess, RequestSession
from medledger.ledger.bundle import PutBundle
from medledger.ledger.claims import (
    APPEAL_ROLES,
    PAYER_ROLES,
    SUBMITTER_ROLES,
    AdjudicateClaim,
    AppealClaim,
    ImportClaims,
    PayClaim,
    SubmitClaim,
)
from medledger.ledger.clients import RegisterClient, RevokeClient
from medledger.ledger.consent import GrantConsent, RevokeConsent, SetDelegate
from medledger.ledger.context import TransactionRule
from medledger.ledger.model import PRACTITIONER_ROLES, SYSTEM_ROLES, Role
from medledger.ledger.records import (
    AUTHOR_ROLES,
    EraseRecord,
    MarkEnteredInError,
    PutRecord,
    PutRecords,
)
from medledger.ledger.transactions import (
    ChangeMemberStatus,
    EnrollMember,
    Propose,
    RotateKey,
    Vote,
)

ADMINS = frozenset({Role.ADMIN})
EVERYONE = frozenset(Role)
PATIENT_SIDE = frozenset({Role.PATIENT, Role.DELEGATE, Role.ADMIN} | PRACTITIONER_ROLES)
READERS = frozenset(PRACTITIONER_ROLES | SYSTEM_ROLES | {Role.PATIENT, Role.DELEGATE})

TRANSACTION_RULES: dict[str, TransactionRule] = {
    "member.enroll": TransactionRule(
        EnrollMember, frozenset({Role.ADMIN, Role.EHR}), identity.enroll_member
    ),
    "member.rotate": TransactionRule(RotateKey, EVERYONE, identity.rotate_key),
    "member.suspend": TransactionRule(ChangeMemberStatus, ADMINS, identity.suspend_member),
    "member.reinstate": TransactionRule(ChangeMemberStatus, ADMINS, identity.reinstate_member),
    "member.revoke": TransactionRule(ChangeMemberStatus, ADMINS, identity.revoke_member),
    "gov.propose": TransactionRule(Propose, ADMINS, governance.propose),
    "gov.vote": TransactionRule(Vote, ADMINS, governance.vote),
    "record.put": TransactionRule(PutRecord, AUTHOR_ROLES, records.put_record),
    "record.amend": TransactionRule(PutRecord, AUTHOR_ROLES, records.amend_record),
    "record.put-many": TransactionRule(PutRecords, AUTHOR_ROLES, records.put_records),
    # A FHIR transaction Bundle: directory entries, records and claims at once (each checked).
    "record.put-bundle": TransactionRule(PutBundle, AUTHOR_ROLES, bundle.put_bundle),
    "record.mark-error": TransactionRule(
        MarkEnteredInError, AUTHOR_ROLES, records.mark_entered_in_error
    ),
    "record.erase": TransactionRule(EraseRecord, EVERYONE, records.erase_record),
    # Consent is managed by the patient or a delegate; the rule function checks which member.
    "consent.grant": TransactionRule(GrantConsent, EVERYONE, consent.grant_consent),
    "consent.revoke": TransactionRule(RevokeConsent, EVERYONE, consent.revoke_consent),
    "delegate.add": TransactionRule(
        SetDelegate, frozenset({Role.PATIENT, Role.ADMIN}), consent.add_delegate
    ),
    "delegate.remove": TransactionRule(
        SetDelegate, frozenset({Role.PATIENT, Role.ADMIN}), consent.remove_delegate
    ),
    "access.request": TransactionRule(RequestAccess, READERS, access.request_access),
    "access.session": TransactionRule(RequestSession, READERS, access.request_session),
    "client.register": TransactionRule(RegisterClient, ADMINS, clients.register_client),
    "client.revoke": TransactionRule(RevokeClient, ADMINS, clients.revoke_client),
    # Claims: the rule functions check the organization (provider or the claim's insurer).
    "claim.submit": TransactionRule(SubmitClaim, SUBMITTER_ROLES, claims.submit_claim),
    "claim.adjudicate": TransactionRule(AdjudicateClaim, PAYER_ROLES, claims.adjudicate_claim),
    "claim.pay": TransactionRule(PayClaim, PAYER_ROLES, claims.pay_claim),
    "claim.appeal": TransactionRule(AppealClaim, APPEAL_ROLES, claims.appeal_claim),
    "claim.import": TransactionRule(ImportClaims, SUBMITTER_ROLES, claims.import_claims),
    # The shared directory (not PHI): the rule function checks the entry's organization.
    "directory.put": TransactionRule(
        directory.PutDirectoryEntries, directory.DIRECTORY_ROLES, directory.put_directory_entries
    ),
}
