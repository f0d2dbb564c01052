"""Manual evidence: documents partners attach to controls no check covers
(a policy, a training record), each recorded in the central log so it
cannot be swapped later; and the central log's export for administrators."""

from __future__ import annotations

import hashlib
from typing import Any

import sqlalchemy as sa
from aiohttp import web

from msp_central.api_models import ManualEvidenceIn, ManualEvidenceOut
from msp_central.auth import require_admin, require_partner
from msp_central.central_log import actor_of, central_log_export, record, record_proof
from msp_central.context import central, download, json_response, parse_body, read_body
from msp_central.db.engine import read_only, write
from msp_central.db.tables import controls, manual_evidence
from msp_central.pagination import Keyset, fetch_page, page_request, page_response
from msp_central.problems import Problem
from msp_central.queries import get_partner, get_site, new_id
from msp_protocol.encoding import b64decode, format_time
from msp_protocol.errors import MalformedError

routes = web.RouteTableDef()

# What a browser may render inline from a partner's upload: nothing. Every
# document is a download, whatever type it claims.
DOCUMENT_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}


def document_body_limit(document_bytes: int) -> int:
    """The body that carries a document of ``document_bytes``: base64 takes
    4 bytes per 3, the rest of the body is small."""
    return (document_bytes + 2) // 3 * 4 + 64 * 1024


def manual_out(row: Any, now: Any) -> ManualEvidenceOut:
    return ManualEvidenceOut(
        id=row.id,
        site_id=row.site_id,
        framework_id=row.framework_id,
        control_id=row.control_id,
        filename=row.filename,
        media_type=row.media_type,
        size=int(row.size),
        sha256=row.sha256,
        note=row.note,
        attached_by=row.attached_by,
        attached_at=row.attached_at,
        expires_at=row.expires_at,
        in_force=row.attached_at <= now and (row.expires_at is None or now < row.expires_at),
        log_index=int(row.log_index),
    )


_METADATA = [c for c in manual_evidence.c if c.name != "content"]


@routes.post("/api/v1/sites/{site_id}/manual-evidence")
async def attach(request: web.Request) -> web.Response:
    """Attach a document to a control of one of the site's frameworks."""
    holder = await require_partner(request)
    service = central(request)
    limit = service.settings.max_document_bytes
    body_limit = document_body_limit(limit)
    body = parse_body(await read_body(request, body_limit), ManualEvidenceIn, request, body_limit)
    try:
        content = b64decode(body.content, what="content")
    except MalformedError as exc:
        raise Problem("malformed-document", str(exc)) from None
    if len(content) > limit:
        raise Problem("body-too-large", f"document of {len(content)} bytes, limit {limit}")
    now = service.clock()
    if body.expires_at is not None and body.expires_at <= now:
        raise Problem("malformed-document", "expires_at is in the past")
    digest = hashlib.sha256(content).hexdigest()
    attachment_id = new_id("doc")
    actor = actor_of(holder)
    async with write(service.engine) as connection:
        site = await get_site(connection, request.match_info["site_id"], holder.partner_id)
        partner = await get_partner(connection, site.partner_id)
        used = site.frameworks if site.frameworks is not None else partner.frameworks
        if body.framework_id not in used:
            raise Problem(
                "malformed-document",
                f"framework {body.framework_id} is not one this site uses",
            )
        known = (
            await connection.execute(
                sa.select(controls.c.control_id).where(
                    controls.c.framework_id == body.framework_id,
                    controls.c.control_id == body.control_id,
                )
            )
        ).first()
        if known is None:
            raise Problem(
                "malformed-document",
                f"framework {body.framework_id} has no control {body.control_id[:64]}",
            )
        data: dict[str, Any] = {
            "attachment_id": attachment_id,
            "site_id": site.id,
            "framework_id": body.framework_id,
            "control_id": body.control_id,
            "filename": body.filename,
            "media_type": body.media_type,
            "size": len(content),
            "sha256": digest,
        }
        if body.expires_at is not None:
            data["expires_at"] = format_time(body.expires_at)
        index = await record(
            connection,
            service.root,
            kind="evidence.attached",
            actor=actor,
            data=data,
            now=now,
            partner_id=site.partner_id,
            site_id=site.id,
        )
        await connection.execute(
            sa.insert(manual_evidence).values(
                id=attachment_id,
                site_id=site.id,
                framework_id=body.framework_id,
                control_id=body.control_id,
                filename=body.filename,
                media_type=body.media_type,
                size=len(content),
                sha256=digest,
                note=body.note,
                attached_by=actor,
                attached_at=now,
                expires_at=body.expires_at,
                log_index=index,
                content=content,
            )
        )
        row = (
            await connection.execute(
                sa.select(*_METADATA).where(manual_evidence.c.id == attachment_id)
            )
        ).one()
    return json_response(manual_out(row, now), status=201)


