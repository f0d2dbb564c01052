"""``msp-agent run``: the agent as one asyncio service.

It opens the appliance's state (enrolling first if it must), then runs one
task per duty until SIGTERM:

- **audit sync**: the witnessed upload of the audit trail, in bounded,
  resumable batches;
- **evidence**: signed bundles until the server holds them;
- **urgent**: critical incidents with backoff, and the SMS fallback;
- **heartbeat**: the appliance's state to the server; while the link is down
  it doubles as the probe that notices the link is back;
- **bundles**: the signed site configuration, runbooks, frameworks and the
  revocation list (this appliance stops signing once it finds itself there);
- **keys**: certificate renewal before expiry, key rotation by age or on
  request;
- **checks**: the compliance checks, their evidence, and L1 runbooks;
- **status**: the systemd watchdog ping from the main loop, ``STATUS=``,
  ``status.json`` for ``msp-agent status``, and the node_exporter textfile
  (``metrics_textfile``, :mod:`msp_agent.textfile`).

Loops sleep until their interval passes or something wakes them: when any
request gets an answer after a failure, every queue is woken at once.
Pacing (:mod:`msp_agent.pacing`): a retry waits the server's
``Retry-After`` plus full jitter, and no wake cuts that short; audit batches
are sized from the server's answers (one sizer for the process lifetime);
pending urgent incidents go before every audit and evidence batch (waiting
at most :data:`URGENT_FIRST_SECONDS`), heartbeats never wait for them.
Nothing is held only in memory: every loop works from the SQLite stores, so
a stop at any instant (SIGTERM or ``kill -9``) loses nothing acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from msp_agent import __version__
from msp_agent.audit import AuditSyncRejected, AuditTrailError, LocalTruncationError
from msp_agent.caches import (
    BundleCacheError,
    LocalFrameworkCache,
    LocalRunbookCache,
    SignedBundleCache,
    SiteConfigManager,
)
from msp_agent.central import CentralRejected, CentralUnavailable
from msp_agent.checks import CHECKS, CheckContext, Observation, run_check
from msp_agent.config import AgentSettings, ConfigError
from msp_agent.connectivity import Connectivity, LinkState
from msp_agent.files import write_atomic
from msp_agent.http_client import CLOCK_REFUSALS, HttpCentralClient
from msp_agent.keys import KEY_FILE, DelegatedSigningKey, KeyFileError, KeyRevokedError
from msp_agent.l1 import INTERNAL_ACTIONS, ActionNotAllowedError, L1Runner
from msp_agent.manager import LocalResilienceManager, Quotas
from msp_agent.pacing import BatchSizer, wait_before_retry
from msp_agent.results import (
    ActionRecord,
    CheckRecord,
    next_record,
    read_results,
    write_results,
)
from msp_agent.retry import CAP_SECONDS
from msp_agent.sms import SMSAlerter, TwilioSettings
from msp_agent.store import StoreError
from msp_agent.systemd import Notifier
from msp_agent.textfile import Figures, write_textfile
from msp_protocol.delegation import check_revocations
from msp_protocol.dsse import Envelope, parse_envelope
from msp_protocol.encoding import format_time, utc_now
from msp_protocol.errors import ProtocolError
from msp_protocol.keys import VerifyKey

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
# What a server's heartbeat document held before the dashboard figures
# (witnessed_size, last_sync_at, certificate_not_after, problems).
HEARTBEAT_FIELDS_BEFORE_FIGURES = frozenset(
    {
        "version",
        "log_size",
        "queues",
        "clock",
        "check_interval_seconds",
        "heartbeat_interval_seconds",
    }
)
REVOCATIONS_FILE = "revocations.json"
ROTATE_REQUEST_FILE = "rotate-requested"
BUNDLE_DIR = "bundles"
# How often the status loop runs (the watchdog asks for more when it is set).
STATUS_SECONDS = 2.0
# While the link is down the heartbeat probes this often (with jitter), so the
# queues learn within seconds that it is back rather than after a backoff cap.
OFFLINE_PROBE_SECONDS = 5.0
# After the server refused the audit history, how long before trying again.
REFUSED_RETRY_SECONDS = 3600.0
# How long a batch of the backlog waits for pending urgent incidents to be
# tried first: bounded, so a stuck incident never stops the backlog.
URGENT_FIRST_SECONDS = 30.0
# Checks whose lasting failure threatens the audit trail or the signing key.
CRITICAL_CHECKS = frozenset({"audit_log_integrity", "delegation_valid", "state_disk_space"})


class EnrollmentError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class PlannedCheck:
    runbook_id: str
    check: str
    l1_action: str | None
    controls: dict[str, list[str]]


def plan_checks(
    site_config: dict[str, Any] | None,
    runbooks: dict[str, Any] | None,
    frameworks: dict[str, Any] | None,
) -> list[PlannedCheck]:
    """What to run, from the site's signed bundles: every runbook the site's
    coverage tier and configuration allow, with the controls of the site's
    frameworks it gives evidence for. Without the bundles (never fetched):
    nothing is known of the site, so nothing runs. Runbooks whose check this
    agent does not have are left out (see :func:`unsupported_runbooks`)."""
    if site_config is None or runbooks is None:
        return []
    enabled = set(site_config.get("runbooks", []))
    mapped: dict[str, dict[str, list[str]]] = {}
    for framework in (frameworks or {}).get("frameworks", []):
        for control in framework.get("controls", []):
            for runbook_id in control.get("runbooks", []):
                mapped.setdefault(runbook_id, {}).setdefault(framework["id"], []).append(
                    control["id"]
                )
    return [
        PlannedCheck(
            runbook_id=runbook["id"],
            check=runbook["check"],
            l1_action=runbook.get("l1_action"),
            controls=mapped.get(runbook["id"], {}),
        )
        for runbook in runbooks.get("runbooks", [])
        if runbook["id"] in enabled and runbook["check"] in CHECKS
    ]


def unsupported_runbooks(
    site_config: dict[str, Any] | None, runbooks: dict[str, Any] | None
) -> list[str]:
    """Runbooks the site enables whose check this agent version does not have:
    reported, not run (an "error" every round would vouch for nothing)."""
    if site_config is None or runbooks is None:
        return []
    enabled = set(site_config.get("runbooks", []))
    return sorted(
        runbook["id"]
        for runbook in runbooks.get("runbooks", [])
        if runbook["id"] in enabled and runbook["check"] not in CHECKS
    )


class Sleeper:
    """A loop's sleep that ends early when the loop is woken or stopped."""

    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self._wake = asyncio.Event()
        self._hold_until = 0.0

    def wake(self) -> None:
        self._wake.set()

    def hold(self, seconds: float) -> None:
        """No wake ends a sleep within the next ``seconds`` (only the stop
        does): a wait the server asked for (Retry-After) is kept even when
        the link seems to come back or new work arrives meanwhile."""
        self._hold_until = max(self._hold_until, time.monotonic() + seconds)

    async def sleep(self, seconds: float) -> None:
        held = self._hold_until - time.monotonic()
        if held > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), min(held, seconds))
            # A wake meanwhile is served by the pass that follows anyway.
            self._wake.clear()
            seconds -= held
            if seconds <= 0 or self._stop.is_set():
                return
        if self._wake.is_set():
            self._wake.clear()
            return
        stopper = asyncio.ensure_future(self._stop.wait())
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({stopper, waker}, timeout=seconds, return_when="FIRST_COMPLETED")
        finally:
            stopper.cancel()
            waker.cancel()
        self._wake.clear()


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        clock: Callable[[], datetime] = utc_now,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.notifier = notifier or Notifier.from_environment()
        self.central_key: VerifyKey = settings.central_key()
        self.stop = asyncio.Event()
        self.connectivity = Connectivity()
        self.problems: dict[str, str] = {}
        self.last_check_at: datetime | None = None
        self.last_sync_at: datetime | None = None
        self.clock_skew: float | None = None
        self._last_results: dict[str, CheckRecord] = {}
        self.unsupported: list[str] = []
        self._revocations_etag: str | None = None
        # The stores' sizes and queue depths as last read (status, heartbeat).
        self._counts: dict[str, int] = {}
        self.sync_refused = False
        # Until when (monotonic) a refused audit sync waits before trying
        # again; the server witnessing another size lifts it (see heartbeat).
        self._refused_until = 0.0
        self._refused_witnessed: int | None = None
        self._sleepers: dict[str, Sleeper] = {}
        # Audit batch sizes follow the server's answers for the process
        # lifetime (a restart starts again from the sizer's default).
        self.batch_sizer = BatchSizer()
        self._status_written: tuple[Any, float] | None = None
        # Set once a server refused this agent's heartbeat as malformed: it
        # predates the dashboard figures, and gets only what it knows.
        self._heartbeat_fields: frozenset[str] | None = None

    # --- life cycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until :attr:`stop` is set; then stop every loop and close.
        Raises :class:`StateDirBusyError` when another agent holds the state
        directory."""
        settings = self.settings
        settings.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        with lock_state_dir(settings.state_dir):
            await self._run_locked()

    async def _run_locked(self) -> None:
        settings = self.settings
        self.signer = DelegatedSigningKey.load_or_create(
            settings.key_dir, central_keys=[self.central_key], clock=self.clock
        )
        timeout = aiohttp.ClientTimeout(
            total=settings.request_timeout_seconds * 4,
            connect=settings.request_timeout_seconds,
            sock_read=settings.request_timeout_seconds,
        )
        async with aiohttp.ClientSession() as session:
            self.client = HttpCentralClient(
                settings.require_central_url(),
                session,
                signing_key=self.signer.signing_key,
                timeout=timeout,
                connectivity=self.connectivity,
            )
            if self.signer.certificate is None and not await self._enroll_at_start():
                return
            certificate = self.signer.certificate
            assert certificate is not None
            self.appliance_id = certificate.certificate.appliance_id
            self.site_id = certificate.certificate.site_id
            self.client.appliance_id = self.appliance_id
            await self._open_state(session)
            try:
                await self._serve()
            finally:
                await self._close_state()

    async def _enroll_at_start(self) -> bool:
        try:
            return await self._enroll_with_token()
        except EnrollmentError as exc:
            if not self.notifier.enabled:
                raise
            # A service that cannot enroll without its operator stays up and
            # says why (`systemctl status`): exiting would fail the unit at
            # every start and every switch, and a restart loop would present
            # a refused token to the server again and again. A new token is
            # taken at the next start (`systemctl restart msp-agent`).
            log.error("%s", exc)
            self.notifier.ready(f"waiting for the operator: {exc}")
            ping = self.notifier.watchdog_interval() or STATUS_SECONDS
            while not self.stop.is_set():
                self.notifier.watchdog()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), ping)
            return False

    async def _enroll_with_token(self) -> bool:
        token_file = self.settings.enrollment_token_file
        token = ""
        if token_file is not None:
            try:
                token = token_file.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                token = ""
            except OSError as exc:
                raise EnrollmentError(
                    f"cannot read enrollment_token_file: {exc.strerror}"
                ) from None
        # No file, a deleted one or a blank one (the unit's placeholder when
        # the token file is missing) all mean: no token.
        if not token:
            raise EnrollmentError(
                "this appliance is not enrolled and has no enrollment token: run "
                "`msp-agent enroll` or set enrollment_token_file"
            )
        # Ready (started) even before enrollment succeeds: a boot or a
        # `nixos-rebuild switch` must not wait for the central server.
        self.notifier.ready("enrolling")
        ping = self.notifier.watchdog_interval() or STATUS_SECONDS
        attempt = 0
        while not self.stop.is_set():
            request = asyncio.ensure_future(
                enroll(self.signer, self.client, token, audience=self.central_key.key_id)
            )
            stopper = asyncio.ensure_future(self.stop.wait())
            try:
                # A request may take a while: the watchdog is fed meanwhile,
                # and SIGTERM does not wait for it (a retry with the same
                # token and key gets the same answer from the server).
                while not request.done() and not self.stop.is_set():
                    self.notifier.watchdog()
                    await asyncio.wait(
                        {request, stopper}, timeout=ping, return_when="FIRST_COMPLETED"
                    )
            finally:
                stopper.cancel()
                if not request.done():
                    request.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await request
            if request.cancelled():
                return False
            try:
                request.result()
                return True
            except CentralUnavailable as exc:
                deadline = time.monotonic() + wait_before_retry(attempt, exc.retry_after)
                attempt += 1
                log.warning("enrollment: central server unavailable (%s); retrying", exc)
                while not self.stop.is_set() and time.monotonic() < deadline:
                    self.notifier.watchdog()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self.stop.wait(), min(ping, deadline - time.monotonic())
                        )
            except CentralRejected as exc:
                raise EnrollmentError(f"enrollment refused: {exc.detail or exc.code}") from None
        return False

    async def _open_state(self, session: aiohttp.ClientSession) -> None:
        settings = self.settings
        self.sms: SMSAlerter | None = None
        if settings.sms_configured():
            assert settings.twilio_account_sid
            assert settings.twilio_auth_token_file
            self.sms = await SMSAlerter.open(
                settings.state_dir / "sms.sqlite",
                TwilioSettings(
                    account_sid=settings.twilio_account_sid,
                    secret_file=settings.twilio_auth_token_file,
                    from_number=settings.twilio_from,
                    base_url=settings.twilio_api_url,
                ),
                settings.on_call_numbers,
                session,
                clock=self.clock,
            )
        try:
            self.manager = await LocalResilienceManager.open(
                settings.state_dir,
                appliance_id=self.appliance_id,
                site_id=self.site_id,
                signer=self.signer,
                central_keys=[self.central_key],
                sms=self.sms,
                sms_after=settings.sms_after,
                quotas=Quotas(settings.audit_quota_bytes, settings.evidence_quota_bytes),
                clock=self.clock,
                on_alert=self._on_alert,
            )
        except BaseException:
            if self.sms is not None:
                await self.sms.close()
            raise
        bundles = settings.state_dir / BUNDLE_DIR
        keys = [self.central_key]
        self.site_config = SiteConfigManager(
            bundles, site_id=self.site_id, central_keys=keys, clock=self.clock
        )
        self.runbooks = LocalRunbookCache(
            bundles, site_id=self.site_id, central_keys=keys, clock=self.clock
        )
        self.frameworks = LocalFrameworkCache(
            bundles, site_id=self.site_id, central_keys=keys, clock=self.clock
        )
        self.runner = L1Runner(settings.l1_command)
        try:
            self._last_results = read_results(settings.state_dir)
        except OSError as exc:
            log.warning("cannot read the last check results: %s", exc)
            self._last_results = {}

    async def _close_state(self) -> None:
        await self.manager.close()
        if self.sms is not None:
            await self.sms.close()

    async def _serve(self) -> None:
        trail = self.manager.trail
        try:
            await trail.append(
                "agent.started", "agent", {"version": __version__, "pid": os.getpid()}
            )
        except (KeyRevokedError, AuditTrailError) as exc:
            # Full or revoked: reported, and everything else keeps running
            # (heartbeat, incidents, the SMS fallback).
            log.error("cannot record the start in the audit trail: %s", exc)
            self.problems["audit"] = str(exc)[:200]
        loops: list[tuple[str, Callable[[Sleeper], Awaitable[None]]]] = [
            ("audit-sync", self._audit_sync_loop),
            ("evidence", self._evidence_loop),
            ("heartbeat", self._heartbeat_loop),
            ("bundles", self._bundles_loop),
            ("keys", self._keys_loop),
            ("checks", self._checks_loop),
        ]
        self._sleepers = {name: Sleeper(self.stop) for name, _loop in loops}
        self.connectivity.on_recovery(self._wake_all)
        tasks = [
            asyncio.create_task(self._guard(name, loop, self._sleepers[name]), name=name)
            for name, loop in loops
        ]
        tasks.append(
            asyncio.create_task(self.manager.urgent.run(self.client, self.stop), name="urgent")
        )
        self.notifier.ready(self.status_line())
        log.info(
            "agent running: appliance %s of site %s, log size %d",
            self.appliance_id,
            self.site_id,
            trail.size,
        )
        watchdog = asyncio.create_task(self._watchdog_loop(), name="watchdog")
        try:
            await self._status_loop()
        finally:
            watchdog.cancel()
            self.notifier.stopping()
            self.stop.set()
            # Loops end at their next await of the stop event; one in the
            # middle of a request gets a moment, then is cancelled (every
            # store commits or rolls back whole, so a cancel loses nothing).
            _done, pending = await asyncio.wait(tasks, timeout=3)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await self._refresh_counts()
            except Exception:  # the last report is best effort; stopping is not
                log.exception("cannot refresh the status while stopping")
            self._write_status(force=True, stopped=True)

    def _wake_all(self) -> None:
        """The link is back: every queue delivers now (checks keep their
        own schedule; they do not depend on the link), urgent incidents
        first (see :meth:`_urgent_first`)."""
        self.manager.urgent.wake()
        for name, sleeper in self._sleepers.items():
            if name != "checks":
                sleeper.wake()

    async def _urgent_first(self) -> None:
        """Before a batch of the backlog: let pending urgent incidents reach
        the server first, waiting a bounded time for them."""
        if not await self.manager.urgent.deliver_first(URGENT_FIRST_SECONDS):
            log.debug(
                "urgent incidents still pending after %g s: the backlog goes on",
                URGENT_FIRST_SECONDS,
            )

    @staticmethod
    def _retry_wait(
        sleeper: Sleeper, attempt: int, retry_after: float | None, *, ceiling: float
    ) -> float:
        """The wait before a loop's next attempt: a capped, fully jittered
        backoff (capped at ``ceiling`` too, the loop's own interval), plus
        the server's Retry-After, which no wake cuts short."""
        wait = wait_before_retry(attempt, retry_after, cap=min(CAP_SECONDS, ceiling))
        if retry_after is not None:
            sleeper.hold(wait)
        return wait

    async def _guard(
        self, name: str, loop: Callable[[Sleeper], Awaitable[None]], sleeper: Sleeper
    ) -> None:
        """Keep a loop alive: a bug in one pass is logged and the loop goes on."""
        while not self.stop.is_set():
            try:
                await loop(sleeper)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s loop failed; restarting it", name)
                when = format_time(self.clock())
                self.problems[name] = f"loop failed at {when}, restarted (see the journal)"
                await sleeper.sleep(self.settings.sync_interval_seconds)

    # --- the loops --------------------------------------------------------------------------

    async def _audit_sync_loop(self, sleeper: Sleeper) -> None:
        attempt = 0
        while not self.stop.is_set():
            wait = self.settings.sync_interval_seconds
            if self.signer.revoked:  # every request is signed: nothing to send
                await sleeper.sleep(wait)
                continue
            if time.monotonic() < self._refused_until:  # woken, but the verdict stands
                await sleeper.sleep(self._refused_until - time.monotonic())
                continue
            try:
                # Urgent incidents go before each batch, the first included.
                report = await self.manager.trail.sync(
                    self.client, sizer=self.batch_sizer, before_batch=self._urgent_first
                )
            except CentralUnavailable as exc:
                # Resumed from what the server witnessed, after the wait.
                wait = self._retry_wait(sleeper, attempt, exc.retry_after, ceiling=wait)
                attempt += 1
            except (AuditSyncRejected, LocalTruncationError) as exc:
                await self._report_sync_refusal(exc)
                # Retrying will not change the verdict (each refusal is a
                # security alert on the server): slowly, until a human acts.
                self._refused_until = time.monotonic() + REFUSED_RETRY_SECONDS
                self._refused_witnessed = None
                self.sync_refused = True
                wait = REFUSED_RETRY_SECONDS
            except KeyRevokedError:
                wait = self.settings.sync_interval_seconds
            else:
                attempt = 0
                self.sync_refused = False
                self.last_sync_at = self.clock()
                self.problems.pop("audit-sync", None)
                if report.batches:
                    log.info(
                        "audit log witnessed up to %d (%d batches)", report.to_size, report.batches
                    )
            await sleeper.sleep(wait)

    async def _report_sync_refusal(self, exc: Exception) -> None:
        """The server will not witness this history: a security problem for a
        human, reported once per distinct refusal, never retried blindly in a
        tight loop and never a reason to stop logging."""
        if isinstance(exc, AuditSyncRejected):
            code = exc.rejection.code
            message = f"central server refused the audit log: {exc.rejection.code}"
        else:
            code = "local-truncation"
            message = str(exc)
        first_time = self.problems.get("audit-sync") != message
        self.problems["audit-sync"] = message
        if not first_time:
            return
        log.error("%s", message)
        head = await self.manager.trail.head()
        with contextlib.suppress(KeyRevokedError):
            await self.manager.escalate_to_cloud(
                title=f"Audit log sync refused ({code})",
                severity="critical",
                detail={"problem": message[:500], "log_size": head.size},
                escalation_id=f"sync-{code}-{head.receipt_size}",
            )

    async def _evidence_loop(self, sleeper: Sleeper) -> None:
        attempt = 0
        while not self.stop.is_set():
            wait = self.settings.sync_interval_seconds
            if self.signer.revoked:
                await sleeper.sleep(wait)
                continue
            outcome = await self.manager.evidence.deliver(
                self.client, before_batch=self._urgent_first
            )
            if outcome.stopped_by is not None:
                wait = self._retry_wait(sleeper, attempt, outcome.retry_after, ceiling=wait)
                attempt += 1
            else:
                attempt = 0
            await sleeper.sleep(wait)

    async def _heartbeat_loop(self, sleeper: Sleeper) -> None:
        failures = 0
        while not self.stop.is_set():
            if self.signer.revoked:
                await sleeper.sleep(self.settings.heartbeat_interval_seconds)
                continue
            asked: float | None = None
            try:
                answer = await self._send_heartbeat()
            except (CentralUnavailable, CentralRejected) as exc:
                failures += 1
                if isinstance(exc, CentralUnavailable):
                    asked = exc.retry_after
                log.debug("heartbeat: %s", exc)
                if isinstance(exc, CentralUnavailable) and exc.code in CLOCK_REFUSALS:
                    self.problems["clock"] = (
                        "the central server refuses this appliance's request times: "
                        "its clock is off (check time synchronisation)"
                    )
            else:
                failures = 0
                self._notice_witnessed_size(answer.get("witnessed_size"))
                skew = answer.get("clock_skew_seconds")
                if isinstance(skew, int | float):
                    self.clock_skew = float(skew)
                    if abs(skew) > 60:
                        # Reported, never a reason to stop: order is by log
                        # index, wall time is metadata.
                        self.problems["clock"] = f"clock differs from the server's by {skew:.0f} s"
                    else:
                        self.problems.pop("clock", None)
            if self.connectivity.state is LinkState.ONLINE:
                wait = self.settings.heartbeat_interval_seconds
            elif self.connectivity.unreachable:
                # Nothing reaches the server: probing costs it nothing.
                wait = OFFLINE_PROBE_SECONDS * random.uniform(0.5, 1.5)  # noqa: S311 - jitter
            else:
                # It answers but fails (overloaded, 5xx, 429): back off.
                wait = max(1.0, wait_before_retry(failures, asked))
            if asked is not None:
                # Never before the server said (even if another request found
                # it willing meanwhile), and no wake cuts that short.
                wait = max(wait, asked)
                sleeper.hold(wait)
            await sleeper.sleep(wait)

    def _notice_witnessed_size(self, witnessed: Any) -> None:
        """While the server refuses this appliance's log, a change in the size
        it says it witnessed means a person acted there (approved a new log
        after a quarantine): try the sync now rather than within the hour."""
        if not self.sync_refused or not isinstance(witnessed, int):
            return
        if self._refused_witnessed is None:
            self._refused_witnessed = witnessed
        elif witnessed != self._refused_witnessed:
            log.info("the central server's view of the audit log changed: syncing again")
            self._refused_until = 0.0
            self._refused_witnessed = witnessed
            self._sleepers["audit-sync"].wake()

    async def _heartbeat_state(self) -> dict[str, Any]:
        await self._refresh_counts()
        figures = self._figures()
        state: dict[str, Any] = {
            "version": __version__,
            "log_size": figures.log_size,
            "queues": {"evidence": figures.evidence_queued, "urgent": figures.urgent_waiting},
            "clock": format_time(self.clock()),
            # The server calls evidence stale after a few missed rounds of this.
            "check_interval_seconds": max(1, math.ceil(self.settings.check_interval_seconds)),
            # The server calls the appliance offline after a few missed beats.
            "heartbeat_interval_seconds": max(
                1, math.ceil(self.settings.heartbeat_interval_seconds)
            ),
            # For the operator's dashboard (servers before them refuse them:
            # see _send_heartbeat).
            "witnessed_size": figures.witnessed_size,
            "problems": figures.problems,
        }
        if figures.last_sync_at is not None:
            state["last_sync_at"] = format_time(figures.last_sync_at)
        if figures.certificate_not_after is not None:
            state["certificate_not_after"] = format_time(figures.certificate_not_after)
        return state

    async def _send_heartbeat(self) -> dict[str, Any]:
        """Send the heartbeat. A server older than this agent refuses fields
        it does not know as a malformed document: the heartbeat is sent again
        with only the fields such a server knows, at once and from then on
        (until the agent restarts), so the appliance is never called offline
        for reporting more."""
        state = await self._heartbeat_state()
        known = self._heartbeat_fields
        if known is not None:
            return await self.client.heartbeat({k: v for k, v in state.items() if k in known})
        try:
            return await self.client.heartbeat(state)
        except CentralRejected as exc:
            if exc.code != "malformed-document":
                raise
            log.warning(
                "the central server refused the heartbeat (%s): sending the fields it knows",
                exc.detail,
            )
            self._heartbeat_fields = HEARTBEAT_FIELDS_BEFORE_FIGURES
            return await self.client.heartbeat(
                {k: v for k, v in state.items() if k in HEARTBEAT_FIELDS_BEFORE_FIGURES}
            )

    def _figures(self) -> Figures:
        """The figures of the heartbeat and the textfile, from the counts as
        last refreshed."""
        counts = self._counts
        certificate = self.signer.certificate
        return Figures(
            version=__version__,
            log_size=counts["log_size"],
            witnessed_size=counts["witnessed_size"],
            evidence_queued=counts["evidence_queued"],
            urgent_waiting=counts["urgent_waiting"],
            online=self.connectivity.state is LinkState.ONLINE and not self.signer.revoked,
            problems=len(self.problems),
            last_sync_at=self.last_sync_at,
            certificate_not_after=None
            if certificate is None
            else certificate.certificate.not_after,
        )

    def _write_textfile(self) -> None:
        path = self.settings.metrics_textfile
        if path is None:
            return
        try:
            write_textfile(path, self._figures())
        except OSError as exc:
            log.warning("cannot write the metrics textfile %s: %s", path, exc)

    async def _bundles_loop(self, sleeper: Sleeper) -> None:
        while not self.stop.is_set():
            if not self.signer.revoked:  # requests are signed: a revoked key asks nothing
                await self.refresh_bundles()
            await sleeper.sleep(self.settings.bundle_refresh_seconds)

    async def refresh_bundles(self) -> None:
        caches: list[SignedBundleCache] = [self.site_config, self.runbooks, self.frameworks]
        updated = False
        for cache in caches:
            outcome = await cache.refresh(self.client)
            if outcome.status == "refused":
                self.problems[f"bundle-{cache.kind.value}"] = outcome.detail[:200]
            elif outcome.status in ("updated", "unchanged"):
                self.problems.pop(f"bundle-{cache.kind.value}", None)
            if outcome.status == "updated":
                updated = True
                log.info("%s bundle version %s", cache.kind.value, outcome.version)
        if updated and "checks" in self._sleepers:
            # What to check, or how, changed: check now rather than at the
            # next interval (the first round waits for the first bundles).
            self._sleepers["checks"].wake()
        await self.refresh_revocations()

    async def refresh_revocations(self) -> None:
        path = self.settings.state_dir / BUNDLE_DIR / REVOCATIONS_FILE
        try:
            fetched = await self.client.fetch_revocations(self._revocations_etag)
        except (CentralUnavailable, CentralRejected, KeyRevokedError) as exc:
            log.debug("revocations: %s", exc)
            return
        if fetched is None:
            return
        result = check_revocations(fetched.envelope, roots=[self.central_key])
        if not result.ok:
            self.problems["revocations"] = result.describe()[:200]
            return
        revocations = result.unwrap()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, fetched.envelope.to_json(), mode=0o600)
        self._revocations_etag = fetched.etag
        certificate = self.signer.certificate
        if certificate is None or self.signer.revoked:
            return
        entry = revocations.revocations.find(certificate.certificate.serial)
        if entry is not None:
            log.critical(
                "certificate %s of this appliance was revoked: it stops signing now",
                certificate.certificate.serial,
            )
            self.signer.mark_revoked()
            self.problems["keys"] = "certificate revoked: not signing; re-enroll the appliance"

    async def _keys_loop(self, sleeper: Sleeper) -> None:
        attempt = 0
        while not self.stop.is_set():
            wait = min(60.0, self.settings.sync_interval_seconds)
            if not self.signer.revoked:
                try:
                    await self.maintain_key()
                except CentralUnavailable as exc:
                    wait = self._retry_wait(sleeper, attempt, exc.retry_after, ceiling=wait)
                    attempt += 1
                except CentralRejected as exc:
                    self.problems["keys"] = f"certificate request refused: {exc.code}"
                    log.error("certificate request refused: %s", exc)
                else:
                    attempt = 0
            await sleeper.sleep(wait)

    async def maintain_key(self) -> None:
        """Rotate the key when asked to or when it is too old, else renew the
        certificate once renewal is due."""
        audience = self.central_key.key_id
        request_file = self.settings.state_dir / ROTATE_REQUEST_FILE
        if request_file.exists() or (
            self.signer.renewal_due() and self._key_age() > self.settings.key_rotation_seconds
        ):
            new_key = await self.manager.rotate_key(self.client, audience=audience)
            request_file.unlink(missing_ok=True)
            log.info("device key rotated to %s", new_key)
            self.problems.pop("keys", None)
        elif self.signer.renewal_due():
            if self.signer.expired() and not self.sync_refused:
                head = await self.manager.trail.head()
                if head.receipt_size < head.size:
                    # Lapsed while offline: let what was signed meanwhile
                    # reach the server first, so it is judged (and flagged)
                    # under the certificate it was signed under.
                    return
            await self.manager.renew_certificate(self.client, audience=audience)
            log.info("certificate renewed")
            self.problems.pop("keys", None)

    def _key_age(self) -> float:
        try:
            created = (self.settings.key_dir / KEY_FILE).stat().st_mtime
        except OSError:
            return 0.0
        return max(0.0, time.time() - created)

    async def _checks_loop(self, sleeper: Sleeper) -> None:
        while not self.stop.is_set():
            try:
                await self.run_checks()
            except KeyRevokedError:
                log.warning("checks not recorded: this appliance no longer signs")
            except AuditTrailError as exc:
                log.error("checks not recorded: %s", exc)
                self.problems["checks"] = f"not recorded: {exc}"[:200]
            await sleeper.sleep(self.settings.check_interval_seconds)

    def _cached(self, cache: SignedBundleCache) -> dict[str, Any] | None:
        try:
            return cache.content()
        except BundleCacheError as exc:
            self.problems[f"bundle-{cache.kind.value}"] = str(exc)[:200]
            return None

    async def run_checks(self) -> None:
        """One round: every planned check, its evidence, L1 where allowed."""
        site_config, runbooks = self._cached(self.site_config), self._cached(self.runbooks)
        plan = plan_checks(site_config, runbooks, self._cached(self.frameworks))
        self.unsupported = unsupported_runbooks(site_config, runbooks)
        if not plan:
            self.problems["checks"] = "no signed site configuration yet: checks wait for it"
            return
        self.problems.pop("checks", None)
        context = self._check_context()
        for planned in plan:
            observation = await run_check(planned.check, context)
            await self._record_check(planned, observation, after_l1=None)
            action = None
            if observation.result == "fail" and planned.l1_action:
                action = await self._remediate(planned)
                if action.outcome == "succeeded":
                    observation = await run_check(planned.check, context)
                    await self._record_check(planned, observation, after_l1=planned.l1_action)
            await self._escalate_on_change(planned, observation, action)
        self.last_check_at = self.clock()
        # Runbooks the site no longer runs have no current result to show.
        planned_ids = {planned.runbook_id for planned in plan}
        self._last_results = {
            check_id: record
            for check_id, record in self._last_results.items()
            if check_id in planned_ids
        }
        self._save_results()
        # New evidence and entries: deliver them now if the link allows
        # (offline, the loops' backoff decides and nothing is lost).
        if self.connectivity.state is LinkState.ONLINE:
            for name in ("audit-sync", "evidence"):
                self._sleepers[name].wake()

    def _check_context(self) -> CheckContext:
        async def verify_audit() -> tuple[bool, int, int | None, str | None]:
            result = await self.manager.verify_audit_integrity()
            return result.ok, result.size, result.first_bad_index, result.problem

        def certificate() -> tuple[str, datetime, datetime, bool] | None:
            verified = self.signer.certificate
            if verified is None:
                return None
            c = verified.certificate
            return c.serial, c.not_before, c.not_after, self.signer.revoked

        return CheckContext(
            state_dir=self.settings.state_dir,
            disk_min_free_percent=self.settings.disk_min_free_percent,
            sshd_config=self.settings.sshd_config,
            verify_audit=verify_audit,
            certificate=certificate,
            now=self.clock,
            certificate_min_remaining=self.settings.certificate_min_remaining,
            journal_max_bytes=self.settings.journal_max_bytes,
            max_system_generations=self.settings.max_system_generations,
            max_os_age_days=self.settings.max_os_age_days,
        )

    async def _record_check(
        self, planned: PlannedCheck, observation: Observation, *, after_l1: str | None
    ) -> None:
        observed = dict(observation.observed)
        if after_l1 is not None:
            observed["after_l1_action"] = after_l1
        if planned.controls:
            await self.manager.sign_evidence(
                check_id=planned.runbook_id,
                controls=planned.controls,
                result=observation.result,
                observed=observed,
            )
        else:
            # The site's frameworks map no control to this runbook: a record
            # of the run, but no evidence bundle (it would vouch for nothing).
            await self.manager.trail.append(
                "check.run",
                "agent",
                {
                    "check_id": planned.runbook_id,
                    "result": observation.result,
                    "observed": observed,
                },
            )

    async def _remediate(self, planned: PlannedCheck) -> ActionRecord:
        """Run the runbook's L1 action; its outcome, recorded in the audit trail."""
        action = planned.l1_action
        assert action is not None
        if action in INTERNAL_ACTIONS:
            try:
                await self.manager.renew_certificate(self.client, audience=self.central_key.key_id)
            except (CentralUnavailable, CentralRejected) as exc:
                await self.manager.log_l1_action(
                    action, runbook=planned.runbook_id, result="failed", detail={"error": str(exc)}
                )
                return self._action(action, "failed", f"certificate renewal failed: {exc}")
            await self.manager.log_l1_action(action, runbook=planned.runbook_id, result="succeeded")
            return self._action(action, "succeeded", None)
        try:
            self.runner.argv(action)
        except ActionNotAllowedError as exc:
            await self.manager.log_l1_action(
                action, runbook=planned.runbook_id, result="refused", detail={"error": str(exc)}
            )
            self.problems["l1"] = str(exc)[:200]
            return self._action(action, "refused", str(exc))
        # The intent is recorded before the action runs: one that is cut
        # short (SIGTERM, kill -9, a crash) still left a trace.
        await self.manager.log_l1_action(action, runbook=planned.runbook_id, result="started")
        outcome = await self.runner.run(action)
        await self.manager.log_l1_action(
            action, runbook=planned.runbook_id, result=outcome.result, detail=outcome.detail()
        )
        return self._action(action, outcome.result, outcome.reason)

    def _action(self, action: str, outcome: str, reason: str | None) -> ActionRecord:
        return ActionRecord(action, outcome, reason and reason[:300], format_time(self.clock()))

    async def _escalate_on_change(
        self, planned: PlannedCheck, observation: Observation, action: ActionRecord | None
    ) -> None:
        """A check that starts failing (and stays failing after L1) is an
        incident, once per change, not once per round."""
        record = self._last_results.get(planned.runbook_id)
        previous = None if record is None else record.result
        reason = observation.observed.get("reason")
        self._last_results[planned.runbook_id] = next_record(
            record,
            observation.result,
            reason if isinstance(reason, str) else None,
            self.clock(),
            action,
        )
        if previous != observation.result:
            # On disk before the incident: a restart (an upgrade, the
            # watchdog) must not raise, and text, the same failing check again.
            self._save_results()
        if observation.result != "fail" or previous == "fail":
            return
        await self.manager.escalate_to_cloud(
            title=f"Check failed: {planned.runbook_id}",
            severity="critical" if planned.check in CRITICAL_CHECKS else "high",
            detail={"check_id": planned.runbook_id, "observed": observation.observed},
        )

    def _save_results(self) -> None:
        try:
            write_results(self.settings.state_dir, self._last_results)
        except OSError as exc:
            log.error("cannot write the last check results: %s", exc)
            self.problems["check-results"] = f"not saved: {exc}"[:200]
        else:
            self.problems.pop("check-results", None)

    # --- status -----------------------------------------------------------------------------

    async def _watchdog_loop(self) -> None:
        """``WATCHDOG=1`` from the event loop itself, touching nothing that
        can wait (no database): if the loop hangs, the pings stop and
        systemd restarts the service; a long verify or sync does not."""
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while not self.stop.is_set():
            self.notifier.watchdog()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), interval)

    async def _status_loop(self) -> None:
        while not self.stop.is_set():
            try:
                await self._refresh_counts()
                self.notifier.status(self.status_line())
                self._write_status()
                self._write_textfile()
            except Exception:  # a report must never stop the service
                log.exception("cannot refresh the status")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), STATUS_SECONDS)

    async def _refresh_counts(self) -> None:
        head = await self.manager.trail.head()
        evidence = await self.manager.evidence.stats()
        urgent = await self.manager.urgent.counts()
        self._counts = {
            "log_size": head.size,
            "witnessed_size": head.receipt_size,
            "evidence_queued": evidence.queued,
            "evidence_evicted": evidence.evicted_total,
            "urgent_waiting": urgent["waiting"],
            "urgent_delivered": urgent["delivered"],
        }

    def status_line(self) -> str:
        counts = self._counts or {"log_size": self.manager.trail.size}
        parts = [
            "revoked" if self.signer.revoked else self.connectivity.state.value,
            f"log {counts['log_size']}",
        ]
        if "witnessed_size" in counts:
            parts.append(f"witnessed {counts['witnessed_size']}")
            parts.append(f"evidence queued {counts['evidence_queued']}")
            parts.append(f"incidents waiting {counts['urgent_waiting']}")
        if self.problems:
            parts.append(f"{len(self.problems)} problem(s)")
        return ", ".join(parts)

    def status_document(self, *, stopped: bool = False) -> dict[str, Any]:
        certificate = self.signer.certificate
        return {
            "running": not stopped,
            "pid": os.getpid(),
            "version": __version__,
            "appliance_id": self.appliance_id,
            "site_id": self.site_id,
            "link": "revoked" if self.signer.revoked else self.connectivity.state.value,
            "last_error": self.connectivity.last_error,
            "key_id": self.signer.key_id,
            "certificate": None
            if certificate is None
            else {
                "serial": certificate.certificate.serial,
                "not_before": format_time(certificate.certificate.not_before),
                "not_after": format_time(certificate.certificate.not_after),
                "revoked": self.signer.revoked,
                "expired": self.signer.expired(),
            },
            **self._counts,
            "last_sync_at": _time_or_none(self.last_sync_at),
            "last_check_at": _time_or_none(self.last_check_at),
            "runbooks_without_check": self.unsupported,
            "clock_skew_seconds": self.clock_skew,
            "problems": dict(sorted(self.problems.items())),
        }

    def _write_status(self, *, force: bool = False, stopped: bool = False) -> None:
        """``status.json`` for ``msp-agent status``: rewritten when it changes,
        and at least once a minute (its age tells a reader the agent is alive)."""
        document = self.status_document(stopped=stopped)
        now = time.monotonic()
        previous = self._status_written
        if not force and previous and previous[0] == document and now - previous[1] < 60:
            return
        self._status_written = (document, now)
        body = {**document, "updated_at": format_time(self.clock())}
        try:
            write_atomic(
                self.settings.state_dir / STATUS_FILE,
                json.dumps(body, indent=2).encode() + b"\n",
                mode=0o640,
            )
        except OSError as exc:
            log.warning("cannot write %s: %s", STATUS_FILE, exc)

    def _on_alert(self, name: str, details: dict[str, Any]) -> None:
        self.problems[f"audit-{name}"] = json.dumps(details, sort_keys=True)[:200]


