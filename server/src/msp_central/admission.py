"""Admission control: how much work one replica takes on at once.

Every request but the health check and the metrics is sorted by its route
into a *lane* (:func:`lane_of`):

- ``bulk``: what an appliance's backlog is made of (audit sync batches,
  evidence bundles) and other large uploads (manual evidence documents);
- ``urgent``: what must get through while a backlog drains (escalations,
  heartbeats, enrollment, certificates, signed bundles, revocations);
- ``interactive``: the partner API and the console.

Each lane admits at most its limit of requests at a time; a request finds
a slot within ``admission_wait_seconds`` or is answered 503 problem+json
``server-busy`` with a small Retry-After, before its body is read. A fleet
draining its backlog fills the bulk lane and is paced by those 503s, while
heartbeats and partner reads, in lanes of their own, stay fast.

A database that cannot keep up is shed the same way: a request that waited
``database_pool_timeout_seconds`` for a pooled connection is answered 503
``server-busy``, and one whose database went away (connection refused or
cut) 503 ``database-unavailable``, logged once per burst
(:func:`database_refusal`, called by the problems middleware).

The counters (:class:`LaneState`: in flight, admitted, shed) live on the
:class:`Admission` object under :data:`msp_central.context.ADMISSION`, for
the health endpoint and a metrics exporter. Nothing here is shared between
replicas: each protects its own process and its share of the pool.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler

from msp_central.config import Settings
from msp_central.context import ADMISSION
from msp_central.db.engine import DatabaseFailure, database_failure
from msp_central.problems import Problem, problem_response

log = logging.getLogger("msp_central")

# Retry-After is an estimate of when a slot frees, never less than this or
# more than that: a client told 60 s would sit idle behind a server that is
# free in 2, and one told 0 s would come straight back.
MIN_RETRY_AFTER_SECONDS = 1
MAX_RETRY_AFTER_SECONDS = 10
# What a database that went away is retried after: long enough for a
# PostgreSQL restart or a fail-over to begin, short enough to notice its end.
DATABASE_RETRY_AFTER_SECONDS = 5
# Health says "busy" while a lane is full or shed a request this recently.
BUSY_WINDOW_SECONDS = 10.0
# One log line per burst of database failures: a failure this long after
# the previous one starts a new burst.
DATABASE_BURST_SECONDS = 60.0
# Weight of the newest request in a lane's moving average of handling time.
SERVICE_TIME_WEIGHT = 0.1


class Lane(enum.StrEnum):
    BULK = "bulk"
    URGENT = "urgent"
    INTERACTIVE = "interactive"


# Routes by (method, route template); any other route of the application
# is interactive. A new appliance route must be listed here.
_LANES: dict[tuple[str, str], Lane] = {
    ("POST", "/api/v1/appliances/{appliance_id}/audit/sync"): Lane.BULK,
    ("POST", "/api/v1/appliances/{appliance_id}/evidence"): Lane.BULK,
    ("POST", "/api/v1/sites/{site_id}/manual-evidence"): Lane.BULK,
    ("POST", "/api/v1/enroll"): Lane.URGENT,
    ("POST", "/api/v1/appliances/{appliance_id}/certificates"): Lane.URGENT,
    ("GET", "/api/v1/revocations"): Lane.URGENT,
    ("POST", "/api/v1/appliances/{appliance_id}/heartbeat"): Lane.URGENT,
    ("GET", "/api/v1/appliances/{appliance_id}/bundles/{kind}"): Lane.URGENT,
    ("POST", "/api/v1/appliances/{appliance_id}/escalations"): Lane.URGENT,
}
# Never admitted, never shed: a balancer's health check must see the
# replica as it is, and a scrape must see the load while it is shed.
UNADMITTED = frozenset({"/api/v1/health", "/metrics"})


def lane_of(request: web.Request) -> Lane | None:
    """The lane of ``request``'s route; None for the health check, the
    metrics and requests no route matched (a 404 or 405 costs nothing)."""
    resource = request.match_info.route.resource
    if resource is None:
        return None
    template = resource.canonical
    if template in UNADMITTED:
        return None
    method = "GET" if request.method == "HEAD" else request.method
    return _LANES.get((method, template), Lane.INTERACTIVE)


class LaneFull(Exception):
    """No slot of the lane came free within the wait."""


@dataclass
class LaneState:
    """One lane's bound and counters. ``in_flight`` and ``waiting`` are
    now; ``admitted`` and ``shed`` are totals since the process started."""

    lane: Lane
    limit: int
    clock: Callable[[], float] = time.monotonic
    in_flight: int = 0
    waiting: int = 0
    admitted: int = 0
    shed: int = 0
    last_shed: float | None = None
    # Moving average of how long an admitted request holds its slot.
    service_seconds: float = 0.05
    # Called with the lane at each request shed (a metrics exporter's
    # counter), in the shed request's context.
    shed_listeners: list[Callable[[Lane], None]] = field(default_factory=list)
    _slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        # Created without a running loop; asyncio binds it on first use.
        self._slots = asyncio.Semaphore(self.limit)

    async def acquire(self, wait: float) -> None:
        """Take a slot, waiting at most ``wait`` seconds (none at all if 0);
        raises :class:`LaneFull` and counts the request as shed."""
        if self._slots.locked() and wait <= 0:
            self.note_shed()
            raise LaneFull
        self.waiting += 1
        try:
            async with asyncio.timeout(wait):
                await self._slots.acquire()
        except TimeoutError:
            self.note_shed()
            raise LaneFull from None
        finally:
            self.waiting -= 1
        self.in_flight += 1
        self.admitted += 1

    def release(self, held_seconds: float) -> None:
        self.in_flight -= 1
        self._slots.release()
        self.service_seconds += SERVICE_TIME_WEIGHT * (held_seconds - self.service_seconds)

    def note_shed(self) -> None:
        self.shed += 1
        self.last_shed = self.clock()
        for listener in self.shed_listeners:
            listener(self.lane)

    @property
    def full(self) -> bool:
        return self.in_flight >= self.limit

    def retry_after(self, wait: float) -> int:
        """Seconds a shed caller should wait: about as long as the requests
        ahead of it take to pass through the lane's slots, at least the wait
        it was already given, within 1-10 s."""
        ahead = (self.waiting + 1) * self.service_seconds / self.limit
        seconds = math.ceil(max(wait, ahead))
        return min(MAX_RETRY_AFTER_SECONDS, max(MIN_RETRY_AFTER_SECONDS, seconds))


class Admission:
    """The per-process admission state: a :class:`LaneState` per lane, the
    wait for a slot, and whether the server is shutting down."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.wait = settings.admission_wait_seconds
        self.pool_timeout = settings.database_pool_timeout_seconds
        self.drain_seconds = settings.shutdown_drain_seconds
        # Told of every request shed, in any lane, for whatever way it was
        # shed (no slot, no pooled connection): add to it, never replace it.
        self.shed_listeners: list[Callable[[Lane], None]] = []
        limits = {
            Lane.BULK: settings.admission_bulk_limit,
            Lane.URGENT: settings.admission_urgent_limit,
            Lane.INTERACTIVE: settings.admission_interactive_limit,
        }
        self.lanes = {
            lane: LaneState(lane, limit, clock, shed_listeners=self.shed_listeners)
            for lane, limit in limits.items()
        }
        self.shutting_down = False
        # Requests answered database-unavailable, and the burst being logged.
        self.database_unavailable = 0
        self._burst_started: float | None = None
        self._burst_last: float | None = None
        self._burst_unlogged = 0

    @property
    def busy(self) -> bool:
        """Whether a lane is full now or shed a request within
        :data:`BUSY_WINDOW_SECONDS`."""
        now = self.clock()
        return any(
            state.full
            or (state.last_shed is not None and now - state.last_shed < BUSY_WINDOW_SECONDS)
            for state in self.lanes.values()
        )

    def begin_shutdown(self) -> None:
        """From now on the health check answers 503 ``shutting-down``."""
        self.shutting_down = True

    def database_failed(self) -> bool:
        """Count a request refused for an unavailable database; True if it
        starts a burst (and should be logged)."""
        self.database_unavailable += 1
        now = self.clock()
        last, self._burst_last = self._burst_last, now
        if last is not None and now - last < DATABASE_BURST_SECONDS:
            self._burst_unlogged += 1
            return False
        self._burst_started = now
        return True

    def take_unlogged(self) -> int:
        """How many failures of the previous burst went unlogged (and reset)."""
        count, self._burst_unlogged = self._burst_unlogged, 0
        return count


