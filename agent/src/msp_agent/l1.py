"""L1 runbook actions: allow-listed names, run by a configured command.

The agent never executes text it received. A runbook bundle names an
action; the action must be one of :data:`ALLOWED_ACTIONS`, and what runs is
the configured command with ``{action}`` replaced by that name. On NixOS the
command is ``systemctl --no-ask-password start msp-l1@<action>.service``: a
root-owned template unit maps each name to a fixed command, and polkit lets
the agent's unprivileged user start only those units.

Actions the agent performs itself (renewing its certificate) are in
:data:`INTERNAL_ACTIONS` and never reach the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

ALLOWED_ACTIONS = frozenset(
    {
        "restart-timesyncd",
        "vacuum-journal",
        "restart-failed-units",
        "reload-firewall",
        "collect-nix-garbage",
        "start-nixos-upgrade",
    }
)
INTERNAL_ACTIONS = frozenset({"renew-certificate"})

# What the audit entry keeps of the command's output.
MAX_OUTPUT_CHARS = 2_000


class ActionNotAllowedError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class ActionOutcome:
    action: str
    result: str  # "succeeded" | "failed" | "timed-out" | "not-started"
    exit_status: int | None
    output: str
    seconds: float

    @property
    def succeeded(self) -> bool:
        return self.result == "succeeded"

    @property
    def reason(self) -> str | None:
        """Why it did not succeed, in one line (None when it did)."""
        if self.result == "succeeded":
            return None
        if self.result == "timed-out":
            return f"timed out after {self.seconds:.3g} s"
        if self.result == "not-started":
            return f"could not start: {self.output.splitlines()[-1] if self.output else '?'}"
        said = self.output.strip().splitlines()[-1][:200] if self.output.strip() else "no output"
        return f"exited with status {self.exit_status}: {said}"

    def detail(self) -> dict[str, object]:
        return {
            "exit_status": self.exit_status,
            "output": self.output,
            "seconds": round(self.seconds, 3),
        }


class L1Runner:
    def __init__(self, command: Sequence[str], *, timeout: float = 300.0) -> None:
        if not any("{action}" in part for part in command):
            raise ValueError('the L1 command must contain "{action}"')
        self.command = tuple(command)
        self.timeout = timeout

    def argv(self, action: str) -> list[str]:
        if action not in ALLOWED_ACTIONS:
            raise ActionNotAllowedError(f"L1 action {action!r} is not allow-listed")
        return [part.replace("{action}", action) for part in self.command]

    async def run(self, action: str) -> ActionOutcome:
        """Run one allow-listed action. Raises :class:`ActionNotAllowedError`
        for any other name; every other failure is an outcome, not an error."""
        argv = self.argv(action)
        started = time.monotonic()
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                # Its own process group: a timeout kills what it started too.
                start_new_session=True,
            )
        except OSError as exc:
            return ActionOutcome(
                action, "not-started", None, str(exc)[:MAX_OUTPUT_CHARS], time.monotonic() - started
            )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), self.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.communicate()
            return ActionOutcome(action, "timed-out", None, "", time.monotonic() - started)
        text = output.decode(errors="replace").strip()[-MAX_OUTPUT_CHARS:]
        status = process.returncode
        result = "succeeded" if status == 0 else "failed"
        if result == "failed":
            log.warning("L1 action %s exited with %s: %s", action, status, text[:200])
        return ActionOutcome(action, result, status, text, time.monotonic() - started)
