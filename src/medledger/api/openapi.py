"""The OpenAPI 3.1 description of a node's HTTP API: `GET /openapi.json`, and `GET /docs`, the
same document as a plain HTML page (rendered on the server, no script).

The document is built from the routes the node's aiohttp application actually has, so it does
not drift from them: every route is looked up in the tables below (the native JSON API, the
FHIR API's fixed endpoints and `$export`); the FHIR API's `{type}` routes are expanded per
resource type from the CapabilityStatement's table (`fhir.capability.RESOURCES`: a type gets a
path for each interaction it offers) with each type's search parameters from the search table
(`fhir.search.SEARCH_PARAMS`). A route found in no table still appears, marked
`x-undocumented`, and is listed in `info.x-undocumented-routes` (a test keeps that list empty).
The portal (HTML, under /portal) and static files are left out, as is the FHIR API's catch-all
route, which only answers OperationOutcomes for what is not supported (listed in
`info.x-not-described`).

Two security schemes: the native API's `MedledgerRequest` token (an EdDSA JWT signed with the
caller's ledger key, bound to method, path and body), and SMART Backend Services for FHIR
(OAuth 2.0 client credentials with a `private_key_jwt` client assertion).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from medledger.auth import MAX_LIFETIME, SCHEME
from medledger.fhir import bulk
from medledger.fhir.capability import (
    CONDITIONAL_UPDATE_TYPES,
    FHIR_VERSION,
    RESOURCES,
    SOFTWARE_VERSION,
)
from medledger.fhir.search import MAX_COUNT, SEARCH_PARAMS, SearchParam

Json = dict[str, Any]

OPENAPI_PATH = "/openapi.json"
DOCS_PATH = "/docs"
OPENAPI_VERSION = "3.1.0"
REQUEST_AUTH = "MedledgerRequest"
SMART = "SmartBackendServices"
FHIR_JSON = "application/fhir+json"
NDJSON = bulk.NDJSON
# Routes that are not API operations: the portal's pages and files.
EXCLUDED_PREFIXES = ("/portal",)
# Catch-all routes that only refuse what is not supported.
NOT_DESCRIBED = {("*", "/fhir/{tail}"): "answers 404/405 OperationOutcomes for what is not offered"}
FHIR_TAG = "FHIR"
BULK_TAG = "FHIR Bulk Data"
PURPOSES = ("TREAT", "HPAYMT", "HOPERAT", "HRESCH")


# --- schemas --------------------------------------------------------------------------------


def ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: Mapping[str, Json] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "Why the request failed."}},
    },
    "Health": {
        "type": "object",
        "required": ["status", "height", "app_hash", "chain_id"],
        "properties": {
            "status": {"const": "ok"},
            "height": {"type": "integer", "description": "Last committed height."},
            "app_hash": {"type": "string", "description": "App hash after that height (hex)."},
            "chain_id": {"type": "string"},
        },
    },
    "Ready": {
        "type": "object",
        "required": ["ready"],
        "properties": {
            "ready": {"type": "boolean"},
            "height": {"type": "integer"},
            "reason": {"type": "string", "description": "Why not ready (catching up, ...)."},
        },
    },
    "PackageStored": {
        "type": "object",
        "required": ["digest"],
        "properties": {
            "digest": {"type": "string"},
            "referenced": {
                "type": "boolean",
                "description": "A committed record already names it.",
            },
            "expires_in": {
                "type": "integer",
                "description": "Seconds until it is deleted if no committed record names it.",
            },
        },
    },
    "PackagesStored": {
        "type": "object",
        "required": ["packages"],
        "properties": {
            "packages": {
                "type": "array",
                "description": "One answer per package, in the order sent.",
                "items": {
                    "type": "object",
                    "required": ["digest", "status"],
                    "properties": {
                        "digest": {"type": "string"},
                        "status": {
                            "type": "integer",
                            "description": "201 stored, 200 already stored, else the refusal's"
                            " HTTP status as the one-by-one upload answers it (400, 403, 410,"
                            " 413, 429).",
                        },
                        "referenced": {"type": "boolean"},
                        "expires_in": {"type": "integer"},
                        "error": {"type": "string"},
                        "retry_after": {"type": "integer"},
                    },
                },
            }
        },
    },
    "KeyReleaseRequest": {
        "type": "object",
        "required": ["grant"],
        "properties": {
            "grant": {"type": "string", "description": "A committed grant's or session's id."},
            "records": {
                "type": "array",
                "maxItems": 256,
                "description": "For a session: the [record id, version] pairs whose shares are"
                " asked for; the answer is then a SessionShares.",
                "items": {
                    "type": "array",
                    "prefixItems": [{"type": "string"}, {"type": "integer"}],
                    "minItems": 2,
                    "maxItems": 2,
                },
            },
        },
    },
    "SessionShares": {
        "type": "object",
        "required": ["grant", "shares"],
        "properties": {
            "grant": {"type": "string"},
            "shares": {
                "type": "array",
                "description": "One answer per record version asked, in order: status 200 with"
                " the share's fields (as KeyShare), or the status and error of its refusal.",
                "items": {
                    "type": "object",
                    "required": ["record_id", "version", "status"],
                    "properties": {
                        "record_id": {"type": "string"},
                        "version": {"type": "integer"},
                        "status": {"type": "integer"},
                        "error": {"type": "string"},
                        "organization": {"type": "string"},
                        "index": {"type": "integer"},
                        "sealed_share": {"type": "string", "contentEncoding": "base64"},
                        "package_digest": {"type": "string"},
                    },
                },
            },
        },
    },
    "KeyShare": {
        "type": "object",
        "required": ["grant", "organization", "index", "sealed_share", "package_digest"],
        "properties": {
            "grant": {"type": "string"},
            "organization": {"type": "string", "description": "The custodian organization."},
            "index": {"type": "integer", "description": "The share's index (1..n)."},
            "sealed_share": {
                "type": "string",
                "contentEncoding": "base64",
                "description": "This node's key share, sealed to the grantee's encryption key.",
            },
            "package_digest": {"type": "string"},
        },
    },
    "NodeApis": {
        "type": "object",
        "description": "Organization id → base URL of its node's API.",
        "additionalProperties": {"type": "string", "format": "uri"},
    },
    "NodeAuditEntry": {
        "type": "object",
        "properties": {
            "at": {"description": "When (the node's clock)."},
            "actor": {"type": "string"},
            "action": {"type": "string", "examples": ["key.release", "fhir.request"]},
            "target": {"type": "string"},
            "outcome": {"type": "string", "examples": ["released", "refused"]},
            "reason": {"type": ["string", "null"]},
        },
    },
    "Claim": {
        "type": "object",
        "description": "A claim's ledger metadata (codes, dates, amounts in minor units) and every"
        " step of its history; the Claim and ClaimResponse documents are encrypted records.",
        "required": ["id", "provider", "patient", "insurer", "status", "total", "history"],
        "properties": {
            "id": {"type": "string"},
            "provider": {"type": "string", "description": "The provider organization."},
            "submitter": {"type": "string"},
            "patient": {"type": "string"},
            "insurer": {"type": "string", "description": "The insurer organization."},
            "coverage": {"type": "string"},
            "currency": {"type": "string"},
            "items": {"type": "array", "items": {"type": "object"}},
            "total": {"type": "integer"},
            "supporting": {"type": "array", "items": {"type": "string"}},
            "claim_record": {"type": "string", "description": "The Claim record's id."},
            "status": {"type": "string"},
            "history": {"type": "array", "items": {"type": "object"}},
            "approved_total": {"type": "integer"},
            "paid_total": {"type": "integer"},
        },
        "additionalProperties": True,
    },
    "FhirResource": {
        "type": "object",
        "required": ["resourceType"],
        "description": "A FHIR R4 resource (JSON).",
        "properties": {
            "resourceType": {"type": "string"},
            "id": {"type": "string"},
            "meta": {"type": "object"},
        },
        "additionalProperties": True,
    },
    "Bundle": {
        "type": "object",
        "required": ["resourceType", "type"],
        "description": "A FHIR Bundle (searchset, history, transaction, batch and responses).",
        "properties": {
            "resourceType": {"const": "Bundle"},
            "type": {"type": "string"},
            "total": {"type": "integer"},
            "link": {"type": "array", "items": {"type": "object"}},
            "entry": {"type": "array", "items": {"type": "object"}},
        },
        "additionalProperties": True,
    },
    "OperationOutcome": {
        "type": "object",
        "required": ["resourceType", "issue"],
        "properties": {
            "resourceType": {"const": "OperationOutcome"},
            "issue": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["severity", "code"],
                    "properties": {
                        "severity": {"enum": ["fatal", "error", "warning", "information"]},
                        "code": {"type": "string"},
                        "diagnostics": {"type": "string"},
                        "expression": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
    },
    "TokenRequest": {
        "type": "object",
        "required": ["grant_type", "scope", "client_assertion_type", "client_assertion"],
        "properties": {
            "grant_type": {"const": "client_credentials"},
            "scope": {"type": "string", "examples": ["system/*.rs"]},
            "client_assertion_type": {
                "const": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            },
            "client_assertion": {
                "type": "string",
                "description": "A JWT signed with the client's registered key: iss = sub ="
                " client_id, aud = the token endpoint, a unique jti, exp at most 5 minutes"
                " ahead.",
            },
        },
    },
    "TokenResponse": {
        "type": "object",
        "required": ["access_token", "token_type", "expires_in", "scope"],
        "properties": {
            "access_token": {"type": "string"},
            "token_type": {"const": "bearer"},
            "expires_in": {"type": "integer"},
            "scope": {"type": "string"},
        },
    },
    "OAuthError": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
    },
    "SmartConfiguration": {
        "type": "object",
        "properties": {
            "token_endpoint": {"type": "string", "format": "uri"},
            "grant_types_supported": {"type": "array", "items": {"type": "string"}},
            "token_endpoint_auth_methods_supported": {
                "type": "array",
                "items": {"type": "string"},
            },
            "token_endpoint_auth_signing_alg_values_supported": {
                "type": "array",
                "items": {"type": "string"},
            },
            "scopes_supported": {"type": "array", "items": {"type": "string"}},
            "capabilities": {"type": "array", "items": {"type": "string"}},
        },
    },
    "ExportManifest": {
        "type": "object",
        "required": ["transactionTime", "request", "requiresAccessToken", "output", "error"],
        "properties": {
            "transactionTime": {"type": "string", "format": "date-time"},
            "request": {"type": "string", "format": "uri"},
            "requiresAccessToken": {"const": True},
            "output": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["type", "url"],
                    "properties": {
                        "type": {"type": "string"},
                        "url": {"type": "string", "format": "uri"},
                        "count": {"type": "integer"},
                    },
                },
            },
            "error": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["type", "url"],
                    "properties": {
                        "type": {"const": "OperationOutcome"},
                        "url": {"type": "string", "format": "uri"},
                    },
                },
            },
        },
    },
}


def json_body(schema: Json, media: str = "application/json") -> Json:
    return {"content": {media: {"schema": schema}}}


def reply(description: str, schema: Json | None = None, media: str = "application/json") -> Json:
    out: Json = {"description": description}
    if schema is not None:
        out.update(json_body(schema, media))
    return out


def fhir_reply(description: str, schema: str = "FhirResource") -> Json:
    return reply(description, ref(schema), FHIR_JSON)


def outcome(description: str) -> Json:
    return fhir_reply(description, "OperationOutcome")


NATIVE_ERRORS: Mapping[str, Json] = {
    "401": reply(
        "The request token is missing, invalid, expired, replayed or not the caller's.",
        ref("Error"),
    ),
    "403": reply("The caller may not do this.", ref("Error")),
}
FHIR_ERRORS: Mapping[str, Json] = {
    "400": outcome("The request or the resource is invalid."),
    "401": outcome("No valid bearer token (WWW-Authenticate says why)."),
    "403": outcome("Outside the token's scopes, or refused by the ledger's access rules."),
    "406": outcome("A format other than JSON was asked for."),
    "503": outcome("The network could not serve the request just now."),
}


# --- operations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    description: str = ""
    security: str | None = None  # a security scheme name, or None when public
    scopes: tuple[str, ...] = ()
    parameters: tuple[Json, ...] = ()
    body: Json | None = None
    responses: Mapping[str, Json] = field(default_factory=dict)

    def render(self, operation_id: str, path_params: Iterable[str]) -> Json:
        parameters = list(self.parameters)
        named = {p["name"] for p in parameters if p.get("in") == "path"}
        for name in path_params:
            if name not in named:
                parameters.insert(0, path_parameter(name))
        out: Json = {
            "operationId": operation_id,
            "summary": self.summary,
            "tags": [self.tag],
        }
        if self.description:
            out["description"] = self.description
        if parameters:
            out["parameters"] = parameters
        if self.body is not None:
            out["requestBody"] = self.body
        out["responses"] = dict(self.responses) or {"200": {"description": "OK"}}
        out["security"] = [{self.security: list(self.scopes)}] if self.security else []
        return out


PATH_PARAMETERS: Mapping[str, str] = {
    "digest": "A record package's digest (hex SHA-256 of the package bytes).",
    "id": "The resource's logical id (a record's ledger id; Patient.id is the member id).",
    "vid": "A version number (meta.versionId).",
    "job": "The export job's id (from the kick-off's Content-Location).",
    "file": "An output file's name (from the manifest).",
    "claim_id": "A claim's ledger id.",
}


def path_parameter(name: str) -> Json:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": PATH_PARAMETERS.get(name, name),
        "schema": {"type": "string"},
    }


def query(name: str, description: str, schema: Json | None = None) -> Json:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def header(name: str, description: str, schema: Json | None = None, required: bool = False) -> Json:
    return {
        "name": name,
        "in": "header",
        "required": required,
        "description": description,
        "schema": schema or {"type": "string"},
    }


PURPOSE = header(
    "X-Purpose-Of-Use",
    "Purpose of use of a read (HL7 v3 ActReason; default TREAT). Every read is a ledger access"
    " request decided for this purpose.",
    {"enum": list(PURPOSES)},
)
PREFER = header(
    "Prefer",
    "return=minimal|representation|OperationOutcome for writes; handling=lenient ignores"
    " unknown search parameters instead of refusing them.",
)
FORMAT = query("_format", "json, application/fhir+json or application/json (JSON only).")
COUNT = query(
    "_count",
    f"Page size (default 20, at most {MAX_COUNT}; 0 gives the total only).",
    {"type": "integer", "minimum": 0},
)
PAGE = query(
    "_page", "Paging position (follow the Bundle's links).", {"type": "integer", "minimum": 0}
)
SINCE = query(
    "_since",
    "Only versions committed at or after this instant.",
    {"type": "string", "format": "date-time"},
)
SORT = query("_sort", "_lastUpdated, _id or a date parameter of the type; - for descending.")

HEALTH_DOC = "Live when the ledger answers: the state database is readable."


def native_operations() -> dict[tuple[str, str], Operation]:
    req = REQUEST_AUTH
    party = query(
        "party",
        "patient:<member id>, provider:<organization> or insurer:<organization>; without it,"
        " every claim (auditors only).",
    )
    return {
        ("GET", "/health"): Operation(
            "Liveness and the last committed height",
            "operations",
            HEALTH_DOC,
            responses={"200": reply("The node's ledger answers.", ref("Health"))},
        ),
        ("GET", "/ready"): Operation(
            "Readiness: CometBFT connected and not catching up",
            "operations",
            responses={
                "200": reply("Ready.", ref("Ready")),
                "503": reply("Not ready (CometBFT unreachable or catching up).", ref("Ready")),
            },
        ),
        ("GET", "/metrics"): Operation(
            "Prometheus metrics",
            "operations",
            "Height, transactions by type and result code, CheckTx answers, block commit"
            " time, mempool size, peers, package replication.",
            responses={
                "200": reply(
                    "Metrics in the Prometheus text format.", {"type": "string"}, "text/plain"
                )
            },
        ),
        ("GET", "/v1/packages/{digest}"): Operation(
            "Download a sealed record package",
            "records",
            "Released to the record's patient and author, to the grantee of a committed,"
            " unexpired grant for that version (`?grant=`), and to peer nodes (issuer"
            " `node:<organization>`) for replication.",
            req,
            parameters=(query("grant", "The caller's grant for this record version."),),
            responses={
                "200": reply(
                    "The package.",
                    {"type": "string", "contentMediaType": "application/octet-stream"},
                    "application/octet-stream",
                ),
                **NATIVE_ERRORS,
                "404": reply("No committed record holds it, or this node lacks it.", ref("Error")),
                "503": reply(
                    "This node's copy failed its integrity check (being repaired).", ref("Error")
                ),
            },
        ),
        ("POST", "/v1/packages/batch"): Operation(
            "Download many packages at once (peer nodes)",
            "records",
            "For replication: a peer node (issuer `node:<organization>`) names up to 64"
            " digests; the answer is a MessagePack array of [digest, bytes] pairs for those"
            " this node holds, in the order asked, up to 16 MiB. The peer checks each against"
            " its digest and fetches the rest one by one.",
            req,
            body={
                "required": True,
                **json_body(
                    {
                        "type": "object",
                        "required": ["digests"],
                        "properties": {
                            "digests": {
                                "type": "array",
                                "maxItems": 64,
                                "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                            }
                        },
                    }
                ),
            },
            responses={
                "200": reply(
                    "The packages held, as MessagePack.",
                    {"type": "string", "contentMediaType": "application/msgpack"},
                    "application/msgpack",
                ),
                "400": reply("Not a list of at most 64 digests.", ref("Error")),
                **NATIVE_ERRORS,
            },
        ),
        ("POST", "/v1/packages"): Operation(
            "Upload many sealed record packages",
            "records",
            "An author uploads the packages of one put-many or Bundle in one request: a"
            " MessagePack array of [digest, bytes] pairs, 1-1,000 of them and at most 16 MiB"
            " of packages. Each is decided as its own PUT would be; the answer gives each"
            " one's status in the order sent.",
            req,
            body={
                "required": True,
                **json_body(
                    {"type": "string", "contentMediaType": "application/msgpack"},
                    "application/msgpack",
                ),
            },
            responses={
                "200": reply("Each package's answer.", ref("PackagesStored")),
                "400": reply("Not 1-1,000 MessagePack [digest, bytes] pairs.", ref("Error")),
                **NATIVE_ERRORS,
                "413": reply("More than 16 MiB of packages.", ref("Error")),
            },
        ),
        ("PUT", "/v1/packages/{digest}"): Operation(
            "Upload a sealed record package",
            "records",
            "An author uploads the package before submitting the transaction that names it;"
            " the digest must be the package's.",
            req,
            body={
                "required": True,
                **json_body(
                    {"type": "string", "contentMediaType": "application/octet-stream"},
                    "application/octet-stream",
                ),
            },
            responses={
                "201": reply("Stored.", ref("PackageStored")),
                "200": reply("Already stored.", ref("PackageStored")),
                "400": reply("Not a package, or the digest does not match.", ref("Error")),
                **NATIVE_ERRORS,
                "413": reply("Larger than a package may be.", ref("Error")),
            },
        ),
        ("POST", "/v1/keys/release"): Operation(
            "Release this node's key share for a grant",
            "records",
            "This custodian's share of the record's data key, re-sealed to the grantee's"
            " current encryption key — only for the grantee of a committed, unexpired grant"
            " whose consent is still active. For a session (`access.session`), name the record"
            " versions in `records`: each is decided on its own, in one request. Every"
            " decision is in the node's audit log.",
            req,
            body={"required": True, **json_body(ref("KeyReleaseRequest"))},
            responses={
                "200": reply(
                    "The sealed share (KeyShare), or a session's answers (SessionShares).",
                    {"oneOf": [ref("KeyShare"), ref("SessionShares")]},
                ),
                "400": reply("Bad body.", ref("Error")),
                **NATIVE_ERRORS,
                "404": reply("No such grant, or this node is not a custodian.", ref("Error")),
                "503": reply("This node has no good copy of the package yet.", ref("Error")),
            },
        ),
        ("GET", "/v1/nodes"): Operation(
            "Where each organization's node API is",
            "records",
            security=req,
            responses={
                "200": reply("Organization → API base URL.", ref("NodeApis")),
                **NATIVE_ERRORS,
            },
        ),
        ("GET", "/v1/audit/node"): Operation(
            "This node's off-chain audit log",
            "records",
            "Key releases and refused API requests, newest first; for auditors and admins.",
            req,
            responses={
                "200": reply("Entries.", {"type": "array", "items": ref("NodeAuditEntry")}),
                **NATIVE_ERRORS,
            },
        ),
        ("GET", "/v1/claims"): Operation(
            "Claims of a party",
            "claims",
            "The claims of a patient, provider or insurer, to that party (or a patient's"
            " delegate) and to auditors; metadata only.",
            req,
            parameters=(party,),
            responses={
                "200": reply("The claims.", {"type": "array", "items": ref("Claim")}),
                "400": reply("Bad party.", ref("Error")),
                **NATIVE_ERRORS,
            },
        ),
        ("GET", "/v1/claims/stats"): Operation(
            "Claim statistics",
            "claims",
            "Counts, amounts, time to adjudication and denial rate per provider and insurer;"
            " network-wide totals for auditors and admins.",
            req,
            parameters=(party,),
            responses={
                "200": reply("Statistics per organization.", {"type": "object"}),
                "400": reply("Bad party.", ref("Error")),
                **NATIVE_ERRORS,
            },
        ),
        ("GET", "/v1/claims/{claim_id}"): Operation(
            "One claim with its history",
            "claims",
            "To the claim's patient, provider and insurer, and to auditors.",
            req,
            responses={
                "200": reply("The claim.", ref("Claim")),
                **NATIVE_ERRORS,
                "404": reply("No such claim.", ref("Error")),
            },
        ),
        ("GET", OPENAPI_PATH): Operation(
            "This OpenAPI document",
            "documentation",
            responses={"200": reply("OpenAPI 3.1.", {"type": "object"})},
        ),
        ("GET", DOCS_PATH): Operation(
            "This OpenAPI document as an HTML page",
            "documentation",
            responses={"200": reply("HTML, no script.", {"type": "string"}, "text/html")},
        ),
    }


def smart_scope(resource_type: str, interaction: str) -> str:
    return f"system/{resource_type}.{interaction}"


def fhir_fixed_operations() -> dict[tuple[str, str], Operation]:
    transaction = Operation(
        "Transaction or batch",
        FHIR_TAG,
        "A transaction Bundle (POST and PUT entries; all or nothing, committed in one"
        " record.put-many; urn:uuid fullUrls and `Patient?identifier=system|value` references"
        " are resolved, new patients enrolled) or a batch Bundle (each entry on its own). At"
        " most 100 entries.",
        SMART,
        ("system/*.c",),
        parameters=(PURPOSE, PREFER),
        body={"required": True, **json_body(ref("Bundle"), FHIR_JSON)},
        responses={
            "200": fhir_reply("transaction-response or batch-response.", "Bundle"),
            **FHIR_ERRORS,
            "409": outcome("Conflict (a duplicate patient identifier, ...)."),
            "413": outcome("More than 100 entries."),
            "422": outcome("An entry breaks a business rule."),
        },
    )
    kickoff_params = (
        query("_type", "Comma-separated resource types (default: all the token may read)."),
        query(
            "_since",
            "Only resources whose current version was committed at or after this instant.",
            {"type": "string", "format": "date-time"},
        ),
        query(
            "_outputFormat",
            "application/fhir+ndjson (the only format).",
            {"enum": sorted(bulk.OUTPUT_FORMATS)},
        ),
        header(
            "Prefer",
            "respond-async (required); handling=lenient ignores unknown parameters.",
            required=True,
        ),
        header("Accept", "application/fhir+json.", required=False),
        PURPOSE,
    )
    kickoff_responses = {
        "202": {
            "description": "Started; poll the status URL.",
            "headers": {
                "Content-Location": {
                    "description": "The status URL.",
                    "schema": {"type": "string", "format": "uri"},
                }
            },
            **json_body(ref("OperationOutcome"), FHIR_JSON),
        },
        **FHIR_ERRORS,
        "404": outcome("No such patient."),
        "429": outcome("Too many exports running on this node; retry later."),
    }

    def kickoff(summary: str, description: str) -> Operation:
        return Operation(
            summary,
            BULK_TAG,
            description
            + " Asynchronous (FHIR Bulk Data Access v2): every record is read through a ledger"
            " access request and key release, as a read; output is kept in memory only until"
            " deleted or expired.",
            SMART,
            ("system/*.r",),
            parameters=kickoff_params,
            responses=kickoff_responses,
        )

    return {
        ("GET", "/fhir/metadata"): Operation(
            "CapabilityStatement",
            FHIR_TAG,
            f"What this FHIR R{FHIR_VERSION} server offers, from the same tables as this document.",
            responses={"200": fhir_reply("The CapabilityStatement.")},
        ),
        ("GET", "/fhir/.well-known/smart-configuration"): Operation(
            "SMART configuration",
            FHIR_TAG,
            responses={"200": reply("SMART Backend Services metadata.", ref("SmartConfiguration"))},
        ),
        ("POST", "/fhir/auth/token"): Operation(
            "Access token (SMART Backend Services)",
            FHIR_TAG,
            "client_credentials with a private_key_jwt client assertion; the token lives"
            " 5 minutes and carries the requested scopes the registration allows.",
            body={
                "required": True,
                **json_body(ref("TokenRequest"), "application/x-www-form-urlencoded"),
            },
            responses={
                "200": reply("The token.", ref("TokenResponse")),
                "400": reply("Bad request or scope.", ref("OAuthError")),
                "401": reply("The client or its assertion is not accepted.", ref("OAuthError")),
            },
        ),
        ("POST", "/fhir"): transaction,
        ("POST", "/fhir/"): transaction,
        ("GET", "/fhir/Patient/{id}/$everything"): Operation(
            "Patient $everything",
            "FHIR Patient",
            "The patient's current records the caller may read, Patient first, as a searchset.",
            SMART,
            ("system/Patient.r",),
            parameters=(
                COUNT,
                PAGE,
                SINCE,
                query("_type", "Comma-separated resource types."),
                PURPOSE,
                FORMAT,
            ),
            responses={
                "200": fhir_reply("A searchset Bundle.", "Bundle"),
                **FHIR_ERRORS,
                "404": outcome("No such patient."),
            },
        ),
        ("GET", bulk.KICKOFF_SYSTEM): kickoff(
            "System $export", "Every record the client may read, of every patient."
        ),
        ("GET", bulk.KICKOFF_PATIENTS): kickoff(
            "Patient-level $export", "Every patient's records the client may read."
        ),
        ("GET", bulk.KICKOFF_PATIENT): kickoff(
            "One patient's $export", "One patient's records the client may read."
        ),
        ("GET", bulk.STATUS): Operation(
            "$export status and manifest",
            BULK_TAG,
            "202 while running (X-Progress), 200 with the manifest when done, the failure as"
            " an OperationOutcome otherwise. Only the client that started the export sees it.",
            SMART,
            ("system/*.r",),
            responses={
                "200": {
                    "description": "Complete.",
                    "headers": {
                        "Expires": {
                            "description": "When the files are deleted.",
                            "schema": {"type": "string"},
                        }
                    },
                    **json_body(ref("ExportManifest")),
                },
                "202": {
                    "description": "Running.",
                    "headers": {
                        "X-Progress": {
                            "description": "How far it is.",
                            "schema": {"type": "string"},
                        },
                        "Retry-After": {
                            "description": "Seconds to wait.",
                            "schema": {"type": "string"},
                        },
                    },
                },
                **FHIR_ERRORS,
                "404": outcome("No such job (deleted or expired)."),
                "500": outcome("The export failed."),
            },
        ),
        ("DELETE", bulk.STATUS): Operation(
            "Cancel or delete an $export",
            BULK_TAG,
            "Stops a running export or deletes a finished one; its files are gone at once.",
            SMART,
            ("system/*.r",),
            responses={"202": outcome("Deleted."), **FHIR_ERRORS, "404": outcome("No such job.")},
        ),
        ("GET", bulk.OUTPUT): Operation(
            "An $export output file",
            BULK_TAG,
            "NDJSON, one resource per line. Needs a bearer token of the client that started"
            " the export; lines whose grant would no longer release keys (expired, consent"
            " revoked) or whose record was erased since are left out.",
            SMART,
            ("system/*.r",),
            parameters=(header("Accept", "application/fhir+ndjson."),),
            responses={
                "200": reply("The file.", {"type": "string"}, NDJSON),
                **FHIR_ERRORS,
                "404": outcome("No such job or file."),
            },
        ),
    }


def search_parameters(resource_type: str) -> tuple[Json, ...]:
    """The type's search parameters, from the search table, or for a type outside it from its
    CapabilityStatement entry, as the CapabilityStatement lists them."""
    table: Iterable[SearchParam] = SEARCH_PARAMS.get(resource_type, {}).values()
    own: Iterable[SearchParam] = getattr(RESOURCES.get(resource_type), "search", ())
    named = {p.name: p for p in (*table, *own)}
    params = [query(p.name, f"{p.documentation} ({p.type})") for p in named.values()]
    return (*params, COUNT, PAGE, SORT, FORMAT, PURPOSE, PREFER)


def typed_operations() -> dict[tuple[str, str], tuple[str, Callable[[str], Operation | None]]]:
    """The FHIR API's `{type}` routes: (CapabilityStatement interaction, operation per type,
    None for a type that offers the interaction but not on that route)."""

    def tag(t: str) -> str:
        return f"FHIR {t}"

    def resource_body(t: str) -> Json:
        return {
            "required": True,
            **json_body(
                {"allOf": [ref("FhirResource"), {"properties": {"resourceType": {"const": t}}}]},
                FHIR_JSON,
            ),
        }

    def search(t: str) -> Operation:
        return Operation(
            f"Search {t}",
            tag(t),
            "Records the caller may read; the others are left out and counted in an"
            " OperationOutcome entry.",
            SMART,
            (smart_scope(t, "s"),),
            parameters=search_parameters(t),
            responses={"200": fhir_reply("A searchset Bundle.", "Bundle"), **FHIR_ERRORS},
        )

    def search_post(t: str) -> Operation:
        operation = search(t)
        return Operation(
            f"Search {t} (form body)",
            operation.tag,
            operation.description,
            SMART,
            operation.scopes,
            parameters=(FORMAT, PURPOSE, PREFER),
            body={
                "required": True,
                **json_body(
                    {"type": "object", "additionalProperties": {"type": "string"}},
                    "application/x-www-form-urlencoded",
                ),
            },
            responses=operation.responses,
        )

    def create(t: str) -> Operation:
        parameters: tuple[Json, ...] = (PREFER,)
        if t == "Patient":
            parameters = (
                header(
                    "If-None-Exist", "identifier=system|value: return the patient it names instead."
                ),
                PREFER,
            )
        return Operation(
            f"Create {t}",
            tag(t),
            RESOURCES[t].documentation,
            SMART,
            (smart_scope(t, "c"),),
            parameters=parameters,
            body=resource_body(t),
            responses={
                "201": fhir_reply('Created (Location, ETag W/"1").'),
                "200": fhir_reply("Conditional create found the patient."),
                **FHIR_ERRORS,
                "409": outcome("Conflict with the ledger's state."),
                "422": outcome("A business rule is broken (e.g. no enrolled patient)."),
            },
        )

    def read(t: str) -> Operation:
        return Operation(
            f"Read {t}",
            tag(t),
            "A ledger access request, key shares from the custodians, decryption and"
            " verification against the on-chain commitment.",
            SMART,
            (smart_scope(t, "r"),),
            parameters=(header("If-None-Match", "An ETag: 304 when unchanged."), PURPOSE, FORMAT),
            responses={
                "200": fhir_reply(f"The {t}."),
                "304": {"description": "Not modified."},
                **FHIR_ERRORS,
                "404": outcome("Not known."),
                "410": outcome("Erased."),
            },
        )

    def update(t: str) -> Operation:
        return Operation(
            f"Update {t}",
            tag(t),
            "A new version (a ledger record.amend); no update as create.",
            SMART,
            (smart_scope(t, "u"),),
            parameters=(
                header("If-Match", 'W/"<version>": refused with 412 unless current.'),
                PREFER,
            ),
            body=resource_body(t),
            responses={
                "200": fhir_reply("Updated."),
                **FHIR_ERRORS,
                "405": outcome("It does not exist (update as create is not supported)."),
                "410": outcome("Erased."),
                "412": outcome("The If-Match version is not current."),
                "422": outcome("A business rule is broken."),
            },
        )

    def conditional_update(t: str) -> Operation | None:
        if t not in CONDITIONAL_UPDATE_TYPES:
            return None
        return Operation(
            f"Update {t} by identifier",
            tag(t),
            "Conditional update, as HAPI FHIR does it: the query is identifier=system|value;"
            " the resource it names is updated (200), else the body is created (201).",
            SMART,
            (smart_scope(t, "u"),),
            parameters=(
                query("identifier", "system|value: the identifier that names it."),
                header("If-Match", 'W/"<version>": refused with 412 unless current.'),
                PREFER,
            ),
            body=resource_body(t),
            responses={
                "200": fhir_reply("Updated."),
                "201": fhir_reply("Created."),
                **FHIR_ERRORS,
                "412": outcome("The If-Match version is not current."),
                "422": outcome("A business rule is broken."),
            },
        )

    def delete(t: str) -> Operation:
        return Operation(
            f"Delete {t}",
            tag(t),
            "Nothing is removed: the latest version is marked entered-in-error (a record:"
            " record.mark-error by the author's organization; a directory entry: by its"
            " organization). Deleting it again changes nothing.",
            SMART,
            (smart_scope(t, "d"),),
            parameters=(FORMAT,),
            responses={
                "200": fhir_reply("It is entered-in-error.", "OperationOutcome"),
                **FHIR_ERRORS,
                "404": outcome("Not known."),
                "410": outcome("Erased."),
            },
        )

    def vread(t: str) -> Operation:
        return Operation(
            f"Read a version of {t}",
            tag(t),
            security=SMART,
            scopes=(smart_scope(t, "r"),),
            parameters=(PURPOSE, FORMAT),
            responses={
                "200": fhir_reply("That version."),
                **FHIR_ERRORS,
                "404": outcome("No such version."),
            },
        )

    def instance_history(t: str) -> Operation:
        return Operation(
            f"History of one {t}",
            tag(t),
            security=SMART,
            scopes=(smart_scope(t, "r"),),
            parameters=(COUNT, PAGE, SINCE, PURPOSE, FORMAT),
            responses={
                "200": fhir_reply("A history Bundle.", "Bundle"),
                **FHIR_ERRORS,
                "404": outcome("Not known."),
            },
        )

    def type_history(t: str) -> Operation:
        return Operation(
            f"History of {t} records",
            tag(t),
            "By patient (or _id); without them, what the caller's organization authored.",
            SMART,
            (smart_scope(t, "r"),),
            parameters=(
                query("patient", "Patient/<id>."),
                query("_id", "Record ids."),
                COUNT,
                PAGE,
                SINCE,
                PURPOSE,
                FORMAT,
            ),
            responses={"200": fhir_reply("A history Bundle.", "Bundle"), **FHIR_ERRORS},
        )

    return {
        ("GET", "/fhir/{type}"): ("search-type", search),
        ("POST", "/fhir/{type}/_search"): ("search-type", search_post),
        ("POST", "/fhir/{type}"): ("create", create),
        ("GET", "/fhir/{type}/{id}"): ("read", read),
        ("PUT", "/fhir/{type}/{id}"): ("update", update),
        ("PUT", "/fhir/{type}"): ("update", conditional_update),
        ("DELETE", "/fhir/{type}/{id}"): ("delete", delete),
        ("GET", "/fhir/{type}/{id}/_history/{vid}"): ("vread", vread),
        ("GET", "/fhir/{type}/{id}/_history"): ("history-instance", instance_history),
        ("GET", "/fhir/{type}/_history"): ("history-type", type_history),
    }


# --- the document -----------------------------------------------------------------------------

_TEMPLATE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}")


def openapi_path(canonical: str) -> str:
    """An aiohttp path template as an OpenAPI one (`{tail:.*}` → `{tail}`)."""
    return _TEMPLATE.sub(lambda m: "{" + m.group(1) + "}", canonical)


def app_routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, OpenAPI path) of every route that is part of the API, in registration order:
    not the portal, not static files, not the HEAD twin of a GET."""
    found: list[tuple[str, str]] = []
    for route in app.router.routes():
        resource = route.resource
        if resource is None or isinstance(resource, web.StaticResource):
            continue
        path = openapi_path(resource.canonical)
        if path.startswith(EXCLUDED_PREFIXES) or route.method == "HEAD":
            continue
        key = (route.method, path)
        if key not in found:
            found.append(key)
    return found


