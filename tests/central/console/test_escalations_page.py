"""The console's Escalations and alerts page in a real browser: open
escalations acknowledged with a note (in a dialog) leave the open list and
show the note when acknowledged ones are listed; security alerts; filters
as form controls mirrored in the URL; "Show more"; a viewer's disabled
controls and an API refusal shown as such. On SQLite and on PostgreSQL."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from playwright.sync_api import Page, expect

from msp_central.db.tables import users
from msp_protocol.bundle import Escalation
from msp_protocol.keys import SigningKey
from tests.central.console.conftest import Console
from tests.central.support import ApplianceClient, Harness, KeyClient

PAGE = 25  # rows a list shows before "Show more"


@dataclass
class World:
    site: str
    other_site: str
    clinic: ApplianceClient
    harbor: ApplianceClient
    critical_id: str


async def _escalate(
    appliance: ApplianceClient, severity: str, title: str, detail: dict[str, Any]
) -> str:
    document = Escalation(
        escalation_id=f"esc-{secrets.token_hex(8)}",
        appliance_id=appliance.appliance_id,
        site_id=appliance.site_id,
        severity=severity,  # type: ignore[arg-type]
        title=title,
        detail=detail,
        created_at=appliance.clock(),
    ).to_wire()
    path = f"/api/v1/appliances/{appliance.appliance_id}/escalations"
    reply = await appliance.request("POST", path, document)
    assert reply.status == 201, reply.body
    return str(document["escalation_id"])


async def _forged_sync(appliance: ApplianceClient, stranger: SigningKey) -> None:
    """A checkpoint signed by a key never delegated: refused, and an alert."""
    refused = await appliance.sync(appliance.batch(0, signer=stranger))
    assert (refused.status, refused.code) == (422, "unknown-key"), refused.body


async def _seed(harness: Harness, partner: KeyClient) -> World:
    site = await harness.site(partner, "Northside Dental")
    other_site = await harness.site(partner, "Harbor Pediatrics")
    clinic = await harness.enroll(partner, site)
    harbor = await harness.enroll(partner, other_site)
    for appliance in (clinic, harbor):
        appliance.grow(3)
        reply = await appliance.sync(appliance.batch(0))
        assert reply.status == 200, reply.body
    for n in range(PAGE + 1):
        await _escalate(
            clinic, "high", f"Nightly backup failed (run {n + 1})", {"job": "nightly", "run": n}
        )
    await _escalate(harbor, "medium", "Printer firmware out of date", {"model": "LaserJet"})
    critical = await _escalate(
        clinic, "critical", "Disk encryption turned off", {"volume": "C:", "host": "FRONT-DESK"}
    )
    stranger = SigningKey.generate()
    for _ in range(PAGE):
        await _forged_sync(clinic, stranger)
    await _forged_sync(harbor, stranger)
    return World(site, other_site, clinic, harbor, critical)


def _escalations(page: Page) -> Any:
    return page.get_by_role("region", name=re.compile(r"escalations, newest first$", re.I))


def _alerts(page: Page) -> Any:
    return page.get_by_role("region", name="Security alerts, newest first")


def test_acknowledge_filters_and_show_more(console: Console) -> None:
    world = console.run(_seed(console.harness, console.partner))
    editor = console.user("editor")
    page = console.new_page()
    console.sign_in(page, editor)
    console.open(page, "/console/escalations")
    expect(page.get_by_role("heading", name="Open escalations")).to_be_visible()
    escalations, alerts = _escalations(page), _alerts(page)
    expect(escalations.locator("tbody tr")).to_have_count(PAGE)
    expect(escalations.locator("tbody tr").first).to_contain_text("Disk encryption turned off")
    expect(escalations.locator("tbody tr").first).to_contain_text("Critical")
    expect(escalations.locator("tbody tr").first).to_contain_text("FRONT-DESK")
    expect(escalations.locator("tbody tr").first).to_contain_text("Northside Dental")
    expect(alerts.locator("tbody tr")).to_have_count(PAGE)
    expect(alerts.locator("tbody tr").first).to_contain_text("unknown-key")
    expect(alerts.locator("tbody tr").first).to_contain_text("Harbor Pediatrics")
    console.check_accessible(page)
    console.screenshot(page, "escalations")

    escalations.locator("xpath=..").get_by_role("button", name="Show more").click()
    expect(escalations.locator("tbody tr")).to_have_count(PAGE + 3)
    alerts.locator("xpath=..").get_by_role("button", name="Show more").click()
    expect(alerts.locator("tbody tr")).to_have_count(PAGE + 1)
    # Both lists read to their end: no more "Show more".
    expect(page.get_by_role("button", name="Show more")).to_have_count(0)

    # Filters are form controls, mirrored in the URL.
    page.get_by_label("Severity").select_option(label="Critical")
    expect(page).to_have_url(re.compile(r"severity=critical"))
    expect(escalations.locator("tbody tr")).to_have_count(1)

    # Acknowledging with a note: a dialog, then the escalation leaves the open list.
    page.get_by_role("button", name=re.compile(r"^Acknowledge “Disk encryption")).click()
    ack = page.get_by_role("dialog", name="Acknowledge escalation")
    expect(ack).to_contain_text("Disk encryption turned off")
    expect(ack).to_contain_text(world.clinic.appliance_id)
    console.check_accessible(page)
    ack.get_by_label("Note").fill("Called the office: BitLocker is back on.")
    ack.get_by_role("button", name="Acknowledge", exact=True).click()
    expect(ack).to_have_count(0)
    expect(page.get_by_role("status")).to_have_text("Acknowledged “Disk encryption turned off”.")
    expect(escalations).to_contain_text("No open escalations")

    page.get_by_label("Escalation status").select_option(label="Acknowledged")
    expect(page).to_have_url(re.compile(r"status=acknowledged"))
    expect(page.get_by_role("heading", name="Acknowledged escalations")).to_be_visible()
    row = escalations.locator("tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("Called the office: BitLocker is back on.")
    expect(row).to_contain_text(f"by {editor}")
    expect(row.get_by_role("button")).to_have_count(0)
    console.check_accessible(page)

    # A deep link opens the same view: site, period and alert code too.
    console.open(
        page,
        f"/console/escalations?status=all&site={world.other_site}&since=7d&code=unknown-key",
    )
    expect(page.get_by_label("Escalation status")).to_have_value("all")
    expect(page.get_by_label("Site", exact=True)).to_have_value(world.other_site)
    expect(page.get_by_label("Period")).to_have_value("7d")
    expect(page.get_by_label("Alert code")).to_have_value("unknown-key")
    expect(escalations.locator("tbody tr")).to_have_count(1)
    expect(escalations).to_contain_text("Printer firmware out of date")
    expect(alerts.locator("tbody tr")).to_have_count(1)
    page.get_by_label("Alert code").fill("no-such-code")
    page.get_by_role("button", name="Apply filters").click()
    expect(page).to_have_url(re.compile(r"code=no-such-code"))
    expect(alerts).to_contain_text("No security alerts match these filters.")

    # The editor is made a viewer while the page is open: the API refuses,
    # and the dialog says so.
    console.open(page, "/console/escalations")

    async def demote() -> None:
        async with console.harness.engine.begin() as connection:
            await connection.execute(
                sa.update(users).where(users.c.email == editor).values(role="viewer")
            )

    console.run(demote())
    page.get_by_role("button", name=re.compile(r"^Acknowledge “Nightly backup")).first.click()
    ack.get_by_role("button", name="Acknowledge", exact=True).click()
    expect(ack.get_by_role("alert")).to_contain_text("a viewer may not do this")
    ack.get_by_role("button", name="Cancel").click()
    expect(escalations.locator("tbody tr")).to_have_count(PAGE)

    # Signed in as a viewer, the page says so and every acknowledge is disabled.
    console.open(page, "/console/escalations?severity=high")
    expect(page.get_by_text("Your role (viewer) can only read")).to_be_visible()
    buttons = _escalations(page).get_by_role("button", name=re.compile("^Acknowledge"))
    expect(buttons).to_have_count(PAGE)
    expect(buttons.and_(page.locator(":enabled"))).to_have_count(0)
    console.check_accessible(page)
    page.set_viewport_size({"width": 390, "height": 844})
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