def _time_or_none(value: datetime | None) -> str | None:
    return None if value is None else format_time(value)


async def enroll(
    signer: DelegatedSigningKey, client: HttpCentralClient, token: str, *, audience: str
) -> None:
    """Enroll this appliance's key with a one-time token (proof of possession);
    the certificate is verified against the pinned key and stored."""
    certificate = await client.request_certificate(
        signer.enrollment_request(audience=audience, token=token), enrollment_token=token
    )
    signer.install_certificate(certificate)


def load_revocations_file(state_dir: Path) -> Envelope | None:
    """The last revocation list the agent stored, if any is readable."""
    path = state_dir / BUNDLE_DIR / REVOCATIONS_FILE
    try:
        return parse_envelope(path.read_bytes())
    except (OSError, ProtocolError):
        return None


LOCK_FILE = "agent.lock"


class StateDirBusyError(Exception):
    """Another live agent holds the state directory."""


@contextlib.contextmanager
def lock_state_dir(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``state_dir`` for the agent's lifetime. Two
    agents on one state directory would sign, append and sync over each
    other's shoulders; the second refuses to start instead. The lock is an
    ``flock`` on ``agent.lock``, released by the kernel when the process
    ends however it ends, so a crash never leaves a stale lock behind."""
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise StateDirBusyError(
                f"another agent (pid {holder}) is running on state directory {state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def run_service(settings: AgentSettings) -> int:
    """The body of ``msp-agent run``: the event loop, SIGTERM/SIGINT, exit code."""

    async def main() -> None:
        agent = Agent(settings)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, agent.stop.set)
        await agent.run()

    try:
        asyncio.run(main())
    except (EnrollmentError, ConfigError, KeyFileError, StoreError, StateDirBusyError) as exc:
        # What an operator must fix: one line in the journal, exit status 1.
        log.error("%s", exc)
        return 1
    return 0
