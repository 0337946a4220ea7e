"""The application process of a node: the ledger behind the ABCI socket, its HTTP API, and
the record services (package store, replication, key release)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from medledger.abci.application import LedgerApplication
from medledger.abci.server import AbciServer
from medledger.api.claims import add_claim_routes
from medledger.api.http import build_http_app
from medledger.api.records import add_record_routes
from medledger.auth import ReplayCache
from medledger.config import load_node_config, load_payers
from medledger.fhir.context import FHIR_CONTEXT, FhirContext
from medledger.fhir.routes import (
    add_fhir_routes,
)
from medledger.fhir.smart import TokenService
from medledger.hl7.mllp import start_hl7_listener
from medledger.ledger.app import BlockOutcome
from medledger.ledger.model import Member, member_key
from medledger.ledger.records import (
    PackageRef,
    RecordStatus,
    RecordVersion,
    package_key,
    record_key,
)
from medledger.ledger.state import State, StateReader
from medledger.metrics import Metrics
from medledger.node.replication import Replicator
from medledger.node.services import check_hl7_member, load_services_config
from medledger.node.tasks import Supervisor
from medledger.services.commits import CommitNotices
from medledger.services.custody import Custody
from medledger.services.home import InProcessNode
from medledger.services.ledger import NodeLedger
from medledger.services.mpi import PatientIndex
from medledger.services.packages import RecordServices
from medledger.store.node_audit import NodeAuditLog
from medledger.store.packages import PackageStore
from medledger.store.snapshots import SnapshotStore, load_snapshot_settings
from medledger.store.sqlite import CommittedView, SqliteStore
from medledger.store.uploads import PendingUploads
from medledger.web.app import add_portal_routes

log = logging.getLogger("medledger.node")


# How often unreferenced uploads past their time to live are deleted.
SWEEP_INTERVAL = 60.0


# After a failed package census (say, a disk error), the next attempt.
CENSUS_RETRY = 30.0


def live_packages(reads: StateReader) -> tuple[list[str], list[str]]:
    """Digests of committed record versions: (to hold, erased)."""
    live: list[str] = []
    erased: list[str] = []
    for version in State(reads).read_all(b"record/", RecordVersion):
        (erased if version.status is RecordStatus.ERASED else live).append(version.package_digest)
    return live, erased


@dataclasses.dataclass(frozen=True)
class PackageCensus:
    """The packages this node holds against those committed records name, at one height."""

    height: int
    missing: list[str]  # named by a live record version, not held here
    erased: list[str]  # named by an erased version: destroyed here if still held
    unreferenced: list[str]  # held, named by no committed record
    settled: list[str]  # pending uploads that a committed record version now names


def take_census(view: CommittedView, packages: PackageStore, pending: list[str]) -> PackageCensus:
    """Count, in a worker thread, what `apply_census` acts on. Proportional to the records and
    packages (a million of each takes seconds), so a node takes it after it serves consensus
    again, not before: blocks that commit meanwhile settle and fetch their own packages."""
    with view.snapshot() as reads:
        height = reads.committed()[0]
        live, erased = live_packages(reads)
    held = set(packages.digests())
    named = set(live) | set(erased)
    return PackageCensus(
        height,
        missing=[d for d in live if d not in held],
        erased=erased,
        unreferenced=sorted(held - named),
        settled=[d for d in pending if d in named],
    )


def apply_census(
    census: PackageCensus,
    replicator: Replicator,
    uploads: PendingUploads,
    packages: PackageStore,
    store: SqliteStore,
) -> None:
    """On the event loop: destroy what erased records name, fetch what is missing, stop
    counting uploads that records now name, and count stored packages no record names as
    pending uploads (found after a crash; they expire unless a record comes to name them)."""
    replicator.erase(census.erased)
    replicator.want(census.missing)  # checks again: some may have arrived since
    for digest in census.settled:
        uploads.settle(digest)
    # A block committed since the census may name some of these now.
    orphans = (d for d in census.unreferenced if not is_referenced(store, d))
    uploads.adopt(orphans, packages)


async def census_in_background(
    view: CommittedView,
    packages: PackageStore,
    pending: Callable[[], list[str]],
    apply: Callable[[PackageCensus], None],
    done: dict[str, Any],
) -> None:
    """Take the census off the event loop and apply it on the loop; retried until it works."""
    while True:
        started = time.monotonic()
        try:
            census = await asyncio.to_thread(take_census, view, packages, pending())
            apply(census)
        except Exception:
            log.exception("package census failed; trying again", extra={"retry_s": CENSUS_RETRY})
            await asyncio.sleep(CENSUS_RETRY)
            continue
        seconds = time.monotonic() - started
        done.update(height=census.height, seconds=round(seconds, 3), finished=True)
        log.info(
            "package census done",
            extra={
                "height": census.height,
                "seconds": round(seconds, 3),
                "missing": len(census.missing),
                "unreferenced": len(census.unreferenced),
            },
        )
        return


def committed_package_size(store: SqliteStore, digest: str) -> int | None:
    """The size the committed record naming `digest` declares for its package."""
    state = State(store)
    ref = state.read(package_key(digest), PackageRef)
    if ref is None:
        return None
    version = state.read(record_key(ref.record_id, ref.version), RecordVersion)
    return version.package_size if version is not None else None


def author_organization(store: SqliteStore, digest: str) -> str | None:
    """The organization of the member who wrote the record naming `digest`: its node took the
    upload, so replication asks it first."""
    state = State(store)
    ref = state.read(package_key(digest), PackageRef)
    version = state.read(record_key(ref.record_id, ref.version), RecordVersion) if ref else None
    author = state.read(member_key(version.author), Member) if version else None
    return author.organization if author else None


def is_referenced(store: SqliteStore, digest: str) -> bool:
    """A committed record names the package."""
    return State(store).get(package_key(digest)) is not None


def commit_hook(
    replicator: Replicator, uploads: PendingUploads, notices: CommitNotices
) -> Callable[[BlockOutcome], None]:
    """What the node does after each block commits: tell the services waiting for its
    transactions, destroy the packages it erased (for good: the store keeps their tombstones),
    stop counting the uploads its records name as pending, and fetch those records' packages it
    lacks."""

    def after_commit(outcome: BlockOutcome) -> None:
        notices.block_committed(outcome)
        for digest in (*outcome.packages_erased, *outcome.packages_stored):
            uploads.settle(digest)
        if outcome.packages_erased:
            replicator.erase(outcome.packages_erased)
        if outcome.packages_stored:
            replicator.want(outcome.packages_stored)

    return after_commit


async def sweep_uploads(
    uploads: PendingUploads, packages: PackageStore, store: SqliteStore, report: Callable[[], None]
) -> None:
    """Delete, every SWEEP_INTERVAL, the uploads no committed record named in time."""
    while True:
        await asyncio.sleep(min(SWEEP_INTERVAL, uploads.limits.ttl_seconds))
        expired = uploads.sweep(packages, lambda digest: is_referenced(store, digest))
        if expired:
            log.info("unreferenced uploads expired", extra={"count": len(expired)})
        report()


# The collector's thresholds for a node (CPython's default is (700, 10, 10)). The application
# allocates a hundred-odd short-lived objects per transaction; at the default, the young
# generation was collected ~150 times a second under `make bench`, objects still in flight were
# promoted, and full collections of the ~150,000 live objects paused consensus requests for up
# to 0.3 s. With these and the start-up heap frozen: collections took 0.04-0.1 s of wall time
# per 40 s instead of 1.1-1.4 s, the longest pause 0.01-0.07 s.
GC_THRESHOLDS = (50_000, 20, 20)


def settle_heap() -> None:
    """Once the node is built: collect, freeze what start-up made (modules, FHIR models, the
    state tree; never garbage) out of every later collection, and collect the young generation
    less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve_app(home: Path) -> None:
    cfg = load_node_config(home)
    services_cfg = load_services_config(cfg.home)
    node_keys = services_cfg.unlock_node_keys()
    store = SqliteStore(cfg.state_dir / "state.db")
    metrics = Metrics()
    packages = PackageStore(services_cfg.packages_path)
    uploads = PendingUploads(packages.root / "pending", services_cfg.upload_limits)
    supervisor = Supervisor(observer=metrics)
    # The services' own view of committed state, and the commits they wait for.
    view = CommittedView(store.path)
    notices = CommitNotices()

    def report() -> None:
        status = replicator.status()
        metrics.packages_missing.set(status["missing"])
        metrics.packages_fetched.set(status["fetched"])
        metrics.packages_retrying.set(status["retrying"])
        metrics.package_fetch_failures.set(status["failed_attempts"])
        metrics.uploads_pending.set(len(uploads))
        metrics.uploads_pending_bytes.set(uploads.total_bytes)
        metrics.uploads_expired.set(uploads.expired_total)

    replicator = Replicator(
        packages,
        node_keys,
        cfg.organization,
        services_cfg.peers,
        on_change=report,
        expected_size=lambda digest: committed_package_size(store, digest),
        source=lambda digest: author_organization(store, digest),
    )

    census: dict[str, Any] = {"finished": False}  # shown in /health
    census_tasks: set[asyncio.Task[None]] = set()

    def start_census() -> None:
        census["finished"] = False
        task = asyncio.get_running_loop().create_task(
            census_in_background(
                view,
                packages,
                uploads.digests,
                lambda found: apply_census(found, replicator, uploads, packages, store),
                census,
            )
        )
        census_tasks.add(task)
        task.add_done_callback(census_tasks.discard)

    def restored(height: int) -> None:
        """State sync wrote a peer's snapshot: fetch the packages its records name."""
        log.info("state synced; taking the package census", extra={"height": height})
        start_census()

    ledger_app = LedgerApplication(
        store,
        metrics,
        on_commit=commit_hook(replicator, uploads, notices),
        snapshots=SnapshotStore(cfg.state_dir / "snapshots", load_snapshot_settings(cfg.home)),
        on_restore=restored,
    )
    audit = NodeAuditLog(cfg.state_dir / "node-audit.db")

    def node_status() -> dict[str, Any]:
        return {
            "tasks": supervisor.status(),
            "replication": replicator.status(),
            "package_census": dict(census),
            "uploads": {
                "pending": len(uploads),
                "pending_bytes": uploads.total_bytes,
                "expired": uploads.expired_total,
            },
        }

    http_app = build_http_app(ledger_app, cfg.cometbft_rpc, status=node_status)
    record_services = RecordServices(
        store=store,
        view=view,
        packages=packages,
        replicator=replicator,
        node_keys=node_keys,
        organization=cfg.organization,
        peers=services_cfg.peers,
        api_url=cfg.api_url,
        audit=audit,
        replays=ReplayCache(),
        uploads=uploads,
    )
    add_record_routes(http_app, record_services)
    add_claim_routes(http_app)
    home_node = InProcessNode(record_services, view)

    def node_ledger() -> NodeLedger:
        return NodeLedger(view, notices, cfg.cometbft_rpc, cfg.chain_id, metrics)

    fhir_context = FhirContext(
        rpc_url=cfg.cometbft_rpc,
        chain_id=cfg.chain_id,
        api_url=cfg.api_url,
        public_url=cfg.public_api_url,
        organization=cfg.organization,
        custody=Custody(cfg.home / "custody", services_cfg.node_passphrase()),
        patients=PatientIndex(cfg.state_dir / "patients.db"),
        tokens=TokenService(store, f"{cfg.public_api_url}/fhir/auth/token", audit),
        audit=audit,
        ledger=node_ledger,
        home=home_node,
        view=view,
        payers=load_payers(cfg.home),
    )
    held = fhir_context.custody.unlock_all()
    # A wrong [hl7] table stops the node here, before any socket opens (see node app).
    check_hl7_member(cfg.home, fhir_context.custody)
    http_app[FHIR_CONTEXT] = fhir_context
    add_fhir_routes(http_app)
    add_portal_routes(http_app, cfg, services_cfg.peers, ledger=node_ledger, home_node=home_node)
    abci_server = AbciServer(ledger_app, cfg.socket_path)
    host, port = cfg.api_address
    # No access log: request lines name records and patients. (The body limit is the
    # application's client_max_size; see build_http_app.)
    runner = web.AppRunner(http_app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    await abci_server.start()
    hl7_listener = await start_hl7_listener(cfg.home, fhir_context)
    if hl7_listener is not None:
        listener = hl7_listener
        metrics.collectors.append(lambda: metrics.hl7_listener(dataclasses.asdict(listener.stats)))
    start_census()  # after ABCI serves: CometBFT need not wait for it
    supervisor.start("replication", replicator.run)
    supervisor.start("upload-sweep", lambda: sweep_uploads(uploads, packages, store, report))
    settle_heap()
    log.info(
        "app started",
        extra={
            "home": str(home),
            "height": ledger_app.ledger.height,
            "api": cfg.api_listen,
            "custodial_members": held,
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fatal = abci_server.fatal
    assert fatal is not None
    stop_task = asyncio.ensure_future(stop.wait())
    waiters: list[asyncio.Future[object]] = [stop_task, fatal]  # type: ignore[list-item]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    failed = fatal.done()
    stop_task.cancel()
    for task in list(census_tasks):
        task.cancel()
    await supervisor.stop()
    if hl7_listener is not None:
        await hl7_listener.stop()
    await abci_server.stop()
    await runner.cleanup()
    with contextlib.suppress(Exception):
        fhir_context.close()
        fhir_context.patients.close()
        store.close()
        audit.close()
    log.info("app stopped", extra={"height": ledger_app.ledger.height, "failed": failed})
    if failed:
        raise SystemExit(1)
