"""The summary of an auditor package: each control's state, from the evidence.

The central server writes the summary of a package with
:func:`summarise_evidence`; an auditor's check recomputes it with the same
function from the bundles that verified, and :func:`control_difference`
names the first field where the server's summary says otherwise. Per
(framework, control): the bundles listing it, counted by result, and the
state at the end of the period, by the rule the central server's posture
uses:

- each (appliance, check) pair speaks through its newest bundle (max by
  the generation of the log recording it, log_index, the appliance's own
  order, then bundle_id), for the controls that bundle lists;
- that bundle reads ``stale`` when it is older than ``freshness_seconds`` at
  the end of the period, else by its result: ``passing``, ``failing``,
  ``error`` or ``not_applicable``;
- the control takes the worst of them (failing, error, stale, passing,
  not_applicable), and ``latest`` names the bundle behind it: the newest of
  those in that state (max by collected_at, appliance_id, bundle_id);
- without a bundle the state is ``no-evidence``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Annotated, Any, Final, Literal, Self

from pydantic import Field, StrictInt, StringConstraints, model_serializer, model_validator

from msp_protocol.encoding import Identifier, Timestamp, format_time
from msp_protocol.evidence import CheckId, CheckResult, ControlId, EvidenceBundle, FrameworkId
from msp_protocol.model import WireModel

ControlState = Literal["passing", "failing", "error", "not_applicable", "stale", "no-evidence"]
STATE_OF_RESULT: Final[dict[str, ControlState]] = {
    "pass": "passing",
    "fail": "failing",
    "error": "error",
    "not_applicable": "not_applicable",
}
# Worst first: the state a control takes when its checks disagree.
SEVERITY: Final[dict[ControlState, int]] = {
    "failing": 0,
    "error": 1,
    "stale": 2,
    "passing": 3,
    "not_applicable": 4,
}
Count = Annotated[StrictInt, Field(ge=0)]
Title = Annotated[str, StringConstraints(strict=True, max_length=1024)]


class ResultCounts(WireModel):
    """How many bundles gave each result. On the wire the names are the
    results themselves (``pass`` is a Python keyword, hence the aliases)."""

    document_name = "result counts"

    passed: Annotated[Count, Field(alias="pass")]
    failed: Annotated[Count, Field(alias="fail")]
    errors: Annotated[Count, Field(alias="error")]
    not_applicable: Annotated[Count, Field(alias="not_applicable")]

    def by_result(self) -> dict[str, int]:
        return {
            "pass": self.passed,
            "fail": self.failed,
            "error": self.errors,
            "not_applicable": self.not_applicable,
        }

    @model_serializer
    def _on_the_wire(self) -> dict[str, int]:
        return self.by_result()


class LatestEvidence(WireModel):
    """The bundle a control's state rests on (see the module docstring)."""

    document_name = "latest evidence"

    bundle_id: Identifier
    appliance_id: Identifier
    check_id: CheckId
    result: CheckResult
    collected_at: Timestamp
    reason: Annotated[str, StringConstraints(strict=True)] | None = None  # observed["reason"]


class ControlSummary(WireModel):
    document_name = "control summary"

    framework: FrameworkId
    control_id: ControlId
    title: Title  # the server's catalogue: not verifiable
    state: ControlState
    counts: ResultCounts  # bundles in the package listing this control under this framework
    latest: LatestEvidence | None = None


class PackageSummary(WireModel):
    document_name = "package summary"

    # Evidence older than this at period_end makes its control "stale".
    freshness_seconds: Annotated[StrictInt, Field(gt=0, le=10 * 365 * 86400)]
    # Grouped by framework (ascending), each framework's controls in the
    # server's order.
    controls: tuple[ControlSummary, ...]
    # Bundles of the period the server holds but cannot prove yet (their
    # entries not yet witnessed): the server's word, not verifiable.
    unwitnessed_bundles: Count

    @model_validator(mode="after")
    def _grouped_and_unique(self) -> Self:
        seen: set[tuple[str, str]] = set()
        previous = ""
        for control in self.controls:
            if control.framework < previous:
                raise ValueError("controls are not grouped by framework in ascending order")
            previous = control.framework
            pair = (control.framework, control.control_id)
            if pair in seen:
                raise ValueError(
                    f"control {control.framework} {control.control_id} is listed twice"
                )
            seen.add(pair)
        return self


def _newest_key(bundle: EvidenceBundle) -> tuple[datetime, str, str]:
    return (bundle.collected_at, bundle.appliance_id, bundle.bundle_id)


