"""`medledger claim`: providers submit claims, insurers adjudicate and pay, providers and
patients appeal; anyone with a node's address sees a claim's history, the claims of a patient,
provider or insurer, and per-organization statistics computed by the ledger.

The FHIR Claim and ClaimResponses are sealed records (read them with `medledger record get`,
for purpose payment); the ledger holds only codes, dates of service and amounts.

Exit codes: 0 success, 1 an error (one line on stderr), 2 a usage error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import msgspec
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medledger.cli.chain import node_option
from medledger.cli.common import keys_dir_option
from medledger.cli.records import (
    iso,
    ledger_session,
    member_options,
    member_ref,
    read_resource,
    records_session,
)
from medledger.client.claims import (
    ClaimError,
    ClaimResult,
    ClaimsClient,
    claim_filter,
    deny_all,
    to_minor_units,
)
from medledger.ledger.claims import (
    CODE_SYSTEM_NAMES,
    REASON_CODES,
    SERVICE_CODES,
    AppealReason,
    Claim,
    ClaimStats,
    ItemDecision,
    PartyStats,
    code_system,
    format_amount,
)

SECOND_NS = 1_000_000_000
FORMATS = click.Choice(["table", "json"])


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=240)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(msgspec.to_builtins(value), indent=2, ensure_ascii=False))


def _reasons(text: str, option: str) -> tuple[str, ...]:
    reasons = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = [r for r in reasons if r not in REASON_CODES]
    if unknown:
        raise click.BadParameter(
            f"unknown reason code(s) {', '.join(unknown)}; see `medledger claim codes`",
            param_hint=option,
        )
    return reasons


def parse_item_decisions(claim: Claim, specs: tuple[str, ...]) -> tuple[ItemDecision, ...]:
    """`--item SEQ=AMOUNT[:REASON,...]` per decided item; items not named are approved in full."""
    chosen: dict[int, ItemDecision] = {}
    for spec in specs:
        head, _, reasons = spec.partition(":")
        sequence, equals, amount = head.partition("=")
        if not equals or not sequence.strip().isdigit():
            raise click.BadParameter(
                f"{spec!r}: expected SEQ=AMOUNT[:REASON,...]", param_hint="--item"
            )
        try:
            cents = to_minor_units(amount.strip(), f"item {sequence}")
        except ClaimError as exc:
            raise click.BadParameter(str(exc), param_hint="--item") from None
        number = int(sequence)
        if number in chosen:
            raise click.BadParameter(f"item {number} is given twice", param_hint="--item")
        chosen[number] = ItemDecision(number, cents, _reasons(reasons, "--item"))
    known = {i.sequence for i in claim.items}
    strangers = sorted(set(chosen) - known)
    if strangers:
        raise click.BadParameter(
            f"claim {claim.id} has no item {', '.join(map(str, strangers))}", param_hint="--item"
        )
    return tuple(chosen.get(i.sequence, ItemDecision(i.sequence, i.amount)) for i in claim.items)


def _print_step(verb: str, result: ClaimResult) -> None:
    claim = result.claim
    click.echo(f"claim {claim.id} {verb} in block {result.outcome.height}")
    click.echo(f"  status    {_status(claim)}")
    click.echo(f"  billed    {format_amount(claim.total, claim.currency)}")
    if claim.outcome is not None:
        click.echo(f"  approved  {format_amount(claim.approved_total, claim.currency)}")
        click.echo(f"  paid      {format_amount(claim.paid_total, claim.currency)}")
    if result.record_id:
        click.echo(f"  record    {result.record_id}")
    click.echo(f"  tx        {result.outcome.tx_hash}")


def _status(claim: Claim) -> str:
    return f"{claim.status} ({claim.outcome})" if claim.outcome is not None else str(claim.status)


# --- the group ---------------------------------------------------------------------------


@click.group()
def claim() -> None:
    """Claims and billing transparency: submit, adjudicate, pay, appeal, show, list, stats."""


@claim.command("submit")
@member_options
@click.option("--id", "claim_id", default=None, help="Claim id (default: a new UUID).")
@click.option("--support", "supporting", multiple=True, help="A supporting record id (repeatable).")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def submit(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    claim_id: str | None,
    supporting: tuple[str, ...],
    file: Path,
) -> None:
    """Submit FILE, a FHIR R4 Claim (use "claim"), for your provider organization: it is sealed
    as a record and the claim is committed with it in one transaction."""
    resource = read_resource(file)
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as records:
        result = ClaimsClient(records).submit(resource, supporting, claim_id)
    _print_step("submitted", result)
    found = result.claim
    click.echo(
        f"  parties   {found.provider} -> insurer {found.payer_name} (patient {found.patient})"
    )
    click.echo(f"  items     {len(found.items)}")
    if found.duplicate_of:
        click.echo(
            f"warning: flagged as a possible duplicate of claim {found.duplicate_of}"
            " (same provider, patient, service and date of service)",
            err=True,
        )


@claim.command("adjudicate")
@member_options
@click.argument("claim_id")
@click.option(
    "--item",
    "items",
    multiple=True,
    metavar="SEQ=AMOUNT[:REASON,...]",
    help="Approve AMOUNT for item SEQ with X12 CARC reasons for a reduction (repeatable);"
    " other items are approved in full.",
)
@click.option("--deny", "deny", metavar="REASON[,...]", help="Deny every item with these reasons.")
@click.option(
    "--response",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A FHIR ClaimResponse to store; the decisions are read from it.",
)
def adjudicate(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    claim_id: str,
    items: tuple[str, ...],
    deny: str | None,
    response: Path | None,
) -> None:
    """Decide a claim as its insurer (approved, partially approved or denied, which the
    amounts imply). Without options every item is approved in full."""
    if sum(bool(x) for x in (items, deny, response)) > 1:
        raise click.UsageError("give at most one of --item, --deny and --response")
    document = read_resource(response) if response is not None else None
    reasons = _reasons(deny, "--deny") if deny else ()
    if deny and not reasons:
        raise click.BadParameter("give at least one reason code", param_hint="--deny")
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as records:
        client = ClaimsClient(records)
        decisions = None
        if items or reasons:
            current = client.show(claim_id)
            decisions = (
                parse_item_decisions(current, items) if items else deny_all(current, reasons)
            )
        result = client.adjudicate(claim_id, decisions, document)
    _print_step("adjudicated", result)
    for decision in result.claim.decisions:
        why = ", ".join(f"{r} {REASON_CODES.get(r, '')}".strip() for r in decision.reasons)
        amount = format_amount(decision.approved, result.claim.currency)
        click.echo(f"  item {decision.sequence}  {amount}" + (f"  ({why})" if why else ""))


@claim.command("pay")
@member_options
@click.argument("claim_id")
@click.option("--reference", required=True, help="Payment reference (e.g. EFT trace number).")
@click.option("--amount", default=None, help="The amount paid (default: what is outstanding).")
def pay(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    claim_id: str,
    reference: str,
    amount: str | None,
) -> None:
    """Record payment of the approved amount not yet paid, as the claim's insurer."""
    try:
        cents = None if amount is None else to_minor_units(amount, "--amount")
    except ClaimError as exc:
        raise click.BadParameter(str(exc), param_hint="--amount") from None
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as records:
        result = ClaimsClient(records).pay(claim_id, reference, cents)
    _print_step("paid", result)


