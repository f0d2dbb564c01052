"""The agent runtime's parts on their own: configuration, the systemd
notification protocol (over a real socket), the link state, the check plan,
the checks that read files, the L1 runner's allow-list, and the CLI's
one-line errors. The whole service is exercised in tests/system/."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from msp_agent.checks import (
    delegation_valid,
    journal_size,
    nix_generations,
    os_update_age,
    pending_reboot,
    ssh_password_login_disabled,
    state_disk_space,
)
from msp_agent.config import ConfigError, load_settings
from msp_agent.connectivity import OFFLINE_AFTER, Connectivity, LinkState
from msp_agent.l1 import ActionNotAllowedError, L1Runner
from msp_agent.runtime import plan_checks
from msp_agent.systemd import Notifier
from msp_protocol.keys import SigningKey
from tests.agent.support import check_context as context

CENTRAL = SigningKey(b"\x07" * 32).verify_key.hex
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


# --- configuration ---------------------------------------------------------------------------


def test_settings_come_from_file_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'central_url = "https://central.example/"\ncentral_public_key = "{CENTRAL}"\n'
        "sync_interval_seconds = 30\n"
    )
    monkeypatch.setenv("MSP_AGENT_SYNC_INTERVAL_SECONDS", "7")
    settings = load_settings(config, state_dir=tmp_path / "state")
    assert settings.central_url == "https://central.example"
    assert settings.sync_interval_seconds == 7
    assert settings.state_dir == tmp_path / "state"
    assert settings.central_key().hex == CENTRAL


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"central_public_key": "zz"}, "invalid setting central_public_key"),
        ({"central_url": "ftp://x"}, "invalid setting central_url"),
        ({"l1_command": ["systemctl", "start"]}, "invalid setting l1_command"),
        ({"on_call_numbers": ["555-1234"]}, "invalid setting on_call_numbers.0"),
        ({"sync_interval_seconds": 0}, "invalid setting sync_interval_seconds"),
        ({"no_such_setting": 1}, "invalid setting no_such_setting"),
    ],
    ids=["bad-key", "bad-url", "l1-without-action", "bad-number", "zero-interval", "unknown"],
)
def test_bad_settings_are_one_line(
    tmp_path: Path, document: dict[str, object], message: str
) -> None:
    config = tmp_path / "agent.json"
    config.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=message):
        load_settings(config)


def test_an_unreadable_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="does not parse"):
        load_settings(tmp_path / "bad.json")


# --- systemd notifications -------------------------------------------------------------------


def test_notifications_reach_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        notifier = Notifier(str(path), watchdog_usec="20000000")
        notifier.ready("online, log 3")
        notifier.watchdog()
        notifier.stopping()
        messages = [server.recv(4096).decode() for _ in range(3)]
    assert messages == [
        "READY=1\nSTATUS=online, log 3",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=stopping",
    ]
    assert notifier.watchdog_interval() == 10.0


def test_without_systemd_notifications_do_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # another process's watchdog
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    assert notifier.notify("READY=1") is False


# --- link state --------------------------------------------------------------------------------


def test_link_state_follows_outcomes_and_recovery_wakes_listeners() -> None:
    now = [100.0]
    woken: list[float] = []
    link = Connectivity(monotonic=lambda: now[0])
    link.on_recovery(lambda: woken.append(now[0]))
    link.answered()
    assert (link.state, woken) == (LinkState.ONLINE, [100.0])
    link.answered()
    assert woken == [100.0]  # only a return wakes
    for attempt in range(1, OFFLINE_AFTER + 1):
        now[0] += 10
        link.unavailable("timeout", server_answered=False)
        expected = LinkState.OFFLINE if attempt >= OFFLINE_AFTER else LinkState.DEGRADED
        assert link.state is expected
    link.answered()
    assert (link.state, woken, link.failures) == (LinkState.ONLINE, [100.0, 130.0], 0)


def test_a_failing_server_wakes_nobody_and_a_flapping_link_rarely() -> None:
    now = [0.0]
    woken: list[float] = []
    link = Connectivity(monotonic=lambda: now[0])
    link.on_recovery(lambda: woken.append(now[0]))
    link.answered()
    for _ in range(100):  # half the requests get a 503: the queues keep backing off
        now[0] += 0.01
        link.unavailable("HTTP 503", server_answered=True)
        assert link.state is LinkState.DEGRADED
        link.answered()
    assert woken == [0.0]
    for _ in range(100):  # half get no answer at all: at most one wake per 5 s
        now[0] += 0.1
        link.unavailable("timeout", server_answered=False)
        link.answered()
    assert len(woken) - 1 == 2  # 10 s of flapping


# --- the check plan ----------------------------------------------------------------------------

SITE = {"runbooks": ["time-sync", "delegation-valid"], "tier": "basic"}
RUNBOOKS = {
    "runbooks": [
        {"id": "time-sync", "check": "time_sync", "l1_action": "restart-timesyncd"},
        {"id": "delegation-valid", "check": "delegation_valid", "l1_action": "renew-certificate"},
        {"id": "disk-health", "check": "disk_health", "l1_action": None},
    ]
}
FRAMEWORKS = {
    "frameworks": [
        {"id": "hipaa", "controls": [{"id": "164.312(b)", "runbooks": ["time-sync"]}]},
        {"id": "soc2", "controls": [{"id": "CC7.2", "runbooks": ["time-sync", "disk-health"]}]},
    ]
}


def test_the_plan_is_what_the_site_enables_with_its_controls() -> None:
    plan = plan_checks(SITE, RUNBOOKS, FRAMEWORKS)
    assert [(p.runbook_id, p.check, p.l1_action) for p in plan] == [
        ("time-sync", "time_sync", "restart-timesyncd"),
        ("delegation-valid", "delegation_valid", "renew-certificate"),
    ]
    assert plan[0].controls == {"hipaa": ["164.312(b)"], "soc2": ["CC7.2"]}
    assert plan[1].controls == {}
    assert plan_checks(None, RUNBOOKS, FRAMEWORKS) == []  # nothing known of the site yet


# --- checks that read files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "result"),
    [
        ("PasswordAuthentication no\nKbdInteractiveAuthentication no\n", "pass"),
        ("PasswordAuthentication no\n", "fail"),  # keyboard-interactive defaults to yes
        ("# PasswordAuthentication no\n", "fail"),
        ("PasswordAuthentication=no\nChallengeResponseAuthentication no\n", "pass"),
        (
            "PasswordAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n",
            "fail",
        ),
        ("KbdInteractiveAuthentication no\nMatch User x\n  PasswordAuthentication no\n", "fail"),
    ],
    ids=["both-off", "kbd-default", "commented", "equals-form", "first-wins", "match-only"],
)
async def test_ssh_password_login(tmp_path: Path, config: str, result: str) -> None:
    (tmp_path / "sshd_config").write_text(config)
    assert (await ssh_password_login_disabled(context(tmp_path))).result == result


async def test_no_sshd_is_not_applicable(tmp_path: Path) -> None:
    assert (await ssh_password_login_disabled(context(tmp_path))).result == "not_applicable"


async def test_disk_space_against_the_threshold(tmp_path: Path) -> None:
    free = await state_disk_space(context(tmp_path))
    assert free.result == "pass"
    assert 0 < free.observed["free_percent"] <= 100
    assert (await state_disk_space(context(tmp_path, disk_min_free_percent=100.0))).result == "fail"


@pytest.mark.parametrize(
    ("remaining", "revoked", "result"),
    [
        (timedelta(days=20), False, "pass"),
        (timedelta(days=2), False, "fail"),
        (timedelta(days=-1), False, "fail"),
        (timedelta(days=20), True, "fail"),
    ],
    ids=["valid", "near-expiry", "expired", "revoked"],
)
async def test_delegation_check(
    tmp_path: Path, remaining: timedelta, revoked: bool, result: str
) -> None:
    not_after = NOW + remaining
    certificate = ("serial", not_after - timedelta(days=30), not_after, revoked)
    observed = await delegation_valid(context(tmp_path, certificate=lambda: certificate))
    assert observed.result == result


# --- L1 ----------------------------------------------------------------------------------------


async def test_l1_runs_only_allow_listed_names(tmp_path: Path) -> None:
    record = tmp_path / "ran"
    runner = L1Runner(["/bin/sh", "-c", f'echo "$0" >> {record}', "{action}"])
    outcome = await runner.run("vacuum-journal")
    assert outcome.succeeded
    assert record.read_text() == "vacuum-journal\n"
    for name in ("rm -rf /", "vacuum-journal; reboot", "../../bin/sh", "renew-certificate"):
        with pytest.raises(ActionNotAllowedError):
            await runner.run(name)
    assert record.read_text() == "vacuum-journal\n"


async def test_l1_failures_are_outcomes(tmp_path: Path) -> None:
    failed = await L1Runner(["/bin/sh", "-c", "echo nope; exit 3", "{action}"]).run(
        "reload-firewall"
    )
    assert (failed.result, failed.exit_status, failed.output) == ("failed", 3, "nope")
    assert failed.reason == "exited with status 3: nope"
    missing = await L1Runner([str(tmp_path / "absent"), "{action}"]).run("reload-firewall")
    assert missing.result == "not-started"
    assert missing.reason is not None
    assert missing.reason.startswith("could not start: [Errno 2] No such file or directory")
    slow = await L1Runner(["/bin/sh", "-c", "sleep 5; echo done", "{action}"], timeout=0.2).run(
        "reload-firewall"
    )
    assert slow.result == "timed-out"
    assert slow.reason is not None
    assert slow.reason.startswith("timed out after 0.2")
    done = await L1Runner(["/bin/true", "{action}"]).run("reload-firewall")
    assert (done.result, done.reason) == ("succeeded", None)


# --- CLI ----------------------------------------------------------------------------------------


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "msp_agent", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"central_public_key": CENTRAL, "state_dir": str(tmp_path / "s")}))
    served = tmp_path / "served.json"
    served.write_text(
        json.dumps(
            {
                "central_public_key": CENTRAL,
                "central_url": "http://127.0.0.1:9",
                "state_dir": str(tmp_path / "t"),
            }
        )
    )
    exposed = tmp_path / "exposed.json"
    (tmp_path / "u" / "keys").mkdir(parents=True)
    (tmp_path / "u" / "keys").chmod(0o755)
    exposed.write_text(
        json.dumps(
            {
                "central_public_key": CENTRAL,
                "central_url": "http://127.0.0.1:9",
                "state_dir": str(tmp_path / "u"),
            }
        )
    )
    cases = [
        (["--config", str(tmp_path / "nope.json"), "status"], 2, "cannot read config file"),
        (["--config", str(config), "audit", "verify"], 1, "no audit trail"),
        (["--config", str(config), "enroll", "--token", "t"], 2, "central_url is not set"),
        (["--config", str(config), "keys", "rotate"], 1, "not enrolled"),
        (["--config", str(config), "run"], 1, "central_url is not set"),
        (["--config", str(served), "run"], 1, "this appliance is not enrolled"),
        (["--config", str(exposed), "run"], 1, "is accessible to others"),
    ]
    for argv, status, message in cases:
        result = cli(*argv)
        assert result.returncode == status, (argv, result.stderr)
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("token", [None, "", "  \n"], ids=["no-file", "empty", "blank"])
def test_a_service_without_a_token_waits_for_its_operator(
    tmp_path: Path, token: str | None
) -> None:
    """Under systemd an appliance that cannot enroll stays up and says why:
    exiting would fail its unit at every start and every switch. A blank
    file (the unit's placeholder for a missing token) is no token."""
    state = tmp_path / "s"
    settings: dict[str, object] = {
        "central_public_key": CENTRAL,
        "central_url": "http://127.0.0.1:9",
        "state_dir": str(state),
    }
    if token is not None:
        (tmp_path / "token").write_text(token)
        settings["enrollment_token_file"] = str(tmp_path / "token")
    config = tmp_path / "agent.json"
    config.write_text(json.dumps(settings))
    notify = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(notify))
        server.settimeout(30)
        agent = subprocess.Popen(
            [sys.executable, "-m", "msp_agent", "--config", str(config), "run"],
            env={**os.environ, "NOTIFY_SOCKET": str(notify)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            ready = server.recv(4096).decode()
            assert agent.poll() is None
            agent.terminate()
            _, stderr = agent.communicate(timeout=30)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    assert ready.startswith(
        "READY=1\nSTATUS=waiting for the operator: this appliance is not enrolled"
    )
    assert "has no enrollment token" in ready
    assert agent.returncode == 0
    assert "this appliance is not enrolled and has no enrollment token" in stderr


def test_status_of_an_appliance_never_enrolled(tmp_path: Path) -> None:
    """Not enrolled is not a healthy agent: said, with a non-zero status."""
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"central_public_key": CENTRAL, "state_dir": str(tmp_path / "s")}))
    (tmp_path / "s").mkdir()
    human = cli("--config", str(config), "status")
    assert human.returncode == 1
    assert "not enrolled" in human.stdout
    machine = cli("--config", str(config), "status", "--json")
    assert machine.returncode == 1
    assert json.loads(machine.stdout) == {"running": False, "enrolled": False}


