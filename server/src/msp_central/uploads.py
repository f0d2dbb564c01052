"""Signed request bodies, read only when they are worth reading.

An appliance request is checked from its headers first
(:func:`msp_central.auth.precheck_appliance`): an unsigned, stale, forged or
misdirected request, or one declaring a body over its route's limit, is
refused before a byte of the body is read. Only then is the body read, in
chunks, stopped at the route's limit (a chunked body declares no length),
and verified in full (:func:`msp_central.auth.require_appliance`).

Large bodies (above ``large_body_bytes``, or of unknown length) also need
one of ``max_large_bodies`` slots per server process for as long as the
request is handled, so that many big uploads at once cannot take the
server's memory; a request that gets no slot within
``large_body_wait_seconds`` is answered 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from msp_central.auth import Appliance, precheck_appliance, require_appliance
from msp_central.config import Settings
from msp_central.context import Central, central
from msp_central.problems import Problem, problem_response

READ_CHUNK = 64 * 1024


class UploadSlots:
    """The per-process bound on large bodies being handled at once."""

    def __init__(self, settings: Settings) -> None:
        self.threshold = settings.large_body_bytes
        self.wait = settings.large_body_wait_seconds
        # Created without a running loop; asyncio binds it on first use.
        self._slots = asyncio.Semaphore(settings.max_large_bodies)
        self.held = 0  # slots taken now

    def is_large(self, request: web.Request) -> bool:
        declared = request.content_length
        if declared is None:
            return request.body_exists  # chunked: as large as the route allows
        return declared > self.threshold

    @contextlib.asynccontextmanager
    async def slot(self, request: web.Request) -> AsyncIterator[None]:
        """Hold a slot while handling a large body; a small one needs none."""
        if not self.is_large(request):
            yield
            return
        try:
            async with asyncio.timeout(self.wait):
                await self._slots.acquire()
        except TimeoutError:
            raise NoSlot from None
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1
            self._slots.release()


UPLOAD_SLOTS = web.AppKey("upload_slots", UploadSlots)


class NoSlot(Exception):
    """No slot for a large body came free in time."""


def busy_response(request: web.Request, wait: float) -> web.Response:
    """503 as a problem document, with Retry-After. Returned rather than
    raised: the problems middleware turns every Problem of status 500 and
    above into an internal error, and this one is the caller's cue to come
    back, not a failure of the server."""
    response = problem_response(
        Problem(
            "server-busy", "too many large request bodies are being handled; retry after a moment"
        ),
        request.path,
    )
    response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
    return response


async def read_bounded(request: web.Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes,
    whether it declared its length or not (chunked)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise Problem("body-too-large", f"body of {declared} bytes, limit {limit}")
    body = bytearray()
    try:
        async for chunk in request.content.iter_chunked(READ_CHUNK):
            if len(body) + len(chunk) > limit:
                raise Problem("body-too-large", f"body exceeds {limit} bytes")
            body += chunk
    except web.RequestPayloadError:
        raise Problem("malformed", "the request body did not arrive whole") from None
    return bytes(body)


SignedHandler = Callable[[web.Request, Appliance, bytes], Awaitable[web.StreamResponse]]


def signed_body(
    limit: Callable[[Central], int],
    *,
    allow_revoked: bool = False,
    defer_nonce: bool = False,
) -> Callable[[SignedHandler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Decorate an appliance handler: it is called with the verified caller
    and the body, read at most ``limit(service)`` bytes long and only after
    the headers passed :func:`precheck_appliance` (the path's
    ``appliance_id``, if any, must be the signer's)."""

    def decorate(
        handler: SignedHandler,
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        @functools.wraps(handler)
        async def handle(request: web.Request) -> web.StreamResponse:
            service = central(request)
            most = limit(service)
            declared = request.content_length
            if declared is not None and declared > most:
                raise Problem("body-too-large", f"body of {declared} bytes, limit {most}")
            appliance_id = request.match_info.get("appliance_id")
            await precheck_appliance(
                request, appliance_id=appliance_id, allow_revoked=allow_revoked
            )
            slots = request.app[UPLOAD_SLOTS]
            try:
                async with slots.slot(request):
                    raw = await read_bounded(request, most)
                    caller = await require_appliance(
                        request,
                        raw,
                        appliance_id=appliance_id,
                        allow_revoked=allow_revoked,
                        defer_nonce=defer_nonce,
                    )
                    return await handler(request, caller, raw)
            except NoSlot:
                return busy_response(request, slots.wait)

        return handle

    return decorate
