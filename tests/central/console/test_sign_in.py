"""Signing in to the console, in a real browser: passwords, the TOTP second
factor, invitations, sign-out everywhere, session expiry, CSRF, throttling
and roles; on SQLite and on PostgreSQL."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from playwright.sync_api import expect

from msp_central.db.tables import central_log_entries, security_alerts
from tests.central.console.conftest import PASSWORD, Console, read_qr


def _api(page: Any, method: str, path: str, body: Any = None, csrf: bool = True) -> dict[str, Any]:
    """Call the API from the page, as its script would (or without the CSRF
    token, as a forged request would)."""
    return page.evaluate(
        """async ([method, path, body, csrf]) => {
            const headers = {"Content-Type": "application/json"};
            if (csrf) headers["X-CSRF-Token"] = document.querySelector('meta[name="csrf-token"]').content;
            const r = await fetch(path, {method, headers, body: body === null ? undefined : JSON.stringify(body)});
            return {status: r.status, body: r.status === 204 ? null : await r.json()};
        }""",
        [method, path, body, csrf],
    )


def test_sign_in_out_and_the_pages_need_it(console: Console) -> None:
    email = console.user("editor")
    page = console.new_page()
    page.goto("/console/posture")
    expect(page).to_have_url(re.compile(r"/console/sign-in\?next=/console/posture"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    console.check_accessible(page)
    console.screenshot(page, "sign-in")

    page.get_by_label("E-mail address").fill(email)
    page.get_by_label("Password").fill("not the password at all")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("do not match")

    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/console/posture$"))
    expect(page.get_by_role("link", name=email)).to_be_visible()
    cookie = next(c for c in page.context.cookies() if "msp-session" in c["name"])
    assert cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"
    # Plain HTTP on loopback: not Secure (a browser would drop it), plainly named.
    assert cookie["name"] == "msp-session"
    assert not cookie["secure"]

    me = _api(page, "GET", "/api/v1/me")
    assert me["status"] == 200
    assert me["body"]["email"] == email
    assert me["body"]["role"] == "editor"
    page.get_by_role("button", name="Sign out", exact=True).click()
    expect(page.get_by_role("status")).to_contain_text("signed out")
    assert _api(page, "GET", "/api/v1/me", csrf=False)["status"] == 401


def test_totp_second_factor_is_set_up_and_then_asked_for(console: Console) -> None:
    email = console.user("viewer")
    page = console.new_page()
    console.sign_in(page, email)
    page.goto("/console/account")
    page.get_by_role("button", name="Set up two-factor sign-in").click()
    secret = page.locator("#totp-secret").inner_text()
    # The QR code, as the browser drew it, read by a barcode reader of its
    # own: it is the link shown beside it, which holds the key.
    link = page.locator("#totp-uri").get_attribute("href")
    assert link is not None
    assert f"secret={secret}" in link
    qr = page.get_by_role("img", name="QR code of the link below")
    assert qr.evaluate("image => image.complete && image.naturalWidth > 0")
    assert read_qr(qr.screenshot()) == link
    page.get_by_label("Code from the app").fill(
        "000000" if console.totp_code(secret) != "000000" else "111111"
    )
    page.get_by_role("button", name="Turn on two-factor sign-in").click()
    expect(page.get_by_role("alert")).to_contain_text("not right")
    page.get_by_label("Code from the app").fill(console.totp_code(secret))
    page.get_by_role("button", name="Turn on two-factor sign-in").click()
    expect(page.get_by_role("status")).to_contain_text("Two-factor sign-in is on")
    console.check_accessible(page)
    console.screenshot(page, "account")
    page.get_by_role("button", name="Sign out", exact=True).click()

    console.sign_in(page, email)
    expect(page.get_by_role("heading", name="Two-factor code")).to_be_visible()
    # Password alone opens nothing.
    assert _api(page, "GET", "/api/v1/me", csrf=False)["status"] == 401
    used = console.totp_code(secret)
    console.clock.advance(timedelta(seconds=30))
    # The code that turned TOTP on was used once; the next step's code works.
    page.get_by_label("Code").fill(used)
    page.get_by_role("button", name="Continue").click()
    expect(page.get_by_role("alert")).to_contain_text("not right")
    page.get_by_label("Code").fill(console.totp_code(secret))
    page.get_by_role("button", name="Continue").click()
    expect(page).to_have_url(re.compile(r"/console/compliance$"))
    assert _api(page, "GET", "/api/v1/me")["body"]["totp_enabled"] is True


def test_an_invitation_makes_an_account_once(console: Console) -> None:
    admin = console.signed_in("admin")
    made = _api(
        admin, "POST", "/api/v1/user-invites", {"email": "New.Tech@Acme.example", "role": "editor"}
    )
    assert made["status"] == 201, made
    link = made["body"]["link"]
    assert link.startswith(console.url + "/console/invite#msp_inv_")

    newcomer = console.new_page()
    newcomer.goto(link)
    expect(newcomer.get_by_label("Invitation code")).to_have_value(link.split("#")[1])
    console.check_accessible(newcomer)
    newcomer.get_by_label("New password").fill("short")
    newcomer.get_by_label("The same password again").fill("short")
    newcomer.get_by_role("button", name="Create my account").click()
    # The browser holds the form back; the server says the same if it is sent.
    assert newcomer.locator("#password").evaluate("e => e.validity.tooShort")
    sent = newcomer.request.post(
        "/console/invite",
        form={"token": link.split("#")[1], "password": "short", "confirm": "short"},
        headers={"Origin": console.url},
    )
    assert sent.status == 400
    assert "at least 12" in sent.text()
    newcomer.get_by_label("New password").fill("a long and memorable passphrase")
    newcomer.get_by_label("The same password again").fill("a long and memorable passphrase")
    newcomer.get_by_role("button", name="Create my account").click()
    expect(newcomer).to_have_url(re.compile(r"/console/compliance$"))
    me = _api(newcomer, "GET", "/api/v1/me")["body"]
    assert (me["email"], me["role"]) == ("new.tech@acme.example", "editor")

    again = console.new_page()
    again.goto(link)
    again.get_by_label("New password").fill("another long passphrase")
    again.get_by_label("The same password again").fill("another long passphrase")
    again.get_by_role("button", name="Create my account").click()
    expect(again.get_by_role("alert")).to_contain_text("unknown, used")


def test_csrf_roles_and_what_the_central_log_records(console: Console) -> None:
    viewer = console.signed_in("viewer")
    refused = _api(
        viewer, "PUT", "/api/v1/partner/defaults", {"tier": "basic", "frameworks": ["hipaa"]}
    )
    assert (refused["status"], refused["body"]["code"]) == (403, "forbidden")
    assert "viewer" in refused["body"]["detail"]

    editor = console.signed_in("editor")
    forged = _api(
        editor,
        "PUT",
        "/api/v1/partner/defaults",
        {"tier": "basic", "frameworks": ["hipaa"]},
        csrf=False,
    )
    assert (forged["status"], forged["body"]["code"]) == (403, "csrf-failed")
    done = _api(
        editor,
        "PUT",
        "/api/v1/partner/defaults",
        {"tier": "basic", "frameworks": ["hipaa", "soc2"]},
    )
    assert done["status"] == 200, done
    keys = _api(editor, "GET", "/api/v1/api-keys", csrf=False)
    assert (keys["status"], keys["body"]["code"]) == (403, "forbidden")
    user_id = _api(editor, "GET", "/api/v1/me")["body"]["user_id"]

    async def actors() -> list[str]:
        async with console.harness.engine.connect() as connection:
            rows = (await connection.execute(sa.select(central_log_entries.c.raw))).all()
        return [bytes(row.raw).decode() for row in rows]

    assert any(
        f"user:{user_id}" in raw and "partner.defaults" in raw for raw in console.run(actors())
    )


def test_sessions_end_when_idle_and_everywhere(console: Console) -> None:
    email = console.user("editor")
    first, second = console.new_page(), console.new_page()
    console.sign_in(first, email)
    console.sign_in(second, email)
    assert _api(first, "GET", "/api/v1/me")["status"] == 200
    console.clock.advance(timedelta(minutes=31))
    expired = _api(first, "GET", "/api/v1/me")
    assert (expired["status"], expired["body"]["code"]) == (401, "session-expired")
    first.goto("/console/appliances")
    expect(first).to_have_url(re.compile(r"/console/sign-in"))
    expect(first.get_by_role("status")).to_contain_text("session has ended")

    console.sign_in(first, email)
    console.sign_in(second, email)
    first.goto("/console/account")
    first.get_by_role("button", name="Sign out everywhere").click()
    assert _api(second, "GET", "/api/v1/me", csrf=False)["status"] == 401


@pytest.mark.parametrize("backend_only", [None])
def test_repeated_failures_are_throttled_and_raise_an_alert(
    console: Console, backend_only: None
) -> None:
    email = console.user("admin")
    page = console.new_page()
    for _ in range(5):
        console.sign_in(page, email, "a wrong password, again")
        expect(page.get_by_role("alert")).to_contain_text("do not match")
    response = page.request.post(
        "/console/sign-in",
        form={"email": email, "password": PASSWORD, "next": "/console/compliance"},
        headers={"Origin": console.url},
        max_redirects=0,
    )
    # Even the right password waits: the guesser cannot tell.
    assert response.status == 429
    assert int(response.headers["retry-after"]) > 0
    # A neighbour behind the same address, another account: not locked out.
    console.sign_in(page, console.user("viewer"))
    expect(page).to_have_url(re.compile(r"/console/compliance$"))

    async def alerts() -> list[Any]:
        async with console.harness.engine.connect() as connection:
            return list((await connection.execute(sa.select(security_alerts))).all())

    assert not console.run(alerts())
    # Five more from elsewhere would be throttled there too; the alert comes at ten.
    for _ in range(5):
        page.request.post(
            "/console/sign-in",
            form={"email": email, "password": "wrong again", "next": "/console/compliance"},
            headers={"Origin": console.url},
            max_redirects=0,
        )
    rows = console.run(alerts())
    assert len(rows) <= 1
