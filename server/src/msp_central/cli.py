"""``msp-central``: serve, migrate, and the administrator's one-off tasks.

Every failure is one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central.api_models import SiteOverrides
from msp_central.app import create_app
from msp_central.central_log import CLI_ACTOR, central_log_export, record, record_revocation
from msp_central.config import ConfigError, Settings, load_settings
from msp_central.console.accounts import create_invite, normalise_email
from msp_central.context import load_root_key, write_root_key
from msp_central.db.engine import create_engine, read_only
from msp_central.db.migrate import DatabaseVersionError, check_current, upgrade
from msp_central.db.tables import (
    api_keys,
    appliances,
    audit_logs,
    enrollment_tokens,
    partners,
    sites,
    users,
)
from msp_central.demo import DemoError, run_demo
from msp_central.exports import audit_export
from msp_central.packages import auditor_package, package_request
from msp_central.problems import Problem
from msp_central.queries import (
    api_key_out,
    create_api_key,
    create_partner,
    create_site,
    get_partner,
    get_site,
    issue_api_key,
    issue_enrollment_token,
    require_active,
    revoke_certificate,
    token_out,
)
from msp_central.routes.users import invite_link
from msp_central.serving import install_redaction, serve
from msp_protocol.encoding import format_time, parse_time, utc_now
from msp_protocol.errors import MalformedError
from msp_protocol.logformat import JsonLineFormatter


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line, like every other failure (exit status 2,
    as argparse has it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="msp-central",
        description="serve, migrate, and the administrator's one-off tasks",
    )
    parser.add_argument("--config", type=Path, help="settings file (.toml or .json)")
    parser.add_argument("--state-dir", type=Path, help="overrides state_dir")
    parser.add_argument("--database-url", help="overrides database_url")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--migrate", action="store_true", help="apply migrations first")
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="overrides log_format (json: one object a line)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT); all state is in the database",
    )

    db = commands.add_parser("db", help="database").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="apply pending migrations")

    keys = commands.add_parser("keys", help="the central root key and certificates")
    key_actions = keys.add_subparsers(dest="action", required=True)
    key_actions.add_parser("init", help="create the central root key (refuses to overwrite)")
    show = key_actions.add_parser("show", help="print the root public key and key id")
    show.add_argument(
        "--hex",
        action="store_true",
        help="print only the public key, as msp-verify --central-key-file reads it",
    )
    revoke = key_actions.add_parser("revoke", help="revoke an appliance certificate")
    revoke.add_argument("serial")
    revoke.add_argument("--reason", default="")

    partner = commands.add_parser("partner", help="partners").add_subparsers(
        dest="action", required=True
    )
    create = partner.add_parser("create", help="create a partner; prints its API key once")
    create.add_argument("name")
    partner.add_parser("list", help="list partners")

    admin = commands.add_parser("admin-key", help="admin API keys").add_subparsers(
        dest="action", required=True
    )
    admin.add_parser("create", help="create an admin API key; printed once")

    site = commands.add_parser("site", help="sites").add_subparsers(dest="action", required=True)
    site_create = site.add_parser("create", help="create a site for a partner")
    site_create.add_argument("--partner", required=True)
    site_create.add_argument("name")
    site_list = site.add_parser("list", help="list sites, decommissioned ones too")
    site_list.add_argument("--partner", help="only this partner's sites")

    token = commands.add_parser("token", help="enrollment tokens").add_subparsers(
        dest="action", required=True
    )
    token_create = token.add_parser("create", help="a one-time enrollment token for a site")
    token_create.add_argument("--site", required=True)
    token_create.add_argument("--hours", type=int)
    token_list = token.add_parser("list", help="a site's enrollment tokens (never the secrets)")
    token_list.add_argument("--site", required=True)

    key = commands.add_parser("key", help="partner API keys").add_subparsers(
        dest="action", required=True
    )
    key_list = key.add_parser("list", help="API keys (never the secrets)")
    key_list.add_argument("--partner", help="only this partner's keys")
    key_create = key.add_parser("create", help="another API key for a partner; printed once")
    key_create.add_argument("--partner", required=True)
    key_create.add_argument("--name", default="", help="what the key is for")
    key_revoke = key.add_parser("revoke", help="revoke an API key now")
    key_revoke.add_argument("key_id")

    user = commands.add_parser("user", help="console users").add_subparsers(
        dest="action", required=True
    )
    user_invite = user.add_parser(
        "invite", help="invite someone to a partner's console; prints the one-time link"
    )
    user_invite.add_argument("--partner", required=True)
    user_invite.add_argument("--email", required=True)
    user_invite.add_argument("--role", choices=("admin", "editor", "viewer"), default="admin")
    user_invite.add_argument(
        "--url", help="the console's address as users reach it (default: public_url, or host:port)"
    )
    user_list = user.add_parser("list", help="console users and their roles")
    user_list.add_argument("--partner", help="only this partner's users")

    appliance = commands.add_parser("appliance", help="appliances").add_subparsers(
        dest="action", required=True
    )
    appliance_list = appliance.add_parser("list", help="enrolled appliances")
    appliance_list.add_argument("--site", help="only this site's appliances")

    export = commands.add_parser(
        "export", help="signed exports for auditors, checked with msp-verify"
    ).add_subparsers(dest="action", required=True)
    package = export.add_parser(
        "package", help="an auditor package: a site's evidence for frameworks and a period"
    )
    package.add_argument("--site", required=True)
    package.add_argument(
        "--framework",
        action="append",
        default=[],
        help="a framework to include (repeatable; default: every one the site uses)",
    )
    package.add_argument(
        "--from",
        dest="start",
        help="the period's start, RFC 3339 (default: 90 days before its end)",
    )
    package.add_argument(
        "--to", dest="end", help="the period's end, exclusive, RFC 3339 (default: now)"
    )
    package.add_argument("-o", "--output", type=Path, required=True, help="the file to write")
    export.add_parser(
        "central-log", help="the central server's own audit log (every partner's actions)"
    ).add_argument("-o", "--output", type=Path, required=True, help="the file to write")
    audit = export.add_parser("audit", help="an appliance's audit log as the server witnessed it")
    audit.add_argument("--appliance", required=True)
    audit.add_argument("-o", "--output", type=Path, required=True, help="the file to write")

    demo = commands.add_parser(
        "demo", help="a local server with a demo partner, site and enrolled agents"
    )
    demo.add_argument("--agents", type=int, default=2, help="how many appliance agents (1-8)")
    demo.add_argument("--dir", type=Path, default=Path("demo-state"), help="where all state lives")
    demo.add_argument("--port", type=int, default=8080)
    return parser


def _print(value: dict[str, Any]) -> None:
    print(json.dumps(value, indent=2, default=str))


def _table(result: dict[str, Any]) -> None:
    """Print ``{"columns": [...], "rows": [[...], ...]}`` as aligned
    columns under a header, one line per row."""
    columns: list[str] = result["columns"]
    rows = [["-" if cell in (None, "") else str(cell) for cell in row] for row in result["rows"]]
    widths = [max(len(text) for text in column) for column in zip(columns, *rows, strict=True)]
    for line in [columns, *rows]:
        print(
            "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        )


def _when(moment: datetime | None) -> str | None:
    return format_time(moment) if moment is not None else None


async def _with_db(
    settings: Settings,
    work: Callable[[AsyncConnection], Awaitable[dict[str, Any]]],
    *,
    reading: bool = False,
) -> dict[str, Any]:
    """Run ``work`` in one transaction; ``reading`` ones take a snapshot that
    never holds up the server's writers (an export may take a while)."""
    engine = create_engine(settings.resolved_database_url())
    try:
        await check_current(engine)
        if reading:
            async with read_only(engine) as connection:
                return await work(connection)
        async with engine.begin() as connection:
            return await work(connection)
    finally:
        await engine.dispose()


