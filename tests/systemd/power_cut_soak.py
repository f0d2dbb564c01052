"""Power cuts of a real appliance: the agent's NixOS units in a qemu machine,
the central server a real process on the host, and ``kill -9`` of qemu at a
random (seeded, printed) instant while the agent appends, signs and syncs.

After each cut the machine boots again from the same disk and the run checks:

1. the agent starts by itself (``msp-agent.service`` active, nobody started it);
2. ``msp-agent audit verify`` passes, or the log was quarantined with its
   reason recorded (then the checks below read the quarantined file);
3. no entry the agent had reported committed before the cut is gone;
4. nothing the central server had witnessed is missing: for its witnessed
   (generation, size, root), the appliance's log holds the same leaves at
   every index below size and the same root;
5. no incident is lost: every escalation the appliance raised (in its log or
   its queue) is at the central server or still waiting in the queue, and
   every one the queue marks delivered is at the central server;
6. the central server raised no security alert about the appliance.

What recovery found is printed per cut: the ext4 journal replayed, SQLite
WAL frames left at boot (committed transactions replayed on open), entries
committed after the last look, entries the central server had witnessed but
the appliance had no receipt for (sent again), incidents still queued,
quarantines, restarts.

``uv run --locked python -m tests.systemd.power_cut_soak --cuts N [--seed S]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msp_protocol.encoding import parse_time
from msp_protocol.merkle import root_of
from tests.system.harness import Central
from tests.systemd.qemu import AT_BOOT, HOST_FROM_GUEST, Machine, MachineError, build_disk
from tests.systemd.units import install_appliance

STATE = "/var/lib/msp"
# Short intervals so a few seconds of work append, sign and sync; a state
# directory that never has "enough" free space keeps a critical check
# failing (an incident, then an L1 action and its entries every round).
SETTINGS: dict[str, Any] = {
    "check_interval_seconds": 4,
    "sync_interval_seconds": 2,
    "heartbeat_interval_seconds": 10,
    "bundle_refresh_seconds": 60,
    "request_timeout_seconds": 10,
    "disk_min_free_percent": 100,
}
# The cut falls this many seconds (uniform) after the agent is active again.
CUT_WINDOW = (1.0, 25.0)
ACTIVE_WITHIN = 240.0

# Read by the image's Python as the agent's user: the state as the agent
# sees it, or (argument "at-boot") the copy taken before it started.
INSPECT = r"""
import glob, json, os, sqlite3, sys

def query(path, sql):
    # The live files read-only beside the agent; the copy made at boot as
    # they are (opening it replays its WAL into the copy).
    connection = sqlite3.connect(f"file:{path}{MODE}", uri=True)
    try:
        connection.execute("PRAGMA busy_timeout = 10000")
        return connection.execute(sql).fetchall()
    finally:
        connection.close()

def audit(path):
    rows = query(path, "SELECT idx, raw, leaf FROM entries ORDER BY idx")
    kinds, escalations, quarantines = [], [], []
    for _idx, raw, _leaf in rows:
        entry = json.loads(raw)
        kinds.append(entry["kind"])
        if entry["kind"] == "escalation.raised":
            escalations.append(entry["data"]["escalation_id"])
        if entry["kind"] == "audit.quarantined":
            quarantines.append(entry["data"])
    (receipt,) = query(path, "SELECT COALESCE(MAX(size), 0) FROM receipts")[0]
    return {
        "size": len(rows),
        "contiguous": [r[0] for r in rows] == list(range(len(rows))),
        "leaves": [bytes(r[2]).hex() for r in rows],
        "receipt_size": receipt,
        "escalations": escalations,
        "quarantines": quarantines,
        "l1_actions": kinds.count("l1.action"),
        "evidence": kinds.count("evidence.signed"),
    }

def wal_frames(path):
    try:
        size = os.path.getsize(path + "-wal")
    except OSError:
        return 0
    if size <= 32:
        return 0
    (page,) = query(path, "PRAGMA page_size")[0]
    return (size - 32) // (page + 24)

