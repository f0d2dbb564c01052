"""The console's Compliance page in a real browser: framework usage, the
partner's defaults, industry presets previewed before they are applied, and
each site's own settings over the defaults; on SQLite and on PostgreSQL."""

from __future__ import annotations

from typing import Any

from playwright.sync_api import Locator, Page, expect

from tests.central.console.conftest import Console
from tests.central.support import KeyClient

# Five sites: three inherit everything, one has its own tier, one its own
# industry, tier and frameworks.
SITES: list[tuple[str, dict[str, Any]]] = [
    ("Northside Clinic", {}),
    ("Harbor Dental", {}),
    ("Eastgate Pharmacy", {}),
    ("Lakeview Labs", {"tier": "full"}),
    ("Corner Bistro", {"industry": "retail", "tier": "basic", "frameworks": ["pci_dss"]}),
]


def _seed(console: Console) -> dict[str, str]:
    """The partner's defaults (the healthcare preset) and its sites; their
    ids by name."""
    partner = console.partner

    async def seed() -> dict[str, str]:
        reply = await partner.request(
            "PUT",
            "/api/v1/partner/defaults",
            {"industry": "healthcare", "tier": "basic", "frameworks": ["hipaa", "nist_csf"]},
        )
        assert reply.status == 200, reply.body
        ids = {}
        for name, overrides in SITES:
            made = await partner.request(
                "POST", "/api/v1/sites", {"name": name, "overrides": overrides}
            )
            assert made.status == 201, made.body
            ids[name] = made.body["id"]
        return ids

    return console.run(seed())


def _get(console: Console, client: KeyClient, path: str) -> Any:
    reply = console.run(client.request("GET", path))
    assert reply.status == 200, reply.body
    return reply.body


def _usage_row(page: Page, framework: str) -> Locator:
    table = page.get_by_role("table", name="Sites per framework", exact=True)
    return table.get_by_role("row").filter(has=page.get_by_role("rowheader", name=framework))


def _open_site(page: Page, name: str) -> Locator:
    page.get_by_label("Site name contains").fill(name)
    page.get_by_role("button", name="Search").click()
    page.get_by_role("button", name=f"Settings of {name}").click()
    dialog = page.get_by_role("dialog", name=f"Settings of {name}")
    expect(dialog).to_be_visible()
    return dialog


