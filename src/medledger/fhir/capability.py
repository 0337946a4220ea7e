"""The CapabilityStatement of a node's FHIR API, built from the tables the gateway serves from:
what it says is supported is what the gateway does, and nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medledger.fhir.include import REVINCLUDES, include_paths
from medledger.fhir.search import CONTENT, METADATA, PATIENT, SEARCH_PARAMS, SP, SearchParam

DIRECTORY_TYPES = frozenset({"Organization", "Practitioner", "PractitionerRole", "Location"})
# Where an identifier names one resource on the ledger: PUT <Type>?identifier=system|value.
CONDITIONAL_UPDATE_TYPES = frozenset({"Patient"} | DIRECTORY_TYPES)
FHIR_VERSION = "4.0.1"
SOFTWARE_VERSION = "0.1.0"
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
EVERYTHING = "http://hl7.org/fhir/OperationDefinition/Patient-everything"
BULK = "http://hl7.org/fhir/uv/bulkdata"
EXPORT = f"{BULK}/OperationDefinition/export"
PATIENT_EXPORT = f"{BULK}/OperationDefinition/patient-export"

# Interactions of resources stored as ledger records.
RECORD_INTERACTIONS = (
    "read",
    "vread",
    "update",
    "history-instance",
    "history-type",
    "create",
    "search-type",
    "delete",
)


@dataclass(frozen=True)
class ResourceSupport:
    """What the API offers for one resource type."""

    interactions: tuple[str, ...]
    documentation: str
    record: bool = True  # stored as an encrypted ledger record
    conditional_create: bool = False
    operations: tuple[tuple[str, str], ...] = ()
    search: tuple[SearchParam, ...] = ()  # for types outside the records' search table


_RECORD_DOC = (
    "Stored as an encrypted ledger record about the patient its subject/patient names (an"
    " enrolled patient, Patient/<ledger id>). Reads go through a ledger access request, key"
    " release and decryption."
)


def _claim_param(name: str, kind: str, definition: str, documentation: str) -> SearchParam:
    where = PATIENT if name == "patient" else METADATA
    return SearchParam(name, kind, (name,), SP + definition, documentation, where)


_CLAIM_PATIENT = (
    "Patient/<id>. Without patient (or _id, claim, request) a search lists the claims of the"
    " caller's organization, as provider or as insurer."
)
_CLAIM_STATUS = (
    "The FHIR financial status (every claim on the ledger is active) or the ledger's status"
    " (submitted, adjudicated, paid, appealed; system urn:medledger:claim-status)."
)
_CLAIM_DOC = (
    " Claims are on-chain objects without PHI (codes, dates, amounts, organizations, every step"
    " with its block); their FHIR Claim and ClaimResponse documents are encrypted records. Only"
    " the claim's patient, provider and insurer see a claim; a document is read through a ledger"
    " access request (purpose of use HPAYMT unless X-Purpose-Of-Use says otherwise) decided by"
    " the ledger's rules; a Claim or ClaimResponse search leaves out, and counts, the documents"
    " the caller may not read. Not available in batch or transaction Bundles."
)

_DIRECTORY_DOC = (
    "Directory data, not PHI: a signed on-chain entry (directory.put) that every node serves,"
    " owned by the organization that first wrote it (only its admins, practitioners and"
    " system clients write later versions). Conditional create (If-None-Exist /"
    " ifNoneExist: identifier=system|value) returns the entry holding the identifier; an"
    " identifier names one entry per type. Conditional references in a Bundle"
    " (<Type>?identifier=system|value) resolve to the entry, as HAPI FHIR resolves them."
    " DELETE marks the entry entered-in-error (its owner only) and releases its identifiers."
)

RESOURCES: Mapping[str, ResourceSupport] = {
    "Patient": ResourceSupport(
        RECORD_INTERACTIONS,
        "Patient.id is the patient's ledger member id. Create enrolls the patient (keys held in"
        " this node's custody), links each identifier in this node's patient index (never on"
        " the ledger) and stores the demographics as an encrypted record. Conditional create"
        " (If-None-Exist: identifier=system|value) returns the patient the identifier names.",
        conditional_create=True,
        operations=(("everything", EVERYTHING), ("export", PATIENT_EXPORT)),
    ),
    **{
        name: ResourceSupport(RECORD_INTERACTIONS, _RECORD_DOC)
        for name in (
            "Observation",
            "Condition",
            "MedicationRequest",
            "AllergyIntolerance",
            "Procedure",
            "Encounter",
            "DiagnosticReport",
            "Immunization",
            "DocumentReference",
            "CarePlan",
            "CareTeam",
            "Goal",
            "MedicationStatement",
            "ServiceRequest",
            "FamilyMemberHistory",
            "MedicationAdministration",
            "ImagingStudy",
            "SupplyDelivery",
            "Specimen",
            "Coverage",
            "MedicationDispense",
            "QuestionnaireResponse",
            "RelatedPerson",
        )
    },
    "Device": ResourceSupport(
        RECORD_INTERACTIONS,
        "A Device that names its patient (Device.patient, e.g. an implant) is an encrypted"
        " record of that patient; one without a patient is directory data, a signed on-chain"
        " entry every node serves. Search with patient lists the patient's Devices, without"
        " it the directory's.",
    ),
    "Medication": ResourceSupport(
        RECORD_INTERACTIONS,
        "A Medication bound to a patient by context — created in a transaction Bundle"
        " together with the patient's records that refer to it (MedicationRequest.medication"
        "Reference, MedicationAdministration, ...) — is stored as an encrypted record of that"
        " patient; one that records of two patients refer to is refused (422). A Medication"
        " no patient's record refers to (created on its own) is directory data: a signed"
        " on-chain entry every node serves, as Organization is. Search without patient lists"
        " the directory's Medications.",
    ),
    **{
        name: ResourceSupport(
            ("read", "vread", "update", "create", "search-type", "delete"),
            _DIRECTORY_DOC,
            record=False,
            conditional_create=True,
        )
        for name in ("Organization", "Practitioner", "PractitionerRole", "Location")
    },
    "Consent": ResourceSupport(
        ("read", "search-type"),
        "The ledger's consents, read-only here. A consent is the patient's: only the patient or"
        " their delegate grants or revokes one, signed with their own keys (the portal, or"
        " `medledger consent grant` / `revoke` and the SDK with their own keystore). Create,"
        " update and delete by a SMART system client (EHR, LIS) — also in a batch or"
        " transaction Bundle — answer 403 with an OperationOutcome saying so, even for a"
        " patient whose keys this node holds in custody.",
        record=False,
    ),
    "AuditEvent": ResourceSupport(
        ("search-type",),
        "The ledger's audit log for a patient (transactions and access decisions, no PHI),"
        " each entry proven by Merkle inclusion against the validators' signed header. A"
        " granted access names the record version and the purpose of use.",
        record=False,
    ),
    "Provenance": ResourceSupport(
        ("read", "vread", "create", "update", "history-instance", "search-type", "delete"),
        "Two kinds. The ledger's own: one Provenance per record version (id <record>-v<n>):"
        " author, organization, block time and height, package digest and commitment, with the"
        " version's state proof checked against the validators' signed header; found with"
        " target=<Type>/<id> and _revinclude=Provenance:target. And a Provenance an EHR sends"
        " (Synthea ends each bundle with one): stored as an encrypted record of the one"
        " patient its targets are about (a target Patient, or the patient of each target"
        " record); targets about two patients are refused (422); found with patient=.",
    ),
    "Claim": ResourceSupport(
        ("read", "create", "search-type"),
        "Claim.id is the ledger's claim id; meta.tag carries the claim's ledger status."
        + _CLAIM_DOC
        + " POST submits a claim to a network insurer (claim.submit: billing codes of the"
        " network's table, Claim.insurer an insurer organization) by a billing or clinician"
        " member or the EHR system client of the provider. In a transaction Bundle, a Claim is"
        " a claim of the provider's history (claim.import): its source's codes are kept, its"
        " payer is a network insurer (Claim.insurer, or the node's [claims] payers table) or"
        " one outside the network by name, and the ExplanationOfBenefit beside it is the"
        " payer's decision, recorded as reported by the provider.",
        record=False,
        search=(
            _claim_param("_id", "token", "Resource-id", "The claim id."),
            _claim_param("patient", "reference", "Claim-patient", _CLAIM_PATIENT),
            _claim_param("provider", "reference", "Claim-provider", "Organization/<id>."),
            _claim_param("insurer", "reference", "Claim-insurer", "Organization/<id>."),
            _claim_param("status", "token", "Claim-status", _CLAIM_STATUS),
        ),
    ),
    "ClaimResponse": ResourceSupport(
        ("read", "search-type"),
        "One per decision (ClaimResponse.id is its record id); meta.tag says whether it is the"
        " claim's current decision or was superseded after an appeal." + _CLAIM_DOC,
        record=False,
        search=(
            _claim_param("_id", "token", "Resource-id", "The ClaimResponse's record id."),
            _claim_param("patient", "reference", "ClaimResponse-patient", _CLAIM_PATIENT),
            _claim_param("request", "reference", "ClaimResponse-request", "Claim/<claim id>."),
            _claim_param("insurer", "reference", "ClaimResponse-insurer", "Organization/<id>."),
            _claim_param("requestor", "reference", "ClaimResponse-requestor", "Organization/<id>."),
            _claim_param("status", "token", "ClaimResponse-status", "active."),
        ),
    ),
    "ExplanationOfBenefit": ResourceSupport(
        ("read", "create", "search-type"),
        "One per claim (id = the claim id), built from the claim's on-chain state — items with"
        " their submitted, eligible and benefit amounts and adjustment reasons, payment, and the"
        " whole processing history as processNote and extension — and from its Claim and latest"
        " ClaimResponse documents where the ledger lets the caller read them. Created (in a"
        " transaction beside its Claim, or by POST for a claim the provider imported earlier)"
        " it is the payer's decision on an imported claim, kept as an encrypted record."
        + _CLAIM_DOC,
        record=False,
        search=(
            _claim_param("_id", "token", "Resource-id", "The claim id."),
            _claim_param("patient", "reference", "ExplanationOfBenefit-patient", _CLAIM_PATIENT),
            _claim_param("claim", "reference", "ExplanationOfBenefit-claim", "Claim/<claim id>."),
            _claim_param(
                "provider", "reference", "ExplanationOfBenefit-provider", "Organization/<id>."
            ),
            _claim_param("status", "token", "ExplanationOfBenefit-status", _CLAIM_STATUS),
        ),
    ),
}

RECORD_TYPES = frozenset(name for name, support in RESOURCES.items() if support.record)

SYSTEM_DOC = (
    "FHIR R4 (4.0.1) over a permissioned ledger. Resources are validated with R4B (4.3.0)"
    " models, identical to R4 for these resources. JSON only (application/fhir+json or"
    " application/json). Authentication: SMART Backend Services (private_key_jwt client"
    " assertion at the token endpoint; system/ scopes). Every read is a ledger access request"
    " decided by consent and audited; the purpose of use is the X-Purpose-Of-Use header"
    " (v3-ActReason TREAT, HPAYMT, HOPERAT, HRESCH; default TREAT). Unknown search parameters"
    " are refused unless Prefer: handling=lenient. Search results leave out records the caller"
    " may not read and say how many in an OperationOutcome entry. Type-level _history takes"
    " patient (or _id), _since, _count; without them it lists the records the caller's"
    " organization authored about patients it enrolled, as search does. By default one request"
    " examines at most 200 candidate records and issues at most 50 access requests (a batch's"
    " entries together): a page holds at most 50 resources, and a search that must decrypt"
    " more (a content criterion) is refused (422, issue too-costly) before any access request"
    " is issued: narrow it by patient. Bodies are JSON of at most 16 MiB (413) nesting at most"
    " 64 levels (400). At most 2 unfinished $export jobs per client (429); an export file is"
    " dropped once"
    " downloaded. DELETE <Type>/<id> never removes anything: it marks a record's latest version"
    " entered-in-error (record.mark-error, by a member of the author's organization only;"
    " others get 403) and a directory entry entered-in-error (its organization only),"
    " which stay readable in their history with meta.tag urn:medledger:record-status"
    " entered-in-error; erasure (GDPR Art. 17) is the patient's record.erase. Conditional"
    " update (PUT <Type>?identifier=system|value, alone or in a transaction) on Patient and the"
    " directory types, where an identifier names one resource: the one it names is updated,"
    " else the body is created. Not supported: update as create, patch, conditional update on"
    " other types, conditional delete, chained parameters, _elements, XML."
    " _include takes the reference parameters of each type (searchInclude); _revinclude takes"
    " Provenance:target (the ledger's Provenance of each matched record version)."
)


def capability_statement(base_url: str, token_url: str, date: str) -> dict[str, Any]:
    resources = []
    for name, support in RESOURCES.items():
        entry: dict[str, Any] = {
            "type": name,
            "documentation": support.documentation,
            "interaction": [{"code": code} for code in support.interactions],
        }
        if support.record:
            entry.update(
                {
                    "versioning": "versioned-update",
                    "readHistory": True,
                    "updateCreate": False,
                    "conditionalCreate": support.conditional_create,
                    "conditionalRead": "not-supported",
                    "conditionalUpdate": name in CONDITIONAL_UPDATE_TYPES,
                    "conditionalDelete": "not-supported",
                }
            )
        elif support.conditional_create:
            entry["conditionalCreate"] = True
        if name in CONDITIONAL_UPDATE_TYPES:
            entry["conditionalUpdate"] = True
        params = SEARCH_PARAMS.get(name) or {p.name: p for p in support.search}
        if "search-type" in support.interactions and (support.record or name in DIRECTORY_TYPES):
            paths = include_paths(name)
            if paths:
                entry["searchInclude"] = [f"{name}:{p}" for p in sorted(paths)]
            if support.record:
                entry["searchRevInclude"] = sorted(REVINCLUDES)
        if "search-type" in support.interactions and params:
            entry["searchParam"] = [
                {
                    "name": p.name,
                    "definition": p.definition,
                    "type": p.type,
                    "documentation": f"{p.documentation} [{_where(p.where)}]",
                }
                for p in params.values()
            ]
        if support.operations:
            entry["operation"] = [
                {"name": op, "definition": definition} for op, definition in support.operations
            ]
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "id": "medledger",
        "url": f"{base_url}/metadata",
        "version": SOFTWARE_VERSION,
        "name": "MedledgerNodeFhirApi",
        "title": "medledger node FHIR R4 API",
        "status": "active",
        "experimental": False,
        "date": date,
        "publisher": "medledger",
        "kind": "instance",
        "instantiates": [f"{BULK}/CapabilityStatement/bulk-data"],
        "software": {"name": "medledger", "version": SOFTWARE_VERSION},
        "implementation": {"description": "medledger node FHIR API", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": SYSTEM_DOC,
                "security": {
                    "cors": False,
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/"
                                    "restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ]
                        }
                    ],
                    "description": "SMART Backend Services: POST a client_credentials grant"
                    " with a JWT client assertion to the token endpoint.",
                    "extension": [
                        {"url": OAUTH_URIS, "extension": [{"url": "token", "valueUri": token_url}]}
                    ],
                },
                "resource": resources,
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
                "searchParam": [
                    {
                        "name": "_count",
                        "type": "number",
                        "documentation": "Page size (default 20, at most 100; 0 gives the total).",
                    },
                    {
                        "name": "_page",
                        "type": "number",
                        "documentation": "Paging position; follow the Bundle's next/previous"
                        " links rather than building it.",
                    },
                    {
                        "name": "_sort",
                        "type": "string",
                        "documentation": "_lastUpdated, _id or a date parameter of the type"
                        " (date means the type's clinical date); - for descending.",
                    },
                ],
                "operation": [
                    {"name": "everything", "definition": EVERYTHING},
                    {"name": "export", "definition": EXPORT},
                ],
            }
        ],
    }


def smart_configuration(token_url: str) -> dict[str, Any]:
    """`.well-known/smart-configuration` for backend services."""
    return {
        "token_endpoint": token_url,
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["EdDSA", "ES256", "ES384"],
        "scopes_supported": ["system/*.cruds", "system/*.rs"],
        "capabilities": ["client-confidential-asymmetric"],
    }


def _where(where: str) -> str:
    return {
        PATIENT: "selects candidates from the ledger's index",
        METADATA: "decided from ledger metadata",
        CONTENT: "decided on the decrypted content",
    }[where]
