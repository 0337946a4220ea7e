"""The portal in a real browser (Debian's headless Chromium driven by Playwright) against a
running 4-validator network: a patient shares with a clinician at another organization, who
reads; the patient revokes and the clinician is refused; the patient sees both accesses and an
emergency access flagged; an auditor's page verifies each proof against the signed header and
catches a tampered one; the explorer shows new blocks; a wrong passphrase, an expired session
and a forged form are refused. Every page is photographed into docs/screenshots/."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from portal_network import IDLE_SECONDS, MEMBER_PASSPHRASE, Cast, portal_cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_network import assert_own_state_read_in_process, services_counters

playwright_sync = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.e2e

BASE_PORT = 29600
CHROMIUM = "/usr/bin/chromium"
# An offline machine: no first-run, sync, update, QUIC or background fetches.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
PATIENT = "patient-ana-silva"
HOME_DOCTOR = "dr-hugo-lind"
CLINICIAN = "dr-nadia-okoye"
EMERGENCY = "dr-erik-vance"
LAB_TECH = "lab-tech-mei-wong"
AUDITOR = "auditor-rosa-diaz"


@pytest.fixture(scope="module")
def cast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cast]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (scripts/setup.sh installs Debian's chromium)")
    with portal_cast(tmp_path_factory.mktemp("portal"), BASE_PORT) as people:
        yield people


@pytest.fixture(scope="module")
def browser(cast: Cast) -> Iterator[Any]:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_sync.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Person:
    """One person's browser tab, with the script errors it saw."""

    def __init__(self, browser: Any, cast: Cast, name: str, viewport: dict[str, int]) -> None:
        self.context = browser.new_context(viewport=viewport, accept_downloads=True)
        self.page = self.context.new_page()
        self.base = cast.url(name)
        self.name = name
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", self._console)

    def _console(self, message: Any) -> None:
        # A 4xx page (a refusal) is logged as a failed load; only script errors count.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def goto(self, path: str) -> Any:
        return self.page.goto(self.base + path)

    def sign_in(self, passphrase: str = MEMBER_PASSPHRASE) -> Any:
        self.goto("/login")
        self.page.get_by_label("Name of your key").fill(self.name)
        self.page.get_by_label("Passphrase").fill(passphrase)
        with self.page.expect_navigation():
            self.page.get_by_role("button", name="Sign in").click()
        return self.page

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"script errors in {self.name}'s pages: {self.errors}"


@pytest.fixture
def open_tab(browser: Any, cast: Cast) -> Iterator[Any]:
    tabs: list[Person] = []

    def open_(name: str, viewport: dict[str, int] = DESKTOP, sign_in: bool = True) -> Person:
        tab = Person(browser, cast, name, viewport)
        tabs.append(tab)
        if sign_in:
            tab.sign_in()
        return tab

    yield open_
    for tab in tabs:
        tab.close()


def _wait_for_proofs(page: Any) -> str:
    summary = page.locator("#proof-summary")
    page.wait_for_function(
        "document.getElementById('proof-summary').dataset.state === 'ok'"
        " || document.getElementById('proof-summary').dataset.state === 'bad'",
        timeout=20_000,
    )
    return str(summary.get_attribute("data-state"))


def _lab_record(cast: Cast) -> str:
    """A lab result of the patient's chart (version 1, written at the patient's hospital)."""
    client = cast.client(HOME_DOCTOR)
    try:
        for record_id in cast.records:
            history = client.history(record_id)
            latest = history.versions[-1]
            if latest.category == "laboratory" and history.head.latest == 1:
                return record_id
    finally:
        client.close()
    raise AssertionError("the chart has no lab result")


def test_a_wrong_passphrase_is_refused(open_tab: Any) -> None:
    patient = open_tab(PATIENT, sign_in=False)
    patient.goto("/login")
    patient.shot("signin")
    page = patient.sign_in("not my passphrase")
    assert "/login" in page.url
    assert page.locator("#signin-error").inner_text() == "Wrong name or passphrase."
    # Nothing behind the sign-in page opens without a session.
    patient.goto("/patient")
    assert page.url.endswith("/portal/login")


