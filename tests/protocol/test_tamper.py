"""Property: any change to any byte of a signed document fails verification.

For each kind of signed document (delegation certificate, checkpoint,
evidence bundle, receipt, revocation list) the envelope is serialised to its
JSON bytes, one byte is changed, and the result must be refused: either it no
longer parses, or it parses and does not verify. Every byte position is
tried once with a fixed flip, and hypothesis tries arbitrary replacement
values at arbitrary positions.

Then the certificate window, scope, issuer and revocation cutoff are checked
as properties over generated times, scopes and sizes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msp_protocol.delegation import (
    Revocation,
    RevocationList,
    Scope,
    VerifiedDelegation,
    check_delegation,
    check_revocations,
    issue_delegation,
    sign_revocations,
    verify_delegation,
)
from msp_protocol.dsse import Envelope, parse_envelope
from msp_protocol.errors import MalformedError
from msp_protocol.evidence import EvidenceBundle, check_evidence, sign_evidence
from msp_protocol.keys import SigningKey
from msp_protocol.log import check_checkpoint, check_receipt, make_checkpoint, make_receipt
from msp_protocol.merkle import TreeState, leaf_hash
from msp_protocol.result import Result
from tests.protocol.support import APPLIANCE, NOW, SITE, key

ROOT = key(1)
DEVICE = key(2)
SERIAL = "ab" * 16
LIFETIME = timedelta(days=30)
CERTIFICATE = issue_delegation(
    ROOT,
    subject=DEVICE.verify_key,
    appliance_id=APPLIANCE,
    site_id=SITE,
    scopes=[Scope.AUDIT, Scope.EVIDENCE],
    not_before=NOW,
    lifetime=LIFETIME,
    serial=SERIAL,
)
DELEGATION: VerifiedDelegation = verify_delegation(CERTIFICATE, roots=[ROOT.verify_key], at=NOW)


def _state() -> TreeState:
    state = TreeState()
    state.extend([leaf_hash(bytes([n])) for n in range(5)])
    return state


CHECKPOINT = make_checkpoint(DEVICE, appliance_id=APPLIANCE, state=_state(), ts=NOW)
EVIDENCE = sign_evidence(
    DEVICE,
    EvidenceBundle.model_validate(
        {
            "bundle_id": "ev-1",
            "site_id": SITE,
            "appliance_id": APPLIANCE,
            "check_id": "firewall-active",
            "controls": {"pci_dss": ["1.2.1"], "cis": ["4.4"]},
            "result": "fail",
            "observed": {"nftables": False, "note": "r\u00e8gle \U0001f512"},
            "collected_at": NOW,
            "log_index": 4,
        }
    ),
)
RECEIPT = make_receipt(ROOT, check_checkpoint(CHECKPOINT, delegation=DELEGATION).unwrap(), NOW)
REVOCATIONS = sign_revocations(
    ROOT,
    RevocationList(
        version=2,
        issuer=ROOT.key_id,
        issued_at=NOW,
        revoked=(Revocation(serial="cd" * 16, appliance_id="a-9", cutoff_size=3, revoked_at=NOW),),
    ),
)

Check = Callable[[Envelope], Result[object]]

DOCUMENTS: dict[str, tuple[Envelope, Check]] = {
    "certificate": (
        CERTIFICATE,
        lambda env: check_delegation(env, roots=[ROOT.verify_key], at=NOW),  # type: ignore[arg-type, return-value]
    ),
    "checkpoint": (
        CHECKPOINT,
        lambda env: check_checkpoint(env, delegation=DELEGATION),  # type: ignore[return-value]
    ),
    "evidence": (
        EVIDENCE,
        lambda env: check_evidence(env, delegation=DELEGATION),  # type: ignore[return-value]
    ),
    "receipt": (
        RECEIPT,
        lambda env: check_receipt(env, roots=[ROOT.verify_key]),  # type: ignore[return-value]
    ),
    "revocations": (
        REVOCATIONS,
        lambda env: check_revocations(env, roots=[ROOT.verify_key]),  # type: ignore[return-value]
    ),
}


def accepted(data: bytes, check: Check) -> bool:
    try:
        envelope = parse_envelope(data)
    except MalformedError:
        return False
    return check(envelope).ok


@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
def test_untouched_documents_verify(kind: str) -> None:
    envelope, check = DOCUMENTS[kind]
    assert accepted(envelope.to_json(), check)


@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
def test_every_byte_position_flipped(kind: str) -> None:
    envelope, check = DOCUMENTS[kind]
    data = envelope.to_json()
    survivors = [
        position
        for position in range(len(data))
        if accepted(data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :], check)
    ]
    assert survivors == [], f"{kind}: flipping byte(s) {survivors[:5]} still verifies"


@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
@given(data=st.data())
def test_any_byte_replaced(kind: str, data: st.DataObject) -> None:
    envelope, check = DOCUMENTS[kind]
    raw = envelope.to_json()
    position = data.draw(st.integers(0, len(raw) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda b: b != raw[position]), label="value")
    assert not accepted(raw[:position] + bytes([value]) + raw[position + 1 :], check)


@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
@given(data=st.data())
def test_any_byte_inserted_or_deleted(kind: str, data: st.DataObject) -> None:
    envelope, check = DOCUMENTS[kind]
    raw = envelope.to_json()
    position = data.draw(st.integers(0, len(raw) - 1), label="position")
    if data.draw(st.booleans(), label="insert"):
        # JSON whitespace between the envelope's tokens is not signed content:
        # see test_envelope_layout_is_not_signed_content.
        value = data.draw(st.integers(0, 255).filter(lambda b: b not in b" \t\r\n"), label="value")
        mutated = raw[:position] + bytes([value]) + raw[position:]
    else:
        mutated = raw[:position] + raw[position + 1 :]
    if accepted(mutated, check):
        # Only another spelling of the same signed content may verify: DSSE
        # allows the payload's base64 without padding, so deleting a "=" of a
        # payload whose encoding uses no "+" or "/" re-encodes, not tampers.
        reparsed = parse_envelope(mutated)
        assert reparsed.payload_bytes() == envelope.payload_bytes()
        assert reparsed.signatures == envelope.signatures
        assert raw[position : position + 1] == b"="


@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
def test_envelope_layout_is_not_signed_content(kind: str) -> None:
    """DSSE signs PAE(type, payload); how the envelope around it is laid out
    (indentation, key order) is not signed and may change in transit."""
    envelope, check = DOCUMENTS[kind]
    pretty = json.dumps(json.loads(envelope.to_json()), indent=2, sort_keys=False)
    assert accepted(pretty.encode(), check)


# --- certificate properties -----------------------------------------------------------

SKEW = timedelta(seconds=60)


@given(offset=st.integers(-(10**8), 10**8))
def test_certificate_valid_exactly_inside_its_window(offset: int) -> None:
    at = NOW + timedelta(seconds=offset)
    inside = NOW - SKEW <= at <= NOW + LIFETIME + SKEW
    result = check_delegation(CERTIFICATE, roots=[ROOT.verify_key], at=at)
    assert result.ok == inside
    if not inside:
        assert result.codes in (("certificate-expired",), ("certificate-not-yet-valid",))


@given(
    granted=st.sets(st.sampled_from(list(Scope)), min_size=1),
    wanted=st.sampled_from(list(Scope)),
)
def test_certificate_refused_outside_its_scopes(granted: set[Scope], wanted: Scope) -> None:
    envelope = issue_delegation(
        ROOT,
        subject=DEVICE.verify_key,
        appliance_id=APPLIANCE,
        site_id=SITE,
        scopes=sorted(granted),
        not_before=NOW,
    )
    result = check_delegation(envelope, roots=[ROOT.verify_key], at=NOW, scope=wanted)
    assert result.ok == (wanted in granted)


@given(seed=st.binary(min_size=32, max_size=32))
def test_certificate_refused_under_a_different_issuer(seed: bytes) -> None:
    other = SigningKey(seed)
    envelope = issue_delegation(
        other,
        subject=DEVICE.verify_key,
        appliance_id=APPLIANCE,
        site_id=SITE,
        scopes=[Scope.AUDIT],
        not_before=NOW,
    )
    result = check_delegation(envelope, roots=[ROOT.verify_key], at=NOW)
    assert result.ok == (other.key_id == ROOT.key_id)


@given(cutoff=st.integers(0, 10_000), size=st.integers(0, 10_000))
def test_certificate_refused_after_its_revocation_cutoff(cutoff: int, size: int) -> None:
    revoked = RevocationList(
        version=1,
        issuer=ROOT.key_id,
        issued_at=NOW,
        revoked=(
            Revocation(serial=SERIAL, appliance_id=APPLIANCE, cutoff_size=cutoff, revoked_at=NOW),
        ),
    )
    result = check_delegation(
        CERTIFICATE, roots=[ROOT.verify_key], at=NOW, revocations=revoked, log_size=size
    )
    assert result.ok == (size <= cutoff)
