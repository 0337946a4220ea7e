"""The integration part of `make demo`: what an EHR or laboratory team needs to try the FHIR
API and the HL7 listener in their first hour.

On node 0 (St. Mary's Hospital) it sets up, idempotently:

- an EHR system client: a custodial `ehr` member (keys held by the node, `medledger custody
  new`), enrolled by the organization's admin, and a SMART Backend Services client registered
  for it with an Ed25519 JWK whose private part is written to `demo/ehr-client.jwk` (mode 0600,
  with its client id and scope);
- an HL7 v2 listener: a custodial `lis` member and the node's `[hl7]` table (listen on
  loopback, on a port of node 0's own block), node 0 restarted when it ran without it; ADT
  registers patients as the `ehr` member (`registration_member`), so that the hospital's
  registration feed works as its laboratory feed does;
- a sample patient registered by the EHR through FHIR, with an MRN under the hospital's
  assigning authority, and `demo/sample-oru.hl7`, a laboratory result for that MRN;
- `demo/sample-adt.hl7`, an ADT^A04 that registers a second patient over MLLP.

It returns the four commands the demo prints — a token request, a FHIR search and two MLLP
sends — which the end-to-end test runs exactly as printed.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx
import tomlkit

from medledger.client.sdk import LedgerClient, QueryError
from medledger.client.smart import (
    ClientKey,
    generate_client_key,
    read_client_key,
    request_token,
    write_client_key,
)
from medledger.config import CONFIG_FILE, NodeConfig
from medledger.crypto.keys import KeyPair
from medledger.ledger.clients import RegisterClient, client_key
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.node.services import load_services_config
from medledger.node.testnet import (
    NODE_LOG,
    node_down,
    node_up,
    read_manifest,
    wait_for_height,
)
from medledger.services.custody import Custody

EHR_CLIENT_ID = "demo-ehr"
# SMART v2 scopes have no "all but": the ledger refuses Consent writes by every system client
# whatever its scopes (a consent is the patient's), so the EHR may read and write the rest.
EHR_SCOPES = ("system/*.cruds",)
EHR_CUSTODY_NAME = "ehr"
LIS_CUSTODY_NAME = "lis"
# The listener's port: one of node 0's block of ports (PORT_STRIDE = 10) that no other service
# uses (p2p, RPC, API and Prometheus take offsets 0 to 3).
HL7_PORT_OFFSET = 5
# The hospital's assigning authority for MRNs: HL7's example OID, as PID-3.4 and as the FHIR
# identifier system `urn:oid:...` that the patient index links.
AUTHORITY_NAME = "STMARY"
AUTHORITY_OID = "2.16.840.1.113883.19.5"
SAMPLE_MRN = "DEMO-0001"
LIS_APPLICATION = "DEMO_LIS"
LIS_FACILITY = "STMARY_LAB"
SAMPLE_CONTROL_ID = "DEMO-ORU-0001"
# The hospital's registration (ADT) feed, from its EHR.
ADT_APPLICATION = "DEMO_ADT"
ADT_FACILITY = "STMARY"
SAMPLE_ADT_MRN = "DEMO-0002"
SAMPLE_ADT_CONTROL_ID = "DEMO-ADT-0001"
# How long a restarted node may take to serve again (it unlocks its custodial keystores with a
# deliberately slow KDF, then catches up with the chain), generous for a busy machine.
RESTART_TIMEOUT = 300.0


@dataclass(frozen=True)
class Integration:
    """What the demo prints for the integration team, as commands that work when run from the
    repository root."""

    token_command: str
    search_command: str
    send_command: str
    register_command: str
    patient_id: str
    hl7_listen: str
    jwk_file: Path
    oru_file: Path
    adt_file: Path


def hl7_listen_address(network_home: Path) -> str:
    base_port = read_manifest(network_home).base_port
    return f"127.0.0.1:{base_port + HL7_PORT_OFFSET}"


def _custody(cfg: NodeConfig) -> Custody:
    return Custody(cfg.home / "custody", load_services_config(cfg.home).node_passphrase())


def custodial_keys(cfg: NodeConfig, name: str) -> KeyPair:
    """The node's custodial identity `name`, created on first use (`medledger custody new`)."""
    custody = _custody(cfg)
    for public in custody.members():
        if public.name == name:
            return custody.keys_for(public.member_id)
    return custody.create(name)


