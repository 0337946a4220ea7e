"""Commands that read and change the ledger: members, governance, transactions, verification."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from medledger.cli.common import keys_dir_option, passphrase_option, resolve_passphrase
from medledger.client.sdk import ClientError, LedgerClient, TxOutcome
from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import Keyring, KeystoreError
from medledger.ledger.governance import Proposal
from medledger.ledger.model import Member, OrganizationKind, Role, member_key
from medledger.ledger.transactions import (
    Action,
    AddOrganization,
    AdminKeys,
    ChangeMemberStatus,
    EnrollMember,
    Propose,
    RemoveOrganization,
    RemoveValidator,
    RotateKey,
    SetParameter,
    SetValidator,
    Vote,
)

F = TypeVar("F", bound=Callable[..., Any])
NODE_ENV = "MEDLEDGER_NODE"


def node_option(func: F) -> F:
    return click.option(
        "--node",
        "node_url",
        default=lambda: os.environ.get(NODE_ENV, "http://127.0.0.1:26657"),
        show_default=f"${NODE_ENV} or http://127.0.0.1:26657",
        help="CometBFT RPC address of a node.",
    )(func)


def signer_options(func: F) -> F:
    func = click.option("--key", "key_name", required=True, help="Keystore that signs.")(func)
    return keys_dir_option(passphrase_option(func))


def _unlock(keys_dir: Path, name: str, passphrase: str | None) -> KeyPair:
    try:
        return Keyring(keys_dir).load(name, resolve_passphrase(passphrase))
    except (KeystoreError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def _submit(
    node_url: str, keys: KeyPair, tx_type: str, body: object, sender: str = ""
) -> TxOutcome:
    with LedgerClient(node_url) as client:
        try:
            outcome = client.submit(keys, tx_type, body, sender=sender)
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"committed in block {outcome.height}: {outcome.log}  (tx {outcome.tx_hash})")
    return outcome


def _print_json(value: Any) -> None:
    click.echo(json.dumps(msgspec.to_builtins(value), indent=2, default=str))


# --- members ---------------------------------------------------------------------------


@click.group()
def member() -> None:
    """Enroll members, rotate keys, suspend, reinstate or revoke them."""


@member.command("enroll")
@signer_options
@node_option
@click.option("--role", type=click.Choice([r.value for r in Role]), required=True)
@click.option(
    "--member-key",
    "member_key_name",
    help="Name of the new member's keystore (public part is read).",
)
@click.option("--verify-key", help="The new member's Ed25519 public key (hex).")
@click.option("--encryption-key", help="The new member's X25519 public key (hex).")
def enroll(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    role: str,
    member_key_name: str | None,
    verify_key: str | None,
    encryption_key: str | None,
) -> None:
    """An organization admin enrolls a practitioner, patient or system client."""
    if member_key_name:
        public = Keyring(keys_dir).public(member_key_name)
        verify, encrypt = public.verify_key, public.encryption_key
    elif verify_key and encryption_key:
        try:
            verify, encrypt = bytes.fromhex(verify_key), bytes.fromhex(encryption_key)
        except ValueError:
            raise click.ClickException("keys must be hex") from None
    else:
        raise click.UsageError("give --member-key, or --verify-key and --encryption-key")
    admin = _unlock(keys_dir, key_name, passphrase)
    _submit(node_url, admin, "member.enroll", EnrollMember(verify, encrypt, Role(role)))


@member.command("rotate")
@signer_options
@node_option
@click.option("--new-key", required=True, help="Keystore holding the new keys.")
@click.option("--member", "member_id", help="Member whose keys change (default: the signer).")
def rotate(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    new_key: str,
    member_id: str | None,
) -> None:
    """Replace a member's keys; its id stays, and the old key signs nothing afterwards."""
    signer = _unlock(keys_dir, key_name, passphrase)
    new = Keyring(keys_dir).public(new_key)
    target = member_id or signer.member_id
    body = RotateKey(target, new.verify_key, new.encryption_key)
    _submit(node_url, signer, "member.rotate", body)


