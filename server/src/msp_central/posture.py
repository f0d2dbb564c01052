"""Compliance posture: per site, framework and control, the state that the
latest signed evidence shows, derived from the stored evidence only.

The rule, for one control of one framework at a site, at a time ``at``:

- every (appliance, check) pair speaks through its newest bundle (by log
  position, the appliance's own order) collected at or before ``at``, for
  the controls that bundle's signed ``controls`` list (what was signed is
  what counts); revoked appliances count only up to their revocation, and a
  bundle its witnessed log entry contradicts counts not at all;
- each such bundle reads as ``stale`` when it is older than its appliance's
  freshness window (``STALE_AFTER_ROUNDS`` check intervals, the interval
  being what the appliance last reported in its heartbeat, else the
  server's default), otherwise by its result: pass → ``passing``, fail →
  ``failing``, error → ``error``, not_applicable → ``not_applicable``;
- the control takes the worst of them (failing, error, stale, passing,
  not_applicable) and names the bundle behind it, the newest of that state;
- with no bundle at all, a control that a runbook of the site's tier covers
  is ``stale`` (no recent evidence), one that none covers is ``manual``;
- a document a partner attached to the control (manual evidence) counts from
  when it was attached until it expires: it makes a ``manual`` control
  ``passing``, and is shown beside the state of an automated one, which
  the signed evidence alone decides.

A framework's score is the share of passing controls among those that
automated evidence decides (passing, failing, error, stale), in percent;
manual and not_applicable controls are counted, never scored. The trend is
the same rule evaluated at the end of each UTC day, over the site's current
framework selection (settings are not versioned; evidence is).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central.catalogue import Tier
from msp_central.collector import collector_paused
from msp_central.db.tables import (
    appliances,
    control_runbook_mapping,
    controls,
    evidence,
    evidence_heads,
    frameworks,
    manual_evidence,
    runbooks,
)
from msp_central.evidence_heads import NOT_CONTRADICTED

ControlState = Literal["passing", "failing", "error", "stale", "manual", "not_applicable"]
STATES: Final[tuple[ControlState, ...]] = (
    "passing",
    "failing",
    "error",
    "stale",
    "manual",
    "not_applicable",
)
# Worst first: the state a control takes when its checks disagree.
_SEVERITY: Final[dict[ControlState, int]] = {
    "failing": 0,
    "error": 1,
    "stale": 2,
    "passing": 3,
    "not_applicable": 4,
}
_BY_RESULT: Final[dict[str, ControlState]] = {
    "pass": "passing",
    "fail": "failing",
    "error": "error",
    "not_applicable": "not_applicable",
}
SCORED: Final[frozenset[ControlState]] = frozenset({"passing", "failing", "error", "stale"})

# Evidence older than this many of its appliance's check intervals is stale:
# one missed round is a slow round, three is an appliance not checking.
STALE_AFTER_ROUNDS: Final = 3
# The agent's default check interval, for appliances that never said theirs.
DEFAULT_CHECK_INTERVAL: Final = timedelta(seconds=900)
_DEFAULT_WINDOW: Final = DEFAULT_CHECK_INTERVAL * STALE_AFTER_ROUNDS


@dataclass(frozen=True, slots=True)
class CatalogueControl:
    framework_id: str
    control_id: str
    title: str
    # The checks of the runbooks mapped to this control that the site's tier
    # runs; empty: no check covers it (manual evidence only).
    checks: frozenset[str]


@dataclass(frozen=True)
class FrameworkControls:
    """One framework's controls for one tier, in catalogue order, and the
    state each has while no evidence or document speaks for it: worked out
    once and shared by every site that uses the framework at that tier."""

    controls: tuple[CatalogueControl, ...]

    @cached_property
    def unobserved(self) -> tuple[ControlPosture, ...]:
        return tuple(_control_posture(c, []) for c in self.controls)

    @cached_property
    def counts(self) -> dict[ControlState, int]:
        return _count(self.unobserved)

    @cached_property
    def position(self) -> dict[str, int]:
        """Control id -> its place in ``controls``."""
        return {control.control_id: n for n, control in enumerate(self.controls)}


@dataclass(frozen=True)
class SiteCatalogue:
    """The controls of a site's frameworks, in catalogue order."""

    frameworks: dict[str, str]  # id -> name, in catalogue order
    controls: tuple[CatalogueControl, ...]
    # Each framework's part, when the catalogue reader prepared (and shares)
    # them; made from ``controls`` on first use otherwise.
    prepared: Mapping[str, FrameworkControls] | None = field(
        default=None, compare=False, repr=False
    )

    @cached_property
    def layout(self) -> Mapping[str, FrameworkControls]:
        if self.prepared is not None:
            return self.prepared
        own: dict[str, list[CatalogueControl]] = {fid: [] for fid in self.frameworks}
        for control in self.controls:
            own[control.framework_id].append(control)
        return {fid: FrameworkControls(tuple(controls)) for fid, controls in own.items()}


