"""Failed credentials, counted per source: refused with 429 once they
repeat, and noticed with one security alert.

Three kinds of credential are counted: API keys (``bearer``), enrollment
tokens (``enrollment``) and appliance request signatures (``signature``).
A source is the client's address (:func:`client_source`, which honours
``trusted_proxies``), an IPv6 address taken as its /64, the block one host
usually holds.

State lives in memory, per server process: a refused credential must not
cost a database write an attacker can multiply, and a restart forgets
nothing worth keeping. Two tables of buckets, each bucket a fixed window of
``credential_window_minutes`` from its first failure:

- (kind, source, credential presented: the SHA-256 of a key or token, the
  key id of a signature). After ``credential_identity_failures`` failures
  that credential, from that source, is refused 429 before it is looked
  at. Another credential from the same address (a neighbour behind the
  same NAT) is not.
- (kind, source). Once ``credential_source_failures`` failures are in, a
  credential that fails is answered 429 rather than 401, but a valid one is
  still served. Only if ``credential_source_flood`` is set (it is not by
  default: the neighbours behind one NAT address would be locked out),
  past that many failures every credential of the kind from the source is
  refused 429 before it is looked at, valid ones included. At
  ``credential_alert_failures`` failed or refused attempts, one
  ``credential-failures`` security alert per window.

Each table holds at most :data:`MAX_TRACKED` buckets; the oldest go first.
With N server processes or replicas, each keeps its own counts: the budget
an address gets is N times the settings.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal, TypeVar

from aiohttp import web

from msp_central.config import Settings
from msp_central.console.sessions import client_source
from msp_central.context import central
from msp_central.problems import Problem
from msp_central.queries import record_alert

log = logging.getLogger("msp_central.throttle")

Kind = Literal["bearer", "enrollment", "signature"]
# How an alert and a refusal name each kind.
KIND_NAMES: Final[dict[Kind, str]] = {
    "bearer": "API key",
    "enrollment": "enrollment token",
    "signature": "request signature",
}
# Buckets kept per table: about 320 bytes each with its key, so some 65 MB
# for both tables full, whatever an attacker sends. Evicting the oldest
# bucket first gives its source a fresh count, never a refusal it did not
# earn.
MAX_TRACKED: Final = 100_000
ALERT_CODE: Final = "credential-failures"

Key = TypeVar("Key")


@dataclass(frozen=True, slots=True)
class Subject:
    """Whom an alert concerns, when the credential presented belongs to a
    known holder (the appliance whose key id a signature names, the partner
    of a revoked key); by default the administrators."""

    partner_id: str | None = None
    site_id: str | None = None
    appliance_id: str | None = None
    # Names the holder in the alert: never a secret, only public ids.
    named: str = ""


@dataclass(slots=True)
class _Bucket:
    started: datetime
    failures: int = 0
    # Source buckets: failures and refusals both, toward the alert.
    attempts: int = 0
    alerted: bool = False
    subject: Subject | None = None


@dataclass(frozen=True, slots=True)
class Alert:
    """A threshold crossed: what to store as one security alert."""

    kind: Kind
    source: str
    attempts: int
    window_minutes: int
    subject: Subject | None

    @property
    def detail(self) -> str:
        holder = f" ({self.subject.named})" if self.subject and self.subject.named else ""
        return (
            f"{self.attempts} failed {KIND_NAMES[self.kind]} attempts from {self.source} "
            f"within {self.window_minutes} minutes{holder}"
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to answer: 429 after ``retry_after`` seconds (None: go on, or
    the refusal the caller had), and an alert to raise, if any."""

    retry_after: int | None = None
    alert: Alert | None = None


