"""The README's run command, as a newcomer runs it: ``msp-central demo``
starts a server and enrolled agents as processes, prints where to look, and
stops everything on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tests.system.harness import ROOT, free_port, wait_for


async def _posture_and_audit_export_verify(guide: str, port: int, tmp_path: Path) -> None:
    """The demo site's posture is one call; an appliance's witnessed log,
    downloaded as the guide says, verifies with the key file it names."""
    key = re.search(r"^partner API key +(\S+)", guide, re.M)
    site = re.search(r"^site +(\S+)", guide, re.M)
    key_file_named = re.search(r"^central key +[0-9a-f]{64} +\(also in ([^,]+),", guide, re.M)
    assert key, guide
    assert site, guide
    assert key_file_named, guide
    key_file = Path(key_file_named[1])
    if not key_file.is_absolute():
        key_file = ROOT / key_file
    headers = {"Authorization": f"Bearer {key[1]}"}
    base = f"http://127.0.0.1:{port}/api/v1/sites/{site[1]}"
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(f"{base}/posture") as response:
            assert response.status == 200
            posture = await response.json()
        frameworks = {f["framework_id"] for f in posture["frameworks"]}
        assert "hipaa" in frameworks
        decided = [
            c
            for f in posture["frameworks"]
            for c in f["controls"]
            if c["state"] in {"passing", "failing", "error"}
        ]
        assert decided, "no control is decided by the agents' evidence"
        assert all(c["evidence"]["bundle_id"] for c in decided)
        async with session.get(f"{base}/appliances") as response:
            appliance_id = (await response.json())["items"][0]["id"]
        async with session.get(f"{base}/appliances/{appliance_id}/audit-export") as response:
            assert response.status == 200
            (tmp_path / "audit-export.json").write_bytes(await response.read())
    verified = subprocess.run(
        [
            sys.executable,
            "-m",
            "msp_protocol.verify_cli",
            "--central-key-file",
            str(key_file),
            str(tmp_path / "audit-export.json"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def _console_signs_in(guide: str, port: int) -> None:
    """The console user the guide prints signs in at the console URL it prints."""
    url = re.search(r"^partner console +(\S+)", guide, re.M)
    email = re.search(r"^  sign in as +(\S+)", guide, re.M)
    password = re.search(r"^  password +(\S+)", guide, re.M)
    assert url, guide
    assert email, guide
    assert password, guide
    assert url[1] == f"http://127.0.0.1:{port}/console/"
    origin = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.get(url[1]) as response:
            assert response.status == 200
            assert "Sign in" in await response.text()
        form = {"email": email[1], "password": password[1], "next": "/console/compliance"}
        async with session.post(
            f"{origin}/console/sign-in", data=form, headers={"Origin": origin}
        ) as response:
            assert response.status == 200
            assert str(response.url).endswith("/console/compliance")
        async with session.get(f"{origin}/api/v1/me") as response:
            assert response.status == 200
            me = await response.json()
    assert (me["email"], me["role"]) == (email[1], "admin")


async def test_the_demo_runs_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    output = tmp_path / "demo.out"
    with output.open("wb") as out:
        demo = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "msp_central",
                "demo",
                "--dir",
                str(tmp_path / "demo"),
                "--port",
                str(port),
                "--agents",
                "2",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        await wait_for(
            lambda: b"Ctrl-C stops everything" in output.read_bytes(),
            within=60,
            what="the demo's guide",
        )
        guide = output.read_text()
        assert f"http://127.0.0.1:{port}" in guide
        assert "partner API key   mspk_" in guide
        await _console_signs_in(guide, port)

        def witnessed(number: int) -> bool:
            try:
                status = json.loads(
                    (tmp_path / "demo" / f"agent-{number}" / "state" / "status.json").read_text()
                )
            except (OSError, ValueError):
                return False
            return bool(status.get("last_check_at")) and status.get("witnessed_size", 0) > 2

        for number in (1, 2):
            await wait_for(
                lambda n=number: witnessed(n), within=60, what=f"agent {number} witnessed"
            )
        await _posture_and_audit_export_verify(guide, port, tmp_path)
        agents = [
            int(
                json.loads(
                    (tmp_path / "demo" / f"agent-{n}" / "state" / "status.json").read_text()
                )["pid"]
            )
            for n in (1, 2)
        ]
    finally:
        started = time.monotonic()
        demo.send_signal(signal.SIGINT)
        status = demo.wait(30)
    assert status == 0, output.read_text()[-3000:]
    assert time.monotonic() - started < 20
    assert "stopped." in output.read_text()
    for pid in agents:  # no agent left behind
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"agent process {pid} still running after the demo stopped")


async def test_ctrl_c_with_the_output_piped_stops_the_agents(tmp_path: Path) -> None:
    """``msp-central demo | tee log``: Ctrl-C kills tee with the demo, so
    the demo's output is a broken pipe while it stops. The agents stop all
    the same, and a second demo on the same directory while the first still
    runs cannot start a second agent on an agent's state directory."""
    port = free_port()
    directory = tmp_path / "demo"
    demo = subprocess.Popen(
        [
            *(sys.executable, "-m", "msp_central", "demo", "--dir", str(directory)),
            *("--port", str(port), "--agents", "1"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    assert demo.stdout is not None
    seen = b""
    status_file = directory / "agent-1" / "state" / "status.json"
    try:
        deadline = time.monotonic() + 60
        while b"Ctrl-C stops everything" not in seen and time.monotonic() < deadline:
            seen += demo.stdout.read1(65536)
        assert b"Ctrl-C stops everything" in seen, seen.decode(errors="replace")
        await wait_for(status_file.exists, within=60, what="the agent's status")
        await wait_for(
            lambda: "pid" in json.loads(status_file.read_text() or "{}"),
            within=30,
            what="the agent's pid",
        )
        agent = int(json.loads(status_file.read_text())["pid"])

        second = subprocess.run(
            [
                *(sys.executable, "-m", "msp_central", "demo", "--dir", str(directory)),
                *("--port", str(free_port()), "--agents", "1"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode != 0
        assert "another agent" in second.stderr, second.stderr
    finally:
        demo.stdout.close()  # the reader dies first, as tee does on Ctrl-C
        demo.send_signal(signal.SIGINT)
        demo.wait(30)
    try:
        os.kill(agent, 0)
    except ProcessLookupError:
        return
    raise AssertionError(f"agent process {agent} still running after the demo stopped")
