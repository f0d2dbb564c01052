"""The aiohttp application factory."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import aiohttp
import sqlalchemy as sa
from aiohttp import web
from aiohttp.typedefs import Handler
from sqlalchemy.exc import DataError

from msp_central.admission import Admission, admission, database_refusal
from msp_central.config import Settings
from msp_central.console.views import routes as console_routes
from msp_central.context import ADMISSION, CENTRAL, NOTIFY_WAKE, Central, load_root_key
from msp_central.db.engine import create_engine, dispose, write
from msp_central.db.migrate import check_current, upgrade
from msp_central.db.tables import request_nonces
from msp_central.metrics import count_requests, record_shed, watch_in_flight
from msp_central.metrics import install as install_metrics
from msp_central.metrics import routes as metrics_routes
from msp_central.notifier import Notifier
from msp_central.problems import Problem, problem_response
from msp_central.routes.appliances import routes as appliance_routes
from msp_central.routes.audit_logs import routes as audit_log_routes
from msp_central.routes.catalogue import routes as catalogue_routes
from msp_central.routes.exports import routes as export_routes
from msp_central.routes.health import routes as health_routes
from msp_central.routes.lifecycle import routes as lifecycle_routes
from msp_central.routes.manual import document_body_limit
from msp_central.routes.manual import routes as manual_routes
from msp_central.routes.notifications import routes as notification_routes
from msp_central.routes.partners import routes as partner_routes
from msp_central.routes.posture import routes as posture_routes
from msp_central.routes.users import routes as user_routes
from msp_central.throttle import CREDENTIAL_THROTTLE, CredentialThrottle
from msp_central.uploads import UPLOAD_SLOTS, UploadSlots
from msp_protocol.encoding import utc_now
from msp_protocol.errors import ProtocolError
from msp_protocol.keys import SigningKey

log = logging.getLogger("msp_central")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Nonces older than the signature freshness window can never be replayed
# (the signature would be refused as stale first): purge them this often.
NONCE_PURGE_SECONDS = 60


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as problem+json; nothing internal leaks."""
    if any(_CONTROL.search(value) for value in request.match_info.values()):
        # No identifier holds a control character, and PostgreSQL cannot
        # even compare a NUL: no such resource, on every backend alike.
        return problem_response(Problem("not-found", "no such resource"), request.path)
    try:
        return await handler(request)
    except Problem as problem:
        if problem.status >= 500:
            return _server_failure(request)
        return problem_response(problem, request.path)
    except ProtocolError as exc:
        mapped = Problem.from_protocol(exc)
        if mapped.status >= 500:
            # A misuse inside the server (a UsageError, say), not the
            # caller's input: logged, and none of its text shown.
            return _server_failure(request)
        return problem_response(mapped, request.path)
    except web.HTTPNotFound:
        return problem_response(
            Problem("not-found", f"no route {request.path[:200]}"), request.path
        )
    except web.HTTPMethodNotAllowed as exc:
        response = problem_response(
            Problem("method-not-allowed", f"{request.method} is not allowed here"), request.path
        )
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    except web.HTTPRequestEntityTooLarge:
        return problem_response(Problem("body-too-large", "request body too large"), request.path)
    except DataError:
        # A value the database cannot hold that the models let through:
        # the caller's input, not a server failure.
        return problem_response(
            Problem("malformed-document", "a value in the request cannot be stored"), request.path
        )
    except web.HTTPException:
        raise
    except Exception as exc:
        # A full connection pool or a database gone away: 503, not 500.
        return database_refusal(request, exc) or _server_failure(request)


# What every answer says about itself. The console's pages load only their
# own scripts and styles (no inline script, no eval), call only this
# server, and are never framed.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; object-src 'none'"
)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    # same-origin, not no-referrer: with no-referrer, browsers send "Origin: null"
    # on form posts, and the console checks the origin of every change.
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    if not request.path.startswith("/console/static/"):
        # Pages and API answers name a user's data: never kept by a cache.
        headers.setdefault("Cache-Control", "no-store")


def _server_failure(request: web.Request) -> web.Response:
    """A 500: the traceback of the exception being handled goes to the log,
    the caller gets no internal text."""
    log.exception("unhandled error in %s %s", request.method, request.path)
    return problem_response(
        Problem("internal-error", "the server failed; the error is logged"), request.path
    )


def create_app(
    settings: Settings,
    *,
    root: SigningKey | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> web.Application:
    """The server. ``root`` defaults to the key in ``settings.key_file``;
    ``clock`` is the server's trusted time (tests move it)."""
    app = web.Application(
        # Metrics outermost: they count the status the caller gets.
        middlewares=[count_requests, problems, admission],
        # The largest body any route takes; each route holds its own limit.
        client_max_size=max(
            settings.max_sync_body_bytes,
            settings.max_body_bytes,
            document_body_limit(settings.max_document_bytes),
        ),
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        key = root or load_root_key(settings.key_file)
        engine = create_engine(
            settings.resolved_database_url(),
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            pool_timeout=settings.database_pool_timeout_seconds,
        )
        try:
            if settings.migrate_on_start:
                await upgrade(engine)
            else:
                await check_current(engine)
            service = Central(settings=settings, engine=engine, root=key, clock=clock)
            app[CENTRAL] = service
            purger = asyncio.create_task(_purge_nonces(service))
            session = aiohttp.ClientSession()
            notifier = Notifier(service, session, app[NOTIFY_WAKE])
            notifying = asyncio.create_task(notifier.run())
            try:
                yield
            finally:
                for task in (purger, notifying):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await session.close()
        finally:
            await dispose(engine)

    app[NOTIFY_WAKE] = asyncio.Event()
    app[UPLOAD_SLOTS] = UploadSlots(settings)
    app[ADMISSION] = Admission(settings)
    app[CREDENTIAL_THROTTLE] = CredentialThrottle(settings)
    install_metrics(app, settings, app[UPLOAD_SLOTS])
    # Each shed request counted in its own lane; each lane's work in flight
    # read at scrape time.
    gate = app[ADMISSION]
    gate.shed_listeners.append(lambda lane: record_shed(app, lane.value))
    for lane, state in gate.lanes.items():
        watch_in_flight(app, lane.value, functools.partial(getattr, state, "in_flight"))
    app.cleanup_ctx.append(lifecycle)
    app.on_response_prepare.append(security_headers)
    for table in (
        health_routes,
        console_routes,
        user_routes,
        catalogue_routes,
        partner_routes,
        lifecycle_routes,
        posture_routes,
        export_routes,
        audit_log_routes,
        manual_routes,
        notification_routes,
        appliance_routes,
        metrics_routes,
    ):
        app.add_routes(table)
    return app


async def _purge_nonces(service: Central) -> None:
    window = int((service.limits.max_signature_age + service.limits.clock_skew).total_seconds())
    while True:
        await asyncio.sleep(NONCE_PURGE_SECONDS)
        cutoff = int(service.clock().timestamp()) - window
        try:
            async with write(service.engine) as connection:
                await connection.execute(
                    sa.delete(request_nonces).where(request_nonces.c.created < cutoff)
                )
        except Exception:  # the next round tries again; serving goes on
            log.exception("purging old request nonces failed")
