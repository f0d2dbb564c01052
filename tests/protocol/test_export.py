"""Audit and evidence exports: what an auditor verifies offline with only the
central server's public key.

Every export here is built from the protocol's own primitives, as the
appliance builds it; each attack is a fixture named after it, and each must
fail with its own code and name the first bad entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msp_protocol.canonical import canonicalize
from msp_protocol.delegation import (
    Revocation,
    RevocationList,
    Scope,
    VerifiedDelegation,
    issue_delegation,
    sign_revocations,
    verify_delegation,
)
from msp_protocol.dsse import Envelope, PayloadType, sign_envelope
from msp_protocol.encoding import b64encode
from msp_protocol.errors import UsageError
from msp_protocol.evidence import (
    EVIDENCE_ENTRY_KIND,
    EvidenceBundle,
    evidence_entry_data,
    sign_evidence,
)
from msp_protocol.export import (
    AUDIT_EXPORT_FORMAT,
    EVIDENCE_EXPORT_FORMAT,
    build_audit_export,
    build_evidence_export,
    check_audit_export,
    check_evidence_export,
    parse_audit_export,
    verify_audit_export,
    verify_evidence_export,
)
from msp_protocol.keys import SigningKey
from msp_protocol.limits import Limits
from msp_protocol.log import (
    LogReplay,
    genesis_entry,
    make_checkpoint,
    make_entry,
    make_receipt,
    verify_checkpoint,
)
from msp_protocol.merkle import LeafHashTree, TreeState, inclusion_proof, leaf_hash
from msp_protocol.verify_cli import main
from tests.protocol.support import APPLIANCE, NOW, SITE, key

ROOT = key(1)
DEVICE = key(2)
ROTATED = key(3)
OTHER_ROOT = key(7)
STRANGER = key(9)
SERIAL = "ab" * 16
ROTATED_SERIAL = "cd" * 16
CENTRAL = [ROOT.verify_key]
# The auditor checks a month later: every certificate has expired by then,
# and that alone must not fail anything.
AUDIT_AT = NOW + timedelta(days=60)

SIZE = 20
CHECKPOINT_EVERY = 4  # checkpoints at sizes 4, 8, 12, 16, 20
WITNESSED = (8, 16)  # the central server cosigned these
EVIDENCE_AT = (5, 13)


def certificate(
    *,
    root: SigningKey = ROOT,
    subject: SigningKey = DEVICE,
    appliance_id: str = APPLIANCE,
    serial: str = SERIAL,
    lifetime: timedelta = timedelta(days=30),
    scopes: tuple[Scope, ...] = (Scope.AUDIT, Scope.EVIDENCE),
) -> Envelope:
    return issue_delegation(
        root,
        subject=subject.verify_key,
        appliance_id=appliance_id,
        site_id=SITE,
        scopes=scopes,
        not_before=NOW,
        lifetime=lifetime,
        serial=serial,
    )


def delegation_of(envelope: Envelope) -> VerifiedDelegation:
    return verify_delegation(envelope, roots=CENTRAL, at=NOW)


def bundle(log_index: int, **changes: object) -> EvidenceBundle:
    fields: dict[str, object] = {
        "bundle_id": f"ev-{log_index}",
        "site_id": SITE,
        "appliance_id": APPLIANCE,
        "check_id": "time-sync",
        "controls": {"hipaa": ["164.312(b)"], "iso_27001": ["A.8.17"]},
        "result": "pass",
        "observed": {"ntp_synchronized": True, "offset_ms": 1.25},
        "collected_at": NOW,
        "log_index": log_index,
        **changes,
    }
    return EvidenceBundle.model_validate(fields)


def at_hour(index: int) -> datetime:
    return NOW + timedelta(hours=index)


def plain_entry(index: int) -> bytes:
    return make_entry(
        index, at_hour(index), "l1.action", "runbook:ntp-sync", {"n": index, "ok": True}
    ).raw


@dataclass
class Log:
    """The pieces of an appliance's audit trail, as the agent stores them."""

    entries: list[bytes]
    checkpoints: list[Envelope]
    certificates: list[Envelope]
    receipts: list[Envelope]
    evidence: list[Envelope]
    revocations: Envelope | None = None
    signers: dict[int, SigningKey] = field(default_factory=dict)  # checkpoint size -> key

    def export(self) -> bytes:
        return build_audit_export(
            appliance_id=APPLIANCE,
            exported_at=NOW + timedelta(days=2),
            entries=self.entries,
            checkpoints=self.checkpoints,
            certificates=self.certificates,
            receipts=self.receipts,
            revocations=self.revocations,
            evidence=self.evidence,
        )


