"""Scenario 2, key delegation (tests/nixos/key-delegation.nix runs it in VMs).

With certificates that live 20 seconds: enrollment yields a certificate;
renewal comes before expiry; a key rotation is recorded in the log under the
old key; a certificate that expires while the link is down still gets
everything accepted, flagged ``signed_after_expiry``; after a revocation the
agent stops signing and the server refuses what was signed past the cutoff.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from msp_agent.audit import AuditSyncRejected
from msp_protocol.limits import DEFAULT_LIMITS
from tests.system.harness import Agent, Central, run_cli
from tests.system.proxy import ProxyProcess

LIFETIME_SECONDS = 20
SKEW = DEFAULT_LIMITS.clock_skew + timedelta(seconds=5)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# Two certificate lifetimes and the server's clock-skew tolerance, in real time.
@pytest.mark.timeout(300)
@pytest.mark.parametrize("central", [LIFETIME_SECONDS / 86_400], indirect=True)
async def test_key_delegation(central: Central, proxy: ProxyProcess, tmp_path: Path) -> None:
    agent = Agent(tmp_path / "agent", central, f"http://127.0.0.1:{proxy.port}")
    agent.write_config(
        check_interval_seconds=2,
        sync_interval_seconds=1,
        heartbeat_interval_seconds=3600,
        bundle_refresh_seconds=1,
        request_timeout_seconds=3,
        l1_command=["/bin/true", "{action}"],
    )
    # An appliance without a certificate is refused: nothing to sign with.
    refused = agent.cli("audit", "verify", check=False)
    assert refused.returncode != 0
    agent.enroll()
    agent.start()
    try:
        # (1) Enrollment gave a certificate for this key.
        first = await agent.until(lambda s: s.get("certificate"), "a certificate")
        serial, key_id = first["certificate"]["serial"], first["key_id"]
        expires = _time(first["certificate"]["not_after"])
        appliance = first["appliance_id"]

        # (2) Renewal before expiry.
        renewed = await agent.until(
            lambda s: s["certificate"]["serial"] != serial, "a renewal", within=LIFETIME_SECONDS
        )
        assert datetime.now(UTC) < expires
        assert renewed["key_id"] == key_id
        assert "key.renewed" in agent.kinds()

        # (3) Rotation on request: a new key, recorded under the old one.
        agent.cli("keys", "rotate")
        rotated = await agent.until(lambda s: s["key_id"] != key_id, "a rotation")
        record = next(
            json.loads(raw) for raw in agent.entries() if json.loads(raw)["kind"] == "key.rotated"
        )
        assert record["data"]["old_key_id"] == key_id
        assert record["data"]["new_key_id"] == rotated["key_id"]
        purposes = {p for (p,) in central.query("SELECT purpose FROM certificates")}
        assert {"enroll", "renew", "rotate"} <= purposes

        # (4) The link goes down; the certificate expires; logging goes on.
        proxy.control.set_mode("blackhole")
        await agent.until(lambda s: s["link"] == "offline", "the link to be down")
        # Expired by more than the clock skew the server tolerates (60 s), so
        # that what is signed now is unambiguously late.
        lapsed = await agent.until(
            lambda s: (
                s["certificate"]["expired"]
                and datetime.now(UTC) > _time(s["certificate"]["not_after"]) + SKEW
            ),
            "the certificate to expire offline, beyond the tolerated skew",
            within=LIFETIME_SECONDS + SKEW.total_seconds() + 30,
        )
        expired = await agent.until(
            lambda s: s["log_size"] > lapsed["log_size"] + 3, "entries signed after it"
        )
        proxy.control.set_mode("pass")
        await agent.until(
            lambda s: (
                s["witnessed_size"] >= expired["log_size"] and not s["certificate"]["expired"]
            ),
            "the late entries to be accepted and the certificate renewed",
        )
        flagged = central.query(
            "SELECT COUNT(*) FROM audit_checkpoints WHERE appliance_id = ? AND signed_after_expiry",
            appliance,
        )[0][0]
        assert flagged >= 1
        assert central.alerts(appliance) == []

        # (5) Revocation while the link is down: everything signed past the
        # cutoff is refused; once the agent learns of it, it stops signing.
        proxy.control.set_mode("blackhole")
        await agent.until(lambda s: s["link"] == "offline", "the link to be down again")
        current = agent.status()["certificate"]["serial"]
        cutoff = central.witnessed_size(appliance)
        run_cli(
            "-m",
            "msp_central",
            "--state-dir",
            str(central.directory / "state"),
            "keys",
            "revoke",
            current,
            "--reason",
            "appliance stolen",
        )
        await agent.until(lambda s: s["log_size"] > cutoff + 3, "entries past the cutoff")
        proxy.control.set_mode("pass")
        stopped = await agent.until(lambda s: s["link"] == "revoked", "the agent to stop signing")
        await asyncio.sleep(4)
        assert agent.status()["log_size"] == stopped["log_size"]  # no new signatures
        assert stopped["log_size"] > cutoff
        assert agent.service.running
    finally:
        agent.service.terminate()

    # What it signed past the cutoff is refused, whoever sends it.
    with pytest.raises(AuditSyncRejected) as refused:
        await agent.sync_as_the_appliance(central.url, tmp_path / "stolen")
    # A revoked key cannot even authenticate a request (the cutoff check of
    # a batch signed past it is tests/central/test_ingest.py's).
    assert (refused.value.rejection.status, refused.value.rejection.code) == (
        403,
        "appliance-revoked",
    )
    assert central.witnessed_size(appliance) == cutoff