@claim.command("appeal")
@member_options
@click.argument("claim_id")
@click.option("--reason", required=True, type=click.Choice([r.value for r in AppealReason]))
@click.option(
    "--support", "supporting", multiple=True, help="A further supporting record (repeatable)."
)
def appeal(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    api_url: str,
    claim_id: str,
    reason: str,
    supporting: tuple[str, ...],
) -> None:
    """Appeal a partial or denied decision, as the provider or the patient (or a delegate)."""
    with records_session(keys_dir, key_name, passphrase, node_url, api_url) as records:
        result = ClaimsClient(records).appeal(claim_id, AppealReason(reason), supporting)
    _print_step("appealed", result)


@claim.command("show")
@node_option
@click.argument("claim_id")
@click.option("--format", "output", type=FORMATS, default="table", show_default=True)
def show(node_url: str, claim_id: str, output: str) -> None:
    """A claim: parties, items with the latest decision, and its whole history."""
    with ledger_session(node_url) as ledger:
        found: Claim = ledger.query("/claim", claim_id, Claim)
    if output == "json":
        _echo_json(found)
        return
    money = found.currency
    click.echo(f"claim {found.id}: {_status(found)}")
    click.echo(f"  provider   {found.provider} (submitted by {found.submitter})")
    click.echo(f"  insurer    {found.payer_name}, coverage {found.coverage or '-'}")
    if found.imported:
        click.echo("  imported   from the provider's history; its payer's steps are reported")
    click.echo(f"  patient    {found.patient}")
    click.echo(
        f"  amounts    billed {format_amount(found.total, money)},"
        f" approved {format_amount(found.approved_total, money)},"
        f" paid {format_amount(found.paid_total, money)}"
    )
    responses = ", ".join(found.responses) or "-"
    click.echo(f"  records    claim {found.claim_record}; responses {responses}")
    click.echo(f"  supporting {', '.join(found.supporting) or '-'}")
    if found.duplicate_of:
        click.echo(f"  DUPLICATE? flagged as a possible duplicate of claim {found.duplicate_of}")
    decided = {d.sequence: d for d in found.decisions}
    items = Table("item", "code", "service", "date", "billed", "approved", "reasons")
    for item in found.items:
        decision = decided.get(item.sequence)
        system, display = code_system(item)
        service = display or f"{CODE_SYSTEM_NAMES.get(system, system)} code"
        items.add_row(
            str(item.sequence),
            item.code,
            escape(service),
            item.service_date,
            format_amount(item.amount, money),
            format_amount(decision.approved, money) if decision else "-",
            ", ".join(decision.reasons) if decision else "",
        )
    history = Table("time", "block", "step", "by", "organization", "status", "detail")
    for step in found.history:
        detail = ""
        if step.outcome is not None:
            detail = f"{step.outcome}: approved {format_amount(step.amount, money)}"
        elif step.action == "submit":
            detail = f"billed {format_amount(step.amount, money)}"
        elif step.action == "pay":
            detail = f"{format_amount(step.amount, money)} ({step.reference})"
        elif step.appeal_reason is not None:
            added = f", +{', '.join(step.supporting_added)}" if step.supporting_added else ""
            detail = f"{step.appeal_reason}{added}"
        history.add_row(
            iso(step.time_ns),
            str(step.height),
            str(step.action),
            step.actor,
            step.actor_organization,
            str(step.status),
            escape(detail),
        )
    console = _console()
    console.print(items)
    console.print(history)


