"""The auditor package: a site's evidence for some frameworks over a period,
built from real signed pieces as the central server holds them, and checked
offline with only the central public key.

Each attack is a fixture named after it and must fail with its own code and
a message that says where.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
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
from msp_protocol.encoding import b64encode, from_hex
from msp_protocol.errors import ModelError, UsageError
from msp_protocol.evidence import (
    EVIDENCE_ENTRY_KIND,
    EvidenceBundle,
    evidence_entry_data,
    sign_evidence,
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
from msp_protocol.merkle import TreeState, leaf_hash
from msp_protocol.package import (
    AUDITOR_PACKAGE_FORMAT,
    LogSegmentParts,
    PackageSummary,
    build_auditor_package,
    check_auditor_package,
    parse_auditor_package,
    summarise_evidence,
    verify_auditor_package,
)
from msp_protocol.verify_cli import main
from tests.protocol.support import APPLIANCE, NOW, SITE, key

ROOT = key(1)
DEVICE = key(2)
ROTATED = key(3)
SECOND_DEVICE = key(4)
FOREIGN_DEVICE = key(5)
OTHER_ROOT = key(7)
STRANGER = key(9)
SERIAL = "ab" * 16
ROTATED_SERIAL = "cd" * 16
CENTRAL = [ROOT.verify_key]
SECOND = "appliance-2"
FOREIGN = "appliance-9"  # of another site
OTHER_SITE = "site-other"

PERIOD_START = NOW
PERIOD_END = NOW + timedelta(days=2)  # hour 48
FRESHNESS = 36 * 3600  # bundles before hour 12 are stale at the period's end
AUDIT_AT = NOW + timedelta(days=60)  # every certificate has expired: not a failure
FRAMEWORKS = ("hipaa", "iso_27001")
CONTROLS = [
    ("hipaa", "164.308(a)(1)", "Security management process"),
    ("hipaa", "164.312(b)", "Audit controls"),
    ("hipaa", "164.312(e)(1)", "Transmission security"),
    ("iso_27001", "A.8.17", "Clock synchronization"),
]


def at_hour(hour: int) -> datetime:
    return NOW + timedelta(hours=hour)


# Log index -> (result, controls, observed) of appliance-1's bundles. The
# pci_dss bundle at 11 is of no framework in scope: the server leaves it out.
BUNDLES: dict[int, tuple[str, dict[str, list[str]], dict[str, Any]]] = {
    3: ("pass", {"hipaa": ["164.312(b)"], "iso_27001": ["A.8.17"]}, {"offset_ms": 1.5}),
    7: ("fail", {"hipaa": ["164.308(a)(1)", "164.312(b)"]}, {"reason": "2 units failed"}),
    11: ("pass", {"pci_dss": ["10.4"]}, {}),
    13: ("pass", {"hipaa": ["164.312(b)"]}, {"reason": 3}),
    16: ("error", {"iso_27001": ["A.8.17"]}, {"reason": "ntp unreachable"}),
}
SECOND_BUNDLES: dict[int, tuple[str, dict[str, list[str]], dict[str, Any]]] = {
    4: ("pass", {"hipaa": ["164.312(b)"]}, {}),
    25: ("fail", {"hipaa": ["164.312(e)(1)", "164.312(b)"]}, {"reason": "tls 1.0"}),
}


@dataclass
class ApplianceLog:
    """One appliance's audit log and what signed it, as the server stores it."""

    appliance_id: str
    entries: list[bytes]
    certificates: list[Envelope]
    evidence: dict[int, Envelope]  # by log index
    delegations: dict[str, VerifiedDelegation]
    rotate_at: int | None
    device: SigningKey

    def signer(self, index: int) -> SigningKey:
        """The key that signs what happens at ``index`` (a checkpoint of
        size n is signed at index n - 1)."""
        return ROTATED if self.rotate_at is not None and index >= self.rotate_at else self.device

    def checkpoint(self, size: int, *, ts: datetime | None = None) -> Envelope:
        replay = LogReplay()
        replay.extend(self.entries[:size])
        return make_checkpoint(
            self.signer(size - 1),
            appliance_id=self.appliance_id,
            state=replay.state,
            ts=ts or at_hour(size - 1),
        )

    def receipt(self, checkpoint: Envelope) -> Envelope:
        delegation = self.delegations[checkpoint.signatures[0].keyid]
        verified = verify_checkpoint(checkpoint, delegation=delegation)
        size = verified.checkpoint.size
        return make_receipt(ROOT, verified, at_hour(size) + timedelta(minutes=5))

    def segment(self, start: int = 0, end: int | None = None) -> LogSegmentParts:
        end = len(self.entries) if end is None else end
        prefix = TreeState()
        prefix.extend([leaf_hash(raw) for raw in self.entries[:start]])
        checkpoint = self.checkpoint(end)
        return LogSegmentParts(
            appliance_id=self.appliance_id,
            start=start,
            prefix=list(prefix.nodes),
            entries=self.entries[start:end],
            checkpoint=checkpoint,
            receipt=self.receipt(checkpoint),
            certificates=self.certificates,
        )