def _status_command(tx_type: str, verb: str) -> click.Command:
    @signer_options
    @node_option
    @click.argument("member_id")
    @click.option("--reason", required=True)
    def command(
        key_name: str,
        keys_dir: Path,
        passphrase: str | None,
        node_url: str,
        member_id: str,
        reason: str,
    ) -> None:
        admin = _unlock(keys_dir, key_name, passphrase)
        _submit(node_url, admin, tx_type, ChangeMemberStatus(member_id, reason))

    command.__doc__ = f"{verb} a member of your organization (takes effect at its block)."
    return click.command(tx_type.split(".")[1])(command)


for _tx_type, _verb in (
    ("member.suspend", "Suspend"),
    ("member.reinstate", "Reinstate"),
    ("member.revoke", "Revoke (final)"),
):
    member.add_command(_status_command(_tx_type, _verb))


@member.command("show")
@node_option
@click.argument("member_id")
@click.option("--prove", is_flag=True, help="Check the answer against a signed block header.")
def show(node_url: str, member_id: str, prove: bool) -> None:
    """Show one member, optionally proven against the validators' signatures."""
    with LedgerClient(node_url) as client:
        try:
            if prove:
                verified = client.verified_state(member_key(member_id))
                if verified.value is None:
                    raise click.ClickException(f"no member {member_id} (absence proven)")
                _print_json(msgspec.msgpack.decode(verified.value, type=Member))
                header = verified.header
                click.echo(
                    f"proven at height {verified.height} against header {header.height}"
                    f" signed by {header.signed_power}/{header.total_power} voting power"
                )
            else:
                _print_json(client.query("/member", member_id, Member))
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None


@member.command("list")
@node_option
@click.option("--org", default="", help="Only this organization's members.")
def list_members(node_url: str, org: str) -> None:
    """List members (id, organization, role, status)."""
    with LedgerClient(node_url) as client:
        members = client.query("/members", org, list[Member])
    table = Table("organization", "role", "status", "enrolled at")
    table.add_column("id", no_wrap=True)
    for m in members:
        table.add_row(m.organization, m.role, m.status, str(m.enrolled_height), m.id)
    Console().print(table)


# --- governance ------------------------------------------------------------------------


@click.group()
def gov() -> None:
    """Governance: propose changes to the consortium and vote on them."""


@gov.group()
def propose() -> None:
    """Propose one change; it passes with the votes of 2/3 of the organizations."""


def _propose(
    keys_dir: Path,
    key_name: str,
    passphrase: str | None,
    node_url: str,
    action: Action,
    reason: str,
) -> None:
    admin = _unlock(keys_dir, key_name, passphrase)
    _submit(node_url, admin, "gov.propose", Propose(action, reason))


def proposal_options(func: F) -> F:
    func = click.option("--reason", required=True, help="Why, for the other organizations.")(func)
    return signer_options(node_option(func))


@propose.command("add-org")
@proposal_options
@click.option("--id", "org_id", required=True)
@click.option("--name", required=True)
@click.option("--kind", type=click.Choice([k.value for k in OrganizationKind]), required=True)
@click.option("--admin-verify-key", required=True, help="Hex Ed25519 key of its admin.")
@click.option("--admin-encryption-key", required=True, help="Hex X25519 key of its admin.")
@click.option("--node-encryption-key", required=True, help="Hex X25519 key of its node.")
@click.option("--node-verify-key", required=True, help="Hex Ed25519 key of its node.")
def add_org(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    reason: str,
    org_id: str,
    name: str,
    kind: str,
    admin_verify_key: str,
    admin_encryption_key: str,
    node_encryption_key: str,
    node_verify_key: str,
) -> None:
    """Admit a new organization to the consortium."""
    try:
        action = AddOrganization(
            org_id,
            name,
            OrganizationKind(kind),
            AdminKeys(bytes.fromhex(admin_verify_key), bytes.fromhex(admin_encryption_key)),
            bytes.fromhex(node_encryption_key),
            bytes.fromhex(node_verify_key),
        )
    except ValueError:
        raise click.ClickException("keys must be hex") from None
    _propose(keys_dir, key_name, passphrase, node_url, action, reason)


@propose.command("remove-org")
@proposal_options
@click.option("--id", "org_id", required=True)
def remove_org(
    key_name: str, keys_dir: Path, passphrase: str | None, node_url: str, reason: str, org_id: str
) -> None:
    """Remove an organization (its members can sign nothing afterwards)."""
    _propose(keys_dir, key_name, passphrase, node_url, RemoveOrganization(org_id), reason)


