"""The Users and keys page in a real browser: inviting someone (the link
shown once, accepted in another browser), changing their role, removing
them, withdrawing an invitation, API keys created, rotated and revoked with
their secret shown once; an editor reads the users and is told why the rest
is not theirs. On SQLite and on PostgreSQL."""

from __future__ import annotations

import re
from typing import Any

from playwright.sync_api import Page, expect

from tests.central.console.conftest import Console

NEWCOMER = "new.tech@acme.example"
PASSPHRASE = "a long and memorable passphrase"


def _status(page: Page, path: str, key: str | None = None) -> int:
    """What the API answers this browser (its session, or a bearer key)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return page.request.get(path, headers=headers).status


def _accept(console: Console, link: str) -> Page:
    """The invited person opens the link in a browser of their own."""
    newcomer = console.new_page()
    newcomer.goto(link)
    newcomer.get_by_label("New password").fill(PASSPHRASE)
    newcomer.get_by_label("The same password again").fill(PASSPHRASE)
    newcomer.get_by_role("button", name="Create my account").click()
    expect(newcomer).to_have_url(re.compile(r"/console/compliance$"))
    return newcomer


def _row(page: Page, text: str) -> Any:
    return page.get_by_role("row").filter(has_text=text)


def test_an_admin_invites_changes_a_role_and_removes_a_user(console: Console) -> None:
    page = console.signed_in("admin")
    console.open(page, "/console/users")
    expect(page.locator("#stat-users")).to_have_text("1")
    expect(page.locator("#stat-invites")).to_have_text("0")
    console.check_accessible(page)

    page.get_by_label("E-mail address").fill("New.Tech@Acme.example")
    page.get_by_label("Role", exact=True).select_option("editor")
    page.get_by_role("button", name="Invite").click()
    shown = page.get_by_role("dialog", name="Invitation link")
    expect(shown).to_contain_text("Shown only this once")
    expect(shown).to_contain_text("was not e-mailed")  # this server has no SMTP
    link = shown.get_by_label(f"One-time link for {NEWCOMER}").input_value()
    assert link.startswith(console.url + "/console/invite#msp_inv_")
    console.check_accessible(page)
    shown.get_by_role("button", name="Done").click()
    expect(shown).to_be_hidden()
    expect(_row(page, NEWCOMER)).to_contain_text("Pending")
    expect(page.locator("#stat-invites")).to_have_text("1")

    newcomer = _accept(console, link)
    page.reload()
    page.wait_for_selector('#page[aria-busy="false"]')
    expect(page.locator("#stat-users")).to_have_text("2")
    expect(_row(page, NEWCOMER).filter(has_text="Accepted")).to_have_count(1)
    role = page.get_by_label(f"Role of {NEWCOMER}")
    expect(role).to_have_value("editor")
    role.select_option("viewer")
    expect(page.get_by_role("status")).to_contain_text(f"{NEWCOMER} is now viewer")
    page.reload()
    expect(page.get_by_label(f"Role of {NEWCOMER}")).to_have_value("viewer")
    me = newcomer.request.get("/api/v1/me").json()
    assert me["role"] == "viewer"

    # The last admin stays one: the API refuses, the page says so.
    mine = page.locator("select[aria-label^='Role of admin-']")
    mine.select_option("editor")
    expect(page.get_by_role("alert")).to_contain_text("last admin")
    expect(mine).to_have_value("admin")

    page.get_by_role("button", name=f"Remove {NEWCOMER}").click()
    confirm = page.get_by_role("dialog", name=f"Remove {NEWCOMER}?")
    expect(confirm).to_contain_text("sessions end now")
    console.check_accessible(page)
    confirm.get_by_role("button", name="Remove user").click()
    expect(confirm).to_be_hidden()
    expect(page.get_by_role("status")).to_contain_text(f"{NEWCOMER} was removed")
    expect(page.get_by_label(f"Role of {NEWCOMER}")).to_have_count(0)
    assert _status(newcomer, "/api/v1/me") == 401

    # An invitation not used yet is withdrawn; its link then opens nothing.
    page.get_by_label("E-mail address").fill("late@acme.example")
    page.get_by_role("button", name="Invite").click()
    late = page.get_by_role("dialog", name="Invitation link")
    late_link = late.get_by_label("One-time link for late@acme.example").input_value()
    late.get_by_role("button", name="Done").click()
    page.get_by_role("button", name="Withdraw the invitation of late@acme.example").click()
    page.get_by_role("dialog").get_by_role("button", name="Withdraw invitation").click()
    expect(_row(page, "late@acme.example")).to_contain_text("Revoked")
    stranger = console.new_page()
    stranger.goto(late_link)
    stranger.get_by_label("New password").fill(PASSPHRASE)
    stranger.get_by_label("The same password again").fill(PASSPHRASE)
    stranger.get_by_role("button", name="Create my account").click()
    expect(stranger.get_by_role("alert")).to_contain_text("unknown, used")
    console.screenshot(page, "users")
    # At a phone's width the tables scroll inside themselves, not the page.
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_api_keys_are_shown_once_and_only_admins_manage(console: Console) -> None:
    page = console.signed_in("admin")
    console.open(page, "/console/users")
    expect(page.locator("#stat-keys")).to_have_text("1")  # the partner's first key
    page.get_by_label("Name of the new key").fill("PSA ticket sync")
    page.get_by_role("button", name="Create key").click()
    shown = page.get_by_role("dialog", name="New API key")
    secret = shown.get_by_label("API key “PSA ticket sync”").input_value()
    expect(shown).to_contain_text("Shown only this once")
    console.check_accessible(page)
    shown.get_by_role("button", name="Done").click()
    assert _status(page, "/api/v1/sites", secret) == 200
    row = _row(page, "PSA ticket sync")
    expect(row).to_contain_text(secret[:8])
    expect(row).to_contain_text("Active")
    expect(page.locator("#stat-keys")).to_have_text("2")
    # The secret is nowhere on the page once the dialog is closed.
    assert secret not in page.content()

    row.get_by_role("button", name="Rotate PSA ticket sync").click()
    rotating = page.get_by_role("dialog", name="Rotate the key “PSA ticket sync”")
    rotating.get_by_label("Overlap (minutes)").fill("30")
    console.check_accessible(page)
    rotating.get_by_role("button", name="Rotate key").click()
    rotated = page.get_by_role("dialog", name="Rotated API key")
    new_secret = rotated.get_by_label("New API key “PSA ticket sync”").input_value()
    rotated.get_by_role("button", name="Done").click()
    assert new_secret != secret
    assert _status(page, "/api/v1/sites", secret) == 200  # still, for the overlap
    assert _status(page, "/api/v1/sites", new_secret) == 200
    expect(_row(page, "PSA ticket sync").filter(has_text="Expiring")).to_have_count(1)

    fresh = _row(page, "PSA ticket sync").filter(has_text="Active")
    fresh.get_by_role("button", name="Revoke PSA ticket sync").click()
    confirm = page.get_by_role("dialog", name="Revoke the key “PSA ticket sync”?")
    console.check_accessible(page)
    confirm.get_by_role("button", name="Revoke key").click()
    expect(confirm).to_be_hidden()
    expect(page.get_by_role("status")).to_contain_text("was revoked")
    assert _status(page, "/api/v1/sites", new_secret) == 401
    expect(_row(page, "PSA ticket sync").filter(has_text="Revoked")).to_have_count(1)

    # The partner's last active key cannot go: the API says why, in the dialog.
    last = page.get_by_role("button", name=re.compile(r"^Revoke "))
    expect(last).to_have_count(1)
    last.click()
    confirm = page.get_by_role("dialog")
    confirm.get_by_role("button", name="Revoke key").click()
    expect(confirm.get_by_role("alert")).to_contain_text("last active key")
    confirm.get_by_role("button", name="Cancel").click()
    expect(confirm).to_be_hidden()
    assert _status(page, "/api/v1/sites", console.partner.key) == 200
    console.screenshot(page, "users-keys")
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390

    # An editor reads the users, and is told why the rest is not theirs.
    page = console.signed_in("editor")
    console.open(page, "/console/users")
    expect(page.locator("#read-only")).to_contain_text("Your role (editor) can only read")
    expect(_row(page, "(you)")).to_contain_text("editor")
    expect(page.locator("#stat-admins")).to_have_text("1")
    expect(page.get_by_role("combobox")).to_have_count(0)
    expect(page.get_by_role("button", name=re.compile("^Remove"))).to_have_count(0)
    expect(page.get_by_label("E-mail address")).to_have_count(0)
    expect(page.get_by_label("Name of the new key")).to_have_count(0)
    refusals = page.get_by_role("note")
    expect(refusals.filter(has_text="Only admins see API keys")).to_contain_text("403")
    expect(refusals.filter(has_text="Only admins see invitations")).to_have_count(1)
    expect(page.locator("#stat-keys")).to_have_count(0)
    console.check_accessible(page)
    console.screenshot(page, "users-editor")