def checkpoint_of(
    entries: list[bytes], size: int, signer: SigningKey = DEVICE, ts: datetime | None = None
) -> Envelope:
    replay = LogReplay()
    replay.extend(entries[:size])
    return make_checkpoint(
        signer, appliance_id=APPLIANCE, state=replay.state, ts=ts or at_hour(size - 1)
    )


def make_log(
    size: int = SIZE,
    *,
    every: int = CHECKPOINT_EVERY,
    witnessed: tuple[int, ...] = WITNESSED,
    evidence_at: tuple[int, ...] = EVIDENCE_AT,
    lifetime: timedelta = timedelta(days=30),
    rotate_at: int | None = None,
) -> Log:
    """A log of ``size`` entries with a checkpoint every ``every`` entries and
    at the end, receipts at ``witnessed`` sizes and evidence bundles recorded
    at ``evidence_at``. With ``rotate_at``, checkpoints from that size on
    (and bundles from that index on) are signed by a rotated key."""
    certificates = [certificate(lifetime=lifetime)]
    delegations = {DEVICE.key_id: delegation_of(certificates[0])}
    if rotate_at is not None:
        certificates.append(certificate(subject=ROTATED, serial=ROTATED_SERIAL))
        delegations[ROTATED.key_id] = delegation_of(certificates[1])
    log = Log([], [], certificates, [], [])
    replay = LogReplay()
    for index in range(size):
        signer = DEVICE if rotate_at is None or index < rotate_at else ROTATED
        if index == 0:
            raw = genesis_entry(
                appliance_id=APPLIANCE,
                key_id=DEVICE.key_id,
                certificate_serial=SERIAL,
                ts=at_hour(0),
            ).raw
        elif index in evidence_at:
            envelope = sign_evidence(signer, bundle(index, collected_at=at_hour(index)))
            log.evidence.append(envelope)
            data = evidence_entry_data(envelope)
            raw = make_entry(index, at_hour(index), EVIDENCE_ENTRY_KIND, "agent", data).raw
        else:
            raw = plain_entry(index)
        log.entries.append(raw)
        replay.add(raw)
        if (index + 1) % every == 0 or index + 1 == size:
            signer = DEVICE if rotate_at is None or index + 1 < rotate_at else ROTATED
            checkpoint = make_checkpoint(
                signer, appliance_id=APPLIANCE, state=replay.state, ts=at_hour(index)
            )
            log.checkpoints.append(checkpoint)
            log.signers[index + 1] = signer
            if index + 1 in witnessed:
                verified = verify_checkpoint(checkpoint, delegation=delegations[signer.key_id])
                log.receipts.append(
                    make_receipt(ROOT, verified, at_hour(index) + timedelta(minutes=5))
                )
    return log


# --- a valid export ----------------------------------------------------------------


def test_valid_export_verifies() -> None:
    log = make_log()
    report = verify_audit_export(log.export(), CENTRAL, at=AUDIT_AT)
    assert report.verified
    assert report.appliance_id == APPLIANCE
    assert report.size == SIZE
    assert report.checkpoints == 5
    assert report.witnessed_size == 16
    assert report.key_ids == (DEVICE.key_id,)
    assert report.signed_after_expiry == ()
    assert report.evidence == 2
    assert report.first_bad_index is None
    assert report.problem is None


def test_export_bytes_are_canonical_and_tagged() -> None:
    data = make_log().export()
    value = json.loads(data)
    assert value["format"] == AUDIT_EXPORT_FORMAT
    assert canonicalize(value) == data
    assert "revocations" not in value  # none held: absent, like every null
    assert len(parse_audit_export(data).entries) == SIZE


def test_export_with_only_the_latest_checkpoint_and_no_receipt() -> None:
    log = make_log(every=1000, witnessed=())
    report = verify_audit_export(log.export(), CENTRAL, at=AUDIT_AT)
    assert (report.checkpoints, report.witnessed_size) == (1, 0)


def test_key_rotation_verifies_under_both_certificates() -> None:
    log = make_log(rotate_at=12, witnessed=(8, 16))
    report = verify_audit_export(log.export(), CENTRAL, at=AUDIT_AT)
    assert report.key_ids == (DEVICE.key_id, ROTATED.key_id)
    assert report.witnessed_size == 16
    assert report.evidence == 2


def test_revocation_with_cutoff_at_the_end_is_fine() -> None:
    log = make_log()
    log.revocations = revocation_list(cutoff=SIZE)
    assert verify_audit_export(log.export(), CENTRAL, at=AUDIT_AT).verified


def test_checkpoints_signed_after_expiry_are_flagged_not_failed() -> None:
    # A certificate valid for 10 hours; checkpoint i is signed at hour i - 1.
    log = make_log(lifetime=timedelta(hours=10))
    result = check_audit_export(log.export(), CENTRAL, at=AUDIT_AT)
    assert result.ok, result.describe()
    report = result.unwrap()
    assert report.signed_after_expiry == (12, 16, 20)
    assert report.checkpoints == 5


