"""Admission control: lanes, shedding with 503 + Retry-After, bounded pool
waits, a database gone away, and what the health check says of it all.

Slots are held through the lanes' own ``acquire``, the call the middleware
makes, so a lane is full exactly when a test says so; nothing waits on a
timer that could race.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.engine import make_url

from msp_central.admission import (
    MAX_RETRY_AFTER_SECONDS,
    Admission,
    Lane,
    LaneFull,
    LaneState,
    until_stopped,
)
from msp_central.app import create_app
from msp_central.config import ConfigError, Settings, load_settings
from msp_central.context import ADMISSION, CENTRAL, write_root_key
from msp_central.db.tables import audit_entries
from tests.central.support import ROOT, ApplianceClient, Clock, Harness, KeyClient, call
from tests.central.test_cheap_requests import refused_upfront, sync_path
from tests.central.test_health import settled

BULK_LIMIT = 2
URGENT_LIMIT = 3
INTERACTIVE_LIMIT = 2


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        state_dir=tmp_path / "state",
        database_url=database_url,
        admission_bulk_limit=BULK_LIMIT,
        admission_urgent_limit=URGENT_LIMIT,
        admission_interactive_limit=INTERACTIVE_LIMIT,
        # Short, so a shed request is answered quickly; no test depends on
        # how long it is.
        admission_wait_seconds=0.05,
    )


def gate_of(harness: Harness) -> Admission:
    return harness.client.app[ADMISSION]


@contextlib.asynccontextmanager
async def full(state: LaneState) -> AsyncIterator[None]:
    """Every slot of the lane held for the duration."""
    for _ in range(state.limit):
        await state.acquire(0)
    try:
        yield
    finally:
        for _ in range(state.limit):
            state.release(0.0)


def beat(appliance: ApplianceClient) -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "log_size": len(appliance.records),
        "queues": {},
        "clock": "2026-11-25T00:00:00Z",
    }


def assert_shed(reply: Any) -> None:
    assert (reply.status, reply.code) == (503, "server-busy"), reply.body
    assert 1 <= int(reply.headers["Retry-After"]) <= MAX_RETRY_AFTER_SECONDS


async def witnessed(harness: Harness, appliance: ApplianceClient) -> int:
    async with harness.engine.connect() as connection:
        return int(
            (
                await connection.execute(
                    sa.select(sa.func.count())
                    .select_from(audit_entries)
                    .where(audit_entries.c.appliance_id == appliance.appliance_id)
                )
            ).scalar_one()
        )


# --- lanes ---------------------------------------------------------------------------


async def test_full_bulk_lane_sheds_while_heartbeats_and_partner_reads_go_on(
    harness: Harness,
) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    appliance.grow(5)
    gate = gate_of(harness)
    bulk = gate.lanes[Lane.BULK]
    async with full(bulk):
        refused = await appliance.sync(appliance.batch(0))
        assert_shed(refused)
        assert_shed(await appliance.push(appliance.sign_bundle()))
        heartbeat = f"/api/v1/appliances/{appliance.appliance_id}/heartbeat"
        assert (await appliance.request("POST", heartbeat, beat(appliance))).status == 200
        assert (await partner.request("GET", "/api/v1/sites")).status == 200
        health = await call(harness.client, "GET", "/api/v1/health")
        assert health.status == 200
        assert health.body["status"] == "busy"
        assert health.body["lanes"]["bulk"] == {
            "in_flight": BULK_LIMIT,
            "limit": BULK_LIMIT,
            "shed": 2,
        }
        assert health.body["lanes"]["urgent"]["shed"] == 0
    assert (bulk.in_flight, bulk.shed, gate.lanes[Lane.URGENT].in_flight) == (0, 2, 0)

    # Nothing refused was half taken: sent again, the batch (now with the
    # bundle's entry) is witnessed once; the same batch once more is told
    # where the server's log ends, and stores nothing twice.
    assert await witnessed(harness, appliance) == 0
    accepted = await appliance.sync(appliance.batch(0))
    assert accepted.status == 200, accepted.body
    again = await appliance.sync(appliance.batch(0))
    assert (again.status, again.code, again.body["server_size"]) == (409, "stale-size", 6)
    assert await witnessed(harness, appliance) == len(appliance.records) == 6


async def test_a_shed_upload_is_refused_before_its_body(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    path = sync_path(appliance)
    body = b"x" * 1024  # signed over, never sent
    headers = appliance.signed("POST", path, body) | {"Content-Length": str(8 * 1024 * 1024)}
    async with full(gate_of(harness).lanes[Lane.BULK]):
        answer = await refused_upfront(harness, path, headers)
    assert (answer.status, answer.problem["code"]) == (503, "server-busy")
    assert 1 <= int(answer.headers["retry-after"]) <= MAX_RETRY_AFTER_SECONDS


@pytest.mark.parametrize("lane", list(Lane), ids=str)
async def test_each_lane_is_bounded_on_its_own(harness: Harness, lane: Lane) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    appliance.grow(1)
    heartbeat = f"/api/v1/appliances/{appliance.appliance_id}/heartbeat"
    requests = {
        Lane.BULK: lambda: appliance.sync(appliance.batch(0)),
        Lane.URGENT: lambda: appliance.request("POST", heartbeat, beat(appliance)),
        Lane.INTERACTIVE: lambda: partner.request("GET", "/api/v1/partner"),
    }
    async with full(gate_of(harness).lanes[lane]):
        for other, send in requests.items():
            reply = await send()
            if other is lane:
                assert_shed(reply)
            else:
                assert reply.status == 200, (other, reply.body)
        # Neither the health check nor a request for no route is ever shed.
        assert (await call(harness.client, "GET", "/api/v1/health")).status == 200
        missing = await harness.client.get("/api/v1/no-such-thing")
        assert missing.status == 404


async def test_a_request_waits_for_a_slot_and_is_then_served(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    appliance.grow(3)
    gate = gate_of(harness)
    gate.wait = 60  # the slot is released long before
    bulk = gate.lanes[Lane.BULK]
    async with full(bulk):
        sending = asyncio.create_task(appliance.sync(appliance.batch(0)))
        while bulk.waiting == 0:
            assert not sending.done()
            await asyncio.sleep(0)
    reply = await sending
    assert reply.status == 200, reply.body
    assert (bulk.shed, bulk.in_flight, bulk.admitted) == (0, 0, BULK_LIMIT + 1)


async def test_listeners_hear_of_every_request_shed() -> None:
    gate = Admission(Settings(admission_urgent_limit=1, admission_wait_seconds=0))
    heard: list[Lane] = []
    gate.shed_listeners.append(heard.append)
    urgent = gate.lanes[Lane.URGENT]
    await urgent.acquire(0)
    with pytest.raises(LaneFull):
        await urgent.acquire(0.01)
    gate.lanes[Lane.INTERACTIVE].note_shed()  # as for a pool timeout
    assert heard == [Lane.URGENT, Lane.INTERACTIVE]


async def test_health_is_never_shed(harness: Harness) -> None:
    gate = gate_of(harness)
    async with (
        full(gate.lanes[Lane.BULK]),
        full(gate.lanes[Lane.URGENT]),
        full(gate.lanes[Lane.INTERACTIVE]),
    ):
        reply = await call(harness.client, "GET", "/api/v1/health")
        assert (reply.status, reply.body["status"]) == (200, "busy")
        assert {lane: value["in_flight"] for lane, value in reply.body["lanes"].items()} == {
            "bulk": BULK_LIMIT,
            "urgent": URGENT_LIMIT,
            "interactive": INTERACTIVE_LIMIT,
        }


async def test_health_is_busy_for_a_while_after_shedding() -> None:
    now = [1000.0]
    gate = Admission(
        Settings(admission_bulk_limit=1, admission_wait_seconds=0), clock=lambda: now[0]
    )
    bulk = gate.lanes[Lane.BULK]
    assert not gate.busy
    await bulk.acquire(0)
    assert gate.busy  # full
    with pytest.raises(LaneFull):
        await bulk.acquire(0)
    bulk.release(0.01)
    assert gate.busy  # shed a moment ago
    now[0] += 60
    assert not gate.busy
    assert (bulk.shed, bulk.admitted, bulk.in_flight) == (1, 1, 0)


def test_retry_after_follows_the_load_within_bounds() -> None:
    lane = LaneState(Lane.BULK, limit=4)
    lane.service_seconds = 0.2
    assert lane.retry_after(0.05) == 1  # never 0
    lane.waiting = 40
    assert lane.retry_after(0.05) == 3  # 41 requests through 4 slots of 0.2 s
    lane.service_seconds = 30
    assert lane.retry_after(0.05) == MAX_RETRY_AFTER_SECONDS  # never a long silence
    lane.waiting, lane.service_seconds = 0, 0.01
    assert lane.retry_after(2.5) == 3  # at least the wait already given


# --- the database's pool and its absence -------------------------------------------


@pytest.fixture
def small_pool(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "database_pool_size": 1,
            "database_max_overflow": 0,
            "database_pool_timeout_seconds": 0.5,
            "notify_interval_seconds": 3600,
        }
    )


async def test_a_pool_timeout_is_503_not_500(small_pool: Settings, aiohttp_client: Any) -> None:
    app = create_app(small_pool, root=ROOT, clock=Clock())
    heard: list[Lane] = []
    app[ADMISSION].shed_listeners.append(heard.append)
    client = await aiohttp_client(app)
    harness = Harness(client, app[CENTRAL].engine, Clock())
    partner: KeyClient = await harness.partner()
    assert (await partner.request("GET", "/api/v1/sites")).status == 200
    async with harness.engine.connect() as held:  # the pool's only connection
        await held.execute(sa.text("SELECT 1"))
        reply = await partner.request("GET", "/api/v1/sites")
        assert (reply.status, reply.code) == (503, "server-busy"), reply.body
        assert reply.headers["Retry-After"] == "1"
        # A full pool is a busy database, not a missing one: the balancer
        # must keep this replica.
        health = await call(client, "GET", "/api/v1/health")
        assert (health.status, health.body["status"]) == (200, "busy"), health.body
    assert app[ADMISSION].lanes[Lane.INTERACTIVE].shed == 1
    assert heard == [Lane.INTERACTIVE]
    assert (await partner.request("GET", "/api/v1/sites")).status == 200


async def test_a_database_gone_away_is_503_logged_once_per_burst(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    partner = await harness.partner()

    # Every new connection fails, as when PostgreSQL stops or the SQLite
    # file's disk vanishes.
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise ConnectionRefusedError(111, "connection refused")

    await settled(harness)
    await harness.engine.dispose()
    sa.event.listen(harness.engine.sync_engine, "do_connect", refuse)
    try:
        with caplog.at_level(logging.WARNING, logger="msp_central"):
            replies = [await partner.request("GET", "/api/v1/sites") for _ in range(3)]
        health = await call(harness.client, "GET", "/api/v1/health")
    finally:
        sa.event.remove(harness.engine.sync_engine, "do_connect", refuse)
    for reply in replies:
        assert (reply.status, reply.code) == (503, "database-unavailable"), reply.body
        assert int(reply.headers["Retry-After"]) >= 1
    assert (health.status, health.code) == (503, "database-unavailable")
    lines = [r.getMessage() for r in caplog.records if r.name == "msp_central"]
    assert len(lines) == 1, lines
    assert "the database is unavailable (ConnectionRefusedError)" in lines[0]
    assert gate_of(harness).database_unavailable == 3
    assert (await partner.request("GET", "/api/v1/sites")).status == 200


class CuttableProxy:
    """A TCP relay to PostgreSQL that can be cut: every connection through it
    closed and new ones refused, as when the database server stops."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()


