"""Scenario 1, offline mode (tests/nixos/offline-mode.nix runs it in VMs).

The link to the central server goes black (packets vanish, nothing answers)
while the agent works: checks keep running, the audit log grows, evidence
and a critical incident queue up, and the SMS fallback texts the on-call
number exactly once. When the link returns, everything reaches the server
within seconds, not after a backoff cap; nothing is missing or stored twice.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from tests.agent.fake_twilio import FakeTwilio
from tests.system.conftest import ON_CALL, twilio_settings
from tests.system.harness import Agent, Central, wait_for
from tests.system.proxy import ProxyProcess

# Long enough that only the wake-up on recovery can deliver within the bound
# below: neither the sync interval nor the backoff cap (64 s) would.
SYNC_INTERVAL = 120
RECOVERY_BOUND = 30


async def test_offline_mode(
    central: Central, proxy: ProxyProcess, twilio: tuple[FakeTwilio, str], tmp_path: Path
) -> None:
    fake, twilio_url = twilio
    agent = Agent(tmp_path / "agent", central, f"http://127.0.0.1:{proxy.port}")
    agent.write_config(
        check_interval_seconds=2,
        sync_interval_seconds=SYNC_INTERVAL,
        heartbeat_interval_seconds=SYNC_INTERVAL,
        bundle_refresh_seconds=SYNC_INTERVAL,
        request_timeout_seconds=3,
        sms_after_seconds=3,
        # The L1 action runs (a real command) but frees nothing.
        l1_command=["/bin/sh", "-c", "echo would free space; exit 1", "{action}"],
        **twilio_settings(fake, twilio_url, tmp_path / "secrets"),
    )
    agent.enroll()
    agent.start()
    try:
        # Online: the first checks are evidence and everything is witnessed.
        status = await agent.until(
            lambda s: s.get("last_check_at") and s.get("link") == "online", "a first check round"
        )
        appliance = status["appliance_id"]
        await agent.until(
            lambda s: s["witnessed_size"] >= status["log_size"], "the first round to be witnessed"
        )

        # The link goes black; the agent restarts into a site whose state
        # directory has "no space" (the threshold says so): a critical check.
        proxy.control.set_mode("blackhole")
        assert agent.service.terminate() < 5  # SIGTERM: clean and quick
        agent.write_config(disk_min_free_percent=100)
        agent.start()
        offline = await agent.until(
            lambda s: (
                s.get("link") == "offline"
                and s.get("urgent_waiting", 0) >= 1
                and s.get("evidence_queued", 0) >= 5
            ),
            "evidence and an incident queued offline",
        )
        await wait_for(lambda: fake.sent_to(ON_CALL), within=30, what="the SMS fallback")
        grown = await agent.until(
            lambda s: s["log_size"] > offline["log_size"] + 10, "the log to keep growing"
        )
        assert grown["witnessed_size"] < grown["log_size"]
        kinds = agent.kinds()
        assert "l1.action" in kinds
        assert "escalation.raised" in kinds
        incidents = [
            json.loads(raw)["data"]["escalation_id"]
            for raw in agent.entries()
            if json.loads(raw)["kind"] == "escalation.raised"
        ]

        # The link returns: everything queued reaches the server within seconds.
        backlog = agent.status()
        proxy.control.set_mode("pass")
        returned = time.monotonic()
        await agent.until(
            lambda s: s["witnessed_size"] >= backlog["log_size"] and s["urgent_waiting"] == 0,
            "the backlog to reach the server",
            within=RECOVERY_BOUND,
        )
        queued_offline = evidence_ids(agent.entries()[: backlog["log_size"]])
        await wait_for(
            lambda: queued_offline <= server_evidence(central, appliance),
            within=RECOVERY_BOUND,
            what="the evidence queued offline to reach the server",
        )
        recovery = time.monotonic() - returned
        print(f"offline backlog of {backlog['log_size']} entries delivered in {recovery:.1f} s")
        assert recovery < RECOVERY_BOUND

        # One text, however long the incident waited and however often the
        # urgent queue retried.
        await asyncio.sleep(4)
        assert len(fake.sent_to(ON_CALL)) == 1
        assert "[ref:" in fake.sent_to(ON_CALL)[0]["body"]
    finally:
        agent.service.terminate()

    # Nothing missing, nothing twice: the server holds exactly the agent's
    # bytes for every index it witnessed, and every incident once.
    entries = agent.entries()
    size = central.witnessed_size(appliance)
    assert size >= backlog["log_size"]
    assert central.entry_count(appliance) == size
    stored = central.query(
        "SELECT idx, raw FROM audit_entries WHERE appliance_id = ? ORDER BY idx", appliance
    )
    assert [int(i) for i, _ in stored] == list(range(size))
    assert [bytes(raw) for _, raw in stored] == entries[:size]
    escalations = central.query(
        "SELECT escalation_id FROM escalations WHERE appliance_id = ?", appliance
    )
    assert set(incidents) <= {e for (e,) in escalations}
    assert evidence_ids(entries[:size]) <= server_evidence(central, appliance)
    evidence_rows = central.query(
        "SELECT COUNT(*), COUNT(DISTINCT bundle_id) FROM evidence WHERE appliance_id = ?", appliance
    )
    assert evidence_rows[0][0] == evidence_rows[0][1] > 0
    assert central.alerts(appliance) == []
    # The heartbeat tells the server the check interval posture judges staleness by.
    (heartbeat,) = central.query("SELECT heartbeat FROM appliances WHERE id = ?", appliance)
    assert json.loads(heartbeat[0])["check_interval_seconds"] == 2


def evidence_ids(entries: list[bytes]) -> set[str]:
    return {
        json.loads(raw)["data"]["bundle_id"]
        for raw in entries
        if json.loads(raw)["kind"] == "evidence.signed"
    }


def server_evidence(central: Central, appliance: str) -> set[str]:
    rows = central.query("SELECT bundle_id FROM evidence WHERE appliance_id = ?", appliance)
    return {str(bundle_id) for (bundle_id,) in rows}