def configure_hl7_listener(cfg: NodeConfig, listen: str) -> tuple[KeyPair, bool]:
    """Node 0's custodial laboratory system and its `[hl7]` table (the keys documented in
    medledger.hl7.config), with the custodial EHR member as the registration member that ADT
    registers patients as; whether the table changed (the node must then restart)."""
    lis = custodial_keys(cfg, LIS_CUSTODY_NAME)
    ehr = custodial_keys(cfg, EHR_CUSTODY_NAME)
    path = cfg.home / CONFIG_FILE
    document = tomlkit.parse(path.read_text(encoding="utf-8"))
    wanted = {
        "listen": listen,
        "member": lis.member_id,
        "registration_member": ehr.member_id,
        "allowed_senders": [
            f"{LIS_APPLICATION}^{LIS_FACILITY}",
            f"{ADT_APPLICATION}^{ADT_FACILITY}",
        ],
    }
    current = document.get("hl7")
    if current is not None and {k: current.get(k) for k in wanted} == wanted:
        return lis, False
    # Keys the operator added to an existing table are kept.
    table = current if current is not None else tomlkit.table()
    if current is None:
        table.add(tomlkit.comment("the MLLP listener (docs/integration.md); member is a member id"))
        document["hl7"] = table
    for key, value in wanted.items():
        table[key] = value
    path.write_text(tomlkit.dumps(document), encoding="utf-8")
    return lis, True


def accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def restart_node(network_home: Path, cfg: NodeConfig) -> None:
    """Stop and start a node, and wait until it commits blocks beyond where it stopped (so
    that what follows reads current state from it)."""
    click.echo(f"  restarting {cfg.moniker} so that its HL7 listener runs ...")
    with LedgerClient(cfg.cometbft_rpc, cfg.chain_id) as client:
        height = client.height()
    node_down(cfg.home)
    node_up(cfg.home)
    wait_for_height(network_home, height + 1, nodes=[cfg.home.name], timeout=RESTART_TIMEOUT)


def wait_for_listener(cfg: NodeConfig, listen: str, timeout: float = RESTART_TIMEOUT) -> None:
    """Wait until the MLLP listener accepts connections; a node that stops on a configuration
    error meanwhile fails at once, with the supervisor's message."""
    log = cfg.log_dir / NODE_LOG
    start = log.stat().st_size if log.exists() else 0
    deadline = time.monotonic() + timeout
    while not accepts(listen):
        with open(log, "rb") if log.exists() else open(os.devnull, "rb") as handle:
            handle.seek(start)
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
        stopped = [line for line in lines if '"node.config_error"' in line]
        if stopped:
            raise click.ClickException(f"{cfg.moniker} stopped: {stopped[-1]}")
        if time.monotonic() > deadline:
            tail = "\n".join(lines[-10:])
            raise click.ClickException(
                f"the HL7 listener of {cfg.moniker} does not accept on {listen}:\n{tail}"
            )
        time.sleep(0.5)


def _enroll(client: LedgerClient, admin: KeyPair, keys: KeyPair, role: Role) -> bool:
    try:
        client.query("/member", keys.member_id)
        return False
    except QueryError:
        pass
    client.submit(admin, "member.enroll", EnrollMember(keys.verify_key, keys.encryption_key, role))
    return True


