"""An appliance whose local audit log was lost (a corrupt database file,
quarantined by the agent) comes back without enrolling again: the server
refuses the new log, the partner approves it, the next sync from index 0 is
witnessed as the log's next generation, and everything of the first
generation stays witnessed, exportable and provable.

The appliance here is the real agent's audit trail and evidence queue,
talking to the server over HTTP with the agent's own client."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from msp_agent.audit import AuditSyncRejected, OfflineAuditTrail
from msp_agent.evidence import EvidenceQueue
from msp_agent.http_client import HttpCentralClient
from msp_agent.keys import DelegatedSigningKey
from msp_central.db.tables import (
    audit_checkpoints,
    audit_entries,
    evidence,
    security_alerts,
)
from msp_central.routes import appliances as appliance_routes
from msp_protocol.encoding import utc_now
from msp_protocol.evidence import CheckResult
from msp_protocol.export import check_audit_export, check_evidence_export
from msp_protocol.package import check_auditor_package
from msp_protocol.verify_cli import main as msp_verify
from tests.central.support import ROOT, Harness, KeyClient

KEYS = [ROOT.verify_key]


@dataclass
class Box:
    """An appliance as the agent runs it: its key, client, log and evidence."""

    harness: Harness
    signer: DelegatedSigningKey
    client: HttpCentralClient
    site_id: str
    path: Path
    trail: OfflineAuditTrail = field(init=False)
    queue: EvidenceQueue = field(init=False)
    signed: int = 0

    @property
    def appliance_id(self) -> str:
        assert self.client.appliance_id is not None
        return self.client.appliance_id

    async def open(self) -> None:
        self.trail = await OfflineAuditTrail.open(
            self.path,
            appliance_id=self.appliance_id,
            signer=self.signer,
            central_keys=KEYS,
            row_key=self.signer.audit_row_key(),
        )
        self.queue = EvidenceQueue(self.trail, self.signer, site_id=self.site_id)

    async def evidence(self, result: CheckResult = "pass") -> str:
        """Sign a bundle (recorded in the log) and return its id."""
        self.signed += 1
        signed = await self.queue.sign(
            bundle_id=f"ev-{self.signed}",
            check_id="time_sync",
            controls={"hipaa": ("164.312(b)",)},
            result=result,
            observed={"offset_ms": self.signed},
        )
        return signed.bundle_id

    async def grow(self, count: int) -> None:
        for n in range(count):
            await self.trail.append("check.run", "agent", {"n": n})

    def corrupt(self) -> None:
        """Garble a page in the middle of the closed database file."""
        for suffix in ("-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        data = bytearray(self.path.read_bytes())
        assert len(data) > 4096 * 4
        data[4096 * 3 : 4096 * 3 + 512] = b"\xee" * 512
        self.path.write_bytes(bytes(data))


async def enroll_box(harness: Harness, partner: KeyClient, site_id: str, tmp_path: Path) -> Box:
    signer = DelegatedSigningKey.load_or_create(tmp_path / "keys", central_keys=KEYS)
    url = str(harness.client.make_url("")).rstrip("/")
    client = HttpCentralClient(url, harness.client.session, signing_key=signer.signing_key)
    token = await harness.token(partner, site_id)
    certificate = await client.request_certificate(
        signer.enrollment_request(audience=ROOT.key_id, token=token), enrollment_token=token
    )
    signer.install_certificate(certificate)
    box = Box(harness, signer, client, site_id, tmp_path / "audit.sqlite")
    await box.open()
    return box


async def scalar(harness: Harness, query: Any) -> Any:
    async with harness.engine.connect() as connection:
        return (await connection.execute(query)).scalar()


def count_of(table: Any, appliance_id: str, generation: int) -> Any:
    return (
        sa.select(sa.func.count())
        .select_from(table)
        .where(table.c.appliance_id == appliance_id, table.c.generation == generation)
    )


async def test_a_lost_log_comes_back_as_a_new_generation(
    harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partner = await harness.partner()
    defaults = {"tier": "full", "frameworks": ["hipaa"]}
    assert (await partner.request("PUT", "/api/v1/partner/defaults", defaults)).status == 200
    site_id = await harness.site(partner)
    box = await enroll_box(harness, partner, site_id, tmp_path)
    base = f"/api/v1/sites/{site_id}/appliances/{box.appliance_id}"
    try:
        # Generation 1: evidence, a few hundred entries, all witnessed.
        first = await box.evidence()
        await box.grow(300)
        failing = await box.evidence(result="fail")
        await box.trail.sync(box.client)
        assert (await box.queue.deliver(box.client)).delivered == [first, failing]
        # One more bundle delivered before its entry is witnessed: it waits.
        waiting = await box.evidence()
        assert (await box.queue.deliver(box.client)).delivered == [waiting]
        old_size = (await box.trail.head()).receipt_size
        assert old_size == box.trail.size - 1
    finally:
        await box.trail.close()

    # Nothing refused yet: nothing to approve.
    reason = {"reason": "the appliance's disk was replaced"}
    early = await partner.request("POST", f"{base}/audit-log/approve-new", reason)
    assert (early.status, early.code) == (409, "conflict")
    assert early.body["detail"] == (
        "nothing to approve: the server has not refused this appliance's log"
    )

    # The database is damaged: the agent quarantines it and begins anew,
    # and the server refuses that log.
    box.corrupt()
    await box.open()
    try:
        assert box.trail.quarantine is not None
        assert box.trail.size == 2
        with pytest.raises(AuditSyncRejected) as refused:
            await box.trail.sync(box.client)
        assert refused.value.rejection.code == "rewrite"
        async with harness.engine.connect() as connection:
            codes = (
                (
                    await connection.execute(
                        sa.select(security_alerts.c.code).where(
                            security_alerts.c.appliance_id == box.appliance_id
                        )
                    )
                )
                .scalars()
                .all()
            )
        assert codes == ["rewrite"]

        # Another partner cannot see or approve it.
        other = await harness.partner("Other MSP")
        for method, suffix, body in (
            ("POST", "approve-new", reason),
            ("GET", "generations", None),
        ):
            reply = await other.request(method, f"{base}/audit-log/{suffix}", body)
            assert (reply.status, reply.code) == (404, "not-found")

        bad = await partner.request("POST", f"{base}/audit-log/approve-new", {"reason": ""})
        assert bad.status == 400
        approved = await partner.request("POST", f"{base}/audit-log/approve-new", reason)
        assert approved.status == 201, approved.body
        assert approved.body["current_generation"] == 2
        closed, current = approved.body["generations"]
        assert (closed["generation"], closed["current"], closed["size"]) == (1, False, old_size)
        assert closed["approved_at"] is None
        assert (current["generation"], current["current"], current["size"]) == (2, True, 0)
        assert current["reason"] == reason["reason"]
        assert current["approved_by"].startswith(f"partner:{partner.partner_id}/key:")
        # Once is enough: the new generation was refused nothing yet.
        again = await partner.request("POST", f"{base}/audit-log/approve-new", reason)
        assert (again.status, again.code) == (409, "conflict")

        # The next sync round, from index 0, is witnessed.
        report = await box.trail.sync(box.client)
        assert (report.from_size, report.to_size) == (0, box.trail.size)
        fresh = await box.evidence()
        await box.grow(3)
        await box.trail.sync(box.client)
        assert (await box.queue.deliver(box.client)).delivered == [fresh]
        new_size = box.trail.size
    finally:
        await box.trail.close()

    # Both generations are held, each in full.
    assert await scalar(harness, count_of(audit_entries, box.appliance_id, 1)) == old_size
    assert await scalar(harness, count_of(audit_entries, box.appliance_id, 2)) == new_size
    assert await scalar(harness, count_of(audit_checkpoints, box.appliance_id, 1)) >= 1
    assert await scalar(harness, count_of(audit_checkpoints, box.appliance_id, 2)) >= 1
    async with harness.engine.connect() as connection:
        stored = {
            row.bundle_id: (row.log_generation, row.in_log)
            for row in await connection.execute(
                sa.select(evidence).where(evidence.c.appliance_id == box.appliance_id)
            )
        }
    assert stored == {
        first: (1, True),
        failing: (1, True),
        waiting: (1, None),  # its entry was lost with the old log: it waits for good
        fresh: (2, True),
    }

    listed = await partner.request("GET", f"{base}/audit-log/generations")
    assert listed.status == 200
    assert [(g["generation"], g["size"], g["current"]) for g in listed.body["generations"]] == [
        (1, old_size, False),
        (2, new_size, True),
    ]

    # The audit export of each generation verifies on its own.
    for asked, size in (("", new_size), ("?generation=2", new_size), ("?generation=1", old_size)):
        reply = await partner.request("GET", f"{base}/audit-export{asked}")
        assert reply.status == 200, reply.body
        checked = check_audit_export(reply.body, KEYS, at=utc_now()).unwrap()
        assert (checked.size, checked.witnessed_size) == (size, size)
    for asked, status in (("?generation=3", 404), ("?generation=0", 400), ("?gen=1", 400)):
        reply = await partner.request("GET", f"{base}/audit-export{asked}")
        assert reply.status == status, (asked, reply.body)

    # A bundle of the first generation still proves its place in that log.
    reply = await partner.request(
        "GET", f"/api/v1/sites/{site_id}/evidence/{box.appliance_id}/{failing}"
    )
    assert reply.status == 200
    proven = check_evidence_export(reply.body, KEYS, at=utc_now()).unwrap()
    assert proven.witnessed_size is not None

    # An auditor package across the switch: a segment per generation.
    reply = await partner.request("GET", f"/api/v1/sites/{site_id}/auditor-package")
    assert reply.status == 200, reply.body
    assert [(s["appliance_id"], s.get("generation")) for s in reply.body["logs"]] == [
        (box.appliance_id, None),
        (box.appliance_id, 2),
    ]
    package = check_auditor_package(reply.body, KEYS, at=utc_now()).unwrap()
    assert [(s.generation, s.bundles) for s in package.segments] == [(1, 2), (2, 1)]
    assert package.bundles == 3
    assert package.summary_verified
    # The newest bundle of the check is the new generation's (passing),
    # though the failing one of the old generation sits at a higher index.
    (control,) = [c for c in package.controls if c.control_id == "164.312(b)"]
    assert control.state == "passing"
    # Without the new generation's segment its bundle proves nothing.
    cut = {**reply.body, "logs": reply.body["logs"][:1]}
    assert not check_auditor_package(cut, KEYS, at=utc_now()).ok
    key_file = tmp_path / "central.pub"
    key_file.write_text(ROOT.verify_key.hex + "\n")
    (tmp_path / "package.json").write_text(json.dumps(reply.body))
    capsys.readouterr()
    assert msp_verify(["--central-key-file", str(key_file), str(tmp_path / "package.json")]) == 0
    assert f"appliance {box.appliance_id} (log generation 2): entries" in capsys.readouterr().out
    # The site's posture speaks through the new generation's bundle too.
    posture = await partner.request("GET", f"/api/v1/sites/{site_id}/posture")
    (hipaa,) = posture.body["frameworks"]
    (shown,) = [c for c in hipaa["controls"] if c["control_id"] == "164.312(b)"]
    assert (shown["state"], shown["evidence"]["bundle_id"]) == ("passing", fresh)

    # The approval is in the central log.
    admin = await harness.admin()
    exported = await admin.request("GET", "/api/v1/central-log/export")
    entries = [json.loads(base64.b64decode(raw)) for raw in exported.body["entries"]]
    (entry,) = [e for e in entries if e["kind"] == "audit.new_log_approved"]
    assert entry["data"] == {
        "appliance_id": box.appliance_id,
        "generation": 1,
        "size": old_size,
        "root": closed["root"],
        "reason": reason["reason"],
    }
    assert entry["actor"] == current["approved_by"]


async def test_an_approval_between_check_and_commit_is_honoured(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    partner = await harness.partner()
    appliance = await harness.enroll(partner)
    appliance.grow(10)
    assert (await appliance.sync(appliance.batch(0))).status == 200
    witnessed = list(appliance.records)
    # Another history under the same indices: refused as a rewrite.
    appliance.records = witnessed[:1]
    appliance.grow(3, data={"history": "new"})
    replaced = list(appliance.records)
    refused = await appliance.sync(appliance.batch(0))
    assert (refused.status, refused.code) == (422, "rewrite")

    # The old history grows meanwhile; the partner approves the new log
    # after that batch was checked and before it is stored.
    appliance.records = witnessed
    appliance.grow(5)
    path = f"/api/v1/sites/{appliance.site_id}/appliances/{appliance.appliance_id}/audit-log"
    commit = appliance_routes._commit
    approvals: list[int] = []

    async def approve_first(*args: Any, **kwargs: Any) -> bool:
        if not approvals:
            reply = await partner.request("POST", f"{path}/approve-new", {"reason": "disk lost"})
            approvals.append(reply.status)
        return await commit(*args, **kwargs)

    monkeypatch.setattr(appliance_routes, "_commit", approve_first)
    stale = await appliance.sync(appliance.batch(10))
    assert approvals == [201]
    # Checked again against the new, empty generation: nothing stored.
    assert (stale.status, stale.code, stale.body["server_size"]) == (409, "stale-size", 0)
    assert await scalar(harness, count_of(audit_entries, appliance.appliance_id, 1)) == 10
    assert await scalar(harness, count_of(audit_entries, appliance.appliance_id, 2)) == 0

    appliance.records = replaced
    accepted = await appliance.sync(appliance.batch(0))
    assert accepted.status == 200, accepted.body
    assert await scalar(harness, count_of(audit_entries, appliance.appliance_id, 2)) == 4
