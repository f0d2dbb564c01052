"""The notifier: finds appliances gone silent or back, and sends deliveries.

Every ``notify_interval_seconds`` each replica (1) compares every
appliance's status (:mod:`msp_central.liveness`) with the outages it
declared, recording an ``appliance.offline`` event when one goes silent and
``appliance.online`` when it returns (the outage row and the event key make
each transition one event, whichever replica sees it first), then (2) sends
the deliveries that are due. A delivery is claimed before it is sent (a
lease in its row, taken by a conditional UPDATE), so one replica sends it;
a replica that dies mid-send leaves a lease that expires and the delivery is
sent again: delivery is at least once, and receivers deduplicate by
``webhook-id``. Retry state lives in the row, so a restart loses nothing.

Webhooks follow Standard Webhooks (https://www.standardwebhooks.com/): a
JSON POST with ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature:
v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` under the channel's
``whsec_`` secret. 2xx is delivered; 410 Gone disables the channel; anything
else is retried with exponential backoff and jitter until the last attempt.
E-mail goes through the configured SMTP server (smtplib, in a thread).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import logging
import random
import smtplib
import ssl
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

import aiohttp
import sqlalchemy as sa

from msp_central.config import ConfigError, Settings
from msp_central.context import Central
from msp_central.db.engine import insert_ignore_sync, read_only, run_write
from msp_central.db.tables import (
    appliance_outages,
    appliances,
    audit_logs,
    notification_channels,
    notification_deliveries,
    notification_events,
)
from msp_central.events import record_event
from msp_central.liveness import heartbeat_interval, offline_after, row_status
from msp_protocol.canonical import canonicalize

log = logging.getLogger("msp_central.notifier")

# Deliveries one round claims at most (the rest wait for the next round).
BATCH = 50
# A response body read from a webhook receiver, at most (it is not used).
MAX_RESPONSE_BYTES = 64 * 1024


def sign_webhook(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for ``body``."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def new_webhook_secret() -> str:
    """A channel secret as Standard Webhooks writes it: ``whsec_`` + base64."""
    return "whsec_" + base64.b64encode(random.SystemRandom().randbytes(32)).decode()


@dataclass(frozen=True, slots=True)
class Outcome:
    delivered: bool
    status: int | None = None
    error: str | None = None
    gone: bool = False  # the receiver said 410 Gone: stop sending to it


class Notifier:
    """One replica's notifier; :meth:`run` is the background task."""

    def __init__(
        self, service: Central, session: aiohttp.ClientSession, wake: asyncio.Event | None = None
    ) -> None:
        self.service = service
        self.settings: Settings = service.settings
        self.session = session
        # Set to start a round at once (a test notification was asked for).
        self.wake = wake or asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # the next round tries again; serving goes on
                log.exception("a notifier round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.settings.notify_interval_seconds)
            self.wake.clear()

    async def run_once(self) -> None:
        await self.detect_transitions()
        await self.send_due()

    # (1) offline and online transitions

    async def detect_transitions(self) -> None:
        now = self.service.clock()
        async with read_only(self.service.engine) as connection:
            rows = (
                await connection.execute(
                    sa.select(
                        appliances.c.id,
                        appliances.c.site_id,
                        appliances.c.last_seen_at,
                        appliances.c.heartbeat,
                        appliances.c.revoked_at,
                        appliances.c.decommissioned_at,
                        audit_logs.c.size,
                        audit_logs.c.updated_at,
                        appliance_outages.c.declared_at,
                    )
                    .outerjoin(audit_logs, audit_logs.c.appliance_id == appliances.c.id)
                    .outerjoin(
                        appliance_outages, appliance_outages.c.appliance_id == appliances.c.id
                    )
                )
            ).all()
        for row in rows:
            status, seen = row_status(row, now, self.settings)
            declared = row.declared_at is not None
            if status == "offline" and not declared and seen is not None:
                await run_write(
                    self.service.engine,
                    functools.partial(self._went_offline, row=row, seen=seen, now=now),
                )
            elif status != "offline" and declared:
                await run_write(
                    self.service.engine,
                    functools.partial(self._came_back, row=row, seen=seen, status=status, now=now),
                )

    def _went_offline(self, connection: Any, row: Any, seen: datetime, now: datetime) -> None:
        inserted = insert_ignore_sync(
            connection,
            appliance_outages,
            {"appliance_id": row.id, "last_contact_at": seen, "declared_at": now},
        )
        if not inserted:  # another replica declared it first
            return
        record_event(
            connection,
            kind="appliance.offline",
            key=f"appliance.offline:{row.id}:{seen.isoformat()}",
            site_id=row.site_id,
            appliance_id=row.id,
            payload={
                "last_contact_at": seen.isoformat(),
                "heartbeat_interval_seconds": heartbeat_interval(row.heartbeat, self.settings),
                "offline_after_seconds": (
                    offline_after(row.heartbeat, self.settings).total_seconds()
                ),
            },
            now=now,
        )

    def _came_back(
        self, connection: Any, row: Any, seen: datetime | None, status: str, now: datetime
    ) -> None:
        removed = connection.execute(
            sa.delete(appliance_outages).where(appliance_outages.c.appliance_id == row.id)
        ).rowcount
        # Revoked or decommissioned while silent: the outage ends unannounced.
        if not removed or status != "online" or seen is None:
            return
        record_event(
            connection,
            kind="appliance.online",
            key=f"appliance.online:{row.id}:{seen.isoformat()}",
            site_id=row.site_id,
            appliance_id=row.id,
            payload={
                "last_contact_at": seen.isoformat(),
                "offline_since": row.declared_at.isoformat(),
            },
            now=now,
        )

    # (2) deliveries

    async def send_due(self) -> int:
        """Claim and send the deliveries that are due; returns how many were sent."""
        now = self.service.clock()
        async with read_only(self.service.engine) as connection:
            due = (
                (
                    await connection.execute(
                        sa.select(notification_deliveries.c.id)
                        .where(
                            notification_deliveries.c.state == "pending",
                            notification_deliveries.c.next_attempt_at <= now,
                            sa.or_(
                                notification_deliveries.c.lease_until.is_(None),
                                notification_deliveries.c.lease_until < now,
                            ),
                        )
                        .order_by(notification_deliveries.c.next_attempt_at)
                        .limit(BATCH)
                    )
                )
                .scalars()
                .all()
            )
        claimed = [d for d in due if await self._claim(d, now)]
        await asyncio.gather(*(self._deliver(d) for d in claimed))
        return len(claimed)

    async def _claim(self, delivery_id: str, now: datetime) -> bool:
        # Longer than any one attempt: a lease still held means a live sender.
        lease = now + timedelta(seconds=2 * self.settings.notification_timeout_seconds + 30)

        def claim(connection: Any) -> bool:
            result = connection.execute(
                sa.update(notification_deliveries)
                .where(
                    notification_deliveries.c.id == delivery_id,
                    notification_deliveries.c.state == "pending",
                    sa.or_(
                        notification_deliveries.c.lease_until.is_(None),
                        notification_deliveries.c.lease_until < now,
                    ),
                )
                .values(lease_until=lease)
            )
            return bool(result.rowcount == 1)

        return await run_write(self.service.engine, claim)

    async def _deliver(self, delivery_id: str) -> None:
        async with read_only(self.service.engine) as connection:
            row = (
                await connection.execute(
                    sa.select(
                        notification_deliveries.c.attempts,
                        notification_channels.c.id.label("channel_id"),
                        notification_channels.c.kind.label("channel_kind"),
                        notification_channels.c.url,
                        notification_channels.c.secret,
                        notification_channels.c.email,
                        notification_channels.c.enabled,
                        notification_channels.c.deleted_at,
                        notification_events.c.id.label("event_id"),
                        notification_events.c.kind,
                        notification_events.c.site_id,
                        notification_events.c.appliance_id,
                        notification_events.c.payload,
                        notification_events.c.created_at,
                    )
                    .join(
                        notification_channels,
                        notification_channels.c.id == notification_deliveries.c.channel_id,
                    )
                    .join(
                        notification_events,
                        notification_events.c.id == notification_deliveries.c.event_id,
                    )
                    .where(notification_deliveries.c.id == delivery_id)
                )
            ).one()
        if not row.enabled or row.deleted_at is not None:
            outcome = Outcome(False, error="the channel is disabled or deleted")
            await self._settle(delivery_id, row, outcome, final=True)
            return
        try:
            if row.channel_kind == "webhook":
                outcome = await self._post(row)
            else:
                outcome = await self._mail(row)
        except Exception as exc:  # a bug or an unforeseen failure: retried like the rest
            log.exception("delivery %s failed", delivery_id)
            outcome = Outcome(False, error=type(exc).__name__)
        await self._settle(delivery_id, row, outcome, final=outcome.gone)

    async def _post(self, row: Any) -> Outcome:
        body = canonicalize(
            {
                "type": row.kind,
                "timestamp": row.created_at.isoformat(),
                "data": _event_data(row),
            }
        )
        timestamp = int(self.service.clock().timestamp())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": row.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign_webhook(row.secret, row.event_id, timestamp, body),
        }
        timeout = aiohttp.ClientTimeout(total=self.settings.notification_timeout_seconds)
        try:
            async with self.session.post(
                row.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                await response.content.read(MAX_RESPONSE_BYTES)
                status = response.status
        except TimeoutError:
            return Outcome(False, error="timed out")
        except aiohttp.ClientConnectorError as exc:
            return Outcome(False, error=f"cannot connect: {exc.strerror or 'refused'}"[:200])
        except aiohttp.ClientError as exc:
            return Outcome(False, error=type(exc).__name__)
        if 200 <= status < 300:
            return Outcome(True, status=status)
        return Outcome(False, status=status, error=f"HTTP {status}", gone=status == 410)

    async def _mail(self, row: Any) -> Outcome:
        settings = self.settings
        if not settings.smtp_configured:
            return Outcome(False, error="no SMTP server is configured")
        try:
            password = settings.smtp_password()
        except ConfigError as exc:
            return Outcome(False, error=str(exc)[:200])
        message = _email(row, settings.smtp_from or "")
        try:
            await asyncio.to_thread(_send_mail, settings, password, message)
        except smtplib.SMTPResponseException as exc:
            return Outcome(False, status=exc.smtp_code, error=f"SMTP {exc.smtp_code}")
        except (smtplib.SMTPException, OSError) as exc:
            return Outcome(False, error=f"SMTP: {type(exc).__name__}")
        return Outcome(True, status=250)

    async def _settle(self, delivery_id: str, row: Any, outcome: Outcome, *, final: bool) -> None:
        now = self.service.clock()
        attempts = int(row.attempts) + 1
        values: dict[str, Any] = {
            "attempts": attempts,
            "lease_until": None,
            "last_status": outcome.status,
            "last_error": outcome.error,
        }
        if outcome.delivered:
            values.update(state="delivered", delivered_at=now, next_attempt_at=None)
        elif final or attempts >= self.settings.notification_max_attempts:
            values.update(state="failed", next_attempt_at=None)
        else:
            values.update(next_attempt_at=now + retry_delay(attempts, self.settings))

        def settle(connection: Any) -> None:
            connection.execute(
                sa.update(notification_deliveries)
                .where(notification_deliveries.c.id == delivery_id)
                .values(**values)
            )
            if outcome.gone:
                connection.execute(
                    sa.update(notification_channels)
                    .where(notification_channels.c.id == row.channel_id)
                    .values(enabled=False, disabled_reason="the receiver answered 410 Gone")
                )

        await run_write(self.service.engine, settle)


def retry_delay(attempts: int, settings: Settings) -> timedelta:
    """Exponential backoff with jitter: half to all of base * 2**(attempts - 1),
    at most retry_max."""
    ceiling = min(
        settings.notification_retry_max_seconds,
        settings.notification_retry_base_seconds * 2 ** min(attempts - 1, 30),
    )
    return timedelta(seconds=ceiling * random.uniform(0.5, 1.0))  # noqa: S311 (not a secret)


def _event_data(row: Any) -> dict[str, Any]:
    return {
        "event_id": row.event_id,
        "site_id": row.site_id,
        "appliance_id": row.appliance_id,
        **row.payload,
    }


_WHAT_TO_DO = {
    "appliance.offline": "Check the appliance's power and network connection, and that its "
    "agent service is running. You will be told when it is back.",
    "appliance.online": "Nothing to do: the appliance is reporting again.",
    "escalation.urgent": "Review the escalation in the console and acknowledge it once it "
    "is handled.",
    "security.alert": "Investigate the alert in the console: it may mean tampering or a "
    "misconfigured appliance.",
    "channel.test": "Nothing to do: this message tests the notification channel.",
}


def _summary(row: Any) -> str:
    site = row.payload.get("site_name") or row.site_id
    appliance = row.appliance_id or "-"
    data = row.payload
    if row.kind == "appliance.offline":
        return f"Appliance {appliance} at {site} is offline"
    if row.kind == "appliance.online":
        return f"Appliance {appliance} at {site} is back online"
    if row.kind == "escalation.urgent":
        return f"Urgent escalation ({data.get('severity')}) at {site}: {data.get('title')}"
    if row.kind == "security.alert":
        if row.site_id is None:
            return f"Security alert for your partner account: {data.get('code')}"
        return f"Security alert at {site}: {data.get('code')}"
    return f"Test notification for {site}"


def _email(row: Any, sender: str) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = "[MSP] " + _summary(row)
    message["From"] = sender
    message["To"] = row.email
    message["Message-ID"] = f"<{row.event_id}@msp-central>"
    details = "\n".join(
        f"  {key}: {value}" for key, value in sorted(_event_data(row).items()) if value is not None
    )
    message.set_content(
        f"{_summary(row)}.\n\n"
        f"What happened: {row.kind}\n"
        f"Site: {row.payload.get('site_name') or ''} ({row.site_id or '-'})\n"
        f"Appliance: {row.appliance_id or '-'}\n"
        f"When: {row.created_at.isoformat()}\n\n"
        f"What to do: {_WHAT_TO_DO.get(row.kind, '')}\n\n"
        f"Details:\n{details}\n"
    )
    return message


def send_mail(settings: Settings, message: EmailMessage) -> None:
    """Send one message through the configured SMTP server (blocking)."""
    _send_mail(settings, settings.smtp_password(), message)


def _send_mail(settings: Settings, password: str | None, message: EmailMessage) -> None:
    assert settings.smtp_host is not None
    with smtplib.SMTP(
        settings.smtp_host, settings.smtp_port, timeout=settings.notification_timeout_seconds
    ) as smtp:
        if settings.smtp_starttls:
            smtp.starttls(context=ssl.create_default_context())
        if settings.smtp_username:
            smtp.login(settings.smtp_username, password or "")
        smtp.send_message(message)
