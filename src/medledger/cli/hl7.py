"""`medledger import hl7`: HL7 v2 messages (ORU^R01 results, ADT patient administration) from
files, as the MLLP listener takes them over the network.

It runs on the node, in its home directory: it acts as the node's custodial laboratory-system
member (the `[hl7] member` of medledger.toml, or `--member`) and, for ADT, its registration
member (`[hl7] registration_member`), unlocked with the node's passphrase, and resolves
patients through the node's patient index. Every `[hl7]` rule (sender allow-list, processing
ids, patient matching, authorities, unknown-patient policy) applies as over MLLP. Each message
is mapped, validated and committed in a transaction of its own; a file may hold several
messages (segments separated by CR, LF or CRLF; a message begins at each MSH), or be a batch
file (FHS/BHS ... BTS/FTS), whose structure is checked first: a broken batch is refused whole.

Exit codes: 0 every message accepted, 1 at least one rejected (each listed with its reason),
2 a usage error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress

from medledger.client.records import RecordsClient
from medledger.client.sdk import LedgerClient
from medledger.config import ConfigError, NodeConfig, load_node_config
from medledger.hl7.adt import PatientRegistry
from medledger.hl7.batch import BatchOutcome, is_batch, process_batch
from medledger.hl7.config import Hl7Config, load_hl7_config, zone_named
from medledger.hl7.ingest import (
    Hl7Processor,
    LedgerRecordWriter,
    Outcome,
    RecordWriter,
    decode_payload,
)
from medledger.hl7.oru import AckCode, split_messages
from medledger.hl7.registry import LedgerPatientRegistry
from medledger.node.services import load_services_config
from medledger.services.custody import Custody, CustodyError
from medledger.services.mpi import PatientIndex


@click.group("import")
def import_group() -> None:
    """Import health records from files."""


@dataclass(frozen=True)
class _Item:
    source: str
    outcome: Outcome


@import_group.command("hl7")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--home",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    required=True,
    help="Node home directory (its custodial keys and patient index are used).",
)
@click.option(
    "--member", default=None, help="Custodial LIS member to write as (default: [hl7] member)."
)
@click.option(
    "--timezone",
    "zone_name",
    default=None,
    help="Time zone of HL7 times without a UTC offset (default: [hl7] timezone, else UTC).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
def import_hl7(
    files: tuple[Path, ...],
    home: Path,
    member: str | None,
    zone_name: str | None,
    as_json: bool,
) -> None:
    """Import HL7 v2 messages and batches from FILES, one transaction per message."""
    try:
        cfg = load_node_config(home)
        services = load_services_config(cfg.home)
        hl7_config = load_hl7_config(cfg.home)
        member = member or (hl7_config.member if hl7_config is not None else None)
        if member is None:
            raise click.UsageError("no --member, and medledger.toml has no [hl7] member")
        zone = zone_named(zone_name or (hl7_config.timezone if hl7_config is not None else "UTC"))
        custody = Custody(cfg.home / "custody", services.node_passphrase())
        keys = custody.keys_for(member)
    except (ConfigError, CustodyError) as exc:
        raise click.ClickException(str(exc)) from None

    messages: list[tuple[str, str]] = []
    batches: list[tuple[str, str]] = []
    for path in files:
        text, _codec = decode_payload(path.read_bytes())
        if is_batch(text):
            batches.append((f"{path}", text))
            continue
        found = split_messages(text)
        if not found:
            messages.append((f"{path}", text))
        messages.extend((f"{path}#{n}", message) for n, message in enumerate(found, 1))

    patients = PatientIndex(cfg.state_dir / "patients.db")
    client = RecordsClient(LedgerClient(cfg.cometbft_rpc, cfg.chain_id), cfg.api_url, keys, member)
    writer = LedgerRecordWriter(client)

    def records() -> RecordWriter:
        return writer

    config = hl7_config or Hl7Config(listen="127.0.0.1:2575", member=member, timezone="UTC")
    registry = _registry(cfg, custody, config)
    processor = Hl7Processor(
        records,
        patients,
        zone=zone,
        application=config.application,
        facility=cfg.organization,
        allowed_senders=config.allowed_senders,
        match_without_authority=config.match_without_authority,
        processing_ids=config.processing_ids,
        unknown_patients=config.unknown_patients,
        authorities=config.authorities,
        registry=registry,
    )
    items: list[_Item] = []
    try:
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("importing HL7 messages", total=len(messages) + len(batches))
            for source, message in messages:
                items.append(_Item(source, processor.process(message)))
                progress.advance(task)
            for source, text in batches:
                batch = process_batch(processor, text)
                if batch.refusal:
                    items.append(_Item(source, _refused_batch(batch)))
                items.extend(
                    _Item(f"{source}#{n}", outcome) for n, outcome in enumerate(batch.outcomes, 1)
                )
                progress.advance(task)
    finally:
        client.ledger.close()
        client.close()
        patients.close()
    _report(items, as_json)
    if any(not item.outcome.accepted for item in items):
        raise SystemExit(1)


def _registry(
    cfg: NodeConfig, custody: Custody, config: Hl7Config
) -> Callable[[], PatientRegistry] | None:
    """The registration member's registry, as the node's listener has it (None without one)."""
    member = config.registration_member
    if member is None:
        return None
    if not custody.holds(member):
        raise click.ClickException(
            f"[hl7] registration_member {member}: this node holds no keys for it"
        )
    client = RecordsClient(
        LedgerClient(cfg.cometbft_rpc, cfg.chain_id), cfg.api_url, custody.keys_for(member), member
    )
    registrar = LedgerPatientRegistry(lambda: client, custody)

    def registry() -> PatientRegistry:
        return registrar

    return registry


def _refused_batch(batch: BatchOutcome) -> Outcome:
    return Outcome(AckCode.REJECT, "", batch.refusal, batch.ack)


def _report(items: list[_Item], as_json: bool) -> None:
    if as_json:
        for item in items:
            outcome = item.outcome
            click.echo(
                json.dumps(
                    {
                        "source": item.source,
                        "control_id": outcome.control_id,
                        "ack": str(outcome.code),
                        "reason": outcome.reason,
                        "written": list(outcome.written),
                        "unchanged": list(outcome.unchanged),
                        "tx_hash": outcome.tx_hash,
                    }
                )
            )
        return
    accepted = [i for i in items if i.outcome.accepted]
    rejected = [i for i in items if not i.outcome.accepted]
    written = sum(len(i.outcome.written) for i in accepted)
    unchanged = sum(len(i.outcome.unchanged) for i in accepted)
    click.echo(
        f"{len(items)} messages: {len(accepted)} accepted ({written} records written,"
        f" {unchanged} unchanged), {len(rejected)} rejected"
    )
    for item in rejected:
        outcome = item.outcome
        control = f" {outcome.control_id}" if outcome.control_id else ""
        click.echo(f"  {item.source}{control}: {outcome.code} {outcome.reason}")
