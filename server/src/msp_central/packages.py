"""The auditor package: a site's signed evidence for some frameworks and a
period, with what proves each bundle existed at its log position, in one
file ``msp-verify`` checks offline with only the central public key (the
format and its checker: :mod:`msp_protocol.package`).

What goes in, per appliance with a bundle in scope: the witnessed log from
the first such bundle's entry up to the first checkpoint the server
cosigned after the last one (the compact range of the tree before that
entry stands for everything earlier), that checkpoint and its receipt, and
the appliance's certificates; then every bundle whose entry is witnessed,
the latest revocation list, and a summary computed by the protocol's one
rule, which the checker recomputes. Bundles of the period whose entries are
not witnessed yet cannot be proven: they are left out and counted.

An appliance whose log was replaced during the period (a new generation,
ADR 0016) gets one segment per generation holding bundles in scope, each
proving its bundles against that generation's own entries and checkpoints.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central.db.tables import (
    appliances,
    audit_checkpoints,
    certificates,
    controls,
    evidence,
    frameworks,
)
from msp_central.exports import (
    certificate_rows,
    entry_bytes,
    envelope_of,
    latest_revocations,
    leaf_hashes,
    of_generation,
)
from msp_central.posture import DEFAULT_CHECK_INTERVAL, STALE_AFTER_ROUNDS, site_freshness
from msp_central.problems import Problem
from msp_central.queries import Row
from msp_protocol.dsse import Envelope
from msp_protocol.evidence import EvidenceBundle
from msp_protocol.limits import DEFAULT_LIMITS
from msp_protocol.merkle import TreeState
from msp_protocol.package import LogSegmentParts, build_auditor_package
from msp_protocol.summary import summarise_evidence

# A year and a day: an annual audit with its margin; longer asks are
# almost always a mistake and would build files of gigabytes.
MAX_PERIOD: Final = timedelta(days=366)
DEFAULT_PERIOD: Final = timedelta(days=90)
# No evidence predates the product; earlier times are typing mistakes.
EARLIEST_YEAR: Final = 2000


@dataclass(frozen=True, slots=True)
class PackageRequest:
    site_id: str
    frameworks: tuple[str, ...]  # sorted, unique, each one the site uses
    period_start: datetime
    period_end: datetime


def package_request(
    site: Row,
    partner: Row,
    *,
    frameworks: Sequence[str],
    start: datetime | None,
    end: datetime | None,
    now: datetime,
) -> PackageRequest:
    """The package asked for, checked: ``frameworks`` (default: every one
    the site uses) must be the site's; the period defaults to the 90 days
    up to ``now``. Raises ``malformed-query`` problems."""
    used = list(site.frameworks if site.frameworks is not None else partner.frameworks)
    wanted = list(frameworks) or used
    for framework_id in wanted:
        if framework_id not in used:
            raise Problem(
                "malformed-query", f"framework {framework_id[:32]!r} is not one this site uses"
            )
    if not wanted:
        # The request is well formed; the site's settings leave nothing to package.
        raise Problem("conflict", "the site uses no framework: name one with framework=")
    end = end or now
    if end.year < EARLIEST_YEAR or (start is not None and start.year < EARLIEST_YEAR):
        raise Problem("malformed-query", f"the period must lie after {EARLIEST_YEAR}")
    start = start or end - DEFAULT_PERIOD
    if end <= start:
        raise Problem("malformed-query", "the period must end after it starts")
    if end - start > MAX_PERIOD:
        raise Problem("malformed-query", f"the period is longer than {MAX_PERIOD.days} days")
    return PackageRequest(site.id, tuple(sorted(set(wanted))), start, end)


@dataclass(slots=True)
class _Held:
    appliance_id: str
    generation: int  # of the appliance's log
    log_index: int
    envelope: Envelope
    bundle: EvidenceBundle


def _parse_bundles(rows: Sequence[Any], scope: frozenset[str]) -> list[_Held]:
    """The stored bundles that list a framework in scope (CPU-bound)."""
    held = []
    for row in rows:
        if not scope.intersection(row.controls):
            continue
        envelope = envelope_of(row.envelope)
        bundle = EvidenceBundle.from_json(envelope.payload_bytes())
        held.append(
            _Held(row.appliance_id, int(row.log_generation), int(row.log_index), envelope, bundle)
        )
    # The format's order, by Python's string order (a database's collation
    # may sort identifiers otherwise).
    held.sort(key=lambda h: (h.appliance_id, h.generation, h.log_index))
    return held


async def _scope_controls(
    connection: AsyncConnection, scope: Sequence[str], bundles: Sequence[_Held]
) -> list[tuple[str, str, str]]:
    """(framework, control, title) grouped by framework id ascending, each
    framework's controls in catalogue order; a control a bundle lists that
    the catalogue does not know (an older catalogue's id) follows its
    framework's own, since the checker requires every listed one."""
    rows = (
        await connection.execute(
            sa.select(controls.c.framework_id, controls.c.control_id, controls.c.title)
            .join(frameworks, frameworks.c.id == controls.c.framework_id)
            .where(controls.c.framework_id.in_(list(scope)))
            .order_by(controls.c.framework_id, controls.c.position)
        )
    ).all()
    listed: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    known: set[tuple[str, str]] = set()
    for row in rows:
        listed[row.framework_id].append((row.framework_id, row.control_id, row.title))
        known.add((row.framework_id, row.control_id))
    for held in bundles:
        for framework_id, ids in held.bundle.controls.items():
            if framework_id not in scope:
                continue
            for control_id in ids:
                if (framework_id, control_id) not in known:
                    known.add((framework_id, control_id))
                    listed[framework_id].append(
                        (framework_id, control_id, "(not in the current catalogue)")
                    )
    return [control for framework_id in sorted(listed) for control in listed[framework_id]]


_NO_CUTOFF: Final = 2**63


async def _revocation_cutoffs(connection: AsyncConnection, site_id: str) -> dict[str, int]:
    """Serial -> revocation cutoff, for the revoked certificates of the site."""
    rows = await connection.execute(
        sa.select(certificates.c.serial, certificates.c.cutoff_size)
        .join(appliances, appliances.c.id == certificates.c.appliance_id)
        .where(appliances.c.site_id == site_id, certificates.c.revoked_at.is_not(None))
    )
    return {row.serial: int(row.cutoff_size or 0) for row in rows}


# (appliance id, generation of its log)
_Log = tuple[str, int]


async def _check_entries_fit(
    connection: AsyncConnection, spans: dict[_Log, tuple[int, int]]
) -> None:
    """Refuse before building what no verifier would read: more entries than
    one export may hold."""
    total = 0
    for (appliance_id, generation), (first, last) in spans.items():
        end = (
            await connection.execute(
                sa.select(sa.func.min(audit_checkpoints.c.size)).where(
                    of_generation(audit_checkpoints, appliance_id, generation),
                    audit_checkpoints.c.size > last,
                )
            )
        ).scalar_one()
        total += int(end or last + 1) - first
    if total > DEFAULT_LIMITS.max_export_entries:
        raise Problem(
            "export-too-large",
            f"the package would hold {total} log entries, at most "
            f"{DEFAULT_LIMITS.max_export_entries}: ask for a shorter period",
        )


async def _segment(
    connection: AsyncConnection, log: _Log, start: int, last: int
) -> LogSegmentParts:
    """The witnessed log of an appliance of one generation from ``start`` to
    the first cosigned checkpoint covering entry ``last``."""
    appliance_id, generation = log
    checkpoint = (
        await connection.execute(
            sa.select(audit_checkpoints)
            .where(
                of_generation(audit_checkpoints, appliance_id, generation),
                audit_checkpoints.c.size > last,
            )
            .order_by(audit_checkpoints.c.size)
            .limit(1)
        )
    ).one()
    end = int(checkpoint.size)
    prefix = TreeState()
    prefix.extend(await leaf_hashes(connection, appliance_id, start, generation=generation))
    held = await certificate_rows(connection, appliance_id)
    return LogSegmentParts(
        appliance_id=appliance_id,
        start=start,
        prefix=list(prefix.nodes),
        entries=await entry_bytes(connection, appliance_id, start, end, generation=generation),
        checkpoint=envelope_of(checkpoint.checkpoint),
        receipt=envelope_of(checkpoint.receipt),
        certificates=[envelope_of(row.envelope) for row in held.values()],
        generation=generation,
    )


async def auditor_package(
    connection: AsyncConnection, request: PackageRequest, now: datetime
) -> bytes:
    """The package's canonical bytes, for a request :func:`package_request`
    made (the caller checked the site is the partner's)."""
    scope = frozenset(request.frameworks)
    rows = (
        await connection.execute(
            sa.select(
                evidence.c.appliance_id,
                evidence.c.log_generation,
                evidence.c.log_index,
                evidence.c.controls,
                evidence.c.envelope,
                evidence.c.in_log,
                evidence.c.serial,
            )
            .where(
                evidence.c.site_id == request.site_id,
                evidence.c.collected_at >= request.period_start,
                evidence.c.collected_at < request.period_end,
            )
            .order_by(evidence.c.appliance_id, evidence.c.log_generation, evidence.c.log_index)
        )
    ).all()
    cutoffs = await _revocation_cutoffs(connection, request.site_id)
    # A bundle signed at or past its key's revocation cutoff is evidence of
    # nothing (the checker refuses it): left out like one not yet witnessed.
    witnessed = [
        row for row in rows if row.in_log and row.log_index < cutoffs.get(row.serial, _NO_CUTOFF)
    ]
    if len(witnessed) > DEFAULT_LIMITS.max_export_entries:
        raise Problem(
            "export-too-large",
            f"{len(witnessed)} bundles in the period, at most "
            f"{DEFAULT_LIMITS.max_export_entries} in one package: ask for a shorter period",
        )
    # Waiting for their entries to be witnessed (a contradicted one is not
    # waiting: its alert says why it is out).
    unwitnessed = sum(1 for row in rows if row.in_log is None and scope.intersection(row.controls))
    # Parsing and canonical encoding are CPU work: off the event loop.
    bundles = await asyncio.to_thread(_parse_bundles, witnessed, scope)

    by_log: dict[_Log, list[_Held]] = defaultdict(list)
    for held in bundles:
        by_log[(held.appliance_id, held.generation)].append(held)
    spans = {
        log: (found[0].log_index, found[-1].log_index) for log, found in sorted(by_log.items())
    }
    await _check_entries_fit(connection, spans)
    segments = [
        await _segment(connection, log, first, last) for log, (first, last) in spans.items()
    ]
    generation_of = {(h.appliance_id, h.bundle.bundle_id): h.generation for h in bundles}
    freshness = await site_freshness(connection, [request.site_id])
    window = max(freshness.windows.values(), default=DEFAULT_CHECK_INTERVAL * STALE_AFTER_ROUNDS)
    listed = await _scope_controls(connection, request.frameworks, bundles)
    # The list names every partner's revoked serials: only when it concerns
    # this site does it go out (and then it must, for the cutoffs).
    revocations = await latest_revocations(connection) if cutoffs else None

    def build() -> bytes:
        summary = summarise_evidence(
            (held.bundle for held in bundles),
            listed,
            period_end=request.period_end,
            freshness_seconds=int(window.total_seconds()),
            unwitnessed=unwitnessed,
            generation_of=lambda b: generation_of[(b.appliance_id, b.bundle_id)],
        )
        return build_auditor_package(
            site_id=request.site_id,
            frameworks=request.frameworks,
            period_start=request.period_start,
            period_end=request.period_end,
            generated_at=now,
            logs=segments,
            evidence=[held.envelope for held in bundles],
            revocations=revocations,
            summary=summary,
        )

    return await asyncio.to_thread(build)