_ORDER = Keyset([(manual_evidence.c.attached_at, "desc"), (manual_evidence.c.id, "asc")])


@routes.get("/api/v1/sites/{site_id}/manual-evidence")
async def list_attachments(request: web.Request) -> web.Response:
    """The site's attachments, the newest first, a page at a time."""
    holder = await require_partner(request)
    page = page_request(request, _ORDER)
    service = central(request)
    async with read_only(service.engine) as connection:
        site = await get_site(connection, request.match_info["site_id"], holder.partner_id)
        query = sa.select(*_METADATA).where(manual_evidence.c.site_id == site.id)
        rows, cursor = await fetch_page(connection, query, _ORDER, page)
    now = service.clock()
    return page_response(request, [manual_out(row, now) for row in rows], cursor)


async def _attachment(request: web.Request, *columns: Any) -> Any:
    holder = await require_partner(request)
    async with read_only(central(request).engine) as connection:
        site = await get_site(connection, request.match_info["site_id"], holder.partner_id)
        attachment_id = request.match_info["attachment_id"]
        row = (
            await connection.execute(
                sa.select(*columns).where(
                    manual_evidence.c.id == attachment_id, manual_evidence.c.site_id == site.id
                )
            )
        ).first()
    if row is None:
        raise Problem("not-found", f"no manual evidence {attachment_id[:64]}")
    return row


@routes.get("/api/v1/sites/{site_id}/manual-evidence/{attachment_id}")
async def get_attachment(request: web.Request) -> web.Response:
    row = await _attachment(request, *_METADATA)
    return json_response(manual_out(row, central(request).clock()))


@routes.get("/api/v1/sites/{site_id}/manual-evidence/{attachment_id}/document")
async def get_document(request: web.Request) -> web.Response:
    """The document exactly as attached (its SHA-256 is in the central log)."""
    row = await _attachment(
        request, manual_evidence.c.filename, manual_evidence.c.media_type, manual_evidence.c.content
    )
    safe_name = "".join(c if c.isalnum() or c in "._-" else "_" for c in row.filename)[:100]
    return web.Response(
        body=bytes(row.content),
        content_type=row.media_type,
        headers={**DOCUMENT_HEADERS, "Content-Disposition": f'attachment; filename="{safe_name}"'},
    )


@routes.get("/api/v1/sites/{site_id}/manual-evidence/{attachment_id}/proof")
async def get_proof(request: web.Request) -> web.Response:
    """The attachment's central log entry with its inclusion proof and the
    root-signed checkpoint: verifiable with only the central public key."""
    row = await _attachment(request, manual_evidence.c.log_index)
    async with read_only(central(request).engine) as connection:
        proof = await record_proof(connection, int(row.log_index))
    return web.Response(body=proof, content_type="application/json")


@routes.get("/api/v1/central-log/export")
async def export_central_log(request: web.Request) -> web.Response:
    """The whole central log (every partner's actions: administrators only)."""
    await require_admin(request)
    service = central(request)
    async with read_only(service.engine) as connection:
        body = await central_log_export(connection, service.clock())
    return download(body, "central-log-export.json")
