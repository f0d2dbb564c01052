"""Signed config bundles and escalations."""

from __future__ import annotations

from datetime import timedelta

import pytest

from msp_protocol.bundle import BundleKind, ConfigBundle, Escalation, check_bundle, sign_bundle
from msp_protocol.dsse import PayloadType, sign_document
from tests.protocol.support import NOW, SITE, key

ROOT = key(1)


def bundle(**changes: object) -> ConfigBundle:
    fields: dict[str, object] = {
        "kind": "runbooks",
        "site_id": SITE,
        "version": 7,
        "issued_at": NOW,
        "expires_at": NOW + timedelta(days=7),
        "content": {"runbooks": [{"id": "ntp-sync", "action": "restart-timesyncd"}]},
        **changes,
    }
    return ConfigBundle.model_validate(fields)


def check(envelope, **changes):  # type: ignore[no-untyped-def]
    options = {
        "roots": [ROOT.verify_key],
        "kind": BundleKind.RUNBOOKS,
        "site_id": SITE,
        "at": NOW,
        "min_version": 7,
        **changes,
    }
    return check_bundle(envelope, **options)


def test_bundle_verifies_and_is_fresh() -> None:
    result = check(sign_bundle(ROOT, bundle()))
    assert result.ok
    verified = result.unwrap()
    assert not verified.stale
    assert verified.bundle.content["runbooks"][0]["id"] == "ntp-sync"


def test_expired_bundle_is_still_used_but_stale() -> None:
    result = check(sign_bundle(ROOT, bundle()), at=NOW + timedelta(days=8))
    assert result.ok
    assert result.unwrap().stale


@pytest.mark.parametrize(
    ("envelope", "changes", "code"),
    [
        pytest.param(sign_bundle(key(9), bundle()), {}, "bad-signature", id="wrong_key"),
        pytest.param(
            sign_document(PayloadType.EVIDENCE, bundle(), [ROOT]),
            {},
            "wrong-payload-type",
            id="not_a_bundle",
        ),
        pytest.param(sign_bundle(ROOT, bundle(version=6)), {}, "rollback", id="lower_version"),
        pytest.param(
            sign_bundle(ROOT, bundle(kind="frameworks")), {}, "verification-failed", id="other_kind"
        ),
        pytest.param(
            sign_bundle(ROOT, bundle(site_id="site-other")), {}, "wrong-subject", id="other_site"
        ),
    ],
)
def test_bundle_refusals(envelope, changes, code: str) -> None:  # type: ignore[no-untyped-def]
    assert check(envelope, **changes).codes == (code,)


def test_signature_tampered_bundle_is_refused() -> None:
    envelope = sign_bundle(ROOT, bundle())
    other = sign_bundle(ROOT, bundle(version=8))
    swapped = envelope.model_copy(update={"payload": other.payload})
    assert check(swapped).codes == ("bad-signature",)


def test_bundle_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="expires_at must be later"):
        bundle(expires_at=NOW)


def test_escalation_model_is_strict() -> None:
    escalation = Escalation.model_validate(
        {
            "escalation_id": "inc-1",
            "appliance_id": "appliance-1",
            "site_id": SITE,
            "severity": "critical",
            "title": "Backup job failed three times",
            "detail": {"job": "nightly"},
            "created_at": "2026-11-25T12:00:00Z",
        }
    )
    assert Escalation.from_json(escalation.canonical_bytes()) == escalation
    with pytest.raises(ValueError, match="severity"):
        Escalation.model_validate({**escalation.to_wire(), "severity": "urgent"})
