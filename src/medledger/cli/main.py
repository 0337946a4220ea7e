"""`medledger`: the command line for operators, clinicians, patients and auditors."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import NoReturn

import click

import medledger.cli.bulk  # noqa: F401  (adds `fhir` to the `import` group)
from medledger.cli.chain import gov, member, tx, verify
from medledger.cli.claims import claim
from medledger.cli.custody import client, custody
from medledger.cli.hl7 import import_group
from medledger.cli.keys import keys
from medledger.cli.mllp_send import hl7_group
from medledger.cli.portal import portal
from medledger.cli.records import access, audit, consent, export, record
from medledger.cli.testnet import testnet
from medledger.config import CONFIG_ERROR_EXIT, CONFIG_ERROR_PREFIX, ConfigError


@click.group()
@click.version_option(package_name="medledger")
def cli() -> None:
    """medledger: a permissioned blockchain network for health records."""


@cli.group()
def node() -> None:
    """Run a node: the ledger application and its CometBFT process."""


@node.command("run")
@click.option("--home", type=click.Path(path_type=Path), required=True, help="Node home directory.")
def node_run(home: Path) -> None:
    """Run one node in the foreground (app first, then CometBFT; Ctrl-C stops both). A
    configuration error stops it with exit status 78 and a message naming the key."""
    from medledger.node.supervisor import run_node

    try:
        sys.exit(run_node(home))
    except ConfigError as exc:
        _config_error(exc)


@node.command("app")
@click.option("--home", type=click.Path(path_type=Path), required=True, help="Node home directory.")
def node_app(home: Path) -> None:
    """Run only the ledger application process (the supervisor starts this)."""
    from medledger.node.appmain import serve_app
    from medledger.node.logging import configure_json_logging

    configure_json_logging()
    try:
        asyncio.run(serve_app(home))
    except ConfigError as exc:
        _config_error(exc)


def _config_error(exc: ConfigError) -> NoReturn:
    """Exit with CONFIG_ERROR_EXIT, which the supervisor does not restart: the same file would
    fail the same way. The supervisor quotes the last line of this output in its log."""
    click.echo(f"{CONFIG_ERROR_PREFIX}{exc}", err=True)
    sys.exit(CONFIG_ERROR_EXIT)


cli.add_command(testnet)
cli.add_command(keys)
cli.add_command(custody)
cli.add_command(client)
cli.add_command(import_group)
cli.add_command(hl7_group)
cli.add_command(claim)
cli.add_command(portal)
cli.add_command(member)
cli.add_command(gov)
cli.add_command(tx)
cli.add_command(verify)
cli.add_command(record)
cli.add_command(consent)
cli.add_command(access)
cli.add_command(audit)
cli.add_command(export)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
