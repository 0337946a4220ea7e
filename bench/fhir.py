"""The FHIR API on a 4-validator testnet, beside the raw ledger throughput of the same run and
the same network.

1. baseline: raw signed ledger transactions per second (`member.rotate`, the closed loop of
   bench/run.py), measured before the FHIR phases and again after them.
2. ingest: a custodial EHR member on node0 with a SMART Backend Services client; several
   concurrent clients POST transaction Bundles, each a new Patient with 20 ~2 KB laboratory
   Observations and the patient's Conditions (from medledger.samples); resources per second
   counts the entries of the Bundles answered 200 (every record committed). A second, shorter
   phase posts Bundles for patients already registered (no Patient entry), which shows what
   registering a patient costs.
3. search latency, p50/p99, for typical EHR queries, one after the other from one client:
   `Observation?patient=X&category=laboratory&_count=20`,
   `Observation?patient=X&code=<LOINC>&date=ge2024-07-01` and `Condition?patient=X`. Cold: the
   first search about a patient, so every matching record needs an access request committed,
   key shares and decryption; warm: the same searches again, served from the gateway's cache of
   decrypted resources while their grants last.
4. medledger beside HAPI FHIR JPA (bench/fhir_compare.py): the public Synthea Bundles of
   ../shared/testdata/synthea (the hospital and practitioner support Bundles, then patient
   Bundles with 1 client and other patient Bundles with 6 clients) into a HAPI FHIR JPA server
   on PostgreSQL (bench/hapi_server.py, run before the testnet starts, alone on the machine)
   and into the testnet, after the same warm-up on both; then the same searches on both, cold
   and warm. The table compares medledger ÷ HAPI.

Phases 1-3 are the "generated" phases (--skip-generated), phase 4 needs the Synthea folder
(--synthea-dir; skipped, saying so, when it is absent) and its HAPI half can be left out
(--skip-hapi). Run it as `.venv/bin/python bench/fhir.py` (or `make bench-fhir`); `--help`
lists the knobs. Results go to bench/results/fhir-latest.json plus a timestamped copy. The
testnet, HAPI and its PostgreSQL live in temporary directories on their own loopback ports and
are stopped at the end, also on an error, Ctrl-C, SIGTERM or SIGHUP.
"""

# ruff: noqa: E402  (imports follow the sys.path set-up below)
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ comes first on sys.path, where this file would shadow the `fhir`
# package (fhir.resources) that medledger validates with: put the repository root there instead,
# so that the shared helpers import as bench.common.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import argparse
import datetime as dt
import os
import statistics
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519

from bench.common import (
    RESULTS_DIR,
    ROOT,
    TERMINATING,
    CpuMeter,
    Testnet,
    enroll_keys,
    enroll_rotators,
    fmt,
    log,
    machine_info,
    measure_raw,
    medledger_testnet,
    submit_pipelined,
    summary,
    terminate_cleanly,
    write_results,
)
from bench.fhir_compare import (
    EXAMPLES as SYNTHEA_QUERIES,
)
from bench.fhir_compare import (
    HapiTarget,
    MedledgerTarget,
    clinical_entries,
    load_synthea,
    run_server,
    whole_file_refusal,
)
from bench.hapi_server import hapi_server
from medledger.crypto.keys import KeyPair
from medledger.ledger.clients import RegisterClient
from medledger.ledger.model import Role
from medledger.samples.fhir import generate_patient
from medledger.services.custody import Custody

EHR_NODE = 0
CLIENT_ID = "bench-ehr"
SCOPES = ("system/*.cruds",)
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
LOINC = "http://loinc.org"
SINCE = "2024-07-01"
SYNTHEA_DIR = ROOT.parent / "shared" / "testdata" / "synthea"


# -- the EHR and its SMART client ---------------------------------------------------------------


