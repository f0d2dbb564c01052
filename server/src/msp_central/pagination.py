"""Cursor pagination for every list the API serves: keyset, never offset.

A list answers ``{"items": [...], "next_cursor": "..." | null}`` and a
``Link: <…>; rel="next"`` header while there is more; a client follows the
cursor until it is null. Nothing is ever cut off silently: the last page is
the one without a cursor.

The cursor is opaque to clients: base64url of the sort key of the last item
sent and a fingerprint of the query's filters, so a cursor cannot be reused
with other filters (that is a 400, not a wrong page). Rows are read in a
total order (the sort columns end with a unique one), and the next page
starts strictly after the cursor, so rows inserted meanwhile never shift a
page: nothing is skipped or repeated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from aiohttp import web

from msp_central.context import json_response
from msp_central.openapi import DEFAULT_LIMIT
from msp_central.params import checked_query
from msp_central.problems import Problem
from msp_protocol.canonical import canonicalize

Direction = Literal["asc", "desc"]


@dataclass(frozen=True, slots=True)
class Keyset:
    """A total order over a query's rows: (column, direction) pairs of
    columns that are never NULL and together unique among the rows listed."""

    order: Sequence[tuple[sa.ColumnElement[Any], Direction]]

    def after(self, values: Sequence[Any]) -> sa.ColumnElement[bool]:
        """Rows strictly after the row whose sort key is ``values``."""
        clauses: list[sa.ColumnElement[bool]] = []
        for depth, (column, direction) in enumerate(self.order):
            beyond = column > values[depth] if direction == "asc" else column < values[depth]
            equal = [c == v for (c, _), v in zip(self.order[:depth], values, strict=False)]
            clauses.append(sa.and_(*equal, beyond) if equal else beyond)
        return sa.or_(*clauses)

    def order_by(self) -> list[sa.ColumnElement[Any]]:
        return [column.asc() if d == "asc" else column.desc() for column, d in self.order]

    def key_of(self, row: sa.Row[Any]) -> list[Any]:
        return [row._mapping[column] for column, _ in self.order]


@dataclass(frozen=True, slots=True)
class PageRequest:
    limit: int
    after: list[Any] | None  # the sort key of the last row already sent
    fingerprint: str


def page_request(request: web.Request, keyset: Keyset) -> PageRequest:
    """``limit`` and ``cursor`` of a list request (its other parameters,
    the filters, are fingerprinted into the cursor)."""
    query = checked_query(request)
    filters = {k: v for k, v in query.items() if k not in ("limit", "cursor")}
    fingerprint = hashlib.sha256(canonicalize(_jsonable(filters))).hexdigest()[:16]
    after = None
    if "cursor" in query:
        after = _decode(query["cursor"], fingerprint, keyset)
    limit = query.get("limit", DEFAULT_LIMIT)
    return PageRequest(limit=limit, after=after, fingerprint=fingerprint)


async def fetch_page(
    connection: Any, query: sa.Select[Any], keyset: Keyset, page: PageRequest
) -> tuple[list[sa.Row[Any]], str | None]:
    """One page of ``query`` in ``keyset`` order, and the cursor of the next
    page (None on the last)."""
    if page.after is not None:
        query = query.where(keyset.after(page.after))
    rows = list(
        (await connection.execute(query.order_by(*keyset.order_by()).limit(page.limit + 1))).all()
    )
    if len(rows) <= page.limit:
        return rows, None
    rows = rows[: page.limit]
    return rows, _encode(keyset.key_of(rows[-1]), page.fingerprint)


def page_response(request: web.Request, items: list[Any], next_cursor: str | None) -> web.Response:
    """The page as JSON, with an RFC 8288 ``Link`` to the next one."""
    response = json_response(
        {
            "items": [item.model_dump(mode="json") for item in items],
            "next_cursor": next_cursor,
        }
    )
    if next_cursor is not None:
        url = request.rel_url.update_query(cursor=next_cursor)
        response.headers["Link"] = f'<{url}>; rel="next"'
    return response


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _encode(key: list[Any], fingerprint: str) -> str:
    parts = [fingerprint] + [{"t": v.isoformat()} if isinstance(v, datetime) else v for v in key]
    return base64.urlsafe_b64encode(canonicalize(parts)).rstrip(b"=").decode()


def _decode(cursor: str, fingerprint: str, keyset: Keyset) -> list[Any]:
    try:
        parts = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise Problem("malformed-query", "cursor is not one this server issued") from None
    if not isinstance(parts, list) or len(parts) != len(keyset.order) + 1:
        raise Problem("malformed-query", "cursor is not one this server issued")
    if parts[0] != fingerprint:
        raise Problem("malformed-query", "cursor belongs to a query with other filters")
    key: list[Any] = []
    for given, (column, _) in zip(parts[1:], keyset.order, strict=True):
        expected = column.type.python_type
        value: Any = _moment(given) if isinstance(given, dict) and expected is datetime else given
        # bool is an int to Python, never to a column; ints stay in 63 bits.
        if type(value) is not expected or (isinstance(value, int) and abs(value) >= 2**63):
            raise Problem("malformed-query", "cursor is not one this server issued")
        key.append(value)
    return key


def _moment(given: dict[str, Any]) -> datetime | None:
    try:
        moment = datetime.fromisoformat(given["t"])
    except (KeyError, TypeError, ValueError):
        return None
    return moment if moment.tzinfo is not None else None
