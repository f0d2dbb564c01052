"""Exports an auditor verifies offline, with nothing but the central public key.

- The *audit export* (``msp.audit-export.v1``, written by ``msp-agent audit
  export``) is an appliance's whole audit log: each entry's exact canonical
  bytes, the checkpoints the appliance signed, the certificates of the keys
  that signed them, the central server's receipts, the latest revocation list
  the appliance holds and the evidence bundles it still holds.
  :func:`check_audit_export` recomputes the tree in one pass, checks every
  signature and how the documents fit together, and names the first entry
  that is wrong.
- The *evidence export* (``msp.evidence-export.v1``) is one evidence bundle
  with its certificate and, once the central server has witnessed the log
  past the bundle's entry, the proof that the bundle existed at that position:
  the entry, an inclusion proof, the checkpoint and the server's receipt of it.

Neither export is signed as a whole; what is verified is the signed documents
it carries and how they fit together. Offline signatures are judged by log
position (revocation cutoffs, receipts), never by a wall clock: an expired
certificate is accepted and what its key signed after it expired is flagged
for review. ``msp-verify`` (:mod:`msp_protocol.verify_cli`) reads exports
from files; this module, like the rest of the package, does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import Field, StringConstraints

from msp_protocol.canonical import parse_json
from msp_protocol.delegation import (
    Revocation,
    RevocationList,
    VerifiedDelegation,
    check_delegation,
    check_revocations,
)
from msp_protocol.dsse import Envelope
from msp_protocol.encoding import (
    Hash,
    Identifier,
    Timestamp,
    b64decode,
    b64encode,
    format_time,
    from_hex,
    to_hex,
)
from msp_protocol.errors import (
    CheckpointError,
    EvidenceError,
    LogEntryError,
    MalformedError,
    ModelError,
    RevokedError,
    UnknownKeyError,
    UnsignedEntriesError,
    UsageError,
    VerificationError,
)
from msp_protocol.evidence import (
    EvidenceProof,
    VerifiedEvidence,
    check_evidence,
    check_evidence_in_log,
    recorded_evidence,
)
from msp_protocol.keys import VerifyKey
from msp_protocol.limits import DEFAULT_LIMITS, Limits
from msp_protocol.log import (
    EntryRecord,
    LogReplay,
    VerifiedCheckpoint,
    check_checkpoint,
    check_receipt,
)
from msp_protocol.model import WireModel
from msp_protocol.result import Failure, Result, raising

AUDIT_EXPORT_FORMAT: Final = "msp.audit-export.v1"
EVIDENCE_EXPORT_FORMAT: Final = "msp.evidence-export.v1"

# One entry's exact canonical bytes, base64 (standard alphabet, padded). The
# entry bound (Limits.max_entry_bytes) is checked on the decoded bytes; this
# only keeps a single string from being absurd.
EntryBase64 = Annotated[str, StringConstraints(strict=True, max_length=128 * 1024)]


# --- the audit export ----------------------------------------------------------


class AuditExport(WireModel):
    """An appliance's whole audit log and everything needed to verify it."""

    document_name = "audit export"

    format: Literal["msp.audit-export.v1"]
    appliance_id: Identifier
    exported_at: Timestamp  # the appliance's clock: metadata
    # entries[i] is entry i: index 0 (the genesis) to n - 1, in order.
    entries: tuple[EntryBase64, ...]
    # Every checkpoint the appliance kept, ascending size; at least the latest.
    checkpoints: Annotated[tuple[Envelope, ...], Field(min_length=1)]
    # The certificates of every key that signed a checkpoint or a bundle.
    certificates: Annotated[tuple[Envelope, ...], Field(min_length=1)]
    # The central server's cosignatures of some of the checkpoints.
    receipts: tuple[Envelope, ...]
    # The latest revocation list the appliance holds; absent (or null) if none.
    revocations: Envelope | None = None
    # Signed evidence bundles the appliance still holds, each recorded in the log.
    evidence: tuple[Envelope, ...]


