"""A partner's central record proof, fetched from the API as a partner gets
it, checked offline by ``msp-verify`` with the key the server publishes."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from msp_protocol.canonical import canonicalize
from msp_protocol.verify_cli import main as msp_verify
from tests.central.support import ROOT, Harness, call
from tests.central.test_manual import POLICY, _document, _site


async def test_a_manual_evidence_proof_from_the_api_verifies_with_msp_verify(
    harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partner = await harness.partner()
    site_id = await _site(partner)
    reply = await partner.request("POST", f"/api/v1/sites/{site_id}/manual-evidence", _document())
    assert reply.status == 201, reply.body
    attached = reply.body
    key = await call(partner.client, "GET", "/.well-known/msp-central-key")
    assert key.status == 200
    (tmp_path / "central.pub").write_text(key.body)
    response = await partner.client.get(
        f"/api/v1/sites/{site_id}/manual-evidence/{attached['id']}/proof",
        headers={"Authorization": f"Bearer {partner.key}"},
    )
    assert response.status == 200
    raw = await response.read()
    (tmp_path / "proof.json").write_bytes(raw)
    argv = ["--central-key-file", str(tmp_path / "central.pub"), str(tmp_path / "proof.json")]

    assert msp_verify(argv) == 0
    # What msp-verify shows is what the server recorded for this attachment,
    # read here from the proof's own bytes.
    proof = json.loads(raw)
    entry = json.loads(base64.b64decode(proof["entry"]))
    checkpoint = json.loads(base64.b64decode(proof["checkpoint"]["payload"]))
    assert entry["index"] == attached["log_index"]
    assert entry["data"]["sha256"] == hashlib.sha256(POLICY).hexdigest()
    assert capsys.readouterr().out.splitlines() == [
        f"central record proof of key {ROOT.key_id}: verified",
        f"  entry {attached['log_index']}, included in the log of {checkpoint['size']} entries "
        f"the central key signed at {checkpoint['ts']}",
        f"  evidence.attached by {attached['attached_by']} at {entry['ts']}",
        f"  data: {json.dumps(entry['data'], sort_keys=True, separators=(',', ':'))}",
    ]

    # The same record claiming another document: the proof no longer holds.
    entry["data"]["sha256"] = hashlib.sha256(b"another document").hexdigest()
    proof["entry"] = base64.b64encode(canonicalize(entry)).decode()
    (tmp_path / "proof.json").write_bytes(canonicalize(proof))
    assert msp_verify(argv) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"central record proof of key {ROOT.key_id}: NOT VERIFIED",
        f"  bad-inclusion-proof: entry {entry['index']}: inclusion proof does not lead to "
        f"the root of size {checkpoint['size']}",
    ]
