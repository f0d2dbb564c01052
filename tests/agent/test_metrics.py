"""The appliance's dashboard figures: in the heartbeat to the real central
server (in this process, on loopback, SQLite), kept when a server older
than the agent refuses them, and written as a node_exporter textfile."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from pydantic import Field, StrictInt, StringConstraints

import msp_central.routes.appliances
from msp_agent.config import AgentSettings
from msp_agent.http_client import HttpCentralClient
from msp_agent.keys import DelegatedSigningKey
from msp_agent.runtime import Agent, enroll
from msp_agent.textfile import Figures, render, write_textfile
from msp_central.api_models import Body, Printable, SiteOverrides
from msp_central.app import create_app
from msp_central.config import Settings
from msp_central.db.engine import create_engine
from msp_central.db.migrate import upgrade
from msp_central.db.tables import appliances
from msp_central.queries import create_enrollment_token, create_partner, create_site
from msp_protocol.encoding import Timestamp, format_time, utc_now
from msp_protocol.keys import SigningKey

ROOT = SigningKey(b"\x0b" * 32)


class HeartbeatBeforeFigures(Body):
    """The heartbeat document as servers before the dashboard figures took it."""

    version: Annotated[Printable, StringConstraints(max_length=64)]
    log_size: Annotated[StrictInt, Field(ge=0)]
    queues: Annotated[dict[str, StrictInt], Field(max_length=16)]
    clock: Timestamp
    check_interval_seconds: StrictInt | None = None
    heartbeat_interval_seconds: StrictInt | None = None


@dataclass
class Running:
    agent: Agent
    server: TestServer
    database_url: str

    async def stored_heartbeat(self) -> dict[str, Any]:
        engine = create_engine(self.database_url)
        try:
            async with engine.connect() as connection:
                stored = (await connection.execute(sa.select(appliances.c.heartbeat))).scalar()
        finally:
            await engine.dispose()
        assert isinstance(stored, dict)
        return stored

    async def heartbeat_answers(self) -> dict[str, float]:
        """How the server answered heartbeats, by status, from its /metrics."""
        async with aiohttp.ClientSession() as session:
            reply = await session.get(self.server.make_url("/metrics"))
            text = await reply.text()
        route = "/api/v1/appliances/{appliance_id}/heartbeat"
        return {
            sample.labels["status"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "msp_central_http_requests_total" and sample.labels["route"] == route
        }


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    """An agent enrolled with a real central server, its state open, its
    loops not started (each test drives the step it looks at)."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'central.db'}"
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        now = utc_now()
        async with engine.begin() as connection:
            partner, _ = await create_partner(connection, "Acme", now)
            site = await create_site(connection, partner.id, "Clinic", SiteOverrides(), now)
            token, _ = await create_enrollment_token(connection, site.id, timedelta(hours=1), now)
    finally:
        await engine.dispose()
    central = Settings(
        state_dir=tmp_path / "central", database_url=database_url, metrics_access="loopback"
    )
    server = TestServer(create_app(central, root=ROOT), host="127.0.0.1")
    await server.start_server()
    settings = AgentSettings(
        central_url=str(server.make_url("")),
        central_public_key=ROOT.verify_key.hex,
        state_dir=tmp_path / "agent",
        metrics_textfile=tmp_path / "textfile" / "msp-agent.prom",
    )
    settings.state_dir.mkdir()
    (tmp_path / "textfile").mkdir()
    agent = Agent(settings)
    try:
        async with aiohttp.ClientSession() as session:
            agent.signer = DelegatedSigningKey.load_or_create(
                settings.key_dir, central_keys=[ROOT.verify_key]
            )
            agent.client = HttpCentralClient(
                settings.require_central_url(),
                session,
                signing_key=agent.signer.signing_key,
                connectivity=agent.connectivity,
            )
            await enroll(agent.signer, agent.client, token, audience=ROOT.key_id)
            certificate = agent.signer.certificate
            assert certificate is not None
            agent.appliance_id = certificate.certificate.appliance_id
            agent.site_id = certificate.certificate.site_id
            agent.client.appliance_id = agent.appliance_id
            await agent._open_state(session)
            try:
                yield Running(agent, server, database_url)
            finally:
                await agent._close_state()
    finally:
        await server.close()


async def test_the_heartbeat_carries_the_dashboard_figures(running: Running) -> None:
    agent = running.agent
    await agent.manager.trail.append("check.run", "agent", {"n": 1})
    agent.problems["clock"] = "clock differs from the server's by 90 s"
    agent.last_sync_at = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    answer = await agent._send_heartbeat()
    assert isinstance(answer["witnessed_size"], int)

    stored = await running.stored_heartbeat()
    certificate = agent.signer.certificate
    assert certificate is not None
    assert stored["log_size"] == agent.manager.trail.size >= 2
    assert stored["witnessed_size"] == 0  # nothing synced yet
    assert stored["problems"] == 1
    assert stored["last_sync_at"] == "2026-11-25T12:00:00Z"
    assert stored["certificate_not_after"] == format_time(certificate.certificate.not_after)
    assert stored["queues"] == {"evidence": 0, "urgent": 0}
    assert await running.heartbeat_answers() == {"200": 1}