def certificate(
    *,
    subject: SigningKey = DEVICE,
    appliance_id: str = APPLIANCE,
    site_id: str = SITE,
    serial: str = SERIAL,
    root: SigningKey = ROOT,
    lifetime: timedelta = timedelta(days=30),
) -> Envelope:
    return issue_delegation(
        root,
        subject=subject.verify_key,
        appliance_id=appliance_id,
        site_id=site_id,
        scopes=(Scope.AUDIT, Scope.EVIDENCE),
        not_before=NOW,
        lifetime=lifetime,
        serial=serial,
    )


def check_for(controls: dict[str, list[str]]) -> str:
    named = "-".join(f"{f}.{c}" for f, ids in sorted(controls.items()) for c in sorted(set(ids)))
    return (
        "check-" + "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in named.lower())[:57]
    )


def bundle(
    appliance_id: str,
    index: int,
    result: str,
    controls: dict[str, list[str]],
    observed: dict[str, Any],
    site_id: str = SITE,
) -> EvidenceBundle:
    return EvidenceBundle.model_validate(
        {
            "bundle_id": f"{appliance_id}.ev-{index}",
            "site_id": site_id,
            "appliance_id": appliance_id,
            # One check per set of controls, as the agent's runbooks map them:
            # each (appliance, check) pair speaks through its newest bundle.
            "check_id": check_for(controls),
            "controls": controls,
            "result": result,
            "observed": observed,
            "collected_at": at_hour(index),
            "log_index": index,
        }
    )


def make_log(
    appliance_id: str = APPLIANCE,
    *,
    size: int = 20,
    bundles: dict[int, tuple[str, dict[str, list[str]], dict[str, Any]]] | None = None,
    device: SigningKey = DEVICE,
    serial: str = SERIAL,
    site_id: str = SITE,
    rotate_at: int | None = None,
    lifetime: timedelta = timedelta(days=30),
) -> ApplianceLog:
    bundles = BUNDLES if bundles is None else bundles
    certificates = [
        certificate(
            subject=device,
            appliance_id=appliance_id,
            site_id=site_id,
            serial=serial,
            lifetime=lifetime,
        )
    ]
    if rotate_at is not None:
        certificates.append(
            certificate(subject=ROTATED, appliance_id=appliance_id, serial=ROTATED_SERIAL)
        )
    delegations = {}
    for envelope in certificates:
        delegation = verify_delegation(envelope, roots=CENTRAL, at=NOW)
        delegations[delegation.certificate.subject_key_id] = delegation
    log = ApplianceLog(appliance_id, [], certificates, {}, delegations, rotate_at, device)
    for index in range(size):
        if index == 0:
            record = genesis_entry(
                appliance_id=appliance_id, key_id=device.key_id, certificate_serial=serial, ts=NOW
            )
        elif index in bundles:
            result, controls, observed = bundles[index]
            envelope = sign_evidence(
                log.signer(index),
                bundle(appliance_id, index, result, controls, observed, site_id),
            )
            log.evidence[index] = envelope
            data = evidence_entry_data(envelope)
            record = make_entry(index, at_hour(index), EVIDENCE_ENTRY_KIND, "agent", data)
        else:
            data = {"n": index, "ok": True}
            record = make_entry(index, at_hour(index), "l1.action", "runbook:ntp-sync", data)
        log.entries.append(record.raw)
    return log


def payload(envelope: Envelope) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(envelope.payload_bytes())
    return value


def in_scope(log: ApplianceLog, start: int) -> list[Envelope]:
    """The bundles the server puts in a package: inside the segment, of a
    framework in scope (all of the test bundles are in the period)."""
    return [
        envelope
        for index, envelope in sorted(log.evidence.items())
        if index >= start and set(payload(envelope)["controls"]) & set(FRAMEWORKS)
    ]


@dataclass
class Parts:
    """The pieces the server hands :func:`build_auditor_package`."""

    logs: list[LogSegmentParts]
    evidence: list[Envelope]
    summary: dict[str, Any] | PackageSummary
    revocations: Envelope | None = None
    frameworks: tuple[str, ...] = FRAMEWORKS
    period_end: datetime = PERIOD_END
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self) -> bytes:
        data = build_auditor_package(
            site_id=SITE,
            frameworks=self.frameworks,
            period_start=PERIOD_START,
            period_end=self.period_end,
            generated_at=PERIOD_END + timedelta(hours=1),
            logs=self.logs,
            evidence=self.evidence,
            revocations=self.revocations,
            summary=self.summary,
        )
        if not self.overrides:
            return data
        return canonicalize({**json.loads(data), **self.overrides})


def summary_of(evidence: list[Envelope], unwitnessed: int = 0) -> dict[str, Any]:
    bundles = [EvidenceBundle.from_json(envelope.payload_bytes()) for envelope in evidence]
    return summarise_evidence(
        bundles,
        CONTROLS,
        period_end=PERIOD_END,
        freshness_seconds=FRESHNESS,
        unwitnessed=unwitnessed,
    ).to_wire()


