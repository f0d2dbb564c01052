"""Console accounts over HTTP (no browser), on both backends: invitations,
roles, the last admin, CSRF and origin checks, TOTP used once, session
fixation, throttling that spares neighbours, the alert it raises, removed
users, cookies and security headers."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest
import sqlalchemy as sa

from msp_central.config import Settings
from msp_central.console.accounts import create_user, normalise_email, totp_step
from msp_central.db.tables import notification_events, users
from msp_central.problems import Problem
from msp_protocol.encoding import utc_now
from tests.central.support import Harness, KeyClient

PASSWORD = "correct horse battery staple"


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    # The test client is a trusted proxy: X-Forwarded-For names the source.
    return Settings(
        state_dir=tmp_path / "state", database_url=database_url, trusted_proxies=["127.0.0.1"]
    )


async def _user(harness: Harness, partner: KeyClient, role: str, email: str) -> str:
    async with harness.engine.begin() as connection:
        assert partner.partner_id
        return await create_user(
            connection,
            partner_id=partner.partner_id,
            email=email,
            password=PASSWORD,
            role=role,  # type: ignore[arg-type]
            actor="test",
            now=harness.clock(),
        )


async def _sign_in(harness: Harness, email: str, password: str = PASSWORD, **headers: str) -> Any:
    client = harness.client
    origin = str(client.make_url("")).rstrip("/")
    return await client.post(
        "/console/sign-in",
        data={"email": email, "password": password, "next": "/console/posture"},
        headers={"Origin": origin, **headers},
        allow_redirects=False,
    )


async def _csrf(harness: Harness) -> str:
    response = await harness.client.get("/console/compliance")
    assert response.status == 200
    text = await response.text()
    return text.split('name="csrf-token" content="')[1].split('"')[0]


async def test_roles_decide_what_a_session_may_change(harness: Harness) -> None:
    partner = await harness.partner()
    await _user(harness, partner, "viewer", "viewer@acme.example")
    signed = await _sign_in(harness, "viewer@acme.example")
    assert signed.status == 303
    assert signed.headers["Location"] == "/console/posture"
    token = await _csrf(harness)
    client = harness.client
    body = {"tier": "basic", "frameworks": ["hipaa"]}
    refused = await client.put(
        "/api/v1/partner/defaults", json=body, headers={"X-CSRF-Token": token}
    )
    assert refused.status == 403
    assert "viewer" in (await refused.json())["detail"]
    assert (await client.get("/api/v1/sites")).status == 200


async def test_csrf_token_and_origin_are_required_for_changes(harness: Harness) -> None:
    partner = await harness.partner()
    await _user(harness, partner, "editor", "editor@acme.example")
    assert (await _sign_in(harness, "editor@acme.example")).status == 303
    token = await _csrf(harness)
    client = harness.client
    body = {"tier": "basic", "frameworks": ["hipaa"]}
    missing = await client.put("/api/v1/partner/defaults", json=body)
    assert (missing.status, (await missing.json())["code"]) == (403, "csrf-failed")
    wrong = await client.put(
        "/api/v1/partner/defaults", json=body, headers={"X-CSRF-Token": "0" * 64}
    )
    assert wrong.status == 403
    foreign = await client.put(
        "/api/v1/partner/defaults",
        json=body,
        headers={"X-CSRF-Token": token, "Origin": "https://evil.example"},
    )
    assert (foreign.status, (await foreign.json())["code"]) == (403, "csrf-failed")
    cross = await client.put(
        "/api/v1/partner/defaults",
        json=body,
        headers={"X-CSRF-Token": token, "Sec-Fetch-Site": "cross-site"},
    )
    assert cross.status == 403
    ok = await client.put("/api/v1/partner/defaults", json=body, headers={"X-CSRF-Token": token})
    assert ok.status == 200
    # A sign-in posted from another site is refused before any password check.
    forged = await _sign_in(harness, "editor@acme.example", Origin="https://evil.example")
    assert forged.status == 403


async def test_the_last_admin_stays_and_a_removed_user_is_signed_out(harness: Harness) -> None:
    partner = await harness.partner()
    boss = await _user(harness, partner, "admin", "boss@acme.example")
    tech = await _user(harness, partner, "editor", "tech@acme.example")
    demote = await partner.request("PATCH", f"/api/v1/users/{boss}", {"role": "editor"})
    assert (demote.status, demote.code) == (409, "conflict")
    remove = await partner.request("DELETE", f"/api/v1/users/{boss}")
    assert (remove.status, remove.code) == (409, "conflict")
    assert (await _sign_in(harness, "tech@acme.example")).status == 303
    assert (await harness.client.get("/api/v1/me")).status == 200
    assert (await partner.request("DELETE", f"/api/v1/users/{tech}")).status == 204
    gone = await harness.client.get("/api/v1/me")
    assert (gone.status, (await gone.json())["code"]) == (401, "session-expired")
    # The address is free again for a new invitation.
    again = await partner.request(
        "POST", "/api/v1/user-invites", {"email": "tech@acme.example", "role": "viewer"}
    )
    assert again.status == 201


async def test_an_invitation_works_once_and_lapses(harness: Harness) -> None:
    partner = await harness.partner()
    made = await partner.request(
        "POST", "/api/v1/user-invites", {"email": "new@acme.example", "role": "viewer"}
    )
    token = made.body["link"].split("#")[1]
    origin = str(harness.client.make_url("")).rstrip("/")
    form = {"token": token, "password": PASSWORD, "confirm": PASSWORD}
    first = await harness.client.post(
        "/console/invite", data=form, headers={"Origin": origin}, allow_redirects=False
    )
    assert first.status == 303
    second = await harness.client.post("/console/invite", data=form, headers={"Origin": origin})
    assert second.status == 400
    late = await partner.request(
        "POST", "/api/v1/user-invites", {"email": "late@acme.example", "role": "viewer"}
    )
    harness.clock.advance(timedelta(hours=73))
    lapsed = await harness.client.post(
        "/console/invite",
        data={**form, "token": late.body["link"].split("#")[1]},
        headers={"Origin": origin},
    )
    assert lapsed.status == 400
    listed = await partner.request("GET", "/api/v1/user-invites")
    assert {i["email"]: i["state"] for i in listed.body["items"]} == {
        "new@acme.example": "used",
        "late@acme.example": "expired",
    }
    taken = await partner.request(
        "POST", "/api/v1/user-invites", {"email": "NEW@acme.example", "role": "viewer"}
    )
    assert (taken.status, taken.code) == (409, "conflict")


async def test_totp_codes_work_once_and_the_session_is_renewed(harness: Harness) -> None:
    partner = await harness.partner()
    user_id = await _user(harness, partner, "editor", "two@acme.example")
    secret = pyotp.random_base32()
    async with harness.engine.begin() as connection:
        await connection.execute(
            sa.update(users)
            .where(users.c.id == user_id)
            .values(totp_secret=secret, totp_enabled=True)
        )
    signed = await _sign_in(harness, "two@acme.example")
    assert signed.headers["Location"].startswith("/console/second-factor")
    pending = harness.client.session.cookie_jar.filter_cookies(harness.client.make_url("/"))
    pending_id = pending["msp-session"].value
    assert (await harness.client.get("/api/v1/me")).status == 401
    token = (
        (await (await harness.client.get("/console/second-factor")).text())
        .split('name="csrf_token" value="')[1]
        .split('"')[0]
    )
    code = pyotp.TOTP(secret).at(harness.clock())
    origin = str(harness.client.make_url("")).rstrip("/")
    done = await harness.client.post(
        "/console/second-factor",
        data={"csrf_token": token, "code": code, "next": "/console/posture"},
        headers={"Origin": origin},
        allow_redirects=False,
    )
    assert done.status == 303
    after = harness.client.session.cookie_jar.filter_cookies(harness.client.make_url("/"))
    assert after["msp-session"].value != pending_id
    assert (await harness.client.get("/api/v1/me")).status == 200
    now = harness.clock()
    step = int(now.timestamp()) // 30
    assert totp_step(secret, code, now, step) is None  # used once
    assert totp_step(secret, code, now, step - 1) == step
    assert totp_step(secret, "12345", now, None) is None


async def test_failed_sign_ins_are_throttled_per_address_and_source(harness: Harness) -> None:
    partner = await harness.partner()
    other = await harness.partner()
    await _user(harness, partner, "admin", "target@acme.example")
    await _user(harness, partner, "viewer", "neighbour@acme.example")
    here = {"X-Forwarded-For": "203.0.113.7"}
    for _ in range(5):
        failed = await _sign_in(harness, "target@acme.example", "wrong password!", **here)
        assert failed.status == 401
    held = await _sign_in(harness, "target@acme.example", **here)
    assert held.status == 429
    assert 0 < int(held.headers["Retry-After"]) <= 15 * 60
    # Another account behind the same address is not locked out...
    assert (await _sign_in(harness, "neighbour@acme.example", **here)).status == 303
    # ...nor is the target from elsewhere.
    assert (
        await _sign_in(harness, "target@acme.example", **{"X-Forwarded-For": "198.51.100.2"})
    ).status == 303
    # The window passes: the first address may try again.
    harness.clock.advance(timedelta(minutes=16))
    assert (await _sign_in(harness, "target@acme.example", **here)).status == 303
    # Ten failures within the window, from several addresses: one alert for
    # the partner, and its notification event.
    for number in range(12):
        source = {"X-Forwarded-For": f"192.0.2.{number // 4 + 1}"}
        await _sign_in(harness, "target@acme.example", "wrong password!", **source)
    alerts = await partner.request("GET", "/api/v1/security-alerts")
    codes = [a["code"] for a in alerts.body["items"]]
    assert codes == ["login-failures"]
    assert alerts.body["items"][0]["site_id"] is None
    assert not (await other.request("GET", "/api/v1/security-alerts")).body["items"]
    async with harness.engine.connect() as connection:
        kinds = (await connection.execute(sa.select(notification_events.c.kind))).scalars().all()
    assert list(kinds) == ["security.alert"]


async def test_every_answer_carries_the_security_headers(harness: Harness) -> None:
    for path in ("/console/sign-in", "/api/v1/openapi.json", "/console/static/console.js"):
        response = await harness.client.get(path)
        assert response.status == 200
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "unsafe" not in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "same-origin"
    page = await harness.client.get("/console/sign-in")
    assert page.headers["Cache-Control"] == "no-store"
    assert (await harness.client.get("/console/static/../app.py")).status == 404
    assert (await harness.client.get("/")).status == 200  # redirected to sign in


@pytest.mark.parametrize(
    "value", ["", "no-at-sign", "a@b", "a b@example.com", "x" * 250 + "@example.com"]
)
def test_bad_addresses_are_refused(value: str) -> None:
    with pytest.raises(Problem):
        normalise_email(value)


def test_addresses_are_compared_lower_cased() -> None:
    assert normalise_email("  Jane.Doe@Example.COM ") == "jane.doe@example.com"
    assert utc_now()  # the clock the server uses is aware
