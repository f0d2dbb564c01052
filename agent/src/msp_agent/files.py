"""Durable file writes: what the agent writes outside SQLite (keys,
certificates, cached bundles) is replaced atomically and survives a crash."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``path`` so that it holds either its old content or ``data``,
    never a mix: temp file, fsync, rename, fsync of the directory."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with_mode = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            os.fchmod(with_mode, mode)  # the umask must not widen or narrow it
            view = memoryview(data)
            while view:
                view = view[os.write(with_mode, view) :]
            os.fsync(with_mode)
        finally:
            os.close(with_mode)
        os.replace(temporary, path)
    except BaseException:
        # A full disk or a failed rename leaves no stray temporary file.
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
