"""The console's Appliances page in a real browser: each appliance's status,
log sizes, queues, certificate and failing checks; enrollment tokens
created (shown once, with the enroll command), used and revoked;
decommissioning behind a confirmation; the summary counted over every
appliance, not the page loaded; the site picker, deep links and "Show
more"; what a viewer may not do. On SQLite and on PostgreSQL."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from playwright.sync_api import Page, expect

from msp_protocol.encoding import format_time
from tests.central.console.conftest import Console
from tests.central.support import ApplianceClient, Harness, KeyClient


@dataclass
class Fleet:
    site: str
    other_site: str
    online: ApplianceClient
    offline: ApplianceClient
    silent: ApplianceClient


def _beat(appliance: ApplianceClient, queues: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {
        "version": "0.4.2",
        "log_size": len(appliance.records),
        "queues": queues,
        "clock": format_time(appliance.clock()),
        **extra,
    }


async def _heartbeat(appliance: ApplianceClient, body: dict[str, Any]) -> None:
    path = f"/api/v1/appliances/{appliance.appliance_id}/heartbeat"
    reply = await appliance.request("POST", path, body)
    assert reply.status == 200, reply.body


async def _seed(harness: Harness, partner: KeyClient) -> Fleet:
    """A site with an appliance online (log partly witnessed, queues, a
    failing check), one offline and one never seen; another site with one."""
    site = await harness.site(partner, "Northside Dental")
    other_site = await harness.site(partner, "Harbor Pediatrics")
    # Ten minutes ago: an appliance beating every minute, silent since.
    harness.clock.advance(timedelta(minutes=-10))
    offline = await harness.enroll(partner, site)
    await _heartbeat(offline, _beat(offline, {"evidence": 0}, heartbeat_interval_seconds=60))
    harness.clock.advance(timedelta(minutes=10))

    online = await harness.enroll(partner, site)
    online.grow(3)
    reply = await online.sync(online.batch(0))
    assert reply.status == 200, reply.body
    for check, result in [("backup", "fail"), ("time_sync", "pass")]:
        reply = await online.push(online.sign_bundle(check_id=check, result=result))
        assert reply.status == 201, reply.body
    await _heartbeat(online, _beat(online, {"evidence": 2, "urgent": 1}))
    silent = await harness.enroll(partner, site)
    elsewhere = await harness.enroll(partner, other_site)
    await _heartbeat(elsewhere, _beat(elsewhere, {}))
    return Fleet(site, other_site, online, offline, silent)


async def _enroll_with(harness: Harness, token: str) -> str:
    """Enroll a new appliance with ``token`` as the agent does; its id."""
    reply = await harness.enroll_with(token)
    assert reply.status == 201, reply.body
    return str(reply.body["appliance_id"])


def _row(page: Page, appliance_id: str) -> Any:
    """The appliance's row in the appliance list."""
    listed = page.get_by_role("region", name=re.compile(r"^Appliances of "))
    return listed.get_by_role("row").filter(has=page.get_by_text(appliance_id, exact=True))


