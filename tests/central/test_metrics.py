"""/metrics: who may read it, what moves it, and what it never says; and
the server's JSON log lines."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from msp_central.admission import Lane
from msp_central.app import create_app
from msp_central.cli import configure_log_format
from msp_central.config import ConfigError, Settings
from msp_central.context import ADMISSION, CENTRAL
from msp_central.metrics import METRICS, record_shed, watch_in_flight
from msp_central.serving import RedactSecrets
from msp_central.uploads import busy_response
from msp_protocol.encoding import format_time
from msp_protocol.keys import SigningKey
from msp_protocol.log import make_entry
from tests.central.support import ROOT, ApplianceClient, Clock, Harness

TOKEN = "metrics-token-0123456789abcdef"


async def _harness(aiohttp_client: Any, settings: Settings, *extra: web.RouteDef) -> Harness:
    clock = Clock()
    app = create_app(settings, root=ROOT, clock=clock)
    app.add_routes(extra)
    client = await aiohttp_client(app)
    return Harness(client, app[CENTRAL].engine, clock)


def _token_file(tmp_path: Path, token: str = TOKEN) -> Path:
    path = tmp_path / "metrics.token"
    path.write_text(token + "\n")
    return path


async def _scrape(harness: Harness, headers: dict[str, str] | None = None) -> str:
    response = await harness.client.get("/metrics", headers=headers)
    assert response.status == 200, await response.text()
    assert response.content_type == "text/plain"
    return await response.text()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(text: str, name: str, **labels: str) -> float:
    return _samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


# --- access ----------------------------------------------------------------------------------


async def test_off_by_default_answers_as_an_unknown_route(
    settings: Settings, aiohttp_client: Any
) -> None:
    harness = await _harness(aiohttp_client, settings)
    response = await harness.client.get("/metrics")
    unknown = await harness.client.get("/no-such-page")
    assert (response.status, response.content_type) == (404, "application/problem+json")
    assert (await response.json())["code"] == (await unknown.json())["code"] == "not-found"


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-For": "203.0.113.9"},
        {"Forwarded": "for=203.0.113.9"},
        {"X-Forwarded-For": "127.0.0.1"},
    ],
    ids=["x-forwarded-for", "forwarded", "forwarded-claiming-loopback"],
)
async def test_loopback_serves_a_local_peer_but_not_through_a_proxy(
    settings: Settings, aiohttp_client: Any, headers: dict[str, str]
) -> None:
    harness = await _harness(
        aiohttp_client, settings.model_copy(update={"metrics_access": "loopback"})
    )
    assert "msp_central_http_requests_total" in await _scrape(harness)
    proxied = await harness.client.get("/metrics", headers=headers)
    assert proxied.status == 404
    assert (await proxied.json())["code"] == "not-found"


async def test_bearer_wants_the_token_from_the_file(
    settings: Settings, aiohttp_client: Any, tmp_path: Path
) -> None:
    configured = Settings(
        state_dir=settings.state_dir,
        database_url=settings.database_url,
        metrics_access="bearer",
        metrics_token_file=_token_file(tmp_path),
    )
    harness = await _harness(aiohttp_client, configured)
    missing = await harness.client.get("/metrics")
    assert missing.status == 401
    assert (await missing.json())["code"] == "missing-credentials"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    for wrong in (TOKEN[:-1], TOKEN + "0", "x"):
        refused = await harness.client.get("/metrics", headers={"Authorization": f"Bearer {wrong}"})
        assert refused.status == 401
        assert (await refused.json())["code"] == "bad-credentials"
    text = await _scrape(harness, {"Authorization": f"Bearer {TOKEN}"})
    assert "msp_central_http_requests_total" in text
    assert TOKEN not in text


def test_bearer_without_a_token_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metrics_token_file"):
        Settings(state_dir=tmp_path, metrics_access="bearer")
    with pytest.raises(ConfigError, match="cannot read metrics_token_file"):
        create_app(
            Settings(
                state_dir=tmp_path,
                metrics_access="bearer",
                metrics_token_file=tmp_path / "absent",
            ),
            root=ROOT,
        )
    with pytest.raises(ConfigError, match="too short"):
        create_app(
            Settings(
                state_dir=tmp_path,
                metrics_access="bearer",
                metrics_token_file=_token_file(tmp_path, "short"),
            ),
            root=ROOT,
        )


# --- what moves the figures --------------------------------------------------------------------


async def test_syncs_refusals_and_alerts_are_counted_by_template(
    settings: Settings, aiohttp_client: Any
) -> None:
    harness = await _harness(
        aiohttp_client, settings.model_copy(update={"metrics_access": "loopback"})
    )
    partner = await harness.partner()
    appliance: ApplianceClient = await harness.enroll(partner)
    appliance.grow(7)
    assert (await appliance.sync(appliance.batch(0))).status == 200
    appliance.grow(3)
    stale = await appliance.sync(appliance.batch(2))  # the server holds 7
    assert stale.code == "stale-size"
    fork = list(appliance.records[:5])
    fork += [
        make_entry(i, appliance.clock(), "check.run", "agent", {"forged": i}) for i in range(5, 10)
    ]
    rewrite = await appliance.sync(appliance.batch(0, records=fork))
    assert rewrite.code == "rewrite", rewrite.body
    forged = await appliance.push(appliance.sign_bundle(key=SigningKey.generate()))
    assert forged.status == 422, forged.body
    heartbeat = await appliance.request(
        "POST",
        f"/api/v1/appliances/{appliance.appliance_id}/heartbeat",
        {"version": "0.1.0", "log_size": 7, "queues": {}, "clock": format_time(harness.clock())},
    )
    assert heartbeat.status == 200, heartbeat.body

    text = await _scrape(harness)
    sync = "/api/v1/appliances/{appliance_id}/audit/sync"
    assert _value(text, "msp_central_audit_entries_ingested_total") == 7
    assert (
        _value(text, "msp_central_witness_refusals_total", document="audit", reason="stale-size")
        == 1
    )
    assert (
        _value(text, "msp_central_witness_refusals_total", document="audit", reason="rewrite") == 1
    )
    assert _value(text, "msp_central_security_alerts_total", kind="rewrite") == 1
    assert _value(text, "msp_central_security_alerts_total", kind="stale-size") == 0
    assert (
        _value(text, "msp_central_witness_refusals_total", document="evidence", reason=forged.code)
        == 1
    )
    assert _value(text, "msp_central_security_alerts_total", kind=forged.code) == 1
    assert (
        _value(text, "msp_central_http_requests_total", route=sync, method="POST", status="200")
        == 1
    )
    assert (
        _value(text, "msp_central_http_requests_total", route=sync, method="POST", status="409")
        == 1
    )
    assert (
        _value(text, "msp_central_http_requests_total", route=sync, method="POST", status="422")
        == 1
    )
    assert (
        _value(text, "msp_central_http_request_duration_seconds_count", route=sync, method="POST")
        == 3
    )
    beat = "/api/v1/appliances/{appliance_id}/heartbeat"
    assert (
        _value(text, "msp_central_http_requests_total", route=beat, method="POST", status="200")
        == 1
    )
    assert _value(text, "msp_central_db_pool_size") >= 1
    assert _value(text, "msp_central_db_pool_connections_in_use") >= 0
    # Templates, never identifiers; nothing of a credential or key.
    for secret in (
        appliance.appliance_id,
        appliance.site_id,
        str(partner.partner_id),
        partner.key,
        ROOT.seed_bytes().hex(),
        appliance.key.seed_bytes().hex(),
    ):
        assert secret not in text


async def test_an_unknown_path_is_counted_without_its_path(
    settings: Settings, aiohttp_client: Any
) -> None:
    harness = await _harness(
        aiohttp_client, settings.model_copy(update={"metrics_access": "loopback"})
    )
    await harness.client.get("/api/v1/sites/secret-site-name/nothing-here")
    text = await _scrape(harness)
    assert "secret-site-name" not in text
    assert (
        _value(
            text, "msp_central_http_requests_total", route="unmatched", method="GET", status="404"
        )
        == 1
    )


async def test_busy_answers_count_as_shed_once(settings: Settings, aiohttp_client: Any) -> None:
    """A 503 server-busy is load shed: in the lane its refuser named, else
    in the large-body lane (the upload slots answer without naming one)."""
    routes = web.RouteTableDef()

    @routes.get("/busy/unnamed")
    async def unnamed(request: web.Request) -> web.Response:
        return busy_response(request, 1)

    @routes.get("/busy/named")
    async def named(request: web.Request) -> web.Response:
        record_shed(request.app, "sync")
        return busy_response(request, 1)

    harness = await _harness(
        aiohttp_client, settings.model_copy(update={"metrics_access": "loopback"}), *routes
    )
    for path in ("/busy/unnamed", "/busy/unnamed", "/busy/named"):
        assert (await harness.client.get(path)).status == 503
    text = await _scrape(harness)
    assert _value(text, "msp_central_load_shed_total", lane="upload") == 2
    assert _value(text, "msp_central_load_shed_total", lane="sync") == 1
    assert _value(text, "msp_central_in_flight", lane="upload") == 0


async def test_admission_sheds_in_its_own_lane(settings: Settings, aiohttp_client: Any) -> None:
    """A request the admission lanes refuse is counted once, in its lane,
    and each lane's work in flight is what the scrape reads."""
    harness = await _harness(
        aiohttp_client,
        settings.model_copy(
            update={
                "metrics_access": "loopback",
                "admission_bulk_limit": 1,
                "admission_wait_seconds": 0.01,
            }
        ),
    )
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    appliance.grow(3)
    app = harness.client.app
    assert app is not None
    bulk = app[ADMISSION].lanes[Lane.BULK]
    await bulk.acquire(0)
    try:
        refused = await appliance.sync(appliance.batch(0))
        assert (refused.status, refused.code) == (503, "server-busy")
        text = await _scrape(harness)
    finally:
        bulk.release(0.0)
    assert _value(text, "msp_central_load_shed_total", lane="bulk") == 1
    assert _value(text, "msp_central_load_shed_total", lane="upload") == 0
    assert _value(text, "msp_central_in_flight", lane="bulk") == 1
    assert _value(text, "msp_central_in_flight", lane="interactive") == 0
    accepted = await appliance.sync(appliance.batch(0))
    assert accepted.status == 200, accepted.body
    text = await _scrape(harness)
    assert _value(text, "msp_central_in_flight", lane="bulk") == 0
    assert _value(text, "msp_central_audit_entries_ingested_total") == len(appliance.records)


