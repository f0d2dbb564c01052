"""OfflineAuditTrail.sync against a witness that can fail, stall, lose answers."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from msp_agent.audit import AuditSyncRejected, LocalTruncationError, OfflineAuditTrail
from msp_agent.central import CentralUnavailable
from msp_agent.keys import DelegatedSigningKey
from msp_protocol.merkle import leaf_hash
from tests.agent.fakes import FakeCentral
from tests.agent.support import APPLIANCE, CENTRAL, Clock, enrolled_key


async def trail_with(
    tmp_path: Path, entries: int
) -> tuple[OfflineAuditTrail, DelegatedSigningKey, FakeCentral]:
    signer = enrolled_key(tmp_path / "keys")
    trail = await OfflineAuditTrail.open(
        tmp_path / "audit.sqlite",
        appliance_id=APPLIANCE,
        signer=signer,
        central_keys=[CENTRAL.verify_key],
        row_key=signer.audit_row_key(),
        clock=Clock(),
    )
    for start in range(0, entries, 250):
        await asyncio.gather(
            *(
                trail.append("check.run", "agent", {"n": n})
                for n in range(start, min(entries, start + 250))
            )
        )
    central = FakeCentral(CENTRAL)
    assert signer.certificate is not None
    central.register(signer.certificate.envelope)
    return trail, signer, central


async def test_sync_uploads_everything_in_bounded_batches(tmp_path: Path) -> None:
    trail, _, central = await trail_with(tmp_path, 2_500)
    try:
        report = await trail.sync(central, max_batch=1_000)
        assert (report.from_size, report.to_size, report.batches) == (0, 2_501, 3)
        log = central.logs[APPLIANCE]
        assert log.raws == await trail.entries(0, trail.size)
        head = await trail.head()
        assert head.receipt_size == 2_501
        assert (await trail.verify()).ok
        # Nothing new: nothing sent.
        calls = len(central.calls)
        assert (await trail.sync(central)).batches == 0
        assert len(central.calls) == calls
    finally:
        await trail.close()


async def test_sync_resumes_after_the_link_fails_mid_way(tmp_path: Path) -> None:
    trail, _, central = await trail_with(tmp_path, 3_000)
    try:
        original = central.sync_audit
        count = 0

        async def fail_third(appliance_id, request):  # type: ignore[no-untyped-def]
            nonlocal count
            count += 1
            if count == 3:
                raise CentralUnavailable("link down")
            return await original(appliance_id, request)

        central.sync_audit = fail_third  # type: ignore[method-assign]
        with pytest.raises(CentralUnavailable):
            await trail.sync(central, max_batch=1_000)
        assert (await trail.head()).receipt_size == 2_000
        central.sync_audit = original  # type: ignore[method-assign]
        report = await trail.sync(central, max_batch=1_000)
        assert report.from_size == 2_000, "resumes where the server is, never from the start"
        assert len(central.logs[APPLIANCE].raws) == 3_001
    finally:
        await trail.close()


async def test_lost_answer_is_recovered_without_storing_twice(tmp_path: Path) -> None:
    trail, _, central = await trail_with(tmp_path, 500)
    try:
        central.lose_answers = True
        with pytest.raises(CentralUnavailable):
            await trail.sync(central)
        assert len(central.logs[APPLIANCE].raws) == 501, "the server acted on the batch"
        central.lose_answers = False
        await trail.append("check.run", "agent", {"late": True})
        report = await trail.sync(central)
        assert report.to_size == 502
        assert len(central.logs[APPLIANCE].raws) == 502
        assert central.logs[APPLIANCE].raws == await trail.entries(0, 502)
    finally:
        await trail.close()


async def test_retry_of_the_same_batch_gets_the_stored_receipt(tmp_path: Path) -> None:
    trail, _, central = await trail_with(tmp_path, 100)
    try:
        central.lose_answers = True
        with pytest.raises(CentralUnavailable):
            await trail.sync(central)
        central.lose_answers = False
        await trail.sync(central)  # same size, same checkpoint: AlreadyWitnessed
        assert (await trail.head()).receipt_size == 101
        assert len(central.logs[APPLIANCE].raws) == 101
    finally:
        await trail.close()


async def test_stalled_link_holds_the_sync_until_it_returns(tmp_path: Path) -> None:
    trail, _, central = await trail_with(tmp_path, 50)
    try:
        central.stall()
        task = asyncio.create_task(trail.sync(central))
        await asyncio.sleep(0.05)
        assert not task.done()
        await trail.append("check.run", "agent", {"while": "stalled"}), "logging goes on meanwhile"
        central.resume()
        await task
        assert (await trail.head()).receipt_size >= 51
    finally:
        await trail.close()


async def test_row_changed_while_offline_is_refused_and_alerted(tmp_path: Path) -> None:
    trail, signer, central = await trail_with(tmp_path, 300)
    try:
        await trail.sync(central)
        for n in range(200):
            await trail.append("check.run", "agent", {"offline": n})
    finally:
        await trail.close()
    # Someone edits an already-witnessed row (and its hashes, knowing the format).
    connection = sqlite3.connect(tmp_path / "audit.sqlite", isolation_level=None)
    raw = bytes(
        connection.execute("SELECT raw FROM entries WHERE idx = 150").fetchone()[0]
    ).replace(b'"n":', b'"m":')
    connection.execute(
        "UPDATE entries SET raw = ?, leaf = ? WHERE idx = 150", (raw, leaf_hash(raw))
    )
    connection.execute("DELETE FROM receipts")  # and hides that it was witnessed
    connection.close()
    trail = await reopen(tmp_path, signer)
    try:
        with pytest.raises(AuditSyncRejected, match="rewrite"):
            await trail.sync(central)
        assert central.alerts
        assert "rewrite" in central.alerts[0]
        assert "entry 150 differs" in central.alerts[0]
        assert (await trail.append("check.run", "agent", {"still": "logging"})).index == 501
    finally:
        await trail.close()


async def test_log_restored_from_an_old_backup_is_detected_as_truncated(tmp_path: Path) -> None:
    trail, signer, central = await trail_with(tmp_path, 100)
    await trail.close()
    backup = tmp_path / "backup"
    backup.mkdir()
    for suffix in ("", "-wal"):
        source = Path(f"{tmp_path / 'audit.sqlite'}{suffix}")
        if source.exists():
            (backup / source.name).write_bytes(source.read_bytes())
    trail = await reopen(tmp_path, signer)
    try:
        for n in range(200):
            await trail.append("check.run", "agent", {"later": n})
        await trail.sync(central)
    finally:
        await trail.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'audit.sqlite'}{suffix}").unlink(missing_ok=True)
    for saved in backup.iterdir():
        (tmp_path / saved.name).write_bytes(saved.read_bytes())
    trail = await reopen(tmp_path, signer)
    try:
        with pytest.raises(
            LocalTruncationError, match="holds 301 entries of this log, the appliance only 101"
        ):
            await trail.sync(central)
        assert any("truncated-history" in alert for alert in central.alerts)
    finally:
        await trail.close()


async def reopen(tmp_path: Path, signer: DelegatedSigningKey) -> OfflineAuditTrail:
    return await OfflineAuditTrail.open(
        tmp_path / "audit.sqlite",
        appliance_id=APPLIANCE,
        signer=signer,
        central_keys=[CENTRAL.verify_key],
        row_key=signer.audit_row_key(),
        clock=Clock(),
    )


async def test_checkpoints_sent_for_sync_are_kept(tmp_path: Path) -> None:
    trail, _, central = await trail_with(tmp_path, 30)
    try:
        await trail.sync(central)
        for n in range(5):  # later commits in the same block would thin an ordinary checkpoint
            await trail.append("check.run", "agent", {"after": n})
        sizes = await trail.store.run(
            lambda c: [row[0] for row in c.execute("SELECT size FROM checkpoints")]
        )
        assert 31 in sizes
        assert (await trail.verify()).ok
    finally:
        await trail.close()
