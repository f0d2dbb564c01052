"""``msp-central`` as the operator runs it: a real process per command.

Each process costs about a second of imports, so commands that do not depend
on each other run side by side, and one provisioned state directory (root
key, migrated SQLite database, partner, site, token) serves several tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from msp_central.db.engine import create_engine
from msp_central.db.migrate import head_revision
from msp_protocol.delegation import DelegationCertificate, Scope, make_delegation_request
from msp_protocol.dsse import Envelope
from msp_protocol.keys import SigningKey
from tests.central.support import create_pg_database, drop_pg_database

TIMEOUT = 60


# --- running the command ---------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One command line, with extra environment variables."""

    args: Sequence[str | Path]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.returncode == 0, self
        return json.loads(self.stdout)


def _environment(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSP_CENTRAL_")}
    env.update(extra)
    return env


def _start(run: Run, cwd: Path, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "msp_central.cli", *map(str, run.args)],
        cwd=cwd,
        env=_environment(run.env),
        text=True,
        **kwargs,
    )


def cli_all(cwd: Path, *runs: Run | Sequence[str | Path]) -> list[Result]:
    """Run the commands side by side; their results in order."""
    commands = [run if isinstance(run, Run) else Run(run) for run in runs]
    started: list[subprocess.Popen[str]] = []
    try:
        for run in commands:
            started.append(_start(run, cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        results = []
        for run, process in zip(commands, started, strict=True):
            stdout, stderr = process.communicate(timeout=TIMEOUT)
            results.append(Result(list(map(str, run.args)), process.returncode, stdout, stderr))
        return results
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


def cli(cwd: Path, *args: str | Path) -> Result:
    (result,) = cli_all(cwd, args)
    return result


def assert_fails(result: Result, *fragments: str) -> str:
    """Exit status 1, nothing on stdout, one line ``msp-central: …`` on stderr."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("msp-central: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert result.stdout == "", result.stdout
    return line


def assert_all_fail(*cases: tuple[Result, Sequence[str]]) -> None:
    """assert_fails on every case; report every case that does not."""
    failures = []
    for result, fragments in cases:
        try:
            assert_fails(result, *fragments)
        except AssertionError as error:
            failures.append(f"{result.args}:\n{error}")
    assert not failures, "\n\n".join(failures)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- one provisioned state directory ---------------------------------------------------


@dataclass(frozen=True)
class State:
    dir: Path
    key_file: Path
    key_id: str
    public_key: str
    partner_id: str
    api_key: str
    site_id: str
    token: str
    steps: dict[str, Result]


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> State:
    """keys init, db upgrade, partner/site/token create: every step's result."""
    base = tmp_path_factory.mktemp("cli")
    state_dir = base / "state"
    steps: dict[str, Result] = {}
    sd = ("--state-dir", state_dir)
    steps["keys init"], steps["partner before upgrade"] = cli_all(
        base, [*sd, "keys", "init"], [*sd, "partner", "create", "Early MSP"]
    )
    steps["db upgrade"] = cli(base, *sd, "db", "upgrade")
    steps["partner create"] = partner = cli(base, *sd, "partner", "create", "Acme MSP")
    partner_id = partner.json()["partner_id"]
    steps["site create"] = site = cli(
        base, *sd, "site", "create", "--partner", partner_id, "Clinic"
    )
    site_id = site.json()["site_id"]
    steps["token create"] = token = cli(
        base, *sd, "token", "create", "--site", site_id, "--hours", "2"
    )
    key = steps["keys init"].json()
    return State(
        dir=state_dir,
        key_file=state_dir / "keys" / "root.key",
        key_id=key["key_id"],
        public_key=key["public_key"],
        partner_id=partner_id,
        api_key=partner.json()["api_key"],
        site_id=site_id,
        token=token.json()["token"],
        steps=steps,
    )


# --- keys -------------------------------------------------------------------------------


def test_keys_init_writes_a_private_key_and_prints_only_public_values(state: State) -> None:
    result = state.steps["keys init"]
    assert result.returncode == 0, result
    assert mode(state.key_file) == 0o600
    assert mode(state.key_file.parent) == 0o700
    seed = state.key_file.read_text(encoding="ascii").strip()
    key = SigningKey(bytes.fromhex(seed))
    printed = json.loads(result.stdout)
    assert printed == {
        "key_file": str(state.key_file),
        "key_id": key.key_id,
        "public_key": key.verify_key.hex,
    }
    assert seed not in result.stdout
    assert seed not in result.stderr


def test_keys_init_refuses_to_overwrite_and_show_prints_the_key(
    state: State, tmp_path: Path
) -> None:
    before = state.key_file.read_bytes()
    again, show, bare = cli_all(
        tmp_path,
        ["--state-dir", state.dir, "keys", "init"],
        ["--state-dir", state.dir, "keys", "show"],
        ["--state-dir", state.dir, "keys", "show", "--hex"],
    )
    assert_fails(again, str(state.key_file), "refusing to overwrite")
    assert state.key_file.read_bytes() == before
    assert mode(state.key_file) == 0o600
    assert show.json() == {"key_id": state.key_id, "public_key": state.public_key}
    assert before.decode().strip() not in show.stdout
    # Exactly what msp-verify --central-key-file reads (and the server publishes).
    assert bare.stdout == state.public_key + "\n"


def test_a_root_key_others_can_read_is_refused(state: State, tmp_path: Path) -> None:
    """serve refuses a group-readable key, keys revoke a world-readable one,
    naming chmod; serving an unmigrated database is refused too."""
    group, world, unmigrated = tmp_path / "group", tmp_path / "world", tmp_path / "unmigrated"
    for where, file_mode in ((group, 0o640), (world, 0o604), (unmigrated, 0o600)):
        (where / "keys").mkdir(parents=True, mode=0o700)
        shutil.copy(state.key_file, where / "keys" / "root.key")
        (where / "keys" / "root.key").chmod(file_mode)
    # The loose keys sit next to a migrated database: only the key is wrong.
    shutil.copy(state.dir / "central.db", group / "central.db")
    shutil.copy(state.dir / "central.db", world / "central.db")
    port, other_port = str(free_port()), str(free_port())
    serve, revoke, serve_unmigrated, workers_unmigrated = cli_all(
        tmp_path,
        ["--state-dir", group, "serve", "--port", port],
        ["--state-dir", world, "keys", "revoke", "0" * 32],
        ["--state-dir", unmigrated, "serve", "--port", port],
        ["--state-dir", unmigrated, "serve", "--port", other_port, "--workers", "2"],
    )
    group_key, world_key = group / "keys" / "root.key", world / "keys" / "root.key"
    assert_all_fail(
        (serve, (f"{group_key} is readable by others", f"chmod 600 {group_key}")),
        (revoke, (f"{world_key} is readable by others", f"chmod 600 {world_key}")),
    )
    # serve announces itself before the database is checked: the failure is
    # the last line, with no traceback.
    assert serve_unmigrated.returncode == 1, serve_unmigrated
    assert "Traceback" not in serve_unmigrated.stderr, serve_unmigrated.stderr
    last = serve_unmigrated.stderr.splitlines()[-1]
    assert last.startswith("msp-central: database is at revision none"), last
    assert "run `msp-central db upgrade`" in last
    # With worker processes, each worker says so in one line, and all stop.
    assert workers_unmigrated.returncode == 1, workers_unmigrated
    assert "Traceback" not in workers_unmigrated.stderr, workers_unmigrated.stderr
    failures = [line for line in workers_unmigrated.stderr.splitlines() if "revision none" in line]
    assert 1 <= len(failures) <= 2, workers_unmigrated.stderr


# --- the database and records ----------------------------------------------------------


def test_db_upgrade_migrates_once(state: State, tmp_path: Path) -> None:
    first = state.steps["db upgrade"]
    assert first.returncode == 0, first
    assert first.stdout == f"database at revision {head_revision()}\n"
    again = cli(tmp_path, "--state-dir", state.dir, "db", "upgrade")
    assert again.returncode == 0, again
    assert again.stdout == first.stdout
    assert "Running upgrade" not in again.stderr
    assert "Traceback" not in again.stderr
    with contextlib.closing(sqlite3.connect(state.dir / "central.db")) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (head_revision(),)
        ]
        partners = db.execute("SELECT id, name FROM partners").fetchall()
        assert (state.partner_id, "Acme MSP") in partners
        assert db.execute("SELECT count(*) FROM frameworks").fetchone()[0] > 0
    # a command that needs the database, run before the upgrade
    early = state.steps["partner before upgrade"]
    assert_fails(early, "database is at revision none", "run `msp-central db upgrade`")


def test_partner_site_and_token(state: State, tmp_path: Path) -> None:
    partner = state.steps["partner create"].json()
    assert partner["name"] == "Acme MSP"
    assert partner["partner_id"] == state.partner_id
    assert state.api_key.startswith("mspk_")
    assert state.steps["site create"].json() == {
        "site_id": state.site_id,
        "partner_id": state.partner_id,
        "name": "Clinic",
    }
    token = state.steps["token create"].json()
    assert token["site_id"] == state.site_id
    assert token["token"].startswith("msp-enroll_")
    expires = datetime.fromisoformat(token["expires_at"])
    assert expires.utcoffset() == timedelta(0)
    assert timedelta(minutes=110) < expires - datetime.now(UTC) < timedelta(hours=2)

    sd = ("--state-dir", state.dir)
    no_partner, no_site, no_serial, zero_hours = cli_all(
        tmp_path,
        [*sd, "site", "create", "--partner", "partner_nonexistent", "Nowhere"],
        [*sd, "token", "create", "--site", "site_nonexistent"],
        [*sd, "keys", "revoke", "f" * 32],
        [*sd, "token", "create", "--site", state.site_id, "--hours", "0"],
    )
    assert_all_fail(
        (no_partner, ["no partner partner_nonexistent"]),
        (no_site, ["no site site_nonexistent"]),
        (no_serial, ["no certificate " + "f" * 32]),
        # A token that expires as it is made is a mistake the API refuses
        # (hours: 1..720): the command line must refuse it too.
        (zero_hours, ["hours"]),
    )


# --- serving ----------------------------------------------------------------------------


def _http(url: str, *, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    headers = {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read() or b"null")


@pytest.fixture
def server(state: State, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = _start(
            Run(["--state-dir", state.dir, "serve", "--host", "127.0.0.1", "--port", str(port)]),
            tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{base}/api/v1/openapi.json", timeout=2) as reply:
                    assert reply.status == 200
                    json.loads(reply.read())
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        yield process, base, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_enroll_revoke_and_stop(
    state: State, server: tuple[subprocess.Popen[str], str, Path], tmp_path: Path
) -> None:
    process, base, log = server
    status, partner = _http(f"{base}/api/v1/partner", token=state.api_key)
    assert status == 200, partner
    assert partner["id"] == state.partner_id
    status, body = _http(f"{base}/api/v1/partner")
    assert status == 401, body

    appliance_key = SigningKey.generate()
    request = make_delegation_request(
        purpose="enroll",
        audience=state.key_id,
        subject=appliance_key,
        scopes=[Scope.AUDIT, Scope.EVIDENCE],
        enrollment_token=state.token,
    )
    status, enrolled = _http(
        f"{base}/api/v1/enroll", body={"token": state.token, "request": request.to_wire()}
    )
    assert status == 201, enrolled
    assert enrolled["site_id"] == state.site_id
    certificate = Envelope.from_wire(enrolled["certificate"])
    serial = DelegationCertificate.from_json(certificate.payload_bytes()).serial

    revoked = cli(tmp_path, "--state-dir", state.dir, "keys", "revoke", serial, "--reason", "lost")
    assert revoked.json() == {
        "serial": serial,
        "appliance_id": enrolled["appliance_id"],
        "cutoff_size": 0,
        "revoked_serials": [serial],
        "revocation_list_version": 1,
    }

    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    # aiohttp's run_app turns SIGTERM into GracefulExit, swallows it and
    # returns: the command exits 0.
    assert process.wait(timeout=10) == 0, log.read_text()
    assert time.monotonic() - started < 5
    output = log.read_text()
    assert f"msp-central: serving on {base} (root key {state.key_id})" in output
    assert "Traceback" not in output


# --- bad input and configuration -------------------------------------------------------


def test_bad_input_is_one_line(tmp_path: Path, postgres_admin_url: str) -> None:
    (tmp_path / "bad.toml").write_text("state_dir = [unclosed\n")
    (tmp_path / "bad.json").write_text('{"state_dir": ')
    (tmp_path / "unknown.toml").write_text('state_dir = "x"\nlisten_port = 1\n')
    sd = ("--state-dir", tmp_path / "state")
    missing_db = postgres_admin_url.rsplit("/", 1)[0] + f"/msp_central_cli_{os.getpid()}_missing"
    results = cli_all(
        tmp_path,
        ["--config", tmp_path / "bad.toml", "keys", "show"],
        ["--config", tmp_path / "bad.json", "keys", "show"],
        ["--config", tmp_path / "unknown.toml", "keys", "show"],
        [*sd, "serve", "--port", "70000"],
        [*sd, "--database-url", "mysql://user@127.0.0.1/central", "db", "upgrade"],
        # an unparsable URL, and one naming a synchronous driver, are the
        # same operator mistake as an unknown scheme
        [*sd, "--database-url", "not a url", "db", "upgrade"],
        [*sd, "--database-url", f"sqlite:///{tmp_path / 'sync.db'}", "db", "upgrade"],
        # a database that is not there
        [*sd, "--database-url", missing_db, "db", "upgrade"],
    )
    expected = [
        ("bad.toml does not parse",),
        ("bad.json does not parse",),
        ("invalid setting listen_port",),
        ("invalid setting port", "65535"),
        ("unsupported database 'mysql'",),
        ("database",),
        ("database",),
        (missing_db.rsplit("/", 1)[1],),
    ]
    assert_all_fail(*zip(results, expected, strict=True))
    assert not (tmp_path / "state" / "keys").exists()


def test_settings_from_the_environment(tmp_path: Path) -> None:
    """MSP_CENTRAL_STATE_DIR wins over the file, and a flag over both."""
    (tmp_path / "config.toml").write_text(f'state_dir = "{tmp_path / "from-file"}"\n')
    env_over_file, flag_over_env = cli_all(
        tmp_path,
        Run(
            ["--config", tmp_path / "config.toml", "keys", "init"],
            {"MSP_CENTRAL_STATE_DIR": str(tmp_path / "from-env")},
        ),
        Run(
            [
                *("--config", tmp_path / "config.toml"),
                *("--state-dir", tmp_path / "from-flag"),
                *("keys", "init"),
            ],
            {"MSP_CENTRAL_STATE_DIR": str(tmp_path / "flag-loses")},
        ),
    )
    key_file = tmp_path / "from-env" / "keys" / "root.key"
    assert env_over_file.json()["key_file"] == str(key_file)
    assert mode(key_file) == 0o600
    assert not (tmp_path / "from-file").exists()
    # A command-line flag is the most specific setting: it wins over the
    # environment as it does over the file ("--state-dir: overrides state_dir").
    assert flag_over_env.json()["key_file"] == str(tmp_path / "from-flag" / "keys" / "root.key"), (
        "the environment beat --state-dir"
    )
    assert not (tmp_path / "flag-loses").exists()


# --- PostgreSQL -------------------------------------------------------------------------


@pytest.fixture
def pg_url(postgres_admin_url: str) -> Iterator[str]:
    name = f"msp_central_cli_{os.getpid()}_happy"
    try:
        yield asyncio.run(create_pg_database(name, postgres_admin_url))
    finally:
        asyncio.run(drop_pg_database(name, postgres_admin_url))


def test_postgresql_happy_path(pg_url: str, tmp_path: Path) -> None:
    common = ("--state-dir", tmp_path / "state", "--database-url", pg_url)
    # The central log records the partner's creation, signed by the root key.
    assert cli(tmp_path, *common, "keys", "init").returncode == 0
    upgrade = cli(tmp_path, *common, "db", "upgrade")
    assert upgrade.returncode == 0, upgrade
    assert upgrade.stdout == f"database at revision {head_revision()}\n"
    partner = cli(tmp_path, *common, "partner", "create", "Acme MSP").json()
    assert partner["name"] == "Acme MSP"
    assert partner["api_key"].startswith("mspk_")
    assert not (tmp_path / "state" / "central.db").exists()

    async def stored() -> list[tuple[str, str]]:
        engine = create_engine(pg_url)
        try:
            async with engine.connect() as connection:
                rows = await connection.execute(sa.text("SELECT id, name FROM partners"))
                return [(row.id, row.name) for row in rows]
        finally:
            await engine.dispose()

    assert asyncio.run(stored()) == [(partner["partner_id"], "Acme MSP")]
    exported = cli(tmp_path, *common, "export", "central-log", "-o", tmp_path / "central.json")
    assert exported.json()["bytes"] > 0
    log = json.loads((tmp_path / "central.json").read_bytes())
    kinds = [json.loads(base64.b64decode(entry))["kind"] for entry in log["entries"]]
    assert kinds == ["central.genesis", "partner.created"]


def test_serve_with_worker_processes(state: State, tmp_path: Path) -> None:
    """Replicas on one port share only the database: a partner created through
    one is seen through any; SIGTERM stops them all, cleanly."""
    port = free_port()
    log = tmp_path / "workers.log"
    with log.open("w") as out:
        process = _start(
            Run(["--state-dir", state.dir, "serve", "--port", str(port), "--workers", "2"]),
            tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 40
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if _http(f"{base}/api/v1/openapi.json")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        for _ in range(20):  # new connections, spread over the workers by the kernel
            status, partner = _http(f"{base}/api/v1/partner", token=state.api_key)
            assert (status, partner["id"]) == (200, state.partner_id)
        children = [
            child
            for child in subprocess.run(
                ["pgrep", "-P", str(process.pid)], capture_output=True, text=True, check=False
            ).stdout.split()
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
        ]
        assert len(children) == 2, children
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, log.read_text()
        for child in children:
            assert (
                not Path(f"/proc/{child}").exists()
                or "zombie" in Path(f"/proc/{child}/status").read_text()
            ), f"worker {child} still running"
        assert "with 2 worker processes" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_workers_out_of_range(state: State, tmp_path: Path) -> None:
    result = cli(tmp_path, "--state-dir", state.dir, "serve", "--workers", "0")
    assert_fails(result, "--workers 0")


# --- listings and API keys ----------------------------------------------------------------


def table(result: Result) -> list[list[str]]:
    """An aligned table: a header, one line per row, every column starting
    where its header does; the cells of each line."""
    assert result.returncode == 0, result
    header, *lines = result.stdout.splitlines()
    names = header.split("  ")
    names = [name.strip() for name in names if name.strip()]
    starts = [header.index(name) for name in names]
    cells = []
    for line in lines:
        row = [
            line[start:end].strip() for start, end in zip(starts, [*starts[1:], None], strict=True)
        ]
        assert all(row), (line, header)
        assert all(line[start - 1] == " " for start in starts[1:]), (line, header)
        cells.append(row)
    return [names, *cells]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_list_commands_and_api_keys(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    common: tuple[str | Path, ...] = ("--state-dir", tmp_path / "state")
    if backend == "postgresql":
        common += ("--database-url", request.getfixturevalue("pg_url"))
    assert cli(tmp_path, *common, "keys", "init").returncode == 0
    assert cli(tmp_path, *common, "db", "upgrade").returncode == 0
    partner = cli(tmp_path, *common, "partner", "create", "Acme MSP").json()
    partner_id = partner["partner_id"]
    site_id = cli(tmp_path, *common, "site", "create", "--partner", partner_id, "Clinic").json()[
        "site_id"
    ]
    token = cli(tmp_path, *common, "token", "create", "--site", site_id).json()
    created = cli(tmp_path, *common, "key", "create", "--partner", partner_id, "--name", "ci")
    key = created.json()
    assert key["api_key"].startswith("mspk_")

    partners, sites, tokens, keys, appliances, all_keys = cli_all(
        tmp_path,
        [*common, "partner", "list"],
        [*common, "site", "list", "--partner", partner_id],
        [*common, "token", "list", "--site", site_id],
        [*common, "key", "list", "--partner", partner_id],
        [*common, "appliance", "list", "--site", site_id],
        [*common, "key", "list"],
    )
    assert table(partners) == [
        ["ID", "NAME", "CREATED", "SITES"],
        [partner_id, "Acme MSP", table(partners)[1][2], "1"],
    ]
    assert [row[:3] + row[4:] for row in table(sites)] == [
        ["ID", "PARTNER", "NAME", "DECOMMISSIONED"],
        [site_id, partner_id, "Clinic", "-"],
    ]
    (header, row) = table(tokens)
    assert dict(zip(header, row, strict=True)) | {"CREATED": "", "EXPIRES": ""} == {
        "ID": token["token_id"],
        "STATE": "active",
        "CREATED": "",
        "EXPIRES": "",
        "CREATED BY": "cli",
        "APPLIANCE": "-",
    }
    listed = [dict(zip(table(keys)[0], row, strict=True)) for row in table(keys)[1:]]
    assert [(k["NAME"], k["STATE"], k["ROLE"]) for k in listed] == [
        ("-", "active", "partner"),
        ("ci", "active", "partner"),
    ]
    assert listed[1]["ID"] == key["key_id"]
    assert key["api_key"].startswith(listed[1]["PREFIX"])
    assert key["api_key"] not in keys.stdout + all_keys.stdout + tokens.stdout
    assert token["token"] not in tokens.stdout
    assert table(appliances) == [
        ["ID", "SITE", "STATE", "CREATED", "LAST SEEN", "WITNESSED", "SERIAL"]
    ]

    revoked = cli(tmp_path, *common, "key", "revoke", key["key_id"]).json()
    assert (revoked["id"], revoked["state"]) == (key["key_id"], "revoked")
    after, missing, no_site, no_partner = cli_all(
        tmp_path,
        [*common, "key", "list", "--partner", partner_id],
        [*common, "key", "revoke", "key-none"],
        [*common, "token", "list", "--site", "site-none"],
        [*common, "site", "list", "--partner", "partner-none"],
    )
    assert [row[5] for row in table(after)[1:]] == ["active", "revoked"]
    assert_all_fail(
        (missing, ["no API key key-none"]),
        (no_site, ["no site site-none"]),
        (no_partner, ["no partner partner-none"]),
    )


def test_bad_arguments_are_one_line_and_help_is_plain(tmp_path: Path) -> None:
    sd = ("--state-dir", tmp_path / "state")
    bad = cli_all(
        tmp_path,
        [*sd, "site", "list", "--bogus"],
        [*sd, "token", "list"],
        [*sd, "key", "frobnicate"],
        [*sd, "serve", "--port", "eighty"],
    )
    for result, fragment in zip(bad, ["--bogus", "--site", "frobnicate", "eighty"], strict=True):
        assert result.returncode == 2, result
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert line.startswith("msp-central"), line
        assert fragment in line, line
    helps = cli_all(
        tmp_path,
        ["--help"],
        ["key", "--help"],
        ["key", "create", "--help"],
        ["appliance", "list", "--help"],
        ["token", "list", "--help"],
    )
    for result in helps:
        assert result.returncode == 0, result
        assert "``" not in result.stdout, result.stdout
        assert "usage: msp-central" in result.stdout
