"""A small reconnect storm against the replicated topology, with a replica
killed (``kill -9``) in the middle of it.

The topology is the one an operator runs (bench/fleet/topology.py): a fresh
PostgreSQL database, two ``msp-central serve`` processes and HAProxy with
the shipped deploy/haproxy.cfg. The appliances are the fleet simulator's
(real keys, enrollment, signed logs, evidence and escalations through the
agent's client). Asserted: correctness (every log witnessed to its size,
every bundle and escalation stored exactly once, no security alert, no
unplanned 5xx) and that the balancer routed around the dead replica. Never
speed.
"""

from __future__ import annotations

import os

import asyncpg  # type: ignore[import-untyped]
import pytest
from bench.fleet.run import Options, run_fleet
from bench.fleet.topology import HAPROXY, HAPROXY_MISSING
from sqlalchemy.engine import make_url

KILL_AT = 2.5  # seconds into the 5-second reconnect window


async def test_storm_with_a_replica_killed_witnesses_everything_once(
    postgres_admin_url: str,
) -> None:
    if not os.access(HAPROXY, os.X_OK):
        pytest.fail(HAPROXY_MISSING, pytrace=False)
    report = await run_fleet(
        Options(
            appliances=24,
            entries=600,
            bundles=6,
            escalations=2,
            window=5.0,
            heartbeat_seconds=1.0,
            workers=1,
            kill_replica_at=KILL_AT,
            postgres_admin_url=postgres_admin_url,
            baseline_entries=0,
            read_interval=0.2,
        )
    )

    # Everything witnessed once, nothing refused, nothing lost to the kill.
    assert report.failures == []
    assert len(report.outcomes) == 24
    assert all(o.witnessed == o.log_size == 600 for o in report.outcomes)
    assert report.unplanned_5xx == 0, [r for r in report.requests if r.status >= 500]
    assert [r for r in report.requests if r.status == 0] == []

    # The kill happened mid-storm, and the balancer routed around it: it
    # marked the dead replica down, and the other one answered what came
    # after (appliances' requests kept succeeding).
    assert report.killed_at is not None
    assert any(o.done_at is not None and o.done_at > report.killed_at for o in report.outcomes)
    before, after = report.states_at_kill, report.balancer_states
    assert int(before["central1"]["hrsp_2xx"]) > 0
    assert int(before["central2"]["hrsp_2xx"]) > 0
    assert after["central1"]["status"].startswith("DOWN")
    assert int(after["central2"]["hrsp_2xx"]) > int(before["central2"]["hrsp_2xx"])
    later = [r for r in report.requests if r.ended > report.killed_at + 1 and 200 <= r.status < 300]
    assert {r.kind for r in later} >= {"heartbeat", "sync", "evidence"}

    # And the database the run created is gone.
    admin = make_url(postgres_admin_url).set(drivername="postgresql")
    connection = await asyncpg.connect(admin.render_as_string(hide_password=False))
    try:
        left = await connection.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = $1", report.database
        )
    finally:
        await connection.close()
    assert left == 0