def test_certificate_not_valid_yet_at_the_audit_time_fails() -> None:
    result = check_audit_export(make_log().export(), CENTRAL, at=NOW - timedelta(days=1))
    assert result.codes[0] == "certificate-not-yet-valid"


# --- attacks: each fixture is named after the attack it stands for --------------------


def revocation_list(cutoff: int, serial: str = SERIAL) -> Envelope:
    revoked = Revocation(serial=serial, appliance_id=APPLIANCE, cutoff_size=cutoff, revoked_at=NOW)
    return sign_revocations(
        ROOT, RevocationList(version=3, issuer=ROOT.key_id, issued_at=NOW, revoked=(revoked,))
    )


def tamper_entry_changed(log: Log) -> Log:
    # Still a canonical entry at its index: only the root at the next
    # checkpoint (size 8) tells, so the block 4..7 is named, and no entry
    # of it (the export cannot tell which one changed).
    changed = log.entries[6].replace(b'"n":6', b'"n":7')
    assert changed != log.entries[6]
    return replace(log, entries=[*log.entries[:6], changed, *log.entries[7:]])


def tamper_entry_not_canonical(log: Log) -> Log:
    changed = log.entries[6].replace(b'"ok":true', b'"ok": true')
    return replace(log, entries=[*log.entries[:6], changed, *log.entries[7:]])


def tamper_remove_entry(log: Log) -> Log:
    return replace(log, entries=[*log.entries[:6], *log.entries[7:]])


def tamper_reorder_entries(log: Log) -> Log:
    entries = list(log.entries)
    entries[6], entries[7] = entries[7], entries[6]
    return replace(log, entries=entries)


def tamper_truncate_tail(log: Log) -> Log:
    return replace(log, entries=log.entries[:17])


def tamper_unsigned_tail(log: Log) -> Log:
    return replace(log, entries=[*log.entries, plain_entry(20), plain_entry(21)])


def tamper_genesis_of_another_appliance(log: Log) -> Log:
    genesis = genesis_entry(
        appliance_id="appliance-2", key_id=DEVICE.key_id, certificate_serial=SERIAL, ts=NOW
    ).raw
    return replace(log, entries=[genesis, *log.entries[1:]])


def forge_checkpoint_unknown_key(log: Log) -> Log:
    forged = checkpoint_of(log.entries, SIZE, signer=STRANGER)
    return replace(log, checkpoints=[*log.checkpoints[:-1], forged])


def reorder_checkpoints(log: Log) -> Log:
    first, second, *rest = log.checkpoints
    return replace(log, checkpoints=[second, first, *rest])


def forge_receipt_wrong_key(log: Log) -> Log:
    genuine = log.receipts[0]
    forged = sign_envelope(PayloadType.RECEIPT, genuine.payload_bytes(), [STRANGER])
    return replace(log, receipts=[forged, *log.receipts[1:]])


def replay_receipt_of_missing_checkpoint(log: Log) -> Log:
    other = verify_checkpoint(
        checkpoint_of(log.entries, 10), delegation=delegation_of(log.certificates[0])
    )
    return replace(log, receipts=[*log.receipts, make_receipt(ROOT, other, NOW)])


def replay_receipt_of_another_signing(log: Log) -> Log:
    # Same size and root, signed at another time: the receipt binds the
    # exact checkpoint bytes the server saw, not only the tree.
    resigned = checkpoint_of(log.entries, 8, ts=NOW + timedelta(days=1))
    checkpoints = [resigned if i == 1 else cp for i, cp in enumerate(log.checkpoints)]
    return replace(log, checkpoints=checkpoints)


def forge_certificate_other_root(log: Log) -> Log:
    return replace(log, certificates=[certificate(root=OTHER_ROOT)])


def certificate_of_another_appliance(log: Log) -> Log:
    return replace(log, certificates=[certificate(appliance_id="appliance-2")])


def revoked_key_beyond_cutoff(log: Log) -> Log:
    return replace(log, revocations=revocation_list(cutoff=8))


def forge_revocation_list(log: Log) -> Log:
    genuine = revocation_list(cutoff=SIZE)
    forged = sign_envelope(PayloadType.REVOCATIONS, genuine.payload_bytes(), [STRANGER])
    return replace(log, revocations=forged)


def tamper_evidence_bundle(log: Log) -> Log:
    genuine = log.evidence[0]
    value = json.loads(genuine.payload_bytes())
    value["result"] = "fail"
    edited = Envelope.model_validate(
        {**genuine.to_wire(), "payload": b64encode(canonicalize(value))}
    )
    return replace(log, evidence=[edited, *log.evidence[1:]])


