"""The head of each (appliance, check) pair: the newest bundle, by log
position, that its witnessed log entry does not contradict.

Posture speaks through these heads (see :mod:`msp_central.posture`). Ranking
a partner's million bundles on every read took seconds, so the heads are
kept as rows (``evidence_heads``), changed in the same transaction as the
evidence they follow:

- a stored bundle becomes its pair's head when it is newer (log generation,
  then log index, then bundle id, the appliance's own order) than the head
  held: bundles queued offline arrive late and out of order, and an older
  one must never displace a newer;
- when a witnessed log entry settles a bundle's ``in_log``, the head that is
  that bundle takes the verdict; when the entry contradicts it, the pair's
  head is chosen again from the stored bundles (or the pair has none).

A head also holds the bundle's ``observed.reason`` (bounded), taken once
from the verified bundle instead of from its envelope on every read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from msp_central.db.tables import evidence, evidence_heads
from msp_protocol.canonical import parse_json
from msp_protocol.dsse import Envelope
from msp_protocol.errors import MalformedError

# Reasons are shown, not parsed: a bound keeps one odd bundle from bloating
# every posture answer.
MAX_REASON_CHARS: Final = 500

# The appliance's own order of its bundles, newest last.
_ORDER: Final = ("log_generation", "log_index", "bundle_id")
_KEY: Final = ("appliance_id", "check_id")
# The columns a head copies from its bundle's evidence row (all but reason).
_COPIED: Final = tuple(c.name for c in evidence_heads.columns if c.name != "reason")
# Not contradicted: witnessed and recording it, or its entry not arrived yet.
NOT_CONTRADICTED: Final = sa.or_(evidence.c.in_log.is_(None), evidence.c.in_log.is_(True))


def reason_of_observed(observed: Any) -> str | None:
    """A bundle's ``observed.reason``, bounded; None when it says none."""
    reason = observed.get("reason") if isinstance(observed, Mapping) else None
    return reason[:MAX_REASON_CHARS] if isinstance(reason, str) and reason else None


def reason_of_envelope(envelope_json: str) -> str | None:
    """The reason of a stored bundle, from its signed envelope."""
    try:
        envelope = Envelope.from_wire(parse_json(envelope_json.encode()))
        payload: Any = parse_json(envelope.payload_bytes())
    except MalformedError:
        return None
    return reason_of_observed(payload.get("observed") if isinstance(payload, dict) else None)


def head_of(row: Mapping[Any, Any], reason: str | None) -> dict[str, Any]:
    """The head row for a stored evidence row (as inserted or selected)."""
    return {**{name: row[name] for name in _COPIED}, "reason": reason}


def advance(dialect: str, head: Mapping[str, Any]) -> sa.Executable:
    """The statement making ``head`` its pair's head unless a newer one is
    held: one atomic upsert, so two bundles of a pair stored at once
    cannot both win."""
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(evidence_heads)
    statement = insert.values(**head)
    held = sa.tuple_(*(evidence_heads.c[name] for name in _ORDER))
    offered = sa.tuple_(*(statement.excluded[name] for name in _ORDER))
    return statement.on_conflict_do_update(
        index_elements=[evidence_heads.c[name] for name in _KEY],
        set_={name: statement.excluded[name] for name in head if name not in _KEY},
        where=offered > held,
    )


def settle(
    connection: Connection, appliance_id: str, check_id: str, bundle_id: str, in_log: bool
) -> None:
    """A witnessed entry settled ``in_log`` of a stored bundle (already
    updated in ``evidence``): the head that is that bundle follows, and a
    contradicted head gives way to the pair's newest bundle still standing."""
    if in_log:
        connection.execute(
            sa.update(evidence_heads)
            .where(
                evidence_heads.c.appliance_id == appliance_id,
                evidence_heads.c.check_id == check_id,
                evidence_heads.c.bundle_id == bundle_id,
            )
            .values(in_log=True)
        )
        return
    gone = connection.execute(
        sa.delete(evidence_heads).where(
            evidence_heads.c.appliance_id == appliance_id,
            evidence_heads.c.check_id == check_id,
            evidence_heads.c.bundle_id == bundle_id,
        )
    ).rowcount
    if not gone:
        return
    standing = (
        connection.execute(
            sa.select(
                *(evidence.c[name] for name in _COPIED),
                evidence.c.envelope,
            )
            .where(
                evidence.c.appliance_id == appliance_id,
                evidence.c.check_id == check_id,
                NOT_CONTRADICTED,
            )
            .order_by(*(evidence.c[name].desc() for name in _ORDER))
            .limit(1)
        )
        .mappings()
        .first()
    )
    if standing is not None:
        connection.execute(
            advance(
                connection.dialect.name,
                head_of(standing, reason_of_envelope(standing["envelope"])),
            )
        )
