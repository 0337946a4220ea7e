"""`medledger import fhir`: FHIR Bundles from files (Synthea-style patient bundles, one or many)
into a node's FHIR API, as a SMART Backend Services client.

The client signs a JWT assertion with its private key (a private JWK or a PEM key of a client
registered on the ledger with `medledger client register`), gets an access token from the
node's token endpoint (found through `.well-known/smart-configuration`) and posts each bundle as
FHIR transactions. A bundle of type transaction, batch or collection is taken entry by entry;
each entry becomes a `POST` of its resource type (the server assigns ids), with its fullUrl as
a `urn:uuid:` so the server resolves the references between entries of a transaction.

A transaction holds at most 1,000 entries (the ledger's `record.put-many` limit; 500 by
default, `--chunk-size`, which keeps a Synthea patient Bundle whole), so a larger bundle is
split: its Patients come first, and every entry after
the entries it references (reference cycles are broken in file order). References into an
earlier transaction are rewritten before sending: the patient element (subject, patient) of a
resource whose Patient was committed earlier becomes the conditional reference
`Patient?identifier=system|value` of the patient's first identifier, which the gateway
resolves through this node's patient index (or `Patient/<id>` when the patient has no
identifier); every other reference becomes the `<Type>/<id>` the earlier transaction assigned.

Directory resources (Organization, Practitioner, PractitionerRole, Location: Synthea's hospital
and practitioner support bundles) are imported like records, with their ifNoneExist conditions;
load the support bundles first, so that the patient bundles' conditional references
(`Organization?identifier=...`) resolve to them. Nothing is dropped silently. Entries of
resource types the server does not store (its CapabilityStatement offers no create: Claim,
ExplanationOfBenefit, ...) are not sent and are reported per type; references to them are left
as the file wrote them. A transaction is all or nothing: when the server refuses one entry (an
invalid resource, a duplicate patient identifier), that entry is reported with the server's
reason and the rest of the transaction is sent again without it; the records of a Patient that
could not be imported are reported as failed too. A transaction the server answers with a 5xx
is reported as failed and not sent again, since it may have been committed before the answer
failed. Records are never deleted from the ledger, so importing the same file twice is refused
for its patients (their identifiers are already taken).

Exit codes: 0 every importable entry was imported (unsupported ones are reported), 1 at least
one file or entry failed, 2 a usage error.
"""

from __future__ import annotations

import copy
import heapq
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from medledger.cli.hl7 import import_group
from medledger.fhir.plumbing import patient_element as gateway_patient_element
from medledger.ledger.clients import JWK_ALGORITHMS
from medledger.ledger.records import MAX_RECORDS_PER_TX

Json = dict[str, Any]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FHIR_JSON = "application/fhir+json"
MAX_ENTRIES = MAX_RECORDS_PER_TX  # the ledger's record.put-many limit; the gateway enforces it
# Entries per transaction by default: a whole Synthea patient Bundle (250-400 entries), and
# well inside MAX_ENTRIES so that one record.put-many stays under the chain's max_tx_bytes
# however long the organization and member ids are.
DEFAULT_ENTRIES = 500
IMPORTABLE_BUNDLES = ("transaction", "batch", "collection")
ENTRY_POSITION = re.compile(r"Bundle\.entry\[(\d+)\]")
ENTRY_PREFIX = re.compile(r"Bundle\.entry\[\d+\](\.resource)?:?\s*")
# Refusals about one entry: the rest of the transaction is sent again without it.
ENTRY_STATUSES = frozenset({400, 403, 404, 409, 410, 412, 422})
# Answers that say the transaction was not processed, so sending it again is safe. Others
# (a 5xx) may come after the ledger committed it: those are reported, never sent again.
TRANSIENT_STATUSES = frozenset({429})
TRANSIENT_RETRIES = 3
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:medledger:import:fhir")


class BundleImportError(Exception):
    """A file or the server cannot be used as asked; the message says why."""


# --- SMART Backend Services client ---------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    key: Any  # a cryptography private key object
    algorithm: str
    kid: str | None


