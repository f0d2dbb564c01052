"""DelegatedSigningKey: the device key on disk, certificates, renewal, rotation."""

from __future__ import annotations

import logging
import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest

from msp_agent.keys import (
    CertificateRejectedError,
    DelegatedSigningKey,
    KeyFileError,
    KeyRevokedError,
)
from msp_protocol.delegation import Scope, check_delegation_request, issue_delegation
from msp_protocol.keys import SigningKey
from tests.agent.support import APPLIANCE, CENTRAL, NOW, SITE, Clock, enrolled_key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_is_generated_on_first_use_with_private_permissions(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    signer = DelegatedSigningKey.load_or_create(key_dir, central_keys=[CENTRAL.verify_key])
    assert mode(key_dir) == 0o700
    assert mode(key_dir / "device.key") == 0o600
    assert len((key_dir / "device.key").read_bytes()) == 32
    again = DelegatedSigningKey.load_or_create(key_dir, central_keys=[CENTRAL.verify_key])
    assert again.key_id == signer.key_id
    assert [p.name for p in key_dir.iterdir()] == ["device.key"], "no temp file left behind"


def test_key_permissions_hold_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        DelegatedSigningKey.load_or_create(tmp_path / "keys", central_keys=[CENTRAL.verify_key])
    finally:
        os.umask(old)
    assert mode(tmp_path / "keys" / "device.key") == 0o600


@pytest.mark.parametrize(
    ("target", "bad_mode", "message"),
    [
        pytest.param(
            "keys/device.key",
            0o644,
            r"key file .* \(mode 0644\); fix: chmod 600",
            id="key_world_readable",
        ),
        pytest.param(
            "keys/device.key", 0o640, r"\(mode 0640\); fix: chmod 600", id="key_group_readable"
        ),
        pytest.param(
            "keys", 0o755, r"key directory .* \(mode 0755\); fix: chmod 700", id="directory_open"
        ),
    ],
)
def test_refuses_keys_others_can_read_and_says_how_to_fix(
    tmp_path: Path, target: str, bad_mode: int, message: str
) -> None:
    DelegatedSigningKey.load_or_create(tmp_path / "keys", central_keys=[CENTRAL.verify_key])
    os.chmod(tmp_path / target, bad_mode)
    with pytest.raises(KeyFileError, match=message):
        DelegatedSigningKey.load_or_create(tmp_path / "keys", central_keys=[CENTRAL.verify_key])


def test_damaged_key_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    DelegatedSigningKey.load_or_create(tmp_path / "keys", central_keys=[CENTRAL.verify_key])
    (tmp_path / "keys" / "device.key").write_bytes(b"\x07" * 31)
    with pytest.raises(KeyFileError, match="damaged \\(31 bytes, expected 32\\)") as raised:
        DelegatedSigningKey.load_or_create(tmp_path / "keys", central_keys=[CENTRAL.verify_key])
    assert "0707" not in str(raised.value)


def test_private_key_never_appears_in_text_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    signer = enrolled_key(tmp_path / "keys")
    seed = (tmp_path / "keys" / "device.key").read_bytes()
    texts = [repr(signer), str(signer), repr(signer.signing_key()), caplog.text]
    for text in texts:
        assert seed.hex() not in text
        assert seed.hex().upper() not in text
    assert signer.key_id in repr(signer)


def test_certificate_is_verified_stored_and_reloaded(tmp_path: Path) -> None:
    signer = enrolled_key(tmp_path / "keys")
    assert signer.certificate is not None
    assert mode(tmp_path / "keys" / "certificate.json") == 0o600
    reloaded = DelegatedSigningKey.load_or_create(
        tmp_path / "keys", central_keys=[CENTRAL.verify_key]
    )
    assert reloaded.certificate is not None
    assert reloaded.certificate.certificate.serial == signer.certificate.certificate.serial


def test_certificate_for_another_key_or_from_another_root_is_refused(tmp_path: Path) -> None:
    signer = DelegatedSigningKey.load_or_create(
        tmp_path / "keys", central_keys=[CENTRAL.verify_key]
    )
    other = DelegatedSigningKey.load_or_create(
        tmp_path / "other", central_keys=[CENTRAL.verify_key]
    )
    for_other = issue_delegation(
        CENTRAL,
        subject=other.verify_key,
        appliance_id=APPLIANCE,
        site_id=SITE,
        scopes=[Scope.AUDIT],
        not_before=NOW,
    )
    with pytest.raises(CertificateRejectedError, match="is for key"):
        signer.install_certificate(for_other)
    rogue = SigningKey(b"\x09" * 32)
    forged = issue_delegation(
        rogue,
        subject=signer.verify_key,
        appliance_id=APPLIANCE,
        site_id=SITE,
        scopes=[Scope.AUDIT],
        not_before=NOW,
    )
    with pytest.raises(CertificateRejectedError, match="not trusted"):
        signer.install_certificate(forged)
    assert signer.certificate is None
    assert not (tmp_path / "keys" / "certificate.json").exists()


def test_renewal_starts_near_half_the_lifetime_with_stable_jitter(tmp_path: Path) -> None:
    clock = Clock()
    fractions = []
    for n in range(40):
        signer = enrolled_key(tmp_path / f"k{n}", clock=clock)
        renew_at = signer.renew_at()
        assert renew_at is not None
        fraction = (renew_at - NOW) / timedelta(days=30)
        assert 0.45 <= fraction <= 0.55
        fractions.append(fraction)
        reloaded = DelegatedSigningKey.load_or_create(
            tmp_path / f"k{n}", central_keys=[CENTRAL.verify_key], clock=clock
        )
        assert reloaded.renew_at() == renew_at, "a restart must not move the renewal time"
    assert len({round(f, 4) for f in fractions}) > 30, "appliances must not renew in lockstep"
    assert max(fractions) - min(fractions) > 0.05


def test_renewal_due_and_expiry_follow_the_clock(tmp_path: Path) -> None:
    clock = Clock()
    signer = enrolled_key(tmp_path / "keys", clock=clock)
    assert not signer.renewal_due()
    clock.advance(timedelta(days=17))
    assert signer.renewal_due()
    assert not signer.expired()
    clock.advance(timedelta(days=14))
    assert signer.expired()
    signer.signing_key()  # expired while offline: still signs


def test_requests_prove_possession(tmp_path: Path) -> None:
    clock = Clock()
    signer = DelegatedSigningKey.load_or_create(
        tmp_path / "keys", central_keys=[CENTRAL.verify_key], clock=clock
    )
    enroll = signer.enrollment_request(audience=CENTRAL.key_id, token="t0ken-123")
    assert check_delegation_request(
        enroll, purpose="enroll", audience=CENTRAL.key_id, now=NOW, enrollment_token="t0ken-123"
    ).ok
    signer = enrolled_key(tmp_path / "keys", clock=clock)
    assert signer.certificate is not None
    renew = signer.renewal_request(audience=CENTRAL.key_id)
    assert check_delegation_request(
        renew,
        purpose="renew",
        audience=CENTRAL.key_id,
        now=NOW,
        current=signer.certificate.certificate,
    ).ok


def test_rotation_survives_a_crash_at_every_step(tmp_path: Path) -> None:
    clock = Clock()
    key_dir = tmp_path / "keys"
    signer = enrolled_key(key_dir, clock=clock)
    old_id = signer.key_id
    assert signer.certificate is not None
    next_key, request = signer.begin_rotation(audience=CENTRAL.key_id)
    assert check_delegation_request(
        request,
        purpose="rotate",
        audience=CENTRAL.key_id,
        now=NOW,
        current=signer.certificate.certificate,
    ).ok

    # Crash after the next key was made: the same next key is reused.
    restarted = DelegatedSigningKey.load_or_create(
        key_dir, central_keys=[CENTRAL.verify_key], clock=clock
    )
    pending = restarted.pending_rotation()
    assert pending is not None
    assert pending.certificate is None
    assert pending.key.key_id == next_key.key_id
    assert restarted.begin_rotation(audience=CENTRAL.key_id)[0].key_id == next_key.key_id
    assert restarted.key_id == old_id, "the old key stays in use until the rotation completes"

    certificate = issue_delegation(
        CENTRAL,
        subject=next_key.verify_key,
        appliance_id=APPLIANCE,
        site_id=SITE,
        scopes=[Scope.AUDIT, Scope.EVIDENCE],
        not_before=NOW,
    )
    restarted.store_rotation_certificate(certificate)

    # Crash after the certificate was stored: the rotation is completed on restart.
    again = DelegatedSigningKey.load_or_create(
        key_dir, central_keys=[CENTRAL.verify_key], clock=clock
    )
    assert again.key_id == old_id
    pending = again.pending_rotation()
    assert pending is not None
    assert pending.certificate is not None
    again.complete_rotation()
    assert again.key_id == next_key.key_id
    assert again.pending_rotation() is None

    final = DelegatedSigningKey.load_or_create(
        key_dir, central_keys=[CENTRAL.verify_key], clock=clock
    )
    assert final.key_id == next_key.key_id
    assert final.certificate is not None
    assert final.certificate.certificate.subject_key_id == next_key.key_id


def test_revoked_appliance_stops_signing_across_restarts(tmp_path: Path) -> None:
    signer = enrolled_key(tmp_path / "keys")
    signer.mark_revoked()
    with pytest.raises(KeyRevokedError, match="no longer signs"):
        signer.signing_key()
    reloaded = DelegatedSigningKey.load_or_create(
        tmp_path / "keys", central_keys=[CENTRAL.verify_key]
    )
    with pytest.raises(KeyRevokedError):
        reloaded.signing_key()
