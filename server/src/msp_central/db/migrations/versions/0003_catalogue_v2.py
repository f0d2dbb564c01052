"""Move the compliance catalogue from version 1 to version 2
(data/frameworks-v2.json): every control of each framework's edition, in
place of the few that version 1 listed.

Appliances and sites already hold version 1 ids, so the move is made in place:
rows whose key both versions share are updated, rows only the target version
has are inserted, and rows only the source version has are deleted (upgrade
deletes nothing, as version 2 keeps every id of version 1). Downgrade runs the
same move backwards and leaves exactly version 1.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from msp_central.catalogue import Catalogue, load_catalogue

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

FROM_VERSION = 1
TO_VERSION = 2

# Primary key of each catalogue table, in an order where a table comes after
# the tables its rows point to: inserts run in this order, deletes reversed.
KEYS: dict[str, tuple[str, ...]] = {
    "frameworks": ("id",),
    "runbooks": ("id",),
    "controls": ("framework_id", "control_id"),
    "control_runbook_mapping": ("framework_id", "control_id", "runbook_id"),
    "presets": ("id",),
}


def catalogue_rows(catalogue: Catalogue) -> dict[str, list[dict[str, object]]]:
    """The rows of each catalogue table for ``catalogue``. A copy of 0002's,
    so that this migration keeps meaning what it meant when later code
    changes."""
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
        "controls": [
            {"framework_id": f.id, "control_id": c.id, "title": c.title, "position": n}
            for f in catalogue.frameworks
            for n, c in enumerate(f.controls)
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


def move(source: Catalogue, target: Catalogue) -> None:
    """Turn the catalogue rows of ``source`` into those of ``target``."""
    bind = op.get_bind()
    metadata = sa.MetaData()
    tables = {name: sa.Table(name, metadata, autoload_with=bind) for name in KEYS}
    before = catalogue_rows(source)
    after = catalogue_rows(target)

    def keyed(
        name: str, rows: list[dict[str, object]]
    ) -> dict[tuple[object, ...], dict[str, object]]:
        return {tuple(row[k] for k in KEYS[name]): row for row in rows}

    for name in reversed(KEYS):
        table = tables[name]
        gone = keyed(name, before[name]).keys() - keyed(name, after[name]).keys()
        for key in sorted(gone, key=repr):
            bind.execute(
                sa.delete(table).where(
                    *(table.c[k] == v for k, v in zip(KEYS[name], key, strict=True))
                )
            )
    for name, columns in KEYS.items():
        table = tables[name]
        old = keyed(name, before[name])
        new = keyed(name, after[name])
        for key, row in new.items():
            if key not in old:
                continue
            changed = {k: v for k, v in row.items() if old[key].get(k) != v}
            if changed:
                bind.execute(
                    sa.update(table)
                    .where(*(table.c[k] == v for k, v in zip(columns, key, strict=True)))
                    .values(changed)
                )
        added = [row for key, row in new.items() if key not in old]
        if added:
            op.bulk_insert(table, added)


def upgrade() -> None:
    move(load_catalogue(FROM_VERSION), load_catalogue(TO_VERSION))


def downgrade() -> None:
    move(load_catalogue(TO_VERSION), load_catalogue(FROM_VERSION))
