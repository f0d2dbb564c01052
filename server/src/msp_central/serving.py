"""Serving the application: errors aiohttp answers itself, and logs.

aiohttp answers a request its HTTP parser refuses (a bad header line or
method, a line too long, a broken chunk) before any middleware runs, as
text/plain that echoes the offending line, and logs that line with a
traceback at ``aiohttp.server``: an ``Authorization`` header, API key
included, would land in the log. aiohttp has no hook for this answer but
:meth:`aiohttp.web.RequestHandler.handle_error`; :class:`ProblemAppRunner`
serves the application through a handler that overrides it to answer
problem+json without echoing the input, and :func:`install_redaction`
filters credentials out of every log record of the server's loggers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong

from msp_central.admission import until_stopped
from msp_central.problems import Problem, problem_response

REDACTED = "[redacted]"
# Header fields whose values are credentials (or, for signatures, nothing a
# log reader needs), as they appear in a header line or an echo of one.
_HEADER = re.compile(
    r"(?i)\b(authorization|proxy-authorization|cookie|set-cookie|signature-input|signature)"
    r"(\s*[:=]\s*)[^\r\n'\"]+"
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s'\",]+")
# The secrets this server issues: API keys, enrollment tokens and console
# invitations
# (context.new_secret), even cut short.
_SECRET = re.compile(r"\b(mspk|msp-enroll|msp_inv)_[0-9A-Za-z]+")
# A parser's reason, without the echo of the input that follows it.
_REASON = re.compile(r"[A-Za-z][A-Za-z0-9 ,.-]{0,79}")
LOGGERS = (
    "aiohttp.access",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "msp_central",
    "msp_central.notifier",
)


def redact(text: str) -> str:
    """``text`` with credential header values, bearer tokens and this
    server's secrets replaced by ``[redacted]``."""
    text = _HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _SECRET.sub(lambda m: f"{m.group(1)}_{REDACTED}", text)


class RedactSecrets(logging.Filter):
    """Rewrites a record's message, traceback and stack in place, so that
    every handler (and any test capturing records) sees only the redacted
    text; a traceback that held a secret is kept as text only."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it on emit
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            clean = redact(text)
            if clean != text:
                record.exc_info, record.exc_text = None, clean
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_redaction() -> None:
    """Filter the server's loggers and every handler of the root logger (a
    logger's own filter does not see its children's records; a handler's
    does). Idempotent."""
    targets: list[logging.Logger | logging.Handler] = [logging.getLogger(n) for n in LOGGERS]
    targets.extend(logging.getLogger().handlers)
    for target in targets:
        if not any(isinstance(f, RedactSecrets) for f in target.filters):
            target.addFilter(RedactSecrets())


def parser_problem(exc: HttpProcessingError) -> Problem:
    """The problem for a request aiohttp's parser refused; its detail never
    repeats the input (which may be a credential)."""
    reason = str(exc.message).split("\n", 1)[0].strip().rstrip(":").strip()
    if isinstance(exc, LineTooLong) or reason.startswith("Too many headers"):
        return Problem(
            "header-too-large",
            "a request line or header field is too long, or there are too many header fields",
            status=431,
        )
    if isinstance(exc, BadHttpMethod):
        return Problem("malformed", "the request method is not an HTTP method")
    if not _REASON.fullmatch(reason):
        reason = "malformed request"
    return Problem("malformed", f"the request does not parse as HTTP/1.1: {reason}")


class ProblemRequestHandler(web.RequestHandler):
    """The connection handler, with errors aiohttp itself answers turned
    into problem documents."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            problem = parser_problem(exc)
            # Non-HTTP traffic on the port is everyday noise (aiohttp logs
            # it at debug too); the rest is one line, never the input.
            level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.WARNING
            self.logger.log(level, "refused a request from %s: %s", request.remote, problem.detail)
        elif status == 500:
            self.log_exception("unhandled error serving a request", exc_info=exc)
            problem = Problem("internal-error", "the server failed; the error is logged")
        else:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:  # as aiohttp: too late for an answer
            raise ConnectionError("response already started; cannot send the error")
        response = problem_response(problem)
        response.force_close()
        return response


class ProblemServer(web.Server):
    """A :class:`web.Server` whose connections use :class:`ProblemRequestHandler`."""

    def __call__(self) -> web.RequestHandler:
        return ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProblemAppRunner(web.AppRunner):
    """An :class:`web.AppRunner` serving through :class:`ProblemServer`,
    with log redaction installed."""

    async def _make_server(self) -> web.Server:
        install_redaction()
        server = await super()._make_server()
        return ProblemServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    reuse_port: bool = False,
    shutdown_timeout: float = 10,
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, like :func:`web.run_app`
    (graceful shutdown within ``shutdown_timeout``), through
    :class:`ProblemAppRunner`."""

    async def run() -> None:
        runner = ProblemAppRunner(app, handle_signals=True, shutdown_timeout=shutdown_timeout)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
            # Everything built to serve (modules, tables, the app) lives as
            # long as the process: moved out of the collector's sight, so a
            # full collection during a request scans only what requests
            # built. A partner's posture roll-up was a third slower without.
            gc.collect()
            gc.freeze()
            await until_stopped(app)  # SIGINT or SIGTERM, then the drain
        finally:
            await runner.cleanup()

    with contextlib.suppress(web.GracefulExit, KeyboardInterrupt):
        asyncio.run(run())