async def _upgrade(settings: Settings) -> str:
    engine = create_engine(settings.resolved_database_url())
    logging.getLogger("alembic").setLevel(logging.INFO)  # report the migrations run
    try:
        return await upgrade(engine)
    finally:
        logging.getLogger("alembic").setLevel(logging.WARNING)
        await engine.dispose()


def _serve(settings: Settings, *, reuse_port: bool = False) -> None:
    # Not web.run_app: its runner answers requests that do not parse as
    # text/plain echoing them (serving.ProblemAppRunner).
    serve(
        create_app(settings, root=load_root_key(settings.key_file)),
        host=settings.host,
        port=settings.port,
        shutdown_timeout=10,
        reuse_port=reuse_port,
    )


_TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=_TEXT_FORMAT)
    # No credential reaches the log, whatever a request carried.
    install_redaction()
    # Alembic announces its context at INFO whenever the revision is read
    # (check_current): only a migration is worth a line.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def configure_log_format(
    log_format: str, handlers: Sequence[logging.Handler] | None = None
) -> None:
    """Format ``handlers`` (default: the root logger's) as ``log_format``
    says: ``text`` lines or one JSON object a line. Their filters, the
    credential redaction among them, apply to either."""
    formatter = JsonLineFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT)
    for handler in handlers if handlers is not None else logging.getLogger().handlers:
        handler.setFormatter(formatter)