directory = sys.argv[1]
MODE = "?mode=ro" if sys.argv[2] == "live" else ""
audit_db = os.path.join(directory, "audit.sqlite")
urgent_db = os.path.join(directory, "urgent.sqlite")
report = {"present": os.path.exists(audit_db)}
if report["present"]:
    # WAL frames first: opening the database replays them.
    report["wal"] = {name: wal_frames(os.path.join(directory, name))
                     for name in ("audit.sqlite", "urgent.sqlite", "sms.sqlite")}
    report["audit"] = audit(audit_db)
    report["corrupt"] = sorted(os.path.basename(p) for p in glob.glob(audit_db + ".corrupt-*")
                               if not p.endswith(("-wal", "-shm")))
    report["quarantined"] = [audit(os.path.join(directory, name)) for name in report["corrupt"]]
    report["incidents"] = [
        {"id": i, "delivered": d is not None, "failed": f,
         "title": json.loads(e)["title"], "created_at": json.loads(e)["created_at"]}
        for i, d, f, e in (query(urgent_db, "SELECT escalation_id, delivered_at, failed, escalation"
                                 " FROM incidents") if os.path.exists(urgent_db) else [])
    ]
    try:
        with open(os.path.join(directory, "check-results.json")) as results:
            report["results"] = json.load(results)
    except (OSError, ValueError):
        report["results"] = None
