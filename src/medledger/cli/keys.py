"""`medledger keys`: encrypted keystore files on this machine."""

from __future__ import annotations

import json
from pathlib import Path

import click

from medledger.cli.common import keys_dir_option, passphrase_option, resolve_passphrase
from medledger.crypto.keystore import Keyring, KeystoreError


@click.group()
def keys() -> None:
    """Create and inspect encrypted keystores (keys never leave them unencrypted)."""


@keys.command("new")
@click.argument("name")
@keys_dir_option
@passphrase_option
def new(name: str, keys_dir: Path, passphrase: str | None) -> None:
    """Create a new signing and encryption key pair in an encrypted keystore."""
    ring = Keyring(keys_dir)
    try:
        created = ring.create(name, resolve_passphrase(passphrase, confirm=True))
    except (KeystoreError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{name}: member id {created.member_id} ({ring.path_for(name)})")


@keys.command("show")
@click.argument("name")
@keys_dir_option
def show(name: str, keys_dir: Path) -> None:
    """Show a keystore's public part: member id, verify key, encryption key."""
    try:
        public = Keyring(keys_dir).public(name)
    except (KeystoreError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        json.dumps(
            {
                "name": public.name,
                "member_id": public.member_id,
                "verify_key": public.verify_key.hex(),
                "encryption_key": public.encryption_key.hex(),
                "path": str(public.path),
            },
            indent=2,
        )
    )


@keys.command("list")
@keys_dir_option
def list_keys(keys_dir: Path) -> None:
    """List the keystores in the keys directory."""
    for public in Keyring(keys_dir).list():
        click.echo(f"{public.name}\t{public.member_id}")