def _worker(settings: Settings) -> None:
    _configure_logging()
    configure_log_format(settings.log_format)

    def serve() -> int:
        _serve(settings, reuse_port=True)
        return 0

    code = _one_line_errors(serve)
    if code:
        raise SystemExit(code)


def _serve_workers(settings: Settings, count: int) -> int:
    """Run ``count`` replicas of the server in child processes on one port.
    They share nothing but the database, exactly like replicas behind a load
    balancer. If one dies, all stop (and the service manager restarts them);
    SIGTERM or SIGINT stops all cleanly."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(settings,)) for _ in range(count)]
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: aiohttp shuts down gracefully

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for worker in workers:
        worker.start()
    failed = False
    while any(worker.is_alive() for worker in workers):
        for worker in workers:
            worker.join(timeout=0.5)
            if worker.exitcode not in (None, 0) and not stopping:
                failed = True
                stop(signal.SIGTERM, None)
    return 1 if failed else 0


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = load_settings(
        args.config,
        state_dir=args.state_dir,
        database_url=args.database_url,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        log_format=getattr(args, "log_format", None),
    )
    configure_log_format(settings.log_format)
    now = utc_now()
    match args.command, getattr(args, "action", None):
        case "serve", _:
            if args.migrate:
                revision = asyncio.run(_upgrade(settings))
                logging.getLogger("msp_central").info("database at revision %s", revision)
            if not 1 <= args.workers <= 64:
                raise ValueError(f"--workers {args.workers}: use 1 to 64")
            key = load_root_key(settings.key_file)
            print(
                f"msp-central: serving on http://{settings.host}:{settings.port} "
                f"(root key {key.key_id})"
                + (f" with {args.workers} worker processes" if args.workers > 1 else ""),
                file=sys.stderr,
            )
            if args.workers == 1:
                _serve(settings)
            else:
                return _serve_workers(settings, args.workers)
        case "db", "upgrade":
            print(f"database at revision {asyncio.run(_upgrade(settings))}")
        case "keys", "init":
            key = write_root_key(settings.key_file)
            _print(
                {
                    "key_file": str(settings.key_file),
                    "key_id": key.key_id,
                    "public_key": key.verify_key.hex,
                }
            )
        case "keys", "show":
            key = load_root_key(settings.key_file)
            if args.hex:
                print(key.verify_key.hex)
            else:
                _print({"key_id": key.key_id, "public_key": key.verify_key.hex})
        case "keys", "revoke":
            root = load_root_key(settings.key_file)

            async def revoke(connection: AsyncConnection) -> dict[str, Any]:
                result = await revoke_certificate(connection, root, args.serial, args.reason, now)
                await record_revocation(connection, root, result, args.reason, CLI_ACTOR, now)
                return result.model_dump(mode="json")

            _print(asyncio.run(_with_db(settings, revoke)))
        case "partner", "create":

            async def partner(connection: AsyncConnection) -> dict[str, Any]:
                row, key = await create_partner(connection, args.name, now)
                await _record(
                    connection,
                    settings,
                    now,
                    "partner.created",
                    {"partner_id": row.id, "name": row.name},
                    partner_id=row.id,
                )
                return {"partner_id": row.id, "name": row.name, "api_key": key}

            _print(asyncio.run(_with_db(settings, partner)))
        case "user", "invite":
            base = args.url or settings.public_url or f"http://{settings.host}:{settings.port}"
            base = base.rstrip("/")
            if not base.startswith(("http://", "https://")):
                raise ValueError(
                    f"--url {base[:80]}: an http(s) URL such as https://central.example"
                )

            async def invite(connection: AsyncConnection) -> dict[str, Any]:
                await get_partner(connection, args.partner)
                invite_id, token, expires = await create_invite(
                    connection,
                    partner_id=args.partner,
                    email=args.email,
                    role=args.role,
                    actor=CLI_ACTOR,
                    now=now,
                    lifetime=timedelta(hours=settings.console_invite_hours),
                )
                await _record(
                    connection,
                    settings,
                    now,
                    "user.invited",
                    {
                        "invite_id": invite_id,
                        "email": normalise_email(args.email),
                        "role": args.role,
                    },
                    partner_id=args.partner,
                )
                return {
                    "invite_id": invite_id,
                    "link": invite_link(base, token),
                    "expires_at": format_time(expires),
                }

            _print(asyncio.run(_with_db(settings, invite)))
        case "user", "list":

            async def people(connection: AsyncConnection) -> dict[str, Any]:
                query = sa.select(users).where(users.c.removed_at.is_(None))
                if args.partner:
                    query = query.where(users.c.partner_id == args.partner)
                rows = (await connection.execute(query.order_by(users.c.created_at))).all()
                return {
                    "columns": ["user", "partner", "email", "role", "two-factor", "created"],
                    "rows": [
                        [
                            r.id,
                            r.partner_id,
                            r.email,
                            r.role,
                            "on" if r.totp_enabled else "off",
                            _when(r.created_at),
                        ]
                        for r in rows
                    ],
                }

            _table(asyncio.run(_with_db(settings, people, reading=True)))
        case "admin-key", "create":

            async def admin(connection: AsyncConnection) -> dict[str, Any]:
                key = await create_api_key(connection, "admin", None, now, created_by=CLI_ACTOR)
                return {"api_key": key}

            _print(asyncio.run(_with_db(settings, admin)))
        case "site", "create":

            async def site(connection: AsyncConnection) -> dict[str, Any]:
                await get_partner(connection, args.partner)
                row = await create_site(connection, args.partner, args.name, SiteOverrides(), now)
                await _record(
                    connection,
                    settings,
                    now,
                    "site.created",
                    {"site_id": row.id, "name": row.name},
                    partner_id=row.partner_id,
                    site_id=row.id,
                )
                return {"site_id": row.id, "partner_id": row.partner_id, "name": row.name}

            _print(asyncio.run(_with_db(settings, site)))
        case "token", "create":

            async def token(connection: AsyncConnection) -> dict[str, Any]:
                owner = await get_site(connection, args.site)
                lifetime = settings.enrollment_token_lifetime
                if args.hours is not None and not 1 <= args.hours <= 24 * 30:
                    raise ValueError(f"--hours {args.hours}: a token lives 1 to 720 hours")
                if args.hours is not None:
                    lifetime = timedelta(hours=args.hours)
                require_active(owner, "enrollment")
                secret, row = await issue_enrollment_token(
                    connection, args.site, lifetime, now, created_by=CLI_ACTOR
                )
                await _record(
                    connection,
                    settings,
                    now,
                    "token.created",
                    {
                        "site_id": args.site,
                        "token_id": row.id,
                        "expires_at": format_time(row.expires_at),
                    },
                    partner_id=owner.partner_id,
                    site_id=args.site,
                )
                return {
                    "token_id": row.id,
                    "token": secret,
                    "site_id": args.site,
                    "expires_at": row.expires_at.isoformat(),
                }

            _print(asyncio.run(_with_db(settings, token)))
        case "partner", "list":
            _table(asyncio.run(_with_db(settings, _list_partners, reading=True)))
        case "site", "list":
            _table(
                asyncio.run(
                    _with_db(settings, lambda c: _list_sites(c, args.partner), reading=True)
                )
            )
        case "token", "list":
            _table(
                asyncio.run(
                    _with_db(settings, lambda c: _list_tokens(c, args.site, now), reading=True)
                )
            )
        case "key", "list":
            _table(
                asyncio.run(
                    _with_db(settings, lambda c: _list_keys(c, args.partner, now), reading=True)
                )
            )
        case "appliance", "list":
            _table(
                asyncio.run(
                    _with_db(settings, lambda c: _list_appliances(c, args.site), reading=True)
                )
            )
        case "key", "create":

            async def create_key(connection: AsyncConnection) -> dict[str, Any]:
                await get_partner(connection, args.partner)
                if len(args.name) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in args.name):
                    raise ValueError("--name: at most 200 printable characters")
                secret, row = await issue_api_key(
                    connection, "partner", args.partner, now, name=args.name, created_by=CLI_ACTOR
                )
                await _record(
                    connection,
                    settings,
                    now,
                    "key.created",
                    {"key_id": row.id, "prefix": row.prefix, "name": row.name},
                    partner_id=args.partner,
                )
                return {"key_id": row.id, "partner_id": args.partner, "api_key": secret}

            _print(asyncio.run(_with_db(settings, create_key)))
        case "key", "revoke":

            async def revoke_key(connection: AsyncConnection) -> dict[str, Any]:
                row = (
                    await connection.execute(
                        sa.select(api_keys).where(api_keys.c.id == args.key_id)
                    )
                ).first()
                if row is None:
                    raise ValueError(f"no API key {args.key_id[:64]}")
                if row.revoked_at is None or row.revoked_at > now:
                    await connection.execute(
                        sa.update(api_keys).where(api_keys.c.id == row.id).values(revoked_at=now)
                    )
                    await _record(
                        connection,
                        settings,
                        now,
                        "key.revoked",
                        {"key_id": row.id, "prefix": row.prefix},
                        partner_id=row.partner_id,
                    )
                    row = (
                        await connection.execute(sa.select(api_keys).where(api_keys.c.id == row.id))
                    ).one()
                return api_key_out(row, now).model_dump(mode="json")

            _print(asyncio.run(_with_db(settings, revoke_key)))
        case "export", "package":

            async def export_package(connection: AsyncConnection) -> dict[str, Any]:
                site = await get_site(connection, args.site)
                request = package_request(
                    site,
                    await get_partner(connection, site.partner_id),
                    frameworks=args.framework,
                    start=_time(args.start, "--from"),
                    end=_time(args.end, "--to"),
                    now=now,
                )
                return _write_export(args.output, await auditor_package(connection, request, now))

            _print(asyncio.run(_with_db(settings, export_package, reading=True)))
        case "export", "audit":

            async def export_audit(connection: AsyncConnection) -> dict[str, Any]:
                return _write_export(
                    args.output, await audit_export(connection, args.appliance, now)
                )

            _print(asyncio.run(_with_db(settings, export_audit, reading=True)))
        case "export", "central-log":

            async def export_central_log(connection: AsyncConnection) -> dict[str, Any]:
                return _write_export(args.output, await central_log_export(connection, now))

            _print(asyncio.run(_with_db(settings, export_central_log, reading=True)))
        case "demo", _:
            if not 1 <= args.agents <= 8:
                raise ValueError(f"--agents {args.agents}: use 1 to 8")
            run_demo(args.dir, agents=args.agents, host="127.0.0.1", port=args.port)
    return 0


# --- listings: {"columns": [...], "rows": [...]} for _table -----------------------------


async def _list_partners(connection: AsyncConnection) -> dict[str, Any]:
    site_count = (
        sa.select(sa.func.count())
        .where(sites.c.partner_id == partners.c.id)
        .scalar_subquery()
        .label("sites")
    )
    rows = await connection.execute(
        sa.select(partners, site_count).order_by(partners.c.created_at, partners.c.id)
    )
    return {
        "columns": ["ID", "NAME", "CREATED", "SITES"],
        "rows": [[r.id, r.name, _when(r.created_at), r.sites] for r in rows],
    }


async def _list_sites(connection: AsyncConnection, partner_id: str | None) -> dict[str, Any]:
    query = sa.select(sites).order_by(sites.c.created_at, sites.c.id)
    if partner_id is not None:
        await get_partner(connection, partner_id)
        query = query.where(sites.c.partner_id == partner_id)
    rows = await connection.execute(query)
    return {
        "columns": ["ID", "PARTNER", "NAME", "CREATED", "DECOMMISSIONED"],
        "rows": [
            [r.id, r.partner_id, r.name, _when(r.created_at), _when(r.decommissioned_at)]
            for r in rows
        ],
    }


async def _list_tokens(connection: AsyncConnection, site_id: str, now: datetime) -> dict[str, Any]:
    await get_site(connection, site_id)
    rows = await connection.execute(
        sa.select(enrollment_tokens)
        .where(enrollment_tokens.c.site_id == site_id)
        .order_by(enrollment_tokens.c.created_at, enrollment_tokens.c.id)
    )
    tokens = [token_out(r, now) for r in rows]
    return {
        "columns": ["ID", "STATE", "CREATED", "EXPIRES", "CREATED BY", "APPLIANCE"],
        "rows": [
            [t.id, t.state, _when(t.created_at), _when(t.expires_at), t.created_by, t.appliance_id]
            for t in tokens
        ],
    }


async def _list_keys(
    connection: AsyncConnection, partner_id: str | None, now: datetime
) -> dict[str, Any]:
    query = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
    if partner_id is not None:
        await get_partner(connection, partner_id)
        query = query.where(api_keys.c.partner_id == partner_id)
    rows = list(await connection.execute(query))
    keys = [(r.partner_id, api_key_out(r, now)) for r in rows]
    return {
        "columns": ["ID", "ROLE", "PARTNER", "NAME", "PREFIX", "STATE", "CREATED", "REVOKED"],
        "rows": [
            [k.id, k.role, p, k.name, k.prefix, k.state, _when(k.created_at), _when(k.revoked_at)]
            for p, k in keys
        ],
    }


async def _list_appliances(connection: AsyncConnection, site_id: str | None) -> dict[str, Any]:
    query = (
        sa.select(appliances, audit_logs.c.size)
        .outerjoin(audit_logs, audit_logs.c.appliance_id == appliances.c.id)
        .order_by(appliances.c.created_at, appliances.c.id)
    )
    if site_id is not None:
        await get_site(connection, site_id)
        query = query.where(appliances.c.site_id == site_id)
    rows = await connection.execute(query)

    def state(r: Any) -> str:
        if r.decommissioned_at is not None:
            return "decommissioned"
        return "revoked" if r.revoked_at is not None else "active"

    return {
        "columns": ["ID", "SITE", "STATE", "CREATED", "LAST SEEN", "WITNESSED", "SERIAL"],
        "rows": [
            [
                r.id,
                r.site_id,
                state(r),
                _when(r.created_at),
                _when(r.last_seen_at),
                int(r.size or 0),
                r.current_serial,
            ]
            for r in rows
        ],
    }


async def _record(
    connection: AsyncConnection,
    settings: Settings,
    now: datetime,
    kind: str,
    data: dict[str, Any],
    *,
    partner_id: str | None = None,
    site_id: str | None = None,
) -> None:
    """Record what the operator did in the central log, signed by the root key."""
    await record(
        connection,
        load_root_key(settings.key_file),
        kind=kind,
        actor=CLI_ACTOR,
        data=data,
        now=now,
        partner_id=partner_id,
        site_id=site_id,
    )


def _time(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_time(text, what=option)
    except MalformedError as exc:
        raise ValueError(str(exc)) from None


def _write_export(path: Path, body: bytes) -> dict[str, Any]:
    """Write an export whole or not at all (a temporary file renamed)."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("wb") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {"file": str(path), "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    return _one_line_errors(lambda: run(argv))


def _one_line_errors(work: Callable[[], int]) -> int:
    """Run ``work``; an error the operator can fix is one line on stderr and
    exit status 1, never a traceback."""
    try:
        return work()
    except (
        ConfigError,
        DatabaseVersionError,
        DemoError,
        FileExistsError,
        FileNotFoundError,
        PermissionError,
        ValueError,
    ) as exc:
        print(f"msp-central: {exc}", file=sys.stderr)
        return 1
    except Problem as problem:
        print(f"msp-central: {problem.detail}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"msp-central: {exc}", file=sys.stderr)
        return 1
    except sqlalchemy.exc.DBAPIError as exc:
        detail = str(exc.orig or exc).strip().splitlines()[0]
        print(f"msp-central: database error: {detail}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
