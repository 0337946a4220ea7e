"""`make demo`: a 4-validator network on this machine with sample participants and records.

After enrolling practitioners and patients it writes a small synthetic chart for each patient
(lab results by the lab technician, the rest by a clinician of the patient's organization),
grants and revokes consents, has a clinician of another organization read a record under
consent, and has an emergency physician break the glass on a record written at another
organization — so that `record`, `consent`, `audit` and `export` have something to show.
For the integration team (medledger.cli.demo_integration) it registers a sample EHR SMART
client, runs an HL7 listener on node 0 (laboratory results, and ADT registration as the
EHR) and prints a token request, a FHIR search and two MLLP sends that work as printed.

Idempotent: a second run reuses the network (starting it if it is down) and adds nothing twice.
The keystores it writes are protected by a demo passphrase kept beside them in
`demo/passphrase` — fine for a demonstration on one machine, never for real keys.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import click

from medledger.cli.demo_integration import (
    SAMPLE_ADT_MRN,
    Integration,
    configure_hl7_listener,
    hl7_listen_address,
    set_up_integration,
)
from medledger.cli.portal import install_keystore
from medledger.client.records import RecordsClient
from medledger.client.sdk import LedgerClient, QueryError
from medledger.config import NodeConfig, load_node_config
from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import Keyring, load_keystore
from medledger.ledger.access import EmergencyReason
from medledger.ledger.consent import ConsentStatus, GranteeKind, Purpose, ScopeKind
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember, Propose, SetParameter, Vote
from medledger.node.testnet import (
    DEFAULT_BASE_PORT,
    init_testnet,
    node_homes,
    node_status,
    testnet_status,
    testnet_up,
    wait_for_height,
)
from medledger.samples.fhir import generate_patient_record_set
from medledger.validation import validate_resource

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


# (patient, seed of their synthetic chart, the clinicians of their organization who write it;
# vital signs by the last of them). Laboratory results are written by LAB_AUTHOR.
CHARTS = [
    ("patient-maria-garcia", 1101, ("dr-alice-moreau",)),
    ("patient-james-okafor", 1102, ("dr-priya-raman", "nurse-lee-chen")),
    ("patient-emma-schulz", 1103, ("dr-alice-moreau",)),
]
LAB_AUTHOR = "lab-tech-sam-ortiz"
RECORDS_PER_PATIENT = 6
SECOND_NS = 1_000_000_000
DAY_NS = 86_400 * SECOND_NS


@dataclass
class Person:
    name: str
    keys: KeyPair
    node: int
    role: Role

    @property
    def id(self) -> str:
        return self.keys.member_id


class Cast:
    """The demo's participants, each with a records client on their organization's node."""

    def __init__(self, configs: list[NodeConfig], people: dict[str, Person]) -> None:
        self.configs = configs
        self.people = people
        self._ledgers: dict[int, LedgerClient] = {}
        self._clients: dict[str, RecordsClient] = {}

    def organization(self, name: str) -> str:
        return self.configs[self.people[name].node].organization

    def ledger(self, node: int) -> LedgerClient:
        if node not in self._ledgers:
            self._ledgers[node] = LedgerClient(self.configs[node].cometbft_rpc)
        return self._ledgers[node]

    def client(self, name: str) -> RecordsClient:
        if name not in self._clients:
            person = self.people[name]
            cfg = self.configs[person.node]
            self._clients[name] = RecordsClient(self.ledger(person.node), cfg.api_url, person.keys)
        return self._clients[name]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        for ledger in self._ledgers.values():
            ledger.close()


def _passphrase(root: Path) -> str:
    path = root / "passphrase"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(18) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def _ensure_member(
    client: LedgerClient, ring: Keyring, admin: KeyPair, name: str, role: Role, secret: str
) -> tuple[KeyPair, bool]:
    keys = ring.load(name, secret) if ring.exists(name) else ring.create(name, secret)
    try:
        client.query("/member", keys.member_id)
        return keys, False
    except QueryError:
        pass
    client.submit(admin, "member.enroll", EnrollMember(keys.verify_key, keys.encryption_key, role))
    return keys, True


def _write_charts(cast: Cast) -> dict[str, list[str]]:
    """Each patient's synthetic chart as records (ids are the resources' ids, so a second run
    finds them and writes nothing twice). Returns each patient's record ids."""
    when = datetime.now(UTC).replace(hour=9, minute=0, second=0, microsecond=0)
    written: dict[str, list[str]] = {}
    for patient_name, seed, clinicians in CHARTS:
        patient = cast.people[patient_name]
        client = cast.client(clinicians[0])
        present = {s.head.record_id for s in client.records_of(patient.id)}
        # The same chart drawn for each author differs only in the author references.
        charts = {
            name: generate_patient_record_set(
                seed,
                f"Patient/{patient.id}",
                f"Practitioner/{cast.people[name].id}",
                when=when,
                count=RECORDS_PER_PATIENT,
            )
            for name in (*clinicians, LAB_AUTHOR)
        }
        ids = []
        added = 0
        for index, first_draw in enumerate(charts[clinicians[0]]):
            category = validate_resource(first_draw).category
            author = {"laboratory": LAB_AUTHOR, "vital-signs": clinicians[-1]}.get(
                category, clinicians[0]
            )
            resource = charts[author][index]
            record_id = str(resource["id"])
            ids.append(record_id)
            if record_id in present:
                continue
            cast.client(author).put(resource, patient.id, record_id)
            added += 1
        state = f"{added} written" if added else "present"
        click.echo(f"  {patient_name:24} {len(ids)} records ({state})")
        written[patient_name] = ids
    return written