def test_presets_are_previewed_then_applied_and_sites_override(console: Console) -> None:
    ids = _seed(console)
    page = console.signed_in("editor")
    console.open(page, "/console/compliance")

    stats = page.get_by_role("list", name="Summary")
    expect(stats).to_contain_text("5Sites")
    expect(stats).to_contain_text("1Sites with their own frameworks")
    expect(_usage_row(page, "HIPAA Security Rule")).to_contain_text("480%Yes")
    expect(_usage_row(page, "PCI DSS")).to_contain_text("120%No")
    expect(page.get_by_role("img", name="Sites per framework")).to_be_visible()
    expect(page.get_by_label("Industry", exact=True)).to_have_value("healthcare")
    expect(page.get_by_role("group", name="Tier").get_by_label("Basic")).to_be_checked()
    console.check_accessible(page)

    # The preview says what the finance preset would change...
    page.get_by_role("button", name="Finance").click()
    preview = page.get_by_role("dialog", name="Apply the Finance preset?")
    expect(preview).to_contain_text("4 of 5 sites inherit a changed default and will change")
    settings = preview.get_by_role("table", name="Your defaults now and with the preset")
    expect(settings.get_by_role("row", name="Tier")).to_contain_text("BasicFullChanges")
    expect(preview.locator("dl")).to_contain_text("Frameworks addedSOX, PCI DSS, SOC 2")
    expect(preview.locator("dl")).to_contain_text(
        "Frameworks removedHIPAA Security Rule, NIST Cybersecurity Framework"
    )
    expect(preview.locator("dl")).to_contain_text("Sites whose frameworks change4")
    after = preview.get_by_role("table", name="Sites per framework, now and after")
    expect(after.get_by_role("row", name="PCI DSS")).to_contain_text("15")
    expect(after.get_by_role("row", name="HIPAA Security Rule")).to_contain_text("40")
    console.check_accessible(page)

    # ... and Cancel changes nothing.
    preview.get_by_role("button", name="Cancel").click()
    expect(preview).to_be_hidden()
    assert _get(console, console.partner, "/api/v1/partner")["defaults"]["frameworks"] == [
        "hipaa",
        "nist_csf",
    ]
    expect(_usage_row(page, "HIPAA Security Rule")).to_contain_text("480%")

    page.get_by_role("button", name="Finance").click()
    preview.get_by_role("button", name="Apply preset").click()
    expect(preview).to_be_hidden()
    expect(page.get_by_role("status").first).to_contain_text("Finance preset is now your defaults")
    expect(_usage_row(page, "PCI DSS")).to_contain_text("5100%Yes")
    expect(_usage_row(page, "HIPAA Security Rule")).to_contain_text("00%No")
    expect(_usage_row(page, "SOX")).to_contain_text("480%Yes")
    expect(page.get_by_role("group", name="Tier").get_by_label("Full")).to_be_checked()
    sites = page.get_by_role("table", name="Sites and their settings")
    expect(sites.get_by_role("row", name="Northside Clinic")).to_contain_text(
        "Full partner defaultSOX, PCI DSS, SOC 2 partner default"
    )
    expect(sites.get_by_role("row", name="Corner Bistro")).to_contain_text("PCI DSS site override")
    defaults = _get(console, console.partner, "/api/v1/partner")["defaults"]
    assert defaults == {
        "industry": "finance",
        "tier": "full",
        "frameworks": ["sox", "pci_dss", "soc2"],
    }
    console.screenshot(page, "compliance")

    # A site overrides its frameworks: the effective result says so.
    dialog = _open_site(page, "Harbor Dental")
    frameworks = dialog.get_by_role("group", name="Frameworks", exact=True)
    effective = dialog.locator('dd[data-setting="frameworks"]')
    expect(effective).to_contain_text("SOX, PCI DSS, SOC 2 partner default")
    frameworks.get_by_label("Override").check()
    own = frameworks.get_by_role("group", name="Frameworks of this site")
    own.get_by_label("GDPR").check()
    own.get_by_label("SOX").uncheck()
    console.check_accessible(page)
    dialog.get_by_role("button", name="Save site settings").click()
    expect(dialog.get_by_role("status").first).to_contain_text("Saved")
    expect(effective).to_contain_text("SOC 2, PCI DSS, GDPR site override")
    site = _get(console, console.partner, f"/api/v1/sites/{ids['Harbor Dental']}")
    assert site["overrides"]["frameworks"] == ["soc2", "pci_dss", "gdpr"]
    assert site["effective"]["sources"]["frameworks"] == "site"
    dialog.get_by_role("button", name="Close").click()
    expect(_usage_row(page, "GDPR")).to_contain_text("120%")

    # Back to inheriting: the override is gone, the defaults apply again.
    dialog = _open_site(page, "Harbor Dental")
    frameworks = dialog.get_by_role("group", name="Frameworks", exact=True)
    expect(frameworks.get_by_label("Override")).to_be_checked()
    frameworks.get_by_label("Inherit from partner defaults").check()
    dialog.get_by_role("button", name="Save site settings").click()
    expect(effective).to_contain_text("SOX, PCI DSS, SOC 2 partner default")
    site = _get(console, console.partner, f"/api/v1/sites/{ids['Harbor Dental']}")
    assert site["overrides"]["frameworks"] is None
    dialog.get_by_role("button", name="Close").click()
    expect(_usage_row(page, "GDPR")).to_contain_text("00%")

    # The API refuses a change to a site decommissioned meanwhile: the
    # dialog shows why.
    dialog = _open_site(page, "Eastgate Pharmacy")
    gone = console.run(
        console.partner.request("DELETE", f"/api/v1/sites/{ids['Eastgate Pharmacy']}")
    )
    assert gone.status == 200, gone.body
    tier = dialog.get_by_role("group", name="Tier", exact=True)
    tier.get_by_label("Override").check()
    tier.get_by_label("Basic").check()
    dialog.get_by_role("button", name="Save site settings").click()
    expect(dialog.get_by_role("alert")).to_contain_text("was decommissioned")
    expect(dialog.get_by_role("alert")).to_contain_text("(conflict)")
    console.check_accessible(page)

    dialog.get_by_role("button", name="Close").click()

    # Saving defaults with no framework is allowed, with the API's warning.
    defaults_form = page.get_by_role("region", name="Partner defaults")
    chosen = defaults_form.get_by_role("group", name="Frameworks")
    for name in ("SOX", "PCI DSS", "SOC 2"):
        chosen.get_by_label(name, exact=True).uncheck()
    defaults_form.get_by_role("button", name="Save defaults").click()
    expect(defaults_form.get_by_role("status").first).to_contain_text("Defaults saved")
    expect(defaults_form).to_contain_text("no framework is selected")
    expect(_usage_row(page, "PCI DSS").get_by_role("cell").first).to_have_text("1")
    assert _get(console, console.partner, "/api/v1/partner")["defaults"]["frameworks"] == []


def test_a_viewer_reads_but_cannot_change(console: Console) -> None:
    ids = _seed(console)
    page = console.signed_in("viewer")
    console.open(page, "/console/compliance")
    expect(page.get_by_text("Your role (viewer) can only read").first).to_be_visible()
    expect(page.get_by_role("button", name="Save defaults")).to_be_disabled()
    expect(page.get_by_label("Industry", exact=True)).to_be_disabled()
    expect(_usage_row(page, "HIPAA Security Rule")).to_contain_text("4")
    console.check_accessible(page)

    # The preview is reading: a viewer sees it, but cannot apply it.
    page.get_by_role("button", name="Technology").click()
    preview = page.get_by_role("dialog", name="Apply the Technology preset?")
    expect(preview.get_by_role("button", name="Apply preset")).to_be_disabled()
    expect(preview).to_contain_text("Your role (viewer) can only read")
    preview.get_by_role("button", name="Cancel").click()

    dialog = _open_site(page, "Corner Bistro")
    expect(dialog.locator('dd[data-setting="frameworks"]')).to_contain_text("PCI DSS site override")
    expect(dialog.get_by_role("button", name="Save site settings")).to_be_disabled()
    console.check_accessible(page)

    # The API is what refuses: the page's own call, as the viewer.
    refused = page.evaluate(
        """async (path) => {
            const r = await fetch(path, {method: "PATCH", headers: {
                "Content-Type": "application/merge-patch+json",
                "X-CSRF-Token": document.querySelector('meta[name="csrf-token"]').content},
                body: JSON.stringify({frameworks: null})});
            return {status: r.status, body: await r.json()};
        }""",
        f"/api/v1/sites/{ids['Corner Bistro']}/overrides",
    )
    assert refused["status"] == 403
    assert "a viewer may not do this" in refused["body"]["detail"]
    site = _get(console, console.partner, f"/api/v1/sites/{ids['Corner Bistro']}")
    assert site["overrides"]["frameworks"] == ["pci_dss"]
