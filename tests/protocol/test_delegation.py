"""Delegation certificates, delegation requests (proof of possession), revocations."""

from __future__ import annotations

from datetime import timedelta

import pytest

from msp_protocol import errors
from msp_protocol.delegation import (
    DelegationCertificate,
    Purpose,
    Revocation,
    RevocationList,
    Scope,
    check_delegation,
    check_delegation_request,
    check_revocations,
    issue_delegation,
    make_delegation_request,
    sign_revocations,
    token_digest,
)
from msp_protocol.dsse import Envelope, PayloadType, sign_document
from msp_protocol.keys import SigningKey
from msp_protocol.limits import Limits
from tests.protocol.support import APPLIANCE, NOW, SITE, key

ROOT = key(1)
DEVICE = key(2)
SERIAL = "ab" * 16


def certificate(
    *,
    scopes: tuple[Scope, ...] = (Scope.AUDIT, Scope.EVIDENCE),
    root: SigningKey = ROOT,
    lifetime: timedelta = timedelta(days=30),
) -> Envelope:
    return issue_delegation(
        root,
        subject=DEVICE.verify_key,
        appliance_id=APPLIANCE,
        site_id=SITE,
        scopes=scopes,
        not_before=NOW,
        lifetime=lifetime,
        serial=SERIAL,
    )


def revocations(cutoff: int, version: int = 1) -> RevocationList:
    return RevocationList(
        version=version,
        issuer=ROOT.key_id,
        issued_at=NOW,
        revoked=(
            Revocation(
                serial=SERIAL,
                appliance_id=APPLIANCE,
                cutoff_size=cutoff,
                revoked_at=NOW,
                reason="key compromise",
            ),
        ),
    )


def test_issued_certificate_verifies_and_says_what_it_grants() -> None:
    result = check_delegation(
        certificate(),
        roots=[ROOT.verify_key],
        at=NOW + timedelta(days=1),
        scope=Scope.AUDIT,
        appliance_id=APPLIANCE,
        site_id=SITE,
        subject_key_id=DEVICE.key_id,
    )
    assert result.ok, result.describe()
    cert = result.unwrap().certificate
    assert cert.serial == SERIAL
    assert cert.issuer == ROOT.key_id
    assert cert.subject_key_id == DEVICE.key_id
    assert cert.not_after - cert.not_before == timedelta(days=30)
    assert not result.unwrap().signed_after_expiry


# (id, check_delegation keyword arguments, expected failure code, message fragment)
REFUSED = [
    pytest.param(
        {"at": NOW - timedelta(minutes=2)},
        "certificate-not-yet-valid",
        "is not valid before",
        id="before_window",
    ),
    pytest.param(
        {"at": NOW + timedelta(days=30, minutes=2)},
        "certificate-expired",
        "expired at 2026-12-25 12:00:00+00:00",
        id="after_window",
    ),
    pytest.param(
        {"scope": Scope.EVIDENCE}, "scope-not-granted", "scope evidence", id="outside_scope"
    ),
    pytest.param(
        {"roots": [key(9).verify_key]}, "bad-signature", "is not trusted", id="different_issuer"
    ),
    pytest.param(
        {"appliance_id": "appliance-2"}, "wrong-subject", "not appliance-2", id="other_appliance"
    ),
    pytest.param({"site_id": "site-2"}, "wrong-subject", "not site-2", id="other_site"),
    pytest.param({"subject_key_id": key(3).key_id}, "wrong-subject", "is for key", id="other_key"),
    pytest.param(
        {"revocations": revocations(cutoff=10), "log_size": 11},
        "certificate-revoked",
        "revoked beyond log size 10 at log size 11",
        id="after_revocation_cutoff",
    ),
    pytest.param(
        {"revocations": revocations(cutoff=10)},
        "certificate-revoked",
        "revoked beyond log size 10",
        id="revoked_without_position",
    ),
]


@pytest.mark.parametrize(("overrides", "code", "message"), REFUSED)
def test_refusals(overrides: dict[str, object], code: str, message: str) -> None:
    options: dict[str, object] = {
        "roots": [ROOT.verify_key],
        "at": NOW + timedelta(days=1),
        "scope": Scope.AUDIT,
        **overrides,
    }
    only_audit = certificate(scopes=(Scope.AUDIT,))
    result = check_delegation(only_audit, **options)  # type: ignore[arg-type]
    assert result.codes == (code,), result.describe()
    assert message in str(result.failures[0])


