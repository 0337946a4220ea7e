"""The node's HTTP surface for operators: health, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

import httpx
from aiohttp import web

from medledger.abci.application import LedgerApplication
from medledger.api.openapi import add_openapi_routes

APP_KEY = web.AppKey("ledger_app", LedgerApplication)
RPC_KEY = web.AppKey("cometbft_rpc", str)


async def _cometbft(request: web.Request, path: str) -> dict[str, Any] | None:
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            response = await client.get(request.app[RPC_KEY] + path)
            response.raise_for_status()
            result: dict[str, Any] = response.json()["result"]
            return result
    except (httpx.HTTPError, KeyError, ValueError):
        return None


async def health(request: web.Request) -> web.Response:
    """Live when the ledger answers: the state database is readable."""
    app = request.app[APP_KEY]
    height, app_hash, chain_id = app.store.committed()
    return web.json_response(
        {"status": "ok", "height": height, "app_hash": app_hash.hex(), "chain_id": chain_id}
    )


async def ready(request: web.Request) -> web.Response:
    """Ready when CometBFT is connected to the app, reachable and not catching up."""
    status = await _cometbft(request, "/status")
    if status is None:
        return web.json_response({"ready": False, "reason": "cometbft unreachable"}, status=503)
    catching_up = bool(status["sync_info"]["catching_up"])
    body: dict[str, object] = {
        "ready": not catching_up,
        "height": int(status["sync_info"]["latest_block_height"]),
    }
    if catching_up:
        body["reason"] = "catching up"
    return web.json_response(body, status=503 if catching_up else 200)


async def metrics(request: web.Request) -> web.Response:
    app = request.app[APP_KEY]
    unconfirmed = await _cometbft(request, "/num_unconfirmed_txs")
    if unconfirmed is not None:
        app.metrics.mempool.set(int(unconfirmed["total"]))
    net_info = await _cometbft(request, "/net_info")
    if net_info is not None:
        app.metrics.peers.set(int(net_info["n_peers"]))
    return web.Response(body=app.metrics.render(), content_type="text/plain", charset="utf-8")


def build_http_app(ledger_app: LedgerApplication, cometbft_rpc: str) -> web.Application:
    app = web.Application()
    app[APP_KEY] = ledger_app
    app[RPC_KEY] = cometbft_rpc.rstrip("/")
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    add_openapi_routes(app)
    return app
