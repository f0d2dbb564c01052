"""Soak the crash-safety check: many more kills than the test suite runs.

    uv run python -m tests.agent.soak_crash --kills 5000 [--seed N]

Prints ``kills=… kills_after_acks=… acknowledged_operations_checked=…``;
exits non-zero, naming what was lost, if anything acknowledged is missing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.agent.crash import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument(
        "--dir", type=Path, help="where to keep the state (default: a temporary one)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="msp-crash-") as scratch:
        started = time.monotonic()
        report = run(args.dir or Path(scratch), args.kills, args.seed)
        elapsed = time.monotonic() - started
    print(
        f"kills={report.kills} kills_after_acks={report.kills_after_acks} "
        f"acknowledged_operations_checked={report.acknowledged} seed={args.seed}"
    )
    print(f"elapsed={elapsed:.1f} s")


if __name__ == "__main__":
    main()