def _filter_options(func: Any) -> Any:
    func = click.option("--insurer", default=None, help="An insurer organization id.")(func)
    func = click.option("--provider", default=None, help="A provider organization id.")(func)
    return click.option("--patient", default=None, help="Patient's member id (or keystore).")(func)


def _filter(
    keys_dir: Path, patient: str | None, provider: str | None, insurer: str | None
) -> bytes:
    try:
        patient_id = member_ref(keys_dir, patient) if patient else None
        return claim_filter(patient_id, provider, insurer)
    except ClaimError as exc:
        raise click.UsageError(str(exc)) from None


@claim.command("list")
@node_option
@keys_dir_option
@_filter_options
@click.option("--format", "output", type=FORMATS, default="table", show_default=True)
def list_claims(
    node_url: str,
    keys_dir: Path,
    patient: str | None,
    provider: str | None,
    insurer: str | None,
    output: str,
) -> None:
    """Claims of a patient, a provider or an insurer (every claim without a filter)."""
    data = _filter(keys_dir, patient, provider, insurer)
    with ledger_session(node_url) as ledger:
        found: list[Claim] = ledger.query("/claims", data, list[Claim])
    if output == "json":
        _echo_json(found)
        return
    table = Table(
        "claim", "submitted", "provider", "insurer", "patient", "status", "billed", "approved",
        "paid", "flags",
    )  # fmt: skip
    for item in sorted(found, key=lambda c: (c.submitted_height, c.id)):
        flags = [f"duplicate of {item.duplicate_of}"] if item.duplicate_of else []
        if item.appeals:
            flags.append(f"{item.appeals} appeal(s)")
        table.add_row(
            item.id,
            iso(item.submitted_ns),
            item.provider,
            item.insurer,
            item.patient,
            _status(item),
            format_amount(item.total, item.currency),
            format_amount(item.approved_total, item.currency) if item.outcome else "-",
            format_amount(item.paid_total, item.currency),
            ", ".join(flags),
        )
    _console().print(table)
    click.echo(f"{len(found)} claims")


