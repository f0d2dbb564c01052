"""services.msp-agent under real systemd: the units nixos/agent.nix renders,
booted in a container with D-Bus and polkit, enrolled with a central
container over a veth link.

Checks: Type=notify readiness, the watchdog, a clean stop, the enrollment
token as a LoadCredential credential (present and missing), the state
directory's modes, the sandbox from inside the running agent's namespaces,
L1 actions through polkit as the agent's user, and `systemd-analyze
security` beside the offline score of the same rendered unit.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.systemd import units
from tests.systemd.machines import Container, until
from tests.systemd.site import ContainerAgent, Site

UNIT = "msp-agent.service"


@pytest.fixture(scope="module")
def agent(site: Site) -> Iterator[ContainerAgent]:
    token = site.central.token()
    agent = site.appliance(token=token)
    try:
        yield agent
    finally:
        print(agent.container.journal(UNIT)[-6000:])  # shown when a test fails
        site.retire(agent)


def test_agent_is_ready_and_active(agent: ContainerAgent) -> None:
    container = agent.container
    container.wait_for_unit(UNIT)
    # Type=notify: "active (running)" only once the agent sent READY=1.
    props = container.properties(UNIT, "Type", "ActiveState", "SubState", "NotifyAccess")
    assert props == {
        "Type": "notify",
        "ActiveState": "active",
        "SubState": "running",
        "NotifyAccess": "main",
    }
    assert container.systemctl("is-active", UNIT).stdout.strip() == "active"
    status = agent.wait(lambda s: s.get("link") == "online", "online")
    assert status["appliance_id"]
    # Nothing else failed. L1 actions the agent ran may have: the container
    # has no firewall.service or systemd-timesyncd to act on.
    failed = container.systemctl("list-units", "--failed", "--plain", "--no-legend").stdout
    assert [
        u for u in (line.split()[0] for line in failed.splitlines()) if not u.startswith("msp-l1@")
    ] == []


def test_enrollment_token_arrives_as_a_credential(site: Site, agent: ContainerAgent) -> None:
    container = agent.container
    # systemd 252 prints LoadCredential as "[unprintable]": read the loaded unit.
    loaded = container.systemctl("cat", UNIT).stdout
    assert f"LoadCredential=enrollment-token:{units.AGENT_TOKEN_FILE}" in loaded
    # The source is root's alone; the copy systemd hands the unit is readable
    # by the agent's user only.
    assert container.sh(f"stat -c '%a %U' {units.AGENT_TOKEN_FILE}").split() == ["400", "root"]
    credential = "/run/credentials/msp-agent.service/enrollment-token"
    assert container.sh(f"cat {credential}").strip() == agent.token
    assert container.sh(f"stat -c '%U' {credential}").strip() == "msp"
    # The agent enrolled with it: the server lists its certificate.
    status = agent.wait(lambda s: (s.get("certificate") or {}).get("serial"), "a certificate")
    listed = site.central.api("GET", f"/api/v1/sites/{site.central.site_id}/appliances")["items"]
    assert [a["id"] for a in listed] == [status["appliance_id"]]
    assert listed[0]["certificate_serial"] == status["certificate"]["serial"]
    assert agent.cli_status()["appliance_id"] == status["appliance_id"]


def test_state_directory_modes(agent: ContainerAgent) -> None:
    container = agent.container
    assert container.sh("stat -c '%a %U %G' /var/lib/msp/keys").split() == ["700", "msp", "msp"]
    assert container.sh("stat -c '%a %U %G' /var/lib/msp").split() == ["750", "msp", "msp"]
    assert container.sh("stat -c '%a %U' /var/lib/msp/keys/device.key").split()[1] == "msp"


def _in_sandbox(
    agent: ContainerAgent, script: str, *, user: str = "msp", outside: bool = False
) -> subprocess.CompletedProcess[str]:
    """``script`` in the running agent's namespaces (mount, pid, ipc, uts,
    net, cgroup), as ``user`` with no capabilities and no_new_privs: what the
    agent's own process sees of the file system. With ``outside``, the same
    in the container's own namespaces (the control). Seccomp is not
    inherited this way; it is read from the process itself."""
    pid = agent.container.leader if outside else agent.container.main_pid(UNIT)
    return agent.container.run(
        "setpriv",
        f"--reuid={user}",
        f"--regid={user}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
        "sh",
        "-c",
        script,
        target=pid,
        check=False,
    )


def test_sandbox_of_the_running_agent(agent: ContainerAgent) -> None:
    container = agent.container
    container.wait_for_unit(UNIT)
    pid = container.main_pid(UNIT)

    # The process itself: no capabilities at all, no_new_privs, a seccomp filter.
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[capabilities], 16) == 0, capabilities
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    assert int(status["Seccomp_filters"]) >= 1
    uid = container.sh("id -u msp").strip()
    assert status["Uid"].split()[0] == uid

    # Controls: outside the agent's namespaces the same probes succeed, so
    # each failure below is the sandbox's doing.
    for script, user in (
        ("ls /usr/lib/modules | grep -q .", "msp"),
        ("ls -a /root >/dev/null", "root"),
        ("touch /etc/msp-probe && rm /etc/msp-probe", "root"),
    ):
        control = _in_sandbox(agent, script, user=user, outside=True)
        assert control.returncode == 0, (script, control.stderr)

    # Its view: the state directory is writable, nothing else is.
    ok = _in_sandbox(agent, "touch /var/lib/msp/sandbox-probe && rm /var/lib/msp/sandbox-probe")
    assert ok.returncode == 0, ok.stderr
    for target in (
        "/etc/msp-probe",
        "/usr/local/msp-probe",
        "/var/lib/msp-probe",
        "/opt/msp/probe",
    ):
        denied = _in_sandbox(agent, f"touch {target}")
        assert denied.returncode != 0
        assert "Read-only file system" in denied.stderr, denied.stderr
    # /tmp is its own.
    private = _in_sandbox(agent, "touch /tmp/sandbox-probe && echo yes")
    assert private.stdout.strip() == "yes"
    assert not container.path("/tmp/sandbox-probe").exists()
    denied_etc = _in_sandbox(agent, "touch /etc/msp-probe", user="root")
    assert "Read-only file system" in denied_etc.stderr, denied_etc.stderr
    # ProtectHome: /root is inaccessible, even to its owner without capabilities.
    home = _in_sandbox(agent, "ls -a /root", user="root")
    assert home.returncode != 0, home.stdout
    # ProtectKernelModules: the modules the image ships are hidden, and
    # modprobe cannot load one (no CAP_SYS_MODULE; @module is filtered).
    modules = _in_sandbox(agent, "ls /usr/lib/modules")
    assert modules.returncode != 0 or modules.stdout.strip() == "", modules.stdout
    load = _in_sandbox(agent, "/usr/sbin/modprobe dummy")
    assert load.returncode != 0
    # The unit's effective settings as systemd applies them.
    props = container.properties(
        UNIT,
        "ProtectKernelModules",
        "ProtectSystem",
        "ProtectHome",
        "CapabilityBoundingSet",
        "NoNewPrivileges",
        "PrivateTmp",
        "SystemCallFilter",
    )
    assert props["ProtectKernelModules"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["ProtectHome"] == "yes"
    assert props["CapabilityBoundingSet"] == ""
    assert props["NoNewPrivileges"] == "yes"
    for syscall in ("init_module", "finit_module", "delete_module", "reboot"):
        assert syscall not in props["SystemCallFilter"].split()


def _as_msp(agent: ContainerAgent, verb: str, unit: str) -> subprocess.CompletedProcess[str]:
    return agent.container.run(
        "runuser", "-u", "msp", "--", "systemctl", "--no-ask-password", verb, unit, check=False
    )


def test_l1_actions_through_polkit(agent: ContainerAgent) -> None:
    container = agent.container
    allowed = _as_msp(agent, "start", "msp-l1@vacuum-journal.service")
    assert allowed.returncode == 0, allowed.stderr
    props = container.properties("msp-l1@vacuum-journal.service", "Result", "ExecMainStatus")
    assert props == {"Result": "success", "ExecMainStatus": "0"}
    assert "msp-l1: vacuum-journal" in container.journal("msp-l1@vacuum-journal.service")
    # The journal shows polkit deciding, not root.
    for verb, unit in (
        ("start", "msp-l1@evil.service"),
        ("restart", "msp-l1@vacuum-journal.service"),
        ("stop", UNIT),
        ("start", "systemd-journal-flush.service"),
        ("start", "dbus.service"),
    ):
        refused = _as_msp(agent, verb, unit)
        assert refused.returncode != 0, (verb, unit)
        assert re.search(r"Access denied|Interactive authentication required", refused.stderr), (
            verb,
            unit,
            refused.stderr,
        )
    # Even root cannot make the template run an action it does not know.
    unknown = container.systemctl("start", "msp-l1@not-allowed.service", check=False)
    assert unknown.returncode != 0
    assert "refusing unknown action" in container.journal("msp-l1@not-allowed.service")
    container.systemctl("reset-failed", "msp-l1@not-allowed.service")
    assert container.systemctl("is-active", UNIT).stdout.strip() == "active"


def _exposure(output: str) -> float:
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", output)
    assert match, output[-2000:]
    return float(match.group(1))


def _scores(container: Container, unit: str) -> tuple[float, float]:
    """``systemd-analyze security`` of ``unit`` booted, and offline (on the
    host) of the same unit file."""
    inside = container.run("systemd-analyze", "security", "--no-pager", unit, check=False).stdout
    with tempfile.TemporaryDirectory() as scratch:
        rendered = Path(scratch) / unit
        rendered.write_text(container.path(f"/etc/systemd/system/{unit}").read_text())
        offline = subprocess.run(
            ["systemd-analyze", "security", "--no-pager", "--offline=true", str(rendered)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    return _exposure(inside), _exposure(offline)


def test_systemd_analyze_security(
    site: Site, agent: ContainerAgent, note: Callable[[str], None]
) -> None:
    for container, unit in (
        (agent.container, UNIT),
        (site.central.container, "msp-central.service"),
    ):
        booted, static = _scores(container, unit)
        note(f"systemd-analyze security {unit}: {booted} booted (systemd 252), {static} offline")
        # The booted unit is scored from what systemd applied; it must be as
        # good as the module's rendering promises.
        assert booted <= static + 0.05, unit
        assert booted < 3.0, unit


def _restarts(agent: ContainerAgent) -> int:
    return int(agent.container.properties(UNIT, "NRestarts")["NRestarts"])


def test_watchdog_restarts_a_hung_agent(agent: ContainerAgent, note: Callable[[str], None]) -> None:
    """The module fixes WatchdogSec=60s and exposes no option for it, so this
    one test shortens it with a drop-in (removed again at the end)."""
    container = agent.container
    dropin = container.path(f"/etc/systemd/system/{UNIT}.d/50-test-watchdog.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nWatchdogSec=6s\n")
    try:
        container.systemctl("daemon-reload")
        container.systemctl("restart", UNIT)
        container.wait_for_unit(UNIT)
        assert container.properties(UNIT, "WatchdogUSec")["WatchdogUSec"] == "6s"
        time.sleep(7)  # alive: the agent pings in time
        before = _restarts(agent)
        hung = container.main_pid(UNIT)
        subprocess.run(["kill", "-STOP", str(hung)], check=True)
        started = time.monotonic()
        until(lambda: _restarts(agent) > before, within=60, what="the watchdog's restart")
        container.wait_for_unit(UNIT)
        note(
            f"watchdog (WatchdogSec=6s): restarted {time.monotonic() - started:.1f} s after SIGSTOP"
        )
        assert container.main_pid(UNIT) != hung
        assert "Watchdog timeout" in container.journal(UNIT)
    finally:
        dropin.unlink()
        container.systemctl("daemon-reload")
        container.systemctl("restart", UNIT)
    container.wait_for_unit(UNIT)


def test_stop_is_clean(agent: ContainerAgent, note: Callable[[str], None]) -> None:
    container = agent.container
    container.wait_for_unit(UNIT)
    cursor = container.run("journalctl", "-n0", "--show-cursor", "--quiet").stdout
    cursor = cursor.strip().removeprefix("-- cursor: ")
    started = time.monotonic()
    container.systemctl("stop", UNIT)
    took = time.monotonic() - started
    props = container.properties(UNIT, "Result", "ExecMainCode", "ExecMainStatus", "ActiveState")
    note(f"systemctl stop msp-agent: {took:.1f} s, Result={props['Result']}")
    assert props == {
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED: it exited, no signal killed it
        "ExecMainStatus": "0",
        "ActiveState": "inactive",
    }
    journal = container.journal(UNIT, since_cursor=cursor)
    assert "SIGKILL" not in journal, journal
    assert "timed out" not in journal, journal
    assert took < 30
    container.systemctl("start", UNIT)
    container.wait_for_unit(UNIT)


def test_a_missing_token_file_does_not_fail_the_unit(agent: ContainerAgent) -> None:
    """The operator removes the spent token: the enrolled agent still starts."""
    container = agent.container
    agent.wait(lambda s: (s.get("certificate") or {}).get("serial"), "enrolled")
    container.run("rm", units.AGENT_TOKEN_FILE)
    restarted = container.systemctl("restart", UNIT, check=False)
    journal = container.journal(UNIT)[-1500:]
    assert restarted.returncode == 0, journal
    container.wait_for_unit(UNIT)
    assert agent.wait(lambda s: s.get("link") == "online", "online again")
