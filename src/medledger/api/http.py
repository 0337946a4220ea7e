"""The node's HTTP surface for operators: health, readiness and Prometheus metrics."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from aiohttp import web

from medledger.abci.application import LedgerApplication
from medledger.api.openapi import add_openapi_routes
from medledger.ledger.records import MAX_PACKAGE_BYTES

APP_KEY = web.AppKey("ledger_app", LedgerApplication)
RPC_KEY = web.AppKey("cometbft_rpc", str)
# What the node adds to `/health` beyond the ledger: its background tasks, replication and
# uploads (see `medledger.node.appmain`).
STATUS_KEY: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("node_status")
# The largest request body: a package of MAX_PACKAGE_BYTES, with room for the rest of a
# request (aiohttp's own default is 1 MiB).
CLIENT_MAX_SIZE = MAX_PACKAGE_BYTES + 1024 * 1024

log = logging.getLogger("medledger.http")


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
    """Live when the ledger answers: the state database is readable. With the node's
    background tasks: "degraded" while one of them waits to be restarted after a crash."""
    app = request.app[APP_KEY]
    height, app_hash, chain_id = app.store.committed()
    body: dict[str, Any] = {
        "status": "ok",
        "height": height,
        "app_hash": app_hash.hex(),
        "chain_id": chain_id,
    }
    status = request.app.get(STATUS_KEY)
    if status is not None:
        body.update(status())
        tasks = body.get("tasks", {})
        if not all(t.get("alive") for t in tasks.values()):
            body["status"] = "degraded"
    return web.json_response(body)


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


@web.middleware
async def unexpected_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An exception no handler turned into an answer becomes a 500 that names only its type:
    nothing a sender controls takes a handler down, and no content reaches the log."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        log.error(
            "request failed",
            extra={"method": request.method, "route": _route(request), "error": type(exc).__name__},
        )
        return web.json_response(
            {"error": f"internal error ({type(exc).__name__}); nothing was changed"}, status=500
        )


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "?"


def build_http_app(
    ledger_app: LedgerApplication,
    cometbft_rpc: str,
    *,
    status: Callable[[], dict[str, Any]] | None = None,
) -> web.Application:
    app = web.Application(client_max_size=CLIENT_MAX_SIZE, middlewares=[unexpected_errors])
    app[APP_KEY] = ledger_app
    if status is not None:
        app[STATUS_KEY] = status
    app[RPC_KEY] = cometbft_rpc.rstrip("/")
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    add_openapi_routes(app)
    return app
