"""Compliance checks of the appliance itself.

Each check looks at one real thing and says ``pass``, ``fail``, ``error``
(it could not look) or ``not_applicable``, with what it observed. Every
``fail`` and ``error`` says why in one line, ``observed["reason"]``, for the
operator who reads the evidence or ``msp-agent status``. Checks are
named as the central catalogue's runbooks name them (``check`` of a
runbook); the scheduler maps each to the controls of the site's frameworks.

Checks run as the agent's unprivileged user: they read what any user may
read (the clock's synchronisation state and systemd's unit states over
D-Bus, file-system statistics, sshd's configuration, the journal's and the Nix
profiles' directories, the booted and current NixOS systems) and change
nothing. ``disk_health`` (SMART) needs privileges the agent does not have:
it has no check yet, and the agent reports it as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from msp_protocol.evidence import CheckResult

# A reason is one line; what it summarises is in the other observed fields.
MAX_REASON_CHARS = 300
# Names a reason spells out before it says "and N more".
MAX_REASON_NAMES = 10


@dataclass(frozen=True, slots=True)
class Observation:
    result: CheckResult
    observed: dict[str, Any] = field(default_factory=dict)


def _observation(result: CheckResult, reason: str | None, **observed: Any) -> Observation:
    """An observation with its reason first (a ``pass`` needs none)."""
    if reason is not None:
        observed = {"reason": _one_line(reason), **observed}
    return Observation(result, observed)


def _error(reason: str, **observed: Any) -> Observation:
    return _observation("error", reason, **observed)


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 1] + "…"


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_REASON_NAMES])
    more = len(names) - MAX_REASON_NAMES
    return f"{shown} and {more} more" if more > 0 else shown


def _cannot_read(path: Path | str, exc: OSError) -> str:
    return f"cannot read {path}: {(exc.strerror or str(exc)).lower()}"


def _mebibytes(size: int) -> str:
    return f"{size / (1024 * 1024):.0f} MiB"


@dataclass(frozen=True, slots=True)
class CheckContext:
    """What checks may look at besides the system."""

    state_dir: Path
    disk_min_free_percent: float
    sshd_config: Path
    # Verifies the audit trail; (ok, size, first bad index, problem).
    verify_audit: Callable[[], Awaitable[tuple[bool, int, int | None, str | None]]]
    # The certificate: (serial, not_before, not_after, revoked) or None.
    certificate: Callable[[], tuple[str, datetime, datetime, bool] | None]
    now: Callable[[], datetime]
    certificate_min_remaining: float
    systemctl: str = "systemctl"
    # Limits of the full-tier checks.
    journal_max_bytes: int = 600 * 1024 * 1024
    max_system_generations: int = 10
    max_os_age_days: int = 30
    # Where the file system is (tests point it at a tree of their own).
    root: Path = Path("/")
    # Asked whether the clock is synchronised (tests hand in a script).
    timedatectl: str = "timedatectl"


Check = Callable[[CheckContext], Awaitable[Observation]]


# --- time_sync ------------------------------------------------------------------------------


# systemd-timedated (org.freedesktop.timedate1) answers whether the system
# clock is synchronised; it reads the kernel's NTP state itself, so the agent
# needs no clock system call (its unit keeps ProtectClock=).
_TIMEDATED_PROPERTIES = ("NTPSynchronized", "NTP", "CanNTP")


async def _timedatectl(context: CheckContext) -> tuple[int, str]:
    arguments = [f"--property={name}" for name in _TIMEDATED_PROPERTIES]
    status, out, err = await _ask_systemd(context.timedatectl, "show", *arguments)
    # On failure the error says why; what it printed before is secondary.
    return status, (err or out) if status else out


async def time_sync(context: CheckContext) -> Observation:
    """Whether the system clock is synchronised, as ``timedatectl`` shows it:
    timedated's ``NTPSynchronized``, which systemd derives from the kernel's
    NTP state (adjtimex(2)). ``NTP`` says whether a time service is on."""
    status, text = await _timedatectl(context)
    if status != 0:
        said = text.splitlines()[0] if text else f"exit status {status}"
        return _error(f"cannot ask timedated: {said}")
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    synchronised_value = values.get("NTPSynchronized")
    if synchronised_value not in ("yes", "no"):
        return _error(f"timedated gave no NTPSynchronized: {_one_line(text)[:80]!r}")
    synchronised = synchronised_value == "yes"
    ntp_service = values.get("NTP", "unknown")
    reason = None
    if not synchronised:
        reason = (
            "clock not synchronised: timedated reports NTPSynchronized=no "
            f"(NTP service: {ntp_service})"
        )
    return _observation(
        "pass" if synchronised else "fail",
        reason,
        synchronised=synchronised,
        ntp_service=ntp_service,
        can_ntp=values.get("CanNTP", "unknown"),
        source="org.freedesktop.timedate1",
    )


# --- state_disk_space -----------------------------------------------------------------------


async def state_disk_space(context: CheckContext) -> Observation:
    try:
        stats = os.statvfs(context.state_dir)
    except OSError as exc:
        return _error(_cannot_read(context.state_dir, exc))
    total = stats.f_blocks * stats.f_frsize
    available = stats.f_bavail * stats.f_frsize
    free_percent = 100.0 * available / total if total else 0.0
    ok = free_percent >= context.disk_min_free_percent
    return _observation(
        "pass" if ok else "fail",
        None
        if ok
        else (
            f"free space on {context.state_dir} is {free_percent:.0f} % "
            f"(minimum {context.disk_min_free_percent:g} %)"
        ),
        path=str(context.state_dir),
        free_percent=round(free_percent, 2),
        available_bytes=available,
        total_bytes=total,
        min_free_percent=context.disk_min_free_percent,
    )


# --- systemd units ----------------------------------------------------------------------------


async def _ask_systemd(program: str, *args: str) -> tuple[int, str, str]:
    """Run one of systemd's query tools (never asking for a password);
    its exit status (-1 when it could not run), output and error output."""
    binary = shutil.which(program) or program
    try:
        process = await asyncio.create_subprocess_exec(
            binary,
            "--no-pager",
            "--no-ask-password",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
    except (OSError, TimeoutError) as exc:
        return -1, "", str(exc) or type(exc).__name__
    return (
        process.returncode or 0,
        out.decode(errors="replace").strip(),
        err.decode(errors="replace").strip(),
    )


async def _systemctl(context: CheckContext, *args: str) -> tuple[int, str]:
    status, out, err = await _ask_systemd(context.systemctl, *args)
    return status, err if status and not out else out


def _unreachable(text: str) -> bool:
    # systemctl's own words when it cannot talk to systemd at all.
    return any(
        phrase in text
        for phrase in ("Failed to connect", "not been booted with systemd", "No such file")
    )


async def failed_units(context: CheckContext) -> Observation:
    status, text = await _systemctl(
        context, "list-units", "--state=failed", "--plain", "--no-legend"
    )
    if status != 0 or _unreachable(text):
        return _error(_systemctl_problem(status, text))
    units = sorted(line.split()[0] for line in text.splitlines() if line.strip())
    return _observation(
        "pass" if not units else "fail",
        f"{len(units)} failed unit{'s' if len(units) != 1 else ''}: {_names(units)}"
        if units
        else None,
        failed_units=units[:MAX_LISTED_UNITS],
        count=len(units),
    )


# Units listed in the evidence (the count says how many there were).
MAX_LISTED_UNITS = 50


def _systemctl_problem(status: int, text: str) -> str:
    said = text.splitlines()[0] if text else f"exit status {status}"
    return f"cannot ask systemd: {said}"


# NixOS's firewall is firewall.service (iptables) or nftables.service.
FIREWALL_UNITS = ("firewall.service", "nftables.service")


async def firewall_active(context: CheckContext) -> Observation:
    states: dict[str, str] = {}
    for unit in FIREWALL_UNITS:
        status, text = await _systemctl(context, "is-active", unit)
        if status < 0 or _unreachable(text):
            return _error(_systemctl_problem(status, text))
        states[unit] = text.splitlines()[0] if text else "unknown"
    active = any(state == "active" for state in states.values())
    reason = None
    if not active:
        reason = "no firewall is active: " + ", ".join(
            f"{unit} is {state}" for unit, state in states.items()
        )
    return _observation("pass" if active else "fail", reason, units=states)


# --- sshd -------------------------------------------------------------------------------------

# sshd(8) takes the first value it reads for a keyword; the Match blocks
# after it override per connection and are reported, not interpreted.
_SSH_KEYWORDS = (
    "passwordauthentication",
    "kbdinteractiveauthentication",
    "challengeresponseauthentication",
)


async def ssh_password_login_disabled(context: CheckContext) -> Observation:
    try:
        text = context.sshd_config.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return Observation(
            "not_applicable", {"sshd_config": str(context.sshd_config), "present": False}
        )
    except OSError as exc:
        return _error(_cannot_read(context.sshd_config, exc))
    values: dict[str, str] = {}
    match_blocks = 0
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        keyword, _, value = line.replace("=", " ", 1).partition(" ")
        keyword = keyword.lower()
        if keyword == "match":
            match_blocks += 1
            continue
        if match_blocks == 0 and keyword in _SSH_KEYWORDS:
            values.setdefault(keyword, value.strip().lower())
    # OpenSSH's defaults are "yes" for both.
    by_password = values.get("passwordauthentication", "yes")
    keyboard = values.get(
        "kbdinteractiveauthentication", values.get("challengeresponseauthentication", "yes")
    )
    ok = (by_password, keyboard) == ("no", "no")
    allowed = [
        keyword + ("" if set_here else " (the default)")
        for keyword, setting, set_here in (
            ("PasswordAuthentication", by_password, "passwordauthentication" in values),
            ("KbdInteractiveAuthentication", keyboard, bool(set(_SSH_KEYWORDS[1:]) & set(values))),
        )
        if setting != "no"
    ]
    return _observation(
        "pass" if ok else "fail",
        None if ok else f"sshd allows {' and '.join(allowed)}",
        sshd_config=str(context.sshd_config),
        password_authentication=by_password,
        keyboard_interactive_authentication=keyboard,
        match_blocks=match_blocks,
    )


# --- the agent's own state ----------------------------------------------------------------------


async def audit_log_integrity(context: CheckContext) -> Observation:
    ok, size, first_bad, problem = await context.verify_audit()
    if ok:
        return Observation("pass", {"size": size})
    where = "" if first_bad is None else f" at entry {first_bad}"
    return _observation(
        "fail",
        f"audit trail does not verify{where}: {problem or 'no reason given'}",
        size=size,
        first_bad_index=first_bad,
        problem=(problem or "")[:500],
    )


async def delegation_valid(context: CheckContext) -> Observation:
    certificate = context.certificate()
    if certificate is None:
        return _observation(
            "fail", "not enrolled: this appliance has no certificate", enrolled=False
        )
    serial, not_before, not_after, revoked = certificate
    now = context.now()
    lifetime = (not_after - not_before).total_seconds()
    remaining = (not_after - now).total_seconds()
    near_expiry = remaining < lifetime * context.certificate_min_remaining
    ok = not revoked and remaining > 0 and not near_expiry
    until = not_after.isoformat().replace("+00:00", "Z")
    if revoked:
        reason: str | None = f"certificate {serial} is revoked"
    elif remaining <= 0:
        reason = f"certificate {serial} expired at {until}"
    elif near_expiry:
        reason = (
            f"certificate {serial} expires at {until}, in {remaining / 86400:.1f} days "
            f"(renewal due with {context.certificate_min_remaining:.0%} of its lifetime left)"
        )
    else:
        reason = None
    return _observation(
        "pass" if ok else "fail",
        reason,
        serial=serial,
        not_after=until,
        remaining_seconds=int(remaining),
        revoked=revoked,
        expired=remaining <= 0,
        near_expiry=near_expiry,
    )


# --- NixOS (the full coverage tier) -------------------------------------------------------------


async def journal_size(context: CheckContext) -> Observation:
    """The journal's files on disk (sizes only: reading a directory's entries
    needs no access to the files themselves) against the limit."""
    total, files = 0, 0
    for directory in ("var/log/journal", "run/log/journal"):
        base = context.root / directory
        if not base.is_dir():
            continue
        try:
            for path in base.rglob("*.journal*"):
                with contextlib.suppress(OSError):  # rotated away meanwhile
                    total += path.stat().st_size
                    files += 1
        except OSError as exc:
            return _error(_cannot_read(base, exc))
    if files == 0:
        return Observation("not_applicable", {"journal_files": 0})
    ok = total <= context.journal_max_bytes
    return _observation(
        "pass" if ok else "fail",
        None
        if ok
        else (
            f"the journal uses {_mebibytes(total)} in {files} files "
            f"(maximum {_mebibytes(context.journal_max_bytes)})"
        ),
        bytes=total,
        files=files,
        max_bytes=context.journal_max_bytes,
    )


_GENERATION = re.compile(r"^system-(\d+)-link$")


async def nix_generations(context: CheckContext) -> Observation:
    """Retained NixOS system generations (each keeps its closure in the
    store) against the limit."""
    profiles = context.root / "nix/var/nix/profiles"
    if not profiles.is_dir():
        return Observation("not_applicable", {"nixos": False})
    try:
        numbers = sorted(
            int(match.group(1))
            for entry in profiles.iterdir()
            if (match := _GENERATION.match(entry.name))
        )
    except OSError as exc:
        return _error(_cannot_read(profiles, exc))
    ok = len(numbers) <= context.max_system_generations
    return _observation(
        "pass" if ok else "fail",
        None
        if ok
        else (
            f"{len(numbers)} NixOS system generations kept "
            f"(maximum {context.max_system_generations})"
        ),
        generations=len(numbers),
        oldest=numbers[0] if numbers else None,
        newest=numbers[-1] if numbers else None,
        max_generations=context.max_system_generations,
    )


# What must match between the booted and the current system for installed
# updates to be in effect.
_BOOT_PARTS = ("kernel", "initrd", "kernel-modules", "systemd")


async def pending_reboot(context: CheckContext) -> Observation:
    booted, current = context.root / "run/booted-system", context.root / "run/current-system"
    if not booted.exists() or not current.exists():
        return Observation("not_applicable", {"nixos": False})
    differ = [part for part in _BOOT_PARTS if _resolved(booted / part) != _resolved(current / part)]
    return _observation(
        "pass" if not differ else "fail",
        f"a reboot is pending: the booted system differs in {', '.join(differ)}"
        if differ
        else None,
        differ=differ,
    )


def _resolved(path: Path) -> str | None:
    try:
        return str(path.resolve(strict=True))
    except OSError:
        return None


# nixos-version: "26.05.20261120.0123abc (Codename)"; the date is that of
# the nixpkgs revision the system was built from.
_VERSION_DATE = re.compile(r"\.(\d{8})\.")


async def os_update_age(context: CheckContext) -> Observation:
    version_file = context.root / "run/current-system/nixos-version"
    try:
        version = version_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return Observation("not_applicable", {"nixos": False})
    except OSError as exc:
        return _error(_cannot_read(version_file, exc))
    match = _VERSION_DATE.search(version)
    if match is None:
        return _error(f"no revision date in the NixOS version {version[:80]!r}")
    try:
        built = datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=UTC)
    except ValueError:
        return _error(f"bad revision date in the NixOS version {version[:80]!r}")
    age_days = (context.now() - built).days
    ok = age_days <= context.max_os_age_days
    return _observation(
        "pass" if ok else "fail",
        None
        if ok
        else (
            f"NixOS {version[:40]} is built from nixpkgs of {built:%Y-%m-%d}, "
            f"{age_days} days old (maximum {context.max_os_age_days})"
        ),
        nixos_version=version[:80],
        age_days=age_days,
        max_age_days=context.max_os_age_days,
    )


CHECKS: dict[str, Check] = {
    "time_sync": time_sync,
    "state_disk_space": state_disk_space,
    "failed_units": failed_units,
    "firewall_active": firewall_active,
    "ssh_password_login_disabled": ssh_password_login_disabled,
    "audit_log_integrity": audit_log_integrity,
    "delegation_valid": delegation_valid,
    "journal_size": journal_size,
    "nix_generations": nix_generations,
    "pending_reboot": pending_reboot,
    "os_update_age": os_update_age,
}


async def run_check(name: str, context: CheckContext) -> Observation:
    """Run one check; a check that raises is an ``error`` observation."""
    check = CHECKS.get(name)
    if check is None:
        return _error(f"this agent has no check {name!r}")
    try:
        return await check(context)
    except Exception as exc:  # a check's bug must not stop the others
        return _error(f"the check failed: {type(exc).__name__}: {exc}")
