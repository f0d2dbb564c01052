"""The PostgreSQL server the tests use: the one the environment names if it
answers, else a throw-away cluster started from the installed binaries.

The central server's tests must run on PostgreSQL, never be skipped; a
developer who has PostgreSQL installed but not running (or running on another
port) should not have to start or configure a server to run them. The
throw-away cluster lives in a temporary directory, listens on a free port of
127.0.0.1 only, trusts every local connection, and is stopped and deleted when
the test session ends.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
URL_VARIABLE = "MSP_TEST_POSTGRES_URL"
DEBIAN_ROOT = Path("/usr/lib/postgresql")
# initdb and pg_ctl refuse to run as root; the cluster then belongs to one of these.
UNPRIVILEGED_USERS = ("postgres", "nobody")
SUPERUSER = "postgres"
START_TIMEOUT = 60
INSTALL_HINT = (
    "PostgreSQL is neither running nor installed: install its server binaries "
    "(Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql) "
    f"or name a running server in {URL_VARIABLE}"
)
# Every binary the cluster needs: pg_ctl starts postgres from its own directory.
BINARIES = ("initdb", "pg_ctl", "postgres")


class PostgresNotInstalled(RuntimeError):
    """No directory holds initdb, pg_ctl and postgres."""


def configured_url() -> str:
    """The server the environment names, or the default local one."""
    return os.environ.get(URL_VARIABLE, DEFAULT_URL)


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether anything accepts a TCP connection at the URL's host and port.

    A refused or unreachable port means "no server here"; a server that
    answers but refuses the login is left to fail the tests with its own
    message rather than being silently replaced."""
    parsed = make_url(url)
    try:
        with socket.create_connection((parsed.host or "localhost", parsed.port or 5432), timeout):
            return True
    except OSError:
        return False


def _holds_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in BINARIES)


def _version_key(directory: Path) -> tuple[int, ...]:
    """Debian's "9.6" sorts below "15": compare the numbers, not the text."""
    return tuple(int(part) for part in re.findall(r"\d+", directory.name))


def find_bindir(search_path: str | None = None, debian_root: Path = DEBIAN_ROOT) -> Path:
    """The directory of the PostgreSQL server binaries: initdb on the PATH,
    else ``pg_config --bindir``, else the newest of Debian's versioned
    directories (Debian keeps initdb and pg_ctl off the PATH)."""
    initdb = shutil.which("initdb", path=search_path)
    if initdb is not None and _holds_binaries(Path(initdb).resolve().parent):
        return Path(initdb).resolve().parent
    pg_config = shutil.which("pg_config", path=search_path)
    if pg_config is not None:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        bindir = Path(result.stdout.strip())
        if result.returncode == 0 and bindir.is_absolute() and _holds_binaries(bindir):
            return bindir
    versions = sorted(
        (d for d in debian_root.glob("*/bin") if _holds_binaries(d)),
        key=lambda d: _version_key(d.parent),
    )
    if versions:
        return versions[-1]
    raise PostgresNotInstalled(INSTALL_HINT)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _owner() -> pwd.struct_passwd | None:
    """The unprivileged account the cluster runs as when we are root, since
    PostgreSQL will not; None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError(
        f"running as root, and no unprivileged account ({', '.join(UNPRIVILEGED_USERS)}) "
        "to own a throw-away PostgreSQL cluster"
    )


@dataclass(frozen=True)
class Cluster:
    """A running throw-away cluster; ``stop`` removes every trace of it."""

    directory: Path
    bindir: Path
    port: int
    owner: pwd.struct_passwd | None

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        """One PostgreSQL command, as the cluster's owner."""
        command = [str(arg) for arg in args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if self.owner is None:
            return subprocess.run(
                command, cwd=self.directory, env=env, capture_output=True, text=True, check=False
            )
        env["HOME"] = str(self.directory)
        env["USER"] = env["LOGNAME"] = self.owner.pw_name
        return subprocess.run(
            command,
            cwd=self.directory,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            user=self.owner.pw_uid,
            group=self.owner.pw_gid,
            extra_groups=[],
        )

    def check(self, what: str, *args: str | Path) -> None:
        result = self.run(*args)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"throw-away PostgreSQL: {what} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}{log}"
            )

    def stop(self) -> None:
        """Stop the server (fast: roll back, disconnect) and delete the directory."""
        try:
            if (self.data / "postmaster.pid").exists():
                stopped = self.run(self.bindir / "pg_ctl", "stop", "-D", self.data, "-m", "fast")
                if stopped.returncode != 0 and (self.data / "postmaster.pid").exists():
                    self.run(self.bindir / "pg_ctl", "stop", "-D", self.data, "-m", "immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def start_cluster(bindir: Path | None = None, attempts: int = 3) -> Cluster:
    """A new cluster, initialised and accepting connections.

    The port is picked free just before the start; another process may take it
    in between, so the start is retried on a new port."""
    bindir = bindir or find_bindir()
    owner = _owner()
    directory = Path(tempfile.mkdtemp(prefix="msp-test-postgres-"))
    if owner is not None:
        os.chown(directory, owner.pw_uid, owner.pw_gid)
    cluster = Cluster(directory, bindir, 0, owner)
    try:
        cluster.check(
            "initdb",
            bindir / "initdb",
            *("-D", cluster.data, "-U", SUPERUSER, "-A", "trust"),
            *("-E", "UTF8", "--locale=C", "--no-sync"),
        )
        for _ in range(attempts - 1):
            with contextlib.suppress(RuntimeError):
                return _start(Cluster(directory, bindir, _free_port(), owner))
        return _start(Cluster(directory, bindir, _free_port(), owner))
    except BaseException:
        cluster.stop()
        raise


def _start(cluster: Cluster) -> Cluster:
    _configure(cluster)
    cluster.check(
        "start",
        cluster.bindir / "pg_ctl",
        *("start", "-D", cluster.data, "-l", cluster.log),
        *("-w", "-t", str(START_TIMEOUT)),
    )
    return cluster


def _configure(cluster: Cluster) -> None:
    """Loopback only, the socket inside the cluster's own directory, and no
    durability: the data is thrown away at the end anyway. A later line wins,
    so a retry on another port appends its own."""
    settings = {
        "listen_addresses": "'127.0.0.1'",
        "port": str(cluster.port),
        "unix_socket_directories": f"'{cluster.directory}'",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }
    with (cluster.data / "postgresql.conf").open("a") as conf:
        conf.writelines(f"{name} = {value}\n" for name, value in settings.items())


@contextlib.contextmanager
def server(url: str | None = None) -> Iterator[str]:
    """The admin URL of a PostgreSQL server for the length of the block: the
    configured one if it answers, else a throw-away cluster's."""
    url = url or configured_url()
    if answers(url):
        yield url
        return
    cluster = start_cluster()
    try:
        yield cluster.url
    finally:
        cluster.stop()