async def test_an_older_server_gets_the_fields_it_knows_from_then_on(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(msp_central.routes.appliances, "HeartbeatIn", HeartbeatBeforeFigures)
    agent = running.agent
    await agent._send_heartbeat()
    stored = await running.stored_heartbeat()
    assert "witnessed_size" not in stored
    assert stored["log_size"] == agent.manager.trail.size
    # Refused once as malformed, then sent as the server knows it, and
    # from then on without the refusal first.
    assert await running.heartbeat_answers() == {"400": 1, "200": 1}
    await agent._send_heartbeat()
    assert await running.heartbeat_answers() == {"400": 1, "200": 2}


async def test_the_status_refresh_writes_the_textfile(running: Running) -> None:
    agent = running.agent
    path = agent.settings.metrics_textfile
    assert path is not None
    await agent.manager.trail.append("check.run", "agent", {"n": 1})
    await agent._refresh_counts()
    agent._write_textfile()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(path.read_text())
        for sample in family.samples
    }
    certificate = agent.signer.certificate
    assert certificate is not None
    assert values == {
        "msp_agent_info": 1,
        "msp_agent_log_size": agent.manager.trail.size,
        "msp_agent_witnessed_size": 0,
        "msp_agent_evidence_queued": 0,
        "msp_agent_urgent_waiting": 0,
        "msp_agent_link_online": 1,  # enrollment and the trail's append reached the server
        "msp_agent_problems": 0,
        "msp_agent_certificate_not_after_timestamp_seconds": certificate.certificate.not_after.timestamp(),
    }
    # Readable by node_exporter's user; no temporary file left beside it.
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(path.parent) == [path.name]


def test_a_textfile_holds_every_figure_and_replaces_the_last(tmp_path: Path) -> None:
    figures = Figures(
        version="0.1.0",
        log_size=1200,
        witnessed_size=1100,
        evidence_queued=7,
        urgent_waiting=2,
        online=False,
        problems=3,
        last_sync_at=datetime(2026, 11, 25, 12, 0, tzinfo=UTC),
        certificate_not_after=datetime(2026, 12, 25, 12, 0, tzinfo=UTC),
    )
    path = tmp_path / "msp-agent.prom"
    path.write_text("stale content\n")
    write_textfile(path, figures)
    assert path.read_bytes() == render(figures)
    families = {f.name: f for f in text_string_to_metric_families(path.read_text())}
    assert families["msp_agent_info"].samples[0].labels == {"version": "0.1.0"}
    assert {name: f.type for name, f in families.items()} == dict.fromkeys(families, "gauge")
    values = {name: f.samples[0].value for name, f in families.items()}
    assert values["msp_agent_link_online"] == 0
    assert values["msp_agent_last_sync_timestamp_seconds"] == figures.last_sync_at.timestamp()  # type: ignore[union-attr]
    assert values["msp_agent_certificate_not_after_timestamp_seconds"] == 1_798_200_000
    assert (values["msp_agent_log_size"], values["msp_agent_witnessed_size"]) == (1200, 1100)
    assert (values["msp_agent_evidence_queued"], values["msp_agent_urgent_waiting"]) == (7, 2)
    assert values["msp_agent_problems"] == 3


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_log_lines_in_the_configured_format(tmp_path: Path, log_format: str) -> None:
    """``msp-agent run`` with nothing to enroll with says why in one log line."""
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps(
            {
                "central_public_key": ROOT.verify_key.hex,
                "central_url": "http://127.0.0.1:9",
                "state_dir": str(tmp_path / "state"),
                "log_format": log_format,
            }
        )
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MSP_AGENT_")}
    environment.pop("NOTIFY_SOCKET", None)
    ran = subprocess.run(
        [sys.executable, "-m", "msp_agent", "--config", str(config), "run"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 1
    lines = ran.stderr.splitlines()
    if log_format == "text":
        assert lines[0].startswith("ERROR msp_agent.runtime: this appliance is not enrolled")
        return
    logged = json.loads(lines[0])
    assert set(logged) == {"time", "level", "logger", "message"}
    assert (logged["level"], logged["logger"]) == ("ERROR", "msp_agent.runtime")
    assert logged["message"].startswith("this appliance is not enrolled")
    assert datetime.fromisoformat(logged["time"]).tzinfo is not None
    assert logged["time"].endswith("Z")
