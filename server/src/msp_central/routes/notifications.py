"""The partner's notification channels and their delivery log.

A channel is a webhook (POSTs signed with a secret shown once, at creation)
or an e-mail address; it receives the event kinds it chose. Channels and
deliveries are the caller's partner's only: another partner's are "not
found". Creating and deleting a channel is recorded in the central log
(never the secret).
"""

from __future__ import annotations

import functools
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from yarl import URL

from msp_central.api_models import (
    ChannelCreate,
    ChannelCreated,
    ChannelOut,
    ChannelTestOut,
    DeliveryOut,
)
from msp_central.auth import require_partner
from msp_central.central_log import actor_of, record
from msp_central.context import NOTIFY_WAKE, central, json_response, parse_body, read_body
from msp_central.db.engine import read_only, write
from msp_central.db.tables import (
    notification_channels,
    notification_deliveries,
    notification_events,
    sites,
)
from msp_central.events import TEST_KIND, new_id, record_event
from msp_central.notifier import new_webhook_secret
from msp_central.pagination import Keyset, fetch_page, page_request, page_response
from msp_central.params import checked_query
from msp_central.problems import Problem

routes = web.RouteTableDef()


def _channel_out(row: Any) -> ChannelOut:
    return ChannelOut(
        id=row.id,
        kind=row.kind,
        url=row.url,
        email=row.email,
        events=list(row.events),
        enabled=bool(row.enabled),
        disabled_reason=row.disabled_reason,
        created_at=row.created_at,
    )


def _webhook_url(text: str) -> str:
    """An absolute http(s) URL with a host and no credentials in it."""
    try:
        url = URL(text)
    except (ValueError, TypeError):
        raise Problem("bad-webhook-url", "the webhook URL does not parse") from None
    if url.scheme not in ("http", "https"):
        raise Problem("bad-webhook-url", "the webhook URL must be http or https")
    if not url.host:
        raise Problem("bad-webhook-url", "the webhook URL has no host")
    if url.user is not None or url.password is not None:
        raise Problem("bad-webhook-url", "the webhook URL must not hold credentials")
    if url.fragment:
        raise Problem("bad-webhook-url", "the webhook URL must not have a fragment")
    return text


async def _channel(connection: Any, channel_id: str, partner_id: str | None) -> Any:
    row = (
        await connection.execute(
            sa.select(notification_channels).where(
                notification_channels.c.id == channel_id,
                notification_channels.c.partner_id == partner_id,
                notification_channels.c.deleted_at.is_(None),
            )
        )
    ).first()
    if row is None:
        raise Problem("not-found", f"no notification channel {channel_id[:64]}")
    return row


_CHANNELS = Keyset(
    [(notification_channels.c.created_at, "asc"), (notification_channels.c.id, "asc")]
)