def package_of(*segments: tuple[ApplianceLog, int]) -> Parts:
    evidence = [envelope for log, start in segments for envelope in in_scope(log, start)]
    return Parts(
        logs=[log.segment(start) for log, start in segments],
        evidence=evidence,
        summary=summary_of(evidence),
    )


BASE_START = 6  # a segment from the middle of the log: the prefix has two nodes


def base() -> Parts:
    return package_of((make_log(), BASE_START))


def check(parts: Parts) -> Any:
    return check_auditor_package(parts.build(), CENTRAL, at=AUDIT_AT)


# --- valid packages ------------------------------------------------------------


def test_one_appliance_from_genesis_verifies() -> None:
    log = make_log()
    report = verify_auditor_package(package_of((log, 0)).build(), CENTRAL, at=AUDIT_AT)
    assert report.verified
    assert (report.site_id, report.frameworks) == (SITE, FRAMEWORKS)
    assert (report.period_start, report.period_end) == (PERIOD_START, PERIOD_END)
    (segment,) = report.segments
    assert (segment.appliance_id, segment.start, segment.size) == (APPLIANCE, 0, 20)
    assert segment.key_ids == (DEVICE.key_id,)
    assert segment.witnessed_at == at_hour(20) + timedelta(minutes=5)
    assert segment.bundles == 4
    # The pci_dss bundle at 11 is in the log and the period, not in the package.
    assert segment.omitted_bundles == report.omitted_bundles == 1
    assert report.bundles == 4
    assert report.summary_verified
    assert report.signed_after_expiry == ()
    assert report.states == {"stale": 2, "no-evidence": 1, "error": 1}
    assert report.problem is None


def test_summary_follows_the_rule() -> None:
    controls = {
        (c["framework"], c["control_id"]): c
        for c in summary_of(in_scope(make_log(), 0))["controls"]
    }
    audit = controls["hipaa", "164.312(b)"]
    assert audit["counts"] == {"pass": 2, "fail": 1, "error": 0, "not_applicable": 0}
    # Three checks list it; the one that last ran at hour 7 has gone stale,
    # and the worst of the three decides, however fresh the pass at hour 13.
    assert audit["state"] == "stale"
    assert audit["latest"]["bundle_id"] == f"{APPLIANCE}.ev-7"
    management = controls["hipaa", "164.308(a)(1)"]
    assert management["state"] == "stale"  # one failing bundle at hour 7: 41 h old
    assert management["latest"]["reason"] == "2 units failed"
    assert controls["hipaa", "164.312(e)(1)"] == {
        "framework": "hipaa",
        "control_id": "164.312(e)(1)",
        "title": "Transmission security",
        "state": "no-evidence",
        "counts": {"pass": 0, "fail": 0, "error": 0, "not_applicable": 0},
    }
    assert controls["iso_27001", "A.8.17"]["state"] == "error"


def test_summary_latest_breaks_ties_by_appliance_then_bundle() -> None:
    same_time = [
        bundle(appliance, 30, result, {"hipaa": ["164.312(b)", "164.312(b)"]}, {})
        for appliance, result in (("appliance-b", "fail"), ("appliance-a", "pass"))
    ]
    summary = summarise_evidence(
        same_time, CONTROLS[:2], period_end=PERIOD_END, freshness_seconds=FRESHNESS
    )
    audit = summary.controls[1]
    assert audit.latest is not None
    assert audit.latest.appliance_id == "appliance-b"
    assert audit.state == "failing"
    # A control listed twice by one bundle counts once.
    assert audit.counts.by_result() == {"pass": 1, "fail": 1, "error": 0, "not_applicable": 0}
    # Each appliance's check speaks through its newest bundle, and the worst
    # of them decides: appliance-a turning not_applicable leaves b failing.
    na = bundle("appliance-a", 31, "not_applicable", {"hipaa": ["164.312(b)"]}, {})
    summary = summarise_evidence(
        [*same_time, na], CONTROLS[:2], period_end=PERIOD_END, freshness_seconds=FRESHNESS
    )
    assert summary.controls[1].state == "failing"
    fixed = bundle("appliance-b", 32, "pass", {"hipaa": ["164.312(b)"]}, {})
    summary = summarise_evidence(
        [*same_time, na, fixed], CONTROLS[:2], period_end=PERIOD_END, freshness_seconds=FRESHNESS
    )
    assert summary.controls[1].state == "passing"
    assert summary.controls[1].latest is not None
    assert summary.controls[1].latest.bundle_id == fixed.bundle_id
    summary = summarise_evidence(
        [na], CONTROLS[:2], period_end=PERIOD_END, freshness_seconds=FRESHNESS
    )
    assert summary.controls[1].state == "not_applicable"


def test_two_appliances_verify() -> None:
    first, second = (
        make_log(),
        make_log(SECOND, size=30, bundles=SECOND_BUNDLES, device=SECOND_DEVICE, serial="ef" * 16),
    )
    parts = package_of((first, 0), (second, 0))
    report = verify_auditor_package(parts.build(), CENTRAL, at=AUDIT_AT)
    assert [(s.appliance_id, s.size, s.bundles) for s in report.segments] == [
        (APPLIANCE, 20, 4),
        (SECOND, 30, 2),
    ]
    assert report.segments[1].key_ids == (SECOND_DEVICE.key_id,)
    assert report.bundles == 6
    controls = {(c.framework, c.control_id): c for c in report.controls}
    assert controls["hipaa", "164.312(e)(1)"].state == "failing"
    assert controls["hipaa", "164.312(b)"].counts.by_result()["fail"] == 2


