"""Claims in the portal, in a real browser (Debian's headless Chromium driven by Playwright)
against a running 4-validator network: the hospital's billing office submits three claims with
the SDK and the insurer (CarePlus, node 4) decides them — one partly, one denied, one in full
and flagged as a possible duplicate. The patient sees each claim's services, amounts and every
step with its block, appeals the partial decision with one click (a forged form changes
nothing), and the auditor sees the totals per provider and per insurer and every claim's
history. The pages are photographed into docs/screenshots/."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from medledger.client.claims import ClaimsClient
from medledger.client.records import RecordsClient
from medledger.client.sdk import QueryError
from medledger.crypto.keys import KeyPair
from medledger.ledger.claims import CPT_SYSTEM, Claim, ItemDecision
from medledger.ledger.model import Role
from medledger.ledger.transactions import EnrollMember

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_network import wait_until
from portal_network import MEMBER_PASSPHRASE, Cast, portal_cast

playwright_sync = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.e2e

BASE_PORT = 30900
CHROMIUM = "/usr/bin/chromium"
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
PATIENT = "patient-ana-silva"
AUDITOR = "auditor-rosa-diaz"
SERVED = (datetime.now(UTC) - timedelta(days=4)).strftime("%Y-%m-%d")
PARTIAL, DENIED, DUPLICATE = "claim-web-1", "claim-web-2", "claim-web-3"


def claim_resource(
    patient: str, provider: str, insurer: str, lines: list[tuple[str, float]]
) -> dict[str, Any]:
    return {
        "resourceType": "Claim",
        "status": "active",
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/claim-type",
                    "code": "professional",
                }
            ]
        },
        "use": "claim",
        "patient": {"reference": f"Patient/{patient}"},
        "created": f"{SERVED}T16:00:00Z",
        "provider": {"reference": f"Organization/{provider}"},
        "insurer": {"reference": f"Organization/{insurer}"},
        "priority": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/processpriority",
                    "code": "normal",
                }
            ]
        },
        "insurance": [
            {"sequence": 1, "focal": True, "coverage": {"reference": "Coverage/cov-5120"}}
        ],
        "item": [
            {
                "sequence": n,
                "productOrService": {"coding": [{"system": CPT_SYSTEM, "code": code}]},
                "servicedDate": SERVED,
                "net": {"value": amount, "currency": "USD"},
            }
            for n, (code, amount) in enumerate(lines, start=1)
        ],
    }


def _seen(client: ClaimsClient, claim_id: str) -> Claim:
    def look() -> Claim | None:
        try:
            return client.show(claim_id)
        except QueryError:
            return None

    claim: Claim = wait_until(look, 30, f"claim {claim_id} on the insurer's node")
    return claim


def _enroll(cast: Cast, node: int, role: Role) -> RecordsClient:
    network = cast.network
    keys = KeyPair.generate()
    body = EnrollMember(keys.verify_key, keys.encryption_key, role)
    network.client(node).submit(network.admins[node], "member.enroll", body)
    return RecordsClient(network.client(node), network.configs[node].api_url, keys)


@pytest.fixture(scope="module")
def cast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cast]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (scripts/setup.sh installs Debian's chromium)")
    with portal_cast(tmp_path_factory.mktemp("portal-claims"), BASE_PORT) as people:
        network = people.network
        hospital, insurer = network.configs[0].organization, network.configs[3].organization
        patient = people.people[PATIENT].id
        clients = [_enroll(people, 0, Role.BILLING), _enroll(people, 3, Role.BILLING)]
        billing, examiner = ClaimsClient(clients[0]), ClaimsClient(clients[1])
        visit = [("99214", 150.0), ("83036", 45.5), ("36415", 10.0)]
        billing.submit(claim_resource(patient, hospital, insurer, visit), claim_id=PARTIAL)
        billing.submit(
            claim_resource(patient, hospital, insurer, [("93000", 60.0)]), claim_id=DENIED
        )
        billing.submit(
            claim_resource(patient, hospital, insurer, [("83036", 45.5)]), claim_id=DUPLICATE
        )
        for claim_id in (PARTIAL, DENIED, DUPLICATE):
            _seen(examiner, claim_id)
        examiner.adjudicate(
            PARTIAL,
            (ItemDecision(1, 12_000, ("45",)), ItemDecision(2, 4_550), ItemDecision(3, 0, ("97",))),
        )
        examiner.pay(PARTIAL, "eft-web-0001")
        examiner.adjudicate(DENIED, (ItemDecision(1, 0, ("50",)),))
        examiner.adjudicate(DUPLICATE)
        examiner.pay(DUPLICATE, "eft-web-0002")
        try:
            yield people
        finally:
            for client in clients:
                client.close()


@pytest.fixture(scope="module")
def browser(cast: Cast) -> Iterator[Any]:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_sync.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Tab:
    """One person's signed-in browser tab, with the script errors it saw."""

    def __init__(self, browser: Any, cast: Cast, name: str) -> None:
        self.context = browser.new_context(viewport=DESKTOP)
        self.page = self.context.new_page()
        self.base = cast.url(name)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.goto(self.base + "/login")
        self.page.get_by_label("Name of your key").fill(name)
        self.page.get_by_label("Passphrase").fill(MEMBER_PASSPHRASE)
        with self.page.expect_navigation():
            self.page.get_by_role("button", name="Sign in").click()

    def goto(self, path: str) -> Any:
        return self.page.goto(self.base + path)

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"script errors: {self.errors}"


