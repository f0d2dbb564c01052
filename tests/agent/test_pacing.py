"""Pacing in a reconnect storm: Retry-After honoured (plus jitter) by every
retry, audit batches sized from the server's answers, and urgent incidents
delivered before the backlog when the link comes back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from email.utils import format_datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from msp_agent.audit import OfflineAuditTrail
from msp_agent.central import CentralUnavailable
from msp_agent.config import AgentSettings
from msp_agent.http_client import MAX_RETRY_AFTER_SECONDS, HttpCentralClient
from msp_agent.manager import LocalResilienceManager
from msp_agent.pacing import BatchSizer, wait_before_retry
from msp_agent.runtime import ROTATE_REQUEST_FILE, Agent, Sleeper
from msp_agent.systemd import Notifier
from msp_agent.urgent import UrgentCloudRetry
from msp_protocol.encoding import utc_now
from msp_protocol.keys import SigningKey
from tests.agent.fakes import FakeCentral
from tests.agent.support import APPLIANCE, CENTRAL, SITE, Clock, enrolled_key
from tests.agent.test_sync import trail_with
from tests.agent.test_urgent import escalation

# --- the wait before a retry ---------------------------------------------------------------


def test_a_retry_never_comes_before_the_servers_retry_after_and_keeps_jitter() -> None:
    for attempt in range(12):
        waits = [wait_before_retry(attempt, 30.0) for _ in range(200)]
        ceiling = min(64.0, 2.0**attempt)
        assert all(30.0 <= wait <= 30.0 + ceiling for wait in waits)
        assert len(set(waits)) > 100, "appliances told the same wait still spread out"
    assert all(0.0 <= wait_before_retry(3, None) <= 8.0 for _ in range(200))


async def test_a_held_sleep_is_not_cut_short_by_a_wake() -> None:
    stop = asyncio.Event()
    sleeper = Sleeper(stop)
    sleeper.hold(0.5)
    started = time.monotonic()
    sleeping = asyncio.create_task(sleeper.sleep(0.5))
    for _ in range(5):
        sleeper.wake()
        await asyncio.sleep(0.02)
    await sleeping
    assert time.monotonic() - started >= 0.5
    # Once the hold is over, a wake ends a sleep again, and so does the stop.
    sleeper.wake()
    await asyncio.wait_for(sleeper.sleep(3600), 5)
    sleeper.hold(3600)
    sleeping = asyncio.create_task(sleeper.sleep(3600))
    await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(sleeping, 5)


# --- what the HTTP client tells the loops ----------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def in_a_minute() -> str:
    return format_datetime(utc_now() + timedelta(seconds=61), usegmt=True)


@pytest.mark.parametrize(
    ("status", "headers", "retry_after", "shed_load"),
    [
        (503, {"Retry-After": "7"}, (7.0, 7.0), True),
        (429, {"Retry-After": "in-a-minute"}, (55.0, 61.0), True),
        (503, {"Retry-After": "86400"}, (MAX_RETRY_AFTER_SECONDS, MAX_RETRY_AFTER_SECONDS), True),
        (503, {"Retry-After": "soon"}, None, True),
        (504, {}, None, True),
        (500, {}, None, False),
        (502, {}, None, False),
    ],
    ids=["503-seconds", "429-date", "capped", "unparsable", "gateway-timeout", "500", "502"],
)
async def test_refusals_for_load_carry_status_and_retry_after(
    session: aiohttp.ClientSession,
    status: int,
    headers: dict[str, str],
    retry_after: tuple[float, float] | None,
    shed_load: bool,
) -> None:
    async def answer(_request: web.Request) -> web.Response:
        sent = {k: in_a_minute() if v == "in-a-minute" else v for k, v in headers.items()}
        return web.Response(status=status, text="busy", headers=sent)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        client = HttpCentralClient(
            str(server.make_url("")).rstrip("/"),
            session,
            signing_key=lambda: SigningKey(b"\x02" * 32),
            appliance_id=APPLIANCE,
        )
        with pytest.raises(CentralUnavailable) as refused:
            await client.heartbeat({})
        assert refused.value.status == status
        assert refused.value.shed_load is shed_load
        assert not refused.value.timed_out
        if retry_after is None:
            assert refused.value.retry_after is None
        else:
            assert refused.value.retry_after is not None
            assert retry_after[0] <= refused.value.retry_after <= retry_after[1]
    finally:
        await server.close()


async def test_a_request_that_times_out_is_a_refusal_for_load(
    session: aiohttp.ClientSession,
) -> None:
    release = asyncio.Event()

    async def stall(_request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stall)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        client = HttpCentralClient(
            str(server.make_url("")).rstrip("/"),
            session,
            signing_key=lambda: SigningKey(b"\x02" * 32),
            appliance_id=APPLIANCE,
            timeout=aiohttp.ClientTimeout(total=0.3),
        )
        with pytest.raises(CentralUnavailable) as unanswered:
            await client.heartbeat({})
        assert unanswered.value.timed_out
        assert unanswered.value.status is None
        assert unanswered.value.shed_load
    finally:
        release.set()
        await server.close()


# --- audit batches sized from the answers ----------------------------------------------------


async def test_batches_shrink_after_refusals_and_grow_back_while_fast(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "msp_agent.pacing")
    trail, _, central = await trail_with(tmp_path, 3_000)
    sizer = BatchSizer(smallest=50, start=400, largest=1_000)
    try:
        # Two refusals for load: 400 -> 200 -> 100.
        central.shed_next(2, retry_after=5)
        for _ in range(2):
            with pytest.raises(CentralUnavailable) as refused:
                await trail.sync(central, sizer=sizer)
            assert refused.value.retry_after == 5
        assert sizer.size == 100
        assert (await trail.head()).receipt_size == 0

        # The first batch after that answers slowly, the rest fast.
        batches = 0

        async def before_batch() -> None:
            nonlocal batches
            batches += 1
            central.delay = sizer.slow_seconds if batches == 1 else 0.0

        report = await trail.sync(central, sizer=sizer, before_batch=before_batch)
        sizes = central.batch_sizes
        assert sizes[:2] == [100, 50], "halved after a refusal, and again after a slow answer"
        assert max(sizes[2:]) > 100, "grows back while the answers are fast"
        assert sum(sizes) == trail.size == 3_001
        assert report.batches == batches == len(sizes)

        # Witnessed exactly once, with no gap.
        log = central.logs[APPLIANCE]
        assert log.state.size == trail.size
        assert log.raws == await trail.entries(0, trail.size)
        assert (await trail.head()).receipt_size == trail.size
        assert (await trail.verify()).ok
    finally:
        await trail.close()
    # Info lines only where it matters, not one per batch.
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos[0].startswith("audit batches cut to 50 entries after a slow answer")
    assert len(infos) <= 2
    assert all("back to" in line for line in infos[1:])


async def test_a_smaller_retry_never_undercuts_a_batch_that_may_have_been_witnessed(
    tmp_path: Path,
) -> None:
    """Shrinking must not make a retry smaller than a batch the server took
    without its answer arriving: that reads as a truncated history (a
    security alert). Across a restart too."""
    trail, signer, central = await trail_with(tmp_path, 2_000)
    try:
        sizer = BatchSizer(smallest=50, start=400, largest=1_000)
        central.lose_answers = True  # witnessed, answer lost
        with pytest.raises(CentralUnavailable) as lost:
            await trail.sync(central, sizer=sizer)
        assert not lost.value.shed_load
        assert sizer.size == 400, "a link that fails is no reason to send less"
        assert len(central.logs[APPLIANCE].raws) == 400
        central.lose_answers = False
        central.shed_next(2)
        for _ in range(2):
            with pytest.raises(CentralUnavailable):
                await trail.sync(central, sizer=sizer)
        assert sizer.size == 100
    finally:
        await trail.close()

    # The agent restarts: a new trail object, a new sizer at its smallest.
    trail = await OfflineAuditTrail.open(
        tmp_path / "audit.sqlite",
        appliance_id=APPLIANCE,
        signer=signer,
        central_keys=[CENTRAL.verify_key],
        row_key=signer.audit_row_key(),
        clock=Clock(),
    )
    try:
        sizes_before = len(central.batch_sizes)
        await trail.sync(central, sizer=BatchSizer(smallest=50, start=50))
        assert central.batch_sizes[sizes_before] == 400, "the batch that may have been witnessed"
        assert central.alerts == []
        log = central.logs[APPLIANCE]
        assert log.raws == await trail.entries(0, trail.size)
        assert (await trail.head()).receipt_size == trail.size
    finally:
        await trail.close()


async def test_a_sizer_and_a_fixed_batch_are_not_both_given(tmp_path: Path) -> None:
    trail, _, central = await trail_with(tmp_path, 10)
    try:
        with pytest.raises(ValueError, match="max_batch or a sizer"):
            await trail.sync(central, max_batch=5, sizer=BatchSizer())
    finally:
        await trail.close()


# --- the urgent queue pauses for the server --------------------------------------------------


async def test_a_503_with_retry_after_pauses_the_whole_urgent_queue(tmp_path: Path) -> None:
    clock, central = Clock(), FakeCentral(CENTRAL)
    queue = await UrgentCloudRetry.open(
        tmp_path / "urgent.sqlite",
        clock=clock,
        retry_base=1.0,
        retry_cap=64.0,
        monotonic=clock.monotonic,
    )
    try:
        await queue.enqueue(escalation("inc-1"))
        await queue.enqueue(escalation("inc-2", "high"))
        central.shed_next(1, retry_after=30)
        first = await queue.deliver_due(central)
        assert first.unavailable is not None
        assert first.wait_seconds is not None
        assert 30 <= first.wait_seconds <= 30 + 64
        calls = len(central.calls)
        # Neither a wake (the link "back") nor the other, due incident goes
        # before the server said.
        queue.wake()
        assert (await queue.deliver_due(central)).delivered == []
        clock.advance(timedelta(seconds=29.9))
        queue.wake()
        assert (await queue.deliver_due(central)).delivered == []
        assert len(central.calls) == calls
        assert await queue.deliver_first(5), "a paused queue holds nothing else back"
        clock.advance(timedelta(seconds=64.2))
        assert (await queue.deliver_due(central)).delivered == ["inc-1", "inc-2"]
    finally:
        await queue.close()


async def test_deliver_first_waits_for_a_pass_and_is_bounded(tmp_path: Path) -> None:
    central = FakeCentral(CENTRAL)
    queue = await UrgentCloudRetry.open(tmp_path / "urgent.sqlite")
    try:
        await queue.enqueue(escalation("inc-1"))
        # Nobody delivers: the caller goes on after the bound.
        assert not await queue.deliver_first(0.2)
        stop = asyncio.Event()
        runner = asyncio.create_task(queue.run(central, stop))
        try:
            assert await queue.deliver_first(10)
            assert "inc-1" in central.escalations
            calls = len(central.calls)
            assert await queue.deliver_first(10), "nothing waits: at once"
            assert len(central.calls) == calls
        finally:
            stop.set()
            await runner
        # Stopped, nobody delivers: a waiter goes on at once, not after the bound.
        await queue.enqueue(escalation("inc-2"))
        assert await asyncio.wait_for(queue.deliver_first(3600), 5)
    finally:
        await queue.close()


# --- the runtime's loops against the double --------------------------------------------------

Loop = Callable[[Sleeper], Awaitable[None]]


async def open_agent(tmp_path: Path, central: FakeCentral, *, entries: int) -> Agent:
    state = tmp_path / "state"
    state.mkdir()
    settings = AgentSettings(
        central_url="https://central.example",
        central_public_key=CENTRAL.verify_key.hex,
        state_dir=state,
        sync_interval_seconds=0.5,
    )
    agent = Agent(settings, clock=utc_now, notifier=Notifier())
    agent.signer = enrolled_key(tmp_path / "keys", clock=utc_now)
    assert agent.signer.certificate is not None
    central.register(agent.signer.certificate.envelope)
    agent.manager = await LocalResilienceManager.open(
        state,
        appliance_id=APPLIANCE,
        site_id=SITE,
        signer=agent.signer,
        central_keys=[CENTRAL.verify_key],
    )
    agent.client = central  # type: ignore[assignment]
    for start in range(0, entries, 250):
        await asyncio.gather(
            *(
                agent.manager.trail.append("check.run", "agent", {"n": n})
                for n in range(start, min(entries, start + 250))
            )
        )
    return agent


def start_loops(
    agent: Agent, central: FakeCentral, names: tuple[str, ...] = ("audit-sync", "evidence")
) -> list[asyncio.Task[None]]:
    every: dict[str, Loop] = {
        "audit-sync": agent._audit_sync_loop,
        "evidence": agent._evidence_loop,
        "heartbeat": agent._heartbeat_loop,
        "keys": agent._keys_loop,
    }
    loops = {name: every[name] for name in names}
    agent._sleepers = {name: Sleeper(agent.stop) for name in loops}
    tasks = [asyncio.create_task(loop(agent._sleepers[name])) for name, loop in loops.items()]
    tasks.append(asyncio.create_task(agent.manager.urgent.run(central, agent.stop)))
    return tasks


async def stop_loops(agent: Agent, tasks: list[asyncio.Task[None]]) -> None:
    agent.stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    await agent.manager.close()


async def until(condition: Callable[[], Awaitable[bool]], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("loop", "call"),
    [
        ("audit-sync", "sync_audit"),
        ("evidence", "submit_evidence"),
        ("heartbeat", "heartbeat"),
        ("keys", "request_certificate"),
    ],
)
async def test_a_loop_retries_no_earlier_than_retry_after_even_when_woken(
    tmp_path: Path, loop: str, call: str
) -> None:
    central = FakeCentral(CENTRAL)
    agent = await open_agent(tmp_path, central, entries=300)
    for n in range(3):
        await agent.manager.sign_evidence(
            check_id=f"check-{n}", controls={"hipaa": ["164.308"]}, result="pass", observed={}
        )
    # An operator asked for a key rotation (the keys loop's request).
    (agent.settings.state_dir / ROTATE_REQUEST_FILE).touch()
    # The server answers but sheds load (what the HTTP client reports).
    agent.connectivity.unavailable("HTTP 503", server_answered=True)
    central.shed_next(1, retry_after=1.5)
    tasks = start_loops(agent, central, (loop,))
    try:
        await until(lambda: _true(call in central.calls))
        # The link "comes back" and a check round ends, again and again.
        for _ in range(10):
            agent._wake_all()
            await asyncio.sleep(0.05)
        await until(lambda: _true(call in central.served))
        arrivals = [at for name, at in central.arrivals if name == call]
        assert arrivals[1] - arrivals[0] >= 1.5
        if call == "request_certificate":
            await until(
                lambda: _true(not (agent.settings.state_dir / ROTATE_REQUEST_FILE).exists())
            )
        if call == "sync_audit":
            assert central.batch_sizes[0] == 125, "the refusal halved the batch (from 250)"
    finally:
        await stop_loops(agent, tasks)


async def test_an_incident_from_the_outage_reaches_the_server_before_the_backlog(
    tmp_path: Path,
) -> None:
    central = FakeCentral(CENTRAL)
    central.down = True
    agent = await open_agent(tmp_path, central, entries=2_000)
    await agent.manager.sign_evidence(
        check_id="backup", controls={"hipaa": ["164.308"]}, result="pass", observed={}
    )
    incident = await agent.manager.escalate_to_cloud(title="Backup failed", detail={"job": "x"})
    tasks = start_loops(agent, central)
    try:
        await asyncio.sleep(0.5)  # the outage: every loop fails and backs off
        assert central.served == []
        central.down = False
        agent._wake_all()

        async def drained() -> bool:
            head = await agent.manager.trail.head()
            return head.receipt_size == head.size and bool(central.evidence)

        await until(drained)
        assert incident.escalation_id in central.escalations
        first = {name: central.served.index(name) for name in set(central.served)}
        assert first["escalate"] < first["sync_audit"]
        assert first["escalate"] < first["submit_evidence"]
        log = central.logs[APPLIANCE]
        assert log.raws == await agent.manager.trail.entries(0, log.state.size)
    finally:
        await stop_loops(agent, tasks)


async def _true(value: bool) -> bool:
    return value
