"""Claims end to end on a real 4-validator network: a hospital's billing office submits an
encrypted FHIR Claim with a supporting lab result; the insurer (CarePlus, node 4) reads the
Claim by the claim-insurer rule but the lab result only under the patient's payment consent;
a provider cannot adjudicate; the insurer adjudicates partially, pays, the patient appeals,
the insurer decides again and pays the difference; the patient sees every step and reads the
ClaimResponses; a duplicate is flagged; bad amounts and unknown codes are refused and change
nothing; the CLI shows the claim, lists claims and prints the statistics."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from e2e_network import Network, running_network, wait_until

from medledger.auth import node_audience, sign_request
from medledger.cli.claims import claim as claim_cli
from medledger.client.claims import ClaimsClient, build_claim_response
from medledger.client.records import AccessDenied, Disclosure, RecordsClient
from medledger.client.sdk import QueryError, TxRejected
from medledger.crypto.keys import KeyPair
from medledger.crypto.keystore import Keyring
from medledger.ledger.claims import (
    CPT_SYSTEM,
    AppealReason,
    Claim,
    ClaimAction,
    ClaimStatus,
    ItemDecision,
    Outcome,
)
from medledger.ledger.consent import GranteeKind, Purpose, ScopeKind
from medledger.ledger.errors import Code
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.validation import validate_resource

pytestmark = pytest.mark.e2e

BASE_PORT = 29900
SECOND_NS = 1_000_000_000
PASSPHRASE = "claims e2e passphrase"
DIAGNOSIS = "Type 2 diabetes mellitus without complications"


def _service_date() -> str:
    return (datetime.now(UTC) - timedelta(days=2)).strftime("%Y-%m-%d")


SERVED = _service_date()
LINES = [
    ("99214", "Office visit, established patient, moderate complexity", 150.0),
    ("83036", "Hemoglobin A1c", 45.5),
    ("36415", "Routine venipuncture", 10.0),
]


def claim_resource(
    patient: str,
    provider: str,
    insurer: str,
    lines: list[tuple[str, str, float]] = LINES,
    served: str = SERVED,
    total: float | None = None,
) -> dict[str, Any]:
    """A realistic FHIR R4 professional Claim."""
    items = []
    for sequence, (code, display, amount) in enumerate(lines, start=1):
        items.append(
            {
                "sequence": sequence,
                "diagnosisSequence": [1],
                "productOrService": {
                    "coding": [{"system": CPT_SYSTEM, "code": code, "display": display}]
                },
                "servicedDate": served,
                "quantity": {"value": 1},
                "unitPrice": {"value": amount, "currency": "USD"},
                "net": {"value": amount, "currency": "USD"},
            }
        )
    return {
        "resourceType": "Claim",
        "status": "active",
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/claim-type",
                    "code": "professional",
                }
            ]
        },
        "use": "claim",
        "patient": {"reference": f"Patient/{patient}"},
        "billablePeriod": {"start": served, "end": served},
        "created": f"{served}T17:00:00Z",
        "provider": {"reference": f"Organization/{provider}"},
        "insurer": {"reference": f"Organization/{insurer}"},
        "priority": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/processpriority",
                    "code": "normal",
                }
            ]
        },
        "diagnosis": [
            {
                "sequence": 1,
                "diagnosisCodeableConcept": {
                    "coding": [
                        {
                            "system": "http://hl7.org/fhir/sid/icd-10-cm",
                            "code": "E11.9",
                            "display": DIAGNOSIS,
                        }
                    ]
                },
            }
        ],
        "insurance": [
            {"sequence": 1, "focal": True, "coverage": {"reference": "Coverage/cov-4471"}}
        ],
        "item": items,
        "total": {
            "value": sum(a for _, _, a in lines) if total is None else total,
            "currency": "USD",
        },
    }


def hba1c(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": f"{SERVED}T09:30:00Z",
        "valueQuantity": {
            "value": 7.9,
            "unit": "%",
            "system": "http://unitsofmeasure.org",
            "code": "%",
        },
    }


class Cast:
    """The people: a patient, a clinician and a billing clerk at the hospital (node 1), a
    billing clerk at the clinic (node 2), and a claims examiner at the insurer (node 4)."""

    def __init__(self, network: Network) -> None:
        self.network = network
        self.hospital = network.configs[0].organization
        self.clinic = network.configs[1].organization
        self.insurer = network.configs[3].organization
        self.patient = self._enroll(0, Role.PATIENT)
        self.doctor = self._enroll(0, Role.CLINICIAN)
        self.billing = self._enroll(0, Role.BILLING)
        self.examiner = self._enroll(3, Role.BILLING)
        self.nodes: dict[str, int] = {}
        self._records: dict[str, RecordsClient] = {}

    def _enroll(self, node: int, role: Role) -> KeyPair:
        keys = KeyPair.generate()
        body = EnrollMember(keys.verify_key, keys.encryption_key, role)
        self.network.client(node).submit(self.network.admins[node], "member.enroll", body)
        return keys

    def records(self, keys: KeyPair, node: int) -> RecordsClient:
        if keys.member_id not in self._records:
            cfg = self.network.configs[node]
            self._records[keys.member_id] = RecordsClient(
                self.network.client(node), cfg.api_url, keys
            )
            self.nodes[keys.member_id] = node
        return self._records[keys.member_id]

    def claims(self, keys: KeyPair, node: int) -> ClaimsClient:
        return ClaimsClient(self.records(keys, node))

    def close(self) -> None:
        for client in self._records.values():
            client.close()


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with running_network(tmp_path_factory.mktemp("claims") / "net", BASE_PORT) as net:
        yield net


@pytest.fixture(scope="module")
def cast(network: Network) -> Iterator[Cast]:
    people = Cast(network)
    yield people
    people.close()


@pytest.fixture(scope="module")
def lab_record(cast: Cast) -> str:
    written = cast.records(cast.doctor, 0).put(
        hba1c(cast.patient.member_id), cast.patient.member_id
    )
    return written.record_id


def _settled(client: ClaimsClient, claim_id: str, steps: int) -> Claim:
    """The claim as the client's node sees it once that node has committed `steps` steps (a
    step committed through another node reaches this one a moment later)."""

    def seen() -> Claim | None:
        try:
            found = client.show(claim_id)
        except QueryError:
            return None
        return found if len(found.history) >= steps else None

    settled: Claim = wait_until(seen, 30, f"claim {claim_id} at {steps} steps")
    return settled


def _package_paths(network: Network, digest: str) -> list[Path]:
    return [cfg.home / "packages" / digest[:2] / digest for cfg in network.configs]


def test_claim_lifecycle_on_the_network(network: Network, cast: Cast, lab_record: str) -> None:
    pid = cast.patient.member_id
    billing = cast.claims(cast.billing, 0)
    examiner = cast.claims(cast.examiner, 3)
    patient = cast.claims(cast.patient, 0)
    resource = claim_resource(pid, cast.hospital, cast.insurer)

    submitted = billing.submit(resource, [lab_record], claim_id="claim-e2e-1")
    claim = submitted.claim
    assert claim.status is ClaimStatus.SUBMITTED and not claim.duplicate_of
    assert (claim.provider, claim.insurer, claim.coverage) == (
        cast.hospital,
        cast.insurer,
        "cov-4471",
    )
    assert [(i.code, i.amount) for i in claim.items] == [
        ("99214", 15_000),
        ("83036", 4_550),
        ("36415", 1_000),
    ]
    assert claim.total == 20_550 and claim.supporting == (lab_record,)

    # The Claim package is replicated like any record; no PHI of it is on the chain.
    history = cast.records(cast.billing, 0).history(claim.claim_record)
    digest = history.versions[0].package_digest
    wait_until(
        lambda: all(p.exists() for p in _package_paths(network, digest)), 30, "claim package"
    )
    for cfg in network.configs:
        assert DIAGNOSIS.encode() not in (cfg.state_dir / "state.db").read_bytes()

    # The patient opens the Claim with their own key envelope; the insurer through the
    # claim-insurer rule and key shares from the custodians.
    expected = validate_resource(resource).resource
    assert patient.read_claim(claim.id) == expected
    _settled(examiner, claim.id, 1)
    assert examiner.read_claim(claim.id) == expected

    def disclosed() -> list[Disclosure]:
        return [
            d
            for d in cast.records(cast.patient, 0).disclosures(pid)
            if d.grant.record_id == claim.claim_record
        ]

    (disclosure,) = wait_until(disclosed, 30, "the insurer's read among the disclosures")
    assert disclosure.grant.basis == "claim-insurer"
    assert disclosure.grant.requester == cast.examiner.member_id

    # Without the patient's payment consent the insurer cannot read the supporting record; a
    # consent for treatment does not help.
    examiner_records = cast.records(cast.examiner, 3)
    with pytest.raises(AccessDenied, match="no consent"):
        examiner_records.read(lab_record, Purpose.PAYMENT)
    now = time.time_ns()
    patient_records = cast.records(cast.patient, 0)
    patient_records.grant_consent(
        pid,
        GranteeKind.ORGANIZATION,
        cast.insurer,
        (Purpose.TREATMENT,),
        now - 3600 * SECOND_NS,
        now + 86_400 * SECOND_NS,
    )
    with pytest.raises(AccessDenied, match="not payment"):
        examiner_records.read(lab_record, Purpose.PAYMENT)

    # A provider cannot adjudicate; bad amounts and unknown reason codes change nothing.
    with pytest.raises(TxRejected) as refused:
        billing.adjudicate(claim.id)
    assert refused.value.code == Code.UNAUTHORIZED and "claim's insurer" in refused.value.log
    too_much = (ItemDecision(1, 15_001), ItemDecision(2, 4_550), ItemDecision(3, 1_000))
    with pytest.raises(TxRejected, match=r"exceeds the 150\.00 USD billed"):
        examiner.adjudicate(claim.id, too_much)
    unknown = (ItemDecision(1, 12_000, ("9999",)), ItemDecision(2, 4_550), ItemDecision(3, 1_000))
    with pytest.raises(TxRejected, match="unknown adjustment reason code"):
        examiner.adjudicate(claim.id, unknown)
    unchanged = patient.show(claim.id)
    assert unchanged.status is ClaimStatus.SUBMITTED and len(unchanged.history) == 1
    assert unchanged.responses == ()

    # Partial approval: item 1 reduced to the fee schedule, item 3 bundled into item 2.
    partial = (
        ItemDecision(1, 12_000, ("45",)),
        ItemDecision(2, 4_550),
        ItemDecision(3, 0, ("97",)),
    )
    decided = examiner.adjudicate(claim.id, partial)
    assert decided.claim.outcome is Outcome.PARTIAL and decided.claim.approved_total == 16_550
    # The patient sees the step and reads the ClaimResponse; the provider reads it by rule.
    seen = _settled(patient, claim.id, 2)
    assert [s.action for s in seen.history] == [ClaimAction.SUBMIT, ClaimAction.ADJUDICATE]
    (response,) = patient.read_responses(claim.id)
    assert response["disposition"] == "Claim partially approved"
    assert response["request"] == {"reference": f"Claim/{claim.id}"}
    assert billing.read_responses(claim.id) == [response]

    paid = examiner.pay(claim.id, "eft-20261125-0001")
    assert paid.claim.status is ClaimStatus.PAID and paid.claim.paid_total == 16_550

    # The patient appeals and consents to the insurer reading lab results for payment.
    patient_records.grant_consent(
        pid,
        GranteeKind.ORGANIZATION,
        cast.insurer,
        (Purpose.PAYMENT,),
        now - 3600 * SECOND_NS,
        now + 86_400 * SECOND_NS,
        ScopeKind.CATEGORIES,
        ("laboratory",),
    )
    appealed = patient.appeal(claim.id, AppealReason.MEDICAL_NECESSITY)
    assert appealed.claim.status is ClaimStatus.APPEALED
    lab = examiner_records.read(lab_record, Purpose.PAYMENT)
    assert lab.resource["code"]["coding"][0]["code"] == "4548-4"

    # The insurer decides again from a FHIR ClaimResponse of its own, and pays the difference.
    again = (ItemDecision(1, 12_000, ("45",)), ItemDecision(2, 4_550), ItemDecision(3, 1_000))
    document = build_claim_response(examiner.show(claim.id), again, response_id="cr-2")
    redecided = examiner.adjudicate(claim.id, response=document)
    assert redecided.claim.decisions == again and redecided.claim.approved_total == 17_550
    final = examiner.pay(claim.id, "eft-20261125-0002").claim
    assert final.status is ClaimStatus.PAID and final.paid_total == 17_550

    # The patient sees the whole history, and each step is on their proven audit trail.
    history_seen = _settled(patient, claim.id, 6).history
    assert [(s.action, s.status) for s in history_seen] == [
        (ClaimAction.SUBMIT, ClaimStatus.SUBMITTED),
        (ClaimAction.ADJUDICATE, ClaimStatus.ADJUDICATED),
        (ClaimAction.PAY, ClaimStatus.PAID),
        (ClaimAction.APPEAL, ClaimStatus.APPEALED),
        (ClaimAction.ADJUDICATE, ClaimStatus.ADJUDICATED),
        (ClaimAction.PAY, ClaimStatus.PAID),
    ]
    assert history_seen[3].actor == pid
    assert [r["disposition"] for r in patient.read_responses(claim.id)] == [
        "Claim partially approved",
        "Claim partially approved",
    ]
    trail = patient_records.audit_trail(pid)
    steps = [e.entry.type for e in trail if e.entry.type.startswith("claim.") and e.entry.code == 0]
    assert steps == [
        "claim.submit",
        "claim.adjudicate",
        "claim.pay",
        "claim.appeal",
        "claim.adjudicate",
        "claim.pay",
    ]
    hospital = next(p for p in billing.stats().providers if p.organization == cast.hospital)
    assert hospital.paid >= 1 and any(t.paid >= 17_550 for t in hospital.totals)


def test_duplicates_are_flagged_and_bad_claims_change_nothing(
    network: Network, cast: Cast, lab_record: str
) -> None:
    pid = cast.patient.member_id
    billing = cast.claims(cast.billing, 0)
    first = billing.submit(claim_resource(pid, cast.hospital, cast.insurer, LINES[1:2]))
    again = billing.submit(claim_resource(pid, cast.hospital, cast.insurer, LINES[1:2]))
    assert first.claim.duplicate_of  # the lifecycle claim billed 83036 on the same day
    assert again.claim.duplicate_of == first.claim.duplicate_of

    before_claims = billing.list_claims(patient=pid)
    before_records = cast.records(cast.patient, 0).records_of(pid)
    bad = [
        (
            claim_resource(pid, cast.hospital, cast.insurer, [("99999", "Unknown", 80.0)]),
            "unknown service code '99999'",
        ),
        (
            claim_resource(pid, cast.hospital, cast.insurer, [("99213", "Visit", -80.0)]),
            "negative",
        ),
        (
            claim_resource(pid, cast.hospital, cast.insurer, LINES, total=999.0),
            "not the sum",
        ),
    ]
    for resource, message in bad:
        with pytest.raises(TxRejected, match=message) as refused:
            billing.submit(resource)
        assert refused.value.code == Code.INVALID_BODY
    assert billing.list_claims(patient=pid) == before_claims
    assert cast.records(cast.patient, 0).records_of(pid) == before_records


MEMBER_COMMANDS = frozenset({"submit", "adjudicate", "pay", "appeal"})


def _cli(network: Network, node: int, keys_dir: Path, command: str, *args: str) -> Any:
    """`medledger claim COMMAND ARGS` in-process, against one node."""
    cfg = network.configs[node]
    where = ["--node", cfg.cometbft_rpc]
    if command in MEMBER_COMMANDS:
        where += ["--api", cfg.api_url]
    env = {"MEDLEDGER_PASSPHRASE": PASSPHRASE, "MEDLEDGER_KEYS": str(keys_dir)}
    return CliRunner().invoke(claim_cli, [command, *where, *args], env=env)


def test_cli_submit_deny_appeal_show_list_stats(
    network: Network, cast: Cast, tmp_path: Path
) -> None:
    keys_dir = tmp_path / "keys"
    ring = Keyring(keys_dir)
    ring.add("billing", cast.billing, PASSPHRASE, fast=True)
    ring.add("examiner", cast.examiner, PASSPHRASE, fast=True)
    pid = cast.patient.member_id
    source = tmp_path / "claim.json"
    ecg = [("93000", "Electrocardiogram", 60.0)]
    source.write_text(json.dumps(claim_resource(pid, cast.hospital, cast.insurer, ecg)))

    out = _cli(
        network, 0, keys_dir, "submit", "--key", "billing", "--id", "claim-cli-1", str(source)
    )
    assert out.exit_code == 0, out.output
    assert "claim claim-cli-1 submitted in block" in out.stdout and "60.00 USD" in out.stdout

    # The provider may not decide; the error is one clear line.
    out = _cli(network, 0, keys_dir, "adjudicate", "--key", "billing", "claim-cli-1")
    assert out.exit_code == 1 and "unauthorized" in out.stderr and "Traceback" not in out.output

    _settled(cast.claims(cast.examiner, 3), "claim-cli-1", 1)
    out = _cli(
        network, 3, keys_dir, "adjudicate", "--key", "examiner", "claim-cli-1", "--deny", "50"
    )
    assert out.exit_code == 0, out.output
    assert "status    adjudicated (denied)" in out.stdout
    out = _cli(
        network, 3, keys_dir, "adjudicate", "--key", "examiner", "claim-cli-1", "--deny", "77777"
    )
    assert out.exit_code == 2 and "unknown reason code" in out.output
    out = _cli(network, 3, keys_dir, "pay", "--key", "examiner", "claim-cli-1", "--reference", "x1")
    assert out.exit_code == 1 and "denied" in out.stderr

    out = _cli(network, 0, keys_dir, "appeal", "--key", "billing", "claim-cli-1", "--reason",
               "medical-necessity")  # fmt: skip
    assert out.exit_code == 0, out.output
    out = _cli(network, 3, keys_dir, "adjudicate", "--key", "examiner", "claim-cli-1",
               "--item", "1=55.00:45")  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "55.00 USD" in out.stdout and "45 Charge exceeds fee schedule" in out.stdout

    _settled(cast.claims(cast.billing, 0), "claim-cli-1", 4)
    shown = _cli(network, 0, keys_dir, "show", "claim-cli-1")
    assert shown.exit_code == 0, shown.output
    assert "adjudicated (partial)" in shown.stdout and "medical-necessity" in shown.stdout
    as_json = json.loads(
        _cli(network, 0, keys_dir, "show", "claim-cli-1", "--format", "json").stdout
    )
    assert [s["action"] for s in as_json["history"]] == [
        "submit",
        "adjudicate",
        "appeal",
        "adjudicate",
    ]

    listed = _cli(network, 0, keys_dir, "list", "--patient", pid)
    assert (
        listed.exit_code == 0 and "claim-cli-1" in listed.stdout and "duplicate of" in listed.stdout
    )

    stats = json.loads(_cli(network, 0, keys_dir, "stats", "--format", "json").stdout)
    insurer = next(i for i in stats["insurers"] if i["organization"] == cast.insurer)
    assert insurer["claims"] >= 4 and insurer["decided"] >= 2
    assert insurer["denial_rate"]["denominator"] == insurer["decided"]
    table = _cli(network, 0, keys_dir, "stats", "--provider", cast.hospital)
    assert table.exit_code == 0 and cast.hospital in table.stdout and "%" in table.stdout
    both = _cli(network, 0, keys_dir, "list", "--patient", pid, "--insurer", cast.insurer)
    assert both.exit_code == 2


def test_native_api_shows_claims_to_their_parties_only(network: Network, cast: Cast) -> None:
    """GET /v1/claims…: the patient, the provider's and the insurer's members see a claim and
    its history; a member of another organization does not; network-wide totals need an
    auditor."""
    api = network.configs[0].api_url
    audience = node_audience(network.configs[0].organization)

    def get(keys: KeyPair, path: str) -> httpx.Response:
        header = sign_request(keys, keys.member_id, "GET", path, audience=audience)
        return httpx.get(api + path, headers={"Authorization": header}, timeout=10)

    mine = get(cast.patient, f"/v1/claims?party=patient:{cast.patient.member_id}")
    assert mine.status_code == 200 and mine.json(), mine.text
    claim_id = mine.json()[0]["id"]
    shown = get(cast.examiner, f"/v1/claims/{claim_id}")
    assert shown.status_code == 200 and shown.json()["history"]
    stats = get(cast.billing, f"/v1/claims/stats?party=provider:{cast.hospital}")
    assert stats.status_code == 200 and stats.json()["providers"]

    def enrolled_elsewhere(node: int, role: Role) -> KeyPair:
        """A member enrolled through another node, once node 0 (whose API we ask) knows it."""
        keys = cast._enroll(node, role)

        def known() -> bool:
            try:
                network.client(0).query("/member", keys.member_id)
            except QueryError:
                return False
            return True

        wait_until(known, 30, "node 0 to commit the enrollment")
        return keys

    outsider = enrolled_elsewhere(2, Role.BILLING)
    assert get(outsider, f"/v1/claims/{claim_id}").status_code == 403
    assert get(outsider, f"/v1/claims?party=patient:{cast.patient.member_id}").status_code == 403
    assert get(outsider, "/v1/claims").status_code == 403
    assert httpx.get(api + "/v1/claims", timeout=10).status_code == 401
    auditor = enrolled_elsewhere(3, Role.AUDITOR)
    assert get(auditor, "/v1/claims").status_code == 200
