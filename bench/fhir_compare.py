"""The public Synthea Bundles into two FHIR servers, the same way into each, and the same
searches on both: what bench/fhir.py runs on HAPI FHIR JPA (bench/hapi_server.py) and on
medledger's 4-validator network.

Per server, in order:

1. the two support Bundles (Synthea's hospital and practitioner `batch` files: Organization,
   Location, Practitioner, PractitionerRole, each a conditional create), one client;
2. warm-up: a few generated transaction Bundles (a new Patient, lab Observations and
   Conditions whose performer is a support-Bundle Practitioner, by conditional reference),
   then the searches on two of their patients;
3. the patient Bundles of phase A with 1 client, then the other patient Bundles of phase B with
   6 concurrent clients (distinct Bundles: a Synthea Bundle creates its Patient without a
   condition, and medledger refuses a second patient with the same identifier);
4. the searches, cold (the first search about a patient) and warm (the same again).

How a Bundle is sent: to HAPI, the file as it is, one POST to the base. To medledger, as
`medledger import fhir` does by default (medledger.cli.bulk: Patients first, in transactions of
up to its DEFAULT_ENTRIES entries, references into earlier transactions rewritten) — one
transaction per Synthea file, whose Claims and ExplanationOfBenefits go to the claims ledger in
the same ledger transaction; entries it does not send count as refused. One POST of a whole
file is also tried once (with a file no phase uses) and its answer reported.

Resources per second count the entries of the transactions answered 200 (every entry
accepted), over the time from the first POST to the last answer; for medledger, also until
every node's package store holds every package (each node's `medledger_packages_missing` at
0 and every node at the height of the last commit): a record counts once it is on all four
nodes, and that figure is the one compared.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from bench.common import TERMINATING, CpuMeter, Testnet, log, summary, wait_rpc_height
from bench.hapi_server import HapiServer
from medledger.cli.bulk import (
    DEFAULT_ENTRIES,
    FileReport,
    Importer,
    SigningKey,
    SmartClient,
    creatable_types,
    plan_bundle,
)
from medledger.samples.fhir import generate_patient, generate_patient_record_set, sized_observation

Json = dict[str, Any]
FHIR_JSON = "application/fhir+json"
LOINC = "http://loinc.org"
SYNTHEA_SYSTEM = "https://github.com/synthetichealth/synthea"
NPI = "http://hl7.org/fhir/sid/us-npi"
SUPPORT_PREFIXES = ("hospitalInformation", "practitionerInformation")
HTTP_TIMEOUT = 600.0
PHASE_TIMEOUT = 1800.0
REPLICATION_TIMEOUT = 300.0
PAGE = 20
# Three typical EHR searches, and `category=survey`: the Synthea files here (its HIV
# module) have no laboratory Observations, and medledger's ledger indexes category, so
# `category=laboratory` finds nothing on either server without reading a record; most of their
# Observations are of category survey, which matches up to a page of records.
QUERIES = ("labs", "survey", "code", "conditions")
EXAMPLES = {
    "labs": "Observation?patient=X&category=laboratory&_count=20",
    "survey": "Observation?patient=X&category=survey&_count=20",
    "code": f"Observation?patient=X&code={LOINC}|<the patient's most frequent code>&_count=20",
    "conditions": "Condition?patient=X&_count=20",
}


# -- the test data -----------------------------------------------------------------------------


@dataclass
class PatientFile:
    """One patient Bundle (a Synthea file, or a generated warm-up Bundle) and what the searches
    should find about its patient."""

    path: Path
    bundle: Json
    entries: int
    categories: collections.Counter[str]  # Observations per category code
    codes: collections.Counter[str]  # Observations per LOINC code (the first LOINC coding)
    conditions: int

    @property
    def name(self) -> str:
        return "_".join(self.path.name.split("_")[:2])

    def top_code(self) -> str:
        return self.codes.most_common(1)[0][0] if self.codes else "none"


def patient_file(path: Path, bundle: Json | None = None) -> PatientFile:
    if bundle is None:
        bundle = json.loads(path.read_bytes())
    resources = [e["resource"] for e in bundle.get("entry", [])]
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    categories: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    for r in observations:
        categories.update(
            {
                str(c.get("code"))
                for category in r.get("category", [])
                for c in category.get("coding", [])
            }
        )
        loinc = [c["code"] for c in r.get("code", {}).get("coding", []) if c.get("system") == LOINC]
        if loinc:
            codes[loinc[0]] += 1
    conditions = sum(1 for r in resources if r["resourceType"] == "Condition")
    return PatientFile(path, bundle, len(resources), categories, codes, conditions)


@dataclass
class SyntheaSet:
    support: list[Path]
    phase_a: list[PatientFile]  # 1 client
    phase_b: list[PatientFile]  # concurrent clients
    spare: list[PatientFile]  # not ingested: one is POSTed whole to medledger, as HAPI gets it
    practitioner_npi: str  # a support-Bundle Practitioner, for the generated warm-up Bundles


def load_synthea(directory: Path, per_phase: int) -> SyntheaSet:
    """The support Bundles and 2 × `per_phase` distinct patient Bundles: those with at least one
    Condition first (so that every search kind has something to find), fewest entries first."""
    files = sorted(directory.glob("*.json"))
    support = [f for prefix in SUPPORT_PREFIXES for f in files if f.name.startswith(prefix)]
    if len(support) != len(SUPPORT_PREFIXES):
        raise RuntimeError(f"{directory}: the hospital and practitioner Bundles are missing")
    patients = [patient_file(f) for f in files if f not in support]
    patients.sort(key=lambda p: (p.conditions == 0, p.entries, p.path.name))
    if len(patients) < 2 * per_phase:
        raise RuntimeError(
            f"{directory} has {len(patients)} patient Bundles; {2 * per_phase} are needed "
            f"(--synthea-limit {per_phase} per phase)"
        )
    practitioners = json.loads(support[1].read_bytes())["entry"]
    npi = next(
        i["value"]
        for e in practitioners
        if e["resource"]["resourceType"] == "Practitioner"
        for i in e["resource"].get("identifier", [])
        if i.get("system") == NPI
    )
    return SyntheaSet(
        support,
        patients[:per_phase],
        patients[per_phase : 2 * per_phase],
        patients[2 * per_phase :],
        npi,
    )


def clinical_entries(
    seed: int,
    reference: str,
    author: str,
    observations: int,
    target_bytes: int,
    *,
    with_ids: bool = True,
) -> list[Json]:
    """Transaction entries about the patient `reference`: `observations` sized lab Observations
    and (up to two of) its Conditions by `author`, each a POST with a `urn:uuid:` fullUrl;
    without their generated ids unless `with_ids`."""
    entries: list[Json] = []
    for i in range(observations):
        observation = sized_observation(
            seed * 1000 + i, target_bytes, patient_ref=reference, author_ref=author
        )
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": observation,
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    chart = generate_patient_record_set(
        seed, reference, author, when="2025-01-01T00:00:00Z", count=30
    )
    for condition in [r for r in chart if r["resourceType"] == "Condition"][:2]:
        if not with_ids:
            del condition["id"]
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": condition,
                "request": {"method": "POST", "url": "Condition"},
            }
        )
    return entries


def warmup_bundle(seed: int, npi: str, observations: int = 20) -> tuple[Json, PatientFile]:
    """A generated transaction Bundle (a new Patient with a Synthea-style identifier, lab
    Observations and Conditions by a support-Bundle Practitioner) and what searches find."""
    patient = generate_patient(seed)
    del patient["id"]
    value = str(uuid.uuid5(uuid.NAMESPACE_URL, f"medledger-bench-warmup-{seed}-{time.time()}"))
    patient["identifier"].insert(0, {"system": SYNTHEA_SYSTEM, "value": value})
    reference = f"urn:uuid:{uuid.uuid4()}"
    author = f"Practitioner?identifier={NPI}|{npi}"
    entries: list[Json] = [
        {"fullUrl": reference, "resource": patient, "request": {"method": "POST", "url": "Patient"}}
    ]
    entries += clinical_entries(seed, reference, author, observations, 2048, with_ids=False)
    bundle: Json = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    info = patient_file(Path(f"generated-{seed}.json"), bundle)
    return bundle, info


# -- the two servers -----------------------------------------------------------------------------


@dataclass
class Sent:
    """One Bundle file sent: entries accepted (in transactions answered 200) and refused."""

    name: str
    entries: int
    accepted: int
    refused: dict[str, int]
    transactions: int
    started: float
    finished: float
    patient_id: str | None = None
    error: str = ""


class Sender(Protocol):
    """One client of a server: sends a Bundle (a transaction, or a batch for the support
    files) and says what happened to its entries."""

    def send(self, name: str, bundle: Json) -> Sent: ...
    def close(self) -> None: ...


class Target(Protocol):
    name: str
    base: str

    def sender(self) -> Sender: ...
    def search_headers(self) -> dict[str, str]: ...
    def cpu(self) -> Callable[[], dict[str, float]]: ...
    def settle(self) -> float: ...
    def height(self) -> int | None: ...


def outcome_text(answer: httpx.Response) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        issues = answer.json().get("issue") or []
        texts = [str(i.get("diagnostics") or i.get("details", {}).get("text", "")) for i in issues]
        if any(texts):
            return f"HTTP {answer.status_code}: {'; '.join(t for t in texts if t)[:300]}"
    return f"HTTP {answer.status_code}: {answer.text[:300]}"


def patient_location(response: Json) -> str | None:
    for entry in response.get("entry") or []:
        location = str((entry.get("response") or {}).get("location", ""))
        if location.startswith("Patient/"):
            return location.split("/")[1]
    return None


class HapiSender:
    def __init__(self, base: str) -> None:
        self.http = httpx.Client(
            base_url=base,
            timeout=HTTP_TIMEOUT,
            headers={"Accept": FHIR_JSON, "Content-Type": FHIR_JSON},
        )

    def send(self, name: str, bundle: Json) -> Sent:
        entries = len(bundle.get("entry") or [])
        started = time.monotonic()
        try:
            answer = self.http.post("", content=json.dumps(bundle))
        except httpx.HTTPError as exc:
            now = time.monotonic()
            return Sent(name, entries, 0, {repr(exc)[:200]: entries}, 0, started, now, None, "")
        finished = time.monotonic()
        if answer.status_code != 200:
            reason = outcome_text(answer)
            return Sent(name, entries, 0, {reason: entries}, 0, started, finished, None, reason)
        body = answer.json()
        refused: dict[str, int] = {}
        accepted = 0
        for entry in body.get("entry") or []:
            status = str((entry.get("response") or {}).get("status", ""))
            if status[:1] == "2":
                accepted += 1
            else:
                refused[f"entry status {status}"] = refused.get(f"entry status {status}", 0) + 1
        return Sent(name, entries, accepted, refused, 1, started, finished, patient_location(body))

    def close(self) -> None:
        self.http.close()


@dataclass
class HapiTarget:
    server: HapiServer
    name: str = "HAPI FHIR JPA"
    base: str = ""

    def __post_init__(self) -> None:
        self.base = self.server.base

    def sender(self) -> Sender:
        return HapiSender(self.base)

    def search_headers(self) -> dict[str, str]:
        return {"Accept": FHIR_JSON}

    def cpu(self) -> Callable[[], dict[str, float]]:
        meter = self.server.cpu_meter()
        meter.start()
        return meter.stop

    def settle(self) -> float:
        return 0.0  # committed in PostgreSQL (fsync on) when answered: nothing to wait for

    def height(self) -> int | None:
        return None


class MedledgerSender:
    """`medledger import fhir`'s importer as a library: the file in transactions of at most 100
    entries of the types the node stores."""

    def __init__(self, base: str, smart_key: Any, client_id: str, supported: frozenset[str]):
        self.http = httpx.Client(timeout=HTTP_TIMEOUT)
        self.base = base
        self.smart = SmartClient(
            self.http, base, client_id, SigningKey(smart_key, "EdDSA", None), "system/*.cruds"
        )
        self.supported = supported

    def send(self, name: str, bundle: Json) -> Sent:
        started = time.monotonic()
        report = FileReport(name)
        entries = len(bundle.get("entry") or [])
        try:
            plan = plan_bundle(bundle, self.supported, DEFAULT_ENTRIES)
            Importer(self.http, self.smart, self.base).run(plan, report)
        except Exception as exc:  # a refusal of the whole file: report it, go on
            report.error = repr(exc)[:300]
        finished = time.monotonic()
        refused: dict[str, int] = {}
        for skipped in report.skipped:
            key = f"not stored: {skipped.resource_type}" if skipped.unsupported else skipped.reason
            refused[key] = refused.get(key, 0) + 1
        for failed in report.failed:
            key = f"{failed.resource_type}: {failed.reason[:160]}"
            refused[key] = refused.get(key, 0) + 1
        if report.error:
            refused[report.error] = entries - len(report.imported) - sum(refused.values())
        patient = next((i.id for i in report.imported if i.resource_type == "Patient"), None)
        return Sent(
            name,
            entries,
            len(report.imported),
            refused,
            report.transactions,
            started,
            finished,
            patient,
            report.error or "",
        )

    def close(self) -> None:
        self.http.close()


@dataclass
class MedledgerTarget:
    net: Testnet
    base: str
    key: Any  # the SMART client's Ed25519 private key
    client_id: str
    node: int
    name: str = "medledger"
    supported: frozenset[str] = frozenset()
    replication_lags: list[float] = field(default_factory=list)
    replication_status: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        with httpx.Client(timeout=60) as http:
            self.supported = creatable_types(http, self.base)

    def sender(self) -> Sender:
        return MedledgerSender(self.base, self.key, self.client_id, self.supported)

    def search_headers(self) -> dict[str, str]:
        """A new access token (they last 5 minutes; the search renews on a 401)."""
        with httpx.Client(timeout=60) as http:
            smart = SmartClient(
                http,
                self.base,
                self.client_id,
                SigningKey(self.key, "EdDSA", None),
                "system/*.cruds",
            )
            token = smart.token()
        return {"Authorization": f"Bearer {token}", "Accept": FHIR_JSON}

    def cpu(self) -> Callable[[], dict[str, float]]:
        meter = CpuMeter(self.net.cpu_groups(self.node))
        meter.start()
        return meter.stop

    def height(self) -> int | None:
        status = httpx.get(f"http://127.0.0.1:{self.net.ports[self.node]}/status", timeout=10)
        return int(status.json()["result"]["sync_info"]["latest_block_height"])

    def settle(self) -> float:
        """Until every node is at node0's height and holds every committed package."""
        started = time.monotonic()
        height = self.height()
        assert height is not None
        wait_rpc_height(self.net.ports, height, REPLICATION_TIMEOUT)
        deadline = started + REPLICATION_TIMEOUT
        while True:
            missing = self.net.packages_missing()
            if all(m == 0 for m in missing):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"packages still missing after {REPLICATION_TIMEOUT}s: {missing}"
                )
            time.sleep(0.1)
        lag = time.monotonic() - started
        self.replication_lags.append(lag)
        self.replication_status = self.net.replication_status()
        log(f"replication per node: {self.replication_status}")
        return lag