# Not frozen: a partner's roll-up builds tens of thousands of these, and a
# frozen dataclass's __init__ costs several times as much. Nothing changes one.
@dataclass(slots=True)
class Observation:
    """One stored evidence bundle, as much of it as posture needs."""

    appliance_id: str
    bundle_id: str
    check_id: str
    result: str
    controls: Mapping[str, Sequence[str]]
    collected_at: datetime
    log_index: int
    signed_after_expiry: bool
    in_log: bool | None
    reason: str | None = None  # the signed ``observed.reason``, when read
    # The generation of the appliance's log recording it: a later one's
    # bundles are newer than any of an earlier one (ADR 0016).
    log_generation: int = 1
    # ``controls`` as (framework id, control id) pairs, when the reader
    # worked them out once for every bundle mapping the same controls.
    control_keys: tuple[tuple[str, str], ...] | None = None

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The (framework id, control id) pairs the bundle speaks for."""
        if self.control_keys is None:
            return _control_keys(self.controls)
        return self.control_keys

    @property
    def position(self) -> tuple[int, int]:
        """Where the appliance logged it, in the appliance's own order."""
        return (self.log_generation, self.log_index)


def _control_keys(controls: Mapping[str, Sequence[str]]) -> tuple[tuple[str, str], ...]:
    return tuple((framework_id, c) for framework_id, ids in controls.items() for c in ids)


@dataclass(frozen=True, slots=True)
class Attachment:
    """Manual evidence: a document attached to a control of a site."""

    id: str
    framework_id: str
    control_id: str
    filename: str
    sha256: str
    attached_by: str
    attached_at: datetime
    expires_at: datetime | None
    log_index: int  # its entry in the central log

    def in_force(self, at: datetime) -> bool:
        return self.attached_at <= at and (self.expires_at is None or at < self.expires_at)


@dataclass(frozen=True, slots=True)
class ControlPosture:
    framework_id: str
    control_id: str
    title: str
    automated: bool
    state: ControlState
    evidence: Observation | None  # the bundle behind the state
    checks: int  # how many (appliance, check) pairs gave evidence
    attachment: Attachment | None = None  # the newest manual evidence in force


@dataclass(frozen=True, slots=True)
class FrameworkPosture:
    framework_id: str
    name: str
    counts: dict[ControlState, int]
    score: int | None  # percent; None when no control is decided by evidence
    controls: tuple[ControlPosture, ...]


@dataclass(slots=True)
class Freshness:
    """Each appliance's freshness window, and when it was revoked."""

    windows: dict[str, timedelta] = field(default_factory=dict)
    revoked_at: dict[str, datetime] = field(default_factory=dict)

    def window(self, appliance_id: str) -> timedelta:
        return self.windows.get(appliance_id, _DEFAULT_WINDOW)

    def counts_at(self, appliance_id: str, at: datetime) -> bool:
        revoked = self.revoked_at.get(appliance_id)
        return revoked is None or revoked > at


