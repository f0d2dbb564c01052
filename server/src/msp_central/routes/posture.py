"""Compliance posture for partners: one site, control by control (also as an
OSCAL Assessment Results document); the roll-up across the partner's sites;
a site's daily trend. Everything is derived from the stored evidence at the
time of asking (:mod:`msp_central.posture`)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central.api_models import (
    AttachmentRefOut,
    ControlPostureOut,
    FrameworkPostureOut,
    FrameworkScoreOut,
    PostureEvidenceOut,
    PostureTrendOut,
    SitePostureOut,
    StateCounts,
    TrendPointOut,
)
from msp_central.auth import require_partner
from msp_central.catalogue import Tier
from msp_central.collector import collector_paused
from msp_central.context import central, download, json_response
from msp_central.db.engine import read_only
from msp_central.db.tables import sites
from msp_central.oscal import assessment_results
from msp_central.posture import (
    STATES,
    Attachment,
    ControlState,
    FrameworkPosture,
    Freshness,
    Observation,
    SiteCatalogue,
    catalogue_reader,
    day_ends,
    evaluate,
    evidence_before,
    evidence_since,
    latest_evidence,
    score_of,
    site_attachments,
    site_catalogue,
    site_freshness,
    trend,
)
from msp_central.problems import Problem
from msp_central.queries import Row, get_partner, get_site
from msp_protocol.canonical import canonicalize

routes = web.RouteTableDef()

MAX_TREND_DAYS = 90


def evidence_out(observation: Observation | None) -> PostureEvidenceOut | None:
    if observation is None:
        return None
    return PostureEvidenceOut(
        bundle_id=observation.bundle_id,
        appliance_id=observation.appliance_id,
        check_id=observation.check_id,
        result=observation.result,
        collected_at=observation.collected_at,
        log_index=observation.log_index,
        signed_after_expiry=observation.signed_after_expiry,
        in_log=observation.in_log,
        reason=observation.reason,
    )


def attachment_out(attachment: Attachment | None) -> AttachmentRefOut | None:
    if attachment is None:
        return None
    return AttachmentRefOut(
        id=attachment.id,
        filename=attachment.filename,
        sha256=attachment.sha256,
        attached_by=attachment.attached_by,
        attached_at=attachment.attached_at,
        expires_at=attachment.expires_at,
        log_index=attachment.log_index,
    )


def _counts(counts: dict[ControlState, int]) -> StateCounts:
    return StateCounts(**counts)


def score_out(posture: FrameworkPosture) -> FrameworkScoreOut:
    return FrameworkScoreOut(
        framework_id=posture.framework_id,
        name=posture.name,
        score=posture.score,
        counts=_counts(posture.counts),
    )


def framework_out(posture: FrameworkPosture) -> FrameworkPostureOut:
    return FrameworkPostureOut(
        framework_id=posture.framework_id,
        name=posture.name,
        score=posture.score,
        counts=_counts(posture.counts),
        controls=[
            ControlPostureOut(
                control_id=control.control_id,
                title=control.title,
                automated=control.automated,
                state=control.state,
                evidence=evidence_out(control.evidence),
                checks=control.checks,
                manual_evidence=attachment_out(control.attachment),
            )
            for control in posture.controls
        ],
    )


async def _catalogue_of(
    connection: AsyncConnection,
    site: Row,
    partner: Row,
    cache: dict[tuple[tuple[str, ...], str], SiteCatalogue],
) -> SiteCatalogue:
    chosen = tuple(site.frameworks if site.frameworks is not None else partner.frameworks)
    tier = site.tier or partner.tier
    key = (chosen, tier)
    if key not in cache:
        cache[key] = await site_catalogue(connection, chosen, Tier(tier))
    return cache[key]


def _one_framework(request: web.Request, catalogue: SiteCatalogue) -> SiteCatalogue:
    """``?framework=ID`` narrows the answer to one of the site's frameworks."""
    wanted = request.query.getall("framework", [])
    if not wanted:
        return catalogue
    if len(wanted) > 1:
        raise Problem("malformed-query", "give framework at most once")
    framework_id = wanted[0]
    if framework_id not in catalogue.frameworks:
        raise Problem(
            "malformed-query", f"framework {framework_id[:32]!r} is not one this site uses"
        )
    return SiteCatalogue(
        frameworks={framework_id: catalogue.frameworks[framework_id]},
        controls=tuple(c for c in catalogue.controls if c.framework_id == framework_id),
        prepared={framework_id: catalogue.layout[framework_id]},
    )


