"""The node's OpenAPI document: valid OpenAPI 3.1, and a description of every route the node's
HTTP application has (but the portal and static files), with the FHIR API's paths per
resource type as the CapabilityStatement's and the search tables say."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from medledger.abci.application import LedgerApplication
from medledger.api.claims import add_claim_routes
from medledger.api.http import build_http_app
from medledger.api.openapi import (
    NOT_DESCRIBED,
    REQUEST_AUTH,
    SMART,
    openapi_document,
    openapi_path,
    render_html,
)
from medledger.api.records import add_record_routes
from medledger.fhir.capability import RESOURCES
from medledger.fhir.context import FHIR_CONTEXT, FhirContext
from medledger.fhir.routes import (
    add_fhir_routes,
)
from medledger.fhir.search import SEARCH_PARAMS
from medledger.fhir.smart import TokenService
from medledger.services.packages import RecordServices

ORIGIN = "http://127.0.0.1:26601"
# Where each CapabilityStatement interaction is served.
INTERACTION_ROUTES = {
    "read": ("get", "/fhir/{T}/{id}"),
    "vread": ("get", "/fhir/{T}/{id}/_history/{vid}"),
    "update": ("put", "/fhir/{T}/{id}"),
    "history-instance": ("get", "/fhir/{T}/{id}/_history"),
    "history-type": ("get", "/fhir/{T}/_history"),
    "create": ("post", "/fhir/{T}"),
    "search-type": ("get", "/fhir/{T}"),
}


def node_app() -> web.Application:
    """The node's HTTP application as `serve_app` assembles it (without the portal, which is
    left out of the document), on stand-ins that serve no request."""
    app = build_http_app(cast(LedgerApplication, None), "http://127.0.0.1:1")
    add_record_routes(app, cast(RecordServices, None))
    add_claim_routes(app)
    tokens = TokenService(cast(Any, None), f"{ORIGIN}/fhir/auth/token", cast(Any, None))
    app[FHIR_CONTEXT] = FhirContext(
        "http://127.0.0.1:1", "chain", ORIGIN, "org", *cast(Any, (None, None, tokens, None))
    )
    add_fhir_routes(app)
    return app


@pytest.fixture(scope="module")
def app() -> web.Application:
    return node_app()


@pytest.fixture(scope="module")
def document(app: web.Application) -> dict[str, Any]:
    return openapi_document(app, ORIGIN)


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": ORIGIN}]
    schemes = document["components"]["securitySchemes"]
    assert schemes[REQUEST_AUTH] == {**schemes[REQUEST_AUTH], "type": "http"}
    flow = schemes[SMART]["flows"]["clientCredentials"]
    assert flow["tokenUrl"] == f"{ORIGIN}/fhir/auth/token"
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_every_route_of_the_app_is_in_the_document(
    app: web.Application, document: dict[str, Any]
) -> None:
    paths = document["paths"]
    seen = 0
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        path = openapi_path(resource.canonical)
        if route.method == "HEAD" or isinstance(resource, web.StaticResource):
            continue
        assert not path.startswith("/portal")
        if (route.method, path) in NOT_DESCRIBED:
            continue
        method = route.method.lower()
        if "{type}" in path:
            expanded = [path.replace("{type}", t) for t in RESOURCES]
            assert any(method in paths.get(p, {}) for p in expanded), (method, path)
        else:
            assert method in paths.get(path, {}), (method, path)
        seen += 1
    assert seen >= 30
    assert document["info"]["x-undocumented-routes"] == []
    assert not any(op.get("x-undocumented") for item in paths.values() for op in item.values())
    assert set(document["info"]["x-not-described"]) == {"* /fhir/{tail}"}
    for path in (
        "/health",
        "/ready",
        "/metrics",
        "/v1/packages/{digest}",
        "/v1/keys/release",
        "/v1/nodes",
        "/v1/audit/node",
        "/fhir/metadata",
        "/fhir/auth/token",
        "/fhir",
        "/fhir/Patient/{id}/$everything",
        "/fhir/$export",
        "/fhir/Patient/{id}/$export",
        "/fhir/$export-status/{job}",
        "/fhir/$export-output/{job}/{file}",
    ):
        assert path in paths, path
    assert set(paths["/v1/packages/{digest}"]) == {"get", "put"}
    assert set(paths["/fhir/$export-status/{job}"]) == {"get", "delete"}


def test_fhir_paths_follow_the_capability_and_search_tables(document: dict[str, Any]) -> None:
    paths = document["paths"]
    for name, support in RESOURCES.items():
        for interaction, (method, template) in INTERACTION_ROUTES.items():
            item = paths.get(template.replace("{T}", name), {})
            assert (method in item) == (interaction in support.interactions), (name, interaction)
        if "search-type" in support.interactions:
            search = paths[f"/fhir/{name}"]["get"]
            names = {p["name"] for p in search["parameters"] if p["in"] == "query"}
            assert set(SEARCH_PARAMS.get(name, {})) <= names
            assert {"_count", "_page", "_sort"} <= names
            assert search["security"] == [{SMART: [f"system/{name}.s"]}]
    read = paths["/fhir/Observation/{id}"]["get"]
    assert read["security"] == [{SMART: ["system/Observation.r"]}]
    assert [p["name"] for p in read["parameters"] if p["in"] == "path"] == ["id"]
    kickoff = paths["/fhir/Patient/{id}/$export"]["get"]
    assert {p["name"] for p in kickoff["parameters"]} >= {"_type", "_since", "Prefer", "id"}
    assert "202" in kickoff["responses"]


def test_the_native_api_uses_request_tokens_and_public_endpoints_none(
    document: dict[str, Any],
) -> None:
    paths = document["paths"]
    for path, item in paths.items():
        for op in item.values():
            if path.startswith("/v1/"):
                assert op["security"] == [{REQUEST_AUTH: []}], path
            elif path.startswith("/fhir") and path not in (
                "/fhir/metadata",
                "/fhir/.well-known/smart-configuration",
                "/fhir/auth/token",
            ):
                assert list(op["security"][0]) == [SMART], path
            else:
                assert op["security"] == [], path


def test_a_route_without_a_description_is_flagged() -> None:
    app = node_app()

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_post("/v1/something-new/{x}", handler)
    document = openapi_document(app, ORIGIN)
    validate(document)
    assert document["info"]["x-undocumented-routes"] == ["POST /v1/something-new/{x}"]
    assert document["paths"]["/v1/something-new/{x}"]["post"]["x-undocumented"] is True


async def test_the_node_serves_the_document_and_a_page_of_it() -> None:
    async with TestClient(TestServer(node_app())) as client:
        answer = await client.get("/openapi.json")
        assert answer.status == 200
        document = await answer.json()
        validate(document)
        origin = f"http://{client.host}:{client.port}"
        assert document["servers"] == [{"url": origin}]
        page = await client.get("/docs")
        assert page.status == 200 and page.content_type == "text/html"
        text = await page.text()
    assert "<script" not in text.lower()
    assert text == render_html(document)
    for path in document["paths"]:
        assert path.replace("&", "&amp;") in text
