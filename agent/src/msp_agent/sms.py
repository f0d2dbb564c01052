"""SMSAlerter: the text message that reaches a human when the cloud cannot.

Twilio's Messages API (``POST /2010-04-01/Accounts/{sid}/Messages.json``,
form-encoded, HTTP basic auth) has no idempotency key: a timeout or a 5xx
after the POST leaves it unknown whether the text went out. So:

- the intent to text (incident, recipient, body) is committed *before* the
  POST, and the row is marked "posting" while a POST may be in flight;
- after an ambiguous outcome (timeout, connection cut, 5xx) — or after a
  crash with a row still "posting" — the account's message list is searched
  for the incident's reference before anything is sent again;
- 429 (never processed by Twilio) and connection failures before the request
  was sent are retried with backoff; a 4xx such as an invalid or
  unsubscribed number is permanent, recorded, and never retried;
- a per-hour cap bounds how many texts a flapping link can cause.

Hence at most one text per incident per recipient, across crashes. Credentials
come from a file (a systemd credential on NixOS), are read when needed, and
never appear in logs or errors.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from msp_agent.retry import retry_delay
from msp_agent.store import Quarantine, SQLiteStore
from msp_protocol.encoding import format_time, parse_time, utc_now

log = logging.getLogger(__name__)

MAX_BODY = 1_600
LIST_PAGES = 5

MIGRATIONS = [
    """
    CREATE TABLE texts (
        incident_id TEXT NOT NULL,
        recipient TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('intent', 'posting', 'ambiguous', 'sent', 'failed')),
        sid TEXT,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (incident_id, recipient)
    );
    CREATE INDEX texts_recent ON texts (updated_at) WHERE state IN ('posting', 'ambiguous', 'sent');
    """,
]

# Twilio error codes that mean "this text can never be sent as asked".
PERMANENT = {
    21211: "invalid To number",
    21212: "invalid From number",
    21408: "region not enabled",
    21602: "empty body",
    21606: "From number not owned",
    21610: "recipient unsubscribed",
    21612: "To number not reachable",
    21614: "To number not SMS-capable",
    21617: "body too long",
}


class SMSError(Exception):
    pass


class SMSRateLimited(SMSError):
    """The per-hour cap is reached; nothing was sent."""


class SMSUnavailable(SMSError):
    """Twilio could not be reached or did not decide; try again later."""


@dataclass(frozen=True, slots=True)
class TwilioSettings:
    account_sid: str
    secret_file: Path  # the auth token, or the API key's secret
    api_key_sid: str | None = None  # log in with an API key instead of the account SID
    from_number: str | None = None
    messaging_service_sid: str | None = None
    base_url: str = "https://api.twilio.com"
    timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        if (self.from_number is None) == (self.messaging_service_sid is None):
            raise ValueError("set exactly one of from_number and messaging_service_sid")


@dataclass(slots=True)
class AlertOutcome:
    """Per recipient: "sent" (now or before), "failed: …" (permanent), or
    "pending: …" (to retry)."""

    incident_id: str
    results: dict[str, str] = field(default_factory=dict)

    @property
    def settled(self) -> bool:
        return all(not r.startswith("pending") for r in self.results.values())


def reference(incident_id: str) -> str:
    """The token a text carries so it can be found again in the message list."""
    return f"[ref:{incident_id}]"


class SMSAlerter:
    def __init__(
        self,
        store: SQLiteStore,
        settings: TwilioSettings,
        recipients: Sequence[str],
        session: aiohttp.ClientSession,
        *,
        per_hour: int,
        retries: int,
        retry_base: float,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self.settings = settings
        self.recipients = tuple(recipients)
        self._session = session
        self.per_hour = per_hour
        self.retries = retries
        self.retry_base = retry_base
        self._clock = clock
        self._lock = asyncio.Lock()
        self.quarantine: Quarantine | None = None

    @classmethod
    async def open(
        cls,
        path: Path,
        settings: TwilioSettings,
        recipients: Sequence[str],
        session: aiohttp.ClientSession,
        *,
        per_hour: int = 10,
        retries: int = 3,
        retry_base: float = 1.0,
        clock: Callable[[], datetime] = utc_now,
    ) -> SMSAlerter:
        if not recipients:
            raise ValueError("the SMS fallback needs at least one on-call number")
        if per_hour < 1:
            raise ValueError("the per-hour cap must be at least 1")
        store, quarantine = await SQLiteStore.open(path, MIGRATIONS, name="sms")
        alerter = cls(
            store,
            settings,
            recipients,
            session,
            per_hour=per_hour,
            retries=retries,
            retry_base=retry_base,
            clock=clock,
        )
        alerter.quarantine = quarantine
        return alerter

    async def close(self) -> None:
        await self._store.close()

    async def alert(self, incident_id: str, text: str) -> AlertOutcome:
        """Text every on-call number about ``incident_id``, at most once each.

        Safe to call again and again (after a failure, after a restart): a
        recipient already texted is skipped, an uncertain earlier attempt is
        looked up before anything is resent.
        """
        body = _body(text, incident_id)
        outcome = AlertOutcome(incident_id)
        async with self._lock:  # one pass at a time: the cap and states stay exact
            for recipient in self.recipients:
                try:
                    outcome.results[recipient] = await self._text(incident_id, recipient, body)
                except SMSError as exc:
                    outcome.results[recipient] = f"pending: {exc}"
        return outcome

    async def _text(self, incident_id: str, recipient: str, body: str) -> str:
        row = await self._row(incident_id, recipient)
        if row is None:
            await self._write_intent(incident_id, recipient, body)
            row = {"state": "intent", "body": body, "created_at": format_time(self._clock())}
        state = row["state"]
        if state == "sent":
            return "sent"
        if state == "failed":
            return f"failed: {row['error']}"
        if state in ("posting", "ambiguous"):
            found = await self._find_sent(incident_id, recipient, parse_time(row["created_at"]))
            if found is not None:
                await self._settle(incident_id, recipient, "sent", sid=found)
                log.info(
                    "text for %s to %s was already sent (%s)", incident_id, _mask(recipient), found
                )
                return "sent"
        return await self._post_with_retries(incident_id, recipient, row["body"])

    async def _post_with_retries(self, incident_id: str, recipient: str, body: str) -> str:
        for attempt in range(self.retries + 1):
            if await self._sent_last_hour() >= self.per_hour:
                raise SMSRateLimited(f"{self.per_hour} texts in the last hour: holding this one")
            await self._set_state(incident_id, recipient, "posting", attempt=True)
            try:
                status, payload = await self._post(recipient, body)
            except _NotSent as exc:  # certainly not processed: safe to retry
                await self._set_state(incident_id, recipient, "intent", error=str(exc))
                if attempt == self.retries:
                    raise SMSUnavailable(str(exc)) from None
                await asyncio.sleep(retry_delay(attempt, base=self.retry_base))
                continue
            except _Ambiguous as exc:
                await self._set_state(incident_id, recipient, "ambiguous", error=str(exc))
                raise SMSUnavailable(f"{exc}; will look it up before resending") from None
            if status == 201 and isinstance(payload.get("sid"), str):
                await self._settle(incident_id, recipient, "sent", sid=payload["sid"])
                return "sent"
            code = payload.get("code")
            if status == 429 or code == 20429:
                await self._set_state(
                    incident_id, recipient, "intent", error="429 too many requests"
                )
                if attempt == self.retries:
                    raise SMSUnavailable("Twilio keeps answering 429") from None
                await asyncio.sleep(retry_delay(attempt, base=self.retry_base))
                continue
            if status == 401:
                # Our credentials, not this text: hold it until they are fixed.
                await self._set_state(
                    incident_id, recipient, "intent", error="401 authentication failed"
                )
                raise SMSUnavailable(
                    "Twilio refused the credentials (20003): check the secret file"
                )
            if 400 <= status < 500:
                reason = f"{code} {PERMANENT.get(code or 0, payload.get('message', 'refused'))}"
                await self._settle(incident_id, recipient, "failed", error=reason)
                log.error(
                    "text for %s to %s refused for good: %s", incident_id, _mask(recipient), reason
                )
                return f"failed: {reason}"
            # A 5xx: Twilio may have queued the text before failing.
            await self._set_state(incident_id, recipient, "ambiguous", error=f"HTTP {status}")
            raise SMSUnavailable(f"Twilio answered {status}; will look it up before resending")
        raise SMSUnavailable(
            "no attempt left"
        )  # pragma: no cover - the loop always returns or raises

    # --- Twilio ------------------------------------------------------------------------------

    def _auth(self) -> dict[str, str]:
        """The Authorization header (HTTP basic), built from the secret file."""
        try:
            secret = self.settings.secret_file.read_text().strip()
        except OSError as exc:
            raise SMSUnavailable(f"cannot read the Twilio secret file: {exc.strerror}") from None
        user = self.settings.api_key_sid or self.settings.account_sid
        token = base64.b64encode(f"{user}:{secret}".encode()).decode("ascii")
        return {"Authorization": f"Basic {token}"}

    def _messages_url(self) -> str:
        account = self.settings.account_sid
        return f"{self.settings.base_url}/2010-04-01/Accounts/{account}/Messages.json"

    async def _post(self, recipient: str, body: str) -> tuple[int, dict[str, Any]]:
        form = {"To": recipient, "Body": body}
        if self.settings.from_number is not None:
            form["From"] = self.settings.from_number
        else:
            form["MessagingServiceSid"] = self.settings.messaging_service_sid or ""
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_seconds)
        try:
            async with self._session.post(
                self._messages_url(), data=form, headers=self._auth(), timeout=timeout
            ) as response:
                payload = await _json(response)
                return response.status, payload
        except aiohttp.ClientConnectorError as exc:
            raise _NotSent(f"cannot connect to Twilio: {exc.os_error.strerror or exc}") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _Ambiguous(f"no answer from Twilio ({type(exc).__name__})") from None

    async def _find_sent(self, incident_id: str, recipient: str, since: datetime) -> str | None:
        """The sid of a text to ``recipient`` carrying this incident's reference,
        sent on or after the day of ``since`` (UTC), if Twilio has one."""
        token = reference(incident_id)
        url: str | None = self._messages_url()
        params: dict[str, str] | None = {
            "To": recipient,
            "DateSent>": since.strftime("%Y-%m-%d"),
            "PageSize": "1000",
        }
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_seconds)
        for _ in range(LIST_PAGES):
            if url is None:
                return None
            try:
                async with self._session.get(
                    url, params=params, headers=self._auth(), timeout=timeout
                ) as response:
                    payload = await _json(response)
                    status = response.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise SMSUnavailable(
                    f"cannot look up earlier texts: {type(exc).__name__}"
                ) from None
            if status != 200:
                raise SMSUnavailable(f"cannot look up earlier texts: HTTP {status}")
            for message in payload.get("messages", []):
                if token in str(message.get("body", "")):
                    return str(message.get("sid"))
            next_page = payload.get("next_page_uri")
            url = f"{self.settings.base_url}{next_page}" if next_page else None
            params = None
        raise SMSUnavailable("earlier texts span too many pages to look up")

    # --- state ------------------------------------------------------------------------------

    async def _row(self, incident_id: str, recipient: str) -> dict[str, Any] | None:
        def read(connection: sqlite3.Connection) -> dict[str, Any] | None:
            row = connection.execute(
                "SELECT state, body, error, created_at FROM texts "
                "WHERE incident_id = ? AND recipient = ?",
                (incident_id, recipient),
            ).fetchone()
            if row is None:
                return None
            return {"state": row[0], "body": row[1], "error": row[2], "created_at": row[3]}

        return await self._store.run(read)

    async def _write_intent(self, incident_id: str, recipient: str, body: str) -> None:
        now = format_time(self._clock())
        await self._store.write(
            lambda c: c.execute(
                "INSERT OR IGNORE INTO texts "
                "(incident_id, recipient, body, state, created_at, updated_at) "
                "VALUES (?, ?, ?, 'intent', ?, ?)",
                (incident_id, recipient, body, now, now),
            )
        )

    async def _set_state(
        self,
        incident_id: str,
        recipient: str,
        state: str,
        *,
        error: str | None = None,
        attempt: bool = False,
    ) -> None:
        now = format_time(self._clock())
        await self._store.write(
            lambda c: c.execute(
                "UPDATE texts SET state = ?, error = COALESCE(?, error), updated_at = ?, "
                "attempts = attempts + ? WHERE incident_id = ? AND recipient = ?",
                (state, error, now, int(attempt), incident_id, recipient),
            )
        )

    async def _settle(
        self,
        incident_id: str,
        recipient: str,
        state: str,
        *,
        sid: str | None = None,
        error: str | None = None,
    ) -> None:
        now = format_time(self._clock())
        await self._store.write(
            lambda c: c.execute(
                "UPDATE texts SET state = ?, sid = ?, error = ?, updated_at = ? "
                "WHERE incident_id = ? AND recipient = ?",
                (state, sid, error, now, incident_id, recipient),
            )
        )

    async def _sent_last_hour(self) -> int:
        since = format_time(self._clock() - timedelta(hours=1))

        def count(connection: sqlite3.Connection) -> int:
            return int(
                connection.execute(
                    "SELECT COUNT(*) FROM texts WHERE state IN ('posting', 'ambiguous', 'sent') "
                    "AND updated_at > ?",
                    (since,),
                ).fetchone()[0]
            )

        return await self._store.run(count)

    async def texts(self) -> list[dict[str, Any]]:
        """Every text on record (for status and tests)."""

        def read(connection: sqlite3.Connection) -> list[dict[str, Any]]:
            cursor = connection.execute(
                "SELECT incident_id, recipient, state, sid, error, attempts FROM texts "
                "ORDER BY created_at, incident_id, recipient"
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor]

        return await self._store.run(read)


class _NotSent(Exception):
    pass


class _Ambiguous(Exception):
    pass


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        payload = await response.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        return {}
    return payload if isinstance(payload, dict) else {}


def _body(text: str, incident_id: str) -> str:
    suffix = " " + reference(incident_id)
    return text[: MAX_BODY - len(suffix)] + suffix


def _mask(number: str) -> str:
    """Phone numbers are personal data: logs show only the last digits."""
    return "…" + number[-4:]