@dataclass(frozen=True, slots=True)
class AuditExportReport:
    """What :func:`check_audit_export` found.

    ``checkpoints`` counts the checkpoints that verified; ``witnessed_size``
    is the largest size the central server cosigned (0: never synced);
    ``signed_after_expiry`` lists the sizes of checkpoints signed (by their
    own time) after every certificate of their key had expired: flagged for
    review, not a failure.

    On failure, ``problem`` is the first failure's message and
    ``first_bad_index`` the lowest entry index known to be wrong: the entry
    that does not parse at its position, the one entry a checkpoint covers
    beyond the last that matched when the roots differ, the first missing,
    unsigned or post-revocation entry, or else the first entry no valid
    checkpoint vouches for. None when no entry is proven at fault (a forged
    receipt, say). When a checkpoint's root does not match and it covers
    several entries beyond the last matching one, the export cannot tell
    which of them changed: ``bad_range`` is that block (first, last), and
    ``first_bad_index`` names an entry only if another check proves one.
    """

    appliance_id: str
    exported_at: datetime
    size: int
    checkpoints: int
    witnessed_size: int
    key_ids: tuple[str, ...]
    signed_after_expiry: tuple[int, ...]
    evidence: int
    first_bad_index: int | None = None
    problem: str | None = None
    bad_range: tuple[int, int] | None = None

    @property
    def verified(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "appliance_id": self.appliance_id,
            "exported_at": format_time(self.exported_at),
            "size": self.size,
            "checkpoints": self.checkpoints,
            "witnessed_size": self.witnessed_size,
            "key_ids": list(self.key_ids),
            "signed_after_expiry": list(self.signed_after_expiry),
            "evidence": self.evidence,
            "first_bad_index": self.first_bad_index,
            "bad_range": list(self.bad_range) if self.bad_range else None,
            "problem": self.problem,
        }


def build_audit_export(
    *,
    appliance_id: str,
    exported_at: datetime,
    entries: Iterable[bytes],
    checkpoints: Sequence[Envelope],
    certificates: Sequence[Envelope],
    receipts: Sequence[Envelope] = (),
    revocations: Envelope | None = None,
    evidence: Sequence[Envelope] = (),
) -> bytes:
    """The export's canonical JSON bytes (the appliance's side).

    ``entries`` are the exact stored bytes of entries 0..n-1 in order;
    ``checkpoints`` ascend by size and end with the latest. Nothing is
    verified here: :func:`check_audit_export` is the judge. Raises
    :class:`ModelError` for pieces of the wrong shape.
    """
    export = AuditExport.from_wire(
        {
            "format": AUDIT_EXPORT_FORMAT,
            "appliance_id": appliance_id,
            "exported_at": exported_at,
            "entries": [b64encode(raw) for raw in entries],
            "checkpoints": list(checkpoints),
            "certificates": list(certificates),
            "receipts": list(receipts),
            "revocations": revocations,
            "evidence": list(evidence),
        }
    )
    return export.canonical_bytes()


def export_value(data: bytes | dict[str, Any], limits: Limits) -> Any:
    """An export's JSON value: parsed strictly from bytes, within
    ``limits.max_export_bytes``, or an already-parsed object as it is."""
    if isinstance(data, bytes):
        return parse_json(data, limits=limits, max_bytes=limits.max_export_bytes)
    return data


def parse_audit_export(
    data: bytes | dict[str, Any], *, limits: Limits = DEFAULT_LIMITS
) -> AuditExport:
    """An audit export from its JSON bytes (parsed strictly, within
    ``limits.max_export_bytes``) or from an already-parsed object (whose size
    the caller bounded). Raises :class:`MalformedError`."""
    value = export_value(data, limits)
    export = AuditExport.from_wire(value)
    for name in ("entries", "checkpoints", "certificates", "receipts", "evidence"):
        count = len(getattr(export, name))
        if count > limits.max_export_entries:
            raise ModelError(f"audit export: {count} {name}, limit {limits.max_export_entries}")
    return export