def percentage(numerator: int, denominator: int) -> str:
    if denominator == 0:
        return "-"
    return f"{100 * numerator / denominator:.1f}% ({numerator}/{denominator})"


def duration(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes}m"
    return f"{hours // 24}d {hours % 24}h"


def _stats_table(title: str, rows: tuple[PartyStats, ...]) -> Table:
    table = Table(
        title, "claims", "submitted", "adjudicated", "paid", "appealed", "denial rate",
        "mean time to decision", "duplicates", "billed", "approved", "paid amount",
        title=f"{title}s",
    )  # fmt: skip
    for row in rows:
        table.add_row(
            row.organization,
            str(row.claims),
            str(row.submitted),
            str(row.adjudicated),
            str(row.paid),
            str(row.appealed),
            percentage(row.denial_rate.numerator, row.denial_rate.denominator),
            duration(row.mean_seconds_to_adjudication) if row.decided else "-",
            str(row.duplicates),
            "\n".join(format_amount(t.submitted, t.currency) for t in row.totals),
            "\n".join(format_amount(t.approved, t.currency) for t in row.totals),
            "\n".join(format_amount(t.paid, t.currency) for t in row.totals),
        )
    return table


@claim.command("stats")
@node_option
@keys_dir_option
@_filter_options
@click.option("--format", "output", type=FORMATS, default="table", show_default=True)
def stats(
    node_url: str,
    keys_dir: Path,
    patient: str | None,
    provider: str | None,
    insurer: str | None,
    output: str,
) -> None:
    """Per provider and insurer: claims by status, amounts billed, approved and paid, denial
    rate and mean time from submission to first decision (block times), from the ledger."""
    data = _filter(keys_dir, patient, provider, insurer)
    with ledger_session(node_url) as ledger:
        found: ClaimStats = ledger.query("/claims/stats", data, ClaimStats)
    if output == "json":
        _echo_json(found)
        return
    console = _console()
    console.print(_stats_table("provider", found.providers))
    console.print(_stats_table("insurer", found.insurers))


@claim.command("codes")
def codes() -> None:
    """The billing codes (CPT, HCPCS, CDT) and adjustment reason codes (X12 CARC) the ledger
    accepts."""
    services = Table("service code", "system", "description", title="services")
    for code in SERVICE_CODES.values():
        services.add_row(code.code, code.system, escape(code.display))
    reasons = Table("CARC", "description", title="adjustment reasons")
    for reason, text in REASON_CODES.items():
        reasons.add_row(reason, escape(text))
    console = _console()
    console.print(services)
    console.print(reasons)