def test_consent_lets_a_clinician_read_until_the_patient_revokes(open_tab: Any, cast: Cast) -> None:
    patient = open_tab(PATIENT)
    page = patient.page
    assert page.url.endswith("/portal/patient")
    assert page.get_by_role("heading", name="My records").is_visible()
    assert page.locator(".timeline .card").count() >= 8
    assert "reference" in page.locator(".timeline").inner_text()
    patient.shot("patient-timeline")
    phone = open_tab(PATIENT, PHONE)
    phone.shot("patient-timeline-phone")

    # The amended lab result shows its version history.
    page.locator(".card", has_text="version 2").get_by_role("link").first.click()
    assert page.locator("table tbody tr").count() == 2
    assert "superseded" in page.locator("table").inner_text()
    patient.shot("patient-record")

    # Share everything, for treatment, with a clinician at another organization.
    clinician_id = cast.people[CLINICIAN].id
    patient.goto("/patient/consents")
    page.select_option("#grantee", f"member:{clinician_id}")
    with page.expect_navigation():
        page.get_by_role("button", name="Grant consent").click()
    assert "granted" in page.locator(".notice").first.inner_text()
    consent = page.locator(".consent", has_text="active").first
    assert clinician_id[:12] in consent.inner_text()
    patient.shot("patient-consents")

    # The clinician finds the patient among those who shared, and reads a lab result; the
    # portal reads its node's ledger state in-process, never through its RPC.
    clinician_node = cast.network.configs[cast.people[CLINICIAN].node]
    before = services_counters(clinician_node)
    clinician = open_tab(CLINICIAN)
    cpage = clinician.page
    patient_id = cast.people[PATIENT].id
    shared = cpage.locator(".shared-patient", has_text=patient_id[:12])
    assert shared.count() == 1
    clinician.shot("clinician-home")
    shared.get_by_role("link").click()
    cpage.wait_for_load_state()
    clinician.shot("clinician-patient")
    record_id = _lab_record(cast)
    row = cpage.locator(f'tr[data-record="{record_id}"]')
    with cpage.expect_navigation():
        row.get_by_role("button", name="Read", exact=True).click()
    summary = cpage.locator("#record-summary").inner_text()
    assert re.search(r"\d", summary) and "reference" in summary
    assert "consent" in cpage.locator("main").inner_text()
    clinician.shot("clinician-record")
    assert_own_state_read_in_process(before, services_counters(clinician_node))

    # One click revokes; the clinician's next read is refused by the ledger.
    patient.goto("/patient/consents")
    with page.expect_navigation():
        page.locator(".consent", has_text=clinician_id[:12]).get_by_role(
            "button", name=re.compile("Revoke")
        ).click()
    assert "revoked" in page.locator(".notice").first.inner_text()
    clinician.goto(f"/clinician/patients/{patient_id}")
    with cpage.expect_navigation():
        row.get_by_role("button", name="Read", exact=True).click()
    assert cpage.get_by_role("heading", name="Access denied").is_visible()
    assert "revoked" in cpage.locator("#denial-reason").inner_text()
    clinician.shot("clinician-denied")

    # The patient sees both: the read that was granted and the one that was denied, each
    # verified in the page against the signed header.
    patient.goto("/patient/access")
    rows = page.locator("tr.proof-row", has_text=clinician_id[:12])
    assert rows.count() == 2
    assert rows.nth(0).locator(".badge-denied").count() == 1  # newest first
    assert "granted" in rows.nth(1).inner_text()
    assert _wait_for_proofs(page) == "ok"
    patient.shot("patient-access")