def check_audit_export(
    data: bytes | dict[str, Any],
    central_keys: Sequence[VerifyKey],
    *,
    at: datetime,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[AuditExportReport]:
    """Verify an audit export with the central server's public key(s).

    ``at`` is the auditor's time; it only refuses certificates that are not
    valid yet. The result carries the report even when verification failed
    (``result.ok`` is False; the report names the first bad entry), except
    when the export does not parse at all.

    Steps, and what each stops:
    (1) the export parses strictly (format tag, duplicate keys, size and
        count bounds) — parser confusion, memory exhaustion;
    (2) every certificate is the central server's, for this appliance;
        expired ones are accepted (offline signing is judged by log
        position) — forged certificates, another appliance's keys;
    (3) the revocation list, if any, is the central server's — a forged list;
    (4) every checkpoint is signed by a certified key with the audit scope,
        names this appliance, sizes ascend, and none by a revoked key goes
        beyond its cutoff — forged or foreign checkpoints, a stolen key
        extending the log;
    (5) every receipt is the central server's cosignature of one of the
        checkpoints — a forged witness, a receipt for another log state;
    (6) every evidence bundle is signed by a certified key with the evidence
        scope, for this appliance and site, one per log position, within the
        entries and not beyond a revocation cutoff — forged, edited or
        replayed evidence;
    (7) one pass over the entries: each parses strictly at its position,
        entry 0 is this appliance's genesis, the tree root at each
        checkpoint's size is the signed root, and each bundle's entry records
        exactly its signed bytes — changed, removed, inserted or reordered
        entries; evidence never logged, or logged elsewhere;
    (8) the checkpoints end exactly at the last entry: none covers more — a
        truncated tail; the last covers all — an unsigned tail appended
        behind the signer's back.
    """
    if not central_keys:
        raise UsageError("verifying an export needs at least one central key")
    try:
        export = parse_audit_export(data, limits=limits)  # (1)
    except MalformedError as exc:
        return Result.failure(exc)
    return _AuditCheck(export, central_keys, at, limits).run()


verify_audit_export = raising(check_audit_export)


class _AuditCheck:
    """The steps of :func:`check_audit_export` over one parsed export."""

    def __init__(
        self, export: AuditExport, central_keys: Sequence[VerifyKey], at: datetime, limits: Limits
    ) -> None:
        self.export = export
        self.central_keys = list(central_keys)
        self.at = at
        self.limits = limits
        self.size = len(export.entries)
        self.failures: list[Failure] = []
        self.bad_indices: list[int] = []
        self.certificates: dict[str, list[VerifiedDelegation]] = {}  # by key id
        # Key id -> the certificate its signatures are checked under (a
        # renewal keeps the key: the latest-expiring of its certificates).
        self.delegations: dict[str, VerifiedDelegation] = {}
        # Key id -> (cutoff size, serial): the lowest cutoff of any revoked
        # certificate of the key (the server revokes a key's serials together).
        self.cutoffs: dict[str, tuple[int, str]] = {}
        self.signed: dict[int, VerifiedCheckpoint] = {}  # by size
        self.valid: set[int] = set()  # sizes of signed checkpoints within their cutoff
        self.checkpoint_failed = False
        # The block of entries a mismatching checkpoint covers past the last
        # match: one of them changed, which one the export cannot tell.
        self.bad_range: tuple[int, int] | None = None
        self.beyond: list[int] = []  # sizes of signed checkpoints beyond the entries
        self.key_ids: dict[str, None] = {}  # in order of first use
        self.after_expiry: list[int] = []
        self.evidence_at: dict[int, VerifiedEvidence] = {}  # by log index
        self.evidence_unrecorded = 0  # verified bundles whose entry does not record them
        self.witnessed = 0

    def fail(self, failure: Failure, index: int | None = None, *, where: str = "") -> None:
        self.failures.append(type(failure)(f"{where}: {failure}") if where else failure)
        if index is not None:
            self.bad_indices.append(index)

    def run(self) -> Result[AuditExportReport]:
        self.check_certificates()  # (2)
        self.check_revocations()  # (3)
        self.check_checkpoints()  # (4)
        self.check_receipts()  # (5)
        self.check_evidence()  # (6)
        matched = self.replay()  # (7) (8)
        return self.report(matched)

    def check_certificates(self) -> None:
        for i, envelope in enumerate(self.export.certificates):
            checked = check_delegation(
                envelope,
                roots=self.central_keys,
                at=self.at,
                appliance_id=self.export.appliance_id,
                allow_expired=True,
                limits=self.limits,
            )
            for failure in checked.failures:
                self.fail(failure, where=f"certificates[{i}]")
            if checked.ok:
                delegation = checked.unwrap()
                self.certificates.setdefault(delegation.certificate.subject_key_id, []).append(
                    delegation
                )
        for key_id, held in self.certificates.items():
            self.delegations[key_id] = max(held, key=lambda d: d.certificate.not_after)

    def check_revocations(self) -> None:
        if self.export.revocations is None:
            return
        checked = check_revocations(
            self.export.revocations, roots=self.central_keys, limits=self.limits
        )
        for failure in checked.failures:
            self.fail(failure, where="revocations")
        if not checked.ok:
            return
        self.cutoffs = revocation_cutoffs(self.certificates, checked.unwrap().revocations)

    def check_checkpoints(self) -> None:
        unknown: dict[str, list[int]] = {}
        previous = 0
        for i, envelope in enumerate(self.export.checkpoints):
            key_id = envelope.signatures[0].keyid
            delegation = self.delegations.get(key_id)
            if delegation is None:
                unknown.setdefault(key_id, []).append(i)
                continue
            checked = check_checkpoint(envelope, delegation=delegation, limits=self.limits)
            if not checked.ok:
                self.checkpoint_failed = True
                for failure in checked.failures:
                    self.fail(failure, where=f"checkpoints[{i}]")
                continue
            verified = checked.unwrap()
            size = verified.checkpoint.size
            if size == 0:
                self.checkpoint_failed = True
                self.fail(
                    CheckpointError(f"checkpoints[{i}]: a checkpoint of size 0 covers nothing")
                )
                continue
            if size <= previous:
                self.checkpoint_failed = True
                self.fail(
                    CheckpointError(
                        f"checkpoints[{i}]: size {size} after size {previous}: "
                        "checkpoints must ascend"
                    )
                )
                continue
            previous = size
            if size > self.size:
                # Judged after the replay: a removed or reordered entry
                # earlier on is the cause, and the one to name.
                self.checkpoint_failed = True
                self.beyond.append(size)
                continue
            self.signed[size] = verified
            self.key_ids.setdefault(key_id, None)
            cutoff = self.cutoffs.get(key_id)
            if cutoff is not None and size > cutoff[0]:
                self.fail(
                    RevokedError(
                        f"checkpoint of size {size} is signed by key {key_id}, whose "
                        f"certificate {cutoff[1]} is revoked beyond size {cutoff[0]}"
                    ),
                    cutoff[0],
                )
            else:
                self.valid.add(size)
            expiry = max(d.certificate.not_after for d in self.certificates[key_id])
            if verified.checkpoint.ts > expiry + self.limits.clock_skew:
                self.after_expiry.append(size)
        for key_id, positions in unknown.items():
            self.checkpoint_failed = True
            listed = ", ".join(f"checkpoints[{i}]" for i in positions[:3])
            more = f" and {len(positions) - 3} more" if len(positions) > 3 else ""
            self.fail(
                UnknownKeyError(
                    f"{listed}{more} signed by key {key_id}, which has no verified "
                    "certificate in the export"
                )
            )

    def check_receipts(self) -> None:
        for i, envelope in enumerate(self.export.receipts):
            checked = check_receipt(envelope, roots=self.central_keys, limits=self.limits)
            if not checked.ok:
                for failure in checked.failures:
                    self.fail(failure, where=f"receipts[{i}]")
                continue
            size = checked.unwrap().receipt.size
            checkpoint = self.signed.get(size)
            if checkpoint is None and self.checkpoint_failed:
                continue  # perhaps it cosigns one that failed: that failure is reported
            if checkpoint is None:
                self.fail(
                    CheckpointError(
                        f"receipts[{i}]: receipt for size {size} cosigns none of the "
                        "export's verified checkpoints"
                    )
                )
                continue
            bound = check_receipt(
                envelope, roots=self.central_keys, checkpoint=checkpoint, limits=self.limits
            )
            for failure in bound.failures:
                self.fail(failure, where=f"receipts[{i}]")
            if bound.ok:
                self.witnessed = max(self.witnessed, size)

    def check_evidence(self) -> None:
        bundle_ids: set[str] = set()
        for i, envelope in enumerate(self.export.evidence):
            key_id = envelope.signatures[0].keyid
            delegation = self.delegations.get(key_id)
            if delegation is None:
                self.fail(
                    UnknownKeyError(
                        f"evidence[{i}]: signed by key {key_id}, which has no verified "
                        "certificate in the export"
                    )
                )
                continue
            checked = check_evidence(envelope, delegation=delegation, limits=self.limits)
            if not checked.ok:
                for failure in checked.failures:
                    self.fail(failure, where=f"evidence[{i}]")
                continue
            evidence = checked.unwrap()
            bundle = evidence.bundle
            where = f"evidence[{i}] (bundle {bundle.bundle_id})"
            if bundle.bundle_id in bundle_ids:
                self.fail(EvidenceError(f"{where}: the bundle appears twice"))
                continue
            if bundle.log_index in self.evidence_at:
                self.fail(
                    EvidenceError(f"{where}: log index {bundle.log_index} records another bundle"),
                    bundle.log_index,
                )
                continue
            if bundle.log_index >= self.size:
                self.fail(
                    EvidenceError(
                        f"{where}: recorded at log index {bundle.log_index}, beyond the "
                        f"{self.size} entries exported"
                    )
                )
                continue
            cutoff = self.cutoffs.get(key_id)
            if cutoff is not None and bundle.log_index >= cutoff[0]:
                self.fail(
                    RevokedError(
                        f"{where}: at log index {bundle.log_index}, signed by key {key_id}, "
                        f"whose certificate {cutoff[1]} is revoked beyond size {cutoff[0]}"
                    ),
                    bundle.log_index,
                )
                continue
            bundle_ids.add(bundle.bundle_id)
            self.evidence_at[bundle.log_index] = evidence
            self.key_ids.setdefault(key_id, None)

    def replay(self) -> int:
        """Steps (7) and (8); returns the size up to which entries match
        every signed checkpoint (the whole log when nothing is wrong)."""
        if not self.export.entries:
            self.fail(LogEntryError("the export holds no entries: entry 0 must be the genesis"), 0)
            return 0
        targets = iter(sorted(self.signed.items()))
        target = next(targets, None)
        replay = LogReplay(appliance_id=self.export.appliance_id, limits=self.limits)
        evidence_at = self.evidence_at
        matched = 0
        try:
            for index, text in enumerate(self.export.entries):
                record = replay.add(b64decode(text, what=f"entry {index}"))
                evidence = evidence_at.get(index)
                if evidence is not None:
                    self.check_recorded(evidence, record)
                if target is not None and target[0] == index + 1:
                    if target[1].checkpoint.root_bytes != replay.root():
                        self.bad_range = (matched, index)
                        self.fail(
                            CheckpointError(
                                f"entry {index} does not match the checkpoint of size "
                                f"{index + 1}: it was changed"
                                if matched == index
                                else f"entries {matched}..{index} do not match the checkpoint "
                                f"of size {index + 1}: one of them was changed"
                            ),
                            matched if matched == index else None,
                        )
                        return matched
                    matched = index + 1
                    target = next(targets, None)
        except (MalformedError, VerificationError) as exc:
            self.fail(exc, replay.size)
            return matched
        if self.beyond:  # (8)
            missing = self.beyond[0] - self.size
            self.fail(
                CheckpointError(
                    f"checkpoint of size {self.beyond[0]} covers more than the {self.size} "
                    f"entries exported: the last {missing} entries were removed"
                ),
                self.size,
            )
        elif not self.checkpoint_failed and matched < self.size:
            self.fail(
                UnsignedEntriesError(
                    f"entries {matched}..{self.size - 1} are not covered by any checkpoint: "
                    "they were added after the last signature"
                ),
                matched,
            )
        return matched

    def check_recorded(self, evidence: VerifiedEvidence, record: EntryRecord) -> None:
        bundle = evidence.bundle
        try:
            data = recorded_evidence(record.entry)
        except EvidenceError as exc:
            self.fail(exc, bundle.log_index, where=f"evidence bundle {bundle.bundle_id}")
            self.evidence_unrecorded += 1
            return
        if data.bundle_id != bundle.bundle_id or data.payload_sha256 != evidence.digest:
            self.fail(
                EvidenceError(
                    f"evidence bundle {bundle.bundle_id}: log entry {bundle.log_index} "
                    "records another bundle"
                ),
                bundle.log_index,
            )
            self.evidence_unrecorded += 1

    def report(self, matched: int) -> Result[AuditExportReport]:
        first_bad: int | None = None
        if self.bad_indices:
            first_bad = min(self.bad_indices)
        elif self.failures and self.bad_range is None:
            covered = max((size for size in self.valid if size <= matched), default=0)
            first_bad = covered if covered < self.size else None
        report = AuditExportReport(
            appliance_id=self.export.appliance_id,
            exported_at=self.export.exported_at,
            size=self.size,
            checkpoints=len(self.valid),
            witnessed_size=self.witnessed,
            key_ids=tuple(self.key_ids),
            signed_after_expiry=tuple(self.after_expiry),
            evidence=len(self.evidence_at) - self.evidence_unrecorded,
            first_bad_index=first_bad,
            problem=self.failures[0].message if self.failures else None,
            bad_range=self.bad_range if first_bad is None else None,
        )
        # The report travels with the failures: it is what names the first
        # bad entry (Result.unwrap still raises the first failure).
        return Result(report, tuple(self.failures))


# --- the evidence export -------------------------------------------------------


class EvidenceLogProof(WireModel):
    """Where a bundle sits in the witnessed log."""

    document_name = "evidence log proof"

    entry: EntryBase64  # the bundle's evidence.signed entry, exact bytes
    inclusion: Annotated[tuple[Hash, ...], Field(max_length=63)]  # leaf-side first
    checkpoint: Envelope  # of the size the inclusion proof leads to
    receipt: Envelope  # the central server's cosignature of that checkpoint
    # The certificate of the key that signed the checkpoint, when it is not
    # the bundle's key (the appliance rotated its key in between).
    checkpoint_certificate: Envelope | None = None


class EvidenceExport(WireModel):
    document_name = "evidence export"

    format: Literal["msp.evidence-export.v1"]
    evidence: Envelope
    certificate: Envelope
    log: EvidenceLogProof | None = None


@dataclass(frozen=True, slots=True)
class EvidenceExportReport:
    """What :func:`check_evidence_export` verified.

    ``proven_in_log`` is False when the export has no log proof: the bundle's
    signature and certificate hold, but nothing yet shows the bundle existed
    at its log position in a log the central server witnessed.
    ``signed_after_expiry`` is set when the bundle's own time is past its
    certificate's expiry: flagged for review, not a failure.
    """

    bundle_id: str
    appliance_id: str
    site_id: str
    check_id: str
    result: str
    controls: dict[str, tuple[str, ...]]
    collected_at: datetime
    log_index: int
    key_id: str
    certificate_serial: str
    signed_after_expiry: bool
    proven_in_log: bool
    witnessed_size: int | None = None
    witnessed_at: datetime | None = None
    checkpoint_key_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "bundle_id": self.bundle_id,
            "appliance_id": self.appliance_id,
            "site_id": self.site_id,
            "check_id": self.check_id,
            "result": self.result,
            "controls": {name: list(ids) for name, ids in self.controls.items()},
            "collected_at": format_time(self.collected_at),
            "log_index": self.log_index,
            "key_id": self.key_id,
            "certificate_serial": self.certificate_serial,
            "signed_after_expiry": self.signed_after_expiry,
            "proven_in_log": self.proven_in_log,
            "witnessed_size": self.witnessed_size,
            "witnessed_at": (
                format_time(self.witnessed_at) if self.witnessed_at is not None else None
            ),
            "checkpoint_key_id": self.checkpoint_key_id,
        }