def load_signing_key(path: Path) -> SigningKey:
    """A private key as a JWK (JSON with its "d") or PEM (PKCS#8 or traditional, unencrypted):
    Ed25519 (EdDSA), EC P-256 (ES256) or P-384 (ES384) — what the ledger registers."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace").strip()
    kid: str | None = None
    if text.startswith("{"):
        try:
            jwk = json.loads(text)
        except ValueError as exc:
            raise BundleImportError(f"{path}: not a JWK: {exc}") from None
        if not isinstance(jwk, dict) or "d" not in jwk:
            raise BundleImportError(f"{path}: the JWK must be a private key (with its 'd')")
        algorithm = JWK_ALGORITHMS.get((str(jwk.get("kty")), str(jwk.get("crv"))))
        if algorithm is None:
            raise BundleImportError(f"{path}: key type must be OKP/Ed25519, EC/P-256 or EC/P-384")
        try:
            key = jwt.PyJWK(jwk, algorithm=algorithm).key
        except jwt.PyJWTError as exc:
            raise BundleImportError(f"{path}: not a usable JWK: {exc}") from None
        kid = jwk.get("kid") if isinstance(jwk.get("kid"), str) else None
        return SigningKey(key, algorithm, kid)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleImportError(
            f"{path}: not an unencrypted PEM private key or JWK: {exc}"
        ) from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return SigningKey(key, "EdDSA", None)
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in ("secp256r1", "secp384r1"):
        return SigningKey(key, "ES256" if key.curve.name == "secp256r1" else "ES384", None)
    raise BundleImportError(f"{path}: key type must be Ed25519, EC P-256 or EC P-384")


class SmartClient:
    """Access tokens for one registered client, renewed before they expire."""

    def __init__(
        self, http: httpx.Client, base: str, client_id: str, key: SigningKey, scope: str
    ) -> None:
        self.http = http
        self.base = base.rstrip("/")
        self.client_id = client_id
        self.key = key
        self.scope = scope
        self._token = ""
        self._expires = 0.0
        self._token_url: str | None = None

    @property
    def token_url(self) -> str:
        if self._token_url is None:
            url = f"{self.base}/auth/token"
            try:
                answer = self.http.get(f"{self.base}/.well-known/smart-configuration")
                if answer.status_code == 200:
                    url = str(answer.json().get("token_endpoint") or url)
            except (httpx.HTTPError, ValueError):
                pass
            self._token_url = url
        return self._token_url

    def assertion(self) -> str:
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "exp": now + 240,
            "jti": str(uuid.uuid4()),
        }
        headers = {"kid": self.key.kid} if self.key.kid else None
        return jwt.encode(claims, self.key.key, algorithm=self.key.algorithm, headers=headers)

    def token(self, *, renew: bool = False) -> str:
        if renew or not self._token or self._expires - time.monotonic() < 30:
            form = {
                "grant_type": "client_credentials",
                "scope": self.scope,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": self.assertion(),
            }
            try:
                answer = self.http.post(self.token_url, data=form)
            except httpx.HTTPError as exc:
                raise BundleImportError(
                    f"cannot reach the token endpoint {self.token_url}: {exc}"
                ) from None
            try:
                body = answer.json()
            except ValueError:
                body = {}
            if answer.status_code != 200 or "access_token" not in body:
                reason = body.get("error_description") or body.get("error") or answer.text
                raise BundleImportError(f"no access token (HTTP {answer.status_code}): {reason}")
            self._token = str(body["access_token"])
            self._expires = time.monotonic() + float(body.get("expires_in", 60))
        return self._token

    def headers(self, *, renew: bool = False) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.token(renew=renew)}",
            "Accept": FHIR_JSON,
            "Content-Type": FHIR_JSON,
        }


def creatable_types(http: httpx.Client, base: str) -> frozenset[str]:
    """The resource types the server's CapabilityStatement offers `create` on."""
    try:
        answer = http.get(f"{base.rstrip('/')}/metadata", headers={"Accept": FHIR_JSON})
        statement = answer.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise BundleImportError(f"cannot read {base}/metadata: {exc}") from None
    if answer.status_code != 200 or statement.get("resourceType") != "CapabilityStatement":
        raise BundleImportError(
            f"{base}/metadata is not a CapabilityStatement (HTTP {answer.status_code})"
        )
    return frozenset(
        str(resource.get("type"))
        for rest in statement.get("rest") or []
        for resource in rest.get("resource") or []
        if any(i.get("code") == "create" for i in resource.get("interaction") or [])
    )


