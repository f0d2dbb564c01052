"""End-to-end resync of an offline backlog: agent and server as processes.

    uv run python bench/agent_resync_bench.py [--quick] [--entries N]

Two appliances are enrolled with one central server (a separate process, on
SQLite); each has an offline backlog of N audit entries (default 100,000,
about 300 bytes each) in its own audit trail.

- ``resync``: the first appliance's agent is started (``python -m msp_agent
  run``) and the clock runs until the server has witnessed its whole
  backlog: the agent's loops, bounded batches of 1,000, RFC 9421 requests,
  the server's verification and commits, over loopback.
- ``direct``: the baseline, measured in the same run: the second
  appliance's backlog is synced by this process calling the same library
  (``OfflineAuditTrail.sync`` with the HTTP client) against the same server,
  with no agent process around it.

Figures (``figure=value unit``). Target (issue 5): resync >= 20,000 entries/s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

# The system tests' process harness: the same way of starting each process.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.system.harness import Agent, Central, sync_with_library, wait_for


async def main(entries: int) -> None:
    with tempfile.TemporaryDirectory(prefix="msp-resync-bench-") as scratch:
        root = Path(scratch)
        central = Central(root / "central")
        central.setup()
        central.start()
        try:
            await central.ready()
            agents = []
            for name in ("resync", "direct"):
                agent = Agent(root / name, central, central.url)
                agent.write_config(
                    check_interval_seconds=3600,
                    sync_interval_seconds=60,
                    heartbeat_interval_seconds=3600,
                    bundle_refresh_seconds=3600,
                    l1_command=["/bin/true", "{action}"],
                )
                agent.enroll()
                started = time.perf_counter()
                size = await agent.append_backlog(entries)
                append_seconds = time.perf_counter() - started
                agents.append((agent, size))
            print(f"backlog={entries} entries (appended at {entries / append_seconds:,.0f}/s)")

            agent, size = agents[0]
            started = time.perf_counter()
            agent.start()
            appliance = await wait_for(
                lambda: agent.status().get("appliance_id"), within=60, what="the agent to start"
            )
            await wait_for(
                lambda: central.witnessed_size(appliance) >= size,
                within=600,
                what="the backlog to be witnessed",
                interval=0.05,
            )
            resync = time.perf_counter() - started
            agent.service.terminate()

            other, other_size = agents[1]
            direct = await sync_with_library(other.state_dir, central.public_key, central.url)
        finally:
            central.server.terminate()
    print(f"resync_seconds={resync:.2f} s")
    print(f"resync={size / resync:,.0f} entries/s")
    print(f"direct={other_size / direct:,.0f} entries/s")
    print(f"ratio_resync_to_direct={direct / resync:.2f}")
    print(f"target_met={size / resync >= 20_000}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    args = parser.parse_args()
    asyncio.run(main(3_000 if args.quick else args.entries))
