"""FHIR OperationOutcome: every error the FHIR API answers is one, with the HTTP status that
says what kind of error it is.

400 the request or resource is invalid; 401 no valid access token; 403 outside the token's
scopes or refused by the ledger's access rules; 404 no such resource; 405 an interaction the
server does not offer; 406/415 a format other than JSON; 409 a conflict with the ledger's state;
410 the record was erased; 412 a version precondition (If-Match) failed; 413 the body is too
large; 422 the request is well-formed but breaks a business rule, or would cost more than one
request may (too-costly: narrow it); 429 too many export jobs; 500 an unexpected failure (the
answer says nothing of it; the node's log says where); 503 the network could not serve it just
now.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from medledger.client.errors import classify, classify_code
from medledger.client.records import AccessDenied
from medledger.client.sdk import ClientError, ProofError, QueryError, TxRejected
from medledger.fhir.smart import SmartError
from medledger.validation import FhirValidationError

Json = dict[str, Any]

# Ledger result codes as (HTTP status, FHIR issue type).

# SMART/OAuth refusals: (HTTP status) -> FHIR issue type.
SMART_ISSUE: Mapping[int, str] = {400: "invalid", 401: "login", 403: "forbidden"}


def issue(severity: str, code: str, diagnostics: str, expression: Sequence[str] = ()) -> Json:
    entry: Json = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        entry["expression"] = list(expression)
    return entry


def operation_outcome(issues: Sequence[Json]) -> Json:
    return {"resourceType": "OperationOutcome", "issue": list(issues)}


def information(diagnostics: str) -> Json:
    """An OperationOutcome for a success that has something to say (Prefer: return=
    OperationOutcome, or a note in a search Bundle)."""
    return operation_outcome([issue("information", "informational", diagnostics)])


class FhirError(Exception):
    """An error answered as an OperationOutcome with HTTP status `status`."""

    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        *,
        issues: Sequence[Json] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.issues = list(issues) or [issue("error", code, diagnostics)]
        self.headers = dict(headers or {})

    @property
    def outcome(self) -> Json:
        return operation_outcome(self.issues)

    @property
    def status_line(self) -> str:
        """`201 Created` style, as Bundle.entry.response.status wants it."""
        return status_line(self.status)


def status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def invalid(diagnostics: str, expression: Sequence[str] = ()) -> FhirError:
    return FhirError(
        400, "invalid", diagnostics, issues=[issue("error", "invalid", diagnostics, expression)]
    )


def not_found(diagnostics: str) -> FhirError:
    return FhirError(404, "not-found", diagnostics)


def not_supported(diagnostics: str, status: int = 405) -> FhirError:
    return FhirError(status, "not-supported", diagnostics)


def business_rule(diagnostics: str) -> FhirError:
    return FhirError(422, "business-rule", diagnostics)


def forbidden(diagnostics: str) -> FhirError:
    return FhirError(403, "forbidden", diagnostics)


def too_costly(diagnostics: str, status: int = 422) -> FhirError:
    """A request that would cost more than the server does per request (FHIR issue type
    too-costly): the client narrows it and asks again."""
    return FhirError(status, "too-costly", diagnostics)


def internal_error() -> FhirError:
    """What the client is told of an unexpected failure: nothing of its cause."""
    return FhirError(500, "exception", "internal error; the node's log has the details")


def exception_summary(error: BaseException) -> str:
    """An unexpected exception for the node's log: its type and where it was raised, never its
    message or values, which may quote what a sender sent (PHI)."""
    frames = traceback.extract_tb(error.__traceback__)[-4:]
    where = " < ".join(
        f"{f.name} ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})" for f in frames[::-1]
    )
    return f"{type(error).__name__} in {where or 'unknown'}"


def from_ledger(code: int, log: str) -> FhirError:
    """A ledger refusal (a transaction's or a query's result code) as an HTTP error."""
    kind = classify_code(code)
    return FhirError(
        kind.status, kind.issue, f"ledger: {log}" if log else f"ledger refused (code {code})"
    )


def from_smart(error: SmartError) -> FhirError:
    """A token refusal: 401 says how to authenticate (RFC 6750), 403 which scope is missing."""
    headers: dict[str, str] = {}
    if error.status == 401:
        headers["WWW-Authenticate"] = (
            f'Bearer error="{error.error}", error_description="{_quoted(error.description)}"'
        )
    elif error.status == 403:
        headers["WWW-Authenticate"] = f'Bearer error="{error.error}"'
    kind = SMART_ISSUE.get(error.status, "security")
    return FhirError(error.status, kind, error.description, headers=headers)


def from_validation(error: FhirValidationError) -> FhirError:
    """Each problem of an invalid resource becomes an issue, its path as the expression."""
    issues = []
    for problem in error.problems:
        path, _, text = problem.partition(": ")
        issues.append(issue("error", "invalid", text or problem, [path] if text else []))
    if not issues:
        issues.append(issue("error", "invalid", error.message))
    return FhirError(400, "invalid", error.message, issues=issues)


def from_client(error: ClientError) -> FhirError:
    """What the SDK raised while acting for the caller (`medledger.client.errors` classifies
    it for every front door)."""
    kind = classify(error)
    if isinstance(error, AccessDenied):
        diagnostics = f"ledger: {error.log}"
    elif isinstance(error, TxRejected | QueryError):
        return from_ledger(error.code, error.log)
    elif isinstance(error, ProofError):
        diagnostics = f"an answer failed its proof: {error}"
    else:
        diagnostics = str(error)
    return FhirError(kind.status, kind.issue, diagnostics)


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', "'")
