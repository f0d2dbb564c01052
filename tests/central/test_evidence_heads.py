"""The heads kept at ingest always equal the posture rule applied to every
stored bundle, whatever the order bundles arrive in and whichever the
witnessed log later contradicts: a property over generated histories,
checked against the rule written out here on its own."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msp_central.db.tables import evidence, evidence_heads, metadata
from msp_central.evidence_heads import advance, head_of, settle

AT = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sa.Engine]:
    path: Path = tmp_path_factory.mktemp("heads") / "heads.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    metadata.create_all(engine, tables=[evidence, evidence_heads])
    yield engine
    engine.dispose()


# A bundle: (appliance, check, generation, index); each is stored once, in
# the drawn order, and some are later settled by their witnessed entry.
_BUNDLE = st.tuples(
    st.sampled_from(["a-1", "a-2"]),
    st.sampled_from(["time_sync", "ssh"]),
    st.integers(1, 2),
    st.integers(0, 6),
)
_HISTORY = st.lists(
    st.tuples(_BUNDLE, st.sampled_from([None, True, False]), st.booleans()),
    min_size=1,
    max_size=14,
    unique_by=lambda item: item[0],
)


def _row(bundle: tuple[str, str, int, int], in_log: bool | None) -> dict[str, Any]:
    appliance, check, generation, index = bundle
    return {
        "appliance_id": appliance,
        "bundle_id": f"ev-{check}-{generation}-{index}",
        "site_id": "s-1",
        "check_id": check,
        "result": "pass" if index % 2 else "fail",
        "controls": {"hipaa": ["164.312(b)"]},
        "collected_at": AT + timedelta(minutes=index),
        "log_generation": generation,
        "log_index": index,
        "payload_sha256": "00" * 32,
        "envelope": "{}",
        "serial": "1",
        "signed_after_expiry": False,
        "in_log": in_log,
        "received_at": AT,
    }


def _by_the_rule(rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[str, bool | None]]:
    """Per pair, the newest bundle by (generation, index, id) among those
    not contradicted."""
    heads: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        if row["in_log"] is False:
            continue
        key = (row["appliance_id"], row["check_id"])
        order = (row["log_generation"], row["log_index"], row["bundle_id"])
        held = heads.get(key)
        if held is None or order > (held["log_generation"], held["log_index"], held["bundle_id"]):
            heads[key] = row
    return {key: (row["bundle_id"], row["in_log"]) for key, row in heads.items()}


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(history=_HISTORY)
def test_heads_follow_the_rule_through_any_arrival_order(
    engine: sa.Engine, history: list[tuple[tuple[str, str, int, int], bool | None, bool]]
) -> None:
    with engine.begin() as connection:
        connection.execute(sa.delete(evidence))
        connection.execute(sa.delete(evidence_heads))
        stored: list[dict[str, Any]] = []
        # Arrival: stored with in_log True (entry already witnessed) or None
        # (not yet); a bundle whose entry contradicts it is refused at the
        # door, so it arrives unsettled and is contradicted afterwards.
        for bundle, verdict, _ in history:
            row = _row(bundle, True if verdict is True else None)
            connection.execute(sa.insert(evidence).values(**row))
            connection.execute(advance(connection.dialect.name, head_of(row, None)))
            stored.append(row)
        # Then witnessed entries arrive: every contradicting one, and those
        # of the unsettled bundles drawn to be confirmed.
        for (_, verdict, arrives), row in zip(history, stored, strict=True):
            if verdict is False or (verdict is None and arrives):
                settled = verdict is None
                row["in_log"] = settled
                connection.execute(
                    sa.update(evidence)
                    .where(
                        evidence.c.appliance_id == row["appliance_id"],
                        evidence.c.bundle_id == row["bundle_id"],
                    )
                    .values(in_log=settled)
                )
                settle(connection, row["appliance_id"], row["check_id"], row["bundle_id"], settled)
        heads = {
            (h.appliance_id, h.check_id): (h.bundle_id, h.in_log)
            for h in connection.execute(sa.select(evidence_heads))
        }
    assert heads == _by_the_rule(stored)