def test_segment_from_the_middle_of_the_log_verifies() -> None:
    report = verify_auditor_package(base().build(), CENTRAL, at=AUDIT_AT)
    (segment,) = report.segments
    assert (segment.start, segment.size, segment.bundles) == (BASE_START, 20, 3)
    assert segment.omitted_bundles == 1  # bundle 3 lies before the segment: unseen
    assert report.states == {"stale": 2, "no-evidence": 1, "error": 1}


def test_key_rotation_between_bundles_verifies() -> None:
    log = make_log(rotate_at=10)
    report = verify_auditor_package(package_of((log, 2)).build(), CENTRAL, at=AUDIT_AT)
    (segment,) = report.segments
    assert segment.key_ids == (DEVICE.key_id, ROTATED.key_id)
    assert report.bundles == 4
    # After the rotation only the new key signs: a segment starting there
    # needs nothing of the old key.
    later = package_of((log, 12))
    assert verify_auditor_package(later.build(), CENTRAL, at=AUDIT_AT).segments[0].key_ids == (
        ROTATED.key_id,
    )


def test_one_key_certified_for_two_appliances() -> None:
    # Each bundle is judged under the certificate of the appliance it names.
    second = make_log(SECOND, size=30, bundles=SECOND_BUNDLES, serial="ef" * 16)
    report = verify_auditor_package(
        package_of((make_log(), 0), (second, 0)).build(), CENTRAL, at=AUDIT_AT
    )
    assert [segment.bundles for segment in report.segments] == [4, 2]
    assert report.segments[1].key_ids == (DEVICE.key_id,)


def test_bundles_signed_after_expiry_are_flagged_not_failed() -> None:
    log = make_log(lifetime=timedelta(hours=10))
    result = check(package_of((log, 0)))
    assert result.ok, result.describe()
    report = result.unwrap()
    assert report.signed_after_expiry == (f"{APPLIANCE}.ev-13", f"{APPLIANCE}.ev-16")
    assert report.segments[0].checkpoint_signed_after_expiry


def test_a_site_without_evidence_in_the_period() -> None:
    parts = Parts(logs=[], evidence=[], summary=summary_of([], unwitnessed=2))
    report = verify_auditor_package(parts.build(), CENTRAL, at=AUDIT_AT)
    assert report.states == {"no-evidence": 4}
    assert (report.bundles, report.unwitnessed_bundles) == (0, 2)


def test_package_bytes_are_canonical_and_tagged() -> None:
    data = base().build()
    value = json.loads(data)
    assert value["format"] == AUDITOR_PACKAGE_FORMAT
    assert canonicalize(value) == data
    assert "revocations" not in value
    package = parse_auditor_package(data)
    # The server may hand over the summary as summarise_evidence returns it.
    assert replace(base(), summary=package.summary).build() == data
    assert len(package.logs[0].prefix) == 2
    assert package.logs[0].end == 20
    assert isinstance(package.summary, PackageSummary)


def test_builder_refuses_wrong_shapes() -> None:
    parts = base()
    with pytest.raises(ModelError, match="prefix of a tree of size 6 has 2 subtree roots"):
        replace(parts, logs=[replace(parts.logs[0], prefix=[])]).build()
    with pytest.raises(ModelError, match="frameworks must be sorted"):
        replace(parts, frameworks=("iso_27001", "hipaa")).build()
    with pytest.raises(ModelError, match="period_end"):
        replace(parts, period_end=PERIOD_START).build()
    with pytest.raises(ModelError, match="two log segments"):
        replace(parts, logs=parts.logs * 2).build()
    with pytest.raises(ModelError, match="framework iso_27001, not in scope"):
        replace(parts, frameworks=("hipaa",)).build()


def test_replay_resumes_from_a_compact_range() -> None:
    entries = make_log().entries
    whole = LogReplay(appliance_id=APPLIANCE)
    whole.extend(entries)
    prefix = LogReplay()
    prefix.extend(entries[:BASE_START])
    state = TreeState.from_compact_range(BASE_START, prefix.state.nodes)
    resumed = LogReplay(appliance_id=APPLIANCE, state=state)
    resumed.extend(entries[BASE_START:])
    assert (resumed.size, resumed.root()) == (whole.size, whole.root())
    assert resumed.genesis is None  # entry 0 was never seen
    with pytest.raises(ModelError, match="size 6 has 2 subtree roots, got 1"):
        TreeState.from_compact_range(BASE_START, prefix.state.nodes[:1])
    with pytest.raises(ModelError, match="32-byte"):
        TreeState.from_compact_range(1, [b"short"])


# --- attacks -------------------------------------------------------------------