def test_a_clinician_adds_and_amends_a_record(open_tab: Any, cast: Cast) -> None:
    doctor = open_tab(HOME_DOCTOR)
    page = doctor.page
    patient_id = cast.people[PATIENT].id
    doctor.goto(f"/clinician/patients/{patient_id}")
    page.get_by_role("link", name="Add a record").click()
    page.get_by_label("Lab result").check()
    page.get_by_label("Name (test, condition or medication)").fill("Hemoglobin A1c")
    page.get_by_label("Code (LOINC, SNOMED CT or RxNorm; optional)").fill("4548-4")
    page.get_by_label("Value").fill("7.2")
    page.get_by_label("Unit (UCUM)").fill("%")
    page.get_by_label("Reference low").fill("4.0")
    page.get_by_label("Reference high").fill("5.6")
    doctor.shot("clinician-new-record")
    with page.expect_navigation():
        page.get_by_role("button", name="Write the record").click()
    notice = page.locator(".notice").first.inner_text()
    assert "Observation record" in notice and "written" in notice
    record_id = notice.split("record ")[1].split(" ")[0]

    doctor.goto(f"/clinician/records/{record_id}/amend")
    text = page.locator("#resource").input_value()
    resource = json.loads(text)
    assert resource["valueQuantity"]["value"] == 7.2
    resource["note"] = [{"text": "Repeat test ordered"}]
    page.locator("#resource").fill(json.dumps(resource, indent=2))
    doctor.shot("clinician-amend")
    with page.expect_navigation():
        page.get_by_role("button", name="Write the new version").click()
    assert "version 2" in page.locator(".notice").first.inner_text()

    # A grant without reading: the author's organization's basis, for a purpose.
    row = page.locator(f'tr[data-record="{record_id}"]')
    row.locator("select").select_option("operations")
    with page.expect_navigation():
        row.get_by_role("button", name="Request access only").click()
    assert page.get_by_role("heading", name="Access granted").is_visible()
    details = page.locator("main").inner_text()
    assert "author-organization" in details and "operations" in details


def test_an_emergency_access_is_flagged_for_the_patient(open_tab: Any, cast: Cast) -> None:
    doctor = open_tab(EMERGENCY)
    page = doctor.page
    patient_id = cast.people[PATIENT].id
    doctor.goto(f"/clinician/patients/{patient_id}")
    glass = page.locator("section.glass")
    glass.scroll_into_view_if_needed()
    page.select_option("#glass-reason", "patient-unconscious")
    page.get_by_label(re.compile("This is an emergency")).check()
    doctor.shot("clinician-break-the-glass")
    with page.expect_navigation():
        page.get_by_role("button", name="Break the glass and read").click()
    assert "Emergency access" in page.locator(".notice").first.inner_text()

    patient = open_tab(PATIENT)
    patient.goto("/patient/access")
    flagged = patient.page.locator("tr.emergency")
    assert flagged.count() == 1
    assert "EMERGENCY" in flagged.inner_text()
    assert cast.people[EMERGENCY].id[:12] in flagged.inner_text()
    assert "emergency access" in patient.page.locator(".notice-warning").inner_text()
    patient.shot("patient-access-emergency")


def test_the_auditor_verifies_each_proof_and_catches_a_tampered_one(
    open_tab: Any, cast: Cast
) -> None:
    auditor = open_tab(AUDITOR)
    page = auditor.page
    patient_id = cast.people[PATIENT].id
    page.get_by_label("Patient's member id").fill(patient_id)
    with page.expect_navigation():
        page.get_by_role("button", name="Show").click()
    assert _wait_for_proofs(page) == "ok"
    summary = page.locator("#proof-summary").inner_text()
    assert "verified in this browser" in summary and "voting power" in summary
    for heading in ("Accounting of disclosures", "Denied requests", "Emergency accesses"):
        assert page.get_by_role("heading", name=re.compile(heading)).is_visible()
    statuses = page.locator(".proof-status")
    assert statuses.count() >= 4
    assert all(s.get_attribute("data-state") == "ok" for s in statuses.all())
    auditor.shot("auditor")

    # A proof altered in the page no longer leads to the signed audit root.
    page.evaluate(
        """() => { const row = document.querySelector('tr.proof-row');
                   row.dataset.proof = btoa(String.fromCharCode(...new Uint8Array(32)))
                       + (row.dataset.proof.includes(',')
                          ? row.dataset.proof.slice(row.dataset.proof.indexOf(',')) : ''); }"""
    )
    page.get_by_role("button", name="Check again").click()
    assert _wait_for_proofs(page) == "bad"
    first = page.locator("tr.proof-row").first.locator(".proof-status")
    assert first.get_attribute("data-state") == "bad"
    assert "inclusion proof" in first.inner_text()
    assert page.locator('.proof-status[data-state="ok"]').count() == statuses.count() - 1
    first.scroll_into_view_if_needed()
    auditor.shot("auditor-tampered")

    # The period filters the accounting: nothing happened after tomorrow.
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    auditor.goto(f"/auditor?patient={patient_id}&from={tomorrow}")
    assert page.get_by_role("heading", name="Accounting of disclosures (0)").is_visible()