def register_ehr_client(
    client: LedgerClient, admin: KeyPair, ehr: KeyPair, jwk_file: Path
) -> tuple[ClientKey, bool]:
    """The EHR's SMART client: its private JWK (written first, so a failed registration is
    retried with the same key) and its registration on the ledger."""
    registered = client.query("/state", client_key(EHR_CLIENT_ID)) is not None
    if jwk_file.exists():
        key = read_client_key(jwk_file)
    elif registered:
        raise click.ClickException(
            f"client {EHR_CLIENT_ID} is registered but its key {jwk_file} is gone:"
            " `make demo-down`, remove demo/ and run `make demo` again"
        )
    else:
        key = generate_client_key(EHR_CLIENT_ID, " ".join(EHR_SCOPES))
        write_client_key(jwk_file, key)
    if not registered:
        body = RegisterClient(EHR_CLIENT_ID, ehr.member_id, key.public_jwk(), EHR_SCOPES)
        client.submit(admin, "client.register", body)
    return key, not registered


def sample_patient(given: str = "Ana", family: str = "Rivera") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [
            {
                "use": "usual",
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                            "code": "MR",
                        }
                    ]
                },
                "system": f"urn:oid:{AUTHORITY_OID}",
                "value": SAMPLE_MRN,
            }
        ],
        "name": [{"family": family, "given": [given]}],
        "gender": "female",
        "birthDate": "1978-03-12",
    }


def register_patient(api_url: str, key: ClientKey) -> tuple[str, bool]:
    """The sample patient, registered by the EHR through FHIR unless its MRN is known."""
    token = request_token(api_url, key)["access_token"]
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    with httpx.Client(base_url=f"{api_url}/fhir", headers=headers, timeout=120) as fhir:
        found = fhir.get("/Patient", params={"identifier": f"urn:oid:{AUTHORITY_OID}|{SAMPLE_MRN}"})
        found.raise_for_status()
        entries = found.json().get("entry", [])
        if entries:
            return str(entries[0]["resource"]["id"]), False
        created = fhir.post(
            "/Patient",
            json=sample_patient(),
            headers={"Content-Type": "application/fhir+json", "Prefer": "return=representation"},
        )
        if created.status_code != 201:
            raise click.ClickException(
                f"registering the sample patient: HTTP {created.status_code} {created.text}"
            )
        return str(created.json()["id"]), True


def sample_oru(facility: str, when: datetime) -> str:
    """A complete blood count for the sample patient, as a hospital laboratory system sends
    it (HL7 v2.5.1; MSH-15 and MSH-16 empty: original acknowledgement mode, answered AA)."""
    stamp = when.strftime("%Y%m%d%H%M%S+0000")
    pid3 = f"{SAMPLE_MRN}^^^{AUTHORITY_NAME}&{AUTHORITY_OID}&ISO^MR"
    results = (
        ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "11.8", "10*3/uL",
         "4.5-11.0", "H"),
        ("718-7", "Hemoglobin [Mass/volume] in Blood", "11.1", "g/dL", "12.0-15.5", "L"),
        ("777-3", "Platelets [#/volume] in Blood by Automated count", "250", "10*3/uL",
         "150-400", "N"),
    )  # fmt: skip
    segments = [
        f"MSH|^~\\&|{LIS_APPLICATION}|{LIS_FACILITY}|MEDLEDGER|{facility}|{stamp}||ORU^R01^ORU_R01"
        f"|{SAMPLE_CONTROL_ID}|P|2.5.1",
        f"PID|1||{pid3}||Rivera^Ana||19780312|F",
        "ORC|RE|ORD-DEMO-1^EHR|LAB-DEMO-1^DEMO_LIS||CM",
        f"OBR|1|ORD-DEMO-1^EHR|LAB-DEMO-1^DEMO_LIS|58410-2^CBC panel - Blood by Automated count^LN"
        f"|||{stamp}|||||||||||||||{stamp}||HM|F",
    ]
    for number, (code, name, value, units, reference, flag) in enumerate(results, 1):
        segments.append(
            f"OBX|{number}|NM|{code}^{name}^LN||{value}|{units}|{reference}|{flag}|||F|||{stamp}"
        )
    return "\n".join(segments) + "\n"


