"""Notifications end to end: a real webhook receiver on loopback that checks
the Standard Webhooks signature itself, a real SMTP server (aiosmtpd), the
notifier running in the app against SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller

from msp_central.app import create_app
from msp_central.config import Settings
from msp_central.context import CENTRAL
from msp_protocol.bundle import Escalation
from msp_protocol.encoding import format_time
from msp_protocol.keys import SigningKey
from tests.central.support import ROOT, ApplianceClient, Clock, Harness, KeyClient

# --- a webhook receiver that verifies what it gets, from the specification ------------


def verify_standard_webhook(secret: str, headers: Any, body: bytes, now: float) -> dict[str, Any]:
    """Check a delivery as https://www.standardwebhooks.com/ says a receiver
    must: the signature over "{id}.{timestamp}.{body}" with the base64 key
    after "whsec_", one of the space-separated "v1,<base64>" signatures
    matching, the timestamp within five minutes."""
    message_id = headers["webhook-id"]
    timestamp = headers["webhook-timestamp"]
    key = base64.b64decode(secret.split("_", 1)[1])
    expected = base64.b64encode(
        hmac.new(key, f"{message_id}.{timestamp}.{body.decode()}".encode(), hashlib.sha256).digest()
    ).decode()
    signatures = [s.split(",", 1) for s in headers["webhook-signature"].split(" ")]
    assert any(v == "v1" and hmac.compare_digest(sig, expected) for v, sig in signatures)
    assert abs(now - int(timestamp)) <= 300
    document: dict[str, Any] = json.loads(body)
    return document


@dataclass
class Receiver:
    clock: Clock
    secret: str = ""
    answers: list[int] = field(default_factory=list)  # statuses to answer first, then 200
    received: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    arrived: list[float] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts += 1
        status = self.answers.pop(0) if self.answers else 200
        if status == 200:
            document = verify_standard_webhook(
                self.secret, request.headers, body, self.clock().timestamp()
            )
            document["webhook-id"] = request.headers["webhook-id"]
            self.received.append(document)
            self.arrived.append(time.monotonic())
        return web.Response(status=status)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.received if d["type"] == kind]


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.arrived: list[float] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        self.arrived.append(time.monotonic())
        return "250 OK"

    def subjects(self, word: str) -> list[str]:
        return [str(m["Subject"]) for m in self.messages if word in str(m["Subject"])]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = _free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


def _settings(database_url: str, tmp_path: Path, smtp_port: int | None, **more: Any) -> Settings:
    values: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "database_url": database_url,
        "notify_interval_seconds": 0.05,
        "notification_retry_base_seconds": 0.05,
        "notification_retry_max_seconds": 0.2,
        "notification_max_attempts": 3,
        "notification_timeout_seconds": 2,
        "default_heartbeat_interval_seconds": 60,
        **more,
    }
    if smtp_port is not None:
        values.update(
            smtp_host="127.0.0.1",
            smtp_port=smtp_port,
            smtp_from="central@msp.example",
            smtp_starttls=False,
        )
    return Settings(**values)


Start = Callable[..., Awaitable[Harness]]


@pytest.fixture
def start(
    database_url: str, tmp_path: Path, aiohttp_client: Any, mailbox: tuple[Mailbox, int]
) -> Start:
    """Start a server (another replica on the same database when called
    again with the same clock)."""

    async def starter(clock: Clock | None = None, smtp: bool = True, **more: Any) -> Harness:
        clock = clock or Clock()
        settings = _settings(database_url, tmp_path, mailbox[1] if smtp else None, **more)
        app = create_app(settings, root=ROOT, clock=clock)
        client = await aiohttp_client(app)
        return Harness(client, app[CENTRAL].engine, clock)

    return starter


@pytest.fixture
async def receiver_url(aiohttp_server: Any) -> Callable[[Receiver], Awaitable[str]]:
    async def serve(receiver: Receiver) -> str:
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        server = await aiohttp_server(app)
        return str(server.make_url("/hook"))

    return serve


async def eventually(check: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


async def webhook(partner: KeyClient, receiver: Receiver, url: str, **more: Any) -> str:
    reply = await partner.request(
        "POST", "/api/v1/notification-channels", {"kind": "webhook", "url": url, **more}
    )
    assert reply.status == 201, reply.body
    receiver.secret = reply.body["secret"]
    assert receiver.secret.startswith("whsec_")
    return str(reply.body["channel"]["id"])


async def email(partner: KeyClient, address: str = "noc@partner.example") -> str:
    reply = await partner.request(
        "POST", "/api/v1/notification-channels", {"kind": "email", "email": address}
    )
    assert reply.status == 201, reply.body
    assert reply.body["secret"] is None
    return str(reply.body["channel"]["id"])


async def beat(appliance: ApplianceClient, interval: int | None = 10) -> None:
    value: dict[str, Any] = {
        "version": "1.0",
        "log_size": 0,
        "queues": {},
        "clock": format_time(appliance.clock()),
    }
    if interval is not None:
        value["heartbeat_interval_seconds"] = interval
    reply = await appliance.request(
        "POST", f"/api/v1/appliances/{appliance.appliance_id}/heartbeat", value
    )
    assert reply.status == 200, reply.body


async def deliveries(partner: KeyClient, query: str = "") -> list[dict[str, Any]]:
    reply = await partner.request("GET", f"/api/v1/notification-deliveries{query}")
    assert reply.status == 200, reply.body
    items: list[dict[str, Any]] = reply.body["items"]
    return items


# --- offline and online ----------------------------------------------------------------


async def test_an_appliance_that_goes_silent_is_reported_offline_once_and_online_again(
    start: Start, mailbox: tuple[Mailbox, int], receiver_url: Any
) -> None:
    harness = await start()
    box = mailbox[0]
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    receiver = Receiver(harness.clock)
    await webhook(partner, receiver, await receiver_url(receiver))
    await email(partner)
    await beat(appliance, interval=10)
    listed = await partner.request("GET", f"/api/v1/sites/{appliance.site_id}/appliances")
    assert listed.body["items"][0]["status"] == "online"

    harness.clock.advance(timedelta(seconds=29))  # under 3 x 10 s: still online
    await asyncio.sleep(0.3)
    assert receiver.received == []
    assert box.messages == []

    harness.clock.advance(timedelta(seconds=2))
    await eventually(lambda: bool(receiver.of("appliance.offline")) and bool(box.messages))
    await asyncio.sleep(0.3)  # more rounds: no second announcement
    (offline,) = receiver.of("appliance.offline")
    assert offline["data"]["appliance_id"] == appliance.appliance_id
    assert offline["data"]["site_id"] == appliance.site_id
    assert offline["data"]["offline_after_seconds"] == 30
    (subject,) = box.subjects("offline")
    assert appliance.appliance_id in subject
    body = box.messages[0].get_payload()
    assert "What to do:" in str(body)
    assert "Clinic" in str(body)
    listed = await partner.request("GET", f"/api/v1/sites/{appliance.site_id}/appliances")
    assert listed.body["items"][0]["status"] == "offline"

    await beat(appliance, interval=10)
    await eventually(lambda: bool(receiver.of("appliance.online")) and len(box.messages) == 2)
    await asyncio.sleep(0.3)
    assert len(receiver.of("appliance.online")) == 1
    assert len(receiver.received) == 2
    assert box.subjects("back online")
    states = {(d["kind"], d["state"]) for d in await deliveries(partner)}
    assert states == {("appliance.offline", "delivered"), ("appliance.online", "delivered")}


async def test_without_a_stated_interval_the_default_one_counts(start: Start) -> None:
    harness = await start()
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    await beat(appliance, interval=None)
    harness.clock.advance(timedelta(seconds=179))  # 3 x the default 60 s
    listed = await partner.request("GET", f"/api/v1/sites/{appliance.site_id}/appliances")
    assert listed.body["items"][0]["status"] == "online"
    harness.clock.advance(timedelta(seconds=2))
    listed = await partner.request("GET", f"/api/v1/sites/{appliance.site_id}/appliances")
    assert listed.body["items"][0]["status"] == "offline"


# --- escalations and security alerts -----------------------------------------------------


async def test_an_urgent_escalation_and_a_security_alert_each_reach_every_channel(
    start: Start, mailbox: tuple[Mailbox, int], receiver_url: Any
) -> None:
    harness = await start()
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    await beat(appliance)
    receiver = Receiver(harness.clock)
    hook = await webhook(partner, receiver, await receiver_url(receiver))
    mail = await email(partner)
    path = f"/api/v1/appliances/{appliance.appliance_id}/escalations"
    for severity, escalation_id in (("critical", "esc-1"), ("low", "esc-2")):
        document = Escalation(
            escalation_id=escalation_id,
            appliance_id=appliance.appliance_id,
            site_id=appliance.site_id,
            severity=severity,  # type: ignore[arg-type]
            title="Disk full on the state directory",
            detail={"free_bytes": 0},
            created_at=appliance.clock(),
        ).to_wire()
        assert (await appliance.request("POST", path, document)).status == 201
        assert (await appliance.request("POST", path, document)).status == 200  # a retry
    forged = appliance.sign_bundle(key=SigningKey.generate())
    assert (await appliance.push(forged)).status == 422

    await eventually(lambda: len(receiver.received) == 2 and len(mailbox[0].messages) == 2)
    await asyncio.sleep(0.3)
    assert sorted(d["type"] for d in receiver.received) == ["escalation.urgent", "security.alert"]
    (urgent,) = receiver.of("escalation.urgent")
    assert (urgent["data"]["escalation_id"], urgent["data"]["severity"]) == ("esc-1", "critical")
    assert len(mailbox[0].subjects("Urgent escalation")) == 1
    assert len(mailbox[0].subjects("Security alert")) == 1
    listed = await deliveries(partner)
    assert sorted((d["kind"], d["channel_id"]) for d in listed) == sorted(
        [
            ("escalation.urgent", hook),
            ("escalation.urgent", mail),
            ("security.alert", hook),
            ("security.alert", mail),
        ]
    )
    assert all(d["state"] == "delivered" and d["attempts"] == 1 for d in listed)
    only = await deliveries(partner, f"?kind=security.alert&channel_id={hook}&state=delivered")
    assert [(d["kind"], d["channel_id"]) for d in only] == [("security.alert", hook)]


async def test_a_channel_gets_only_the_kinds_it_chose(start: Start, receiver_url: Any) -> None:
    harness = await start()
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    receiver = Receiver(harness.clock)
    await webhook(partner, receiver, await receiver_url(receiver), events=["appliance.offline"])
    forged = appliance.sign_bundle(key=SigningKey.generate())
    assert (await appliance.push(forged)).status == 422
    await asyncio.sleep(0.3)
    assert receiver.received == []
    assert await deliveries(partner) == []


# --- retries, gone receivers, replicas -----------------------------------------------------


async def test_a_receiver_failing_first_gets_the_event_on_retry(
    start: Start, receiver_url: Any
) -> None:
    harness = await start()
    partner = await harness.partner()
    await harness.site(partner)
    receiver = Receiver(harness.clock, answers=[500])
    channel = await webhook(partner, receiver, await receiver_url(receiver))
    sent = await partner.request("POST", f"/api/v1/notification-channels/{channel}/test")
    assert sent.status == 202
    await eventually(lambda: len(receiver.received) == 1)
    assert receiver.attempts == 2
    assert receiver.received[0]["webhook-id"] == sent.body["event_id"]
    for _ in range(50):
        (delivery,) = await deliveries(partner)
        if delivery["state"] == "delivered":
            break
        await asyncio.sleep(0.02)
    assert (delivery["state"], delivery["attempts"], delivery["last_status"]) == (
        "delivered",
        2,
        200,
    )


async def test_a_receiver_that_keeps_failing_is_given_up_and_410_disables_the_channel(
    start: Start, receiver_url: Any
) -> None:
    harness = await start()
    partner = await harness.partner()
    await harness.site(partner)
    failing = Receiver(harness.clock, answers=[503, 503, 503, 503])
    first = await webhook(partner, failing, await receiver_url(failing))
    gone = Receiver(harness.clock, answers=[410])
    second = await webhook(partner, gone, await receiver_url(gone))
    for channel in (first, second):
        sent = await partner.request("POST", f"/api/v1/notification-channels/{channel}/test")
        assert sent.status == 202
    await eventually(lambda: failing.attempts == 3 and gone.attempts == 1)

    async def settled() -> dict[str, dict[str, Any]]:
        return {d["channel_id"]: d for d in await deliveries(partner, "?state=failed")}

    for _ in range(100):
        failed = await settled()
        if len(failed) == 2:
            break
        await asyncio.sleep(0.02)
    assert (failed[first]["attempts"], failed[first]["last_status"]) == (3, 503)
    assert (failed[second]["attempts"], failed[second]["last_status"]) == (1, 410)
    channel = await partner.request("GET", f"/api/v1/notification-channels/{second}")
    assert channel.body["enabled"] is False
    again = await partner.request("POST", f"/api/v1/notification-channels/{second}/test")
    assert (again.status, again.code) == (409, "conflict")
    await asyncio.sleep(0.3)
    assert failing.attempts == 3  # given up: no fourth attempt


async def test_two_replicas_deliver_each_event_once(start: Start, receiver_url: Any) -> None:
    clock = Clock()
    one = await start(clock)
    two = await start(clock)
    partner = await one.partner()
    appliances = [await one.enroll(partner) for _ in range(3)]
    receiver = Receiver(clock)
    await webhook(partner, receiver, await receiver_url(receiver))
    for appliance in appliances:
        await beat(appliance, interval=5)
    clock.advance(timedelta(seconds=16))
    await eventually(lambda: len(receiver.received) == 3)
    for appliance in appliances:
        await beat(appliance, interval=5)
    await eventually(lambda: len(receiver.received) == 6)
    await asyncio.sleep(0.5)
    assert len(receiver.received) == 6
    assert len({d["webhook-id"] for d in receiver.received}) == 6
    assert (
        sorted(d["type"] for d in receiver.received)
        == ["appliance.offline"] * 3 + ["appliance.online"] * 3
    )
    assert all(d["attempts"] == 1 for d in await deliveries(partner))
    assert two.engine is not one.engine


# --- the API --------------------------------------------------------------------------------


async def test_channels_are_the_partners_own(start: Start) -> None:
    harness = await start()
    partner = await harness.partner()
    other = await harness.partner("Other MSP")
    channel = await email(partner)
    for caller, channel_id in ((other, channel), (partner, "chn_nope"), (partner, "x" * 80)):
        for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/test")):
            reply = await caller.request(
                method, f"/api/v1/notification-channels/{channel_id}{suffix}"
            )
            assert (reply.status, reply.code) == (404, "not-found"), (method, channel_id)
    assert (await other.request("GET", "/api/v1/notification-channels")).body["items"] == []
    assert await deliveries(other, f"?channel_id={channel}") == []
    listed = await partner.request("GET", "/api/v1/notification-channels")
    assert [c["id"] for c in listed.body["items"]] == [channel]
    assert "secret" not in listed.body["items"][0]
    deleted = await partner.request("DELETE", f"/api/v1/notification-channels/{channel}")
    assert deleted.status == 204
    gone = await partner.request("GET", f"/api/v1/notification-channels/{channel}")
    assert gone.status == 404


@pytest.mark.parametrize(
    ("url", "code"),
    [
        pytest.param("ftp://hooks.example/x", "bad-webhook-url", id="ftp"),
        pytest.param("file:///etc/passwd", "bad-webhook-url", id="file"),
        pytest.param("javascript:alert(1)", "bad-webhook-url", id="javascript"),
        pytest.param("/relative/path", "bad-webhook-url", id="relative"),
        pytest.param("https://user:pw@hooks.example/x", "bad-webhook-url", id="credentials"),
        pytest.param("https:///nohost", "bad-webhook-url", id="no-host"),
        pytest.param("https://hooks.example/\nx", "malformed-document", id="control-character"),
        pytest.param("", "malformed-document", id="empty"),
    ],
)
async def test_bad_webhook_urls_are_refused(start: Start, url: str, code: str) -> None:
    harness = await start()
    partner = await harness.partner()
    reply = await partner.request(
        "POST", "/api/v1/notification-channels", {"kind": "webhook", "url": url}
    )
    assert (reply.status, reply.code) == (400, code)


async def test_malformed_channels_are_refused(start: Start) -> None:
    harness = await start()
    partner = await harness.partner()
    for body in (
        {"kind": "webhook", "email": "a@b.example"},
        {"kind": "email", "url": "https://hooks.example/"},
        {"kind": "email", "email": "not an address"},
        {"kind": "sms", "email": "a@b.example"},
        {"kind": "email", "email": "a@b.example", "events": ["appliance.exploded"]},
        {"kind": "email", "email": "a@b.example", "events": []},
        {"kind": "email", "email": "a@b.example", "secret": "mine"},
    ):
        reply = await partner.request("POST", "/api/v1/notification-channels", body)
        assert (reply.status, reply.code) == (400, "malformed-document"), body


async def test_email_channels_need_an_smtp_server(start: Start) -> None:
    harness = await start(smtp=False)
    partner = await harness.partner()
    reply = await partner.request(
        "POST", "/api/v1/notification-channels", {"kind": "email", "email": "noc@p.example"}
    )
    assert (reply.status, reply.code) == (409, "smtp-not-configured")


async def test_channel_changes_are_in_the_central_log_without_the_secret(
    start: Start, receiver_url: Any
) -> None:
    harness = await start()
    partner = await harness.partner()
    receiver = Receiver(harness.clock)
    channel = await webhook(partner, receiver, await receiver_url(receiver))
    assert (
        await partner.request("DELETE", f"/api/v1/notification-channels/{channel}")
    ).status == 204
    admin = await harness.admin()
    export = await admin.request("GET", "/api/v1/central-log/export")
    text = json.dumps(export.body)
    assert receiver.secret not in text
    assert receiver.secret.split("_", 1)[1] not in text
    kinds = [json.loads(base64.b64decode(e))["kind"] for e in export.body["entries"]]
    assert kinds[-2:] == ["notification_channel.created", "notification_channel.deleted"]


async def test_delivery_pages_follow_their_cursor(start: Start, receiver_url: Any) -> None:
    harness = await start()
    partner = await harness.partner()
    await harness.site(partner)
    receiver = Receiver(harness.clock)
    channel = await webhook(partner, receiver, await receiver_url(receiver))
    for _ in range(3):
        sent = await partner.request("POST", f"/api/v1/notification-channels/{channel}/test")
        assert sent.status == 202
    first = await partner.request("GET", "/api/v1/notification-deliveries?limit=2")
    assert len(first.body["items"]) == 2
    assert first.body["next_cursor"]
    rest = await partner.request(
        "GET", f"/api/v1/notification-deliveries?limit=2&cursor={first.body['next_cursor']}"
    )
    assert rest.status == 200, rest.body
    assert len(rest.body["items"]) == 1
    assert rest.body["next_cursor"] is None
    ids = {d["id"] for d in first.body["items"] + rest.body["items"]}
    assert len(ids) == 3
    bad = await partner.request("GET", "/api/v1/notification-deliveries?state=lost")
    assert (bad.status, bad.code) == (400, "malformed-query")


async def test_an_invitation_is_e_mailed_when_smtp_is_set_up(
    start: Start, mailbox: tuple[Mailbox, int]
) -> None:
    harness = await start()
    partner = await harness.partner()
    reply = await partner.request(
        "POST", "/api/v1/user-invites", {"email": "Tech@Clinic.example", "role": "editor"}
    )
    assert reply.status == 201, reply.body
    assert reply.body["emailed"] is True
    box = mailbox[0]
    (message,) = box.messages
    assert message["To"] == "tech@clinic.example"
    assert "invited" in str(message["Subject"])
    body = message.get_payload(decode=True).decode()
    assert reply.body["link"] in body
    assert "as editor" in body

    # Without SMTP, the link is only in the answer.
    plain = await start(smtp=False)
    other = await plain.partner("Beta MSP")
    reply = await other.request(
        "POST", "/api/v1/user-invites", {"email": "x@beta.example", "role": "viewer"}
    )
    assert reply.body["emailed"] is False
    assert len(box.messages) == 1