def test_signatures_before_the_revocation_cutoff_still_count() -> None:
    result = check_delegation(
        certificate(),
        roots=[ROOT.verify_key],
        at=NOW + timedelta(days=1),
        revocations=revocations(cutoff=10),
        log_size=10,
    )
    assert result.ok, result.describe()


def test_expired_certificate_accepted_and_flagged_when_allowed() -> None:
    result = check_delegation(
        certificate(),
        roots=[ROOT.verify_key],
        at=NOW + timedelta(days=40),
        allow_expired=True,
    )
    assert result.ok
    assert result.unwrap().signed_after_expiry


def test_clock_skew_is_tolerated_at_both_ends() -> None:
    for at in (NOW - timedelta(seconds=59), NOW + timedelta(days=30, seconds=59)):
        assert check_delegation(certificate(), roots=[ROOT.verify_key], at=at).ok


def test_all_failures_are_reported_together() -> None:
    result = check_delegation(
        certificate(scopes=(Scope.EVIDENCE,)),
        roots=[ROOT.verify_key],
        at=NOW + timedelta(days=31),
        scope=Scope.AUDIT,
        appliance_id="appliance-9",
    )
    assert result.codes == ("scope-not-granted", "wrong-subject", "certificate-expired")


def test_certificate_valid_forever_cannot_be_issued_or_verified() -> None:
    with pytest.raises(errors.UsageError, match="lifetime"):
        certificate(lifetime=timedelta(days=3650))
    # Signed by hand, bypassing issue_delegation's bound: the verifier refuses it.
    forever = DelegationCertificate(
        serial=SERIAL,
        issuer=ROOT.key_id,
        subject_key=DEVICE.verify_key.hex,
        appliance_id=APPLIANCE,
        site_id=SITE,
        scopes=(Scope.AUDIT,),
        not_before=NOW,
        not_after=NOW + timedelta(days=3650),
    )
    envelope = sign_document(PayloadType.DELEGATION, forever, [ROOT])
    result = check_delegation(envelope, roots=[ROOT.verify_key], at=NOW)
    assert result.codes == ("verification-failed",)
    assert "lifetime 3650 days" in str(result.failures[0])


def test_issuer_field_must_name_the_signing_root() -> None:
    other_root = key(9)
    lying = DelegationCertificate(
        serial=SERIAL,
        issuer=ROOT.key_id,  # claims ROOT, signed by other_root
        subject_key=DEVICE.verify_key.hex,
        appliance_id=APPLIANCE,
        site_id=SITE,
        scopes=(Scope.AUDIT,),
        not_before=NOW,
        not_after=NOW + timedelta(days=30),
    )
    envelope = sign_document(PayloadType.DELEGATION, lying, [other_root])
    result = check_delegation(envelope, roots=[ROOT.verify_key, other_root.verify_key], at=NOW)
    assert result.codes == ("wrong-issuer",)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"scopes": []}, "scopes", id="empty_scopes"),
        pytest.param({"scopes": ["audit", "audit"]}, "scopes repeat", id="repeated_scope"),
        pytest.param({"scopes": ["root"]}, "scopes.0", id="unknown_scope"),
        pytest.param(
            {"not_after": "2026-11-25T12:00:00Z"}, "not_after must be later", id="empty_window"
        ),
        pytest.param(
            {"not_before": "2026-11-25T12:00:00+00:00"}, "RFC 3339 UTC with Z", id="offset_time"
        ),
        pytest.param({"serial": "AB" * 16}, "lowercase hex", id="uppercase_serial"),
        pytest.param({"appliance_id": "../etc"}, "appliance_id", id="path_in_id"),
        pytest.param({"extra": True}, "Extra inputs are not permitted", id="unknown_field"),
    ],
)
def test_malformed_certificates(changes: dict[str, object], message: str) -> None:
    base = {
        "serial": SERIAL,
        "issuer": ROOT.key_id,
        "subject_key": DEVICE.verify_key.hex,
        "appliance_id": APPLIANCE,
        "site_id": SITE,
        "scopes": ["audit"],
        "not_before": "2026-11-25T12:00:00Z",
        "not_after": "2026-12-25T12:00:00Z",
    }
    envelope = sign_document(PayloadType.DELEGATION, {**base, **changes}, [ROOT])
    result = check_delegation(envelope, roots=[ROOT.verify_key], at=NOW)
    assert result.codes == ("malformed-document",)
    assert message in str(result.failures[0])