def test_status_where_no_agent_ever_ran(tmp_path: Path) -> None:
    """Without a config, status reads the default state directory: when
    there is none, it says so instead of reporting "not enrolled"."""
    result = cli("--state-dir", str(tmp_path / "absent"), "status")
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"no agent state in {tmp_path / 'absent'}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("server", "problem"),
    [
        ("not a url", "must be an http:// or https:// URL"),
        ("ftp://central.example", "must be an http:// or https:// URL"),
        ("http://", "has no host name"),
        ("http://[::1", "is not a URL"),
        ("https://central.example:99999", "is not a URL"),
        ("https://user:pw@central.example", "must not carry"),
    ],
    ids=["words", "ftp", "no-host", "bad-ipv6", "bad-port", "credentials"],
)
def test_enroll_with_a_bad_server_url(tmp_path: Path, server: str, problem: str) -> None:
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"central_public_key": CENTRAL, "state_dir": str(tmp_path / "s")}))
    result = cli("--config", str(config), "enroll", "--server", server, "--token", "t" * 20)
    assert result.returncode == 2, result.stderr
    assert problem in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_help_has_no_markup() -> None:
    result = cli("--help")
    assert result.returncode == 0
    assert "msp-agent: the appliance agent" in result.stdout
    assert "``" not in result.stdout


