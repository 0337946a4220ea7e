"""The FHIR R4 REST API of a node, over the ledger.

Every request but the CapabilityStatement and the token endpoint carries a SMART Backend
Services bearer token; its scopes must allow the interaction (401 without a valid token, 403
outside the scopes, both in the node's audit log). The token's member is the custodial system
member (an EHR or LIS integration) that acts: the gateway never bypasses the ledger —

- a write validates the resource, seals it (fresh data key, envelopes to patient and author,
  threshold shares to the custodian nodes), uploads the package and commits the record;
- a read is a ledger access request that the ledger decides by its rules and audits, then key
  shares from t custodians, decryption and verification against the on-chain commitment.
  Decrypted resources are kept in memory (never on disk) for the life of their grant and only
  while the grant would still release keys (a revoked consent ends it at once).

A record's FHIR id is its ledger record id; meta.versionId is the ledger version,
meta.lastUpdated the block time of that version, the ETag W/"<version>". Patient.id is the
patient's ledger member id. Consent, AuditEvent and Provenance are views of the ledger's
consents, audit log and record metadata. Every error is an OperationOutcome.
"""

from __future__ import annotations

from aiohttp import web

from medledger.fhir.bundles import Bundles


class FhirGateway(Bundles):
    """The FHIR facade of a node: each concern in its module (reading, searching, writing,
    bundles, views), one object per node."""


GATEWAY = web.AppKey("fhir_gateway", FhirGateway)
