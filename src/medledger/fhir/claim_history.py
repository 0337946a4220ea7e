"""Claims and explanations of benefit inside a transaction Bundle: a provider's claim history
(a Synthea or EHR export) onto the claims ledger.

A Claim entry becomes a ledger claim (`claim.import`, see `medledger.ledger.claims`) with its
FHIR Claim as an encrypted record; an ExplanationOfBenefit entry is the payer's decision on the
Claim it names — of the same transaction, or one this organization imported earlier — and is
stored beside it. Claim.id and ExplanationOfBenefit.id are the ledger's claim id, and every
reference to either is rewritten to it. The claim's patient is resolved as a record's is; its
supporting records are the records of this transaction it refers to (its encounter, the
immunizations it bills). Everything is extracted and checked before anything is written; the
claims are imported in the same ledger transaction as the Bundle's records and directory
entries (`record.put-bundle`: all or none) — those more than one import holds (over 200, or
three quarters of a transaction's bytes) in `claim.import` transactions right after.

Who pays: a network insurer when Claim.insurer names one (Organization/<id>) or when the
payer's identifier or name is mapped in the node's `[claims] payers` table; otherwise the
payer is outside the network and kept by name.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

from medledger.client.claims import (
    ClaimError,
    ClaimsClient,
    HistoryClaim,
    extract_history_claim,
    extract_reported_decision,
)
from medledger.client.records import RecordsClient
from medledger.client.sdk import QueryError
from medledger.fhir.outcome import FhirError, business_rule, issue, operation_outcome
from medledger.fhir.plumbing import Json, in_entry, references_in
from medledger.ledger.claims import EOB_RESOURCE, MAX_SUPPORTING, Claim
from medledger.ledger.model import Member, Organization, OrganizationKind, Status

CLAIM = "Claim"
HISTORY_TYPES = frozenset({CLAIM, EOB_RESOURCE})


def plan_entry(resource_type: str) -> Json:
    """The plan of a new Claim or ExplanationOfBenefit entry: its FHIR id (the claim id; an
    EOB's is settled by `link_explanations`) and the record id of its document."""
    return {"id": str(uuid.uuid4()), "record_id": str(uuid.uuid4()), "claim": resource_type}


def link_explanations(plans: Sequence[Json], mapping: dict[str, str]) -> None:
    """Give each ExplanationOfBenefit its claim: the Claim entry its `claim` reference names
    (by fullUrl), or `Claim/<id>` imported earlier. Its id becomes the claim id, and its own
    fullUrl maps to `ExplanationOfBenefit/<claim id>`."""
    by_url = {f"{p['type']}/{p['id']}": p for p in plans if p.get("claim") == CLAIM and "id" in p}
    for position, plan in enumerate(plans):
        if plan.get("claim") != EOB_RESOURCE:
            continue
        element = plan["resource"].get("claim")
        reference = element.get("reference") if isinstance(element, dict) else None
        if not isinstance(reference, str) or not reference:
            raise in_entry(
                business_rule("ExplanationOfBenefit.claim must name its Claim"), position
            )
        target = mapping.get(reference, reference)
        claim_plan = by_url.get(target)
        kind, _, claim_id = target.partition("/")
        if kind != CLAIM or not claim_id or "/" in claim_id:
            raise in_entry(
                business_rule(
                    f"ExplanationOfBenefit.claim {reference!r} is neither a Claim of this"
                    " transaction nor Claim/<id>"
                ),
                position,
            )
        if claim_plan is not None:
            if claim_plan.get("explained"):
                raise in_entry(
                    FhirError(409, "duplicate", f"{reference} has two ExplanationOfBenefits"),
                    position,
                )
            claim_plan["explained"] = plan
        else:
            plan["earlier_claim"] = True
        for url, value in list(mapping.items()):
            if value == f"{EOB_RESOURCE}/{plan['id']}":
                mapping[url] = f"{EOB_RESOURCE}/{claim_id}"
        plan["id"] = claim_id


def extract(client: RecordsClient, plans: Sequence[Json], payers: Mapping[str, str]) -> None:
    """Extract each Claim's billing summary and each ExplanationOfBenefit's decision from the
    validated resources (a 422 for the entry that cannot be imported), before anything is
    written."""
    organizations = client.ledger.query("/organizations", b"", list[Organization])
    insurers = frozenset(
        o.id
        for o in organizations
        if o.kind is OrganizationKind.INSURER and o.status is Status.ACTIVE
    )
    member: Member | None = None
    for position, plan in enumerate(plans):
        if plan.get("claim") != CLAIM:
            continue
        try:
            plan["content"] = extract_history_claim(plan["validated"].resource, payers, insurers)
        except ClaimError as exc:
            raise in_entry(business_rule(str(exc)), position) from None
    for position, plan in enumerate(plans):
        if plan.get("claim") != EOB_RESOURCE:
            continue
        if plan.get("earlier_claim"):
            member = member or client.ledger.query("/member", client.member_id, Member)
            claim = _earlier_claim(client, plan["id"], member, position)
            if claim.patient != plan["patient"]:
                raise in_entry(
                    business_rule("the ExplanationOfBenefit is about another patient"), position
                )
            items = claim.items
        else:
            claim_plan = next(p for p in plans if p.get("explained") is plan)
            if claim_plan["patient"] != plan["patient"]:
                raise in_entry(
                    business_rule("the ExplanationOfBenefit and its Claim name different patients"),
                    position,
                )
            items = claim_plan["content"].items
        try:
            plan["decision"] = extract_reported_decision(
                plan["validated"].resource, items, plan["record_id"]
            )
        except ClaimError as exc:
            raise in_entry(business_rule(str(exc)), position) from None


def _earlier_claim(client: RecordsClient, claim_id: str, member: Member, position: int) -> Claim:
    try:
        claim: Claim = client.ledger.query("/claim", claim_id, Claim)
    except QueryError:
        raise in_entry(business_rule(f"Claim/{claim_id} is not on the ledger"), position) from None
    if not claim.imported or claim.provider != member.organization:
        raise in_entry(
            FhirError(
                403,
                "forbidden",
                f"Claim/{claim_id} is not a claim {member.organization} imported; its payer"
                " decides it",
            ),
            position,
        )
    if claim.outcome is not None:
        raise in_entry(
            FhirError(409, "conflict", f"Claim/{claim_id} is already {claim.status}"), position
        )
    return claim


def supporting(plan: Json, plans: Sequence[Json]) -> tuple[str, ...]:
    """The records of this transaction (of the claim's patient) that a Claim refers to."""
    records = {
        f"{p['type']}/{p['id']}": str(p["id"])
        for p in plans
        if p.get("patient") == plan["patient"]
        and not p.get("claim")
        and not p.get("directory")
        and not p.get("existing")
        and p["type"] != "Patient"
    }
    found = dict.fromkeys(records[r] for r in references_in(plan["resource"]) if r in records)
    return tuple(found)[:MAX_SUPPORTING]


def history_claims(plans: Sequence[Json]) -> list[HistoryClaim]:
    """The transaction's Claims and ExplanationOfBenefits to import (the new patients' ids
    already in the plans)."""
    found = []
    for plan in plans:
        patient = str(plan.get("patient", ""))
        if plan.get("claim") == CLAIM:
            explained = plan.get("explained")
            found.append(
                HistoryClaim(
                    claim_id=plan["id"],
                    patient=patient,
                    claim=plan["validated"],
                    content=plan["content"],
                    record_id=plan["record_id"],
                    supporting=supporting(plan, plans),
                    eob=explained["validated"] if explained else None,
                    eob_record_id=explained["record_id"] if explained else "",
                    decision=explained.get("decision") if explained else None,
                )
            )
        elif plan.get("claim") == EOB_RESOURCE and plan.get("earlier_claim"):
            found.append(
                HistoryClaim(
                    claim_id=plan["id"],
                    patient=patient,
                    claim=None,
                    content=None,
                    eob=plan["validated"],
                    eob_record_id=plan["record_id"],
                    decision=plan.get("decision"),
                )
            )
    return found


def result(base: str, plan: Json, claim: Claim) -> Json:
    """The transaction-response entry of a Claim or ExplanationOfBenefit."""
    kind = plan["claim"]
    version = len(claim.history) if kind == EOB_RESOURCE else 1
    response: Json = {
        "status": "201 Created",
        "location": f"{kind}/{claim.id}/_history/{version}",
        "etag": f'W/"{version}"',
    }
    notes: list[str] = list(plan["content"].notes) if kind == CLAIM else []
    if kind == CLAIM and claim.payer:
        notes.append(f"the payer {claim.payer!r} is outside the network (no [claims] payers entry)")
    if kind == EOB_RESOURCE and plan.get("decision") is None:
        notes.append("the ExplanationOfBenefit's outcome is not complete: no decision recorded")
    if notes:
        response["outcome"] = operation_outcome(
            [issue("information", "informational", note) for note in notes]
        )
    return {"fullUrl": f"{base}/{kind}/{claim.id}", "response": response}


def claims_of(client: RecordsClient, plans: Sequence[Json]) -> dict[str, Claim]:
    """The committed claims of the transaction's Claim and ExplanationOfBenefit entries."""
    ids = dict.fromkeys(str(p["id"]) for p in plans if p.get("claim"))
    claims = ClaimsClient(client)
    return {claim_id: claims.show(claim_id) for claim_id in ids}
