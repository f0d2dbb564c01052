"""EvidenceQueue: signed evidence bundles, delivered to the server and kept.

Signing a bundle and recording it in the audit trail are one transaction:
the bundle is signed (under the ``evidence`` scope) with ``log_index`` set to
the index its ``evidence.signed`` entry gets, and the bundle row commits with
that entry. So every queued bundle is provably in the log, and no log entry
points at a bundle that was never kept.

The queue is idempotent by bundle id (signing the same id again returns the
bundle already signed) and delivers in log order. A bundle the central server
acknowledged is marked delivered (``delivered_at``) and kept, so
``msp-agent audit export`` hands it to an auditor with the log.

Its disk quota (``quota_bytes``; without one, delivered bundles alone are
held to :data:`UNQUOTED_DELIVERED_BYTES`) never drops anything silently. To
make room it first prunes the oldest *delivered* bundles, which the central
server holds (an ``evidence.pruned`` entry and a counter); only when those
are gone does it evict the oldest undelivered ones, which are then lost (an
``evidence.evicted`` entry and a counter).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from msp_agent.audit import Built, OfflineAuditTrail
from msp_agent.central import CentralClient, CentralRejected, CentralUnavailable, DeliveryOutcome
from msp_agent.keys import DelegatedSigningKey
from msp_protocol.dsse import Envelope, parse_envelope
from msp_protocol.encoding import format_time, utc_now
from msp_protocol.evidence import EVIDENCE_ENTRY_KIND, CheckResult, EvidenceBundle, sign_evidence
from msp_protocol.keys import SigningKey

log = logging.getLogger(__name__)

EVICTED_KIND = "evidence.evicted"
PRUNED_KIND = "evidence.pruned"
# Without a quota, undelivered bundles are bounded by delivery alone (as they
# always were); delivered ones would pile up forever, so they get this bound.
UNQUOTED_DELIVERED_BYTES = 64 * 1024 * 1024
# When delivered bundles must go, this share of the quota is freed beyond
# what the new bundle needs: one pruning entry per many bundles, not per bundle.
PRUNE_HEADROOM = 0.10
# Bundle ids per eviction or pruning entry: an entry stays far below the
# protocol's 64 KiB entry limit however many bundles go at once.
IDS_PER_ENTRY = 500


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
    evicted_total: int  # undelivered bundles dropped for the quota (lost)
    delivered: int = 0  # delivered bundles still held (for the audit export)
    delivered_bytes: int = 0
    pruned_total: int = 0  # delivered bundles dropped for the quota


@dataclass(frozen=True, slots=True)
class _Victims:
    """What must go for a new bundle to fit: ``(bundle_id, bytes)`` each."""

    pruned: list[tuple[str, int]]
    evicted: list[tuple[str, int]]


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
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._trail = trail
        self._signer = signer
        self.site_id = site_id
        self.quota_bytes = quota_bytes
        self._clock = clock

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

            # Sign once to learn the size, then decide what must go: those
            # entries come first and shift the bundle's index.
            envelope = sign_at(first_index)
            victims = self._victims(connection, len(envelope.to_json()))
            entries = [
                *_gone_entries(PRUNED_KIND, victims.pruned, "evidence quota; delivered"),
                *_gone_entries(EVICTED_KIND, victims.evicted, "evidence quota"),
            ]
            index = first_index + len(entries)
            if entries:
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
                for counter, gone in (
                    ("evidence_pruned", victims.pruned),
                    ("evidence_evicted", victims.evicted),
                ):
                    if not gone:
                        continue
                    c.executemany(
                        "DELETE FROM evidence WHERE bundle_id = ?", [(b,) for b, _ in gone]
                    )
                    c.execute(
                        "INSERT INTO meta (key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + ?",
                        (counter, str(len(gone)), len(gone)),
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

    def _victims(self, connection: sqlite3.Connection, incoming: int) -> _Victims:
        """What must go so ``incoming`` bytes fit: the oldest delivered
        bundles first (with some headroom), then, only if that is not enough,
        the oldest undelivered ones."""
        delivered, waiting = connection.execute(
            "SELECT COALESCE(SUM(CASE WHEN delivered_at IS NOT NULL THEN LENGTH(envelope) END), 0),"
            " COALESCE(SUM(CASE WHEN delivered_at IS NULL THEN LENGTH(envelope) END), 0) "
            "FROM evidence WHERE rejected IS NULL"
        ).fetchone()
        if self.quota_bytes is None:
            limit, excess = UNQUOTED_DELIVERED_BYTES, delivered - UNQUOTED_DELIVERED_BYTES
        else:
            limit, excess = self.quota_bytes, delivered + waiting + incoming - self.quota_bytes
        if excess <= 0:
            return _Victims([], [])
        pruned = _oldest(connection, delivered=True, at_least=excess + int(limit * PRUNE_HEADROOM))
        if pruned:
            log.info("evidence quota: pruning %d delivered bundle(s)", len(pruned))
        excess -= sum(size for _, size in pruned)
        evicted = []
        if excess > 0 and self.quota_bytes is not None:
            evicted = _oldest(connection, delivered=False, at_least=excess)
            log.warning("evidence quota reached: evicting %d undelivered bundle(s)", len(evicted))
        return _Victims(pruned, evicted)

    async def pending(self, limit: int = 100) -> list[SignedEvidence]:
        """Undelivered bundles, oldest (lowest log index) first."""

        def read(connection: sqlite3.Connection) -> list[SignedEvidence]:
            rows = connection.execute(
                "SELECT bundle_id, log_index, envelope FROM evidence "
                "WHERE delivered_at IS NULL AND rejected IS NULL ORDER BY log_index LIMIT ?",
                (limit,),
            ).fetchall()
            return [SignedEvidence(b, i, parse_envelope(bytes(e))) for b, i, e in rows]

        return await self._trail.store.run(read)

    async def acknowledge(self, bundle_ids: Sequence[str]) -> None:
        """Mark bundles the central server holds (and only those) delivered:
        out of delivery, kept for the audit export until the quota needs room."""
        delivered_at = format_time(self._clock())
        await self._trail.store.write(
            lambda c: c.executemany(
                "UPDATE evidence SET delivered_at = ? WHERE bundle_id = ? AND delivered_at IS NULL",
                [(delivered_at, b) for b in bundle_ids],
            )
        )

    async def mark_rejected(self, bundle_id: str, reason: str) -> None:
        """Keep a bundle the server refused for inspection, out of delivery."""
        await self._trail.store.write(
            lambda c: c.execute(
                "UPDATE evidence SET rejected = ? WHERE bundle_id = ?", (reason[:500], bundle_id)
            )
        )

    async def deliver(
        self,
        client: CentralClient,
        *,
        batch: int = 100,
        before_batch: Callable[[], Awaitable[object]] | None = None,
    ) -> DeliveryOutcome:
        """Send undelivered bundles in log order until done or the server is
        unreachable (the outcome then carries the server's Retry-After, if
        it named one). A bundle the server refuses (4xx) is set aside with
        the reason and recorded in the audit trail; delivery goes on.
        ``before_batch`` is awaited before every ``batch`` bundles: the
        runtime lets urgent incidents go first there."""
        outcome = DeliveryOutcome()
        while True:
            if before_batch is not None:
                await before_batch()
            waiting = await self.pending(batch)
            if not waiting:
                return outcome
            for item in waiting:
                try:
                    await client.submit_evidence(item.envelope)
                except CentralUnavailable as exc:
                    return DeliveryOutcome(
                        outcome.delivered, outcome.rejected, str(exc), exc.retry_after
                    )
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
            held: dict[tuple[int, int], tuple[int, int]] = {}
            for refused, delivered_already, count, size in connection.execute(
                "SELECT rejected IS NOT NULL, delivered_at IS NOT NULL, COUNT(*), "
                "SUM(LENGTH(envelope)) FROM evidence GROUP BY 1, 2"
            ):
                held[refused, delivered_already] = (int(count), int(size))

            def counter(key: str) -> int:
                row = connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
                return int(row[0]) if row else 0

            queued, size = held.get((0, 0), (0, 0))
            delivered, delivered_size = held.get((0, 1), (0, 0))
            rejected = sum(count for (refused, _), (count, _) in held.items() if refused)
            return EvidenceStats(
                queued,
                size,
                rejected,
                counter("evidence_evicted"),
                delivered,
                delivered_size,
                counter("evidence_pruned"),
            )

        return await self._trail.store.run(read)


def _oldest(
    connection: sqlite3.Connection, *, delivered: bool, at_least: int
) -> list[tuple[str, int]]:
    """The oldest delivered (or undelivered) bundles whose sizes add up to
    ``at_least`` bytes, or all of them."""
    chosen: list[tuple[str, int]] = []
    for bundle_id, size in connection.execute(
        "SELECT bundle_id, LENGTH(envelope) FROM evidence "
        "WHERE rejected IS NULL AND (delivered_at IS NOT NULL) = ? ORDER BY log_index",
        (delivered,),
    ):
        if at_least <= 0:
            break
        chosen.append((bundle_id, size))
        at_least -= size
    return chosen


def _gone_entries(
    kind: str, gone: list[tuple[str, int]], reason: str
) -> list[tuple[str, str, dict[str, Any]]]:
    """The audit entries recording that ``gone`` bundles were dropped."""
    return [
        (
            kind,
            "agent",
            {
                "bundle_ids": [bundle for bundle, _ in chunk],
                "bytes": sum(size for _, size in chunk),
                "reason": reason,
            },
        )
        for chunk in (
            gone[start : start + IDS_PER_ENTRY] for start in range(0, len(gone), IDS_PER_ENTRY)
        )
    ]
