"""UrgentCloudRetry: priority, persistent backoff, wake on reconnect, SMS fallback."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from msp_agent.central import CentralRejected
from msp_agent.retry import capped_backoff, retry_delay
from msp_agent.sms import SMSAlerter, TwilioSettings
from msp_agent.urgent import UrgentCloudRetry
from msp_protocol.bundle import Escalation
from tests.agent.fake_twilio import VALID_FROM, FakeTwilio
from tests.agent.fakes import FakeCentral
from tests.agent.support import APPLIANCE, CENTRAL, NOW, SITE, Clock

# --- backoff ----------------------------------------------------------------------------


def test_delays_stay_within_zero_and_the_capped_exponential() -> None:
    for attempt in range(40):
        ceiling = min(64.0, 2.0**attempt)
        assert capped_backoff(attempt) == ceiling
        for _ in range(200):
            assert 0.0 <= retry_delay(attempt) <= ceiling


def test_jitter_comes_after_the_cap_so_a_fleet_at_the_cap_does_not_retry_in_lockstep() -> None:
    draws = [retry_delay(30) for _ in range(20_000)]
    # Uniform on [0, 64]: mean 32, deciles about equally full. Jitter applied
    # before the cap would pile every draw onto 64.
    assert 31.0 < statistics.fmean(draws) < 33.0
    assert sum(d >= 63.9 for d in draws) < 100
    deciles = [0] * 10
    for d in draws:
        deciles[min(int(d / 6.4), 9)] += 1
    assert all(1_700 < count < 2_300 for count in deciles), deciles
    assert len({round(d, 3) for d in draws}) > 15_000


def test_early_attempts_use_the_small_ceilings() -> None:
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (5, 32.0), (6, 64.0)]:
        draws = [retry_delay(attempt) for _ in range(2_000)]
        assert max(draws) <= ceiling
        assert max(draws) > 0.9 * ceiling


# --- the queue --------------------------------------------------------------------------


def escalation(
    escalation_id: str, severity: str = "critical", title: str = "backup failed"
) -> Escalation:
    return Escalation.model_validate(
        {
            "escalation_id": escalation_id,
            "appliance_id": APPLIANCE,
            "site_id": SITE,
            "severity": severity,
            "title": title,
            "detail": {"job": "nightly"},
            "created_at": NOW,
        }
    )


async def open_queue(tmp_path: Path, clock: Clock, **kwargs: object) -> UrgentCloudRetry:
    options: dict[str, object] = {"clock": clock, "retry_base": 1.0, "retry_cap": 64.0, **kwargs}
    return await UrgentCloudRetry.open(tmp_path / "urgent.sqlite", **options)  # type: ignore[arg-type]


async def test_delivers_in_priority_order_and_is_idempotent(tmp_path: Path) -> None:
    clock, central = Clock(), FakeCentral(CENTRAL)
    queue = await open_queue(tmp_path, clock)
    try:
        assert await queue.enqueue(escalation("low-1", "low"))
        assert await queue.enqueue(escalation("crit-1", "critical"))
        assert await queue.enqueue(escalation("high-1", "high"))
        assert not await queue.enqueue(escalation("crit-1", "critical"))
        result = await queue.deliver_due(central)
        assert result.delivered == ["crit-1", "high-1", "low-1"]
        assert list(central.escalations) == ["crit-1", "high-1", "low-1"]
        assert (await queue.deliver_due(central)).delivered == []
    finally:
        await queue.close()


async def test_failed_attempts_back_off_and_the_schedule_survives_a_restart(tmp_path: Path) -> None:
    clock, central = Clock(), FakeCentral(CENTRAL)
    central.down = True
    queue = await open_queue(tmp_path, clock)
    await queue.enqueue(escalation("inc-1"))
    waits = []
    for _ in range(8):
        result = await queue.deliver_due(central)
        assert result.unavailable is not None
        assert result.wait_seconds is not None
        waits.append(result.wait_seconds)
        clock.advance(timedelta(seconds=result.wait_seconds))
    await queue.close()
    assert all(0 <= w <= 64 for w in waits)
    attempts = len(central.calls)
    assert attempts == 8

    queue = await open_queue(tmp_path, clock)  # restart: the incident and its due time persist
    try:
        result = await queue.deliver_due(central)
        assert result.wait_seconds is not None
        assert len(central.calls) == attempts + (1 if result.unavailable else 0)
        central.down = False
        clock.advance(timedelta(seconds=65))
        assert (await queue.deliver_due(central)).delivered == ["inc-1"]
    finally:
        await queue.close()


async def test_wake_retries_at_once_when_the_link_returns(tmp_path: Path) -> None:
    clock, central = Clock(), FakeCentral(CENTRAL)
    central.down = True
    # Long delays, so "not due yet" holds whatever the jitter draws.
    queue = await open_queue(tmp_path, clock, retry_base=100.0, retry_cap=6400.0)
    try:
        for n in range(3):
            await queue.enqueue(escalation(f"inc-{n}"))
        for _ in range(7):  # every incident fails at least once
            await queue.deliver_due(central)
            clock.advance(timedelta(seconds=0.01))
        central.down = False
        assert (await queue.deliver_due(central)).delivered == []  # not due yet
        queue.wake()
        assert (await queue.deliver_due(central)).delivered == ["inc-0", "inc-1", "inc-2"]
    finally:
        await queue.close()


async def test_one_success_makes_the_other_waiting_incidents_due(tmp_path: Path) -> None:
    clock, central = Clock(), FakeCentral(CENTRAL)
    queue = await open_queue(tmp_path, clock)
    try:
        central.down = True
        await queue.enqueue(escalation("old", "high"))
        for _ in range(6):
            await queue.deliver_due(central)
        central.down = False
        await queue.enqueue(escalation("new", "critical"))  # due now
        result = await queue.deliver_due(central)
        assert result.delivered == ["new", "old"]
    finally:
        await queue.close()


async def test_run_loop_delivers_within_seconds_of_the_link_returning(tmp_path: Path) -> None:
    central = FakeCentral(CENTRAL)
    central.down = True
    queue = await UrgentCloudRetry.open(tmp_path / "urgent.sqlite", retry_base=1.0, retry_cap=64.0)
    stop = asyncio.Event()
    runner = asyncio.create_task(queue.run(central, stop))
    try:
        await queue.enqueue(escalation("inc-1"))
        for n in range(6):
            await queue.enqueue(escalation(f"filler-{n}", "low"))
        await asyncio.sleep(0.2)
        assert "inc-1" not in central.escalations
        central.down = False
        queue.wake()
        for _ in range(100):
            if "inc-1" in central.escalations:
                break
            await asyncio.sleep(0.02)
        assert "inc-1" in central.escalations
    finally:
        stop.set()
        await runner
        await queue.close()


async def test_refused_escalation_is_set_aside(tmp_path: Path) -> None:
    clock, central = Clock(), FakeCentral(CENTRAL)
    queue = await open_queue(tmp_path, clock)

    async def refuse(item: Escalation) -> None:
        raise CentralRejected(422, "bad-escalation", "refused")

    central.escalate = refuse  # type: ignore[method-assign]
    try:
        await queue.enqueue(escalation("inc-1"))
        assert (await queue.deliver_due(central)).failed == ["inc-1"]
        assert await queue.counts() == {"waiting": 0, "delivered": 0, "failed": 1}
    finally:
        await queue.close()


async def test_clock_set_back_never_stops_delivery(tmp_path: Path) -> None:
    clock, central = Clock(), FakeCentral(CENTRAL)
    central.down = True
    queue = await open_queue(tmp_path, clock)
    try:
        await queue.enqueue(escalation("inc-1"))
        await queue.deliver_due(central)
        clock.advance(timedelta(days=-30))  # the clock jumps a month back
        result = await queue.deliver_due(central)
        assert result.wait_seconds is not None
        assert 0 <= result.wait_seconds <= 64
    finally:
        await queue.close()


# --- SMS fallback -------------------------------------------------------------------------


@pytest.fixture
async def twilio(tmp_path: Path) -> AsyncIterator[tuple[FakeTwilio, TwilioSettings]]:
    fake = FakeTwilio()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    secret = tmp_path / "twilio-secret"
    secret.write_text(fake.auth_token)
    try:
        yield (
            fake,
            TwilioSettings(
                account_sid=fake.account_sid,
                secret_file=secret,
                from_number=VALID_FROM,
                base_url=str(server.make_url("")).rstrip("/"),
                timeout_seconds=2.0,
            ),
        )
    finally:
        await server.close()


async def test_critical_incident_unreachable_for_too_long_texts_once(
    tmp_path: Path, twilio: tuple[FakeTwilio, TwilioSettings]
) -> None:
    fake, settings = twilio
    clock, central = Clock(), FakeCentral(CENTRAL)
    central.down = True
    async with aiohttp.ClientSession() as session:
        sms = await SMSAlerter.open(
            tmp_path / "sms.sqlite", settings, ["+15551230001"], session, clock=clock
        )
        queue = await open_queue(tmp_path, clock, sms=sms, sms_after=timedelta(minutes=5))
        try:
            await queue.enqueue(escalation("crit-1", "critical", "ransomware indicators on FS-01"))
            await queue.enqueue(escalation("high-1", "high"))
            assert (await queue.deliver_due(central)).texted == []
            clock.advance(timedelta(minutes=4))
            assert (await queue.deliver_due(central)).texted == []
            clock.advance(timedelta(minutes=2))
            assert (await queue.deliver_due(central)).texted == ["crit-1"]
            for _ in range(5):
                clock.advance(timedelta(minutes=10))
                assert (await queue.deliver_due(central)).texted == []
            assert len(fake.messages) == 1
            assert "ransomware indicators on FS-01" in fake.messages[0]["body"]
        finally:
            await queue.close()
            await sms.close()


async def test_incident_delivered_in_time_is_never_texted(
    tmp_path: Path, twilio: tuple[FakeTwilio, TwilioSettings]
) -> None:
    fake, settings = twilio
    clock, central = Clock(), FakeCentral(CENTRAL)
    async with aiohttp.ClientSession() as session:
        sms = await SMSAlerter.open(
            tmp_path / "sms.sqlite", settings, ["+15551230001"], session, clock=clock
        )
        queue = await open_queue(tmp_path, clock, sms=sms, sms_after=timedelta(minutes=5))
        try:
            await queue.enqueue(escalation("crit-1"))
            await queue.deliver_due(central)
            clock.advance(timedelta(hours=1))
            await queue.deliver_due(central)
            assert fake.messages == []
        finally:
            await queue.close()
            await sms.close()
