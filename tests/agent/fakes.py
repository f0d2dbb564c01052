"""An in-memory central server for the agent's component tests.

It is a test double of the network only: the witnessing rules are the real
ones (``msp_protocol.sync.check_sync``), receipts are really signed, and
evidence is really verified. What it adds is control over the link:

- ``down``: every call fails before reaching the server (connection refused);
- ``stall``: every call hangs until ``resume()`` (a black-holed link);
- ``lose_answers``: the server acts, then the answer is lost (a cut mid-stream);
- ``fail_next(n)``: the next n calls fail, then it comes back by itself;
- ``shed_next(n, retry_after)``: the next n calls are refused for load (503
  with ``Retry-After``), as a server shedding a reconnect storm answers;
- ``delay``: every call takes this long (a slow server).

It records every call as it arrives (``calls``, and ``arrivals`` with the
monotonic time), the calls it served (``served``), how long each took
(``took``) and the size of every audit batch it took in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from msp_agent.central import CentralRejected, CentralUnavailable, FetchedBundle
from msp_protocol.bundle import BundleKind, Escalation
from msp_protocol.delegation import (
    DelegationRequest,
    Scope,
    VerifiedDelegation,
    check_delegation_request,
    issue_delegation,
    verify_delegation,
)
from msp_protocol.dsse import Envelope, unverified_payload
from msp_protocol.encoding import utc_now
from msp_protocol.evidence import verify_evidence
from msp_protocol.keys import SigningKey, VerifyKey
from msp_protocol.log import make_receipt
from msp_protocol.sync import (
    AlreadyWitnessed,
    SyncAccepted,
    SyncRequest,
    SyncResponse,
    WitnessState,
    check_sync,
    failure_details,
)


@dataclass
class Log:
    state: WitnessState = field(default_factory=WitnessState)
    leaves: list[bytes] = field(default_factory=list)
    raws: list[bytes] = field(default_factory=list)
    receipts: dict[int, Envelope] = field(default_factory=dict)


class FakeCentral:
    def __init__(self, root: SigningKey, clock: Callable[[], datetime] = utc_now) -> None:
        self.root = root
        self.clock = clock
        self.certificates: dict[str, VerifiedDelegation] = {}
        self.logs: dict[str, Log] = {}
        self.evidence: dict[str, Envelope] = {}
        self.escalations: dict[str, Escalation] = {}
        self.bundles: dict[BundleKind, tuple[Envelope, str]] = {}
        self.calls: list[str] = []
        self.arrivals: list[tuple[str, float]] = []
        self.served: list[str] = []
        self.took: list[tuple[str, float]] = []
        self.batch_sizes: list[int] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.delay = 0.0
        self.alerts: list[str] = []
        self.lifetime = timedelta(days=30)
        self.down = False
        self.lose_answers = False
        self._failures_left = 0
        self._shed_left = 0
        self._shed_retry_after: float | None = None
        self._started: dict[str, float] = {}
        self._resume = asyncio.Event()
        self._resume.set()

    # --- link control -----------------------------------------------------------------

    def stall(self) -> None:
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    def fail_next(self, count: int) -> None:
        self._failures_left = count

    def shed_next(self, count: int, retry_after: float | None = 1.0) -> None:
        """Refuse the next ``count`` calls for load: 503, ``Retry-After``."""
        self._shed_left = count
        self._shed_retry_after = retry_after

    async def _link(self, name: str) -> None:
        self.calls.append(name)
        arrived = time.monotonic()
        self.arrivals.append((name, arrived))
        self._started[name] = arrived
        await self._resume.wait()
        if self.down:
            raise CentralUnavailable(f"{name}: connection refused")
        if self._failures_left:
            self._failures_left -= 1
            raise CentralUnavailable(f"{name}: connection reset")
        if self._shed_left:
            self._shed_left -= 1
            raise CentralUnavailable(
                f"{name}: HTTP 503", retry_after=self._shed_retry_after, status=503
            )
        if self.delay:
            await asyncio.sleep(self.delay)

    def _answer(self, name: str) -> None:
        self.took.append((name, time.monotonic() - self._started[name]))
        if self.lose_answers:
            raise CentralUnavailable(f"{name}: connection cut after the request was sent")
        self.served.append(name)

    # --- the server ----------------------------------------------------------------------

    def register(self, certificate: Envelope) -> VerifiedDelegation:
        verified = verify_delegation(
            certificate, roots=[self.root.verify_key], at=self.clock(), allow_expired=True
        )
        self.certificates[verified.certificate.subject_key_id] = verified
        return verified

    async def sync_audit(self, appliance_id: str, request: SyncRequest) -> SyncResponse:
        await self._link("sync_audit")
        self.batch_sizes.append(len(request.entries))
        log = self.logs.setdefault(appliance_id, Log())
        delegation = self.certificates.get(request.checkpoint.signatures[0].keyid)
        if delegation is None:
            raise CentralRejected(401, "unknown-key", "unknown appliance key")
        result = check_sync(
            request, state=log.state, delegation=delegation, stored_leaf=log.leaves.__getitem__
        )
        if not result.ok:
            failure = result.failures[0]
            status = 409 if failure.code == "stale-size" else 422
            if status == 422:
                self.alerts.append(f"{appliance_id}: {failure.code}: {failure}")
            raise CentralRejected(status, failure.code, str(failure), failure_details(failure))
        outcome = result.unwrap()
        if isinstance(outcome, AlreadyWitnessed):
            receipt = log.receipts[log.state.size]
        else:
            assert isinstance(outcome, SyncAccepted)
            log.state = outcome.state
            log.leaves.extend(r.leaf_hash for r in outcome.records)
            log.raws.extend(r.raw for r in outcome.records)
            receipt = make_receipt(self.root, outcome.checkpoint, self.clock())
            log.receipts[log.state.size] = receipt
        self._answer("sync_audit")
        return SyncResponse(size=log.state.size, receipt=receipt)

    async def submit_evidence(self, envelope: Envelope) -> None:
        await self._link("submit_evidence")
        delegation = self.certificates.get(envelope.signatures[0].keyid)
        if delegation is None:
            raise CentralRejected(401, "unknown-key", "unknown appliance key")
        verified = verify_evidence(envelope, delegation=delegation)
        assert Scope.EVIDENCE in delegation.certificate.scopes
        self.evidence.setdefault(verified.bundle.bundle_id, envelope)
        self._answer("submit_evidence")

    async def escalate(self, escalation: Escalation) -> None:
        await self._link("escalate")
        self.escalations.setdefault(escalation.escalation_id, escalation)
        self._answer("escalate")

    async def heartbeat(self, state: dict[str, Any]) -> dict[str, Any]:
        """The appliance's state, kept; the answer says what was witnessed."""
        await self._link("heartbeat")
        self.heartbeats.append(state)
        self._answer("heartbeat")
        logs = self.logs.values()
        return {"witnessed_size": max((log.state.size for log in logs), default=0)}

    async def fetch_bundle(self, kind: BundleKind, etag: str | None) -> FetchedBundle | None:
        await self._link("fetch_bundle")
        if kind not in self.bundles:
            raise CentralRejected(404, "not-found", f"no {kind.value} bundle")
        envelope, current = self.bundles[kind]
        self._answer("fetch_bundle")
        return None if etag == current else FetchedBundle(envelope, current)

    async def request_certificate(
        self, request: Envelope, *, enrollment_token: str | None = None
    ) -> Envelope:
        """Renew or rotate for a known certificate, as the server will: the
        request is checked with the real rules and a real certificate issued."""
        await self._link("request_certificate")
        asked = DelegationRequest.from_wire(unverified_payload(request))
        if asked.purpose == "enroll":
            raise CentralRejected(501, "not-implemented", "enrollment is not part of this fake")
        current = next(
            (c for c in self.certificates.values() if c.certificate.serial == asked.current_serial),
            None,
        )
        if current is None:
            raise CentralRejected(
                404, "unknown-certificate", f"no certificate {asked.current_serial}"
            )
        result = check_delegation_request(
            request,
            purpose=asked.purpose,
            audience=self.root.key_id,
            now=self.clock(),
            current=current.certificate,
        )
        if not result.ok:
            raise CentralRejected(422, result.codes[0], result.describe())
        certificate = issue_delegation(
            self.root,
            subject=VerifyKey.from_hex(asked.subject_key),
            appliance_id=current.certificate.appliance_id,
            site_id=current.certificate.site_id,
            scopes=asked.scopes,
            not_before=self.clock(),
            lifetime=self.lifetime,
        )
        self.register(certificate)
        self._answer("request_certificate")
        return certificate