def summarise_evidence(
    bundles: Iterable[EvidenceBundle],
    controls: Sequence[tuple[str, str, str]],
    *,
    period_end: datetime,
    freshness_seconds: int,
    unwitnessed: int = 0,
    generation_of: Callable[[EvidenceBundle], int] | None = None,
) -> PackageSummary:
    """The summary of ``bundles`` for ``controls`` ((framework, control id,
    title), in the order to list them: grouped by framework, ascending).

    Per control: the bundles listing it under its framework, counted by
    result; the newest of them (max by collected_at, appliance_id,
    bundle_id); and the state: ``no-evidence`` without a bundle, ``stale``
    when the newest is older than ``freshness_seconds`` at ``period_end``,
    else the newest bundle's result. A bundle's controls outside
    ``controls`` are not counted. ``generation_of`` says which generation
    of its appliance's log records a bundle (default: 1 for all); a later
    generation's bundles are newer than any of an earlier one. One pass over the bundles. Raises
    :class:`ModelError` for controls of the wrong shape.
    """
    position = {(framework, control_id): i for i, (framework, control_id, _) in enumerate(controls)}
    counts = [dict.fromkeys(STATE_OF_RESULT, 0) for _ in controls]
    # (appliance, check) -> that pair's newest bundle, by log position (the
    # appliance's own order: a clock that jumped ahead cannot freeze it)
    newest: dict[tuple[str, str], EvidenceBundle] = {}

    def order(bundle: EvidenceBundle) -> tuple[int, int, str]:
        generation = generation_of(bundle) if generation_of is not None else 1
        return (generation, bundle.log_index, bundle.bundle_id)

    for bundle in bundles:
        for framework, control_ids in bundle.controls.items():
            for control_id in dict.fromkeys(control_ids):
                i = position.get((framework, control_id))
                if i is not None:
                    counts[i][bundle.result] += 1
        pair = (bundle.appliance_id, bundle.check_id)
        current = newest.get(pair)
        if current is None or order(bundle) > order(current):
            newest[pair] = bundle
    fresh = timedelta(seconds=freshness_seconds)
    deciding: list[tuple[tuple[int, datetime, str, str], ControlState, EvidenceBundle] | None]
    deciding = [None] * len(controls)
    for bundle in newest.values():
        stale = period_end - bundle.collected_at > fresh
        state: ControlState = "stale" if stale else STATE_OF_RESULT[bundle.result]
        rank = (-SEVERITY[state], *_newest_key(bundle))
        for framework, control_ids in bundle.controls.items():
            for control_id in dict.fromkeys(control_ids):
                i = position.get((framework, control_id))
                if i is None:
                    continue
                held = deciding[i]
                if held is None or rank > held[0]:
                    deciding[i] = (rank, state, bundle)
    summaries: list[dict[str, Any]] = []
    for (framework, control_id, title), count, decided in zip(
        controls, counts, deciding, strict=True
    ):
        summary: dict[str, Any] = {
            "framework": framework,
            "control_id": control_id,
            "title": title,
            "counts": count,
            "state": "no-evidence",
        }
        if decided is not None:
            _rank, state, latest = decided
            reason = latest.observed.get("reason")
            summary["latest"] = {
                "bundle_id": latest.bundle_id,
                "appliance_id": latest.appliance_id,
                "check_id": latest.check_id,
                "result": latest.result,
                "collected_at": latest.collected_at,
                "reason": reason if isinstance(reason, str) else None,
            }
            summary["state"] = state
        summaries.append(summary)
    return PackageSummary.from_wire(
        {
            "freshness_seconds": freshness_seconds,
            "controls": summaries,
            "unwitnessed_bundles": unwitnessed,
        }
    )


def control_difference(says: ControlSummary, holds: ControlSummary) -> str | None:
    """How the claimed summary of one control differs from the recomputed
    one, first difference first; None when they agree."""
    for result in STATE_OF_RESULT:
        claimed, actual = says.counts.by_result()[result], holds.counts.by_result()[result]
        if claimed != actual:
            return f"counts say {claimed} {result}, the package holds {actual}"
    if says.latest != holds.latest:
        if says.latest is None or holds.latest is None:
            said = "none" if says.latest is None else f"bundle {says.latest.bundle_id}"
            held = "none" if holds.latest is None else f"bundle {holds.latest.bundle_id}"
            return f"latest says {said}, the package's newest is {held}"
        for name in LatestEvidence.model_fields:
            claimed_value, actual_value = getattr(says.latest, name), getattr(holds.latest, name)
            if claimed_value != actual_value:
                return (
                    f"latest {name} says {_shown(claimed_value)}, the package's newest bundle "
                    f"({holds.latest.bundle_id}) has {_shown(actual_value)}"
                )
    if says.state != holds.state:
        return f"state says {says.state}, the package's evidence makes it {holds.state}"
    return None


def _shown(value: object) -> str:
    if isinstance(value, datetime):
        return format_time(value)
    return "none" if value is None else str(value)


__all__ = [
    "SEVERITY",
    "STATE_OF_RESULT",
    "ControlState",
    "ControlSummary",
    "LatestEvidence",
    "PackageSummary",
    "ResultCounts",
    "control_difference",
    "summarise_evidence",
]
