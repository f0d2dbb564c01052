"""The README's run command, as a newcomer runs it: ``msp-central demo``
starts a server and enrolled agents as processes, prints where to look, and
stops everything on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.system.harness import ROOT, free_port, wait_for


async def test_the_demo_runs_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    output = tmp_path / "demo.out"
    with output.open("wb") as out:
        demo = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "msp_central",
                "demo",
                "--dir",
                str(tmp_path / "demo"),
                "--port",
                str(port),
                "--agents",
                "2",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        await wait_for(
            lambda: b"Ctrl-C stops everything" in output.read_bytes(),
            within=60,
            what="the demo's guide",
        )
        guide = output.read_text()
        assert f"http://127.0.0.1:{port}" in guide
        assert "partner API key   mspk_" in guide

        def witnessed(number: int) -> bool:
            try:
                status = json.loads(
                    (tmp_path / "demo" / f"agent-{number}" / "state" / "status.json").read_text()
                )
            except (OSError, ValueError):
                return False
            return bool(status.get("last_check_at")) and status.get("witnessed_size", 0) > 2

        for number in (1, 2):
            await wait_for(
                lambda n=number: witnessed(n), within=60, what=f"agent {number} witnessed"
            )
        agents = [
            int(
                json.loads(
                    (tmp_path / "demo" / f"agent-{n}" / "state" / "status.json").read_text()
                )["pid"]
            )
            for n in (1, 2)
        ]
    finally:
        started = time.monotonic()
        demo.send_signal(signal.SIGINT)
        status = demo.wait(30)
    assert status == 0, output.read_text()[-3000:]
    assert time.monotonic() - started < 20
    assert "stopped." in output.read_text()
    for pid in agents:  # no agent left behind
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"agent process {pid} still running after the demo stopped")
