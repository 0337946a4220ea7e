"""FHIR Bulk Data `$export` without a network: the kick-off's parameters, the asynchronous
pattern's refusals, the manifest, and jobs that expire or are deleted with their output."""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from medledger.abci.application import LedgerApplication
from medledger.api.http import build_http_app
from medledger.fhir.bulk import (
    EXPORTS,
    BulkExports,
    ExportJob,
    JobState,
    Line,
    OutputFile,
    parse_kickoff,
)
from medledger.fhir.capability import RECORD_TYPES
from medledger.fhir.context import EXPORT_RETENTION, FHIR_CONTEXT, FhirContext
from medledger.fhir.gateway import (
    GATEWAY,
)
from medledger.fhir.outcome import FhirError
from medledger.fhir.routes import (
    add_fhir_routes,
)
from medledger.fhir.smart import AccessToken, SmartError
from medledger.ledger.consent import Purpose

ORIGIN = "http://127.0.0.1:26601"


class Tokens:
    """Stands in for the token service: one valid token, for client `exporter`."""

    token_url = f"{ORIGIN}/fhir/auth/token"

    def __init__(self) -> None:
        self.checked: list[tuple[str, str]] = []

    def check(self, authorization: str | None, resource_type: str, interaction: str) -> AccessToken:
        self.checked.append((resource_type, interaction))
        if authorization == "Bearer good":
            return token("exporter")
        if authorization == "Bearer other":
            return token("someone-else")
        raise SmartError(401, "invalid_token", "a bearer access token is required")


def token(client_id: str) -> AccessToken:
    scopes = frozenset({"system/*.rs"})
    return AccessToken("t", client_id, "member", "org", scopes, time.time() + 300)


def app_with(tokens: Tokens) -> web.Application:
    app = build_http_app(cast(LedgerApplication, None), "http://127.0.0.1:1")
    app[FHIR_CONTEXT] = FhirContext(
        "http://127.0.0.1:1", "chain", ORIGIN, "org", *cast(Any, (None, None, tokens, None))
    )
    add_fhir_routes(app)
    return app


def job(state: JobState = JobState.COMPLETE, **fields: Any) -> ExportJob:
    values: dict[str, Any] = {
        "id": "job1",
        "token": token("exporter"),
        "check_type": "Patient",
        "request": f"{ORIGIN}/fhir/$export",
        "level": "system",
        "patient": None,
        "types": ("Patient", "Observation"),
        "since_ns": None,
        "purpose": Purpose.TREATMENT,
        "prefer": {"respond-async": ""},
        "state": state,
        "transaction_ns": 1_767_225_600_000_000_000,
        "expires_at": time.time() + EXPORT_RETENTION,
    }
    values.update(fields)
    return ExportJob(**values)


def test_kickoff_parameters() -> None:
    types, since, notes = parse_kickoff([], lenient=False)
    assert types[0] == "Patient" and set(types) == set(RECORD_TYPES)
    assert since is None and notes == []
    types, since, _ = parse_kickoff(
        [("_type", "Observation,Condition"), ("_since", "2026-01-01T00:00:00Z")], lenient=False
    )
    assert types == ["Observation", "Condition"]
    assert since == 1_767_225_600_000_000_000
    types, _, _ = parse_kickoff([("_outputFormat", "application/fhir+ndjson")], lenient=False)
    for bad in (
        [("_typeFilter", "Observation?code=x")],
        [("_type", "Claim")],
        [("_outputFormat", "text/csv")],
        [("_since", "yesterday")],
        [("_since", "2026-01-01"), ("_since", "2026-02-01")],
    ):
        with pytest.raises(FhirError) as caught:
            parse_kickoff(bad, lenient=False)
        assert caught.value.status == 400, bad
    # Lenient handling ignores what it does not support, and says so in the manifest.
    types, _, notes = parse_kickoff(
        [("_typeFilter", "x"), ("_type", "Observation,Claim")], lenient=True
    )
    assert types == ["Observation"]
    assert len(notes) == 2 and all(n["severity"] == "warning" for n in notes)
    with pytest.raises(FhirError):
        parse_kickoff([("_type", "Claim")], lenient=True)  # nothing left to export


