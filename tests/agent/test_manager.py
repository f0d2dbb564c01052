"""LocalResilienceManager: the façade, crash reconciliation, renewal and rotation."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from msp_agent.keys import DelegatedSigningKey
from msp_agent.manager import LocalResilienceManager
from msp_agent.urgent import UrgentCloudRetry
from msp_protocol.bundle import Escalation
from msp_protocol.dsse import parse_envelope
from msp_protocol.log import parse_entry
from tests.agent.fakes import FakeCentral
from tests.agent.support import APPLIANCE, CENTRAL, NOW, SITE, Clock, enrolled_key


async def open_manager(state: Path, clock: Clock) -> LocalResilienceManager:
    signer = enrolled_key(state / "keys", clock=clock) if not (state / "keys").exists() else None

    signer = signer or DelegatedSigningKey.load_or_create(
        state / "keys", central_keys=[CENTRAL.verify_key], clock=clock
    )
    return await LocalResilienceManager.open(
        state,
        appliance_id=APPLIANCE,
        site_id=SITE,
        signer=signer,
        central_keys=[CENTRAL.verify_key],
        clock=clock,
    )


async def kinds(manager: LocalResilienceManager) -> list[str]:
    return [
        parse_entry(raw).entry.kind for raw in await manager.trail.entries(0, manager.trail.size)
    ]


async def test_the_four_calls_record_what_they_do(tmp_path: Path) -> None:
    clock = Clock()
    manager = await open_manager(tmp_path, clock)
    try:
        action = await manager.log_l1_action("restart-timesyncd", runbook="ntp-sync", result="ok")
        incident = await manager.escalate_to_cloud(
            title="backup failed 3 times", detail={"job": "nightly"}
        )
        evidence = await manager.sign_evidence(
            check_id="time-sync",
            controls={"hipaa": ["164.312(b)"]},
            result="pass",
            observed={"offset_ms": 3},
        )
        verification = await manager.verify_audit_integrity()
        assert verification.ok
        assert await kinds(manager) == [
            "chain.genesis",
            "l1.action",
            "escalation.raised",
            "evidence.signed",
            "audit.verified",
        ]
        assert action.index == 1
        assert evidence.log_index == 3
        assert await manager.urgent.counts() == {"waiting": 1, "delivered": 0, "failed": 0}
        queued = await manager.urgent.unlogged()
        assert queued == [], "the incident is linked to its audit entry"
        assert incident.severity == "critical"
    finally:
        await manager.close()


async def test_incident_queued_before_a_crash_is_recorded_on_restart(tmp_path: Path) -> None:
    clock = Clock()
    manager = await open_manager(tmp_path, clock)
    await manager.close()
    # The crash window: queued, never recorded.
    urgent = await UrgentCloudRetry.open(tmp_path / "urgent.sqlite", clock=clock)
    await urgent.enqueue(
        Escalation.model_validate(
            {
                "escalation_id": "inc-lost",
                "appliance_id": APPLIANCE,
                "site_id": SITE,
                "severity": "critical",
                "title": "firewall down",
                "detail": {},
                "created_at": NOW,
            }
        )
    )
    await urgent.close()
    manager = await open_manager(tmp_path, clock)
    try:
        assert (await kinds(manager))[-1] == "escalation.raised"
        assert await manager.urgent.unlogged() == []
    finally:
        await manager.close()


async def test_renewal_and_rotation_against_the_server(tmp_path: Path) -> None:
    clock = Clock()
    central = FakeCentral(CENTRAL, clock=clock)
    manager = await open_manager(tmp_path, clock)
    try:
        old_certificate = manager.signer.certificate
        assert old_certificate is not None
        central.register(old_certificate.envelope)
        for n in range(5):
            await manager.log_l1_action("check", runbook="r", result="ok", detail={"n": n})

        clock.advance(timedelta(days=17))  # renewal is due at 13.5-16.5 days (50 % ± 10 %)
        assert manager.signer.renewal_due()
        await manager.renew_certificate(central, audience=CENTRAL.key_id)
        assert not manager.signer.renewal_due()
        assert manager.signer.certificate is not None
        assert manager.signer.certificate.certificate.serial != old_certificate.certificate.serial

        old_key = manager.signer.key_id
        new_key = await manager.rotate_key(central, audience=CENTRAL.key_id)
        assert manager.signer.key_id == new_key != old_key
        rotated = await manager.log_l1_action("after", runbook="r", result="ok")

        entries = [
            parse_entry(raw).entry for raw in await manager.trail.entries(0, manager.trail.size)
        ]
        rotation = next(e for e in entries if e.kind == "key.rotated")
        assert rotation.data["old_key_id"] == old_key
        assert rotation.data["new_key_id"] == new_key

        # The commit holding the rotation was signed by the old key, later ones by the new.
        checkpoint_keys = await manager.trail.store.run(
            lambda c: {
                size: parse_envelope(bytes(env)).signatures[0].keyid
                for size, env in c.execute("SELECT size, envelope FROM checkpoints")
            }
        )
        assert checkpoint_keys[rotated.size] == new_key
        assert (await manager.verify_audit_integrity()).ok

        report = await manager.trail.sync(central)
        assert report.to_size == manager.trail.size
        assert len(central.logs[APPLIANCE].raws) == manager.trail.size
    finally:
        await manager.close()
