"""EvidenceQueue: signed bundles recorded in the log, delivered and kept, never dropped
silently."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from msp_agent import audit
from msp_agent.audit import OfflineAuditTrail
from msp_agent.central import CentralRejected
from msp_agent.evidence import EvidenceQueue
from msp_agent.export import export_audit
from msp_agent.keys import DelegatedSigningKey
from msp_protocol.dsse import Envelope
from msp_protocol.evidence import EvidenceProof, verify_evidence, verify_evidence_in_log
from msp_protocol.export import check_audit_export, parse_audit_export
from msp_protocol.log import parse_entry
from tests.agent.fakes import FakeCentral
from tests.agent.support import APPLIANCE, CENTRAL, NOW, SITE, Clock, enrolled_key

CONTROLS = {"hipaa": ["164.312(b)"], "nist_800_171": ["3.3.1"], "cmmc": ["AU.L2-3.3.1"]}


async def setup(
    tmp_path: Path, quota: int | None = None
) -> tuple[OfflineAuditTrail, EvidenceQueue, DelegatedSigningKey, FakeCentral]:
    signer = enrolled_key(tmp_path / "keys")
    trail = await OfflineAuditTrail.open(
        tmp_path / "audit.sqlite",
        appliance_id=APPLIANCE,
        signer=signer,
        central_keys=[CENTRAL.verify_key],
        row_key=signer.audit_row_key(),
        clock=Clock(),
    )
    central = FakeCentral(CENTRAL)
    assert signer.certificate is not None
    central.register(signer.certificate.envelope)
    queue = EvidenceQueue(trail, signer, site_id=SITE, quota_bytes=quota, clock=Clock())
    return trail, queue, signer, central


async def sign(queue: EvidenceQueue, n: int, size: int = 10):  # type: ignore[no-untyped-def]
    return await queue.sign(
        bundle_id=f"ev-{n}",
        check_id="audit-log-integrity",
        controls=CONTROLS,
        result="pass",
        observed={"n": n, "pad": "x" * size},
    )


async def test_signed_bundle_is_recorded_at_its_log_index(tmp_path: Path) -> None:
    trail, queue, signer, _ = await setup(tmp_path)
    try:
        signed = await sign(queue, 1)
        assert signer.certificate is not None
        bundle = verify_evidence(signed.envelope, delegation=signer.certificate).bundle
        assert bundle.log_index == signed.log_index == 1
        entry = parse_entry((await trail.entries(1, 2))[0]).entry
        assert entry.kind == "evidence.signed"
        assert entry.data["bundle_id"] == "ev-1"
    finally:
        await trail.close()


async def test_auditor_can_prove_a_delivered_bundle_existed_at_its_position(tmp_path: Path) -> None:
    trail, queue, signer, central = await setup(tmp_path)
    try:
        signeds = await asyncio.gather(*(sign(queue, n) for n in range(20)))
        await trail.sync(central)
        head = await trail.head()
        receipt = central.logs[APPLIANCE].receipts[head.size]
        for signed in (signeds[0], signeds[13]):
            proof = EvidenceProof(
                entry=(await trail.entries(signed.log_index, signed.log_index + 1))[0],
                inclusion=await trail.prove(signed.log_index, head.size),
                receipt=receipt,
            )
            assert signer.certificate is not None
            evidence = verify_evidence(signed.envelope, delegation=signer.certificate)
            verify_evidence_in_log(evidence, proof, roots=[CENTRAL.verify_key])
    finally:
        await trail.close()


async def test_signing_is_idempotent_by_bundle_id(tmp_path: Path) -> None:
    trail, queue, _, _ = await setup(tmp_path)
    try:
        first = await sign(queue, 7)
        size = trail.size
        again = await sign(queue, 7)
        assert again.log_index == first.log_index
        assert again.envelope == first.envelope
        assert trail.size == size
    finally:
        await trail.close()


async def test_delivery_in_log_order_only_acknowledged_bundles_are_forgotten(
    tmp_path: Path,
) -> None:
    trail, queue, _, central = await setup(tmp_path)
    try:
        for n in range(10):
            await sign(queue, n)
        original = central.submit_evidence
        sent: list[Envelope] = []

        async def fail_sixth(envelope: Envelope) -> None:
            sent.append(envelope)
            if len(sent) == 6:
                central.down = True
            await original(envelope)

        central.submit_evidence = fail_sixth  # type: ignore[method-assign]
        outcome = await queue.deliver(central)
        assert outcome.delivered == [f"ev-{n}" for n in range(5)]
        assert outcome.stopped_by is not None
        assert [s.bundle_id for s in await queue.pending()] == [f"ev-{n}" for n in range(5, 10)]
        central.down = False
        outcome = await queue.deliver(central)
        assert outcome.delivered == [f"ev-{n}" for n in range(5, 10)]
        assert sorted(central.evidence) == sorted(f"ev-{n}" for n in range(10))
        assert (await queue.stats()).queued == 0
    finally:
        await trail.close()


async def test_lost_acknowledgement_resends_and_the_server_keeps_one(tmp_path: Path) -> None:
    trail, queue, _, central = await setup(tmp_path)
    try:
        await sign(queue, 1)
        central.lose_answers = True
        outcome = await queue.deliver(central)
        assert outcome.delivered == []
        assert "ev-1" in central.evidence
        central.lose_answers = False
        assert (await queue.deliver(central)).delivered == ["ev-1"]
        assert len(central.evidence) == 1
    finally:
        await trail.close()


async def test_refused_bundle_is_set_aside_and_recorded(tmp_path: Path) -> None:
    trail, queue, _, central = await setup(tmp_path)
    try:
        await sign(queue, 1)
        await sign(queue, 2)

        async def refuse_first(envelope: Envelope) -> None:
            if b"ev-1" in envelope.payload_bytes():
                raise CentralRejected(422, "bad-evidence", "refused")
            await FakeCentral.submit_evidence(central, envelope)

        central.submit_evidence = refuse_first  # type: ignore[method-assign]
        outcome = await queue.deliver(central)
        assert outcome.rejected == ["ev-1"]
        assert outcome.delivered == ["ev-2"]
        stats = await queue.stats()
        assert (stats.queued, stats.rejected) == (0, 1)
        kinds = [parse_entry(raw).entry.kind for raw in await trail.entries(0, trail.size)]
        assert kinds[-1] == "evidence.rejected"
    finally:
        await trail.close()


async def test_quota_evicts_oldest_and_records_every_eviction(tmp_path: Path) -> None:
    trail, queue, _, _ = await setup(tmp_path, quota=12_000)
    try:
        for n in range(30):
            await sign(queue, n, size=1_000)
        stats = await queue.stats()
        assert stats.queued_bytes <= 12_000
        assert stats.evicted_total == 30 - stats.queued
        pending = [s.bundle_id for s in await queue.pending()]
        assert pending == [f"ev-{n}" for n in range(30 - stats.queued, 30)], "the oldest go first"
        entries = [parse_entry(raw).entry for raw in await trail.entries(0, trail.size)]
        evicted = [
            bundle
            for e in entries
            if e.kind == "evidence.evicted"
            for bundle in e.data["bundle_ids"]
        ]
        assert evicted == [f"ev-{n}" for n in range(30 - stats.queued)]
        assert (await trail.verify()).ok
    finally:
        await trail.close()


async def test_delivered_bundles_are_kept_marked_and_not_sent_again(tmp_path: Path) -> None:
    trail, queue, _, central = await setup(tmp_path)
    try:
        for n in range(3):
            await sign(queue, n)
        assert (await queue.deliver(central)).delivered == ["ev-0", "ev-1", "ev-2"]
        stats = await queue.stats()
        assert (stats.queued, stats.delivered, stats.pruned_total) == (0, 3, 0)
        assert await queue.pending() == []
        sent: list[Envelope] = []

        async def record(envelope: Envelope) -> None:
            sent.append(envelope)

        central.submit_evidence = record  # type: ignore[method-assign]
        assert (await queue.deliver(central)).delivered == []
        assert sent == []
        marked = await trail.store.run(
            lambda c: c.execute(
                "SELECT bundle_id, delivered_at FROM evidence ORDER BY log_index"
            ).fetchall()
        )
        assert marked == [(f"ev-{n}", "2026-11-25T12:00:00Z") for n in range(3)]
        again = await sign(queue, 1)  # idempotent: the delivered bundle, not a new one
        assert (again.log_index, (await queue.stats()).queued) == (2, 0)
    finally:
        await trail.close()


def recorded(entries: list[bytes], kind: str) -> list[str]:
    return [
        bundle
        for raw in entries
        if (entry := parse_entry(raw).entry).kind == kind
        for bundle in entry.data["bundle_ids"]
    ]


async def test_quota_prunes_delivered_bundles_before_evicting_undelivered(tmp_path: Path) -> None:
    # Bundles of about 1.9 kB: 8 delivered and 8 undelivered just overflow.
    trail, queue, _, central = await setup(tmp_path, quota=30_000)
    try:
        for n in range(8):
            await sign(queue, n, size=1_000)
        await queue.deliver(central)
        for n in range(8, 16):  # not delivered: the link is down
            await sign(queue, n, size=1_000)
        stats = await queue.stats()
        assert stats.queued_bytes + stats.delivered_bytes <= 30_000
        assert (stats.queued, stats.evicted_total) == (8, 0), "no undelivered bundle went"
        assert stats.pruned_total == 8 - stats.delivered > 0
        entries = await trail.entries(0, trail.size)
        assert recorded(entries, "evidence.pruned") == [
            f"ev-{n}" for n in range(stats.pruned_total)
        ]
        assert recorded(entries, "evidence.evicted") == []

        for n in range(16, 40):  # still offline: now undelivered ones must go, oldest first
            await sign(queue, n, size=1_000)
        stats = await queue.stats()
        assert stats.delivered == 0, "every delivered bundle went before an undelivered one"
        entries = await trail.entries(0, trail.size)
        assert recorded(entries, "evidence.pruned") == [f"ev-{n}" for n in range(8)]
        evicted = recorded(entries, "evidence.evicted")
        assert evicted == [f"ev-{n}" for n in range(8, 8 + stats.evicted_total)]
        assert [s.bundle_id for s in await queue.pending()] == [
            f"ev-{n}" for n in range(8 + stats.evicted_total, 40)
        ]
        assert stats.evicted_total > 0
        assert (await trail.verify()).ok
    finally:
        await trail.close()


async def test_without_a_quota_delivered_bundles_are_bounded_and_undelivered_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("msp_agent.evidence.UNQUOTED_DELIVERED_BYTES", 6_000)
    trail, queue, _, central = await setup(tmp_path)
    try:
        for n in range(10):
            await sign(queue, n, size=1_000)
        await queue.deliver(central)
        for n in range(10, 20):
            await sign(queue, n, size=1_000)
        stats = await queue.stats()
        assert stats.delivered_bytes <= 6_000
        assert stats.pruned_total == 10 - stats.delivered > 0
        assert (stats.queued, stats.evicted_total) == (10, 0)
    finally:
        await trail.close()


async def test_bundles_queued_before_the_upgrade_stay_queued(tmp_path: Path) -> None:
    """The schema of an older agent (bundles deleted on delivery) migrates
    with its queue intact."""
    trail, queue, _, _ = await setup(tmp_path)
    await sign(queue, 1)
    await trail.close()
    with sqlite3.connect(tmp_path / "audit.sqlite") as older:  # as the older agent left it
        older.executescript(
            "DROP INDEX evidence_waiting; ALTER TABLE evidence DROP COLUMN delivered_at; "
            "PRAGMA user_version = 1;"
        )
    older.close()
    trail, queue, _, central = await setup(tmp_path)
    try:
        version = await trail.store.run(lambda c: c.execute("PRAGMA user_version").fetchone()[0])
        assert version == len(audit.MIGRATIONS) == 2
        assert [s.bundle_id for s in await queue.pending()] == ["ev-1"]
        assert (await queue.deliver(central)).delivered == ["ev-1"]
        assert (await queue.stats()).delivered == 1
    finally:
        await trail.close()


async def test_the_audit_export_carries_delivered_bundles_and_verifies(tmp_path: Path) -> None:
    trail, queue, _, central = await setup(tmp_path)
    try:
        signed = [await sign(queue, n) for n in range(3)]
        await trail.sync(central)
        assert (await queue.deliver(central)).delivered == ["ev-0", "ev-1", "ev-2"]
        await sign(queue, 3)  # and one still waiting for the server
    finally:
        await trail.close()
    out = tmp_path / "export.json"
    summary = export_audit(tmp_path, out, central_key=CENTRAL.verify_key, now=NOW)
    assert "4 evidence bundle(s)" in summary
    checked = check_audit_export(out.read_bytes(), [CENTRAL.verify_key], at=NOW)
    assert checked.ok, checked.describe()
    assert checked.unwrap().evidence == 4
    exported = parse_audit_export(out.read_bytes()).evidence
    assert exported[:3] == tuple(s.envelope for s in signed)
