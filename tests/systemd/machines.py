"""Booted containers for the systemd tests: systemd as PID 1 in an overlay
of the cached image, each in a network namespace of its own, joined by a
veth pair the test can cut and restore.

* :class:`Link` makes two network namespaces and a veth pair between them
  with private addresses. ``block()`` takes the central server's end down,
  so the appliance's interface loses its carrier and its packets vanish (no
  "unreachable" answer), as the NixOS test driver's ``block()``
  (``set_link ... off``) does to a VM's NIC; ``unblock()`` brings it back.
* :class:`Container` mounts an overlay (the cached image as the read-only
  lower layer, a fresh upper layer per container: the cache is never
  written), lets a test install units into it, boots it with
  ``systemd-nspawn -b`` in its namespace, and runs commands in it by
  entering its PID 1's namespaces (``nsenter -t PID -a``).

Everything is torn down in ``close()``: nspawn stopped (SIGTERM, then
SIGKILL), overlay unmounted, directories removed, namespaces and links
deleted. Each step runs even if an earlier one failed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Inside a container: a clean environment, not the test runner's.
CONTAINER_ENV = ["env", "-i", "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]

_serial = itertools.count()


def run(
    argv: list[str], *, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{shlex.join(argv)} failed ({result.returncode}): {(result.stderr or result.stdout).strip()}"
        )
    return result


def until(
    predicate: Callable[[], T | None], *, within: float, what: str, interval: float = 0.5
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail by name."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f} s waiting for {what}")
        time.sleep(interval)


def _unique(prefix: str) -> str:
    # Interface names are at most 15 characters.
    return f"{prefix}{os.getpid() % 100000}{next(_serial)}"


class Link:
    """Two network namespaces joined by a veth pair: ``central`` at
    ``10.231.0.1``, ``appliance`` at ``10.231.0.2``."""

    CENTRAL_ADDRESS = "10.231.0.1"
    APPLIANCE_ADDRESS = "10.231.0.2"

    def __init__(self) -> None:
        tag = _unique("")
        self.namespaces = {"central": f"msp-sd-c{tag}", "appliance": f"msp-sd-a{tag}"}
        self.interfaces = {"central": f"msc{tag}", "appliance": f"msa{tag}"}
        self._made: list[str] = []
        try:
            for namespace in self.namespaces.values():
                run(["ip", "netns", "add", namespace])
                self._made.append(namespace)
                run(["ip", "-n", namespace, "link", "set", "lo", "up"])
            central, appliance = self.interfaces["central"], self.interfaces["appliance"]
            run(["ip", "link", "add", central, "type", "veth", "peer", "name", appliance])
            for side, address in (
                ("central", self.CENTRAL_ADDRESS),
                ("appliance", self.APPLIANCE_ADDRESS),
            ):
                interface, namespace = self.interfaces[side], self.namespaces[side]
                run(["ip", "link", "set", interface, "netns", namespace])
                run(["ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", interface])
                run(["ip", "-n", namespace, "link", "set", interface, "up"])
        except BaseException:
            self.close()
            raise

    def path(self, side: str) -> str:
        return f"/run/netns/{self.namespaces[side]}"

    def block(self) -> None:
        """Cut the link: the appliance's NIC keeps its address but loses its carrier."""
        ns = self.namespaces["central"]
        run(["ip", "-n", ns, "link", "set", self.interfaces["central"], "down"])

    def unblock(self) -> None:
        ns = self.namespaces["central"]
        run(["ip", "-n", ns, "link", "set", self.interfaces["central"], "up"])

    def close(self) -> None:
        # Deleting a namespace deletes the veth end in it, and with it the pair.
        for namespace in reversed(self._made):
            run(["ip", "netns", "delete", namespace], check=False)
        self._made.clear()


