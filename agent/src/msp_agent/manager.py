"""LocalResilienceManager: the façade the rest of the agent uses.

Everything the agent must keep doing while the site is offline goes through
four calls — :meth:`log_l1_action`, :meth:`escalate_to_cloud`,
:meth:`verify_audit_integrity`, :meth:`sign_evidence` — each of which returns
only once what it recorded is on disk. Key renewal and rotation live here too,
because a rotation must be recorded in the audit trail under the old key
before the new one takes over.

State under one directory (``/var/lib/msp`` on an appliance):
``audit.sqlite`` (the audit trail and the evidence queue), ``urgent.sqlite``
(incidents), ``sms.sqlite`` (texts), and the key directory ``keys/``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from msp_agent.audit import Appended, AuditVerification, OfflineAuditTrail
from msp_agent.central import CentralClient
from msp_agent.evidence import EvidenceQueue, SignedEvidence
from msp_agent.keys import DelegatedSigningKey
from msp_agent.sms import SMSAlerter
from msp_agent.urgent import UrgentCloudRetry
from msp_protocol.bundle import Escalation, Severity
from msp_protocol.encoding import utc_now
from msp_protocol.evidence import CheckResult
from msp_protocol.keys import VerifyKey

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Quotas:
    audit_bytes: int | None = None
    evidence_bytes: int | None = None


class LocalResilienceManager:
    def __init__(
        self,
        *,
        trail: OfflineAuditTrail,
        evidence: EvidenceQueue,
        urgent: UrgentCloudRetry,
        signer: DelegatedSigningKey,
        site_id: str,
        clock: Callable[[], datetime],
    ) -> None:
        self.trail = trail
        self.evidence = evidence
        self.urgent = urgent
        self.signer = signer
        self.site_id = site_id
        self._clock = clock

    @classmethod
    async def open(
        cls,
        state_dir: Path,
        *,
        appliance_id: str,
        site_id: str,
        signer: DelegatedSigningKey,
        central_keys: Sequence[VerifyKey],
        sms: SMSAlerter | None = None,
        quotas: Quotas = Quotas(),
        clock: Callable[[], datetime] = utc_now,
        on_alert: Callable[[str, dict[str, Any]], None] | None = None,
        retry_base: float = 1.0,
        sms_after: timedelta = timedelta(minutes=5),
    ) -> LocalResilienceManager:
        """Open (or create) the appliance's local state and reconcile what a
        crash may have left half-done."""
        trail = await OfflineAuditTrail.open(
            state_dir / "audit.sqlite",
            appliance_id=appliance_id,
            signer=signer,
            central_keys=central_keys,
            row_key=signer.audit_row_key(),
            clock=clock,
            quota_bytes=quotas.audit_bytes,
            on_alert=on_alert,
        )
        try:
            urgent = await UrgentCloudRetry.open(
                state_dir / "urgent.sqlite",
                sms=sms,
                sms_after=sms_after,
                clock=clock,
                retry_base=retry_base,
            )
        except BaseException:
            await trail.close()
            raise
        manager = cls(
            trail=trail,
            evidence=EvidenceQueue(
                trail, signer, site_id=site_id, quota_bytes=quotas.evidence_bytes, clock=clock
            ),
            urgent=urgent,
            signer=signer,
            site_id=site_id,
            clock=clock,
        )
        try:
            await manager._reconcile(sms)
        except BaseException:
            await manager.close()
            raise
        return manager

    async def close(self) -> None:
        await self.urgent.close()
        await self.trail.close()

    async def _reconcile(self, sms: SMSAlerter | None) -> None:
        if self.signer.revoked:
            # Nothing can be recorded any more; what a crash left is kept
            # as it is (the incidents still wait, and are texted).
            return
        for store, quarantine in (
            ("urgent", self.urgent.quarantine),
            ("sms", sms and sms.quarantine),
        ):
            if quarantine:
                await self.trail.append(
                    "store.quarantined",
                    "agent",
                    {
                        "store": store,
                        "file": quarantine.moved_to.name,
                        "reason": quarantine.reason[:500],
                    },
                )
        # An incident queued just before a crash has no audit entry yet.
        for escalation in await self.urgent.unlogged():
            await self._record_escalation(escalation)
        # A rotation whose certificate arrived but which did not complete.
        pending = self.signer.pending_rotation()
        if pending is not None and pending.certificate is not None:
            await self._record_rotation(pending.certificate.certificate.serial, pending.key.key_id)
            self.signer.complete_rotation()

    # --- the four calls ---------------------------------------------------------------------

    async def log_l1_action(
        self,
        action: str,
        *,
        runbook: str,
        result: str,
        detail: Mapping[str, Any] | None = None,
        actor: str = "agent",
    ) -> Appended:
        """Record an L1 runbook action (committed and checkpointed on return)."""
        return await self.trail.append(
            "l1.action",
            actor,
            {"action": action, "runbook": runbook, "result": result, "detail": dict(detail or {})},
        )

    async def escalate_to_cloud(
        self,
        *,
        title: str,
        severity: Severity = "critical",
        detail: Mapping[str, Any] | None = None,
        escalation_id: str | None = None,
    ) -> Escalation:
        """Raise an incident: queued durably first, then recorded in the audit
        trail; delivered by the urgent queue (and texted if it stays stuck)."""
        escalation = Escalation.model_validate(
            {
                "escalation_id": escalation_id or f"inc-{secrets.token_hex(8)}",
                "appliance_id": self.trail.appliance_id,
                "site_id": self.site_id,
                "severity": severity,
                "title": title,
                "detail": dict(detail or {}),
                "created_at": self._clock(),
            }
        )
        if await self.urgent.enqueue(escalation):
            await self._record_escalation(escalation)
        return escalation

    async def verify_audit_integrity(self) -> AuditVerification:
        """Recompute the whole audit trail; the outcome is itself recorded."""
        result = await self.trail.verify()
        await self.trail.append(
            "audit.verified",
            "agent",
            {
                "ok": result.ok,
                "size": result.size,
                "first_bad_index": result.first_bad_index,
                "problem": result.problem,
            },
        )
        if not result.ok:
            log.error("audit trail integrity check failed: %s", result.describe())
        return result

    async def sign_evidence(
        self,
        *,
        check_id: str,
        controls: Mapping[str, Sequence[str]],
        result: CheckResult,
        observed: dict[str, Any],
        bundle_id: str | None = None,
    ) -> SignedEvidence:
        """Sign an evidence bundle, record it in the audit trail, queue it."""
        return await self.evidence.sign(
            bundle_id=bundle_id or f"ev-{secrets.token_hex(8)}",
            check_id=check_id,
            controls=controls,
            result=result,
            observed=observed,
        )

    # --- keys -------------------------------------------------------------------------------

    async def renew_certificate(self, client: CentralClient, *, audience: str) -> None:
        """Ask for a new validity window for the current key and record it."""
        certificate = await client.request_certificate(
            self.signer.renewal_request(audience=audience)
        )
        verified = self.signer.install_certificate(certificate)
        await self.trail.append(
            "key.renewed",
            "agent",
            {
                "key_id": self.signer.key_id,
                "serial": verified.certificate.serial,
                "not_after": verified.certificate.not_after.isoformat(),
            },
        )

    async def rotate_key(self, client: CentralClient, *, audience: str) -> str:
        """Replace the device key: new key, certificate requested under the
        old one, rotation recorded under the old key, then the switch.
        Returns the new key id."""
        next_key, request = self.signer.begin_rotation(audience=audience)
        certificate = await client.request_certificate(request)
        verified = self.signer.store_rotation_certificate(certificate)
        await self._record_rotation(verified.certificate.serial, next_key.key_id)
        self.signer.complete_rotation()
        # A first commit under the new key records its certificate in the
        # trail before anything (a sync's fresh checkpoint) is signed with it.
        await self.trail.append(
            "key.activated",
            "agent",
            {"key_id": next_key.key_id, "serial": verified.certificate.serial},
        )
        return next_key.key_id

    async def _record_rotation(self, new_serial: str, new_key_id: str) -> None:
        await self.trail.append(
            "key.rotated",
            "agent",
            {"old_key_id": self.signer.key_id, "new_key_id": new_key_id, "new_serial": new_serial},
        )

    async def _record_escalation(self, escalation: Escalation) -> None:
        appended = await self.trail.append(
            "escalation.raised",
            "agent",
            {
                "escalation_id": escalation.escalation_id,
                "severity": escalation.severity,
                "title": escalation.title,
            },
        )
        await self.urgent.record_log_index(escalation.escalation_id, appended.index)