@routes.get("/api/v1/notification-channels")
async def list_channels(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    page = page_request(request, _CHANNELS)
    async with read_only(central(request).engine) as connection:
        rows, cursor = await fetch_page(
            connection,
            sa.select(notification_channels).where(
                notification_channels.c.partner_id == holder.partner_id,
                notification_channels.c.deleted_at.is_(None),
            ),
            _CHANNELS,
            page,
        )
    return page_response(request, [_channel_out(row) for row in rows], cursor)


@routes.post("/api/v1/notification-channels")
async def create_channel(request: web.Request) -> web.Response:
    holder = await require_partner(request, "admin")
    service = central(request)
    body = parse_body(await read_body(request), ChannelCreate, request)
    secret: str | None = None
    if body.kind == "webhook":
        if body.url is None or body.email is not None:
            raise Problem("malformed-document", "a webhook channel takes a url and no email")
        _webhook_url(body.url)
        secret = new_webhook_secret()
    else:
        if body.email is None or body.url is not None:
            raise Problem("malformed-document", "an e-mail channel takes an email and no url")
        if not service.settings.smtp_configured:
            raise Problem(
                "smtp-not-configured",
                "e-mail channels need smtp_host and smtp_from in the server's settings",
            )
    now = service.clock()
    events = sorted(set(body.events))
    row = {
        "id": new_id("chn"),
        "partner_id": holder.partner_id,
        "kind": body.kind,
        "url": body.url,
        "secret": secret,
        "email": body.email,
        "events": events,
        "enabled": True,
        "disabled_reason": None,
        "created_at": now,
        "created_by": actor_of(holder),
        "deleted_at": None,
    }
    async with write(service.engine) as connection:
        await connection.execute(sa.insert(notification_channels).values(**row))
        await record(
            connection,
            service.root,
            kind="notification_channel.created",
            actor=actor_of(holder),
            data={
                "channel_id": row["id"],
                "kind": body.kind,
                "url": body.url,
                "email": body.email,
                "events": events,
            },
            now=now,
            partner_id=holder.partner_id,
        )
    channel = _channel_out(_Row(row))
    return json_response(ChannelCreated(channel=channel, secret=secret), status=201)


class _Row:
    """A dict read as a row (attribute access), for :func:`_channel_out`."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


@routes.get("/api/v1/notification-channels/{channel_id}")
async def get_channel(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    service = central(request)
    async with read_only(service.engine) as connection:
        row = await _channel(connection, request.match_info["channel_id"], holder.partner_id)
    return json_response(_channel_out(row))


@routes.delete("/api/v1/notification-channels/{channel_id}")
async def delete_channel(request: web.Request) -> web.Response:
    holder = await require_partner(request, "admin")
    service = central(request)
    now = service.clock()
    async with write(service.engine) as connection:
        row = await _channel(connection, request.match_info["channel_id"], holder.partner_id)
        await connection.execute(
            sa.update(notification_channels)
            .where(notification_channels.c.id == row.id)
            .values(deleted_at=now, enabled=False, disabled_reason="deleted")
        )
        await record(
            connection,
            service.root,
            kind="notification_channel.deleted",
            actor=actor_of(holder),
            data={"channel_id": row.id},
            now=now,
            partner_id=holder.partner_id,
        )
    return web.Response(status=204)


@routes.post("/api/v1/notification-channels/{channel_id}/test")
async def test_channel(request: web.Request) -> web.Response:
    holder = await require_partner(request, "admin")
    service = central(request)
    now = service.clock()
    async with write(service.engine) as connection:
        row = await _channel(connection, request.match_info["channel_id"], holder.partner_id)
        if not row.enabled:
            raise Problem("conflict", f"channel {row.id} is disabled: {row.disabled_reason}")
        # A test names one of the partner's sites, so it reads like the real thing.
        site_id = (
            await connection.execute(
                sa.select(sites.c.id)
                .where(sites.c.partner_id == holder.partner_id)
                .order_by(sites.c.created_at, sites.c.id)
                .limit(1)
            )
        ).scalar()
        if site_id is None:
            raise Problem("conflict", "the partner has no site to send a test event for")
        event_id = await connection.run_sync(
            functools.partial(
                record_event,
                kind=TEST_KIND,
                key=new_id("test"),
                site_id=site_id,
                appliance_id=None,
                payload={"channel_id": row.id, "requested_by": actor_of(holder)},
                now=now,
                only_channel=row.id,
            )
        )
        assert event_id is not None  # a fresh key: always a new event
        delivery_id = (
            await connection.execute(
                sa.select(notification_deliveries.c.id).where(
                    notification_deliveries.c.event_id == event_id
                )
            )
        ).scalar_one()
    request.app[NOTIFY_WAKE].set()
    return json_response(ChannelTestOut(event_id=event_id, delivery_id=delivery_id), status=202)


_DELIVERIES = Keyset(
    [(notification_deliveries.c.created_at, "desc"), (notification_deliveries.c.id, "desc")]
)


@routes.get("/api/v1/notification-deliveries")
async def list_deliveries(request: web.Request) -> web.Response:
    holder = await require_partner(request)
    service = central(request)
    query = checked_query(request)
    page = page_request(request, _DELIVERIES)
    select = (
        sa.select(
            notification_deliveries,
            notification_events.c.kind,
            notification_events.c.site_id,
            notification_events.c.appliance_id,
        )
        .join(
            notification_channels,
            notification_channels.c.id == notification_deliveries.c.channel_id,
        )
        .join(notification_events, notification_events.c.id == notification_deliveries.c.event_id)
        .where(notification_channels.c.partner_id == holder.partner_id)
    )
    if "channel_id" in query:
        select = select.where(notification_deliveries.c.channel_id == query["channel_id"])
    if "state" in query:
        select = select.where(notification_deliveries.c.state == query["state"])
    if "kind" in query:
        select = select.where(notification_events.c.kind == query["kind"])
    async with read_only(service.engine) as connection:
        rows, cursor = await fetch_page(connection, select, _DELIVERIES, page)
    items = [
        DeliveryOut(
            id=row.id,
            event_id=row.event_id,
            channel_id=row.channel_id,
            kind=row.kind,
            site_id=row.site_id,
            appliance_id=row.appliance_id,
            state=row.state,
            attempts=int(row.attempts),
            next_attempt_at=row.next_attempt_at,
            last_status=row.last_status,
            last_error=row.last_error,
            created_at=row.created_at,
            delivered_at=row.delivered_at,
        )
        for row in rows
    ]
    return page_response(request, items, cursor)
