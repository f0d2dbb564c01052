"""Load version 1 of the compliance catalogue (data/frameworks-v1.json).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from msp_central.catalogue import Catalogue, load_catalogue

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

VERSION = 1


def catalogue_rows(catalogue: Catalogue) -> dict[str, list[dict[str, object]]]:
    return {
        "frameworks": [
            {
                "id": f.id,
                "name": f.name,
                "edition": f.edition,
                "position": n,
                "catalogue_version": catalogue.version,
            }
            for n, f in enumerate(catalogue.frameworks)
        ],
        "controls": [
            {"framework_id": f.id, "control_id": c.id, "title": c.title, "position": n}
            for f in catalogue.frameworks
            for n, c in enumerate(f.controls)
        ],
        "runbooks": [
            {
                "id": r.id,
                "title": r.title,
                "tier": r.tier.value,
                "check_name": r.check,
                "l1_action": r.l1_action,
                "description": r.description,
            }
            for r in catalogue.runbooks
        ],
        "control_runbook_mapping": [
            {"framework_id": m.framework, "control_id": m.control, "runbook_id": m.runbook}
            for m in catalogue.mappings
        ],
        "presets": [
            {
                "id": p.id,
                "name": p.name,
                "description": p.description,
                "tier": p.tier.value,
                "frameworks": list(p.frameworks),
                "position": n,
            }
            for n, p in enumerate(catalogue.presets)
        ],
    }


def upgrade() -> None:
    rows = catalogue_rows(load_catalogue(VERSION))
    metadata = sa.MetaData()
    for name, table_rows in rows.items():
        table = sa.Table(name, metadata, autoload_with=op.get_bind())
        op.bulk_insert(table, table_rows)


def downgrade() -> None:
    for name in ("control_runbook_mapping", "presets", "controls", "runbooks", "frameworks"):
        op.execute(sa.text(f"DELETE FROM {name}"))  # noqa: S608 - fixed table names