def test_a_second_agent_on_the_same_state_directory_refuses_to_start(tmp_path: Path) -> None:
    """One live agent per state directory: a second one (a demo run twice,
    a unit started beside a manual run) exits at once, naming the first."""
    state = tmp_path / "s"
    state.mkdir()
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps(
            {
                "central_public_key": CENTRAL,
                "central_url": "http://127.0.0.1:9",
                "state_dir": str(state),
            }
        )
    )
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, pathlib\n"
            "from msp_agent.runtime import lock_state_dir\n"
            "with lock_state_dir(pathlib.Path(sys.argv[1])):\n"
            "    print('locked', flush=True)\n"
            "    sys.stdin.read()\n",
            str(state),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        second = cli("--config", str(config), "run")
        assert second.returncode == 1
        assert f"another agent (pid {holder.pid}) is running on state directory {state}" in (
            second.stderr
        )
    finally:
        assert holder.stdin is not None
        assert holder.stdout is not None
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
    # The holder is gone, and so is its lock (flock dies with the process):
    # the agent now gets as far as the next problem.
    after = cli("--config", str(config), "run")
    assert "another agent" not in after.stderr
    assert "this appliance is not enrolled" in after.stderr


# --- NixOS checks, on a tree of our own ------------------------------------------------------


async def test_journal_size(tmp_path: Path) -> None:
    journal = tmp_path / "var/log/journal/0123"
    journal.mkdir(parents=True)
    (journal / "system.journal").write_bytes(b"x" * 4000)
    (journal / "user-1000.journal~").write_bytes(b"x" * 2000)
    ok = await journal_size(context(tmp_path, root=tmp_path, journal_max_bytes=6000))
    assert (ok.result, ok.observed["bytes"], ok.observed["files"]) == ("pass", 6000, 2)
    assert (
        await journal_size(context(tmp_path, root=tmp_path, journal_max_bytes=5999))
    ).result == "fail"
    assert (
        await journal_size(context(tmp_path / "none", root=tmp_path / "none"))
    ).result == "not_applicable"


