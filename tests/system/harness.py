"""Real processes for the system tests: the central server, the agent, and
the fault-injecting proxy between them.

Each process is started the way an operator starts it (``python -m
msp_central …``, ``python -m msp_agent --config … run``); the tests look at
what they left on disk (the agent's ``status.json`` and SQLite files, the
server's database) and at the server's partner API, never at their memory.
The scenarios are the NixOS VM tests' (tests/nixos/), run here without VMs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from msp_agent.audit import OfflineAuditTrail
from msp_agent.http_client import HttpCentralClient
from msp_agent.keys import DelegatedSigningKey
from msp_protocol.keys import SigningKey, VerifyKey
from tests.system.proxy import ProxyProcess, start_proxy_process

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}): {result.stderr.strip()}")
    return result


async def wait_for(
    predicate: Callable[[], Any], *, within: float, what: str, interval: float = 0.2
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail by name."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(interval)


class Process:
    """A child process with its output in a log file (shown when a test fails)."""

    def __init__(self, name: str, log_file: Path) -> None:
        self.name = name
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *argv],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self, timeout: float = 15.0) -> float:
        """SIGTERM; returns how long the process took to exit."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"{self.name} ignored SIGTERM for {timeout} s") from None
        return time.monotonic() - started

    def kill(self) -> None:
        """``kill -9``: no chance to clean up."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def output(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


@dataclass
class Central:
    directory: Path
    port: int = field(default_factory=free_port)
    certificate_lifetime_days: float | None = None
    partner_key: str = ""
    site_id: str = ""
    public_key: str = ""

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.server = Process("central", self.directory / "central.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database(self) -> Path:
        return self.directory / "state" / "central.db"

    def cli(self, *argv: str) -> dict[str, Any]:
        result = run_cli("-m", "msp_central", "--state-dir", str(self.directory / "state"), *argv)
        return dict(json.loads(result.stdout)) if result.stdout.strip().startswith("{") else {}

    def setup(self) -> None:
        """Root key, schema, a partner and a healthcare site (fully covered)."""
        self.public_key = self.cli("keys", "init")["public_key"]
        run_cli("-m", "msp_central", "--state-dir", str(self.directory / "state"), "db", "upgrade")
        partner = self.cli("partner", "create", "Acme MSP")
        self.partner_key = partner["api_key"]
        self.site_id = self.cli("site", "create", "--partner", partner["partner_id"], "Clinic")[
            "site_id"
        ]

    def token(self) -> str:
        return str(self.cli("token", "create", "--site", self.site_id)["token"])

    def start(self) -> None:
        env = {}
        if self.certificate_lifetime_days is not None:
            env["MSP_CENTRAL_CERTIFICATE_LIFETIME_DAYS"] = str(self.certificate_lifetime_days)
        self.server.spawn(
            [
                "-m",
                "msp_central",
                "--state-dir",
                str(self.directory / "state"),
                "serve",
                "--port",
                str(self.port),
            ],
            env,
        )

    async def ready(self) -> None:
        def answers() -> bool:
            if not self.server.running:
                raise AssertionError(f"central server exited:\n{self.server.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/v1/openapi.json", timeout=2):
                    return True
            except OSError:
                return False

        await wait_for(answers, within=30, what="the central server to answer")

    def api(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.partner_key}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read the server's database (SQLite, read-only, beside the server)."""
        connection = sqlite3.connect(f"{self.database.as_uri()}?mode=ro", uri=True)
        try:
            connection.execute("PRAGMA busy_timeout = 5000")
            return connection.execute(sql, params).fetchall()
        finally:
            connection.close()

    def witnessed_size(self, appliance_id: str) -> int:
        rows = self.query("SELECT size FROM audit_logs WHERE appliance_id = ?", appliance_id)
        return int(rows[0][0]) if rows else 0

    def entry_count(self, appliance_id: str) -> int:
        return int(
            self.query("SELECT COUNT(*) FROM audit_entries WHERE appliance_id = ?", appliance_id)[
                0
            ][0]
        )

    def alerts(self, appliance_id: str) -> list[str]:
        return [
            str(row[0])
            for row in self.query(
                "SELECT code FROM security_alerts WHERE appliance_id = ? ORDER BY id", appliance_id
            )
        ]


