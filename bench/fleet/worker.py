"""A simulator process: a share of the fleet's appliances, an asyncio task
each, over one aiohttp session (as many connections as appliances need:
a pool limit here would measure the simulator, not the server).

The conversation with the main process over a pipe:

1. the worker enrolls its appliances and builds their backlogs (not timed),
   then sends ``("ready", count)`` (or ``("error", line)``);
2. the main process answers ``("go", wall_time)``: the storm's time zero;
3. the worker runs its scenario and sends ``("done", WorkerResult)``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import aiohttp
from bench.fleet.appliance import Outcome, Plan, SimAppliance
from bench.fleet.requests import Request, RequestLog

from msp_protocol.keys import VerifyKey

# Enrollment is set-up, not the storm: a few at a time per process.
ENROLL_CONCURRENCY = 16


@dataclass
class WorkerSpec:
    index: int
    base_url: str
    root_key_id: str
    root_public_key: str
    tokens: list[tuple[str, str]]  # (site_id, token)
    plan: Plan
    scenario: str  # "outage" or "steady"
    window: float  # outage: reconnects spread over this many seconds
    duration: float  # steady: how long
    seed: int


@dataclass
class WorkerResult:
    outcomes: list[Outcome] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)


def run_worker(connection: Connection, spec: WorkerSpec) -> None:
    """Process entry point (multiprocessing)."""
    # The agent's client logs every refusal and lost connection; the
    # simulator counts them itself (a storm would print thousands of lines).
    logging.getLogger("msp_agent").setLevel(logging.ERROR)
    # One socket per appliance request in flight: thousands per process.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        asyncio.run(_work(connection, spec))
    except BaseException as exc:
        line = "".join(traceback.format_exception_only(exc)).strip().splitlines()[-1]
        connection.send(("error", f"worker {spec.index}: {line}"))
        raise


async def _work(connection: Connection, spec: WorkerSpec) -> None:
    rng = random.Random(spec.seed)
    log = RequestLog()
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(
        connector=connector, trace_configs=[log.trace_config()]
    ) as session:
        root_key = VerifyKey.from_hex(spec.root_public_key)
        appliances = [
            SimAppliance(
                base_url=spec.base_url,
                session=session,
                site_id=site_id,
                token=token,
                root_key_id=spec.root_key_id,
                root_key=root_key,
                plan=spec.plan,
                rng=random.Random(rng.random()),
            )
            for site_id, token in spec.tokens
        ]
        limit = asyncio.Semaphore(ENROLL_CONCURRENCY)

        async def enroll(appliance: SimAppliance) -> None:
            async with limit:
                await appliance.enroll()

        await asyncio.gather(*(enroll(a) for a in appliances))
        if spec.scenario == "outage":
            for appliance in appliances:
                appliance.build_outage_backlog()
        log.rows.clear()  # the storm's requests only
        connection.send(("ready", len(appliances)))
        message = await asyncio.to_thread(connection.recv)
        if message[0] != "go":
            return
        zero = float(message[1])
        stop = asyncio.Event()
        if spec.scenario == "outage":
            runs = [a.reconnect(zero + rng.uniform(0, spec.window), stop) for a in appliances]
        else:
            until = zero + spec.duration
            runs = [
                a.steady(zero + rng.uniform(0, spec.plan.check_seconds), until, stop)
                for a in appliances
            ]
        await asyncio.gather(*runs)
        stop.set()
        for appliance in appliances:
            if appliance.beating is None:
                continue
            try:
                await appliance.beating
            except Exception as exc:  # a refused heartbeat is a failure to report
                appliance.outcome.failure = appliance.outcome.failure or str(exc)
        connection.send(("done", WorkerResult([a.outcome for a in appliances], log.rows)))