def build_evidence_export(
    *,
    evidence: Envelope,
    certificate: Envelope,
    entry: bytes | None = None,
    inclusion: Sequence[bytes] | None = None,
    checkpoint: Envelope | None = None,
    receipt: Envelope | None = None,
    checkpoint_certificate: Envelope | None = None,
) -> bytes:
    """The export's canonical JSON bytes (the appliance's side).

    The log part (``entry``, ``inclusion``, ``checkpoint``, ``receipt``) is
    all or nothing: the bundle's entry bytes, the inclusion proof of its
    ``log_index`` in the tree of the receipt's size, the checkpoint of that
    size and the central server's receipt of it; ``checkpoint_certificate``
    only when another key than the bundle's signed that checkpoint. Raises
    :class:`UsageError` for a partial log part.
    """
    parts = (entry, inclusion, checkpoint, receipt)
    if any(part is None for part in parts) and any(part is not None for part in parts):
        raise UsageError(
            "an evidence export's log part needs entry, inclusion, checkpoint and receipt"
        )
    if checkpoint_certificate is not None and checkpoint is None:
        raise UsageError("a checkpoint certificate without a checkpoint")
    value: dict[str, Any] = {
        "format": EVIDENCE_EXPORT_FORMAT,
        "evidence": evidence,
        "certificate": certificate,
    }
    if entry is not None and inclusion is not None:
        value["log"] = {
            "entry": b64encode(entry),
            "inclusion": [to_hex(node) for node in inclusion],
            "checkpoint": checkpoint,
            "receipt": receipt,
            "checkpoint_certificate": checkpoint_certificate,
        }
    return EvidenceExport.from_wire(value).canonical_bytes()


