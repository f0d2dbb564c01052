"""Witnessed audit ingest (design §4): every way a batch can be wrong is
refused with its own problem, stores nothing and (for a 422) raises a
security alert; a resend stores nothing twice."""

from __future__ import annotations

import asyncio
import base64
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from msp_central.db.tables import audit_checkpoints, audit_entries, audit_logs, security_alerts
from msp_protocol.delegation import make_delegation_request
from msp_protocol.dsse import Envelope
from msp_protocol.keys import SigningKey
from msp_protocol.log import make_entry, verify_receipt
from msp_protocol.sync import MAX_BATCH_ENTRIES, SyncRequest
from tests.central.support import ApplianceClient, Harness


async def scalar(harness: Harness, query: Any) -> Any:
    async with harness.engine.connect() as connection:
        return (await connection.execute(query)).scalar()


async def stored_size(harness: Harness, appliance: ApplianceClient) -> tuple[int, int]:
    """(witnessed size, rows stored) for the appliance's log."""
    size = await scalar(
        harness,
        sa.select(audit_logs.c.size).where(audit_logs.c.appliance_id == appliance.appliance_id),
    )
    rows = await scalar(
        harness,
        sa.select(sa.func.count()).where(audit_entries.c.appliance_id == appliance.appliance_id),
    )
    return int(size), int(rows)


async def alerts(harness: Harness) -> list[str]:
    async with harness.engine.connect() as connection:
        rows = await connection.execute(
            sa.select(security_alerts.c.code).order_by(security_alerts.c.id)
        )
        return [row.code for row in rows]


@pytest.fixture
async def appliance(harness: Harness) -> ApplianceClient:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    appliance.grow(10)
    reply = await appliance.sync(appliance.batch(0))
    assert reply.status == 200, reply.body
    return appliance


def with_entries(request: SyncRequest, entries: list[str]) -> SyncRequest:
    return request.model_copy(update={"entries": tuple(entries)})


async def test_batches_are_witnessed_and_receipted(
    harness: Harness, appliance: ApplianceClient
) -> None:
    for _ in range(3):
        old = len(appliance.records)
        appliance.grow(7)
        reply = await appliance.sync(appliance.batch(old))
        assert reply.status == 200, reply.body
        receipt = verify_receipt(
            Envelope.from_wire(reply.body["receipt"]), roots=[harness.root.verify_key]
        ).receipt
        assert receipt.size == len(appliance.records) == reply.body["size"]
        assert receipt.origin == f"msp/{appliance.appliance_id}"
    assert await stored_size(harness, appliance) == (31, 31)
    async with harness.engine.connect() as connection:
        raws = (
            (
                await connection.execute(
                    sa.select(audit_entries.c.raw)
                    .where(audit_entries.c.appliance_id == appliance.appliance_id)
                    .order_by(audit_entries.c.idx)
                )
            )
            .scalars()
            .all()
        )
    assert [bytes(raw) for raw in raws] == [r.raw for r in appliance.records]
    assert await alerts(harness) == []


async def test_replayed_batch_stores_nothing_twice(
    harness: Harness, appliance: ApplianceClient
) -> None:
    appliance.grow(5)
    batch = appliance.batch(10)
    first = await appliance.sync(batch)
    again = await appliance.sync(batch)
    assert first.status == again.status == 200
    assert again.body == first.body
    assert await stored_size(harness, appliance) == (15, 15)
    checkpoints = await scalar(
        harness,
        sa.select(sa.func.count()).where(
            audit_checkpoints.c.appliance_id == appliance.appliance_id
        ),
    )
    assert checkpoints == 2


async def test_concurrent_resends_store_once(harness: Harness, appliance: ApplianceClient) -> None:
    appliance.grow(50)
    batch = appliance.batch(10)
    replies = await asyncio.gather(*(appliance.sync(batch) for _ in range(4)))
    assert [r.status for r in replies] == [200] * 4
    assert len({r.body["receipt"]["signatures"][0]["sig"] for r in replies}) == 1
    assert await stored_size(harness, appliance) == (60, 60)