def security_schemes(token_url: str) -> Json:
    scopes = {
        "system/*.cruds": "Everything the registration allows (create, read, update, search)."
    }
    scopes["system/*.rs"] = "Read and search every type."
    scopes["system/*.c"] = "Create every type (import)."
    scopes["system/*.r"] = "Read every type (export)."
    words = {"c": "Create", "r": "Read", "u": "Update", "d": "Delete", "s": "Search"}
    for name in RESOURCES:
        for letter, word in words.items():
            scopes[smart_scope(name, letter)] = f"{word} {name}."
    return {
        REQUEST_AUTH: {
            "type": "http",
            "scheme": SCHEME,
            "description": f"`Authorization: {SCHEME} <JWT>`: a JWT (typ medledger-request+jwt)"
            " signed EdDSA with the caller's Ed25519 ledger key, with iss (member id, or"
            " node:<organization> for a peer node), iat, exp (at most"
            f" {MAX_LIFETIME} s after iat), a unique jti, htm (the method), htu (the path and"
            " query) and bh (base64url SHA-256 of the body). Checked against the caller's"
            " current key on the ledger; a replayed jti is refused.",
        },
        SMART: {
            "type": "oauth2",
            "description": "SMART Backend Services: POST a client_credentials grant with a"
            " private_key_jwt client assertion (EdDSA, ES256 or ES384, signed with the key"
            " registered on the ledger for the client) to the token endpoint; send the token as"
            " `Authorization: Bearer <token>`.",
            "flows": {"clientCredentials": {"tokenUrl": token_url, "scopes": scopes}},
        },
    }


