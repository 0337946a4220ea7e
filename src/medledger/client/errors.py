"""One table of what a failure of the SDK means to whoever is told of it: the HTTP status and
FHIR issue type (the FHIR API, the portal), the exit code (the CLI) and a short title. Each
front door words its answer its own way; none decides on its own what a refusal is."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from medledger.client.records import AccessDenied, RecordErased
from medledger.client.sdk import ClientError, ProofError, QueryError, TxRejected
from medledger.ledger.errors import Code

EXIT_FAILED = 1
EXIT_DENIED = 3
EXIT_ERASED = 4


@dataclass(frozen=True)
class ErrorClass:
    status: int  # HTTP
    issue: str  # FHIR OperationOutcome issue type
    exit_code: int  # CLI
    title: str

    @property
    def transient(self) -> bool:
        """Worth sending again unchanged later (HL7 answers AR rather than AE)."""
        return self.status == 503


# A ledger refusal (a transaction's or a query's result code): (HTTP status, FHIR issue type).
LEDGER_STATUS: Mapping[Code, tuple[int, str]] = {
    Code.MALFORMED: (400, "invalid"),
    Code.WRONG_CHAIN: (500, "exception"),
    Code.BAD_SIGNATURE: (500, "exception"),
    Code.BAD_NONCE: (503, "transient"),
    Code.UNKNOWN_SENDER: (403, "security"),
    Code.UNKNOWN_TYPE: (500, "exception"),
    Code.SENDER_INACTIVE: (403, "security"),
    Code.TOO_LARGE: (413, "too-costly"),
    Code.UNAUTHORIZED: (403, "forbidden"),
    Code.INVALID_BODY: (422, "business-rule"),
    Code.NOT_FOUND: (404, "not-found"),
    Code.CONFLICT: (409, "conflict"),
    Code.EXPIRED: (422, "business-rule"),
    Code.ACCESS_DENIED: (403, "forbidden"),
    Code.ERASED: (410, "deleted"),
    Code.INTERNAL: (500, "exception"),
}

DENIED = ErrorClass(403, "forbidden", EXIT_DENIED, "Access denied")
ERASED = ErrorClass(410, "deleted", EXIT_ERASED, "Erased")
UNVERIFIED = ErrorClass(502, "exception", EXIT_FAILED, "The node's answer did not verify")
UNREACHABLE = ErrorClass(503, "transient", EXIT_FAILED, "The network did not answer")


def classify_code(code: int) -> ErrorClass:
    """A ledger result code."""
    try:
        ledger_code = Code(code)
        status, issue = LEDGER_STATUS[ledger_code]
    except (ValueError, KeyError):
        return ErrorClass(500, "exception", EXIT_FAILED, "The ledger refused this")
    if ledger_code is Code.ACCESS_DENIED:
        return DENIED
    if ledger_code is Code.ERASED:
        return ERASED
    return ErrorClass(status, issue, EXIT_FAILED, "The ledger refused this")


def classify(error: ClientError) -> ErrorClass:
    """What the SDK raised."""
    if isinstance(error, AccessDenied):
        return DENIED
    if isinstance(error, RecordErased):
        return ERASED
    if isinstance(error, TxRejected | QueryError):
        return classify_code(error.code)
    if isinstance(error, ProofError):
        return UNVERIFIED
    return UNREACHABLE
