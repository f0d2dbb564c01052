"""The topology an operator runs for a fleet: PostgreSQL, two ``msp-central
serve`` replicas on their own ports, and HAProxy in front of them with the
configuration shipped in ``deploy/haproxy.cfg``.

Everything is started the way an operator starts it (``msp-central db
upgrade``, ``keys init``, ``partner create``, ``serve``; ``haproxy -f
deploy/haproxy.cfg`` with the file's environment parameters) and stopped
again by :meth:`Topology.close`, which also drops the database it created.
A replica can be killed with ``kill -9`` and started again, and the
balancer's view of its replicas read from HAProxy's runtime API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from msp_central.api_models import SiteOverrides
from msp_central.db.engine import create_engine
from msp_central.queries import create_enrollment_token, create_site

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy.cfg"
HAPROXY = Path("/usr/sbin/haproxy")
HAPROXY_MISSING = (
    f"HAProxy is not installed at {HAPROXY}: install Debian's package (apt-get install haproxy)"
)
DEFAULT_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
REPLICAS = 2
START_TIMEOUT = 60.0


class TopologyError(Exception):
    """A part of the topology did not start or answer (one line)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _asyncpg_dsn(url: str) -> str:
    """The same server as a SQLAlchemy URL, in the form asyncpg takes."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    # The peak resident set of every process that served as this replica.
    peak_rss_kib: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sample_rss(self) -> None:
        """Read VmHWM (the process's own peak RSS) while it lives."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))


@dataclass
class Topology:
    """PostgreSQL + replicas + HAProxy. Use :meth:`start` and :meth:`close`
    (or ``async with``)."""

    database_url: str | None = None
    # Where to create (and at the end drop) a fresh database when
    # database_url names none.
    admin_url: str = DEFAULT_POSTGRES
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="msp-fleet-")))
    replicas: list[Replica] = field(default_factory=list)
    haproxy: subprocess.Popen[bytes] | None = None
    balancer_port: int = 0
    created_database: str | None = None
    partner_id: str = ""
    partner_key: str = ""
    root_key_id: str = ""
    root_public_key: str = ""
    _admin_dsn: str = ""

    @property
    def url(self) -> str:
        """The balancer's URL: what appliances and partners use."""
        return f"http://127.0.0.1:{self.balancer_port}"

    @property
    def stats_socket(self) -> Path:
        return self.directory / "haproxy.sock"

    async def __aenter__(self) -> Topology:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if not os.access(HAPROXY, os.X_OK):
            raise TopologyError(HAPROXY_MISSING)
        self.balancer_port = free_port()
        await self._create_database()
        # What does not depend on each other runs side by side: each command
        # is a Python process that takes seconds to start.
        _, keys_text = await asyncio.gather(
            asyncio.to_thread(self._cli, "db", "upgrade"),
            asyncio.to_thread(self._cli, "keys", "init"),
        )
        keys = json.loads(keys_text)
        self.root_key_id = str(keys.get("key_id", ""))
        self.root_public_key = str(keys.get("public_key", ""))
        self.replicas = [Replica(f"central{i + 1}", free_port()) for i in range(REPLICAS)]
        for replica in self.replicas:
            self.start_replica(replica)
        self._start_haproxy()
        partner = json.loads(await asyncio.to_thread(self._cli, "partner", "create", "Fleet MSP"))
        self.partner_id, self.partner_key = partner["partner_id"], partner["api_key"]
        for replica in self.replicas:
            await self.wait_healthy(f"http://{replica.address}", replica.name)
        await self.wait_healthy(self.url, "the balancer")

    # --- the database -----------------------------------------------------------------

    async def _create_database(self) -> None:
        if self.database_url is not None:
            return
        self._admin_dsn = _asyncpg_dsn(self.admin_url)
        name = f"msp_fleet_{secrets.token_hex(6)}"
        try:
            connection = await asyncpg.connect(self._admin_dsn, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            where = make_url(self.admin_url).render_as_string(hide_password=True)
            raise TopologyError(f"PostgreSQL at {where} does not answer: {exc}") from None
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        self.created_database = name
        self.database_url = (
            make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)
        )

    async def _drop_database(self) -> None:
        if self.created_database is None:
            return
        connection = await asyncpg.connect(self._admin_dsn, timeout=10)
        try:
            await connection.execute(
                f'DROP DATABASE IF EXISTS "{self.created_database}" WITH (FORCE)'
            )
        finally:
            await connection.close()
        self.created_database = None

    def database_name(self) -> str:
        return str(make_url(self._url()).database)

    def _url(self) -> str:
        if self.database_url is None:
            raise TopologyError("the topology has no database yet")
        return self.database_url

    async def connect(self) -> Any:
        """A plain asyncpg connection to the fleet's database (checks, samples)."""
        return await asyncpg.connect(_asyncpg_dsn(self._url()), timeout=10)

    async def sites_with_tokens(self, count: int, per_site: int) -> list[tuple[str, str]]:
        """``count`` one-time enrollment tokens, ``per_site`` to a site:
        ``(site_id, token)`` each."""
        engine = create_engine(self._url())
        now = datetime.now(UTC)
        tokens: list[tuple[str, str]] = []
        try:
            async with engine.begin() as connection:
                site_id = ""
                for index in range(count):
                    if index % per_site == 0:
                        site = await create_site(
                            connection,
                            self.partner_id,
                            f"Fleet site {index // per_site + 1}",
                            SiteOverrides(),
                            now,
                        )
                        site_id = site.id
                    token, _ = await create_enrollment_token(
                        connection, site_id, timedelta(hours=6), now
                    )
                    tokens.append((site_id, token))
        finally:
            await engine.dispose()
        return tokens

    # --- processes --------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "MSP_CENTRAL_STATE_DIR": str(self.directory),
            "MSP_CENTRAL_DATABASE_URL": self._url(),
            "MSP_CENTRAL_ROOT_KEY_FILE": str(self.directory / "root.key"),
            # The URL appliances sign requests for, and the balancer whose
            # X-Forwarded-For names the client.
            "MSP_CENTRAL_PUBLIC_URL": self.url,
            "MSP_CENTRAL_TRUSTED_PROXIES": '["127.0.0.1"]',
        }

    def _cli(self, *argv: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "msp_central.cli", *argv],
            env=self._environment(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise TopologyError(f"msp-central {' '.join(argv)} failed: {detail}")
        return result.stdout

    def start_replica(self, replica: Replica) -> None:
        replica.log = self.directory / f"{replica.name}.log"
        with replica.log.open("ab") as log:
            replica.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "msp_central.cli",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(replica.port),
                ],
                env=self._environment(),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def kill_replica(self, replica: Replica) -> None:
        """``kill -9``: no cleanup, connections cut mid-request."""
        if replica.process is not None and replica.process.poll() is None:
            replica.sample_rss()
            replica.process.send_signal(signal.SIGKILL)
            replica.process.wait()

    def _start_haproxy(self) -> None:
        environment = {
            **os.environ,
            "MSP_HAPROXY_BIND": f"127.0.0.1:{self.balancer_port}",
            "MSP_HAPROXY_STATS_SOCKET": str(self.stats_socket),
        }
        for index, replica in enumerate(self.replicas, start=1):
            environment[f"MSP_CENTRAL_REPLICA_{index}"] = replica.address
        with (self.directory / "haproxy.log").open("ab") as log:
            self.haproxy = subprocess.Popen(
                [str(HAPROXY), "-db", "-f", str(HAPROXY_CONFIG)],
                env=environment,
                stdout=log,
                stderr=log,
            )

    async def wait_healthy(self, base: str, what: str, within: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.haproxy is not None and self.haproxy.poll() is not None:
                    raise TopologyError(f"HAProxy exited: {self._last_line('haproxy.log')}")
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with session.get(
                        base + "/api/v1/health", timeout=aiohttp.ClientTimeout(total=2)
                    ) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise TopologyError(f"{what} at {base} is not healthy after {within:.0f} s")

    def _last_line(self, name: str) -> str:
        with contextlib.suppress(OSError):
            lines = (self.directory / name).read_text(errors="replace").strip().splitlines()
            alerts = [line for line in lines if "ALERT" in line] or lines
            if alerts:
                return alerts[-1][-300:]
        return "no message"

    def balancer_events(self, text: str) -> int:
        """How many of HAProxy's log lines contain ``text`` (``is DOWN``: a
        replica taken out of rotation by its health checks)."""
        with contextlib.suppress(OSError):
            log = (self.directory / "haproxy.log").read_text(errors="replace")
            return sum(1 for line in log.splitlines() if text in line)
        return 0

    async def server_states(self) -> dict[str, dict[str, str]]:
        """HAProxy's view of each replica (``show stat``): status, requests
        answered (``hrsp_*``), sessions, by server name."""
        reader, writer = await asyncio.open_unix_connection(str(self.stats_socket))
        try:
            writer.write(b"show stat\n")
            await writer.drain()
            text = (await reader.read()).decode()
        finally:
            writer.close()
            await writer.wait_closed()
        lines = [line for line in text.splitlines() if line]
        header = lines[0].lstrip("# ").split(",")
        states: dict[str, dict[str, str]] = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "msp_central_replicas" and row.get("svname") not in (
                "BACKEND",
                None,
            ):
                states[row["svname"]] = row
        return states

    async def close(self) -> None:
        """Stop every process and drop the database created; never raises
        for what is already gone."""
        for process in [self.haproxy, *(r.process for r in self.replicas)]:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in [self.haproxy, *(r.process for r in self.replicas)]:
            if process is None:
                continue
            try:
                await asyncio.to_thread(process.wait, 15)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            await self._drop_database()
        shutil.rmtree(self.directory, ignore_errors=True)
