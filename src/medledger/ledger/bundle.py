"""`record.put-bundle`: a FHIR transaction Bundle as one ledger transaction — the patients it
registers, its directory entries (Organization, Practitioner, ... it creates or updates), its
records (new ones and amendments), and the claims of a provider's history it holds with their
payers' decisions — applied in that order, all committed or none. A refused record leaves no
patient or directory entry behind, and a claim is never imported without the records it names
as supporting. Registering the Bundle's new patients in the same transaction also keeps the
Bundle in one block: sent as transactions of their own just ahead of it, an enrollment often
had a block to itself and the Bundle waited for the next.

Each part keeps its own rules: the enrollments' (`member.enroll`; in a Bundle only patients,
only by an EHR client, the registration desk), the directory's (the entry's organization), the
records' (`record.put-many`: sent by an author role) and the claims' (`claim.import`: a
billing, clinician or EHR member of a provider organization, checked again here, so that a
laboratory system cannot import claims through a Bundle)."""

from __future__ import annotations

import msgspec

from medledger.ledger.claims import ImportClaims, import_claims
from medledger.ledger.context import TxContext
from medledger.ledger.directory import DirectoryWrite, PutDirectoryEntries, put_directory_entries
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.identity import enroll_member
from medledger.ledger.model import Role
from medledger.ledger.records import PutRecord, PutRecords, put_records
from medledger.ledger.state import State
from medledger.ledger.transactions import EnrollMember

MAX_PATIENTS_PER_BUNDLE = 100


class PutBundle(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    records: tuple[PutRecord, ...] = ()
    entries: tuple[DirectoryWrite, ...] = ()
    claims: ImportClaims | None = None
    patients: tuple[EnrollMember, ...] = ()  # the Bundle's new patients, enrolled first


def put_bundle(state: State, ctx: TxContext, body: PutBundle) -> str:
    """Enroll the new patients, write the directory entries, then the records, then import the
    claims; any refusal refuses the whole Bundle (the transaction's overlay is dropped)."""
    if not (body.records or body.claims):
        raise LedgerError(Code.INVALID_BODY, "a bundle holds records or claims")
    done = []
    if body.patients:
        if ctx.sender.role is not Role.EHR:
            raise LedgerError(
                Code.UNAUTHORIZED, f"role {ctx.sender.role} may not enroll patients in a bundle"
            )
        if len(body.patients) > MAX_PATIENTS_PER_BUNDLE:
            raise LedgerError(
                Code.INVALID_BODY, f"a bundle enrolls at most {MAX_PATIENTS_PER_BUNDLE} patients"
            )
        for position, enrollment in enumerate(body.patients):
            if enrollment.role is not Role.PATIENT:
                raise LedgerError(Code.INVALID_BODY, "a bundle enrolls patients only")
            try:
                enroll_member(state, ctx, enrollment)
            except LedgerError as err:
                raise LedgerError(err.code, f"patient {position}: {err.message}") from None
        done.append(f"{len(body.patients)} patients enrolled")
    if body.entries:
        try:
            put_directory_entries(state, ctx, PutDirectoryEntries(body.entries))
        except LedgerError as err:
            raise LedgerError(err.code, f"directory {err.message}") from None
        done.append(f"{len(body.entries)} directory entries")
    subject = ""
    if body.records:
        done.append(put_records(state, ctx, PutRecords(body.records)))
        subject = ctx.effects.subject
    if body.claims is not None:
        done.append(import_claims(state, ctx, body.claims))
        if body.records and ctx.effects.subject != subject:
            ctx.effects.subject = ""  # the claims are about another patient too
    return "; ".join(done)
