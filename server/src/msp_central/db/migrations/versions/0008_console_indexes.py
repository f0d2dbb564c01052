"""Indexes the partner console's pages need at a real partner's volume
(a thousand sites, a million evidence bundles).

``ix_evidence_latest`` holds every column posture ranks a site's bundles
on (the newest of each appliance and check, by log position, not
contradicted by its log entry): the ranking reads the index alone, and the
table only for the winners.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

LATEST = [
    "site_id",
    "appliance_id",
    "check_id",
    "log_generation",
    "log_index",
    "bundle_id",
    "in_log",
]


def upgrade() -> None:
    op.create_index("ix_evidence_latest", "evidence", LATEST, unique=False)


def downgrade() -> None:
    op.drop_index("ix_evidence_latest", table_name="evidence")
