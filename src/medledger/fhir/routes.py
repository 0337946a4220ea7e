"""The FHIR REST routes of a node: each interaction's handler, mounted under /fhir with bulk
export and the claims views."""

from __future__ import annotations

import time

from aiohttp import web

from medledger.fhir.bulk import add_bulk_routes
from medledger.fhir.capability import (
    RECORD_TYPES,
    RESOURCES,
    capability_statement,
    smart_configuration,
)
from medledger.fhir.claims import add_claim_fhir_routes
from medledger.fhir.context import FHIR_CONTEXT
from medledger.fhir.gateway import (
    GATEWAY,
    FhirGateway,
)
from medledger.fhir.http import (
    authorize,
    fhir_middleware,
    fhir_response,
    known_type,
    query_params,
    read_body,
    refuse_consent_write,
    run,
)
from medledger.fhir.outcome import (
    FhirError,
    invalid,
    not_found,
    not_supported,
)
from medledger.fhir.plumbing import (
    WRITE_INTERACTIONS,
    Reply,
    parse_etag,
)
from medledger.fhir.smart import SmartError
from medledger.ledger.directory import (
    DIRECTORY_TYPES,
)


async def metadata(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    return fhir_response(
        Reply(200, capability_statement(gateway.base, gateway.token_url, gateway.started))
    )


async def smart_config(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    return web.json_response(smart_configuration(gateway.token_url))


async def token_endpoint(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    no_store = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if request.content_type != "application/x-www-form-urlencoded":
        return web.json_response(
            {"error": "invalid_request", "error_description": "send a form-encoded body"},
            status=400,
            headers=no_store,
        )
    form = await request.post()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        token = gateway.ctx.tokens.issue(fields)
    except SmartError as exc:
        return web.json_response(
            {"error": exc.error, "error_description": exc.description},
            status=exc.status,
            headers=no_store,
        )
    return web.json_response(
        {
            "access_token": token.token,
            "token_type": "bearer",
            "expires_in": max(0, int(token.expires_at - time.time())),
            "scope": " ".join(sorted(token.scopes)),
        },
        headers=no_store,
    )


async def read_handler(request: web.Request) -> web.Response:
    resource_type, resource_id = request.match_info["type"], request.match_info["id"]
    known_type(resource_type)
    token = authorize(request, resource_type, "r")
    gateway = request.app[GATEWAY]
    reply = await run(request, token, lambda c: gateway.read_any(c, resource_type, resource_id))
    if_none_match = request.headers.get("If-None-Match")
    if (
        if_none_match
        and reply.headers.get("ETag")
        and _same_etag(if_none_match, reply.headers["ETag"])
    ):
        return web.Response(status=304, headers={"ETag": reply.headers["ETag"]})
    return fhir_response(reply)


def _same_etag(given: str, current: str) -> bool:
    try:
        return parse_etag(given) == parse_etag(current)
    except FhirError:
        return False


async def vread_handler(request: web.Request) -> web.Response:
    resource_type, resource_id = request.match_info["type"], request.match_info["id"]
    vid = request.match_info["vid"]
    known_type(resource_type)
    if resource_type not in RECORD_TYPES and resource_type not in DIRECTORY_TYPES:
        raise not_supported(f"vread is not supported on {resource_type}")
    if not vid.isdigit() or int(vid) < 1:
        raise not_found(f"{resource_type}/{resource_id} has no version {vid!r}")
    token = authorize(request, resource_type, "r")
    gateway = request.app[GATEWAY]
    reply = await run(
        request, token, lambda c: gateway.read_version_any(c, resource_type, resource_id, int(vid))
    )
    return fhir_response(reply)


async def instance_history_handler(request: web.Request) -> web.Response:
    resource_type, resource_id = request.match_info["type"], request.match_info["id"]
    known_type(resource_type)
    if resource_type not in RECORD_TYPES:
        raise not_supported(f"history is not supported on {resource_type}")
    token = authorize(request, resource_type, "r")
    gateway = request.app[GATEWAY]
    params = query_params(request)
    body = await run(
        request, token, lambda c: gateway.instance_history(c, resource_type, resource_id, params)
    )
    return fhir_response(Reply(200, body))


async def type_history_handler(request: web.Request) -> web.Response:
    resource_type = request.match_info["type"]
    known_type(resource_type)
    if resource_type not in RECORD_TYPES:
        raise not_supported(f"history is not supported on {resource_type}")
    token = authorize(request, resource_type, "r")
    gateway = request.app[GATEWAY]
    params = query_params(request)
    body = await run(request, token, lambda c: gateway.type_history(c, resource_type, params))
    return fhir_response(Reply(200, body))


async def _search(request: web.Request, params: list[tuple[str, str]]) -> web.Response:
    resource_type = request.match_info["type"]
    known_type(resource_type)
    token = authorize(request, resource_type, "s")
    gateway = request.app[GATEWAY]
    body = await run(request, token, lambda c: gateway.search_type(c, resource_type, params))
    return fhir_response(Reply(200, body))


async def search_handler(request: web.Request) -> web.Response:
    return await _search(request, query_params(request))


async def search_post_handler(request: web.Request) -> web.Response:
    if request.content_type != "application/x-www-form-urlencoded":
        raise FhirError(415, "not-supported", "POST _search takes a form-encoded body")
    form = await request.post()
    params = query_params(request) + [
        (k, v) for k, v in form.items() if isinstance(v, str) and k != "_format"
    ]
    return await _search(request, params)


async def create_handler(request: web.Request) -> web.Response:
    resource_type = request.match_info["type"]
    known_type(resource_type)
    if resource_type == "Consent":
        raise refuse_consent_write(request, "c")
    if "create" not in RESOURCES[resource_type].interactions:
        raise not_supported(f"create is not supported on {resource_type}")
    token = authorize(request, resource_type, "c")
    body = await read_body(request)
    gateway = request.app[GATEWAY]
    condition = request.headers.get("If-None-Exist")
    reply = await run(request, token, lambda c: gateway.create(c, resource_type, body, condition))
    return fhir_response(reply)


async def update_handler(request: web.Request) -> web.Response:
    resource_type, resource_id = request.match_info["type"], request.match_info["id"]
    known_type(resource_type)
    if resource_type == "Consent":
        raise refuse_consent_write(request, "u")
    if "update" not in RESOURCES[resource_type].interactions:
        raise not_supported(f"update is not supported on {resource_type}")
    token = authorize(request, resource_type, "u")
    body = await read_body(request)
    gateway = request.app[GATEWAY]
    if_match = request.headers.get("If-Match")
    reply = await run(
        request, token, lambda c: gateway.update(c, resource_type, resource_id, body, if_match)
    )
    return fhir_response(reply)


async def conditional_update_handler(request: web.Request) -> web.Response:
    """PUT <Type>?identifier=system|value (see `Writing.conditional_update`)."""
    resource_type = request.match_info["type"]
    known_type(resource_type)
    if resource_type == "Consent":
        raise refuse_consent_write(request, "u")
    if not request.query_string:
        raise not_supported(f"PUT {resource_type} needs an id or a condition", 405)
    token = authorize(request, resource_type, "u")
    body = await read_body(request)
    gateway = request.app[GATEWAY]
    condition = request.query_string
    if_match = request.headers.get("If-Match")
    reply = await run(
        request,
        token,
        lambda c: gateway.conditional_update(c, resource_type, condition, body, if_match),
    )
    return fhir_response(reply)


async def delete_handler(request: web.Request) -> web.Response:
    resource_type, resource_id = request.match_info["type"], request.match_info["id"]
    known_type(resource_type)
    if resource_type == "Consent":
        raise refuse_consent_write(request, "d")
    if "delete" not in RESOURCES[resource_type].interactions:
        raise not_supported(f"delete is not supported on {resource_type}", 405)
    token = authorize(request, resource_type, "d")
    gateway = request.app[GATEWAY]
    reply = await run(request, token, lambda c: gateway.delete(c, resource_type, resource_id))
    return fhir_response(reply)


async def everything_handler(request: web.Request) -> web.Response:
    patient = request.match_info["id"]
    token = authorize(request, "Patient", "r")
    gateway = request.app[GATEWAY]
    params = query_params(request)
    body = await run(request, token, lambda c: gateway.everything(c, patient, params))
    return fhir_response(Reply(200, body))


async def bundle_handler(request: web.Request) -> web.Response:
    body = await read_body(request)
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise invalid("POST to the base takes a transaction or batch Bundle")
    kind = body.get("type")
    if kind not in ("transaction", "batch"):
        raise invalid(f"Bundle.type {kind!r}: the base accepts transaction and batch")
    entries = body.get("entry") or []
    first = entries[0] if isinstance(entries, list) and entries else {}
    request_part = first.get("request") if isinstance(first, dict) else None
    if not isinstance(request_part, dict):
        request_part = {}
    method = str(request_part.get("method", "GET")).upper()
    url = str(request_part.get("url", "Patient")).strip("/")
    resource_type = url.split("/")[0].split("?")[0] or "Patient"
    interaction = {"POST": "c", "PUT": "u", "DELETE": "d"}.get(method, "r" if "/" in url else "s")
    # The token is checked (401, 403) against the first entry; every entry is then checked
    # against the token's scopes.
    token = authorize(request, resource_type, interaction)
    gateway = request.app[GATEWAY]
    if kind == "transaction":
        result = await run(request, token, lambda c: gateway.transaction(c, body))
    else:
        result = await run(request, token, lambda c: gateway.batch(c, body))
    return fhir_response(Reply(200, result))


async def unsupported_handler(request: web.Request) -> web.Response:
    segments = [s for s in request.path.split("/")[2:] if s]
    if segments and segments[0] == "Consent" and request.method in WRITE_INTERACTIONS:
        raise refuse_consent_write(request, WRITE_INTERACTIONS[request.method])
    if segments and segments[0] in RESOURCES and request.method in ("DELETE", "PATCH"):
        raise not_supported(
            f"{request.method} {request.path} is not supported: DELETE takes <Type>/<id> and"
            " marks the record entered-in-error (records are never removed; a patient may"
            " erase one with record.erase)"
        )
    if segments and segments[0] not in RESOURCES and not segments[0].startswith(("$", "_")):
        raise not_supported(f"resource type {segments[0]!r} is not supported here", 404)
    raise not_supported(f"{request.method} {request.path} is not supported", 405)


def add_fhir_routes(app: web.Application) -> None:
    """Mount the FHIR API under /fhir (reads `app[FHIR_CONTEXT]`)."""
    gateway = FhirGateway(app[FHIR_CONTEXT])
    app[GATEWAY] = gateway
    add_bulk_routes(app)  # $export: ahead of the generic routes below and of this middleware
    app.middlewares.append(fhir_middleware)
    router = app.router
    router.add_get("/fhir/metadata", metadata)
    router.add_get("/fhir/.well-known/smart-configuration", smart_config)
    router.add_post("/fhir/auth/token", token_endpoint)
    router.add_post("/fhir", bundle_handler)
    router.add_post("/fhir/", bundle_handler)
    router.add_get("/fhir/Patient/{id}/$everything", everything_handler)
    router.add_get("/fhir/{type}/_history", type_history_handler)
    router.add_post("/fhir/{type}/_search", search_post_handler)
    router.add_get("/fhir/{type}/{id}/_history/{vid}", vread_handler)
    router.add_get("/fhir/{type}/{id}/_history", instance_history_handler)
    router.add_get("/fhir/{type}", search_handler)
    router.add_post("/fhir/{type}", create_handler)
    router.add_get("/fhir/{type}/{id}", read_handler)
    router.add_put("/fhir/{type}/{id}", update_handler)
    router.add_put("/fhir/{type}", conditional_update_handler)
    router.add_delete("/fhir/{type}/{id}", delete_handler)
    router.add_route("*", "/fhir/{tail:.*}", unsupported_handler)

    async def close(_: web.Application) -> None:
        gateway.close()

    app.on_cleanup.append(close)
    add_claim_fhir_routes(app)  # Claim, ClaimResponse, ExplanationOfBenefit: before {type}
