"""Crash safety: a child appending audit entries, signing evidence and raising
incidents is killed with SIGKILL at random instants; after each kill, every
operation the child reported as acknowledged must be on disk and the log must
verify.

The test suite runs 200 kills (tests/agent/test_crash.py). For a longer soak:

    uv run python -m tests.agent.soak_crash --kills 5000
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from msp_agent.keys import DelegatedSigningKey
from msp_agent.manager import LocalResilienceManager
from msp_protocol.encoding import utc_now
from msp_protocol.log import parse_entry
from tests.agent.support import APPLIANCE, CENTRAL, SITE, enrolled_key

PRODUCERS = 8
KILLS_PER_STATE = 20


def child_main(state: str, acks: str, tag: str) -> None:
    """Runs in the child process until it is killed."""
    asyncio.run(_produce(Path(state), acks, tag))


async def _produce(state: Path, acks: str, tag: str) -> None:
    signer = DelegatedSigningKey.load_or_create(state / "keys", central_keys=[CENTRAL.verify_key])
    manager = await LocalResilienceManager.open(
        state,
        appliance_id=APPLIANCE,
        site_id=SITE,
        signer=signer,
        central_keys=[CENTRAL.verify_key],
    )
    fd = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    (state / f"ready-{tag}").touch()

    async def producer(p: int) -> None:
        n = 0
        while True:
            name = f"{tag}-{p}-{n}"
            if n % 3 == 0:
                appended = await manager.log_l1_action(
                    "act", runbook="r", result="ok", detail={"id": name}
                )
                line = f"audit {appended.index} {name}"
            elif n % 3 == 1:
                signed = await manager.sign_evidence(
                    bundle_id=f"ev-{name}",
                    check_id="crash-test",
                    controls={"cis": ["8.2"]},
                    result="pass",
                    observed={"id": name},
                )
                line = f"evidence {signed.log_index} ev-{name}"
            else:
                incident = await manager.escalate_to_cloud(
                    title="crash test", escalation_id=f"inc-{name}"
                )
                line = f"incident 0 {incident.escalation_id}"
            # One write of one short line: it reaches the kernel whole or not at all.
            os.write(fd, (line + "\n").encode())
            n += 1

    await asyncio.gather(*(producer(p) for p in range(PRODUCERS)))


@dataclass
class CrashReport:
    kills: int = 0
    kills_after_acks: int = 0  # kills that landed after the child acknowledged something
    acknowledged: int = 0
    checked_states: int = 0


def run(base: Path, kills: int, seed: int = 0) -> CrashReport:
    """Kill a producing child ``kills`` times; after every kill check that
    everything acknowledged survived. Raises AssertionError naming what is lost."""
    rng = random.Random(seed)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.agent.crash"])
    report = CrashReport()
    for kill in range(kills):
        state = base / f"state-{kill // KILLS_PER_STATE}"
        if not (state / "keys").exists():
            enrolled_key(state / "keys", clock=utc_now)
        acks = state / "acks.txt"
        before = len(_read_acks(acks))
        tag = f"k{kill}"
        child = context.Process(target=child_main, args=(str(state), str(acks), tag))
        child.start()
        if rng.random() < 0.1:
            # Now and then, kill while the child is still opening and
            # reconciling what the previous kill left.
            time.sleep(rng.uniform(0.0, 0.05))
        else:
            _wait_for(state / f"ready-{tag}", child)
            time.sleep(rng.uniform(0.0, 0.12))
        if child.pid is not None:
            os.kill(child.pid, signal.SIGKILL)
        child.join()
        report.kills += 1
        acknowledged = _read_acks(acks)
        report.kills_after_acks += len(acknowledged) > before
        asyncio.run(_check(state, acknowledged))
        report.acknowledged = sum(
            len(_read_acks(s / "acks.txt")) for s in base.iterdir() if (s / "acks.txt").exists()
        )
    report.checked_states = len(list(base.iterdir()))
    return report


def _wait_for(marker: Path, child: multiprocessing.process.BaseProcess) -> None:
    deadline = time.monotonic() + 30
    while not marker.exists():
        if not child.is_alive():
            raise AssertionError(f"the child died before it was ready (exit code {child.exitcode})")
        if time.monotonic() > deadline:
            raise AssertionError("the child did not get ready within 30 s")
        time.sleep(0.002)


def _read_acks(path: Path) -> list[tuple[str, int, str]]:
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    acknowledged = []
    for line in lines[:-1]:  # the last piece is empty or a line cut by the kill
        kind, index, name = line.decode().split(" ")
        acknowledged.append((kind, int(index), name))
    return acknowledged


async def _check(state: Path, acknowledged: list[tuple[str, int, str]]) -> None:
    signer = DelegatedSigningKey.load_or_create(state / "keys", central_keys=[CENTRAL.verify_key])
    manager = await LocalResilienceManager.open(
        state,
        appliance_id=APPLIANCE,
        site_id=SITE,
        signer=signer,
        central_keys=[CENTRAL.verify_key],
    )
    try:
        assert manager.trail.quarantine is None, (
            f"the audit database was damaged: {manager.trail.quarantine}"
        )
        verification = await manager.trail.verify()
        assert verification.ok, f"log does not verify after a kill: {verification.describe()}"
        raws = await manager.trail.entries(0, manager.trail.size)
        bundles = await manager.trail.store.run(
            lambda c: dict(c.execute("SELECT bundle_id, log_index FROM evidence").fetchall())
        )
        incidents = set(
            await manager.urgent._store.run(
                lambda c: [row[0] for row in c.execute("SELECT escalation_id FROM incidents")]
            )
        )
        for kind, index, name in acknowledged:
            if kind == "audit":
                assert index < len(raws), f"acknowledged entry {index} ({name}) is gone"
                entry = parse_entry(raws[index]).entry
                assert entry.data.get("detail", {}).get("id") == name, (
                    f"entry {index} is not {name}"
                )
            elif kind == "evidence":
                assert bundles.get(name) == index, f"acknowledged bundle {name} is gone"
                entry = parse_entry(raws[index]).entry
                assert entry.kind == "evidence.signed"
                assert entry.data["bundle_id"] == name
            else:
                assert name in incidents, f"acknowledged incident {name} is gone"
        assert await manager.urgent.unlogged() == []
    finally:
        await manager.close()
