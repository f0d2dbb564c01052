"""Every check that fails, or cannot look, says why in ``observed["reason"]``:
one line an operator reads in the evidence and in ``msp-agent status``.

Each check is driven to ``fail`` and to ``error`` by a fake of what it reads
(a tree of files, a ``systemctl`` or ``timedatectl`` script); the
table must name every check the agent has, so a new one cannot skip it."""

from __future__ import annotations

import errno
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from msp_agent.checks import (
    CHECKS,
    MAX_REASON_CHARS,
    CheckContext,
    run_check,
)
from tests.agent.support import NOW, check_context

Setup = Callable[[Path, pytest.MonkeyPatch], CheckContext]

FAILED_UNITS = "bar.service loaded failed failed Bar\nfoo.service loaded failed failed Foo\n"


def systemctl(tmp_path: Path, body: str) -> str:
    """A ``systemctl`` that answers as ``body`` (a shell script) says."""
    return _script(tmp_path / "systemctl", body)


def timedatectl(tmp_path: Path, body: str) -> str:
    """A ``timedatectl`` that answers as ``body`` (a shell script) says."""
    return _script(tmp_path / "timedatectl", body)


def _script(script: Path, body: str) -> str:
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


SYSTEMD_DOWN = 'echo "Failed to connect to bus: No such file or directory" >&2; exit 1'
SYSTEMD_FAILING = (
    'case "$*" in\n'
    f"  *list-units*) printf '{FAILED_UNITS}' ;;\n"
    "  *is-active*) echo inactive; exit 3 ;;\n"
    "esac"
)


