"""The FHIR facade's core: its context, executors and caches, and who is calling."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from medledger.fhir.context import FhirContext
from medledger.fhir.outcome import (
    FhirError,
    forbidden,
)
from medledger.fhir.plumbing import (
    READ_WORKERS,
    REQUEST_WORKERS,
    Caller,
    ReadCache,
)
from medledger.fhir.smart import AccessToken
from medledger.ledger.access import SessionGrant
from medledger.ledger.consent import (
    Purpose,
)
from medledger.services.custody import CustodyError


class GatewayCore:
    def __init__(self, ctx: FhirContext) -> None:
        if ctx.tokens.token_url != ctx.token_url:
            # A client assertion's aud must be this node's token endpoint as clients reach it:
            # the token service and the URLs the API hands out must agree on it.
            raise ValueError(
                f"the token service checks assertions for {ctx.tokens.token_url}, but this"
                f" node's FHIR token endpoint is {ctx.token_url}: build the TokenService with"
                " FhirContext.token_url (the public URL)"
            )
        self.ctx = ctx
        self.cache = ReadCache()
        # The latest session each member opened per (patient, purpose): reads of that patient's
        # records it covers need no new commit while a custodian would still release for it.
        self.sessions: dict[tuple[str, str, str], SessionGrant] = {}
        self._sessions_lock = threading.Lock()
        self.readers = ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="fhir-read")
        self.entries = ThreadPoolExecutor(4, thread_name_prefix="fhir-batch")
        # FHIR requests run here, not on the loop's default executor (min(32, cores + 4)
        # threads, shared with the portal and HL7): a request mostly waits for a commit, so
        # concurrent clients are not held to the number of cores.
        self.requests = ThreadPoolExecutor(REQUEST_WORKERS, thread_name_prefix="fhir-request")
        self.consent_patients: dict[str, str] = {}
        self.started = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    @property
    def base(self) -> str:
        return self.ctx.base_url

    @property
    def token_url(self) -> str:
        return self.ctx.tokens.token_url

    def close(self) -> None:
        self.requests.shutdown(wait=False, cancel_futures=True)
        self.entries.shutdown(wait=False, cancel_futures=True)
        self.readers.shutdown(wait=False, cancel_futures=True)

    def caller(self, token: AccessToken, purpose: Purpose, prefer: Mapping[str, str]) -> Caller:
        try:
            client = self.ctx.records_client(token.member)
        except CustodyError:
            raise forbidden(
                f"this node does not hold the keys of member {token.member}; use the node of"
                f" organization {token.organization}"
            ) from None
        return Caller(token, client, purpose, prefer, max_grants=self.ctx.max_search_grants)

    def refuse_scope(self, caller: Caller, resource_type: str, interaction: str) -> FhirError:
        reason = f"scope does not allow {interaction} on {resource_type}"
        self.ctx.audit.record(
            caller.token.client_id,
            "fhir.request",
            f"{resource_type}.{interaction}",
            "refused",
            reason,
        )
        return FhirError(403, "forbidden", reason)

    def require_scope(self, caller: Caller, resource_type: str, interaction: str) -> None:
        if not caller.may(resource_type, interaction):
            raise self.refuse_scope(caller, resource_type, interaction)
