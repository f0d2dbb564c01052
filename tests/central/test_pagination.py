"""Keyset pagination on both backends: walking the pages of a list gives
every row exactly once and in order, whatever the ties in the sort key and
whatever is inserted between pages; a cursor is only ever one the server
issued for the same filters."""

from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from msp_central.db.engine import create_engine
from msp_central.db.tables import UTCDateTime
from msp_central.pagination import Keyset, PageRequest, _decode, _encode, fetch_page
from msp_central.problems import Problem

scratch = sa.MetaData()
rows_table = sa.Table(
    "pagination_rows",
    scratch,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("rank", sa.BigInteger, nullable=False),
)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def _walk(engine: Any, keyset: Keyset, limit: int, between: Any = None) -> list[str]:
    seen: list[str] = []
    after = None
    while True:
        page = PageRequest(limit=limit, after=after, fingerprint="f")
        async with engine.connect() as connection:
            rows, cursor = await fetch_page(connection, sa.select(rows_table), keyset, page)
        assert len(rows) <= limit
        seen += [row.id for row in rows]
        if cursor is None:
            return seen
        after = _decode(cursor, "f", keyset)
        if between is not None:
            await between()


@pytest.mark.parametrize("direction", ["asc", "desc"])
async def test_every_row_once_in_order(database_url: str, direction: Any) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(scratch.create_all)
        generator = random.Random(7)
        # Few distinct times and ranks: many ties, broken only by the id.
        values = [
            {
                "id": f"r{n:04d}",
                "at": T0 + timedelta(microseconds=generator.randrange(5)),
                "rank": generator.randrange(3) - 1,
            }
            for n in range(157)
        ]
        async with engine.begin() as connection:
            await connection.execute(sa.insert(rows_table), values)
        keyset = Keyset(
            [
                (rows_table.c.at, direction),
                (rows_table.c.rank, direction),
                (rows_table.c.id, direction),
            ]
        )
        expected = sorted(values, key=lambda v: (v["at"], v["rank"], v["id"]))
        if direction == "desc":
            expected.reverse()
        for limit in (1, 7, 156, 157, 500):
            assert await _walk(engine, keyset, limit) == [v["id"] for v in expected]

        # Rows arriving while a client walks: the ones sorting after the
        # cursor show up, and nothing already sent is sent again.
        counter = iter(range(1000))

        async def insert() -> None:
            async with engine.begin() as connection:
                await connection.execute(
                    sa.insert(rows_table).values(id=f"z{next(counter):04d}", at=T0, rank=0)
                )

        walked = await _walk(engine, keyset, 10, insert)
        assert len(walked) == len(set(walked))
        assert {v["id"] for v in values} <= set(walked)
    finally:
        async with engine.begin() as connection:
            await connection.run_sync(scratch.drop_all)
        await engine.dispose()


KEYSET = Keyset([(rows_table.c.at, "desc"), (rows_table.c.rank, "desc"), (rows_table.c.id, "desc")])


def _forge(parts: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("cursor", "detail"),
    [
        ("!!!", "not one this server issued"),
        (_forge(["f", {"t": "2026-01-01T00:00:00+00:00"}, 1]), "not one this server issued"),
        (_forge(["g", {"t": "2026-01-01T00:00:00+00:00"}, 1, "a"]), "other filters"),
        (_forge(["f", "2026-01-01T00:00:00+00:00", 1, "a"]), "not one this server issued"),
        (_forge(["f", {"t": "2026-01-01T00:00:00"}, 1, "a"]), "not one this server issued"),
        (_forge(["f", {"t": "yesterday"}, 1, "a"]), "not one this server issued"),
        (_forge(["f", {"t": "2026-01-01T00:00:00+00:00"}, "1", "a"]), "not one this server issued"),
        (
            _forge(["f", {"t": "2026-01-01T00:00:00+00:00"}, True, "a"]),
            "not one this server issued",
        ),
        (
            _forge(["f", {"t": "2026-01-01T00:00:00+00:00"}, 2**63, "a"]),
            "not one this server issued",
        ),
        (_forge(["f", {"t": "2026-01-01T00:00:00+00:00"}, 1, 5]), "not one this server issued"),
        (_forge({"f": 1}), "not one this server issued"),  # type: ignore[arg-type]
        (base64.urlsafe_b64encode(b"\xff\xfe").decode(), "not one this server issued"),
    ],
    ids=[
        "not-base64",
        "short",
        "other-filters",
        "time-as-text",
        "naive-time",
        "not-a-time",
        "rank-as-text",
        "rank-as-bool",
        "rank-too-big",
        "id-as-number",
        "object",
        "not-utf8",
    ],
)
def test_forged_cursors_are_refused(cursor: str, detail: str) -> None:
    with pytest.raises(Problem) as raised:
        _decode(cursor, "f", KEYSET)
    assert raised.value.code == "malformed-query"
    assert detail in raised.value.detail


def test_a_cursor_round_trips() -> None:
    key = [T0 + timedelta(microseconds=3), -1, "r0001"]
    assert _decode(_encode(key, "f"), "f", KEYSET) == key