def evaluate(
    catalogue: SiteCatalogue,
    latest: Iterable[Observation],
    *,
    at: datetime,
    freshness: Freshness,
    attachments: Iterable[Attachment] = (),
) -> list[FrameworkPosture]:
    """The posture of one site at ``at`` from the newest bundle of each
    (appliance, check) pair and the manual evidence in force (see the module
    docstring for the rule)."""
    attached: dict[tuple[str, str], Attachment] = {}
    for attachment in attachments:
        if not attachment.in_force(at):
            continue
        key = (attachment.framework_id, attachment.control_id)
        held = attached.get(key)
        if held is None or (attachment.attached_at, attachment.id) > (held.attached_at, held.id):
            attached[key] = attachment
    # Each bundle judged once, then filed under every control it speaks for.
    by_control: dict[tuple[str, str], list[_Judged]] = defaultdict(list)
    for observation in latest:
        if not freshness.counts_at(observation.appliance_id, at):
            continue
        state = observation_state(observation, at, freshness)
        # Worst state first; among equals the newest bundle speaks.
        judged = (
            (-_SEVERITY[state], observation.collected_at, observation.bundle_id),
            state,
            observation,
        )
        for key in observation.pairs():
            by_control[key].append(judged)
    # Controls nothing speaks for keep the state they have without evidence
    # (shared by every site of the catalogue); only the others are judged.
    layout = catalogue.layout
    grouped = {fid: list(part.unobserved) for fid, part in layout.items()}
    counts = {fid: dict(part.counts) for fid, part in layout.items()}
    for key in by_control.keys() | attached.keys():
        framework_id, control_id = key
        part = layout.get(framework_id)
        if part is None or control_id not in part.position:
            continue  # a framework or control this site does not use
        place = part.position[control_id]
        posture = _control_posture(part.controls[place], by_control.get(key, []))
        document = attached.get(key)
        if document is not None:
            shown: ControlState = "passing" if posture.state == "manual" else posture.state
            posture = replace(posture, state=shown, attachment=document)
        counts[framework_id][grouped[framework_id][place].state] -= 1
        counts[framework_id][posture.state] += 1
        grouped[framework_id][place] = posture
    return [
        FrameworkPosture(fid, name, counts[fid], score_of(counts[fid]), tuple(grouped[fid]))
        for fid, name in catalogue.frameworks.items()
    ]


# A bundle as one control's evidence: its rank (worst state, then newest),
# its state at the time asked, the bundle.
_Judged = tuple[tuple[int, datetime, str], ControlState, Observation]


def _control_posture(control: CatalogueControl, found: list[_Judged]) -> ControlPosture:
    automated = bool(control.checks) or bool(found)
    if not found:
        return ControlPosture(
            control.framework_id,
            control.control_id,
            control.title,
            automated,
            "stale" if automated else "manual",
            None,
            0,
        )
    _, state, observation = max(found, key=_rank) if len(found) > 1 else found[0]
    return ControlPosture(
        control.framework_id,
        control.control_id,
        control.title,
        automated,
        state,
        observation,
        len(found),
    )


def _rank(judged: _Judged) -> tuple[int, datetime, str]:
    return judged[0]


def observation_state(observation: Observation, at: datetime, freshness: Freshness) -> ControlState:
    if at - observation.collected_at > freshness.window(observation.appliance_id):
        return "stale"
    return _BY_RESULT.get(observation.result, "error")


def _count(posture: Iterable[ControlPosture]) -> dict[ControlState, int]:
    counts: dict[ControlState, int] = dict.fromkeys(STATES, 0)
    for control in posture:
        counts[control.state] += 1
    return counts


def score_of(counts: Mapping[ControlState, int]) -> int | None:
    """The share of passing controls among those evidence decides, in
    percent; None when evidence decides none."""
    decided = sum(counts[state] for state in SCORED)
    return round(100 * counts["passing"] / decided) if decided else None


# --- the trend --------------------------------------------------------------------------


def day_ends(now: datetime, days: int) -> list[datetime]:
    """The ends (next UTC midnight) of the last ``days`` days, oldest first;
    today's end is ``now`` itself."""
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    ends = [today - timedelta(days=back) for back in range(days - 2, -1, -1)]
    return [*ends, now]


