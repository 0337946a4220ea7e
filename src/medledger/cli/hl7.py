"""`medledger import hl7`: HL7 v2 ORU^R01 laboratory results from files, as the MLLP listener
takes them over the network.

It runs on the node, in its home directory: it acts as the node's custodial laboratory-system
member (the `[hl7] member` of medledger.toml, or `--member`), unlocked with the node's
passphrase, and resolves patients through the node's patient index. The `[hl7]` sender
allow-list and patient-matching rule apply as they do over MLLP. Each message is mapped,
validated and committed in a transaction of its own, exactly as over MLLP; a file may hold
several messages (segments separated by CR, LF or CRLF; a message begins at each MSH).

Exit codes: 0 every message accepted, 1 at least one rejected (each listed with its reason),
2 a usage error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress

from medledger.client.records import RecordsClient
from medledger.client.sdk import LedgerClient
from medledger.hl7.config import load_hl7_config, zone_named
from medledger.hl7.ingest import (
    Hl7Processor,
    LedgerRecordWriter,
    Outcome,
    RecordWriter,
    decode_payload,
)
from medledger.hl7.oru import split_messages
from medledger.node.config import ConfigError, load_node_config
from medledger.node.custody import Custody, CustodyError
from medledger.node.mpi import PatientIndex
from medledger.node.services import load_services_config


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
    """Import ORU^R01 laboratory results from FILES, one transaction per message."""
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
    for path in files:
        text, _codec = decode_payload(path.read_bytes())
        found = split_messages(text)
        if not found:
            messages.append((f"{path}", text))
        messages.extend((f"{path}#{n}", message) for n, message in enumerate(found, 1))

    patients = PatientIndex(cfg.state_dir / "patients.db")
    client = RecordsClient(LedgerClient(cfg.cometbft_rpc, cfg.chain_id), cfg.api_url, keys, member)
    writer = LedgerRecordWriter(client)

    def records() -> RecordWriter:
        return writer

    processor = Hl7Processor(
        records,
        patients,
        zone=zone,
        application=hl7_config.application if hl7_config is not None else "MEDLEDGER",
        facility=cfg.organization,
        allowed_senders=hl7_config.allowed_senders if hl7_config is not None else None,
        match_without_authority=hl7_config is not None and hl7_config.match_without_authority,
    )
    items: list[_Item] = []
    try:
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("importing HL7 messages", total=len(messages))
            for source, message in messages:
                items.append(_Item(source, processor.process(message)))
                progress.advance(task)
    finally:
        client.ledger.close()
        client.close()
        patients.close()
    _report(items, as_json)
    if any(not item.outcome.accepted for item in items):
        raise SystemExit(1)


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
