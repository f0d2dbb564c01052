"""Delegation certificates, the requests that ask for them, and revocation lists.

The central server's root key signs a *delegation certificate*: "device key K
may sign scopes S for appliance A of site X between not_before and not_after",
with a serial. The appliance asks for one with a *delegation request* that its
key signs (proof of possession); a rotation request is signed by the new key
and by the current one. Revocation is a signed, versioned list: a revoked
serial has a cutoff log size, and what its key signed beyond that is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import Field, StrictInt, StringConstraints, model_validator

from msp_protocol.dsse import (
    Envelope,
    PayloadType,
    check_envelope,
    sign_document,
    unverified_payload,
)
from msp_protocol.encoding import (
    Hash,
    Identifier,
    KeyId,
    KeyIdField,
    Nonce,
    PublicKeyHex,
    Serial,
    Timestamp,
    utc_now,
)
from msp_protocol.errors import (
    CertificateExpiredError,
    CertificateNotYetValidError,
    IssuerError,
    MalformedError,
    PayloadTypeError,
    RevokedError,
    RollbackError,
    ScopeError,
    StaleRequestError,
    SubjectError,
    UsageError,
    VerificationError,
)
from msp_protocol.keys import SigningKey, VerifyKey
from msp_protocol.limits import DEFAULT_LIMITS, Limits
from msp_protocol.model import WireModel
from msp_protocol.result import Failure, Result, raising

DEFAULT_LIFETIME = timedelta(days=30)


class Scope(StrEnum):
    """What a delegated device key may sign."""

    AUDIT = "audit"  # audit-log checkpoints
    EVIDENCE = "evidence"  # evidence bundles


Scopes = Annotated[tuple[Scope, ...], Field(min_length=1, max_length=8)]


def new_serial() -> str:
    return secrets.token_hex(16)


def new_nonce() -> str:
    return secrets.token_hex(16)


def _unique_scopes(scopes: tuple[Scope, ...]) -> None:
    if len(set(scopes)) != len(scopes):
        raise ValueError("scopes repeat")


class DelegationCertificate(WireModel):
    document_name = "delegation certificate"

    serial: Serial
    issuer: KeyIdField
    subject_key: PublicKeyHex
    appliance_id: Identifier
    site_id: Identifier
    scopes: Scopes
    not_before: Timestamp
    not_after: Timestamp

    @model_validator(mode="after")
    def _window_and_scopes(self) -> Self:
        if self.not_after <= self.not_before:
            raise ValueError("not_after must be later than not_before")
        _unique_scopes(self.scopes)
        return self

    @property
    def subject(self) -> VerifyKey:
        return VerifyKey.from_hex(self.subject_key)

    @property
    def subject_key_id(self) -> KeyId:
        return self.subject.key_id

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.not_before


@dataclass(frozen=True, slots=True)
class VerifiedDelegation:
    """A certificate whose signature, issuer and subject held.

    ``signed_after_expiry`` is set when the caller allowed an expired
    certificate (late entries from an appliance that was offline): the
    signature is accepted but must be flagged for review.
    """

    certificate: DelegationCertificate
    envelope: Envelope
    payload: bytes
    signed_after_expiry: bool = False


def issue_delegation(
    root: SigningKey,
    *,
    subject: VerifyKey,
    appliance_id: str,
    site_id: str,
    scopes: Iterable[Scope],
    not_before: datetime | None = None,
    lifetime: timedelta = DEFAULT_LIFETIME,
    serial: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Envelope:
    """The central server's side: sign a certificate for ``subject``."""
    if not timedelta(0) < lifetime <= limits.max_certificate_lifetime:
        raise UsageError(
            f"certificate lifetime must be positive and at most "
            f"{limits.max_certificate_lifetime}, got {lifetime}"
        )
    start = not_before or utc_now().replace(microsecond=0)
    certificate = DelegationCertificate(
        serial=serial or new_serial(),
        issuer=root.key_id,
        subject_key=subject.hex,
        appliance_id=appliance_id,
        site_id=site_id,
        scopes=tuple(scopes),
        not_before=start,
        not_after=start + lifetime,
    )
    return sign_document(PayloadType.DELEGATION, certificate, [root])


