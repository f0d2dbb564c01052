"""Exports an auditor verifies offline with nothing but the central public
key, built from what the server witnessed (the formats and their checkers
live in :mod:`msp_protocol.export`):

- the *evidence export* of one bundle: its signed envelope exactly as the
  appliance signed it, the certificate it was signed under and, once its
  audit entry is witnessed, the entry, an inclusion proof into the first
  checkpoint the server cosigned after it, that checkpoint and the receipt;
- the *audit export* of an appliance's log as the server witnessed it: every
  entry's exact bytes, the checkpoints that matter (the last one of each
  certificate, every one flagged as signed after expiry, the latest), their
  receipts, the appliance's certificates, the revocation list and every
  bundle recorded in the witnessed log.

An appliance's log has generations (a new log a partner approved after the
old one was lost, ADR 0016): every read names one. A bundle is proven in
the generation that recorded it; the audit export is of one generation,
the current one unless asked otherwise.

Nothing is re-encoded: entries, envelopes and receipts leave as stored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central.db.tables import (
    audit_checkpoints,
    audit_entries,
    audit_log_generations,
    audit_logs,
    certificates,
    evidence,
    revocation_lists,
)
from msp_central.problems import Problem
from msp_protocol.dsse import Envelope
from msp_protocol.export import build_audit_export, build_evidence_export
from msp_protocol.merkle import LeafHashTree, inclusion_proof

Row = sa.Row[Any]


def envelope_of(text: str) -> Envelope:
    """A stored envelope (it was verified on the way in)."""
    return Envelope.from_json(text.encode())


def of_generation(
    table: sa.Table, appliance_id: str, generation: int | None
) -> sa.ColumnElement[bool]:
    """Rows of ``table`` (entries or checkpoints) of one generation of the
    appliance's log; None: the generation being witnessed now."""
    chosen: Any = (
        generation
        if generation is not None
        else sa.select(audit_logs.c.generation)
        .where(audit_logs.c.appliance_id == appliance_id)
        .scalar_subquery()
    )
    return sa.and_(table.c.appliance_id == appliance_id, table.c.generation == chosen)


async def leaf_hashes(
    connection: AsyncConnection, appliance_id: str, size: int, *, generation: int | None = None
) -> list[bytes]:
    """The leaf hashes of entries 0 .. size-1 of an appliance's witnessed
    log of ``generation`` (default: the current one)."""
    rows = await connection.execute(
        sa.select(audit_entries.c.leaf_hash)
        .where(of_generation(audit_entries, appliance_id, generation), audit_entries.c.idx < size)
        .order_by(audit_entries.c.idx)
    )
    return [bytes(row.leaf_hash) for row in rows]


async def entry_bytes(
    connection: AsyncConnection,
    appliance_id: str,
    start: int,
    end: int,
    *,
    generation: int | None = None,
) -> list[bytes]:
    """The exact canonical bytes of entries start .. end-1 (of ``generation``,
    default the current one)."""
    rows = await connection.execute(
        sa.select(audit_entries.c.raw)
        .where(
            of_generation(audit_entries, appliance_id, generation),
            audit_entries.c.idx >= start,
            audit_entries.c.idx < end,
        )
        .order_by(audit_entries.c.idx)
    )
    return [bytes(row.raw) for row in rows]


async def certificate_rows(connection: AsyncConnection, appliance_id: str) -> dict[str, Row]:
    """An appliance's certificates by serial, in issue order."""
    rows = (
        await connection.execute(
            sa.select(certificates)
            .where(certificates.c.appliance_id == appliance_id)
            .order_by(certificates.c.issued_at, certificates.c.serial)
        )
    ).all()
    return {row.serial: row for row in rows}


