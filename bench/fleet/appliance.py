"""One simulated appliance: a real device key, real enrollment through a
one-time token, a real audit log (the protocol's Merkle tree, kept in
memory), real signed evidence bundles recorded in that log, escalations and
heartbeats, all sent through the agent's own client
(:class:`msp_agent.http_client.HttpCentralClient`) and paced by the agent's
own rules (:mod:`msp_agent.pacing`).

What an appliance keeps on disk (SQLite, group commits) is replaced by
lists in memory: the simulator measures the server, and thousands of
appliances share two cores. Everything on the wire is what an agent sends:
entries as their canonical bytes, a checkpoint signed for each batch's end,
consistency proofs from the size the server holds, bundles whose
``evidence.signed`` entry records their payload digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aiohttp

from msp_agent.central import CentralRejected, CentralUnavailable
from msp_agent.http_client import HttpCentralClient
from msp_agent.pacing import BatchSizer, wait_before_retry
from msp_protocol.bundle import Escalation
from msp_protocol.delegation import DelegationCertificate, Scope, make_delegation_request
from msp_protocol.dsse import Envelope
from msp_protocol.encoding import format_time
from msp_protocol.evidence import EVIDENCE_ENTRY_KIND, EvidenceBundle, sign_evidence
from msp_protocol.keys import SigningKey, VerifyKey
from msp_protocol.log import EntryRecord, check_receipt, genesis_entry, make_checkpoint, make_entry
from msp_protocol.merkle import LeafHashTree, TreeState, consistency_proof
from msp_protocol.sync import SyncRequest

T = TypeVar("T")
# The agent's own default heartbeat and check intervals, as the server is
# told them (it judges liveness and staleness by them).
HEARTBEAT_INTERVAL_SECONDS = 300
CHECK_INTERVAL_SECONDS = 3600

CHECKS = (
    ("ntp.sync", {"hipaa": ["164.312(b)"], "pci_dss": ["10.6.1"]}),
    ("disk.encryption", {"hipaa": ["164.312(a)(2)(iv)"], "nist_csf": ["PR.DS-1"]}),
    ("backup.recent", {"hipaa": ["164.308(a)(7)"], "soc2": ["A1.2"]}),
    ("patch.level", {"cis": ["7.3"], "nist_800_171": ["3.14.1"]}),
    ("firewall.enabled", {"pci_dss": ["1.2.1"], "iso_27001": ["A.8.20"]}),
)


class ApplianceFailed(Exception):
    """The server refused something an honest appliance sent (one line)."""


@dataclass
class Plan:
    """How much an appliance carries and how fast simulated time runs."""

    entries: int = 1_000  # audit log size at reconnect, genesis included
    bundles: int = 100
    escalations: int = 3
    heartbeat_seconds: float = 10.0  # compressed HEARTBEAT_INTERVAL_SECONDS
    check_seconds: float = 20.0  # steady state: compressed CHECK_INTERVAL_SECONDS


@dataclass
class Outcome:
    """What one appliance did, for the figures and the correctness check."""

    appliance_id: str
    site_id: str
    log_size: int = 0
    witnessed: int = 0
    bundle_ids: list[str] = field(default_factory=list)
    escalation_ids: list[str] = field(default_factory=list)
    delivered_bundles: int = 0
    delivered_escalations: int = 0
    reconnect_at: float = 0.0
    done_at: float | None = None
    heartbeats: int = 0
    failure: str | None = None


class SimAppliance:
    def __init__(
        self,
        *,
        base_url: str,
        session: aiohttp.ClientSession,
        site_id: str,
        token: str,
        root_key_id: str,
        root_key: VerifyKey,
        plan: Plan,
        rng: random.Random,
    ) -> None:
        self.key = SigningKey.generate()
        self.client = HttpCentralClient(base_url, session, signing_key=lambda: self.key)
        self.site_id = site_id
        self.token = token
        self.root_key_id = root_key_id
        self.root_key = root_key
        self.plan = plan
        self.rng = rng
        self.serial = ""
        # Each entry's canonical bytes and leaf hash (not the parsed entry:
        # thousands of appliances' backlogs share this process's memory).
        self.records: list[bytes] = []
        self.leaves: list[bytes] = []
        self.tree = LeafHashTree(self.leaves)
        self.witnessed_state = TreeState()
        self.evidence: list[Envelope] = []
        self.escalations: list[Escalation] = []
        # The agent's own sizing, whose largest batch a balancer can replay.
        self.sizer = BatchSizer()
        self.outcome = Outcome("", site_id)
        self._bundle_serial = 0
        self.beating: asyncio.Task[None] | None = None

    @property
    def appliance_id(self) -> str:
        if self.client.appliance_id is None:
            raise ApplianceFailed("not enrolled")
        return self.client.appliance_id

    # --- enrollment and the log ---------------------------------------------------------

    async def enroll(self) -> None:
        """Enroll with the one-time token (proof of possession of the new key),
        then start the log with its genesis entry."""
        request = make_delegation_request(
            purpose="enroll",
            audience=self.root_key_id,
            subject=self.key,
            scopes=[Scope.AUDIT, Scope.EVIDENCE],
            enrollment_token=self.token,
        )
        certificate = await self._patiently(
            lambda: self.client.request_certificate(request, enrollment_token=self.token)
        )
        self.serial = DelegationCertificate.from_json(certificate.payload_bytes()).serial
        self.outcome.appliance_id = self.appliance_id
        self._append_record(
            genesis_entry(
                appliance_id=self.appliance_id,
                key_id=self.key.key_id,
                certificate_serial=self.serial,
                ts=datetime.now(UTC) - timedelta(days=1),
            )
        )

    def _append_record(self, record: EntryRecord) -> int:
        self.records.append(record.raw)
        self.leaves.append(record.leaf_hash)
        self.outcome.log_size = len(self.records)
        return record.entry.index

    def append(self, kind: str, data: dict[str, Any], ts: datetime) -> int:
        return self._append_record(make_entry(len(self.records), ts, kind, "agent", data))

    def sign_bundle(self, ts: datetime) -> None:
        """Sign an evidence bundle at the next log index and record it there
        (the ``evidence.signed`` entry holds its payload's digest)."""
        self._bundle_serial += 1
        check_id, controls = CHECKS[self._bundle_serial % len(CHECKS)]
        index = len(self.records)
        bundle_id = f"ev-{self._bundle_serial:06d}"
        bundle = EvidenceBundle.model_validate(
            {
                "bundle_id": bundle_id,
                "site_id": self.site_id,
                "appliance_id": self.appliance_id,
                "check_id": check_id,
                "controls": controls,
                "result": "fail" if self.rng.random() < 0.1 else "pass",
                "observed": {"round": self._bundle_serial, "source": "fleet-sim"},
                "collected_at": ts,
                "log_index": index,
            }
        )
        envelope = sign_evidence(self.key, bundle)
        digest = hashlib.sha256(envelope.payload_bytes()).hexdigest()
        self.append(EVIDENCE_ENTRY_KIND, {"bundle_id": bundle_id, "payload_sha256": digest}, ts)
        self.evidence.append(envelope)
        self.outcome.bundle_ids.append(bundle_id)

    def raise_escalation(self, ts: datetime) -> None:
        escalation_id = f"esc-{len(self.escalations) + 1:04d}"
        title = "Backup job failed three times in a row"
        index = self.append(
            "escalation.raised",
            {"escalation_id": escalation_id, "severity": "critical", "title": title},
            ts,
        )
        self.escalations.append(
            Escalation(
                escalation_id=escalation_id,
                appliance_id=self.appliance_id,
                site_id=self.site_id,
                severity="critical",
                title=title,
                detail={"runbook": "backup.retry", "attempts": 3},
                created_at=ts,
                log_index=index,
            )
        )
        self.outcome.escalation_ids.append(escalation_id)

    def build_outage_backlog(self) -> None:
        """A simulated day offline: ``plan.entries`` log entries in all, among
        them ``plan.bundles`` signed bundles and ``plan.escalations``
        escalations, spread over the day."""
        total = max(self.plan.entries, 1 + self.plan.bundles + self.plan.escalations)
        start = datetime.now(UTC) - timedelta(days=1)
        step = timedelta(days=1) / total
        slots = list(range(1, total))
        special = self.rng.sample(slots, self.plan.bundles + self.plan.escalations)
        escalation_at = set(special[: self.plan.escalations])
        bundle_at = set(special[self.plan.escalations :])
        for index in slots:
            ts = start + step * index
            if index in bundle_at:
                self.sign_bundle(ts)
            elif index in escalation_at:
                self.raise_escalation(ts)
            else:
                check_id, controls = CHECKS[index % len(CHECKS)]
                self.append(
                    "check.run",
                    {
                        "check": check_id,
                        "result": "pass",
                        "observed": {"duration_ms": index % 97, "source": "fleet-sim"},
                        "controls": controls,
                    },
                    ts,
                )

    # --- talking to the server ----------------------------------------------------------

    async def _patiently(self, call: Callable[[], Awaitable[T]]) -> T:
        """Call until the server decides: wait as the agent waits after a
        refusal for load or no answer (its Retry-After, plus full jitter)."""
        attempt = 0
        while True:
            try:
                return await call()
            except CentralUnavailable as exc:
                await asyncio.sleep(wait_before_retry(attempt, exc.retry_after))
                attempt += 1
            except CentralRejected as exc:
                raise ApplianceFailed(str(exc)) from None

    async def sync(self) -> None:
        """Upload what the server lacks in batches the BatchSizer sizes; each
        receipt is checked against the central key."""
        attempt = 0
        # The end of a batch sent but not answered: the server may hold it
        # (a replica that committed, then died before answering; a replay
        # by the balancer refused as a replayed nonce). A later batch never
        # ends below it, or its checkpoint would be smaller than what the
        # server witnessed: a truncated history, refused for good.
        maybe_witnessed = 0
        while self.outcome.witnessed < len(self.records):
            witnessed = self.outcome.witnessed
            target = min(len(self.records), witnessed + self.sizer.size)
            target = max(target, maybe_witnessed)
            state = self.witnessed_state.copy()
            state.extend(self.leaves[witnessed:target])
            request = SyncRequest.build(
                old_size=witnessed,
                entries=self.records[witnessed:target],
                consistency=consistency_proof(witnessed, target, self.tree) if witnessed else [],
                checkpoint=make_checkpoint(
                    self.key, appliance_id=self.appliance_id, state=state, ts=datetime.now(UTC)
                ),
            )
            started = time.monotonic()
            try:
                response = await self.client.sync_audit(self.appliance_id, request)
            except CentralUnavailable as exc:
                maybe_witnessed = max(maybe_witnessed, target)
                self.sizer.refused()
                await asyncio.sleep(wait_before_retry(attempt, exc.retry_after))
                attempt += 1
                continue
            except CentralRejected as exc:
                told = exc.extra.get("server_size")
                if exc.code == "stale-size" and isinstance(told, int) and told <= target:
                    # The server holds more than we knew (an answer lost on
                    # the way back): go on from where it is.
                    self._witness(told)
                    continue
                raise ApplianceFailed(f"sync at {witnessed}: {exc}") from None
            self.sizer.answered(time.monotonic() - started)
            attempt = 0
            receipt = check_receipt(response.receipt, roots=[self.root_key])
            if not receipt.ok:
                raise ApplianceFailed(f"receipt does not verify: {receipt.describe()}")
            if receipt.unwrap().receipt.size != target or response.size != target:
                raise ApplianceFailed(f"receipt for {response.size}, sent up to {target}")
            self._witness(target, state)

    def _witness(self, size: int, state: TreeState | None = None) -> None:
        if state is None:
            state = TreeState()
            state.extend(self.leaves[:size])
        self.witnessed_state = state
        self.outcome.witnessed = size

    async def deliver_escalations(self) -> None:
        for escalation in self.escalations[self.outcome.delivered_escalations :]:
            await self._patiently(lambda e=escalation: self.client.escalate(e))  # type: ignore[misc]
            self.outcome.delivered_escalations += 1

    async def deliver_evidence(self) -> None:
        for envelope in self.evidence[self.outcome.delivered_bundles :]:
            await self._patiently(lambda e=envelope: self.client.submit_evidence(e))  # type: ignore[misc]
            self.outcome.delivered_bundles += 1

    def heartbeat_state(self) -> dict[str, Any]:
        return {
            "version": "fleet-sim",
            "log_size": len(self.records),
            "queues": {
                "evidence": len(self.evidence) - self.outcome.delivered_bundles,
                "urgent": len(self.escalations) - self.outcome.delivered_escalations,
            },
            "clock": format_time(datetime.now(UTC)),
            "check_interval_seconds": CHECK_INTERVAL_SECONDS,
            "heartbeat_interval_seconds": HEARTBEAT_INTERVAL_SECONDS,
        }

    async def heartbeats(self, stop: asyncio.Event) -> None:
        """Beat every ``plan.heartbeat_seconds`` (jittered) until ``stop``;
        after a failure back off as the agent does."""
        failures = 0
        while not stop.is_set():
            try:
                await self.client.heartbeat(self.heartbeat_state())
                self.outcome.heartbeats += 1
                failures = 0
                wait = self.plan.heartbeat_seconds * self.rng.uniform(0.9, 1.1)
            except CentralUnavailable as exc:
                wait = wait_before_retry(failures, exc.retry_after)
                failures += 1
            except CentralRejected as exc:
                raise ApplianceFailed(f"heartbeat: {exc}") from None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    # --- scenarios ----------------------------------------------------------------------

    async def reconnect(self, at: float, stop: asyncio.Event) -> None:
        """The end of the outage for this appliance: at wall time ``at``,
        escalations first, then the audit backlog, then evidence. Heartbeats
        start with it and go on (in :attr:`beating`) until ``stop``."""
        await asyncio.sleep(max(0.0, at - time.time()))
        self.outcome.reconnect_at = time.time()
        self.beating = asyncio.create_task(self.heartbeats(stop))
        try:
            await self.deliver_escalations()
            await self.sync()
            await self.deliver_evidence()
            self.outcome.done_at = time.time()
        except ApplianceFailed as exc:
            self.outcome.failure = f"{self.outcome.appliance_id}: {exc}"

    async def steady(self, begin: float, until: float, stop: asyncio.Event) -> None:
        """Steady state until wall time ``until``: a check round every
        ``plan.check_seconds`` (its evidence signed and logged, the log
        synced, the evidence delivered), heartbeats throughout; then a last
        round so everything is witnessed."""
        await asyncio.sleep(max(0.0, begin - time.time()))
        self.outcome.reconnect_at = time.time()
        self.beating = asyncio.create_task(self.heartbeats(stop))
        try:
            while time.time() < until:
                now = datetime.now(UTC)
                for _ in range(max(1, self.plan.bundles)):
                    self.sign_bundle(now)
                await self.deliver_escalations()
                await self.sync()
                await self.deliver_evidence()
                await asyncio.sleep(self.plan.check_seconds * self.rng.uniform(0.9, 1.1))
            self.outcome.done_at = time.time()
        except ApplianceFailed as exc:
            self.outcome.failure = f"{self.outcome.appliance_id}: {exc}"