class Container:
    """One booted Debian root: an overlay of ``image`` in its own directory."""

    def __init__(self, name: str, image: Path, network_namespace: str) -> None:
        self.name = name
        self.network_namespace = network_namespace
        self.directory = Path(tempfile.mkdtemp(prefix=f"msp-systemd-{name}-"))
        self.root = self.directory / "root"
        self.log_file = self.directory / "console.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self._mounted = False
        for part in ("upper", "work", "root"):
            (self.directory / part).mkdir()
        try:
            run(
                [
                    "mount",
                    "-t",
                    "overlay",
                    "overlay",
                    "-o",
                    f"lowerdir={image},upperdir={self.directory / 'upper'},"
                    f"workdir={self.directory / 'work'}",
                    str(self.root),
                ]
            )
            self._mounted = True
            # The image's hostname is generic; the test names its machines.
            (self.root / "etc" / "hostname").write_text(name + "\n")
        except BaseException:
            self.close()
            raise

    # -- life cycle ----------------------------------------------------------

    def boot(self, *, within: float = 90, degraded: bool = False) -> None:
        """Start systemd as PID 1 and wait until the system is running
        (or, with ``degraded``, has finished booting with a failed unit)."""
        with self.log_file.open("ab") as log:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--quiet",
                    "--register=no",
                    "--keep-unit",
                    f"--machine={self.name}",
                    f"--directory={self.root}",
                    f"--network-namespace-path={self.network_namespace}",
                    "--console=pipe",
                    "--boot",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.leader = until(self._find_leader, within=30, what=f"{self.name}'s PID 1")

        # Until PID 1 has opened its socket, systemctl cannot connect at all.
        def answers() -> str:
            return self.run("systemctl", "is-system-running", check=False).stdout.strip()

        until(
            answers,
            within=30,
            what=f"{self.name}'s systemd to answer",
            interval=0.2,
        )
        state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=within)
        if state.stdout.strip() not in (("running", "degraded") if degraded else ("running",)):
            failed = self.run("systemctl", "list-units", "--failed", "--plain", "--no-legend")
            raise AssertionError(
                f"{self.name} booted {state.stdout.strip()!r}; failed units: {failed.stdout.strip()}"
            )

    def _find_leader(self) -> int | None:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn for {self.name} exited:\n{self.console()}")
        pending = [self.nspawn.pid]
        while pending:
            pid = pending.pop()
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return pid
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                pending += [int(child) for child in children]
        return None

    def close(self) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            # nspawn asks the container's systemd to power off.
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(20)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        if self._mounted:
            if run(["umount", str(self.root)], check=False).returncode != 0:
                run(["umount", "--lazy", str(self.root)], check=False)
            self._mounted = False
        shutil.rmtree(self.directory, ignore_errors=True)

    def console(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- inside ----------------------------------------------------------------

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 60,
        target: int | None = None,
        namespaces: tuple[str, ...] = ("-a",),
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` in the container (or in process ``target``'s namespaces)."""
        pid = target or self.leader
        assert pid, f"{self.name} is not booted"
        return run(
            ["nsenter", "-t", str(pid), *namespaces, *CONTAINER_ENV, *argv],
            check=check,
            timeout=timeout,
        )

    def sh(self, script: str, *, check: bool = True, timeout: float = 60) -> str:
        return self.run("sh", "-c", script, check=check, timeout=timeout).stdout

    def path(self, inside: str) -> Path:
        """A path inside the container, as the host sees it."""
        return self.root / inside.lstrip("/")

    def systemctl(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *argv, check=check)

    def properties(self, unit: str, *names: str) -> dict[str, str]:
        output = self.systemctl("show", unit, *(f"--property={name}" for name in names)).stdout
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)

    def wait_for_unit(self, unit: str, state: str = "active", *, within: float = 60) -> None:
        def reached() -> bool:
            current = self.systemctl("is-active", unit, check=False).stdout.strip()
            if state != "failed" and current == "failed":
                raise AssertionError(f"{unit} failed:\n{self.journal(unit)[-3000:]}")
            return current == state

        until(reached, within=within, what=f"{unit} to be {state} on {self.name}")

    def main_pid(self, unit: str) -> int:
        """The unit's main process, as the host numbers it."""
        inside = int(self.properties(unit, "MainPID")["MainPID"])
        assert inside, f"{unit} has no main process"
        return _host_pid(self.leader, inside)

    def journal(self, unit: str | None = None, *, since_cursor: str | None = None) -> str:
        argv = ["journalctl", "--no-pager", "-o", "short-precise"]
        if unit:
            argv += ["-u", unit]
        if since_cursor:
            argv += ["--after-cursor", since_cursor]
        return self.run(*argv, check=False).stdout

    def json(self, *argv: str) -> Any:
        return json.loads(self.run(*argv).stdout)


def _host_pid(leader: int, inside: int) -> int:
    """The host's PID of the process the container numbers ``inside``."""
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            lines = status.read_text().splitlines()
            nspid = next((line.split()[1:] for line in lines if line.startswith("NSpid:")), [])
            if len(nspid) >= 2 and int(nspid[-1]) == inside and _same_pidns(leader, status.parent):
                return int(nspid[0])
    raise AssertionError(f"no host process for PID {inside} of the container")


def _same_pidns(leader: int, proc: Path) -> bool:
    try:
        return os.readlink(f"/proc/{leader}/ns/pid") == os.readlink(proc / "ns" / "pid")
    except OSError:
        return False


@contextlib.contextmanager
def booted(name: str, image: Path, network_namespace: str) -> Iterator[Container]:
    container = Container(name, image, network_namespace)
    try:
        yield container
    finally:
        container.close()