# --- planning: which entries, in which order, in which transaction ---------------------------


@dataclass
class Entry:
    """A bundle entry to import: its resource with the references to other entries of the
    bundle written as their `key` (the urn:uuid fullUrl it is sent with)."""

    position: int
    key: str
    resource_type: str
    resource: Json
    source_full_url: str | None
    source_id: str | None
    refs: frozenset[str]  # keys of the entries it references
    patient: str | None  # key of the Patient entry its patient element references
    if_none_exist: str | None = None


@dataclass(frozen=True)
class Skipped:
    position: int
    resource_type: str
    source_full_url: str | None
    reason: str
    unsupported: bool  # the server does not store the type (else: the entry is unusable)


@dataclass
class BundlePlan:
    bundle_type: str
    entries: list[Entry]  # in sending order
    skipped: list[Skipped]
    chunks: list[list[Entry]]
    warnings: list[str]
    identifiers: dict[str, tuple[str, str]]  # Patient key -> its first system|value identifier

    @property
    def total(self) -> int:
        return len(self.entries) + len(self.skipped)


def patient_element(resource_type: str) -> str | None:
    """The element that names a record's patient (as the gateway resolves it)."""
    if resource_type == "Patient":
        return None
    return gateway_patient_element(resource_type)


def references(value: Any) -> Iterator[str]:
    """Every Reference.reference string in a resource."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                yield item
            else:
                yield from references(item)
    elif isinstance(value, list):
        for item in value:
            yield from references(item)


def rewrite(value: Any, mapping: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {
            key: (
                mapping[item]
                if key == "reference" and isinstance(item, str) and item in mapping
                else rewrite(item, mapping)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [rewrite(item, mapping) for item in value]
    return value


def first_identifier(resource: Mapping[str, Any]) -> tuple[str, str] | None:
    for identifier in resource.get("identifier") or []:
        if (
            isinstance(identifier, dict)
            and isinstance(identifier.get("system"), str)
            and isinstance(identifier.get("value"), str)
            and identifier["system"]
            and identifier["value"]
        ):
            return identifier["system"], identifier["value"]
    return None


def _aliases(full_url: str | None, resource: Mapping[str, Any]) -> list[str]:
    """The strings a reference to this entry may be written as: its fullUrl and, for a
    resource with an id, `<Type>/<id>` (also the tail of an absolute fullUrl)."""
    names = [full_url] if full_url else []
    resource_type, resource_id = resource.get("resourceType"), resource.get("id")
    if isinstance(resource_id, str) and resource_id:
        names.append(f"{resource_type}/{resource_id}")
    if full_url and not full_url.startswith("urn:"):
        tail = "/".join(full_url.rstrip("/").split("/")[-2:])
        if tail.count("/") == 1:
            names.append(tail)
    return names


def plan_bundle(
    bundle: Any, supported: Collection[str], chunk_size: int = MAX_ENTRIES
) -> BundlePlan:
    """Which entries of `bundle` are sent, in which order and in which transactions."""
    if not 1 <= chunk_size <= MAX_ENTRIES:
        raise ValueError(f"chunk_size must be 1..{MAX_ENTRIES}")
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise BundleImportError("not a FHIR Bundle")
    bundle_type = str(bundle.get("type"))
    if bundle_type not in IMPORTABLE_BUNDLES:
        raise BundleImportError(
            f"Bundle.type {bundle_type!r}: import takes {', '.join(IMPORTABLE_BUNDLES)} bundles"
        )
    raw = bundle.get("entry") or []
    if not isinstance(raw, list):
        raise BundleImportError("Bundle.entry is not a list")
    skipped: list[Skipped] = []
    skipped_names: set[str] = set()
    kept: list[tuple[int, Json, Json, str | None]] = []
    for position, entry in enumerate(raw):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        full_url = entry.get("fullUrl") if isinstance(entry, dict) else None
        full_url = full_url if isinstance(full_url, str) and full_url else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            skipped.append(Skipped(position, "?", full_url, "the entry has no resource", False))
            continue
        resource_type = resource["resourceType"]
        request = entry.get("request")
        method = str(request.get("method", "POST")).upper() if isinstance(request, dict) else ""
        reason = ""
        if bundle_type != "collection" and method not in ("POST", "PUT"):
            reason = f"request.method {method or 'missing'}: only POST and PUT entries import"
        elif resource_type not in supported:
            reason = f"the server does not store {resource_type} resources"
        if reason:
            unsupported = resource_type not in supported
            skipped.append(Skipped(position, resource_type, full_url, reason, unsupported))
            skipped_names.update(_aliases(full_url, resource))
            continue
        kept.append((position, entry, resource, full_url))

    # Each kept entry's key, and what references to it may look like.
    alias: dict[str, str] = {}
    keys: list[str] = []
    for position, _, resource, full_url in kept:
        if full_url and full_url.startswith("urn:uuid:"):
            key = full_url
        else:
            name = full_url or f"{resource['resourceType']}/{resource.get('id', position)}"
            key = f"urn:uuid:{uuid.uuid5(_NAMESPACE, f'{position}|{name}')}"
        keys.append(key)
        for name in _aliases(full_url, resource):
            alias.setdefault(name, key)
    kinds = {key: item[2]["resourceType"] for key, item in zip(keys, kept, strict=True)}
    warnings: list[str] = []
    entries: list[Entry] = []
    for key, (position, entry, resource, full_url) in zip(keys, kept, strict=True):
        resource_type = resource["resourceType"]
        body = rewrite(copy.deepcopy(resource), alias)
        body.pop("id", None)
        meta = body.get("meta")
        if isinstance(meta, dict):
            meta = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
            if meta:
                body["meta"] = meta
            else:
                del body["meta"]
        refs = frozenset(r for r in references(body) if r in kinds and r != key)
        for target in references(body):
            if target in skipped_names:
                warnings.append(
                    f"entry {position} ({resource_type}) refers to {target}, which is not imported"
                )
        element = patient_element(resource_type)
        patient: str | None = None
        if element is not None:
            ref = body.get(element)
            # A list for Provenance.target: the Patient among the targets.
            for item in ref if isinstance(ref, list) else [ref]:
                named = item.get("reference") if isinstance(item, dict) else None
                if isinstance(named, str) and kinds.get(named) == "Patient":
                    patient = named
                    break
        request = entry.get("request")
        condition = request.get("ifNoneExist") if isinstance(request, dict) else None
        entries.append(
            Entry(
                position,
                key,
                resource_type,
                body,
                full_url,
                resource.get("id") if isinstance(resource.get("id"), str) else None,
                refs,
                patient,
                condition if isinstance(condition, str) and condition else None,
            )
        )
    ordered = dependency_order(entries)
    chunks = [ordered[i : i + chunk_size] for i in range(0, len(ordered), chunk_size)]
    chunk_of = {e.key: n for n, chunk in enumerate(chunks) for e in chunk}
    for entry in ordered:
        for ref in sorted(entry.refs):
            if chunk_of[ref] > chunk_of[entry.key]:
                warnings.append(
                    f"entry {entry.position} ({entry.resource_type}) refers to {ref} in a later"
                    " transaction (a reference cycle): that reference stays unresolved"
                )
    identifiers = {
        e.key: found
        for e in entries
        if e.resource_type == "Patient" and (found := first_identifier(e.resource)) is not None
    }
    return BundlePlan(bundle_type, ordered, skipped, chunks, warnings, identifiers)


def dependency_order(entries: Sequence[Entry]) -> list[Entry]:
    """Patients first, then every entry after the entries it references, otherwise in file
    order; a reference cycle is broken at its first entry in that order."""
    by_key = {e.key: e for e in entries}
    waiting = {e.key: {r for r in e.refs if r in by_key} for e in entries}
    referrers: dict[str, list[str]] = {}
    for key, deps in waiting.items():
        for dep in deps:
            referrers.setdefault(dep, []).append(key)

    def rank(entry: Entry) -> tuple[int, int]:
        return (entry.resource_type != "Patient", entry.position)

    ready = [(rank(e), e.key) for e in entries if not waiting[e.key]]
    heapq.heapify(ready)
    done: set[str] = set()
    ordered: list[Entry] = []
    while len(ordered) < len(entries):
        if not ready:
            # Every entry left waits on a cycle: walk the references from the first one
            # until an entry repeats, and break the cycle found at its first entry.
            walk: list[str] = []
            key = min((e for e in entries if e.key not in done), key=rank).key
            while key not in walk:
                walk.append(key)
                key = min(waiting[key], key=lambda k: rank(by_key[k]))
            stuck = min((by_key[k] for k in walk[walk.index(key) :]), key=rank)
            waiting[stuck.key].clear()
            heapq.heappush(ready, (rank(stuck), stuck.key))
        _, key = heapq.heappop(ready)
        if key in done:
            continue
        done.add(key)
        ordered.append(by_key[key])
        for referrer in referrers.get(key, []):
            deps = waiting[referrer]
            if key in deps:
                deps.discard(key)
                if not deps and referrer not in done:
                    heapq.heappush(ready, (rank(by_key[referrer]), referrer))
    return ordered


def conditional_patient(identifier: tuple[str, str]) -> str:
    """`Patient?identifier=system|value`, its value URL-encoded."""
    system, value = identifier
    return "Patient?identifier=" + quote(f"{system}|{value}", safe=":/|-._~")


def transaction_bundle(
    entries: Sequence[Entry],
    assigned: Mapping[str, str],
    identifiers: Mapping[str, tuple[str, str]],
) -> Json:
    """The transaction for `entries`: references to entries committed by an earlier
    transaction (`assigned`: key → `<Type>/<id>`) rewritten, the patient element as a
    conditional identifier reference where the Patient has an identifier."""
    out = []
    for entry in entries:
        resource = rewrite(copy.deepcopy(entry.resource), assigned)
        element = patient_element(entry.resource_type)
        if (
            element is not None
            and entry.patient is not None
            and entry.patient in assigned
            and entry.patient in identifiers
            and isinstance(resource.get(element), dict)
        ):
            resource[element]["reference"] = conditional_patient(identifiers[entry.patient])
        request: Json = {"method": "POST", "url": entry.resource_type}
        if entry.if_none_exist:
            request["ifNoneExist"] = entry.if_none_exist
        out.append({"fullUrl": entry.key, "resource": resource, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": out}


def entry_position(outcome: Any) -> int | None:
    """Which Bundle.entry an OperationOutcome is about, if it says."""
    if not isinstance(outcome, dict):
        return None
    for item in outcome.get("issue") or []:
        texts = [str(item.get("diagnostics", "")), *map(str, item.get("expression") or [])]
        for text in texts:
            found = ENTRY_POSITION.search(text)
            if found:
                return int(found.group(1))
    return None


def outcome_text(answer: httpx.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return f"HTTP {answer.status_code}: {answer.text[:300]}"
    issues = body.get("issue") if isinstance(body, dict) else None
    if isinstance(issues, list) and issues:
        texts = [str(i.get("diagnostics") or i.get("code")) for i in issues if isinstance(i, dict)]
        return f"HTTP {answer.status_code}: {'; '.join(texts)}"
    return f"HTTP {answer.status_code}: {answer.text[:300]}"


# --- importing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Imported:
    position: int
    source_full_url: str | None
    source_id: str | None
    resource_type: str
    id: str


@dataclass(frozen=True)
class Failed:
    position: int
    source_full_url: str | None
    resource_type: str
    reason: str


@dataclass
class FileReport:
    path: str
    bundle_type: str | None = None
    entries: int = 0
    transactions: int = 0
    imported: list[Imported] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    def as_json(self) -> Json:
        return {
            "path": self.path,
            "bundleType": self.bundle_type,
            "entries": self.entries,
            "transactions": self.transactions,
            "imported": [
                {
                    "position": i.position,
                    "fullUrl": i.source_full_url,
                    "sourceId": i.source_id,
                    "resourceType": i.resource_type,
                    "id": i.id,
                }
                for i in self.imported
            ],
            "notImported": [
                {
                    "position": s.position,
                    "fullUrl": s.source_full_url,
                    "resourceType": s.resource_type,
                    "reason": s.reason,
                    "unsupported": s.unsupported,
                }
                for s in self.skipped
            ],
            "failed": [
                {
                    "position": f.position,
                    "fullUrl": f.source_full_url,
                    "resourceType": f.resource_type,
                    "reason": f.reason,
                }
                for f in self.failed
            ],
            "warnings": self.warnings,
            "error": self.error,
        }


class Importer:
    """Sends the transactions of one bundle plan after another."""

    def __init__(
        self,
        http: httpx.Client,
        smart: SmartClient,
        base: str,
        advance: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.http = http
        self.smart = smart
        self.base = base.rstrip("/")
        self.advance = advance

    def run(self, plan: BundlePlan, report: FileReport) -> None:
        report.bundle_type = plan.bundle_type
        report.entries = plan.total
        report.skipped.extend(plan.skipped)
        report.warnings.extend(plan.warnings)
        self.advance(len(plan.skipped))
        assigned: dict[str, str] = {}
        lost: dict[str, str] = {}  # Patient key -> why it was not imported
        for chunk in plan.chunks:
            self.send(plan, chunk, assigned, lost, report)

    def fail(self, report: FileReport, entry: Entry, reason: str) -> None:
        report.failed.append(
            Failed(entry.position, entry.source_full_url, entry.resource_type, reason)
        )
        self.advance(1)

    def post(self, bundle: Json) -> httpx.Response:
        renewed = False
        attempt = 0
        while True:
            try:
                answer = self.http.post(
                    self.base, content=json.dumps(bundle), headers=self.smart.headers(renew=False)
                )
            except httpx.TimeoutException:
                raise BundleImportError(
                    "the server did not answer in time (the transaction may have been committed)"
                ) from None
            except httpx.HTTPError as exc:
                raise BundleImportError(f"cannot reach {self.base}: {exc}") from None
            if answer.status_code == 401 and not renewed:
                self.smart.token(renew=True)
                renewed = True
                continue
            if answer.status_code in TRANSIENT_STATUSES and attempt < TRANSIENT_RETRIES:
                attempt += 1
                time.sleep(float(answer.headers.get("Retry-After", 2 * attempt)))
                continue
            return answer

    def send(
        self,
        plan: BundlePlan,
        entries: list[Entry],
        assigned: dict[str, str],
        lost: dict[str, str],
        report: FileReport,
    ) -> None:
        pending: list[Entry] = []
        for entry in entries:
            if entry.patient is not None and entry.patient in lost:
                self.fail(report, entry, f"its Patient was not imported ({lost[entry.patient]})")
            else:
                pending.append(entry)
        while pending:
            bundle = transaction_bundle(pending, assigned, plan.identifiers)
            try:
                answer = self.post(bundle)
            except BundleImportError as exc:
                for entry in pending:
                    self.lose(entry, str(exc), lost)
                    self.fail(report, entry, str(exc))
                return
            if answer.status_code == 200:
                report.transactions += 1
                self.accept(pending, answer, assigned, report)
                return
            if answer.status_code == 413 and len(pending) > 1:
                half = len(pending) // 2
                self.send(plan, pending[:half], assigned, lost, report)
                self.send(plan, pending[half:], assigned, lost, report)
                return
            reason = outcome_text(answer)
            try:
                outcome = answer.json()
            except ValueError:
                outcome = None
            position = entry_position(outcome)
            if (
                answer.status_code in ENTRY_STATUSES
                and position is not None
                and 0 <= position < len(pending)
            ):
                bad = pending.pop(position)
                # Said of its place in this transaction; the report gives its place in the file.
                reason = ENTRY_PREFIX.sub("", reason)
                self.lose(bad, reason, lost)
                self.fail(report, bad, reason)
                if bad.resource_type == "Patient":
                    why = f"its Patient was not imported ({reason})"
                    for entry in [e for e in pending if e.patient == bad.key]:
                        pending.remove(entry)
                        self.fail(report, entry, why)
                continue
            for entry in pending:
                self.lose(entry, reason, lost)
                self.fail(report, entry, reason)
            return

    def lose(self, entry: Entry, reason: str, lost: dict[str, str]) -> None:
        if entry.resource_type == "Patient":
            lost[entry.key] = reason

    def accept(
        self,
        entries: Sequence[Entry],
        answer: httpx.Response,
        assigned: dict[str, str],
        report: FileReport,
    ) -> None:
        results = answer.json().get("entry") or []
        for entry, result in zip(entries, results, strict=False):
            location = str((result.get("response") or {}).get("location", ""))
            parts = location.split("/")
            if len(parts) < 2:
                self.fail(report, entry, f"the server answered no location ({location!r})")
                continue
            assigned[entry.key] = f"{parts[0]}/{parts[1]}"
            report.imported.append(
                Imported(
                    entry.position,
                    entry.source_full_url,
                    entry.source_id,
                    entry.resource_type,
                    parts[1],
                )
            )
            self.advance(1)
        for entry in entries[len(results) :]:
            self.fail(report, entry, "the server's transaction-response has no entry for it")


# --- the command ----------------------------------------------------------------------------


def bundle_files(paths: Sequence[Path]) -> list[Path]:
    """The files named, and the *.json files of the directories named (sorted)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.glob("*.json") if p.is_file()))
        else:
            found.append(path)
    return found


