"""DSSE envelopes: every signed document of the protocol travels in one.

The signature is over ``PAE(payloadType, payload)`` exactly as the DSSE v1
specification defines it::

    "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body

where LEN is the byte length as ASCII decimal with no leading zeros. Because
the payload type is inside what is signed, a signature made for one kind of
document can never be replayed as another, and a verifier only accepts the one
kind it asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from msp_protocol.canonical import canonicalize, parse_json
from msp_protocol.encoding import KeyId, KeyIdField, b64decode, b64encode
from msp_protocol.errors import (
    EncodingError,
    MalformedError,
    PayloadTypeError,
    SignatureError,
    UsageError,
)
from msp_protocol.keys import SigningKey, VerifyKey
from msp_protocol.limits import DEFAULT_LIMITS, Limits
from msp_protocol.model import WireModel
from msp_protocol.result import Result, raising


class PayloadType(StrEnum):
    DELEGATION = "application/vnd.msp.delegation.v1+json"
    DELEGATION_REQUEST = "application/vnd.msp.delegation-request.v1+json"
    EVIDENCE = "application/vnd.msp.evidence.v1+json"
    CHECKPOINT = "application/vnd.msp.checkpoint.v1+json"
    RECEIPT = "application/vnd.msp.receipt.v1+json"
    BUNDLE = "application/vnd.msp.bundle.v1+json"
    REVOCATIONS = "application/vnd.msp.revocations.v1+json"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


_Base64 = Annotated[str, StringConstraints(strict=True, max_length=16 * 1024 * 1024)]


class EnvelopeSignature(WireModel):
    document_name = "envelope signature"

    keyid: KeyIdField
    sig: _Base64


class Envelope(WireModel):
    """A DSSE envelope as it travels (JSON with camelCase names, per DSSE)."""

    document_name = "DSSE envelope"

    payloadType: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=128)]
    payload: _Base64
    signatures: Annotated[tuple[EnvelopeSignature, ...], Field(min_length=1, max_length=16)]

    def payload_bytes(self) -> bytes:
        return b64decode(self.payload, what="envelope payload", urlsafe_ok=True)

    def to_json(self) -> bytes:
        return self.canonical_bytes()


@dataclass(frozen=True, slots=True)
class VerifiedPayload:
    """What a verified envelope vouches for: the exact signed bytes, their
    parsed JSON value, and the trusted keys whose signatures held."""

    payload_type: str
    payload: bytes
    value: Any
    signers: tuple[KeyId, ...]


def sign_envelope(
    payload_type: PayloadType | str, payload: bytes, keys: Sequence[SigningKey]
) -> Envelope:
    """Sign ``payload`` (already canonical bytes) with every key in ``keys``."""
    if not keys:
        raise UsageError("an envelope needs at least one signing key")
    message = pae(str(payload_type), payload)
    # Built from values this function just made, so no validation pass:
    # signing is on the audit trail's commit path.
    signatures = tuple(
        EnvelopeSignature.model_construct(keyid=key.key_id, sig=b64encode(key.sign(message)))
        for key in keys
    )
    return Envelope.model_construct(
        payloadType=str(payload_type), payload=b64encode(payload), signatures=signatures
    )


def sign_document(
    payload_type: PayloadType, document: WireModel | dict[str, Any], keys: Sequence[SigningKey]
) -> Envelope:
    """Canonicalize ``document`` (RFC 8785) and sign it."""
    body = document.canonical_bytes() if isinstance(document, WireModel) else canonicalize(document)
    return sign_envelope(payload_type, body, keys)


def parse_envelope(data: bytes | dict[str, Any], *, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """An envelope from its JSON bytes (strictly parsed) or an already-parsed object."""
    value = parse_json(data, limits=limits) if isinstance(data, bytes) else data
    return Envelope.from_wire(value)


def check_envelope(
    envelope: Envelope,
    *,
    payload_type: PayloadType,
    trusted: Iterable[VerifyKey],
    threshold: int = 1,
    limits: Limits = DEFAULT_LIMITS,
    max_payload_bytes: int | None = None,
) -> Result[VerifiedPayload]:
    """Verify an envelope against the keys the caller trusts for this kind.

    Steps (each names the attack it stops):
    (1) the payload type is the one asked for — cross-type replay;
    (2) the envelope carries a bounded number of signatures — verify loops;
    (3) the payload decodes and is within its size bound — memory exhaustion;
    (4) at least ``threshold`` distinct trusted keys signed PAE(type, payload)
        — forgery; a key listed twice counts once — threshold inflation;
    (5) the payload is strict JSON — parser differentials.
    """
    if threshold < 1:
        raise UsageError("signature threshold must be at least 1")
    keys = {key.key_id: key for key in trusted}
    if len(keys) < threshold:
        raise UsageError(f"threshold {threshold} exceeds the {len(keys)} trusted keys given")

    # (1)
    if envelope.payloadType != payload_type.value:
        return Result.failure(
            PayloadTypeError(
                f"wrong payload type: expected {payload_type.value}, "
                f"got {envelope.payloadType[:80]}"
            )
        )
    # (2)
    if len(envelope.signatures) > limits.max_envelope_signatures:
        return Result.failure(
            SignatureError(
                f"too many signatures: {len(envelope.signatures)}, "
                f"limit {limits.max_envelope_signatures}"
            )
        )
    # (3)
    bound = limits.max_json_bytes if max_payload_bytes is None else max_payload_bytes
    try:
        payload = envelope.payload_bytes()
    except EncodingError as exc:
        return Result.failure(exc)
    if len(payload) > bound:
        return Result.failure(
            EncodingError(f"payload too large: {len(payload)} bytes, limit {bound}")
        )
    # (4)
    message = pae(envelope.payloadType, payload)
    verified: list[KeyId] = []
    problems: list[str] = []
    for signature in envelope.signatures:
        key = keys.get(KeyId(signature.keyid))
        if key is None:
            problems.append(f"key {signature.keyid} is not trusted")
            continue
        if key.key_id in verified:
            continue
        try:
            key.verify(message, b64decode(signature.sig, what="signature", urlsafe_ok=True))
        except (SignatureError, EncodingError) as exc:
            problems.append(str(exc))
            continue
        verified.append(key.key_id)
    if len(verified) < threshold:
        detail = "; ".join(problems) or "no signatures"
        return Result.failure(
            SignatureError(
                f"{len(verified)} of {threshold} required signatures by trusted keys ({detail})"
            )
        )
    # (5)
    try:
        value = parse_json(payload, limits=limits, max_bytes=bound)
    except MalformedError as exc:
        return Result.failure(exc)
    return Result.success(VerifiedPayload(envelope.payloadType, payload, value, tuple(verified)))


verify_envelope = raising(check_envelope)


def unverified_payload(envelope: Envelope, *, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Parse the payload **without** checking any signature.

    Only for proof-of-possession, where the payload names the key that must
    have signed it; the caller verifies under that key before trusting anything.
    """
    return parse_json(envelope.payload_bytes(), limits=limits)


__all__ = [
    "Envelope",
    "EnvelopeSignature",
    "PayloadType",
    "VerifiedPayload",
    "check_envelope",
    "pae",
    "parse_envelope",
    "sign_document",
    "sign_envelope",
    "unverified_payload",
    "verify_envelope",
]