def whole_file_refusal(target: MedledgerTarget, patient: PatientFile) -> str:
    """What medledger answers to one POST of a Synthea patient Bundle as it is."""
    headers = target.search_headers() | {"Content-Type": FHIR_JSON}
    with httpx.Client(base_url=target.base, timeout=HTTP_TIMEOUT, headers=headers) as http:
        answer = http.post("", content=json.dumps(patient.bundle))
    if answer.status_code == 200:
        return "HTTP 200 (accepted whole)"
    return outcome_text(answer)


# -- ingest ---------------------------------------------------------------------------------------


def ingest(
    target: Target,
    label: str,
    work: list[tuple[str, Json]],
    clients: int,
) -> tuple[dict[str, Any], list[Sent]]:
    """`clients` threads take (name, Bundle) from a queue and send them, each with its own HTTP
    client; then the target settles (medledger: replication to every node)."""
    todo: queue.Queue[tuple[str, Json]] = queue.Queue()
    for item in work:
        todo.put(item)
    done: list[Sent] = []
    lock = threading.Lock()
    errors: list[str] = []
    senders = [target.sender() for _ in range(clients)]

    def client(sender: Sender) -> None:
        while not any(TERMINATING.values()):
            try:
                name, bundle = todo.get_nowait()
            except queue.Empty:
                return
            try:
                sent = sender.send(name, bundle)
            except Exception as exc:
                with lock:
                    errors.append(f"{name}: {exc!r}"[:300])
                continue
            with lock:
                done.append(sent)

    threads = [
        threading.Thread(target=client, args=(s,), name=f"{label}-{i}", daemon=True)
        for i, s in enumerate(senders)
    ]
    log(f"{target.name}: {label}: {len(work)} Bundles, {clients} client(s)")
    load = os.getloadavg()[0]
    first_height = target.height()
    stop_cpu = target.cpu()
    started = time.monotonic()
    deadline = started + PHASE_TIMEOUT
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: not done in {PHASE_TIMEOUT:.0f}s")
                if any(TERMINATING.values()):
                    raise KeyboardInterrupt("terminated")
                thread.join(0.5)
    finally:
        for sender in senders:
            sender.close()
    answered = time.monotonic()
    cpu = stop_cpu()
    last_height = target.height()
    settle = target.settle()
    ended = time.monotonic()
    accepted = sum(s.accepted for s in done)
    refused: dict[str, int] = {}
    for s in done:
        for reason, count in s.refused.items():
            refused[reason] = refused.get(reason, 0) + count
    answered_s = answered - started
    total_s = ended - started
    result: dict[str, Any] = {
        "label": label,
        "clients": clients,
        "bundles": len(work),
        "bundles_done": len(done),
        "entries": sum(s.entries for s in done),
        "accepted": accepted,
        "refused": refused,
        "refused_total": sum(refused.values()),
        "transactions": sum(s.transactions for s in done),
        "answered_s": round(answered_s, 2),
        "settle_s": round(settle, 2),
        "total_s": round(total_s, 2),
        "resources_per_s_answered": accepted / answered_s if answered_s > 0 else 0.0,
        "resources_per_s": accepted / total_s if total_s > 0 else 0.0,
        "bundle_latency_s": summary([s.finished - s.started for s in done]),
        "per_bundle": [
            {
                "name": s.name,
                "entries": s.entries,
                "accepted": s.accepted,
                "transactions": s.transactions,
                "seconds": round(s.finished - s.started, 2),
                "error": s.error,
            }
            for s in done
        ],
        "errors": errors,
        "cpu_cores_used": cpu,
        "load_average_1m_at_start": round(load, 2),
    }
    if first_height is not None and last_height is not None:
        blocks = last_height - first_height
        result["blocks"] = blocks
        result["block_interval_s"] = round(answered_s / blocks, 3) if blocks else None
    log(
        f"{target.name}: {label}: {accepted} entries accepted in {total_s:.1f}s "
        f"({result['resources_per_s']:.1f}/s; answered after {answered_s:.1f}s, then "
        f"{settle:.1f}s to settle), refused {result['refused_total']}, cores {cpu}"
        + (f"; errors: {errors[0]}" if errors else "")
    )
    return result, done