@dataclass
class Site:
    base: str
    token_url: str
    ehr: KeyPair
    key: ed25519.Ed25519PrivateKey

    def token(self) -> str:
        now = int(time.time())
        claims = {
            "iss": CLIENT_ID,
            "sub": CLIENT_ID,
            "aud": self.token_url,
            "exp": now + 240,
            "jti": str(uuid.uuid4()),
        }
        form = {
            "grant_type": "client_credentials",
            "scope": " ".join(SCOPES),
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": jwt.encode(claims, self.key, algorithm="EdDSA"),
        }
        answer = httpx.post(self.token_url, data=form, timeout=30)
        if answer.status_code != 200:
            raise RuntimeError(f"token endpoint: HTTP {answer.status_code}: {answer.text}")
        return str(answer.json()["access_token"])

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base,
            timeout=120,
            headers={
                "Authorization": f"Bearer {self.token()}",
                "Accept": "application/fhir+json",
            },
        )


def make_site(net: Testnet) -> Site:
    """Custody keys for an EHR member in node0's custody (picked up by the running node on
    first use), enrolled by the organization's admin, and a SMART client registered for it."""
    cfg = net.configs[EHR_NODE]
    passphrase = (cfg.home / "keys" / "node.passphrase").read_text().strip()
    ehr = Custody(cfg.home / "custody", passphrase, fast_kdf=True).create("bench-ehr")
    enroll_keys(net, [(EHR_NODE, ehr, Role.EHR)])
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = str(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
    admin = net.admins[EHR_NODE]
    submit_pipelined(
        net.rpc(EHR_NODE),
        [(admin, "client.register", RegisterClient(CLIENT_ID, ehr.member_id, jwk, SCOPES))],
    )
    base = f"{cfg.api_url}/fhir"
    return Site(base, f"{base}/auth/token", ehr, key)


# -- bundles ------------------------------------------------------------------------------------


@dataclass
class Chart:
    """What a Bundle wrote about one patient, for the searches."""

    patient: str
    observation_codes: list[str]
    since_by_code: dict[str, int]  # LOINC code -> Observations of it dated from SINCE on
    conditions: int


def bundle_for(seed: int, observations: int, target_bytes: int, patient: str | None) -> Any:
    """A transaction Bundle: a new Patient (when `patient` is None) or entries about an existing
    one, with `observations` sized lab Observations and the patient's Conditions."""
    entries: list[dict[str, Any]] = []
    if patient is None:
        resource = generate_patient(seed)
        del resource["id"]
        reference = f"urn:uuid:{uuid.uuid4()}"
        entries.append(
            {
                "fullUrl": reference,
                "resource": resource,
                "request": {"method": "POST", "url": "Patient"},
            }
        )
    else:
        reference = f"Patient/{patient}"
    author = f"Practitioner/{uuid.uuid5(uuid.NAMESPACE_URL, f'bench-practitioner-{seed % 7}')}"
    entries += clinical_entries(seed, reference, author, observations, target_bytes)
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def chart_of(bundle: Any, response: Any, existing: str | None) -> Chart:
    resources = [e["resource"] for e in bundle["entry"]]
    locations = [e["response"]["location"] for e in response["entry"]]
    patient = existing or next(loc.split("/")[1] for loc in locations if loc.startswith("Patient/"))
    codes: list[str] = []
    since: dict[str, int] = {}
    for resource in resources:
        if resource["resourceType"] == "Observation":
            code = resource["code"]["coding"][0]["code"]
            codes.append(code)
            if resource["effectiveDateTime"] >= SINCE:
                since[code] = since.get(code, 0) + 1
    conditions = sum(1 for r in resources if r["resourceType"] == "Condition")
    return Chart(patient, codes, since, conditions)


# -- ingest ---------------------------------------------------------------------------------------


@dataclass
class Posted:
    started: float
    finished: float
    resources: int


@dataclass
class ClientState:
    index: int
    posted: list[Posted] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    failures: int = 0
    last_failure: str = ""


def ingest_phase(
    net: Testnet,
    site: Site,
    *,
    label: str,
    clients: int,
    warmup: float,
    seconds: float,
    observations: int,
    target_bytes: int,
    seed_base: int,
    existing: list[str] | None = None,
) -> tuple[dict[str, Any], list[Chart]]:
    """`clients` threads POST transaction Bundles in a closed loop for `warmup + seconds`;
    the rate counts the resources of the Bundles answered inside the measured window."""
    states = [ClientState(i) for i in range(clients)]
    https = [site.client() for _ in range(clients)]
    start = time.monotonic()
    window = (start + warmup, start + warmup + seconds)
    stop = threading.Event()
    meter = CpuMeter(net.cpu_groups(EHR_NODE))
    cpu: dict[str, float] = {}

    def poster(state: ClientState, http: httpx.Client) -> None:
        counter = 0
        while time.monotonic() < window[1] and not stop.is_set():
            if any(TERMINATING.values()):
                return
            counter += 1
            seed = seed_base + state.index * 10_000 + counter
            patient = existing[(seed + state.index) % len(existing)] if existing else None
            bundle = bundle_for(seed, observations, target_bytes, patient)
            began = time.monotonic()
            try:
                answer = http.post(
                    "", json=bundle, headers={"Content-Type": "application/fhir+json"}
                )
            except httpx.HTTPError as exc:
                state.failures += 1
                state.last_failure = repr(exc)[:300]
                continue
            finished = time.monotonic()
            if answer.status_code != 200:
                state.failures += 1
                state.last_failure = f"HTTP {answer.status_code}: {answer.text[:300]}"
                time.sleep(0.2)
                continue
            state.posted.append(Posted(began, finished, len(bundle["entry"])))
            state.charts.append(chart_of(bundle, answer.json(), patient))

    def metered() -> None:
        time.sleep(max(0.0, window[0] - time.monotonic()))
        meter.start()
        time.sleep(max(0.0, window[1] - time.monotonic()))
        cpu.update(meter.stop())

    threads = [
        threading.Thread(target=poster, args=(s, h), name=f"poster-{s.index}", daemon=True)
        for s, h in zip(states, https, strict=True)
    ]
    threads.append(threading.Thread(target=metered, name="cpu-meter", daemon=True))
    log(
        f"{label}: {clients} clients POST transaction Bundles, {warmup:.0f}s warm-up + "
        f"{seconds:.0f}s measured"
    )
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
    finally:
        stop.set()
        for http in https:
            http.close()
    ended = time.monotonic()
    posted = [p for s in states for p in s.posted]
    in_window = [p for p in posted if window[0] <= p.finished < window[1]]
    resources = sum(p.resources for p in in_window)
    result: dict[str, Any] = {
        "label": label,
        "clients": clients,
        "window_s": seconds,
        "bundles_in_window": len(in_window),
        "resources_in_window": resources,
        "resources_per_s": resources / seconds,
        "bundles_per_s": len(in_window) / seconds,
        "resources_per_bundle": statistics.mean(p.resources for p in posted) if posted else 0,
        "bundle_latency_s": summary([p.finished - p.started for p in in_window]),
        "tail_s": round(ended - window[1], 2),
        "failures": sum(s.failures for s in states),
        "last_failure": next((s.last_failure for s in states if s.last_failure), ""),
        "cpu_cores_used": cpu,
    }
    log(
        f"{label}: {resources / seconds:.1f} resources/s ({len(in_window) / seconds:.2f} "
        f"Bundles/s), Bundle p50 {result['bundle_latency_s']['p50']:.2f}s p99 "
        f"{result['bundle_latency_s']['p99']:.2f}s, cores {cpu}; failures {result['failures']}"
        + (f" ({result['last_failure'][:200]})" if result["failures"] else "")
    )
    return result, [c for s in states for c in s.charts]


# -- search -----------------------------------------------------------------------------------


QUERIES = ("labs", "code+date", "conditions")
EXAMPLES = {
    "labs": "Observation?patient=X&category=laboratory&_count=20",
    "code+date": f"Observation?patient=X&code={LOINC}|<code>&date=ge{SINCE}",
    "conditions": "Condition?patient=X",
}


def query_for(kind: str, chart: Chart) -> tuple[str, dict[str, str], int]:
    """(path, params, expected total) of one typical EHR search about `chart`'s patient."""
    if kind == "labs":
        params = {"patient": chart.patient, "category": "laboratory", "_count": "20"}
        return "Observation", params, len(chart.observation_codes)
    if kind == "code+date":
        code = max(set(chart.observation_codes), key=chart.observation_codes.count)
        params = {"patient": chart.patient, "code": f"{LOINC}|{code}", "date": f"ge{SINCE}"}
        return "Observation", params, chart.since_by_code.get(code, 0)
    return "Condition", {"patient": chart.patient}, chart.conditions


def search_phase(
    net: Testnet, site: Site, charts: list[Chart], per_kind: int, warm_rounds: int
) -> dict[str, Any]:
    """Cold: each kind of query on patients never read before (disjoint sets, so that no query
    warms another's records). Warm: the same queries again, `warm_rounds` times."""
    usable = [c for c in charts if c.conditions > 0] or charts
    per_kind = min(per_kind, len(usable) // len(QUERIES))
    if per_kind < 1:
        raise RuntimeError(f"only {len(usable)} patients were ingested; too few to search")
    sets = {kind: usable[i * per_kind : (i + 1) * per_kind] for i, kind in enumerate(QUERIES)}
    cold: dict[str, list[float]] = {kind: [] for kind in QUERIES}
    warm: dict[str, list[float]] = {kind: [] for kind in QUERIES}
    wrong: list[str] = []
    meter = CpuMeter(net.cpu_groups(EHR_NODE))
    log(f"search: {per_kind} patients per query kind, cold then {warm_rounds} warm rounds")

    def one(http: httpx.Client, kind: str, chart: Chart, into: list[float]) -> None:
        if any(TERMINATING.values()):
            raise KeyboardInterrupt("terminated")
        path, params, expected = query_for(kind, chart)
        start = time.perf_counter()
        answer = http.get(f"/{path}", params=params)
        elapsed = time.perf_counter() - start
        if answer.status_code != 200:
            wrong.append(f"{kind}: HTTP {answer.status_code}: {answer.text[:200]}")
            return
        body = answer.json()
        found = sum(1 for e in body.get("entry", []) if e.get("search", {}).get("mode") == "match")
        if body.get("total") != expected or found != min(expected, 20):
            wrong.append(
                f"{kind}: total {body.get('total')} / {found} entries, expected {expected}"
            )
        into.append(elapsed)

    with site.client() as http:
        meter.start()
        for kind in QUERIES:
            for chart in sets[kind]:
                one(http, kind, chart, cold[kind])
        cold_cpu = meter.stop()
        meter.start()
        for _ in range(warm_rounds):
            for kind in QUERIES:
                for chart in sets[kind]:
                    one(http, kind, chart, warm[kind])
        warm_cpu = meter.stop()
    result: dict[str, Any] = {
        "patients_per_kind": per_kind,
        "queries": {
            kind: {
                "query": EXAMPLES[kind],
                "records_decrypted_cold_mean": statistics.mean(
                    c.conditions if kind == "conditions" else len(c.observation_codes)
                    for c in sets[kind]
                ),
                "cold_s": summary(cold[kind]),
                "warm_s": summary(warm[kind]),
            }
            for kind in QUERIES
        },
        "cold_all_s": summary([v for values in cold.values() for v in values]),
        "warm_all_s": summary([v for values in warm.values() for v in values]),
        "wrong_answers": len(wrong),
        "first_wrong_answer": wrong[0] if wrong else "",
        "cpu_cores_used_cold": cold_cpu,
        "cpu_cores_used_warm": warm_cpu,
    }
    for kind in QUERIES:
        q = result["queries"][kind]
        log(
            f"search {kind}: cold p50 {q['cold_s']['p50']:.3f}s p99 {q['cold_s']['p99']:.3f}s, "
            f"warm p50 {q['warm_s']['p50']:.3f}s p99 {q['warm_s']['p99']:.3f}s"
        )
    if wrong:
        log(f"search: {len(wrong)} unexpected answers, first: {wrong[0]}")
    return result


# -- report ------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    add = lines.append
    machine = results["machine"]
    add(f"medledger FHIR benchmark  {results['started']}  ({results['wall_seconds']:.0f}s)")
    add(f"machine: {machine['cores']} cores, {machine['cpu']}, Python {machine['python']}")
    loads = [machine.get("load_average_at_start"), machine.get("load_average_at_end")]
    add(
        "load average (1 min) at start / end: "
        + " / ".join(fmt(v[0], 1) if v else "-" for v in loads)
    )
    git = results.get("git", {})
    add(
        f"commit {git.get('rev', '?')}"
        + (" with uncommitted changes in src/" if git.get("src_uncommitted") else "")
    )
    base = results.get("raw_tps")
    if results.get("raw"):
        add("")
        add("Raw ledger baseline (member.rotate, closed loop, same network)")
    for step in results.get("raw", []):
        add(
            f"  {step['label']:<8} {fmt(step['tps']):>6} tx/s  p50 {fmt(step['latency_p50_s'], 2)}s"
            f"  p99 {fmt(step['latency_p99_s'], 2)}s  {fmt(step['mean_block_txs'])} txs/block"
        )
    if base:
        add(f"  baseline (mean)  {fmt(base)} tx/s")
    phases = results.get("ingest", [])
    if phases:
        add("")
        add(
            f"  {'FHIR ingest (transaction Bundles)':<34} {'res/s':>6} {'÷ raw':>6} "
            f"{'Bundles/s':>9} {'p50 s':>6} {'p99 s':>6}  cores: node0 app / other apps / "
            "cometbft / bench"
        )
        for phase in phases:
            ratio = phase["resources_per_s"] / base if base else float("nan")
            used = " ".join(f"{v:.2f}" for v in phase["cpu_cores_used"].values())
            add(
                f"  {phase['label']:<34} {fmt(phase['resources_per_s'], 1):>6} "
                f"{fmt(ratio, 3):>6} {fmt(phase['bundles_per_s'], 2):>9} "
                f"{fmt(phase['bundle_latency_s']['p50'], 2):>6} "
                f"{fmt(phase['bundle_latency_s']['p99'], 2):>6}  {used}"
            )
    search = results.get("search")
    if search:
        add("")
        add(
            f"Search latency, one client, sequential ({search['patients_per_kind']} patients "
            "per query; cold = first search about the patient)"
        )
        add(f"  {'query':<66} {'cold p50':>8} {'p99':>6} {'warm p50':>8} {'p99':>6}")
        for q in search["queries"].values():
            add(
                f"  {q['query']:<66} {fmt(q['cold_s']['p50'], 3):>8} "
                f"{fmt(q['cold_s']['p99'], 3):>6} {fmt(q['warm_s']['p50'], 3):>8} "
                f"{fmt(q['warm_s']['p99'], 3):>6}"
            )
        add(
            f"  all queries: cold p50 {fmt(search['cold_all_s']['p50'], 3)}s p99 "
            f"{fmt(search['cold_all_s']['p99'], 3)}s, warm p50 "
            f"{fmt(search['warm_all_s']['p50'], 3)}s p99 {fmt(search['warm_all_s']['p99'], 3)}s;"
            f" unexpected answers: {search['wrong_answers']}"
        )
    lines.extend(report_comparison(results))
    return lines


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs != theirs or ours != ours or theirs == 0:
        return None
    return ours / theirs


def compare(ours: dict[str, Any], hapi: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the comparison table: medledger, HAPI and medledger ÷ HAPI."""
    rows: list[dict[str, Any]] = []
    for key, label in (
        ("support", "ingest res/s, support Bundles (1 client)"),
        ("single", "ingest res/s, patient Bundles, 1 client"),
        ("concurrent", f"ingest res/s, patient Bundles, {ours['concurrent']['clients']} clients"),
    ):
        a, b = ours[key]["resources_per_s"], hapi[key]["resources_per_s"]
        rows.append({"row": label, "medledger": a, "hapi": b, "ratio": ratio(a, b), "unit": "/s"})
    if "search" in ours and "search" in hapi:
        for key, label in (("cold_all_s", "search p50, cold"), ("warm_all_s", "search p50, warm")):
            a, b = ours["search"][key]["p50"], hapi["search"][key]["p50"]
            rows.append(
                {"row": label, "medledger": a, "hapi": b, "ratio": ratio(a, b), "unit": "s"}
            )
        for kind in ours["search"]["queries"]:
            for when in ("cold", "warm"):
                a = ours["search"]["queries"][kind][f"{when}_s"]["p50"]
                b = hapi["search"]["queries"][kind][f"{when}_s"]["p50"]
                rows.append(
                    {
                        "row": f"  {kind} p50, {when}",
                        "medledger": a,
                        "hapi": b,
                        "ratio": ratio(a, b),
                        "unit": "s",
                    }
                )
    return rows


def report_comparison(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    add = lines.append
    servers = [results[k] for k in ("medledger", "hapi") if k in results]
    if not servers:
        if "synthea" in results and "skipped" in results["synthea"]:
            add("")
            add(f"Synthea comparison skipped: {results['synthea']['skipped']}")
        return lines
    add("")
    add("Synthea Bundles, medledger (4 validators) beside HAPI FHIR JPA 8.8.0 on PostgreSQL 15")
    for server in servers:
        add(f"  {server['server']}:")
        for key in ("support", "warmup", "single", "concurrent"):
            phase = server[key]
            settle = f" + {phase['settle_s']:.1f}s to all nodes" if phase["settle_s"] else ""
            add(
                f"    {phase['label']:<28} {phase['bundles_done']:>2}/{phase['bundles']} Bundles "
                f"{phase['accepted']:>5} accepted / {phase['entries']:>5} entries in "
                f"{phase['answered_s']:.1f}s{settle}: {fmt(phase['resources_per_s'], 1)}/s; "
                f"Bundle p50 {fmt(phase['bundle_latency_s']['p50'], 2)}s; cores "
                + " ".join(f"{k} {v:.2f}" for k, v in phase["cpu_cores_used"].items())
            )
            blocks = (
                f"{phase['blocks']} blocks ({fmt(phase['block_interval_s'], 2)}s apart), "
                if phase.get("blocks")
                else ""
            )
            add(
                f"        {phase['transactions']} transactions, {blocks}load average "
                f"{phase['load_average_1m_at_start']:.1f} at the start"
            )
            for reason, count in sorted(phase["refused"].items(), key=lambda kv: -kv[1])[:6]:
                add(f"        refused {count:>4}: {reason[:110]}")
        if "whole_bundle_post" in server:
            add(f"    one POST of a whole Synthea patient Bundle: {server['whole_bundle_post']}")
        search = server.get("search")
        if search:
            add(
                f"    search ({search['patients_per_kind']} patients per query): cold p50 "
                f"{fmt(search['cold_all_s']['p50'], 3)}s, warm p50 "
                f"{fmt(search['warm_all_s']['p50'], 3)}s; unexpected answers "
                f"{search['wrong_answers']}"
                + (f" ({search['wrong'][0]})" if search["wrong"] else "")
                + "; cores cold "
                + " ".join(f"{k} {v:.2f}" for k, v in search["cpu_cores_used_cold"].items())
            )
    rows = results.get("comparison")
    if rows:
        add("")
        add(f"  {'':<46} {'medledger':>10} {'HAPI':>10} {'ours ÷ HAPI':>11}")
        for row in rows:
            digits = 1 if row["unit"] == "/s" else 3
            add(
                f"  {row['row']:<46} {fmt(row['medledger'], digits):>10} "
                f"{fmt(row['hapi'], digits):>10} {fmt(row['ratio'], 3):>11}"
            )
        add("  (ingest: above 1 is faster than HAPI; search latency: above 1 is slower)")
        add("  queries: " + "; ".join(SYNTHEA_QUERIES.values()))
    return lines


def git_state() -> dict[str, Any]:
    """The commit measured, and whether src/ had uncommitted changes."""
    state: dict[str, Any] = {"rev": "?", "src_uncommitted": None}
    try:
        state["rev"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        porcelain = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        state["src_uncommitted"] = bool(porcelain.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def generated_phases(net: Testnet, site: Site, args: argparse.Namespace) -> dict[str, Any]:
    """Phases 2 and 3 (ingest of generated Bundles, search), as before the HAPI comparison."""
    out: dict[str, Any] = {"ingest": []}
    phase, charts = ingest_phase(
        net,
        site,
        label=f"new Patient + {args.observations} Obs + Cond.",
        clients=args.clients,
        warmup=args.warmup,
        seconds=args.seconds,
        observations=args.observations,
        target_bytes=args.target_bytes,
        seed_base=1_000,
    )
    out["ingest"].append(phase)
    searchable = charts
    if args.existing_seconds > 0 and charts:
        registered = charts[-args.clients :]
        searchable = charts[: -args.clients]
        phase, _ = ingest_phase(
            net,
            site,
            label=f"known patient, {args.observations} Obs + Cond.",
            clients=args.clients,
            warmup=args.warmup,
            seconds=args.existing_seconds,
            observations=args.observations,
            target_bytes=args.target_bytes,
            seed_base=500_000,
            existing=[c.patient for c in registered],
        )
        out["ingest"].append(phase)
    if not args.skip_search:
        out["search"] = search_phase(net, site, searchable, args.per_query, args.warm_rounds)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=6, help="concurrent FHIR clients")
    parser.add_argument("--observations", type=int, default=20, help="per generated Bundle")
    parser.add_argument("--target-bytes", type=int, default=2048)
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--seconds", type=float, default=25.0, help="measured s, new patients")
    parser.add_argument(
        "--existing-seconds",
        type=float,
        default=15.0,
        help="measured s of Bundles for registered patients (0: skip)",
    )
    parser.add_argument("--per-query", type=int, default=10, help="patients per search kind")
    parser.add_argument("--warm-rounds", type=int, default=4)
    parser.add_argument("--raw-members", type=int, default=2400)
    parser.add_argument("--raw-window", type=int, default=2000)
    parser.add_argument("--raw-warmup", type=float, default=3.0)
    parser.add_argument("--raw-seconds", type=float, default=8.0)
    parser.add_argument("--skip-search", action="store_true", help="no search phase at all")
    parser.add_argument(
        "--skip-generated",
        action="store_true",
        help="skip the raw ledger baseline and the generated-Bundle phases (1-3)",
    )
    parser.add_argument("--skip-hapi", action="store_true", help="no HAPI FHIR JPA server")
    parser.add_argument(
        "--skip-synthea", action="store_true", help="no Synthea comparison (phase 4) at all"
    )
    parser.add_argument("--synthea-dir", type=Path, default=SYNTHEA_DIR)
    parser.add_argument(
        "--synthea-limit",
        type=int,
        default=8,
        help="patient Bundles per phase (1 client, then as many others with --clients)",
    )
    parser.add_argument(
        "--warmup-bundles",
        type=int,
        default=6,
        help="generated Bundles each server ingests before the measured Synthea phases",
    )
    parser.add_argument("--hapi-heap", default="2g", help="HAPI's JVM heap (-Xmx/-Xms)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.synthea_limit < 2 and not (args.skip_synthea or args.skip_search):
        parser.error("--synthea-limit must be at least 2 for the searches (4 kinds of query)")

    started = time.monotonic()
    results: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([".venv/bin/python", "bench/fhir.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "git": git_state(),
        "settings": vars(args) | {"out": str(args.out), "synthea_dir": str(args.synthea_dir)},
        "raw": [],
        "ingest": [],
    }
    data = None
    if not args.skip_synthea:
        if args.synthea_dir.is_dir():
            data = load_synthea(args.synthea_dir, args.synthea_limit)
            results["synthea"] = {
                "dir": str(args.synthea_dir),
                "support": [p.name for p in data.support],
                "one_client": [p.path.name for p in data.phase_a],
                "concurrent": [p.path.name for p in data.phase_b],
            }
        else:
            log(f"no Synthea test data at {args.synthea_dir}: the HAPI comparison is skipped")
            results["synthea"] = {"skipped": f"{args.synthea_dir} not found"}
    comparison = dict(
        clients=args.clients,
        warmup_bundles=args.warmup_bundles,
        warm_rounds=args.warm_rounds,
        skip_search=args.skip_search,
    )
    with terminate_cleanly():
        if data is not None and not args.skip_hapi:
            log("HAPI FHIR JPA first, alone on the machine (--skip-hapi leaves it out)")
            with hapi_server("hapi", heap=args.hapi_heap) as hapi:
                results["hapi"] = run_server(HapiTarget(hapi), data, **comparison)
                results["hapi"]["startup_s"] = hapi.startup_s
                results["hapi"]["settings"] = hapi.settings
        with medledger_testnet("fhir", 33000) as net:
            site = None
            if not args.skip_generated:
                raw = enroll_rotators(net, args.raw_members)

                def baseline(label: str) -> None:
                    results["raw"].append(
                        measure_raw(
                            raw,
                            label,
                            warmup=args.raw_warmup,
                            seconds=args.raw_seconds,
                            window=args.raw_window,
                        )
                    )

                baseline("before")
                site = make_site(net)
                generated = generated_phases(net, site, args)
                results["ingest"] = generated["ingest"]
                if "search" in generated:
                    results["search"] = generated["search"]
            if data is not None:
                site = site or make_site(net)
                target = MedledgerTarget(net, site.base, site.key, CLIENT_ID, EHR_NODE)
                refusal = whole_file_refusal(target, data.spare[0]) if data.spare else "not tried"
                log(f"medledger: one POST of a whole Synthea patient Bundle: {refusal}")
                results["medledger"] = run_server(target, data, **comparison)
                results["medledger"]["whole_bundle_post"] = refusal
                results["medledger"]["replication_per_node"] = target.replication_status
                results["medledger"]["replication_lags_s"] = [
                    round(v, 2) for v in target.replication_lags
                ]
            if not args.skip_generated:
                baseline("after")
    if results["raw"]:
        results["raw_tps"] = statistics.mean(step["tps"] for step in results["raw"])
        for phase in results["ingest"]:
            phase["ratio_to_raw"] = phase["resources_per_s"] / results["raw_tps"]
    if "hapi" in results and "medledger" in results:
        results["comparison"] = compare(results["medledger"], results["hapi"])
    results["wall_seconds"] = time.monotonic() - started
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    print("\n".join(report(results)))
    path = write_results(results, args.out, "fhir")
    log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); every testnet this run started has been stopped")
        sys.exit(130)
