"""Evidence and audit exports served by the central server, verified as an
auditor would: with nothing but the central public key the server publishes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from msp_protocol.dsse import Envelope
from msp_protocol.encoding import utc_now
from msp_protocol.export import check_audit_export, check_evidence_export
from msp_protocol.keys import VerifyKey
from msp_protocol.verify_cli import main as msp_verify
from tests.central.support import ROOT, ApplianceClient, Harness, KeyClient, call

KEYS = [ROOT.verify_key]


async def _bytes(partner: KeyClient, path: str) -> tuple[int, bytes]:
    response = await partner.client.get(path, headers={"Authorization": f"Bearer {partner.key}"})
    return response.status, await response.read()


async def _appliance_with_evidence(
    harness: Harness,
) -> tuple[KeyClient, ApplianceClient, Envelope]:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    appliance.grow(4)
    envelope = appliance.sign_bundle(result="fail", observed={"reason": "clock unsynchronised"})
    pushed = await appliance.push(envelope)
    assert pushed.status == 201, pushed.body
    return partner, appliance, envelope


def _bundle_id(envelope: Envelope) -> str:
    return str(json.loads(envelope.payload_bytes())["bundle_id"])


async def test_an_evidence_export_proves_the_bundle_once_witnessed(harness: Harness) -> None:
    partner, appliance, envelope = await _appliance_with_evidence(harness)
    bundle_id = _bundle_id(envelope)
    path = f"/api/v1/sites/{appliance.site_id}/evidence/{appliance.appliance_id}/{bundle_id}"

    early = await partner.request("GET", path)
    assert early.status == 200, early.body
    assert (
        early.headers["Content-Disposition"] == f'attachment; filename="evidence-{bundle_id}.json"'
    )
    report = check_evidence_export(early.body, KEYS, at=utc_now()).unwrap()
    assert (report.bundle_id, report.result, report.proven_in_log) == (bundle_id, "fail", False)

    assert (await appliance.sync(appliance.batch(0))).status == 200
    appliance.grow(5)
    assert (await appliance.sync(appliance.batch(5))).status == 200
    status, raw = await _bytes(partner, path)
    assert status == 200
    report = check_evidence_export(raw, KEYS, at=utc_now()).unwrap()
    assert report.proven_in_log
    assert report.witnessed_size == 5  # the first checkpoint covering its entry
    assert report.log_index == 4
    # The envelope is served exactly as the appliance signed it.
    assert json.loads(raw)["evidence"] == envelope.to_wire()

    tampered = json.loads(raw)
    tampered["log"]["inclusion"][0] = "00" * 32
    failed = check_evidence_export(tampered, KEYS, at=utc_now())
    assert not failed.ok
    assert "log proof" in failed.failures[0].message


async def test_an_audit_export_is_the_witnessed_log(harness: Harness, tmp_path: Path) -> None:
    partner, appliance, _envelope = await _appliance_with_evidence(harness)
    path = f"/api/v1/sites/{appliance.site_id}/appliances/{appliance.appliance_id}/audit-export"
    nothing = await partner.request("GET", path)
    assert (nothing.status, nothing.code) == (404, "not-found")

    assert (await appliance.sync(appliance.batch(0))).status == 200
    appliance.grow(10)
    assert (await appliance.sync(appliance.batch(5))).status == 200
    status, raw = await _bytes(partner, path)
    assert status == 200
    report = check_audit_export(raw, KEYS, at=utc_now()).unwrap()
    assert (report.size, report.witnessed_size, report.evidence) == (15, 15, 1)
    export = json.loads(raw)
    assert [e["signatures"][0]["keyid"] for e in export["evidence"]] == [appliance.key.key_id]
    assert len(export["checkpoints"]) == len(export["receipts"]) == 1  # one key: the latest

    # msp-verify, with the key file the server publishes.
    key = await call(partner.client, "GET", "/.well-known/msp-central-key")
    assert key.status == 200
    assert key.body == ROOT.verify_key.hex + "\n"
    assert VerifyKey.from_hex(key.body.strip()) == ROOT.verify_key
    (tmp_path / "central.pub").write_text(key.body)
    (tmp_path / "audit.json").write_bytes(raw)
    argv = ["--central-key-file", str(tmp_path / "central.pub"), str(tmp_path / "audit.json")]
    assert msp_verify(argv) == 0
    edited = raw.replace(b'"format"', b'"format"', 1)
    entries = json.loads(edited)
    entries["entries"][7] = entries["entries"][6]
    (tmp_path / "edited.json").write_text(json.dumps(entries))
    argv[-1] = str(tmp_path / "edited.json")
    assert msp_verify(argv) == 1


async def test_exports_of_other_partners_and_unknown_objects_are_not_found(
    harness: Harness,
) -> None:
    partner, appliance, envelope = await _appliance_with_evidence(harness)
    bundle_id = _bundle_id(envelope)
    assert (await appliance.sync(appliance.batch(0))).status == 200
    other = await harness.partner("Other MSP")
    other_site = await harness.site(other)
    own_other_site = await harness.site(partner, "Second clinic")
    evidence = f"{appliance.appliance_id}/{bundle_id}"
    audit = f"appliances/{appliance.appliance_id}/audit-export"
    for caller, path in [
        (other, f"/api/v1/sites/{appliance.site_id}/evidence/{evidence}"),
        (other, f"/api/v1/sites/{other_site}/evidence/{evidence}"),
        (partner, f"/api/v1/sites/{own_other_site}/evidence/{evidence}"),
        (partner, f"/api/v1/sites/{appliance.site_id}/evidence/{appliance.appliance_id}/ev-none"),
        (other, f"/api/v1/sites/{appliance.site_id}/{audit}"),
        (other, f"/api/v1/sites/{other_site}/{audit}"),
        (partner, f"/api/v1/sites/{own_other_site}/{audit}"),
        (partner, f"/api/v1/sites/{appliance.site_id}/appliances/app-none/audit-export"),
    ]:
        reply = await caller.request("GET", path)
        assert (reply.status, reply.code) == (404, "not-found"), path


@pytest.mark.parametrize("rotate", [False, True], ids=["one-key", "rotated-key"])
async def test_evidence_export_after_a_key_rotation_names_both_certificates(
    harness: Harness, rotate: bool
) -> None:
    partner, appliance, envelope = await _appliance_with_evidence(harness)
    bundle_id = _bundle_id(envelope)
    if rotate:
        appliance.key, appliance.serial = await appliance.rotate()
    appliance.grow(2)
    assert (await appliance.sync(appliance.batch(0))).status == 200
    path = f"/api/v1/sites/{appliance.site_id}/evidence/{appliance.appliance_id}/{bundle_id}"
    reply = await partner.request("GET", path)
    report = check_evidence_export(reply.body, KEYS, at=utc_now()).unwrap()
    assert report.proven_in_log
    assert (reply.body["log"].get("checkpoint_certificate") is not None) == rotate


async def test_another_partners_revocations_stay_out_of_exports(harness: Harness) -> None:
    partner, appliance, _envelope = await _appliance_with_evidence(harness)
    assert (await appliance.sync(appliance.batch(0))).status == 200
    defaults = {"tier": "basic", "frameworks": ["hipaa"]}
    assert (await partner.request("PUT", "/api/v1/partner/defaults", defaults)).status == 200
    other = await harness.partner("Other MSP")
    victim = await harness.enroll(other)
    revoked = await other.request(
        "POST", f"/api/v1/certificates/{victim.serial}/revoke", {"reason": "lost"}
    )
    assert revoked.status == 200
    site = f"/api/v1/sites/{appliance.site_id}"
    for path in (
        f"{site}/appliances/{appliance.appliance_id}/audit-export",
        f"{site}/auditor-package",
    ):
        status, raw = await _bytes(partner, path)
        assert status == 200
        assert victim.appliance_id.encode() not in raw, path
        assert victim.serial.encode() not in raw, path
        assert b'"revocations"' not in raw, path
    # Once the site's own appliance is revoked, the list must go with it.
    mine = await partner.request(
        "POST", f"/api/v1/certificates/{appliance.serial}/revoke", {"reason": "stolen"}
    )
    assert mine.status == 200
    status, raw = await _bytes(partner, f"{site}/appliances/{appliance.appliance_id}/audit-export")
    assert b'"revocations"' in raw
    assert check_audit_export(raw, KEYS, at=utc_now()).ok