class CredentialThrottle:
    """The counts of one server process. Pure: every method takes the time,
    so tests move a clock instead of sleeping."""

    def __init__(self, settings: Settings) -> None:
        self.window_minutes = settings.credential_window_minutes
        self.window = timedelta(minutes=settings.credential_window_minutes)
        self.identity_failures = settings.credential_identity_failures
        self.source_failures = settings.credential_source_failures
        self.source_flood = settings.credential_source_flood
        self.alert_failures = settings.credential_alert_failures
        self._credentials: OrderedDict[tuple[Kind, str, str], _Bucket] = OrderedDict()
        self._sources: OrderedDict[tuple[Kind, str], _Bucket] = OrderedDict()

    def check(self, kind: Kind, source: str, credential: str, now: datetime) -> Verdict:
        """Before a credential is looked at: refuse it when it, or its
        source as a whole (a flood), failed too often in the window."""
        flooded = self._live(self._sources, (kind, source), now)
        if (
            self.source_flood is not None
            and flooded is not None
            and flooded.failures >= self.source_flood
        ):
            return Verdict(self._wait(flooded, now), self._attempt(kind, source, None, now))
        bucket = self._live(self._credentials, (kind, source, credential), now)
        if bucket is None or bucket.failures < self.identity_failures:
            return Verdict()
        return Verdict(self._wait(bucket, now), self._attempt(kind, source, bucket.subject, now))

    def failed(
        self, kind: Kind, source: str, credential: str, now: datetime, subject: Subject | None
    ) -> Verdict:
        """Count a credential that was looked at and refused; answer 429
        once its source has failed ``credential_source_failures`` times."""
        bucket = self._take(self._credentials, (kind, source, credential), now)
        bucket.failures += 1
        bucket.subject = subject or bucket.subject
        whole = self._take(self._sources, (kind, source), now)
        over = whole.failures >= self.source_failures
        whole.failures += 1
        wait = self._wait(whole, now) if over else None
        return Verdict(wait, self._attempt(kind, source, subject, now))

    def succeeded(self, kind: Kind, source: str, credential: str) -> None:
        """A valid credential clears its own count from this source, never
        the source's: one good key must not launder a spray of bad ones."""
        self._credentials.pop((kind, source, credential), None)

    def _attempt(
        self, kind: Kind, source: str, subject: Subject | None, now: datetime
    ) -> Alert | None:
        whole = self._take(self._sources, (kind, source), now)
        whole.attempts += 1
        if whole.alerted or whole.attempts < self.alert_failures:
            return None
        whole.alerted = True
        return Alert(kind, source, whole.attempts, self.window_minutes, subject)

    def _live(self, table: OrderedDict[Key, _Bucket], key: Key, now: datetime) -> _Bucket | None:
        bucket = table.get(key)
        if bucket is not None and now >= bucket.started + self.window:
            del table[key]
            return None
        return bucket

    def _take(self, table: OrderedDict[Key, _Bucket], key: Key, now: datetime) -> _Bucket:
        bucket = self._live(table, key, now)
        if bucket is None:
            if len(table) >= MAX_TRACKED:
                table.popitem(last=False)
            bucket = table[key] = _Bucket(now)
        return bucket

    def _wait(self, bucket: _Bucket, now: datetime) -> int:
        return max(1, math.ceil((bucket.started + self.window - now).total_seconds()))


CREDENTIAL_THROTTLE = web.AppKey("credential_throttle", CredentialThrottle)


def source_of(request: web.Request) -> str:
    """The source failures are counted against: the client's address, an
    IPv6 address as its /64."""
    address = client_source(request)
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


async def guard(request: web.Request, kind: Kind, credential: str) -> None:
    """Refuse (429) a credential before it is looked at, when it or its
    source failed too often. ``credential`` identifies it and is never a
    secret itself (a hash, a key id)."""
    service = central(request)
    source = source_of(request)
    verdict = request.app[CREDENTIAL_THROTTLE].check(kind, source, credential, service.clock())
    await _raise_alert(request, verdict.alert)
    if verdict.retry_after is not None:
        raise too_many(kind, verdict.retry_after)


async def failed(
    request: web.Request,
    kind: Kind,
    credential: str,
    refusal: Problem,
    subject: Subject | None = None,
) -> Problem:
    """Count a refused credential; returns the problem to answer with:
    ``refusal``, or 429 once the source failed too often."""
    service = central(request)
    source = source_of(request)
    throttle = request.app[CREDENTIAL_THROTTLE]
    verdict = throttle.failed(kind, source, credential, service.clock(), subject)
    await _raise_alert(request, verdict.alert)
    if verdict.retry_after is not None:
        return too_many(kind, verdict.retry_after)
    return refusal


def succeeded(request: web.Request, kind: Kind, credential: str) -> None:
    request.app[CREDENTIAL_THROTTLE].succeeded(kind, source_of(request), credential)


def too_many(kind: Kind, retry_after: int) -> Problem:
    return Problem(
        "too-many-attempts",
        f"too many failed {KIND_NAMES[kind]} attempts from this address; "
        f"retry after {retry_after} s",
        retry_after=retry_after,
    )


async def _raise_alert(request: web.Request, alert: Alert | None) -> None:
    """Store the alert and its notification event. Once per crossing, so at
    most one write per source, kind and window; a failure to store it is
    logged and does not change the answer."""
    if alert is None:
        return
    service = central(request)
    subject = alert.subject or Subject()
    detail = alert.detail
    now = service.clock()
    log.warning("security alert %s: %s", ALERT_CODE, detail)
    try:
        await record_alert(
            service.engine,
            appliance_id=subject.appliance_id,
            site_id=subject.site_id,
            partner_id=subject.partner_id,
            code=ALERT_CODE,
            detail=detail,
            now=now,
        )
    except Exception:  # the refusal stands either way; the log line above says why it was
        log.exception("storing a %s security alert failed", ALERT_CODE)
