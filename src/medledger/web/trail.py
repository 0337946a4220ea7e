"""Audit entries as rows for people: who asked for what, the ledger's decision and why, and
the proof each row carries for the browser to check."""

from __future__ import annotations

from dataclasses import dataclass

from medledger.client.records import ProvenAuditEntry, RecordsClient
from medledger.client.sdk import QueryError
from medledger.ledger.access import Basis, Grant
from medledger.ledger.errors import Code
from medledger.web.common import when
from medledger.web.context import PortalContext
from medledger.web.proofs import AuditEvidence


@dataclass(frozen=True)
class TrailRow:
    index: int
    height: int
    time_ns: int
    time: str
    tx: str
    type: str
    sender: str
    code: int
    outcome: str
    organization: str
    role: str
    log: str
    grant: Grant | None
    emergency: bool
    leaf: str
    proof: str

    @property
    def granted(self) -> bool:
        return self.type in ACCESS_TYPES and self.code == Code.OK

    @property
    def denied(self) -> bool:
        return self.code == Code.ACCESS_DENIED

    @property
    def basis(self) -> str:
        """Why access was granted, in words."""
        if self.grant is None:
            return ""
        match self.grant.basis:
            case Basis.CONSENT:
                return f"under consent {self.grant.consent_id[:12]}…"
            case Basis.EMERGENCY:
                return f"EMERGENCY (break-the-glass: {self.grant.emergency_reason})"
            case Basis.AUTHOR_ORGANIZATION:
                return "the record's author organization"
            case Basis.PATIENT:
                return "the patient"
        return str(self.grant.basis)

    @property
    def what(self) -> str:
        if self.grant is None:
            return ""
        return f"{self.grant.resource_type} v{self.grant.version} ({self.grant.purpose})"


# What grants access on the ledger: one record's access request, or a session over a chart.
ACCESS_TYPES = frozenset({"access.request", "access.session"})


def _outcome(entry: ProvenAuditEntry) -> str:
    code = entry.entry.code
    if code == Code.OK:
        return "granted" if entry.entry.type in ACCESS_TYPES else "ok"
    if code == Code.ACCESS_DENIED:
        return "denied"
    try:
        return f"refused ({Code(code).name.lower().replace('_', ' ')})"
    except ValueError:
        return f"refused (code {code})"


def trail_rows(
    context: PortalContext,
    client: RecordsClient,
    evidence: AuditEvidence,
    types: frozenset[str] | None = None,
) -> list[TrailRow]:
    """The trail's entries (of `types`, or all), newest first, each with its grant when the
    ledger granted access — a session as one row per record version it covered."""
    rows: list[TrailRow] = []
    for proven in evidence.trail.entries:
        entry = proven.entry
        if types is not None and entry.type not in types:
            continue
        grants: list[Grant | None] = [None]
        try:
            if proven.granted_access:
                grants = [client.grant(proven.grant_id)]
            elif proven.opened_session:
                session = client.session(proven.grant_id)
                grants = [session.grant_for(c.record_id, c.version) for c in session.records]
        except QueryError:
            grants = [None]
        member = context.member(entry.sender)
        proof = evidence.proof_of(proven)
        rows.extend(
            TrailRow(
                index=proven.index,
                height=proven.height,
                time_ns=proven.time_ns,
                time=when(proven.time_ns),
                tx=entry.tx_hash.hex(),
                type=entry.type,
                sender=entry.sender,
                code=entry.code,
                outcome=_outcome(proven),
                organization=context.organization_name(member.organization) if member else "",
                role=str(member.role) if member else "",
                log=entry.log,
                grant=grant,
                emergency=bool(grant and grant.emergency),
                leaf=proof.leaf,
                proof=",".join(proof.inclusion_proof),
            )
            for grant in grants
        )
    rows.reverse()
    return rows
