"""OfflineAuditTrail: durable group-committed appends, proofs, verification,
tamper detection on the SQLite file, quota, quarantine."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from msp_agent.audit import (
    CHECKPOINT_SPACING,
    AuditTrailFullError,
    OfflineAuditTrail,
    row_mac,
    verify_database,
)
from msp_agent.keys import DelegatedSigningKey
from msp_protocol.dsse import parse_envelope
from msp_protocol.log import parse_entry
from msp_protocol.merkle import check_consistency, check_inclusion, leaf_hash
from tests.agent.support import APPLIANCE, CENTRAL, NOW, Clock, enrolled_key


async def open_trail(
    tmp_path: Path, signer: DelegatedSigningKey | None = None, **kwargs: Any
) -> OfflineAuditTrail:
    signer = signer or enrolled_key(tmp_path / "keys")
    return await OfflineAuditTrail.open(
        tmp_path / "audit.sqlite",
        appliance_id=APPLIANCE,
        signer=signer,
        central_keys=[CENTRAL.verify_key],
        row_key=signer.audit_row_key(),
        clock=Clock(),
        **kwargs,
    )


async def test_new_log_begins_with_genesis(tmp_path: Path) -> None:
    signer = enrolled_key(tmp_path / "keys")
    trail = await open_trail(tmp_path, signer)
    try:
        assert trail.size == 1
        genesis = parse_entry((await trail.entries(0, 1))[0]).entry
        assert genesis.kind == "chain.genesis"
        assert signer.certificate is not None
        assert genesis.data == {
            "appliance_id": APPLIANCE,
            "key_id": signer.key_id,
            "certificate_serial": signer.certificate.certificate.serial,
        }
    finally:
        await trail.close()


async def test_append_is_committed_and_checkpointed_before_it_returns(tmp_path: Path) -> None:
    trail = await open_trail(tmp_path)
    try:
        appended = await trail.append("l1.action", "runbook:ntp-sync", {"ok": True})
        assert appended.index == 1
        assert appended.size == 2
        # Another connection sees it: it is on disk, with a checkpoint of that size.
        other = sqlite3.connect(tmp_path / "audit.sqlite")
        raw = other.execute("SELECT raw FROM entries WHERE idx = 1").fetchone()[0]
        envelope = other.execute("SELECT envelope FROM checkpoints WHERE size = 2").fetchone()[0]
        other.close()
        assert parse_entry(bytes(raw)).entry.data == {"ok": True}
        assert parse_envelope(bytes(envelope)).payloadType.endswith("checkpoint.v1+json")
    finally:
        await trail.close()


async def test_concurrent_appends_are_group_committed_without_gaps(tmp_path: Path) -> None:
    trail = await open_trail(tmp_path)
    try:
        results = await asyncio.gather(
            *(trail.append("check.run", f"producer-{n % 16}", {"n": n}) for n in range(400))
        )
        indices = sorted(r.index for r in results)
        assert indices == list(range(1, 401))
        commits = {r.size for r in results}
        assert len(commits) < 50, f"{len(commits)} commits for 400 concurrent appends"
        for result in results:
            assert result.size > result.index
        assert (await trail.verify()).ok
    finally:
        await trail.close()


async def test_a_bad_append_fails_alone_and_leaves_no_gap(tmp_path: Path) -> None:
    trail = await open_trail(tmp_path)
    try:
        outcomes = await asyncio.gather(
            trail.append("check.run", "agent", {"n": 1}),
            trail.append("Not A Kind", "agent", {}),
            trail.append("check.run", "agent", {"not_json": object()}),
            trail.append("check.run", "agent", {"n": 2}),
            return_exceptions=True,
        )
        assert [type(o).__name__ for o in outcomes] == [
            "Appended",
            "UsageError",
            "UsageError",
            "Appended",
        ]
        assert [o.index for o in outcomes if not isinstance(o, BaseException)] == [1, 2]
        assert (await trail.verify()).ok
    finally:
        await trail.close()


async def test_reopen_continues_the_same_log(tmp_path: Path) -> None:
    signer = enrolled_key(tmp_path / "keys")
    trail = await open_trail(tmp_path, signer)
    for n in range(10):
        await trail.append("check.run", "agent", {"n": n})
    root = (await trail.head()).root
    await trail.close()
    trail = await open_trail(tmp_path, signer)
    try:
        head = await trail.head()
        assert (head.size, head.root) == (11, root)
        assert (await trail.append("check.run", "agent", {"n": 10})).index == 11
        assert (await trail.verify()).ok
    finally:
        await trail.close()


async def test_proofs_verify_against_the_signed_root(tmp_path: Path) -> None:
    trail = await open_trail(tmp_path)
    try:
        for batch in range(7):
            await asyncio.gather(
                *(trail.append("check.run", "agent", {"b": batch, "n": n}) for n in range(150))
            )
        head = await trail.head()
        assert head.size == 1051
        raws = await trail.entries(0, head.size)
        for index in (0, 1, 255, 256, 511, 700, 1023, 1024, 1050):
            proof = await trail.prove(index)
            assert check_inclusion(leaf_hash(raws[index]), index, head.size, proof, head.root).ok
        for old in (1, 256, 300, 1024, 1051):
            old_root = await trail.root_at(old)
            proof = await trail.consistency(old)
            assert check_consistency(old, head.size, old_root, head.root, proof).ok
        proof = await trail.prove(17, 600)
        assert check_inclusion(leaf_hash(raws[17]), 17, 600, proof, await trail.root_at(600)).ok
    finally:
        await trail.close()


async def test_checkpoints_are_thinned_to_one_per_block(tmp_path: Path) -> None:
    trail = await open_trail(tmp_path)
    try:
        for n in range(3 * CHECKPOINT_SPACING):
            if n % 100 == 0:
                await asyncio.gather(
                    *(trail.append("check.run", "agent", {"n": n + k}) for k in range(100))
                )
        sizes = await trail.store.run(
            lambda c: [row[0] for row in c.execute("SELECT size FROM checkpoints ORDER BY size")]
        )
        assert len(sizes) <= 5, sizes
        assert sizes[-1] == trail.size
        assert (await trail.verify()).ok
    finally:
        await trail.close()


# --- tamper detection on the SQLite file -------------------------------------------------


@pytest.fixture
async def written_log(tmp_path: Path) -> Path:
    """A closed log of 1 + 40 * 50 = 2001 entries in 40 commits of 50."""
    trail = await open_trail(tmp_path)
    for batch in range(40):
        await asyncio.gather(
            *(trail.append("check.run", "agent", {"batch": batch, "n": n}) for n in range(50))
        )
    assert trail.size == 2001
    await trail.close()
    return tmp_path / "audit.sqlite"


def tamper(path: Path, change: Callable[[sqlite3.Connection], None]) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    change(connection)
    connection.close()


def verify_file(path: Path) -> tuple[int | None, str]:
    connection = sqlite3.connect(path)
    row_key = (path.parent / "keys" / "audit-row.key").read_bytes()
    try:
        result = verify_database(connection, [CENTRAL.verify_key], NOW, row_key)
    finally:
        connection.close()
    assert not result.ok
    return result.first_bad_index, result.problem or ""


def raw_of(connection: sqlite3.Connection, index: int) -> bytes:
    return bytes(
        connection.execute("SELECT raw FROM entries WHERE idx = ?", (index,)).fetchone()[0]
    )


def rewrite(
    index: int, *, with_leaf: bool, old: bytes = b'"n":', new: bytes = b'"m":'
) -> Callable[[sqlite3.Connection], None]:
    """Change an entry's bytes; with_leaf also recomputes its leaf hash (what
    someone who knows the format but not the row key would do)."""

    def change(c: sqlite3.Connection) -> None:
        raw = raw_of(c, index).replace(old, new)
        assert raw != raw_of(c, index)
        c.execute("UPDATE entries SET raw = ? WHERE idx = ?", (raw, index))
        if with_leaf:
            c.execute("UPDATE entries SET leaf = ? WHERE idx = ?", (leaf_hash(raw), index))

    return change


def swap(a: int, b: int) -> Callable[[sqlite3.Connection], None]:
    def change(c: sqlite3.Connection) -> None:
        rows = {
            i: c.execute("SELECT raw, leaf, mac FROM entries WHERE idx = ?", (i,)).fetchone()
            for i in (a, b)
        }
        for i, j in ((a, b), (b, a)):
            c.execute("UPDATE entries SET raw = ?, leaf = ?, mac = ? WHERE idx = ?", (*rows[j], i))

    return change


def flip_bit(
    table: str, column: str, key: str, value: int, offset: int
) -> Callable[[sqlite3.Connection], None]:
    def change(c: sqlite3.Connection) -> None:
        blob = bytearray(
            c.execute(f"SELECT {column} FROM {table} WHERE {key} = ?", (value,)).fetchone()[0]
        )
        blob[offset % len(blob)] ^= 0x10
        c.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (bytes(blob), value))

    return change


def insert_at_end(c: sqlite3.Connection) -> None:
    raw = raw_of(c, 2000).replace(b'"index":2000', b'"index":2001')
    mac = c.execute("SELECT mac FROM entries WHERE idx = 2000").fetchone()[0]
    c.execute(
        "INSERT INTO entries (idx, raw, leaf, mac) VALUES (2001, ?, ?, ?)",
        (raw, leaf_hash(raw), mac),
    )


def insert_in_middle(c: sqlite3.Connection) -> None:
    c.execute("UPDATE entries SET idx = idx + 1000000 WHERE idx >= 700")
    c.execute("UPDATE entries SET idx = idx - 1000000 + 1 WHERE idx >= 1000000")
    raw, mac = c.execute("SELECT raw, mac FROM entries WHERE idx = 699").fetchone()
    c.execute(
        "INSERT INTO entries (idx, raw, leaf, mac) VALUES (700, ?, ?, ?)",
        (raw, leaf_hash(bytes(raw)), mac),
    )


TAMPERING = [
    pytest.param(
        rewrite(1234, with_leaf=False), 1234, "stored bytes do not match", id="change_bytes"
    ),
    pytest.param(
        rewrite(1234, with_leaf=True), 1234, "row authentication code", id="change_bytes_and_hash"
    ),
    pytest.param(
        lambda c: c.execute("DELETE FROM entries WHERE idx = 777"),
        777,
        "rows were deleted",
        id="delete_row",
    ),
    pytest.param(swap(1500, 1501), 1500, "row authentication code", id="reorder_rows"),
    pytest.param(insert_in_middle, 700, "row authentication code", id="insert_row"),
    pytest.param(insert_at_end, 2001, "row authentication code", id="append_row"),
    pytest.param(
        lambda c: c.execute("DELETE FROM entries WHERE idx >= 1900"),
        1900,
        "its tail was removed",
        id="truncate_tail",
    ),
    pytest.param(
        flip_bit("entries", "raw", "idx", 321, 40),
        321,
        "stored bytes do not match",
        id="flip_bit_in_entry",
    ),
    pytest.param(
        flip_bit("entries", "leaf", "idx", 321, 7),
        321,
        "stored bytes do not match",
        id="flip_bit_in_leaf",
    ),
    pytest.param(
        flip_bit("entries", "mac", "idx", 1999, 3),
        1999,
        "row authentication code",
        id="flip_bit_in_mac",
    ),
    pytest.param(
        rewrite(0, with_leaf=True, old=b'"actor":"agent"', new=b'"actor":"admin"'),
        0,
        "row authentication code",
        id="change_genesis",
    ),
]


@pytest.mark.parametrize(("change", "index", "problem"), TAMPERING)
def test_verify_names_the_first_bad_index(
    written_log: Path, change: Callable[[sqlite3.Connection], None], index: int, problem: str
) -> None:
    tamper(written_log, change)
    bad, why = verify_file(written_log)
    assert problem in why
    assert bad == index, why


def test_rows_added_by_someone_holding_the_row_key_are_not_covered(written_log: Path) -> None:
    """Even with the agent's row key, an added entry has no checkpoint: only
    the device key could make one."""
    row_key = (written_log.parent / "keys" / "audit-row.key").read_bytes()

    def append_with_key(c: sqlite3.Connection) -> None:
        raw = raw_of(c, 2000).replace(b'"index":2000', b'"index":2001')
        leaf = leaf_hash(raw)
        c.execute(
            "INSERT INTO entries (idx, raw, leaf, mac) VALUES (2001, ?, ?, ?)",
            (raw, leaf, row_mac(row_key, 2001, leaf)),
        )

    tamper(written_log, append_with_key)
    bad, why = verify_file(written_log)
    assert bad == 2001
    assert "not covered by any checkpoint" in why


def test_tampered_checkpoint_signature_is_named(written_log: Path) -> None:
    connection = sqlite3.connect(written_log)
    size = connection.execute("SELECT MIN(size) FROM checkpoints WHERE size > 1000").fetchone()[0]
    connection.close()
    tamper(written_log, flip_bit("checkpoints", "envelope", "size", size, 200))
    bad, why = verify_file(written_log)
    assert f"checkpoint at size {size}" in why
    assert bad is not None
    assert bad < size


async def test_logically_damaged_log_is_quarantined_at_open_and_logging_continues(
    written_log: Path, tmp_path: Path
) -> None:
    tamper(written_log, lambda c: c.execute("DELETE FROM entries WHERE idx >= 1990"))
    trail = await open_trail(tmp_path, enrolled_key(tmp_path / "keys2"))
    try:
        assert trail.quarantine is not None
        assert "holds 1990 entries but its latest checkpoint covers 2001" in trail.quarantine.reason
        assert trail.quarantine.moved_to.exists()
        entries = [parse_entry(raw).entry for raw in await trail.entries(0, trail.size)]
        assert [e.kind for e in entries] == ["chain.genesis", "audit.quarantined"]
        assert (await trail.append("check.run", "agent", {})).index == 2
    finally:
        await trail.close()


async def test_corrupt_database_is_quarantined_at_open(written_log: Path, tmp_path: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{written_log}{suffix}").unlink(missing_ok=True)
    data = bytearray(written_log.read_bytes())
    data[4096 * 3 : 4096 * 3 + 512] = b"\xee" * 512
    written_log.write_bytes(bytes(data))
    trail = await open_trail(tmp_path, enrolled_key(tmp_path / "keys2"))
    try:
        assert trail.quarantine is not None
        assert trail.size == 2
        assert (await trail.verify()).ok
    finally:
        await trail.close()


# --- quota ---------------------------------------------------------------------------------


async def test_quota_alerts_then_refuses_loudly_then_records_the_gap(tmp_path: Path) -> None:
    alerts: list[tuple[str, dict[str, Any]]] = []
    signer = enrolled_key(tmp_path / "keys")
    trail = await open_trail(
        tmp_path, signer, quota_bytes=400_000, on_alert=lambda n, d: alerts.append((n, d))
    )
    accepted = refused = 0
    message = ""
    try:
        for n in range(5_000):
            try:
                await trail.append("check.run", "agent", {"n": n, "pad": "x" * 300})
                accepted += 1
            except AuditTrailFullError as exc:
                message = str(exc)
                refused += 1
                if refused == 5:
                    break
        await asyncio.sleep(0)
        assert "entry not recorded; 5 refused since" in message
        names = [name for name, _ in alerts]
        assert names[:3] == ["audit.quota", "audit.quota", "audit.full"], names
        assert [d["percent"] >= 80 for n, d in alerts if n == "audit.quota"] == [True, True]
        kinds = [parse_entry(raw).entry.kind for raw in await trail.entries(0, trail.size)]
        assert kinds.count("audit.quota") == 2
        assert kinds[-1] == "audit.full"
        assert kinds.count("check.run") == accepted
    finally:
        await trail.close()

    # The operator raises the quota: appending resumes and the gap is on record.
    trail = await open_trail(tmp_path, signer, quota_bytes=2_000_000)
    try:
        appended = await trail.append("check.run", "agent", {"after": True})
        entries = [
            parse_entry(raw).entry
            for raw in await trail.entries(appended.index - 1, appended.index + 1)
        ]
        assert entries[0].kind == "audit.gap"
        assert entries[0].data["refused"] == 5
        assert (await trail.verify()).ok
    finally:
        await trail.close()