def operation_id(method: str, path: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9]+", "_", f"{method.lower()} {path}").strip("_")
    name, n = base, 2
    while name in used:
        name, n = f"{base}_{n}", n + 1
    used.add(name)
    return name


def openapi_document(app: web.Application, server_url: str) -> Json:
    """The document for the routes `app` has, served from `server_url` (scheme://host:port)."""
    fixed = {**native_operations(), **fhir_fixed_operations()}
    typed = typed_operations()
    paths: dict[str, Json] = {}
    used: set[str] = set()
    undocumented: list[str] = []
    not_described: dict[str, str] = {}

    def put(method: str, path: str, operation: Operation) -> None:
        params = _TEMPLATE.findall(path)
        rendered = operation.render(operation_id(method, path, used), params)
        paths.setdefault(path, {})[method.lower()] = rendered

    for method, path in app_routes(app):
        key = (method, path)
        if key in NOT_DESCRIBED:
            not_described[f"{method} {path}"] = NOT_DESCRIBED[key]
        elif key in fixed:
            put(method, path, fixed[key])
        elif key in typed:
            interaction, make = typed[key]
            for name, support in RESOURCES.items():
                made = make(name) if interaction in support.interactions else None
                if made is not None:
                    put(method, path.replace("{type}", name), made)
        else:
            undocumented.append(f"{method} {path}")
            put(
                method if method != "*" else "GET",
                path,
                Operation(
                    f"{method} {path} (not documented)",
                    "undocumented",
                    responses={"default": {"description": "Not documented."}},
                ),
            )
            paths[path][(method if method != "*" else "GET").lower()]["x-undocumented"] = True
    fhir_types = sorted(RESOURCES)
    tags = [
        {"name": "operations", "description": "Health, readiness and metrics."},
        {
            "name": "records",
            "description": "Record packages, key release and the node's audit log.",
        },
        {"name": "claims", "description": "Claims' ledger metadata and statistics."},
        {"name": "documentation", "description": "This document."},
        {
            "name": FHIR_TAG,
            "description": f"FHIR R4 ({FHIR_VERSION}): capability, token, transactions.",
        },
        {"name": BULK_TAG, "description": "FHIR Bulk Data Access v2 $export."},
        *({"name": f"FHIR {t}", "description": RESOURCES[t].documentation} for t in fhir_types),
    ]
    used_tags = {op["tags"][0] for item in paths.values() for op in item.values()}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "medledger node API",
            "version": SOFTWARE_VERSION,
            "summary": "A node of a permissioned blockchain network for health records.",
            "description": "The native JSON API (health, metrics, sealed record packages, key"
            " release, the node's audit log) and the FHIR R4 API over the ledger (SMART"
            " Backend Services, search, transactions, $everything, Bulk Data $export). Every"
            " FHIR read is a ledger access request decided by consent and audited; record"
            " content is encrypted and never on-chain. Errors: the native API answers"
            ' {"error": ...}; the FHIR API an OperationOutcome.',
            "license": {"name": "Proprietary", "identifier": "LicenseRef-medledger"},
            "x-undocumented-routes": undocumented,
            "x-not-described": not_described,
        },
        "servers": [{"url": server_url.rstrip("/") or "/"}],
        "tags": [t for t in tags if t["name"] in used_tags],
        "paths": paths,
        "components": {
            "schemas": dict(SCHEMAS),
            "securitySchemes": security_schemes(f"{server_url.rstrip('/')}/fhir/auth/token"),
        },
    }


