"""Partner compliance management, end to end: defaults, presets, sites and
their overrides, the effective configuration, framework usage, enrollment
tokens, escalations, the admin API and request-body hygiene."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import jsonschema
import pytest

from msp_central.catalogue import CURRENT_VERSION, Tier, load_catalogue
from msp_central.openapi import document as openapi_document
from msp_protocol.bundle import Escalation
from tests.central.support import (
    ApplianceClient,
    Harness,
    KeyClient,
    Reply,
    call,
    check_response,
    dumps,
)

CATALOGUE = load_catalogue(CURRENT_VERSION)
PRESETS = {p.id: p for p in CATALOGUE.presets}
FRAMEWORK_IDS = [f.id for f in CATALOGUE.frameworks]
FRAMEWORK_NAMES = {f.id: f.name for f in CATALOGUE.frameworks}
BASIC_RUNBOOKS = sorted(r.id for r in CATALOGUE.runbooks if r.tier == Tier.BASIC)
ALL_RUNBOOKS = sorted(r.id for r in CATALOGUE.runbooks)
MIB = 1024 * 1024

INHERIT: dict[str, Any] = {"industry": None, "tier": None, "frameworks": None}
EMPTY_DEFAULTS: dict[str, Any] = {"industry": None, "tier": "basic", "frameworks": []}


def request_schema(method: str, template: str) -> dict[str, Any]:
    operation = openapi_document()["paths"][template][method]
    schema: dict[str, Any] = operation["requestBody"]["content"]["application/json"]["schema"]
    return schema


def when(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.tzinfo is not None, text
    return moment


async def send(
    caller: KeyClient,
    method: str,
    path: str,
    body: bytes,
    content_type: str = "application/json",
) -> Reply:
    """Raw bytes with a chosen content type (KeyClient.request sends JSON)."""
    return await call(
        caller.client,
        method,
        path,
        body=body,
        headers={"Authorization": f"Bearer {caller.key}", "Content-Type": content_type},
    )


async def get_defaults(partner: KeyClient) -> dict[str, Any]:
    reply = await partner.request("GET", "/api/v1/partner")
    assert reply.status == 200, reply.body
    return dict(reply.body["defaults"])


async def set_defaults(partner: KeyClient, **defaults: Any) -> dict[str, Any]:
    reply = await partner.request("PUT", "/api/v1/partner/defaults", defaults)
    assert reply.status == 200, reply.body
    return dict(reply.body["defaults"])


async def new_site(
    partner: KeyClient, name: str, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    value: dict[str, Any] = {"name": name}
    if overrides is not None:
        value["overrides"] = overrides
    reply = await partner.request("POST", "/api/v1/sites", value)
    assert reply.status == 201, reply.body
    return dict(reply.body)


async def effective(partner: KeyClient, site_id: str) -> dict[str, Any]:
    """The effective config, checked to be the same from both places it is shown."""
    reply = await partner.request("GET", f"/api/v1/sites/{site_id}/effective-config")
    assert reply.status == 200, reply.body
    site = await partner.request("GET", f"/api/v1/sites/{site_id}")
    assert site.status == 200, site.body
    assert site.body["effective"] == reply.body
    return dict(reply.body)


# --- the partner and its defaults ------------------------------------------------


async def test_new_partner_has_empty_defaults(harness: Harness) -> None:
    partner = await harness.partner("Acme MSP")
    reply = await partner.request("GET", "/api/v1/partner")
    assert reply.status == 200, reply.body
    assert reply.body["id"] == partner.partner_id
    assert reply.body["name"] == "Acme MSP"
    assert reply.body["defaults"] == EMPTY_DEFAULTS
    when(reply.body["created_at"])


async def test_put_defaults(harness: Harness) -> None:
    partner = await harness.partner()
    wanted = {"industry": "finance", "tier": "full", "frameworks": ["sox", "pci_dss"]}
    reply = await partner.request("PUT", "/api/v1/partner/defaults", wanted)
    assert reply.status == 200, reply.body
    assert reply.body["id"] == partner.partner_id
    assert reply.body["defaults"] == wanted
    assert await get_defaults(partner) == wanted
    # Order is kept as given.
    again = {"industry": "finance", "tier": "full", "frameworks": ["pci_dss", "sox"]}
    assert await set_defaults(partner, **again) == again
    # Every framework at once is allowed.
    assert (await set_defaults(partner, frameworks=FRAMEWORK_IDS))["frameworks"] == FRAMEWORK_IDS
    # PUT replaces: what is left out goes back to its default.
    assert await set_defaults(partner) == EMPTY_DEFAULTS
    assert await get_defaults(partner) == EMPTY_DEFAULTS


async def test_defaults_are_per_partner(harness: Harness) -> None:
    first = await harness.partner("First")
    second = await harness.partner("Second")
    await set_defaults(first, industry="legal", tier="full", frameworks=["gdpr"])
    assert await get_defaults(second) == EMPTY_DEFAULTS


JSON = "application/json"

BAD_DEFAULTS: list[Any] = [
    pytest.param(
        dumps({"frameworks": ["hipaa", "fedramp"]}),
        JSON,
        400,
        "malformed-document",
        "unknown framework fedramp",
        id="unknown-framework",
    ),
    pytest.param(
        dumps({"frameworks": ["HIPAA"]}), JSON, 400, "malformed-document", "", id="framework-case"
    ),
    pytest.param(
        dumps({"frameworks": ["hipaa", "soc2", "hipaa"]}),
        JSON,
        400,
        "malformed-document",
        "listed twice",
        id="duplicate-framework",
    ),
    pytest.param(
        dumps({"frameworks": [*FRAMEWORK_IDS, "hipaa"]}),
        JSON,
        400,
        "malformed-document",
        "",
        id="too-many-frameworks",
    ),
    pytest.param(
        dumps({"tier": "premium"}), JSON, 400, "malformed-document", "tier", id="unknown-tier"
    ),
    pytest.param(dumps({"tier": "FULL"}), JSON, 400, "malformed-document", "tier", id="tier-case"),
    pytest.param(
        dumps({"industry": "mining"}),
        JSON,
        400,
        "malformed-document",
        "industry",
        id="unknown-industry",
    ),
    pytest.param(
        dumps({"tier": "full", "owner": "bob"}),
        JSON,
        400,
        "malformed-document",
        "owner",
        id="extra-member",
    ),
    pytest.param(
        dumps({"frameworks": "hipaa"}),
        JSON,
        400,
        "malformed-document",
        "frameworks",
        id="frameworks-not-a-list",
    ),
    pytest.param(
        dumps({"frameworks": [1]}),
        JSON,
        400,
        "malformed-document",
        "frameworks",
        id="framework-not-a-string",
    ),
    pytest.param(
        dumps({"frameworks": None}),
        JSON,
        400,
        "malformed-document",
        "frameworks",
        id="frameworks-null",
    ),
    pytest.param(dumps({"tier": 1}), JSON, 400, "malformed-document", "tier", id="tier-number"),
    pytest.param(dumps({"tier": None}), JSON, 400, "malformed-document", "tier", id="tier-null"),
    pytest.param(
        dumps({"industry": 5}), JSON, 400, "malformed-document", "industry", id="industry-number"
    ),
    pytest.param(
        dumps([{"tier": "full"}]),
        JSON,
        400,
        "malformed-document",
        "not a JSON object",
        id="array-body",
    ),
    pytest.param(dumps("full"), JSON, 400, "malformed-document", "", id="string-body"),
    pytest.param(b"tier=full", JSON, 400, "malformed-json", "", id="not-json"),
    pytest.param(b'{"tier": "full"', JSON, 400, "malformed-json", "", id="truncated-json"),
    pytest.param(
        b'{"tier": "full", "tier": "basic"}',
        JSON,
        400,
        "malformed-json",
        "duplicate",
        id="duplicate-keys",
    ),
    pytest.param(b'{"tier": NaN}', JSON, 400, "malformed-json", "", id="nan"),
    pytest.param(b'{"industry": "\xff"}', JSON, 400, "malformed-json", "", id="invalid-utf8"),
    pytest.param(
        dumps({"tier": "full"}),
        "text/plain",
        415,
        "unsupported-media-type",
        "",
        id="text-plain",
    ),
    pytest.param(
        b"tier=full",
        "application/x-www-form-urlencoded",
        415,
        "unsupported-media-type",
        "",
        id="form-encoded",
    ),
]


@pytest.mark.parametrize(("body", "content_type", "status", "code", "detail"), BAD_DEFAULTS)
async def test_bad_defaults_refused(
    harness: Harness, body: bytes, content_type: str, status: int, code: str, detail: str
) -> None:
    partner = await harness.partner()
    before = await set_defaults(partner, industry="retail", tier="full", frameworks=["pci_dss"])
    reply = await send(partner, "PUT", "/api/v1/partner/defaults", body, content_type)
    assert reply.status == status, reply.body
    assert reply.code == code, reply.body
    assert reply.body["type"] == f"urn:msp:problem:{code}"
    assert reply.body["instance"] == "/api/v1/partner/defaults"
    assert detail in reply.body["detail"]
    assert await get_defaults(partner) == before


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        pytest.param({"frameworks": ["nist_csf", "fedramp"]}, "unknown framework", id="unknown"),
        pytest.param({"frameworks": ["cis", "cis"]}, "listed twice", id="duplicate"),
        pytest.param({"tier": "premium"}, "tier", id="tier"),
        pytest.param({"industry": "mining"}, "industry", id="industry"),
        pytest.param({"frameworks": [], "colour": "red"}, "colour", id="extra-member"),
    ],
)
async def test_bad_overrides_refused(harness: Harness, value: dict[str, Any], detail: str) -> None:
    partner = await harness.partner()
    site = await new_site(partner, "Clinic", {"tier": "full", "frameworks": ["hipaa"]})
    reply = await partner.request("PUT", f"/api/v1/sites/{site['id']}/overrides", value)
    assert reply.status == 400, reply.body
    assert reply.code == "malformed-document"
    assert detail in reply.body["detail"]
    unchanged = await partner.request("GET", f"/api/v1/sites/{site['id']}")
    assert unchanged.body == site
    # The same overrides are refused when creating a site, and no site is made.
    reply = await partner.request("POST", "/api/v1/sites", {"name": "Other", "overrides": value})
    assert reply.status == 400, reply.body
    assert reply.code == "malformed-document"
    listed = await partner.request("GET", "/api/v1/sites")
    assert [s["id"] for s in listed.body["items"]] == [site["id"]]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({}, id="no-name"),
        pytest.param({"name": ""}, id="empty-name"),
        pytest.param({"name": "   "}, id="blank-name"),
        pytest.param({"name": "x" * 201}, id="long-name"),
        pytest.param({"name": 7}, id="number-name"),
        pytest.param({"name": "Clinic", "overrides": None}, id="null-overrides"),
        pytest.param({"name": "Clinic", "overrides": "full"}, id="string-overrides"),
        pytest.param(
            {"name": "Clinic", "overrides": {"frameworks": "cis"}}, id="string-frameworks"
        ),
        pytest.param({"name": "Clinic", "overrides": {"colour": "red"}}, id="extra-override"),
        pytest.param({"name": "Clinic", "partner_id": "partner-0"}, id="extra-member"),
    ],
)
async def test_bad_site_refused(harness: Harness, value: dict[str, Any]) -> None:
    partner = await harness.partner()
    reply = await partner.request("POST", "/api/v1/sites", value)
    assert reply.status == 400, reply.body
    assert reply.code == "malformed-document"
    listed = await partner.request("GET", "/api/v1/sites")
    assert listed.body == {"items": [], "next_cursor": None}


# --- presets --------------------------------------------------------------------------


async def test_apply_preset_to_partner(harness: Harness) -> None:
    partner = await harness.partner()
    presets = await partner.request("GET", "/api/v1/presets")
    assert len(presets.body) == 8
    for preset in presets.body:
        reply = await partner.request(
            "POST", "/api/v1/partner/apply-preset", {"preset": preset["id"]}
        )
        assert reply.status == 200, reply.body
        wanted = {
            "industry": preset["id"],
            "tier": preset["tier"],
            "frameworks": preset["frameworks"],
        }
        assert reply.body["defaults"] == wanted
        assert await get_defaults(partner) == wanted
    healthcare = await partner.request(
        "POST", "/api/v1/partner/apply-preset", {"preset": "healthcare"}
    )
    assert healthcare.body["defaults"] == {
        "industry": "healthcare",
        "tier": "basic",
        "frameworks": ["hipaa", "nist_csf"],
    }


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"preset": "mining"}, id="unknown-preset"),
        pytest.param({"preset": "Healthcare"}, id="preset-case"),
        pytest.param({}, id="no-preset"),
        pytest.param({"preset": "healthcare", "tier": "full"}, id="extra-member"),
        pytest.param({"preset": ["healthcare"]}, id="preset-list"),
    ],
)
async def test_bad_preset_refused(harness: Harness, value: dict[str, Any]) -> None:
    partner = await harness.partner()
    before = await set_defaults(partner, industry="legal", tier="full", frameworks=["gdpr"])
    site = await new_site(partner, "Office")
    reply = await partner.request("POST", "/api/v1/partner/apply-preset", value)
    assert reply.status == 400, reply.body
    assert reply.code == "malformed-document"
    assert await get_defaults(partner) == before
    reply = await partner.request("POST", f"/api/v1/sites/{site['id']}/apply-preset", value)
    assert reply.status == 400, reply.body
    assert reply.code == "malformed-document"
    assert (await partner.request("GET", f"/api/v1/sites/{site['id']}")).body == site


async def test_apply_preset_to_one_site(harness: Harness) -> None:
    partner = await harness.partner()
    defaults = await set_defaults(partner, industry="technology", tier="full", frameworks=["soc2"])
    clinic = await new_site(partner, "Clinic")
    office = await new_site(partner, "Office")
    reply = await partner.request(
        "POST", f"/api/v1/sites/{clinic['id']}/apply-preset", {"preset": "healthcare"}
    )
    assert reply.status == 200, reply.body
    assert reply.body["id"] == clinic["id"]
    assert reply.body["overrides"] == {
        "industry": "healthcare",
        "tier": "basic",
        "frameworks": ["hipaa", "nist_csf"],
    }
    assert reply.body["effective"] == {
        "site_id": clinic["id"],
        "industry": "healthcare",
        "tier": "basic",
        "frameworks": ["hipaa", "nist_csf"],
        "runbooks": BASIC_RUNBOOKS,
        "sources": {"industry": "site", "tier": "site", "frameworks": "site"},
    }
    assert await effective(partner, clinic["id"]) == reply.body["effective"]
    # Nothing else moved: not the partner, not the other site.
    assert await get_defaults(partner) == defaults
    assert (await partner.request("GET", f"/api/v1/sites/{office['id']}")).body == office
    assert office["effective"]["industry"] == "technology"


# --- sites and the effective configuration ---------------------------------------------


async def test_create_list_and_get_sites(harness: Harness) -> None:
    partner = await harness.partner()
    await set_defaults(partner, industry="education", tier="basic", frameworks=["nist_csf", "cis"])
    plain = await new_site(partner, "  Main Campus  ")
    assert plain["name"] == "Main Campus"
    assert plain["partner_id"] == partner.partner_id
    assert plain["overrides"] == INHERIT
    assert plain["effective"] == {
        "site_id": plain["id"],
        "industry": "education",
        "tier": "basic",
        "frameworks": ["nist_csf", "cis"],
        "runbooks": BASIC_RUNBOOKS,
        "sources": {"industry": "partner", "tier": "partner", "frameworks": "partner"},
    }
    harness.clock.advance(timedelta(seconds=1))
    overridden = await new_site(
        partner, "Lab", {"industry": "defence", "tier": "full", "frameworks": ["cmmc"]}
    )
    assert overridden["overrides"] == {
        "industry": "defence",
        "tier": "full",
        "frameworks": ["cmmc"],
    }
    assert overridden["effective"] == {
        "site_id": overridden["id"],
        "industry": "defence",
        "tier": "full",
        "frameworks": ["cmmc"],
        "runbooks": ALL_RUNBOOKS,
        "sources": {"industry": "site", "tier": "site", "frameworks": "site"},
    }
    harness.clock.advance(timedelta(seconds=1))
    explicit_inherit = await new_site(partner, "Annex", INHERIT)
    assert explicit_inherit["overrides"] == INHERIT
    assert explicit_inherit["effective"]["sources"] == plain["effective"]["sources"]
    assert len({plain["id"], overridden["id"], explicit_inherit["id"]}) == 3

    listed = await partner.request("GET", "/api/v1/sites")
    assert listed.status == 200, listed.body
    assert listed.body == {"items": [plain, overridden, explicit_inherit], "next_cursor": None}
    for site in (plain, overridden, explicit_inherit):
        one = await partner.request("GET", f"/api/v1/sites/{site['id']}")
        assert one.status == 200, one.body
        assert one.body == site


async def test_sites_of_another_partner_are_not_found(harness: Harness) -> None:
    owner = await harness.partner("Owner")
    other = await harness.partner("Other")
    site = await new_site(owner, "Clinic")
    await new_site(other, "Theirs")
    listed = await other.request("GET", "/api/v1/sites")
    assert [s["name"] for s in listed.body["items"]] == ["Theirs"]
    sid = site["id"]
    attempts: list[tuple[str, str, Any]] = [
        ("GET", f"/api/v1/sites/{sid}", None),
        ("GET", f"/api/v1/sites/{sid}/effective-config", None),
        ("PUT", f"/api/v1/sites/{sid}/overrides", {"tier": "full"}),
        ("POST", f"/api/v1/sites/{sid}/apply-preset", {"preset": "finance"}),
        ("POST", f"/api/v1/sites/{sid}/enrollment-tokens", {}),
        ("GET", f"/api/v1/sites/{sid}/appliances", None),
        ("GET", f"/api/v1/sites/{sid}/evidence", None),
    ]
    for method, path, value in attempts:
        reply = await other.request(method, path, value)
        assert reply.status == 404, (method, path, reply.body)
        assert reply.code == "not-found"
        missing = await owner.request(method, path.replace(sid, "site-0000000000000000"), value)
        assert missing.status == 404, (method, path, missing.body)
        assert missing.code == "not-found"
    assert (await owner.request("GET", f"/api/v1/sites/{sid}")).body == site


async def test_put_overrides(harness: Harness) -> None:
    partner = await harness.partner()
    await set_defaults(partner, industry="retail", tier="basic", frameworks=["pci_dss"])
    site = await new_site(partner, "Shop")
    sid = site["id"]

    reply = await partner.request("PUT", f"/api/v1/sites/{sid}/overrides", {"tier": "full"})
    assert reply.status == 200, reply.body
    assert reply.body["overrides"] == {"industry": None, "tier": "full", "frameworks": None}
    assert reply.body["effective"] == {
        "site_id": sid,
        "industry": "retail",
        "tier": "full",
        "frameworks": ["pci_dss"],
        "runbooks": ALL_RUNBOOKS,
        "sources": {"industry": "partner", "tier": "site", "frameworks": "partner"},
    }
    assert await effective(partner, sid) == reply.body["effective"]

    # PUT replaces every override: tier goes back to inheriting.
    reply = await partner.request(
        "PUT", f"/api/v1/sites/{sid}/overrides", {"industry": "finance", "frameworks": ["soc2"]}
    )
    assert reply.status == 200, reply.body
    assert reply.body["overrides"] == {"industry": "finance", "tier": None, "frameworks": ["soc2"]}
    assert await effective(partner, sid) == {
        "site_id": sid,
        "industry": "finance",
        "tier": "basic",
        "frameworks": ["soc2"],
        "runbooks": BASIC_RUNBOOKS,
        "sources": {"industry": "site", "tier": "partner", "frameworks": "site"},
    }

    # An empty framework list is an override (no frameworks), not inheritance.
    reply = await partner.request("PUT", f"/api/v1/sites/{sid}/overrides", {"frameworks": []})
    assert reply.status == 200, reply.body
    assert reply.body["overrides"] == {"industry": None, "tier": None, "frameworks": []}
    got = await effective(partner, sid)
    assert got["frameworks"] == []
    assert got["sources"]["frameworks"] == "site"

    # All null: the site inherits everything again.
    reply = await partner.request("PUT", f"/api/v1/sites/{sid}/overrides", INHERIT)
    assert reply.status == 200, reply.body
    assert reply.body["overrides"] == INHERIT
    assert reply.body == {**site, "overrides": INHERIT}


async def test_effective_config_follows_partner_defaults(harness: Harness) -> None:
    partner = await harness.partner()
    await set_defaults(partner, industry="finance", tier="full", frameworks=["sox", "pci_dss"])
    inherits = await new_site(partner, "Inherits")
    own_industry = await new_site(partner, "Own industry", {"industry": "healthcare"})
    own_tier = await new_site(partner, "Own tier", {"tier": "basic", "frameworks": []})
    own_all = await new_site(
        partner, "Own all", {"industry": "legal", "tier": "full", "frameworks": ["gdpr"]}
    )

    async def check(
        site: dict[str, Any], industry: str | None, tier: str, frameworks: list[str]
    ) -> None:
        got = await effective(partner, site["id"])
        assert (got["industry"], got["tier"], got["frameworks"]) == (industry, tier, frameworks), (
            site["name"],
            got,
        )
        assert got["runbooks"] == (ALL_RUNBOOKS if tier == "full" else BASIC_RUNBOOKS)
        overrides = site["overrides"]
        assert got["sources"] == {
            key: "site" if overrides[key] is not None else "partner"
            for key in ("industry", "tier", "frameworks")
        }

    await check(inherits, "finance", "full", ["sox", "pci_dss"])
    await check(own_industry, "healthcare", "full", ["sox", "pci_dss"])
    await check(own_tier, "finance", "basic", [])
    await check(own_all, "legal", "full", ["gdpr"])

    await set_defaults(partner, industry="government", tier="basic", frameworks=["nist_csf"])
    await check(inherits, "government", "basic", ["nist_csf"])
    await check(own_industry, "healthcare", "basic", ["nist_csf"])
    await check(own_tier, "government", "basic", [])
    await check(own_all, "legal", "full", ["gdpr"])

    # Back to empty defaults: an inheriting site has no industry and no frameworks.
    await set_defaults(partner)
    await check(inherits, None, "basic", [])
    await check(own_all, "legal", "full", ["gdpr"])

    # The list shows the same effective configuration as the single reads.
    listed = await partner.request("GET", "/api/v1/sites")
    for site in listed.body["items"]:
        assert site["effective"] == await effective(partner, site["id"])


async def test_runbooks_by_tier(harness: Harness) -> None:
    partner = await harness.partner()
    runbooks = (await partner.request("GET", "/api/v1/runbooks")).body
    basic = sorted(r["id"] for r in runbooks if r["tier"] == "basic")
    assert basic == BASIC_RUNBOOKS
    assert len(BASIC_RUNBOOKS) < len(ALL_RUNBOOKS)
    site = await new_site(partner, "Site")
    got = await effective(partner, site["id"])
    assert got["tier"] == "basic"
    assert got["runbooks"] == basic
    await set_defaults(partner, tier="full")
    got = await effective(partner, site["id"])
    assert got["tier"] == "full"
    assert sorted(got["runbooks"]) == sorted(r["id"] for r in runbooks)
    assert len(set(got["runbooks"])) == len(got["runbooks"])


# --- framework usage -----------------------------------------------------------------


async def test_framework_usage(harness: Harness) -> None:
    partner = await harness.partner()
    other = await harness.partner("Other MSP")
    await set_defaults(partner, frameworks=["hipaa", "nist_csf"])
    await set_defaults(other, frameworks=["hipaa", "cis"])
    inherits = await new_site(partner, "Inherits")
    harness.clock.advance(timedelta(seconds=1))
    card = await new_site(partner, "Card", {"frameworks": ["pci_dss"]})
    harness.clock.advance(timedelta(seconds=1))
    none = await new_site(partner, "None", {"frameworks": [], "tier": "full"})
    harness.clock.advance(timedelta(seconds=1))
    mixed = await new_site(partner, "Mixed", {"frameworks": ["soc2", "hipaa"]})
    foreign = [await new_site(other, f"Theirs {n}") for n in range(2)]
    await new_site(other, "Theirs too", {"frameworks": ["gdpr", "pci_dss"]})

    reply = await partner.request("GET", "/api/v1/framework-usage")
    assert reply.status == 200, reply.body
    usage = reply.body
    assert usage["site_count"] == 4
    inherited = {"industry": "partner", "tier": "partner", "frameworks": "partner"}
    own = {**inherited, "frameworks": "site"}
    assert usage["sites"] == [
        {
            "site_id": inherits["id"],
            "name": "Inherits",
            "frameworks": ["hipaa", "nist_csf"],
            "sources": inherited,
        },
        {"site_id": card["id"], "name": "Card", "frameworks": ["pci_dss"], "sources": own},
        {
            "site_id": none["id"],
            "name": "None",
            "frameworks": [],
            "sources": {**own, "tier": "site"},
        },
        {"site_id": mixed["id"], "name": "Mixed", "frameworks": ["soc2", "hipaa"], "sources": own},
    ]
    assert [f["framework"] for f in usage["frameworks"]] == FRAMEWORK_IDS
    by_id = {f["framework"]: f for f in usage["frameworks"]}
    expected = {
        "hipaa": [inherits["id"], mixed["id"]],
        "nist_csf": [inherits["id"]],
        "pci_dss": [card["id"]],
        "soc2": [mixed["id"]],
    }
    for fid in FRAMEWORK_IDS:
        entry = by_id[fid]
        assert entry["name"] == FRAMEWORK_NAMES[fid]
        assert sorted(entry["sites"]) == sorted(expected.get(fid, [])), fid
        assert entry["site_count"] == len(expected.get(fid, [])), fid
    foreign_ids = {s["id"] for s in foreign}
    assert not foreign_ids & {s["site_id"] for s in usage["sites"]}
    assert not foreign_ids & {s for f in usage["frameworks"] for s in f["sites"]}

    # Usage follows the partner's defaults for inheriting sites only.
    await set_defaults(partner, frameworks=["iso_27001"])
    usage = (await partner.request("GET", "/api/v1/framework-usage")).body
    by_id = {f["framework"]: f for f in usage["frameworks"]}
    assert by_id["iso_27001"]["sites"] == [inherits["id"]]
    assert by_id["hipaa"]["sites"] == [mixed["id"]]
    assert by_id["nist_csf"]["site_count"] == 0

    # A decommissioned site runs nothing: it leaves the usage.
    gone = await partner.request("DELETE", f"/api/v1/sites/{card['id']}")
    assert gone.status == 200, gone.body
    usage = (await partner.request("GET", "/api/v1/framework-usage")).body
    assert usage["site_count"] == 3
    assert card["id"] not in {s["site_id"] for s in usage["sites"]}
    by_id = {f["framework"]: f for f in usage["frameworks"]}
    assert by_id["pci_dss"] == {
        "framework": "pci_dss",
        "name": "PCI DSS",
        "site_count": 0,
        "sites": [],
    }

    # The other partner sees only its own three sites.
    theirs = (await other.request("GET", "/api/v1/framework-usage")).body
    assert theirs["site_count"] == 3
    by_id = {f["framework"]: f for f in theirs["frameworks"]}
    assert by_id["hipaa"]["site_count"] == 2
    assert by_id["pci_dss"]["site_count"] == 1
    assert by_id["soc2"]["site_count"] == 0


async def test_framework_usage_without_sites(harness: Harness) -> None:
    partner = await harness.partner()
    await set_defaults(partner, frameworks=["hipaa"])
    reply = await partner.request("GET", "/api/v1/framework-usage")
    assert reply.status == 200, reply.body
    assert reply.body["site_count"] == 0
    assert reply.body["sites"] == []
    assert [f["framework"] for f in reply.body["frameworks"]] == FRAMEWORK_IDS
    assert all(f["site_count"] == 0 and f["sites"] == [] for f in reply.body["frameworks"])


# --- enrollment tokens ----------------------------------------------------------------


async def _token(partner: KeyClient, site_id: str, value: Any) -> Reply:
    return await partner.request("POST", f"/api/v1/sites/{site_id}/enrollment-tokens", value)


async def test_enrollment_token_default_lifetime(harness: Harness) -> None:
    partner = await harness.partner()
    site = await new_site(partner, "Clinic")
    for value in ({}, {"hours": None}):
        before = harness.clock()
        reply = await _token(partner, site["id"], value)
        after = harness.clock()
        assert reply.status == 201, reply.body
        assert reply.body["site_id"] == site["id"]
        assert reply.body["token"].startswith("msp-enroll_")
        expires = when(reply.body["expires_at"])
        assert before + timedelta(hours=72) <= expires <= after + timedelta(hours=72)


@pytest.mark.parametrize("hours", [1, 24, 720])
async def test_enrollment_token_hours(harness: Harness, hours: int) -> None:
    partner = await harness.partner()
    site = await new_site(partner, "Clinic")
    before = harness.clock()
    reply = await _token(partner, site["id"], {"hours": hours})
    after = harness.clock()
    assert reply.status == 201, reply.body
    expires = when(reply.body["expires_at"])
    assert before + timedelta(hours=hours) <= expires <= after + timedelta(hours=hours)


async def test_enrollment_tokens_are_distinct(harness: Harness) -> None:
    partner = await harness.partner()
    site = await new_site(partner, "Clinic")
    tokens = {(await _token(partner, site["id"], {})).body["token"] for _ in range(3)}
    assert len(tokens) == 3


@pytest.mark.parametrize(
    ("value", "code"),
    [
        pytest.param({"hours": 0}, "malformed-document", id="zero"),
        pytest.param({"hours": -1}, "malformed-document", id="negative"),
        pytest.param({"hours": 721}, "malformed-document", id="over-30-days"),
        pytest.param({"hours": 2**53 - 1}, "malformed-document", id="largest-safe-integer"),
        # Integers beyond ±(2**53 - 1) are refused by the JSON parser itself.
        pytest.param({"hours": 10**30}, "malformed-json", id="huge"),
        pytest.param({"hours": 1.5}, "malformed-document", id="fraction"),
        pytest.param({"hours": "24"}, "malformed-document", id="string"),
        pytest.param({"hours": True}, "malformed-document", id="boolean"),
        pytest.param({"hours": 24, "uses": 2}, "malformed-document", id="extra-member"),
    ],
)
async def test_bad_enrollment_token_request(
    harness: Harness, value: dict[str, Any], code: str
) -> None:
    partner = await harness.partner()
    site = await new_site(partner, "Clinic")
    # The OpenAPI document refuses each of these bodies; so must the server.
    schema = {
        **request_schema("post", "/api/v1/sites/{site_id}/enrollment-tokens"),
        "components": openapi_document()["components"],
    }
    assert not jsonschema.Draft202012Validator(schema).is_valid(value)
    reply = await _token(partner, site["id"], value)
    assert reply.status == 400, reply.body
    assert reply.code == code
    listed = await partner.request("GET", f"/api/v1/sites/{site['id']}/appliances")
    assert listed.body["items"] == []


async def test_enrollment_token_expires(harness: Harness) -> None:
    """A one-hour token enrolls within the hour, not after it."""
    partner = await harness.partner()
    site = await new_site(partner, "Clinic")

    enroll = harness.enroll_with

    late = (await _token(partner, site["id"], {"hours": 1})).body["token"]
    early = (await _token(partner, site["id"], {"hours": 1})).body["token"]
    harness.clock.advance(timedelta(minutes=59))
    reply = await enroll(early)
    assert reply.status == 201, reply.body
    assert reply.body["site_id"] == site["id"]
    harness.clock.advance(timedelta(minutes=2))
    reply = await enroll(late)
    assert reply.status == 403, reply.body
    assert reply.code == "bad-enrollment-token"


# --- escalations --------------------------------------------------------------------


async def escalate(
    harness: Harness, appliance: ApplianceClient, escalation_id: str, **fields: Any
) -> Escalation:
    document = Escalation(
        escalation_id=escalation_id,
        appliance_id=appliance.appliance_id,
        site_id=appliance.site_id,
        severity=fields.get("severity", "high"),
        title=fields.get("title", "Disk failing"),
        detail=fields.get("detail", {"disk": "/dev/sda", "smart": "FAILED"}),
        created_at=harness.clock(),
        log_index=fields.get("log_index"),
    )
    wire = document.to_wire()
    assert wire["created_at"].endswith("Z")
    reply = await appliance.request(
        "POST", f"/api/v1/appliances/{appliance.appliance_id}/escalations", wire
    )
    assert reply.status == 201, reply.body
    assert reply.body == {"escalation_id": escalation_id, "stored": True}
    return document


async def test_escalations_list_and_acknowledge(harness: Harness) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    first = await escalate(harness, appliance, "esc-1", log_index=3)
    harness.clock.advance(timedelta(seconds=5))
    second = await escalate(
        harness, appliance, "esc-2", severity="critical", title="Audit log mismatch", detail={}
    )

    reply = await partner.request("GET", "/api/v1/escalations")
    assert reply.status == 200, reply.body
    assert [e["id"] for e in reply.body["items"]] == ["esc-2", "esc-1"]  # newest first
    listed = {e["id"]: e for e in reply.body["items"]}
    for document in (first, second):
        entry = listed[document.escalation_id]
        assert entry["appliance_id"] == appliance.appliance_id
        assert entry["site_id"] == appliance.site_id
        assert entry["severity"] == document.severity
        assert entry["title"] == document.title
        assert entry["detail"] == document.detail
        assert when(entry["created_at"]) == document.created_at
        assert entry["acknowledged_at"] is None
        assert entry["acknowledged_by"] is entry["acknowledged_note"] is None
        when(entry["received_at"])
    assert listed["esc-1"]["log_index"] == 3
    assert listed["esc-2"]["log_index"] is None
    opened = await partner.request("GET", "/api/v1/escalations?open=true")
    assert opened.body == reply.body

    harness.clock.advance(timedelta(minutes=1))
    before = harness.clock()
    ack = await partner.request(
        "POST", f"/api/v1/escalations/{appliance.appliance_id}/esc-1/acknowledge"
    )
    after = harness.clock()
    assert ack.status == 200, ack.body
    assert ack.body["id"] == "esc-1"
    acknowledged_at = when(ack.body["acknowledged_at"])
    assert before <= acknowledged_at <= after
    assert ack.body["acknowledged_by"] == f"partner:{partner.partner_id}/key:{partner.key[:12]}"
    assert ack.body["acknowledged_note"] is None
    changed = {"acknowledged_at", "acknowledged_by"}
    assert {k: v for k, v in ack.body.items() if k not in changed} == {
        k: v for k, v in listed["esc-1"].items() if k not in changed
    }

    # Acknowledging again keeps the first time.
    harness.clock.advance(timedelta(hours=1))
    again = await partner.request(
        "POST",
        f"/api/v1/escalations/{appliance.appliance_id}/esc-1/acknowledge",
        {"note": "a second look"},
    )
    assert again.status == 200, again.body
    assert again.body == ack.body

    opened = await partner.request("GET", "/api/v1/escalations?open=true")
    assert [e["id"] for e in opened.body["items"]] == ["esc-2"]
    everything = await partner.request("GET", "/api/v1/escalations")
    assert [e["id"] for e in everything.body["items"]] == ["esc-2", "esc-1"]
    assert everything.body["items"][1] == ack.body
    closed = await partner.request("GET", "/api/v1/escalations?open=false")
    assert closed.body["items"] == [ack.body]


async def test_acknowledge_unknown_escalation(harness: Harness) -> None:
    partner = await harness.partner()
    reply = await partner.request("POST", "/api/v1/escalations/appliance-nope/esc-nope/acknowledge")
    assert reply.status == 404, reply.body
    assert reply.code == "not-found"


async def test_escalations_of_another_partner(harness: Harness) -> None:
    owner = await harness.partner("Owner")
    other = await harness.partner("Other")
    appliance = await harness.enroll(owner)
    await escalate(harness, appliance, "esc-owned")
    assert (await other.request("GET", "/api/v1/escalations")).body["items"] == []
    assert (await other.request("GET", "/api/v1/escalations?open=true")).body["items"] == []
    reply = await other.request(
        "POST", f"/api/v1/escalations/{appliance.appliance_id}/esc-owned/acknowledge"
    )
    assert reply.status == 404, reply.body
    assert reply.code == "not-found"
    # It is still open for its owner.
    opened = await owner.request("GET", "/api/v1/escalations?open=true")
    assert [e["id"] for e in opened.body["items"]] == ["esc-owned"]
    assert opened.body["items"][0]["acknowledged_at"] is None


# --- the admin API ------------------------------------------------------------------


async def test_admin_creates_partner(harness: Harness) -> None:
    admin = await harness.admin()
    reply = await admin.request("POST", "/api/v1/partners", {"name": "  New MSP  "})
    assert reply.status == 201, reply.body
    created = reply.body["partner"]
    assert created["name"] == "New MSP"
    assert created["defaults"] == EMPTY_DEFAULTS
    assert reply.body["api_key"].startswith("mspk_")

    # The key works at once, as that partner.
    partner = KeyClient(harness.client, reply.body["api_key"], created["id"])
    me = await partner.request("GET", "/api/v1/partner")
    assert me.status == 200, me.body
    assert me.body == created
    site = await new_site(partner, "First site")
    assert site["partner_id"] == created["id"]

    listed = await admin.request("GET", "/api/v1/partners")
    assert listed.status == 200, listed.body
    assert created in listed.body["items"]


async def test_partner_key_cannot_use_admin_api(harness: Harness) -> None:
    partner = await harness.partner()
    reply = await partner.request("POST", "/api/v1/partners", {"name": "Sneaky"})
    assert reply.status == 403, reply.body
    assert reply.code == "forbidden"
    reply = await partner.request("GET", "/api/v1/partners")
    assert reply.status == 403, reply.body
    assert reply.code == "forbidden"
    admin = await harness.admin()
    names = [p["name"] for p in (await admin.request("GET", "/api/v1/partners")).body["items"]]
    assert "Sneaky" not in names


async def test_admin_key_cannot_use_partner_api(harness: Harness) -> None:
    admin = await harness.admin()
    for method, path, value in [
        ("GET", "/api/v1/partner", None),
        ("PUT", "/api/v1/partner/defaults", {"tier": "full"}),
        ("GET", "/api/v1/sites", None),
        ("POST", "/api/v1/sites", {"name": "Clinic"}),
        ("GET", "/api/v1/framework-usage", None),
        ("GET", "/api/v1/escalations", None),
    ]:
        reply = await admin.request(method, path, value)
        assert reply.status == 403, (path, reply.body)
        assert reply.code == "forbidden"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({}, id="no-name"),
        pytest.param({"name": ""}, id="empty-name"),
        pytest.param({"name": 1}, id="number-name"),
        pytest.param({"name": "MSP", "api_key": "mine"}, id="extra-member"),
    ],
)
async def test_bad_partner_refused(harness: Harness, value: dict[str, Any]) -> None:
    admin = await harness.admin()
    reply = await admin.request("POST", "/api/v1/partners", value)
    assert reply.status == 400, reply.body
    assert reply.code == "malformed-document"
    assert (await admin.request("GET", "/api/v1/partners")).body["items"] == []


async def test_credentials_are_required(harness: Harness) -> None:
    partner = await harness.partner()
    for headers, code in [
        ({}, "missing-credentials"),
        ({"Authorization": f"Basic {partner.key}"}, "bad-credentials"),
        ({"Authorization": "Bearer "}, "bad-credentials"),
        ({"Authorization": f"Bearer {partner.key}x"}, "bad-credentials"),
    ]:
        for method, path in [
            ("GET", "/api/v1/partner"),
            ("GET", "/api/v1/sites"),
            ("POST", "/api/v1/partners"),
        ]:
            reply = await call(harness.client, method, path, headers=headers)
            assert reply.status == 401, (headers, path, reply.body)
            assert reply.code == code


# --- request bodies -------------------------------------------------------------------


def _padded(value: dict[str, Any], size: int) -> bytes:
    """``value`` as JSON, padded with insignificant whitespace to ``size`` bytes."""
    text = json.dumps(value).encode()
    assert len(text) <= size
    return text + b" " * (size - len(text))


async def test_body_at_the_limit_is_read(harness: Harness) -> None:
    partner = await harness.partner()
    body = _padded({"tier": "full"}, MIB)
    reply = await send(partner, "PUT", "/api/v1/partner/defaults", body)
    assert reply.status == 200, reply.body
    assert reply.body["defaults"]["tier"] == "full"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/api/v1/partner/defaults"),
        ("POST", "/api/v1/sites"),
        ("POST", "/api/v1/partner/apply-preset"),
    ],
)
async def test_oversized_body(harness: Harness, method: str, path: str) -> None:
    partner = await harness.partner()
    before = await set_defaults(partner, tier="full")
    body = _padded({"name": "Big", "tier": "basic"}, MIB + 1)
    reply = await send(partner, method, path, body)
    assert reply.status == 413, reply.body
    assert reply.code == "body-too-large"
    assert await get_defaults(partner) == before
    assert (await partner.request("GET", "/api/v1/sites")).body["items"] == []


async def test_oversized_chunked_body(harness: Harness) -> None:
    """Without a Content-Length the limit still holds."""
    partner = await harness.partner()
    before = await set_defaults(partner, tier="full")

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"tier": "basic"'
        for _ in range(MIB // 65536 + 1):
            yield b" " * 65536
        yield b"}"

    response = await harness.client.put(
        "/api/v1/partner/defaults",
        data=chunks(),
        headers={"Authorization": f"Bearer {partner.key}", "Content-Type": "application/json"},
    )
    raw = await response.read()
    check_response("PUT", "/api/v1/partner/defaults", response.status, response.content_type, raw)
    assert response.status == 413, raw
    assert json.loads(raw)["code"] == "body-too-large"
    assert await get_defaults(partner) == before