def _pub_key(value: str) -> bytes:
    try:
        key = base64.b64decode(value, validate=True)
    except ValueError:
        raise click.ClickException(
            "validator key must be base64 (as in priv_validator_key.json)"
        ) from None
    return key


@propose.command("set-validator")
@proposal_options
@click.option("--pub-key", required=True, help="Base64 Ed25519 validator key.")
@click.option("--power", type=int, required=True)
@click.option("--org", "org_id", required=True, help="Organization that runs the node.")
def set_validator(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    reason: str,
    pub_key: str,
    power: int,
    org_id: str,
) -> None:
    """Add a validator or change its voting power."""
    action = SetValidator(_pub_key(pub_key), power, org_id)
    _propose(keys_dir, key_name, passphrase, node_url, action, reason)


@propose.command("remove-validator")
@proposal_options
@click.option("--pub-key", required=True, help="Base64 Ed25519 validator key.")
def remove_validator(
    key_name: str, keys_dir: Path, passphrase: str | None, node_url: str, reason: str, pub_key: str
) -> None:
    """Remove a validator from the set."""
    action = RemoveValidator(_pub_key(pub_key))
    _propose(keys_dir, key_name, passphrase, node_url, action, reason)


@propose.command("set-param")
@proposal_options
@click.argument("name")
@click.argument("value", type=int)
def set_param(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    reason: str,
    name: str,
    value: int,
) -> None:
    """Change a chain parameter (max_tx_bytes, proposal_period_blocks, max_validators)."""
    _propose(keys_dir, key_name, passphrase, node_url, SetParameter(name, value), reason)


@gov.command("vote")
@signer_options
@node_option
@click.argument("proposal_id", type=int)
@click.option("--yes/--no", "approve", required=True)
def vote(
    key_name: str,
    keys_dir: Path,
    passphrase: str | None,
    node_url: str,
    proposal_id: int,
    approve: bool,
) -> None:
    """Vote for or against an open proposal, for your organization."""
    admin = _unlock(keys_dir, key_name, passphrase)
    _submit(node_url, admin, "gov.vote", Vote(proposal_id, approve))


@gov.command("list")
@node_option
def list_proposals(node_url: str) -> None:
    """List proposals with their status and votes."""
    with LedgerClient(node_url) as client:
        proposals = client.query("/proposals", b"", list[Proposal])
    table = Table("id", "action", "proposer", "status", "votes", "outcome")
    for p in proposals:
        votes = ", ".join(f"{b.organization}:{'yes' if b.approve else 'no'}" for b in p.ballots)
        table.add_row(str(p.id), type(p.action).__name__, p.proposer, p.status, votes, p.outcome)
    Console().print(table)


# --- transactions and verification -----------------------------------------------------


@click.group()
def tx() -> None:
    """Look up transactions."""


@tx.command("status")
@node_option
@click.argument("tx_hash")
def status(node_url: str, tx_hash: str) -> None:
    """The committed result of a transaction (by its hash)."""
    with LedgerClient(node_url) as client:
        outcome = client.tx_status(tx_hash.removeprefix("0x").upper())
    if outcome is None:
        raise click.ClickException(f"transaction {tx_hash} is not in a committed block")
    state = "ok" if outcome.ok else f"refused (code {outcome.code})"
    click.echo(f"block {outcome.height}: {state}: {outcome.log}")


@click.command()
@click.option("--home", type=click.Path(path_type=Path, exists=True), required=True)
@node_option
@click.option("--offline", is_flag=True, help="Do not check headers against the running node.")
def verify(home: Path, node_url: str, offline: bool) -> None:
    """Re-verify a node from genesis: signatures, app hash per block, audit log, state."""
    from medledger.node.verify import verify_node

    with Progress() as progress:
        task = progress.add_task("re-executing blocks", total=None)

        def advance(height: int, last: int) -> None:
            progress.update(task, completed=height, total=last)

        report = verify_node(home, None if offline else node_url, advance)
    click.echo(
        f"checked {report.checked_blocks} blocks, {report.checked_transactions} transactions,"
        f" {report.signed_headers} signed headers"
    )
    if not report.ok:
        for finding in report.findings:
            click.echo(f"TAMPERED: {finding}", err=True)
        raise SystemExit(1)
    click.echo("ok: the node's ledger matches a replay from genesis")
