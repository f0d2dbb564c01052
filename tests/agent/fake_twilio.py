"""A local stand-in for Twilio's Messages REST API (2010-04-01), for tests.

Behaves like Twilio with its documented test credentials and magic numbers:

- ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``, form-encoded
  (``To``, ``From`` or ``MessagingServiceSid``, ``Body``), HTTP basic auth
  (Account SID or API key SID, and the token or secret). 201 with a message
  resource (``sid`` ``SM…``, ``status`` ``queued``).
- From ``+15005550006`` succeeds, ``+15005550001`` is invalid (21212), any
  other From is not the account's (21606). To ``+15005550001`` is invalid
  (21211), ``+15005550002`` cannot be routed (21612), ``+15005550003`` has no
  international permission (21408), ``+15005550004`` is blocked (21610),
  ``+15005550009`` is not SMS-capable (21614). A Body over 1,600 characters
  is 21617; a missing Body 21602; bad credentials 401 / 20003.
- Errors are JSON ``{code, message, more_info, status}``.
- ``GET …/Messages.json`` lists messages newest first, filtered by ``To``,
  ``From``, ``DateSent``, ``DateSent<`` and ``DateSent>`` (YYYY-MM-DD, on or
  before / after), paged by ``PageSize`` (which live credentials allow).

Plus what the tests need and Twilio will not do on request: injectable
faults for the next requests (``429``, ``500``, ``503``, a slow answer, a
hang, or *accepting the message and then* answering 500 or dropping the
connection — the ambiguous outcomes), and a log of every request received.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from aiohttp import web

VALID_FROM = "+15005550006"
TO_ERRORS = {
    "+15005550001": (21211, "The 'To' number {to} is not a valid phone number."),
    "+15005550002": (
        21612,
        "The 'To' phone number: {to}, is not currently reachable using the 'From' phone number via SMS.",
    ),
    "+15005550003": (
        21408,
        "Permission to send an SMS has not been enabled for the region indicated by the 'To' number: {to}.",
    ),
    "+15005550004": (21610, "Attempt to send to unsubscribed recipient"),
    "+15005550009": (21614, "'To' number is not a valid mobile number"),
}


@dataclass
class Received:
    method: str
    path: str
    form: dict[str, str]
    query: dict[str, str]
    authorized: bool


@dataclass
class FakeTwilio:
    account_sid: str = "AC" + "0" * 32
    auth_token: str = "test-token-" + "f" * 21
    messages: list[dict[str, Any]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    faults: deque[str] = field(default_factory=deque)
    now: datetime | None = None

    def inject(self, *faults: str) -> None:
        """Faults for the next requests, in order: "429", "500", "503",
        "slow" (answers after 0.3 s), "hang" (never answers),
        "accept_then_500", "accept_then_drop", "accept_then_hang"."""
        self.faults.extend(faults)

    def sent_to(self, number: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["to"] == number]

    def app(self) -> web.Application:
        app = web.Application()
        path = "/2010-04-01/Accounts/{account}/Messages.json"
        app.router.add_post(path, self._create)
        app.router.add_get(path, self._list)
        return app

    # --- handlers ---------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        authorized = self._authorized(request)
        self.received.append(Received("POST", request.path, form, dict(request.query), authorized))
        fault = self.faults.popleft() if self.faults else None
        early = await self._early_fault(fault)
        if early is not None:
            return early
        if not authorized:
            return _error(401, 20003, "Authenticate")
        to, sender, body = form.get("To", ""), form.get("From"), form.get("Body")
        if body is None or body == "":
            return _error(400, 21602, "Message body is required.")
        if len(body) > 1600:
            return _error(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        if sender is None and "MessagingServiceSid" not in form:
            return _error(
                400,
                21603,
                "A 'From' or 'MessagingServiceSid' parameter is required to send a message.",
            )
        if sender == "+15005550001":
            return _error(
                400,
                21212,
                f"The 'From' number {sender} is not a valid phone number, shortcode, or alphanumeric sender ID.",
            )
        if sender is not None and sender != VALID_FROM:
            return _error(
                400,
                21606,
                f"The From phone number {sender} is not a valid, SMS-capable inbound phone number or short code for your account.",
            )
        if to in TO_ERRORS:
            code, text = TO_ERRORS[to]
            return _error(400, code, text.format(to=to))
        if not to.startswith("+") or not to[1:].isdigit():
            return _error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        message = self._message(to, sender or "", body, form.get("MessagingServiceSid"))
        self.messages.append(message)
        if fault == "accept_then_500":
            return _error(500, 20500, "Internal Server Error")
        if fault == "accept_then_hang":
            await asyncio.sleep(3600)
        if fault == "accept_then_drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=201)
        return web.json_response(message, status=201)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        authorized = self._authorized(request)
        self.received.append(Received("GET", request.path, {}, dict(request.query), authorized))
        fault = self.faults.popleft() if self.faults else None
        early = await self._early_fault(fault)
        if early is not None:
            return early
        if not authorized:
            return _error(401, 20003, "Authenticate")
        query = request.query
        found = [m for m in reversed(self.messages) if _matches(m, query)]
        size = min(int(query.get("PageSize", "50")), 1000)
        page = found[:size]
        return web.json_response(
            {
                "messages": page,
                "page": 0,
                "page_size": size,
                "start": 0,
                "end": max(len(page) - 1, 0),
                "uri": str(request.rel_url),
                "first_page_uri": str(request.rel_url),
                "next_page_uri": None,
                "previous_page_uri": None,
            }
        )

    async def _early_fault(self, fault: str | None) -> web.StreamResponse | None:
        if fault == "429":
            return _error(429, 20429, "Too Many Requests")
        if fault in ("500", "503"):
            return _error(int(fault), 20500, "Service Unavailable")
        if fault == "slow":
            await asyncio.sleep(0.3)
        if fault == "hang":
            await asyncio.sleep(3600)
        return None

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return user == self.account_sid and secrets.compare_digest(password, self.auth_token)

    def _message(self, to: str, sender: str, body: str, service: str | None) -> dict[str, Any]:
        created = self.now or datetime.now(UTC)
        sid = "SM" + secrets.token_hex(16)
        return {
            "sid": sid,
            "account_sid": self.account_sid,
            "to": to,
            "from": sender,
            "messaging_service_sid": service,
            "body": body,
            "status": "queued",
            "num_segments": str(max(1, -(-len(body) // 153))),
            "direction": "outbound-api",
            "date_created": format_datetime(created),
            "date_updated": format_datetime(created),
            "date_sent": format_datetime(created),
            "error_code": None,
            "error_message": None,
            "price": None,
            "api_version": "2010-04-01",
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }


def _matches(message: dict[str, Any], query: Any) -> bool:
    if "To" in query and message["to"] != query["To"]:
        return False
    if "From" in query and message["from"] != query["From"]:
        return False
    sent = _day(message["date_sent"])
    if "DateSent" in query and sent != query["DateSent"]:
        return False
    if "DateSent>" in query and sent < query["DateSent>"]:
        return False
    return not ("DateSent<" in query and sent > query["DateSent<"])


def _day(rfc2822: str) -> str:
    from email.utils import parsedate_to_datetime

    return parsedate_to_datetime(rfc2822).astimezone(UTC).strftime("%Y-%m-%d")


def _error(status: int, code: int, message: str) -> web.Response:
    return web.json_response(
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status=status,
    )
