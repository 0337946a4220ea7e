"""`medledger custody` and `medledger client`: identities a node holds for its organization
(EHR and laboratory integrations, portal patients) and SMART clients registered on the ledger."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from medledger.cli.chain import _submit, _unlock, node_option, signer_options
from medledger.client.smart import (
    SmartClientError,
    generate_client_key,
    read_client_key,
    request_token,
    write_client_key,
)
from medledger.crypto.keystore import KeystoreError
from medledger.ledger.clients import RegisterClient, RevokeClient
from medledger.node.services import load_services_config
from medledger.services.custody import Custody


@click.group()
def custody() -> None:
    """Keys a node holds in custody for its organization's system clients and patients."""


def _custody(home: Path) -> Custody:
    services = load_services_config(home.resolve())
    return Custody(home.resolve() / "custody", services.node_passphrase())


@custody.command("new")
@click.option("--home", type=click.Path(path_type=Path, exists=True), required=True)
@click.argument("name")
def custody_new(home: Path, name: str) -> None:
    """Create keys held by the node (sealed under its passphrase); prints the public part to
    enroll with `medledger member enroll --role ehr|lis|patient`."""
    try:
        keys = _custody(home).create(name)
    except (KeystoreError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        json.dumps(
            {
                "name": name,
                "member_id": keys.member_id,
                "verify_key": keys.verify_key.hex(),
                "encryption_key": keys.encryption_key.hex(),
            },
            indent=2,
        )
    )


@custody.command("list")
@click.option("--home", type=click.Path(path_type=Path, exists=True), required=True)
def custody_list(home: Path) -> None:
    """The custodial identities of a node."""
    for public in _custody(home).members():
        click.echo(f"{public.name}\t{public.member_id}")


@click.group()
def client() -> None:
    """SMART Backend Services clients (EHR, LIS) registered on the ledger."""


@client.command("register")
@signer_options
@node_option
@click.option("--client-id", required=True)
@click.option("--member", "member_id", required=True, help="Custodial system member it acts as.")
@click.option(
    "--jwk",
    "jwk_file",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="File with the client's public JWK (Ed25519, P-256 or P-384).",
)
@click.option("--scope", "scopes", multiple=True, required=True, help="e.g. system/Observation.rs")
def register(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    client_id: str,
    member_id: str,
    jwk_file: str,
    scopes: tuple[str, ...],
) -> None:
    """Register a client (by its organization's admin)."""
    jwk = Path(jwk_file).read_text(encoding="utf-8").strip()
    admin = _unlock(keys_dir, key_name, passphrase)
    _submit(node_url, admin, "client.register", RegisterClient(client_id, member_id, jwk, scopes))


@client.command("revoke")
@signer_options
@node_option
@click.argument("client_id")
@click.option("--reason", required=True)
def revoke(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    client_id: str,
    reason: str,
) -> None:
    """Revoke a client: it obtains no new token from this block on."""
    admin = _unlock(keys_dir, key_name, passphrase)
    _submit(node_url, admin, "client.revoke", RevokeClient(client_id, reason))


@client.command("keygen")
@click.option("--client-id", required=True)
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    default=("system/*.rs",),
    show_default=True,
    help="Scope the token command asks for by default (repeatable).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Private JWK file to write (mode 0600); the public JWK goes to OUT.pub.",
)
def keygen(client_id: str, scopes: tuple[str, ...], out: Path) -> None:
    """Create a client's Ed25519 key: the private JWK (kept by the EHR or LIS) and the public
    JWK to register with `medledger client register --jwk OUT.pub`."""
    if out.exists():
        raise click.ClickException(f"{out} exists: choose another --out")
    key = generate_client_key(client_id, " ".join(scopes))
    write_client_key(out, key)
    public = out.with_name(out.name + ".pub")
    public.write_text(key.public_jwk() + "\n", encoding="utf-8")
    click.echo(f"private key {out} (keep it secret), public key {public}")


@client.command("token")
@click.option(
    "--jwk",
    "jwk_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The client's private JWK file (from `medledger client keygen`).",
)
@click.option(
    "--api",
    "api_url",
    default=lambda: os.environ.get("MEDLEDGER_API", "http://127.0.0.1:26602"),
    show_default="$MEDLEDGER_API or http://127.0.0.1:26602",
    help="The node's API base URL.",
)
@click.option("--client-id", default=None, help="Default: the client_id in the JWK file.")
@click.option("--scope", default=None, help="Scopes to ask for (default: the JWK file's scope).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole token response.")
def token(
    jwk_file: Path, api_url: str, client_id: str | None, scope: str | None, as_json: bool
) -> None:
    """Sign a SMART client assertion with the private JWK and print the node's access token
    (exit status 1 with the node's reason when it refuses)."""
    try:
        answer = request_token(api_url, read_client_key(jwk_file, client_id), scope)
    except SmartClientError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(1) from None
    click.echo(json.dumps(answer, indent=2) if as_json else answer["access_token"])