def with_segment(parts: Parts, **changes: Any) -> Parts:
    return replace(parts, logs=[replace(parts.logs[0], **changes), *parts.logs[1:]])


def entries_of(parts: Parts) -> list[bytes]:
    return list(parts.logs[0].entries)


def at(index: int) -> int:
    """Position of log index ``index`` in the base segment's entries."""
    return index - BASE_START


def tamper_prefix_node(parts: Parts) -> Parts:
    prefix = list(parts.logs[0].prefix)
    prefix[1] = bytes([prefix[1][0] ^ 1]) + prefix[1][1:]
    return with_segment(parts, prefix=prefix)


def tamper_entry(parts: Parts) -> Parts:
    entries = entries_of(parts)
    changed = entries[at(9)].replace(b'"n":9', b'"n":8')
    assert changed != entries[at(9)]
    entries[at(9)] = changed
    return with_segment(parts, entries=entries)


def drop_entry(parts: Parts) -> Parts:
    entries = entries_of(parts)
    del entries[at(9)]
    return with_segment(parts, entries=entries)


def reorder_entries(parts: Parts) -> Parts:
    entries = entries_of(parts)
    entries[at(9)], entries[at(10)] = entries[at(10)], entries[at(9)]
    return with_segment(parts, entries=entries)


def truncate_tail(parts: Parts) -> Parts:
    return with_segment(parts, entries=entries_of(parts)[:-2])


def swap_checkpoint_root(parts: Parts) -> Parts:
    # The device key signs a checkpoint of size 20 over a forked log; the
    # central server cosigned it, as it cosigns whatever it is shown.
    fork = make_log(bundles={})
    checkpoint = fork.checkpoint(20)
    return with_segment(parts, checkpoint=checkpoint, receipt=fork.receipt(checkpoint))


def tamper_checkpoint_payload(parts: Parts) -> Parts:
    genuine = parts.logs[0].checkpoint
    value = payload(genuine)
    value["size"] = 18
    edited = Envelope.model_validate(
        {**genuine.to_wire(), "payload": b64encode(canonicalize(value))}
    )
    return with_segment(parts, checkpoint=edited)


def forged_receipt(parts: Parts) -> Parts:
    genuine = parts.logs[0].receipt
    forged = sign_envelope(PayloadType.RECEIPT, genuine.payload_bytes(), [STRANGER])
    return with_segment(parts, receipt=forged)


def receipt_for_other_size(parts: Parts) -> Parts:
    log = make_log()
    return with_segment(parts, receipt=log.receipt(log.checkpoint(16)))


def forged_certificate(parts: Parts) -> Parts:
    return with_segment(parts, certificates=[certificate(root=OTHER_ROOT)])


def other_site_bundle(parts: Parts) -> Parts:
    foreign = make_log(
        FOREIGN,
        bundles={5: BUNDLES[3]},
        device=FOREIGN_DEVICE,
        serial="0f" * 16,
        site_id=OTHER_SITE,
    )
    return replace(
        parts,
        logs=[*parts.logs, foreign.segment()],
        evidence=[*parts.evidence, foreign.evidence[5]],
    )


def bundle_outside_period(parts: Parts) -> Parts:
    return replace(parts, period_end=at_hour(16))


def bundle_out_of_scope_framework(parts: Parts) -> Parts:
    pci = make_log().evidence[11]
    return replace(parts, evidence=[parts.evidence[0], pci, *parts.evidence[1:]])


def bundle_not_in_segment(parts: Parts) -> Parts:
    return replace(parts, evidence=[make_log().evidence[3], *parts.evidence])


def bundle_entry_mismatch(parts: Parts) -> Parts:
    # Genuinely signed by the device for index 13, but not the bundle entry
    # 13 records: its result was edited and the bundle signed again.
    other = sign_evidence(DEVICE, bundle(APPLIANCE, 13, "fail", BUNDLES[13][1], {}))
    return replace(parts, evidence=[parts.evidence[0], other, parts.evidence[2]])


def tamper_bundle_payload(parts: Parts) -> Parts:
    genuine = parts.evidence[1]
    value = payload(genuine)
    value["result"] = "fail"
    edited = Envelope.model_validate(
        {**genuine.to_wire(), "payload": b64encode(canonicalize(value))}
    )
    return replace(parts, evidence=[parts.evidence[0], edited, parts.evidence[2]])


def duplicate_bundle(parts: Parts) -> Parts:
    first, second, third = parts.evidence
    return replace(parts, evidence=[first, second, second, third])


def bundles_out_of_order(parts: Parts) -> Parts:
    first, second, third = parts.evidence
    return replace(parts, evidence=[second, first, third])


def bundle_by_unknown_key(parts: Parts) -> Parts:
    stranger = sign_evidence(STRANGER, bundle(APPLIANCE, 13, *BUNDLES[13]))
    return replace(parts, evidence=[parts.evidence[0], stranger, parts.evidence[2]])


def revocation_list(cutoff: int) -> Envelope:
    revoked = Revocation(serial=SERIAL, appliance_id=APPLIANCE, cutoff_size=cutoff, revoked_at=NOW)
    return sign_revocations(
        ROOT, RevocationList(version=2, issuer=ROOT.key_id, issued_at=NOW, revoked=(revoked,))
    )


