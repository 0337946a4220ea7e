"""The one table of ledger result codes.

Every transaction gets exactly one result: a code from this table and a log line. The ABCI
adapter passes the code through unchanged; HTTP and FHIR map it at their edges.
"""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    OK = 0
    MALFORMED = 1
    WRONG_CHAIN = 2
    BAD_SIGNATURE = 3
    BAD_NONCE = 4
    UNKNOWN_SENDER = 5
    UNKNOWN_TYPE = 6
    SENDER_INACTIVE = 7
    TOO_LARGE = 8
    UNAUTHORIZED = 9
    INVALID_BODY = 10
    NOT_FOUND = 11
    CONFLICT = 12
    EXPIRED = 13
    ACCESS_DENIED = 14
    ERASED = 15
    # A transaction a handler could not execute for a reason no rule foresaw (a bug): it is
    # refused like any other, changes nothing and leaves its nonce unused.
    INTERNAL = 16


class LedgerError(Exception):
    """A transaction or query was refused; `code` says why, the message says what to do."""

    def __init__(
        self, code: Code, message: str, *, subject: str = "", decision: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # A decision (an access request denied by the rules) is not bad input: it is recorded
        # and uses its nonce, so that the same request can be made again later and gets a
        # transaction of its own.
        self.decision = decision
        # The patient the refused request concerned, so that refusals (a denied access
        # request, say) appear in that patient's audit trail.
        self.subject = subject
