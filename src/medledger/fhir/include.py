"""`_include` and `_revinclude` of a search: which references of the matched resources the
searchset also carries (FHIR R4 search §3.1.1.5.4).

Supported: `_include=<Type>:<param>` for every reference parameter of the type (and
`<Type>:<param>:<TargetType>`), plus the US Core ones whose element is not a search parameter
here (`MedicationRequest:medication`, `MedicationAdministration:medication`); `:iterate` is
taken as one level. `_revinclude=Provenance:target`, which US Core 6.1 servers SHALL support,
adds the ledger's Provenance of each matched record version. Included resources are read like
any other: a record through a ledger access request (one the caller may not read is left out
and counted), a directory entry from committed state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medledger.fhir.search import SEARCH_PARAMS, SearchError, values_at

REVINCLUDES = frozenset({"Provenance:target"})
# US Core _include targets that are elements, not search parameters, here.
EXTRA_INCLUDES: Mapping[str, Mapping[str, str]] = {
    "MedicationRequest": {"medication": "medication"},
    "MedicationAdministration": {"medication": "medication"},
    "MedicationDispense": {"medication": "medication"},
    "MedicationStatement": {"medication": "medication"},
    "Encounter": {"location": "location.location", "service-provider": "serviceProvider"},
}


@dataclass(frozen=True)
class Include:
    param: str
    path: str
    target: str | None  # only references to this type, if given


@dataclass(frozen=True)
class Inclusions:
    includes: tuple[Include, ...] = ()
    provenance: bool = False

    def __bool__(self) -> bool:
        return bool(self.includes) or self.provenance


def include_paths(resource_type: str) -> dict[str, str]:
    """The parameters `_include` may name on a type, and their element paths."""
    paths = {
        name: param.paths[0]
        for name, param in SEARCH_PARAMS.get(resource_type, {}).items()
        if param.type == "reference" and name not in ("patient", "subject")
    }
    paths.update(EXTRA_INCLUDES.get(resource_type, {}))
    # The patient is a reference too (US Core clients include it).
    for name in ("patient", "subject"):
        param = SEARCH_PARAMS.get(resource_type, {}).get(name)
        if param is not None:
            paths[name] = param.paths[0]
    return paths


def split_inclusions(
    resource_type: str, params: Sequence[tuple[str, str]]
) -> tuple[list[tuple[str, str]], Inclusions]:
    """The search's other parameters, and what it asks to include."""
    rest: list[tuple[str, str]] = []
    includes: list[Include] = []
    provenance = False
    paths = include_paths(resource_type)
    for name, value in params:
        base = name.split(":", 1)[0]
        if base == "_revinclude":
            if value not in REVINCLUDES:
                raise SearchError(
                    f"_revinclude={value} is not supported: {', '.join(sorted(REVINCLUDES))}"
                )
            provenance = True
        elif base == "_include":
            parts = value.split(":")
            if len(parts) not in (2, 3) or parts[0] != resource_type or parts[1] not in paths:
                raise SearchError(
                    f"_include={value} is not supported on {resource_type}: it takes"
                    f" {', '.join(f'{resource_type}:{p}' for p in sorted(paths)) or 'nothing'}"
                )
            target = parts[2] if len(parts) == 3 else None
            includes.append(Include(parts[1], paths[parts[1]], target))
        else:
            rest.append((name, value))
    return rest, Inclusions(tuple(includes), provenance)


def referenced(resources: Iterable[Mapping[str, Any]], includes: Sequence[Include]) -> list[str]:
    """The `<Type>/<id>` references the includes name in `resources`, once each, in order."""
    found: dict[str, None] = {}
    for resource in resources:
        for include in includes:
            for value in values_at(resource, include.path):
                reference = value.get("reference") if isinstance(value, Mapping) else None
                if not isinstance(reference, str) or reference.count("/") != 1:
                    continue
                if "?" in reference or reference.startswith(("urn:", "#", "http")):
                    continue
                if include.target is None or reference.split("/")[0] == include.target:
                    found[reference] = None
    return list(found)
