"""Whether an appliance is online: one rule for the console and the notifier.

An appliance says in its heartbeat how often it beats
(``heartbeat_interval_seconds``); it is offline once it has been silent for
``offline_after_heartbeats`` of its own intervals (an agent that does not say
is taken to beat every ``default_heartbeat_interval_seconds``). Its last
contact is its last heartbeat or audit sync, whichever is later.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from msp_central.config import Settings

Status = Literal["online", "offline", "never-seen", "revoked", "decommissioned"]


def heartbeat_interval(heartbeat: dict[str, Any] | None, settings: Settings) -> float:
    """The interval the appliance said it beats at, or the default."""
    said = (heartbeat or {}).get("heartbeat_interval_seconds")
    if isinstance(said, int | float) and not isinstance(said, bool) and said > 0:
        return float(said)
    return settings.default_heartbeat_interval_seconds


def offline_after(heartbeat: dict[str, Any] | None, settings: Settings) -> timedelta:
    """How long the appliance may be silent before it is offline."""
    return timedelta(
        seconds=settings.offline_after_heartbeats * heartbeat_interval(heartbeat, settings)
    )


def appliance_status(
    now: datetime,
    *,
    last_contact: datetime | None,
    heartbeat: dict[str, Any] | None,
    revoked_at: datetime | None,
    decommissioned_at: datetime | None,
    settings: Settings,
) -> Status:
    """The appliance's status at ``now``; taken out of service wins over
    silence."""
    if decommissioned_at is not None:
        return "decommissioned"
    if revoked_at is not None:
        return "revoked"
    if last_contact is None:
        return "never-seen"
    if now - last_contact <= offline_after(heartbeat, settings):
        return "online"
    return "offline"


def last_sync(row: Any) -> datetime | None:
    """When the appliance's audit log last grew: a row joining
    ``audit_logs`` (``size``, ``updated_at``); None before its first sync."""
    return row.updated_at if row.size else None


def row_status(row: Any, now: datetime, settings: Settings) -> tuple[Status, datetime | None]:
    """The status and last contact of an appliance row joined with its
    ``audit_logs`` row (``last_seen_at``, ``heartbeat``, ``revoked_at``,
    ``decommissioned_at``, ``size``, ``updated_at``)."""
    synced = last_sync(row)
    seen = max((t for t in (row.last_seen_at, synced) if t is not None), default=None)
    status = appliance_status(
        now,
        last_contact=seen,
        heartbeat=row.heartbeat,
        revoked_at=row.revoked_at,
        decommissioned_at=row.decommissioned_at,
        settings=settings,
    )
    return status, seen
