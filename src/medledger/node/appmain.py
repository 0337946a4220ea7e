"""The application process of a node: the ledger behind the ABCI socket, its HTTP API, and
the record services (package store, replication, key release)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from aiohttp import web

from medledger.abci.application import LedgerApplication
from medledger.abci.server import AbciServer
from medledger.api.auth import ReplayCache
from medledger.api.claims import add_claim_routes
from medledger.api.http import build_http_app
from medledger.api.metrics import Metrics
from medledger.api.records import RecordServices, add_record_routes
from medledger.fhir.context import FHIR_CONTEXT, FhirContext
from medledger.fhir.gateway import add_fhir_routes
from medledger.fhir.smart import TokenService
from medledger.hl7.mllp import start_hl7_listener
from medledger.ledger.app import BlockOutcome
from medledger.ledger.records import RecordStatus, RecordVersion
from medledger.ledger.state import State
from medledger.node.config import load_node_config
from medledger.node.custody import Custody
from medledger.node.mpi import PatientIndex
from medledger.node.replication import Replicator
from medledger.node.services import load_services_config
from medledger.store.node_audit import NodeAuditLog
from medledger.store.packages import PackageStore
from medledger.store.sqlite import SqliteStore
from medledger.web.app import add_portal_routes

log = logging.getLogger("medledger.node")


def live_packages(store: SqliteStore) -> tuple[list[str], list[str]]:
    """Digests of committed record versions: (to hold, erased)."""
    live: list[str] = []
    erased: list[str] = []
    for version in State(store).read_all(b"record/", RecordVersion):
        (erased if version.status is RecordStatus.ERASED else live).append(version.package_digest)
    return live, erased


async def serve_app(home: Path) -> None:
    cfg = load_node_config(home)
    services_cfg = load_services_config(cfg.home)
    node_keys = services_cfg.unlock_node_keys()
    store = SqliteStore(cfg.state_dir / "state.db")
    metrics = Metrics()
    packages = PackageStore(services_cfg.packages_path)

    def report() -> None:
        metrics.packages_missing.set(len(replicator.missing))
        metrics.packages_fetched.set(replicator.fetched)

    replicator = Replicator(
        packages, node_keys, cfg.organization, services_cfg.peers, on_change=report
    )

    def after_commit(outcome: BlockOutcome) -> None:
        if outcome.packages_erased:
            replicator.erase(outcome.packages_erased)
        if outcome.packages_stored:
            replicator.want(outcome.packages_stored)

    ledger_app = LedgerApplication(store, metrics, on_commit=after_commit)
    live, erased = live_packages(store)
    replicator.erase(erased)
    replicator.want(live)
    audit = NodeAuditLog(cfg.state_dir / "node-audit.db")
    http_app = build_http_app(ledger_app, cfg.cometbft_rpc)
    add_record_routes(
        http_app,
        RecordServices(
            store=store,
            packages=packages,
            replicator=replicator,
            node_keys=node_keys,
            organization=cfg.organization,
            peers=services_cfg.peers,
            api_url=cfg.api_url,
            audit=audit,
            replays=ReplayCache(),
        ),
    )
    add_claim_routes(http_app)
    fhir_context = FhirContext(
        rpc_url=cfg.cometbft_rpc,
        chain_id=cfg.chain_id,
        api_url=cfg.api_url,
        organization=cfg.organization,
        custody=Custody(cfg.home / "custody", services_cfg.node_passphrase()),
        patients=PatientIndex(cfg.state_dir / "patients.db"),
        tokens=TokenService(store, f"{cfg.api_url}/fhir/auth/token", audit),
        audit=audit,
    )
    held = fhir_context.custody.unlock_all()
    http_app[FHIR_CONTEXT] = fhir_context
    add_fhir_routes(http_app)
    add_portal_routes(http_app, cfg, services_cfg.peers)
    abci_server = AbciServer(ledger_app, cfg.socket_path)
    host, port = cfg.api_address
    runner = web.AppRunner(http_app, access_log=None, client_max_size=17 * 1024 * 1024)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    await abci_server.start()
    hl7_listener = await start_hl7_listener(cfg.home, fhir_context)
    replication = asyncio.create_task(replicator.run())
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
    replication.cancel()
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
