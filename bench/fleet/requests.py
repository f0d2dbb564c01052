"""Every HTTP request the simulator makes, as the client saw it.

An aiohttp trace records each request's end time (wall clock, comparable
across the simulator's processes), what it was (heartbeat, audit sync,
evidence, escalation, enrollment, a partner read), its status (0: no answer
at all) and its latency. A 503 or 429 counts as *shed* when it is the
server's own refusal for load (a problem document with Retry-After); any
other 5xx, the balancer's included, is unplanned.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import NamedTuple

import aiohttp


class Request(NamedTuple):
    ended: float  # wall clock, seconds
    kind: str
    status: int  # 0: no answer (connection refused, reset, timed out)
    seconds: float
    shed: bool


def kind_of(path: str) -> str:
    if path.endswith("/heartbeat"):
        return "heartbeat"
    if path.endswith("/audit/sync"):
        return "sync"
    if path.endswith("/evidence") and "/appliances/" in path:
        return "evidence"
    if path.endswith("/escalations") and "/appliances/" in path:
        return "escalation"
    if path.endswith("/enroll"):
        return "enroll"
    return "partner_read"


class RequestLog:
    """Collects :class:`Request` rows through :meth:`trace_config`."""

    def __init__(self) -> None:
        self.rows: list[Request] = []

    def trace_config(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()
        config.on_request_start.append(self._started)
        config.on_request_end.append(self._ended)
        config.on_request_exception.append(self._failed)
        return config

    async def _started(
        self, _session: aiohttp.ClientSession, context: SimpleNamespace, _params: object
    ) -> None:
        context.started = time.monotonic()

    async def _ended(
        self,
        _session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        response = params.response
        shed = (
            response.status in (429, 503)
            and "Retry-After" in response.headers
            and response.headers.get("Content-Type", "").startswith("application/problem+json")
        )
        self.rows.append(
            Request(
                time.time(),
                kind_of(params.url.path),
                response.status,
                time.monotonic() - context.started,
                shed,
            )
        )

    async def _failed(
        self,
        _session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestExceptionParams,
    ) -> None:
        if isinstance(params.exception, asyncio.CancelledError):
            return  # the simulator stopped it (the end of the run), not the server
        self.rows.append(
            Request(
                time.time(), kind_of(params.url.path), 0, time.monotonic() - context.started, False
            )
        )