async def _site_posture(request: web.Request) -> tuple[Row, datetime, list[FrameworkPosture]]:
    """The site of the path (the partner's own), the time of asking and the
    site's posture then, narrowed by ``?framework=``."""
    holder = await require_partner(request)
    service = central(request)
    now = service.clock()
    async with read_only(service.engine) as connection:
        site = await get_site(connection, request.match_info["site_id"], holder.partner_id)
        partner = await get_partner(connection, site.partner_id)
        catalogue = _one_framework(request, await _catalogue_of(connection, site, partner, {}))
        latest = await latest_evidence(connection, [site.id], with_reasons=True)
        freshness = await site_freshness(connection, [site.id])
        attached = await site_attachments(connection, [site.id])
    return (
        site,
        now,
        evaluate(
            catalogue,
            latest.get(site.id, []),
            at=now,
            freshness=freshness,
            attachments=attached.get(site.id, []),
        ),
    )


@routes.get("/api/v1/sites/{site_id}/posture")
async def site_posture(request: web.Request) -> web.Response:
    """Every control of each of the site's frameworks, with its state and the
    signed evidence behind it."""
    site, now, posture = await _site_posture(request)
    return json_response(
        SitePostureOut(
            site_id=site.id,
            name=site.name,
            evaluated_at=now,
            frameworks=[framework_out(p) for p in posture],
        )
    )


@routes.get("/api/v1/sites/{site_id}/posture/oscal")
async def site_posture_oscal(request: web.Request) -> web.Response:
    """The site's posture as an OSCAL Assessment Results document, each
    finding linking the signed evidence export behind it."""
    site, now, posture = await _site_posture(request)
    if not any(framework.controls for framework in posture):
        raise Problem("conflict", "the site uses no framework: there is no control to assess")
    # Behind a reverse proxy the links must be the URL partners reach.
    base_url = central(request).settings.public_url or str(request.url.origin())
    document = assessment_results(
        site_id=site.id,
        site_name=site.name,
        evaluated_at=now,
        posture=posture,
        base_url=base_url,
    )
    return download(canonicalize(document), f"assessment-results-{site.id}.json")


@routes.get("/api/v1/posture")
async def partner_posture(request: web.Request) -> web.Response:
    """Scores per site and framework, each framework across the sites that
    use it, and the controls failing anywhere, the most widely failing first."""
    holder = await require_partner(request)
    service = central(request)
    now = service.clock()
    async with read_only(service.engine) as connection:
        partner = await get_partner(connection, holder.partner_id or "")
        site_rows = (
            await connection.execute(
                sa.select(sites)
                .where(sites.c.partner_id == partner.id)
                .order_by(sites.c.created_at, sites.c.id)
            )
        ).all()
        site_ids = [row.id for row in site_rows]
        part_of = await catalogue_reader(connection)
        cache: dict[tuple[tuple[str, ...], str], SiteCatalogue] = {}
        catalogues = {}
        for row in site_rows:
            chosen = tuple(row.frameworks if row.frameworks is not None else partner.frameworks)
            tier = row.tier or partner.tier
            if (chosen, tier) not in cache:
                cache[chosen, tier] = part_of(chosen, Tier(tier))
            catalogues[row.id] = cache[chosen, tier]
        # Only failing controls are shown with their bundle's reason.
        latest = await latest_evidence(
            connection, site_ids, with_reasons=True, reasons_of=frozenset({"fail"})
        )
        freshness = await site_freshness(connection, site_ids)
        attached = await site_attachments(connection, site_ids)
    with collector_paused():
        return _rollup(now, site_rows, catalogues, latest, freshness, attached)