async def test_stale_old_size_is_a_409_with_the_server_size(
    harness: Harness, appliance: ApplianceClient
) -> None:
    appliance.grow(5)
    behind = await appliance.sync(appliance.batch(5))  # resends 5..9, which the server holds
    assert (behind.status, behind.code, behind.body["server_size"]) == (409, "stale-size", 10)
    ahead = await appliance.sync(appliance.batch(12))  # claims the server holds 12
    assert (ahead.status, ahead.code, ahead.body["server_size"]) == (409, "stale-size", 10)
    assert await stored_size(harness, appliance) == (10, 10)
    assert await alerts(harness) == []
    resumed = await appliance.sync(appliance.batch(behind.body["server_size"]))
    assert resumed.status == 200


def tamper_entry(request: SyncRequest) -> SyncRequest:
    raw = base64.b64decode(request.entries[2]).replace(b'"n":12', b'"n":13')
    entries = list(request.entries)
    entries[2] = base64.b64encode(raw).decode()
    return with_entries(request, entries)


def reorder_entries(request: SyncRequest) -> SyncRequest:
    entries = list(request.entries)
    entries[1], entries[2] = entries[2], entries[1]
    return with_entries(request, entries)


def drop_entry(request: SyncRequest) -> SyncRequest:
    return with_entries(request, list(request.entries[:-1]))


def pad_entry(request: SyncRequest) -> SyncRequest:
    return with_entries(request, [*request.entries, request.entries[-1]])


def bad_consistency(request: SyncRequest) -> SyncRequest:
    proof = list(request.consistency)
    proof[0] = ("0" if proof[0][0] != "0" else "1") + proof[0][1:]
    return request.model_copy(update={"consistency": tuple(proof)})


@pytest.mark.parametrize(
    ("tamper", "status", "code"),
    [
        pytest.param(tamper_entry, 422, "bad-checkpoint", id="tamper_entry"),
        pytest.param(reorder_entries, 422, "bad-log-entry", id="tamper_reorder"),
        pytest.param(drop_entry, 422, "bad-checkpoint", id="tamper_missing_entry"),
        pytest.param(pad_entry, 422, "bad-checkpoint", id="tamper_extra_entry"),
        pytest.param(bad_consistency, 422, "bad-consistency-proof", id="tamper_consistency_proof"),
        pytest.param(
            lambda r: with_entries(r, [base64.b64encode(b'{"index":10').decode(), *r.entries[1:]]),
            400,
            "malformed-json",
            id="tamper_garbage_entry",
        ),
    ],
)
async def test_a_tampered_batch_is_refused_and_alerted(
    harness: Harness, appliance: ApplianceClient, tamper: Any, status: int, code: str
) -> None:
    appliance.grow(6)
    reply = await appliance.sync(tamper(appliance.batch(10)))
    assert (reply.status, reply.code) == (status, code), reply.body
    assert await stored_size(harness, appliance) == (10, 10)
    assert await alerts(harness) == [code]
    genuine = await appliance.sync(appliance.batch(10))  # the real batch still goes through
    assert genuine.status == 200


async def test_truncated_history_is_refused(harness: Harness, appliance: ApplianceClient) -> None:
    appliance.grow(10)
    assert (await appliance.sync(appliance.batch(10))).status == 200
    del appliance.records[15:]  # the appliance's log lost its tail
    reply = await appliance.sync(appliance.batch(15))
    assert (reply.status, reply.code, reply.body["server_size"]) == (422, "truncated-history", 20)
    assert await alerts(harness) == ["truncated-history"]


async def test_forked_history_same_size_different_root(
    harness: Harness, appliance: ApplianceClient
) -> None:
    fork = list(appliance.records[:5])
    for index in range(5, 10):
        fork.append(make_entry(index, appliance.clock(), "check.run", "agent", {"forged": index}))
    reply = await appliance.sync(appliance.batch(10, records=fork))
    assert reply.status == 422
    assert reply.code == "bad-checkpoint", reply.body
    rewrite = await appliance.sync(appliance.batch(0, records=fork))
    assert (rewrite.status, rewrite.code, rewrite.body["index"]) == (422, "rewrite", 5)
    assert await alerts(harness) == ["bad-checkpoint", "rewrite"]
    assert await stored_size(harness, appliance) == (10, 10)


