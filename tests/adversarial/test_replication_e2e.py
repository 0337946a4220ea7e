"""Replication against a hostile author on a real 4-validator network: records that name
packages nobody ever uploaded (and, if the ledger let it through, a digest ending in a
newline) must not stop or delay the replication of a real record committed after them. Every
node ends up with the real package, and each node's `/health` shows its replication task
alive and never restarted."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from medledger.client.records import RecordsClient
from medledger.client.sdk import TxRejected
from medledger.crypto.keys import KeyPair
from medledger.ledger.model import Role
from medledger.ledger.records import PutRecord, PutRecords
from medledger.ledger.transactions import EnrollMember
from medledger.samples.fhir import generate_patient_record_set

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_network import Network, running_network, wait_until

pytestmark = pytest.mark.e2e

BASE_PORT = 31200
PHANTOMS = 12  # more than a node fetches at once


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with running_network(tmp_path_factory.mktemp("replication") / "net", BASE_PORT) as net:
        yield net


def enroll(network: Network, role: Role) -> KeyPair:
    keys = KeyPair.generate()
    body = EnrollMember(keys.verify_key, keys.encryption_key, role)
    network.client(0).submit(network.admins[0], "member.enroll", body)
    return keys


def observation(patient: KeyPair, author: KeyPair, seed: int) -> dict[str, Any]:
    resources = generate_patient_record_set(
        seed,
        f"Patient/{patient.member_id}",
        f"Practitioner/{author.member_id}",
        when="2026-11-01T09:00:00Z",
        count=12,
    )
    return next(r for r in resources if r["resourceType"] == "Observation")


def health(network: Network, node: int) -> dict[str, Any]:
    response = httpx.get(f"{network.configs[node].api_url}/health", timeout=5)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def test_packages_nobody_has_do_not_stop_replication_of_a_real_record(network: Network) -> None:
    patient = enroll(network, Role.PATIENT)
    author = enroll(network, Role.CLINICIAN)
    cfg = network.configs[0]
    client = RecordsClient(network.client(0), cfg.api_url, author)
    try:
        # A real body, sealed and uploaded, is the template of the phantom records.
        template = client.seal_and_upload(observation(patient, author, 1), patient.member_id)
        phantoms = [
            msgspec.structs.replace(
                template,
                record_id=f"phantom-{i}-{secrets.token_hex(4)}",
                package_digest=secrets.token_hex(32),
            )
            for i in range(PHANTOMS)
        ]
        network.client(0).submit(author, "record.put-many", PutRecords(tuple(phantoms)))

        # A digest ending in a newline: refused by the ledger, or, if committed, ignored by
        # every node's replication (it used to raise InvalidURL and end the task for good).
        newline: PutRecord = msgspec.structs.replace(
            template,
            record_id=f"phantom-nl-{secrets.token_hex(4)}",
            package_digest=secrets.token_hex(32) + "\n",
        )
        try:
            network.client(0).submit(author, "record.put", newline)
        except TxRejected as exc:
            assert "package_digest" in exc.log

        written = client.put(observation(patient, author, 2), patient.member_id)
    finally:
        client.close()

    paths = [c.home / "packages" / written.digest[:2] / written.digest for c in network.configs]
    wait_until(lambda: all(p.exists() for p in paths), 60, "the real package on every node")

    for node in range(len(network.configs)):
        status = health(network, node)
        assert status["status"] == "ok", status
        task = status["tasks"]["replication"]
        assert task["alive"] is True and task["restarts"] == 0, task
        assert status["tasks"]["upload-sweep"]["alive"] is True
        # The phantoms are still wanted, and retried on their own schedule.
        assert status["replication"]["missing"] >= PHANTOMS, status["replication"]
        metrics = httpx.get(f"{network.configs[node].api_url}/metrics", timeout=5).text
        assert 'medledger_task_up{task="replication"} 1.0' in metrics
        assert 'medledger_task_restarts_total{task="replication"} 0.0' in metrics