async def test_nix_generations(tmp_path: Path) -> None:
    profiles = tmp_path / "nix/var/nix/profiles"
    profiles.mkdir(parents=True)
    for number in range(1, 13):
        (profiles / f"system-{number}-link").symlink_to(f"/nix/store/{number}-nixos-system")
    (profiles / "system").symlink_to("system-12-link")
    (profiles / "per-user").mkdir()
    many = await nix_generations(context(tmp_path, root=tmp_path))
    assert (many.result, many.observed["generations"], many.observed["oldest"]) == ("fail", 12, 1)
    assert (
        await nix_generations(context(tmp_path, root=tmp_path, max_system_generations=12))
    ).result == "pass"


async def test_pending_reboot(tmp_path: Path) -> None:
    for generation in ("gen-1", "gen-2"):
        for part in ("kernel", "initrd", "kernel-modules", "systemd"):
            (tmp_path / "store" / generation / part).mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run/booted-system").symlink_to(tmp_path / "store/gen-1")
    (tmp_path / "run/current-system").symlink_to(tmp_path / "store/gen-1")
    assert (await pending_reboot(context(tmp_path, root=tmp_path))).result == "pass"
    (tmp_path / "run/current-system").unlink()
    (tmp_path / "run/current-system").symlink_to(tmp_path / "store/gen-2")
    pending = await pending_reboot(context(tmp_path, root=tmp_path))
    assert (pending.result, pending.observed["differ"]) == (
        "fail",
        ["kernel", "initrd", "kernel-modules", "systemd"],
    )
    assert (
        await pending_reboot(context(tmp_path / "x", root=tmp_path / "x"))
    ).result == "not_applicable"


@pytest.mark.parametrize(
    ("version", "result"),
    [
        ("26.05.20261101.0123abc (Yarara)", "pass"),
        ("26.05.20261001.0123abc (Yarara)", "fail"),
        ("26.05pre-git", "error"),
    ],
    ids=["recent", "old", "no-date"],
)
async def test_os_update_age(tmp_path: Path, version: str, result: str) -> None:
    system = tmp_path / "run/current-system"
    system.mkdir(parents=True)
    (system / "nixos-version").write_text(version + "\n")
    assert (await os_update_age(context(tmp_path, root=tmp_path))).result == result