def _share_and_revoke(cast: Cast) -> str:
    """Maria consents to her second organization's clinicians treating her (90 days), and
    revokes a consent she gave her insurer for her lab results. Returns the active consent."""
    maria = cast.people["patient-maria-garcia"]
    client = cast.client(maria.name)
    clinic = cast.organization("dr-priya-raman")
    insurer = cast.organization("claims-jo-baker")
    consents = client.consents(maria.id)
    now = time.time_ns()
    active = next(
        (
            c
            for c in consents
            if c.grantee == clinic
            and c.status is ConsentStatus.ACTIVE
            and Purpose.TREATMENT in c.purposes
            and c.end_ns > now + DAY_NS
        ),
        None,
    )
    if active is None:
        consent_id = client.grant_consent(
            maria.id,
            GranteeKind.ORGANIZATION,
            clinic,
            (Purpose.TREATMENT,),
            now - 60 * SECOND_NS,
            now + 90 * DAY_NS,
        )
        click.echo(f"  consent {consent_id}: {clinic} may read Maria's records for treatment")
    else:
        consent_id = active.id
        click.echo(f"  consent {consent_id}: {clinic}, treatment (present)")
    to_insurer = [c for c in consents if c.grantee == insurer]
    if not to_insurer:
        revoked = client.grant_consent(
            maria.id,
            GranteeKind.ORGANIZATION,
            insurer,
            (Purpose.PAYMENT,),
            now - 60 * SECOND_NS,
            now + 30 * DAY_NS,
            ScopeKind.CATEGORIES,
            ("laboratory",),
        )
        client.revoke_consent(maria.id, revoked, "claim settled")
        click.echo(f"  consent {revoked}: {insurer}, payment, lab results — granted and revoked")
    else:
        for consent in to_insurer:
            if consent.status is ConsentStatus.ACTIVE:
                client.revoke_consent(maria.id, consent.id, "claim settled")
        click.echo(f"  consent {to_insurer[0].id}: {insurer}, payment (revoked, present)")
    return consent_id


