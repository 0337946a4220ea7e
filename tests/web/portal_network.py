"""A running 4-validator network for the portal's browser tests, with the people of the
scenario enrolled through the SDK and their keystores placed in their organizations' nodes'
portal-keys/ (as `medledger portal add-key` does).

A plain module, like tests/e2e/e2e_network.py (which it uses): node 2's portal gets a
3-second idle timeout so that a session can be seen to expire.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_network import CHAIN_ID, PASSPHRASE, Network, choose_ports

from medledger.cli.portal import install_keystore
from medledger.client.records import RecordsClient, RecordWrite
from medledger.config import load_node_config
from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import Keyring, load_keystore
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.node.testnet import (
    init_testnet,
    node_homes,
    testnet_down,
    testnet_up,
)
from medledger.samples.fhir import generate_patient_record_set

MEMBER_PASSPHRASE = "correct horse battery staple"
EXPIRING_NODE = 2
IDLE_SECONDS = 3

# (keystore name, node index, role)
PEOPLE = (
    ("patient-ana-silva", 0, Role.PATIENT),
    ("dr-hugo-lind", 0, Role.CLINICIAN),
    ("dr-nadia-okoye", 1, Role.CLINICIAN),
    ("dr-erik-vance", 1, Role.EMERGENCY),
    ("lab-tech-mei-wong", 2, Role.LAB),
    ("auditor-rosa-diaz", 3, Role.AUDITOR),
)


@dataclass
class Person:
    name: str
    node: int
    role: Role
    keys: KeyPair

    @property
    def id(self) -> str:
        return self.keys.member_id


@dataclass
class Cast:
    network: Network
    people: dict[str, Person]
    records: list[str]

    def url(self, name: str) -> str:
        """The portal of this person's organization's node."""
        return self.network.configs[self.people[name].node].api_url + "/portal"

    def client(self, name: str) -> RecordsClient:
        person = self.people[name]
        cfg = self.network.configs[person.node]
        return RecordsClient(self.network.client(person.node), cfg.api_url, person.keys)


def _enroll(network: Network, ring: Keyring) -> dict[str, Person]:
    people = {}
    for name, node, role in PEOPLE:
        keys = ring.create(name, MEMBER_PASSPHRASE, fast=True)
        body = EnrollMember(keys.verify_key, keys.encryption_key, role)
        network.client(node).submit(network.admins[node], "member.enroll", body)
        install_keystore(network.configs[node].home, ring.path_for(name))
        people[name] = Person(name, node, role, keys)
    return people


def _chart(cast_people: dict[str, Person], network: Network) -> list[str]:
    """The patient's chart, written by their own hospital's clinician in one transaction, and
    one lab result amended (so the record has a version history)."""
    patient, doctor = cast_people["patient-ana-silva"], cast_people["dr-hugo-lind"]
    resources = generate_patient_record_set(
        2201,
        f"Patient/{patient.id}",
        f"Practitioner/{doctor.id}",
        when=datetime.now(UTC).replace(microsecond=0),
        count=8,
    )
    client = RecordsClient(network.client(0), network.configs[0].api_url, doctor.keys)
    try:
        written = client.put_many([RecordWrite(r, patient.id, str(r["id"])) for r in resources])
        lab = next(
            w
            for w, r in zip(written, resources, strict=True)
            if r["resourceType"] == "Observation" and "valueQuantity" in r
        )
        original = next(r for r in resources if str(r["id"]) == lab.record_id)
        corrected = {**original, "note": [{"text": "Corrected: specimen re-run"}]}
        client.amend(lab.record_id, corrected)
    finally:
        client.close()
    return [w.record_id for w in written]


def start(home: Path, base_port: int) -> Network:
    base_port = choose_ports(base_port)
    init_testnet(home, 4, CHAIN_ID, passphrase=PASSPHRASE, base_port=base_port, fast_kdf=True)
    homes = node_homes(home)
    with (homes[EXPIRING_NODE] / "medledger.toml").open("a", encoding="utf-8") as handle:
        handle.write(f"\n[portal]\nidle_timeout_seconds = {IDLE_SECONDS}\n")
    configs = [load_node_config(h) for h in homes]
    admins = [load_keystore(cfg.keys_dir / "admin.json", PASSPHRASE) for cfg in configs]
    network = Network(home, configs, admins, CHAIN_ID)
    testnet_up(home)
    network.wait_all_at(2, timeout=120)
    return network


@contextlib.contextmanager
def portal_cast(home: Path, base_port: int) -> Iterator[Cast]:
    """The running network with the cast enrolled and the patient's chart written; stopped on
    exit whatever happened."""
    network: Network | None = None
    try:
        network = start(home / "net", base_port)
        people = _enroll(network, Keyring(home / "keys"))
        records = _chart(people, network)
        yield Cast(network, people, records)
    finally:
        if network is not None:
            network.close()
        if (home / "net" / "testnet.toml").exists():
            testnet_down(home / "net", timeout=20)
