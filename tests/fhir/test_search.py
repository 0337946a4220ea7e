"""FHIR search: parameter parsing, date prefixes, tokens, strings, metadata, sorting, paging."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from medledger.fhir.search import (
    CONTENT,
    DEFAULT_COUNT,
    MAX_COUNT,
    METADATA,
    PATIENT,
    SEARCH_PARAMS,
    DateRange,
    SearchError,
    Token,
    date_matches,
    date_range,
    dates_at,
    metadata_matches,
    parse_date_value,
    parse_search,
    parse_token,
    reference_id,
    reference_type,
    rfc3339,
    sort_items,
    split_escaped,
    token_matches,
    unescape,
    values_at,
)

NOW = datetime(2026, 6, 1, tzinfo=UTC)
LOINC = "http://loinc.org"


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def observation(
    code: str = "2345-7",
    effective: Any = "2026-03-15T09:30:00Z",
    category: str = "laboratory",
    status: str = "final",
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": category,
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": code}], "text": "Glucose"},
        "subject": {"reference": "Patient/p1"},
    }
    if isinstance(effective, dict):
        resource["effectivePeriod"] = effective
    elif effective is not None:
        resource["effectiveDateTime"] = effective
    return resource


# --- dates ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "low", "high"),
    [
        ("2026", utc(2026, 1, 1), utc(2027, 1, 1)),
        ("2026-02", utc(2026, 2, 1), utc(2026, 3, 1)),
        ("2026-12", utc(2026, 12, 1), utc(2027, 1, 1)),
        ("2026-02-28", utc(2026, 2, 28), utc(2026, 3, 1)),
        ("2026-02-28T10:15", utc(2026, 2, 28, 10, 15), utc(2026, 2, 28, 10, 16)),
        ("2026-02-28T10:15:30Z", utc(2026, 2, 28, 10, 15, 30), utc(2026, 2, 28, 10, 15, 31)),
        (
            "2026-02-28T10:15:30.250Z",
            utc(2026, 2, 28, 10, 15, 30, 250000),
            utc(2026, 2, 28, 10, 15, 30, 251000),
        ),
        ("2026-02-28T10:15:30+02:00", utc(2026, 2, 28, 8, 15, 30), utc(2026, 2, 28, 8, 15, 31)),
    ],
)
def test_date_range_follows_the_precision(text: str, low: datetime, high: datetime) -> None:
    assert date_range(text) == DateRange(low, high)


@pytest.mark.parametrize("text", ["2026-13", "2026-02-30", "26-01-01", "2026-01-01T25:00", "x"])
def test_not_a_date(text: str) -> None:
    assert date_range(text) is None


def target(text: str) -> DateRange:
    found = date_range(text)
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("search", "value", "expected"),
    [
        ("2026-03-15", "2026-03-15T09:30:00Z", True),
        ("eq2026-03", "2026-03-15T09:30:00Z", True),
        ("eq2026-03-15", "2026-03", False),  # a month is not inside a day
        ("ne2026-03-15", "2026-03-16T00:00:00Z", True),
        ("ne2026-03-15", "2026-03-15T09:30:00Z", False),
        ("gt2026-03-14", "2026-03-15T09:30:00Z", True),
        ("gt2026-03-15", "2026-03-15T09:30:00Z", False),
        ("lt2026-03-16", "2026-03-15T09:30:00Z", True),
        ("lt2026-03-15", "2026-03-15T09:30:00Z", False),
        ("ge2026-03-15", "2026-03-15T09:30:00Z", True),
        ("ge2026-03-16", "2026-03-15T09:30:00Z", False),
        ("le2026-03-15", "2026-03-15T09:30:00Z", True),
        ("le2026-03-14", "2026-03-15T09:30:00Z", False),
        ("sa2026-03-14", "2026-03-15T00:00:00Z", True),
        ("sa2026-03-15", "2026-03-15T23:00:00Z", False),
        ("eb2026-03-16", "2026-03-15T23:00:00Z", True),
        ("eb2026-03-15", "2026-03-15T23:00:00Z", False),
        ("ap2026-03-15", "2026-03-17T00:00:00Z", True),  # 10% of ~2.5 months ≈ a week
        ("ap2026-03-15", "2026-05-20T00:00:00Z", False),
    ],
)
def test_date_prefixes(search: str, value: str, expected: bool) -> None:
    assert date_matches(parse_date_value(search), target(value), NOW) is expected


def test_ranges_against_periods() -> None:
    ongoing = DateRange(utc(2026, 1, 1), datetime(9999, 12, 31, tzinfo=UTC))
    assert date_matches(parse_date_value("gt2026-06-01"), ongoing, NOW)
    assert not date_matches(parse_date_value("eq2026-06-01"), ongoing, NOW)
    assert date_matches(parse_date_value("sa2025-12-31"), ongoing, NOW)


def test_bad_date_values_are_refused() -> None:
    with pytest.raises(SearchError, match="not a FHIR date"):
        parse_date_value("gt2026-02-31")
    with pytest.raises(SearchError):
        parse_search("Observation", [("date", "yesterday")])


def test_dates_at_reads_choice_elements() -> None:
    assert dates_at(observation(), ["effective"]) == [target("2026-03-15T09:30:00Z")]
    period = observation(effective={"start": "2026-03-01", "end": "2026-03-02"})
    assert dates_at(period, ["effective"]) == [DateRange(utc(2026, 3, 1), utc(2026, 3, 3))]
    assert dates_at(observation(effective=None), ["effective"]) == []


def test_rfc3339_of_a_block_time() -> None:
    ns = int(utc(2026, 3, 15, 9, 30, 1).timestamp()) * 1_000_000_000 + 123_456_789
    assert rfc3339(ns) == "2026-03-15T09:30:01.123456Z"


# --- tokens, strings, references ------------------------------------------------------------


def test_token_forms() -> None:
    concept = {"coding": [{"system": LOINC, "code": "2345-7"}, {"code": "local-1"}]}
    assert token_matches(parse_token("2345-7"), concept)
    assert token_matches(parse_token(f"{LOINC}|2345-7"), concept)
    assert not token_matches(parse_token("http://snomed.info/sct|2345-7"), concept)
    assert token_matches(parse_token(f"{LOINC}|"), concept)
    assert token_matches(parse_token("|local-1"), concept)
    assert not token_matches(parse_token("|2345-7"), concept)
    assert token_matches(parse_token("final"), "final")
    identifier = {"system": "urn:mrn", "value": "0042"}
    assert token_matches(Token("urn:mrn", "0042"), identifier)
    with pytest.raises(SearchError):
        parse_token("a|b|c")


def test_escapes() -> None:
    assert split_escaped(r"a\,b,c", ",") == [r"a\,b", "c"]
    assert unescape(r"a\,b\|c\\d") == r"a,b|c\d"
    assert parse_token(r"urn:x|a\|b") == Token("urn:x", "a|b")


def test_references() -> None:
    assert reference_id("Patient/abc") == "abc"
    assert reference_id("http://node/fhir/Patient/abc") == "abc"
    assert reference_id("Observation/o1/_history/3") == "o1"
    assert reference_id("abc") == "abc"
    assert reference_type("Patient/abc") == "Patient"
    assert reference_type("abc") is None


def test_values_at_flattens_and_finds_choices() -> None:
    resource = {"name": [{"family": "Smith", "given": ["Ann", "B"]}, {"family": "Jones"}]}
    assert values_at(resource, "name.family") == ["Smith", "Jones"]
    assert values_at(resource, "name.given") == ["Ann", "B"]
    assert values_at({"medicationCodeableConcept": {"text": "x"}}, "medication") == [{"text": "x"}]


# --- parsing and matching -------------------------------------------------------------------


def test_parse_a_clinicians_search() -> None:
    query = parse_search(
        "Observation",
        [
            ("patient", "Patient/p1"),
            ("code", f"{LOINC}|2345-7,{LOINC}|4548-4"),
            ("category", "laboratory"),
            ("date", "ge2026-01-01"),
            ("date", "lt2026-04-01"),
            ("_count", "2"),
            ("_sort", "-date"),
        ],
    )
    assert query.count == 2 and query.offset == 0
    assert [c.param.name for c in query.by(PATIENT)] == ["patient"]
    assert [c.param.name for c in query.by(METADATA)] == ["category"]
    assert [c.param.name for c in query.by(CONTENT)] == ["code", "date", "date"]
    assert query.needs_content
    assert query.sort[0].name == "date" and query.sort[0].descending
    assert query.matches(observation(), NOW)
    assert query.matches(observation(code="4548-4"), NOW)
    assert not query.matches(observation(code="718-7"), NOW)
    assert not query.matches(observation(effective="2026-04-02"), NOW)
    assert ("_sort", "-date") in query.link_params()
    assert ("code", f"{LOINC}|2345-7,{LOINC}|4548-4") in query.link_params()


def test_token_not_and_missing() -> None:
    query = parse_search("Observation", [("status:not", "final")])
    assert not query.matches(observation(), NOW)
    assert query.matches(observation(status="amended"), NOW)
    missing = parse_search("Observation", [("date:missing", "true")])
    assert missing.matches(observation(effective=None), NOW)
    assert not missing.matches(observation(), NOW)


def test_count_page_and_limits() -> None:
    assert parse_search("Observation", []).count == DEFAULT_COUNT
    assert parse_search("Observation", [("_count", "5000")]).count == MAX_COUNT
    assert parse_search("Observation", [("_page", "40")]).offset == 40
    assert parse_search("Observation", [("_summary", "count")]).count == 0
    with pytest.raises(SearchError, match="non-negative"):
        parse_search("Observation", [("_count", "-1")])


def test_unknown_parameters_are_refused_unless_lenient() -> None:
    with pytest.raises(SearchError, match="no search parameter 'colour'"):
        parse_search("Observation", [("colour", "blue")])
    with pytest.raises(SearchError, match="modifier :exact"):
        parse_search("Observation", [("code:exact", "x")])
    with pytest.raises(SearchError, match="_include"):
        parse_search("Observation", [("_include", "Observation:subject")])
    lenient = parse_search("Observation", [("colour", "blue"), ("code", "x")], strict=False)
    assert lenient.ignored == ("colour",)
    assert all(name != "colour" for name, _ in lenient.link_params())


def test_sort_keys() -> None:
    assert parse_search("Condition", [("_sort", "date")]).sort[0].name == "onset-date"
    assert parse_search("Observation", [("_sort", "_lastUpdated")]).sort[0].param is None
    with pytest.raises(SearchError, match="_sort"):
        parse_search("Observation", [("_sort", "code")])


def test_patient_strings() -> None:
    patient = {"resourceType": "Patient", "name": [{"family": "Müller", "given": ["Anna"]}]}
    assert parse_search("Patient", [("name", "mul")]).matches(patient, NOW)
    assert parse_search("Patient", [("family", "MÜLLER")]).matches(patient, NOW)
    assert not parse_search("Patient", [("family:exact", "Mull")]).matches(patient, NOW)
    assert parse_search("Patient", [("given:contains", "nn")]).matches(patient, NOW)
    assert not parse_search("Patient", [("given", "nn")]).matches(patient, NOW)


def test_metadata_parameters() -> None:
    ns = int(utc(2026, 3, 15, 12).timestamp()) * 1_000_000_000
    (updated,) = parse_search("Observation", [("_lastUpdated", "ge2026-03-15")]).criteria
    assert metadata_matches(updated, "r1", ns, "laboratory", NOW)
    (earlier,) = parse_search("Observation", [("_lastUpdated", "lt2026-03-15")]).criteria
    assert not metadata_matches(earlier, "r1", ns, "laboratory", NOW)
    (ids,) = parse_search("Observation", [("_id", "r1,r2")]).criteria
    assert metadata_matches(ids, "r2", ns, "x", NOW)
    assert not metadata_matches(ids, "r3", ns, "x", NOW)
    (category,) = parse_search("Observation", [("category", "Laboratory")]).criteria
    assert metadata_matches(category, "r1", ns, "laboratory", NOW)
    assert not metadata_matches(category, "r1", ns, "vital-signs", NOW)


def test_category_is_content_where_the_ledger_fixes_it_by_type() -> None:
    assert SEARCH_PARAMS["Observation"]["category"].where == METADATA
    assert SEARCH_PARAMS["MedicationRequest"]["category"].where == CONTENT


def test_sorting() -> None:
    items = [
        ("a", 3, observation(effective="2026-01-03")),
        ("b", 1, observation(effective="2026-01-01")),
        ("c", 2, observation(effective=None)),
        ("d", 4, observation(effective="2026-01-02")),
    ]

    def meta(i: tuple[str, int, dict[str, Any]]) -> tuple[int, str]:
        return (i[1], i[0])

    def content(i: tuple[str, int, dict[str, Any]]) -> dict[str, Any]:
        return i[2]

    plain = sort_items(items, (), meta, None)
    assert [i[0] for i in plain] == ["b", "c", "a", "d"]
    by_date = sort_items(
        items, parse_search("Observation", [("_sort", "date")]).sort, meta, content
    )
    assert [i[0] for i in by_date] == ["b", "d", "a", "c"]
    newest = sort_items(
        items, parse_search("Observation", [("_sort", "-date")]).sort, meta, content
    )
    assert [i[0] for i in newest] == ["a", "d", "b", "c"]
    latest = sort_items(
        items, parse_search("Observation", [("_sort", "-_lastUpdated")]).sort, meta, content
    )
    assert [i[0] for i in latest] == ["d", "a", "c", "b"]


def test_ap_is_at_least_a_day() -> None:
    near = parse_date_value(f"ap{(NOW + timedelta(hours=1)).date().isoformat()}")
    assert date_matches(near, target((NOW + timedelta(hours=30)).isoformat()), NOW)
