"""`medledger portal`: the members who may sign in to a node's web portal.

A member signs in with their own keystore (the file `medledger keys new` wrote, sealed with
their own passphrase), which the operator places in the node's HOME/portal-keys/. The node
never learns the passphrase except while the member signs in, and keeps the opened keys in
memory for that session only.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import click

from medledger.config import ConfigError, load_node_config
from medledger.crypto.keystore import Keyring, KeystoreError, KeystorePublic, read_public
from medledger.web.settings import PORTAL_KEYS_DIR

home_option = click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The node's home directory.",
)


def _portal_url(home: Path) -> str:
    try:
        return f"{load_node_config(home).api_url}/portal/"
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def install_keystore(home: Path, keystore_file: Path, *, replace: bool = False) -> KeystorePublic:
    """Copy a member's keystore into HOME/portal-keys/<name>.json (mode 0600, atomically)."""
    public = read_public(keystore_file)
    directory = home / PORTAL_KEYS_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = Keyring(directory).path_for(public.name)
    if target.exists() and not replace:
        raise KeystoreError(
            f"{target} exists; use --replace to replace the keystore named {public.name!r}"
        )
    temporary = directory / f".{public.name}.{secrets.token_hex(6)}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(keystore_file.read_bytes())
    os.replace(temporary, target)
    return public


@click.group()
def portal() -> None:
    """The web portal: which members' keystores can sign in to this node."""


@portal.command("add-key")
@home_option
@click.argument("keystore_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--replace", is_flag=True, help="Replace a keystore of the same name.")
def add_key(home: Path, keystore_file: Path, replace: bool) -> None:
    """Let a member sign in to this node's portal with their keystore KEYSTORE_FILE (it stays
    sealed with the member's own passphrase)."""
    url = _portal_url(home)
    try:
        public = install_keystore(home, keystore_file, replace=replace)
    except KeystoreError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{public.name} (member {public.member_id}) can sign in at {url}")


@portal.command("list-keys")
@home_option
def list_keys(home: Path) -> None:
    """The members who can sign in to this node's portal."""
    try:
        found = Keyring(home / PORTAL_KEYS_DIR).list()
    except KeystoreError as exc:
        raise click.ClickException(str(exc)) from None
    for public in found:
        click.echo(f"{public.name:32} {public.member_id}")
    if not found:
        click.echo(f"no keystores in {home / PORTAL_KEYS_DIR}")


@portal.command("remove-key")
@home_option
@click.argument("name")
def remove_key(home: Path, name: str) -> None:
    """Stop NAME from signing in (sessions already open end at their timeout)."""
    try:
        path = Keyring(home / PORTAL_KEYS_DIR).path_for(name)
    except KeystoreError as exc:
        raise click.ClickException(str(exc)) from None
    if not path.exists():
        raise click.ClickException(f"no keystore named {name!r} in {path.parent}")
    path.unlink()
    click.echo(f"{name} can no longer sign in")