def busy_response(request: web.Request, detail: str, retry_after: int) -> web.Response:
    """503 ``server-busy`` with Retry-After. Returned, not raised: the
    problems middleware answers every raised Problem of status 500 and up
    as an internal error, and this is the caller's cue to come back later."""
    response = problem_response(Problem("server-busy", detail), request.path)
    response.headers["Retry-After"] = str(retry_after)
    return response


@web.middleware
async def admission(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Hold a slot of the request's lane while it is handled, or shed it."""
    lane = lane_of(request)
    if lane is None:
        return await handler(request)
    gate = request.app[ADMISSION]
    state = gate.lanes[lane]
    try:
        await state.acquire(gate.wait)
    except LaneFull:
        return busy_response(
            request,
            f"the server has {state.limit} {lane} requests in hand; retry after a moment",
            state.retry_after(gate.wait),
        )
    started = time.monotonic()
    try:
        return await handler(request)
    finally:
        state.release(time.monotonic() - started)


def database_refusal(request: web.Request, error: Exception) -> web.Response | None:
    """The 503 for a request that failed because of the database's load or
    absence (see :func:`msp_central.db.engine.database_failure`), counted;
    None for any other error."""
    failure = database_failure(error)
    if failure is None:
        return None
    gate = request.app[ADMISSION]
    if failure is DatabaseFailure.BUSY:
        lane = lane_of(request)
        state = gate.lanes[lane] if lane is not None else None
        if state is not None:
            state.note_shed()
        return busy_response(
            request,
            "no database connection came free in time; retry after a moment",
            min(
                MAX_RETRY_AFTER_SECONDS, max(MIN_RETRY_AFTER_SECONDS, math.ceil(gate.pool_timeout))
            ),
        )
    if gate.database_failed():
        unlogged = gate.take_unlogged()
        log.warning(
            "the database is unavailable (%s); requests are answered 503 and further "
            "failures within %d s are not logged%s",
            type(error).__name__,
            DATABASE_BURST_SECONDS,
            f" ({unlogged} went unlogged in the previous burst)" if unlogged else "",
        )
    response = problem_response(
        Problem("database-unavailable", "the database does not answer; retry after a moment"),
        request.path,
    )
    response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
    return response


async def until_stopped(app: web.Application) -> None:
    """Return once SIGINT or SIGTERM asked the server to stop, after
    ``shutdown_drain_seconds`` during which the health check already answers
    503 ``shutting-down`` and everything else is still served, so that a
    load balancer takes the replica out of rotation before it stops
    accepting connections. A second signal ends the drain at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    gate = app.get(ADMISSION)

    def on_signal() -> None:
        if gate is None or gate.shutting_down or gate.drain_seconds <= 0:
            if gate is not None:
                gate.begin_shutdown()
            stop.set()
            return
        gate.begin_shutdown()
        log.info("stopping in %s s; the health check answers 503 meanwhile", gate.drain_seconds)
        loop.call_later(gate.drain_seconds, stop.set)

    # Left installed: a signal during the graceful shutdown that follows
    # finds the stop already set and changes nothing (the runner removes
    # the handlers when it is cleaned up).
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
    except NotImplementedError:  # no signal handlers on this platform's loop
        await asyncio.Event().wait()
    await stop.wait()
