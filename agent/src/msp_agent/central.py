"""The one interface every component uses to reach the central server.

The HTTP implementation (aiohttp, RFC 9421-signed requests) belongs to the
agent runtime; the components here depend only on this protocol, and the
tests drive them through an in-memory double that can fail, stall, lose an
answer after acting on the request, and come back.

Errors are split by what the caller should do:

- :class:`CentralUnavailable`: nothing was decided (connection refused, reset
  or timed out, 5xx, 429). Retry later with backoff; the request may or may
  not have been acted on, so every request is idempotent.
- :class:`CentralRejected`: the server answered 4xx with a problem document.
  Retrying the same request will not help; ``code`` is the problem type's
  last path segment (``stale-size``, ``rewrite``, …) and ``extra`` its other
  members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from msp_protocol.bundle import BundleKind, Escalation
from msp_protocol.dsse import Envelope
from msp_protocol.sync import SyncRequest, SyncResponse

# Answers that mean "too much at once" rather than "not here".
LOAD_STATUSES = frozenset({429, 503, 504})
# Answers that also say the request was not carried out (shed on arrival);
# a gateway timeout (504) may come after the server acted.
NOT_ACTED_STATUSES = frozenset({429, 503})


class CentralError(Exception):
    pass


class CentralUnavailable(CentralError):
    """The central server could not be reached or did not decide. ``code`` is
    the problem type of a refusal that a later attempt may not get (a request
    dated outside the server's window: this appliance's clock is off).
    ``retry_after`` is the wait in seconds the server asked for (its
    ``Retry-After`` on a 503 or 429), None when it named none. ``status`` is
    the HTTP status when the server (or a proxy) answered, None when nothing
    did; ``timed_out`` says the request got no answer in time."""

    def __init__(
        self,
        message: str,
        code: str | None = None,
        *,
        retry_after: float | None = None,
        status: int | None = None,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after
        self.status = status
        self.timed_out = timed_out

    @property
    def shed_load(self) -> bool:
        """The server (or its balancer) is overloaded rather than unreachable:
        it refused for load (503, 429), its gateway gave up (504), or the
        request timed out. The cue to send less at a time."""
        return self.timed_out or self.status in LOAD_STATUSES

    @property
    def not_acted_on(self) -> bool:
        """The refusal came before any work (the server or its balancer
        shed the request: 503, 429), so the request was not carried out.
        Any other failure may have come after the server acted."""
        return self.status in NOT_ACTED_STATUSES


class CentralRejected(CentralError):
    """The central server refused the request (4xx)."""

    def __init__(self, status: int, code: str, detail: str, extra: dict[str, Any] | None = None):
        super().__init__(f"central server refused ({status} {code}): {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra or {}


@dataclass(frozen=True, slots=True)
class FetchedBundle:
    envelope: Envelope
    etag: str | None = None


@dataclass(slots=True)
class DeliveryOutcome:
    """How a delivery pass went: what was delivered, and what stopped it."""

    delivered: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    stopped_by: str | None = None
    # The wait the server asked for when it stopped the pass (Retry-After).
    retry_after: float | None = None


class CentralClient(Protocol):
    async def sync_audit(self, appliance_id: str, request: SyncRequest) -> SyncResponse:
        """Witnessed audit sync. ``CentralRejected`` with code ``stale-size``
        carries ``extra["server_size"]``."""
        ...

    async def submit_evidence(self, envelope: Envelope) -> None:
        """Store a signed evidence bundle (idempotent by bundle id)."""
        ...

    async def escalate(self, escalation: Escalation) -> None:
        """Raise an urgent incident (idempotent by escalation id)."""
        ...

    async def fetch_bundle(self, kind: BundleKind, etag: str | None) -> FetchedBundle | None:
        """The current signed bundle of ``kind``, or None if ``etag`` is current."""
        ...

    async def request_certificate(
        self, request: Envelope, *, enrollment_token: str | None = None
    ) -> Envelope:
        """Send a delegation request; the answer is the issued certificate."""
        ...
