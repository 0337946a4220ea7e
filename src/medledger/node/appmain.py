"""The application process of a node: the ledger behind the ABCI socket, plus its HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from aiohttp import web

from medledger.abci.application import LedgerApplication
from medledger.abci.server import AbciServer
from medledger.api.http import build_http_app
from medledger.node.config import load_node_config
from medledger.store.sqlite import SqliteStore

log = logging.getLogger("medledger.node")


async def serve_app(home: Path) -> None:
    cfg = load_node_config(home)
    store = SqliteStore(cfg.state_dir / "state.db")
    ledger_app = LedgerApplication(store)
    abci_server = AbciServer(ledger_app, cfg.socket_path)
    host, port = cfg.api_address
    runner = web.AppRunner(build_http_app(ledger_app, cfg.cometbft_rpc), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    await abci_server.start()
    log.info(
        "app started",
        extra={"home": str(home), "height": ledger_app.ledger.height, "api": cfg.api_listen},
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
    await abci_server.stop()
    await runner.cleanup()
    with contextlib.suppress(Exception):
        store.close()
    log.info("app stopped", extra={"height": ledger_app.ledger.height, "failed": failed})
    if failed:
        raise SystemExit(1)
