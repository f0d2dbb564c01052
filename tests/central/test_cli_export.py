"""``msp-central export``: an operator without the web page writes the
auditor package and an appliance's witnessed log, and an auditor checks
them with ``msp-verify`` and the key ``keys show --hex`` prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from msp_central.app import create_app
from msp_central.config import Settings
from msp_central.context import CENTRAL, load_root_key
from tests.central.support import Clock, Harness
from tests.central.test_cli import assert_fails, cli, cli_all

REPOSITORY = Path(__file__).resolve().parents[2]


def _fresh_msp_verify(where: Path) -> Path:
    """msp-verify as an auditor gets it: ``pip install ./protocol`` into a
    new virtual environment, nothing else of the project."""
    subprocess.run(["uv", "venv", "--quiet", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    subprocess.run(
        ["uv", "pip", "install", "--quiet", "--python", str(python), str(REPOSITORY / "protocol")],
        check=True,
        timeout=300,
    )
    return where / "bin" / "msp-verify"


def _verify(
    key_file: Path, document: Path, msp_verify: Path | None = None
) -> subprocess.CompletedProcess[str]:
    command = (
        [str(msp_verify)]
        if msp_verify is not None
        else [sys.executable, "-m", "msp_protocol.verify_cli"]
    )
    return subprocess.run(
        [*command, "--central-key-file", str(key_file), str(document)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


async def test_export_package_and_audit_verify_with_msp_verify(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    state_dir = tmp_path / "state"
    sd = ("--state-dir", state_dir)
    assert cli(tmp_path, *sd, "keys", "init").returncode == 0
    assert cli(tmp_path, *sd, "db", "upgrade").returncode == 0
    settings = Settings(state_dir=state_dir)
    root = load_root_key(settings.key_file)
    clock = Clock()
    app = create_app(settings, root=root, clock=clock)
    harness = Harness(await aiohttp_client(app), app[CENTRAL].engine, clock, root)
    partner = await harness.partner()
    reply = await partner.request(
        "POST", "/api/v1/sites", {"name": "Northside", "overrides": {"frameworks": ["hipaa"]}}
    )
    site_id = reply.body["id"]
    appliance = await harness.enroll(partner, site_id)
    appliance.grow(2)
    for result in ("pass", "fail"):
        envelope = appliance.sign_bundle(controls={"hipaa": ("164.312(b)",)}, result=result)
        assert (await appliance.push(envelope)).status == 201
    assert (await appliance.sync(appliance.batch(0))).status == 200

    key, package, audit, unknown_site, bad_time, unused = cli_all(
        tmp_path,
        [*sd, "keys", "show", "--hex"],
        [
            *sd,
            "export",
            "package",
            "--site",
            site_id,
            "--framework",
            "hipaa",
            "-o",
            tmp_path / "package.json",
        ],
        [
            *sd,
            "export",
            "audit",
            "--appliance",
            appliance.appliance_id,
            "-o",
            tmp_path / "audit.json",
        ],
        [*sd, "export", "package", "--site", "site-none", "-o", tmp_path / "x.json"],
        [
            *sd,
            "export",
            "package",
            "--site",
            site_id,
            "--from",
            "last week",
            "-o",
            tmp_path / "y.json",
        ],
        [
            *sd,
            "export",
            "package",
            "--site",
            site_id,
            "--framework",
            "sox",
            "-o",
            tmp_path / "z.json",
        ],
    )
    (tmp_path / "central.pub").write_text(key.stdout)
    written = package.json()
    assert written["file"] == str(tmp_path / "package.json")
    assert written["bytes"] == (tmp_path / "package.json").stat().st_size
    assert audit.json()["bytes"] == (tmp_path / "audit.json").stat().st_size
    assert_fails(unknown_site, "no site site-none")
    assert_fails(bad_time, "--from")
    assert_fails(unused, "'sox' is not one this site uses")
    assert not list(tmp_path.glob("*.partial"))
    assert not (tmp_path / "x.json").exists()

    # The same package from the API; both checked by a freshly installed msp-verify.
    served = await partner.client.get(
        f"/api/v1/sites/{site_id}/auditor-package",
        headers={"Authorization": f"Bearer {partner.key}"},
    )
    assert served.status == 200
    (tmp_path / "served.json").write_bytes(await served.read())
    msp_verify = _fresh_msp_verify(tmp_path / "auditor-venv")
    for document in ("package.json", "served.json", "audit.json"):
        checked = _verify(tmp_path / "central.pub", tmp_path / document, msp_verify)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "verified" in checked.stdout

    # One bundle swapped for nothing: named, exit 1.
    tampered = json.loads((tmp_path / "package.json").read_bytes())
    tampered["evidence"] = tampered["evidence"][:1]
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    refused = _verify(tmp_path / "central.pub", tmp_path / "tampered.json", msp_verify)
    assert refused.returncode == 1
    assert "summary" in refused.stdout
