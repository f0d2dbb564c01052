"""tests/systemd/units.py: the modules' rendering, installed into an overlay
of the image that is not booted: nothing of the fake store is left behind, upstream
units get drop-ins, and anything the image cannot place stops the
installation with one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd import units
from tests.systemd.machines import Container

KEY = "77ff85ad0e906477d6122b93d31400dd7bb04cd3e576b4d6161699bdc2955dda"


@pytest.fixture
def root(image: Path) -> Iterator[Path]:
    """An overlay of the image, not booted: the installation's target."""
    container = Container("render", image, network_namespace="")
    try:
        yield container.root
    finally:
        container.close()


def installed_text(root: Path) -> dict[str, str]:
    """What the installation wrote: the overlay's upper layer."""
    upper = root.parent / "upper"
    return {
        str(path.relative_to(upper)): path.read_text(errors="replace")
        for path in upper.rglob("*")
        if path.is_file() and not path.is_symlink()
    }


def test_appliance_rendering_leaves_no_store_path(root: Path) -> None:
    rendered = units.render_appliance(
        central_url="http://10.231.0.1:8080",
        central_public_key=KEY,
        extra_settings={"check_interval_seconds": 15},
    )
    units.install(root, rendered)
    files = installed_text(root)
    assert "msp:x:" in files["etc/passwd"]
    for name, text in files.items():
        assert list(units.store_paths(text)) == [], name
        assert "/nix/store" not in text, name
    agent = files["etc/systemd/system/msp-agent.service"]
    # ExecStart runs the image's msp-agent with the installed settings,
    # directly or through a generated start script.
    (exec_start,) = [line for line in agent.splitlines() if line.startswith("ExecStart=")]
    program = exec_start.removeprefix("ExecStart=").split()[0]
    assert (root / program.lstrip("/")).stat().st_mode & 0o111, program
    started = exec_start
    if program.startswith(units.STORE_IN_IMAGE):
        started += (root / program.lstrip("/")).read_text()
    assert "/opt/msp/bin/msp-agent --config /usr/local/lib/msp-store/msp-agent.json" in started
    settings = json.loads(files["usr/local/lib/msp-store/msp-agent.json"])
    assert settings["l1_command"][0] == "/usr/bin/systemctl"
    assert settings["check_interval_seconds"] == 15
    # The template's script, executable, naming only image paths.
    script = root / "usr/local/lib/msp-store/unit-script-msp-l1_-start/bin/msp-l1_-start"
    assert script.stat().st_mode & 0o111
    assert "exec /usr/bin/journalctl --vacuum-size=256M" in script.read_text()
    assert (
        "ExecStart=/usr/local/lib/msp-store/unit-script-msp-l1_-start/bin/msp-l1_-start %i"
        in (files["etc/systemd/system/msp-l1@.service"])
    )
    # wantedBy as NixOS links it; an upstream unit gets a drop-in, not a copy.
    link = root / "etc/systemd/system/multi-user.target.wants/msp-agent.service"
    assert link.readlink() == Path("/etc/systemd/system/msp-agent.service")
    assert "etc/systemd/system/systemd-journald.service.d/overrides.conf" in files
    assert "etc/systemd/system/systemd-journald.service" not in files
    assert files["etc/tmpfiles.d/10-msp-agent.conf"].splitlines() == [
        "d /var/lib/msp 0750 msp msp - ",
        "d /var/lib/msp/keys 0700 msp msp - ",
    ]
    assert '"msp-l1@vacuum-journal.service"' in files["etc/polkit-1/rules.d/10-nixos.rules"]


def test_an_unmapped_store_path_stops_the_installation(root: Path) -> None:
    rendered = units.render_appliance(central_url="http://10.231.0.1:8080", central_public_key=KEY)
    rendered.data["units"]["msp-agent"] += (
        "ExecStartPre=/nix/store/0123456789abcdef0123456789abcdef-openssl/bin/openssl\n"
    )
    with pytest.raises(units.RenderError, match=r"unmapped store path .*-openssl/bin/openssl"):
        units.install(root, rendered)


def test_a_module_assertion_stops_the_rendering() -> None:
    with pytest.raises(units.RenderError, match=r"a module assertion failed: services\.msp-agent"):
        units.render_appliance(
            central_url="http://10.231.0.1:8080",
            central_public_key=KEY,
            extra_settings={"on_call_numbers": ["+15551234567"]},
        )


def test_no_nixpkgs_library_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NIXPKGS_LIB", str(tmp_path / "absent"))
    with pytest.raises(units.RenderError, match=r"^no nixpkgs library: set NIXPKGS_LIB"):
        units.nixpkgs_lib()
