"""`record.put-bundle`: a FHIR transaction Bundle as one ledger transaction — its directory
entries (Organization, Practitioner, ... it creates or updates), its records (new ones and
amendments), and the claims of a provider's history it holds with their payers' decisions —
applied in that order, all committed or none. A refused record leaves no directory entry
behind, and a claim is never imported without the records it names as supporting.

Each part keeps its own rules: the directory's (the entry's organization), the records'
(`record.put-many`: sent by an author role) and the claims' (`claim.import`: a billing,
clinician or EHR member of a provider organization, checked again here, so that a laboratory
system cannot import claims through a Bundle)."""

from __future__ import annotations

import msgspec

from medledger.ledger.claims import ImportClaims, import_claims
from medledger.ledger.context import TxContext
from medledger.ledger.directory import DirectoryWrite, PutDirectoryEntries, put_directory_entries
from medledger.ledger.errors import Code, LedgerError
from medledger.ledger.records import PutRecord, PutRecords, put_records
from medledger.ledger.state import State


class PutBundle(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    records: tuple[PutRecord, ...] = ()
    entries: tuple[DirectoryWrite, ...] = ()
    claims: ImportClaims | None = None


def put_bundle(state: State, ctx: TxContext, body: PutBundle) -> str:
    """Write the directory entries, then the records, then import the claims; any refusal
    refuses the whole Bundle (the transaction's overlay is dropped)."""
    if not (body.records or body.claims):
        raise LedgerError(Code.INVALID_BODY, "a bundle holds records or claims")
    done = []
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
