"""Prometheus metrics: what one server process has done, at ``GET /metrics``.

Each application has its own :class:`ServerMetrics` and registry (never
prometheus-client's global one): tests build many applications in one
process, and a replica reports only its own work, so a fleet's totals are
the sum over replicas. Labels hold route templates, problem codes and lane
names, never an identifier (an appliance, a site, a partner) nor anything
from a credential, so the series stay few and the output says nothing about
any tenant.

Access (``metrics_access``): ``off`` answers 404 as for an unknown route;
``loopback`` serves a TCP peer on a loopback address whose request passed
through no proxy (no ``Forwarded`` or ``X-Forwarded-For``: a proxy on the
same host must not turn the internet into loopback); ``bearer`` wants
``Authorization: Bearer <token>`` with the token in ``metrics_token_file``.

What the handlers report while serving a request (an alert raised deep in a
query, a shed request) reaches the request's own application through a
context variable the middleware sets, so no query needs the application.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from msp_central.config import Settings
from msp_central.context import CENTRAL
from msp_central.problems import Problem

if TYPE_CHECKING:  # msp_central.events counts alerts here: no import of the routes' modules
    from msp_central.uploads import UploadSlots

# The classic text format (version 0.0.4), which every Prometheus reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From a cached read (1 ms) to the longest a sync batch may take (30 s).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# The route label of a request no route matched (its path could hold anything).
UNMATCHED = "unmatched"
# The lane of a 503 server-busy answer nobody recorded as shed: the
# large-body slots of msp_central.uploads are the only such refusal.
UPLOAD_LANE = "upload"
_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For")


class ServerMetrics:
    """The metrics of one application, in a registry of its own."""

    def __init__(self, settings: Settings) -> None:
        self.access = settings.metrics_access
        # Read once, at start: a missing or empty file stops the server
        # rather than leaving /metrics open or shut by surprise.
        self.token = settings.metrics_token().encode() if self.access == "bearer" else b""
        registry = self.registry = CollectorRegistry()
        self.requests = Counter(
            "msp_central_http_requests",
            "HTTP requests answered, by route template, method and status code",
            ("route", "method", "status"),
            registry=registry,
        )
        self.latency = Histogram(
            "msp_central_http_request_duration_seconds",
            "Time from a request's arrival at the application to its answer",
            ("route", "method"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.audit_entries = Counter(
            "msp_central_audit_entries_ingested",
            "Audit log entries witnessed and stored",
            registry=registry,
        )
        self.witness_refusals = Counter(
            "msp_central_witness_refusals",
            "Refused audit syncs and evidence bundles, by document and problem code",
            ("document", "reason"),
            registry=registry,
        )
        self.alerts = Counter(
            "msp_central_security_alerts",
            "Security alerts raised, by kind (the alert's code)",
            ("kind",),
            registry=registry,
        )
        self.load_shed = Counter(
            "msp_central_load_shed",
            "Requests refused with 503 server-busy to shed load, by admission lane",
            ("lane",),
            registry=registry,
        )
        self.in_flight = Gauge(
            "msp_central_in_flight",
            "Requests being handled now, by admission lane",
            ("lane",),
            registry=registry,
        )
        self.pool_in_use = Gauge(
            "msp_central_db_pool_connections_in_use",
            "Database connections checked out of this process's pool",
            registry=registry,
        )
        self.pool_size = Gauge(
            "msp_central_db_pool_size",
            "Connections this process's database pool keeps (overflow not counted)",
            registry=registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)


METRICS = web.AppKey("metrics", ServerMetrics)


@dataclass(slots=True)
class _Serving:
    """What the middleware knows of the request being handled."""

    metrics: ServerMetrics
    shed_recorded: bool = False


_SERVING: ContextVar[_Serving | None] = ContextVar("serving_metrics", default=None)


def install(
    app: web.Application, settings: Settings, uploads: UploadSlots | None = None
) -> ServerMetrics:
    """Give ``app`` its metrics; the database pool and the large-body slots
    (``uploads``) are read when scraped."""
    metrics = app[METRICS] = ServerMetrics(settings)

    def pool_figure(name: str) -> float:
        service = app.get(CENTRAL)
        pool = service.engine.sync_engine.pool if service is not None else None
        reader = getattr(pool, name, None)
        # Both backends get a queue pool (SQLite's file database too); a
        # pool without the figure (a null or static pool, before start)
        # reports 0 rather than failing the scrape.
        return float(reader()) if callable(reader) else 0.0

    metrics.pool_in_use.set_function(lambda: pool_figure("checkedout"))
    metrics.pool_size.set_function(lambda: pool_figure("size"))
    if uploads is not None:
        watch_in_flight(app, UPLOAD_LANE, lambda: uploads.held)
    return metrics


def record_shed(app: web.Application, lane: str) -> None:
    """Count a request refused with 503 server-busy in admission ``lane``.
    Call it where the refusal is decided; the middleware then does not
    count the same answer again."""
    app[METRICS].load_shed.labels(lane).inc()
    serving = _SERVING.get()
    if serving is not None and serving.metrics is app[METRICS]:
        serving.shed_recorded = True


def watch_in_flight(app: web.Application, lane: str, read: Callable[[], int]) -> None:
    """Report ``read()``, read at each scrape, as the requests admission
    ``lane`` is handling now."""
    app[METRICS].in_flight.labels(lane).set_function(read)


def alert_raised(kind: str) -> None:
    """Count a security alert of ``kind`` raised while serving a request of
    an application with metrics (outside one, such as the CLI: nothing)."""
    serving = _SERVING.get()
    if serving is not None:
        serving.metrics.alerts.labels(kind).inc()


def audit_entries_ingested(app: web.Application, count: int) -> None:
    app[METRICS].audit_entries.inc(count)


def witness_refused(app: web.Application, document: str, reason: str) -> None:
    """Count a refused ``document`` (``audit`` or ``evidence``) by problem code."""
    app[METRICS].witness_refusals.labels(document, reason).inc()


def route_template(request: web.Request) -> str:
    """The matched resource's canonical path (``/api/v1/sites/{site_id}``),
    never the concrete path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def _is_server_busy(response: web.StreamResponse) -> bool:
    if response.status != 503 or not isinstance(response, web.Response):
        return False
    if response.content_type != "application/problem+json" or not isinstance(response.body, bytes):
        return False
    with contextlib.suppress(ValueError):
        document = json.loads(response.body)
        return isinstance(document, dict) and document.get("code") == "server-busy"
    return False


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every answer, as the caller gets it (outermost, so a
    problem document's status is the one counted)."""
    metrics = request.app[METRICS]
    serving = _Serving(metrics)
    token = _SERVING.set(serving)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if _is_server_busy(response) and not serving.shed_recorded:
            metrics.load_shed.labels(UPLOAD_LANE).inc()
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        _SERVING.reset(token)
        metrics.observe(
            route_template(request), request.method, status, time.perf_counter() - started
        )


def _from_loopback(request: web.Request) -> bool:
    if any(name in request.headers for name in _PROXY_HEADERS):
        return False
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:  # a Unix socket's path: no TCP peer at all
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _bearer_matches(request: web.Request, token: bytes) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Problem("missing-credentials", "send Authorization: Bearer <metrics token>")
    return hmac.compare_digest(given.strip().encode(), token)


routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics_page(request: web.Request) -> web.Response:
    """The registry in Prometheus' text format, to whom the settings allow."""
    metrics = request.app[METRICS]
    if metrics.access == "off" or (metrics.access == "loopback" and not _from_loopback(request)):
        raise Problem("not-found", f"no route {request.path[:200]}")
    if metrics.access == "bearer" and not _bearer_matches(request, metrics.token):
        raise Problem("bad-credentials", "the metrics token is not valid")
    return web.Response(
        body=generate_latest(metrics.registry),
        headers={"Content-Type": CONTENT_TYPE},
    )
