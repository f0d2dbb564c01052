"""``msp-central demo``: the whole product on one machine, for a first look.

It starts a central server on an embedded SQLite database, creates a demo
partner with one site (healthcare: HIPAA and its neighbours), and enrolls
appliance agents as separate processes (``python -m msp_agent``), each with
its own state directory, exactly as an appliance would run. It prints where
to look, then runs until Ctrl-C, which stops the agents (SIGTERM: they
finish what they are committing) and then the server.

Everything lives under one directory (``./demo-state`` by default). Run it
again with the same directory and it carries on with the same partner,
site, appliances and audit logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from msp_central.api_models import SiteOverrides
from msp_central.app import create_app
from msp_central.catalogue import Tier
from msp_central.config import Settings
from msp_central.console.accounts import create_user
from msp_central.context import load_root_key, write_root_key
from msp_central.db.engine import create_engine
from msp_central.db.migrate import upgrade
from msp_central.queries import (
    create_enrollment_token,
    create_partner,
    create_site,
    get_preset,
)
from msp_protocol.encoding import utc_now

DEMO_FILE = "demo.json"
DEMO_USER = "admin@demo-msp.example"


class DemoError(Exception):
    pass


async def _prepare(settings: Settings, root_dir: Path, agents: int) -> dict[str, Any]:
    """The demo's partner, site and one enrollment token per new agent."""
    state_file = root_dir / DEMO_FILE
    state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.exists() else {}
    engine = create_engine(settings.resolved_database_url())
    try:
        await upgrade(engine)
        now = utc_now()
        async with engine.begin() as connection:
            if not state:
                partner, api_key = await create_partner(connection, "Demo MSP", now)
                preset = await get_preset(connection, "healthcare")
                site = await create_site(
                    connection,
                    partner.id,
                    "Demo clinic",
                    SiteOverrides(
                        industry="healthcare", tier=Tier.FULL, frameworks=list(preset.frameworks)
                    ),
                    now,
                )
                state = {"partner_id": partner.id, "api_key": api_key, "site_id": site.id}
            if "console_email" not in state:
                # The demo's console user: an admin, so every page can be tried.
                password = secrets.token_urlsafe(12)
                await create_user(
                    connection,
                    partner_id=state["partner_id"],
                    email=DEMO_USER,
                    password=password,
                    role="admin",
                    actor="demo",
                    now=now,
                )
                state |= {"console_email": DEMO_USER, "console_password": password}
            for number in range(1, agents + 1):
                agent_dir = root_dir / f"agent-{number}"
                token_file = agent_dir / "enrollment-token"
                if (agent_dir / "state" / "keys" / "certificate.json").exists():
                    continue  # enrolled on an earlier run
                token, _ = await create_enrollment_token(
                    connection, state["site_id"], timedelta(hours=1), now
                )
                agent_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                token_file.write_text(token + "\n")
                token_file.chmod(0o600)
    finally:
        await engine.dispose()
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    state_file.chmod(0o600)
    return state


def _agent_config(root_dir: Path, number: int, url: str, public_key: str) -> Path:
    agent_dir = root_dir / f"agent-{number}"
    config = {
        "central_url": url,
        "central_public_key": public_key,
        "state_dir": str(agent_dir / "state"),
        "enrollment_token_file": str(agent_dir / "enrollment-token"),
        # Short intervals so there is something to see within a minute.
        "check_interval_seconds": 60,
        "sync_interval_seconds": 10,
        "heartbeat_interval_seconds": 30,
        "bundle_refresh_seconds": 300,
    }
    path = agent_dir / "agent.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def run_demo(root_dir: Path, *, agents: int, host: str, port: int) -> None:
    """Run the demo until SIGINT or SIGTERM. Raises :class:`DemoError`."""
    root_dir = root_dir.resolve()
    root_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings = Settings(state_dir=root_dir / "central", host=host, port=port)
    if not settings.key_file.exists():
        write_root_key(settings.key_file)
    try:
        asyncio.run(_run(settings, root_dir, agents=agents, host=host, port=port))
    finally:
        try:
            sys.stdout.flush()
        except OSError:
            # The reader is gone: let the interpreter's own flush at exit
            # write nowhere instead of failing again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


