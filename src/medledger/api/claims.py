"""The native JSON API for claims: a claim's whole history and totals per provider and
insurer, to the parties of each claim and to auditors — metadata only (codes, dates, amounts);
the Claim and ClaimResponse documents themselves are encrypted records, read through access
requests and key release like any record."""

from __future__ import annotations

import msgspec
from aiohttp import web

from medledger.api.records import SERVICES, _authenticate, _problem
from medledger.auth import AuthError
from medledger.ledger.claims import Claim, all_claims, claim_stats, claims_of, load_claim
from medledger.ledger.consent import is_delegate
from medledger.ledger.errors import LedgerError
from medledger.ledger.model import Member, Role
from medledger.ledger.state import State
from medledger.services.packages import RecordServices

PARTIES = ("patient", "provider", "insurer")
OVERSEERS = frozenset({Role.AUDITOR})


def _may_see_party(state: State, member: Member, party: str, party_id: str) -> bool:
    if member.role in OVERSEERS:
        return True
    if party == "patient":
        return member.id == party_id or is_delegate(state, party_id, member.id)
    return member.organization == party_id


def _may_see_claim(state: State, member: Member, claim: Claim) -> bool:
    return _may_see_party(state, member, "patient", claim.patient) or member.organization in (
        claim.provider,
        claim.insurer,
    )


async def _member(request: web.Request) -> tuple[RecordServices, State, Member]:
    services = request.app[SERVICES]
    _, member = await _authenticate(request, services)
    if member is None:
        raise AuthError("claims are shown to members, not nodes")
    return services, State(services.store), member


def _party(request: web.Request) -> tuple[str, str]:
    party, _, party_id = request.query.get("party", "").partition(":")
    if party and (party not in PARTIES or not party_id):
        raise ValueError(f"party is one of {', '.join(p + ':<id>' for p in PARTIES)}")
    return party, party_id


async def list_claims(request: web.Request) -> web.Response:
    """GET /v1/claims?party=patient:<id>|provider:<org>|insurer:<org>"""
    try:
        _, state, member = await _member(request)
        party, party_id = _party(request)
    except AuthError as exc:
        return _problem(exc.status, str(exc))
    except ValueError as exc:
        return _problem(400, str(exc))
    if not party:
        if member.role not in OVERSEERS:
            return _problem(403, "listing every claim is for auditors; name a party")
        return _json(all_claims(state))
    if not _may_see_party(state, member, party, party_id):
        return _problem(403, f"you are not the {party} of these claims, nor an auditor")
    return _json(claims_of(state, party, party_id))


async def show_claim(request: web.Request) -> web.Response:
    """GET /v1/claims/{id}: the claim with every step of its history."""
    try:
        _, state, member = await _member(request)
    except AuthError as exc:
        return _problem(exc.status, str(exc))
    try:
        claim = load_claim(state, request.match_info["claim_id"])
    except LedgerError as exc:
        return _problem(404, exc.message)
    if not _may_see_claim(state, member, claim):
        return _problem(403, "a claim is shown to its patient, provider, insurer and auditors")
    return _json(claim)


async def stats(request: web.Request) -> web.Response:
    """GET /v1/claims/stats?party=…: counts, amounts, time to adjudication, denial rate."""
    try:
        _, state, member = await _member(request)
        party, party_id = _party(request)
    except AuthError as exc:
        return _problem(exc.status, str(exc))
    except ValueError as exc:
        return _problem(400, str(exc))
    if not party:
        if member.role not in OVERSEERS | {Role.ADMIN}:
            return _problem(403, "network-wide totals are for auditors and admins; name a party")
        return _json(claim_stats(all_claims(state)))
    if not _may_see_party(state, member, party, party_id):
        return _problem(403, f"you are not the {party} of these claims, nor an auditor")
    return _json(claim_stats(claims_of(state, party, party_id)))


def _json(value: object) -> web.Response:
    return web.Response(body=msgspec.json.encode(value), content_type="application/json")


def add_claim_routes(app: web.Application) -> None:
    app.router.add_get("/v1/claims", list_claims)
    app.router.add_get("/v1/claims/stats", stats)
    app.router.add_get("/v1/claims/{claim_id}", show_claim)