@dataclass
class Agent:
    directory: Path
    central: Central
    central_url: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.service = Process("agent", self.directory / "agent.log")

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    @property
    def config(self) -> Path:
        return self.directory / "agent.json"

    def write_config(self, **settings: Any) -> None:
        self.settings.update(settings)
        document = {
            "central_url": self.central_url,
            "central_public_key": self.central.public_key,
            "state_dir": str(self.state_dir),
            **self.settings,
        }
        self.config.write_text(json.dumps(document, indent=2))

    def cli(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli("-m", "msp_agent", "--config", str(self.config), *argv, check=check)

    def enroll(self) -> None:
        self.cli("enroll", "--token", self.central.token())

    def start(self) -> None:
        self.service.spawn(["-m", "msp_agent", "--config", str(self.config), "run"])

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.state_dir / "status.json").read_text()))
        except (OSError, ValueError):
            return {}

    async def until(
        self, predicate: Callable[[dict[str, Any]], Any], what: str, within: float = 30
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if not self.service.running:
                raise AssertionError(f"agent exited:\n{self.service.output()}")
            status = self.status()
            return status if status and predicate(status) else None

        return dict(await wait_for(check, within=within, what=f"agent: {what}"))

    def entries(self) -> list[bytes]:
        connection = sqlite3.connect(
            f"{(self.state_dir / 'audit.sqlite').as_uri()}?mode=ro", uri=True
        )
        try:
            connection.execute("PRAGMA busy_timeout = 5000")
            return [bytes(r[0]) for r in connection.execute("SELECT raw FROM entries ORDER BY idx")]
        finally:
            connection.close()

    def kinds(self) -> list[str]:
        return [json.loads(raw)["kind"] for raw in self.entries()]

    async def append_backlog(self, count: int, *, kind: str = "test.backlog") -> int:
        """Append ``count`` entries to the agent's audit trail with the agent's
        own library and keys, as the stopped agent would have logged them
        offline. Returns the log size."""
        assert not self.service.running, "the audit trail has one owner: stop the agent first"
        central_keys = [VerifyKey.from_hex(self.central.public_key)]
        signer = DelegatedSigningKey.load_or_create(
            self.state_dir / "keys", central_keys=central_keys
        )
        assert signer.certificate is not None
        trail = await OfflineAuditTrail.open(
            self.state_dir / "audit.sqlite",
            appliance_id=signer.certificate.certificate.appliance_id,
            signer=signer,
            central_keys=central_keys,
            row_key=signer.audit_row_key(),
        )
        try:
            for start in range(0, count, 1_000):
                await asyncio.gather(
                    *(
                        trail.append(kind, "test", {"n": n, "pad": "x" * 200})
                        for n in range(start, min(count, start + 1_000))
                    )
                )
            return trail.size
        finally:
            await trail.close()

    async def sync_as_the_appliance(self, url: str, copy: Path) -> None:
        """Push the stopped agent's unwitnessed entries to ``url`` from a copy
        of its state directory with the "revoked" mark removed: what someone
        holding a stolen appliance's disk could try. Raises what sync raises."""
        assert not self.service.running
        shutil.copytree(self.state_dir, copy)
        (copy / "keys" / "revoked").unlink()
        await sync_with_library(copy, self.central.public_key, url)


async def sync_with_library(state_dir: Path, central_public_key: str, url: str) -> float:
    """Sync the audit trail in ``state_dir`` to ``url`` from this process
    with the agent's own library and device key (no agent process); returns
    the seconds the sync took. Raises what ``OfflineAuditTrail.sync`` raises."""
    central_keys = [VerifyKey.from_hex(central_public_key)]
    key = SigningKey((state_dir / "keys" / "device.key").read_bytes())
    signer = DelegatedSigningKey.load_or_create(state_dir / "keys", central_keys=central_keys)
    assert signer.certificate is not None
    appliance = signer.certificate.certificate.appliance_id
    trail = await OfflineAuditTrail.open(
        state_dir / "audit.sqlite",
        appliance_id=appliance,
        signer=signer,
        central_keys=central_keys,
        row_key=signer.audit_row_key(),
    )
    try:
        async with aiohttp.ClientSession() as session:
            client = HttpCentralClient(
                url, session, signing_key=lambda: key, appliance_id=appliance
            )
            started = time.perf_counter()
            await trail.sync(client)
            return time.perf_counter() - started
    finally:
        await trail.close()


def start_proxy(upstream_port: int) -> ProxyProcess:
    return start_proxy_process(upstream_port)
