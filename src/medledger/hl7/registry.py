"""Patients registered from HL7 ADT on the ledger, as the FHIR gateway registers them: the
node's custodial EHR member (`[hl7] registration_member`, role ehr: the ledger lets an EHR
client enroll patients only) enrolls a new patient whose keys the node holds in custody, and
records the FHIR Patient under the patient's member id. Who may enroll, and what a Patient
record may hold, are the ledger's and the FHIR validator's rules; nothing is decided here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from medledger.client.records import RecordsClient
from medledger.client.sdk import ClientError
from medledger.crypto.package import PackageError
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember
from medledger.services.custody import Custody


class LedgerPatientRegistry:
    """A `PatientRegistry` acting as one custodial EHR member of the node: `client` gives
    the SDK client signing as that member (the FHIR context's `records_client(member)` on the
    node), `custody` is where new patients' keys are kept."""

    def __init__(self, client: Callable[[], RecordsClient], custody: Custody) -> None:
        self._client = client
        self._custody = custody

    def register(self, resource: dict[str, Any]) -> str:
        client = self._client()
        keys = self._custody.create(f"patient-{uuid.uuid4()}")
        body = EnrollMember(keys.verify_key, keys.encryption_key, Role.PATIENT)
        client.ledger.submit(client.keys, "member.enroll", body, sender=client.member_id)
        patient = keys.member_id
        client.put({**resource, "id": patient}, patient, patient)
        return patient

    def update(self, patient: str, resource: dict[str, Any]) -> bool:
        client = self._client()
        try:
            current = client.read_own(patient).resource
        except (ClientError, PackageError, ValueError):
            current = None
        if current == resource:
            return False
        client.amend(patient, resource)
        return True


__all__ = ["LedgerPatientRegistry"]
