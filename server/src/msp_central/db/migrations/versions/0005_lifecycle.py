"""Lifecycle and day-to-day operation: named API keys and enrollment tokens
that can be listed and revoked, decommissioned sites and appliances, notes
on acknowledgements, generations of an appliance's audit log, and the
indexes paginated lists read by.

Keys and tokens created before this revision get an id derived from their
stored hash (the hash of a 256-bit secret: nothing to learn from it).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("id", sa.String(length=64), nullable=True))
    op.add_column(
        "api_keys", sa.Column("name", sa.String(length=200), nullable=False, server_default="")
    )
    op.add_column("api_keys", sa.Column("created_by", sa.String(length=128), nullable=True))
    op.execute("UPDATE api_keys SET id = 'key-' || substr(key_sha256, 1, 16)")
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("id", existing_type=sa.String(length=64), nullable=False)
        batch.create_unique_constraint(op.f("uq_api_keys_id"), ["id"])

    op.add_column("enrollment_tokens", sa.Column("id", sa.String(length=64), nullable=True))
    op.add_column(
        "enrollment_tokens", sa.Column("created_by", sa.String(length=128), nullable=True)
    )
    op.add_column(
        "enrollment_tokens", sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.execute("UPDATE enrollment_tokens SET id = 'tok-' || substr(token_sha256, 1, 16)")
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.alter_column("id", existing_type=sa.String(length=64), nullable=False)
        batch.create_unique_constraint(op.f("uq_enrollment_tokens_id"), ["id"])
    op.create_index(op.f("ix_enrollment_tokens_site_id"), "enrollment_tokens", ["site_id"])

    op.add_column(
        "sites", sa.Column("decommissioned_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "appliances", sa.Column("decommissioned_at", sa.DateTime(timezone=True), nullable=True)
    )

    with op.batch_alter_table("escalations") as batch:
        batch.alter_column(
            "acknowledged_by",
            existing_type=sa.String(length=16),
            type_=sa.String(length=128),
            existing_nullable=True,
        )
        batch.add_column(sa.Column("acknowledged_note", sa.Text(), nullable=True))

    op.add_column(
        "audit_logs", sa.Column("generation", sa.Integer(), nullable=False, server_default="1")
    )
    op.add_column(
        "evidence", sa.Column("log_generation", sa.Integer(), nullable=False, server_default="1")
    )
    for table, last in (("audit_entries", "idx"), ("audit_checkpoints", "size")):
        op.add_column(
            table, sa.Column("generation", sa.Integer(), nullable=False, server_default="1")
        )
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"pk_{table}", type_="primary")
            batch.create_primary_key(f"pk_{table}", ["appliance_id", "generation", last])

    op.create_table(
        "audit_log_generations",
        sa.Column("appliance_id", sa.String(length=64), nullable=False),
        sa.Column("generation", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("approved_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("approved_by", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("previous_size", sa.BigInteger(), nullable=False),
        sa.Column("previous_root", sa.String(length=64), nullable=False),
        sa.Column("central_log_index", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["appliance_id"],
            ["appliances.id"],
            name=op.f("fk_audit_log_generations_appliance_id_appliances"),
        ),
        sa.PrimaryKeyConstraint(
            "appliance_id", "generation", name=op.f("pk_audit_log_generations")
        ),
    )
    op.create_index("ix_evidence_received", "evidence", ["site_id", "received_at"])
    op.create_index("ix_escalations_received", "escalations", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_escalations_received", table_name="escalations")
    op.drop_index("ix_evidence_received", table_name="evidence")
    op.drop_table("audit_log_generations")
    for table, last in (("audit_entries", "idx"), ("audit_checkpoints", "size")):
        # Later generations cannot live under the old key: only the first stays.
        op.execute(f"DELETE FROM {table} WHERE generation <> 1")  # noqa: S608 (a constant)
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"pk_{table}", type_="primary")
            batch.create_primary_key(f"pk_{table}", ["appliance_id", last])
            batch.drop_column("generation")
    with op.batch_alter_table("evidence") as batch:
        batch.drop_column("log_generation")
    with op.batch_alter_table("audit_logs") as batch:
        batch.drop_column("generation")
    op.execute("UPDATE escalations SET acknowledged_by = substr(acknowledged_by, 1, 16)")
    with op.batch_alter_table("escalations") as batch:
        batch.drop_column("acknowledged_note")
        batch.alter_column(
            "acknowledged_by",
            existing_type=sa.String(length=128),
            type_=sa.String(length=16),
            existing_nullable=True,
        )
    # Not a batch: rebuilding a table other tables refer to breaks their keys.
    op.drop_column("appliances", "decommissioned_at")
    op.drop_column("sites", "decommissioned_at")
    op.drop_index(op.f("ix_enrollment_tokens_site_id"), table_name="enrollment_tokens")
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.drop_constraint(op.f("uq_enrollment_tokens_id"), type_="unique")
        batch.drop_column("revoked_at")
        batch.drop_column("created_by")
        batch.drop_column("id")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_constraint(op.f("uq_api_keys_id"), type_="unique")
        batch.drop_column("created_by")
        batch.drop_column("name")
        batch.drop_column("id")