def check_delegation(
    envelope: Envelope,
    *,
    roots: Iterable[VerifyKey],
    at: datetime,
    scope: Scope | None = None,
    appliance_id: str | None = None,
    site_id: str | None = None,
    subject_key_id: str | None = None,
    revocations: RevocationList | None = None,
    log_size: int | None = None,
    allow_expired: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[VerifiedDelegation]:
    """Verify a delegation certificate for one use.

    ``at`` is the verifier's trusted time (the central server's clock, or the
    time an auditor checks at). ``log_size`` is the size of the log the
    signature being judged covers (a checkpoint's size; an entry at index i is
    covered from size i + 1); it is what a revocation cutoff is compared with.
    With ``allow_expired`` an expired certificate is accepted and marked
    ``signed_after_expiry`` — the server's rule for late offline entries.

    Steps, and what each stops:
    (1) DSSE signature by a trusted root, under the delegation payload type
        — forged certificates, another document replayed as a certificate;
    (2) the payload is a well-formed certificate — parser confusion;
    (3) ``issuer`` names the key that signed — issuer confusion between roots;
    (4) the lifetime is bounded — a certificate valid forever;
    (5) the requested scope is granted — evidence keys signing checkpoints;
    (6) subject (appliance, site, key) is the expected one — one appliance's
        certificate presented for another;
    (7) ``at`` lies in the validity window (clock skew tolerated)
        — use of expired or post-dated certificates;
    (8) the serial is not revoked at ``log_size`` — use after compromise.
    """
    root_keys = list(roots)
    verified = check_envelope(
        envelope, payload_type=PayloadType.DELEGATION, trusted=root_keys, limits=limits
    )  # (1)
    if not verified.ok:
        return Result(None, verified.failures)
    payload = verified.unwrap()
    try:
        certificate = DelegationCertificate.from_wire(payload.value)  # (2)
    except MalformedError as exc:
        return Result.failure(exc)

    failures: list[Failure] = []
    if certificate.issuer not in payload.signers:  # (3)
        failures.append(
            IssuerError(
                f"certificate names issuer {certificate.issuer} but was signed by "
                f"{', '.join(payload.signers)}"
            )
        )
    if certificate.lifetime > limits.max_certificate_lifetime:  # (4)
        failures.append(
            VerificationError(
                f"certificate lifetime {certificate.lifetime} exceeds "
                f"{limits.max_certificate_lifetime}"
            )
        )
    if scope is not None and scope not in certificate.scopes:  # (5)
        failures.append(
            ScopeError(f"certificate {certificate.serial} does not grant scope {scope.value}")
        )
    failures.extend(_subject_failures(certificate, appliance_id, site_id, subject_key_id))  # (6)

    expired = False  # (7)
    if at < certificate.not_before - limits.clock_skew:
        failures.append(
            CertificateNotYetValidError(
                f"certificate {certificate.serial} is not valid before {certificate.not_before}"
            )
        )
    elif at > certificate.not_after + limits.clock_skew:
        expired = True
        if not allow_expired:
            failures.append(
                CertificateExpiredError(
                    f"certificate {certificate.serial} expired at {certificate.not_after}"
                )
            )

    if revocations is not None:  # (8)
        revoked = revocations.find(certificate.serial)
        if revoked is not None and (log_size is None or log_size > revoked.cutoff_size):
            where = "" if log_size is None else f" at log size {log_size}"
            failures.append(
                RevokedError(
                    f"certificate {certificate.serial} is revoked beyond log size "
                    f"{revoked.cutoff_size}{where}"
                )
            )
    return Result.collect(
        VerifiedDelegation(certificate, envelope, payload.payload, signed_after_expiry=expired),
        failures,
    )


verify_delegation = raising(check_delegation)


def _subject_failures(
    certificate: DelegationCertificate,
    appliance_id: str | None,
    site_id: str | None,
    subject_key_id: str | None,
) -> list[Failure]:
    failures: list[Failure] = []
    if appliance_id is not None and certificate.appliance_id != appliance_id:
        failures.append(
            SubjectError(
                f"certificate is for appliance {certificate.appliance_id}, not {appliance_id}"
            )
        )
    if site_id is not None and certificate.site_id != site_id:
        failures.append(
            SubjectError(f"certificate is for site {certificate.site_id}, not {site_id}")
        )
    if subject_key_id is not None and certificate.subject_key_id != subject_key_id:
        failures.append(
            SubjectError(
                f"certificate is for key {certificate.subject_key_id}, not {subject_key_id}"
            )
        )
    return failures


# --- revocation ----------------------------------------------------------------


class Revocation(WireModel):
    document_name = "revocation"

    serial: Serial
    appliance_id: Identifier
    # Signatures under this serial stay valid for logs of at most this size:
    # the history the server had already witnessed when it revoked.
    cutoff_size: Annotated[StrictInt, Field(ge=0)]
    revoked_at: Timestamp
    reason: Annotated[str, StringConstraints(strict=True, max_length=256)] = ""


class RevocationList(WireModel):
    document_name = "revocation list"

    version: Annotated[StrictInt, Field(ge=1)]
    issuer: KeyIdField
    issued_at: Timestamp
    revoked: tuple[Revocation, ...] = ()

    @model_validator(mode="after")
    def _unique_serials(self) -> Self:
        serials = [entry.serial for entry in self.revoked]
        if len(set(serials)) != len(serials):
            raise ValueError("a serial is listed twice")
        return self

    def find(self, serial: str) -> Revocation | None:
        return self._index().get(serial)

    def _index(self) -> Mapping[str, Revocation]:
        # A frozen model: compute on demand; lists are small and looked up
        # rarely compared with the signatures they gate.
        return {entry.serial: entry for entry in self.revoked}


@dataclass(frozen=True, slots=True)
class VerifiedRevocations:
    revocations: RevocationList
    envelope: Envelope
    payload: bytes


def sign_revocations(root: SigningKey, revocations: RevocationList) -> Envelope:
    if revocations.issuer != root.key_id:
        raise UsageError("revocation list issuer must be the signing root's key id")
    return sign_document(PayloadType.REVOCATIONS, revocations, [root])


def check_revocations(
    envelope: Envelope,
    *,
    roots: Iterable[VerifyKey],
    min_version: int = 1,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[VerifiedRevocations]:
    """Verify a revocation list.

    (1) signed by a trusted root as a revocation list — forged lists;
    (2) well-formed, each serial once — parser confusion;
    (3) issuer is the signer — issuer confusion;
    (4) bounded size — memory exhaustion;
    (5) version not below ``min_version`` (the one already held) — an
        attacker replaying an old list to un-revoke a key.
    """
    verified = check_envelope(
        envelope, payload_type=PayloadType.REVOCATIONS, trusted=roots, limits=limits
    )  # (1)
    if not verified.ok:
        return Result(None, verified.failures)
    payload = verified.unwrap()
    try:
        revocations = RevocationList.from_wire(payload.value)  # (2)
    except MalformedError as exc:
        return Result.failure(exc)
    failures: list[Failure] = []
    if revocations.issuer not in payload.signers:  # (3)
        failures.append(IssuerError(f"revocation list names issuer {revocations.issuer}"))
    if len(revocations.revoked) > limits.max_revocations:  # (4)
        failures.append(
            VerificationError(f"revocation list has {len(revocations.revoked)} entries")
        )
    if revocations.version < min_version:  # (5)
        failures.append(
            RollbackError(
                f"revocation list version {revocations.version} is older than {min_version}"
            )
        )
    return Result.collect(VerifiedRevocations(revocations, envelope, payload.payload), failures)


verify_revocations = raising(check_revocations)


# --- requests: proof of possession ---------------------------------------------

Purpose = Literal["enroll", "renew", "rotate"]


class DelegationRequest(WireModel):
    """An appliance asking for a certificate, signed by the key to certify.

    - ``enroll``: first certificate; carries the SHA-256 of the one-time
      enrollment token (the token itself travels beside it, once, over TLS).
    - ``renew``: same key, new validity window; names the current serial.
    - ``rotate``: a new key; names the current serial and is signed by both
      the new key (possession) and the current one (authority).
    """

    document_name = "delegation request"

    purpose: Purpose
    audience: KeyIdField  # the central root key id: a request for one server is useless at another
    subject_key: PublicKeyHex
    scopes: Scopes
    current_serial: Serial | None = None
    token_sha256: Hash | None = None
    created: Timestamp
    nonce: Nonce

    @model_validator(mode="after")
    def _purpose_fields(self) -> Self:
        _unique_scopes(self.scopes)
        if self.purpose == "enroll":
            if self.token_sha256 is None or self.current_serial is not None:
                raise ValueError("an enroll request carries token_sha256 and no current_serial")
        elif self.current_serial is None or self.token_sha256 is not None:
            raise ValueError(f"a {self.purpose} request carries current_serial and no token_sha256")
        return self


@dataclass(frozen=True, slots=True)
class VerifiedRequest:
    request: DelegationRequest
    envelope: Envelope
    payload: bytes


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def make_delegation_request(
    *,
    purpose: Purpose,
    audience: str,
    subject: SigningKey,
    scopes: Iterable[Scope],
    current: tuple[str, SigningKey] | None = None,
    enrollment_token: str | None = None,
    created: datetime | None = None,
) -> Envelope:
    """The appliance's side. ``current`` is (serial, key) of the certificate
    held now, for renew and rotate; for rotate, ``subject`` is the new key."""
    if (purpose == "enroll") != (enrollment_token is not None) or (purpose != "enroll") != (
        current is not None
    ):
        raise UsageError(
            "enroll takes an enrollment token; renew and rotate take the current certificate"
        )
    request = DelegationRequest(
        purpose=purpose,
        audience=audience,
        subject_key=subject.verify_key.hex,
        scopes=tuple(scopes),
        current_serial=current[0] if current else None,
        token_sha256=token_digest(enrollment_token) if enrollment_token is not None else None,
        created=created or utc_now(),
        nonce=new_nonce(),
    )
    signers = [subject]
    if purpose == "rotate" and current is not None:
        if current[1].key_id == subject.key_id:
            raise UsageError("a rotation needs a new key")
        signers.append(current[1])
    elif purpose == "renew" and current is not None and current[1].key_id != subject.key_id:
        raise UsageError("a renewal keeps the current key; use rotate for a new one")
    return sign_document(PayloadType.DELEGATION_REQUEST, request, signers)


def check_delegation_request(
    envelope: Envelope,
    *,
    purpose: Purpose,
    audience: str,
    now: datetime,
    current: DelegationCertificate | None = None,
    enrollment_token: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Result[VerifiedRequest]:
    """The central server's side of a delegation request.

    The nonce is returned in the request for the caller to check against its
    shared nonce store (a replay inside the freshness window is the caller's
    to refuse, since only it holds that state).

    (1) the payload is a well-formed request of the expected ``purpose``
        — a renewal replayed as an enrollment;
    (2) ``audience`` is this server — a request replayed to another server;
    (3) ``created`` lies within the freshness window — replay of old requests;
    (4) the subject key signed it (proof of possession) — certifying a key the
        requester does not hold;
    (5) renew/rotate: it names the current certificate, renew keeps its key,
        rotate changes it and the current key signed too — hijacking an
        appliance's identity with a fresh key;
    (6) enroll: the token presented hashes to ``token_sha256`` — pairing a
        stolen token with another request.
    """
    if envelope.payloadType != PayloadType.DELEGATION_REQUEST.value:
        return Result.failure(
            PayloadTypeError(
                f"wrong payload type: expected {PayloadType.DELEGATION_REQUEST.value}, "
                f"got {envelope.payloadType[:80]}"
            )
        )
    try:
        request = DelegationRequest.from_wire(unverified_payload(envelope, limits=limits))  # (1)
    except MalformedError as exc:
        return Result.failure(exc)
    if request.purpose != purpose:
        return Result.failure(
            VerificationError(f"request is for {request.purpose}, expected {purpose}")
        )
    failures: list[Failure] = []
    if request.audience != audience:  # (2)
        failures.append(
            VerificationError(f"request is addressed to {request.audience}, not {audience}")
        )
    if request.created < now - limits.max_signature_age:  # (3)
        failures.append(StaleRequestError(f"request created at {request.created} is too old"))
    elif request.created > now + limits.clock_skew:
        failures.append(StaleRequestError(f"request created at {request.created} is in the future"))

    subject = VerifyKey.from_hex(request.subject_key)
    signers = [subject]
    if purpose != "enroll":  # (5)
        if current is None:
            raise UsageError(f"checking a {purpose} request needs the current certificate")
        if request.current_serial != current.serial:
            failures.append(
                SubjectError(
                    f"request names certificate {request.current_serial}, "
                    f"current is {current.serial}"
                )
            )
        if purpose == "renew" and subject != current.subject:
            failures.append(SubjectError("a renewal must keep the certified key"))
        if purpose == "rotate":
            if subject == current.subject:
                failures.append(SubjectError("a rotation must certify a new key"))
            else:
                signers.append(current.subject)
    signed = check_envelope(
        envelope,
        payload_type=PayloadType.DELEGATION_REQUEST,
        trusted=signers,
        threshold=len(signers),
        limits=limits,
    )  # (4)
    failures.extend(signed.failures)

    if purpose == "enroll":  # (6)
        if enrollment_token is None:
            raise UsageError("checking an enroll request needs the presented token")
        if not hmac.compare_digest(token_digest(enrollment_token), request.token_sha256 or ""):
            failures.append(VerificationError("enrollment token does not match the request"))
    payload = envelope.payload_bytes()
    return Result.collect(VerifiedRequest(request, envelope, payload), failures)


verify_delegation_request = raising(check_delegation_request)
