"""The auditor package: a site's signed evidence for some frameworks over a period.

An auditor asks for "the evidence for HIPAA at this site for last quarter";
the central server answers with one file (``msp.auditor-package.v1``) that
anyone verifies offline with the central public key:

- ``logs``: for each appliance with a bundle in the package, a *segment* of
  its audit log: the compact range of the tree before the first entry shown
  (``prefix``), the exact bytes of the entries from ``start`` on, the
  appliance's checkpoint of the segment's end, the central server's receipt
  of that checkpoint, and the certificates of the keys that signed;
- ``evidence``: every bundle of the site in the period that lists one of the
  frameworks, ordered by appliance and log index, each recorded by an
  ``evidence.signed`` entry inside its appliance's segment;
- ``revocations``: the central server's latest revocation list;
- ``summary``: per control, the state the server derives from those bundles
  (:func:`summarise_evidence`, the one rule the server and the checker share).

An appliance whose log was lost and replaced by a new one (with a partner's
approval) has *generations* of its log, each beginning at index 0: a package
whose period spans the switch holds one segment per generation of that
appliance, each marked with its ``generation`` (absent means 1, so a package
without a switch is exactly as before), and each bundle is proven in the
segment of its appliance whose entry at its log index records it. Evidence
is then ordered by appliance, generation and log index.

The package is not signed as a whole. :func:`check_auditor_package` verifies
each signed document and how they fit together, recomputes every segment's
root from its prefix and entries, and recomputes the summary from the bundles
that verified. What it cannot see is a bundle the server left out; it counts,
for review, the ``evidence.signed`` entries of the period inside a segment
whose bundle is not in the package (a bundle of another framework is one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Final, Literal, Self

from pydantic import Field, StrictInt, model_validator

from msp_protocol.delegation import VerifiedDelegation, check_delegation, check_revocations
from msp_protocol.dsse import Envelope, unverified_payload
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
    MalformedError,
    ModelError,
    RevokedError,
    SubjectError,
    SummaryError,
    UnknownKeyError,
    UnsignedEntriesError,
    UsageError,
    VerificationError,
)
from msp_protocol.evidence import (
    EVIDENCE_ENTRY_KIND,
    EvidenceBundle,
    EvidenceEntryData,
    FrameworkId,
    check_evidence,
    recorded_evidence,
)
from msp_protocol.export import EntryBase64, export_value, revocation_cutoffs
from msp_protocol.keys import VerifyKey
from msp_protocol.limits import DEFAULT_LIMITS, Limits
from msp_protocol.log import LogReplay, Size, check_checkpoint, check_receipt
from msp_protocol.merkle import TreeState
from msp_protocol.model import WireModel
from msp_protocol.result import Failure, Result, raising
from msp_protocol.summary import (
    ControlState,
    ControlSummary,
    LatestEvidence,
    PackageSummary,
    ResultCounts,
    control_difference,
    summarise_evidence,
)

AUDITOR_PACKAGE_FORMAT: Final = "msp.auditor-package.v1"

# --- the format ----------------------------------------------------------------


class LogSegment(WireModel):
    """Entries ``start`` .. ``start + len(entries) - 1`` of one appliance's log."""

    document_name = "log segment"

    appliance_id: Identifier
    # Which generation of the appliance's log (a new log approved after the
    # old one was lost starts the next); absent: 1, the first.
    generation: Annotated[StrictInt, Field(ge=2, le=2**31 - 1)] | None = None
    start: Size
    # The compact range of the tree of size ``start`` (largest subtree first).
    prefix: Annotated[tuple[Hash, ...], Field(max_length=63)]
    entries: Annotated[tuple[EntryBase64, ...], Field(min_length=1)]
    checkpoint: Envelope  # of size start + len(entries)
    receipt: Envelope  # the central server's cosignature of that checkpoint
    certificates: Annotated[tuple[Envelope, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _prefix_fits_start(self) -> Self:
        if len(self.prefix) != self.start.bit_count():
            raise ValueError(
                f"the prefix of a tree of size {self.start} has {self.start.bit_count()} "
                f"subtree roots, got {len(self.prefix)}"
            )
        return self

    @property
    def end(self) -> int:
        return self.start + len(self.entries)

    @property
    def log_generation(self) -> int:
        return self.generation or 1


class AuditorPackage(WireModel):
    document_name = "auditor package"

    format: Literal["msp.auditor-package.v1"]
    site_id: Identifier
    frameworks: Annotated[tuple[FrameworkId, ...], Field(min_length=1, max_length=64)]
    period_start: Timestamp  # bundles with period_start <= collected_at < period_end
    period_end: Timestamp
    generated_at: Timestamp  # the server's clock: metadata
    logs: tuple[LogSegment, ...]
    evidence: tuple[Envelope, ...]
    revocations: Envelope | None = None
    summary: PackageSummary

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if list(self.frameworks) != sorted(set(self.frameworks)):
            raise ValueError("frameworks must be sorted and unique")
        if self.period_end <= self.period_start:
            raise ValueError("period_end must be later than period_start")
        logs = [(segment.appliance_id, segment.log_generation) for segment in self.logs]
        if len(set(logs)) != len(logs):
            raise ValueError("an appliance has two log segments of one generation")
        scope = set(self.frameworks)
        for control in self.summary.controls:
            if control.framework not in scope:
                raise ValueError(f"summary lists framework {control.framework}, not in scope")
        return self


# --- building ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogSegmentParts:
    """One appliance's segment, as the server holds it: ``prefix`` is the
    compact range of the tree of size ``start`` (raw 32-byte hashes, largest
    subtree first), ``entries`` the exact stored bytes from ``start`` on."""

    appliance_id: str
    start: int
    prefix: Sequence[bytes]
    entries: Sequence[bytes]
    checkpoint: Envelope
    receipt: Envelope
    certificates: Sequence[Envelope]
    generation: int = 1  # of the appliance's log


def build_auditor_package(
    *,
    site_id: str,
    frameworks: Sequence[str],
    period_start: datetime,
    period_end: datetime,
    generated_at: datetime,
    logs: Sequence[LogSegmentParts],
    evidence: Sequence[Envelope],
    revocations: Envelope | None,
    summary: PackageSummary | dict[str, Any],
) -> bytes:
    """The package's canonical JSON bytes (the central server's side).

    ``frameworks`` sorted and unique; ``evidence`` ordered by (appliance_id,
    generation, log_index), each recorded inside the segment of its
    appliance's log of that generation; the checkpoint
    of each segment of size ``start + len(entries)``, and the receipt of
    exactly it; ``summary`` from :func:`summarise_evidence` over the
    bundles, listing every in-scope control a bundle lists. Nothing is
    verified here: :func:`check_auditor_package` is the judge. Raises
    :class:`ModelError` for pieces of the wrong shape.
    """
    package = AuditorPackage.from_wire(
        {
            "format": AUDITOR_PACKAGE_FORMAT,
            "site_id": site_id,
            "frameworks": list(frameworks),
            "period_start": period_start,
            "period_end": period_end,
            "generated_at": generated_at,
            "logs": [
                {
                    "appliance_id": parts.appliance_id,
                    "generation": parts.generation if parts.generation != 1 else None,
                    "start": parts.start,
                    "prefix": [to_hex(node) for node in parts.prefix],
                    "entries": [b64encode(raw) for raw in parts.entries],
                    "checkpoint": parts.checkpoint,
                    "receipt": parts.receipt,
                    "certificates": list(parts.certificates),
                }
                for parts in logs
            ],
            "evidence": list(evidence),
            "revocations": revocations,
            "summary": summary,
        }
    )
    return package.canonical_bytes()


def parse_auditor_package(
    data: bytes | dict[str, Any], *, limits: Limits = DEFAULT_LIMITS
) -> AuditorPackage:
    """A package from its JSON bytes (parsed strictly, within
    ``limits.max_export_bytes``) or an already-parsed object (whose size the
    caller bounded). Raises :class:`MalformedError`."""
    value = export_value(data, limits)
    package = AuditorPackage.from_wire(value)
    if len(package.logs) > limits.max_package_appliances:
        raise ModelError(
            f"auditor package: {len(package.logs)} log segments, "
            f"limit {limits.max_package_appliances}"
        )
    counted = {
        "entries": sum(len(segment.entries) for segment in package.logs),
        "certificates": sum(len(segment.certificates) for segment in package.logs),
        "evidence bundles": len(package.evidence),
        "summary controls": len(package.summary.controls),
    }
    for name, count in counted.items():
        if count > limits.max_export_entries:
            raise ModelError(f"auditor package: {count} {name}, limit {limits.max_export_entries}")
    return package


# --- the report ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentReport:
    """One appliance's segment: entries ``start`` .. ``size - 1`` verified
    against the checkpoint of ``size`` the central server cosigned at
    ``witnessed_at`` (None when the segment did not verify).
    ``omitted_bundles`` counts its ``evidence.signed`` entries of the period
    whose bundle is not in the package: for review (another framework's
    bundle is one), not a failure."""

    appliance_id: str
    start: int
    size: int
    key_ids: tuple[str, ...]
    witnessed_at: datetime | None
    bundles: int
    omitted_bundles: int
    checkpoint_signed_after_expiry: bool
    generation: int = 1  # of the appliance's log

    def as_dict(self) -> dict[str, Any]:
        return {
            "appliance_id": self.appliance_id,
            "generation": self.generation,
            "start": self.start,
            "size": self.size,
            "key_ids": list(self.key_ids),
            "witnessed_at": format_time(self.witnessed_at) if self.witnessed_at else None,
            "bundles": self.bundles,
            "omitted_bundles": self.omitted_bundles,
            "checkpoint_signed_after_expiry": self.checkpoint_signed_after_expiry,
        }


@dataclass(frozen=True, slots=True)
class AuditorPackageReport:
    """What :func:`check_auditor_package` found.

    ``bundles`` counts the bundles that verified (signed, in scope, recorded
    in a witnessed segment). ``signed_after_expiry`` lists the ids of bundles
    collected after their key's certificates expired: flagged for review,
    not a failure. ``summary_verified`` is True when the summary was
    recomputed from the bundles and matched (it is not compared once a
    bundle or a segment failed). ``states`` counts the summary's controls by
    state, ``controls`` is the summary itself, and ``unwitnessed_bundles``
    the server's unverifiable count of bundles it cannot prove yet.
    ``problem`` is the first failure's message, naming where it is.
    """

    site_id: str
    frameworks: tuple[str, ...]
    period_start: datetime
    period_end: datetime
    generated_at: datetime
    segments: tuple[SegmentReport, ...]
    bundles: int
    signed_after_expiry: tuple[str, ...]
    omitted_bundles: int
    summary_verified: bool
    states: dict[str, int]
    controls: tuple[ControlSummary, ...]
    unwitnessed_bundles: int
    problem: str | None = None

    @property
    def verified(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "site_id": self.site_id,
            "frameworks": list(self.frameworks),
            "period_start": format_time(self.period_start),
            "period_end": format_time(self.period_end),
            "generated_at": format_time(self.generated_at),
            "segments": [segment.as_dict() for segment in self.segments],
            "bundles": self.bundles,
            "signed_after_expiry": list(self.signed_after_expiry),
            "omitted_bundles": self.omitted_bundles,
            "summary_verified": self.summary_verified,
            "states": dict(self.states),
            "controls": [control.to_wire() for control in self.controls],
            "unwitnessed_bundles": self.unwitnessed_bundles,
            "problem": self.problem,
        }


# --- checking ------------------------------------------------------------------


def check_auditor_package(
    data: bytes | dict[str, Any],
    central_keys: Sequence[VerifyKey],
    *,
    at: datetime,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[AuditorPackageReport]:
    """Verify an auditor package with the central server's public key(s).

    ``at`` is the auditor's time; it only refuses certificates that are not
    valid yet. The result carries the report even when verification failed,
    except when the package does not parse at all.

    Steps, and what each stops:
    (1) the package parses strictly (format tag, duplicate keys, size and
        count bounds, each prefix the shape of a compact range) — parser
        confusion, memory exhaustion;
    (2) every certificate is the central server's, for its segment's
        appliance and the package's site; expired ones are accepted
        (offline signing is judged by log position) — forged certificates,
        another site's appliances;
    (3) the revocation list, if any, is the central server's, and its
        cutoffs apply to checkpoints and bundles — a forged list, a stolen
        key used after revocation;
    (4) each segment replays from its prefix at ``start`` (index 0 is the
        appliance's genesis), its root at the end is the root of the
        appliance's checkpoint of exactly that size, signed by a certified
        key with the audit scope, and the receipt is the central server's
        cosignature of exactly that checkpoint — a changed, removed or
        reordered entry or prefix node, a truncated tail, a forged witness;
    (5) each bundle is signed by a certified key with the evidence scope, is
        of the site, collected in the period, lists a framework in scope,
        appears once, in order, and is recorded at its log index inside its
        appliance's verified segment by an entry holding the digest of its
        exact signed bytes — forged, edited, out-of-scope or unlogged
        evidence, one bundle counted twice;
    (6) once everything else verified, the summary equals the one
        recomputed with :func:`summarise_evidence` from the bundles, and
        lists every in-scope control they give evidence for — a summary
        that flatters, or hides a failing control;
    (7) ``evidence.signed`` entries of the period inside a segment whose
        bundle is not in the package are counted for review — a bundle left
        out (the package cannot show one left out beyond its segments).
    """
    if not central_keys:
        raise UsageError("verifying an auditor package needs at least one central key")
    try:
        package = parse_auditor_package(data, limits=limits)  # (1)
    except MalformedError as exc:
        return Result.failure(exc)
    return _PackageCheck(package, central_keys, at, limits).run()


verify_auditor_package = raising(check_auditor_package)


@dataclass
class _Segment:
    """What the check learns about one segment."""

    where: str
    model: LogSegment
    delegations: dict[str, VerifiedDelegation] = field(default_factory=dict)  # by key id
    expiry: dict[str, datetime] = field(default_factory=dict)  # latest not_after by key id
    held: dict[str, list[VerifiedDelegation]] = field(default_factory=dict)
    cutoffs: dict[str, tuple[int, str]] = field(default_factory=dict)
    key_ids: set[str] = field(default_factory=set)  # those that signed something
    verified: bool = False
    witnessed_at: datetime | None = None
    after_expiry: bool = False
    # Log index -> what its evidence.signed entry records (or why it records
    # nothing), and the entry's time.
    recorded: dict[int, EvidenceEntryData | str] = field(default_factory=dict)
    recorded_ts: dict[int, datetime] = field(default_factory=dict)
    bundle_indices: set[int] = field(default_factory=set)


class _PackageCheck:
    """The steps of :func:`check_auditor_package` over one parsed package."""

    def __init__(
        self,
        package: AuditorPackage,
        central_keys: Sequence[VerifyKey],
        at: datetime,
        limits: Limits,
    ) -> None:
        self.package = package
        self.central_keys = list(central_keys)
        self.at = at
        self.limits = limits
        self.failures: list[Failure] = []
        self.segments = {
            (segment.appliance_id, segment.log_generation): _Segment(
                f"logs[{i}] (appliance {segment.appliance_id}"
                + (f", generation {segment.generation})" if segment.generation else ")"),
                segment,
            )
            for i, segment in enumerate(package.logs)
        }
        # Key id -> the segments whose certificates certify it (one, unless
        # the server certified one key for two appliances).
        self.certified: dict[str, list[_Segment]] = {}
        self.bundles: list[EvidenceBundle] = []
        # (appliance id, bundle id) -> the generation of the log recording it
        self.generations: dict[tuple[str, str], int] = {}
        self.after_expiry: list[str] = []

    def fail(self, failure: Failure, where: str = "") -> None:
        self.failures.append(type(failure)(f"{where}: {failure}") if where else failure)

    def run(self) -> Result[AuditorPackageReport]:
        for segment in self.segments.values():
            self.check_certificates(segment)  # (2)
        self.check_revocations()  # (3)
        for segment in self.segments.values():
            self.check_segment(segment)  # (4)
        self.check_evidence()  # (5)
        summary_verified = not self.failures and self.check_summary()  # (6)
        return self.report(summary_verified)

    def check_certificates(self, segment: _Segment) -> None:
        for j, envelope in enumerate(segment.model.certificates):
            checked = check_delegation(
                envelope,
                roots=self.central_keys,
                at=self.at,
                appliance_id=segment.model.appliance_id,
                site_id=self.package.site_id,
                allow_expired=True,
                limits=self.limits,
            )
            for failure in checked.failures:
                self.fail(failure, f"{segment.where}: certificates[{j}]")
            if checked.ok:
                delegation = checked.unwrap()
                subject = delegation.certificate.subject_key_id
                segment.held.setdefault(subject, []).append(delegation)
        for key_id, held in segment.held.items():
            latest = max(held, key=lambda d: d.certificate.not_after)
            segment.delegations[key_id] = latest
            segment.expiry[key_id] = latest.certificate.not_after
            self.certified.setdefault(key_id, []).append(segment)

    def check_revocations(self) -> None:
        if self.package.revocations is None:
            return
        checked = check_revocations(
            self.package.revocations, roots=self.central_keys, limits=self.limits
        )
        for failure in checked.failures:
            self.fail(failure, "revocations")
        if checked.ok:
            revocations = checked.unwrap().revocations
            for segment in self.segments.values():
                segment.cutoffs = revocation_cutoffs(segment.held, revocations)

    def check_segment(self, segment: _Segment) -> None:
        model, where = segment.model, segment.where
        failed = len(self.failures)
        key_id = model.checkpoint.signatures[0].keyid
        delegation = segment.delegations.get(key_id)
        if delegation is None:
            self.fail(
                UnknownKeyError(
                    f"{where}: the checkpoint is signed by key {key_id}, which has no "
                    "verified certificate in the segment"
                )
            )
            return
        signed = check_checkpoint(model.checkpoint, delegation=delegation, limits=self.limits)
        for failure in signed.failures:
            self.fail(failure, f"{where}: checkpoint")
        if not signed.ok:
            return
        verified = signed.unwrap()
        checkpoint = verified.checkpoint
        segment.key_ids.add(key_id)
        if not self.replay(segment, checkpoint.root_bytes, checkpoint.size):
            return
        cutoff = segment.cutoffs.get(key_id)
        if cutoff is not None and checkpoint.size > cutoff[0]:
            self.fail(
                RevokedError(
                    f"{where}: the checkpoint of size {checkpoint.size} is signed by key "
                    f"{key_id}, whose certificate {cutoff[1]} is revoked beyond size {cutoff[0]}"
                )
            )
        cosigned = check_receipt(
            model.receipt, roots=self.central_keys, checkpoint=verified, limits=self.limits
        )
        for failure in cosigned.failures:
            self.fail(failure, f"{where}: receipt")
        if cosigned.ok:
            segment.witnessed_at = cosigned.unwrap().receipt.witnessed_at
        skew = self.limits.clock_skew
        segment.after_expiry = checkpoint.ts > segment.expiry[key_id] + skew
        segment.verified = len(self.failures) == failed

    def replay(self, segment: _Segment, root: bytes, size: int) -> bool:
        """Replay the segment's entries from its prefix; True when they
        are exactly the checkpoint's tree of ``size`` with ``root``."""
        model, where = segment.model, segment.where
        start, end = model.start, model.end
        try:
            prefix = [from_hex(node, length=32, what="prefix node") for node in model.prefix]
            state = TreeState.from_compact_range(start, prefix, limits=self.limits)
            replay = LogReplay(appliance_id=model.appliance_id, state=state, limits=self.limits)
            for offset, text in enumerate(model.entries):
                index = start + offset
                record = replay.add(b64decode(text, what=f"entry {index}"))
                if record.kind == EVIDENCE_ENTRY_KIND:
                    entry = record.entry
                    segment.recorded_ts[index] = entry.ts
                    try:
                        segment.recorded[index] = recorded_evidence(entry)
                    except EvidenceError as exc:
                        segment.recorded[index] = str(exc)
        except (MalformedError, VerificationError) as exc:
            self.fail(exc, where)
            return False
        if size > end:
            self.fail(
                CheckpointError(
                    f"{where}: the checkpoint of size {size} covers more than entries "
                    f"{start}..{end - 1}: the last {size - end} entries were removed"
                )
            )
            return False
        if size < end:
            self.fail(
                UnsignedEntriesError(
                    f"{where}: entries {size}..{end - 1} are not covered by the checkpoint "
                    f"of size {size}"
                )
            )
            return False
        if replay.root() != root:
            self.fail(
                CheckpointError(
                    f"{where}: entries {start}..{end - 1} do not match the checkpoint of "
                    f"size {size}: an entry or the prefix was changed"
                )
            )
            return False
        return True

    def signing_segment(self, envelope: Envelope, key_id: str) -> _Segment | None:
        candidates = self.certified.get(key_id)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        # One key certified for several appliances: the bundle says which
        # appliance it is from, and is then verified under that certificate.
        try:
            claimed = unverified_payload(envelope, limits=self.limits).get("appliance_id")
        except (MalformedError, AttributeError):
            return candidates[0]
        return next((s for s in candidates if s.model.appliance_id == claimed), candidates[0])

    def recording_segment(
        self, bundle: EvidenceBundle, digest: str, segment: _Segment, key_id: str
    ) -> _Segment:
        """Of the segments of the bundle's appliance (one per generation of
        its log), the one whose entry at the bundle's log index records
        exactly this bundle; ``segment`` when none does (its check says why)."""
        for other in self.segments.values():
            if other.model.appliance_id != segment.model.appliance_id or key_id not in (
                other.delegations
            ):
                continue
            recorded = other.recorded.get(bundle.log_index)
            if (
                other.verified
                and not isinstance(recorded, str | None)
                and (recorded.bundle_id, recorded.payload_sha256) == (bundle.bundle_id, digest)
            ):
                return other
        return segment

    def check_evidence(self) -> None:
        package = self.package
        scope = set(package.frameworks)
        seen_ids: set[str] = set()
        positions: set[tuple[str, int, int]] = set()
        previous: tuple[str, int, int] | None = None
        unknown: dict[str, list[int]] = {}
        for i, envelope in enumerate(package.evidence):
            key_id = envelope.signatures[0].keyid
            segment = self.signing_segment(envelope, key_id)
            if segment is None:
                unknown.setdefault(key_id, []).append(i)
                continue
            checked = check_evidence(
                envelope, delegation=segment.delegations[key_id], limits=self.limits
            )
            if not checked.ok:
                for failure in checked.failures:
                    self.fail(failure, f"evidence[{i}]")
                continue
            evidence = checked.unwrap()
            bundle = evidence.bundle
            segment = self.recording_segment(bundle, evidence.digest, segment, key_id)
            where = f"evidence[{i}] (bundle {bundle.bundle_id})"
            generation = segment.model.log_generation
            position = (bundle.appliance_id, generation, bundle.log_index)
            problem: Failure | None = None
            if bundle.bundle_id in seen_ids:
                problem = EvidenceError("the bundle appears twice")
            elif position in positions:
                problem = EvidenceError(
                    f"log index {bundle.log_index} of appliance {bundle.appliance_id} "
                    + (f"(log generation {generation}) " if generation > 1 else "")
                    + "holds another bundle of the package"
                )
            elif previous is not None and position < previous:
                problem = EvidenceError(
                    f"out of order: evidence is ordered by appliance and log index, and "
                    f"this bundle follows log index {previous[2]} of appliance {previous[0]}"
                    + (f" (log generation {previous[1]})" if previous[1] > 1 else "")
                )
            else:
                problem = self.misplaced(bundle, segment, scope) or self.unrecorded(
                    bundle, evidence.digest, segment, key_id
                )
            seen_ids.add(bundle.bundle_id)
            positions.add(position)
            previous = position
            if problem is not None:
                self.fail(problem, where)
                continue
            if not segment.verified:
                continue  # its segment's failure is reported
            self.bundles.append(bundle)
            self.generations[(bundle.appliance_id, bundle.bundle_id)] = generation
            segment.bundle_indices.add(bundle.log_index)
            segment.key_ids.add(key_id)
            if bundle.collected_at > segment.expiry[key_id] + self.limits.clock_skew:
                self.after_expiry.append(bundle.bundle_id)
        for key_id, found in unknown.items():
            listed = ", ".join(f"evidence[{i}]" for i in found[:3])
            more = f" and {len(found) - 3} more" if len(found) > 3 else ""
            self.fail(
                UnknownKeyError(
                    f"{listed}{more} signed by key {key_id}, which no verified certificate "
                    "in the package certifies"
                )
            )

    def misplaced(
        self, bundle: EvidenceBundle, segment: _Segment, scope: set[str]
    ) -> Failure | None:
        package = self.package
        if bundle.site_id != package.site_id:
            return SubjectError(
                f"bundle of site {bundle.site_id}, the package is of {package.site_id}"
            )
        if not package.period_start <= bundle.collected_at < package.period_end:
            return EvidenceError(
                f"collected at {format_time(bundle.collected_at)}, outside the period "
                f"{format_time(package.period_start)} .. {format_time(package.period_end)}"
            )
        if scope.isdisjoint(bundle.controls):
            return EvidenceError(
                f"lists frameworks {', '.join(sorted(bundle.controls))}, none of the "
                f"package's ({', '.join(package.frameworks)})"
            )
        model = segment.model
        if not model.start <= bundle.log_index < model.end:
            return EvidenceError(
                f"recorded at log index {bundle.log_index}, outside the segment's entries "
                f"{model.start}..{model.end - 1} of appliance {model.appliance_id}"
            )
        return None

    def unrecorded(
        self, bundle: EvidenceBundle, digest: str, segment: _Segment, key_id: str
    ) -> Failure | None:
        index = bundle.log_index
        cutoff = segment.cutoffs.get(key_id)
        if cutoff is not None and index >= cutoff[0]:
            return RevokedError(
                f"at log index {index}, signed by key {key_id}, whose certificate "
                f"{cutoff[1]} is revoked beyond size {cutoff[0]}"
            )
        if not segment.verified:
            return None
        recorded = segment.recorded.get(index)
        if recorded is None:
            return EvidenceError(f"log entry {index} is not an {EVIDENCE_ENTRY_KIND} entry")
        if isinstance(recorded, str):
            return EvidenceError(recorded)
        if recorded.bundle_id != bundle.bundle_id or recorded.payload_sha256 != digest:
            return EvidenceError(f"log entry {index} records another bundle")
        return None

    def check_summary(self) -> bool:
        claimed = self.package.summary
        listed = {(c.framework, c.control_id) for c in claimed.controls}
        scope = set(self.package.frameworks)
        for bundle in self.bundles:
            for framework, control_ids in bundle.controls.items():
                if framework not in scope:
                    continue
                for control_id in control_ids:
                    if (framework, control_id) not in listed:
                        self.fail(
                            SummaryError(
                                f"summary: {framework} {control_id} is not listed, and bundle "
                                f"{bundle.bundle_id} gives evidence for it"
                            )
                        )
                        return False
        recomputed = summarise_evidence(
            self.bundles,
            [(c.framework, c.control_id, c.title) for c in claimed.controls],
            period_end=self.package.period_end,
            freshness_seconds=claimed.freshness_seconds,
            unwitnessed=claimed.unwitnessed_bundles,
            generation_of=lambda b: self.generations[(b.appliance_id, b.bundle_id)],
        )
        for says, holds in zip(claimed.controls, recomputed.controls, strict=True):
            difference = control_difference(says, holds)
            if difference is not None:
                self.fail(
                    SummaryError(f"summary: {says.framework} {says.control_id}: {difference}")
                )
                return False
        return True

    def report(self, summary_verified: bool) -> Result[AuditorPackageReport]:
        package = self.package
        segments = []
        for segment in self.segments.values():
            omitted = 0
            if segment.verified:  # (7)
                start, end = package.period_start, package.period_end
                omitted = sum(
                    1
                    for index, ts in segment.recorded_ts.items()
                    if start <= ts < end and index not in segment.bundle_indices
                )
            segments.append(
                SegmentReport(
                    appliance_id=segment.model.appliance_id,
                    start=segment.model.start,
                    size=segment.model.end,
                    key_ids=tuple(key for key in segment.held if key in segment.key_ids),
                    witnessed_at=segment.witnessed_at if segment.verified else None,
                    bundles=len(segment.bundle_indices),
                    omitted_bundles=omitted,
                    checkpoint_signed_after_expiry=segment.after_expiry,
                    generation=segment.model.log_generation,
                )
            )
        states: dict[str, int] = {}
        for control in package.summary.controls:
            states[control.state] = states.get(control.state, 0) + 1
        report = AuditorPackageReport(
            site_id=package.site_id,
            frameworks=package.frameworks,
            period_start=package.period_start,
            period_end=package.period_end,
            generated_at=package.generated_at,
            segments=tuple(segments),
            bundles=len(self.bundles),
            signed_after_expiry=tuple(self.after_expiry),
            omitted_bundles=sum(segment.omitted_bundles for segment in segments),
            summary_verified=summary_verified,
            states=states,
            controls=package.summary.controls,
            unwitnessed_bundles=package.summary.unwitnessed_bundles,
            problem=self.failures[0].message if self.failures else None,
        )
        # The report travels with the failures (Result.unwrap still raises
        # the first one).
        return Result(report, tuple(self.failures))


__all__ = [
    "AUDITOR_PACKAGE_FORMAT",
    "AuditorPackage",
    "AuditorPackageReport",
    "ControlState",
    "ControlSummary",
    "LatestEvidence",
    "LogSegment",
    "LogSegmentParts",
    "PackageSummary",
    "ResultCounts",
    "SegmentReport",
    "build_auditor_package",
    "check_auditor_package",
    "parse_auditor_package",
    "summarise_evidence",
    "verify_auditor_package",
]