@pytest.fixture
def open_tab(browser: Any, cast: Cast) -> Iterator[Any]:
    tabs: list[Tab] = []

    def open_(name: str) -> Tab:
        tab = Tab(browser, cast, name)
        tabs.append(tab)
        return tab

    yield open_
    for tab in tabs:
        tab.close()


def test_the_patient_follows_each_claim_and_appeals_a_partial_decision(
    open_tab: Any, cast: Cast
) -> None:
    patient = open_tab(PATIENT)
    page = patient.page
    patient.goto("/patient/claims")
    assert page.get_by_role("heading", name="My claims").is_visible()
    cards = page.locator("article.claim")
    assert cards.count() == 3
    assert [c.get_attribute("data-claim") for c in cards.all()] == [DUPLICATE, DENIED, PARTIAL]

    partial = page.locator(f'article[data-claim="{PARTIAL}"]')
    text = partial.inner_text()
    for expected in ("205.50 USD", "165.50 USD", "99214", "Hemoglobin A1c", "Charge exceeds"):
        assert expected in text, expected
    steps = partial.locator("tr.step")
    assert [s.get_attribute("data-action") for s in steps.all()] == [
        "submitted",
        "decided",
        "paid",
    ]
    assert all(re.search(r"block \d+", s.inner_text()) for s in steps.all())
    assert "eft-web-0001" in steps.nth(2).inner_text()

    denied = page.locator(f'article[data-claim="{DENIED}"]')
    assert "denied" in denied.locator(".record-head").inner_text()
    assert "medical necessity" in denied.inner_text()
    duplicate = page.locator(f'article[data-claim="{DUPLICATE}"]')
    assert f"possible duplicate of {PARTIAL}" in duplicate.inner_text()
    assert duplicate.get_by_role("button", name=re.compile("Appeal")).count() == 0
    page.screenshot(path=str(SCREENSHOTS / "patient-claims.png"), full_page=True)

    # A forged form changes nothing.
    page.evaluate(
        f"document.querySelector('article[data-claim=\"{DENIED}\"] input[name=csrf_token]')"
        ".value = 'forged'"
    )
    with page.expect_navigation():
        denied.get_by_role("button", name=re.compile("Appeal")).click()
    assert page.get_by_role("heading", name="This form could not be accepted").is_visible()

    # One click appeals the partial decision, signed with the patient's own keys.
    patient.goto("/patient/claims")
    assert page.locator(f'article[data-claim="{DENIED}"] tr.step').count() == 2
    partial.get_by_label("Why do you appeal?").select_option("medical-necessity")
    with page.expect_navigation():
        partial.get_by_role("button", name=re.compile("Appeal")).click()
    notice = page.locator(".notice").first.inner_text()
    assert f"Claim {PARTIAL} appealed in block" in notice and "new decision" in notice
    last = partial.locator("tr.step").last
    assert last.get_attribute("data-action") == "appealed"
    assert "you" in last.inner_text() and "medically necessary" in last.inner_text()
    assert "appealed" in partial.locator(".record-head").inner_text()
    assert partial.get_by_role("button", name=re.compile("Appeal")).count() == 0

    # The insurer's decision itself opens with the patient's own key.
    with page.expect_navigation():
        partial.get_by_role("link", name="the decision").click()
    assert "ClaimResponse" in page.locator("main").inner_text()
    assert "Claim partially approved" in (page.locator("pre.json").text_content() or "")


def test_the_auditor_sees_totals_per_provider_and_insurer(open_tab: Any, cast: Cast) -> None:
    auditor = open_tab(AUDITOR)
    page = auditor.page
    auditor.goto("/auditor")
    section = page.locator("#claims")
    assert section.get_by_role("heading", name="Claims", exact=True).is_visible()
    hospital = cast.network.configs[0].organization
    insurer = cast.network.configs[3].organization

    provider = section.locator(f'table[data-party="provider"] tr[data-organization="{hospital}"]')
    assert provider.locator(".claims-count").inner_text() == "3"
    payer = section.locator(f'table[data-party="insurer"] tr[data-organization="{insurer}"]')
    assert payer.locator(".claims-count").inner_text() == "3"
    assert payer.locator(".denial-rate").inner_text().startswith("33.3%")
    assert "1 of 3 decided" in payer.locator(".denial-rate").inner_text()
    assert re.search(r"\d+ (s|min)", payer.locator(".mean-time").inner_text())
    row_text = payer.inner_text()
    for amount in ("311.00 USD", "211.00 USD"):  # billed; approved and paid (165.50 + 45.50)
        assert amount in row_text, amount

    listed = section.locator("table.claim-list tbody tr")
    assert listed.count() == 3
    first = section.locator(f'tr[data-claim="{PARTIAL}"]')
    first.locator("summary").click()
    history = first.locator(".claim-steps li")
    assert history.count() >= 3
    assert all("block" in h.inner_text() for h in history.all())
    assert "possible duplicate" in section.locator(f'tr[data-claim="{DUPLICATE}"]').inner_text()
    section.scroll_into_view_if_needed()
    section.screenshot(path=str(SCREENSHOTS / "auditor-claims.png"))
