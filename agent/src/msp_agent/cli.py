"""``msp-agent``: the appliance agent's service and its operator commands.

    msp-agent [--config FILE] run
    msp-agent [--config FILE] enroll [--server URL] --token-file FILE|- | --token TOKEN
    msp-agent [--config FILE] status [--json]
    msp-agent [--config FILE] audit verify
    msp-agent [--config FILE] audit export OUT
    msp-agent [--config FILE] evidence verify FILE
    msp-agent [--config FILE] keys rotate

Every failure is one line on stderr and a non-zero exit status: 1 when
something does not verify or cannot be done, 2 for a usage error.

Run the commands as the agent's user (``msp`` on NixOS): the key files must
belong to whoever reads them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pwd
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from msp_agent.audit import verify_database
from msp_agent.central import CentralRejected, CentralUnavailable
from msp_agent.central_url import normalize_central_url
from msp_agent.config import AgentSettings, ConfigError, load_settings
from msp_agent.export import ExportError, export_audit, verify_evidence_file
from msp_agent.http_client import HttpCentralClient
from msp_agent.keys import (
    CERTIFICATE_FILE,
    CertificateRejectedError,
    DelegatedSigningKey,
    KeyFileError,
    read_audit_row_key,
)
from msp_agent.results import RESULTS_FILE, failed_actions, failing_checks, read_results
from msp_agent.runtime import ROTATE_REQUEST_FILE, STATUS_FILE, enroll, run_service
from msp_agent.store import connect
from msp_protocol.encoding import utc_now
from msp_protocol.errors import ProtocolError
from msp_protocol.logformat import JsonLineFormatter

EXIT_FAILED = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """One line for the operator; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def _parser() -> argparse.ArgumentParser:
    # The docstring's first line, without its reStructuredText markup.
    description = __doc__.splitlines()[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="msp-agent", description=description)
    parser.add_argument("--config", type=Path, help="settings file (.json or .toml)")
    parser.add_argument("--state-dir", type=Path, help="overrides state_dir")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the agent service")
    enroll_parser = commands.add_parser("enroll", help="enroll with a one-time token")
    enroll_parser.add_argument("--server", help="central server URL (default: central_url)")
    token = enroll_parser.add_mutually_exclusive_group(required=True)
    token.add_argument(
        "--token",
        help="the one-time enrollment token (other users see it in ps: prefer --token-file)",
    )
    token.add_argument(
        "--token-file", type=Path, help="a file holding the token, or - to read it from stdin"
    )
    status = commands.add_parser("status", help="what the agent is doing")
    status.add_argument("--json", action="store_true", help="machine-readable")
    audit = commands.add_parser("audit", help="the audit trail").add_subparsers(
        dest="audit_command", required=True
    )
    audit.add_parser("verify", help="recompute the whole audit trail")
    export = audit.add_parser("export", help="write a bundle an auditor verifies offline")
    export.add_argument("out", type=Path)
    evidence = commands.add_parser("evidence", help="evidence bundles").add_subparsers(
        dest="evidence_command", required=True
    )
    verify = evidence.add_parser("verify", help="check a bundle against this appliance's log")
    verify.add_argument("file", type=Path)
    keys = commands.add_parser("keys", help="the device key").add_subparsers(
        dest="keys_command", required=True
    )
    keys.add_parser("rotate", help="ask the running agent to rotate its key")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config, state_dir=args.state_dir)
    except ConfigError as exc:
        print(f"msp-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if settings.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLineFormatter())
    handlers: dict[str, Callable[[argparse.Namespace, AgentSettings], int]] = {
        "run": lambda _a, s: run_service(s),
        "enroll": _enroll,
        "status": _status,
        "audit": _audit,
        "evidence": _evidence,
        "keys": _keys,
    }
    try:
        return handlers[args.command](args, settings)
    except CommandError as exc:
        print(f"msp-agent: {exc}", file=sys.stderr)
        return exc.status
    except ConfigError as exc:
        print(f"msp-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyFileError as exc:
        print(f"msp-agent: {_key_file_problem(exc, args.command, settings)}", file=sys.stderr)
        return EXIT_FAILED
    except CertificateRejectedError as exc:
        path = settings.key_dir / CERTIFICATE_FILE
        print(
            f"msp-agent: the stored certificate {path} is unusable ({exc}); "
            "restore it from backup, or remove it and re-enroll the appliance",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _key_file_problem(exc: KeyFileError, command: str, settings: AgentSettings) -> str:
    """The key file's own message, except its ``fix: chown`` advice when an
    operator command runs as another user than the service: handing the keys
    to that user would stop the service from reading them."""
    if command == "run" or "is owned by uid" not in str(exc):
        return str(exc)
    owner, example = "the owner of the state directory", ""
    with contextlib.suppress(OSError):
        uid = settings.state_dir.stat().st_uid
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            owner = f"uid {uid}, the owner of {settings.state_dir}"
        else:
            owner = f"{name}, the owner of {settings.state_dir}"
            example = f" (runuser -u {name} -- msp-agent ...)"
    return (
        f"the key files in {settings.key_dir} are not yours (uid {os.geteuid()}): "
        f"run this command as {owner}{example}, do not chown them"
    )


# --- enroll -------------------------------------------------------------------------------


def _enroll(args: argparse.Namespace, settings: AgentSettings) -> int:
    if args.server is None:
        server = settings.require_central_url()
    else:
        try:
            server = normalize_central_url(args.server)
        except ValueError as exc:
            raise CommandError(f"--server {args.server[:80]!r}: {exc}", EXIT_USAGE) from None
    token = _token(args)
    central = settings.central_key()
    signer = DelegatedSigningKey.load_or_create(settings.key_dir, central_keys=[central])
    existing = signer.certificate
    if existing is not None:
        current = existing.certificate
        raise CommandError(
            f"already enrolled as appliance {current.appliance_id} of site {current.site_id}"
        )

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            client = HttpCentralClient(server, session, signing_key=signer.signing_key)
            await enroll(signer, client, token, audience=central.key_id)

    try:
        asyncio.run(go())
    except CentralRejected as exc:
        raise CommandError(f"enrollment refused: {exc.detail or exc.code}") from None
    except CentralUnavailable as exc:
        raise CommandError(f"central server unavailable: {exc}") from None
    except (ProtocolError, CertificateRejectedError) as exc:
        raise CommandError(f"the central server's certificate does not verify: {exc}") from None
    certificate = signer.certificate
    assert certificate is not None
    c = certificate.certificate
    print(f"enrolled: appliance {c.appliance_id} of site {c.site_id}")
    print(f"key {signer.key_id}, certificate {c.serial} valid until {c.not_after.isoformat()}")
    if settings.central_url and settings.central_url != server:
        print(f"note: the service will talk to central_url {settings.central_url}")
    return 0


def _token(args: argparse.Namespace) -> str:
    """The token from ``--token``, ``--token-file FILE`` or ``--token-file -``
    (stdin), which keeps it out of ``ps``."""
    if args.token_file is None:
        source, token = "--token", str(args.token)
    else:
        source = "stdin" if str(args.token_file) == "-" else str(args.token_file)
        try:
            if source == "stdin":
                token = sys.stdin.read()
            else:
                token = args.token_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot read {source}: {exc.strerror}", EXIT_USAGE) from None
        except UnicodeDecodeError:
            raise CommandError(f"{source} does not hold a token", EXIT_USAGE) from None
    if not token.strip():
        raise CommandError(f"no enrollment token: {source} is empty", EXIT_USAGE)
    return token.strip()


# --- status -------------------------------------------------------------------------------


def _status(args: argparse.Namespace, settings: AgentSettings) -> int:
    """0 when the agent is enrolled (running or not: the text says which);
    1 when it is not enrolled or there is no agent state here at all."""
    if _absent(settings.state_dir):
        raise CommandError(
            f"no agent state in {settings.state_dir}: the agent never ran here; "
            "give --config FILE (or --state-dir DIR) if it keeps its state elsewhere"
        )
    document = read_status(settings)
    enrolled = bool(document.get("enrolled", True))
    if args.json:
        print(json.dumps(document, indent=2))
        return 0 if enrolled else EXIT_FAILED
    if not enrolled:
        print("not enrolled: run `msp-agent enroll --token-file FILE`")
        return EXIT_FAILED
    state = "running" if document.get("running") else "not running"
    if document.get("appliance_id"):
        state += f" (appliance {document['appliance_id']}, site {document.get('site_id')})"
    print(f"agent: {state}")
    link = document.get("link", "unknown")
    print(f"link: {link}" if document.get("running") else f"link: {link} when it last ran")
    if document.get("last_error") and document.get("link") != "online":
        print(f"  last error: {document['last_error']}")
    certificate = document.get("certificate") or {}
    if certificate:
        flags = [name for name in ("revoked", "expired") if certificate.get(name)]
        print(
            f"certificate: {certificate.get('serial')} until {certificate.get('not_after')}"
            + (f" ({', '.join(flags)})" if flags else "")
        )
    if "log_size" in document:
        print(
            f"audit log: {document['log_size']} entries, "
            f"{document.get('witnessed_size', '?')} witnessed by the central server"
        )
    if "evidence_queued" in document:
        print(
            f"queues: {document['evidence_queued']} evidence bundle(s), "
            f"{document.get('urgent_waiting', 0)} incident(s) waiting"
        )
    if document.get("runbooks_without_check"):
        print(f"not checked by this agent version: {', '.join(document['runbooks_without_check'])}")
    _print_results(document)
    for name, problem in (document.get("problems") or {}).items():
        print(f"problem: {name}: {problem}")
    return 0


def _print_results(document: dict[str, Any]) -> None:
    failing = document.get("failing_checks") or []
    if failing:
        print("failing checks:")
        for check in failing:
            print(
                f"  {check['check_id']}: {check['result']} since {check.get('since') or '?'} "
                f"(last run {check.get('at') or '?'}): {check.get('reason') or 'no reason given'}"
            )
    elif document.get("last_check_at"):
        print("failing checks: none")
    actions = document.get("failed_actions") or []
    if actions:
        print("failed L1 actions:")
        for action in actions:
            print(
                f"  {action['action']} for {action['check_id']}: {action['outcome']} "
                f"at {action.get('at') or '?'}: {action.get('reason') or 'no reason given'}"
            )


def read_status(settings: AgentSettings) -> dict[str, Any]:
    """The running agent's ``status.json`` when it is alive; otherwise what
    the files say (the agent is not running). Either way, with the checks
    failing and the L1 actions failed as the service last recorded them."""
    document = _read_status_file(settings)
    if document.get("enrolled", True):
        path = settings.state_dir / RESULTS_FILE
        try:
            records = read_results(settings.state_dir)
        except PermissionError:
            raise CommandError(_denied(path)) from None
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}") from None
        document["failing_checks"] = failing_checks(records)
        document["failed_actions"] = failed_actions(records)
    return document


def _read_status_file(settings: AgentSettings) -> dict[str, Any]:
    path = settings.state_dir / STATUS_FILE
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError:
        raise CommandError(_denied(path)) from None
    except (OSError, ValueError):
        loaded = {}
    document: dict[str, Any] = loaded if isinstance(loaded, dict) else {}
    if document.get("running") and not _alive(document.get("pid")):
        document["running"] = False
    if document:
        return document
    if not _exists(settings.key_dir / CERTIFICATE_FILE):
        return {"running": False, "enrolled": False}
    return {"running": False, "enrolled": True, "link": "unknown"}


def _absent(path: Path) -> bool:
    """Whether ``path`` certainly does not exist (one this user may not look
    at is left to the reads that follow, which say so)."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def _denied(path: Path) -> str:
    return f"cannot read {path}: permission denied; run as the agent's user or root"


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; one this user may not look at is a
    :class:`CommandError`, never "absent"."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PermissionError:
        raise CommandError(_denied(path.parent)) from None
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    return True


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- audit ---------------------------------------------------------------------------------


def _audit(args: argparse.Namespace, settings: AgentSettings) -> int:
    database = settings.state_dir / "audit.sqlite"
    if not _exists(database):
        raise CommandError(f"no audit trail at {database}")
    if args.audit_command == "verify":
        row_key = read_audit_row_key(settings.key_dir)
        try:
            connection = connect(database, readonly=True)
            try:
                # One snapshot: the running agent keeps appending, and
                # checkpoints read apart from their entries would make a
                # fresh entry look added behind its back.
                connection.execute("BEGIN")
                result = verify_database(connection, [settings.central_key()], utc_now(), row_key)
            finally:
                connection.close()
        except sqlite3.Error as exc:
            raise CommandError(f"cannot read {database}: {exc}") from None
        if not result.ok:
            raise CommandError(f"audit trail does NOT verify: {result.describe()}")
        print(result.describe())
        return 0
    try:
        report = export_audit(settings.state_dir, args.out, central_key=settings.central_key())
    except ExportError as exc:
        raise CommandError(str(exc)) from None
    print(report)
    return 0


# --- evidence ------------------------------------------------------------------------------


def _evidence(args: argparse.Namespace, settings: AgentSettings) -> int:
    try:
        print(verify_evidence_file(settings.state_dir, args.file, settings.central_key()))
    except ExportError as exc:
        raise CommandError(str(exc)) from None
    return 0


# --- keys ----------------------------------------------------------------------------------


def _keys(_args: argparse.Namespace, settings: AgentSettings) -> int:
    if not _exists(settings.key_dir / CERTIFICATE_FILE):
        raise CommandError("not enrolled: there is no key to rotate")
    request = settings.state_dir / ROTATE_REQUEST_FILE
    try:
        request.write_bytes(b"")
    except OSError as exc:
        raise CommandError(
            f"cannot write {request}: {exc.strerror}; run as the agent's user"
        ) from None
    print("key rotation requested: the running agent rotates at its next key check")
    return 0
