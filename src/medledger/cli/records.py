"""Commands for clinicians, patients and auditors: records, consent, access, audit and export.

Every command that changes the ledger or reads a record signs with a local keystore and talks
to one node: its CometBFT RPC (`--node`) for transactions and proven queries, and its HTTP API
(`--api`) for sealed packages and key release. Keys never leave this machine.

Exit codes: 0 success, 1 an error (one line on stderr), 2 a usage error, 3 access denied by the
ledger, 4 the record was erased.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medledger.cli.chain import node_option, signer_options
from medledger.cli.common import keys_dir_option, resolve_passphrase
from medledger.client.errors import EXIT_DENIED, EXIT_ERASED
from medledger.client.lightclient import VerifiedHeader, parse_timestamp
from medledger.client.records import (
    AccessDenied,
    AuditTrail,
    Disclosure,
    ProvenAuditEntry,
    RecordErased,
    RecordHistory,
    RecordsClient,
    RecordSummary,
    WrittenRecord,
)
from medledger.client.sdk import ClientError, LedgerClient, ProofError, QueryError, TxRejected
from medledger.crypto.keystore import Keyring, KeystoreError
from medledger.ledger.access import Basis, EmergencyReason, Grant
from medledger.ledger.consent import (
    RELATIONSHIPS,
    Consent,
    ConsentStatus,
    GranteeKind,
    Purpose,
    ScopeKind,
)
from medledger.ledger.errors import Code
from medledger.ledger.model import Member, Role
from medledger.ledger.records import RecordStatus
from medledger.validation import FhirValidationError, validate_resource

F = TypeVar("F", bound=Callable[..., Any])

API_ENV = "MEDLEDGER_API"
DEFAULT_API = "http://127.0.0.1:26660"  # a node's default api_listen
DEBUG_ENV = "MEDLEDGER_DEBUG"
SECOND_NS = 1_000_000_000
PURPOSES = [p.value for p in Purpose]
DURATION = re.compile(r"^(\d+)([mhdw])$")
DURATION_SECONDS = {"m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


# Columns of `audit` in CSV and keys of its JSON rows.
TRAIL_FIELDS = (
    "time",
    "height",
    "action",
    "member",
    "organization",
    "role",
    "outcome",
    "emergency",
    "emergency_reason",
    "detail",
    "tx",
    "audit_index",
)
DISCLOSURE_FIELDS = (
    "date",
    "recipient_member",
    "recipient_organization",
    "recipient_role",
    "purpose",
    "description",
    "resource_type",
    "record_id",
    "version",
    "basis",
    "consent_id",
    "emergency",
    "emergency_reason",
    "grant_id",
    "height",
    "audit_index",
)


class AccessDeniedExit(click.ClickException):
    exit_code = EXIT_DENIED


class ErasedExit(click.ClickException):
    exit_code = EXIT_ERASED


@contextlib.contextmanager
def clear_errors() -> Iterator[None]:
    """Every failure becomes one line on stderr and a non-zero exit code, never a traceback
    (set MEDLEDGER_DEBUG=1 to see one for an unexpected error)."""
    try:
        yield
    except (click.ClickException, click.Abort, click.exceptions.Exit):
        raise
    except AccessDenied as exc:
        raise AccessDeniedExit(f"access denied: {exc.log.removeprefix('denied: ')}") from None
    except RecordErased as exc:
        raise ErasedExit(str(exc)) from None
    except TxRejected as exc:
        if exc.code == Code.ERASED:
            raise ErasedExit(exc.log) from None
        raise click.ClickException(
            f"refused by the ledger ({_code_name(exc.code)}): {exc.log}"
        ) from None
    except QueryError as exc:
        raise click.ClickException(f"{_code_name(exc.code)}: {exc.log}") from None
    except ProofError as exc:
        raise click.ClickException(f"proof check failed: {exc}") from None
    except FhirValidationError as exc:
        problems = "; ".join(exc.problems[:5])
        more = f" (and {len(exc.problems) - 5} more)" if len(exc.problems) > 5 else ""
        detail = f": {problems}{more}" if problems else ""
        raise click.ClickException(f"{exc.message}{detail}") from None
    except (ClientError, KeystoreError) as exc:
        raise click.ClickException(str(exc)) from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise click.ClickException(f"unexpected answer from the node: {exc}") from None
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        raise click.ClickException(f"unexpected error ({type(exc).__name__}): {exc}") from None


def _code_name(code: int) -> str:
    try:
        return Code(code).name.lower().replace("_", " ")
    except ValueError:
        return f"code {code}"


# --- options and sessions ----------------------------------------------------------------


def api_option(func: F) -> F:
    return click.option(
        "--api",
        "api_url",
        default=lambda: os.environ.get(API_ENV, DEFAULT_API),
        show_default=f"${API_ENV} or {DEFAULT_API}",
        help="HTTP API of the same node (sealed packages, key release).",
    )(func)


def member_options(func: F) -> F:
    """--key/--keys-dir/--passphrase-file, --node and --api: who signs, and where."""
    return signer_options(node_option(api_option(func)))


@contextlib.contextmanager
def records_session(
    keys_dir: Path, key_name: str, passphrase: str | None, node_url: str, api_url: str
) -> Iterator[RecordsClient]:
    """A records client for the keystore's member on one node; errors become clear lines."""
    with clear_errors():
        keys = Keyring(keys_dir).load(key_name, resolve_passphrase(passphrase))
        ledger = LedgerClient(node_url)
        client = RecordsClient(ledger, api_url, keys)
        try:
            yield client
        finally:
            client.close()
            ledger.close()