def test_the_explorer_shows_new_blocks(open_tab: Any, cast: Cast) -> None:
    member = open_tab(AUDITOR)
    page = member.page
    member.goto("/explorer")
    first = int(page.locator("#network-height").inner_text())
    assert page.locator("#validators tbody tr").count() == 4
    assert page.locator("#validators .badge-ok").count() == 4
    member.shot("explorer")
    deadline = time.monotonic() + 30
    while True:
        page.reload()
        later = int(page.locator("#network-height").inner_text())
        if later > first:
            break
        assert time.monotonic() < deadline, "no new block in 30 s"
        time.sleep(1)
    top = page.locator("#blocks tbody tr").first.locator("td").first.inner_text()
    assert int(top) == later

    client = cast.client(HOME_DOCTOR)
    try:
        height = client.history(cast.records[0]).versions[0].height
    finally:
        client.close()
    member.goto(f"/explorer/blocks/{height}")
    txs = page.locator("#txs").inner_text()
    assert "record.put-many" in txs and "ok" in txs
    member.shot("explorer-block")


def test_an_idle_session_expires(open_tab: Any) -> None:
    lab = open_tab(LAB_TECH)
    page = lab.page
    assert page.url.endswith("/portal/clinician")
    time.sleep(IDLE_SECONDS + 1.5)
    page.reload()
    assert "/login?expired=1" in page.url
    assert "expired" in page.locator(".notice").first.inner_text()
    lab.shot("session-expired")


def test_a_forged_form_is_refused(open_tab: Any, cast: Cast) -> None:
    patient = open_tab(PATIENT)
    page = patient.page
    patient.goto("/patient/consents")
    before = page.locator(".consent").count()
    page.evaluate("document.querySelector('#grant-form input[name=csrf_token]').value = 'forged'")
    page.select_option("#grantee", f"member:{cast.people[CLINICIAN].id}")
    with page.expect_navigation():
        page.get_by_role("button", name="Grant consent").click()
    assert page.get_by_role("heading", name="This form could not be accepted").is_visible()
    patient.shot("csrf-refused")
    patient.goto("/patient/consents")
    assert page.locator(".consent").count() == before


def test_the_patient_erases_a_record(open_tab: Any) -> None:
    patient = open_tab(PATIENT)
    page = patient.page
    page.get_by_role("link", name="Immunization", exact=True).click()
    page.locator(".timeline .card").first.get_by_role("link").click()
    page.get_by_label("I understand that erasure cannot be undone.").check()
    with page.expect_navigation():
        page.get_by_role("button", name="Erase this record").click()
    assert "erased" in page.locator(".notice").first.inner_text()
    assert page.get_by_role("link", name="Immunization", exact=True).count() == 0


def test_the_patient_exports_and_sees_no_claims_yet(open_tab: Any, tmp_path: Path) -> None:
    patient = open_tab(PATIENT)
    page = patient.page
    with page.expect_download() as download:
        page.get_by_role("link", name=re.compile("Export my records")).click()
    target = tmp_path / "bundle.json"
    download.value.save_as(target)
    bundle = json.loads(target.read_text())
    assert bundle["resourceType"] == "Bundle" and len(bundle["entry"]) >= 8
    patient.goto("/patient/claims")
    assert "No claim has been submitted" in page.locator("main").inner_text()