def evidence_wrong_log_index(log: Log) -> Log:
    # Genuinely signed, but entry 6 records no bundle.
    moved = sign_evidence(DEVICE, bundle(6))
    return replace(log, evidence=[moved, *log.evidence[1:]])


def evidence_not_the_logged_one(log: Log) -> Log:
    # Genuinely signed for index 5, but not the bundle entry 5 records.
    other = sign_evidence(DEVICE, bundle(5, result="fail", collected_at=at_hour(5)))
    return replace(log, evidence=[other, *log.evidence[1:]])


def evidence_by_unknown_key(log: Log) -> Log:
    return replace(log, evidence=[sign_evidence(STRANGER, bundle(5)), *log.evidence[1:]])


ATTACKS: list[tuple[Callable[[Log], Log], tuple[str, ...], int | None]] = [
    (tamper_entry_changed, ("bad-checkpoint",), None),
    (tamper_entry_not_canonical, ("malformed-json",), 6),
    (tamper_remove_entry, ("bad-log-entry",), 6),
    (tamper_reorder_entries, ("bad-log-entry",), 6),
    (tamper_truncate_tail, ("bad-checkpoint",), 17),
    (tamper_unsigned_tail, ("unsigned-entries",), 20),
    (tamper_genesis_of_another_appliance, ("bad-log-entry",), 0),
    (forge_checkpoint_unknown_key, ("unknown-key",), 16),
    (reorder_checkpoints, ("bad-checkpoint",), None),
    (forge_receipt_wrong_key, ("bad-signature",), None),
    (replay_receipt_of_missing_checkpoint, ("bad-checkpoint",), None),
    (replay_receipt_of_another_signing, ("bad-checkpoint",), None),
    (
        forge_certificate_other_root,
        ("bad-signature", "unknown-key", "unknown-key", "unknown-key"),
        0,
    ),
    (
        certificate_of_another_appliance,
        ("wrong-subject", "unknown-key", "unknown-key", "unknown-key"),
        0,
    ),
    (revoked_key_beyond_cutoff, ("certificate-revoked",) * 4, 8),
    (forge_revocation_list, ("bad-signature",), None),
    (tamper_evidence_bundle, ("bad-signature",), None),
    (evidence_wrong_log_index, ("bad-evidence",), 6),
    (evidence_not_the_logged_one, ("bad-evidence",), 5),
    (evidence_by_unknown_key, ("unknown-key",), None),
]


@pytest.mark.parametrize(
    ("attack", "codes", "first_bad_index"),
    [pytest.param(*case, id=case[0].__name__) for case in ATTACKS],
)
def test_attack_is_refused(
    attack: Callable[[Log], Log], codes: tuple[str, ...], first_bad_index: int | None
) -> None:
    result = check_audit_export(attack(make_log()).export(), CENTRAL, at=AUDIT_AT)
    assert result.codes == codes, result.describe()
    report = result.value
    assert report is not None
    assert not report.verified
    assert report.first_bad_index == first_bad_index
    assert report.problem == str(result.failures[0])
    with pytest.raises(type(result.failures[0])):
        verify_audit_export(attack(make_log()).export(), CENTRAL, at=AUDIT_AT)


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        (
            tamper_entry_changed,
            "entries 4..7 do not match the checkpoint of size 8: one of them was changed",
        ),
        (tamper_remove_entry, "entry 6: carries index 7"),
        (
            tamper_truncate_tail,
            "checkpoint of size 20 covers more than the 17 entries exported: "
            "the last 3 entries were removed",
        ),
        (tamper_unsigned_tail, "entries 20..21 are not covered by any checkpoint"),
        (revoked_key_beyond_cutoff, "checkpoint of size 12 is signed by key"),
        (evidence_wrong_log_index, "log entry 6 is l1.action, not evidence.signed"),
        (evidence_not_the_logged_one, "log entry 5 records another bundle"),
        (replay_receipt_of_missing_checkpoint, "receipt for size 10 cosigns none"),
    ],
    ids=lambda value: getattr(value, "__name__", "message"),
)
def test_attack_messages_say_what_and_where(attack: Callable[[Log], Log], message: str) -> None:
    result = check_audit_export(attack(make_log()).export(), CENTRAL, at=AUDIT_AT)
    assert message in str(result.failures[0])


def test_receipt_by_the_device_key_is_no_witness() -> None:
    log = make_log()
    forged = sign_envelope(PayloadType.RECEIPT, log.receipts[1].payload_bytes(), [DEVICE])
    result = check_audit_export(
        replace(log, receipts=[log.receipts[0], forged]).export(), CENTRAL, at=AUDIT_AT
    )
    assert result.codes == ("bad-signature",)
    assert result.value is not None
    assert result.value.witnessed_size == 8


PROPERTY_LOG = make_log()


