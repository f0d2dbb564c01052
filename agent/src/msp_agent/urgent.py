"""UrgentCloudRetry: critical incidents that must reach someone.

A SQLite priority queue of escalations (critical first, then by age),
idempotent by escalation id. Each delivery attempt that fails schedules the
next one with exponential backoff and full jitter applied after the cap
(:mod:`msp_agent.retry`), and the due time is stored, so a restart neither
forgets an incident nor retries everything at once. :meth:`wake` makes every
waiting incident due now: the agent calls it as soon as any request to the
central server succeeds again, so a returning link is used within seconds,
not after the backoff cap.

Wall-clock due times are only a schedule: a wait is never negative and never
longer than the cap, so a clock set back or forward cannot stop delivery.

A server shedding load (503 or 429 with ``Retry-After``) pauses the whole
queue, not one incident, for what it asked plus jitter
(:func:`msp_agent.pacing.wait_before_retry`); not even :meth:`wake` cuts
that pause short. The pause is kept on the monotonic clock, in memory: a
restart forgets it, which costs one early request at most.

Urgent goes first: the audit sync and the evidence queue call
:meth:`UrgentCloudRetry.deliver_first` before each batch, which lets a
delivery pass run first whenever an incident waits, so an incident raised
during an outage reaches the server before the day's backlog does.

When a critical incident has not reached the central server within
``sms_after``, the SMS fallback texts the on-call numbers about it (once per
number, see :mod:`msp_agent.sms`).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from msp_agent.central import CentralClient, CentralRejected, CentralUnavailable
from msp_agent.keys import KeyRevokedError
from msp_agent.pacing import wait_before_retry
from msp_agent.retry import BASE_SECONDS, CAP_SECONDS
from msp_agent.sms import SMSAlerter
from msp_agent.store import Quarantine, SQLiteStore
from msp_protocol.bundle import Escalation
from msp_protocol.encoding import format_time, parse_time, utc_now

log = logging.getLogger(__name__)

PRIORITY = {"critical": 0, "high": 1, "medium": 2, "low": 3}

MIGRATIONS = [
    """
    CREATE TABLE incidents (
        escalation_id TEXT PRIMARY KEY,
        priority INTEGER NOT NULL,
        escalation BLOB NOT NULL,
        log_index INTEGER,
        created_at TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        last_error TEXT,
        delivered_at TEXT,
        failed TEXT,
        sms_done INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX incidents_waiting ON incidents (priority, created_at)
        WHERE delivered_at IS NULL AND failed IS NULL;
    """,
]


@dataclass(slots=True)
class RetryPass:
    delivered: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    texted: list[str] = field(default_factory=list)
    unavailable: str | None = None
    wait_seconds: float | None = None  # until the next attempt or SMS is due; None: nothing waits


@dataclass(frozen=True, slots=True)
class _Waiting:
    escalation_id: str
    priority: int
    escalation: Escalation
    created_at: datetime
    attempts: int
    next_attempt_at: datetime
    sms_done: bool


class UrgentCloudRetry:
    def __init__(
        self,
        store: SQLiteStore,
        *,
        sms: SMSAlerter | None,
        sms_after: timedelta,
        clock: Callable[[], datetime],
        retry_base: float,
        retry_cap: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._sms = sms
        self.sms_after = sms_after
        self._clock = clock
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self._wakeup = asyncio.Event()
        self.quarantine: Quarantine | None = None
        self._monotonic = monotonic
        # Until when (monotonic) the server asked this queue to wait, and
        # whether a wake came meanwhile (it then applies once the wait ends).
        self._hold_until = 0.0
        self._woken_while_held = False
        # Delivery passes begun and ended, for deliver_first; whether any
        # incident waits (None: not known before the first pass).
        self._passes_started = 0
        self._passes_ended = 0
        self._pass_ended = asyncio.Condition()
        self._pending: bool | None = None
        self._stopped = False

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        sms: SMSAlerter | None = None,
        sms_after: timedelta = timedelta(minutes=5),
        clock: Callable[[], datetime] = utc_now,
        retry_base: float = BASE_SECONDS,
        retry_cap: float = CAP_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> UrgentCloudRetry:
        store, quarantine = await SQLiteStore.open(path, MIGRATIONS, name="urgent")
        queue = cls(
            store,
            sms=sms,
            sms_after=sms_after,
            clock=clock,
            retry_base=retry_base,
            retry_cap=retry_cap,
            monotonic=monotonic,
        )
        queue.quarantine = quarantine
        return queue

    async def close(self) -> None:
        await self._store.close()

    async def enqueue(self, escalation: Escalation) -> bool:
        """Queue an incident (durably) for delivery now. False if that
        escalation id is already queued or delivered."""
        now = format_time(self._clock())

        def insert(connection: sqlite3.Connection) -> bool:
            cursor = connection.execute(
                "INSERT OR IGNORE INTO incidents "
                "(escalation_id, priority, escalation, log_index, created_at, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    escalation.escalation_id,
                    PRIORITY[escalation.severity],
                    escalation.canonical_bytes(),
                    escalation.log_index,
                    now,
                    now,
                ),
            )
            return cursor.rowcount == 1

        added = await self._store.write(insert)
        self._pending = True
        self._wakeup.set()
        return added

    async def record_log_index(self, escalation_id: str, log_index: int) -> None:
        """Link an incident to the audit entry that records it."""
        await self._store.write(
            lambda c: c.execute(
                "UPDATE incidents SET log_index = ? WHERE escalation_id = ?",
                (log_index, escalation_id),
            )
        )

    async def unlogged(self) -> list[Escalation]:
        """Incidents queued but not yet linked to an audit entry (e.g. after a
        crash between the two): the caller records them."""

        def read(connection: sqlite3.Connection) -> list[Escalation]:
            rows = connection.execute(
                "SELECT escalation FROM incidents WHERE log_index IS NULL ORDER BY created_at"
            ).fetchall()
            return [Escalation.from_json(bytes(row[0])) for row in rows]

        return await self._store.run(read)

    def wake(self) -> None:
        """Retry every waiting incident now (the link is back), or as soon as
        the wait the server asked for ends."""
        self._wakeup.set()

    def held_seconds(self) -> float:
        """How much longer the server asked this queue to wait (0: none)."""
        return max(0.0, self._hold_until - self._monotonic())

    async def deliver_first(self, seconds: float) -> bool:
        """Wait, at most ``seconds``, until a delivery pass begun
        after this call has ended, when any incident waits: bulk traffic
        (the audit backlog, evidence) calls this so urgent incidents reach
        the server first. Returns at once when nothing waits or the server
        asked for a pause; False when the time ran out (the caller goes on:
        urgent first must never mean bulk never)."""
        if self._pending is False or self.held_seconds() > 0:
            return True
        target = self._passes_started + 1
        self.wake()
        async with self._pass_ended:
            try:
                await asyncio.wait_for(
                    self._pass_ended.wait_for(
                        lambda: self._passes_ended >= target or self._stopped
                    ),
                    seconds,
                )
            except TimeoutError:
                return False
        return True

    async def deliver_due(self, client: CentralClient) -> RetryPass:
        """One pass: deliver what is due, in priority order, and text about
        critical incidents waiting longer than ``sms_after``."""
        self._passes_started += 1
        try:
            return await self._deliver_due(client)
        finally:
            self._passes_ended += 1
            async with self._pass_ended:
                self._pass_ended.notify_all()

    async def _deliver_due(self, client: CentralClient) -> RetryPass:
        woken = self._wakeup.is_set() or self._woken_while_held
        self._wakeup.clear()
        held = self.held_seconds() > 0
        self._woken_while_held = woken and held
        result = RetryPass()
        now = self._clock()
        waiting = await self._waiting()
        for incident in [] if held else waiting:
            if not woken and incident.next_attempt_at > now:
                continue
            try:
                await client.escalate(incident.escalation)
            except (CentralUnavailable, KeyRevokedError) as exc:
                # Revoked, this appliance cannot reach the cloud at all (every
                # request is signed): the incident waits and is texted.
                asked = exc.retry_after if isinstance(exc, CentralUnavailable) else None
                delay = await self._reschedule(incident, str(exc), asked)
                if asked is not None:
                    # The server sheds load: no incident is sent before it
                    # said, whatever wakes the queue meanwhile.
                    self._hold_until = self._monotonic() + delay
                result.unavailable = str(exc)
                break  # the link is down: the others keep their own schedule
            except CentralRejected as exc:
                await self._finish(incident.escalation_id, failed=str(exc))
                result.failed.append(incident.escalation_id)
                log.error(
                    "escalation %s refused by the central server: %s", incident.escalation_id, exc
                )
                continue
            await self._finish(incident.escalation_id)
            result.delivered.append(incident.escalation_id)
            woken = True  # a request succeeded: everything else is due now
        # Read once more: deliveries and reschedules changed what waits.
        still_waiting = await self._waiting()
        # An incident queued during the pass set the wakeup: it still waits.
        self._pending = bool(still_waiting) or self._wakeup.is_set()
        if self._sms is not None:
            result.texted = await self._text_overdue(self._sms, still_waiting, now)
        result.wait_seconds = self._next_wait(still_waiting, texted=set(result.texted))
        return result

    async def run(self, client: CentralClient, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set: sleep until the next due time (at
        most the cap), or until woken."""
        self._stopped = False
        try:
            while not stop.is_set():
                try:
                    result = await self.deliver_due(client)
                except Exception:
                    log.exception("urgent delivery pass failed")
                    result = RetryPass(wait_seconds=self.retry_cap)
                wait = self.retry_cap if result.wait_seconds is None else result.wait_seconds
                stopper = asyncio.ensure_future(stop.wait())
                waker = asyncio.ensure_future(self._wakeup.wait())
                try:
                    await asyncio.wait(
                        {stopper, waker}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    stopper.cancel()
                    waker.cancel()
        finally:
            # Nobody delivers any more: whoever waits in deliver_first goes on.
            self._stopped = True
            async with self._pass_ended:
                self._pass_ended.notify_all()

    async def _waiting(self) -> list[_Waiting]:
        def read(connection: sqlite3.Connection) -> list[_Waiting]:
            rows = connection.execute(
                "SELECT escalation_id, priority, escalation, log_index, created_at, attempts, "
                "next_attempt_at, sms_done FROM incidents "
                "WHERE delivered_at IS NULL AND failed IS NULL ORDER BY priority, created_at"
            ).fetchall()
            return [
                _Waiting(
                    row[0],
                    row[1],
                    Escalation.from_json(bytes(row[2])).model_copy(update={"log_index": row[3]}),
                    parse_time(row[4]),
                    row[5],
                    parse_time(row[6]),
                    bool(row[7]),
                )
                for row in rows
            ]

        return await self._store.run(read)

    async def _reschedule(self, incident: _Waiting, error: str, retry_after: float | None) -> float:
        """Schedule the next attempt: the server's Retry-After, if any, plus
        the jittered backoff. Returns the delay."""
        delay = wait_before_retry(
            incident.attempts, retry_after, base=self.retry_base, cap=self.retry_cap
        )
        due = format_time(self._clock() + timedelta(seconds=delay))
        await self._store.write(
            lambda c: c.execute(
                "UPDATE incidents SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
                "WHERE escalation_id = ?",
                (due, error[:500], incident.escalation_id),
            )
        )
        return delay

    async def _finish(self, escalation_id: str, *, failed: str | None = None) -> None:
        now = format_time(self._clock())
        column = "failed" if failed is not None else "delivered_at"
        value = failed[:500] if failed is not None else now
        await self._store.write(
            lambda c: c.execute(
                f"UPDATE incidents SET {column} = ? WHERE escalation_id = ?",  # noqa: S608 - column is one of two literals
                (value, escalation_id),
            )
        )

    async def _text_overdue(
        self, sms: SMSAlerter, waiting: list[_Waiting], now: datetime
    ) -> list[str]:
        texted = []
        for incident in waiting:
            if incident.priority != PRIORITY["critical"] or incident.sms_done:
                continue
            if incident.created_at + self.sms_after > now:
                continue
            escalation = incident.escalation
            outcome = await sms.alert(
                incident.escalation_id,
                f"CRITICAL {escalation.site_id}: {escalation.title} (central server unreachable)",
            )
            if outcome.settled:
                await self._mark_texted(incident.escalation_id)
                texted.append(incident.escalation_id)
        return texted

    async def _mark_texted(self, escalation_id: str) -> None:
        await self._store.write(
            lambda c: c.execute(
                "UPDATE incidents SET sms_done = 1 WHERE escalation_id = ?", (escalation_id,)
            )
        )

    def _next_wait(self, waiting: list[_Waiting], *, texted: set[str]) -> float | None:
        now = self._clock()
        if not waiting:
            return None
        attempt = min((i.next_attempt_at - now).total_seconds() for i in waiting)
        # Never beyond the cap: a clock set back or forward can delay
        # delivery by at most one cap; never before the server's Retry-After.
        wait = max(min(attempt, self.retry_cap), self.held_seconds())
        if self._sms is not None:
            # The SMS fallback does not wait for a server that sheds load.
            wait = min(
                [wait]
                + [
                    (i.created_at + self.sms_after - now).total_seconds()
                    for i in waiting
                    if i.priority == PRIORITY["critical"]
                    and not i.sms_done
                    and i.escalation_id not in texted
                ]
            )
        return max(0.0, wait)

    async def counts(self) -> dict[str, int]:
        def read(connection: sqlite3.Connection) -> dict[str, int]:
            waiting, delivered, failed = connection.execute(
                "SELECT SUM(delivered_at IS NULL AND failed IS NULL), "
                "SUM(delivered_at IS NOT NULL), SUM(failed IS NOT NULL) FROM incidents"
            ).fetchone()
            return {"waiting": waiting or 0, "delivered": delivered or 0, "failed": failed or 0}

        return await self._store.run(read)