def revoked_key_beyond_cutoff(parts: Parts) -> Parts:
    return replace(parts, revocations=revocation_list(cutoff=12))


def forged_revocation_list(parts: Parts) -> Parts:
    genuine = revocation_list(cutoff=20)
    forged = sign_envelope(PayloadType.REVOCATIONS, genuine.payload_bytes(), [STRANGER])
    return replace(parts, revocations=forged)


def edited_summary(parts: Parts, edit: Callable[[list[dict[str, Any]]], None]) -> Parts:
    summary = json.loads(json.dumps(parts.summary))
    edit(summary["controls"])
    return replace(parts, summary=summary)


def summary_counts_edited(parts: Parts) -> Parts:
    def edit(controls: list[dict[str, Any]]) -> None:
        controls[1]["counts"]["pass"] = 2

    return edited_summary(parts, edit)


def summary_state_edited(parts: Parts) -> Parts:
    def edit(controls: list[dict[str, Any]]) -> None:
        controls[0]["state"] = "failing"

    return edited_summary(parts, edit)


def summary_latest_edited(parts: Parts) -> Parts:
    def edit(controls: list[dict[str, Any]]) -> None:
        controls[3]["latest"]["result"] = "pass"
        controls[3]["state"] = "passing"

    return edited_summary(parts, edit)


def summary_hides_control(parts: Parts) -> Parts:
    def edit(controls: list[dict[str, Any]]) -> None:
        del controls[0]

    return edited_summary(parts, edit)


def unknown_format(parts: Parts) -> Parts:
    return replace(parts, overrides={"format": "msp.auditor-package.v2"})


SEGMENT = f"logs[0] (appliance {APPLIANCE})"
EV = f"{APPLIANCE}.ev"

ATTACKS: list[tuple[Callable[[Parts], Parts], tuple[str, ...], str]] = [
    (
        tamper_prefix_node,
        ("bad-checkpoint",),
        f"{SEGMENT}: entries 6..19 do not match the checkpoint of size 20",
    ),
    (tamper_entry, ("bad-checkpoint",), f"{SEGMENT}: entries 6..19 do not match"),
    (drop_entry, ("bad-log-entry",), f"{SEGMENT}: entry 9: carries index 10"),
    (reorder_entries, ("bad-log-entry",), f"{SEGMENT}: entry 9: carries index 10"),
    (
        truncate_tail,
        ("bad-checkpoint",),
        f"{SEGMENT}: the checkpoint of size 20 covers more than entries 6..17: "
        "the last 2 entries were removed",
    ),
    (swap_checkpoint_root, ("bad-checkpoint",), f"{SEGMENT}: entries 6..19 do not match"),
    (tamper_checkpoint_payload, ("bad-signature",), f"{SEGMENT}: checkpoint: 0 of 1 required"),
    (forged_receipt, ("bad-signature",), f"{SEGMENT}: receipt: 0 of 1 required"),
    (
        receipt_for_other_size,
        ("bad-checkpoint",),
        f"{SEGMENT}: receipt: receipt covers msp/{APPLIANCE} size 16, checkpoint is "
        f"msp/{APPLIANCE} size 20",
    ),
    (
        forged_certificate,
        ("bad-signature", "unknown-key", "unknown-key"),
        f"{SEGMENT}: certificates[0]: 0 of 1 required",
    ),
    (
        other_site_bundle,
        ("wrong-subject", "unknown-key", "unknown-key"),
        f"logs[1] (appliance {FOREIGN}): certificates[0]: certificate is for site "
        f"{OTHER_SITE}, not {SITE}",
    ),
    (
        bundle_outside_period,
        ("bad-evidence",),
        f"evidence[2] (bundle {EV}-16): collected at 2026-11-26T04:00:00Z, outside the "
        "period 2026-11-25T12:00:00Z .. 2026-11-26T04:00:00Z",
    ),
    (
        bundle_out_of_scope_framework,
        ("bad-evidence",),
        f"evidence[1] (bundle {EV}-11): lists frameworks pci_dss, none of the package's "
        "(hipaa, iso_27001)",
    ),
    (
        bundle_not_in_segment,
        ("bad-evidence",),
        f"evidence[0] (bundle {EV}-3): recorded at log index 3, outside the segment's "
        f"entries 6..19 of appliance {APPLIANCE}",
    ),
    (
        bundle_entry_mismatch,
        ("bad-evidence",),
        f"evidence[1] (bundle {EV}-13): log entry 13 records another bundle",
    ),
    (tamper_bundle_payload, ("bad-signature",), "evidence[1]: 0 of 1 required"),
    (
        duplicate_bundle,
        ("bad-evidence",),
        f"evidence[2] (bundle {EV}-13): the bundle appears twice",
    ),
    (
        bundles_out_of_order,
        ("bad-evidence",),
        f"evidence[1] (bundle {EV}-7): out of order: evidence is ordered by appliance and "
        f"log index, and this bundle follows log index 13 of appliance {APPLIANCE}",
    ),
    (
        bundle_by_unknown_key,
        ("unknown-key",),
        f"evidence[1] signed by key {STRANGER.key_id}, which no verified certificate",
    ),
    (
        revoked_key_beyond_cutoff,
        ("certificate-revoked",) * 3,
        f"{SEGMENT}: the checkpoint of size 20 is signed by key {DEVICE.key_id}, whose "
        f"certificate {SERIAL} is revoked beyond size 12",
    ),
    (forged_revocation_list, ("bad-signature",), "revocations: 0 of 1 required"),
    (
        summary_counts_edited,
        ("bad-summary",),
        "summary: hipaa 164.312(b): counts say 2 pass, the package holds 1",
    ),
    (
        summary_state_edited,
        ("bad-summary",),
        "summary: hipaa 164.308(a)(1): state says failing, the package's evidence makes it stale",
    ),
    (
        summary_latest_edited,
        ("bad-summary",),
        f"summary: iso_27001 A.8.17: latest result says pass, the package's newest bundle "
        f"({EV}-16) has error",
    ),
    (
        summary_hides_control,
        ("bad-summary",),
        f"summary: hipaa 164.308(a)(1) is not listed, and bundle {EV}-7 gives evidence for it",
    ),
    (unknown_format, ("malformed-document",), "auditor package: format: Input should be"),
]