@given(st.data())
def test_any_single_byte_change_of_an_entry_fails(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, SIZE - 1), label="entry")
    raw = PROPERTY_LOG.entries[index]
    position = data.draw(st.integers(0, len(raw) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda b: b != raw[position]), label="byte")
    changed = raw[:position] + bytes([value]) + raw[position + 1 :]
    entries = [*PROPERTY_LOG.entries[:index], changed, *PROPERTY_LOG.entries[index + 1 :]]
    result = check_audit_export(
        replace(PROPERTY_LOG, entries=entries).export(), CENTRAL, at=AUDIT_AT
    )
    assert not result.ok
    assert result.value is not None
    # The changed entry is named, or else the block that holds it: never
    # an entry that may be untouched.
    report = result.value
    if report.first_bad_index is not None:
        assert report.first_bad_index == index
    else:
        assert report.bad_range is not None
        assert report.bad_range[0] <= index <= report.bad_range[1]


# --- parsing ----------------------------------------------------------------------


def test_duplicate_keys_are_refused() -> None:
    data = make_log().export()
    duplicated = data[:-1] + b',"appliance_id":"appliance-2"}'
    assert check_audit_export(duplicated, CENTRAL, at=AUDIT_AT).codes == ("malformed-json",)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"format": "msp.audit-export.v2"}, "format", id="unknown_format"),
        pytest.param({"checkpoints": []}, "checkpoints", id="no_checkpoint"),
        pytest.param({"certificates": []}, "certificates", id="no_certificate"),
        pytest.param({"extra": 1}, "extra", id="unknown_field"),
        pytest.param({"entries": ["not base64!"]}, "entry 0", id="entry_not_base64"),
    ],
)
def test_malformed_exports(change: dict[str, object], message: str) -> None:
    value = json.loads(make_log().export())
    value.update(change)
    result = check_audit_export(canonicalize(value), CENTRAL, at=AUDIT_AT)
    assert not result.ok
    assert message in result.describe()


def test_empty_log_is_refused() -> None:
    value = json.loads(make_log().export())
    value["entries"] = []
    result = check_audit_export(value, CENTRAL, at=AUDIT_AT)
    assert "bad-log-entry" in result.codes
    assert result.value is not None
    assert result.value.first_bad_index == 0


def test_export_bounds_come_from_limits() -> None:
    data = make_log().export()
    too_small = Limits(max_export_bytes=len(data) - 1)
    assert check_audit_export(data, CENTRAL, at=AUDIT_AT, limits=too_small).codes == (
        "malformed-json",
    )
    few = Limits(max_export_entries=SIZE - 1)
    result = check_audit_export(data, CENTRAL, at=AUDIT_AT, limits=few)
    assert result.codes == ("malformed-document",)
    assert "20 entries, limit 19" in result.describe()
    # The per-request JSON bound does not apply to an export.
    assert check_audit_export(data, CENTRAL, at=AUDIT_AT, limits=Limits(max_json_bytes=1024)).ok


def test_no_central_key_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        check_audit_export(make_log().export(), [], at=AUDIT_AT)