async def test_in_flight_is_read_when_scraped(settings: Settings, aiohttp_client: Any) -> None:
    harness = await _harness(
        aiohttp_client, settings.model_copy(update={"metrics_access": "loopback"})
    )
    app = harness.client.app
    assert app is not None
    lane = {"sync": 3}
    watch_in_flight(app, "sync", lambda: lane["sync"])
    assert _value(await _scrape(harness), "msp_central_in_flight", lane="sync") == 3
    lane["sync"] = 1
    assert _value(await _scrape(harness), "msp_central_in_flight", lane="sync") == 1


async def test_each_application_counts_apart(settings: Settings, aiohttp_client: Any) -> None:
    first = create_app(settings, root=ROOT)
    second = create_app(settings, root=ROOT)
    assert first[METRICS].registry is not second[METRICS].registry


# --- the heartbeat's dashboard figures -------------------------------------------------------


async def test_the_heartbeat_figures_are_kept_and_listed(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    path = f"/api/v1/appliances/{appliance.appliance_id}/heartbeat"
    beat = {
        "version": "0.1.0",
        "log_size": 12,
        "queues": {"evidence": 3, "urgent": 1},
        "clock": format_time(harness.clock()),
        "witnessed_size": 10,
        "last_sync_at": "2026-11-25T11:59:00Z",
        "certificate_not_after": "2026-12-25T12:00:00Z",
        "problems": 2,
    }
    assert (await appliance.request("POST", path, beat)).status == 200
    listed = await partner.request("GET", f"/api/v1/sites/{appliance.site_id}/appliances")
    assert listed.status == 200, listed.body
    (shown,) = listed.body["items"]
    assert shown["heartbeat"] == beat


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("witnessed_size", -1),
        ("witnessed_size", "10"),
        ("problems", 1.5),
        ("last_sync_at", "yesterday"),
        ("certificate_not_after", "2026-12-25T12:00:00+01:00"),
        ("unknown_figure", 1),
    ],
    ids=[
        "negative-size",
        "size-as-text",
        "fractional-problems",
        "not-a-time",
        "not-utc",
        "unknown",
    ],
)
async def test_a_bad_figure_is_refused(harness: Harness, field: str, value: object) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    beat = {"version": "0.1.0", "log_size": 1, "queues": {}, "clock": format_time(harness.clock())}
    refused = await appliance.request(
        "POST", f"/api/v1/appliances/{appliance.appliance_id}/heartbeat", {**beat, field: value}
    )
    assert (refused.status, refused.code) == (400, "malformed-document"), refused.body


# --- JSON log lines ------------------------------------------------------------------------------


def test_json_log_lines_carry_the_fields_and_stay_redacted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets())
    configure_log_format("json", handlers=[handler])
    logger = logging.getLogger("msp_central.test_metrics")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("refused Authorization: Bearer mspk_%s", "abc123secret")
        try:
            raise RuntimeError("with Bearer mspk_tracebacksecret inside")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["level"] for line in lines] == ["WARNING", "ERROR"]
    assert {line["logger"] for line in lines} == {"msp_central.test_metrics"}
    assert all(line["time"].endswith("Z") for line in lines)
    assert "abc123secret" not in stream.getvalue()
    assert "tracebacksecret" not in stream.getvalue()
    assert "[redacted]" in lines[0]["message"]
    assert "RuntimeError" in lines[1]["exception"]
