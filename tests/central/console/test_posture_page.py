"""The Posture page in a real browser, on SQLite and on PostgreSQL: the
roll-up across sites with the failing controls and who fails them, one
site's controls with the signed evidence behind each (opened in a dialog,
down to the bundle's observed values and its audit-log witness), and the
90-day trend as a chart and a table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from playwright.sync_api import Locator, expect

from tests.central.console.conftest import Console
from tests.central.support import ApplianceClient, KeyClient

HIPAA_AUDIT = "164.312(b)"  # time_sync
HIPAA_AUTH = "164.312(d)"  # ssh_password_login_disabled
PCI_AUDIT = "10.6.1"  # time_sync
SSH_REASON = "sshd allows PasswordAuthentication"
HISTORY_DAYS = 5


@dataclass
class World:
    northside: str  # fails HIPAA_AUDIT and HIPAA_AUTH; its log is synced
    harbor: str  # hipaa and pci_dss; fails the audit control of both
    lakeview: str  # passes every check
    appliance: str  # Northside's appliance
    failed_bundle: str  # Northside's failing ssh bundle


async def _site(partner: KeyClient, name: str, frameworks: list[str]) -> str:
    reply = await partner.request(
        "POST", "/api/v1/sites", {"name": name, "overrides": {"frameworks": frameworks}}
    )
    assert reply.status == 201, reply.body
    return str(reply.body["id"])


async def _checks(
    partner: KeyClient, frameworks: list[str]
) -> dict[str, dict[str, tuple[str, ...]]]:
    """Each basic-tier check and the controls of ``frameworks`` it evidences
    (what the appliance signs into its bundles)."""
    runbooks = await partner.request("GET", "/api/v1/runbooks")
    basic = [r["id"] for r in runbooks.body if r["tier"] == "basic"]
    checks: dict[str, dict[str, tuple[str, ...]]] = {r.replace("-", "_"): {} for r in basic}
    for framework in frameworks:
        catalogue = await partner.request("GET", f"/api/v1/frameworks/{framework}")
        for runbook in basic:
            covered = tuple(c["id"] for c in catalogue.body["controls"] if runbook in c["runbooks"])
            if covered:
                checks[runbook.replace("-", "_")][framework] = covered
    return {check: controls for check, controls in checks.items() if controls}


async def _round(
    appliance: ApplianceClient,
    checks: dict[str, dict[str, tuple[str, ...]]],
    failing: dict[str, str],
) -> dict[str, str]:
    """One round of every check; ``failing`` maps a check to its reason.
    Returns the bundle id of each check."""
    if not appliance.records:
        appliance.grow(1)
    sent = {}
    for check, controls in checks.items():
        reason = failing.get(check)
        envelope = appliance.sign_bundle(
            check_id=check,
            controls=controls,
            result="fail" if reason else "pass",
            observed={"reason": reason, "attempts": 3} if reason else {"ok": True},
        )
        reply = await appliance.push(envelope)
        assert reply.status == 201, reply.body
        sent[check] = str(reply.body["bundle_id"])
    return sent


async def _seed(console: Console) -> World:
    partner, harness = console.partner, console.harness
    northside = await _site(partner, "Northside Clinic", ["hipaa"])
    harbor = await _site(partner, "Harbor Dental", ["hipaa", "pci_dss"])
    lakeview = await _site(partner, "Lakeview Pharmacy", ["hipaa"])
    fleet = {
        site: (await harness.enroll(partner, site), await _checks(partner, frameworks))
        for site, frameworks in (
            (northside, ["hipaa"]),
            (harbor, ["hipaa", "pci_dss"]),
            (lakeview, ["hipaa"]),
        )
    }
    # A few days of history, each round just before the day's end (so the
    # trend, which evaluates at midnight, sees it fresh); Northside's ssh
    # check starts failing two days ago.
    now = console.clock()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    console.clock.advance(midnight - now + timedelta(hours=23, minutes=40))
    for day in range(HISTORY_DAYS):
        if day:
            console.clock.advance(timedelta(days=1))
        for site, (appliance, checks) in fleet.items():
            broken = site == northside and day >= HISTORY_DAYS - 2
            await _round(
                appliance, checks, {"ssh_password_login_disabled": SSH_REASON} if broken else {}
            )
    console.clock.advance(timedelta(hours=9, minutes=20))
    # Today: Northside fails both, Harbor's clock drifts, Lakeview is fine.
    appliance, checks = fleet[northside]
    sent = await _round(
        appliance,
        checks,
        {"ssh_password_login_disabled": SSH_REASON, "time_sync": "clock off by 7 s"},
    )
    reply = await appliance.sync(appliance.batch(0))
    assert reply.status == 200, reply.body
    await _round(*fleet[harbor], {"time_sync": "clock off by 12 s"})
    await _round(*fleet[lakeview], {})
    return World(
        northside=northside,
        harbor=harbor,
        lakeview=lakeview,
        appliance=appliance.appliance_id,
        failed_bundle=sent["ssh_password_login_disabled"],
    )


def _row(table: Locator, control: str) -> Locator:
    """The table's row of a control (its row header starts with the id)."""
    header = table.page.get_by_role("rowheader", name=re.compile("^" + re.escape(control)))
    return table.get_by_role("row").filter(has=header)