# -- search ---------------------------------------------------------------------------------------


def query_for(kind: str, patient: str, info: PatientFile) -> tuple[str, dict[str, str], int]:
    if kind in ("labs", "survey"):
        category = "laboratory" if kind == "labs" else "survey"
        params = {"patient": patient, "category": category, "_count": str(PAGE)}
        return "Observation", params, info.categories.get(category, 0)
    if kind == "code":
        code = info.top_code()
        params = {"patient": patient, "code": f"{LOINC}|{code}", "_count": str(PAGE)}
        return "Observation", params, info.codes.get(code, 0)
    return "Condition", {"patient": patient, "_count": str(PAGE)}, info.conditions


def search(
    target: Target,
    patients: list[tuple[str, PatientFile]],
    warmup: list[tuple[str, PatientFile]],
    warm_rounds: int,
) -> dict[str, Any]:
    """Warm-up searches on the warm-up patients; then each kind of query on its own patients
    (disjoint sets, the same files on every server): cold, the first search about the patient;
    warm, the same `warm_rounds` more times."""
    per_kind = len(patients) // len(QUERIES)
    if per_kind < 1:
        raise RuntimeError(f"{target.name}: only {len(patients)} patients to search")
    sets = {kind: patients[i * per_kind : (i + 1) * per_kind] for i, kind in enumerate(QUERIES)}
    cold: dict[str, list[float]] = {k: [] for k in QUERIES}
    warm: dict[str, list[float]] = {k: [] for k in QUERIES}
    wrong: list[str] = []

    def one(http: httpx.Client, kind: str, patient: str, info: PatientFile) -> float:
        if any(TERMINATING.values()):
            raise KeyboardInterrupt("terminated")
        path, params, expected = query_for(kind, patient, info)
        started = time.perf_counter()
        answer = http.get(f"/{path}", params=params)
        elapsed = time.perf_counter() - started
        if answer.status_code == 401:  # the access token expired: a new one, once
            http.headers.update(target.search_headers())
            started = time.perf_counter()
            answer = http.get(f"/{path}", params=params)
            elapsed = time.perf_counter() - started
        if answer.status_code != 200:
            wrong.append(f"{kind} {info.name}: {outcome_text(answer)}")
            return elapsed
        body = answer.json()
        found = sum(
            1
            for e in body.get("entry") or []
            if (e.get("search") or {}).get("mode", "match") == "match"
        )
        total = body.get("total")
        if found != min(expected, PAGE) or (total is not None and total != expected):
            wrong.append(f"{kind} {info.name}: total {total}, {found} entries; expected {expected}")
        return elapsed

    log(f"{target.name}: search, {per_kind} patients per query kind, cold then {warm_rounds} warm")
    load = os.getloadavg()[0]
    headers = target.search_headers()
    with httpx.Client(base_url=target.base, timeout=HTTP_TIMEOUT, headers=headers) as http:
        for _ in range(2):
            for patient, info in warmup:
                for kind in QUERIES:
                    one(http, kind, patient, info)
        wrong.clear()
        stop_cpu = target.cpu()
        for kind in QUERIES:
            for patient, info in sets[kind]:
                cold[kind].append(one(http, kind, patient, info))
        cold_cpu = stop_cpu()
        stop_cpu = target.cpu()
        for _ in range(warm_rounds):
            for kind in QUERIES:
                for patient, info in sets[kind]:
                    warm[kind].append(one(http, kind, patient, info))
        warm_cpu = stop_cpu()
    result: dict[str, Any] = {
        "patients_per_kind": per_kind,
        "queries": {
            kind: {
                "query": EXAMPLES[kind],
                "expected_totals": [query_for(kind, p, i)[2] for p, i in sets[kind]],
                "patient_observations": [sum(i.codes.values()) for _, i in sets[kind]],
                "cold_s": summary(cold[kind]),
                "warm_s": summary(warm[kind]),
            }
            for kind in QUERIES
        },
        "cold_all_s": summary([v for values in cold.values() for v in values]),
        "warm_all_s": summary([v for values in warm.values() for v in values]),
        "wrong_answers": len(wrong),
        "wrong": wrong[:10],
        "cpu_cores_used_cold": cold_cpu,
        "cpu_cores_used_warm": warm_cpu,
        "load_average_1m_at_start": round(load, 2),
    }
    for kind in QUERIES:
        q = result["queries"][kind]
        log(
            f"{target.name}: search {kind}: cold p50 {q['cold_s']['p50']:.3f}s, "
            f"warm p50 {q['warm_s']['p50']:.3f}s"
        )
    if wrong:
        log(f"{target.name}: {len(wrong)} unexpected search answers, first: {wrong[0]}")
    return result


