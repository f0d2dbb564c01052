"""The compliance catalogue: the shipped file, the model that guards it, and
the read-only API that serves it."""

from __future__ import annotations

import copy
import json
import re
import typing
from collections import defaultdict
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from msp_central.api_models import Industry
from msp_central.catalogue import CURRENT_VERSION, INDUSTRIES, Catalogue, Tier, load_catalogue
from tests.central.support import Harness, call

FRAMEWORK_IDS = (
    "hipaa",
    "soc2",
    "pci_dss",
    "nist_csf",
    "nist_800_171",
    "sox",
    "gdpr",
    "cmmc",
    "iso_27001",
    "cis",
)


def raw_catalogue(version: int = CURRENT_VERSION) -> dict[str, Any]:
    """A shipped file as plain JSON (a fresh copy each call)."""
    text = (
        resources.files("msp_central")
        .joinpath("data", f"frameworks-v{version}.json")
        .read_text(encoding="utf-8")
    )
    value: dict[str, Any] = json.loads(text)
    return value


def mapped(raw: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    result: dict[tuple[str, str], list[str]] = defaultdict(list)
    for m in raw["mappings"]:
        result[(m["framework"], m["control"])].append(m["runbook"])
    return result


# --- the shipped file --------------------------------------------------------------


@pytest.mark.parametrize("version", [1, CURRENT_VERSION])
def test_shipped_version_validates(version: int) -> None:
    """Every shipped version still loads: the migrations that load it, and
    the downgrades that restore it, need it."""
    catalogue = load_catalogue(version)
    assert catalogue.version == version
    # Nothing is lost or added between the file and the model.
    assert catalogue.model_dump(mode="json") == raw_catalogue(version)


def test_the_ten_frameworks() -> None:
    catalogue = load_catalogue(CURRENT_VERSION)
    assert tuple(f.id for f in catalogue.frameworks) == FRAMEWORK_IDS


@pytest.mark.parametrize(
    ("framework", "control"),
    [
        ("hipaa", "164.312(b)"),
        ("pci_dss", "10.2.1"),
        ("nist_800_171", "3.3.1"),
        ("iso_27001", "A.8.15"),
        ("cis", "8.2"),
        ("cmmc", "AU.L2-3.3.1"),
    ],
)
def test_real_control_ids_exist(framework: str, control: str) -> None:
    catalogue = load_catalogue(CURRENT_VERSION)
    (found,) = [f for f in catalogue.frameworks if f.id == framework]
    assert control in [c.id for c in found.controls]


def test_framework_editions() -> None:
    editions = {f.id: f.edition for f in load_catalogue(CURRENT_VERSION).frameworks}
    assert editions["iso_27001"].startswith("ISO/IEC 27001:2022")
    assert "v4.0.1" in editions["pci_dss"]
    assert editions["cis"].startswith("CIS Controls v8")
    assert editions["nist_800_171"].startswith("Revision 2")
    assert "CSF 2.0" in editions["nist_csf"]


def test_every_framework_has_at_least_four_mapped_controls() -> None:
    catalogue = load_catalogue(CURRENT_VERSION)
    pairs = {(m.framework, m.control) for m in catalogue.mappings}
    for framework in catalogue.frameworks:
        covered = [c.id for c in framework.controls if (framework.id, c.id) in pairs]
        assert len(covered) >= 4, (framework.id, covered)


def test_every_basic_runbook_is_mapped() -> None:
    catalogue = load_catalogue(CURRENT_VERSION)
    used = {m.runbook for m in catalogue.mappings}
    basic = {r.id for r in catalogue.runbooks if r.tier == Tier.BASIC}
    assert basic
    assert basic <= used, basic - used


def test_tiers() -> None:
    """Seven compliance runbooks in ``basic``; ``full`` adds the five OS
    maintenance runbooks (docs/frameworks.md)."""
    catalogue = load_catalogue(CURRENT_VERSION)
    basic = {r.id for r in catalogue.runbooks if r.tier == Tier.BASIC}
    full = {r.id for r in catalogue.runbooks if r.tier == Tier.FULL}
    assert len(basic) == 7
    assert full == {
        "journal-size",
        "nix-generations",
        "pending-reboot",
        "os-update-age",
        "disk-health",
    }


def test_cmmc_maps_like_800_171() -> None:
    """A CMMC practice and the 800-171 requirement it is built from map to the
    same runbooks (docs/frameworks.md)."""
    raw = raw_catalogue()
    runbooks = mapped(raw)
    (cmmc,) = [f for f in raw["frameworks"] if f["id"] == "cmmc"]
    (nist,) = [f for f in raw["frameworks"] if f["id"] == "nist_800_171"]
    nist_ids = [c["id"] for c in nist["controls"]]
    assert [c["id"].split("-", 1)[1] for c in cmmc["controls"]] == nist_ids
    for control in cmmc["controls"]:
        requirement = control["id"].split("-", 1)[1]
        assert sorted(runbooks[("cmmc", control["id"])]) == sorted(
            runbooks[("nist_800_171", requirement)]
        ), control["id"]


def test_presets_are_the_eight_industries() -> None:
    catalogue = load_catalogue(CURRENT_VERSION)
    ids = [p.id for p in catalogue.presets]
    assert len(ids) == 8
    assert sorted(ids) == sorted(INDUSTRIES)
    # The API accepts exactly the same industries.
    assert set(typing.get_args(Industry)) == set(INDUSTRIES)
    framework_ids = {f.id for f in catalogue.frameworks}
    for preset in catalogue.presets:
        assert set(preset.frameworks) <= framework_ids
        assert len(set(preset.frameworks)) == len(preset.frameworks), preset.id


# Each framework's ids as its source writes them (docs/frameworks.md).
ID_PATTERNS = {
    "hipaa": r"164\.3(08|10|12|14|16)\([a-e]\)(\([1-8]\)(\((i|ii|iii|iv)\)(\([A-E]\))?)?)?",
    "soc2": r"(CC[1-9]\.[1-8]|A1\.[1-3]|C1\.[12])",
    "pci_dss": r"([1-9]|1[0-2])(\.[1-9][0-9]?){2,3}",
    "nist_csf": r"(GV\.(OC|RM|RR|PO|OV|SC)|ID\.(AM|RA|IM)|PR\.(AA|AT|DS|PS|IR)"
    r"|DE\.(CM|AE)|RS\.(MA|AN|CO|MI)|RC\.(RP|CO))-[0-9]{2}",
    "nist_800_171": r"3\.([1-9]|1[0-4])\.[1-9][0-9]?",
    "sox": r"ITGC-(AC|CM|OP)-[0-9]{2}",
    "gdpr": r"Art\.[1-9][0-9]?(\([0-9]+\)(\([a-f]\))?)?",
    "cmmc": r"(AC|AT|AU|CM|IA|IR|MA|MP|PS|PE|RA|CA|SC|SI)\.L2-3\.([1-9]|1[0-4])\.[1-9][0-9]?",
    "iso_27001": r"A\.(5\.([1-9]|[12][0-9]|3[0-7])|6\.[1-8]|7\.([1-9]|1[0-4])|8\.([1-9]|[12][0-9]|3[0-4]))",
    "cis": r"([1-9]|1[0-8])\.([1-9]|1[0-4])",
}

# (controls, automated) per framework: the table in docs/frameworks.md.
COUNTS = {
    "hipaa": (61, 5),
    "soc2": (38, 5),
    "pci_dss": (195, 10),
    "nist_csf": (106, 10),
    "nist_800_171": (110, 12),
    "sox": (24, 7),
    "gdpr": (43, 4),
    "cmmc": (110, 12),
    "iso_27001": (93, 12),
    "cis": (153, 6),
}


def test_control_ids_follow_their_source() -> None:
    for framework in load_catalogue(CURRENT_VERSION).frameworks:
        pattern = re.compile(ID_PATTERNS[framework.id])
        for control in framework.controls:
            assert pattern.fullmatch(control.id), (framework.id, control.id)


def test_no_control_listed_twice() -> None:
    for framework in raw_catalogue()["frameworks"]:
        ids = [c["id"] for c in framework["controls"]]
        assert len(ids) == len(set(ids)), framework["id"]
        titles = [c["title"] for c in framework["controls"]]
        # A repeated title is a copy-and-paste slip (PCI DSS's x.1.1 and x.1.2
        # titles differ by the requirement number they name).
        assert len(titles) == len(set(titles)), framework["id"]


def test_counts_as_documented() -> None:
    catalogue = load_catalogue(CURRENT_VERSION)
    pairs = {(m.framework, m.control) for m in catalogue.mappings}
    counts = {
        f.id: (len(f.controls), sum((f.id, c.id) in pairs for c in f.controls))
        for f in catalogue.frameworks
    }
    assert counts == COUNTS


def test_counts_table_in_the_docs() -> None:
    """docs/frameworks.md gives the same counts a partner would get."""
    doc = (Path(__file__).parents[2] / "docs" / "frameworks.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| (\d+) \| (\d+) \| (\d+) \|", doc, re.MULTILINE)
    documented = {fid: (int(total), int(auto)) for fid, total, auto, _ in rows}
    assert documented == COUNTS
    for fid, total, auto, manual in rows:
        assert int(total) == int(auto) + int(manual), fid


def test_complete_editions() -> None:
    """The frameworks the catalogue lists whole, checked by their numbering."""
    ids = {f.id: [c.id for c in f.controls] for f in load_catalogue(CURRENT_VERSION).frameworks}
    assert ids["nist_800_171"] == [
        f"3.{family}.{n}"
        for family, size in enumerate((22, 3, 9, 9, 11, 3, 6, 9, 2, 6, 3, 4, 16, 7), start=1)
        for n in range(1, size + 1)
    ]
    assert ids["iso_27001"] == [
        f"A.{theme}.{n}"
        for theme, size in ((5, 37), (6, 8), (7, 14), (8, 34))
        for n in range(1, size + 1)
    ]
    safeguards = (5, 7, 14, 12, 6, 8, 7, 12, 7, 7, 5, 8, 11, 9, 7, 14, 9, 5)
    assert ids["cis"] == [
        f"{control}.{n}"
        for control, size in enumerate(safeguards, start=1)
        for n in range(1, size + 1)
    ]
    criteria = {"CC1": 5, "CC2": 3, "CC3": 4, "CC4": 2, "CC5": 3, "CC6": 8, "CC7": 5, "CC8": 1}
    criteria |= {"CC9": 2, "A1": 3, "C1": 2}
    assert ids["soc2"] == [f"{c}.{n}" for c, size in criteria.items() for n in range(1, size + 1)]
    assert len(ids["nist_csf"]) == 106


def test_version_2_keeps_version_1() -> None:
    """Sites and appliances hold version 1 ids: none is dropped, and no
    version 1 mapping is lost."""
    old, new = raw_catalogue(1), raw_catalogue()
    for before, after in zip(old["frameworks"], new["frameworks"], strict=True):
        assert before["id"] == after["id"]
        assert {c["id"] for c in before["controls"]} <= {c["id"] for c in after["controls"]}
    as_set = lambda raw: {tuple(m.values()) for m in raw["mappings"]}  # noqa: E731
    assert as_set(old) <= as_set(new)
    assert old["runbooks"] == new["runbooks"]
    assert old["presets"] == new["presets"]


# --- the model refuses a bad catalogue ---------------------------------------------


def _append_mapping(**mapping: str) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        raw["mappings"].append(mapping)

    return change


def _duplicate_first(member: str) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        raw[member].append(copy.deepcopy(raw[member][0]))

    return change


def _duplicate_control(raw: dict[str, Any]) -> None:
    controls = raw["frameworks"][0]["controls"]
    controls.append({"id": controls[0]["id"], "title": "Again"})


def _preset_unknown_framework(raw: dict[str, Any]) -> None:
    raw["presets"][0]["frameworks"].append("fedramp")


def _missing_preset(raw: dict[str, Any]) -> None:
    raw["presets"] = [p for p in raw["presets"] if p["id"] != "legal"]


def _extra_preset(raw: dict[str, Any]) -> None:
    raw["presets"].append({**raw["presets"][0], "id": "mining", "name": "Mining"})


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        target: Any = raw
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return change


BAD_CATALOGUES: list[Any] = [
    pytest.param(
        _append_mapping(framework="hipaa", control="164.999(z)", runbook="time-sync"),
        "mapping names unknown control hipaa 164.999(z)",
        id="mapping-to-unknown-control",
    ),
    pytest.param(
        _append_mapping(framework="fedramp", control="AU-2", runbook="time-sync"),
        "mapping names unknown control fedramp AU-2",
        id="mapping-to-unknown-framework",
    ),
    pytest.param(
        # A real control of another framework is still unknown here.
        _append_mapping(framework="hipaa", control="10.2.1", runbook="time-sync"),
        "mapping names unknown control hipaa 10.2.1",
        id="mapping-to-control-of-another-framework",
    ),
    pytest.param(
        _append_mapping(framework="hipaa", control="164.312(b)", runbook="defrag-disk"),
        "mapping names unknown runbook defrag-disk",
        id="mapping-to-unknown-runbook",
    ),
    pytest.param(_duplicate_first("mappings"), "is listed twice", id="duplicate-mapping"),
    pytest.param(
        _duplicate_first("frameworks"), "a framework id is listed twice", id="duplicate-framework"
    ),
    pytest.param(
        _duplicate_control,
        "a control id is listed twice in one framework",
        id="duplicate-control",
    ),
    pytest.param(
        _duplicate_first("runbooks"), "a runbook id is listed twice", id="duplicate-runbook"
    ),
    pytest.param(
        _preset_unknown_framework,
        "preset healthcare names unknown framework fedramp",
        id="preset-names-unknown-framework",
    ),
    pytest.param(_missing_preset, "presets must be exactly", id="missing-preset"),
    pytest.param(_extra_preset, "presets must be exactly", id="extra-preset"),
    pytest.param(_duplicate_first("presets"), "presets must be exactly", id="duplicate-preset"),
    pytest.param(_set(("signature",), "x"), "Extra inputs are not permitted", id="extra-member"),
    pytest.param(
        _set(("runbooks", 0, "owner"), "ops"),
        "Extra inputs are not permitted",
        id="extra-member-in-runbook",
    ),
    pytest.param(_set(("runbooks", 0, "tier"), "premium"), "'basic' or 'full'", id="unknown-tier"),
    pytest.param(_set(("frameworks", 0, "controls"), []), "at least 1 item", id="no-controls"),
    pytest.param(
        _set(("presets", 0, "frameworks"), []), "at least 1 item", id="preset-without-frameworks"
    ),
    pytest.param(_set(("version",), 0), "greater than or equal to 1", id="version-zero"),
    pytest.param(
        _set(("frameworks", 0, "id"), "HIPAA"), "should match pattern", id="framework-id-pattern"
    ),
    pytest.param(_set(("runbooks", 0, "title"), ""), "at least 1 character", id="empty-title"),
]


@pytest.mark.parametrize(("change", "fragment"), BAD_CATALOGUES)
def test_bad_catalogue_refused(change: Callable[[dict[str, Any]], None], fragment: str) -> None:
    raw = raw_catalogue()
    change(raw)
    with pytest.raises(ValidationError, match=re.escape(fragment)):
        Catalogue.model_validate(raw)


def test_unchanged_copy_validates() -> None:
    """The table above fails for its change, not for the copying."""
    Catalogue.model_validate(raw_catalogue())


# --- the API serves the file -------------------------------------------------------


async def test_frameworks_served_as_shipped(harness: Harness) -> None:
    raw = raw_catalogue()
    runbooks = mapped(raw)
    partner = await harness.partner()
    reply = await partner.request("GET", "/api/v1/frameworks")
    assert reply.status == 200, reply.body
    assert [f["id"] for f in reply.body] == list(FRAMEWORK_IDS)
    for served, shipped in zip(reply.body, raw["frameworks"], strict=True):
        assert served["name"] == shipped["name"]
        assert served["edition"] == shipped["edition"]
        assert [c["id"] for c in served["controls"]] == [c["id"] for c in shipped["controls"]]
        assert [c["title"] for c in served["controls"]] == [c["title"] for c in shipped["controls"]]
        for control in served["controls"]:
            expected = runbooks.get((served["id"], control["id"]), [])
            assert sorted(control["runbooks"]) == sorted(expected), (served["id"], control["id"])
            assert control["automated"] is bool(expected), (served["id"], control["id"])
            assert len(set(control["runbooks"])) == len(control["runbooks"])
    total = sum(len(c["runbooks"]) for f in reply.body for c in f["controls"])
    assert total == len(raw["mappings"])


async def test_one_framework(harness: Harness) -> None:
    partner = await harness.partner()
    everything = await partner.request("GET", "/api/v1/frameworks")
    reply = await partner.request("GET", "/api/v1/frameworks/hipaa")
    assert reply.status == 200, reply.body
    assert reply.body["id"] == "hipaa"
    assert reply.body["name"] == "HIPAA Security Rule"
    assert reply.body == everything.body[0]
    (audit,) = [c for c in reply.body["controls"] if c["id"] == "164.312(b)"]
    assert "audit-log-integrity" in audit["runbooks"]


async def test_unknown_framework_is_not_found(harness: Harness) -> None:
    partner = await harness.partner()
    for name in ("fedramp", "HIPAA", "hipaa_"):
        reply = await partner.request("GET", f"/api/v1/frameworks/{name}")
        assert reply.status == 404, reply.body
        assert reply.code == "not-found"
        assert reply.body["type"] == "urn:msp:problem:not-found"


async def test_runbooks_served_as_shipped(harness: Harness) -> None:
    raw = raw_catalogue()
    partner = await harness.partner()
    reply = await partner.request("GET", "/api/v1/runbooks")
    assert reply.status == 200, reply.body
    assert sorted(reply.body, key=lambda r: r["id"]) == sorted(
        raw["runbooks"], key=lambda r: r["id"]
    )


async def test_presets_served_as_shipped(harness: Harness) -> None:
    raw = raw_catalogue()
    partner = await harness.partner()
    reply = await partner.request("GET", "/api/v1/presets")
    assert reply.status == 200, reply.body
    assert reply.body == raw["presets"]
    assert [p["id"] for p in reply.body] == list(INDUSTRIES)


async def test_admin_reads_the_catalogue(harness: Harness) -> None:
    admin = await harness.admin()
    for path in (
        "/api/v1/frameworks",
        "/api/v1/frameworks/cis",
        "/api/v1/runbooks",
        "/api/v1/presets",
    ):
        reply = await admin.request("GET", path)
        assert reply.status == 200, (path, reply.body)


async def test_catalogue_needs_a_key(harness: Harness) -> None:
    for path in (
        "/api/v1/frameworks",
        "/api/v1/frameworks/cis",
        "/api/v1/runbooks",
        "/api/v1/presets",
    ):
        reply = await call(harness.client, "GET", path)
        assert reply.status == 401, (path, reply.body)
        assert reply.code == "missing-credentials"
        reply = await call(
            harness.client, "GET", path, headers={"Authorization": "Bearer mspk_" + "0" * 64}
        )
        assert reply.status == 401, (path, reply.body)
        assert reply.code == "bad-credentials"
