"""The three scenarios of tests/system and tests/nixos (offline mode, key
delegation, audit resync) with both sides under systemd: the central
server as central.nix's unit in one container, the agent as agent.nix's
units in another, the link between them cut and restored with
:meth:`~tests.systemd.machines.Link.block` / ``unblock``.

Each scenario has its own client site and a fresh appliance container; the
central container is shared by the module. What is read from the server's
database and the agent's files goes through tests/system's helpers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest

from tests.system.test_offline import evidence_ids, server_evidence
from tests.systemd import units
from tests.systemd.machines import until
from tests.systemd.site import ContainerAgent, Site

UNIT = "msp-agent.service"


@pytest.fixture
def appliances(site: Site) -> Iterator[list[ContainerAgent]]:
    """Appliances a scenario boots; retired (and the link restored) after it."""
    booted: list[ContainerAgent] = []
    try:
        yield booted
    finally:
        site.link.unblock()
        for agent in booted:
            print(agent.container.journal(UNIT)[-5000:])  # shown when the test fails
            site.retire(agent)


def enrolled(site: Site, appliances: list[ContainerAgent], name: str) -> ContainerAgent:
    site.new_client_site(name)
    agent = site.appliance(token=site.central.token())
    appliances.append(agent)
    agent.wait(
        lambda s: s.get("link") == "online" and (s.get("certificate") or {}).get("serial"),
        "enrolled and online",
    )
    return agent


@pytest.mark.timeout(400)
def test_offline_mode(
    site: Site, appliances: list[ContainerAgent], note: Callable[[str], None]
) -> None:
    central = site.central
    agent = enrolled(site, appliances, "offline clinic")
    online = agent.wait(
        lambda s: (
            s.get("last_check_at")
            and s["urgent_waiting"] == 0
            and s["evidence_queued"] == 0
            and s["witnessed_size"] == s["log_size"]
        ),
        "a first check round, witnessed",
    )
    appliance = online["appliance_id"]
    escalations_before = central.api("GET", "/api/v1/escalations")["items"]

    # The link goes black; the site's disk "fills" (the threshold says so,
    # switched in as a configuration change): a critical check offline.
    site.link.block()
    site.switch(agent, {"disk_min_free_percent": 100})
    offline = agent.wait(
        lambda s: (
            s.get("link") != "online"
            and s.get("urgent_waiting", 0) >= 1
            and s.get("evidence_queued", 0) >= 1
        ),
        "evidence and an incident queued offline",
    )
    grown = agent.wait(lambda s: s["log_size"] > offline["log_size"], "the log to keep growing")
    assert grown["witnessed_size"] < grown["log_size"]
    assert central.api("GET", "/api/v1/escalations")["items"] == escalations_before
    # The agent ran its L1 action as root, through polkit.
    until(
        lambda: (
            "msp-l1: vacuum-journal" in agent.container.journal("msp-l1@vacuum-journal.service")
        ),
        within=60,
        what="the L1 action vacuum-journal",
    )
    assert "l1.action" in agent.kinds()
    assert "escalation.raised" in agent.kinds()

    # The link returns: everything queued reaches the server, once.
    backlog = agent.status()
    site.link.unblock()
    returned = time.monotonic()
    agent.wait(
        lambda s: (
            s.get("link") == "online"
            and s["urgent_waiting"] == 0
            and s["evidence_queued"] == 0
            and s["witnessed_size"] >= backlog["log_size"]
        ),
        "the backlog to reach the server",
    )
    note(
        f"offline mode: backlog of {backlog['log_size']} entries witnessed"
        f" {time.monotonic() - returned:.1f} s after the link returned"
    )
    queued_offline = evidence_ids(agent.entries()[: backlog["log_size"]])
    until(
        lambda: queued_offline <= server_evidence(central, appliance),
        within=60,
        what="the evidence signed offline on the server",
    )
    critical = [
        e
        for e in central.api("GET", "/api/v1/escalations")["items"]
        if e["severity"] == "critical" and "state-disk-space" in e["title"]
    ]
    assert len(critical) == 1
    size = central.witnessed_size(appliance)
    assert central.entry_count(appliance) == size
    stored = central.query(
        "SELECT raw FROM audit_entries WHERE appliance_id = ? ORDER BY idx", appliance
    )
    assert [bytes(raw) for (raw,) in stored] == agent.entries()[:size]
    assert central.alerts(appliance) == []
    assert agent.container.systemctl("is-active", UNIT).stdout.strip() == "active"


@pytest.mark.timeout(400)
def test_key_delegation(site: Site, appliances: list[ContainerAgent]) -> None:
    central = site.central
    site_id = site.new_client_site("delegation clinic")

    # No token file at all (the module declares one): the unit still
    # starts, and the agent, which cannot enroll, stays active and says so.
    agent = site.appliance(token="not-written-yet", boot=False)
    appliances.append(agent)
    container = agent.container
    container.path(units.AGENT_TOKEN_FILE).unlink()
    container.boot()

    def waiting(what: str) -> None:
        until(lambda: what in container.journal(UNIT), within=60, what=repr(what))
        assert container.systemctl("is-active", UNIT).stdout.strip() == "active"
        text = container.properties(UNIT, "StatusText")["StatusText"]
        assert text.startswith("waiting for the operator"), text

    waiting("this appliance is not enrolled")
    assert "credential" not in container.journal(UNIT).lower()

    # A made-up token: READY=1 comes before the request (a boot must not
    # wait for the server), and after the refusal the agent waits, active,
    # for a new token instead of presenting this one again.
    container.sh(
        f"umask 077 && printf %s made-up-token-0123456789abcdef0123 > {units.AGENT_TOKEN_FILE}"
    )
    container.systemctl("restart", UNIT)
    waiting("enrollment refused")
    container.systemctl("stop", UNIT)
    assert central.api("GET", f"/api/v1/sites/{site_id}/appliances")["items"] == []
    # The appliance API takes no unsigned request.
    status, _ = central.request("POST", "/api/v1/appliances/nobody/heartbeat", {})
    assert status == 401

    # A real token through the credential: a certificate for a key made here.
    token = central.token()
    agent.token = token
    container.sh(f"umask 077 && printf %s {token} > {units.AGENT_TOKEN_FILE}")
    container.systemctl("start", UNIT)
    status_now = agent.wait(lambda s: (s.get("certificate") or {}).get("serial"), "a certificate")
    serial = status_now["certificate"]["serial"]
    assert not status_now["certificate"]["revoked"]
    assert container.path("/var/lib/msp/keys/certificate.json").is_file()
    assert container.sh("stat -c %a /var/lib/msp/keys").strip() == "700"
    listed = central.api("GET", f"/api/v1/sites/{site_id}/appliances")["items"]
    assert [(a["id"], a["certificate_serial"]) for a in listed] == [
        (status_now["appliance_id"], serial)
    ]

    # A spent token is refused.
    spent = container.run(
        "msp-agent", "--state-dir", "/tmp/second-appliance", "enroll", "--token", token, check=False
    )
    assert spent.returncode != 0
    assert "enrollment refused" in spent.stdout + spent.stderr

    # Revocation: the agent stops signing and keeps running.
    agent.wait(lambda s: s["witnessed_size"] == s["log_size"], "a witnessed log")
    revoked = central.manage("keys", "revoke", serial, "--reason", "systemd test")
    assert serial in revoked["revoked_serials"]
    after = agent.wait(
        lambda s: s.get("link") == "revoked" and s["certificate"]["revoked"], "the revocation"
    )
    interval = 15  # AGENT_SETTINGS' check interval
    time.sleep(2 * interval)
    assert agent.status()["log_size"] == after["log_size"], "nothing is signed after revocation"
    assert container.systemctl("is-active", UNIT).stdout.strip() == "active"
    witnessed = central.api("GET", f"/api/v1/sites/{site_id}/appliances")["items"][0]
    assert witnessed["witnessed_size"] <= revoked["cutoff_size"]


@pytest.mark.timeout(400)
def test_audit_resync(site: Site, appliances: list[ContainerAgent]) -> None:
    central = site.central
    server = central.container
    agent = enrolled(site, appliances, "resync clinic")
    appliance = agent.wait(lambda s: s["witnessed_size"] == s["log_size"], "witnessed")[
        "appliance_id"
    ]

    # The server is stopped, then killed outright; systemd brings it back
    # (Restart=on-failure) and the log resyncs without a gap or an alert.
    server.systemctl("stop", "msp-central.service")
    during = agent.wait(
        lambda s: s.get("link") != "online" and s["log_size"] > s["witnessed_size"],
        "the agent to log while the server is away",
    )
    server.systemctl("start", "msp-central.service")
    central.wait_ready()
    restarts = int(server.properties("msp-central.service", "NRestarts")["NRestarts"])
    server.systemctl("kill", "--signal=SIGKILL", "msp-central.service")
    until(
        lambda: int(server.properties("msp-central.service", "NRestarts")["NRestarts"]) > restarts,
        within=30,
        what="systemd to restart the killed server",
    )
    central.wait_ready()
    agent.wait(
        lambda s: s.get("link") == "online" and s["witnessed_size"] >= during["log_size"],
        "the resync",
    )
    size = central.witnessed_size(appliance)
    assert central.entry_count(appliance) == size
    stored = central.query(
        "SELECT raw FROM audit_entries WHERE appliance_id = ? ORDER BY idx", appliance
    )
    assert [bytes(raw) for (raw,) in stored] == agent.entries()[:size]
    assert central.alerts(appliance) == []

    # A row the server has not seen is changed behind the stopped agent's back.
    site.link.block()
    offline = agent.wait(lambda s: s.get("link") != "online", "offline")
    agent.wait(lambda s: s["log_size"] > offline["witnessed_size"], "an unwitnessed entry")
    agent.container.systemctl("stop", UNIT)
    changed = agent.container.run(
        "runuser",
        "-u",
        "msp",
        "--",
        "sqlite3",
        "/var/lib/msp/audit.sqlite",
        'UPDATE entries SET raw = CAST(replace(CAST(raw AS TEXT), \'"ts":"20\', \'"ts":"19\')'
        " AS BLOB) WHERE idx = (SELECT MAX(idx) FROM entries); SELECT changes();",
    )
    assert changed.stdout.strip() == "1"
    site.link.unblock()
    agent.container.systemctl("start", UNIT)
    until(lambda: central.alerts(appliance), within=120, what="a security alert")
    reported = agent.wait(lambda s: "audit-sync" in s.get("problems", {}), "the refusal reported")
    assert "refused" in reported["problems"]["audit-sync"]

    def refusal_escalated() -> bool:
        items = central.api("GET", "/api/v1/escalations")["items"]
        return any(
            e["severity"] == "critical" and e["title"].startswith("Audit log sync refused")
            for e in items
            if e["appliance_id"] == appliance
        )

    until(refusal_escalated, within=120, what="the refusal escalated")
    verify = agent.container.run(
        "runuser", "-u", "msp", "--", "msp-agent", "audit", "verify", check=False
    )
    assert verify.returncode != 0
    assert "does NOT verify" in verify.stdout + verify.stderr
    assert agent.container.systemctl("is-active", UNIT).stdout.strip() == "active"
    assert json.loads(agent.container.path("/var/lib/msp/status.json").read_text())
