"""What the NixOS modules render, installed into a Debian root for systemd.

``nixos/agent.nix`` and ``nixos/central.nix`` are evaluated with the project's
evaluation harness (``tests/nixos/eval/run-scenario.nix``) and a scenario
from ``tests/systemd/scenarios/``. Everything the modules would make NixOS
write is taken from that output as it is, and only its store paths are
rewritten to where the same things live in the image:

* the project's packages (``msp-agent``, ``msp-central``; the harness's
  stand-in for them is ``python3``) -> ``/opt/msp`` (the image's venv);
* Debian's own tools (systemd, coreutils, bash, ...) -> ``/usr``;
* scripts the modules generate (traced by the harness as ``MSPSCRIPT``) and
  the settings JSON -> written under ``/usr/local/lib/msp-store/<name>``;
* a store path of anything else stops the installation with one line naming
  it, so a package a module starts using shows up here first.

Units go to ``/etc/systemd/system`` (as a drop-in when the image already
ships the unit, as NixOS does for upstream units), ``wantedBy`` becomes the
``.wants/`` symlinks NixOS makes, tmpfiles lines go to ``/etc/tmpfiles.d``,
polkit rules to ``/etc/polkit-1/rules.d/10-nixos.rules``, ``/etc`` files to
``/etc``, declared users and groups are created. Only the copy given as
``root`` is changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
RUN_SCENARIO = ROOT / "tests" / "nixos" / "eval" / "run-scenario.nix"

# Where the rendered objects land in the image. Stable: no hash in the path.
STORE_IN_IMAGE = "/usr/local/lib/msp-store"

# Package name (as in a store path) -> its prefix in the image.
PACKAGES: Mapping[str, str] = {
    # The project's packages; the evaluation harness's stand-in for them is
    # its python3 package, so both names point at the image's venv.
    "msp-agent": "/opt/msp",
    "msp-central": "/opt/msp",
    "python3": "/opt/msp",
    # Debian's merged /usr holds these tools' bin/, sbin/ and lib/.
    "systemd": "/usr",
    "coreutils": "/usr",
    "findutils": "/usr",
    "gnugrep": "/usr",
    "gnused": "/usr",
    "gawk": "/usr",
    "bash": "/usr",
    "util-linux": "/usr",
    "sqlite": "/usr",
}

# Packages a module names that the image deliberately lacks: their paths are
# rewritten to a directory that does not exist, so what uses them fails
# like a missing program would (and says so in the journal).
ABSENT: Mapping[str, str] = {
    "nix": "no Nix in the Debian image (L1 collect-nix-garbage)",
}
ABSENT_PREFIX = "/usr/local/lib/msp-absent"

_STORE_PATH = re.compile(
    r"/nix/store/([0-9a-z]{32})-([A-Za-z0-9+._?=_-]+)((?:/[A-Za-z0-9+._@=_-]+)*)"
)


class RenderError(RuntimeError):
    """The modules could not be rendered into the image; one line says why."""


def nixpkgs_lib() -> Path:
    """The nixpkgs library checkout: ``$NIXPKGS_LIB``, else ``../nixpkgs-lib``
    beside the repository."""
    configured = os.environ.get("NIXPKGS_LIB")
    candidates = [Path(configured)] if configured else [ROOT.parent / "nixpkgs-lib"]
    for candidate in candidates:
        if (candidate / "lib" / "default.nix").is_file():
            return candidate
    raise RenderError(
        "no nixpkgs library: set NIXPKGS_LIB to an unpacked github:nix-community/nixpkgs.lib"
        f" (tried {', '.join(str(c) for c in candidates)})"
    )


@dataclass
class Rendered:
    """One scenario's evaluation: the harness's JSON and its traced scripts."""

    data: dict[str, Any]
    scripts: list[dict[str, str]] = field(default_factory=list)

    def unit(self, name: str) -> str:
        return str(self.data["units"][name])


def evaluate(scenario: Path, arguments: Mapping[str, Any]) -> Rendered:
    """Evaluate ``scenario`` with ``arguments`` (JSON in $MSP_SYSTEMD_SCENARIO)."""
    if shutil.which("nix-instantiate") is None:
        raise RenderError(
            "nix-instantiate is not installed (the systemd tests evaluate the modules)"
        )
    result = subprocess.run(
        [
            "nix-instantiate",
            "--eval",
            "--strict",
            "--json",
            str(RUN_SCENARIO),
            "--arg",
            "lib",
            f"import {nixpkgs_lib()}/lib",
            "--arg",
            "repo",
            str(ROOT),
            "--arg",
            "scenario",
            str(scenario),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "MSP_SYSTEMD_SCENARIO": json.dumps(dict(arguments))},
        check=False,
        timeout=300,
    )
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        raise RenderError(
            f"evaluating {scenario.name} failed: {(errors or ['no output'])[-1].strip()}"
        )
    scripts = []
    for line in result.stderr.splitlines():
        if line.startswith("trace: MSPSCRIPT "):
            scripts.append(json.loads(line.removeprefix("trace: MSPSCRIPT ")))
    data = json.loads(result.stdout)
    if data["assertionsFailed"]:
        first = " ".join(data["assertionsFailed"][0].split())
        raise RenderError(f"{scenario.name}: a module assertion failed: {first}")
    return Rendered(data=data, scripts=scripts)


def _script_objects(rendered: Rendered) -> dict[str, tuple[str, str]]:
    """Store name -> (path inside the object, file text) of each generated
    script, as nixpkgs' trivial builders and systemd-lib's makeJobScript lay
    them out (``bin/NAME`` or the file itself, ``#!bash`` first)."""
    objects: dict[str, tuple[str, str]] = {}
    for script in rendered.scripts:
        kind, name, text = script["kind"], script["name"], script["text"]
        if kind == "unitScript":
            script_name = name.replace("\\", "-").replace("@", "_")
            objects[f"unit-script-{script_name}"] = (f"bin/{script_name}", f"#!/bin/bash\n{text}")
        elif kind == "writeShellScript":
            objects[name] = ("", f"#!/bin/bash\n{text}")
        elif kind == "writeShellScriptBin":
            objects[name] = (f"bin/{name}", f"#!/bin/bash\n{text}")
        elif kind == "writeShellApplication":
            # nixpkgs' preamble; runtimeInputs are not traced, and the
            # image's /usr/bin is on every unit's PATH already.
            preamble = "set -o errexit\nset -o nounset\nset -o pipefail\n\n"
            objects[name] = (f"bin/{name}", f"#!/bin/bash\n{preamble}{text}")
        else:
            raise RenderError(f"a generated script of unknown kind {kind!r} ({name})")
    return objects


class _Mapper:
    """Rewrites store paths to image paths and collects the objects to write."""

    def __init__(self, rendered: Rendered) -> None:
        self.scripts = _script_objects(rendered)
        self.configs = {
            f"{service}.json": text
            for service, text in rendered.data["settings"].items()
            if text is not None
        }
        self.to_write: dict[str, tuple[str, str, int]] = {}
        self.seen: dict[str, str] = {}

    def rewrite(self, text: str, *, where: str) -> str:
        return _STORE_PATH.sub(lambda match: self._map(match, where), text)

    def _map(self, match: re.Match[str], where: str) -> str:
        digest, name, rest = match.group(1), match.group(2), match.group(3)
        if name in PACKAGES:
            return PACKAGES[name] + rest
        if name in ABSENT:
            return f"{ABSENT_PREFIX}/{name}{rest}"
        earlier = self.seen.setdefault(name, digest)
        if earlier != digest:
            raise RenderError(f"two store objects named {name} ({where}): cannot place both")
        target = f"{STORE_IN_IMAGE}/{name}"
        if name in self.scripts:
            inner, text = self.scripts[name]
            self.add(f"{target}/{inner}".rstrip("/"), text, 0o755, where)
            return target + rest
        if name in self.configs:
            self.add(target, self.configs[name], 0o644, where)
            return target + rest
        raise RenderError(
            f"unmapped store path /nix/store/{digest}-{name}{rest} in {where}:"
            " add its package to tests/systemd/units.py PACKAGES (or ABSENT)"
        )

    def add(self, path: str, text: str, mode: int, where: str) -> None:
        if path not in self.to_write:
            # Placeholder first: a script naming itself must not recurse.
            self.to_write[path] = ("", "", mode)
            self.to_write[path] = (self.rewrite(text, where=path), where, mode)


def _inside(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _unit_file_name(name: str) -> str:
    return name if "." in name else f"{name}.service"


def _shipped(root: Path, unit: str) -> bool:
    return any(
        (_inside(root, directory) / unit).exists()
        for directory in ("/usr/lib/systemd/system", "/lib/systemd/system")
    )


def _chroot(root: Path, *argv: str) -> None:
    result = subprocess.run(
        ["chroot", str(root), *argv], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RenderError(f"{' '.join(argv)} failed in the image: {result.stderr.strip()}")


def _existing_names(root: Path, database: str) -> set[str]:
    lines = _inside(root, f"/etc/{database}").read_text().splitlines()
    return {line.split(":", 1)[0] for line in lines if line}


def install(root: Path, rendered: Rendered) -> None:
    """Install everything ``rendered`` holds into the root directory ``root``."""
    data = rendered.data
    if data["timers"]:
        raise RenderError(f"timers are not rendered by the harness yet: {sorted(data['timers'])}")
    mapper = _Mapper(rendered)
    etc_system = _inside(root, "/etc/systemd/system")
    # dropIns: services NixOS writes as <unit>.d/overrides.conf (instances
    # of a template, overrideStrategy "asDropin"); older harnesses lack it.
    rendered_units = [(name, text, True) for name, text in data.get("dropIns", {}).items()]
    rendered_units += [(name, text, False) for name, text in data["units"].items()]
    for name, text, as_dropin in sorted(rendered_units):
        unit = _unit_file_name(name)
        # systemd-lib.nix: an upstream unit gets the module's settings as
        # overrides.conf beside it, never a replacement.
        if as_dropin or _shipped(root, unit):
            path = etc_system / f"{unit}.d" / "overrides.conf"
        else:
            path = etc_system / unit
        _write(path, mapper.rewrite(_without_opaque(text), where=str(path.relative_to(root))))
        for target in data["services"].get(name, {}).get("wantedBy", []):
            wants = etc_system / f"{target}.wants"
            wants.mkdir(parents=True, exist_ok=True)
            link = wants / unit
            if not link.is_symlink():
                link.symlink_to(f"/etc/systemd/system/{unit}")
    groups: dict[str, list[str]] = {}
    for line in data["tmpfiles"]:
        file, _, entry = line.partition(": ")
        if not entry:
            file, entry = "00-nixos", line
        groups.setdefault(file, []).append(mapper.rewrite(entry, where=f"tmpfiles {file}"))
    for file, entries in groups.items():
        _write(_inside(root, f"/etc/tmpfiles.d/{file}.conf"), "\n".join(entries) + "\n")
    polkit = data["polkit"]
    if polkit["enable"] and polkit["extraConfig"]:
        rules = mapper.rewrite(polkit["extraConfig"], where="polkit rules")
        _write(_inside(root, "/etc/polkit-1/rules.d/10-nixos.rules"), rules)
    for name, text in sorted(data["etc"].items()):
        _write(_inside(root, f"/etc/{name}"), mapper.rewrite(text, where=f"/etc/{name}"))
    # environment.systemPackages: generated commands on PATH, as
    # /run/current-system/sw/bin holds them.
    for package in data["systemPackages"]:
        if package in mapper.scripts and mapper.scripts[package][0].startswith("bin/"):
            inner, text = mapper.scripts[package]
            mapper.add(f"{STORE_IN_IMAGE}/{package}/{inner}", text, 0o755, "systemPackages")
            link = _inside(root, f"/usr/local/bin/{package}")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(f"{STORE_IN_IMAGE}/{package}/{inner}")
    for target, (text, _, mode) in sorted(mapper.to_write.items()):
        _write(_inside(root, target), text, mode)
    _install_accounts(root, data)


def _without_opaque(text: str) -> str:
    """``X-`` settings are NixOS's bookkeeping (restart triggers), ignored by
    systemd; their fake paths name nothing to install."""
    return "\n".join(
        line for line in text.split("\n") if not line.startswith("X-Restart-Triggers=")
    )


def _install_accounts(root: Path, data: Mapping[str, Any]) -> None:
    groups = _existing_names(root, "group")
    for group in data["groups"]:
        if group not in groups:
            _chroot(root, "groupadd", "--system", group)
    users = _existing_names(root, "passwd")
    for name, user in sorted(data["users"].items()):
        if name in users:
            continue
        if not (user["isSystemUser"] or user["isNormalUser"]):
            raise RenderError(f"user {name} is neither a system nor a normal user")
        argv = ["useradd", "--gid", user["group"], "--shell", "/usr/sbin/nologin"]
        argv += ["--system"] if user["isSystemUser"] else ["--create-home"]
        argv += ["--home-dir", user["home"] or "/var/empty", name]
        if user["isSystemUser"]:
            argv.insert(1, "--no-create-home")
        _chroot(root, *argv)


# -- the two machines ---------------------------------------------------------

AGENT_TOKEN_FILE = "/etc/msp/enrollment-token"
CENTRAL_KEY_FILE = "/var/lib/msp-central-secrets/root.key"


def _secret(root: Path, path: str, text: str) -> None:
    file = _inside(root, path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.parent.chmod(0o700)
    _write(file, text, 0o400)


def render_appliance(
    *,
    central_url: str,
    central_public_key: str,
    enrollment_token_file: str | None = AGENT_TOKEN_FILE,
    extra_settings: Mapping[str, Any] | None = None,
) -> Rendered:
    return evaluate(
        SCENARIOS / "appliance.nix",
        {
            "central_url": central_url,
            "central_public_key": central_public_key,
            "enrollment_token_file": enrollment_token_file,
            "settings": dict(extra_settings or {}),
        },
    )


def install_appliance(
    root: Path,
    *,
    central_url: str,
    central_public_key: str,
    enrollment_token: str | None,
    extra_settings: Mapping[str, Any] | None = None,
) -> Rendered:
    """services.msp-agent in ``root``: its units, polkit rule, tmpfiles, the
    ``msp`` user, and (when given) the enrollment token as a root-only file
    the unit passes on with LoadCredential."""
    rendered = render_appliance(
        central_url=central_url,
        central_public_key=central_public_key,
        enrollment_token_file=AGENT_TOKEN_FILE if enrollment_token is not None else None,
        extra_settings=extra_settings,
    )
    install(root, rendered)
    if enrollment_token is not None:
        _secret(root, AGENT_TOKEN_FILE, enrollment_token + "\n")
    return rendered


def install_central(
    root: Path,
    *,
    root_key_seed_hex: str,
    host: str = "0.0.0.0",
    port: int = 8080,
    extra_settings: Mapping[str, Any] | None = None,
) -> Rendered:
    """services.msp-central on SQLite in ``root``: its unit, the
    ``msp-central-manage`` command, the ``msp-central`` user, and the root
    key as a root-only file the unit passes on with LoadCredential."""
    rendered = evaluate(
        SCENARIOS / "central.nix",
        {
            "root_key_file": CENTRAL_KEY_FILE,
            "settings": {"host": host, "port": port, **dict(extra_settings or {})},
        },
    )
    install(root, rendered)
    _secret(root, CENTRAL_KEY_FILE, root_key_seed_hex + "\n")
    return rendered


def store_paths(text: str) -> Iterator[str]:
    """Every store path in ``text`` (for tests that check none is left)."""
    for match in _STORE_PATH.finditer(text):
        yield match.group(0)
