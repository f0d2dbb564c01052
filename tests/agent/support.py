"""Shared helpers for the agent tests: an enrolled device key and a fixed clock."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from msp_agent.checks import CheckContext
from msp_agent.keys import DelegatedSigningKey
from msp_protocol.delegation import Scope, issue_delegation
from msp_protocol.keys import SigningKey

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
APPLIANCE = "appliance-1"
SITE = "site-clinic-1"
CENTRAL = SigningKey(b"\x01" * 32)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime = NOW) -> None:
        self.start = self.now = start

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        """Seconds since the start, moved by the same hand."""
        return (self.now - self.start).total_seconds()

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def enrolled_key(
    key_dir: Path,
    *,
    clock: Callable[[], datetime] | None = None,
    scopes: tuple[Scope, ...] = (Scope.AUDIT, Scope.EVIDENCE),
    lifetime: timedelta = timedelta(days=30),
) -> DelegatedSigningKey:
    clock = clock or Clock()
    signer = DelegatedSigningKey.load_or_create(
        key_dir, central_keys=[CENTRAL.verify_key], clock=clock
    )
    signer.install_certificate(
        issue_delegation(
            CENTRAL,
            subject=signer.verify_key,
            appliance_id=APPLIANCE,
            site_id=SITE,
            scopes=scopes,
            not_before=clock(),
            lifetime=lifetime,
        )
    )
    return signer


def check_context(tmp_path: Path, **changes: object) -> CheckContext:
    """A check context looking at ``tmp_path``, where every check passes
    unless ``changes`` say otherwise."""

    async def verify() -> tuple[bool, int, int | None, str | None]:
        return True, 0, None, None

    values: dict[str, object] = {
        "state_dir": tmp_path,
        "disk_min_free_percent": 0.0,
        "sshd_config": tmp_path / "sshd_config",
        "verify_audit": verify,
        "certificate": lambda: None,
        "now": lambda: NOW,
        "certificate_min_remaining": 0.2,
    }
    values.update(changes)
    return CheckContext(**values)  # type: ignore[arg-type]