# -- one server, the whole comparison ------------------------------------------------------------


def run_server(
    target: Target,
    data: SyntheaSet,
    *,
    clients: int,
    warmup_bundles: int,
    warm_rounds: int,
    skip_search: bool,
) -> dict[str, Any]:
    """Everything bench/fhir.py compares, on one server (see the module's docstring)."""
    out: dict[str, Any] = {"server": target.name}
    started = time.monotonic()
    support = [(p.name, json.loads(p.read_bytes())) for p in data.support]
    out["support"], _ = ingest(target, "support Bundles", support, 1)
    warm = [warmup_bundle(90_000 + i, data.practitioner_npi) for i in range(warmup_bundles)]
    out["warmup"], warm_sent = ingest(
        target,
        "warm-up (generated Bundles)",
        [(info.path.name, bundle) for bundle, info in warm],
        min(clients, max(1, warmup_bundles)),
    )
    by_name = {info.path.name: info for _, info in warm}
    warm_patients = [(s.patient_id, by_name[s.name]) for s in warm_sent if s.patient_id][:2]
    out["single"], single = ingest(
        target, "1 client", [(p.path.name, p.bundle) for p in data.phase_a], 1
    )
    out["concurrent"], concurrent = ingest(
        target, f"{clients} clients", [(p.path.name, p.bundle) for p in data.phase_b], clients
    )
    files = {p.path.name: p for p in [*data.phase_a, *data.phase_b]}
    ids = {s.name: s.patient_id for s in [*single, *concurrent] if s.patient_id}
    out["patient_ids"] = ids
    if not skip_search:
        patients = [
            (ids[p.path.name], p) for p in [*data.phase_a, *data.phase_b] if p.path.name in ids
        ]
        missing = sorted(set(files) - set(ids))
        if missing:
            log(f"{target.name}: no Patient id for {missing}: not searched")
        out["search"] = search(
            target, patients, [(p, i) for p, i in warm_patients if p], warm_rounds
        )
    out["wall_s"] = round(time.monotonic() - started, 1)
    return out
