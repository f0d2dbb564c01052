"""The central server's own audit log.

Storage: ``central_log_entries`` holds each entry's exact canonical bytes and
leaf hash by index, with the partner and site the action concerned;
``central_log_head`` (one row) holds the size, the compact range and the
latest checkpoint, signed by the root key. Entry 0 is ``central.genesis``
naming the root key.

Promise: :func:`record` appends in the caller's transaction, so an action
and its entry commit together or not at all, and a reader never sees an
action without its entry. Writers lock the head row first (``FOR UPDATE`` on
PostgreSQL; SQLite's writers are already serialised by ``BEGIN
IMMEDIATE``), so the log grows one commit at a time across replicas.

What is recorded: settings changes, site creation, renaming and
decommissioning, enrollment tokens, API keys (ids and prefixes, never
secrets), certificate revocations, appliance decommissioning,
acknowledgements and manual evidence, each with who acted
(:func:`actor_of`). Auditors verify the whole log
(:func:`central_log_export`, administrators only: it holds every partner's
actions) or one entry with its inclusion proof (:func:`record_proof`, for the
partner whose entry it is).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central.api_models import RevokeOut
from msp_central.auth import KeyHolder
from msp_central.db.tables import appliances, central_log_entries, central_log_head, sites
from msp_central.problems import Problem
from msp_protocol.central_log import (
    build_central_log_export,
    build_central_record_proof,
    central_genesis_entry,
    make_central_checkpoint,
)
from msp_protocol.dsse import Envelope
from msp_protocol.keys import SigningKey
from msp_protocol.log import EntryRecord, make_entry
from msp_protocol.merkle import LeafHashTree, TreeState, inclusion_proof

HEAD_ID: Final = 1
CLI_ACTOR: Final = "cli"


def user_actor(partner_id: str, user_id: str) -> str:
    """A partner's console user, as entries name them."""
    return f"partner:{partner_id}/user:{user_id}"


def actor_of(holder: KeyHolder) -> str:
    """Who acted, as entries name them: the key's role, partner and prefix
    (the prefix names the key without being usable), or the partner's
    console user."""
    if holder.role == "admin":
        return f"admin/key:{holder.key_prefix}"
    if holder.user_id is not None:
        return user_actor(str(holder.partner_id), holder.user_id)
    return f"partner:{holder.partner_id}/key:{holder.key_prefix}"


async def _locked_head(connection: AsyncConnection, now: datetime) -> Any:
    values = {"id": HEAD_ID, "size": 0, "nodes": [], "checkpoint": None, "updated_at": now}
    insert = (
        postgresql.insert(central_log_head)
        if connection.dialect.name == "postgresql"
        else sqlite.insert(central_log_head)
    )
    await connection.execute(insert.values(**values).on_conflict_do_nothing())
    return (
        await connection.execute(
            sa.select(central_log_head).where(central_log_head.c.id == HEAD_ID).with_for_update()
        )
    ).one()


async def record(
    connection: AsyncConnection,
    root: SigningKey,
    *,
    kind: str,
    actor: str,
    data: dict[str, Any],
    now: datetime,
    partner_id: str | None = None,
    site_id: str | None = None,
) -> int:
    """Append one entry (the genesis first, on an empty log) and sign a new
    checkpoint, in the caller's transaction; returns the entry's index."""
    head = await _locked_head(connection, now)
    # Times never run backwards along the log, whoever waited for the lock.
    now = max(now, head.updated_at)
    state = TreeState(int(head.size), [bytes.fromhex(node) for node in head.nodes])
    rows: list[dict[str, Any]] = []

    def add(entry: EntryRecord, kind: str, partner: str | None, site: str | None) -> None:
        rows.append(
            {
                "idx": state.size,
                "kind": kind,
                "partner_id": partner,
                "site_id": site,
                "leaf_hash": entry.leaf_hash,
                "raw": entry.raw,
            }
        )
        state.append(entry.leaf_hash)

    if state.size == 0:
        add(central_genesis_entry(root.verify_key, now), "central.genesis", None, None)
    index = state.size
    add(make_entry(index, now, kind, actor, data), kind, partner_id, site_id)
    checkpoint = make_central_checkpoint(root, state, now)
    await connection.execute(sa.insert(central_log_entries), rows)
    await connection.execute(
        sa.update(central_log_head)
        .where(central_log_head.c.id == HEAD_ID)
        .values(
            size=state.size,
            nodes=[node.hex() for node in state.nodes],
            checkpoint=checkpoint.to_json().decode(),
            updated_at=now,
        )
    )
    return index


async def record_revocation(
    connection: AsyncConnection,
    root: SigningKey,
    revoked: RevokeOut,
    reason: str,
    actor: str,
    now: datetime,
) -> None:
    """Record a revocation (from the API or the CLI) under the appliance's site."""
    site_id = (
        await connection.execute(
            sa.select(appliances.c.site_id).where(appliances.c.id == revoked.appliance_id)
        )
    ).scalar_one()
    partner_id = (
        await connection.execute(sa.select(sites.c.partner_id).where(sites.c.id == site_id))
    ).scalar_one()
    await record(
        connection,
        root,
        kind="certificate.revoked",
        actor=actor,
        data={
            "appliance_id": revoked.appliance_id,
            "serials": list(revoked.revoked_serials),
            "cutoff_size": revoked.cutoff_size,
            "reason": reason,
            "revocation_list_version": revoked.revocation_list_version,
        },
        now=now,
        partner_id=partner_id,
        site_id=site_id,
    )


async def _head(connection: AsyncConnection) -> tuple[int, Envelope] | None:
    row = (
        await connection.execute(
            sa.select(central_log_head).where(central_log_head.c.id == HEAD_ID)
        )
    ).first()
    if row is None or row.checkpoint is None:
        return None
    return int(row.size), Envelope.from_json(row.checkpoint.encode())


async def central_log_export(connection: AsyncConnection, now: datetime) -> bytes:
    """The whole log with its latest checkpoint, for ``msp-verify``."""
    head = await _head(connection)
    if head is None:
        raise Problem("not-found", "the central log is empty: nothing has been recorded yet")
    size, checkpoint = head
    rows = await connection.execute(
        sa.select(central_log_entries.c.raw)
        .where(central_log_entries.c.idx < size)
        .order_by(central_log_entries.c.idx)
    )
    return build_central_log_export(
        exported_at=now, entries=[bytes(row.raw) for row in rows], checkpoint=checkpoint
    )


async def record_proof(connection: AsyncConnection, index: int) -> bytes:
    """One entry, its inclusion proof in the tree of the latest checkpoint's
    size, and that checkpoint: what shows the entry is in the log for good."""
    head = await _head(connection)
    if head is None or index >= head[0]:
        raise Problem("not-found", f"no central log entry {index}")
    size, checkpoint = head
    leaves = await connection.execute(
        sa.select(central_log_entries.c.leaf_hash)
        .where(central_log_entries.c.idx < size)
        .order_by(central_log_entries.c.idx)
    )
    tree = LeafHashTree([bytes(row.leaf_hash) for row in leaves])
    raw = (
        await connection.execute(
            sa.select(central_log_entries.c.raw).where(central_log_entries.c.idx == index)
        )
    ).scalar_one()
    return build_central_record_proof(
        entry=bytes(raw), inclusion=inclusion_proof(index, size, tree), checkpoint=checkpoint
    )
