"""``msp-agent status`` names the checks that fail and the L1 actions that
failed, as the service recorded them.

The service's own check round runs here on real state (the audit trail's
SQLite file, signed bundles from a fake central server, a fake ``sshd``
configuration and an L1 command that fails); then the CLI, another process,
reads what it left on disk."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp

from msp_agent.checks import CheckContext
from msp_agent.config import load_settings
from msp_agent.results import RESULTS_FILE, read_results
from msp_agent.runtime import Agent
from msp_protocol.bundle import BundleKind, ConfigBundle, sign_bundle
from msp_protocol.encoding import format_time
from tests.agent.fakes import FakeCentral
from tests.agent.support import APPLIANCE, CENTRAL, NOW, SITE, Clock, enrolled_key

RUNBOOKS = {
    "runbooks": [
        {"id": "ssh-no-passwords", "check": "ssh_password_login_disabled", "l1_action": None},
        {"id": "firewall", "check": "firewall_active", "l1_action": "reload-firewall"},
        {"id": "generations", "check": "nix_generations", "l1_action": "rm-rf"},
    ]
}
FRAMEWORKS = {
    "frameworks": [
        {"id": "hipaa", "controls": [{"id": "164.312(d)", "runbooks": ["ssh-no-passwords"]}]}
    ]
}
SITE_CONFIG = {"runbooks": ["ssh-no-passwords", "firewall", "generations"]}


def publish(central: FakeCentral, kind: BundleKind, content: dict[str, Any], version: int) -> None:
    bundle = ConfigBundle.model_validate(
        {
            "kind": kind.value,
            "site_id": SITE,
            "version": version,
            "issued_at": NOW,
            "expires_at": NOW + timedelta(days=7),
            "content": content,
        }
    )
    central.bundles[kind] = (sign_bundle(CENTRAL, bundle), f'"v{version}"')


def config_file(tmp_path: Path) -> Path:
    """An appliance whose sshd allows passwords, whose firewall cannot be
    asked about (no systemd here: an error), whose L1 command fails, and
    which keeps too many NixOS generations (its action is not allow-listed)."""
    root = tmp_path / "root"
    profiles = root / "nix/var/nix/profiles"
    profiles.mkdir(parents=True)
    for number in range(1, 13):
        (profiles / f"system-{number}-link").symlink_to(f"/nix/store/{number}-nixos-system")
    (tmp_path / "sshd_config").write_text("PasswordAuthentication yes\n")
    systemctl = tmp_path / "systemctl"
    systemctl.write_text('#!/bin/sh\necho "Failed to connect to bus: No such file" >&2\nexit 1\n')
    systemctl.chmod(0o755)
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps(
            {
                "central_public_key": CENTRAL.verify_key.hex,
                "central_url": "http://127.0.0.1:9",
                "state_dir": str(tmp_path / "state"),
                "sshd_config": str(tmp_path / "sshd_config"),
                "l1_command": ["/bin/sh", "-c", "echo firewall reload refused; exit 3", "{action}"],
            }
        )
    )
    return config


async def check_round(
    config: Path,
    tmp_path: Path,
    clock: Clock,
    *,
    runbooks: dict[str, Any] = RUNBOOKS,
    version: int = 1,
    sshd: str | None = None,
) -> None:
    """One round of the service's checks, as ``msp-agent run`` does it, with
    the check context looking at the fakes."""
    if sshd is not None:
        (tmp_path / "sshd_config").write_text(sshd)
    settings = load_settings(config)
    central = FakeCentral(CENTRAL, clock=clock)
    for kind, content in (
        (BundleKind.SITE_CONFIG, SITE_CONFIG),
        (BundleKind.RUNBOOKS, runbooks),
        (BundleKind.FRAMEWORKS, FRAMEWORKS),
    ):
        publish(central, kind, content, version)
    agent = Agent(settings, clock=clock)
    agent.signer = enrolled_key(settings.key_dir, clock=clock)
    agent.appliance_id, agent.site_id = APPLIANCE, SITE
    agent.client = central  # type: ignore[assignment]
    async with aiohttp.ClientSession() as session:
        await agent._open_state(session)
        try:
            for cache in (agent.site_config, agent.runbooks, agent.frameworks):
                await cache.refresh(central)
            context = agent._check_context

            def looking_at_fakes() -> CheckContext:
                return replace(
                    context(), root=tmp_path / "root", systemctl=str(tmp_path / "systemctl")
                )

            agent._check_context = looking_at_fakes  # type: ignore[method-assign]
            await agent.run_checks()
        finally:
            await agent._close_state()


def status(config: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "msp_agent", "--config", str(config), "status", *flags],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=60,
        check=False,
    )


def test_status_names_failing_checks_and_failed_actions(tmp_path: Path) -> None:
    config, clock = config_file(tmp_path), Clock()
    first = format_time(NOW)
    asyncio.run(check_round(config, tmp_path, clock))
    clock.advance(timedelta(minutes=15))
    later = format_time(clock.now)
    asyncio.run(check_round(config, tmp_path, clock))

    machine = status(config, "--json")
    assert machine.returncode == 0, machine.stderr
    document = json.loads(machine.stdout)
    assert document["failing_checks"] == [
        {
            "check_id": "firewall",
            "result": "error",
            "reason": "cannot ask systemd: Failed to connect to bus: No such file",
            "since": first,
            "at": later,
        },
        {
            "check_id": "generations",
            "result": "fail",
            "reason": "12 NixOS system generations kept (maximum 10)",
            "since": first,
            "at": later,
        },
        {
            "check_id": "ssh-no-passwords",
            "result": "fail",
            "reason": "sshd allows PasswordAuthentication and KbdInteractiveAuthentication "
            "(the default)",
            "since": first,
            "at": later,
        },
    ]
    assert document["failed_actions"] == [
        {
            "action": "rm-rf",
            "check_id": "generations",
            "outcome": "refused",
            "reason": "L1 action 'rm-rf' is not allow-listed",
            "at": later,
        }
    ]

    human = status(config)
    assert human.returncode == 0, human.stderr
    assert (
        f"  ssh-no-passwords: fail since {first} (last run {later}): sshd allows "
        "PasswordAuthentication and KbdInteractiveAuthentication (the default)\n"
    ) in human.stdout
    assert (
        f"  rm-rf for generations: refused at {later}: L1 action 'rm-rf' is not allow-listed\n"
        in human.stdout
    )


def test_a_failed_action_shows_until_its_check_passes(tmp_path: Path) -> None:
    config, clock = config_file(tmp_path), Clock()
    settings = load_settings(config)
    ssh = {**RUNBOOKS["runbooks"][0], "l1_action": "reload-firewall"}  # the command fails
    everything = {"runbooks": [ssh, *RUNBOOKS["runbooks"][1:]]}
    asyncio.run(check_round(config, tmp_path, clock, runbooks=everything))
    actions = json.loads(status(config, "--json").stdout)["failed_actions"]
    assert [a for a in actions if a["check_id"] == "ssh-no-passwords"] == [
        {
            "action": "reload-firewall",
            "check_id": "ssh-no-passwords",
            "outcome": "failed",
            "reason": "exited with status 3: firewall reload refused",
            "at": format_time(NOW),
        }
    ]
    clock.advance(timedelta(minutes=15))
    fixed = "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
    # Fixed by hand, and the site no longer runs the other runbooks.
    only_ssh = {"runbooks": [ssh]}
    asyncio.run(check_round(config, tmp_path, clock, runbooks=only_ssh, version=2, sshd=fixed))
    document = json.loads(status(config, "--json").stdout)
    assert (document["failing_checks"], document["failed_actions"]) == ([], [])
    records = read_results(settings.state_dir)
    # Only the runbook the site still runs is on record, and it passes.
    assert list(records) == ["ssh-no-passwords"]
    assert (records["ssh-no-passwords"].result, records["ssh-no-passwords"].action) == (
        "pass",
        None,
    )


def test_results_of_an_older_agent_still_load(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    state = tmp_path / "state"
    enrolled_key(state / "keys")
    (state / RESULTS_FILE).write_text(json.dumps({"firewall": "fail", "ssh-no-passwords": "pass"}))
    document = json.loads(status(config, "--json").stdout)
    assert document["failing_checks"] == [
        {"check_id": "firewall", "result": "fail", "reason": None, "since": None, "at": None}
    ]