def test_a_large_export_verifies_in_one_pass() -> None:
    # 100,000 entries with a checkpoint every 100: catches anything that
    # rebuilds the tree per checkpoint (quadratic), not a benchmark.
    size, every = 100_000, 100
    state = TreeState()
    entries = [
        genesis_entry(
            appliance_id=APPLIANCE, key_id=DEVICE.key_id, certificate_serial=SERIAL, ts=NOW
        ).raw
    ]
    entries.extend(
        make_entry(index, NOW, "l1.action", "agent", {"n": index}).raw for index in range(1, size)
    )
    checkpoints = []
    for index, raw in enumerate(entries):
        state.append(leaf_hash(raw))
        if (index + 1) % every == 0:
            checkpoints.append(make_checkpoint(DEVICE, appliance_id=APPLIANCE, state=state, ts=NOW))
    log = Log(entries, checkpoints, [certificate()], [], [])
    data = log.export()
    start = time.perf_counter()
    report = verify_audit_export(data, CENTRAL, at=AUDIT_AT)
    elapsed = time.perf_counter() - start
    assert (report.size, report.checkpoints) == (size, size // every)
    assert elapsed < 30, f"verifying {size} entries took {elapsed:.1f} s"


# --- the evidence export ----------------------------------------------------------


@dataclass
class Proof:
    evidence: Envelope
    certificate: Envelope
    entry: bytes
    inclusion: list[bytes]
    checkpoint: Envelope
    receipt: Envelope
    checkpoint_certificate: Envelope | None = None

    def export(self, *, with_log: bool = True) -> bytes:
        if not with_log:
            return build_evidence_export(evidence=self.evidence, certificate=self.certificate)
        return build_evidence_export(
            evidence=self.evidence,
            certificate=self.certificate,
            entry=self.entry,
            inclusion=self.inclusion,
            checkpoint=self.checkpoint,
            receipt=self.receipt,
            checkpoint_certificate=self.checkpoint_certificate,
        )


def evidence_proof(log: Log | None = None, index: int = 5, size: int = 16) -> Proof:
    """The bundle at ``index``, proven in the tree of ``size`` (witnessed)."""
    log = log or make_log()
    evidence = next(e for e in log.evidence if b'"log_index":%d' % index in e.payload_bytes())
    checkpoint = next(cp for cp in log.checkpoints if b'"size":%d,' % size in cp.payload_bytes())
    receipt = next(r for r in log.receipts if b'"size":%d,' % size in r.payload_bytes())
    tree = LeafHashTree([leaf_hash(raw) for raw in log.entries[:size]])
    signer = log.signers[size]
    return Proof(
        evidence=evidence,
        certificate=log.certificates[0],
        entry=log.entries[index],
        inclusion=inclusion_proof(index, size, tree),
        checkpoint=checkpoint,
        receipt=receipt,
        checkpoint_certificate=log.certificates[1] if signer is ROTATED else None,
    )


def test_bundle_alone_verifies_but_is_not_proven_in_a_log() -> None:
    data = evidence_proof().export(with_log=False)
    assert json.loads(data)["format"] == EVIDENCE_EXPORT_FORMAT
    report = verify_evidence_export(data, CENTRAL, at=AUDIT_AT)
    assert (report.bundle_id, report.log_index, report.proven_in_log) == ("ev-5", 5, False)
    assert report.witnessed_size is None
    assert report.key_id == DEVICE.key_id
    assert report.certificate_serial == SERIAL
    assert not report.signed_after_expiry


def test_bundle_with_log_proof_is_proven_under_a_cosigned_checkpoint() -> None:
    report = verify_evidence_export(evidence_proof().export(), CENTRAL, at=AUDIT_AT)
    assert report.proven_in_log
    assert report.witnessed_size == 16
    assert report.witnessed_at == at_hour(15) + timedelta(minutes=5)
    assert report.checkpoint_key_id == DEVICE.key_id
    assert report.as_dict()["controls"] == {"hipaa": ["164.312(b)"], "iso_27001": ["A.8.17"]}


def test_bundle_proven_under_a_checkpoint_of_the_rotated_key() -> None:
    proof = evidence_proof(make_log(rotate_at=12), index=5, size=16)
    assert proof.checkpoint_certificate is not None
    report = verify_evidence_export(proof.export(), CENTRAL, at=AUDIT_AT)
    assert report.checkpoint_key_id == ROTATED.key_id
    without = replace(proof, checkpoint_certificate=None)
    result = check_evidence_export(without.export(), CENTRAL, at=AUDIT_AT)
    assert result.codes == ("unknown-key",)


def test_bundle_collected_after_expiry_is_flagged() -> None:
    log = make_log(lifetime=timedelta(hours=2))
    report = verify_evidence_export(evidence_proof(log).export(), CENTRAL, at=AUDIT_AT)
    assert report.signed_after_expiry
    assert report.proven_in_log


def _edited_bundle(proof: Proof) -> Proof:
    value = json.loads(proof.evidence.payload_bytes())
    value["result"] = "fail"
    edited = Envelope.model_validate(
        {**proof.evidence.to_wire(), "payload": b64encode(canonicalize(value))}
    )
    return replace(proof, evidence=edited)


EVIDENCE_ATTACKS: list[tuple[str, Callable[[Proof], Proof], str]] = [
    ("tamper_evidence_bundle", _edited_bundle, "bad-signature"),
    (
        "forge_certificate_other_root",
        lambda p: replace(p, certificate=certificate(root=OTHER_ROOT)),
        "bad-signature",
    ),
    (
        "forge_receipt_wrong_key",
        lambda p: replace(
            p,
            receipt=sign_envelope(PayloadType.RECEIPT, p.receipt.payload_bytes(), [STRANGER]),
        ),
        "bad-signature",
    ),
    (
        "tamper_inclusion_proof",
        lambda p: replace(p, inclusion=[bytes(32), *p.inclusion[1:]]),
        "bad-inclusion-proof",
    ),
    (
        "tamper_short_inclusion_proof",
        lambda p: replace(p, inclusion=p.inclusion[:-1]),
        "bad-inclusion-proof",
    ),
    ("entry_of_another_index", lambda p: replace(p, entry=plain_entry(6)), "bad-log-entry"),
    ("entry_records_nothing", lambda p: replace(p, entry=plain_entry(5)), "bad-evidence"),
    (
        "checkpoint_not_the_cosigned_one",
        lambda p: replace(p, checkpoint=checkpoint_of(make_log().entries, 16, ts=NOW)),
        "bad-checkpoint",
    ),
    (
        "forge_checkpoint_unknown_key",
        lambda p: replace(p, checkpoint=checkpoint_of(make_log().entries, 16, signer=STRANGER)),
        "unknown-key",
    ),
]


@pytest.mark.parametrize(
    ("attack", "code"),
    [pytest.param(attack, code, id=name) for name, attack, code in EVIDENCE_ATTACKS],
)
def test_evidence_export_attack_is_refused(attack: Callable[[Proof], Proof], code: str) -> None:
    result = check_evidence_export(attack(evidence_proof()).export(), CENTRAL, at=AUDIT_AT)
    assert result.codes == (code,), result.describe()


def test_evidence_export_log_part_is_all_or_nothing() -> None:
    proof = evidence_proof()
    with pytest.raises(UsageError, match="log part"):
        build_evidence_export(
            evidence=proof.evidence, certificate=proof.certificate, entry=proof.entry
        )
    value = json.loads(proof.export())
    del value["log"]["receipt"]
    result = check_evidence_export(canonicalize(value), CENTRAL, at=AUDIT_AT)
    assert result.codes == ("malformed-document",)
    assert "log.receipt" in result.describe()


def test_evidence_export_refuses_duplicate_keys() -> None:
    data = evidence_proof().export()
    duplicated = data[:-1] + b',"format":"msp.evidence-export.v1"}'
    assert check_evidence_export(duplicated, CENTRAL, at=AUDIT_AT).codes == ("malformed-json",)


# --- msp-verify ----------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    log = make_log()
    proof = evidence_proof(log)
    paths = {
        "audit": tmp_path / "audit-export.json",
        "tampered": tmp_path / "tamper_remove_entry.json",
        "evidence": tmp_path / "evidence-export.json",
        "bundle": tmp_path / "bundle.json",
        "certificate": tmp_path / "certificate.json",
        "key": tmp_path / "central.pub",
        "not_json": tmp_path / "notes.txt",
        "other_json": tmp_path / "other.json",
        "checkpoint": tmp_path / "checkpoint.json",
    }
    paths["audit"].write_bytes(log.export())
    paths["tampered"].write_bytes(tamper_remove_entry(log).export())
    paths["evidence"].write_bytes(proof.export())
    paths["bundle"].write_bytes(proof.evidence.to_json())
    paths["certificate"].write_bytes(proof.certificate.to_json())
    paths["key"].write_text(ROOT.verify_key.hex + "\n")
    paths["not_json"].write_text("this is not JSON\n")
    paths["other_json"].write_text('{"hello": "world"}')
    paths["checkpoint"].write_bytes(log.checkpoints[0].to_json())
    return paths


KEY = ["--central-key", ROOT.verify_key.hex, "--at", "2027-01-24T12:00:00Z"]


def run_main(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str], list[str]]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err.splitlines()