def load_plan(path: Path, supported: Collection[str], chunk_size: int) -> BundlePlan:
    try:
        bundle = json.loads(path.read_bytes())
    except OSError as exc:
        raise BundleImportError(f"cannot read it: {exc}") from None
    except ValueError as exc:
        raise BundleImportError(f"not JSON: {exc}") from None
    return plan_bundle(bundle, supported, chunk_size)


@import_group.command("fhir")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--fhir",
    "base",
    required=True,
    help="The node's FHIR base URL, e.g. http://127.0.0.1:26601/fhir.",
)
@click.option("--client-id", required=True, help="The SMART client registered on the ledger.")
@click.option(
    "--key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The client's private key: a private JWK (JSON) or an unencrypted PEM.",
)
@click.option(
    "--scope",
    default="system/*.c",
    show_default=True,
    help="Scopes to ask for (space-separated); creating records needs c on their types.",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(1, MAX_ENTRIES),
    default=DEFAULT_ENTRIES,
    show_default=True,
    help="Entries per transaction.",
)
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds per call.")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the outcome as JSON here: every entry's source fullUrl and new id.",
)
def import_fhir(
    paths: tuple[Path, ...],
    base: str,
    client_id: str,
    key_file: Path,
    scope: str,
    chunk_size: int,
    timeout: float,
    report_path: Path | None,
) -> None:
    """Import FHIR Bundles (transaction, batch or collection; Synthea-style patient bundles)
    from PATHS (files, or directories of *.json) through a node's FHIR API."""
    started = time.monotonic()
    base = base.rstrip("/")
    try:
        key = load_signing_key(key_file)
    except BundleImportError as exc:
        raise click.UsageError(str(exc)) from None
    files = bundle_files(paths)
    if not files:
        raise click.UsageError("no bundle files (*.json) found")
    reports: list[FileReport] = []
    err = Console(stderr=True)
    with httpx.Client(timeout=timeout) as http:
        smart = SmartClient(http, base, client_id, key, scope)
        try:
            supported = creatable_types(http, base)
            smart.token()
        except BundleImportError as exc:
            raise click.ClickException(str(exc)) from None
        plans: list[tuple[FileReport, BundlePlan | None]] = []
        for path in files:
            report = FileReport(str(path))
            try:
                plans.append((report, load_plan(path, supported, chunk_size)))
            except BundleImportError as exc:
                report.error = str(exc)
                plans.append((report, None))
            reports.append(report)
        total = sum(plan.total for _, plan in plans if plan is not None)
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("resources"),
            TimeElapsedColumn(),
            console=err,
            transient=False,
        ) as progress:
            task = progress.add_task("importing", total=total)
            importer = Importer(http, smart, base, lambda n: progress.advance(task, n))
            for report, plan in plans:
                if plan is None:
                    continue
                progress.update(task, description=f"importing {Path(report.path).name}")
                importer.run(plan, report)
            progress.update(task, description="imported")
    elapsed = time.monotonic() - started
    summary(reports, elapsed)
    if report_path is not None:
        report_path.write_text(
            json.dumps(
                {
                    "files": [r.as_json() for r in reports],
                    "totals": totals(reports),
                    "elapsedSeconds": round(elapsed, 3),
                },
                indent=2,
            ),
            encoding="utf-8",
        )
    if any(r.error or r.failed for r in reports):
        raise SystemExit(1)


