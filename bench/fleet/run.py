"""One fleet run: the topology, the simulator processes, the partner reader,
the samplers, the baseline, the figures and the correctness check.

:func:`run_fleet` returns a :class:`Report`; ``bench/fleet_sim.py`` prints
it and the fleet test asserts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from bench.fleet.appliance import Outcome, Plan, SimAppliance
from bench.fleet.requests import Request, RequestLog
from bench.fleet.topology import DEFAULT_POSTGRES, Topology, TopologyError
from bench.fleet.worker import WorkerResult, WorkerSpec, run_worker

from msp_protocol.keys import VerifyKey

SITE_SIZE = 10  # appliances per site
SAMPLE_SECONDS = 0.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Options:
    appliances: int = 2_000
    scenario: str = "outage"
    entries: int = 1_000
    bundles: int = 100
    escalations: int = 3
    window: float = 60.0
    duration: float = 60.0
    heartbeat_seconds: float = 10.0
    check_seconds: float = 20.0
    workers: int = 2
    kill_replica_at: float | None = None
    restart_replica_at: float | None = None
    database_url: str | None = None
    # The PostgreSQL server where a fresh database is created (and dropped)
    # when database_url names none.
    postgres_admin_url: str = DEFAULT_POSTGRES
    # Entries the baseline appliance sends alone (0: no baseline); its time
    # is scaled to the fleet's total when that is larger.
    baseline_entries: int = 100_000
    read_interval: float = 0.25
    seed: int = 15


@dataclass
class Report:
    figures: list[tuple[str, str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    killed_at: float | None = None
    # HAProxy's view of the replicas just before the kill, and at the end.
    states_at_kill: dict[str, dict[str, str]] = field(default_factory=dict)
    database: str = ""
    marked_down_before: int = 0
    balancer_states: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, name: str, value: float, unit: str, digits: int = 3) -> None:
        text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        self.figures.append((name, text, unit))

    def figure(self, name: str) -> str:
        return next(value for figure, value, _ in self.figures if figure == name)

    @property
    def unplanned_5xx(self) -> int:
        return sum(1 for r in self.requests if r.status >= 500 and not r.shed)


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def run_fleet(options: Options) -> Report:
    """Start the topology, run the scenario, check the database; always
    stops every process and drops the database it created."""
    report = Report()
    async with Topology(
        database_url=options.database_url, admin_url=options.postgres_admin_url
    ) as topology:
        report.database = topology.database_name()
        tokens = await topology.sites_with_tokens(options.appliances + 1, SITE_SIZE)
        baseline_token = tokens.pop()
        await _storm(topology, options, tokens, report)
        report.balancer_states = await _settled_states(topology, report)
        marked_down = topology.balancer_events(" is DOWN") - report.marked_down_before
        report.add("replica_marked_down", marked_down, "times")
        await _check(topology, report)
        if options.scenario == "outage" and options.baseline_entries > 0:
            await _baseline(topology, options, baseline_token, report)
    return report


async def _settled_states(topology: Topology, report: Report) -> dict[str, dict[str, str]]:
    """HAProxy's view at the end; after a kill, once its health checks have
    had time to mark the dead replica down (a short storm may end first)."""
    deadline = time.monotonic() + 15
    while True:
        states = await topology.server_states()
        victim = states.get(topology.replicas[0].name, {})
        if report.killed_at is None or victim.get("status", "").startswith("DOWN"):
            return states
        if time.monotonic() > deadline or topology.replicas[0].process is None:
            return states
        if topology.replicas[0].process.poll() is None:  # restarted: it is up again
            return states
        await asyncio.sleep(0.5)


async def _storm(
    topology: Topology, options: Options, tokens: list[tuple[str, str]], report: Report
) -> None:
    plan = Plan(
        entries=options.entries,
        bundles=options.bundles,
        escalations=options.escalations,
        heartbeat_seconds=options.heartbeat_seconds,
        check_seconds=options.check_seconds,
    )
    count = max(1, min(options.workers, len(tokens)))
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for index in range(count):
        parent, child = context.Pipe()
        spec = WorkerSpec(
            index=index,
            base_url=topology.url,
            root_key_id=topology.root_key_id,
            root_public_key=topology.root_public_key,
            tokens=tokens[index::count],
            plan=plan,
            scenario=options.scenario,
            window=options.window,
            duration=options.duration,
            seed=options.seed * 1000 + index,
        )
        process = context.Process(target=run_worker, args=(child, spec), daemon=True)
        process.start()
        child.close()
        pipes.append(parent)
        processes.append(process)
    try:
        for pipe in pipes:
            message = await asyncio.to_thread(pipe.recv)
            if message[0] != "ready":
                raise TopologyError(str(message[1]))
        # Replicas are marked down while they start: count only the storm's.
        report.marked_down_before = topology.balancer_events(" is DOWN")
        zero = time.time() + 0.5
        for pipe in pipes:
            pipe.send(("go", zero))
        async with _Sampling(topology, options, zero, report) as sampling:
            results: list[WorkerResult] = []
            for pipe in pipes:
                message = await asyncio.to_thread(pipe.recv)
                if message[0] != "done":
                    raise TopologyError(str(message[1]))
                results.append(message[1])
        for result in results:
            report.outcomes.extend(result.outcomes)
            report.requests.extend(result.requests)
        report.requests.extend(sampling.reads.rows)
        _figures(options, report, sampling, zero)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()


class _Sampling:
    """While the storm runs: the partner reader, the RSS and database
    connection samplers, and the replica kill (and restart) on schedule."""

    def __init__(self, topology: Topology, options: Options, zero: float, report: Report):
        self.topology = topology
        self.options = options
        self.zero = zero
        self.report = report
        self.reads = RequestLog()
        self.read_latencies: list[float] = []
        self.peak_connections = 0
        # CPU seconds of each replica process and database backend since the
        # storm began: the first sample of a process is its starting point.
        self.cpu_start: dict[int, float] = {}
        self.cpu_now: dict[int, float] = {}
        self.replica_pids: set[int] = set()
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> _Sampling:
        self.tasks = [
            asyncio.create_task(self._reader()),
            asyncio.create_task(self._sampler()),
            asyncio.create_task(self._killer()),
        ]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.stop.set()
        # The reader and the sampler finish their round; the killer may
        # still be waiting for its moment.
        _done, pending = await asyncio.wait(self.tasks, timeout=10)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _reader(self) -> None:
        """A partner's console open during the storm: the appliance list and
        one site's posture, read in turn."""
        headers = {"Authorization": f"Bearer {self.topology.partner_key}"}
        base = self.topology.url
        async with aiohttp.ClientSession(trace_configs=[self.reads.trace_config()]) as session:
            site_ids: list[str] = []
            while not self.stop.is_set():
                paths = ["/api/v1/appliances?limit=50"]
                if site_ids:
                    paths.append(f"/api/v1/sites/{random.choice(site_ids)}/posture")
                for path in paths:
                    started = time.monotonic()
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(base + path, headers=headers) as response:
                            body = await response.json(content_type=None)
                            if response.status == 200:
                                self.read_latencies.append(time.monotonic() - started)
                                if not site_ids and isinstance(body, dict):
                                    site_ids = _site_ids(body)
                await asyncio.sleep(self.options.read_interval)

    async def _sampler(self) -> None:
        connection = await self.topology.connect()
        try:
            name = self.topology.database_name()
            first = True
            while not self.stop.is_set():
                for replica in self.topology.replicas:
                    replica.sample_rss()
                    if replica.process is not None and replica.process.poll() is None:
                        self.replica_pids.add(replica.process.pid)
                        self._cpu(replica.process.pid, first)
                pids = await connection.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1 "
                    "AND pid <> pg_backend_pid()",
                    name,
                )
                self.peak_connections = max(self.peak_connections, len(pids))
                for row in pids:
                    self._cpu(int(row["pid"]), first)
                first = False
                await asyncio.sleep(SAMPLE_SECONDS)
        finally:
            await connection.close()

    def _cpu(self, pid: int, first: bool) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            self.cpu_now[pid] = seconds
            self.cpu_start.setdefault(pid, seconds if first else 0.0)

    def cpu_seconds(self, replicas: bool) -> float:
        return sum(
            now - self.cpu_start[pid]
            for pid, now in self.cpu_now.items()
            if (pid in self.replica_pids) == replicas
        )

    async def _killer(self) -> None:
        if self.options.kill_replica_at is None:
            return
        victim = self.topology.replicas[0]
        if await self._stopped_before(self.zero + self.options.kill_replica_at):
            return
        self.report.states_at_kill = await self.topology.server_states()
        self.topology.kill_replica(victim)
        self.report.killed_at = time.time()
        if self.options.restart_replica_at is not None and not await self._stopped_before(
            self.zero + self.options.restart_replica_at
        ):
            self.topology.start_replica(victim)

    async def _stopped_before(self, moment: float) -> bool:
        """Wait until wall time ``moment``; True when the run ended first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(0.0, moment - time.time()))
            return True
        return False


def _site_ids(body: dict[str, Any]) -> list[str]:
    items = body.get("items", body.get("appliances", []))
    return sorted({str(item["site_id"]) for item in items if "site_id" in item})


def _figures(options: Options, report: Report, sampling: _Sampling, zero: float) -> None:
    outcomes = report.outcomes
    done = [o for o in outcomes if o.done_at is not None]
    storm = [r for r in report.requests if r.kind != "partner_read"]
    report.add("appliances", len(outcomes), "appliances")
    if options.scenario == "outage" and done:
        first = min(o.reconnect_at for o in outcomes)
        last = max(o.done_at for o in done if o.done_at is not None)
        drain = last - first
        own = [o.done_at - o.reconnect_at for o in done if o.done_at is not None]
        report.add("drain_seconds", drain, "s")
        report.add("fairness", max(own) / max(statistics.median(own), 1e-9), "ratio")
        report.add("appliance_drain_p50", statistics.median(own), "s")
        report.add("appliance_drain_max", max(own), "s")
        entries = sum(o.log_size for o in outcomes)
        report.add("entries", entries, "entries")
        report.add("entries_per_second", entries / drain, "entries/s", 0)
        window = [r for r in storm if first <= r.ended <= last]
        report.add("requests_per_second", len(window) / drain, "requests/s", 0)
    else:
        first, last = zero, zero + options.duration
        window = [r for r in storm if first <= r.ended <= last]
        report.add("requests_per_second", len(window) / options.duration, "requests/s", 0)
    buckets: dict[int, int] = {}
    for r in window:
        buckets[int(r.ended - first)] = buckets.get(int(r.ended - first), 0) + 1
    seconds = max(1, int(last - first) + 1)
    mean = len(window) / seconds
    report.add("peak_over_mean", max(buckets.values(), default=0) / max(mean, 1e-9), "ratio")
    beats = [r.seconds * 1000 for r in storm if r.kind == "heartbeat" and r.status == 200]
    report.add("heartbeat_p50", percentile(beats, 0.50), "ms", 1)
    report.add("heartbeat_p99", percentile(beats, 0.99), "ms", 1)
    reads = [s * 1000 for s in sampling.read_latencies]
    report.add("partner_read_p50", percentile(reads, 0.50), "ms", 1)
    report.add("partner_read_p99", percentile(reads, 0.99), "ms", 1)
    report.add("partner_reads", len(reads), "requests")
    report.add("requests", len(report.requests), "requests")
    for kind in ("sync", "evidence", "escalation", "heartbeat"):
        report.add(f"requests_{kind}", sum(1 for r in storm if r.kind == kind), "requests")
    report.add("shed_503", sum(1 for r in report.requests if r.shed), "responses")
    report.add("unplanned_5xx", report.unplanned_5xx, "responses")
    statuses: dict[int, int] = {}
    for r in report.requests:
        if r.status >= 500 and not r.shed:
            statuses[r.status] = statuses.get(r.status, 0) + 1
    for status, count in sorted(statuses.items()):
        report.add(f"unplanned_{status}", count, "responses")
    report.add("no_answer", sum(1 for r in report.requests if r.status == 0), "requests")
    for replica in sampling.topology.replicas:
        report.add(f"rss_{replica.name}", replica.peak_rss_kib / 1024, "MiB", 1)
    report.add("db_connections_peak", sampling.peak_connections, "connections")
    served = sum(1 for r in report.requests if 200 <= r.status < 300)
    replica_cpu, database_cpu = sampling.cpu_seconds(True), sampling.cpu_seconds(False)
    report.add("replica_cpu_seconds", replica_cpu, "s", 1)
    report.add("postgres_cpu_seconds", database_cpu, "s", 1)
    if served:
        report.add("replica_cpu_per_request", replica_cpu / served * 1000, "ms", 2)
        report.add("postgres_cpu_per_request", database_cpu / served * 1000, "ms", 2)
    if report.killed_at is not None:
        after = [r for r in report.requests if r.ended > report.killed_at and 200 <= r.status < 300]
        report.add("ok_after_kill", len(after), "requests")


async def _check(topology: Topology, report: Report) -> None:
    """Straight from the database: every log witnessed to its size, every
    bundle and escalation stored once and nothing else, no security alert."""
    for outcome in report.outcomes:
        if outcome.failure is not None:
            report.failures.append(outcome.failure)
        elif outcome.done_at is None:
            report.failures.append(f"{outcome.appliance_id}: never finished")
    connection = await topology.connect()
    try:
        sizes = dict(await connection.fetch("SELECT appliance_id, size FROM audit_logs"))
        entries = dict(
            await connection.fetch(
                "SELECT appliance_id, count(*) FROM audit_entries GROUP BY appliance_id"
            )
        )
        bundles: dict[str, set[str]] = {}
        for row in await connection.fetch("SELECT appliance_id, bundle_id, in_log FROM evidence"):
            bundles.setdefault(row["appliance_id"], set()).add(row["bundle_id"])
            if row["in_log"] is not True:
                report.failures.append(
                    f"{row['appliance_id']}: bundle {row['bundle_id']} not matched in its log"
                )
        escalations: dict[str, set[str]] = {}
        for row in await connection.fetch("SELECT appliance_id, escalation_id FROM escalations"):
            escalations.setdefault(row["appliance_id"], set()).add(row["escalation_id"])
        alerts = await connection.fetch("SELECT code, detail FROM security_alerts")
    finally:
        await connection.close()
    known = {o.appliance_id for o in report.outcomes}
    for outcome in report.outcomes:
        name = outcome.appliance_id
        if sizes.get(name) != outcome.log_size or entries.get(name) != outcome.log_size:
            report.failures.append(
                f"{name}: log of {outcome.log_size} entries, server witnessed "
                f"{sizes.get(name)} and holds {entries.get(name)}"
            )
        if bundles.get(name, set()) != set(outcome.bundle_ids):
            report.failures.append(
                f"{name}: {len(outcome.bundle_ids)} bundles signed, "
                f"{len(bundles.get(name, set()))} stored"
            )
        if escalations.get(name, set()) != set(outcome.escalation_ids):
            report.failures.append(
                f"{name}: {len(outcome.escalation_ids)} escalations raised, "
                f"{len(escalations.get(name, set()))} stored"
            )
    extra = (set(bundles) | set(escalations)) - known
    if extra:
        report.failures.append(f"rows for appliances the fleet does not have: {sorted(extra)[:3]}")
    for alert in alerts:
        report.failures.append(f"security alert {alert['code']}: {alert['detail'][:120]}")
    report.add("correctness_failures", len(report.failures), "failures")


async def _baseline(
    topology: Topology, options: Options, token: tuple[str, str], report: Report
) -> None:
    """One appliance alone sends the same total of entries (up to
    ``baseline_entries``, scaled beyond) in batches of the crowd's largest
    size, prebuilt, one after another: the ingest bench's path through the
    same balancer and replicas."""
    total = sum(o.log_size for o in report.outcomes)
    sent = min(total, options.baseline_entries)
    async with aiohttp.ClientSession() as session:
        alone = SimAppliance(
            base_url=topology.url,
            session=session,
            site_id=token[0],
            token=token[1],
            root_key_id=topology.root_key_id,
            root_key=VerifyKey.from_hex(topology.root_public_key),
            plan=Plan(entries=sent, bundles=0, escalations=0),
            rng=random.Random(options.seed),
        )
        await alone.enroll()
        alone.build_outage_backlog()
        alone.sizer.answered(0.0)  # start at the largest batch, as the bench does
        while alone.sizer.size < alone.sizer.largest:
            alone.sizer.answered(0.0)
        started = time.monotonic()
        await alone.sync()
        seconds = time.monotonic() - started
    scaled = seconds * total / sent
    report.add("baseline_entries_sent", sent, "entries")
    report.add("baseline_entries_per_second", sent / seconds, "entries/s", 0)
    report.add("baseline_seconds", scaled, "s")
    with contextlib.suppress(StopIteration, ValueError):
        drain = float(report.figure("drain_seconds"))
        report.add("drain_over_baseline", drain / scaled, "ratio")
