"""Evidence bundles: signing, verification, and proof of their log position."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest

from msp_protocol import errors
from msp_protocol.delegation import Scope, VerifiedDelegation, issue_delegation, verify_delegation
from msp_protocol.dsse import Envelope, PayloadType, sign_envelope
from msp_protocol.evidence import (
    EVIDENCE_ENTRY_KIND,
    EvidenceBundle,
    EvidenceProof,
    check_evidence,
    check_evidence_in_log,
    evidence_entry_data,
    sign_evidence,
    verify_evidence,
    verify_evidence_in_log,
)
from msp_protocol.keys import SigningKey
from msp_protocol.limits import Limits
from msp_protocol.log import LogReplay, genesis_entry, make_checkpoint, make_entry, make_receipt
from msp_protocol.log import verify_checkpoint as verify_cp
from msp_protocol.merkle import LeafHashTree, inclusion_proof, leaf_hash
from tests.protocol.support import APPLIANCE, NOW, SITE, key

ROOT = key(1)
DEVICE = key(2)


def delegation(scopes: tuple[Scope, ...] = (Scope.AUDIT, Scope.EVIDENCE)) -> VerifiedDelegation:
    envelope = issue_delegation(
        ROOT,
        subject=DEVICE.verify_key,
        appliance_id=APPLIANCE,
        site_id=SITE,
        scopes=scopes,
        not_before=NOW,
        serial="ab" * 16,
    )
    return verify_delegation(envelope, roots=[ROOT.verify_key], at=NOW)


def bundle(log_index: int = 5, **changes: object) -> EvidenceBundle:
    fields: dict[str, object] = {
        "bundle_id": "ev-0001",
        "site_id": SITE,
        "appliance_id": APPLIANCE,
        "check_id": "time-sync",
        "controls": {
            "hipaa": ["164.312(b)"],
            "nist_800_171": ["3.3.7"],
            "iso_27001": ["A.8.17"],
        },
        "result": "pass",
        "observed": {"ntp_synchronized": True, "offset_ms": 1.25, "server": "pool.ntp.org"},
        "collected_at": NOW,
        "log_index": log_index,
        **changes,
    }
    return EvidenceBundle.model_validate(fields)


def test_bundle_signs_and_verifies() -> None:
    envelope = sign_evidence(DEVICE, bundle())
    verified = verify_evidence(envelope, delegation=delegation())
    assert verified.bundle.controls["hipaa"] == ("164.312(b)",)
    assert verified.bundle.observed["offset_ms"] == 1.25


def test_bundle_refusals() -> None:
    envelope = sign_evidence(DEVICE, bundle())
    audit_only = check_evidence(envelope, delegation=delegation((Scope.AUDIT,)))
    assert audit_only.codes == ("scope-not-granted",)

    other_site = sign_evidence(DEVICE, bundle(site_id="site-other"))
    assert check_evidence(other_site, delegation=delegation()).codes == ("wrong-subject",)

    by_other_key = sign_evidence(key(3), bundle())
    assert check_evidence(by_other_key, delegation=delegation()).codes == ("bad-signature",)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"controls": {}}, "controls", id="no_controls"),
        pytest.param({"controls": {"hipaa": []}}, "controls.hipaa", id="framework_without_control"),
        pytest.param({"result": "ok"}, "result", id="unknown_result"),
        pytest.param({"log_index": -1}, "log_index", id="negative_index"),
        pytest.param({"check_id": "Time Sync"}, "check_id", id="bad_check_id"),
    ],
)
def test_malformed_bundles(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bundle(**changes)


def logged_bundle() -> tuple[Envelope, EvidenceProof]:
    """An appliance's log with a signed bundle recorded at index 5, witnessed
    by the server at size 9 — everything an auditor receives."""
    index = 5
    envelope = sign_evidence(DEVICE, bundle(log_index=index))
    raws = [
        genesis_entry(
            appliance_id=APPLIANCE, key_id=DEVICE.key_id, certificate_serial="ab" * 16, ts=NOW
        ).raw
    ]
    for i in range(1, 9):
        if i == index:
            data = evidence_entry_data(envelope)
            raws.append(make_entry(i, NOW, EVIDENCE_ENTRY_KIND, "agent", data).raw)
        else:
            raws.append(make_entry(i, NOW, "check.run", "agent", {"i": i}).raw)
    replay = LogReplay()
    replay.extend(raws)
    checkpoint = verify_cp(
        make_checkpoint(DEVICE, appliance_id=APPLIANCE, state=replay.state, ts=NOW),
        delegation=delegation(),
    )
    receipt = make_receipt(ROOT, checkpoint, NOW + timedelta(seconds=3))
    tree = LeafHashTree(_leaves(raws))
    proof = EvidenceProof(
        entry=raws[index], inclusion=inclusion_proof(index, 9, tree), receipt=receipt
    )
    return envelope, proof


def _leaves(raws: list[bytes]) -> list[bytes]:
    return [leaf_hash(raw) for raw in raws]


def test_auditor_proves_a_bundle_existed_at_its_log_position() -> None:
    envelope, proof = logged_bundle()
    evidence = verify_evidence(envelope, delegation=delegation())
    receipt = verify_evidence_in_log(evidence, proof, roots=[ROOT.verify_key])
    assert receipt.receipt.size == 9


def test_log_proof_refusals() -> None:
    envelope, proof = logged_bundle()
    evidence = verify_evidence(envelope, delegation=delegation())
    roots = [ROOT.verify_key]

    forged_witness = EvidenceProof(
        proof.entry, proof.inclusion, make_receipt_by(DEVICE, proof.receipt)
    )
    assert check_evidence_in_log(evidence, forged_witness, roots=roots).codes == ("bad-signature",)

    other_entry = make_entry(5, NOW, "check.run", "agent", {"i": 5}).raw
    wrong_kind = EvidenceProof(other_entry, proof.inclusion, proof.receipt)
    assert (
        "is check.run, not evidence.signed"
        in check_evidence_in_log(evidence, wrong_kind, roots=roots).describe()
    )

    edited = sign_evidence(DEVICE, bundle(log_index=5, result="fail"))
    edited_evidence = verify_evidence(edited, delegation=delegation())
    assert (
        "records another bundle"
        in check_evidence_in_log(edited_evidence, proof, roots=roots).describe()
    )

    short = EvidenceProof(proof.entry, list(proof.inclusion)[:-1], proof.receipt)
    assert check_evidence_in_log(evidence, short, roots=roots).codes == ("bad-inclusion-proof",)

    moved = sign_evidence(DEVICE, bundle(log_index=6))
    moved_evidence = verify_evidence(moved, delegation=delegation())
    assert check_evidence_in_log(moved_evidence, proof, roots=roots).codes == ("bad-log-entry",)


def make_receipt_by(signer: SigningKey, genuine: Envelope) -> Envelope:
    """A receipt with the genuine payload but signed by someone else."""
    return sign_envelope(PayloadType.RECEIPT, genuine.payload_bytes(), [signer])


def test_evidence_entry_data_hashes_the_exact_payload() -> None:
    envelope = sign_evidence(DEVICE, bundle())
    data = evidence_entry_data(envelope)
    assert data == {
        "bundle_id": "ev-0001",
        "payload_sha256": hashlib.sha256(envelope.payload_bytes()).hexdigest(),
    }


def test_oversize_observed_values_are_refused() -> None:
    envelope = sign_evidence(DEVICE, bundle(observed={"dump": "x" * 2000}))
    result = check_evidence(
        envelope, delegation=delegation(), limits=Limits(max_evidence_bytes=1024)
    )
    assert "limit 1024" in result.describe()
    assert isinstance(result.failures[0], errors.MalformedError)