# --- revocation lists ---------------------------------------------------------------


def test_revocation_list_round_trip_and_rollback() -> None:
    envelope = sign_revocations(ROOT, revocations(cutoff=5, version=3))
    verified = check_revocations(envelope, roots=[ROOT.verify_key], min_version=3)
    assert verified.ok
    found = verified.unwrap().revocations.find(SERIAL)
    assert found is not None
    assert found.cutoff_size == 5
    rolled_back = check_revocations(envelope, roots=[ROOT.verify_key], min_version=4)
    assert rolled_back.codes == ("rollback",)


def test_revocation_list_from_another_key_is_refused() -> None:
    forged = sign_document(PayloadType.REVOCATIONS, revocations(cutoff=5), [key(9)])
    assert check_revocations(forged, roots=[ROOT.verify_key]).codes == ("bad-signature",)


def test_revocation_list_size_is_bounded() -> None:
    envelope = sign_revocations(ROOT, revocations(cutoff=5))
    result = check_revocations(envelope, roots=[ROOT.verify_key], limits=Limits(max_revocations=1))
    assert result.ok
    many = RevocationList(
        version=1,
        issuer=ROOT.key_id,
        issued_at=NOW,
        revoked=tuple(
            Revocation(serial=f"{n:032x}", appliance_id=APPLIANCE, cutoff_size=0, revoked_at=NOW)
            for n in range(2)
        ),
    )
    result = check_revocations(
        sign_revocations(ROOT, many), roots=[ROOT.verify_key], limits=Limits(max_revocations=1)
    )
    assert "2 entries" in result.describe()


def test_serial_listed_twice_is_malformed() -> None:
    entry = revocations(cutoff=1).revoked[0]
    with pytest.raises(ValueError, match="listed twice"):
        RevocationList(version=1, issuer=ROOT.key_id, issued_at=NOW, revoked=(entry, entry))


# --- delegation requests: proof of possession ---------------------------------------------

TOKEN = "enroll-token-0123456789"


def current_certificate(subject: SigningKey = DEVICE) -> DelegationCertificate:
    return DelegationCertificate(
        serial=SERIAL,
        issuer=ROOT.key_id,
        subject_key=subject.verify_key.hex,
        appliance_id=APPLIANCE,
        site_id=SITE,
        scopes=(Scope.AUDIT, Scope.EVIDENCE),
        not_before=NOW - timedelta(days=20),
        not_after=NOW + timedelta(days=10),
    )


def test_enroll_request_proves_possession_and_binds_the_token() -> None:
    envelope = make_delegation_request(
        purpose="enroll",
        audience=ROOT.key_id,
        subject=DEVICE,
        scopes=[Scope.AUDIT, Scope.EVIDENCE],
        enrollment_token=TOKEN,
        created=NOW,
    )
    result = check_delegation_request(
        envelope, purpose="enroll", audience=ROOT.key_id, now=NOW, enrollment_token=TOKEN
    )
    assert result.ok, result.describe()
    request = result.unwrap().request
    assert request.subject_key == DEVICE.verify_key.hex
    assert request.token_sha256 == token_digest(TOKEN)
    assert len(request.nonce) == 32


def test_renew_and_rotate_requests() -> None:
    renew = make_delegation_request(
        purpose="renew",
        audience=ROOT.key_id,
        subject=DEVICE,
        scopes=[Scope.AUDIT],
        current=(SERIAL, DEVICE),
        created=NOW,
    )
    assert check_delegation_request(
        renew, purpose="renew", audience=ROOT.key_id, now=NOW, current=current_certificate()
    ).ok
    new_key = key(5)
    rotate = make_delegation_request(
        purpose="rotate",
        audience=ROOT.key_id,
        subject=new_key,
        scopes=[Scope.AUDIT],
        current=(SERIAL, DEVICE),
        created=NOW,
    )
    assert len(rotate.signatures) == 2
    assert check_delegation_request(
        rotate, purpose="rotate", audience=ROOT.key_id, now=NOW, current=current_certificate()
    ).ok


