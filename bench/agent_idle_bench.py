"""The idle agent's cost: CPU and memory while nothing happens.

    uv run python bench/agent_idle_bench.py [--quick] [--seconds N]

A central server (a process, SQLite) and one enrolled agent with the
default intervals. After the agent's first rounds settle, its CPU time
(user + system, from /proc) and resident memory are sampled over N seconds
(default 60).

Baseline, measured in the same run: a bare Python interpreter that imports
what the agent imports (aiohttp, pydantic, nacl) and sleeps, so the RSS
ratio says what the agent adds to the interpreter it cannot do without.

Figures (``figure=value unit``). Targets (issue 5): < 1 % CPU, <= 80 MB RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.system.harness import Agent, Central, wait_for

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def main(seconds: float, baseline: subprocess.Popen[bytes]) -> None:
    with tempfile.TemporaryDirectory(prefix="msp-idle-bench-") as scratch:
        root = Path(scratch)
        central = Central(root / "central")
        central.setup()
        central.start()
        agent = Agent(root / "agent", central, central.url)
        try:
            await central.ready()
            central.api(
                "POST", f"/api/v1/sites/{central.site_id}/apply-preset", {"preset": "healthcare"}
            )
            agent.write_config(l1_command=["/bin/true", "{action}"])
            agent.enroll()
            agent.start()
            await wait_for(
                lambda: agent.status().get("last_check_at"), within=60, what="a first check round"
            )
            await asyncio.sleep(5)  # the first round's deliveries settle
            assert agent.service.process is not None
            pid = agent.service.process.pid
            cpu_before, started = cpu_seconds(pid), time.monotonic()
            peak = 0.0
            while time.monotonic() - started < seconds:
                await asyncio.sleep(1)
                peak = max(peak, rss_mb(pid))
            cpu = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - started) * 100
            base_rss = rss_mb(baseline.pid)
        finally:
            if agent.service.running:
                agent.service.terminate()
            central.server.terminate()
    print(f"window={seconds:.0f} s")
    print(f"idle_cpu={cpu:.3f} %")
    print(f"rss_peak={peak:.1f} MB")
    print(f"baseline_rss={base_rss:.1f} MB (bare interpreter with the same imports)")
    print(f"ratio_rss_to_baseline={peak / base_rss:.2f}")
    print(f"targets_met={cpu < 1.0 and peak <= 80}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    args = parser.parse_args()
    baseline = subprocess.Popen(
        [sys.executable, "-c", "import aiohttp, pydantic, nacl.signing, time; time.sleep(600)"]
    )
    try:
        asyncio.run(main(5 if args.quick else args.seconds, baseline))
    finally:
        baseline.kill()
        baseline.wait()