def test_appliances_tokens_and_decommissioning(console: Console) -> None:
    fleet = console.run(_seed(console.harness, console.partner))
    page = console.signed_in("editor")
    console.open(page, f"/console/appliances?site={fleet.site}")
    expect(page.get_by_role("heading", name="Appliances of Northside Dental")).to_be_visible()
    expect(page.get_by_label("Site", exact=True)).to_have_value(fleet.site)

    summary = page.get_by_role("list", name="Summary of the appliances listed")
    expect(summary.get_by_role("listitem").filter(has_text="Online")).to_have_text("1Online")
    expect(summary.get_by_role("listitem").filter(has_text="Offline")).to_have_text("1Offline")
    expect(summary.get_by_role("listitem").filter(has_text="Never seen")).to_have_text(
        "1Never seen"
    )
    expect(summary.get_by_role("listitem").filter(has_text="failing")).to_have_text(
        "1With failing checks"
    )
    expect(page.get_by_text("3 appliances in all.")).to_be_visible()

    online = _row(page, fleet.online.appliance_id)
    expect(online).to_contain_text("Online")
    expect(online).to_contain_text("Agent 0.4.2")
    # The appliance reported 5 entries (3 synced, then 2 bundles signed):
    # the server witnessed 3.
    expect(online).to_contain_text("5 entries")
    expect(online).to_contain_text("3 witnessed")
    expect(online).to_contain_text("2 not witnessed yet")
    expect(online).to_contain_text("evidence: 2")
    expect(online).to_contain_text("urgent: 1")
    expect(online).to_contain_text("backup")
    expect(online).not_to_contain_text("time_sync")
    expect(online.locator("time").first).to_be_visible()
    expect(online).to_contain_text("Expires")
    offline = _row(page, fleet.offline.appliance_id)
    expect(offline).to_contain_text("Offline")
    expect(offline).to_contain_text("10 minutes ago")
    silent = _row(page, fleet.silent.appliance_id)
    expect(silent).to_contain_text("Never seen")
    expect(silent).to_contain_text("No heartbeat yet")
    console.check_accessible(page)
    console.screenshot(page, "appliances")

    # A token is shown once, with the command that uses it.
    page.get_by_label("Valid for").select_option(label="3 days")
    page.get_by_role("button", name="Create enrollment token").click()
    expect(page.get_by_role("heading", name="New enrollment token")).to_be_focused()
    token = page.locator("#token-value").inner_text()
    assert len(token) >= 16
    command = page.locator("#token-command").inner_text()
    assert command == (
        f"printf '%s\\n' '{token}' | sudo -u msp msp-agent enroll"
        f" --server {console.url} --token-file -"
    )
    expect(page.get_by_text("Shown once.")).to_be_visible()
    tokens = page.get_by_role("region", name="Tokens of this site, newest first")
    # The three the seeded appliances used, and the new one, newest first.
    expect(tokens.locator("tbody tr")).to_have_count(4)
    expect(tokens.locator("tbody tr").first).to_contain_text("Active")
    expect(tokens.locator("tbody tr").filter(has_text="Used")).to_have_count(3)
    console.check_accessible(page)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.get_by_role("button", name="Copy command").click()
    expect(page.get_by_role("button", name="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == command

    # The token works (enrolled meanwhile, by the appliance); revoking it now
    # is refused, and the page says why.
    enrolled = console.run(_enroll_with(console.harness, token))
    first = tokens.get_by_role("button", name=re.compile(r"^Revoke token "))
    first.click()
    expect(page.get_by_role("alert")).to_contain_text(f"was used by appliance {enrolled}")
    expect(tokens.locator("tbody tr").filter(has_text="Used")).to_have_count(4)
    expect(_row(page, enrolled)).to_contain_text("Never seen")

    # Reloaded, the page never shows the token again.
    console.open(page, f"/console/appliances?site={fleet.site}")
    assert token not in page.locator("main").inner_text()
    page.get_by_role("button", name="Create enrollment token").click()
    expect(page.get_by_role("heading", name="New enrollment token")).to_be_visible()
    active = tokens.get_by_role("row").filter(has_text="Active")
    active.get_by_role("button", name=re.compile(r"^Revoke token ")).click()
    expect(page.get_by_role("status")).to_contain_text("was revoked")
    expect(tokens.get_by_role("row").filter(has_text="Revoked")).to_have_count(1)
    expect(tokens.get_by_role("button", name=re.compile(r"^Revoke token "))).to_have_count(0)

    # Decommissioning: a dialog says what it does; Cancel changes nothing.
    target = fleet.offline.appliance_id
    page.get_by_role("button", name=f"Decommission {target}").click()
    confirm = page.get_by_role("dialog", name="Decommission this appliance?")
    expect(confirm).to_contain_text("revokes every certificate it holds")
    expect(confirm).to_contain_text("cannot be undone")
    console.check_accessible(page)
    confirm.get_by_role("button", name="Cancel").click()
    expect(confirm).to_have_count(0)
    expect(_row(page, target)).to_have_count(1)
    page.get_by_role("button", name=f"Decommission {target}").click()
    confirm.get_by_label("Reason").fill("Replaced by new hardware")
    confirm.get_by_role("button", name="Decommission appliance").click()
    expect(page.get_by_role("status").filter(has_text="decommissioned")).to_have_text(
        f"Appliance {target} was decommissioned; 1 certificate revoked."
    )
    expect(_row(page, target)).to_have_count(0)
    # The summary is counted again with the list.
    expect(summary.get_by_role("listitem").filter(has_text="Offline")).to_have_text("0Offline")
    expect(page.get_by_text("3 appliances in all.")).to_be_visible()  # the new one counts
    page.get_by_label("Show").select_option(label="Decommissioned")
    expect(page).to_have_url(re.compile(r"decommissioned=true"))
    expect(_row(page, target)).to_contain_text("Decommissioned")
    expect(summary.get_by_role("listitem")).to_have_text(["1Decommissioned"])
    expect(page.get_by_role("button", name=re.compile("^Decommission "))).to_have_count(0)
    listed = console.run(
        console.partner.request(
            "GET", f"/api/v1/appliances?site_id={fleet.site}&decommissioned=true"
        )
    )
    assert [item["id"] for item in listed.body["items"]] == [target]


async def _many(harness: Harness, partner: KeyClient, count: int) -> str:
    site = await harness.site(partner, "Metro Hospital")
    for _ in range(count):
        await harness.enroll(partner, site)
    return site


def test_all_sites_show_more_and_a_viewer(console: Console) -> None:
    fleet = console.run(_seed(console.harness, console.partner))
    console.run(_many(console.harness, console.partner, 22))
    page = console.signed_in("viewer")
    console.open(page, "/console/appliances")
    listed = page.get_by_role("region", name="Appliances of all sites")
    # 26 in all, 25 a page.
    expect(listed.locator("tbody tr")).to_have_count(25)
    # The summary counts all 26, not the page: 23 never seen, though only
    # 22 of them are loaded; the numbers are the API's.
    summary = page.get_by_role("list", name="Summary of the appliances listed")
    expect(summary.get_by_role("listitem").filter(has_text="Never seen")).to_have_text(
        "23Never seen"
    )
    expect(page.get_by_text("26 appliances in all.")).to_be_visible()
    expect(page.get_by_text("loaded so far")).to_have_count(0)
    counts = console.run(console.partner.request("GET", "/api/v1/appliances/summary")).body
    assert (counts["total"], counts["never_seen"]) == (26, 23)
    for label, key in [
        ("Online", "online"),
        ("Offline", "offline"),
        ("Certificate expiring", "certificate_expiring"),
        ("With failing checks", "with_failing_checks"),
    ]:
        expect(summary.get_by_role("listitem").filter(has_text=label)).to_have_text(
            f"{counts[key]}{label}"
        )
    expect(
        listed.get_by_text("Harbor Pediatrics").or_(listed.get_by_text("Metro Hospital")).first
    ).to_be_visible()
    page.get_by_role("button", name="Show more").click()
    expect(listed.locator("tbody tr")).to_have_count(26)
    expect(page.get_by_text("26 appliances in all.")).to_be_visible()
    expect(page.get_by_role("button", name="Show more")).to_have_count(0)

    # A viewer reads: every change is disabled, and the page says why.
    expect(page.get_by_text("Your role (viewer) can only read")).to_be_visible()
    decommission = page.get_by_role("button", name=re.compile("^Decommission "))
    expect(decommission).to_have_count(26)
    expect(decommission.and_(page.locator(":enabled"))).to_have_count(0)
    console.check_accessible(page)

    # The site picker narrows the list (and the URL says which site).
    page.get_by_label("Find a site").fill("harbor")
    site = page.get_by_label("Site", exact=True)
    expect(site.locator("option")).to_have_count(2)
    site.select_option(label="Harbor Pediatrics")
    expect(page).to_have_url(re.compile(rf"site={fleet.other_site}"))
    expect(page.get_by_role("heading", name="Appliances of Harbor Pediatrics")).to_be_visible()
    expect(page.get_by_text("1 appliance in all.")).to_be_visible()
    expect(page.get_by_role("button", name="Create enrollment token")).to_be_disabled()
    console.check_accessible(page)
    # The viewer's page on a phone: the tables scroll inside their frame.
    page.set_viewport_size({"width": 390, "height": 844})
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