async def test_postgresql_stopping_mid_session_is_503_not_500(
    postgres_url: str, tmp_path: Path, aiohttp_client: Any
) -> None:
    url = make_url(postgres_url)
    proxy = CuttableProxy(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    settings = Settings(
        state_dir=tmp_path / "state",
        database_url=url.set(port=port).render_as_string(hide_password=False),
        database_pool_timeout_seconds=2,
    )
    app = create_app(settings, root=ROOT, clock=Clock())
    client = await aiohttp_client(app)
    harness = Harness(client, app[CENTRAL].engine, Clock())
    partner = await harness.partner(f"Proxy MSP {uuid.uuid4().hex[:8]}")
    assert (await partner.request("GET", "/api/v1/partner")).status == 200
    await proxy.cut()
    reply = await partner.request("GET", "/api/v1/partner")
    assert (reply.status, reply.code) == (503, "database-unavailable"), reply.body
    assert int(reply.headers["Retry-After"]) >= 1
    health = await call(client, "GET", "/api/v1/health")
    assert (health.status, health.code) == (503, "database-unavailable")


# --- shutting down -------------------------------------------------------------------


async def test_health_is_503_once_shutting_down(harness: Harness) -> None:
    gate_of(harness).begin_shutdown()
    reply = await call(harness.client, "GET", "/api/v1/health")
    assert (reply.status, reply.code) == (503, "shutting-down")
    assert int(reply.headers["Retry-After"]) >= 1
    partner = await harness.partner()
    assert (await partner.request("GET", "/api/v1/partner")).status == 200  # still serving


async def wait_for_shutdown(gate: Admission) -> None:
    async with asyncio.timeout(10):
        while not gate.shutting_down:  # noqa: ASYNC110 - set by a signal handler, not an event of ours
            await asyncio.sleep(0)


@pytest.mark.parametrize("second_signal", [False, True], ids=["drained", "second-signal"])
async def test_a_signal_drains_then_stops(second_signal: bool) -> None:
    app = web.Application()
    # Long enough that only the second signal can end it in the test's time.
    gate = Admission(Settings(shutdown_drain_seconds=300 if second_signal else 0.05))
    app[ADMISSION] = gate
    stopping = asyncio.create_task(until_stopped(app))
    await asyncio.sleep(0)  # the handlers are installed
    os.kill(os.getpid(), signal.SIGTERM)
    await wait_for_shutdown(gate)
    assert not stopping.done()  # draining: health refuses, the rest is served
    if second_signal:
        os.kill(os.getpid(), signal.SIGINT)
    async with asyncio.timeout(10):
        await stopping


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


@pytest.fixture
def serving(sqlite_template: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``msp-central serve`` as a process, draining 3 s on SIGTERM."""
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(sqlite_template, state / "central.db")
    write_root_key(state / "keys" / "root.key")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSP_CENTRAL_")}
    env["MSP_CENTRAL_SHUTDOWN_DRAIN_SECONDS"] = "3"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "msp_central.cli",
            "--state-dir",
            str(state),
            "serve",
            "--port",
            str(port),
        ],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if _get(f"{base}/api/v1/health")[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_sigterm_drains_with_health_503_then_stops(
    serving: tuple[subprocess.Popen[str], str],
) -> None:
    process, base = serving
    status, body = _get(f"{base}/api/v1/health")
    assert (status, body["status"]) == (200, "ok")
    process.send_signal(signal.SIGTERM)
    # The signal is handled as soon as the loop wakes: ask until it shows.
    deadline = time.monotonic() + 2
    while (answer := _get(f"{base}/api/v1/health"))[0] == 200:
        assert time.monotonic() < deadline, answer
    status, body = answer
    assert (status, body["code"]) == (503, "shutting-down")
    assert _get(f"{base}/api/v1/openapi.json")[0] == 200  # everything else still served
    assert process.wait(timeout=20) == 0


# --- settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "admission_bulk_limit",
            0,
            "invalid setting admission_bulk_limit: Input should be greater than or equal to 1",
        ),
        (
            "admission_urgent_limit",
            "many",
            "invalid setting admission_urgent_limit: Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            "admission_interactive_limit",
            10_001,
            "invalid setting admission_interactive_limit: Input should be less than or equal to 10000",
        ),
        (
            "admission_wait_seconds",
            -1,
            "invalid setting admission_wait_seconds: Input should be greater than or equal to 0",
        ),
        (
            "database_pool_size",
            0,
            "invalid setting database_pool_size: Input should be greater than or equal to 1",
        ),
        (
            "database_max_overflow",
            -1,
            "invalid setting database_max_overflow: Input should be greater than or equal to 0",
        ),
        (
            "database_pool_timeout_seconds",
            0,
            "invalid setting database_pool_timeout_seconds: Input should be greater than 0",
        ),
        (
            "shutdown_drain_seconds",
            -5,
            "invalid setting shutdown_drain_seconds: Input should be greater than or equal to 0",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) and value.isidentifier() else "-",
)
def test_bad_settings_are_refused_in_one_line(
    tmp_path: Path, name: str, value: object, message: str
) -> None:
    path = tmp_path / "central.json"
    path.write_text(json.dumps({name: value}))
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    assert str(raised.value) == message
    assert "\n" not in str(raised.value)


def test_settings_defaults_and_overrides(tmp_path: Path) -> None:
    defaults = Settings()
    assert (
        defaults.admission_bulk_limit,
        defaults.admission_urgent_limit,
        defaults.admission_interactive_limit,
        defaults.admission_wait_seconds,
        defaults.database_pool_size,
        defaults.database_max_overflow,
        defaults.shutdown_drain_seconds,
    ) == (8, 64, 32, 1, 10, 10, 0)
    path = tmp_path / "central.toml"
    path.write_text("admission_bulk_limit = 8\ndatabase_pool_timeout_seconds = 0.5\n")
    loaded = load_settings(path)
    assert (loaded.admission_bulk_limit, loaded.database_pool_timeout_seconds) == (8, 0.5)