def trend(
    catalogue: SiteCatalogue,
    seed: Iterable[Observation],
    rows: Iterable[Observation],
    *,
    ends: Sequence[datetime],
    freshness: Freshness,
    attachments: Sequence[Attachment] = (),
) -> list[tuple[datetime, list[FrameworkPosture]]]:
    """The posture at each of ``ends`` (ascending). ``seed`` is the newest
    bundle of each (appliance, check) pair before the first day, ``rows``
    every later bundle in ascending ``collected_at`` order: one pass."""
    latest: dict[tuple[str, str], Observation] = {(o.appliance_id, o.check_id): o for o in seed}
    pending = iter(rows)
    upcoming = next(pending, None)
    points = []
    for end in ends:
        while upcoming is not None and upcoming.collected_at <= end:
            key = (upcoming.appliance_id, upcoming.check_id)
            held = latest.get(key)
            if held is None or upcoming.position > held.position:
                latest[key] = upcoming
            upcoming = next(pending, None)
        points.append(
            (
                end,
                evaluate(
                    catalogue,
                    latest.values(),
                    at=end,
                    freshness=freshness,
                    attachments=attachments,
                ),
            )
        )
    return points


# --- queries ----------------------------------------------------------------------------


async def site_catalogue(
    connection: AsyncConnection, framework_ids: Sequence[str], tier: Tier
) -> SiteCatalogue:
    """The controls of ``framework_ids`` and which checks of ``tier`` cover each."""
    return (await catalogue_reader(connection))(framework_ids, tier)


async def catalogue_reader(
    connection: AsyncConnection,
) -> Callable[[Sequence[str], Tier], SiteCatalogue]:
    """The whole catalogue read once (three small queries), and a function
    giving any site's part of it: an answer about many sites with different
    selections would otherwise query the catalogue once per selection."""
    framework_rows = (
        await connection.execute(
            sa.select(frameworks.c.id, frameworks.c.name).order_by(frameworks.c.position)
        )
    ).all()
    control_rows = (await connection.execute(sa.select(controls))).all()
    mapping_rows = (
        await connection.execute(
            sa.select(
                control_runbook_mapping.c.framework_id,
                control_runbook_mapping.c.control_id,
                runbooks.c.check_name,
                runbooks.c.tier,
            ).join(runbooks, runbooks.c.id == control_runbook_mapping.c.runbook_id)
        )
    ).all()
    order = {row.id: i for i, row in enumerate(framework_rows)}
    names = {row.id: row.name for row in framework_rows}
    rows_of: dict[str, list[Any]] = defaultdict(list)
    for row in sorted(
        (row for row in control_rows if row.framework_id in order),
        key=lambda row: (order[row.framework_id], row.position),
    ):
        rows_of[row.framework_id].append(row)
    covering: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for row in mapping_rows:
        covering[row.framework_id, row.control_id].append(row)
    blocks: dict[tuple[str, Tier], FrameworkControls] = {}
    made: dict[tuple[tuple[str, ...], Tier], SiteCatalogue] = {}

    def block(framework_id: str, tier: Tier) -> FrameworkControls:
        """One framework's controls, with the checks of ``tier`` covering each."""
        if (framework_id, tier) not in blocks:
            blocks[framework_id, tier] = FrameworkControls(
                tuple(
                    CatalogueControl(
                        framework_id,
                        row.control_id,
                        row.title,
                        frozenset(
                            mapped.check_name
                            for mapped in covering.get((framework_id, row.control_id), ())
                            if tier != Tier.BASIC or mapped.tier == Tier.BASIC
                        ),
                    )
                    for row in rows_of.get(framework_id, ())
                )
            )
        return blocks[framework_id, tier]

    def part(framework_ids: Sequence[str], tier: Tier) -> SiteCatalogue:
        chosen = tuple(sorted(set(framework_ids) & names.keys(), key=order.__getitem__))
        if (chosen, tier) not in made:
            parts = {fid: block(fid, tier) for fid in chosen}
            made[chosen, tier] = SiteCatalogue(
                frameworks={fid: names[fid] for fid in chosen},
                controls=tuple(c for part in parts.values() for c in part.controls),
                prepared=parts,
            )
        return made[chosen, tier]

    return part


