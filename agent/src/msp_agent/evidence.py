"""EvidenceQueue: signed evidence bundles, kept until the server has them.

Signing a bundle and recording it in the audit trail are one transaction:
the bundle is signed (under the ``evidence`` scope) with ``log_index`` set to
the index its ``evidence.signed`` entry gets, and the bundle row commits with
that entry. So every queued bundle is provably in the log, and no log entry
points at a bundle that was never kept.

The queue is idempotent by bundle id (signing the same id again returns the
bundle already signed), delivers in log order, and forgets a bundle only when
the central server acknowledged that very bundle. Its disk quota never drops
anything silently: to make room it evicts the oldest undelivered bundles, and
the eviction is itself an audit entry (``evidence.evicted``) and a counter.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from msp_agent.audit import Built, OfflineAuditTrail
from msp_agent.central import CentralClient, CentralRejected, CentralUnavailable, DeliveryOutcome
from msp_agent.keys import DelegatedSigningKey
from msp_protocol.dsse import Envelope, parse_envelope
from msp_protocol.encoding import format_time
from msp_protocol.evidence import EVIDENCE_ENTRY_KIND, CheckResult, EvidenceBundle, sign_evidence
from msp_protocol.keys import SigningKey

log = logging.getLogger(__name__)

EVICTED_KIND = "evidence.evicted"


@dataclass(frozen=True, slots=True)
class SignedEvidence:
    bundle_id: str
    log_index: int
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class EvidenceStats:
    queued: int
    queued_bytes: int
    rejected: int
    evicted_total: int


class EvidenceQueue:
    """Bundles waiting for the central server. Shares the audit trail's
    database (and its single writer)."""

    def __init__(
        self,
        trail: OfflineAuditTrail,
        signer: DelegatedSigningKey,
        *,
        site_id: str,
        quota_bytes: int | None = None,
    ) -> None:
        self._trail = trail
        self._signer = signer
        self.site_id = site_id
        self.quota_bytes = quota_bytes

    async def sign(
        self,
        *,
        bundle_id: str,
        check_id: str,
        controls: Mapping[str, Sequence[str]],
        result: CheckResult,
        observed: dict[str, Any],
        collected_at: datetime | None = None,
        actor: str = "agent",
    ) -> SignedEvidence:
        """Sign a bundle, record it in the audit trail and queue it.

        Returns the bundle already signed under ``bundle_id`` if there is one.
        """
        key = self._signer.signing_key()
        appliance_id = self._trail.appliance_id

        def build(connection: sqlite3.Connection, first_index: int, now: datetime) -> Built:
            existing = connection.execute(
                "SELECT log_index, envelope FROM evidence WHERE bundle_id = ?", (bundle_id,)
            ).fetchone()
            if existing is not None:
                return Built(
                    [],
                    None,
                    SignedEvidence(bundle_id, existing[0], parse_envelope(bytes(existing[1]))),
                )

            def sign_at(log_index: int) -> Envelope:
                return self._sign(
                    key,
                    appliance_id,
                    bundle_id,
                    check_id,
                    controls,
                    result,
                    observed,
                    collected_at or now,
                    log_index,
                )

            entries: list[tuple[str, str, dict[str, Any]]] = []
            index = first_index
            # Sign once to learn the size, then decide on eviction: an
            # eviction entry comes first and shifts the bundle's index by one.
            envelope = sign_at(index)
            evicted = self._victims(connection, len(envelope.to_json()))
            if evicted:
                entries.append(
                    (
                        EVICTED_KIND,
                        "agent",
                        {
                            "bundle_ids": [bundle for bundle, _ in evicted],
                            "bytes": sum(size for _, size in evicted),
                            "reason": "evidence quota",
                        },
                    )
                )
                index += 1
                envelope = sign_at(index)
            payload = envelope.payload_bytes()
            entries.append(
                (
                    EVIDENCE_ENTRY_KIND,
                    actor,
                    {"bundle_id": bundle_id, "payload_sha256": hashlib.sha256(payload).hexdigest()},
                )
            )
            stored = envelope.to_json()
            created = format_time(now)

            def side_write(c: sqlite3.Connection) -> None:
                if evicted:
                    c.executemany(
                        "DELETE FROM evidence WHERE bundle_id = ?", [(b,) for b, _ in evicted]
                    )
                    c.execute(
                        "INSERT INTO meta (key, value) VALUES ('evidence_evicted', ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + ?",
                        (str(len(evicted)), len(evicted)),
                    )
                c.execute(
                    "INSERT INTO evidence (bundle_id, log_index, check_id, envelope, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (bundle_id, index, check_id, stored, created),
                )

            return Built(entries, side_write, SignedEvidence(bundle_id, index, envelope))

        appended = await self._trail.append_built(build)
        signed: SignedEvidence = appended.result
        return signed

    def _sign(
        self,
        key: SigningKey,
        appliance_id: str,
        bundle_id: str,
        check_id: str,
        controls: Mapping[str, Sequence[str]],
        result: CheckResult,
        observed: dict[str, Any],
        collected_at: datetime,
        log_index: int,
    ) -> Envelope:
        bundle = EvidenceBundle.model_validate(
            {
                "bundle_id": bundle_id,
                "site_id": self.site_id,
                "appliance_id": appliance_id,
                "check_id": check_id,
                "controls": {framework: list(ids) for framework, ids in controls.items()},
                "result": result,
                "observed": observed,
                "collected_at": collected_at,
                "log_index": log_index,
            }
        )
        return sign_evidence(key, bundle)

    def _victims(self, connection: sqlite3.Connection, incoming: int) -> list[tuple[str, int]]:
        """The oldest undelivered bundles to evict so ``incoming`` bytes fit."""
        if self.quota_bytes is None:
            return []
        used = connection.execute(
            "SELECT COALESCE(SUM(LENGTH(envelope)), 0) FROM evidence WHERE rejected IS NULL"
        ).fetchone()[0]
        excess = used + incoming - self.quota_bytes
        victims: list[tuple[str, int]] = []
        if excess <= 0:
            return victims
        for bundle_id, size in connection.execute(
            "SELECT bundle_id, LENGTH(envelope) FROM evidence WHERE rejected IS NULL "
            "ORDER BY log_index"
        ):
            victims.append((bundle_id, size))
            excess -= size
            if excess <= 0:
                break
        log.warning("evidence quota reached: evicting %d undelivered bundle(s)", len(victims))
        return victims

    async def pending(self, limit: int = 100) -> list[SignedEvidence]:
        """Undelivered bundles, oldest (lowest log index) first."""

        def read(connection: sqlite3.Connection) -> list[SignedEvidence]:
            rows = connection.execute(
                "SELECT bundle_id, log_index, envelope FROM evidence WHERE rejected IS NULL "
                "ORDER BY log_index LIMIT ?",
                (limit,),
            ).fetchall()
            return [SignedEvidence(b, i, parse_envelope(bytes(e))) for b, i, e in rows]

        return await self._trail.store.run(read)

    async def acknowledge(self, bundle_ids: Sequence[str]) -> None:
        """Forget bundles the central server holds (and only those)."""
        await self._trail.store.write(
            lambda c: c.executemany(
                "DELETE FROM evidence WHERE bundle_id = ?", [(b,) for b in bundle_ids]
            )
        )

    async def mark_rejected(self, bundle_id: str, reason: str) -> None:
        """Keep a bundle the server refused for inspection, out of delivery."""
        await self._trail.store.write(
            lambda c: c.execute(
                "UPDATE evidence SET rejected = ? WHERE bundle_id = ?", (reason[:500], bundle_id)
            )
        )

    async def deliver(self, client: CentralClient, *, batch: int = 100) -> DeliveryOutcome:
        """Send undelivered bundles in log order until done or the server is
        unreachable. A bundle the server refuses (4xx) is set aside with the
        reason and recorded in the audit trail; delivery goes on."""
        outcome = DeliveryOutcome()
        while True:
            waiting = await self.pending(batch)
            if not waiting:
                return outcome
            for item in waiting:
                try:
                    await client.submit_evidence(item.envelope)
                except CentralUnavailable as exc:
                    return DeliveryOutcome(outcome.delivered, outcome.rejected, str(exc))
                except CentralRejected as exc:
                    await self.mark_rejected(item.bundle_id, str(exc))
                    await self._trail.append(
                        "evidence.rejected",
                        "agent",
                        {"bundle_id": item.bundle_id, "status": exc.status, "code": exc.code},
                    )
                    outcome.rejected.append(item.bundle_id)
                    continue
                await self.acknowledge([item.bundle_id])
                outcome.delivered.append(item.bundle_id)

    async def stats(self) -> EvidenceStats:
        def read(connection: sqlite3.Connection) -> EvidenceStats:
            queued, size = connection.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(envelope)), 0) FROM evidence "
                "WHERE rejected IS NULL"
            ).fetchone()
            rejected = connection.execute(
                "SELECT COUNT(*) FROM evidence WHERE rejected IS NOT NULL"
            ).fetchone()[0]
            evicted = connection.execute(
                "SELECT value FROM meta WHERE key = 'evidence_evicted'"
            ).fetchone()
            return EvidenceStats(queued, size, rejected, int(evicted[0]) if evicted else 0)

        return await self._trail.store.run(read)
