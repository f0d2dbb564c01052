"""Power cuts of the appliance in a qemu machine (see power_cut_soak.py for
what each cut checks). Two cuts at random instants; the seed is printed and
``MSP_POWER_CUT_SEED`` replays a run. ``python -m tests.systemd.power_cut_soak
--cuts N`` runs many."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd.power_cut_soak import PowerCutRun, summary

CUTS = 2


@pytest.fixture
def power_cut_run(tmp_path: Path) -> Iterator[PowerCutRun]:
    configured = os.environ.get("MSP_POWER_CUT_SEED")
    seed = int(configured) if configured else random.SystemRandom().randrange(1 << 32)
    print(f"power cuts: seed {seed} (MSP_POWER_CUT_SEED={seed} replays it)")
    run = PowerCutRun(tmp_path, seed)
    try:
        yield run
    finally:
        run.stop()
        print(run.central.server.output()[-2000:])  # shown by pytest only when the test fails


@pytest.mark.timeout(480)
def test_power_cuts(power_cut_run: PowerCutRun) -> None:
    run = power_cut_run
    started = time.monotonic()
    run.start()
    witnessed_at_start = run.witnessed()[1]
    for _ in range(CUTS):
        cut = run.cut()
        print(cut.line())
        assert not cut.failures, cut.line()
        # The cut was one: the file system was left mounted, never unmounted.
        assert "ext4 journal replayed" in cut.findings, cut.line()
    print(summary(run, time.monotonic() - started))
    # The agent kept working across the cuts: its log grew and was witnessed.
    assert run.witnessed()[1] > witnessed_at_start