# --- HTTP -----------------------------------------------------------------------------------


def request_origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app, request_origin(request)))


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def render_html(document: Json) -> str:
    """The document as one HTML page: operations grouped by tag, with their parameters,
    bodies, responses and security."""
    info = document["info"]
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_text(info['title'])}</title>",
        "<style>body{font-family:sans-serif;max-width:70rem;margin:2rem auto;line-height:1.4}"
        "code{background:#f3f3f3;padding:0 .2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}"
        ".m{font-weight:bold;font-family:monospace}</style>",
        "</head><body>",
        f"<h1>{_text(info['title'])} <small>{_text(info['version'])}</small></h1>",
        f"<p>{_text(info['description'])}</p>",
        f'<p>Machine-readable: <a href="{OPENAPI_PATH}">{OPENAPI_PATH}</a> (OpenAPI'
        f" {_text(document['openapi'])}).</p>",
        "<h2>Security</h2><dl>",
    ]
    for name, scheme in document["components"]["securitySchemes"].items():
        parts.append(f"<dt><code>{_text(name)}</code> ({_text(scheme['type'])})</dt>")
        parts.append(f"<dd>{_text(scheme.get('description', ''))}</dd>")
    parts.append("</dl>")
    by_tag: dict[str, list[tuple[str, str, Json]]] = {}
    for path, item in document["paths"].items():
        for method, op in item.items():
            by_tag.setdefault(op["tags"][0], []).append((method, path, op))
    parts.append("<h2>Contents</h2><ul>")
    for tag in document["tags"]:
        anchor = re.sub(r"\W+", "-", tag["name"])
        parts.append(f'<li><a href="#{anchor}">{_text(tag["name"])}</a></li>')
    parts.append("</ul>")
    for tag in document["tags"]:
        anchor = re.sub(r"\W+", "-", tag["name"])
        parts.append(f'<h2 id="{anchor}">{_text(tag["name"])}</h2>')
        parts.append(f"<p>{_text(tag.get('description', ''))}</p>")
        for method, path, op in by_tag.get(tag["name"], []):
            parts.append(
                f'<h3><span class="m">{_text(method.upper())}</span> <code>{_text(path)}</code>'
                f" — {_text(op['summary'])}</h3>"
            )
            if op.get("description"):
                parts.append(f"<p>{_text(op['description'])}</p>")
            security = op.get("security") or []
            if security:
                names = [f"{n} {' '.join(s)}".strip() for req in security for n, s in req.items()]
                parts.append(f"<p>Security: <code>{_text('; '.join(names))}</code></p>")
            else:
                parts.append("<p>Security: none</p>")
            if op.get("parameters"):
                parts.append("<table><tr><th>parameter</th><th>in</th><th>description</th></tr>")
                for p in op["parameters"]:
                    required = " (required)" if p.get("required") else ""
                    parts.append(
                        f"<tr><td><code>{_text(p['name'])}</code>{required}</td>"
                        f"<td>{_text(p['in'])}</td><td>{_text(p.get('description', ''))}</td></tr>"
                    )
                parts.append("</table>")
            if op.get("requestBody"):
                media = ", ".join(op["requestBody"].get("content", {}))
                parts.append(f"<p>Body: <code>{_text(media)}</code></p>")
            parts.append("<ul>")
            for status, response in op["responses"].items():
                media = ", ".join(response.get("content", {}))
                suffix = f" <code>{_text(media)}</code>" if media else ""
                text = _text(response.get("description", ""))
                parts.append(f"<li><b>{_text(status)}</b> {text}{suffix}</li>")
            parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


async def docs_handler(request: web.Request) -> web.Response:
    document = openapi_document(request.app, request_origin(request))
    return web.Response(text=render_html(document), content_type="text/html", charset="utf-8")


def add_openapi_routes(app: web.Application) -> None:
    """`GET /openapi.json` and `GET /docs`; the document describes whatever routes the app has
    when it is asked for."""
    app.router.add_get(OPENAPI_PATH, openapi_handler)
    app.router.add_get(DOCS_PATH, docs_handler)
