"""How long after an appliance's last heartbeat its partner hears it is
offline, by webhook and by e-mail, with small intervals.

    uv run python bench/notify_latency_bench.py [--appliances N] [--interval S]
        [--misses N] [--tick S] [--postgresql]

A real server (in this process, real clock, SQLite or a throwaway
PostgreSQL database) with a webhook receiver on loopback and a local SMTP
server (aiosmtpd). Each appliance beats every ``--interval`` seconds, saying
so in its heartbeat, then stops; the server calls it offline after
``--misses`` missed beats and its notifier looks every ``--tick`` seconds.

Figures (``figure=value unit``): from each appliance's last heartbeat to the
webhook and to the e-mail arriving (median and worst), the offline
threshold (interval x misses), and ``excess``: worst minus threshold, the
cost of the notifier's tick and the sending (at most about one tick).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from email import message_from_bytes
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiosmtpd.controller import Controller

from msp_central.app import create_app
from msp_central.config import Settings
from msp_central.context import CENTRAL
from msp_protocol.encoding import format_time

# The central tests' helpers: enrollment and signed appliance requests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.central.support import (
    ROOT,
    ApplianceClient,
    Clock,
    Harness,
    create_pg_database,
    drop_pg_database,
)


class Mailbox:
    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        subject = str(message_from_bytes(envelope.content)["Subject"])
        self.arrived.setdefault(subject, time.monotonic())
        return "250 OK"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def beat(appliance: ApplianceClient, interval: int) -> None:
    value = {
        "version": "bench",
        "log_size": 0,
        "queues": {},
        "clock": format_time(appliance.clock()),
        "heartbeat_interval_seconds": interval,
    }
    path = f"/api/v1/appliances/{appliance.appliance_id}/heartbeat"
    reply = await appliance.request("POST", path, value)
    assert reply.status == 200, reply.body


async def run(args: argparse.Namespace, database_url: str, state: Path) -> None:
    mailbox = Mailbox()
    smtp_port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    hooks: dict[str, float] = {}

    async def receive(request: web.Request) -> web.Response:
        document = await request.json()
        if document["type"] == "appliance.offline":
            hooks.setdefault(document["data"]["appliance_id"], time.monotonic())
        return web.Response(status=204)

    receiver_app = web.Application()
    receiver_app.router.add_post("/hook", receive)
    receiver = TestServer(receiver_app)
    await receiver.start_server()
    settings = Settings(
        state_dir=state,
        database_url=database_url,
        migrate_on_start=True,
        offline_after_heartbeats=args.misses,
        notify_interval_seconds=args.tick,
        smtp_host="127.0.0.1",
        smtp_port=smtp_port,
        smtp_from="central@msp.example",
        smtp_starttls=False,
    )
    clock = Clock()  # real time
    app = create_app(settings, root=ROOT, clock=clock)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        harness = Harness(client, app[CENTRAL].engine, clock)
        partner = await harness.partner()
        for body in (
            {"kind": "webhook", "url": str(receiver.make_url("/hook"))},
            {"kind": "email", "email": "noc@partner.example"},
        ):
            reply = await partner.request("POST", "/api/v1/notification-channels", body)
            assert reply.status == 201, reply.body
        site = await harness.site(partner)
        appliances = [await harness.enroll(partner, site) for _ in range(args.appliances)]
        for _ in range(2):
            for appliance in appliances:
                await beat(appliance, args.interval)
            await asyncio.sleep(args.interval)
        last: dict[str, float] = {}
        for appliance in appliances:  # the last beat of each
            await beat(appliance, args.interval)
            last[appliance.appliance_id] = time.monotonic()
        threshold = args.interval * args.misses
        deadline = time.monotonic() + threshold + 30
        while len(hooks) < len(appliances) or len(mailbox.arrived) < len(appliances):
            assert time.monotonic() < deadline, "notifications did not arrive"
            await asyncio.sleep(0.01)
        webhook = [hooks[a] - last[a] for a in last]
        email = [next(t for s, t in mailbox.arrived.items() if a in s) - last[a] for a in last]
        print(f"threshold={threshold:.3f} s")
        print(f"webhook_median={statistics.median(webhook):.3f} s")
        print(f"webhook_worst={max(webhook):.3f} s")
        print(f"email_median={statistics.median(email):.3f} s")
        print(f"email_worst={max(email):.3f} s")
        print(f"excess={max(*webhook, *email) - threshold:.3f} s")
    finally:
        await client.close()
        await receiver.close()
        controller.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appliances", type=int, default=5)
    parser.add_argument("--interval", type=int, default=1)
    parser.add_argument("--misses", type=int, default=3)
    parser.add_argument("--tick", type=float, default=0.5)
    parser.add_argument("--postgresql", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.postgresql:
            name = f"msp_notify_bench_{os.getpid()}"
            url = asyncio.run(create_pg_database(name))
            try:
                asyncio.run(run(args, url, Path(tmp)))
            finally:
                asyncio.run(drop_pg_database(name))
        else:
            asyncio.run(run(args, f"sqlite+aiosqlite:///{tmp}/central.db", Path(tmp)))


if __name__ == "__main__":
    main()
