"""`/consents/granted-to`: the consents that name a member, their organization or their role,
active and unexpired at the latest block ("patients who shared with me")."""

from __future__ import annotations

import msgspec
import pytest
from conftest import Consortium, keys_for

from medledger.abci.queries import answer
from medledger.crypto.keys import KeyPair
from medledger.ledger.consent import (
    SECOND_NS,
    Consent,
    GrantConsent,
    GranteeKind,
    Purpose,
    RevokeConsent,
    ScopeKind,
)
from medledger.ledger.errors import LedgerError
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember

DAY_NS = 86_400 * SECOND_NS


def _enroll(c: Consortium, org: str, name: str, role: Role) -> KeyPair:
    keys = keys_for(name)
    body = EnrollMember(keys.verify_key, keys.encryption_key, role)
    assert c.submit(c.admin(org), "member.enroll", body).ok
    return keys


def _grant(c: Consortium, patient: KeyPair, kind: GranteeKind, grantee: str, end_ns: int) -> str:
    now = c.chain.time_ns
    body = GrantConsent(
        patient.member_id, kind, grantee, ScopeKind.ALL, (), (Purpose.TREATMENT,), now, end_ns
    )
    result = c.submit(patient, "consent.grant", body)
    assert result.ok, result.log
    return result.log.split()[1]


def _granted_to(c: Consortium, member: str, organization: str, role: str) -> list[Consent]:
    data = msgspec.json.encode({"member": member, "organization": organization, "role": role})
    raw = answer(c.chain.store, "/consents/granted-to", data, False)
    return msgspec.json.decode(raw, type=list[Consent])


def test_consents_naming_me_my_organization_or_my_role(consortium: Consortium) -> None:
    c = consortium
    ana = _enroll(c, "st-mary", "ana", Role.PATIENT)
    ben = _enroll(c, "st-mary", "ben", Role.PATIENT)
    doctor = _enroll(c, "riverside", "dr-nadia", Role.CLINICIAN)
    other = _enroll(c, "riverside", "dr-other", Role.CLINICIAN)
    far = c.chain.time_ns + 30 * DAY_NS
    to_me = _grant(c, ana, GranteeKind.MEMBER, doctor.member_id, far)
    to_org = _grant(c, ben, GranteeKind.ORGANIZATION, "riverside", far)
    to_role = _grant(c, ben, GranteeKind.ROLE, "clinician", far)
    _grant(c, ana, GranteeKind.MEMBER, other.member_id, far)  # someone else
    _grant(c, ana, GranteeKind.ORGANIZATION, "careplus", far)  # another organization
    revoked = _grant(c, ben, GranteeKind.MEMBER, doctor.member_id, far)
    assert c.submit(ben, "consent.revoke", RevokeConsent(ben.member_id, revoked)).ok
    soon = _grant(c, ana, GranteeKind.MEMBER, doctor.member_id, c.chain.time_ns + 3 * SECOND_NS)

    found = _granted_to(c, doctor.member_id, "riverside", "clinician")
    assert {x.id for x in found} == {to_me, to_org, to_role, soon}
    # Once the short consent's end has passed at the latest block, it is no longer listed.
    for _ in range(3):
        c.run()
    found = _granted_to(c, doctor.member_id, "riverside", "clinician")
    assert {x.id for x in found} == {to_me, to_org, to_role}
    # Only the fields given are matched: no empty grantee matches anything.
    assert {x.id for x in _granted_to(c, doctor.member_id, "", "")} == {to_me}


def test_bad_query_data_is_refused(consortium: Consortium) -> None:
    with pytest.raises(LedgerError, match="bad query data"):
        answer(consortium.chain.store, "/consents/granted-to", b"not json", False)
