"""A qemu machine booted from the project image, for power cuts.

The root (``image.project_image()``, plus whatever the caller installs into a
copy of it) becomes an ext4 disk image written by ``mke2fs -d``. qemu boots
the image's own kernel and initrd directly, with the disk on virtio-blk
opened ``cache=none`` (``O_DIRECT``): what the guest was told is on disk is
on the host's disk, and nothing else is. Killing qemu (``kill -9``) therefore
loses exactly what a power cut loses: the guest's page cache and every write
not yet completed. A container would not do: it shares the host's page cache.

Around the root the machine adds only test plumbing, never a unit of the
product:

* ``systemd-networkd`` with DHCP on the virtio NIC; qemu's user-mode network
  makes the host reachable from the guest as ``10.0.2.2`` (connections to it
  reach the host's loopback), so a central server on ``127.0.0.1`` answers.
* a *backdoor*: a root service reading JSON requests from a virtio-serial
  port and answering each with the command's exit status and output. It
  starts early and asks nothing of the network, so a guest whose agent is
  broken still answers.
* ``msp-test-at-boot.service``: before the agent starts, a copy of its state
  directory as the power cut left it (with the SQLite WAL files), so a test
  can say what recovery found without the agent having touched it yet.

The serial console goes to a log file; KVM is not needed (``-accel tcg``).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.systemd.image import ImageError, project_image, require_tools

# Host as the guest sees it through qemu's user-mode network.
HOST_FROM_GUEST = "10.0.2.2"
BACKDOOR_PORT = "org.msp.test.backdoor"
# Where msp-test-at-boot.service leaves its copy of the agent's state.
AT_BOOT = "/run/msp-test/at-boot"
# Free space on the disk beyond the root's files: the agent's databases,
# the journal and the ext4 metadata.
HEADROOM_BYTES = 768 * 1024 * 1024

BACKDOOR = (
    r'''
"""Runs each JSON request from the host ({"id", "argv", "timeout"}) and
answers {"id", "rc", "stdout", "stderr"} (output base64) on one line."""
import base64, json, os, subprocess, time

PORT = "/dev/virtio-ports/'''
    + BACKDOOR_PORT
    + r""""


def answer(request):
    try:
        done = subprocess.run(
            request["argv"], capture_output=True, timeout=request.get("timeout", 60)
        )
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = -1, exc.stdout or b"", b"backdoor: command timed out"
    except OSError as exc:
        rc, out, err = -1, b"", f"backdoor: {exc}".encode()
    return {
        "id": request["id"],
        "rc": rc,
        "stdout": base64.b64encode(out).decode(),
        "stderr": base64.b64encode(err).decode(),
    }


def main():
    while not os.path.exists(PORT):
        time.sleep(0.2)
    fd = os.open(PORT, os.O_RDWR)
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            # The host is not connected: a read returns at once.
            pending = b""
            time.sleep(0.2)
            continue
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            try:
                request = json.loads(line)
            except ValueError:
                continue
            data = (json.dumps(answer(request)) + "\n").encode()
            while data:
                data = data[os.write(fd, data):]


