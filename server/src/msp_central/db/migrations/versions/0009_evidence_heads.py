"""The head of each (appliance, check) pair, kept as a row: posture read a
partner's million bundles on every request to find the newest of each pair
(seconds at a real partner's volume); it now reads the heads, which
evidence ingest keeps (``msp_central.evidence_heads``).

The upgrade fills the table from the stored evidence with the rule posture
ranked by: per pair, the newest bundle by log generation, log index and
bundle id, among those its witnessed log entry does not contradict; each
head's reason comes from its signed envelope. It works a site at a time, so
a large database is never ranked in one statement.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import base64
import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

MAX_REASON_CHARS = 500
COPIED = (
    "appliance_id",
    "check_id",
    "site_id",
    "bundle_id",
    "result",
    "controls",
    "collected_at",
    "log_generation",
    "log_index",
    "signed_after_expiry",
    "in_log",
)


def upgrade() -> None:
    heads = op.create_table(
        "evidence_heads",
        sa.Column("appliance_id", sa.String(length=64), nullable=False),
        sa.Column("check_id", sa.String(length=64), nullable=False),
        sa.Column("site_id", sa.String(length=64), nullable=False),
        sa.Column("bundle_id", sa.String(length=64), nullable=False),
        sa.Column("result", sa.String(length=16), nullable=False),
        sa.Column("controls", sa.JSON(), nullable=False),
        sa.Column("collected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("log_generation", sa.Integer(), nullable=False),
        sa.Column("log_index", sa.BigInteger(), nullable=False),
        sa.Column("signed_after_expiry", sa.Boolean(), nullable=False),
        sa.Column("in_log", sa.Boolean(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("appliance_id", "check_id", name=op.f("pk_evidence_heads")),
    )
    assert heads is not None
    op.create_index(op.f("ix_evidence_heads_site_id"), "evidence_heads", ["site_id"])
    _fill(op.get_bind(), heads)


def _fill(connection: sa.Connection, heads: sa.Table) -> None:
    evidence = sa.table(
        "evidence",
        *(sa.column(name) for name in (*COPIED, "envelope")),
    )
    site_ids = connection.execute(sa.select(evidence.c.site_id).distinct()).scalars().all()
    for site_id in site_ids:
        newest = sa.func.row_number().over(
            partition_by=(evidence.c.appliance_id, evidence.c.check_id),
            order_by=(
                evidence.c.log_generation.desc(),
                evidence.c.log_index.desc(),
                evidence.c.bundle_id.desc(),
            ),
        )
        ranked = (
            sa.select(*(evidence.c[name] for name in COPIED), newest.label("newest"))
            .where(
                evidence.c.site_id == site_id,
                sa.or_(evidence.c.in_log.is_(None), evidence.c.in_log.is_(True)),
            )
            .subquery()
        )
        connection.execute(
            sa.insert(heads).from_select(
                list(COPIED),
                sa.select(*(ranked.c[name] for name in COPIED)).where(ranked.c.newest == 1),
            )
        )
        reasons = connection.execute(
            sa.select(evidence.c.appliance_id, evidence.c.check_id, evidence.c.envelope)
            .join_from(
                evidence,
                heads,
                sa.and_(
                    evidence.c.appliance_id == heads.c.appliance_id,
                    evidence.c.bundle_id == heads.c.bundle_id,
                ),
            )
            .where(heads.c.site_id == site_id)
        ).all()
        for appliance_id, check_id, envelope in reasons:
            reason = _reason(envelope)
            if reason is not None:
                connection.execute(
                    sa.update(heads)
                    .where(heads.c.appliance_id == appliance_id, heads.c.check_id == check_id)
                    .values(reason=reason)
                )


def _reason(envelope: Any) -> str | None:
    """The signed bundle's ``observed.reason``, bounded (the DSSE payload is
    base64 of the bundle's canonical JSON; the URL-safe alphabet and
    missing padding are accepted as the envelope parser accepts them)."""
    try:
        text = json.loads(envelope)["payload"]
        padded = text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4)
        payload = json.loads(base64.b64decode(padded, validate=True))
        reason = payload["observed"]["reason"]
    except (ValueError, KeyError, TypeError):
        return None
    return reason[:MAX_REASON_CHARS] if isinstance(reason, str) and reason else None


def downgrade() -> None:
    op.drop_index(op.f("ix_evidence_heads_site_id"), table_name="evidence_heads")
    op.drop_table("evidence_heads")
