"""Signed evidence and exports for partners and auditors, and the two
public documents: the central key an auditor verifies them with and the
OpenAPI description of the API."""

from __future__ import annotations

import sqlalchemy as sa
from aiohttp import web

from msp_central.auth import require_partner
from msp_central.context import central, download
from msp_central.db.engine import read_only
from msp_central.db.tables import appliances
from msp_central.exports import audit_export, evidence_export
from msp_central.openapi import document
from msp_central.packages import auditor_package, package_request
from msp_central.params import checked_query
from msp_central.problems import Problem
from msp_central.queries import get_partner, get_site
from msp_protocol.canonical import canonicalize

routes = web.RouteTableDef()

# Where the central public key is published, in the form msp-verify's
# --central-key-file reads: 64 lowercase hex characters and a newline.
CENTRAL_KEY_PATH = "/.well-known/msp-central-key"


@routes.get(CENTRAL_KEY_PATH)
async def central_key(request: web.Request) -> web.Response:
    checked_query(request)  # none declared: any is refused
    return web.Response(text=central(request).root.verify_key.hex + "\n", content_type="text/plain")


@routes.get("/api/v1/openapi.json")
async def serve_document(request: web.Request) -> web.Response:
    checked_query(request)  # none declared: any is refused
    return web.Response(body=canonicalize(document()), content_type="application/json")


@routes.get("/api/v1/sites/{site_id}/evidence/{appliance_id}/{bundle_id}")
async def get_evidence(request: web.Request) -> web.Response:
    """One bundle as an evidence export (``msp-verify`` checks it offline)."""
    holder = await require_partner(request)
    info = request.match_info
    async with read_only(central(request).engine) as connection:
        site = await get_site(connection, info["site_id"], holder.partner_id)
        body = await evidence_export(
            connection,
            site_id=site.id,
            appliance_id=info["appliance_id"],
            bundle_id=info["bundle_id"],
        )
    return download(body, f"evidence-{info['bundle_id']}.json")


@routes.get("/api/v1/sites/{site_id}/auditor-package")
async def get_auditor_package(request: web.Request) -> web.Response:
    """A site's signed evidence for some frameworks and a period, with the
    proofs and a summary, in one file msp-verify checks offline."""
    holder = await require_partner(request)
    service = central(request)
    now = service.clock()
    async with read_only(service.engine) as connection:
        site = await get_site(connection, request.match_info["site_id"], holder.partner_id)
        partner = await get_partner(connection, site.partner_id)
        # Parsed as the document declares them (any RFC 3339 offset).
        query = checked_query(request)
        asked = package_request(
            site,
            partner,
            frameworks=query.get("framework", []),
            start=query.get("from"),
            end=query.get("to"),
            now=now,
        )
        body = await auditor_package(connection, asked, now)
    day = asked.period_end.date().isoformat()
    return download(body, f"auditor-package-{site.id}-{day}.json")


@routes.get("/api/v1/sites/{site_id}/appliances/{appliance_id}/audit-export")
async def get_audit_export(request: web.Request) -> web.Response:
    """An appliance's audit log as the server witnessed it, in the format of
    ``msp-agent audit export``: no shell on the appliance needed. One
    generation of it: ``?generation=N``, default the current one."""
    holder = await require_partner(request)
    service = central(request)
    info = request.match_info
    async with read_only(service.engine) as connection:
        site = await get_site(connection, info["site_id"], holder.partner_id)
        found = (
            await connection.execute(
                sa.select(appliances.c.id).where(
                    appliances.c.id == info["appliance_id"], appliances.c.site_id == site.id
                )
            )
        ).scalar_one_or_none()
        if found is None:
            raise Problem("not-found", f"no appliance {info['appliance_id'][:64]}")
        body = await audit_export(
            connection, found, service.clock(), generation=checked_query(request).get("generation")
        )
    return download(body, f"audit-export-{found}.json")
