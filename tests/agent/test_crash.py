"""kill -9 at random instants loses nothing acknowledged (see tests/agent/crash.py).

The kills run in a separate process (the soak script with 200 kills): its
children are forked from a clean forkserver, fast and without the test
runner's state.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_200_kills_lose_nothing_acknowledged(tmp_path: Path) -> None:
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.agent.soak_crash",
            "--kills",
            "200",
            "--seed",
            "20261125",
            "--dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=850,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    figures = dict(part.split("=") for part in finished.stdout.split() if "=" in part)
    assert figures["kills"] == "200"
    # The kills must land while work is being acknowledged, not only at start-up.
    assert int(figures["kills_after_acks"]) > 150
    assert int(figures["acknowledged_operations_checked"]) > 2_000