def test_cli_verifies_an_audit_export(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_main([*KEY, str(files["audit"])], capsys)
    assert status == 0
    assert out[0] == f"audit export of appliance {APPLIANCE}: verified"
    assert out[1:] == [
        "  20 entries, all covered by 5 signed checkpoints",
        f"  signing key: {DEVICE.key_id}, certified by the central server",
        "  witnessed by the central server up to size 16 (4 later entries not yet witnessed)",
        "  2 evidence bundles, each recorded in the log",
    ]
    assert err == []


def test_cli_names_the_first_bad_entry(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run_main([*KEY, str(files["tampered"])], capsys)
    assert status == 1
    assert out == [
        f"audit export of appliance {APPLIANCE}: NOT VERIFIED (first bad entry: 6)",
        "  bad-log-entry: entry 6: carries index 7",
    ]


def test_a_changed_entry_is_named_only_when_proven(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint after every entry pins a change to its entry; one every
    four entries only to the block, and the report says the block, never an
    entry of it that may be untouched (entry 1 changed is not "entry 0")."""
    for every, expected, line in [
        (1, (6, None), "first bad entry: 6"),
        (CHECKPOINT_EVERY, (None, (4, 7)), "a changed entry among 4..7"),
    ]:
        report = check_audit_export(
            tamper_entry_changed(make_log(every=every)).export(), CENTRAL, at=AUDIT_AT
        ).value
        assert report is not None
        assert (report.first_bad_index, report.bad_range) == expected
        path = tmp_path / f"changed-{every}.json"
        path.write_bytes(tamper_entry_changed(make_log(every=every)).export())
        status, out, _ = run_main([*KEY, str(path)], capsys)
        assert status == 1
        assert out[0] == f"audit export of appliance {APPLIANCE}: NOT VERIFIED ({line})"
    first_two = make_log(every=2)
    changed = first_two.entries[1].replace(b'"n":1', b'"n":2')
    assert changed != first_two.entries[1]
    tampered = replace(first_two, entries=[first_two.entries[0], changed, *first_two.entries[2:]])
    report = check_audit_export(tampered.export(), CENTRAL, at=AUDIT_AT).value
    assert report is not None
    assert (report.first_bad_index, report.bad_range) == (None, (0, 1))


def test_cli_json_report(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main([*KEY, "--json", str(files["tampered"])], capsys)
    assert status == 1
    report = json.loads("\n".join(out))
    assert report["kind"] == "audit-export"
    assert report["verified"] is False
    assert report["report"]["first_bad_index"] == 6
    assert report["problems"] == [{"code": "bad-log-entry", "message": "entry 6: carries index 7"}]
    status, out, _ = run_main([*KEY, "--json", str(files["audit"])], capsys)
    assert status == 0
    report = json.loads("\n".join(out))
    assert report["verified"] is True
    assert report["report"]["size"] == SIZE
    assert report["report"]["key_ids"] == [DEVICE.key_id]


def test_cli_evidence_export_and_bare_bundle(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run_main(
        ["--central-key-file", str(files["key"]), str(files["evidence"])], capsys
    )
    assert status == 0
    assert "proven at log index 5" in out[2]
    status, out, _ = run_main(
        [*KEY, "--certificate", str(files["certificate"]), str(files["bundle"])], capsys
    )
    assert status == 0
    assert "not yet proven in a witnessed log" in out[2]


def test_cli_refuses_a_bundle_under_another_certificate(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    other = tmp_path / "other-certificate.json"
    other.write_bytes(certificate(subject=STRANGER, serial="ef" * 16).to_json())
    status, out, _ = run_main([*KEY, "--certificate", str(other), str(files["bundle"])], capsys)
    assert status == 1
    assert out[1].startswith("  bad-signature: evidence: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["{audit}"], "a central public key is required", id="missing_key"),
        pytest.param(
            ["--central-key", "abcd", "{audit}"], "not an Ed25519 public key", id="bad_key"
        ),
        pytest.param(
            ["--central-key-file", "{missing}", "{audit}"], "cannot read", id="missing_key_file"
        ),
        pytest.param([*KEY, "{missing}"], "cannot read", id="unreadable_file"),
        pytest.param([*KEY, "{not_json}"], "is not a JSON document", id="not_json"),
        pytest.param([*KEY, "{other_json}"], "is not an audit export", id="unknown_document"),
        pytest.param([*KEY, "{checkpoint}"], "not an evidence bundle", id="other_signed_document"),
        pytest.param([*KEY, "{bundle}"], "name its --certificate", id="bundle_without_certificate"),
        pytest.param(
            [*KEY, "--certificate", "{certificate}", "{audit}"],
            "--certificate goes with a bare evidence bundle",
            id="certificate_with_export",
        ),
        pytest.param([*KEY, "--at", "yesterday", "{audit}"], "--at", id="bad_time"),
        pytest.param([*KEY], "FILE", id="no_file"),
    ],
)
def test_cli_usage_errors(
    argv: list[str],
    message: str,
    files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    paths = {**{name: str(path) for name, path in files.items()}, "missing": str(tmp_path / "nope")}
    status, out, err = run_main([arg.format(**paths) for arg in argv], capsys)
    assert status == 2
    assert out == []
    assert len(err) == 1
    assert err[0].startswith("msp-verify: ")
    assert message in err[0]


def test_cli_strictly_refused_json_fails_verification(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    duplicated = tmp_path / "duplicate-keys.json"
    duplicated.write_bytes(files["audit"].read_bytes()[:-1] + b',"appliance_id":"x"}')
    status, out, _ = run_main([*KEY, str(duplicated)], capsys)
    assert status == 1
    assert out[1].startswith("  malformed-json: duplicate key")


def run_process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "msp_protocol.verify_cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_as_a_process_exit_codes(files: dict[str, Path]) -> None:
    verified = run_process(*KEY, str(files["audit"]))
    assert (verified.returncode, verified.stderr) == (0, "")
    failed = run_process(*KEY, "--json", str(files["tampered"]))
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["report"]["first_bad_index"] == 6
    usage = run_process(str(files["audit"]))
    assert usage.returncode == 2
    assert usage.stdout == ""
    assert len(usage.stderr.splitlines()) == 1
    assert "Traceback" not in usage.stderr


def test_console_script_is_installed(files: dict[str, Path]) -> None:
    script = Path(sys.executable).parent / ("msp-verify.exe" if os.name == "nt" else "msp-verify")
    assert script.exists(), "run uv sync: the msp-verify console script is missing"
    result = subprocess.run(
        [str(script), *KEY, str(files["evidence"])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "signature verified" in result.stdout
