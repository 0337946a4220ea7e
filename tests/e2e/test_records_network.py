"""Health records end to end on a real 4-validator network: sealed packages replicated to
every node, consent-gated reads through threshold key release, revocation, break-the-glass,
refused and audited key releases, erasure from every disk, healing of a tampered package."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from e2e_network import Network, running_network, wait_until

from medledger.auth import node_audience, sign_request, unverified_issuer
from medledger.client.records import (
    AccessDenied,
    ProvenAuditEntry,
    RecordErased,
    RecordsClient,
)
from medledger.client.sdk import LedgerClient, ProofError, trusted_validators_from_genesis
from medledger.crypto import package as packaging
from medledger.crypto.keys import KeyPair
from medledger.ledger.consent import GranteeKind, Purpose
from medledger.ledger.execution import AuditEntry
from medledger.ledger.model import Role, member_key
from medledger.ledger.transactions import EnrollMember
from medledger.node.testnet import node_down, node_up
from medledger.samples.fhir import generate_patient_record_set
from medledger.validation import validate_resource

pytestmark = pytest.mark.e2e

BASE_PORT = 28100
SECOND_NS = 1_000_000_000


class Cast:
    """The people of the scenario, each with a records client on their own organization's node."""

    def __init__(self, network: Network) -> None:
        self.network = network
        self.patient = self._enroll(0, Role.PATIENT)
        self.doctor = self._enroll(0, Role.CLINICIAN)
        self.outsider = self._enroll(1, Role.CLINICIAN)
        self.er_doctor = self._enroll(2, Role.EMERGENCY)
        self.clients: dict[str, RecordsClient] = {}

    def _enroll(self, node: int, role: Role) -> KeyPair:
        keys = KeyPair.generate()
        _MEMBERS[keys.member_id] = keys
        body = EnrollMember(keys.verify_key, keys.encryption_key, role)
        self.network.client(node).submit(self.network.admins[node], "member.enroll", body)
        return keys

    def enroll_colleague(self) -> KeyPair:
        """Another clinician at the author's organization (reads by author-organization)."""
        return self._enroll(0, Role.CLINICIAN)

    def client(self, keys: KeyPair, node: int) -> RecordsClient:
        if keys.member_id not in self.clients:
            cfg = self.network.configs[node]
            self.clients[keys.member_id] = RecordsClient(
                self.network.client(node), cfg.api_url, keys
            )
        return self.clients[keys.member_id]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


class _ForgingCustodian:
    """A real HTTP server playing a faulty custodian: it seals 32 random bytes to the
    requester's key as if they were its share."""

    def __init__(self, requester_hint: KeyPair) -> None:
        del requester_hint
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.url = ""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/keys/release", self._release)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()

    async def _release(self, request: web.Request) -> web.Response:
        issuer = unverified_issuer(request.headers.get("Authorization"))
        member = _MEMBERS[issuer]
        forged = packaging.Share(1, secrets.token_bytes(32))
        sealed = packaging.reseal_share(forged, member.encryption_key)
        return web.json_response({"sealed_share": base64.b64encode(sealed).decode(), "index": 1})

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


_MEMBERS: dict[str, KeyPair] = {}


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with running_network(tmp_path_factory.mktemp("records") / "net", BASE_PORT) as net:
        yield net


@pytest.fixture(scope="module")
def cast(network: Network) -> Iterator[Cast]:
    people = Cast(network)
    yield people
    people.close()


def _lab_result(cast: Cast, seed: int) -> dict[str, object]:
    resources = generate_patient_record_set(
        seed,
        f"Patient/{cast.patient.member_id}",
        f"Practitioner/{cast.doctor.member_id}",
        when="2026-11-01T09:00:00Z",
        count=12,
    )
    return next(r for r in resources if r["resourceType"] == "Observation")


def _package_paths(network: Network, digest: str) -> list[Path]:
    return [cfg.home / "packages" / digest[:2] / digest for cfg in network.configs]


