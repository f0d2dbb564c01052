"""The throw-away PostgreSQL cluster the tests fall back on when no server
answers: it starts from the installed binaries (also as root), serves, and
leaves nothing behind; binaries are found, newest first; a machine without
PostgreSQL gets one line saying what to install."""

from __future__ import annotations

import asyncio
import socket
import stat
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from tests import postgres


async def _round_trip(cluster: postgres.Cluster) -> tuple[list[str], str, str]:
    """A table written and read back over the cluster's URL (asyncpg)."""
    engine = create_async_engine(cluster.url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                sa.text("CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)")
            )
            await connection.execute(
                sa.text("INSERT INTO notes (body) VALUES (:body)"), [{"body": "a"}, {"body": "b"}]
            )
            rows = await connection.execute(sa.text("SELECT body FROM notes ORDER BY id"))
            listen = await connection.scalar(sa.text("SHOW listen_addresses"))
            sockets = await connection.scalar(sa.text("SHOW unix_socket_directories"))
            return [row.body for row in rows], str(listen), str(sockets)
    finally:
        await engine.dispose()


def test_a_throwaway_cluster_serves_then_leaves_nothing() -> None:
    # Started explicitly: the session may be using a running server instead.
    cluster = postgres.start_cluster()
    try:
        assert postgres.answers(cluster.url)
        bodies, listen, sockets = asyncio.run(_round_trip(cluster))
        assert bodies == ["a", "b"]
        assert listen == "127.0.0.1"
        assert sockets == str(cluster.directory)
    finally:
        cluster.stop()
    assert not cluster.directory.exists()
    assert not postgres.answers(cluster.url)


def test_a_closed_port_does_not_answer_and_a_listening_one_does() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert postgres.answers(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres")
    assert not postgres.answers(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres")


def _install(bindir: Path, names: tuple[str, ...] = postgres.BINARIES) -> Path:
    bindir.mkdir(parents=True)
    for name in names:
        (bindir / name).write_text("#!/bin/sh\nexit 0\n")
        (bindir / name).chmod(stat.S_IRWXU)
    return bindir


def test_the_newest_debian_version_is_chosen(tmp_path: Path) -> None:
    # "9.6" sorts after "15" as text; as a version it is older.
    for version in ("9.6", "15", "13"):
        _install(tmp_path / version / "bin")
    # A version with only the client tools cannot start a server.
    _install(tmp_path / "17" / "bin", ("pg_dump", "psql"))
    assert postgres.find_bindir(search_path="", debian_root=tmp_path) == tmp_path / "15" / "bin"


def test_initdb_on_the_path_wins_over_debian(tmp_path: Path) -> None:
    path_dir = _install(tmp_path / "path")
    _install(tmp_path / "debian" / "16" / "bin")
    found = postgres.find_bindir(search_path=str(path_dir), debian_root=tmp_path / "debian")
    assert found == path_dir.resolve()


def test_pg_config_names_the_directory_when_initdb_is_not_on_the_path(tmp_path: Path) -> None:
    bindir = _install(tmp_path / "server" / "bin")
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "pg_config").write_text(f"#!/bin/sh\necho {bindir}\n")
    (tools / "pg_config").chmod(stat.S_IRWXU)
    _install(tmp_path / "debian" / "16" / "bin")
    found = postgres.find_bindir(search_path=str(tools), debian_root=tmp_path / "debian")
    assert found == bindir


def test_without_postgresql_the_message_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(postgres.PostgresNotInstalled) as raised:
        postgres.find_bindir(search_path="", debian_root=tmp_path)
    message = str(raised.value)
    assert "\n" not in message
    assert "install" in message
    assert "postgresql" in message