def test_the_manifest_lists_the_files_and_errors() -> None:
    exports = BulkExports.__new__(BulkExports)
    exports.gateway = cast(Any, type("G", (), {"base": f"{ORIGIN}/fhir"})())
    done = job()
    line = Line(cast(Any, None), cast(Any, None), b"{}")
    done.files = {"Patient-1.ndjson": OutputFile("Patient-1.ndjson", "Patient", [line])}
    manifest = exports.manifest(done)
    assert manifest == {
        "transactionTime": "2026-01-01T00:00:00.000000Z",
        "request": f"{ORIGIN}/fhir/$export",
        "requiresAccessToken": True,
        "output": [
            {
                "type": "Patient",
                "url": f"{ORIGIN}/fhir/$export-output/job1/Patient-1.ndjson",
                "count": 1,
            }
        ],
        "error": [],
    }
    done.errors = [{"resourceType": "OperationOutcome", "issue": []}]
    assert exports.manifest(done)["error"] == [
        {"type": "OperationOutcome", "url": f"{ORIGIN}/fhir/$export-output/job1/errors.ndjson"}
    ]


async def test_status_and_files_are_for_the_client_that_asked_only() -> None:
    tokens = Tokens()
    app = app_with(tokens)
    async with TestClient(TestServer(app)) as client:
        exports = app[EXPORTS]
        assert exports.gateway is app[GATEWAY]
        done = job()
        line = Line(cast(Any, None), cast(Any, None), b"{}")
        done.files = {"Patient-1.ndjson": OutputFile("Patient-1.ndjson", "Patient", [line])}
        exports._jobs[done.id] = done
        status = "/fhir/$export-status/job1"
        assert (await client.get(status)).status == 401
        assert (await client.get(status, headers={"Authorization": "Bearer other"})).status == 404
        answer = await client.get(status, headers={"Authorization": "Bearer good"})
        assert answer.status == 200 and "Expires" in answer.headers
        assert (await answer.json())["output"][0]["type"] == "Patient"
        output = "/fhir/$export-output/job1/Patient-1.ndjson"
        refused = await client.get(output)
        assert refused.status == 401
        assert (await refused.json())["resourceType"] == "OperationOutcome"
        wrong = await client.get(
            output, headers={"Authorization": "Bearer good", "Accept": "text/csv"}
        )
        assert wrong.status == 406
        missing = await client.get(
            "/fhir/$export-output/job1/Condition-1.ndjson",
            headers={"Authorization": "Bearer good"},
        )
        assert missing.status == 404
        # While it runs, the status says how far it is.
        done.state = JobState.RUNNING
        done.total, done.done = 10, 4
        answer = await client.get(status, headers={"Authorization": "Bearer good"})
        assert answer.status == 202 and answer.headers["X-Progress"] == "read 4 of 10 resources"
        assert answer.headers["Retry-After"]
        # A failed export answers its OperationOutcome.
        done.state = JobState.FAILED
        done.failure = FhirError(403, "forbidden", "ledger: no consent")
        answer = await client.get(status, headers={"Authorization": "Bearer good"})
        assert answer.status == 403
        assert (await answer.json())["issue"][0]["diagnostics"] == "ledger: no consent"
        # Deleting it drops it and its files.
        done.state = JobState.COMPLETE
        deleted = await client.delete(status, headers={"Authorization": "Bearer good"})
        assert deleted.status == 202
        assert done.files == {} and done.cancelled.is_set()
        assert (await client.get(status, headers={"Authorization": "Bearer good"})).status == 404


async def test_kickoff_needs_the_async_pattern_and_a_token() -> None:
    async with TestClient(TestServer(app_with(Tokens()))) as client:
        plain = await client.get("/fhir/$export", headers={"Authorization": "Bearer good"})
        assert plain.status == 400
        assert "respond-async" in (await plain.json())["issue"][0]["diagnostics"]
        anonymous = await client.get("/fhir/$export", headers={"Prefer": "respond-async"})
        assert anonymous.status == 401
        assert "WWW-Authenticate" in anonymous.headers
        xml = await client.get(
            "/fhir/Patient/p/$export",
            headers={"Prefer": "respond-async", "Accept": "application/fhir+xml"},
        )
        assert xml.status == 406


def test_expired_jobs_are_swept_with_their_output() -> None:
    exports = BulkExports.__new__(BulkExports)
    exports._jobs = {}
    exports._lock = threading.Lock()
    fresh = job(id="fresh")
    old = job(id="old", expires_at=time.time() - 1)
    running = job(JobState.RUNNING, id="running", expires_at=0.0)
    line = Line(cast(Any, None), cast(Any, None), b"{}")
    old.files = {"Patient-1.ndjson": OutputFile("Patient-1.ndjson", "Patient", [line])}
    for item in (fresh, old, running):
        exports._jobs[item.id] = item
    assert exports.sweep() == 1
    assert set(exports._jobs) == {"fresh", "running"}
    assert old.files == {}
    assert exports.sweep(now=time.time() + EXPORT_RETENTION + 1) == 1
    assert set(exports._jobs) == {"running"}