def test_consent_gates_reading_and_revocation_stops_it(network: Network, cast: Cast) -> None:
    doctor = cast.client(cast.doctor, 0)
    resource = _lab_result(cast, 1)
    written = doctor.put(resource, cast.patient.member_id)

    # The package reaches every node's disk, checked against its digest.
    wait_until(
        lambda: all(p.exists() for p in _package_paths(network, written.digest)),
        30,
        "the package on every node",
    )

    # Nothing of the plaintext is on the chain or in any node's logs.
    marker = json.dumps(resource["code"])[:40]
    for cfg in network.configs:
        for path in [cfg.state_dir / "state.db", *cfg.log_dir.glob("*.log")]:
            assert marker.encode() not in path.read_bytes(), f"PHI found in {path}"

    outsider = cast.client(cast.outsider, 1)
    with pytest.raises(AccessDenied, match="no consent"):
        outsider.read(written.record_id)

    patient = cast.client(cast.patient, 0)
    now = time.time_ns()
    consent_id = patient.grant_consent(
        cast.patient.member_id,
        GranteeKind.ORGANIZATION,
        network.configs[1].organization,
        (Purpose.TREATMENT,),
        now - 3600 * SECOND_NS,
        now + 86_400 * SECOND_NS,
    )
    read = outsider.read(written.record_id)
    assert read.resource == validate_resource(resource).resource
    assert len(read.shares_from) == read.version.threshold == 2
    assert not read.bad_shares_from

    patient.revoke_consent(cast.patient.member_id, consent_id)
    with pytest.raises(AccessDenied, match="revoked"):
        outsider.read(written.record_id)

    # Consent for research does not cover treatment.
    patient.grant_consent(
        cast.patient.member_id,
        GranteeKind.MEMBER,
        cast.outsider.member_id,
        (Purpose.RESEARCH,),
        now - 3600 * SECOND_NS,
        now + 86_400 * SECOND_NS,
    )
    with pytest.raises(AccessDenied, match="not treatment"):
        outsider.read(written.record_id)

    # The patient sees both the granted and the denied accesses, proven against the log (read
    # through node 0, which may commit the outsider's last request a moment after node 1).
    def access_requests() -> list[AuditEntry] | None:
        trail = patient.audit_trail(cast.patient.member_id)
        found = [e.entry for e in trail if e.entry.type == "access.request"]
        return found if len(found) >= 4 else None

    requests = wait_until(access_requests, 30, "the four access requests on node 0")
    assert [e.sender for e in requests] == [cast.outsider.member_id] * 4
    assert [e.code == 0 for e in requests] == [False, True, False, False]


def test_break_the_glass_is_flagged_for_the_patient(network: Network, cast: Cast) -> None:
    written = cast.client(cast.doctor, 0).put(_lab_result(cast, 2), cast.patient.member_id)
    er = cast.client(cast.er_doctor, 2)
    with pytest.raises(AccessDenied, match="needs a reason"):
        er.read(written.record_id, emergency_reason="because")
    read = er.read(written.record_id, emergency_reason="patient-unconscious")
    assert read.resource["resourceType"] == "Observation"

    def emergencies() -> list[ProvenAuditEntry] | None:
        trail = cast.client(cast.patient, 0).audit_trail(cast.patient.member_id)
        return [e for e in trail if "EMERGENCY" in e.entry.log] or None

    flagged = wait_until(emergencies, 30, "the emergency access on node 0")
    assert flagged[-1].entry.sender == cast.er_doctor.member_id


def test_unauthorized_key_release_is_refused_and_audited(network: Network, cast: Cast) -> None:
    written = cast.client(cast.doctor, 0).put(_lab_result(cast, 3), cast.patient.member_id)
    colleague_grant = cast.client(cast.doctor, 0).request_access(written.record_id)
    cfg = network.configs[1]
    body = json.dumps({"grant": colleague_grant}).encode()

    # The outsider presents a grant that belongs to someone else (asked again while node 1
    # has not yet committed the grant's block and answers 404).
    def present() -> httpx.Response | None:
        header = sign_request(
            cast.outsider,
            cast.outsider.member_id,
            "POST",
            "/v1/keys/release",
            body,
            audience=node_audience(cfg.organization),
        )
        answer = httpx.post(
            f"{cfg.api_url}/v1/keys/release", content=body, headers={"Authorization": header}
        )
        return None if answer.status_code == 404 else answer

    response = wait_until(present, 30, "node 1 to know the grant")
    assert response.status_code == 403
    assert "another member" in response.json()["error"]
    # No token at all, and a token signed by the wrong key.
    assert httpx.post(f"{cfg.api_url}/v1/keys/release", content=body).status_code == 401
    forged = sign_request(
        KeyPair.generate(),
        cast.outsider.member_id,
        "POST",
        "/v1/keys/release",
        body,
        audience=node_audience(cfg.organization),
    )
    response = httpx.post(
        f"{cfg.api_url}/v1/keys/release", content=body, headers={"Authorization": forged}
    )
    assert response.status_code == 401
    # The node's release log has the refusals.
    admin = network.admins[1]
    path = "/v1/audit/node"
    log = httpx.get(
        f"{cfg.api_url}{path}",
        headers={
            "Authorization": sign_request(
                admin, admin.member_id, "GET", path, audience=node_audience(cfg.organization)
            )
        },
    )
    assert log.status_code == 200
    refused = [e for e in log.json() if e["action"] == "key.release" and e["outcome"] == "refused"]
    assert any(e["target"] == colleague_grant and "another member" in e["reason"] for e in refused)