@pytest.mark.parametrize(
    ("attack", "codes", "message"),
    [pytest.param(*case, id=case[0].__name__) for case in ATTACKS],
)
def test_attack_is_refused(
    attack: Callable[[Parts], Parts], codes: tuple[str, ...], message: str
) -> None:
    data = attack(base()).build()
    result = check_auditor_package(data, CENTRAL, at=AUDIT_AT)
    assert result.codes == codes, result.describe()
    assert str(result.failures[0]).startswith(message), result.describe()
    if result.value is not None:  # only an unparsable package has no report
        assert not result.value.verified
        assert result.value.problem == str(result.failures[0])
        assert not result.value.summary_verified
    with pytest.raises(type(result.failures[0])):
        verify_auditor_package(data, CENTRAL, at=AUDIT_AT)


def test_a_failing_segment_still_reports_the_others() -> None:
    second = make_log(
        SECOND, size=30, bundles=SECOND_BUNDLES, device=SECOND_DEVICE, serial="ef" * 16
    )
    parts = tamper_entry(package_of((make_log(), BASE_START), (second, 0)))
    result = check(parts)
    assert result.codes == ("bad-checkpoint",)
    report = result.value
    assert report is not None
    assert report.segments[0].witnessed_at is None
    assert report.segments[1].witnessed_at == at_hour(30) + timedelta(minutes=5)
    assert report.bundles == 2  # the second appliance's


PROPERTY_PARTS = base()


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_single_byte_change_of_the_segment_fails(data: st.DataObject) -> None:
    segment = PROPERTY_PARTS.logs[0]
    pieces = [*segment.prefix, *segment.entries]
    which = data.draw(st.integers(0, len(pieces) - 1), label="piece")
    raw = pieces[which]
    position = data.draw(st.integers(0, len(raw) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda b: b != raw[position]), label="byte")
    pieces[which] = raw[:position] + bytes([value]) + raw[position + 1 :]
    prefix, entries = pieces[: len(segment.prefix)], pieces[len(segment.prefix) :]
    parts = with_segment(PROPERTY_PARTS, prefix=prefix, entries=entries)
    result = check(parts)
    assert not result.ok
    assert result.failures[0].message.startswith(SEGMENT)


# --- parsing and bounds --------------------------------------------------------


def test_duplicate_keys_are_refused() -> None:
    data = base().build()
    duplicated = data[:-1] + b',"site_id":"site-2"}'
    assert check_auditor_package(duplicated, CENTRAL, at=AUDIT_AT).codes == ("malformed-json",)


def test_package_bounds_come_from_limits() -> None:
    data = base().build()
    assert check_auditor_package(
        data, CENTRAL, at=AUDIT_AT, limits=Limits(max_export_bytes=len(data) - 1)
    ).codes == ("malformed-json",)
    few = check_auditor_package(data, CENTRAL, at=AUDIT_AT, limits=Limits(max_export_entries=13))
    assert "14 entries, limit 13" in few.describe()
    two = package_of(
        (make_log(), 0),
        (make_log(SECOND, bundles=SECOND_BUNDLES, device=SECOND_DEVICE, serial="ef" * 16), 0),
    ).build()
    one = check_auditor_package(two, CENTRAL, at=AUDIT_AT, limits=Limits(max_package_appliances=1))
    assert "2 log segments, limit 1" in one.describe()
    # The per-request JSON bound does not apply to a package.
    assert check_auditor_package(data, CENTRAL, at=AUDIT_AT, limits=Limits(max_json_bytes=1024)).ok


def test_no_central_key_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        check_auditor_package(base().build(), [], at=AUDIT_AT)


