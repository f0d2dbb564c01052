"""The README's auditor example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from msp_protocol.delegation import Scope, issue_delegation
from msp_protocol.evidence import EvidenceBundle, sign_evidence
from tests.protocol.support import APPLIANCE, NOW, SITE, key

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_auditor_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1
    root, device = key(1), key(2)
    certificate = issue_delegation(
        root,
        subject=device.verify_key,
        appliance_id=APPLIANCE,
        site_id=SITE,
        scopes=[Scope.AUDIT, Scope.EVIDENCE],
        not_before=NOW,
    )
    bundle = EvidenceBundle.model_validate(
        {
            "bundle_id": "ev-1",
            "site_id": SITE,
            "appliance_id": APPLIANCE,
            "check_id": "time-sync",
            "controls": {"hipaa": ["164.312(b)"]},
            "result": "pass",
            "observed": {},
            "collected_at": NOW,
            "log_index": 3,
        }
    )
    (tmp_path / "central.pub").write_text(root.verify_key.hex + "\n")
    (tmp_path / "certificate.json").write_bytes(certificate.to_json())
    (tmp_path / "bundle.json").write_bytes(sign_evidence(device, bundle).to_json())
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert capsys.readouterr().out == "ok\n"
