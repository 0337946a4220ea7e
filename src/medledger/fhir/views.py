"""Views of the ledger as FHIR resources: Consent, AuditEvent (proven against signed headers)
and Provenance."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

from medledger.client.records import (
    ProvenAuditEntry,
)
from medledger.client.sdk import ClientError
from medledger.fhir.outcome import (
    FhirError,
    invalid,
    not_found,
)
from medledger.fhir.plumbing import (
    ACT_REASON,
    CATEGORY_SYSTEM,
    CONSENT_IS_THE_PATIENTS,
    DCM,
    LEDGER_EXTENSION,
    PURPOSE_CODES,
    RESOURCE_TYPES_SYSTEM,
    ROLE_SYSTEM,
    TX_ACTIONS,
    TX_TYPE_SYSTEM,
    VERIFY_EXTENSION,
    Caller,
    Json,
    member_reference,
)
from medledger.fhir.search import (
    PATIENT,
    SearchError,
    metadata_matches,
    parse_search,
    reference_id,
    reference_type,
    rfc3339,
    sort_items,
)
from medledger.fhir.writing import Writing
from medledger.ledger import codec
from medledger.ledger.consent import (
    Consent,
    ConsentStatus,
    GranteeKind,
    ScopeKind,
)
from medledger.ledger.errors import Code
from medledger.ledger.records import (
    RecordVersion,
    record_key,
)


class Views(Writing):
    # --- Consent ---------------------------------------------------------------------------

    def consent_resource(self, caller: Caller, consent: Consent) -> Json:
        grantee: Json
        if consent.grantee_kind is GranteeKind.ORGANIZATION:
            grantee = {"reference": f"Organization/{consent.grantee}"}
        elif consent.grantee_kind is GranteeKind.ROLE:
            grantee = {
                "identifier": {"system": ROLE_SYSTEM, "value": consent.grantee},
                "display": f"every member in the role {consent.grantee}",
            }
        else:
            grantee = {
                "reference": member_reference(consent.grantee, caller.lookup(consent.grantee))
            }
        provision: Json = {
            "type": "permit",
            "period": {"start": rfc3339(consent.start_ns), "end": rfc3339(consent.end_ns)},
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "IRCP",
                                "display": "information recipient",
                            }
                        ]
                    },
                    "reference": grantee,
                }
            ],
            "purpose": [
                {"system": ACT_REASON, "code": PURPOSE_CODES[p], "display": p.value}
                for p in consent.purposes
            ],
        }
        if consent.scope_kind is ScopeKind.RESOURCE_TYPES:
            provision["class"] = [
                {"system": RESOURCE_TYPES_SYSTEM, "code": t} for t in consent.scope
            ]
        elif consent.scope_kind is ScopeKind.CATEGORIES:
            provision["code"] = [
                {"coding": [{"system": CATEGORY_SYSTEM, "code": c}]} for c in consent.scope
            ]
        elif consent.scope_kind is ScopeKind.RECORDS:
            data = []
            for record_id in consent.scope:
                history = self.history(caller, record_id)
                kind = history.versions[0].resource_type if history and history.versions else None
                reference: Json = (
                    {"reference": f"{kind}/{record_id}"}
                    if kind
                    else {"identifier": {"system": "urn:medledger:record", "value": record_id}}
                )
                data.append({"meaning": "instance", "reference": reference})
            provision["data"] = data
        granted = self.block_time(caller, consent.granted_height)
        ledger: list[Json] = [{"url": "grantedHeight", "valueInteger": consent.granted_height}]
        changed = granted
        if consent.status is ConsentStatus.REVOKED:
            ledger.append({"url": "revokedHeight", "valueInteger": consent.revoked_height})
            if consent.revoke_reason:
                ledger.append({"url": "revokeReason", "valueString": consent.revoke_reason})
            changed = self.block_time(caller, consent.revoked_height)
        resource: Json = {
            "resourceType": "Consent",
            "id": consent.id,
            "meta": {"versionId": "2" if consent.status is ConsentStatus.REVOKED else "1"},
            "status": "inactive" if consent.status is ConsentStatus.REVOKED else "active",
            "scope": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                        "code": "patient-privacy",
                    }
                ]
            },
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://loinc.org",
                            "code": "59284-0",
                            "display": "Patient Consent",
                        }
                    ]
                }
            ],
            "patient": {"reference": f"Patient/{consent.patient}"},
            "performer": [
                {"reference": member_reference(consent.grantor, caller.lookup(consent.grantor))}
            ],
            "policyRule": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
                ]
            },
            "provision": provision,
            "extension": [{"url": LEDGER_EXTENSION, "extension": ledger}],
        }
        if granted is not None:
            resource["dateTime"] = rfc3339(granted)
        if changed is not None:
            resource["meta"]["lastUpdated"] = rfc3339(changed)
        return resource

    def block_time(self, caller: Caller, height: int) -> int | None:
        try:
            return int(caller.client.ledger.query("/block", str(height))["time_ns"])
        except (ClientError, KeyError, ValueError, TypeError):
            return None

    def consent_search(self, caller: Caller, params: list[tuple[str, str]]) -> Json:
        try:
            query = parse_search("Consent", params, strict=caller.strict)
        except SearchError as exc:
            raise invalid(str(exc)) from None
        patients = self.patients_for(caller, query.by(PATIENT))
        if patients is None:
            raise invalid("Consent search needs patient")
        consents: list[Consent] = []
        for patient in sorted(patients):
            consents.extend(self.consents_of(caller, patient, {}))
        ids = query.named("_id")
        now = datetime.now(UTC)
        resources = [
            self.consent_resource(caller, c)
            for c in consents
            if all(metadata_matches(i, c.id, 0, "", now) for i in ids)
        ]
        matched = [r for r in resources if query.matches(r, now)]
        matched = sort_items(
            matched,
            query.sort,
            metadata=lambda r: (r["provision"]["period"]["start"], r["id"]),
            content=lambda r: r,
        )
        page = matched[query.offset : query.offset + query.count]
        entries = [self.entry("Consent", r["id"], r, "match") for r in page]
        return self.searchset(
            f"{self.base}/Consent",
            query.link_params(),
            query,
            len(matched),
            entries,
            self.notes(0, (), query.ignored),
        )

    def find_consent(self, caller: Caller, consent_id: str) -> Consent:
        patient = self.consent_patients.get(consent_id)
        candidates = [patient] if patient else self.organization_patients(caller)
        for candidate in candidates:
            for consent in self.consents_of(caller, candidate, {}):
                if consent.id == consent_id:
                    return consent
        raise not_found(f"Consent/{consent_id} is not known to this node")

    def consent_read(self, caller: Caller, consent_id: str) -> Json:
        return self.consent_resource(caller, self.find_consent(caller, consent_id))

    def refuse_consent_write(self, client_id: str, interaction: str) -> FhirError:
        """A consent is the patient's decision: the ledger takes a consent.grant or
        consent.revoke signed by the patient or their delegate only. A SMART client acts as a
        system member (an EHR or LIS integration), so the gateway never signs one for it, even
        for a patient whose keys this node holds in custody."""
        self.ctx.audit.record(
            client_id, "fhir.request", f"Consent.{interaction}", "refused", CONSENT_IS_THE_PATIENTS
        )
        return FhirError(403, "forbidden", CONSENT_IS_THE_PATIENTS)

    # --- AuditEvent ------------------------------------------------------------------------

    def audit_event(
        self, caller: Caller, proven: ProvenAuditEntry, height: int, app_hash: bytes
    ) -> Json:
        entry = proven.entry
        sender = member_reference(entry.sender, caller.lookup(entry.sender))
        if entry.code == Code.OK:
            outcome = "0"
        elif entry.code in (Code.ACCESS_DENIED, Code.UNAUTHORIZED):
            outcome = "4"
        else:
            outcome = "8"
        event: Json = {
            "resourceType": "AuditEvent",
            "id": f"ledger-{proven.index}",
            "type": {"system": DCM, "code": "110110", "display": "Patient Record"},
            "subtype": [{"system": TX_TYPE_SYSTEM, "code": entry.type}],
            "action": TX_ACTIONS.get(entry.type, "E"),
            "recorded": rfc3339(proven.time_ns),
            "outcome": outcome,
            "outcomeDesc": entry.log,
            "agent": [{"who": {"reference": sender}, "requestor": True}],
            "source": {
                "site": self.ctx.chain_id,
                "observer": {"display": f"medledger ledger {self.ctx.chain_id}"},
                "type": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                        "code": "4",
                        "display": "Application Server",
                    }
                ],
            },
            "entity": [
                {
                    "what": {"reference": f"Patient/{entry.subject}"},
                    "type": {
                        "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                        "code": "1",
                        "display": "Person",
                    },
                    "role": {
                        "system": "http://terminology.hl7.org/CodeSystem/object-role",
                        "code": "1",
                        "display": "Patient",
                    },
                }
            ],
            "extension": [
                {
                    "url": LEDGER_EXTENSION,
                    "extension": [
                        {"url": "auditIndex", "valueInteger": proven.index},
                        {"url": "height", "valueInteger": proven.height},
                        {"url": "txHash", "valueString": entry.tx_hash.hex()},
                        {"url": "provenAtHeight", "valueInteger": height},
                        {"url": "appHash", "valueString": app_hash.hex()},
                        {"url": "inclusionProofVerified", "valueBoolean": True},
                    ],
                }
            ],
        }
        return event

    def enrich_access(self, caller: Caller, event: Json, proven: ProvenAuditEntry) -> None:
        """What a granted access request or session disclosed: each record version as an
        entity, and the purpose of use."""
        try:
            if proven.granted_access:
                grants = [caller.client.grant(proven.grant_id)]
            elif proven.opened_session:
                session = caller.client.session(proven.grant_id)
                grants = [
                    grant
                    for c in session.records
                    if (grant := session.grant_for(c.record_id, c.version)) is not None
                ]
            else:
                return
        except ClientError:
            return
        for grant in grants:
            event["entity"].append(
                {
                    "what": {
                        "reference": (
                            f"{grant.resource_type}/{grant.record_id}/_history/{grant.version}"
                        )
                    },
                    "type": {
                        "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                        "code": "2",
                        "display": "System Object",
                    },
                }
            )
        if not grants:
            return
        reason = [{"system": ACT_REASON, "code": PURPOSE_CODES[grants[0].purpose]}]
        if grants[0].emergency:
            reason.append(
                {"system": ACT_REASON, "code": "ETREAT", "display": grants[0].emergency_reason}
            )
        event["purposeOfEvent"] = [{"coding": reason}]

    def audit_search(self, caller: Caller, params: list[tuple[str, str]]) -> Json:
        try:
            query = parse_search("AuditEvent", params, strict=caller.strict)
        except SearchError as exc:
            raise invalid(str(exc)) from None
        patients = self.patients_for(caller, query.by(PATIENT))
        if not patients:
            raise invalid("AuditEvent search needs patient")
        now = datetime.now(UTC)
        items: list[tuple[ProvenAuditEntry, Json]] = []
        for patient in sorted(patients):
            trail = caller.client.verified_audit_trail(patient)
            for proven in trail.entries:
                event = self.audit_event(caller, proven, trail.height, trail.header.app_hash)
                if query.matches(event, now):
                    items.append((proven, event))
        items = sort_items(
            items,
            query.sort or (),
            metadata=lambda i: (i[0].time_ns, f"{i[0].index:012d}"),
            content=lambda i: i[1],
        )
        page = items[query.offset : query.offset + query.count]
        for proven, event in page:
            self.enrich_access(caller, event, proven)
        entries = [self.entry("AuditEvent", e["id"], e, "match") for _, e in page]
        return self.searchset(
            f"{self.base}/AuditEvent",
            query.link_params(),
            query,
            len(items),
            entries,
            self.notes(0, (), query.ignored),
        )

    # --- Provenance ------------------------------------------------------------------------

    def provenance(self, caller: Caller, version: RecordVersion) -> Json:
        proof: list[Json] = []
        try:
            verified = caller.client.ledger.verified_state(
                record_key(version.record_id, version.version)
            )
            proven = codec.decode(verified.value, RecordVersion) if verified.value else None
            if proven is not None and proven.package_digest == version.package_digest:
                proof = [
                    {
                        "url": "stateKey",
                        "valueString": record_key(version.record_id, version.version).decode(),
                    },
                    {"url": "provenAtHeight", "valueInteger": verified.height},
                    {"url": "appHash", "valueString": verified.header.app_hash.hex()},
                    {"url": "stateProofVerified", "valueBoolean": True},
                ]
        except ClientError as exc:
            proof = [{"url": "stateProofError", "valueString": str(exc)}]
        author = caller.lookup(version.author)
        ledger = [
            {"url": "height", "valueInteger": version.height},
            {"url": "packageDigest", "valueString": version.package_digest},
            {
                "url": "commitment",
                "valueBase64Binary": base64.b64encode(version.commitment).decode(),
            },
            {"url": "status", "valueCode": version.status.value},
            {"url": "threshold", "valueInteger": version.threshold},
            {
                "url": "custodians",
                "valueString": ",".join(c.organization for c in version.custodians),
            },
            *proof,
        ]
        if version.status_reason:
            ledger.append({"url": "statusReason", "valueString": version.status_reason})
        return {
            "resourceType": "Provenance",
            "id": f"{version.record_id}-v{version.version}",
            "target": [
                {
                    "reference": f"{version.resource_type}/{version.record_id}"
                    f"/_history/{version.version}"
                }
            ],
            "recorded": rfc3339(version.time_ns),
            "activity": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                        "code": "CREATE" if version.version == 1 else "UPDATE",
                    }
                ]
            },
            "agent": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                "code": "author",
                            }
                        ]
                    },
                    "who": {"reference": member_reference(version.author, author)},
                    "onBehalfOf": {"reference": f"Organization/{version.author_organization}"},
                }
            ],
            "extension": [
                {"url": LEDGER_EXTENSION, "extension": ledger},
                {
                    "url": VERIFY_EXTENSION,
                    "valueString": "The author signed the ledger transaction that committed this"
                    " version at the height above; the package digest and commitment bind its"
                    " content. Re-check the whole chain with `medledger verify`, and this"
                    " version's content by reading it and comparing its keyed commitment.",
                },
            ],
        }

    def provenance_search(self, caller: Caller, params: list[tuple[str, str]]) -> Json:
        try:
            query = parse_search("Provenance", params, strict=caller.strict)
        except SearchError as exc:
            raise invalid(str(exc)) from None
        targets = query.named("target")
        if not targets and (query.by(PATIENT) or query.named("_id")):
            return self.search(caller, query)  # the Provenance records EHRs sent
        if not targets:
            raise invalid("Provenance search needs target=<Type>/<id> or patient=Patient/<id>")
        items: list[Json] = []
        for value in targets[0].values:
            kind = reference_type(value)
            record_id = reference_id(value)
            history = self.history(caller, record_id)
            if history is None or (kind and history.versions[0].resource_type != kind):
                continue
            items.extend(self.provenance(caller, v) for v in reversed(history.versions))
        page = items[query.offset : query.offset + query.count]
        entries = [self.entry("Provenance", p["id"], p, "match") for p in page]
        return self.searchset(
            f"{self.base}/Provenance",
            query.link_params(),
            query,
            len(items),
            entries,
            self.notes(0, (), query.ignored),
        )

    def provenance_read(self, caller: Caller, provenance_id: str) -> Json:
        record_id, _, number = provenance_id.rpartition("-v")
        history = self.history(caller, record_id) if number.isdigit() else None
        version = (
            next((v for v in history.versions if v.version == int(number)), None)
            if history
            else None
        )
        if version is None:
            raise not_found(f"Provenance/{provenance_id} is not known")
        return self.provenance(caller, version)