async def _run(settings: Settings, root_dir: Path, *, agents: int, host: str, port: int) -> None:
    root = load_root_key(settings.key_file)
    state = await _prepare(settings, root_dir, agents)
    # The guide below is what a newcomer reads: no line per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    runner = web.AppRunner(create_app(settings, root=root), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise DemoError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    url = f"http://{host}:{port}"
    processes: list[asyncio.subprocess.Process] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    try:
        for number in range(1, agents + 1):
            config = _agent_config(root_dir, number, url, root.verify_key.hex)
            with (root_dir / f"agent-{number}" / "agent.log").open("ab") as log_file:
                processes.append(
                    await asyncio.create_subprocess_exec(
                        *(sys.executable, "-m", "msp_agent", "--config", str(config), "run"),
                        stdout=log_file,
                        stderr=asyncio.subprocess.STDOUT,
                        stdin=asyncio.subprocess.DEVNULL,
                        start_new_session=True,  # Ctrl-C reaches us; we stop them in order
                    )
                )
        _print_guide(root_dir, url, state, agents, root.verify_key.hex)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            for number, process in enumerate(processes, 1):
                if process.returncode is not None and not stop.is_set():
                    log = root_dir / f"agent-{number}" / "agent.log"
                    raise DemoError(
                        f"agent {number} exited with status {process.returncode}"
                        f"{_last_line(log)}; see {log}"
                    )
    finally:
        # The agents first, before anything is written: with the output
        # piped (``| tee``), Ctrl-C has killed the reader too, and a write
        # failing here must not leave the agents running on their own.
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        _say("\nstopping the agents and the server...")
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        await runner.cleanup()
        _say("stopped.")


def _last_line(log: Path) -> str:
    """The agent's last words, to say why it stopped (another agent on its
    state directory, say)."""
    try:
        with log.open("rb") as file:
            file.seek(max(0, log.stat().st_size - 4096))
            lines = file.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return f" ({lines[-1][:300]})" if lines else ""


def _say(text: str) -> None:
    """A line on stderr that nobody may be reading any more."""
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr, flush=True)


def _print_guide(
    root_dir: Path, url: str, state: dict[str, Any], agents: int, public_key: str
) -> None:
    cwd = Path.cwd()
    key_file = root_dir / "central.pub"
    key_file.write_text(public_key + "\n", encoding="ascii")

    def show(path: Path) -> str:
        return os.path.relpath(path, cwd) if path.is_relative_to(cwd) else str(path)

    key, site = state["api_key"], state["site_id"]
    lines = [
        "",
        f"partner console   {url}/console/",
        f"  sign in as      {state['console_email']}",
        f"  password        {state['console_password']}",
        f"central server    {url}  (API description: {url}/api/v1/openapi.json)",
        f"partner API key   {key}",
        f"central key       {public_key}  (also in {show(key_file)}, "
        f"{url}/.well-known/msp-central-key)",
        f"site              {state['site_id']} (Demo clinic, healthcare, full coverage)",
        "",
        "ask the server, as the partner:",
        f'  curl -s -H "Authorization: Bearer {key}" {url}/api/v1/sites/{site}/posture',
        f'  curl -s -H "Authorization: Bearer {key}" {url}/api/v1/posture',
        f'  curl -s -H "Authorization: Bearer {key}" {url}/api/v1/sites/{site}/appliances',
        f'  curl -s -H "Authorization: Bearer {key}" {url}/api/v1/sites/{site}/evidence',
        f'  curl -s -H "Authorization: Bearer {key}" {url}/api/v1/escalations',
        "",
        "verify as an auditor would (an appliance's log as the server witnessed it;",
        "APPLIANCE_ID is an id from the appliances list above):",
        f'  curl -s -H "Authorization: Bearer {key}" -o audit-export.json \\',
        f"    {url}/api/v1/sites/{site}/appliances/APPLIANCE_ID/audit-export",
        f"  uv run msp-verify --central-key-file {show(key_file)} audit-export.json",
        "",
        "ask an agent (its own state directory, its log):",
    ]
    for number in range(1, agents + 1):
        config = show(root_dir / f"agent-{number}" / "agent.json")
        lines.append(f"  uv run msp-agent --config {config} status")
    lines += [
        f"  uv run msp-agent --config {show(root_dir / 'agent-1' / 'agent.json')} audit verify",
        f"  tail -f {show(root_dir / 'agent-1' / 'agent.log')}",
        "",
        "Ctrl-C stops everything; run the same command again to carry on.",
    ]
    print("\n".join(lines), flush=True)