async def latest_revocations(connection: AsyncConnection) -> Envelope | None:
    text = (
        await connection.execute(
            sa.select(revocation_lists.c.envelope)
            .order_by(revocation_lists.c.version.desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    return envelope_of(text) if text is not None else None


async def evidence_export(
    connection: AsyncConnection, *, site_id: str, appliance_id: str, bundle_id: str
) -> bytes:
    """One bundle's evidence export; raises ``not-found`` for a bundle of
    another site (the caller checked the site is the partner's)."""
    row = (
        await connection.execute(
            sa.select(evidence).where(
                evidence.c.site_id == site_id,
                evidence.c.appliance_id == appliance_id,
                evidence.c.bundle_id == bundle_id,
            )
        )
    ).first()
    if row is None:
        raise Problem("not-found", f"no evidence bundle {bundle_id[:64]}")
    held = await certificate_rows(connection, appliance_id)
    signer = held[row.serial]
    parts: dict[str, Any] = {}
    if row.in_log:
        # The first checkpoint the server cosigned that covers the bundle's
        # entry, in the generation of the log that recorded it: the
        # smallest tree to prove inclusion in.
        generation = int(row.log_generation)
        checkpoint = (
            await connection.execute(
                sa.select(audit_checkpoints)
                .where(
                    of_generation(audit_checkpoints, appliance_id, generation),
                    audit_checkpoints.c.size > row.log_index,
                )
                .order_by(audit_checkpoints.c.size)
                .limit(1)
            )
        ).first()
        if checkpoint is not None:
            size = int(checkpoint.size)
            tree = LeafHashTree(
                await leaf_hashes(connection, appliance_id, size, generation=generation)
            )
            (entry,) = await entry_bytes(
                connection, appliance_id, row.log_index, row.log_index + 1, generation=generation
            )
            other = held[checkpoint.serial]
            parts = {
                "entry": entry,
                "inclusion": inclusion_proof(int(row.log_index), size, tree),
                "checkpoint": envelope_of(checkpoint.checkpoint),
                "receipt": envelope_of(checkpoint.receipt),
                "checkpoint_certificate": (
                    envelope_of(other.envelope) if other.key_id != signer.key_id else None
                ),
            }
    return build_evidence_export(
        evidence=envelope_of(row.envelope), certificate=envelope_of(signer.envelope), **parts
    )


async def witnessed_size(connection: AsyncConnection, appliance_id: str) -> int:
    """The size witnessed of the appliance's current log."""
    size = (
        await connection.execute(
            sa.select(audit_logs.c.size).where(audit_logs.c.appliance_id == appliance_id)
        )
    ).scalar_one_or_none()
    return int(size or 0)


async def generation_size(
    connection: AsyncConnection, appliance_id: str, generation: int | None
) -> tuple[int, int]:
    """(generation, witnessed size) of one generation of the appliance's log
    (None: the current one); a closed generation ends where the approval
    of the next found it. Raises ``not-found`` for a generation not begun."""
    log = (
        await connection.execute(
            sa.select(audit_logs.c.generation, audit_logs.c.size).where(
                audit_logs.c.appliance_id == appliance_id
            )
        )
    ).first()
    current = int(log.generation) if log is not None else 1
    if generation is None or generation == current:
        return current, int(log.size) if log is not None else 0
    closed = (
        await connection.execute(
            sa.select(audit_log_generations.c.previous_size).where(
                audit_log_generations.c.appliance_id == appliance_id,
                audit_log_generations.c.generation == generation + 1,
            )
        )
    ).scalar_one_or_none()
    if generation > current or closed is None:
        raise Problem(
            "not-found", f"appliance {appliance_id[:64]} has no audit log generation {generation}"
        )
    return generation, int(closed)


async def telling_checkpoints(
    connection: AsyncConnection, appliance_id: str, size: int, *, generation: int | None = None
) -> list[Row]:
    """The checkpoints (with receipts) an export carries, ascending: the
    last one each certificate signed, every one flagged as signed after its
    certificate expired, and the one at ``size``. Any one of them proves the
    entries before it; the others show where each key's signing ended and
    what is under review (all of ``generation``, default the current one)."""
    mine = of_generation(audit_checkpoints, appliance_id, generation)
    last_per_serial = (
        sa.select(sa.func.max(audit_checkpoints.c.size))
        .where(mine)
        .group_by(audit_checkpoints.c.serial)
    )
    rows = (
        await connection.execute(
            sa.select(audit_checkpoints)
            .where(
                mine,
                audit_checkpoints.c.size <= size,
                sa.or_(
                    audit_checkpoints.c.size == size,
                    audit_checkpoints.c.signed_after_expiry.is_(True),
                    audit_checkpoints.c.size.in_(last_per_serial),
                ),
            )
            .order_by(audit_checkpoints.c.size)
        )
    ).all()
    return list(rows)


async def audit_export(
    connection: AsyncConnection,
    appliance_id: str,
    now: datetime,
    *,
    generation: int | None = None,
) -> bytes:
    """The appliance's log of ``generation`` (default: the current one) as
    the server witnessed it, in the format of ``msp-agent audit export``;
    raises ``not-found`` when nothing of it is witnessed."""
    generation, size = await generation_size(connection, appliance_id, generation)
    if size == 0:
        raise Problem(
            "not-found",
            f"appliance {appliance_id[:64]} has synced no audit log of generation {generation}",
        )
    checkpoints = await telling_checkpoints(connection, appliance_id, size, generation=generation)
    held = await certificate_rows(connection, appliance_id)
    bundles = (
        await connection.execute(
            sa.select(evidence.c.envelope)
            .where(
                evidence.c.appliance_id == appliance_id,
                evidence.c.log_generation == generation,
                evidence.c.in_log.is_(True),
                evidence.c.log_index < size,
            )
            .order_by(evidence.c.log_index)
        )
    ).all()
    return build_audit_export(
        appliance_id=appliance_id,
        exported_at=now,
        entries=await entry_bytes(connection, appliance_id, 0, size, generation=generation),
        checkpoints=[envelope_of(row.checkpoint) for row in checkpoints],
        certificates=[envelope_of(row.envelope) for row in held.values()],
        receipts=[envelope_of(row.receipt) for row in checkpoints],
        # The list names every partner's revoked serials: only when it
        # concerns this appliance does it go out (and then it must).
        revocations=(
            await latest_revocations(connection)
            if any(row.revoked_at is not None for row in held.values())
            else None
        ),
        evidence=[envelope_of(row.envelope) for row in bundles],
    )


__all__ = [
    "audit_export",
    "certificate_rows",
    "entry_bytes",
    "envelope_of",
    "evidence_export",
    "generation_size",
    "latest_revocations",
    "leaf_hashes",
    "of_generation",
    "telling_checkpoints",
    "witnessed_size",
]
