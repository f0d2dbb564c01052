"""The central server's own audit log, manual evidence, and the indexes
compliance posture and auditor packages read evidence by.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "central_log_entries",
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("partner_id", sa.String(length=64), nullable=True),
        sa.Column("site_id", sa.String(length=64), nullable=True),
        sa.Column("leaf_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("idx", name=op.f("pk_central_log_entries")),
    )
    op.create_index(
        op.f("ix_central_log_entries_partner_id"), "central_log_entries", ["partner_id"]
    )
    op.create_index(op.f("ix_central_log_entries_site_id"), "central_log_entries", ["site_id"])
    op.create_table(
        "central_log_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("nodes", sa.JSON(), nullable=False),
        sa.Column("checkpoint", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_central_log_head")),
    )
    op.create_table(
        "manual_evidence",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("site_id", sa.String(length=64), nullable=False),
        sa.Column("framework_id", sa.String(length=32), nullable=False),
        sa.Column("control_id", sa.String(length=64), nullable=False),
        sa.Column("filename", sa.String(length=200), nullable=False),
        sa.Column("media_type", sa.String(length=100), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("attached_by", sa.String(length=128), nullable=False),
        sa.Column("attached_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("log_index", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["site_id"], ["sites.id"], name=op.f("fk_manual_evidence_site_id_sites")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_manual_evidence")),
    )
    op.create_index(op.f("ix_manual_evidence_site_id"), "manual_evidence", ["site_id"])
    op.create_index(
        "ix_evidence_newest", "evidence", ["site_id", "appliance_id", "check_id", "collected_at"]
    )
    op.create_index("ix_evidence_by_time", "evidence", ["site_id", "collected_at"])


def downgrade() -> None:
    op.drop_index("ix_evidence_by_time", table_name="evidence")
    op.drop_index("ix_evidence_newest", table_name="evidence")
    op.drop_index(op.f("ix_manual_evidence_site_id"), table_name="manual_evidence")
    op.drop_table("manual_evidence")
    op.drop_table("central_log_head")
    op.drop_index(op.f("ix_central_log_entries_site_id"), table_name="central_log_entries")
    op.drop_index(op.f("ix_central_log_entries_partner_id"), table_name="central_log_entries")
    op.drop_table("central_log_entries")