def _rollup(
    now: datetime,
    site_rows: Sequence[Row],
    catalogues: Mapping[str, SiteCatalogue],
    latest: Mapping[str, list[Observation]],
    freshness: Freshness,
    attached: Mapping[str, list[Attachment]],
) -> web.Response:
    """The partner roll-up's answer from what was read.

    The answer is built as JSON values, not as PartnerPostureOut: a
    partner's thousand sites make tens of thousands of nested objects, and
    validating them again was a fifth of the answer's time. It has the
    model's shape exactly (the tests compare the two, and check every
    answer against the OpenAPI document)."""
    site_scores = []
    per_framework: dict[str, list[FrameworkPosture]] = defaultdict(list)
    failing: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    titles: dict[tuple[str, str], str] = {}
    names: dict[str, str] = {}
    for site in site_rows:
        posture = evaluate(
            catalogues[site.id],
            latest.get(site.id, []),
            at=now,
            freshness=freshness,
            attachments=attached.get(site.id, []),
        )
        site_scores.append(
            {
                "site_id": site.id,
                "name": site.name,
                "frameworks": [
                    _score_json(p.framework_id, p.name, p.score, p.counts) for p in posture
                ],
            }
        )
        for framework in posture:
            names[framework.framework_id] = framework.name
            per_framework[framework.framework_id].append(framework)
            if not framework.counts["failing"]:
                continue
            for control in framework.controls:
                if control.state == "failing":
                    key = (control.framework_id, control.control_id)
                    titles[key] = control.title
                    failing[key].append(
                        {
                            "site_id": site.id,
                            "name": site.name,
                            "evidence": _evidence_json(control.evidence),
                        }
                    )

    rollups = []
    for framework_id, postures in per_framework.items():
        summed: dict[ControlState, int] = dict.fromkeys(STATES, 0)
        for one in postures:
            for state, count in one.counts.items():
                summed[state] += count
        rollup = _score_json(framework_id, names[framework_id], score_of(summed), summed)
        rollup["site_count"] = len(postures)
        rollups.append(rollup)
    ordered = sorted(failing.items(), key=lambda item: (-len(item[1]), item[0]))
    return json_response(
        {
            "evaluated_at": json_time(now),
            "sites": site_scores,
            "frameworks": rollups,
            "failing_controls": [
                {
                    "framework_id": framework_id,
                    "control_id": control_id,
                    "title": titles[framework_id, control_id],
                    "site_count": len(found),
                    "sites": found,
                }
                for (framework_id, control_id), found in ordered
            ],
        }
    )


def json_time(moment: datetime) -> str:
    """A time as the response models write it (RFC 3339, ``Z``)."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _score_json(
    framework_id: str, name: str, score: int | None, counts: dict[ControlState, int]
) -> dict[str, Any]:
    """FrameworkScoreOut as JSON values."""
    return {"framework_id": framework_id, "name": name, "score": score, "counts": dict(counts)}


def _evidence_json(observation: Observation | None) -> dict[str, Any] | None:
    """PostureEvidenceOut as JSON values."""
    if observation is None:
        return None
    return {
        "bundle_id": observation.bundle_id,
        "appliance_id": observation.appliance_id,
        "check_id": observation.check_id,
        "result": observation.result,
        "collected_at": json_time(observation.collected_at),
        "log_index": observation.log_index,
        "signed_after_expiry": observation.signed_after_expiry,
        "in_log": observation.in_log,
        "reason": observation.reason,
    }


def _days(request: web.Request) -> int:
    given = request.query.getall("days", [str(MAX_TREND_DAYS)])
    if len(given) > 1:
        raise Problem("malformed-query", "give days at most once")
    text = given[0]
    if (
        len(text) > 2
        or not text.isascii()
        or not text.isdigit()
        or not 1 <= int(text) <= MAX_TREND_DAYS
    ):
        raise Problem("malformed-query", f"days must be a whole number from 1 to {MAX_TREND_DAYS}")
    return int(text)


@routes.get("/api/v1/sites/{site_id}/posture/trend")
async def site_trend(request: web.Request) -> web.Response:
    """The site's posture at the end of each UTC day (today: now), oldest
    first, for the last ``days`` days (default and most: 90)."""
    holder = await require_partner(request)
    days = _days(request)
    service = central(request)
    now = service.clock()
    ends = day_ends(now, days)
    async with read_only(service.engine) as connection:
        site = await get_site(connection, request.match_info["site_id"], holder.partner_id)
        partner = await get_partner(connection, site.partner_id)
        catalogue = _one_framework(request, await _catalogue_of(connection, site, partner, {}))
        freshness = await site_freshness(connection, [site.id])
        # The newest bundle of each pair at the first day's end, then every later one.
        seed = await evidence_before(connection, site.id, ends[0])
        rows = await evidence_since(connection, site.id, ends[0], now)
        attached = await site_attachments(connection, [site.id])
    # Up to 90 evaluations over a site's 90 days of bundles: CPU work, off
    # the event loop so other requests are served meanwhile.
    points = await asyncio.to_thread(
        partial(
            trend,
            catalogue,
            seed,
            rows,
            ends=ends,
            freshness=freshness,
            attachments=attached.get(site.id, []),
        )
    )
    return json_response(
        PostureTrendOut(
            site_id=site.id,
            days=[
                TrendPointOut(
                    date=(at - timedelta(microseconds=1) if at != now else at).date().isoformat(),
                    at=at,
                    frameworks=[score_out(p) for p in posture],
                )
                for at, posture in points
            ],
        )
    )
