"""The node's service layer on an in-process chain: committed state read from snapshots of its
own, commits learned from the application, packages stored and shares released in-process with
the same refusals (and node audit entries) as the HTTP API."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import ORGANIZATIONS, Consortium, keys_for

from medledger.auth import ReplayCache
from medledger.client.sdk import ClientError, QueryError
from medledger.crypto import package as packaging
from medledger.crypto.keys import KeyPair
from medledger.ledger import codec
from medledger.ledger.access import RequestAccess, RequestSession
from medledger.ledger.consent import Purpose
from medledger.ledger.errors import Code
from medledger.ledger.model import Member, Role
from medledger.ledger.records import EraseRecord, PutRecord, threshold_for
from medledger.ledger.transactions import ChangeMemberStatus, EnrollMember
from medledger.metrics import Metrics
from medledger.node.appmain import apply_census, take_census
from medledger.node.replication import Replicator
from medledger.services.commits import CommitNotices
from medledger.services.home import InProcessNode
from medledger.services.ledger import NodeLedger
from medledger.services.packages import RecordServices
from medledger.store.node_audit import NodeAuditLog
from medledger.store.packages import PackageStore
from medledger.store.sqlite import CommittedView
from medledger.store.uploads import PendingUploads

CUSTODIANS = tuple(sorted(org for org, _, _ in ORGANIZATIONS))
NODE = "st-mary"
# Nothing listens there: whatever the services send to the RPC fails loudly.
NO_RPC = "http://127.0.0.1:9"


def enroll(c: Consortium, org: str, name: str, role: Role) -> KeyPair:
    keys = keys_for(name)
    body = EnrollMember(keys.verify_key, keys.encryption_key, role)
    assert c.submit(c.admin(org), "member.enroll", body).ok
    return keys


@pytest.fixture
def view(consortium: Consortium) -> CommittedView:
    return CommittedView(consortium.chain.store.path)


@pytest.fixture
def node(consortium: Consortium, view: CommittedView, tmp_path: Path) -> InProcessNode:
    node_keys = keys_for(f"{NODE}/node")
    packages = PackageStore(tmp_path / "packages")
    services = RecordServices(
        store=consortium.chain.store,
        view=CommittedView(consortium.chain.store.path),
        packages=packages,
        replicator=Replicator(packages, node_keys, NODE, {}),
        node_keys=node_keys,
        organization=NODE,
        peers={"riverside": "http://127.0.0.1:2"},
        api_url="http://127.0.0.1:1",
        audit=NodeAuditLog(tmp_path / "node-audit.db"),
        replays=ReplayCache(),
        uploads=PendingUploads(tmp_path / "packages" / "pending"),
    )
    return InProcessNode(services, view)


# --- committed state --------------------------------------------------------------------------


def test_a_snapshot_reads_one_committed_height_while_blocks_commit(
    consortium: Consortium, view: CommittedView
) -> None:
    first = enroll(consortium, NODE, "dr-early", Role.CLINICIAN)
    ledger = NodeLedger(view, CommitNotices(), NO_RPC, "medledger-test")
    with view.snapshot() as reads:
        height = reads.committed()[0]
        late = enroll(consortium, NODE, "dr-late", Role.CLINICIAN)
        # The block committed meanwhile is not in this snapshot...
        assert reads.committed()[0] == height
        assert reads.get(b"member/" + late.member_id.encode()) is None
        assert reads.get(b"member/" + first.member_id.encode()) is not None
    # ...and is in the next one.
    assert view.height() == height + 1
    assert ledger.query("/member", late.member_id, Member).role is Role.CLINICIAN


def test_staged_block_writes_are_not_read_before_commit(
    consortium: Consortium, view: CommittedView
) -> None:
    keys = keys_for("dr-staged")
    chain = consortium.chain
    tx = consortium.tx(
        consortium.admin(NODE),
        "member.enroll",
        EnrollMember(keys.verify_key, keys.encryption_key, Role.CLINICIAN),
    )
    chain.time_ns += chain.block_interval_ns
    outcome = chain.ledger.finalize_block(chain.ledger.height + 1, chain.time_ns, [tx])
    assert outcome.results[0].ok
    ledger = NodeLedger(view, CommitNotices(), NO_RPC, "medledger-test")
    assert ledger.query_found("/member", keys.member_id, Member) is None
    chain.ledger.commit()
    assert ledger.query_found("/member", keys.member_id, Member) is not None


def test_queries_answer_in_process_as_the_abci_query_does(
    consortium: Consortium, view: CommittedView
) -> None:
    doctor = enroll(consortium, NODE, "dr-query", Role.CLINICIAN)
    metrics = Metrics()
    ledger = NodeLedger(view, CommitNotices(), NO_RPC, "medledger-test", metrics)
    member = ledger.query("/member", doctor.member_id, Member)
    assert member.organization == NODE
    assert ledger.next_nonce(doctor.member_id) == 1
    assert {o["id"] for o in ledger.query("/organizations")} == set(CUSTODIANS)
    assert ledger.height() == consortium.chain.ledger.height
    with pytest.raises(QueryError) as unknown:
        ledger.query("/member", "nobody", Member)
    assert unknown.value.code == Code.NOT_FOUND
    with pytest.raises(QueryError) as bad:
        ledger.query("/block", "not a height")
    assert bad.value.code == Code.INVALID_BODY
    with pytest.raises(QueryError) as huge:
        ledger.query("/member", "x" * 5000)
    assert huge.value.code == Code.TOO_LARGE
    # An answer with a proof needs the store's state tree and a signed header: the RPC.
    with pytest.raises(ClientError, match="cannot reach"):
        ledger.query_raw("/member", doctor.member_id.encode(), prove=True)
    with pytest.raises(ClientError, match="cannot reach"):
        ledger.query_raw("/audit/patient", doctor.member_id.encode())
    rendered = metrics.render().decode()
    # Counted whether found or refused: one member found, one unknown, one too large.
    assert 'medledger_services_queries_total{path="/member"} 3.0' in rendered
    assert 'medledger_services_queries_total{path="/nonce"} 1.0' in rendered
    assert 'medledger_services_rpc_calls_total{method="abci_query"} 2.0' in rendered


# --- commits ----------------------------------------------------------------------------------


def test_a_waiter_learns_its_transactions_result_from_the_commit(
    consortium: Consortium, view: CommittedView
) -> None:
    notices = CommitNotices()
    ledger = NodeLedger(view, notices, NO_RPC, "medledger-test")
    keys = keys_for("dr-waited")
    tx = consortium.tx(
        consortium.admin(NODE),
        "member.enroll",
        EnrollMember(keys.verify_key, keys.encryption_key, Role.CLINICIAN),
    )
    refused = consortium.tx(
        consortium.admin(NODE),
        "member.enroll",
        EnrollMember(keys.verify_key, keys.encryption_key, Role.CLINICIAN),
    )
    tx_hash = codec.tx_hash(tx).hex().upper()
    refused_hash = codec.tx_hash(refused).hex()  # any case
    answers: list[object] = []
    waiter = threading.Thread(target=lambda: answers.append(ledger.wait_for(tx_hash, 30)))
    waiter.start()
    outcome = consortium.run(tx, refused)
    notices.block_committed(outcome)
    waiter.join(30)
    [waited] = answers
    assert waited.height == outcome.height and waited.code == 0  # type: ignore[attr-defined]
    # Asked after the commit: still answered, with the refusal's code and log.
    late = ledger.wait_for(refused_hash, 0.1)
    assert late.code == outcome.results[1].code != Code.OK and late.log == outcome.results[1].log
    assert ledger.tx_status(refused_hash) == late
    with pytest.raises(ClientError, match="not committed within"):
        ledger.wait_for("AB" * 32, 0.05)


def test_commit_notices_keep_a_bounded_number_of_results(consortium: Consortium) -> None:
    notices = CommitNotices(capacity=2)
    keys = [keys_for(f"dr-bounded-{i}") for i in range(3)]
    txs = [
        consortium.tx(
            consortium.admin(NODE),
            "member.enroll",
            EnrollMember(k.verify_key, k.encryption_key, Role.CLINICIAN),
        )
        for k in keys
    ]
    notices.block_committed(consortium.run(*txs))
    hashes = [codec.tx_hash(tx).hex() for tx in txs]
    assert notices.result(hashes[0]) is None
    assert notices.result(hashes[1]) is not None and notices.result(hashes[2]) is not None


# --- packages and shares ----------------------------------------------------------------------


PLAINTEXT = b'{"resourceType":"Condition","code":{"text":"Asthma"}}'


def seal(record_id: str, patient: KeyPair, author: KeyPair) -> packaging.SealedRecord:
    return packaging.seal_record(
        PLAINTEXT,
        record_id=record_id,
        record_version=1,
        patient=patient.member_id,
        author=author.member_id,
        patient_key=patient.encryption_key,
        author_key=author.encryption_key,
        custodians=[
            packaging.Custodian(org, i + 1, keys_for(f"{org}/node").encryption_key)
            for i, org in enumerate(CUSTODIANS)
        ],
        threshold=threshold_for(len(CUSTODIANS)),
    )


def put(c: Consortium, author: KeyPair, patient: KeyPair, sealed: packaging.SealedRecord) -> None:
    body = PutRecord(
        record_id=sealed_record_id(sealed),
        patient=patient.member_id,
        resource_type="Condition",
        category="problem-list-item",
        package_digest=sealed.digest,
        package_size=len(sealed.package),
        commitment=sealed.commitment,
        threshold=threshold_for(len(CUSTODIANS)),
        custodians=CUSTODIANS,
    )
    result = c.submit(author, "record.put", body)
    assert result.ok, result.log


def sealed_record_id(sealed: packaging.SealedRecord) -> str:
    return packaging.decode_package(sealed.package).record_id


def test_packages_and_shares_in_process_refuse_whom_the_api_refuses(
    consortium: Consortium, node: InProcessNode
) -> None:
    patient = enroll(consortium, NODE, "patient-ines", Role.PATIENT)
    doctor = enroll(consortium, NODE, "dr-rosa", Role.CLINICIAN)
    outsider = enroll(consortium, "riverside", "dr-outsider", Role.CLINICIAN)
    sealed = seal("rec-in-process", patient, doctor)
    # A patient writes no records, so uploads no package.
    refused = node.put_package(patient.member_id, sealed.digest, sealed.package)
    assert refused.status == 403 and "upload" in refused.text
    assert not node.services.packages.has(sealed.digest)
    # Bytes that do not hash to the digest are refused.
    wrong = node.put_package(doctor.member_id, sealed.digest, sealed.package + b"x")
    assert wrong.status == 400
    assert node.put_package(doctor.member_id, sealed.digest, sealed.package).status == 201
    # In batches: each package decided on its own, a non-author's refused whole.
    more = [seal(f"rec-batch-{i}", patient, doctor) for i in range(2)]
    pairs = [(more[0].digest, more[0].package), (more[1].digest, b"not it")]
    pairs.append((sealed.digest, sealed.package))
    assert [a.status for a in node.put_packages(doctor.member_id, pairs)] == [201, 400, 200]
    assert [a.status for a in node.put_packages(patient.member_id, pairs)] == [403] * 3
    assert [a.status for a in node.put_packages("nobody", pairs[:1])] == [401]
    assert not node.services.packages.has(more[1].digest)
    put(consortium, doctor, patient, sealed)
    # The package goes to its patient and author, not to another organization's clinician.
    assert node.get_package(patient.member_id, sealed.digest, "").status == 200
    assert node.get_package(outsider.member_id, sealed.digest, "").status == 403
    # Another organization's clinician has no consent: denied, so no grant and no share.
    denied = consortium.submit(
        outsider, "access.request", RequestAccess("rec-in-process", Purpose.TREATMENT)
    )
    assert denied.code is Code.ACCESS_DENIED
    # The author organization's care team is granted; the share goes to the grantee only.
    granted = consortium.submit(
        doctor, "access.request", RequestAccess("rec-in-process", Purpose.TREATMENT)
    )
    assert granted.ok, granted.log
    grant_id = granted.log.split("grant ")[1].split()[0]
    stolen = node.release_share(outsider.member_id, grant_id)
    assert stolen.status == 403 and "another member" in stolen.text
    released = node.release_share(doctor.member_id, grant_id)
    assert released.status == 200
    share = packaging.unseal_share(released.body, doctor.encryption_secret)
    assert packaging.share_is_valid(packaging.decode_package(sealed.package), share)
    assert node.release_share(doctor.member_id, "0" * 32).status == 404
    # A suspended member is refused as the API's authentication refuses them.
    suspend = ChangeMemberStatus(doctor.member_id, "left the hospital")
    assert consortium.submit(consortium.admin(NODE), "member.suspend", suspend).ok
    assert node.release_share(doctor.member_id, grant_id).status == 401
    outcomes = [(e["actor"], e["outcome"]) for e in node.services.audit.entries("key.release")]
    assert outcomes[::-1] == [  # the log lists the latest first
        (outsider.member_id, "refused"),
        (doctor.member_id, "released"),
        (doctor.member_id, "refused"),
        (doctor.member_id, "refused"),
    ]
    assert node.node_apis() == {NODE: "http://127.0.0.1:1", "riverside": "http://127.0.0.1:2"}


def test_a_sessions_shares_come_in_one_request_and_only_to_its_requester(
    consortium: Consortium, node: InProcessNode
) -> None:
    patient = enroll(consortium, NODE, "patient-sol", Role.PATIENT)
    doctor = enroll(consortium, NODE, "dr-sol", Role.CLINICIAN)
    outsider = enroll(consortium, "riverside", "dr-other", Role.CLINICIAN)
    records = []
    for i in range(3):
        sealed = seal(f"rec-session-{i}", patient, doctor)
        assert node.put_package(doctor.member_id, sealed.digest, sealed.package).status == 201
        put(consortium, doctor, patient, sealed)
        records.append(sealed)
    opened = consortium.submit(
        doctor, "access.session", RequestSession(patient.member_id, Purpose.TREATMENT)
    )
    assert opened.ok, opened.log
    session_id = opened.log.split("session ")[1].split()[0]
    asked = [(f"rec-session-{i}", 1) for i in range(3)] + [("rec-session-0", 2)]
    answers = node.release_shares(doctor.member_id, session_id, asked)
    assert [a.status for a in answers] == [200, 200, 200, 404]
    for answer, sealed in zip(answers, records, strict=False):
        share = packaging.unseal_share(answer.body, doctor.encryption_secret)
        assert packaging.share_is_valid(packaging.decode_package(sealed.package), share)
    # The package of a covered record is served under the session; not to anyone else.
    assert node.get_package(doctor.member_id, records[0].digest, session_id).status == 200
    assert node.get_package(outsider.member_id, records[0].digest, session_id).status == 403
    stolen = node.release_shares(outsider.member_id, session_id, asked[:2])
    assert [a.status for a in stolen] == [403, 403]
    assert "another member" in stolen[0].text
    too_many = node.release_shares(doctor.member_id, session_id, asked * 65)
    assert {a.status for a in too_many} == {400}


def test_the_node_audit_log_takes_many_decisions_in_one_write(tmp_path: Path) -> None:
    audit = NodeAuditLog(tmp_path / "audit.db")
    try:
        audit.record_many(
            [
                ("dr-a", "key.release", "s1 rec-1 v1", "released", ""),
                ("dr-a", "key.release", "s1 rec-2 v1", "released", ""),
                ("dr-b", "key.release", "s1 rec-1 v1", "refused", "the grant belongs to another"),
            ]
        )
        audit.record_many([])
        rows = audit.entries("key.release")
        assert [(r["actor"], r["target"], r["outcome"]) for r in rows] == [
            ("dr-b", "s1 rec-1 v1", "refused"),
            ("dr-a", "s1 rec-2 v1", "released"),
            ("dr-a", "s1 rec-1 v1", "released"),
        ]
    finally:
        audit.close()


# --- the package census a node takes after it starts -------------------------------------------


def test_the_package_census_finds_what_to_fetch_destroy_settle_and_adopt(
    consortium: Consortium, node: InProcessNode
) -> None:
    services = node.services
    patient = enroll(consortium, NODE, "patient-census", Role.PATIENT)
    doctor = enroll(consortium, NODE, "dr-census", Role.CLINICIAN)
    held, absent, orphan, erased = (seal(f"rec-census-{i}", patient, doctor) for i in range(4))
    for sealed in (held, orphan, erased):
        assert node.put_package(doctor.member_id, sealed.digest, sealed.package).status == 201
    for sealed in (held, absent, erased):  # `absent` committed, its package never reached us
        put(consortium, doctor, patient, sealed)
    erase = EraseRecord(sealed_record_id(erased), "patient's request")
    assert consortium.submit(patient, "record.erase", erase).ok
    services.uploads.settle(orphan.digest)  # as after a crash before its pending entry was kept
    census = take_census(services.view, services.packages, services.uploads.digests())
    assert census.height == consortium.chain.ledger.height
    assert census.missing == [absent.digest]
    assert census.erased == [erased.digest]
    assert census.unreferenced == [orphan.digest]
    assert sorted(census.settled) == sorted([held.digest, erased.digest])
    apply_census(census, services.replicator, services.uploads, services.packages, services.store)
    assert services.replicator.missing == {absent.digest}
    assert services.packages.is_erased(erased.digest) and not services.packages.has(erased.digest)
    assert held.digest not in services.uploads and services.packages.has(held.digest)
    assert erased.digest not in services.uploads
    assert orphan.digest in services.uploads  # pending again: expires unless a record names it
    assert services.uploads.usage("") == (1, len(orphan.package))


def test_a_package_census_does_not_adopt_what_a_block_named_after_it_was_taken(
    consortium: Consortium, node: InProcessNode
) -> None:
    services = node.services
    patient = enroll(consortium, NODE, "patient-late", Role.PATIENT)
    doctor = enroll(consortium, NODE, "dr-late", Role.CLINICIAN)
    late = seal("rec-late", patient, doctor)
    assert node.put_package(doctor.member_id, late.digest, late.package).status == 201
    services.uploads.settle(late.digest)
    census = take_census(services.view, services.packages, services.uploads.digests())
    assert census.unreferenced == [late.digest]
    put(consortium, doctor, patient, late)  # committed while the census was counting
    apply_census(census, services.replicator, services.uploads, services.packages, services.store)
    assert late.digest not in services.uploads and services.packages.has(late.digest)
