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
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection

from msp_central.api_models import SiteOverrides
from msp_central.app import create_app
from msp_central.central_log import CLI_ACTOR, central_log_export, record, record_revocation
from msp_central.config import ConfigError, Settings, load_settings
from msp_central.context import load_root_key, write_root_key
from msp_central.db.engine import create_engine, read_only
from msp_central.db.migrate import DatabaseVersionError, check_current, upgrade
from msp_central.demo import DemoError, run_demo
from msp_central.exports import audit_export
from msp_central.packages import auditor_package, package_request
from msp_central.problems import Problem
from msp_central.queries import (
    create_api_key,
    create_enrollment_token,
    create_partner,
    create_site,
    get_partner,
    get_site,
    revoke_certificate,
)
from msp_protocol.encoding import format_time, parse_time, utc_now
from msp_protocol.errors import MalformedError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msp-central", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="settings file (.toml or .json)")
    parser.add_argument("--state-dir", type=Path, help="overrides state_dir")
    parser.add_argument("--database-url", help="overrides database_url")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--migrate", action="store_true", help="apply migrations first")
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

    admin = commands.add_parser("admin-key", help="admin API keys").add_subparsers(
        dest="action", required=True
    )
    admin.add_parser("create", help="create an admin API key; printed once")

    site = commands.add_parser("site", help="sites").add_subparsers(dest="action", required=True)
    site_create = site.add_parser("create", help="create a site for a partner")
    site_create.add_argument("--partner", required=True)
    site_create.add_argument("name")

    token = commands.add_parser("token", help="enrollment tokens").add_subparsers(
        dest="action", required=True
    )
    token_create = token.add_parser("create", help="a one-time enrollment token for a site")
    token_create.add_argument("--site", required=True)
    token_create.add_argument("--hours", type=int)

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
    web.run_app(
        create_app(settings, root=load_root_key(settings.key_file)),
        host=settings.host,
        port=settings.port,
        print=None,
        shutdown_timeout=10,
        reuse_port=reuse_port,
    )


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Alembic announces its context at INFO whenever the revision is read
    # (check_current): only a migration is worth a line.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _worker(settings: Settings) -> None:
    _configure_logging()

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
    )
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
        case "admin-key", "create":

            async def admin(connection: AsyncConnection) -> dict[str, Any]:
                return {"api_key": await create_api_key(connection, "admin", None, now)}

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
                secret, expires = await create_enrollment_token(
                    connection, args.site, lifetime, now
                )
                await _record(
                    connection,
                    settings,
                    now,
                    "token.created",
                    {"site_id": args.site, "expires_at": format_time(expires)},
                    partner_id=owner.partner_id,
                    site_id=args.site,
                )
                return {"token": secret, "site_id": args.site, "expires_at": expires.isoformat()}

            _print(asyncio.run(_with_db(settings, token)))
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
