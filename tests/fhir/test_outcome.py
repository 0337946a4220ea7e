"""OperationOutcome: what each kind of refusal becomes, as an HTTP status and issue type."""

from __future__ import annotations

import pytest

from medledger.client.errors import LEDGER_STATUS
from medledger.client.records import AccessDenied, RecordErased
from medledger.client.sdk import ClientError, ProofError, QueryError, TxRejected
from medledger.fhir.outcome import (
    FhirError,
    from_client,
    from_ledger,
    from_smart,
    from_validation,
    status_line,
)
from medledger.fhir.smart import SmartError
from medledger.ledger.errors import Code
from medledger.validation import FhirValidationError, validate_resource


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (Code.INVALID_BODY, 422, "business-rule"),
        (Code.NOT_FOUND, 404, "not-found"),
        (Code.CONFLICT, 409, "conflict"),
        (Code.ACCESS_DENIED, 403, "forbidden"),
        (Code.UNAUTHORIZED, 403, "forbidden"),
        (Code.ERASED, 410, "deleted"),
        (Code.MALFORMED, 400, "invalid"),
        (Code.TOO_LARGE, 413, "too-costly"),
        (Code.BAD_NONCE, 503, "transient"),
    ],
)
def test_ledger_codes(code: Code, status: int, kind: str) -> None:
    error = from_ledger(code, "why")
    assert (error.status, error.code) == (status, kind)
    outcome = error.outcome
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["diagnostics"] == "ledger: why"
    validate_resource(outcome)


def test_every_ledger_refusal_has_a_status() -> None:
    assert set(LEDGER_STATUS) == set(Code) - {Code.OK}
    assert from_ledger(999, "").status == 500


def test_smart_refusals() -> None:
    unauthenticated = from_smart(SmartError(401, "invalid_token", 'expired "token"'))
    assert unauthenticated.status == 401 and unauthenticated.code == "login"
    assert unauthenticated.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert (
        '"' not in unauthenticated.headers["WWW-Authenticate"].split("error_description=")[1][1:-1]
    )
    scope = from_smart(SmartError(403, "insufficient_scope", "scope does not allow c"))
    assert (scope.status, scope.code) == (403, "forbidden")
    assert from_smart(SmartError(400, "invalid_request", "x")).code == "invalid"


def test_validation_problems_become_issues_with_paths() -> None:
    with pytest.raises(FhirValidationError) as caught:
        validate_resource({"resourceType": "Observation", "status": "done", "code": {}})
    error = from_validation(caught.value)
    assert error.status == 400
    assert any(i.get("expression") == ["Observation.status"] for i in error.outcome["issue"])
    validate_resource(error.outcome)


def test_client_errors() -> None:
    assert from_client(AccessDenied("denied: no consent")).status == 403
    assert "no consent" in from_client(AccessDenied("denied: no consent")).diagnostics
    assert from_client(RecordErased("gone")).status == 410
    assert from_client(TxRejected(Code.CONFLICT, "busy", "AB" * 32, 5)).status == 409
    assert from_client(QueryError(Code.NOT_FOUND, "unknown record x")).status == 404
    assert from_client(ProofError("bad")).status == 502
    assert from_client(ClientError("unreachable")).status == 503


def test_status_line_and_custom_errors() -> None:
    assert status_line(201) == "201 Created"
    assert status_line(412) == "412 Precondition Failed"
    error = FhirError(412, "conflict", "stale")
    assert error.status_line == "412 Precondition Failed"
    assert error.outcome["issue"] == [
        {"severity": "error", "code": "conflict", "diagnostics": "stale"}
    ]