main()
"""
)

BACKDOOR_UNIT = """\
[Unit]
Description=Test backdoor on virtio-serial (power-cut tests)
DefaultDependencies=no
After=systemd-udevd.service
[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/msp-test/backdoor.py
Restart=always
RestartSec=1
[Install]
WantedBy=sysinit.target
"""

AT_BOOT_UNIT = f"""\
[Unit]
Description=Copy of the agent's state as the last shutdown left it
DefaultDependencies=no
RequiresMountsFor=/var/lib /run
Before=msp-agent.service
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'rm -rf {AT_BOOT}; mkdir -p /run/msp-test; if [ -d /var/lib/msp ]; then cp -a /var/lib/msp {AT_BOOT}; fi'
[Install]
WantedBy=multi-user.target
"""

NETWORK = """\
[Match]
Type=ether
[Network]
DHCP=ipv4
"""


class MachineError(AssertionError):
    """The machine did not do what the test needed; one line says what."""


@dataclass(frozen=True)
class Completed:
    argv: Sequence[str]
    rc: int
    stdout: str
    stderr: str

    def check(self) -> Completed:
        if self.rc != 0:
            detail = (self.stderr or self.stdout).strip().splitlines()[-3:]
            raise MachineError(
                f"guest: {' '.join(self.argv)} failed ({self.rc}): {' | '.join(detail)}"
            )
        return self


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ImageError(f"{what} failed ({result.returncode}): {tail[0]}")


def build_disk(directory: Path, install: Callable[[Path], object]) -> Path:
    """Copy the project image, add the test plumbing, let ``install`` put
    what the test runs into the copy, and write it as an ext4 disk image.
    Returns the disk image's path; the copy is removed."""
    require_tools(["mke2fs", "qemu-system-x86_64"])
    source = project_image()
    root = directory / "root"
    if root.exists():
        shutil.rmtree(root)
    _run(["cp", "-a", "--reflink=auto", str(source), str(root)], "copying the project image")
    try:
        (root / ".complete").unlink(missing_ok=True)
        _add_plumbing(root)
        install(root)
        used = int(
            subprocess.run(
                ["du", "-sb", str(root)], capture_output=True, text=True, check=True
            ).stdout.split()[0]
        )
        disk = directory / "disk.img"
        disk.unlink(missing_ok=True)
        size_mib = (used + HEADROOM_BYTES) // (1024 * 1024) + 1
        _run(
            [
                "mke2fs",
                "-q",
                "-t",
                "ext4",
                "-L",
                "root",
                "-d",
                str(root),
                str(disk),
                f"{size_mib}M",
            ],
            "mke2fs -d",
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return disk


def _add_plumbing(root: Path) -> None:
    (root / "etc" / "fstab").write_text("/dev/vda / ext4 rw 0 0\n")
    network = root / "etc" / "systemd" / "network"
    network.mkdir(parents=True, exist_ok=True)
    (network / "20-wired.network").write_text(NETWORK)
    backdoor = root / "usr" / "local" / "lib" / "msp-test"
    backdoor.mkdir(parents=True, exist_ok=True)
    (backdoor / "backdoor.py").write_text(BACKDOOR)
    units = root / "etc" / "systemd" / "system"
    (units / "msp-test-backdoor.service").write_text(BACKDOOR_UNIT)
    (units / "msp-test-at-boot.service").write_text(AT_BOOT_UNIT)
    _run(
        [
            "systemctl",
            f"--root={root}",
            "enable",
            "systemd-networkd.service",
            "systemd-networkd-wait-online.service",
            "msp-test-backdoor.service",
            "msp-test-at-boot.service",
        ],
        "systemctl enable (test plumbing)",
    )


class Machine:
    """One qemu process at a time on one disk image: ``boot``, ``run``,
    ``power_cut`` (SIGKILL), ``boot`` again."""

    def __init__(self, directory: Path, disk: Path, *, memory_mib: int = 1024) -> None:
        self.directory = directory
        self.disk = disk
        self.memory_mib = memory_mib
        self.console = directory / "console.log"
        self.socket_path = directory / "backdoor.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.boots = 0
        self._connection: socket.socket | None = None
        self._received = b""
        self._next_id = 0
        boot = sorted((project_image() / "boot").glob("vmlinuz-*"))
        initrd = sorted((project_image() / "boot").glob("initrd.img-*"))
        if not boot or not initrd:
            raise ImageError("the project image has no /boot/vmlinuz-* and /boot/initrd.img-*")
        self.kernel, self.initrd = boot[-1], initrd[-1]

    # --- power ---------------------------------------------------------------------------

    def boot(self) -> float:
        """Start qemu and wait for the backdoor; returns the seconds it took."""
        if self.running:
            raise MachineError("the machine is already running")
        self.boots += 1
        self.socket_path.unlink(missing_ok=True)
        with self.console.open("ab") as log:
            log.write(f"\n===== boot {self.boots} =====\n".encode())
        argv = [
            "qemu-system-x86_64",
            "-accel", "tcg",
            "-cpu", "max",
            "-smp", "1",
            "-m", str(self.memory_mib),
            "-nographic",
            "-no-reboot",
            "-monitor", "none",
            "-kernel", str(self.kernel),
            "-initrd", str(self.initrd),
            "-append",
            "root=/dev/vda rw rootfstype=ext4 console=ttyS0 panic=-1 net.ifnames=0",
            # O_DIRECT: no write the guest has not flushed survives in the
            # host's page cache to blur the cut.
            "-drive", f"file={self.disk},format=raw,if=none,id=root,cache=none,aio=threads",
            "-device", "virtio-blk-pci,drive=root",
            "-netdev", "user,id=net0",
            "-device", "virtio-net-pci,netdev=net0",
            "-chardev", f"file,id=console,path={self.console},append=on",
            "-serial", "chardev:console",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=backdoor,path={self.socket_path},server=on,wait=off",
            "-device", f"virtserialport,chardev=backdoor,name={BACKDOOR_PORT}",
        ]  # fmt: skip
        started = time.monotonic()
        with (self.directory / "qemu.log").open("ab") as errors:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors
            )
        self._connect(deadline=started + 240)
        return time.monotonic() - started

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def power_cut(self) -> None:
        """``kill -9`` qemu: the guest gets no chance to flush anything."""
        if self.process is None:
            raise MachineError("power cut of a machine that is not running")
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._disconnect()

    def shutdown(self, timeout: float = 120) -> None:
        """A clean ``poweroff``; a machine that does not stop is killed."""
        if not self.running:
            return
        assert self.process is not None
        try:
            self.run(["systemctl", "--no-block", "poweroff"], timeout=30)
            self.process.wait(timeout)
        except (MachineError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self._disconnect()

    def console_since_boot(self) -> str:
        text = self.console.read_text(errors="replace")
        marker = f"===== boot {self.boots} ====="
        return text[text.rfind(marker) :] if marker in text else text

    # --- commands ------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, timeout: float = 60) -> Completed:
        """Run ``argv`` as root in the guest; fails when the guest does not answer."""
        request_id = self._send(list(argv), timeout)
        reply = self._receive(request_id, deadline=time.monotonic() + timeout + 30)
        if reply is None:
            raise MachineError(f"guest did not answer {' '.join(argv)} within {timeout + 30:.0f} s")
        return Completed(
            argv,
            int(reply["rc"]),
            base64.b64decode(reply["stdout"]).decode(errors="replace"),
            base64.b64decode(reply["stderr"]).decode(errors="replace"),
        )

    def succeed(self, *argv: str, timeout: float = 60) -> str:
        return self.run(argv, timeout=timeout).check().stdout

    def shell(self, script: str, *, timeout: float = 60) -> str:
        return self.succeed("/bin/sh", "-c", script, timeout=timeout)

    def python(self, source: str, *, timeout: float = 120) -> str:
        """Run ``source`` with the image's project environment (``/opt/msp``)."""
        return self.succeed("/opt/msp/bin/python", "-c", source, timeout=timeout)

    def wait_until(
        self, argv: Sequence[str], *, within: float, what: str, interval: float = 1.0
    ) -> Completed:
        deadline = time.monotonic() + within
        while True:
            result = self.run(argv, timeout=30)
            if result.rc == 0:
                return result
            if time.monotonic() > deadline:
                raise MachineError(
                    f"timed out after {within:.0f} s waiting for {what} "
                    f"(last: {(result.stdout + result.stderr).strip()[-200:]})"
                )
            time.sleep(interval)

    # --- the backdoor channel --------------------------------------------------------------

    def _connect(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not self.running:
                errors = (self.directory / "qemu.log").read_text(errors="replace").strip()
                raise MachineError(
                    f"qemu exited ({self.process.returncode if self.process else '?'}) "
                    f"during boot {self.boots}: "
                    f"{errors.splitlines()[-1] if errors else f'see {self.console}'}"
                )
            if self._connection is None:
                try:
                    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    connection.connect(str(self.socket_path))
                except OSError:
                    connection.close()
                    time.sleep(0.2)
                    continue
                self._connection = connection
                self._received = b""
            # The guest answers only once its service reads the port.
            request_id = self._send(["true"], 5)
            if self._receive(request_id, deadline=time.monotonic() + 2) is not None:
                return
        raise MachineError(f"the guest's backdoor did not answer within boot {self.boots}'s 240 s")

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = None
        self._received = b""

    def _send(self, argv: list[str], timeout: float) -> int:
        if self._connection is None:
            raise MachineError("the machine is not running")
        self._next_id += 1
        line = json.dumps({"id": self._next_id, "argv": argv, "timeout": timeout}) + "\n"
        self._connection.sendall(line.encode())
        return self._next_id

    def _receive(self, request_id: int, deadline: float) -> dict[str, Any] | None:
        assert self._connection is not None
        while True:
            while b"\n" in self._received:
                line, self._received = self._received.split(b"\n", 1)
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue
                if reply.get("id") == request_id:
                    return dict(reply)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if not self.running:
                raise MachineError(f"qemu exited while a command ran: see {self.console}")
            self._connection.settimeout(min(remaining, 1.0))
            try:
                chunk = self._connection.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                raise MachineError("the backdoor's socket closed")
            self._received += chunk


def install_file(root: Path, path: str, content: str | bytes, mode: int = 0o644) -> Path:
    """Write ``content`` at the guest path ``path`` under ``root``."""
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    target.write_bytes(content)
    os.chmod(target, mode)
    return target
