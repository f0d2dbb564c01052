"""A fleet against the replicated topology: the regional-outage reconnect
storm (or steady state), measured, then checked straight from the database.

    uv run python bench/fleet_sim.py [--appliances 2000] [--scenario outage|steady]
        [--entries 1000] [--bundles 100] [--escalations 3] [--window 60]
        [--duration 60] [--heartbeat-seconds 10] [--check-seconds 20]
        [--workers 2] [--kill-replica-at S [--restart-replica-at S]]
        [--baseline-entries 100000] [--database-url URL]

The topology (bench/fleet/topology.py): a fresh PostgreSQL database on
127.0.0.1:5432 (dropped at the end; ``--database-url`` names another), two
``msp-central serve`` replicas, and HAProxy (/usr/sbin/haproxy) in front
with the shipped deploy/haproxy.cfg.

``outage``: every appliance has been offline for a simulated day (its
backlog is built before the storm, not timed); each reconnects at a
uniformly random instant within ``--window`` seconds (60 by default; 0.3
per appliance for fewer than 200, so a quick run is quick) and sends its
escalations, then its audit backlog (batches sized by the agent's
BatchSizer), then its evidence, with heartbeats every
``--heartbeat-seconds`` throughout; after a 503 or 429 it waits as the
agent does (``wait_before_retry``). A partner reader polls the appliance
list and a site's posture meanwhile. ``steady``: heartbeats and a check
round (``--bundles`` bundles, a sync, their delivery) every
``--check-seconds`` for ``--duration`` seconds.

Figures are ``figure=value unit`` lines. Latencies are to the response's
headers. ``baseline_seconds`` is one appliance alone sending the same total
of entries (measured on up to ``--baseline-entries``, scaled linearly).
Exits non-zero with one line when the correctness check fails: a log not
witnessed to its size, a bundle or escalation missing or extra, a security
alert, or an unplanned 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench.fleet`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fleet.run import Options, Report, run_fleet
from bench.fleet.topology import TopologyError


def parse(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="fleet reconnect storm against replicas behind HAProxy"
    )
    parser.add_argument("--appliances", type=int, default=2_000)
    parser.add_argument("--scenario", choices=("outage", "steady"), default="outage")
    parser.add_argument("--entries", type=int, default=1_000, help="audit entries per appliance")
    parser.add_argument("--bundles", type=int, default=100, help="evidence bundles per appliance")
    parser.add_argument("--escalations", type=int, default=3, help="escalations per appliance")
    parser.add_argument(
        "--window",
        type=float,
        help="reconnects spread over this many seconds (default: 60; below 200 "
        "appliances 0.3 s each, so a quick run stays quick)",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="steady: how long (s)")
    parser.add_argument("--heartbeat-seconds", type=float, default=10.0)
    parser.add_argument("--check-seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2, help="simulator processes")
    parser.add_argument("--kill-replica-at", type=float, help="kill -9 a replica at S seconds")
    parser.add_argument("--restart-replica-at", type=float, help="and start it again at S")
    parser.add_argument("--baseline-entries", type=int, default=100_000)
    parser.add_argument("--database-url", help="default: a fresh database on 127.0.0.1:5432")
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args(argv)
    if args.appliances < 1 or args.workers < 1:
        parser.error("--appliances and --workers must be at least 1")
    if args.restart_replica_at is not None and (
        args.kill_replica_at is None or args.restart_replica_at <= args.kill_replica_at
    ):
        parser.error("--restart-replica-at needs an earlier --kill-replica-at")
    return Options(
        appliances=args.appliances,
        scenario=args.scenario,
        entries=args.entries,
        bundles=args.bundles,
        escalations=args.escalations,
        window=args.window if args.window is not None else min(60.0, 0.3 * args.appliances),
        duration=args.duration,
        heartbeat_seconds=args.heartbeat_seconds,
        check_seconds=args.check_seconds,
        workers=args.workers,
        kill_replica_at=args.kill_replica_at,
        restart_replica_at=args.restart_replica_at,
        database_url=args.database_url,
        baseline_entries=args.baseline_entries,
        seed=args.seed,
    )


def verdict(report: Report) -> str | None:
    """One line saying what is wrong, or None."""
    if report.failures:
        more = f" (and {len(report.failures) - 1} more)" if len(report.failures) > 1 else ""
        return f"correctness check failed: {report.failures[0]}{more}"
    if report.unplanned_5xx:
        return f"correctness check failed: {report.unplanned_5xx} unplanned 5xx answers"
    return None


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    try:
        report = asyncio.run(run_fleet(options))
    except TopologyError as exc:
        print(f"fleet_sim: {exc}", file=sys.stderr)
        return 2
    for name, value, unit in report.figures:
        print(f"{name}={value} {unit}")
    problem = verdict(report)
    if problem is not None:
        print(f"fleet_sim: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