async def site_freshness(connection: AsyncConnection, site_ids: Sequence[str]) -> Freshness:
    """Each appliance's freshness window (from the check interval its last
    heartbeat reported) and revocation time, for the given sites."""
    # Only the one value of each heartbeat, as an integer (ingest stores it
    # as a validated integer): a thousand sites' appliances.
    interval = appliances.c.heartbeat["check_interval_seconds"].as_integer()
    rows = (
        await connection.execute(
            sa.select(appliances.c.id, interval.label("interval"), appliances.c.revoked_at).where(
                appliances.c.site_id.in_(list(site_ids))
            )
        )
    ).all()
    freshness = Freshness()
    for row in rows:
        interval = row.interval
        if isinstance(interval, int) and not isinstance(interval, bool) and interval > 0:
            freshness.windows[row.id] = timedelta(seconds=interval) * STALE_AFTER_ROUNDS
        if row.revoked_at is not None:
            freshness.revoked_at[row.id] = row.revoked_at
    return freshness


_COLUMNS = (
    evidence.c.site_id,
    evidence.c.appliance_id,
    evidence.c.bundle_id,
    evidence.c.check_id,
    evidence.c.result,
    evidence.c.controls,
    evidence.c.collected_at,
    evidence.c.log_generation,
    evidence.c.log_index,
    evidence.c.signed_after_expiry,
    evidence.c.in_log,
)


def _observation(row: Any) -> Observation:
    return Observation(
        appliance_id=row.appliance_id,
        bundle_id=row.bundle_id,
        check_id=row.check_id,
        result=row.result,
        controls=row.controls,
        collected_at=row.collected_at,
        log_index=int(row.log_index),
        signed_after_expiry=bool(row.signed_after_expiry),
        in_log=row.in_log,
        log_generation=int(row.log_generation),
    )


async def latest_evidence(
    connection: AsyncConnection,
    site_ids: Sequence[str],
    *,
    with_reasons: bool = False,
    reasons_of: frozenset[str] | None = None,
) -> dict[str, list[Observation]]:
    """Per site, the head of each (appliance, check) pair now (see
    :mod:`msp_central.evidence_heads`), with each bundle's reason when
    ``with_reasons``: ``reasons_of`` limits those to bundles of these
    results, for an answer that shows the reason of a few (the partner
    roll-up shows only failing controls)."""
    # The columns come as the driver gives them, converted below: the
    # generic result processing (a JSON parse per row, a datetime parse and
    # a zone per row) was two thirds of the read for a partner's roll-up.
    # Controls are parsed once per distinct value: a check maps to the same
    # controls in nearly every bundle.
    query = sa.select(
        evidence_heads.c.site_id,
        evidence_heads.c.appliance_id,
        evidence_heads.c.bundle_id,
        evidence_heads.c.check_id,
        evidence_heads.c.result,
        # Cast, not only typed: PostgreSQL's driver would decode JSON itself.
        sa.cast(evidence_heads.c.controls, sa.Text),
        sa.type_coerce(evidence_heads.c.collected_at, _Raw),
        evidence_heads.c.log_index,
        sa.type_coerce(evidence_heads.c.signed_after_expiry, _Raw),
        sa.type_coerce(evidence_heads.c.in_log, _Raw),
        evidence_heads.c.log_generation,
        evidence_heads.c.reason if with_reasons else sa.null(),
    ).where(evidence_heads.c.site_id.in_(list(site_ids)))
    rows = (await connection.execute(query)).all()
    with collector_paused():
        return _heads_by_site(rows, reasons_of)


def _heads_by_site(
    rows: Sequence[Any], reasons_of: frozenset[str] | None
) -> dict[str, list[Observation]]:
    found: dict[str, list[Observation]] = defaultdict(list)
    parsed: dict[str, tuple[Any, tuple[tuple[str, str], ...]]] = {}
    # Unpacked by position: attribute access by name is most of the cost of
    # the tens of thousands of rows of a partner's roll-up.
    for (
        site_id,
        appliance_id,
        bundle_id,
        check_id,
        result,
        mapped,
        collected_at,
        log_index,
        signed_after_expiry,
        in_log,
        generation,
        reason,
    ) in rows:
        held = parsed.get(mapped) if isinstance(mapped, str) else None
        if held is None:
            value = json.loads(mapped) if isinstance(mapped, str) else mapped
            held = (value, _control_keys(value))
            if isinstance(mapped, str):
                parsed[mapped] = held
        found[site_id].append(
            Observation(
                appliance_id,
                bundle_id,
                check_id,
                result,
                held[0],
                _utc(collected_at),
                int(log_index),
                bool(signed_after_expiry),
                None if in_log is None else bool(in_log),
                reason if reasons_of is None or result in reasons_of else None,
                int(generation),
                held[1],
            )
        )
    return found


