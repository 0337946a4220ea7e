"""`make demo`: a 4-validator network on this machine with sample participants.

Idempotent: a second run reuses the network (starting it if it is down) and adds nothing twice.
The keystores it writes are protected by a demo passphrase kept beside them in
`demo/passphrase` — fine for a demonstration on one machine, never for real keys.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import click

from medledger.client.sdk import LedgerClient, QueryError
from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import Keyring, load_keystore
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember, Propose, SetParameter, Vote
from medledger.node.config import load_node_config
from medledger.node.testnet import (
    init_testnet,
    node_homes,
    testnet_status,
    testnet_up,
    wait_for_height,
)

# (keystore name, organization node index, role): practitioners and patients of the pilot.
PARTICIPANTS = [
    ("dr-alice-moreau", 0, Role.CLINICIAN),
    ("dr-omar-haddad", 0, Role.EMERGENCY),
    ("nurse-lee-chen", 1, Role.CLINICIAN),
    ("dr-priya-raman", 1, Role.CLINICIAN),
    ("lab-tech-sam-ortiz", 2, Role.LAB),
    ("claims-jo-baker", 3, Role.BILLING),
    ("auditor-kim-novak", 3, Role.AUDITOR),
    ("patient-maria-garcia", 0, Role.PATIENT),
    ("patient-james-okafor", 1, Role.PATIENT),
    ("patient-emma-schulz", 0, Role.PATIENT),
]


def _passphrase(root: Path) -> str:
    path = root / "passphrase"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(18) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def _ensure_member(
    client: LedgerClient, ring: Keyring, admin: KeyPair, name: str, role: Role, secret: str
) -> tuple[str, bool]:
    keys = ring.load(name, secret) if ring.exists(name) else ring.create(name, secret)
    try:
        client.query("/member", keys.member_id)
        return keys.member_id, False
    except QueryError:
        pass
    client.submit(admin, "member.enroll", EnrollMember(keys.verify_key, keys.encryption_key, role))
    return keys.member_id, True


@click.command()
@click.option("--home", type=click.Path(path_type=Path), default=Path("demo/testnet"))
def main(home: Path) -> None:
    """Start (or reuse) the demo network and fill it with sample participants."""
    root = home.parent
    secret = _passphrase(root)
    if not (home / "testnet.toml").exists():
        click.echo(f"creating a 4-validator network in {home} ...")
        init_testnet(home, 4, passphrase=secret)
    testnet_up(home)
    wait_for_height(home, 2, timeout=120)
    homes = node_homes(home)
    configs = [load_node_config(h) for h in homes]
    admins = [load_keystore(h / "keys" / "admin.json", secret) for h in homes]
    ring = Keyring(root / "keys")
    with LedgerClient(configs[0].cometbft_rpc) as client:
        click.echo("enrolling practitioners and patients ...")
        for name, org_index, role in PARTICIPANTS:
            member_id, new = _ensure_member(client, ring, admins[org_index], name, role, secret)
            state = "enrolled" if new else "present"
            org = configs[org_index].organization
            click.echo(f"  {name:24} {role.value:10} {org:8} {member_id} {state}")
        if not client.query("/proposals"):
            click.echo("governance: proposing a 2000-block voting period, three votes ...")
            change = Propose(SetParameter("proposal_period_blocks", 2000), reason="pilot policy")
            client.submit(admins[0], "gov.propose", change)
            for admin in admins[1:3]:
                client.submit(admin, "gov.vote", Vote(1, True))
    statuses = testnet_status(home)
    click.echo("")
    for node in statuses:
        click.echo(
            f"{node.name}: height {node.height} app hash {(node.app_hash or '-')[:16]}"
            f" peers {node.peers} {'healthy' if node.healthy else 'NOT healthy'}"
        )
    rpc = configs[0].cometbft_rpc
    click.echo(
        f"""
Where to look:
  CometBFT RPC          {rpc}/status   (one per node: {", ".join(c.cometbft_rpc for c in configs)})
  health / metrics      {configs[0].api_url}/health  {configs[0].api_url}/metrics
  logs                  {homes[0]}/logs/
Try next (the demo passphrase is in {root / "passphrase"}):
  export MEDLEDGER_NODE={rpc} MEDLEDGER_KEYS={root / "keys"}
  export MEDLEDGER_PASSPHRASE=$(cat {root / "passphrase"})
  .venv/bin/medledger member list
  .venv/bin/medledger member show <member id> --prove
  .venv/bin/medledger gov list
  .venv/bin/medledger testnet status --home {home}
  .venv/bin/medledger verify --home {homes[0]} --node {rpc}
  make demo-down        # stops the network (make demo starts it again)"""
    )


if __name__ == "__main__":
    main()