def _enroll(**changes: object) -> Envelope:
    options: dict[str, object] = {
        "purpose": "enroll",
        "audience": ROOT.key_id,
        "subject": DEVICE,
        "scopes": [Scope.AUDIT],
        "enrollment_token": TOKEN,
        "created": NOW,
        **changes,
    }
    return make_delegation_request(**options)  # type: ignore[arg-type]


def _rotate_signed_only_by_new_key() -> Envelope:
    envelope = make_delegation_request(
        purpose="rotate",
        audience=ROOT.key_id,
        subject=key(5),
        scopes=[Scope.AUDIT],
        current=(SERIAL, DEVICE),
        created=NOW,
    )
    return envelope.model_copy(update={"signatures": envelope.signatures[:1]})


def _proof_by_another_key() -> Envelope:
    envelope = _enroll()
    other = make_delegation_request(
        purpose="enroll",
        audience=ROOT.key_id,
        subject=key(6),
        scopes=[Scope.AUDIT],
        enrollment_token=TOKEN,
        created=NOW,
    )
    return envelope.model_copy(update={"signatures": other.signatures})


REQUEST_REFUSALS = [
    pytest.param(_enroll(audience=key(9).key_id), "enroll", "is addressed to", id="other_audience"),
    pytest.param(
        _enroll(created=NOW - timedelta(minutes=6)), "enroll", "too old", id="stale_request"
    ),
    pytest.param(
        _enroll(created=NOW + timedelta(minutes=2)), "enroll", "in the future", id="future_request"
    ),
    pytest.param(
        _enroll(enrollment_token="other-token"), "enroll", "token does not match", id="wrong_token"
    ),
    pytest.param(
        _proof_by_another_key(), "enroll", "required signatures", id="no_proof_of_possession"
    ),
    pytest.param(
        _enroll(), "renew", "request is for enroll, expected renew", id="purpose_confusion"
    ),
    pytest.param(
        _rotate_signed_only_by_new_key(), "rotate", "1 of 2 required", id="rotation_without_old_key"
    ),
]


@pytest.mark.parametrize(("envelope", "purpose", "message"), REQUEST_REFUSALS)
def test_request_refusals(envelope: Envelope, purpose: Purpose, message: str) -> None:
    result = check_delegation_request(
        envelope,
        purpose=purpose,
        audience=ROOT.key_id,
        now=NOW,
        current=current_certificate() if purpose != "enroll" else None,
        enrollment_token=TOKEN if purpose == "enroll" else None,
    )
    assert not result.ok
    assert message in result.describe()


def test_rotation_must_change_and_renewal_must_keep_the_key() -> None:
    with pytest.raises(errors.UsageError, match="needs a new key"):
        make_delegation_request(
            purpose="rotate",
            audience=ROOT.key_id,
            subject=DEVICE,
            scopes=[Scope.AUDIT],
            current=(SERIAL, DEVICE),
        )
    renew_with_new_key = make_delegation_request(
        purpose="renew",
        audience=ROOT.key_id,
        subject=DEVICE,
        scopes=[Scope.AUDIT],
        current=(SERIAL, DEVICE),
        created=NOW,
    )
    result = check_delegation_request(
        renew_with_new_key,
        purpose="renew",
        audience=ROOT.key_id,
        now=NOW,
        current=current_certificate(subject=key(5)),
    )
    assert "a renewal must keep the certified key" in result.describe()


def test_request_naming_another_certificate_is_refused() -> None:
    envelope = make_delegation_request(
        purpose="renew",
        audience=ROOT.key_id,
        subject=DEVICE,
        scopes=[Scope.AUDIT],
        current=("cd" * 16, DEVICE),
        created=NOW,
    )
    result = check_delegation_request(
        envelope, purpose="renew", audience=ROOT.key_id, now=NOW, current=current_certificate()
    )
    assert result.codes == ("wrong-subject",)
