"""Notification events: what a partner is told about, recorded once.

An event is written in the same transaction as what it reports (the
escalation, the security alert, the outage), together with one pending
delivery per enabled channel of the partner that wants its kind; the
notifier (:mod:`msp_central.notifier`) sends the deliveries afterwards.
Each event has a key naming the occurrence (``escalation.urgent:<appliance>:
<escalation id>``): a second writer of the same occurrence, a replica or a
retry, inserts nothing.

The functions take a synchronous connection (a :func:`~msp_central.db.
engine.run_write` transaction); async callers use ``connection.run_sync``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from msp_central.db.engine import insert_ignore_sync
from msp_central.db.tables import (
    notification_channels,
    notification_deliveries,
    notification_events,
    security_alerts,
    sites,
)
from msp_central.metrics import alert_raised

EventKind = Literal["appliance.offline", "appliance.online", "escalation.urgent", "security.alert"]
EVENT_KINDS: tuple[EventKind, ...] = (
    "appliance.offline",
    "appliance.online",
    "escalation.urgent",
    "security.alert",
)
# Sent to one channel on request, whatever kinds it chose.
TEST_KIND = "channel.test"
# Escalations severe enough to tell someone at once (msp_protocol.bundle.Severity).
URGENT_SEVERITIES = frozenset({"critical", "high"})


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def record_event(
    connection: Connection,
    *,
    kind: str,
    key: str,
    site_id: str | None,
    appliance_id: str | None,
    payload: dict[str, Any],
    now: datetime,
    only_channel: str | None = None,
    partner_id: str | None = None,
) -> str | None:
    """Record an event of the site's partner (or, for an event of no site,
    of ``partner_id``) and its pending deliveries; returns the event id, or
    None when the occurrence was already recorded (or the site is unknown:
    nobody to tell)."""
    if site_id is None:
        if partner_id is None:
            return None
        owner, site_name = partner_id, None
    else:
        found = connection.execute(
            sa.select(sites.c.partner_id, sites.c.name).where(sites.c.id == site_id)
        ).first()
        if found is None:
            return None
        owner, site_name = found.partner_id, found.name
    event_id = new_id("evt")
    inserted = insert_ignore_sync(
        connection,
        notification_events,
        {
            "id": event_id,
            "event_key": key[:200],
            "kind": kind,
            "partner_id": owner,
            "site_id": site_id,
            "appliance_id": appliance_id,
            "payload": {"site_name": site_name, **payload} if site_name else dict(payload),
            "created_at": now,
        },
    )
    if not inserted:
        return None
    query = sa.select(notification_channels.c.id, notification_channels.c.events).where(
        notification_channels.c.partner_id == owner,
        notification_channels.c.enabled.is_(True),
        notification_channels.c.deleted_at.is_(None),
    )
    if only_channel is not None:
        query = query.where(notification_channels.c.id == only_channel)
    for channel in connection.execute(query).all():
        if only_channel is None and kind not in channel.events:
            continue
        connection.execute(
            sa.insert(notification_deliveries).values(
                id=new_id("dlv"),
                event_id=event_id,
                channel_id=channel.id,
                state="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    return event_id


def escalation_event(
    connection: Connection,
    *,
    appliance_id: str,
    site_id: str,
    escalation_id: str,
    severity: str,
    title: str,
    created_at: datetime,
    now: datetime,
) -> str | None:
    """The event of a newly stored escalation, if it is urgent."""
    if severity not in URGENT_SEVERITIES:
        return None
    return record_event(
        connection,
        kind="escalation.urgent",
        key=f"escalation.urgent:{appliance_id}:{escalation_id}",
        site_id=site_id,
        appliance_id=appliance_id,
        payload={
            "escalation_id": escalation_id,
            "severity": severity,
            "title": title,
            "raised_at": created_at.isoformat(),
        },
        now=now,
    )


def store_alert(
    connection: Connection,
    *,
    code: str,
    detail: str,
    now: datetime,
    appliance_id: str | None = None,
    site_id: str | None = None,
    partner_id: str | None = None,
) -> int:
    """Store a security alert and the event that notifies of it, in the
    caller's transaction; its id. The event goes to its site's partner, or
    to ``partner_id`` for an alert about the partner's own accounts or
    credentials (an alert of neither has nobody to tell: administrators
    read it)."""
    result = connection.execute(
        sa.insert(security_alerts).values(
            appliance_id=appliance_id,
            site_id=site_id,
            partner_id=partner_id,
            code=code,
            detail=detail[:2000],
            created_at=now,
        )
    )
    alert_id = int(result.inserted_primary_key[0])  # type: ignore[index]
    alert_raised(code)
    record_event(
        connection,
        kind="security.alert",
        key=f"security.alert:{alert_id}",
        site_id=site_id,
        partner_id=partner_id,
        appliance_id=appliance_id,
        payload={"alert_id": alert_id, "code": code, "detail": detail[:500]},
        now=now,
    )
    return alert_id
