"""Search, history and Patient/$everything over the ledger's indexes and decrypted resources."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from urllib.parse import urlencode

from medledger.fhir.capability import (
    RECORD_TYPES,
)
from medledger.fhir.outcome import (
    invalid,
    issue,
    not_found,
    operation_outcome,
    too_costly,
)
from medledger.fhir.plumbing import (
    Caller,
    Json,
    etag,
    ns_of,
    with_meta,
)
from medledger.fhir.reading import Reading
from medledger.fhir.search import (
    METADATA,
    PATIENT,
    Criterion,
    SearchQuery,
    Token,
    metadata_matches,
    parse_search,
    reference_id,
    reference_type,
    rfc3339,
    sort_items,
    unescape,
)
from medledger.ledger.consent import (
    Consent,
)
from medledger.ledger.model import Member, Role
from medledger.ledger.records import (
    RecordStatus,
    RecordVersion,
)


class Searching(Reading):
    # --- search ----------------------------------------------------------------------------

    def patients_for(self, caller: Caller, criteria: Sequence[Criterion]) -> set[str] | None:
        """The patients the patient/subject/identifier criteria name (AND of ORs), or None."""
        chosen: set[str] | None = None
        for criterion in criteria:
            found: set[str] = set()
            name = criterion.param.name
            if name == "identifier" or criterion.modifier == "identifier":
                if criterion.modifier not in ("", "identifier"):
                    raise invalid(f"{criterion.key} is not supported")
                for token in criterion.tokens():
                    patient = self.resolve_identifier(token)
                    if patient is not None:
                        found.add(patient)
            else:
                if criterion.modifier not in ("", "Patient"):
                    raise invalid(f"{criterion.key} is not supported")
                for value in criterion.values:
                    if reference_type(value) not in (None, "Patient"):
                        raise invalid(f"{name}: only Patient references are supported")
                    found.add(reference_id(value))
            chosen = found if chosen is None else chosen & found
        return chosen

    def resolve_identifier(
        self, token: Token, local: Mapping[tuple[str, str], str] | None = None
    ) -> str | None:
        """The patient an identifier names: first among the new patients of a transaction
        (`local`), then in this node's patient index; a bare value must name one patient."""
        if token.code is None:
            raise invalid("an identifier search needs a value")
        if not isinstance(token.code, str) or not isinstance(token.system, str | None):
            raise invalid("an identifier's system and value are strings")
        if local:
            if token.system:
                if (token.system, token.code) in local:
                    return local[(token.system, token.code)]
            else:
                named = {p for (_, value), p in local.items() if value == token.code}
                if len(named) == 1:
                    return named.pop()
        if token.system:
            return self.ctx.patients.resolve(token.system, token.code)
        return self.ctx.patients.resolve_any(token.code)

    def organization_patients(self, caller: Caller) -> list[str]:
        members = caller.client.ledger.query("/members", caller.token.organization, list[Member])
        return [m.id for m in members if m.role is Role.PATIENT]

    def candidates(self, caller: Caller, query: SearchQuery) -> list[RecordVersion]:
        """Latest versions of the records a search considers, from the ledger's indexes."""
        resource_type = query.resource_type
        patients = self.patients_for(caller, query.by(PATIENT))
        ids = [c for c in query.named("_id") if c.modifier == ""]
        found: list[RecordVersion] = []

        def consider(version: RecordVersion) -> None:
            if version.resource_type != resource_type or version.status is RecordStatus.ERASED:
                return
            found.append(version)
            if len(found) > self.ctx.max_search_candidates:
                raise too_costly(
                    f"this search would examine more than {self.ctx.max_search_candidates}"
                    f" {resource_type} records: narrow it by patient (patient=Patient/<id> or"
                    " identifier=system|value) or by _id"
                )

        if patients is None and ids:
            values = sorted({unescape(v) for v in ids[0].values})
            if len(values) > self.ctx.max_search_candidates:
                raise too_costly(
                    f"_id names {len(values)} records; at most"
                    f" {self.ctx.max_search_candidates} are examined per search"
                )
            for record_id in values:
                history = self.history(caller, record_id)
                if history is not None and not history.head.erased and history.versions:
                    consider(history.versions[-1])
        elif resource_type == "Patient" and patients is not None:
            for patient in sorted(patients):
                history = self.history(caller, patient)
                if history is not None and not history.head.erased and history.versions:
                    consider(history.versions[-1])
        else:
            own = patients is None
            for patient in sorted(
                patients if patients is not None else self.organization_patients(caller)
            ):
                for summary in caller.client.records_of(patient):
                    latest = summary.latest
                    if summary.head.erased or latest is None:
                        continue
                    if own and latest.author_organization != caller.token.organization:
                        continue
                    consider(latest)
        return found

    def search(self, caller: Caller, query: SearchQuery) -> Json:
        now = datetime.now(UTC)
        versions = [
            v
            for v in self.candidates(caller, query)
            if all(
                metadata_matches(c, v.record_id, v.time_ns, v.category, now)
                for c in query.by(METADATA)
            )
        ]
        consents: dict[str, list[Consent]] = {}
        allowed = [v for v in versions if self.may_read(caller, v, consents)]
        withheld = len(versions) - len(allowed)
        page: list[tuple[RecordVersion, Json]]
        if query.needs_content:
            batch = self.read_many(caller, allowed, consents)
            items = [
                (v, batch.resources[(v.record_id, v.version)])
                for v in allowed
                if (v.record_id, v.version) in batch.resources
                and query.matches(batch.resources[(v.record_id, v.version)], now)
            ]
            items = sort_items(
                items,
                query.sort,
                metadata=lambda i: (i[0].time_ns, i[0].record_id),
                content=lambda i: i[1],
            )
            total = len(items)
            page = items[query.offset : query.offset + query.count]
        else:
            query = self.paged(query)
            ordered = sort_items(
                allowed, query.sort, metadata=lambda v: (v.time_ns, v.record_id), content=None
            )
            total = len(ordered)
            chosen = ordered[query.offset : query.offset + query.count]
            batch = self.read_many(caller, chosen, consents)
            page = [
                (v, batch.resources[(v.record_id, v.version)])
                for v in chosen
                if (v.record_id, v.version) in batch.resources
            ]
        notes = self.notes(withheld + batch.withheld, batch.failures, query.ignored)
        entries = [
            self.entry(v.resource_type, v.record_id, with_meta(r, v), "match") for v, r in page
        ]
        return self.searchset(
            f"{self.base}/{query.resource_type}", query.link_params(), query, total, entries, notes
        )

    def paged(self, query: SearchQuery) -> SearchQuery:
        """A page whose records are chosen by metadata holds at most as many as one request
        may issue access requests for (a server may serve fewer than _count; the Bundle's
        links follow the page size it chose)."""
        if 0 < self.ctx.max_search_grants < query.count:
            return dataclasses.replace(query, count=self.ctx.max_search_grants)
        return query

    def notes(self, withheld: int, failures: Sequence[str], ignored: Sequence[str]) -> list[Json]:
        issues = []
        if withheld:
            issues.append(
                issue(
                    "warning",
                    "suppressed",
                    f"{withheld} matching record(s) left out: the ledger's access rules do not"
                    " let this caller read them (no consent covers them for this purpose)",
                )
            )
        issues.extend(issue("warning", "transient", f"could not be read: {f}") for f in failures)
        if ignored:
            issues.append(
                issue("warning", "not-supported", f"ignored parameters: {', '.join(ignored)}")
            )
        return issues

    def entry(self, resource_type: str, resource_id: str, resource: Json, mode: str) -> Json:
        return {
            "fullUrl": f"{self.base}/{resource_type}/{resource_id}",
            "resource": resource,
            "search": {"mode": mode},
        }

    def searchset(
        self,
        link_base: str,
        params: list[tuple[str, str]],
        query: SearchQuery,
        total: int,
        entries: list[Json],
        notes: list[Json],
    ) -> Json:
        def url(offset: int) -> str:
            return f"{link_base}?" + urlencode(
                [*params, ("_count", str(query.count)), ("_page", str(offset))]
            )

        links = [{"relation": "self", "url": url(query.offset)}]
        if query.count > 0:
            if query.offset + query.count < total:
                links.append({"relation": "next", "url": url(query.offset + query.count)})
            if query.offset > 0:
                links.append(
                    {"relation": "previous", "url": url(max(0, query.offset - query.count))}
                )
        bundle: Json = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "meta": {"lastUpdated": rfc3339(time.time_ns())},
            "type": "searchset",
            "total": total,
            "link": links,
            "entry": list(entries),
        }
        if notes:
            bundle["entry"].append(
                {"resource": operation_outcome(notes), "search": {"mode": "outcome"}}
            )
        if not bundle["entry"]:
            del bundle["entry"]
        return bundle

    # --- history ---------------------------------------------------------------------------

    def history_entry(self, version: RecordVersion, resource: Json | None) -> Json:
        first = version.version == 1
        entry: Json = {"fullUrl": f"{self.base}/{version.resource_type}/{version.record_id}"}
        if resource is not None:
            entry["resource"] = with_meta(resource, version)
        entry["request"] = {
            "method": "POST" if first else "PUT",
            "url": version.resource_type
            if first
            else f"{version.resource_type}/{version.record_id}",
        }
        entry["response"] = {
            "status": "201 Created" if first else "200 OK",
            "etag": etag(version.version),
            "lastModified": rfc3339(version.time_ns),
        }
        if resource is None:
            entry["response"]["status"] = "410 Gone"
        return entry

    def history_bundle(
        self,
        caller: Caller,
        versions: list[RecordVersion],
        link_base: str,
        params: Sequence[tuple[str, str]],
        strict: bool,
    ) -> Json:
        query = self.paged(
            parse_search("_history", [p for p in params if p[0] in ("_count", "_page")])
        )
        since = next((v for k, v in params if k == "_since"), None)
        unknown = [k for k, _ in params if k not in ("_count", "_page", "_since", "patient", "_id")]
        if unknown and strict:
            raise invalid(f"history supports _count, _page and _since, not {', '.join(unknown)}")
        if since is not None:
            low = ns_of(since, "_since")
            versions = [v for v in versions if v.time_ns >= low]
        ordered = sorted(versions, key=lambda v: (v.time_ns, v.version, v.record_id), reverse=True)
        consents: dict[str, list[Consent]] = {}
        readable = [
            v
            for v in ordered
            if v.status is RecordStatus.ERASED or self.may_read(caller, v, consents)
        ]
        withheld = len(ordered) - len(readable)
        chosen = readable[query.offset : query.offset + query.count]
        batch = self.read_many(
            caller, [v for v in chosen if v.status is not RecordStatus.ERASED], consents
        )
        entries = [
            self.history_entry(v, batch.resources.get((v.record_id, v.version)))
            for v in chosen
            if v.status is RecordStatus.ERASED or (v.record_id, v.version) in batch.resources
        ]
        bundle = self.searchset(
            link_base,
            [p for p in params if p[0] in ("_since", "patient", "_id")],
            query,
            len(readable),
            entries,
            self.notes(withheld + batch.withheld, batch.failures, ()),
        )
        bundle["type"] = "history"
        for entry in bundle.get("entry", []):
            entry.pop("search", None)
        return bundle

    def instance_history(
        self, caller: Caller, resource_type: str, record_id: str, params: list[tuple[str, str]]
    ) -> Json:
        history = self.record(caller, resource_type, record_id)
        denied_all = all(not self.may_read(caller, v, {}) for v in history.versions)
        if denied_all:
            # Let the ledger decide (and audit) the refusal.
            self.read_version(caller, history.versions[-1])
        return self.history_bundle(
            caller,
            list(history.versions),
            f"{self.base}/{resource_type}/{record_id}/_history",
            params,
            caller.strict,
        )

    def type_history(
        self, caller: Caller, resource_type: str, params: list[tuple[str, str]]
    ) -> Json:
        selection = [p for p in params if p[0] in ("patient", "_id")]
        query = parse_search(resource_type, selection)
        versions: list[RecordVersion] = []
        for latest in self.candidates(caller, query):
            history = self.history(caller, latest.record_id)
            if history is not None:
                versions.extend(history.versions)
        return self.history_bundle(
            caller, versions, f"{self.base}/{resource_type}/_history", params, caller.strict
        )

    # --- $everything -----------------------------------------------------------------------

    def everything(self, caller: Caller, patient_id: str, params: list[tuple[str, str]]) -> Json:
        query = self.paged(
            parse_search("$everything", [p for p in params if p[0] in ("_count", "_page")])
        )
        allowed_params = ("_count", "_page", "_since", "_type")
        unknown = [k for k, _ in params if k not in allowed_params]
        if unknown and caller.strict:
            raise invalid(f"$everything supports {', '.join(allowed_params)}, not {unknown}")
        if self.patient_member(caller, patient_id) is None:
            raise not_found(f"Patient/{patient_id} is not known")
        types = {t for k, v in params if k == "_type" for t in v.split(",") if t} or set(
            RECORD_TYPES
        )
        since = next((ns_of(v, "_since") for k, v in params if k == "_since"), None)
        versions = []
        for summary in caller.client.records_of(patient_id):
            latest = summary.latest
            if summary.head.erased or latest is None or latest.status is RecordStatus.ERASED:
                continue
            if latest.resource_type not in types or not caller.may(latest.resource_type, "r"):
                continue
            if since is not None and latest.time_ns < since:
                continue
            versions.append(latest)
        versions.sort(key=lambda v: (v.resource_type != "Patient", v.time_ns, v.record_id))
        consents: dict[str, list[Consent]] = {}
        allowed = [v for v in versions if self.may_read(caller, v, consents)]
        if versions and not allowed:
            # Nothing is readable: let the ledger decide (and audit) the refusal of the first.
            self.read_version(caller, versions[0])
        chosen = allowed[query.offset : query.offset + query.count]
        batch = self.read_many(caller, chosen, consents)
        entries = [
            self.entry(v.resource_type, v.record_id, with_meta(batch.resources[key], v), "match")
            for v in chosen
            if (key := (v.record_id, v.version)) in batch.resources
        ]
        notes = self.notes(len(versions) - len(allowed) + batch.withheld, batch.failures, ())
        kept = [(k, v) for k, v in params if k in ("_since", "_type")]
        return self.searchset(
            f"{self.base}/Patient/{patient_id}/$everything",
            kept,
            query,
            len(allowed),
            entries,
            notes,
        )
