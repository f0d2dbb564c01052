"""The Debian root the systemd tests boot: built from Debian's packages,
cached outside the repository, keyed by a hash of what went into it.

Two layers, each a directory under the cache:

* ``base-<hash>``: ``mmdebstrap`` of Debian bookworm with systemd as init,
  D-Bus, polkit, Python 3.11 (the version the project supports at the least)
  and a kernel for the qemu power-cut tests. The hash covers the suite, the
  package list and this builder's version, so it changes only when they do.
* ``project-<hash>``: a copy of the base with a virtual environment at
  ``/opt/msp`` holding the project's wheels (``uv build``) and their locked
  dependencies. The hash covers ``uv.lock`` and every file the wheels are
  built from, so a change to the code makes a new layer.

A missing layer is rebuilt; a fresh machine needs no manual step. The tools
(``mmdebstrap``, ``systemd-nspawn``, qemu) are installed from Debian's
packages when missing, and every failure is one line saying what failed.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SUITE = "bookworm"
# What the appliance's units need at run time, and what the tests drive them
# with. linux-image-amd64 only serves the qemu power-cut machine.
PACKAGES = (
    "systemd-sysv",
    "dbus",
    "polkitd",
    "libpam-systemd",
    "python3",
    "python3-venv",
    "iproute2",
    "sqlite3",
    "procps",
    "kmod",
    "linux-image-amd64",
)
# Bump when the recipe below changes in a way the package list does not show.
BUILDER_VERSION = "1"

# Where the layers live: outside the repository, shared by runs.
CACHE = Path(os.environ.get("MSP_SYSTEMD_CACHE", "/var/cache/msp-systemd-tests"))

# Debian package that provides each tool the tests use.
TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "systemd-nspawn": "systemd-container",
    "qemu-system-x86_64": "qemu-system-x86",
    "mke2fs": "e2fsprogs",
    "ip": "iproute2",
    "nsenter": "util-linux",
}


class ImageError(RuntimeError):
    """The image could not be built; the message is one line saying why."""


def require_tools(names: Iterable[str]) -> None:
    """Install from Debian's packages every tool in ``names`` that is missing."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ImageError(f"the systemd tests need root to install {', '.join(missing)}")
    packages = sorted({TOOLS[name] for name in missing})
    for attempt in ("install", "update-then-install"):
        if attempt == "update-then-install":
            _run(["apt-get", "update"], what="apt-get update")
        result = subprocess.run(
            ["apt-get", "install", "-y", *packages],
            capture_output=True,
            text=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            check=False,
        )
        if result.returncode == 0:
            break
    still = [name for name in missing if shutil.which(name) is None]
    if still:
        raise ImageError(
            f"cannot install {', '.join(still)} (apt-get install {' '.join(packages)})"
        )


def _run(argv: list[str], *, what: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ImageError(f"{what} failed ({result.returncode}): {tail[0]}")
    return result  # type: ignore[no-any-return]


def _digest(parts: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:16]


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """One builder per layer at a time, across processes."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def base_key() -> str:
    return _digest([SUITE.encode(), "\n".join(PACKAGES).encode(), BUILDER_VERSION.encode()])


def base_image() -> Path:
    """The Debian root, built with ``mmdebstrap`` when not cached."""
    target = CACHE / f"base-{base_key()}"
    if (target / ".complete").exists():
        return target
    require_tools(["mmdebstrap"])
    with _locked(target.name):
        if (target / ".complete").exists():
            return target
        building = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=CACHE))
        building.rmdir()
        _run(
            [
                "mmdebstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                # No root password, no getty: the tests enter with nsenter.
                "--customize-hook=chroot $1 passwd -d root",
                "--customize-hook=chroot $1 systemctl mask getty@tty1.service serial-getty@ttyS0.service console-getty.service",
                "--customize-hook=echo msp-test > $1/etc/hostname",
                SUITE,
                str(building),
            ],
            what="mmdebstrap",
        )
        (building / ".complete").write_text(base_key() + "\n")
        building.rename(target)
    return target


def _project_sources() -> list[Path]:
    files = [ROOT / "uv.lock", ROOT / "pyproject.toml"]
    for package in ("protocol", "agent", "server"):
        tracked = _run(
            ["git", "ls-files", "-z", package], what="git ls-files", cwd=ROOT
        ).stdout.split("\0")
        files += [ROOT / name for name in tracked if name]
    return sorted(path for path in files if path.is_file())


def project_key() -> str:
    parts = [base_key().encode()]
    for path in _project_sources():
        parts += [str(path.relative_to(ROOT)).encode(), path.read_bytes()]
    return _digest(parts)


def project_image() -> Path:
    """The base root plus ``/opt/msp``: a virtual environment with the
    project's three wheels and their locked dependencies."""
    base = base_image()
    target = CACHE / f"project-{project_key()}"
    if (target / ".complete").exists():
        return target
    with _locked(target.name):
        if (target / ".complete").exists():
            return target
        building = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=CACHE))
        building.rmdir()
        try:
            _build_project(base, building, target)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        building.rename(target)
    _prune(keep={base.name, target.name})
    return target


def _build_project(base: Path, building: Path, target: Path) -> None:
    # A copy that shares no blocks the tests could change in the base.
    _run(["cp", "-a", "--reflink=auto", str(base), str(building)], what="copying the base image")
    (building / ".complete").unlink()
    wheels = building / "opt" / "msp-wheels"
    wheels.mkdir(parents=True)
    for package in ("protocol", "agent", "server"):
        _run(
            [
                "uv",
                "build",
                "--wheel",
                "--package",
                f"msp-{'central' if package == 'server' else package}",
                "--out-dir",
                str(wheels),
            ],
            what=f"uv build ({package})",
            cwd=ROOT,
        )
    requirements = wheels / "requirements.txt"
    exported = _run(
        [
            "uv",
            "export",
            "--locked",
            "--no-dev",
            "--no-emit-workspace",
            "--no-hashes",
            "--all-packages",
            "--format",
            "requirements-txt",
        ],
        what="uv export",
        cwd=ROOT,
    ).stdout
    requirements.write_text(exported)
    # The host fetches the wheels (its pip knows the way to the package
    # index); the image's own pip installs them offline, so compiled
    # wheels match the image's Python.
    _run(
        [
            "uv",
            "tool",
            "run",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--platform",
            "manylinux2014_x86_64",
            "--platform",
            "manylinux_2_28_x86_64",
            "--platform",
            "linux_x86_64",
            "--dest",
            str(wheels),
            "-r",
            str(requirements),
        ],
        what="pip download (locked dependencies)",
    )
    _run(["chroot", str(building), "python3", "-m", "venv", "/opt/msp"], what="python3 -m venv")
    _run(
        [
            "chroot",
            str(building),
            "sh",
            "-c",
            "/opt/msp/bin/pip install --quiet --no-cache-dir --no-index --find-links /opt/msp-wheels"
            " -r /opt/msp-wheels/requirements.txt /opt/msp-wheels/msp_*.whl",
        ],
        what="pip install (project wheels)",
    )
    (building / ".complete").write_text(project_key() + "\n")


def _prune(*, keep: set[str]) -> None:
    """Drop project layers of older code: each is a full root."""
    for entry in CACHE.glob("project-*"):
        if entry.is_dir() and entry.name not in keep and not entry.name.endswith(".lock"):
            shutil.rmtree(entry, ignore_errors=True)