def parse_evidence_export(
    data: bytes | dict[str, Any], *, limits: Limits = DEFAULT_LIMITS
) -> EvidenceExport:
    """An evidence export from its JSON bytes (strictly parsed) or an
    already-parsed object. Raises :class:`MalformedError`."""
    value = parse_json(data, limits=limits) if isinstance(data, bytes) else data
    return EvidenceExport.from_wire(value)


def check_evidence_export(
    data: bytes | dict[str, Any],
    central_keys: Sequence[VerifyKey],
    *,
    at: datetime,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[EvidenceExportReport]:
    """Verify an evidence export with the central server's public key(s).

    ``at`` is the auditor's time; it only refuses certificates that are not
    valid yet (an expired one is accepted and a bundle dated after its expiry
    flagged).

    Steps, and what each stops:
    (1) the export parses strictly (format tag, duplicate keys, bounds) —
        parser confusion;
    (2) the certificate is the central server's — a forged certificate;
    (3) the bundle is signed by the certified key with the evidence scope, for
        the certificate's appliance and site — forged or edited evidence,
        another site's evidence;
    (4) with a log part: the receipt is the central server's, the entry at the
        bundle's ``log_index`` records exactly this bundle's signed bytes, and
        it is included in the tree the receipt covers — evidence that was
        never logged, or logged elsewhere;
    (5) with a log part: the checkpoint is signed by a certified key of the
        same appliance with the audit scope, and the receipt cosigns exactly
        that checkpoint — a proof against a log state nobody signed.
    """
    if not central_keys:
        raise UsageError("verifying an export needs at least one central key")
    try:
        export = parse_evidence_export(data, limits=limits)  # (1)
        log_entry = (
            b64decode(export.log.entry, what="log entry") if export.log is not None else None
        )
    except MalformedError as exc:
        return Result.failure(exc)
    certified = check_delegation(
        export.certificate, roots=central_keys, at=at, allow_expired=True, limits=limits
    )  # (2)
    if not certified.ok:
        return Result(None, _located("certificate", certified.failures))
    delegation = certified.unwrap()
    certificate = delegation.certificate
    checked = check_evidence(export.evidence, delegation=delegation, limits=limits)  # (3)
    if not checked.ok:
        return Result(None, _located("evidence", checked.failures))
    evidence = checked.unwrap()
    bundle = evidence.bundle
    report = EvidenceExportReport(
        bundle_id=bundle.bundle_id,
        appliance_id=bundle.appliance_id,
        site_id=bundle.site_id,
        check_id=bundle.check_id,
        result=bundle.result,
        controls=dict(bundle.controls),
        collected_at=bundle.collected_at,
        log_index=bundle.log_index,
        key_id=certificate.subject_key_id,
        certificate_serial=certificate.serial,
        signed_after_expiry=bundle.collected_at > certificate.not_after + limits.clock_skew,
        proven_in_log=False,
    )
    if export.log is None or log_entry is None:
        return Result.success(report)

    proof = export.log
    try:
        inclusion = [
            from_hex(node, length=32, what="inclusion proof hash") for node in proof.inclusion
        ]
    except MalformedError as exc:
        return Result.failure(exc)
    included = check_evidence_in_log(
        evidence,
        EvidenceProof(entry=log_entry, inclusion=inclusion, receipt=proof.receipt),
        roots=central_keys,
        limits=limits,
    )  # (4)
    if not included.ok:
        return Result(None, _located("log proof", included.failures))
    receipt = included.unwrap().receipt

    signer = proof.checkpoint.signatures[0].keyid  # (5)
    if signer == certificate.subject_key_id:
        checkpoint_delegation = delegation
    elif proof.checkpoint_certificate is not None:
        other = check_delegation(
            proof.checkpoint_certificate,
            roots=central_keys,
            at=at,
            appliance_id=bundle.appliance_id,
            subject_key_id=signer,
            allow_expired=True,
            limits=limits,
        )
        if not other.ok:
            return Result(None, _located("checkpoint certificate", other.failures))
        checkpoint_delegation = other.unwrap()
    else:
        return Result.failure(
            UnknownKeyError(
                f"checkpoint is signed by key {signer}, and the export holds no certificate for it"
            )
        )
    signed = check_checkpoint(proof.checkpoint, delegation=checkpoint_delegation, limits=limits)
    if not signed.ok:
        return Result(None, _located("checkpoint", signed.failures))
    cosigned = check_receipt(
        proof.receipt, roots=central_keys, checkpoint=signed.unwrap(), limits=limits
    )
    if not cosigned.ok:
        return Result(None, _located("receipt", cosigned.failures))
    return Result.success(
        replace(
            report,
            proven_in_log=True,
            witnessed_size=receipt.size,
            witnessed_at=receipt.witnessed_at,
            checkpoint_key_id=signer,
        )
    )


verify_evidence_export = raising(check_evidence_export)


def revocation_cutoffs(
    certificates: Mapping[str, Iterable[VerifiedDelegation]], revocations: RevocationList
) -> dict[str, tuple[int, str]]:
    """Key id -> (cutoff size, serial) for every key with a revoked
    certificate among ``certificates`` (verified ones, by key id): the lowest
    cutoff of any of its certificates, since the server revokes a key's
    serials together."""
    # One index for all lookups: RevocationList.find rebuilds it per call.
    revoked: dict[str, Revocation] = {entry.serial: entry for entry in revocations.revoked}
    cutoffs: dict[str, tuple[int, str]] = {}
    for key_id, held in certificates.items():
        found = [
            (revocation.cutoff_size, revocation.serial)
            for delegation in held
            if (revocation := revoked.get(delegation.certificate.serial)) is not None
        ]
        if found:
            cutoffs[key_id] = min(found)
    return cutoffs


def _located(where: str, failures: Iterable[Failure]) -> tuple[Failure, ...]:
    return tuple(type(failure)(f"{where}: {failure}") for failure in failures)


__all__ = [
    "AUDIT_EXPORT_FORMAT",
    "EVIDENCE_EXPORT_FORMAT",
    "AuditExport",
    "AuditExportReport",
    "EvidenceExport",
    "EvidenceExportReport",
    "EvidenceLogProof",
    "build_audit_export",
    "build_evidence_export",
    "check_audit_export",
    "check_evidence_export",
    "export_value",
    "parse_audit_export",
    "parse_evidence_export",
    "revocation_cutoffs",
    "verify_audit_export",
    "verify_evidence_export",
]