def test_many_bundles_verify_in_one_pass() -> None:
    # 10,000 bundles in 15,000 entries: catches anything quadratic in the
    # bundles or entries (a lookup per bundle over a list), not a benchmark.
    count, every = 10_000, 3
    raw_entries = [
        genesis_entry(
            appliance_id=APPLIANCE, key_id=DEVICE.key_id, certificate_serial=SERIAL, ts=NOW
        ).raw
    ]
    evidence = []
    for index in range(1, count * every // 2 + 1):
        if index % every:
            observed = {"n": index}
            envelope = sign_evidence(
                DEVICE, bundle(APPLIANCE, index, "pass", {"hipaa": ["164.312(b)"]}, observed)
            )
            evidence.append(envelope)
            data = evidence_entry_data(envelope)
            raw_entries.append(make_entry(index, NOW, EVIDENCE_ENTRY_KIND, "agent", data).raw)
        else:
            raw_entries.append(make_entry(index, NOW, "l1.action", "agent", {"n": index}).raw)
    log = ApplianceLog(APPLIANCE, raw_entries, [certificate()], {}, {}, None, DEVICE)
    log.delegations[DEVICE.key_id] = verify_delegation(log.certificates[0], roots=CENTRAL, at=NOW)
    bundles = [EvidenceBundle.from_json(envelope.payload_bytes()) for envelope in evidence]
    summary = summarise_evidence(
        bundles, CONTROLS, period_end=at_hour(20_000), freshness_seconds=FRESHNESS
    )
    parts = Parts(logs=[log.segment()], evidence=evidence, summary=summary.to_wire())
    parts.period_end = at_hour(20_000)
    data = parts.build()
    start = time.perf_counter()
    report = verify_auditor_package(data, CENTRAL, at=AUDIT_AT)
    elapsed = time.perf_counter() - start
    assert report.bundles == count
    assert elapsed < 30, f"verifying {count} bundles took {elapsed:.1f} s"


# --- msp-verify ----------------------------------------------------------------

KEY = ["--central-key", ROOT.verify_key.hex, "--at", "2027-01-24T12:00:00Z"]


def run_main(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str], list[str]]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err.splitlines()


@pytest.fixture
def package_files(tmp_path: Path) -> dict[str, Path]:
    paths = {"good": tmp_path / "package.json", "bad": tmp_path / "summary_counts_edited.json"}
    paths["good"].write_bytes(base().build())
    paths["bad"].write_bytes(summary_counts_edited(base()).build())
    return paths


def test_cli_verifies_an_auditor_package(
    package_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_main([*KEY, str(package_files["good"])], capsys)
    assert (status, err) == (0, [])
    assert out == [
        f"auditor package of site {SITE} (hipaa, iso_27001), 2026-11-25T12:00:00Z to "
        "2026-11-27T12:00:00Z: verified",
        f"  appliance {APPLIANCE}: entries 6..19 signed by {DEVICE.key_id}, "
        "witnessed 2026-11-26T08:05:00Z",
        "  3 evidence bundles, each recorded in its appliance's witnessed log",
        "  summary of 4 controls recomputed and matching: 1 error, 1 no-evidence, 2 stale",
        "  review: bundles recorded in the logs shown during the period but not in the "
        "package: 1 (of other frameworks, or left out)",
    ]


def test_cli_names_the_failure_of_a_bad_package(
    package_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run_main([*KEY, str(package_files["bad"])], capsys)
    assert status == 1
    assert out == [
        f"auditor package of site {SITE} (hipaa, iso_27001), 2026-11-25T12:00:00Z to "
        "2026-11-27T12:00:00Z: NOT VERIFIED",
        "  bad-summary: summary: hipaa 164.312(b): counts say 2 pass, the package holds 1",
    ]
    status, out, _ = run_main([*KEY, "--json", str(package_files["bad"])], capsys)
    assert status == 1
    report = json.loads("\n".join(out))
    assert report["kind"] == "auditor-package"
    assert report["verified"] is False
    assert report["problems"][0]["code"] == "bad-summary"
    assert report["report"]["problem"].startswith("summary: hipaa 164.312(b)")
    status, out, _ = run_main([*KEY, "--json", str(package_files["good"])], capsys)
    assert status == 0
    report = json.loads("\n".join(out))["report"]
    assert report["segments"][0]["start"] == BASE_START
    assert report["bundles"] == 3
    assert report["controls"][1]["counts"] == {
        "pass": 1,
        "fail": 1,
        "error": 0,
        "not_applicable": 0,
    }
    assert from_hex(report["segments"][0]["key_ids"][0]) == bytes.fromhex(DEVICE.key_id)


def test_cli_shows_what_is_flagged_for_review(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "late.json"
    path.write_bytes(package_of((make_log(lifetime=timedelta(hours=10)), 0)).build())
    status, out, _ = run_main([*KEY, str(path)], capsys)
    assert status == 0
    assert out[-3:] == [
        f"  review: 2 bundles collected after the signing key's certificate expired "
        f"({APPLIANCE}.ev-13, {APPLIANCE}.ev-16)",
        f"  review: the checkpoint of {APPLIANCE} was signed after the signing key's "
        "certificate expired",
        "  review: bundles recorded in the logs shown during the period but not in the "
        "package: 1 (of other frameworks, or left out)",
    ]
