"""Scenario 3, audit resync (tests/nixos/audit-resync.nix runs it in VMs).

A backlog crosses a link that is cut mid-batch, a server that is killed
(``kill -9``) and restarted mid-sync, and an agent killed mid-sync: the
server ends with exactly the agent's log, each entry once. Then the
appliance's SQLite file is edited while the agent is stopped: a changed row
is refused by the server with a security alert; a cut-off tail is found by
``msp-agent audit verify`` and at start (the file is set aside and a new log
begun, which the server then refuses as a rewrite). Either way the agent
reports it and keeps running and logging; once the partner approves the new
log, the agent syncs it without a restart.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path

from tests.system.harness import Agent, Central, wait_for
from tests.system.proxy import ProxyProcess

BACKLOG = 5_000


def quiet_agent(agent: Agent) -> None:
    agent.write_config(
        check_interval_seconds=3600,
        sync_interval_seconds=1,
        heartbeat_interval_seconds=3600,
        bundle_refresh_seconds=3600,
        request_timeout_seconds=5,
        l1_command=["/bin/true", "{action}"],
    )


async def witnessed_then_stopped(
    central: Central, proxy: ProxyProcess, tmp_path: Path, *, backlog: int
) -> tuple[Agent, str]:
    """An enrolled agent whose backlog the server witnessed, now stopped."""
    agent = Agent(tmp_path / "agent", central, f"http://127.0.0.1:{proxy.port}")
    quiet_agent(agent)
    agent.enroll()
    await agent.append_backlog(backlog)
    agent.start()
    status = await agent.until(
        lambda s: s.get("log_size") and s["witnessed_size"] == s["log_size"], "a witnessed log"
    )
    agent.service.terminate()
    return agent, str(status["appliance_id"])


async def test_resync_survives_cuts_and_kills(
    central: Central, proxy: ProxyProcess, tmp_path: Path
) -> None:
    agent = Agent(tmp_path / "agent", central, f"http://127.0.0.1:{proxy.port}")
    quiet_agent(agent)
    agent.enroll()
    size = await agent.append_backlog(BACKLOG)
    appliance = _appliance(agent)

    # (1) The first batch is cut mid-request; then the link is slow enough
    # that the sync takes a while.
    proxy.control.set_mode("cut", after_bytes=150_000, direction="up", times=1)
    agent.start()
    try:
        await wait_for(lambda: proxy.control.stats()["cuts"] >= 1, within=30, what="a cut")
        proxy.control.set_mode("slow", bytes_per_second=400_000)

        # (2) kill -9 the server mid-sync, start it again.
        await wait_for(
            lambda: 0 < central.witnessed_size(appliance) < size,
            within=60,
            what="a partial sync",
            interval=0.05,
        )
        central.server.kill()
        central.start()
        await central.ready()

        # (3) kill -9 the agent mid-sync, start it again.
        witnessed = central.witnessed_size(appliance)
        await wait_for(
            lambda: witnessed < central.witnessed_size(appliance) < size,
            within=60,
            what="more of the sync",
            interval=0.05,
        )
        agent.service.kill()
        agent.start()
        proxy.control.set_mode("pass")
        await agent.until(
            lambda s: s.get("witnessed_size", 0) >= size + 1, "the whole backlog", within=60
        )
    finally:
        agent.service.terminate()
    final = central.witnessed_size(appliance)
    entries = agent.entries()
    assert central.entry_count(appliance) == final
    stored = central.query(
        "SELECT raw FROM audit_entries WHERE appliance_id = ? ORDER BY idx", appliance
    )
    assert [bytes(raw) for (raw,) in stored] == entries[:final]
    assert central.alerts(appliance) == []


async def test_tampering_is_refused_and_reported(
    central: Central, proxy: ProxyProcess, tmp_path: Path
) -> None:
    agent, appliance = await witnessed_then_stopped(central, proxy, tmp_path, backlog=50)

    # Offline, the appliance logs more; then someone edits one of those rows
    # in the SQLite file (the entry's bytes, keeping its stored hashes).
    witnessed = central.witnessed_size(appliance)
    size = await agent.append_backlog(20)
    target = witnessed + 5
    database = sqlite3.connect(agent.state_dir / "audit.sqlite")
    with database:
        (raw,) = database.execute("SELECT raw FROM entries WHERE idx = ?", (target,)).fetchone()
        forged = bytes(raw).replace(b'"n":5', b'"n":6')
        assert forged != raw
        database.execute("UPDATE entries SET raw = ? WHERE idx = ?", (forged, target))
    database.close()

    agent.start()
    try:
        reported = await agent.until(
            lambda s: "audit-sync" in s.get("problems", {}), "the refusal to be reported"
        )
        assert "refused" in reported["problems"]["audit-sync"]
        await wait_for(lambda: central.alerts(appliance), within=30, what="a security alert")
        assert central.witnessed_size(appliance) == witnessed  # nothing of it was stored
        # It keeps running and logging (its own integrity check now fails).
        await agent.until(lambda s: s["log_size"] > size + 1, "the log to keep growing")
        assert agent.service.running
    finally:
        agent.service.terminate()
    assert central.entry_count(appliance) == witnessed


async def test_a_truncated_tail_is_detected(
    central: Central, proxy: ProxyProcess, tmp_path: Path
) -> None:
    agent, appliance = await witnessed_then_stopped(central, proxy, tmp_path, backlog=100)
    witnessed = central.witnessed_size(appliance)

    # The tail the server already witnessed is cut off the appliance's file.
    database = sqlite3.connect(agent.state_dir / "audit.sqlite")
    with database:
        database.execute("DELETE FROM entries WHERE idx >= ?", (witnessed - 10,))
    database.close()

    # The appliance's own check finds checkpoints and receipts that cover
    # entries it no longer has.
    check = agent.cli("audit", "verify", check=False)
    assert check.returncode == 1
    assert "does NOT verify" in check.stderr

    # Heartbeats every second: how the agent learns the partner acted.
    agent.write_config(
        check_interval_seconds=3600,
        sync_interval_seconds=1,
        heartbeat_interval_seconds=1,
        bundle_refresh_seconds=3600,
        request_timeout_seconds=5,
        l1_command=["/bin/true", "{action}"],
    )
    agent.start()
    try:
        # Whatever it logs next lands on indices the server already holds
        # other entries at: refused, alerted, reported; and it keeps going.
        reported = await agent.until(
            lambda s: "audit-sync" in s.get("problems", {}), "the truncation to be reported"
        )
        assert "refused" in reported["problems"]["audit-sync"]
        await wait_for(lambda: central.alerts(appliance), within=30, what="a security alert")
        assert agent.service.running
        assert central.witnessed_size(appliance) == witnessed

        # The partner approves the new log: the old one is kept, and the
        # agent, told by its next heartbeat, syncs the new one from index 0
        # now, not at its hourly retry, and without a restart.
        base = f"/api/v1/sites/{central.site_id}/appliances/{appliance}/audit-log"
        central.api("POST", f"{base}/approve-new", {"reason": "audit.sqlite was cut"})
        synced = await agent.until(
            lambda s: (
                "audit-sync" not in s.get("problems", {}) and s["witnessed_size"] == s["log_size"]
            ),
            "the new log to be witnessed",
        )
        generations = central.api("GET", f"{base}/generations")["generations"]
        assert [(g["generation"], g["size"]) for g in generations] == [
            (1, witnessed),
            (2, synced["witnessed_size"]),
        ]
    finally:
        agent.service.terminate()
    # Locally, the damaged file was set aside (kept for inspection) and a new
    # log begun, whose first entries say why.
    quarantined = [json.loads(raw) for raw in agent.entries()[:3]]
    record = next(e for e in quarantined if e["kind"] == "audit.quarantined")
    assert "latest checkpoint covers" in record["data"]["reason"]
    assert (agent.state_dir / record["data"]["file"]).exists()


def _appliance(agent: Agent) -> str:
    certificate = json.loads((agent.state_dir / "keys" / "certificate.json").read_text())
    return str(json.loads(base64.b64decode(certificate["payload"]))["appliance_id"])