def test_posture_across_sites_a_site_its_evidence_and_trend(console: Console) -> None:
    world = console.run(_seed(console))
    page = console.signed_in("viewer")
    console.open(page, "/console/posture")

    # The summary: three sites, two failing, none wholly compliant.
    stats = page.locator(".posture-summary .stats")
    expect(stats.get_by_role("listitem").filter(has_text="Sites failing")).to_contain_text("2")
    expect(stats.get_by_role("listitem").filter(has_text="Sites compliant")).to_contain_text("of 3")

    # The failing controls: the audit control fails at two sites, linked.
    audit = _row(page.get_by_role("table", name=re.compile("Controls failing")), HIPAA_AUDIT)
    expect(audit).to_have_count(1)
    cells = audit.get_by_role("cell")
    expect(cells.nth(0)).to_have_text(re.compile("HIPAA"))
    expect(cells.nth(1)).to_have_text("2")
    expect(audit.get_by_role("link", name="Northside Clinic")).to_be_visible()
    expect(audit.get_by_role("link", name="Harbor Dental")).to_be_visible()
    expect(audit).to_contain_text("clock off by 12 s")
    auth = _row(page.get_by_role("table", name=re.compile("Controls failing")), HIPAA_AUTH)
    expect(auth.get_by_role("cell").nth(1)).to_have_text("1")
    expect(auth.get_by_role("link")).to_have_count(1)

    # The site list: a score per framework; Harbor's PCI DSS score is there.
    sites = page.get_by_role("table", name="Sites and their score per framework")
    expect(sites.get_by_role("row")).to_have_count(4)
    harbor = sites.get_by_role("row").filter(has_text="Harbor Dental")
    expect(harbor).to_contain_text("Failing")
    expect(harbor.get_by_role("link", name=re.compile(r"^\d+%: "))).to_have_count(2)
    page.get_by_label("Show", exact=True).select_option("failing")
    expect(sites.get_by_role("row")).to_have_count(3)
    expect(sites).not_to_contain_text("Lakeview")
    page.get_by_label("Show", exact=True).select_option("")
    console.check_accessible(page)
    console.screenshot(page, "posture")

    # From the failing control to the site, on that framework.
    audit.get_by_role("link", name="Northside Clinic").click()
    page.wait_for_selector('#page[aria-busy="false"]')
    expect(page).to_have_url(re.compile(rf"site={world.northside}&framework=hipaa"))
    expect(page.get_by_role("heading", name="Northside Clinic")).to_be_visible()
    failing = page.get_by_role("table", name=re.compile("failing controls"))
    expect(failing.get_by_role("row")).to_have_count(3)  # header, audit, auth
    row = _row(failing, HIPAA_AUTH)
    expect(row).to_contain_text("Failing")
    expect(row).to_contain_text(SSH_REASON)
    expect(row).to_contain_text(world.appliance)
    expect(row).to_contain_text("ssh_password_login_disabled")
    expect(row.locator("time").first).to_have_attribute("datetime", re.compile(r"^\d{4}-"))
    passing = page.get_by_role("table", name=re.compile("passing controls"))
    expect(passing.get_by_role("row").first).to_be_visible()

    # The trend: a chart with a name, and the same numbers by day.
    chart = page.get_by_role("img", name=re.compile(r"HIPAA.*Northside Clinic, last 90 days"))
    expect(chart).to_be_visible()
    page.get_by_text("The numbers by day").click()
    numbers = page.get_by_role("table", name=re.compile("day by day"))
    expect(numbers.get_by_role("row")).to_have_count(91)
    # Newest first: today fails two controls; three days ago all passed.
    expect(numbers.get_by_role("row").nth(1).get_by_role("cell").nth(2)).to_have_text("2")
    expect(numbers.get_by_role("row").nth(4).get_by_role("cell").nth(0)).to_have_text("100%")
    console.check_accessible(page)

    # The evidence behind it, from the signed bundle itself.
    row.get_by_role("button", name=f"Open evidence for {HIPAA_AUTH}").click()
    dialog = page.get_by_role("dialog", name=f"Evidence for {HIPAA_AUTH}")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_text(world.failed_bundle)).to_be_visible()
    facts = dialog.locator("dl.facts")
    expect(facts).to_contain_text("Fail")
    expect(facts).to_contain_text(SSH_REASON)
    expect(facts).to_contain_text(world.appliance)
    expect(facts).to_contain_text("Witnessed")
    observed = dialog.get_by_role("table", name="What the check observed")
    expect(observed.get_by_role("row").filter(has_text="attempts")).to_contain_text("3")
    download = dialog.get_by_role("link", name="Download the signed bundle")
    expect(download).to_have_attribute(
        "href", f"/api/v1/sites/{world.northside}/evidence/{world.appliance}/{world.failed_bundle}"
    )
    console.check_accessible(page)
    with page.expect_download() as saved:
        download.click()
    assert saved.value.suggested_filename == f"evidence-{world.failed_bundle}.json"
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_have_count(0)
    expect(row.get_by_role("button", name=f"Open evidence for {HIPAA_AUTH}")).to_be_focused()

    console.screenshot(page, "posture-site")

    # A deep link to the other framework of a site.
    console.open(page, f"/console/posture?site={world.harbor}&framework=pci_dss")
    expect(page.get_by_label("Framework", exact=True)).to_have_value("pci_dss")
    pci = page.get_by_role("table", name=re.compile("failing controls"))
    expect(pci.get_by_role("rowheader", name=re.compile(re.escape(PCI_AUDIT)))).to_be_visible()
    expect(pci).to_contain_text("clock off by 12 s")

    # A site that is not the partner's: the API's refusal, shown.
    console.open(page, "/console/posture?site=site-of-someone-else")
    expect(page.get_by_role("alert")).to_contain_text("not-found")
