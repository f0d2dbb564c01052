"""The Auditors page in a real browser: a site's auditor package for a
framework and a period downloaded through the page, with the central key
the page offers, and checked by the real ``msp-verify`` command exactly as
the page tells the auditor to run it; on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from playwright.sync_api import Page, expect

from msp_protocol.keys import VerifyKey
from tests.central.console.conftest import Console

AUDIT = "164.312(b)"
AUTH = "164.312(d)"
MSP_VERIFY = Path(sys.executable).parent / "msp-verify"


def _seed(console: Console) -> str:
    """A HIPAA and PCI DSS site whose appliance pushed three bundles (one of
    them PCI only) and synced its audit log, beside a site of no interest."""

    async def seed() -> str:
        partner, harness = console.partner, console.harness
        made = await partner.request(
            "POST",
            "/api/v1/sites",
            {"name": "Northside Clinic", "overrides": {"frameworks": ["hipaa", "pci_dss"]}},
        )
        assert made.status == 201, made.body
        site_id = str(made.body["id"])
        await harness.site(partner, "Southside Dental")
        appliance = await harness.enroll(partner, site_id)
        appliance.grow(3)
        for fields in (
            {"controls": {"hipaa": (AUDIT,)}},
            {
                "check_id": "ssh_password_login_disabled",
                "controls": {"hipaa": (AUTH,)},
                "result": "fail",
                "observed": {"reason": "sshd allows PasswordAuthentication"},
            },
            {"check_id": "firewall_active", "controls": {"pci_dss": ("1.2.1",)}},
        ):
            pushed = await appliance.push(appliance.sign_bundle(**fields))  # type: ignore[arg-type]
            assert pushed.status == 201, pushed.body
        synced = await appliance.sync(appliance.batch(0))
        assert synced.status == 200, synced.body
        return site_id

    return console.run(seed())


def _verify(command: str, where: Path) -> subprocess.CompletedProcess[str]:
    """Run the command the page shows, with the msp-verify installed in
    this environment, in the folder holding the downloads."""
    words = shlex.split(command)
    assert words[0] == "msp-verify"
    assert MSP_VERIFY.exists(), "run uv sync: the msp-verify console script is missing"
    return subprocess.run(
        [str(MSP_VERIFY), *words[1:]],
        cwd=where,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _choose(page: Page, site: str, framework: str) -> None:
    page.get_by_label("Find a site").fill(site[:5])
    expect(page.get_by_text("1 site matching")).to_be_visible()
    page.get_by_label("Site", exact=True).select_option(label=site)
    page.get_by_label("Framework").select_option(framework)


def test_a_package_downloaded_from_the_page_verifies_and_bad_periods_are_named(
    console: Console, tmp_path: Path
) -> None:
    site_id = _seed(console)
    page = console.signed_in("viewer")  # reading is enough for an auditor's package
    console.open(page, "/console/auditors")
    expect(page.get_by_role("heading", name="Auditors", level=1)).to_be_visible()
    console.check_accessible(page)

    # The key, its id as msp-verify names it, and the file to give the auditor.
    shown = page.locator("#central-key").inner_text()
    assert page.locator("#key-id").inner_text() == VerifyKey.from_hex(shown).key_id
    with page.expect_download() as key_download:
        page.get_by_role("link", name="Download the key (central.pub)").click()
    assert key_download.value.suggested_filename == "central.pub"
    key_download.value.save_as(tmp_path / "central.pub")
    assert (tmp_path / "central.pub").read_text().strip() == shown

    _choose(page, "Northside Clinic", "hipaa")
    today = console.clock().date()
    page.get_by_label("First day").fill((today - timedelta(days=6)).isoformat())
    page.get_by_label("Last day").fill(today.isoformat())
    page.get_by_label("Last day").dispatch_event("change")
    download = page.get_by_role("link", name="Download the auditor package")
    expect(download).to_have_attribute(
        "href",
        f"/api/v1/sites/{site_id}/auditor-package?"
        f"framework=hipaa&from={today - timedelta(days=6)}T00%3A00%3A00Z",
    )
    name = f"auditor-package-{site_id}-{today.isoformat()}.json"
    command = page.locator(".codeblock code").inner_text()
    assert command == f"msp-verify --central-key-file central.pub {name}"
    expect(page.locator("#package-summary")).to_contain_text("HIPAA Security Rule")
    expect(page.locator("#package-summary")).to_contain_text("7 days")
    expect(page.locator("#what-it-checks")).to_contain_text("certified")
    console.check_accessible(page)
    console.screenshot(page, "auditors")
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.set_viewport_size({"width": 1366, "height": 768})

    with page.expect_download() as package_download:
        download.click()
    assert package_download.value.suggested_filename == name
    package_download.value.save_as(tmp_path / name)
    package = json.loads((tmp_path / name).read_text())
    assert package["frameworks"] == ["hipaa"]
    assert len(package["evidence"]) == 2  # the PCI-only bundle is not in it

    verified = _verify(command, tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "verified" in verified.stdout
    # The same with the key given on the command line, as the page also shows.
    inline = page.locator("#verify-inline").inner_text()
    assert inline == f"msp-verify --central-key {shown} {name}"
    verified = _verify(inline, tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # The same command on an edited package fails, and says why.
    package["summary"]["controls"][0]["state"] = (
        "passing" if package["summary"]["controls"][0]["state"] != "passing" else "failing"
    )
    (tmp_path / name).write_text(json.dumps(package))
    refused = _verify(command, tmp_path)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "NOT VERIFIED" in refused.stdout

    # A period the server would refuse gives no link, and says why.
    page.get_by_label("Framework").select_option("pci_dss")
    page.get_by_label("First day").fill("2026-03-10")
    page.get_by_label("Last day").fill("2026-03-01")
    page.get_by_label("Last day").dispatch_event("change")
    expect(page.get_by_role("alert")).to_contain_text("comes before its first")
    expect(page.locator("#download")).not_to_have_attribute("href", "")
    assert page.locator("#download").get_attribute("href") is None
    page.get_by_label("First day").fill("2025-01-01")
    page.get_by_label("Last day").fill("2026-03-01")
    page.get_by_label("Last day").dispatch_event("change")
    expect(page.get_by_role("alert")).to_contain_text("at most 366 days")
    console.check_accessible(page)

    page.get_by_label("First day").fill("2026-01-01")
    page.get_by_label("Last day").dispatch_event("change")
    expected = (
        f"/api/v1/sites/{site_id}/auditor-package?framework=pci_dss"
        "&from=2026-01-01T00%3A00%3A00Z&to=2026-03-02T00%3A00%3A00Z"
    )
    expect(page.locator("#download")).to_have_attribute("href", expected)
    # The page's address keeps the choice: opened again, it chooses the same.
    again = console.new_page()
    console.sign_in(again, console.user("viewer"))
    console.open(again, page.url.removeprefix(console.url))
    expect(again.get_by_label("Framework")).to_have_value("pci_dss")
    expect(again.locator("#download")).to_have_attribute("href", expected)
    expect(again.locator(".codeblock code")).to_have_text(
        f"msp-verify --central-key-file central.pub auditor-package-{site_id}-2026-03-02.json"
    )
