"""The compliance catalogue: frameworks, controls, runbooks, the control →
runbook mapping, and industry presets.

It ships as ``data/frameworks-v<N>.json`` and reaches the database through a
migration (``0002`` loads version 1, ``0003`` moves it to version 2). A changed
catalogue is a new file and a new migration, never an edit of a file a
database was loaded from.
"""

from __future__ import annotations

import json
from enum import StrEnum
from importlib import resources
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator


class Tier(StrEnum):
    """Coverage tier: ``basic`` runs the compliance runbooks only, ``full``
    every OS runbook too."""

    BASIC = "basic"
    FULL = "full"


# The version the newest migration leaves in the database; the older files stay
# shipped because their migrations still load them (and downgrades restore them).
CURRENT_VERSION = 2

INDUSTRIES = (
    "healthcare",
    "finance",
    "technology",
    "defence",
    "government",
    "education",
    "retail",
    "legal",
)

Text = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=300)]
Slug = Annotated[str, StringConstraints(strict=True, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Control(_Strict):
    id: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=64)]
    title: Text


class Framework(_Strict):
    id: Annotated[str, StringConstraints(strict=True, pattern=r"^[a-z0-9][a-z0-9_]{0,31}$")]
    name: Text
    edition: Text
    controls: Annotated[tuple[Control, ...], Field(min_length=1)]


class Runbook(_Strict):
    id: Slug
    title: Text
    tier: Tier
    check: Slug
    l1_action: Slug | None
    description: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=1000)]


class Mapping(_Strict):
    framework: str
    control: str
    runbook: str


class Preset(_Strict):
    id: Slug
    name: Text
    description: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=1000)]
    frameworks: Annotated[tuple[str, ...], Field(min_length=1)]
    tier: Tier


class Catalogue(_Strict):
    version: Annotated[int, Field(ge=1)]
    frameworks: tuple[Framework, ...]
    runbooks: tuple[Runbook, ...]
    mappings: tuple[Mapping, ...]
    presets: tuple[Preset, ...]

    @model_validator(mode="after")
    def _references(self) -> Self:
        framework_ids = [f.id for f in self.frameworks]
        if len(set(framework_ids)) != len(framework_ids):
            raise ValueError("a framework id is listed twice")
        controls = {(f.id, c.id) for f in self.frameworks for c in f.controls}
        if len(controls) != sum(len(f.controls) for f in self.frameworks):
            raise ValueError("a control id is listed twice in one framework")
        runbook_ids = {r.id for r in self.runbooks}
        if len(runbook_ids) != len(self.runbooks):
            raise ValueError("a runbook id is listed twice")
        seen: set[tuple[str, str, str]] = set()
        for m in self.mappings:
            if (m.framework, m.control) not in controls:
                raise ValueError(f"mapping names unknown control {m.framework} {m.control}")
            if m.runbook not in runbook_ids:
                raise ValueError(f"mapping names unknown runbook {m.runbook}")
            key = (m.framework, m.control, m.runbook)
            if key in seen:
                raise ValueError(f"mapping {key} is listed twice")
            seen.add(key)
        for preset in self.presets:
            unknown = set(preset.frameworks) - set(framework_ids)
            if unknown:
                raise ValueError(f"preset {preset.id} names unknown framework {sorted(unknown)[0]}")
        if sorted(p.id for p in self.presets) != sorted(INDUSTRIES):
            raise ValueError(f"presets must be exactly {', '.join(INDUSTRIES)}")
        return self


def load_catalogue(version: int) -> Catalogue:
    """The catalogue file shipped for ``version``, validated."""
    text = (
        resources.files("msp_central")
        .joinpath("data", f"frameworks-v{version}.json")
        .read_text(encoding="utf-8")
    )
    return Catalogue.model_validate(json.loads(text))