def sample_adt(facility: str, when: datetime) -> str:
    """An ADT^A04 (register a patient) as the hospital's registration system sends it: a
    second patient, Grace Okafor, with the MRN DEMO-0002 of the same assigning authority."""
    stamp = when.strftime("%Y%m%d%H%M%S+0000")
    pid3 = f"{SAMPLE_ADT_MRN}^^^{AUTHORITY_NAME}&{AUTHORITY_OID}&ISO^MR"
    segments = [
        f"MSH|^~\\&|{ADT_APPLICATION}|{ADT_FACILITY}|MEDLEDGER|{facility}|{stamp}||ADT^A04^ADT_A01"
        f"|{SAMPLE_ADT_CONTROL_ID}|P|2.5.1",
        f"EVN|A04|{stamp}",
        f"PID|1||{pid3}||Okafor^Grace||19850704|F|||4 Oak Ave^^Springfield^IL^62702",
        "PV1|1|O",
    ]
    return "\n".join(segments) + "\n"


def set_up_integration(
    network_home: Path,
    cfg: NodeConfig,
    admin: KeyPair,
    hl7_changed: bool,
    node_was_running: bool,
) -> Integration:
    """Enroll the EHR and LIS members, register the EHR's SMART client, make sure node 0's
    HL7 listener runs, register the sample patient and write the sample ORU and ADT."""
    root = network_home.parent
    listen = hl7_listen_address(network_home)
    jwk_file = root / "ehr-client.jwk"
    oru_file = root / "sample-oru.hl7"
    adt_file = root / "sample-adt.hl7"
    ehr = custodial_keys(cfg, EHR_CUSTODY_NAME)
    lis = custodial_keys(cfg, LIS_CUSTODY_NAME)
    with LedgerClient(cfg.cometbft_rpc, cfg.chain_id) as client:
        for name, keys, role in (
            (EHR_CUSTODY_NAME, ehr, Role.EHR),
            (LIS_CUSTODY_NAME, lis, Role.LIS),
        ):
            state = "enrolled" if _enroll(client, admin, keys, role) else "present"
            click.echo(
                f"  custodial {name:4} {role.value:4} {cfg.organization} {keys.member_id} {state}"
            )
        key, new = register_ehr_client(client, admin, ehr, jwk_file)
        click.echo(
            f"  SMART client {EHR_CLIENT_ID} ({' '.join(EHR_SCOPES)}) for the ehr member,"
            f" private key {jwk_file} ({'registered' if new else 'present'})"
        )
    if hl7_changed and node_was_running:
        restart_node(network_home, cfg)
    wait_for_listener(cfg, listen)
    click.echo(
        f"  HL7 listener of {cfg.moniker} on {listen}, writing results as the lis member and"
        " registering patients from ADT as the ehr member"
    )
    patient, created = register_patient(cfg.public_api_url, key)
    click.echo(
        f"  patient {patient} (MRN {SAMPLE_MRN} of {AUTHORITY_NAME}, urn:oid:{AUTHORITY_OID})"
        f" {'registered by the EHR through FHIR' if created else 'present'}"
    )
    if not oru_file.exists():
        oru_file.write_text(sample_oru(cfg.organization, datetime.now(UTC)), encoding="utf-8")
    if not adt_file.exists():
        adt_file.write_text(sample_adt(cfg.organization, datetime.now(UTC)), encoding="utf-8")
    api = cfg.public_api_url
    return Integration(
        token_command=(f"TOKEN=$(.venv/bin/medledger client token --jwk {jwk_file} --api {api})"),
        search_command=(
            f'curl -sf -H "Authorization: Bearer $TOKEN" -H "Accept: application/fhir+json"'
            f' "{api}/fhir/Observation?patient={patient}&_count=10"'
        ),
        send_command=f".venv/bin/medledger hl7 send {oru_file} --to {listen}",
        register_command=f".venv/bin/medledger hl7 send {adt_file} --to {listen}",
        patient_id=patient,
        hl7_listen=listen,
        jwk_file=jwk_file,
        oru_file=oru_file,
        adt_file=adt_file,
    )