def totals(reports: Sequence[FileReport]) -> Json:
    imported = Counter(i.resource_type for r in reports for i in r.imported)
    unsupported = Counter(s.resource_type for r in reports for s in r.skipped if s.unsupported)
    failed = Counter(f.resource_type for r in reports for f in r.failed) + Counter(
        s.resource_type for r in reports for s in r.skipped if not s.unsupported
    )
    return {
        "files": len(reports),
        "filesFailed": sum(1 for r in reports if r.error),
        "patients": imported.get("Patient", 0),
        "imported": sum(imported.values()),
        "notSupported": sum(unsupported.values()),
        "failed": sum(failed.values()),
        "transactions": sum(r.transactions for r in reports),
        "byType": {
            t: {
                "imported": imported.get(t, 0),
                "notSupported": unsupported.get(t, 0),
                "failed": failed.get(t, 0),
            }
            for t in sorted(set(imported) | set(unsupported) | set(failed))
        },
    }


def summary(reports: Sequence[FileReport], elapsed: float) -> None:
    console = Console(width=120)
    counts = totals(reports)
    files = Table(title="Files", title_justify="left")
    for column in ("file", "bundle", "entries", "transactions", "imported", "not imported"):
        files.add_column(column, justify="left" if column in ("file", "bundle") else "right")
    for r in reports:
        files.add_row(
            r.path,
            r.bundle_type or f"error: {r.error}",
            str(r.entries),
            str(r.transactions),
            str(len(r.imported)),
            str(len(r.skipped) + len(r.failed)),
        )
    console.print(files)
    types = Table(title="Resources by type", title_justify="left")
    for column in ("type", "imported", "not supported", "failed"):
        types.add_column(column, justify="left" if column == "type" else "right")
    for name, row in counts["byType"].items():
        types.add_row(name, str(row["imported"]), str(row["notSupported"]), str(row["failed"]))
    types.add_row(
        "total",
        str(counts["imported"]),
        str(counts["notSupported"]),
        str(counts["failed"]),
        style="bold",
    )
    console.print(types)
    problems: dict[tuple[str, str, str], list[int]] = {}
    for r in reports:
        for s in r.skipped:
            if not s.unsupported:
                problems.setdefault((r.path, s.resource_type, s.reason), []).append(s.position)
        for f in r.failed:
            problems.setdefault((r.path, f.resource_type, f.reason), []).append(f.position)
    if problems:
        failures = Table(title="Failures", title_justify="left")
        for column in ("file", "type", "count", "entries (position in the file)", "reason"):
            failures.add_column(column, justify="right" if column == "count" else "left")
        for (path, resource_type, reason), positions in problems.items():
            shown = ", ".join(map(str, positions[:6])) + (", ..." if len(positions) > 6 else "")
            failures.add_row(path, resource_type, str(len(positions)), shown, reason)
        console.print(failures)
    for r in reports:
        if r.error:
            console.print(f"{r.path}: not imported: {r.error}")
    unsupported = Counter(s.resource_type for r in reports for s in r.skipped if s.unsupported)
    if unsupported:
        listed = ", ".join(f"{n} {t}" for t, n in sorted(unsupported.items()))
        console.print(f"Not imported, the server does not store these types: {listed}")
    warnings = [w for r in reports for w in r.warnings]
    if warnings:
        console.print(f"{len(warnings)} warning(s); the first: {warnings[0]}")
    console.print(
        f"{counts['files']} file(s), {counts['patients']} patient(s), {counts['imported']}"
        f" resources imported in {counts['transactions']} transaction(s),"
        f" {counts['notSupported']} not supported, {counts['failed']} failed,"
        f" in {elapsed:.1f}s"
    )