@contextlib.contextmanager
def ledger_session(node_url: str) -> Iterator[LedgerClient]:
    with clear_errors(), LedgerClient(node_url) as ledger:
        yield ledger


def member_ref(keys_dir: Path, value: str) -> str:
    """A member id as given, or the member id of the local keystore of that name."""
    ring = Keyring(keys_dir)
    try:
        if ring.exists(value):
            return ring.public(value).member_id
    except (KeystoreError, ValueError):
        pass
    return value


def _console() -> Console:
    console = Console()
    # Piped or redirected output keeps whole ids on a line instead of 80 columns.
    return console if console.is_terminal else Console(width=240)


# --- times -------------------------------------------------------------------------------


def iso(time_ns: int) -> str:
    moment = datetime.fromtimestamp(time_ns // SECOND_NS, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def chain_time_ns(ledger: LedgerClient) -> int:
    """The time of the latest block, by the validators' clock (BFT time)."""
    stamp = parse_timestamp(ledger.rpc("status")["sync_info"]["latest_block_time"])
    return int(stamp.seconds) * SECOND_NS + int(stamp.nanos)


def parse_moment(value: str, *, end_of_day: bool, option: str) -> int:
    """An ISO 8601 date or date-time as nanoseconds since the epoch (UTC when no offset is
    given). A date alone means the whole day: its start, or with `end_of_day` its end."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
            if end_of_day:
                moment += timedelta(days=1)
        else:
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 date (2026-05-01) or date-time", param_hint=option
        ) from None
    return int(moment.timestamp()) * SECOND_NS + moment.microsecond * 1000


def parse_until(value: str, start_ns: int) -> int:
    """`--until`: a date or date-time, or a duration after the start (90m, 12h, 30d, 2w)."""
    match = DURATION.fullmatch(value.strip())
    if match:
        return start_ns + int(match.group(1)) * DURATION_SECONDS[match.group(2)] * SECOND_NS
    return parse_moment(value, end_of_day=True, option="--until")


# --- reading files -----------------------------------------------------------------------


def read_resource(path: Path) -> dict[str, Any]:
    """A FHIR resource from a JSON file, validated before anything is signed or uploaded."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise click.ClickException(f"no such file: {path}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None
    try:
        return validate_resource(data).resource
    except FhirValidationError as exc:
        problems = "; ".join(exc.problems[:5])
        detail = f": {problems}" if problems else ""
        raise click.ClickException(f"{path}: {exc.message}{detail}") from None


def _print_written(written: WrittenRecord) -> None:
    click.echo(f"record {written.record_id} v{written.version} committed")
    click.echo(f"  digest  {written.digest}")
    click.echo(f"  block   {written.outcome.height}")
    click.echo(f"  tx      {written.outcome.tx_hash}")


# --- record ------------------------------------------------------------------------------


@click.group()
def record() -> None:
    """Write, read, correct and erase health records (FHIR R4 resources)."""


@record.command("put")
@member_options
@click.option("--patient", required=True, help="Patient's member id (or keystore name).")
@click.option("--id", "record_id", default=None, help="Record id (default: a new UUID).")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def put(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    patient: str,
    record_id: str | None,
    file: Path,
) -> None:
    """Validate FILE (a FHIR R4 resource), seal it and commit it as a new record."""
    resource = read_resource(file)
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as client:
        written = client.put(resource, member_ref(keys_dir, patient), record_id)
    _print_written(written)


@record.command("amend")
@member_options
@click.argument("record_id")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def amend(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    record_id: str,
    file: Path,
) -> None:
    """Add a corrected version of a record; the previous one stays, marked superseded."""
    resource = read_resource(file)
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as client:
        written = client.amend(record_id, resource)
    _print_written(written)


@record.command("get")
@member_options
@click.argument("record_id")
@click.option("--version", type=int, default=0, help="Version number (default: the latest).")
@click.option(
    "--purpose", type=click.Choice(PURPOSES), default=Purpose.TREATMENT.value, show_default=True
)
@click.option(
    "--emergency",
    type=click.Choice([r.value for r in EmergencyReason]),
    default=None,
    help="Break the glass (emergency role only): flagged for the patient to see.",
)
@click.option("--own", is_flag=True, help="Open your own key envelope (patient or author).")
def get(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    record_id: str,
    version: int,
    purpose: str,
    emergency: str | None,
    own: bool,
) -> None:
    """Print a record's FHIR JSON on stdout (details on stderr).

    Without --own this is an access request the ledger decides and audits, then key shares
    from the custodian nodes; with --own the patient or author opens their own envelope."""
    if own and emergency:
        raise click.UsageError("--own and --emergency exclude each other")
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as client:
        if own:
            read = client.read_own(record_id, version)
        else:
            read = client.read(record_id, Purpose(purpose), version, emergency)
    click.echo(json.dumps(read.resource, indent=2, ensure_ascii=False))
    found = read.version
    how = "own key envelope"
    if read.grant_id:
        how = f"grant {read.grant_id}, key shares from {', '.join(read.shares_from)}"
    click.echo(
        f"record {found.record_id} v{found.version} ({found.status}, {found.resource_type})"
        f" read with {how}",
        err=True,
    )
    if found.status is not RecordStatus.CURRENT:
        reason = f": {found.status_reason}" if found.status_reason else ""
        click.echo(f"note: this version is {found.status}{reason}", err=True)


@record.command("history")
@node_option
@click.argument("record_id")
def history(node_url: str, record_id: str) -> None:
    """Every version of a record: who wrote it, when, its status and package digest."""
    with ledger_session(node_url) as ledger:
        found: RecordHistory = ledger.query("/record", record_id, RecordHistory)
    head = found.head
    erased = f", erased at block {head.erased_height}" if head.erased else ""
    click.echo(f"record {head.record_id} of patient {head.patient}: latest v{head.latest}{erased}")
    table = Table("version", "status", "author", "organization", "height", "time", "digest")
    for v in found.versions:
        status = escape(f"{v.status}: {v.status_reason}" if v.status_reason else str(v.status))
        table.add_row(
            str(v.version),
            status,
            v.author,
            v.author_organization,
            str(v.height),
            iso(v.time_ns),
            v.package_digest[:16],
        )
    _console().print(table)


@record.command("list")
@node_option
@keys_dir_option
@click.option("--patient", required=True, help="Patient's member id (or keystore name).")
def list_records(node_url: str, keys_dir: Path, patient: str) -> None:
    """A patient's records (metadata only; contents stay sealed off-chain)."""
    patient_id = member_ref(keys_dir, patient)
    with ledger_session(node_url) as ledger:
        summaries = ledger.query("/records", patient_id, list[RecordSummary])
    table = Table("record", "type", "category", "version", "status", "author org", "height", "time")
    for summary in sorted(summaries, key=lambda s: s.latest.height if s.latest else 0):
        latest = summary.latest
        if latest is None:
            continue
        status = "erased" if summary.head.erased else str(latest.status)
        table.add_row(
            summary.head.record_id,
            latest.resource_type,
            latest.category,
            str(latest.version),
            status,
            latest.author_organization,
            str(latest.height),
            iso(latest.time_ns),
        )
    _console().print(table)
    click.echo(f"{len(summaries)} records of patient {patient_id}")


@record.command("mark-error")
@member_options
@click.argument("record_id")
@click.argument("version", type=int)
@click.option("--reason", required=True, help="Why this version is wrong.")
def mark_error(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    record_id: str,
    version: int,
    reason: str,
) -> None:
    """Mark a version entered-in-error (it stays readable, flagged; nothing is rewritten)."""
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as client:
        outcome = client.mark_entered_in_error(record_id, version, reason)
    click.echo(f"record {record_id} v{version} marked entered-in-error in block {outcome.height}")


@record.command("erase")
@member_options
@click.argument("record_id")
@click.option("--reason", required=True, help="E.g. the patient's GDPR Art. 17 request.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def erase(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    record_id: str,
    reason: str,
    yes: bool,
) -> None:
    """Erase a record for good: every node destroys its packages and key shares; the chain
    keeps a tombstone with the non-identifying metadata."""
    if not yes:
        click.confirm(
            f"Erase every version of record {record_id}? This cannot be undone", abort=True
        )
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as client:
        outcome = client.erase(record_id, reason)
    click.echo(
        f"record {record_id} erased in block {outcome.height}; every node now deletes its"
        " packages and key shares"
    )


# --- consent -----------------------------------------------------------------------------


@click.group()
def consent() -> None:
    """Patients grant, revoke and list consents to read their records."""


@consent.command("grant")
@member_options
@click.option("--patient", required=True, help="Patient's member id (or keystore name).")
@click.option("--member", "grantee_member", help="Grant to one member (id or keystore name).")
@click.option("--org", "grantee_org", help="Grant to everyone acting for an organization.")
@click.option(
    "--role",
    "grantee_role",
    type=click.Choice([r.value for r in Role]),
    help="Grant to every member in a role.",
)
@click.option("--purpose", "purposes", type=click.Choice(PURPOSES), multiple=True, required=True)
@click.option("--resource-type", "resource_types", multiple=True, help="E.g. Observation.")
@click.option("--category", "categories", multiple=True, help="E.g. laboratory, vital-signs.")
@click.option("--record", "records", multiple=True, help="One record id (repeatable).")
@click.option("--from", "start", help="ISO date or date-time (default: now, by chain time).")
@click.option("--until", required=True, help="ISO date or date-time, or a duration: 30d, 12h.")
def grant(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    patient: str,
    grantee_member: str | None,
    grantee_org: str | None,
    grantee_role: str | None,
    purposes: tuple[str, ...],
    resource_types: tuple[str, ...],
    categories: tuple[str, ...],
    records: tuple[str, ...],
    start: str | None,
    until: str,
) -> None:
    """Consent to a grantee reading the patient's records (all, or some) for purposes."""
    grantees = [
        (kind, value)
        for kind, value in (
            (GranteeKind.MEMBER, grantee_member),
            (GranteeKind.ORGANIZATION, grantee_org),
            (GranteeKind.ROLE, grantee_role),
        )
        if value
    ]
    if len(grantees) != 1:
        raise click.UsageError("give exactly one of --member, --org and --role")
    scopes = [
        (kind, values)
        for kind, values in (
            (ScopeKind.RESOURCE_TYPES, resource_types),
            (ScopeKind.CATEGORIES, categories),
            (ScopeKind.RECORDS, records),
        )
        if values
    ]
    if len(scopes) > 1:
        raise click.UsageError("give at most one of --resource-type, --category and --record")
    scope_kind, scope = scopes[0] if scopes else (ScopeKind.ALL, ())
    grantee_kind, grantee = grantees[0]
    if grantee_kind is GranteeKind.MEMBER:
        grantee = member_ref(keys_dir, grantee)
    patient_id = member_ref(keys_dir, patient)
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as client:
        start_ns = (
            parse_moment(start, end_of_day=False, option="--from")
            if start
            else chain_time_ns(client.ledger)
        )
        end_ns = parse_until(until, start_ns)
        consent_id = client.grant_consent(
            patient_id,
            grantee_kind,
            grantee,
            tuple(Purpose(p) for p in purposes),
            start_ns,
            end_ns,
            scope_kind,
            tuple(scope),
        )
        granted = next((c for c in client.consents(patient_id) if c.id == consent_id), None)
    block = f" in block {granted.granted_height}" if granted is not None else ""
    click.echo(f"consent {consent_id} granted{block}")
    click.echo(f"  grantee   {grantee_kind} {grantee}")
    click.echo(f"  purposes  {', '.join(purposes)}")
    click.echo(f"  scope     {_scope_text(scope_kind, tuple(scope))}")
    click.echo(f"  valid     {iso(start_ns)} until {iso(end_ns)}")


def _scope_text(kind: ScopeKind, scope: Sequence[str]) -> str:
    return "all records" if kind is ScopeKind.ALL else f"{kind}: {', '.join(scope)}"


@consent.command("revoke")
@member_options
@click.option("--patient", required=True, help="Patient's member id (or keystore name).")
@click.argument("consent_id")
@click.option("--reason", default="", help="Why (kept on the ledger with the revocation).")
def revoke(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    patient: str,
    consent_id: str,
    reason: str,
) -> None:
    """Revoke a consent; it ends at its block, for every later access and key release."""
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as client:
        outcome = client.revoke_consent(member_ref(keys_dir, patient), consent_id, reason)
    click.echo(f"consent {consent_id} revoked in block {outcome.height}")


@consent.command("add-delegate")
@member_options
@click.argument("delegate")
@click.option(
    "--relationship",
    required=True,
    type=click.Choice(sorted(RELATIONSHIPS)),
    help="How the delegate relates to you.",
)
def add_delegate(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    delegate: str,
    relationship: str,
) -> None:
    """Name DELEGATE (member id or keystore name) to manage your consents and read your
    records. Only you can: the transaction is signed with your own key."""
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as client:
        delegate_id = member_ref(keys_dir, delegate)
        outcome = client.add_delegate(client.member_id, delegate_id, relationship)
    click.echo(f"{delegate_id} is your delegate ({relationship}) from block {outcome.height}")


@consent.command("remove-delegate")
@member_options
@click.option("--patient", default=None, help="The patient (default: yourself).")
@click.argument("delegate")
def remove_delegate(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    patient: str | None,
    delegate: str,
) -> None:
    """Remove DELEGATE: by the patient, or by the admin of the patient's organization."""
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as client:
        patient_id = member_ref(keys_dir, patient) if patient else client.member_id
        delegate_id = member_ref(keys_dir, delegate)
        outcome = client.remove_delegate(patient_id, delegate_id)
    click.echo(f"{delegate_id} is no longer a delegate of {patient_id} (block {outcome.height})")


def _consent_status(item: Consent, now_ns: int) -> str:
    if item.status is ConsentStatus.REVOKED:
        reason = f": {item.revoke_reason}" if item.revoke_reason else ""
        return f"revoked at block {item.revoked_height}{reason}"
    if now_ns >= item.end_ns:
        return "expired"
    if now_ns < item.start_ns:
        return "not yet valid"
    return "active"


@consent.command("list")
@node_option
@keys_dir_option
@click.option("--patient", required=True, help="Patient's member id (or keystore name).")
def list_consents(node_url: str, keys_dir: Path, patient: str) -> None:
    """A patient's consents, with their status at the chain's current time."""
    patient_id = member_ref(keys_dir, patient)
    with ledger_session(node_url) as ledger:
        consents = ledger.query("/consents", patient_id, list[Consent])
        now_ns = chain_time_ns(ledger)
    table = Table("consent", "grantee", "purposes", "scope", "from", "until", "status")
    for item in consents:
        table.add_row(
            item.id,
            f"{item.grantee_kind} {item.grantee}",
            ", ".join(item.purposes),
            _scope_text(item.scope_kind, item.scope),
            iso(item.start_ns),
            iso(item.end_ns),
            escape(_consent_status(item, now_ns)),
        )
    _console().print(table)
    click.echo(f"{len(consents)} consents of patient {patient_id}")


# --- access ------------------------------------------------------------------------------


@click.group()
def access() -> None:
    """Ask the ledger for access to a record (without reading it yet)."""


@access.command("request")
@member_options
@click.argument("record_id")
@click.option("--purpose", type=click.Choice(PURPOSES), required=True)
@click.option("--version", type=int, default=0, help="Version number (default: the latest).")
@click.option(
    "--emergency",
    type=click.Choice([r.value for r in EmergencyReason]),
    default=None,
    help="Break the glass (emergency role only): flagged for the patient to see.",
)
def request(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    record_id: str,
    purpose: str,
    version: int,
    emergency: str | None,
) -> None:
    """Request access; prints the grant, or the denial reason with exit code 3."""
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as client:
        grant_id = client.request_access(record_id, Purpose(purpose), version, emergency)
        granted = client.grant(grant_id)
    click.echo(f"granted: grant {grant_id}")
    click.echo(f"  record    {granted.record_id} v{granted.version} ({granted.resource_type})")
    click.echo(f"  purpose   {granted.purpose}")
    click.echo(f"  basis     {_basis_text(granted)}")
    click.echo(f"  expires   {iso(granted.expires_ns)}")


def _basis_text(item: Grant) -> str:
    """Why the ledger granted access, in words."""
    match item.basis:
        case Basis.CONSENT:
            return f"under consent {item.consent_id}"
        case Basis.EMERGENCY:
            return f"EMERGENCY (break-the-glass: {item.emergency_reason})"
        case Basis.AUTHOR_ORGANIZATION:
            return "the author's organization"
        case Basis.PATIENT:
            return "the patient"
        case Basis.CLAIM_INSURER:
            return "the insurer of the claim this document belongs to"
        case Basis.CLAIM_PROVIDER:
            return "the provider of the claim this document belongs to"
    return str(item.basis)


# --- audit -------------------------------------------------------------------------------


def _outcome(proven: ProvenAuditEntry) -> str:
    code = proven.entry.code
    if code == Code.OK:
        return "granted" if proven.entry.type in ("access.request", "access.session") else "ok"
    if code == Code.ACCESS_DENIED:
        return "denied"
    return f"refused ({_code_name(code)})"


def _trail_rows(client: RecordsClient, trail: AuditTrail) -> list[dict[str, Any]]:
    members: dict[str, Member | None] = {}
    rows = []
    for proven in trail.entries:
        entry = proven.entry
        if entry.sender not in members:
            members[entry.sender] = client.member(entry.sender)
        member = members[entry.sender]
        granted = client.grant(proven.grant_id) if proven.granted_access else None
        rows.append(
            {
                "time": iso(proven.time_ns),
                "height": proven.height,
                "action": entry.type,
                "member": entry.sender,
                "organization": member.organization if member else "",
                "role": str(member.role) if member else "",
                "outcome": _outcome(proven),
                "emergency": bool(granted and granted.emergency),
                "emergency_reason": granted.emergency_reason if granted else "",
                "detail": entry.log,
                "tx": entry.tx_hash.hex(),
                "audit_index": proven.index,
            }
        )
    return rows


def _disclosure_row(item: Disclosure) -> dict[str, Any]:
    granted = item.grant
    recipient = item.recipient
    return {
        "date": iso(granted.time_ns),
        "recipient_member": granted.requester,
        "recipient_organization": granted.requester_organization,
        "recipient_role": str(recipient.role) if recipient else "",
        "purpose": str(granted.purpose),
        "description": (
            f"{granted.resource_type} record {granted.record_id} v{granted.version}"
            f", {_basis_text(granted)}"
        ),
        "resource_type": granted.resource_type,
        "record_id": granted.record_id,
        "version": granted.version,
        "basis": str(granted.basis),
        "consent_id": granted.consent_id,
        "emergency": granted.emergency,
        "emergency_reason": granted.emergency_reason,
        "grant_id": granted.id,
        "height": granted.height,
        "audit_index": item.entry.index,
    }


def _proof_line(header: VerifiedHeader) -> str:
    return (
        f"proven against header {header.height} signed by"
        f" {header.signed_power}/{header.total_power} voting power"
    )


def _proof_json(header: VerifiedHeader) -> dict[str, Any]:
    return {
        "chain_id": header.chain_id,
        "header": header.height,
        "app_hash": header.app_hash.hex(),
        "signed_power": header.signed_power,
        "total_power": header.total_power,
    }


def _write_csv(rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
    writer = csv.DictWriter(sys.stdout, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: ("yes" if v else "no") if isinstance(v, bool) else v for k, v in row.items()}
        )


@click.command()
@member_options
@click.option("--patient", required=True, help="Patient's member id (or keystore name).")
@click.option(
    "--format",
    "output",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
)
@click.option(
    "--disclosures", is_flag=True, help="Only the HIPAA §164.528 accounting of disclosures."
)
@click.option("--from", "start", help="From this ISO date or date-time (block time).")
@click.option("--until", "end", help="Up to this ISO date (inclusive) or date-time.")
def audit(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    patient: str,
    output: str,
    disclosures: bool,
    start: str | None,
    end: str | None,
) -> None:
    """Who accessed a patient's data: every audit entry about the patient (or, with
    --disclosures, every disclosure), each proven against a header the validators signed."""
    start_ns = parse_moment(start, end_of_day=False, option="--from") if start else 0
    end_ns = parse_moment(end, end_of_day=True, option="--until") if end else None
    patient_id = member_ref(keys_dir, patient)
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as client:
        trail = client.verified_audit_trail(patient_id)
        chosen = [
            proven
            for proven in trail.entries
            if start_ns <= proven.time_ns and (end_ns is None or proven.time_ns < end_ns)
        ]
        trail = dataclasses.replace(trail, entries=chosen)
        if disclosures:
            rows = [_disclosure_row(d) for d in client.disclosures(patient_id, trail)]
        else:
            rows = _trail_rows(client, trail)
    kind = "disclosures" if disclosures else "entries"
    if output == "json":
        document = {"patient": patient_id, "proof": _proof_json(trail.header), kind: rows}
        click.echo(json.dumps(document, indent=2, ensure_ascii=False))
        return
    if output == "csv":
        _write_csv(rows, DISCLOSURE_FIELDS if disclosures else TRAIL_FIELDS)
        click.echo(_proof_line(trail.header), err=True)
        return
    if disclosures:
        _print_disclosures(rows)
    else:
        _print_trail(rows)
    click.echo(f"{kind}: {len(rows)} about patient {patient_id}, each {_proof_line(trail.header)}")


def _print_trail(rows: list[dict[str, Any]]) -> None:
    table = Table("time", "block", "action", "member", "org", "role", "outcome", "detail")
    for row in rows:
        outcome = row["outcome"]
        if row["emergency"]:
            outcome = f"[bold red]{outcome} EMERGENCY ({escape(row['emergency_reason'])})[/]"
        table.add_row(
            row["time"],
            str(row["height"]),
            row["action"],
            row["member"],
            row["organization"],
            row["role"],
            outcome,
            escape(row["detail"]),
        )
    _console().print(table)


def _print_disclosures(rows: list[dict[str, Any]]) -> None:
    table = Table("date", "recipient", "organization", "role", "purpose", "description")
    for row in rows:
        description = escape(row["description"])
        if row["emergency"]:
            description = f"[bold red]EMERGENCY[/] {description}"
        table.add_row(
            row["date"],
            row["recipient_member"],
            row["recipient_organization"],
            row["recipient_role"],
            row["purpose"],
            description,
        )
    _console().print(table)


# --- export ------------------------------------------------------------------------------


@click.command()
@member_options
@click.option("--patient", required=True, help="Patient's member id (or keystore name).")
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), help="File (default: stdout)."
)
def export(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    patient: str,
    output: Path | None,
) -> None:
    """Export a patient's records, decrypted here, as a FHIR Bundle (GDPR Art. 15/20)."""
    patient_id = member_ref(keys_dir, patient)
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as client:
        bundle = client.export_bundle(patient_id)
    text = json.dumps(bundle, indent=2, ensure_ascii=False) + "\n"
    count = len(bundle["entry"])
    if output is None:
        click.echo(text, nl=False)
        return
    with clear_errors():
        output.write_text(text, encoding="utf-8")
    click.echo(f"exported {count} records of patient {patient_id} to {output}", err=True)
