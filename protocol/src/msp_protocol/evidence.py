"""Evidence bundles: one compliance check's signed result, for auditors.

A bundle is DSSE-signed by the appliance's delegated key under a certificate
with the ``evidence`` scope. Signing it also appends an ``evidence.signed``
entry to the audit log at ``log_index``, holding the SHA-256 of the bundle's
signed payload. So a bundle can be shown to have existed at that position:
inclusion proof of the entry, plus a checkpoint the central server cosigned
(a receipt) — checkable offline with only the central public key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from msp_protocol.delegation import Scope, VerifiedDelegation
from msp_protocol.dsse import Envelope, PayloadType, check_envelope, sign_document
from msp_protocol.encoding import Hash, Identifier, Timestamp
from msp_protocol.errors import (
    EvidenceError,
    MalformedError,
    ScopeError,
    SubjectError,
    VerificationError,
)
from msp_protocol.keys import SigningKey, VerifyKey
from msp_protocol.limits import DEFAULT_LIMITS, Limits
from msp_protocol.log import LogEntry, Size, VerifiedReceipt, check_receipt, parse_entry
from msp_protocol.merkle import check_inclusion
from msp_protocol.model import WireModel
from msp_protocol.result import Failure, Result, raising

EVIDENCE_ENTRY_KIND = "evidence.signed"

CheckId = Annotated[str, StringConstraints(strict=True, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
FrameworkId = Annotated[str, StringConstraints(strict=True, pattern=r"^[a-z0-9][a-z0-9_]{0,31}$")]
ControlId = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=64)]
CheckResult = Literal["pass", "fail", "error", "not_applicable"]


class EvidenceBundle(WireModel):
    document_name = "evidence bundle"

    bundle_id: Identifier
    site_id: Identifier
    appliance_id: Identifier
    check_id: CheckId
    # framework id -> the controls of that framework this check gives evidence for
    controls: Annotated[
        dict[FrameworkId, Annotated[tuple[ControlId, ...], Field(min_length=1, max_length=64)]],
        Field(min_length=1, max_length=16),
    ]
    result: CheckResult
    observed: dict[str, Any]
    collected_at: Timestamp  # the appliance's clock
    log_index: Size


class EvidenceEntryData(WireModel):
    """The ``data`` of the audit entry that records a signed bundle."""

    document_name = "evidence entry data"

    bundle_id: Identifier
    payload_sha256: Hash


@dataclass(frozen=True, slots=True)
class VerifiedEvidence:
    bundle: EvidenceBundle
    envelope: Envelope
    payload: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()


def sign_evidence(key: SigningKey, bundle: EvidenceBundle) -> Envelope:
    return sign_document(PayloadType.EVIDENCE, bundle, [key])


def evidence_entry_data(envelope: Envelope) -> dict[str, Any]:
    """The audit-entry data recording a signed bundle (hash of its exact payload)."""
    payload = envelope.payload_bytes()
    bundle = EvidenceBundle.from_json(payload)
    return EvidenceEntryData(
        bundle_id=bundle.bundle_id, payload_sha256=hashlib.sha256(payload).hexdigest()
    ).to_wire()


def check_evidence(
    envelope: Envelope,
    *,
    delegation: VerifiedDelegation,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[VerifiedEvidence]:
    """Verify a bundle against the (already verified) certificate of its signer.

    (1) signed by the certificate's key as evidence — forgery, another signed
        document replayed as evidence;
    (2) well-formed and within its size bound;
    (3) the certificate grants the evidence scope — a key delegated for
        something else vouching for compliance;
    (4) the bundle's appliance and site are the certificate's — evidence of
        one site presented as another's.
    """
    certificate = delegation.certificate
    signed = check_envelope(
        envelope,
        payload_type=PayloadType.EVIDENCE,
        trusted=[certificate.subject],
        limits=limits,
        max_payload_bytes=limits.max_evidence_bytes,
    )  # (1)
    if not signed.ok:
        return Result(None, signed.failures)
    payload = signed.unwrap()
    try:
        bundle = EvidenceBundle.from_wire(payload.value)  # (2)
    except MalformedError as exc:
        return Result.failure(exc)
    failures: list[Failure] = []
    if Scope.EVIDENCE not in certificate.scopes:  # (3)
        failures.append(
            ScopeError(f"certificate {certificate.serial} does not grant scope evidence")
        )
    if (
        bundle.appliance_id != certificate.appliance_id or bundle.site_id != certificate.site_id
    ):  # (4)
        failures.append(
            SubjectError(
                f"bundle is from appliance {bundle.appliance_id} of site {bundle.site_id}, "
                f"certificate is for {certificate.appliance_id} of {certificate.site_id}"
            )
        )
    return Result.collect(VerifiedEvidence(bundle, envelope, payload.payload), failures)


verify_evidence = raising(check_evidence)


@dataclass(frozen=True, slots=True)
class EvidenceProof:
    """Where a bundle sits in the log: its entry, an inclusion proof, and the
    server's receipt for the tree the proof leads to."""

    entry: bytes
    inclusion: Sequence[bytes]
    receipt: Envelope


def check_evidence_in_log(
    evidence: VerifiedEvidence,
    proof: EvidenceProof,
    *,
    roots: Iterable[VerifyKey],
    limits: Limits = DEFAULT_LIMITS,
) -> Result[VerifiedReceipt]:
    """Did this bundle exist at its log position, as the central server witnessed?

    (1) the receipt is the central server's — a forged witness;
    (2) the entry is at the bundle's ``log_index`` and records exactly this
        bundle's signed bytes — an entry for another (or an edited) bundle;
    (3) the entry is included in the tree the receipt covers — an entry that
        was never part of the witnessed log.
    """
    witnessed = check_receipt(proof.receipt, roots=roots, limits=limits)  # (1)
    if not witnessed.ok:
        return witnessed
    receipt = witnessed.unwrap().receipt
    bundle = evidence.bundle
    try:
        record = parse_entry(proof.entry, expected_index=bundle.log_index, limits=limits)
        data = recorded_evidence(record.entry)
    except (MalformedError, VerificationError) as exc:
        return Result.failure(exc)
    if data.bundle_id != bundle.bundle_id or data.payload_sha256 != evidence.digest:  # (2)
        return Result.failure(EvidenceError(f"log entry {bundle.log_index} records another bundle"))
    included = check_inclusion(  # (3)
        record.leaf_hash,
        bundle.log_index,
        receipt.size,
        proof.inclusion,
        bytes.fromhex(receipt.root),
        limits=limits,
    )
    if not included.ok:
        return Result(None, included.failures)
    return witnessed


verify_evidence_in_log = raising(check_evidence_in_log)


def recorded_evidence(entry: LogEntry) -> EvidenceEntryData:
    """What an ``evidence.signed`` audit entry records; raises
    :class:`EvidenceError` for any other entry."""
    if entry.kind != EVIDENCE_ENTRY_KIND:
        raise EvidenceError(f"log entry {entry.index} is {entry.kind}, not {EVIDENCE_ENTRY_KIND}")
    try:
        return EvidenceEntryData.from_wire(entry.data)
    except MalformedError as exc:
        raise EvidenceError(f"log entry {entry.index}: {exc}") from None
