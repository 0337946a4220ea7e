"""The FHIR facade's HTTP plumbing: content negotiation, bodies, tokens and scopes, and running
ledger work off the event loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from medledger.client.sdk import ClientError
from medledger.fhir.capability import (
    RESOURCES,
)
from medledger.fhir.gateway import (
    GATEWAY,
)
from medledger.fhir.outcome import (
    FhirError,
    exception_summary,
    forbidden,
    from_client,
    from_smart,
    from_validation,
    internal_error,
    invalid,
    not_found,
    not_supported,
)
from medledger.fhir.plumbing import (
    ACCEPTABLE,
    FHIR_JSON,
    JSON_FORMATS,
    JSON_TYPES,
    Caller,
    Reply,
    T,
    log,
    parse_prefer,
    parse_purpose,
)
from medledger.fhir.search import (
    SearchError,
)
from medledger.fhir.smart import AccessToken, SmartError
from medledger.ledger.consent import Purpose
from medledger.services.custody import CustodyError
from medledger.validation import FhirValidationError

# --- HTTP -------------------------------------------------------------------------------------


def fhir_response(reply: Reply) -> web.Response:
    headers = dict(reply.headers)
    if reply.body is None:
        return web.Response(status=reply.status, headers=headers)
    return web.Response(
        status=reply.status,
        text=json.dumps(reply.body, ensure_ascii=False),
        content_type=FHIR_JSON,
        charset="utf-8",
        headers=headers,
    )


def error_response(error: FhirError) -> web.Response:
    return fhir_response(Reply(error.status, error.outcome, error.headers))


def negotiate(request: web.Request) -> None:
    """JSON only: `_format` and Accept must allow it (406 otherwise)."""
    fmt = request.query.get("_format")
    if fmt is not None and fmt.lower() not in JSON_FORMATS:
        raise FhirError(406, "not-supported", f"_format {fmt!r}: this server speaks JSON only")
    accept = request.headers.get("Accept")
    if not accept or fmt is not None:
        return
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if not types & ACCEPTABLE:
        raise FhirError(406, "not-supported", f"Accept {accept!r}: this server speaks JSON only")


@web.middleware
async def fhir_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Under /fhir every error is an OperationOutcome."""
    if not (request.path == "/fhir" or request.path.startswith("/fhir/")):
        return await handler(request)
    try:
        if request.path != "/fhir/auth/token":
            negotiate(request)
        return await handler(request)
    except FhirError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status == 404:
            return error_response(not_found(f"no FHIR endpoint {request.path}"))
        if exc.status == 405:
            return error_response(
                not_supported(f"{request.method} {request.path} is not supported")
            )
        return error_response(FhirError(exc.status, "processing", exc.reason))
    except Exception as exc:
        # Neither the answer nor the log quotes the exception: its message may hold PHI.
        log.error("FHIR request failed: %s", exception_summary(exc), extra={"path": request.path})
        return error_response(internal_error())


async def read_body(request: web.Request) -> Any:
    """The JSON body: 415 unless JSON, 413 beyond the size bound, 400 if it is not JSON or
    nests deeper than any FHIR resource does (the parser is recursive)."""
    if request.content_type not in JSON_TYPES:
        raise FhirError(
            415,
            "not-supported",
            f"Content-Type {request.content_type!r}: send application/fhir+json",
        )
    ctx = request.app[GATEWAY].ctx
    limit = ctx.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except RecursionError:
        raise too_deep(ctx.max_json_depth) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the body is not valid JSON: {exc}") from None
    if json_depth(body, ctx.max_json_depth) > ctx.max_json_depth:
        raise too_deep(ctx.max_json_depth)
    return body


def body_too_large(limit: int) -> FhirError:
    return FhirError(
        413, "too-costly", f"the body is larger than {limit // (1024 * 1024)} MiB: send less"
    )


def too_deep(limit: int) -> FhirError:
    return invalid(f"the body nests JSON more than {limit} levels deep; no FHIR resource does")


def json_depth(value: Any, limit: int) -> int:
    """How deep `value` nests arrays and objects, counted without recursion, up to limit + 1."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def authorize(request: web.Request, resource_type: str, interaction: str) -> AccessToken:
    gateway = request.app[GATEWAY]
    try:
        return gateway.ctx.tokens.check(
            request.headers.get("Authorization"), resource_type, interaction
        )
    except SmartError as exc:
        raise from_smart(exc) from None


def refuse_consent_write(request: web.Request, interaction: str) -> FhirError:
    """403 for a Consent write by a SMART client (after the usual 401 without a valid token)."""
    token = authorize(request, "Consent", interaction)
    return request.app[GATEWAY].refuse_consent_write(token.client_id, interaction)


def known_type(resource_type: str) -> None:
    if resource_type not in RESOURCES:
        raise not_supported(f"resource type {resource_type!r} is not supported here", 404)


async def run(
    request: web.Request,
    token: AccessToken,
    work: Callable[[Caller], T],
    *,
    default_purpose: Purpose = Purpose.TREATMENT,
) -> T:
    """Run sync SDK work off the event loop (which also serves the ABCI connection), on the
    gateway's own executor, as the token's member under the X-Purpose-Of-Use purpose (or
    `default_purpose` when the header is absent)."""
    gateway = request.app[GATEWAY]
    header = request.headers.get("X-Purpose-Of-Use")
    purpose = parse_purpose(header) if header and header.strip() else default_purpose
    prefer = parse_prefer(request.headers.get("Prefer"))

    def job() -> T:
        caller = gateway.caller(token, purpose, prefer)
        try:
            return work(caller)
        except FhirValidationError as exc:
            raise from_validation(exc) from None
        except SearchError as exc:
            raise invalid(str(exc)) from None
        except CustodyError as exc:
            raise forbidden(str(exc)) from None
        except ClientError as exc:
            raise from_client(exc) from None

    return await asyncio.get_running_loop().run_in_executor(gateway.requests, job)


def query_params(request: web.Request) -> list[tuple[str, str]]:
    return [(k, v) for k, v in request.query.items() if k != "_format"]