class _Raw(sa.types.TypeDecorator[Any]):
    """A column read as the driver gives it, without result processing."""

    impl = sa.types.NullType
    cache_ok = True


def _utc(value: Any) -> datetime:
    """A stored time as UTCDateTime reads it: SQLite gives the text it
    keeps (UTC, without a zone), PostgreSQL a datetime with one."""
    if isinstance(value, str):  # parsed with its zone: cheaper than replace()
        return datetime.fromisoformat(value + "+00:00")
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
    return value.astimezone(UTC)  # type: ignore[no-any-return]


async def evidence_before(
    connection: AsyncConnection, site_id: str, before: datetime
) -> list[Observation]:
    """A site's heads as they stood at ``before``: the newest bundle of each
    (appliance, check) pair collected at or before it, not contradicted."""
    # Newest by log position, the appliance's own order: a clock that jumped
    # ahead once must not freeze a check's state. Ranked on the key columns
    # alone, which ix_evidence_latest holds: the bundles that lose are never
    # read from the table, only the winners are, by primary key.
    newest = sa.func.row_number().over(
        partition_by=(evidence.c.appliance_id, evidence.c.check_id),
        order_by=(
            evidence.c.log_generation.desc(),
            evidence.c.log_index.desc(),
            evidence.c.bundle_id.desc(),
        ),
    )
    ranked = (
        sa.select(evidence.c.appliance_id, evidence.c.bundle_id, newest.label("newest"))
        .where(
            evidence.c.site_id == site_id,
            NOT_CONTRADICTED,
            evidence.c.collected_at <= before,
        )
        .subquery()
    )
    query = (
        sa.select(*_COLUMNS)
        .join_from(
            evidence,
            ranked,
            sa.and_(
                evidence.c.appliance_id == ranked.c.appliance_id,
                evidence.c.bundle_id == ranked.c.bundle_id,
            ),
        )
        .where(ranked.c.newest == 1)
    )
    return [_observation(row) for row in (await connection.execute(query)).all()]


async def evidence_since(
    connection: AsyncConnection, site_id: str, since: datetime, until: datetime
) -> list[Observation]:
    """A site's bundles collected in (since, until], oldest first."""
    rows = (
        await connection.execute(
            sa.select(*_COLUMNS)
            .where(
                evidence.c.site_id == site_id,
                evidence.c.collected_at > since,
                evidence.c.collected_at <= until,
                NOT_CONTRADICTED,
            )
            .order_by(evidence.c.collected_at, evidence.c.bundle_id)
        )
    ).all()
    return [_observation(row) for row in rows]


async def site_attachments(
    connection: AsyncConnection, site_ids: Sequence[str]
) -> dict[str, list[Attachment]]:
    """Per site, every document attached to its controls (in force or not:
    the caller judges at its own time)."""
    rows = (
        await connection.execute(
            sa.select(
                manual_evidence.c.id,
                manual_evidence.c.site_id,
                manual_evidence.c.framework_id,
                manual_evidence.c.control_id,
                manual_evidence.c.filename,
                manual_evidence.c.sha256,
                manual_evidence.c.attached_by,
                manual_evidence.c.attached_at,
                manual_evidence.c.expires_at,
                manual_evidence.c.log_index,
            ).where(manual_evidence.c.site_id.in_(list(site_ids)))
        )
    ).all()
    found: dict[str, list[Attachment]] = defaultdict(list)
    for row in rows:
        found[row.site_id].append(
            Attachment(
                id=row.id,
                framework_id=row.framework_id,
                control_id=row.control_id,
                filename=row.filename,
                sha256=row.sha256,
                attached_by=row.attached_by,
                attached_at=row.attached_at,
                expires_at=row.expires_at,
                log_index=int(row.log_index),
            )
        )
    return found
