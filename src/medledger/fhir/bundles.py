"""Transaction and batch Bundles: a transaction's entries are planned, then written in one
`record.put-bundle` (with the Bundle's directory entries and claims); a batch's entries are
independent."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgspec

from medledger.client.claims import ClaimsClient
from medledger.client.records import (
    RecordWrite,
)
from medledger.client.sdk import ClientError, LedgerClient
from medledger.crypto.keys import KeyPair
from medledger.fhir.capability import (
    RECORD_TYPES,
    RESOURCES,
)
from medledger.fhir.claim_history import (
    HISTORY_TYPES,
    claims_of,
    extract,
    history_claims,
    link_explanations,
    plan_entry,
    result,
)
from medledger.fhir.directory import (
    DIRECTORY_ONLY_TYPES,
    NON_PATIENT_SUBJECTS,
    existing_entry,
    identifiers_of,
    is_directory_data,
    new_write,
    read_entry,
    resolve_references,
)
from medledger.fhir.include import Inclusions, referenced, split_inclusions
from medledger.fhir.outcome import (
    FhirError,
    business_rule,
    from_client,
    from_validation,
    invalid,
    issue,
    not_supported,
    operation_outcome,
    status_line,
)
from medledger.fhir.plumbing import (
    CONTEXT_BOUND_TYPES,
    WRITE_INTERACTIONS,
    Caller,
    Json,
    Reply,
    context_patient,
    etag,
    in_entry,
    parse_etag,
    references_in,
    rewrite_references,
)
from medledger.fhir.search import (
    PATIENT,
    SearchError,
    parse_search,
    reference_type,
    rfc3339,
)
from medledger.fhir.views import Views
from medledger.ledger.bundle import PutBundle
from medledger.ledger.directory import (
    DIRECTORY_TYPES,
)
from medledger.ledger.model import Role
from medledger.ledger.records import (
    MAX_RECORDS_PER_TX,
)
from medledger.ledger.transactions import EnrollMember
from medledger.validation import (
    FhirValidationError,
    validate_resource,
    with_references_renamed,
)


def fits_in_a_transaction(ledger: LedgerClient, body: PutBundle) -> bool:
    """Whether `body`, with a quarter of the chain's max_tx_bytes left for directory entries
    and the envelope, fits in one transaction."""
    max_tx_bytes = int(ledger.query("/params")["max_tx_bytes"])
    return len(msgspec.msgpack.encode(body)) <= max_tx_bytes * 3 // 4


class Bundles(Views):
    # --- transaction and batch -------------------------------------------------------------

    def transaction(self, caller: Caller, bundle: Json) -> Json:
        """All entries validated, references to the bundle's fullUrls resolved, new patients
        enrolled, then every record, directory entry and claim committed in one
        `record.put-bundle` (all or none)."""
        entries = bundle.get("entry") or []
        if not isinstance(entries, list) or not entries:
            raise invalid("a transaction needs at least one entry")
        if len(entries) > MAX_RECORDS_PER_TX:
            raise FhirError(
                413, "too-costly", f"a transaction holds at most {MAX_RECORDS_PER_TX} entries"
            )
        mapping: dict[str, str] = {}
        plans: list[Json] = []
        directory = self.directory(caller)
        entry_types = {
            str(e["fullUrl"]): str(e["resource"].get("resourceType"))
            for e in entries
            if isinstance(e, dict)
            and isinstance(e.get("fullUrl"), str)
            and isinstance(e.get("resource"), dict)
        }
        for position, entry in enumerate(entries):
            where = f"Bundle.entry[{position}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
                raise invalid(f"{where} needs a request", [where])
            request = entry["request"]
            method = str(request.get("method", "")).upper()
            url = str(request.get("url", "")).strip("/")
            resource = entry.get("resource")
            full_url = entry.get("fullUrl")
            if method == "PUT" and "?" in url:
                # A conditional update: of what the identifier names, else a create.
                kind, _, condition = url.partition("?")
                self.require_scope(caller, kind, "u")
                try:
                    target = self.conditional_target(caller, kind, condition)
                except FhirError as exc:
                    raise in_entry(exc, position) from None
                if not isinstance(resource, dict):
                    raise invalid(f"{where} needs a resource", [where])
                if target is None:
                    method, url = "POST", kind
                    request = {**request, "ifNoneExist": condition}
                    resource = {k: v for k, v in resource.items() if k != "id"}
                else:
                    url = f"{kind}/{target}"
                    resource = {**resource, "id": target}
            if url.split("/")[0].split("?")[0] == "Consent" and method in WRITE_INTERACTIONS:
                refusal = self.refuse_consent_write(
                    caller.token.client_id, WRITE_INTERACTIONS[method]
                )
                raise in_entry(refusal, position)
            if method == "POST":
                resource_type = url.split("?")[0]
                self.require_scope(caller, resource_type, "c")
                resource = self.incoming(resource_type, resource, in_transaction=True)
                plan: Json = {"method": "POST", "type": resource_type, "resource": resource}
                condition = request.get("ifNoneExist")
                if resource_type in HISTORY_TYPES:
                    plan.update(plan_entry(resource_type))
                elif is_directory_data(resource_type, resource, entry_types):
                    if resource_type != "Medication":  # bound to a patient by context, maybe
                        plan["directory"] = True
                    found = (
                        existing_entry(directory, resource_type, str(condition))
                        if condition
                        else None
                    )
                    if found is not None:
                        plan.update(id=found.entry_id, existing=True, directory=True)
                    else:
                        plan["id"] = str(uuid.uuid4())
                elif resource_type == "Patient":
                    condition = request.get("ifNoneExist")
                    existing = self.conditional_patient(condition) if condition else None
                    if existing is not None:
                        plan.update(id=existing, existing=True)
                    else:
                        plan.update(id=f"pending-{position}", pending=True)
                else:
                    plan["id"] = str(uuid.uuid4())
            elif method == "PUT":
                resource_type, _, record_id = url.partition("/")
                self.require_scope(caller, resource_type, "u")
                resource = self.incoming(resource_type, resource)
                if resource.get("id") != record_id:
                    raise invalid(f"{where}: the resource's id must be {record_id!r}", [where])
                if self.in_directory(caller, resource_type, record_id):
                    current = read_entry(directory, resource_type, record_id)
                    if request.get("ifMatch") and parse_etag(str(request["ifMatch"])) != (
                        current.version
                    ):
                        raise FhirError(
                            412, "conflict", f"{where}: {url} is at version {current.version}"
                        )
                    plan = {
                        "method": "PUT",
                        "type": resource_type,
                        "resource": resource,
                        "id": record_id,
                        "previous": current.version,
                        "directory": True,
                    }
                    if isinstance(full_url, str) and full_url:
                        mapping[full_url] = f"{resource_type}/{record_id}"
                    plans.append(plan)
                    continue
                history = self.history(caller, record_id)
                if history is None or history.versions[0].resource_type != resource_type:
                    raise not_supported(
                        f"{where}: {url} does not exist (update as create is not supported)"
                    )
                if history.head.erased:
                    raise FhirError(410, "deleted", f"{where}: {url} was erased")
                latest = history.head.latest
                if request.get("ifMatch") and parse_etag(str(request["ifMatch"])) != latest:
                    raise FhirError(412, "conflict", f"{where}: {url} is at version {latest}")
                plan = {
                    "method": "PUT",
                    "type": resource_type,
                    "resource": resource,
                    "id": record_id,
                    "previous": latest,
                    "patient": history.head.patient,
                }
            else:
                raise invalid(f"{where}: a transaction here takes POST and PUT entries", [where])
            if isinstance(full_url, str) and full_url:
                mapping[full_url] = f"{plan['type']}/{plan['id']}"
            plans.append(plan)

        link_explanations(plans, mapping)
        pending = {p["id"] for p in plans if p.get("pending")}
        local: dict[tuple[str, str], str] = {}
        for position, plan in enumerate(plans):
            if plan.get("pending"):
                for identifier in self.identifiers(plan["resource"]):
                    if identifier in local:
                        raise in_entry(
                            FhirError(
                                409,
                                "duplicate",
                                f"identifier {'|'.join(identifier)} names two new patients",
                            ),
                            position,
                        )
                    local[identifier] = plan["id"]
        if pending:
            self.require_registration_desk(caller)
        # Conditional references name the transaction's new directory entries first.
        named: dict[tuple[str, str], str] = {}
        for plan in plans:
            if plan["type"] in DIRECTORY_TYPES and not plan.get("existing"):
                for system_value in identifiers_of(plan["resource"]):
                    named.setdefault((plan["type"], system_value), plan["id"])
        committed: dict[tuple[str, str], str | None] = {}  # looked up once per transaction
        # Each entry's checks in order, then every entry validated at once (in worker processes
        # for a large Bundle); the first failure by position is the answer, as if each entry
        # had been validated right after its checks.
        stopped: tuple[int, Exception] | None = None
        for position, plan in enumerate(plans):
            try:
                plan["resource"] = resolve_references(
                    rewrite_references(plan["resource"], mapping), directory, named, committed
                )
            except Exception as exc:
                stopped = (position, exc)
                break
            resource = plan["resource"]
            try:
                if plan.get("directory"):
                    resource["id"] = plan["id"]
                elif plan["type"] == "Patient":
                    resource["id"] = plan["id"]
                    self.check_identifiers(resource, None if plan.get("pending") else plan["id"])
                    plan["patient"] = plan["id"]
                elif plan["type"] in CONTEXT_BOUND_TYPES:
                    if plan["method"] == "POST":
                        resource["id"] = plan["id"]
                        plan["context_bound"] = True  # its patient is decided below
                else:
                    if plan["method"] == "POST":
                        resource["id"] = plan["id"]
                    patient = self.resolve_patient(caller, resource, pending, local)
                    if plan["method"] == "PUT" and patient != plan["patient"]:
                        raise business_rule("a record cannot move to another patient")
                    plan["patient"] = patient
            except FhirValidationError as exc:
                stopped = (position, in_entry(from_validation(exc), position))
                break
            except FhirError as exc:
                stopped = (position, in_entry(exc, position))
                break
        checked = plans if stopped is None else plans[: stopped[0]]
        outcomes = self.ctx.validation.validate_many([p["resource"] for p in checked])
        for position, (plan, outcome) in enumerate(zip(checked, outcomes, strict=True)):
            if isinstance(outcome, FhirValidationError):
                raise in_entry(from_validation(outcome), position) from None
            plan["validated"] = outcome
        if stopped is not None:
            raise stopped[1] from None
        for position, plan in enumerate(plans):
            if plan.get("context_bound") and plan["type"] == "Provenance":
                try:
                    plan["patient"] = self.provenance_patient(caller, plan["resource"], plans)
                except FhirError as exc:
                    raise in_entry(exc, position) from None
            elif plan.get("context_bound"):
                key = f"{plan['type']}/{plan['id']}"
                if not any(
                    p.get("patient") and key in set(references_in(p["resource"])) for p in plans
                ):
                    plan["directory"] = True  # no patient's record is about it
                    continue
                try:
                    plan["patient"] = context_patient(key, plans)
                except FhirError as exc:
                    raise in_entry(exc, position) from None

        if any(p.get("claim") for p in plans):
            extract(caller.client, plans, self.ctx.payers)

        # Keys for the new patients, held in custody, then their real ids everywhere. They are
        # enrolled by the Bundle's own transaction (below).
        enrolled: dict[str, str] = {}
        new_patients: list[KeyPair] = []
        patient_keys: dict[str, bytes] = {}
        for plan in plans:
            if plan.get("pending"):
                keys = self.patient_keys_in_custody()
                enrolled[plan["id"]] = keys.member_id
                patient_keys[keys.member_id] = keys.encryption_key
                new_patients.append(keys)
        if enrolled:
            renames = {f"Patient/{old}": f"Patient/{new}" for old, new in enrolled.items()}
            for plan in plans:
                plan["resource"] = rewrite_references(plan["resource"], renames)
                for key in ("id", "patient"):
                    if key in plan:  # a directory entry has no patient
                        plan[key] = enrolled.get(plan[key], plan[key])
                if plan["type"] == "Patient":
                    plan["resource"]["id"] = plan["id"]
                if "validated" in plan:
                    renamed = rewrite_references(plan["validated"].resource, renames)
                    if plan["type"] == "Patient":
                        renamed["id"] = plan["id"]
                    plan["validated"] = with_references_renamed(plan["validated"], renamed)

        # One record.put-bundle: the directory entries, the records, the claims — all or none.
        # Directory entries too many for a quarter of a transaction go first in their own
        # directory.put batches, and claims more than one import holds follow in claim.import
        # transactions (each all or none).
        entry_writes = [
            new_write(p["resource"], p["id"], p.get("previous", 0))
            for p in plans
            if p.get("directory") and not p.get("existing")
        ]
        writes = [
            RecordWrite(
                p["validated"] if "validated" in p else validate_resource(p["resource"]),
                p["patient"],
                p["id"],
                p.get("previous", 0),
            )
            for p in plans
            if not p.get("existing") and not p.get("directory") and not p.get("claim")
        ]
        imports = ClaimsClient(caller.client).history_bodies(history_claims(plans), patient_keys)
        first, later = (imports[0], imports[1:]) if imports else (None, [])
        sealed = caller.client.seal_many(writes, patient_keys) if writes else []
        enrollments = tuple(
            EnrollMember(keys.verify_key, keys.encryption_key, Role.PATIENT)
            for keys in new_patients
        )
        if first is not None and not fits_in_a_transaction(
            caller.client.ledger, PutBundle(tuple(sealed), (), first, enrollments)
        ):
            first, later = None, imports
        bundled = bool(sealed or first) and directory.fits_with_records(entry_writes)
        if entry_writes and not bundled:
            directory.write(caller.client.keys, caller.client.member_id, entry_writes)
        if sealed or first:
            # The new patients, the directory entries, the records and the claims: one
            # transaction, so one block and all or nothing.
            done = caller.client.put_bundle(
                sealed, entry_writes if bundled else (), first, enrollments
            )
        else:
            done = []  # nothing to write, and no new patient (a new Patient is a record)
        ClaimsClient(caller.client).send_imports(later)
        claims = claims_of(caller.client, plans) if imports else {}
        for plan in plans:
            if plan["type"] == "Patient" and not plan.get("existing"):
                self.link_identifiers(plan["resource"], plan["id"])
        versions = {w.record_id: self.written(caller, w.record_id, w.version) for w in done}
        results = []
        for plan in plans:
            if plan.get("claim"):
                results.append(result(self.base, plan, claims[plan["id"]]))
                continue
            if plan.get("directory"):
                entry = read_entry(directory, plan["type"], plan["id"])
                status = 200 if plan.get("existing") or plan["method"] == "PUT" else 201
                results.append(
                    {
                        "fullUrl": f"{self.base}/{plan['type']}/{plan['id']}",
                        "response": {
                            "status": status_line(status),
                            "location": f"{plan['type']}/{plan['id']}/_history/{entry.version}",
                            "etag": etag(entry.version),
                            "lastModified": rfc3339(entry.time_ns),
                        },
                    }
                )
                continue
            if plan.get("existing"):
                history = caller.client.history(plan["id"])
                version = history.versions[-1]
                status = 200
            else:
                version = versions[plan["id"]]
                status = 201 if plan["method"] == "POST" else 200
            results.append(
                {
                    "fullUrl": f"{self.base}/{plan['type']}/{plan['id']}",
                    "response": {
                        "status": status_line(status),
                        "location": f"{plan['type']}/{plan['id']}/_history/{version.version}",
                        "etag": etag(version.version),
                        "lastModified": rfc3339(version.time_ns),
                    },
                }
            )
        return {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "transaction-response",
            "entry": results,
        }

    def batch(self, caller: Caller, bundle: Json) -> Json:
        """Each entry on its own, with its own response status."""
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            raise invalid("Bundle.entry must be a list")
        if len(entries) > MAX_RECORDS_PER_TX:
            raise FhirError(
                413, "too-costly", f"a batch holds at most {MAX_RECORDS_PER_TX} entries"
            )
        futures = [self.entries.submit(self.batch_entry, caller, e) for e in entries]
        results = []
        for future in futures:
            try:
                reply = future.result()
            except FhirError as exc:
                results.append({"response": {"status": exc.status_line, "outcome": exc.outcome}})
                continue
            response: Json = {"status": status_line(reply.status)}
            if "Location" in reply.headers:
                response["location"] = reply.headers["Location"].removeprefix(self.base + "/")
            if "ETag" in reply.headers:
                response["etag"] = reply.headers["ETag"]
            if (
                reply.body is not None
                and "meta" in reply.body
                and "lastUpdated" in reply.body["meta"]
            ):
                response["lastModified"] = reply.body["meta"]["lastUpdated"]
            result: Json = {"response": response}
            if reply.body is not None:
                result["resource"] = reply.body
            results.append(result)
        return {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "batch-response",
            "entry": results,
        }

    def batch_entry(self, caller: Caller, entry: Any) -> Reply:
        try:
            return self._batch_entry(caller, entry)
        except FhirValidationError as exc:
            raise from_validation(exc) from None
        except SearchError as exc:
            raise invalid(str(exc)) from None
        except ClientError as exc:
            raise from_client(exc) from None

    def _batch_entry(self, caller: Caller, entry: Any) -> Reply:
        if not isinstance(entry, dict) or not isinstance(entry.get("request"), dict):
            raise invalid("a batch entry needs a request")
        request = entry["request"]
        method = str(request.get("method", "")).upper()
        parts = urlsplit(str(request.get("url", "")))
        path = parts.path.strip("/")
        if path.startswith(self.base.split("://", 1)[-1].split("/", 1)[-1] + "/"):
            path = path.split("/", 1)[1]
        segments = [s for s in path.split("/") if s]
        params = parse_qsl(parts.query, keep_blank_values=True)
        if not segments:
            raise invalid("a batch entry's request.url names a resource type")
        resource_type = segments[0]
        known = resource_type in RESOURCES
        if not known:
            raise not_supported(f"{resource_type} is not supported", 404)
        if method == "GET":
            if len(segments) == 1:
                self.require_scope(caller, resource_type, "s")
                return Reply(200, self.search_type(caller, resource_type, params))
            if len(segments) == 3 and segments[2] == "$everything" and resource_type == "Patient":
                self.require_scope(caller, "Patient", "r")
                return Reply(200, self.everything(caller, segments[1], params))
            self.require_scope(caller, resource_type, "r")
            if len(segments) == 2:
                return self.read_any(caller, resource_type, segments[1])
            if len(segments) == 4 and segments[2] == "_history" and segments[3].isdigit():
                return self.read(caller, resource_type, segments[1], int(segments[3]))
            if len(segments) == 3 and segments[2] == "_history":
                return Reply(200, self.instance_history(caller, resource_type, segments[1], params))
            raise invalid(f"unsupported batch GET {request.get('url')!r}")
        if resource_type == "Consent" and method in WRITE_INTERACTIONS:
            raise self.refuse_consent_write(caller.token.client_id, WRITE_INTERACTIONS[method])
        if method == "POST" and len(segments) == 1:
            self.require_scope(caller, resource_type, "c")
            return self.create(
                caller, resource_type, entry.get("resource"), request.get("ifNoneExist")
            )
        if method == "PUT" and len(segments) == 2:
            self.require_scope(caller, resource_type, "u")
            return self.update(
                caller, resource_type, segments[1], entry.get("resource"), request.get("ifMatch")
            )
        raise not_supported(f"{method} {request.get('url')!r} is not supported in a batch")

    def read_any(self, caller: Caller, resource_type: str, resource_id: str) -> Reply:
        if resource_type == "Consent":
            return Reply(200, self.consent_read(caller, resource_id))
        if resource_type == "Provenance" and not self.is_record(caller, "Provenance", resource_id):
            return Reply(200, self.provenance_read(caller, resource_id))
        if self.in_directory(caller, resource_type, resource_id):
            entry = read_entry(self.directory(caller), resource_type, resource_id)
            return self.entry_reply(200, entry)
        if resource_type not in RECORD_TYPES:
            raise not_supported(f"read is not supported on {resource_type}")
        return self.read(caller, resource_type, resource_id)

    def search_type(
        self, caller: Caller, resource_type: str, params: list[tuple[str, str]]
    ) -> Json:
        if resource_type == "Consent":
            return self.consent_search(caller, params)
        if resource_type == "AuditEvent":
            return self.audit_search(caller, params)
        if resource_type == "Provenance":
            return self.provenance_search(caller, params)
        if resource_type not in RECORD_TYPES and resource_type not in DIRECTORY_TYPES:
            raise not_supported(f"search is not supported on {resource_type}", 404)
        try:
            params, inclusions = split_inclusions(resource_type, params)
            query = parse_search(resource_type, params, strict=caller.strict)
        except SearchError as exc:
            raise invalid(str(exc)) from None
        found = None
        subjects = [reference_type(v) for c in query.by(PATIENT) for v in c.values]
        if resource_type == "Observation" and subjects:
            # About a Device or a Location: the directory's Observations.
            if all(kind in NON_PATIENT_SUBJECTS for kind in subjects):
                found = self.directory_search(caller, query)
        elif (
            resource_type in DIRECTORY_TYPES
            and resource_type != "Observation"  # a patient's, unless its subject says not
            and not query.by(PATIENT)
        ):
            found = self.directory_search(caller, query)
            # A Medication or Device found by _id may be a patient's record instead.
            if not (resource_type in DIRECTORY_ONLY_TYPES or found["total"]) and query.named("_id"):
                found = None
        bundle = found if found is not None else self.search(caller, query)
        return self.with_inclusions(caller, bundle, inclusions) if inclusions else bundle

    def with_inclusions(self, caller: Caller, bundle: Json, inclusions: Inclusions) -> Json:
        """`bundle` with the resources its matches' `_include`s name and, for
        `_revinclude=Provenance:target`, the ledger's Provenance of each matched record."""
        entries = bundle.get("entry", [])
        matches = [e["resource"] for e in entries if e["search"]["mode"] == "match"]
        extra: list[Json] = []
        left_out: list[str] = []
        for reference in referenced(matches, inclusions.includes):
            kind, _, resource_id = reference.partition("/")
            try:
                reply = self.read_any(caller, kind, resource_id)
            except (FhirError, ClientError) as exc:
                left_out.append(f"{reference} ({exc})")
                continue
            if reply.body is not None:
                extra.append(self.entry(kind, resource_id, reply.body, "include"))
        if inclusions.provenance:
            for resource in matches:
                if self.in_directory(caller, resource["resourceType"], resource["id"]):
                    continue
                history = self.history(caller, resource["id"])
                if history is None:
                    continue
                latest = next(v for v in history.versions if v.version == history.head.latest)
                provenance = self.provenance(caller, latest)
                extra.append(self.entry("Provenance", provenance["id"], provenance, "include"))
        outcome = [e for e in entries if e["search"]["mode"] == "outcome"]
        if left_out:
            note = issue(
                "warning",
                "suppressed",
                f"{len(left_out)} included resource(s) left out: {'; '.join(left_out)[:2000]}",
            )
            if outcome:
                outcome[0]["resource"]["issue"].append(note)
            else:
                outcome = [{"resource": operation_outcome([note]), "search": {"mode": "outcome"}}]
        merged = [e for e in entries if e["search"]["mode"] == "match"] + extra + outcome
        if merged:
            bundle["entry"] = merged
        return bundle
