"""`medledger testnet`: a local network of N validators on this machine."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from medledger.cli.common import passphrase_option, resolve_passphrase


@click.group()
def testnet() -> None:
    """Create, start, stop and inspect a local network of validators."""


@testnet.command("init")
@click.option("--validators", "count", type=click.IntRange(1, 32), default=4, show_default=True)
@click.option("--home", type=click.Path(path_type=Path), required=True)
@click.option("--chain-id", default="medledger-local", show_default=True)
@click.option("--base-port", type=int, default=26600, show_default=True)
@passphrase_option
def init(count: int, home: Path, chain_id: str, base_port: int, passphrase: str | None) -> None:
    """Write N nodes: keys, one genesis with the founding organizations, ports, peers."""
    from medledger.node.testnet import init_testnet

    secret = resolve_passphrase(passphrase, confirm=True)
    configs = init_testnet(home, count, chain_id=chain_id, passphrase=secret, base_port=base_port)
    for cfg in configs:
        click.echo(f"{cfg.moniker}: {cfg.home} organization={cfg.organization} api={cfg.api_url}")


@testnet.command("up")
@click.option("--home", type=click.Path(path_type=Path), required=True)
def up(home: Path) -> None:
    """Start every node of the testnet in the background."""
    from medledger.node.testnet import testnet_up

    testnet_up(home)
    click.echo(f"started; see `medledger testnet status --home {home}`")


@testnet.command("down")
@click.option("--home", type=click.Path(path_type=Path), required=True)
def down(home: Path) -> None:
    """Stop every node of the testnet."""
    from medledger.node.testnet import testnet_down

    testnet_down(home)
    click.echo("stopped")


@testnet.command("status")
@click.option("--home", type=click.Path(path_type=Path), required=True)
def status(home: Path) -> None:
    """Each node's height, app hash, peers and health."""
    from medledger.node.testnet import testnet_status

    table = Table("node", "height", "app hash", "peers", "catching up", "healthy")
    for node in testnet_status(home):
        table.add_row(
            node.moniker,
            "-" if node.height is None else str(node.height),
            (node.app_hash or "-")[:16],
            "-" if node.peers is None else str(node.peers),
            "-" if node.catching_up is None else str(node.catching_up),
            "yes" if node.healthy else "no",
        )
    Console().print(table)
