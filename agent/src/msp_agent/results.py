"""The latest result of every check, for the service and ``msp-agent status``.

``check-results.json`` in the state directory holds, per runbook (the
``check_id`` of its evidence): the result of its last run, the one-line
reason of a ``fail`` or ``error``, when it ran, since when the result has
been the same, and the last outcome of the runbook's L1 action. The audit
trail keeps every run and every action; this file keeps only the latest
state, rewritten whole and atomically. The service reads it at start, so a
restart does not raise (and text) the same failing check again;
``msp-agent status``, another process, reads it to say what fails and why.

An older agent wrote ``{runbook: result}`` alone: it still loads, without
reasons or times.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from msp_agent.files import write_atomic
from msp_protocol.encoding import format_time

RESULTS_FILE = "check-results.json"
FORMAT_VERSION = 1
# Outcomes of an L1 action that did not do what it was for.
FAILED_OUTCOMES = frozenset({"failed", "timed-out", "not-started", "refused"})


@dataclass(frozen=True, slots=True)
class ActionRecord:
    """The last L1 action run for a runbook."""

    action: str
    outcome: str  # "succeeded", or one of FAILED_OUTCOMES
    reason: str | None
    at: str


@dataclass(frozen=True, slots=True)
class CheckRecord:
    result: str
    reason: str | None = None
    at: str | None = None
    since: str | None = None
    action: ActionRecord | None = None


def next_record(
    previous: CheckRecord | None,
    result: str,
    reason: str | None,
    at: datetime,
    action: ActionRecord | None,
) -> CheckRecord:
    """The record after a run. A failed action stays on record while its
    check keeps failing (status keeps showing it) and is dropped once the
    check passes: the problem it was for is gone."""
    when = format_time(at)
    same = previous is not None and previous.result == result
    since = previous.since if same and previous is not None else when
    if action is None and result != "pass" and previous is not None:
        action = previous.action
    return CheckRecord(result, reason, when, since, action)


def read_results(state_dir: Path) -> dict[str, CheckRecord]:
    """The records in ``state_dir``; none when the file is absent or not
    one this code reads. Raises :class:`OSError` (``PermissionError``) when
    it is there but cannot be read."""
    try:
        loaded = json.loads((state_dir / RESULTS_FILE).read_bytes())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return {}
    if not isinstance(loaded, dict):
        return {}
    if loaded.get("version") == FORMAT_VERSION and isinstance(loaded.get("checks"), dict):
        records = {}
        for check_id, value in loaded["checks"].items():
            record = _record(value)
            if record is not None:
                records[str(check_id)] = record
        return records
    return {str(k): CheckRecord(v) for k, v in loaded.items() if isinstance(v, str)}


def write_results(state_dir: Path, records: dict[str, CheckRecord]) -> None:
    document = {
        "version": FORMAT_VERSION,
        "checks": {check_id: _wire(record) for check_id, record in sorted(records.items())},
    }
    write_atomic(
        state_dir / RESULTS_FILE, json.dumps(document, indent=1).encode() + b"\n", mode=0o640
    )


def failing_checks(records: dict[str, CheckRecord]) -> list[dict[str, Any]]:
    """``{check_id, result, reason, since, at}`` of every check whose last
    result is ``fail`` or ``error``."""
    return [
        {
            "check_id": check_id,
            "result": record.result,
            "reason": record.reason,
            "since": record.since,
            "at": record.at,
        }
        for check_id, record in sorted(records.items())
        if record.result in ("fail", "error")
    ]


def failed_actions(records: dict[str, CheckRecord]) -> list[dict[str, Any]]:
    """``{action, check_id, outcome, reason, at}`` of every L1 action whose
    last outcome is a failure or a refusal."""
    return [
        {
            "action": record.action.action,
            "check_id": check_id,
            "outcome": record.action.outcome,
            "reason": record.action.reason,
            "at": record.action.at,
        }
        for check_id, record in sorted(records.items())
        if record.action is not None and record.action.outcome in FAILED_OUTCOMES
    ]


def _wire(record: CheckRecord) -> dict[str, Any]:
    action = record.action
    return {
        "result": record.result,
        "reason": record.reason,
        "at": record.at,
        "since": record.since,
        "l1": None
        if action is None
        else {
            "action": action.action,
            "outcome": action.outcome,
            "reason": action.reason,
            "at": action.at,
        },
    }


def _record(value: Any) -> CheckRecord | None:
    if not isinstance(value, dict) or not isinstance(value.get("result"), str):
        return None
    l1 = value.get("l1")
    action = None
    if isinstance(l1, dict) and all(isinstance(l1.get(k), str) for k in ("action", "outcome")):
        action = ActionRecord(
            l1["action"], l1["outcome"], _text(l1.get("reason")), str(l1.get("at", ""))
        )
    return CheckRecord(
        value["result"],
        _text(value.get("reason")),
        _text(value.get("at")),
        _text(value.get("since")),
        action,
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