def denied(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """The file system refuses ``Path.<method>`` (the tests run as root,
    who may read everything)."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, method, refuse)


# `timedatectl show --property=…` prints the properties in the bus's order.
UNSYNCHRONISED = "printf 'NTP=yes\\nCanNTP=yes\\nNTPSynchronized=no\\n'"
TIMEDATED_DOWN = 'echo "Failed to connect to bus: No such file or directory" >&2; exit 1'


async def audit_broken() -> tuple[bool, int, int | None, str | None]:
    return False, 9, 4, "entry 4: row authentication code mismatch"


async def audit_closed() -> tuple[bool, int, int | None, str | None]:
    raise RuntimeError("audit.sqlite is closed")


def certificate_unreadable() -> None:
    raise ValueError("certificate.json is not a certificate")


def journal(tmp_path: Path) -> Path:
    directory = tmp_path / "var/log/journal/0123"
    directory.mkdir(parents=True)
    (directory / "system.journal").write_bytes(b"x" * 4096)
    return tmp_path


def generations(tmp_path: Path) -> Path:
    profiles = tmp_path / "nix/var/nix/profiles"
    profiles.mkdir(parents=True)
    for number in range(1, 4):
        (profiles / f"system-{number}-link").symlink_to(f"/nix/store/{number}-nixos-system")
    return tmp_path


def systems(tmp_path: Path) -> Path:
    for generation in ("gen-1", "gen-2"):
        (tmp_path / "store" / generation / "kernel").mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run/booted-system").symlink_to(tmp_path / "store/gen-1")
    (tmp_path / "run/current-system").symlink_to(tmp_path / "store/gen-2")
    return tmp_path


def nixos(tmp_path: Path, version: str) -> Path:
    (tmp_path / "run/current-system").mkdir(parents=True)
    (tmp_path / "run/current-system/nixos-version").write_text(version + "\n")
    return tmp_path


def unresolvable(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_path: Path) -> str:
        raise RuntimeError("store path vanished")

    monkeypatch.setattr("msp_agent.checks._resolved", broken)


# check -> (setup that fails, its reason; setup that errors, its reason)
CASES: dict[str, tuple[Setup, str, Setup, str]] = {
    "time_sync": (
        lambda t, _m: check_context(t, timedatectl=timedatectl(t, UNSYNCHRONISED)),
        "clock not synchronised: timedated reports NTPSynchronized=no (NTP service: yes)",
        lambda t, _m: check_context(t, timedatectl=timedatectl(t, TIMEDATED_DOWN)),
        "cannot ask timedated: Failed to connect to bus: No such file or directory",
    ),
    "state_disk_space": (
        lambda t, _m: check_context(t, disk_min_free_percent=100.0),
        "free space on {tmp} is ",
        lambda t, _m: check_context(t, state_dir=t / "absent"),
        "cannot read {tmp}/absent: no such file or directory",
    ),
    "failed_units": (
        lambda t, _m: check_context(t, systemctl=systemctl(t, SYSTEMD_FAILING)),
        "2 failed units: bar.service, foo.service",
        lambda t, _m: check_context(t, systemctl=systemctl(t, SYSTEMD_DOWN)),
        "cannot ask systemd: Failed to connect to bus: No such file or directory",
    ),
    "firewall_active": (
        lambda t, _m: check_context(t, systemctl=systemctl(t, SYSTEMD_FAILING)),
        "no firewall is active: firewall.service is inactive, nftables.service is inactive",
        lambda t, _m: check_context(t, systemctl=systemctl(t, SYSTEMD_DOWN)),
        "cannot ask systemd: Failed to connect to bus",
    ),
    "ssh_password_login_disabled": (
        lambda t, _m: check_context(
            t, sshd_config=_write(t / "sshd_config", "PasswordAuthentication yes\n")
        ),
        "sshd allows PasswordAuthentication and KbdInteractiveAuthentication (the default)",
        lambda t, _m: check_context(t, sshd_config=t),
        "cannot read {tmp}: is a directory",
    ),
    "audit_log_integrity": (
        lambda t, _m: check_context(t, verify_audit=audit_broken),
        "audit trail does not verify at entry 4: entry 4: row authentication code mismatch",
        lambda t, _m: check_context(t, verify_audit=audit_closed),
        "the check failed: RuntimeError: audit.sqlite is closed",
    ),
    "delegation_valid": (
        lambda t, _m: check_context(t, certificate=lambda: None),
        "not enrolled: this appliance has no certificate",
        lambda t, _m: check_context(t, certificate=certificate_unreadable),
        "the check failed: ValueError: certificate.json is not a certificate",
    ),
    "journal_size": (
        lambda t, _m: check_context(t, root=journal(t), journal_max_bytes=1024),
        "the journal uses 0 MiB in 1 files (maximum 0 MiB)",
        lambda t, m: (check_context(t, root=journal(t)), denied(m, "rglob"))[0],
        "cannot read {tmp}/var/log/journal: permission denied",
    ),
    "nix_generations": (
        lambda t, _m: check_context(t, root=generations(t), max_system_generations=2),
        "3 NixOS system generations kept (maximum 2)",
        lambda t, m: (check_context(t, root=generations(t)), denied(m, "iterdir"))[0],
        "cannot read {tmp}/nix/var/nix/profiles: permission denied",
    ),
    "pending_reboot": (
        lambda t, _m: check_context(t, root=systems(t)),
        "a reboot is pending: the booted system differs in kernel",
        lambda t, m: (check_context(t, root=systems(t)), unresolvable(m))[0],
        "the check failed: RuntimeError: store path vanished",
    ),
    "os_update_age": (
        lambda t, _m: check_context(t, root=nixos(t, "26.05.20261001.0123abc (Yarara)")),
        "NixOS 26.05.20261001.0123abc (Yarara) is built from nixpkgs of 2026-10-01, 55 days old "
        "(maximum 30)",
        lambda t, _m: check_context(t, root=nixos(t, "26.05pre-git")),
        "no revision date in the NixOS version '26.05pre-git'",
    ),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_check_has_reason_cases() -> None:
    assert set(CASES) == set(CHECKS)


@pytest.mark.parametrize("result", ["fail", "error"])
@pytest.mark.parametrize("name", sorted(CASES))
async def test_fail_and_error_say_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, result: str
) -> None:
    fail_setup, fail_reason, error_setup, error_reason = CASES[name]
    setup, expected = (fail_setup, fail_reason) if result == "fail" else (error_setup, error_reason)
    observation = await run_check(name, setup(tmp_path, monkeypatch))
    monkeypatch.undo()
    assert observation.result == result, observation.observed
    reason = observation.observed["reason"]
    assert isinstance(reason, str)
    assert expected.format(tmp=tmp_path) in reason
    assert "\n" not in reason
    assert len(reason) <= MAX_REASON_CHARS


async def test_a_long_list_is_counted_not_spelled_out(tmp_path: Path) -> None:
    units = "".join(f"unit-{n:02}.service loaded failed failed U\\n" for n in range(60))
    context = check_context(tmp_path, systemctl=systemctl(tmp_path, f"printf '{units}'"))
    observation = await run_check("failed_units", context)
    assert observation.observed["reason"] == (
        "60 failed units: " + ", ".join(f"unit-{n:02}.service" for n in range(10)) + " and 50 more"
    )
    assert (len(observation.observed["failed_units"]), observation.observed["count"]) == (50, 60)


async def test_each_certificate_problem_is_named(tmp_path: Path) -> None:
    def certificate(
        remaining: timedelta, revoked: bool = False
    ) -> Callable[[], tuple[str, object, object, bool]]:
        not_after = NOW + remaining
        return lambda: ("c-7", not_after - timedelta(days=30), not_after, revoked)

    reasons = [
        (await run_check("delegation_valid", check_context(tmp_path, certificate=c))).observed.get(
            "reason"
        )
        for c in (
            certificate(timedelta(days=20), revoked=True),
            certificate(timedelta(days=-1)),
            certificate(timedelta(days=2)),
            certificate(timedelta(days=20)),
        )
    ]
    assert reasons == [
        "certificate c-7 is revoked",
        "certificate c-7 expired at 2026-11-24T12:00:00Z",
        "certificate c-7 expires at 2026-11-27T12:00:00Z, in 2.0 days "
        "(renewal due with 20% of its lifetime left)",
        None,
    ]


async def test_a_check_the_agent_lacks_is_an_error_with_a_reason(tmp_path: Path) -> None:
    observation = await run_check("smart_status", check_context(tmp_path))
    assert (observation.result, observation.observed) == (
        "error",
        {"reason": "this agent has no check 'smart_status'"},
    )


async def test_time_sync_asks_timedated_and_records_its_answer(tmp_path: Path) -> None:
    """The check asks timedated for three properties, without a pager or a
    password prompt, and records what it said."""
    asked = tmp_path / "asked"
    script = timedatectl(
        tmp_path, f"echo \"$@\" > {asked}; printf 'NTP=yes\\nCanNTP=yes\\nNTPSynchronized=yes\\n'"
    )
    observation = await run_check("time_sync", check_context(tmp_path, timedatectl=script))
    assert (observation.result, observation.observed) == (
        "pass",
        {
            "synchronised": True,
            "ntp_service": "yes",
            "can_ntp": "yes",
            "source": "org.freedesktop.timedate1",
        },
    )
    assert asked.read_text().split() == [
        "--no-pager",
        "--no-ask-password",
        "show",
        "--property=NTPSynchronized",
        "--property=NTP",
        "--property=CanNTP",
    ]


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param("printf 'NTP=yes\\n'", id="property_missing"),
        pytest.param("echo NTPSynchronized=maybe", id="property_garbled"),
    ],
)
async def test_time_sync_without_a_clear_answer_is_an_error(tmp_path: Path, answer: str) -> None:
    context = check_context(tmp_path, timedatectl=timedatectl(tmp_path, answer))
    observation = await run_check("time_sync", context)
    assert observation.result == "error"
    assert observation.observed["reason"].startswith("timedated gave no NTPSynchronized: ")
