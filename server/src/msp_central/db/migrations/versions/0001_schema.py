"""The initial schema: catalogue, partners, sites, appliances, certificates,
witnessed audit logs, evidence, escalations, alerts, config bundles.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_checkpoints",
        sa.Column("appliance_id", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root", sa.String(length=64), nullable=False),
        sa.Column("checkpoint", sa.Text(), nullable=False),
        sa.Column("receipt", sa.Text(), nullable=False),
        sa.Column("serial", sa.String(length=32), nullable=False),
        sa.Column("signed_after_expiry", sa.Boolean(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("appliance_id", "size", name=op.f("pk_audit_checkpoints")),
    )
    op.create_table(
        "audit_entries",
        sa.Column("appliance_id", sa.String(length=64), nullable=False),
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("appliance_id", "idx", name=op.f("pk_audit_entries")),
    )
    op.create_table(
        "config_bundles",
        sa.Column("site_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("version", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("site_id", "kind", "version", name=op.f("pk_config_bundles")),
    )
    op.create_table(
        "escalations",
        sa.Column("escalation_id", sa.String(length=64), nullable=False),
        sa.Column("appliance_id", sa.String(length=64), nullable=False),
        sa.Column("site_id", sa.String(length=64), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_by", sa.String(length=16), nullable=True),
        sa.PrimaryKeyConstraint("appliance_id", "escalation_id", name=op.f("pk_escalations")),
    )
    with op.batch_alter_table("escalations", schema=None) as batch_op:
        batch_op.create_index("ix_escalations_open", ["site_id", "acknowledged_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_escalations_site_id"), ["site_id"], unique=False)

    op.create_table(
        "evidence",
        sa.Column("bundle_id", sa.String(length=64), nullable=False),
        sa.Column("appliance_id", sa.String(length=64), nullable=False),
        sa.Column("site_id", sa.String(length=64), nullable=False),
        sa.Column("check_id", sa.String(length=64), nullable=False),
        sa.Column("result", sa.String(length=16), nullable=False),
        sa.Column("controls", sa.JSON(), nullable=False),
        sa.Column("collected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("log_index", sa.BigInteger(), nullable=False),
        sa.Column("payload_sha256", sa.String(length=64), nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.Column("serial", sa.String(length=32), nullable=False),
        sa.Column("signed_after_expiry", sa.Boolean(), nullable=False),
        sa.Column("in_log", sa.Boolean(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("appliance_id", "bundle_id", name=op.f("pk_evidence")),
    )
    with op.batch_alter_table("evidence", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_evidence_appliance_id"), ["appliance_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_evidence_site_id"), ["site_id"], unique=False)

    op.create_table(
        "frameworks",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("edition", sa.String(length=300), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("catalogue_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_frameworks")),
    )
    op.create_table(
        "partners",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("industry", sa.String(length=32), nullable=True),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("frameworks", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_partners")),
    )
    op.create_table(
        "presets",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("frameworks", sa.JSON(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_presets")),
    )
    op.create_table(
        "request_nonces",
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("nonce", sa.String(length=128), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key_id", "nonce", name=op.f("pk_request_nonces")),
    )
    with op.batch_alter_table("request_nonces", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_request_nonces_created"), ["created"], unique=False)

    op.create_table(
        "revocation_lists",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_revocation_lists")),
    )
    op.create_table(
        "runbooks",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("check_name", sa.String(length=64), nullable=False),
        sa.Column("l1_action", sa.String(length=64), nullable=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runbooks")),
    )
    op.create_table(
        "security_alerts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("appliance_id", sa.String(length=64), nullable=True),
        sa.Column("site_id", sa.String(length=64), nullable=True),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_security_alerts")),
    )
    with op.batch_alter_table("security_alerts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_security_alerts_appliance_id"), ["appliance_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_security_alerts_site_id"), ["site_id"], unique=False)

    op.create_table(
        "api_keys",
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("partner_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["partner_id"], ["partners.id"], name=op.f("fk_api_keys_partner_id_partners")
        ),
        sa.PrimaryKeyConstraint("key_sha256", name=op.f("pk_api_keys")),
    )
    op.create_table(
        "control_runbook_mapping",
        sa.Column("framework_id", sa.String(length=32), nullable=False),
        sa.Column("control_id", sa.String(length=64), nullable=False),
        sa.Column("runbook_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["runbook_id"],
            ["runbooks.id"],
            name=op.f("fk_control_runbook_mapping_runbook_id_runbooks"),
        ),
        sa.PrimaryKeyConstraint(
            "framework_id", "control_id", "runbook_id", name=op.f("pk_control_runbook_mapping")
        ),
    )
    op.create_table(
        "controls",
        sa.Column("framework_id", sa.String(length=32), nullable=False),
        sa.Column("control_id", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=300), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["framework_id"], ["frameworks.id"], name=op.f("fk_controls_framework_id_frameworks")
        ),
        sa.PrimaryKeyConstraint("framework_id", "control_id", name=op.f("pk_controls")),
    )
    op.create_table(
        "sites",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("partner_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("industry", sa.String(length=32), nullable=True),
        sa.Column("tier", sa.String(length=16), nullable=True),
        sa.Column("frameworks", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["partner_id"], ["partners.id"], name=op.f("fk_sites_partner_id_partners")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sites")),
    )
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sites_partner_id"), ["partner_id"], unique=False)

    op.create_table(
        "appliances",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("site_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("current_serial", sa.String(length=32), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["site_id"], ["sites.id"], name=op.f("fk_appliances_site_id_sites")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_appliances")),
    )
    with op.batch_alter_table("appliances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_appliances_site_id"), ["site_id"], unique=False)

    op.create_table(
        "enrollment_tokens",
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("site_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("appliance_id", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["site_id"], ["sites.id"], name=op.f("fk_enrollment_tokens_site_id_sites")
        ),
        sa.PrimaryKeyConstraint("token_sha256", name=op.f("pk_enrollment_tokens")),
    )
    op.create_table(
        "audit_logs",
        sa.Column("appliance_id", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("root", sa.String(length=64), nullable=False),
        sa.Column("nodes", sa.JSON(), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["appliance_id"], ["appliances.id"], name=op.f("fk_audit_logs_appliance_id_appliances")
        ),
        sa.PrimaryKeyConstraint("appliance_id", name=op.f("pk_audit_logs")),
    )
    op.create_table(
        "certificates",
        sa.Column("serial", sa.String(length=32), nullable=False),
        sa.Column("appliance_id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("subject_key", sa.String(length=64), nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("replaces", sa.String(length=32), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cutoff_size", sa.BigInteger(), nullable=True),
        sa.Column("revocation_reason", sa.String(length=256), nullable=True),
        sa.ForeignKeyConstraint(
            ["appliance_id"],
            ["appliances.id"],
            name=op.f("fk_certificates_appliance_id_appliances"),
        ),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_certificates")),
    )
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_certificates_appliance_id"), ["appliance_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_certificates_key_id"), ["key_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_certificates_key_id"))
        batch_op.drop_index(batch_op.f("ix_certificates_appliance_id"))

    op.drop_table("certificates")
    op.drop_table("audit_logs")
    op.drop_table("enrollment_tokens")
    with op.batch_alter_table("appliances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_appliances_site_id"))

    op.drop_table("appliances")
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sites_partner_id"))

    op.drop_table("sites")
    op.drop_table("controls")
    op.drop_table("control_runbook_mapping")
    op.drop_table("api_keys")
    with op.batch_alter_table("security_alerts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_security_alerts_site_id"))
        batch_op.drop_index(batch_op.f("ix_security_alerts_appliance_id"))

    op.drop_table("security_alerts")
    op.drop_table("runbooks")
    op.drop_table("revocation_lists")
    with op.batch_alter_table("request_nonces", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_request_nonces_created"))

    op.drop_table("request_nonces")
    op.drop_table("presets")
    op.drop_table("partners")
    op.drop_table("frameworks")
    with op.batch_alter_table("evidence", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evidence_site_id"))
        batch_op.drop_index(batch_op.f("ix_evidence_appliance_id"))

    op.drop_table("evidence")
    with op.batch_alter_table("escalations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_escalations_site_id"))
        batch_op.drop_index("ix_escalations_open")

    op.drop_table("escalations")
    op.drop_table("config_bundles")
    op.drop_table("audit_entries")
    op.drop_table("audit_checkpoints")