print(json.dumps(report))
"""


class PowerCutFailure(AssertionError):
    """A check after a power cut failed; the message says which and why."""


@dataclass
class Cut:
    number: int
    after_seconds: float
    boot_seconds: float = 0.0
    active_seconds: float = 0.0
    findings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        verdict = "ok" if not self.failures else "FAIL " + "; ".join(self.failures)
        return (
            f"cut {self.number:3d}: at +{self.after_seconds:5.1f} s, boot {self.boot_seconds:5.1f} s,"
            f" agent active {self.active_seconds:5.1f} s later | {', '.join(self.findings)} | {verdict}"
        )


class PowerCutRun:
    """A central server on the host, one qemu appliance, and its power cuts."""

    def __init__(self, directory: Path, seed: int) -> None:
        self.directory = directory
        self.seed = seed
        self.random = random.Random(seed)
        self.central = Central(directory / "central")
        self.machine: Machine | None = None
        self.appliance_id = ""
        self.cuts: list[Cut] = []
        self.first_boot_seconds = 0.0
        self._last_status: dict[str, Any] = {}

    # --- setup ---------------------------------------------------------------------------

    def start(self) -> None:
        """Central server up, disk built with the agent's units, first boot,
        the agent enrolled through its credential and witnessed once."""
        self.central.setup()
        self.central.start()
        asyncio.run(self.central.ready())
        self.central.api(
            "POST", f"/api/v1/sites/{self.central.site_id}/apply-preset", {"preset": "healthcare"}
        )
        token = self.central.token()
        disk = build_disk(
            self.directory,
            lambda root: install_appliance(
                root,
                # qemu's user-mode network reaches the host's loopback here.
                central_url=f"http://{HOST_FROM_GUEST}:{self.central.port}",
                central_public_key=self.central.public_key,
                enrollment_token=token,
                extra_settings=SETTINGS,
            ),
        )
        self.machine = Machine(self.directory, disk)
        self.first_boot_seconds = self.machine.boot()
        self._wait_active()
        status = self._wait_status(
            lambda s: s.get("appliance_id") and s.get("witnessed_size", 0) > 0,
            "the agent to enroll and be witnessed",
        )
        self.appliance_id = str(status["appliance_id"])

    def stop(self) -> None:
        if self.machine is not None:
            self.machine.shutdown()
        if self.central.server.running:
            self.central.server.terminate()

    # --- one cut -------------------------------------------------------------------------

    def cut(self) -> Cut:
        machine = self._machine()
        number = len(self.cuts) + 1
        cut = Cut(number, round(self.random.uniform(*CUT_WINDOW), 1))
        # A check that starts failing now: a fresh incident in flight.
        machine.succeed(
            "systemd-run", "--no-block", f"--unit=msp-test-incident-{number}", "/bin/false"
        )
        alerts_before = len(self.central.alerts(self.appliance_id))
        deadline = time.monotonic() + cut.after_seconds
        while time.monotonic() < deadline:
            status = self._status()
            if status:
                self._last_status = status
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        machine.power_cut()
        last_seen = int(self._last_status.get("log_size", 0))
        witnessed = self.witnessed()

        cut.boot_seconds = machine.boot()
        if "recovery complete" in machine.console_since_boot():
            cut.findings.append("ext4 journal replayed")
        started = time.monotonic()
        self._check(cut, self._wait_active, "agent did not start by itself")
        cut.active_seconds = time.monotonic() - started
        at_boot = self._inspect(AT_BOOT)
        self._recovery_findings(cut, at_boot, last_seen, witnessed)
        # The agent has had its chance to resync: then everything must hold.
        self._check(
            cut,
            lambda: self._wait_status(
                lambda s: s.get("witnessed_size", 0) >= witnessed[1] and s.get("link") == "online",
                "the agent to catch up with what the central server witnessed",
            ),
            "agent did not resync",
        )
        # The log as the cut left it, before the agent opened it.
        self._check(cut, lambda: self._verify(cut, AT_BOOT), "audit verify at boot")
        # And after recovery and resync, on a consistent snapshot of the live
        # file (see _verify_live for why not the live file itself).
        self._check(cut, lambda: self._verify(cut, self._snapshot()), "audit verify")
        self._verify_live(cut)
        # The central server first: the appliance's log only grows meanwhile.
        witnessed_now = self.witnessed()
        now = self._inspect(STATE)
        if witnessed_now[:2] < witnessed[:2]:
            cut.failures.append(
                f"central's witnessed log went back: {witnessed} -> {witnessed_now}"
            )
        self._check(cut, lambda: self._check_witnessed(now, witnessed_now), "witnessed")
        self._check(cut, lambda: self._check_incidents(now), "incidents")
        self._check(cut, lambda: self._check_decided(at_boot, now), "incidents")
        alerts = self.central.alerts(self.appliance_id)[alerts_before:]
        if alerts:
            cut.failures.append(f"central security alerts: {', '.join(alerts)}")
        restarts = machine.succeed(
            "systemctl", "show", "msp-agent.service", "-p", "NRestarts", "--value"
        ).strip()
        if restarts not in ("", "0"):
            cut.findings.append(f"agent restarted {restarts}x")
        self.cuts.append(cut)
        return cut

    # --- what recovery found -------------------------------------------------------------

    def _recovery_findings(
        self, cut: Cut, at_boot: dict[str, Any], last_seen: int, witnessed: tuple[int, int, str]
    ) -> None:
        if not at_boot.get("present"):
            cut.failures.append("no audit log at boot")
            return
        wal = {name: frames for name, frames in at_boot["wal"].items() if frames}
        if wal:
            cut.findings.append(
                "WAL at boot " + " ".join(f"{n.split('.')[0]}:{f}" for n, f in wal.items())
            )
        size = int(at_boot["audit"]["size"])
        # (3) status.json reports only committed (fsynced) entries.
        if size < last_seen:
            cut.failures.append(
                f"committed entries lost: log {size} at boot < {last_seen} reported"
            )
        cut.findings.append(f"log {size} (+{size - last_seen} since last look)")
        receipt = int(at_boot["audit"]["receipt_size"])
        if witnessed[1] > receipt:
            cut.findings.append(f"{witnessed[1] - receipt} witnessed without receipt: re-sent")
        waiting = [i for i in at_boot["incidents"] if not i["delivered"] and not i["failed"]]
        if waiting:
            cut.findings.append(f"{len(waiting)} incident(s) queued")
        if at_boot["corrupt"]:
            cut.findings.append(f"quarantined earlier: {', '.join(at_boot['corrupt'])}")

    def _verify(self, cut: Cut, directory: str) -> None:
        """``msp-agent audit verify`` of the state in ``directory`` (a copy
        of the agent's), as the agent's user."""
        machine = self._machine()
        machine.succeed("chown", "-R", "msp:msp", directory)
        result = machine.run(
            [
                "runuser", "-u", "msp", "--",
                "env", f"MSP_AGENT_STATE_DIR={directory}", "msp-agent", "audit", "verify",
            ]
        )  # fmt: skip
        if result.rc == 0:
            return
        problem = (result.stderr or result.stdout).strip().splitlines()[-1]
        # A damaged log is quarantined by the agent, the reason recorded.
        quarantines = self._inspect(STATE).get("audit", {}).get("quarantines", [])
        if quarantines:
            cut.findings.append(f"QUARANTINED: {quarantines[-1]['reason'][:120]}")
            return
        raise PowerCutFailure(problem)

    def _snapshot(self) -> str:
        """A consistent copy of the live state (SQLite's backup API for the
        audit log) under /run; returns its path."""
        directory = "/run/msp-test/now"
        self._machine().shell(
            f"rm -rf {directory} && cp -a {STATE} {directory}"
            f" && rm -f {directory}/audit.sqlite {directory}/audit.sqlite-wal"
            f" {directory}/audit.sqlite-shm"
        )
        self._machine().succeed(
            "runuser", "-u", "msp", "--", "/opt/msp/bin/python", "-c",
            "import sqlite3, sys\n"
            "source = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True)\n"
            "target = sqlite3.connect(sys.argv[2])\n"
            "source.backup(target)\n"
            "target.close()\n",
            f"{STATE}/audit.sqlite", f"{directory}/audit.sqlite",
        )  # fmt: skip
        return directory

    def _verify_live(self, cut: Cut) -> None:
        """``msp-agent audit verify`` on the live file, beside the running
        agent, as an operator runs it: it reads one snapshot, so it must
        pass while the agent appends."""
        result = self._machine().run(["runuser", "-u", "msp", "--", "msp-agent", "audit", "verify"])
        if result.rc != 0:
            problem = (result.stderr or result.stdout).strip().splitlines()[-1]
            raise PowerCutFailure(
                f"cut {cut.number}: audit verify on the live log: {problem[:200]}"
            )

    def _check_witnessed(self, now: dict[str, Any], witnessed: tuple[int, int, str]) -> None:
        generation, size, root = witnessed
        logs = [now["audit"], *now["quarantined"]]
        leaf_rows = self.central.query(
            "SELECT idx, leaf_hash FROM audit_entries WHERE appliance_id = ? AND generation = ?"
            " AND idx < ? ORDER BY idx",
            self.appliance_id,
            generation,
            size,
        )
        central_leaves = [bytes(leaf).hex() for _, leaf in leaf_rows]
        # Every witnessed index stored, once.
        if [int(i) for i, _ in leaf_rows] != list(range(size)):
            raise PowerCutFailure(
                f"central holds {len(leaf_rows)} entries for witnessed size {size}"
            )
        # The log the central server witnesses is the current one, or the
        # one a quarantine moved aside (then the new one needs approval).
        for log in logs:
            leaves = log["leaves"]
            if len(leaves) < size:
                continue
            if not log["contiguous"]:
                raise PowerCutFailure("appliance log has a gap in its indices")
            if leaves[:size] != central_leaves[:size]:
                first = next(
                    i
                    for i, (a, b) in enumerate(zip(leaves, central_leaves, strict=False))
                    if a != b
                )
                raise PowerCutFailure(f"appliance entry {first} differs from the witnessed one")
            if root_of([bytes.fromhex(leaf) for leaf in leaves[:size]]).hex() != root:
                raise PowerCutFailure(f"appliance root at {size} is not the witnessed root")
            return
        sizes = ", ".join(str(len(log["leaves"])) for log in logs)
        raise PowerCutFailure(f"witnessed size {size} but the appliance's log(s) hold {sizes}")

    def _check_incidents(self, now: dict[str, Any]) -> None:
        at_central = {
            str(e)
            for (e,) in self.central.query(
                "SELECT escalation_id FROM escalations WHERE appliance_id = ?", self.appliance_id
            )
        }
        incidents = {i["id"]: i for i in now["incidents"]}
        for incident in incidents.values():
            if incident["delivered"] and incident["id"] not in at_central:
                raise PowerCutFailure(f"incident {incident['id']} delivered but not at the central")
            if incident["failed"]:
                raise PowerCutFailure(f"incident {incident['id']} failed: {incident['failed']}")
        for escalation in now["audit"]["escalations"]:
            if escalation not in at_central and escalation not in incidents:
                raise PowerCutFailure(
                    f"incident {escalation} is in the log but neither queued nor sent"
                )
        if not (at_central or incidents):
            raise PowerCutFailure("no incident raised at all: the load is not what it should be")

    def _check_decided(self, at_boot: dict[str, Any], now: dict[str, Any]) -> None:
        """A check the agent had recorded as failing (check-results.json,
        saved before the incident is queued) has its incident: raised at or
        after the failure began, at the central server or still queued."""
        records = (at_boot.get("results") or {}).get("checks") or {}
        raised = [(i["title"], i["created_at"]) for i in now["incidents"]]
        for (document,) in self.central.query(
            "SELECT document FROM escalations WHERE appliance_id = ?", self.appliance_id
        ):
            body = document if isinstance(document, dict) else json.loads(document)
            raised.append((body["title"], body["created_at"]))
        for runbook, record in records.items():
            if record.get("result") != "fail" or not record.get("since"):
                continue
            since = parse_time(record["since"])
            if not any(
                title == f"Check failed: {runbook}" and parse_time(created) >= since
                for title, created in raised
            ):
                raise PowerCutFailure(
                    f"{runbook} failing since {record['since']} but no incident raised for it"
                )

    # --- helpers -------------------------------------------------------------------------

    def _machine(self) -> Machine:
        if self.machine is None:
            raise MachineError("the run has not started")
        return self.machine

    def _check(self, cut: Cut, step: Any, what: str) -> None:
        try:
            step()
        except (PowerCutFailure, MachineError) as exc:
            cut.failures.append(f"{what}: {exc}")

    def _wait_active(self) -> None:
        self._machine().wait_until(
            ["systemctl", "is-active", "msp-agent.service"],
            within=ACTIVE_WITHIN,
            what="msp-agent.service to be active",
        )

    def _status(self) -> dict[str, Any]:
        result = self._machine().run(["cat", f"{STATE}/status.json"], timeout=20)
        try:
            return dict(json.loads(result.stdout)) if result.rc == 0 else {}
        except ValueError:
            return {}

    def _wait_status(self, predicate: Any, what: str, within: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            status = self._status()
            if status and predicate(status):
                self._last_status = status
                return status
            if time.monotonic() > deadline:
                raise MachineError(f"timed out after {within:.0f} s waiting for {what}")
            time.sleep(1)

    def _inspect(self, directory: str) -> dict[str, Any]:
        user = ["runuser", "-u", "msp", "--"] if directory == STATE else []
        output = self._machine().succeed(
            *user,
            "/opt/msp/bin/python",
            "-c",
            INSPECT,
            directory,
            "live" if directory == STATE else "copy",
            timeout=120,
        )
        return dict(json.loads(output))

    def witnessed(self) -> tuple[int, int, str]:
        rows = self.central.query(
            "SELECT generation, size, root FROM audit_logs WHERE appliance_id = ?",
            self.appliance_id,
        )
        if not rows:
            return (1, 0, "")
        generation, size, root = rows[0]
        return int(generation), int(size), str(root)


def summary(run: PowerCutRun, elapsed: float) -> str:
    cuts = run.cuts
    failed = [c for c in cuts if c.failures]
    boots = [c.boot_seconds for c in cuts]
    counts: dict[str, int] = {}
    for cut in cuts:
        for finding in cut.findings:
            key = finding.split(" (")[0] if finding.startswith("log ") else finding
            key = "log grew" if key.startswith("log ") else key
            key = key.split(":")[0] if key.startswith(("WAL", "QUARANTINED", "live")) else key
            key = "re-sent" if key.endswith("re-sent") else key
            counts[key] = counts.get(key, 0) + 1
    found = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()) if k != "log grew")
    return (
        f"seed {run.seed}: {len(cuts)} cuts, {len(failed)} failed; first boot "
        f"{run.first_boot_seconds:.1f} s, reboot {min(boots, default=0):.1f}-"
        f"{max(boots, default=0):.1f} s (mean {sum(boots) / max(1, len(boots)):.1f}); "
        f"{elapsed / max(1, len(cuts)):.1f} s per cut, {elapsed:.0f} s in all; found: {found or 'nothing'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuts", type=int, required=True)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    directory = Path(tempfile.mkdtemp(prefix="msp-power-cut-"))
    print(f"seed {seed}, directory {directory}", flush=True)
    run = PowerCutRun(directory, seed)
    started = time.monotonic()
    try:
        run.start()
        print(
            f"first boot {run.first_boot_seconds:.1f} s; appliance {run.appliance_id}", flush=True
        )
        for _ in range(args.cuts):
            print(run.cut().line(), flush=True)
    finally:
        run.stop()
        print(summary(run, time.monotonic() - started), flush=True)
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    return 1 if any(c.failures for c in run.cuts) else 0


if __name__ == "__main__":
    sys.exit(main())