def _read_once(
    cast: Cast, reader: str, patient: str, record_id: str, emergency: EmergencyReason | None
) -> None:
    """`reader` reads the record unless the patient's audit trail already shows they did."""
    client = cast.client(reader)
    trail = cast.client(patient).audit_trail(cast.people[patient].id)
    if any(e.granted_access and e.entry.sender == client.member_id for e in trail):
        click.echo(f"  {reader} read {record_id} (present)")
        return
    reason = emergency.value if emergency else None
    read = client.read(record_id, Purpose.TREATMENT, emergency_reason=reason)
    flag = f" — EMERGENCY ({reason})" if reason else ""
    click.echo(
        f"  {reader} read {read.version.resource_type} {record_id} (grant {read.grant_id},"
        f" key shares from {', '.join(read.shares_from)}){flag}"
    )


def _first_written_by(cast: Cast, patient: str, record_ids: list[str], organization: str) -> str:
    client = cast.client(patient)
    for record_id in record_ids:
        history = client.history(record_id)
        if history.versions[-1].author_organization == organization:
            return record_id
    return record_ids[0]


@click.command()
@click.option("--home", type=click.Path(path_type=Path), default=Path("demo/testnet"))
@click.option(
    "--base-port",
    type=int,
    default=DEFAULT_BASE_PORT,
    show_default=True,
    help="First port of a new network (each node takes 10).",
)
def main(home: Path, base_port: int) -> None:
    """Start (or reuse) the demo network and fill it with sample participants."""
    root = home.parent
    secret = _passphrase(root)
    if not (home / "testnet.toml").exists():
        click.echo(f"creating a 4-validator network in {home} ...")
        init_testnet(home, 4, passphrase=secret, base_port=base_port)
    homes = node_homes(home)
    # Node 0's HL7 listener is configured before the node starts; a node that already runs
    # without it is restarted once its members are enrolled.
    node0_was_running = node_status(homes[0]).running
    _lis, hl7_changed = configure_hl7_listener(load_node_config(homes[0]), hl7_listen_address(home))
    testnet_up(home)
    wait_for_height(home, 2, timeout=300)
    configs = [load_node_config(h) for h in homes]
    admins = [load_keystore(h / "keys" / "admin.json", secret) for h in homes]
    ring = Keyring(root / "keys")
    people: dict[str, Person] = {}
    with LedgerClient(configs[0].cometbft_rpc) as client:
        click.echo("enrolling practitioners and patients ...")
        for name, org_index, role in PARTICIPANTS:
            keys, new = _ensure_member(client, ring, admins[org_index], name, role, secret)
            people[name] = Person(name, keys, org_index, role)
            state = "enrolled" if new else "present"
            org = configs[org_index].organization
            click.echo(f"  {name:24} {role.value:10} {org:8} {keys.member_id} {state}")
            # The web portal: each person signs in at their organization's node.
            install_keystore(homes[org_index], ring.path_for(name), replace=True)
        if not client.query("/proposals"):
            click.echo("governance: proposing a 2000-block voting period, three votes ...")
            change = Propose(SetParameter("proposal_period_blocks", 2000), reason="pilot policy")
            client.submit(admins[0], "gov.propose", change)
            for admin in admins[1:3]:
                client.submit(admin, "gov.vote", Vote(1, True))
    cast = Cast(configs, people)
    try:
        click.echo("writing records (synthetic FHIR R4 charts, sealed off-chain) ...")
        records = _write_charts(cast)
        click.echo("consent ...")
        consent_id = _share_and_revoke(cast)
        click.echo("reading ...")
        maria_record = _first_written_by(
            cast, "patient-maria-garcia", records["patient-maria-garcia"], configs[0].organization
        )
        _read_once(cast, "dr-priya-raman", "patient-maria-garcia", maria_record, None)
        james_record = _first_written_by(
            cast, "patient-james-okafor", records["patient-james-okafor"], configs[1].organization
        )
        _read_once(
            cast,
            "dr-omar-haddad",
            "patient-james-okafor",
            james_record,
            EmergencyReason.PATIENT_UNCONSCIOUS,
        )
    finally:
        cast.close()
    click.echo("integration: an EHR SMART client and an HL7 listener on node 0 ...")
    integration = set_up_integration(home, configs[0], admins[0], hl7_changed, node0_was_running)
    maria, james = people["patient-maria-garcia"].id, people["patient-james-okafor"].id
    statuses = testnet_status(home)
    click.echo("")
    for node in statuses:
        click.echo(
            f"{node.name}: height {node.height} app hash {(node.app_hash or '-')[:16]}"
            f" peers {node.peers} {'healthy' if node.healthy else 'NOT healthy'}"
        )
    rpc = configs[0].cometbft_rpc
    portal_lines = "\n".join(
        f"  {cfg.api_url}/portal/  " + ", ".join(n for n, i, _ in PARTICIPANTS if i == index)
        for index, cfg in enumerate(configs)
    )
    click.echo(
        f"""
Where to look:
  CometBFT RPC          {rpc}/status   (one per node: {", ".join(c.cometbft_rpc for c in configs)})
  health / metrics      {configs[0].api_url}/health  {configs[0].api_url}/metrics
  logs                  {homes[0]}/logs/
Try next (the demo passphrase is in {root / "passphrase"}):
  export MEDLEDGER_NODE={rpc} MEDLEDGER_API={configs[0].api_url} MEDLEDGER_KEYS={root / "keys"}
  export MEDLEDGER_PASSPHRASE=$(cat {root / "passphrase"})
  .venv/bin/medledger member list
  .venv/bin/medledger member show {maria} --prove
  .venv/bin/medledger gov list
  .venv/bin/medledger testnet status --home {home}
  .venv/bin/medledger verify --home {homes[0]} --node {rpc}
Records, consent and audit (--key names a keystore in {root / "keys"}; guides in docs/):
  .venv/bin/medledger record list --patient {maria}
  .venv/bin/medledger record get --key patient-maria-garcia --own {maria_record}
  .venv/bin/medledger record history {maria_record}
  .venv/bin/medledger record get --key dr-priya-raman {maria_record}   # under consent
  .venv/bin/medledger record get --key nurse-lee-chen --purpose research {maria_record}  # denied
  .venv/bin/medledger consent list --patient {maria}
  .venv/bin/medledger audit --key patient-maria-garcia --patient {maria}
  .venv/bin/medledger audit --key patient-maria-garcia --patient {maria} --disclosures
  .venv/bin/medledger audit --key patient-james-okafor --patient {james}   # emergency access
  .venv/bin/medledger export --key patient-maria-garcia --patient {maria} --output maria.json
  .venv/bin/medledger consent revoke --key patient-maria-garcia --patient {maria} {consent_id}
      # ... and dr-priya-raman's read above is denied (exit code 3)
  make demo-down        # stops the network (make demo starts it again)
Web portal (each person signs in at their organization's node, with the demo passphrase):
{portal_lines}
  (docs/getting-started.md; add a member: medledger portal add-key --home NODE_HOME FILE)"""
    )
    click.echo(integration_text(integration))


def integration_text(integration: Integration) -> str:
    """The integration team's commands, one a line, to copy and paste from the repository
    root (the end-to-end test runs these very lines)."""
    return f"""
EHR and LIS integration (docs/integration.md), from the repository root:
  # 1. an access token for the demo EHR's SMART client (key: {integration.jwk_file})
  {integration.token_command}
  # 2. a FHIR search with it
  {integration.search_command}
  # 3. a laboratory result over MLLP to node 0's HL7 listener (prints the ACK), then 2. again
  {integration.send_command}
  # 4. a patient registered over MLLP by an ADT^A04 (MRN {SAMPLE_ADT_MRN}; prints the ACK)
  {integration.register_command}"""


if __name__ == "__main__":
    main()
