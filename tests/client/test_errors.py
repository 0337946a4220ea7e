"""The one table of what an SDK failure means at each front door: FHIR status and issue type,
the portal's page, the CLI's exit code, HL7's AE or AR."""

from __future__ import annotations

from medledger.client.errors import EXIT_DENIED, EXIT_ERASED, EXIT_FAILED, classify
from medledger.client.records import AccessDenied, RecordErased
from medledger.client.sdk import ClientError, ProofError, QueryError, TxRejected
from medledger.fhir.outcome import from_client
from medledger.hl7.ingest import ack_for
from medledger.hl7.oru import AckCode
from medledger.ledger.errors import Code


def test_each_failure_has_one_meaning_everywhere() -> None:
    cases: list[tuple[ClientError, int, str, int]] = [
        (AccessDenied("denied: no consent"), 403, "forbidden", EXIT_DENIED),
        (TxRejected(Code.ACCESS_DENIED, "denied", "ab" * 32, 5), 403, "forbidden", EXIT_DENIED),
        (RecordErased("erased"), 410, "deleted", EXIT_ERASED),
        (TxRejected(Code.ERASED, "erased", "ab" * 32, 5), 410, "deleted", EXIT_ERASED),
        (TxRejected(Code.CONFLICT, "stale", "ab" * 32, 5), 409, "conflict", EXIT_FAILED),
        (QueryError(Code.NOT_FOUND, "no such record"), 404, "not-found", EXIT_FAILED),
        (TxRejected(Code.BAD_NONCE, "too far ahead", "ab" * 32), 503, "transient", EXIT_FAILED),
        (ProofError("bad proof"), 502, "exception", EXIT_FAILED),
        (ClientError("cannot reach the node"), 503, "transient", EXIT_FAILED),
        (TxRejected(999, "a code from a newer release", "ab" * 32), 500, "exception", EXIT_FAILED),
    ]
    for error, status, issue, exit_code in cases:
        kind = classify(error)
        assert (kind.status, kind.issue, kind.exit_code) == (status, issue, exit_code), error
        fhir = from_client(error)
        assert (fhir.status, fhir.code) == (status, issue), error
        # HL7: what is worth sending again later is AR; a refusal the message would meet again
        # is AE.
        assert ack_for(error) is (AckCode.REJECT if status == 503 else AckCode.ERROR), error