async def test_oversized_batch(harness: Harness, appliance: ApplianceClient) -> None:
    appliance.grow(MAX_BATCH_ENTRIES + 1)
    full = appliance.batch(10, 10 + MAX_BATCH_ENTRIES)
    reply = await appliance.sync(with_entries(full, [*full.entries, full.entries[-1]]))
    assert (reply.status, reply.code) == (413, "batch-too-large")
    assert await stored_size(harness, appliance) == (10, 10)
    for start in range(10, len(appliance.records), MAX_BATCH_ENTRIES):  # in bounded batches it goes
        end = min(start + MAX_BATCH_ENTRIES, len(appliance.records))
        assert (await appliance.sync(appliance.batch(start, end))).status == 200


async def test_body_over_the_limit(harness: Harness, appliance: ApplianceClient) -> None:
    appliance.grow(150, data={"blob": "x" * 60_000})  # 12 MB of base64
    reply = await appliance.sync(appliance.batch(10))
    assert (reply.status, reply.code) == (413, "body-too-large")


async def test_expired_certificate_is_accepted_and_flagged(
    harness: Harness, appliance: ApplianceClient
) -> None:
    harness.clock.advance(timedelta(days=31))  # offline past its certificate's end
    appliance.grow(5)
    reply = await appliance.sync(appliance.batch(10))
    assert reply.status == 200, reply.body
    flagged = await scalar(
        harness,
        sa.select(audit_checkpoints.c.signed_after_expiry).where(audit_checkpoints.c.size == 15),
    )
    assert flagged is True
    early = await scalar(
        harness,
        sa.select(audit_checkpoints.c.signed_after_expiry).where(audit_checkpoints.c.size == 10),
    )
    assert early is False


async def rotate(appliance: ApplianceClient, harness: Harness) -> SigningKey:
    new_key = SigningKey.generate()
    request = make_delegation_request(
        purpose="rotate",
        audience=harness.root.key_id,
        subject=new_key,
        scopes=["audit", "evidence"],  # type: ignore[list-item]
        current=(appliance.serial, appliance.key),
        created=harness.clock(),
    )
    reply = await appliance.request(
        "POST",
        f"/api/v1/appliances/{appliance.appliance_id}/certificates",
        {"request": request.to_wire()},
    )
    assert reply.status == 201, reply.body
    return new_key


async def test_revoked_key_past_its_cutoff_is_refused(
    harness: Harness, appliance: ApplianceClient
) -> None:
    partner_key = await harness.partner("other")  # not this appliance's partner
    old_key, old_serial = appliance.key, appliance.serial
    appliance.key = await rotate(appliance, harness)
    appliance.grow(2, kind="key.rotated")
    assert (await appliance.sync(appliance.batch(10))).status == 200  # signed by the new key
    # The old key is found to be stolen: its partner revokes it.
    _ = partner_key
    async with harness.engine.begin() as connection:
        from msp_central.queries import revoke_certificate

        revoked = await revoke_certificate(
            connection, harness.root, old_serial, "stolen", harness.clock()
        )
    assert revoked.cutoff_size == 12
    appliance.grow(3)
    forged = await appliance.sync(appliance.batch(12, signer=old_key))  # HTTP-signed by the new key
    assert (forged.status, forged.code) == (422, "certificate-revoked"), forged.body
    assert await alerts(harness) == ["certificate-revoked"]
    assert (await appliance.sync(appliance.batch(12))).status == 200


async def test_checkpoint_by_a_key_never_delegated(
    harness: Harness, appliance: ApplianceClient
) -> None:
    appliance.grow(3)
    reply = await appliance.sync(appliance.batch(10, signer=SigningKey.generate()))
    assert (reply.status, reply.code) == (422, "unknown-key")
    assert await alerts(harness) == ["unknown-key"]


async def test_another_appliances_checkpoint(harness: Harness, appliance: ApplianceClient) -> None:
    partner = await harness.partner("second")
    other = await harness.enroll(partner)
    other.grow(10)
    reply = await appliance.sync(other.batch(0))  # the other's log, sent as this appliance's
    assert reply.status == 422
    assert await stored_size(harness, appliance) == (10, 10)