def test_tampered_package_is_detected_and_healed(network: Network, cast: Cast) -> None:
    written = cast.client(cast.doctor, 0).put(_lab_result(cast, 4), cast.patient.member_id)
    paths = _package_paths(network, written.digest)
    wait_until(lambda: all(p.exists() for p in paths), 30, "replication")
    original = paths[0].read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    paths[0].write_bytes(bytes(tampered))
    # The author reading through node 0 hits the damaged copy; the node quarantines it and
    # fetches a good one from a peer; the client reads from another node meanwhile.
    read = cast.client(cast.doctor, 0).read_own(written.record_id)
    assert read.resource["resourceType"] == "Observation"
    wait_until(
        lambda: paths[0].exists() and paths[0].read_bytes() == original,
        30,
        "node 0 to heal its copy from a peer",
    )


def test_erasure_removes_the_package_from_every_disk(network: Network, cast: Cast) -> None:
    doctor = cast.client(cast.doctor, 0)
    written = doctor.put(_lab_result(cast, 5), cast.patient.member_id)
    amended = doctor.amend(written.record_id, _lab_result(cast, 6))
    paths = _package_paths(network, written.digest) + _package_paths(network, amended.digest)
    wait_until(lambda: all(p.exists() for p in paths), 30, "replication")
    patient = cast.client(cast.patient, 0)
    history = patient.history(written.record_id)
    assert [v.version for v in history.versions] == [1, 2]
    patient.erase(written.record_id, "GDPR Art. 17 request")
    wait_until(lambda: not any(p.exists() for p in paths), 30, "erasure on every node")
    with pytest.raises(RecordErased):
        cast.client(cast.outsider, 1).read(written.record_id)


def test_patient_exports_a_bundle(network: Network, cast: Cast) -> None:
    bundle = cast.client(cast.patient, 0).export_bundle(cast.patient.member_id)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    validate_resource(bundle)
    assert len(bundle["entry"]) >= 3  # type: ignore[arg-type]


def test_proofs_check_against_a_trusted_validator_set(network: Network, cast: Cast) -> None:
    rpc = network.configs[0].cometbft_rpc
    key = member_key(cast.patient.member_id)
    trusted = trusted_validators_from_genesis(str(network.configs[0].genesis_path))
    with LedgerClient(rpc, network.chain_id, trusted_validators=trusted) as client:
        verified = client.verified_state(key)
        assert verified.value is not None and verified.header.signed_power * 3 > 80
    strangers = {KeyPair.generate().verify_key: 10 for _ in range(4)}
    with (
        LedgerClient(rpc, network.chain_id, trusted_validators=strangers) as client,
        pytest.raises(ProofError, match="trusted validators"),
    ):
        client.verified_state(key)


def test_a_read_survives_a_custodian_that_is_down_or_lies(network: Network, cast: Cast) -> None:
    """t = 2 of 4: with one custodian stopped and another answering with a forged share, the
    reader detects the forgery by its commitment and still decrypts with two honest shares."""
    written = cast.client(cast.doctor, 0).put(_lab_result(cast, 7), cast.patient.member_id)
    paths = _package_paths(network, written.digest)
    wait_until(lambda: all(p.exists() for p in paths), 30, "replication")
    colleague = cast.client(cast.enroll_colleague(), 0)
    apis = colleague.node_apis()
    liar = _ForgingCustodian(cast.patient)  # answers with a well-formed share of random bytes
    stopped = network.configs[1]
    node_down(stopped.home)
    try:
        colleague._node_apis = {**apis, network.configs[0].organization: liar.url}
        read = colleague.read(written.record_id)
    finally:
        liar.close()
        node_up(stopped.home)
    assert read.resource["resourceType"] == "Observation"
    assert read.bad_shares_from == (network.configs[0].organization,)
    assert set(read.shares_from) == {
        network.configs[2].organization,
        network.configs[3].organization,
    }
    network.wait_all_at(max(h or 0 for h in network.heights().values()) + 1)
