"""The appliance's device key and its delegation certificate.

The device key is generated on the appliance, in the key directory (by
default ``/var/lib/msp/keys``: directory 0700, key file 0600, both owned by
the agent's user, written atomically). Its private half never leaves that
file: it is not logged, printed, exported or sent, and no text this module
produces contains it.

The central server delegates signing to the key with a certificate. The
certificate is renewed well before it expires — at half its lifetime, give or
take 10 % of that half, so a fleet does not renew in lockstep — and an
appliance whose certificate expired while offline keeps signing (the server
flags such entries). An appliance that learns of its own revocation stops
signing at once.

Rotation: a new key is made and kept beside the current one
(``device.key.next``), a certificate for it is requested under the current
key, and only once that certificate is stored does the new key replace the
old. A crash at any point leaves either the old key in use or a rotation that
:meth:`DelegatedSigningKey.pending_rotation` resumes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from msp_agent.files import fsync_directory, write_atomic
from msp_protocol.delegation import (
    Purpose,
    Scope,
    VerifiedDelegation,
    check_delegation,
    make_delegation_request,
)
from msp_protocol.dsse import Envelope, parse_envelope
from msp_protocol.encoding import utc_now
from msp_protocol.errors import ProtocolError
from msp_protocol.keys import KEY_BYTES, SigningKey, VerifyKey

DEFAULT_KEY_DIR = Path("/var/lib/msp/keys")
KEY_FILE = "device.key"
NEXT_KEY_FILE = "device.key.next"
CERTIFICATE_FILE = "certificate.json"
NEXT_CERTIFICATE_FILE = "certificate.json.next"
REVOKED_FILE = "revoked"
# The secret for the audit trail's row authentication codes: independent of
# the device key, so it survives rotations.
AUDIT_ROW_KEY_FILE = "audit-row.key"

DEFAULT_SCOPES = (Scope.AUDIT, Scope.EVIDENCE)

Clock = Callable[[], datetime]


class KeyFileError(Exception):
    """The key directory or a key file is unsafe or unreadable; the message says
    how to fix it."""


class KeyRevokedError(Exception):
    """This appliance's certificate was revoked: it must not sign anything."""


class CertificateRejectedError(Exception):
    """A certificate from the server that does not certify our key as asked."""


def _check_private(path: Path, *, kind: str) -> None:
    """Refuse a key directory or key file that anyone but its owner can read."""
    info = path.stat()
    if info.st_uid != os.geteuid():
        raise KeyFileError(
            f"{kind} {path} is owned by uid {info.st_uid}, not by this agent (uid {os.geteuid()}); "
            f"fix: chown {os.geteuid()} {path}"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        wanted = "700" if kind == "key directory" else "600"
        raise KeyFileError(
            f"{kind} {path} is accessible to others (mode {mode:04o}); fix: chmod {wanted} {path}"
        )


def _renewal_fraction(serial: str) -> float:
    """Where in a certificate's lifetime renewal starts: 0.5 ± 10 % of 0.5,
    fixed per certificate (derived from its serial) so a restart does not
    move it and two appliances rarely share it."""
    unit = int(hashlib.sha256(serial.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return 0.5 * (1 + 0.1 * (2 * unit - 1))


@dataclass(frozen=True, slots=True)
class PendingRotation:
    key: SigningKey
    certificate: VerifiedDelegation | None


class DelegatedSigningKey:
    """The device key, its current certificate, renewal and rotation."""

    def __init__(
        self,
        key_dir: Path,
        key: SigningKey,
        *,
        central_keys: Sequence[VerifyKey],
        clock: Clock = utc_now,
    ) -> None:
        self.key_dir = key_dir
        self._key = key
        self._central_keys = list(central_keys)
        self._clock = clock
        self._certificate: VerifiedDelegation | None = None
        self._revoked = (key_dir / REVOKED_FILE).exists()

    @classmethod
    def load_or_create(
        cls,
        key_dir: Path = DEFAULT_KEY_DIR,
        *,
        central_keys: Sequence[VerifyKey],
        clock: Clock = utc_now,
    ) -> DelegatedSigningKey:
        """Load the device key from ``key_dir`` (by default
        ``/var/lib/msp/keys``), generating it on first use.

        Raises :class:`KeyFileError` if the directory or the key file is
        readable by others or owned by someone else, or the key is damaged.
        """
        if not central_keys:
            raise ValueError("at least one pinned central public key is required")
        if key_dir.exists():
            _check_private(key_dir, kind="key directory")
        else:
            key_dir.mkdir(mode=0o700, parents=True)
            os.chmod(key_dir, 0o700)
        key = _load_key(key_dir / KEY_FILE, create=True)
        signer = cls(key_dir, key, central_keys=central_keys, clock=clock)
        certificate_path = key_dir / CERTIFICATE_FILE
        if certificate_path.exists():
            signer._certificate = signer._verify_certificate(
                certificate_path.read_bytes(), key.verify_key
            )
        return signer

    # --- identity ------------------------------------------------------------------

    @property
    def key_id(self) -> str:
        return self._key.key_id

    @property
    def verify_key(self) -> VerifyKey:
        return self._key.verify_key

    @property
    def certificate(self) -> VerifiedDelegation | None:
        return self._certificate

    @property
    def revoked(self) -> bool:
        return self._revoked

    def audit_row_key(self) -> bytes:
        """The audit trail's row-authentication secret (made on first use)."""
        return _load_secret(self.key_dir / AUDIT_ROW_KEY_FILE, create=True)

    def signing_key(self) -> SigningKey:
        """The key to sign with now. Raises :class:`KeyRevokedError` once this
        appliance knows its certificate was revoked."""
        if self._revoked:
            raise KeyRevokedError(
                f"certificate of key {self.key_id} was revoked: this appliance no longer signs"
            )
        return self._key

    def __repr__(self) -> str:
        serial = self._certificate.certificate.serial if self._certificate else None
        return f"DelegatedSigningKey(key_id={self.key_id!r}, serial={serial!r})"

    # --- certificates ----------------------------------------------------------------

    def install_certificate(self, envelope: Envelope) -> VerifiedDelegation:
        """Verify a certificate the server issued for our key and store it."""
        verified = self._verify_certificate(envelope.to_json(), self._key.verify_key)
        write_atomic(self.key_dir / CERTIFICATE_FILE, envelope.to_json(), mode=0o600)
        self._certificate = verified
        return verified

    def renew_at(self) -> datetime | None:
        """When renewal should start (None before enrollment)."""
        if self._certificate is None:
            return None
        certificate = self._certificate.certificate
        return certificate.not_before + certificate.lifetime * _renewal_fraction(certificate.serial)

    def renewal_due(self) -> bool:
        renew_at = self.renew_at()
        return renew_at is not None and self._clock() >= renew_at

    def expired(self) -> bool:
        return (
            self._certificate is not None
            and self._clock() > self._certificate.certificate.not_after
        )

    def mark_revoked(self) -> None:
        """Stop signing, now and after a restart."""
        write_atomic(self.key_dir / REVOKED_FILE, b"revoked\n", mode=0o600)
        self._revoked = True

    # --- requests ----------------------------------------------------------------------

    def enrollment_request(
        self, *, audience: str, token: str, scopes: Sequence[Scope] = DEFAULT_SCOPES
    ) -> Envelope:
        return self._request("enroll", audience=audience, scopes=scopes, token=token)

    def renewal_request(self, *, audience: str) -> Envelope:
        return self._request("renew", audience=audience, scopes=self._held_scopes())

    def begin_rotation(self, *, audience: str) -> tuple[SigningKey, Envelope]:
        """Make (or reuse, after a crash) the next key and the request for its
        certificate, signed by the next key and by the current one."""
        if self._certificate is None:
            raise KeyFileError("cannot rotate before enrollment: no certificate is held")
        next_key = _load_key(self.key_dir / NEXT_KEY_FILE, create=True)
        request = make_delegation_request(
            purpose="rotate",
            audience=audience,
            subject=next_key,
            scopes=self._held_scopes(),
            current=(self._certificate.certificate.serial, self.signing_key()),
            created=self._clock(),
        )
        return next_key, request

    def store_rotation_certificate(self, envelope: Envelope) -> VerifiedDelegation:
        """Keep the certificate issued for the next key (not yet in use)."""
        next_key = _load_key(self.key_dir / NEXT_KEY_FILE, create=False)
        verified = self._verify_certificate(envelope.to_json(), next_key.verify_key)
        write_atomic(self.key_dir / NEXT_CERTIFICATE_FILE, envelope.to_json(), mode=0o600)
        return verified

    def pending_rotation(self) -> PendingRotation | None:
        """A rotation that began and has not completed (e.g. across a crash)."""
        if not (self.key_dir / NEXT_KEY_FILE).exists():
            return None
        next_key = _load_key(self.key_dir / NEXT_KEY_FILE, create=False)
        certificate_path = self.key_dir / NEXT_CERTIFICATE_FILE
        certificate = None
        if certificate_path.exists():
            certificate = self._verify_certificate(
                certificate_path.read_bytes(), next_key.verify_key
            )
        return PendingRotation(next_key, certificate)

    def complete_rotation(self) -> VerifiedDelegation:
        """Switch to the next key and its certificate. Call only after the
        rotation was recorded in the audit trail under the current key."""
        pending = self.pending_rotation()
        if pending is None or pending.certificate is None:
            raise KeyFileError("no rotation with a stored certificate to complete")
        # The certificate first: a crash after it leaves the next key and its
        # certificate, which pending_rotation() finds and this call finishes.
        os.replace(self.key_dir / NEXT_CERTIFICATE_FILE, self.key_dir / CERTIFICATE_FILE)
        os.replace(self.key_dir / NEXT_KEY_FILE, self.key_dir / KEY_FILE)
        fsync_directory(self.key_dir)
        self._key = pending.key
        self._certificate = pending.certificate
        return pending.certificate

    def _request(
        self, purpose: Purpose, *, audience: str, scopes: Sequence[Scope], token: str | None = None
    ) -> Envelope:
        current = None
        if purpose != "enroll":
            if self._certificate is None:
                raise KeyFileError(f"cannot {purpose} before enrollment: no certificate is held")
            current = (self._certificate.certificate.serial, self.signing_key())
        return make_delegation_request(
            purpose=purpose,
            audience=audience,
            subject=self.signing_key(),
            scopes=scopes,
            current=current,
            enrollment_token=token,
            created=self._clock(),
        )

    def _held_scopes(self) -> tuple[Scope, ...]:
        return self._certificate.certificate.scopes if self._certificate else DEFAULT_SCOPES

    def _verify_certificate(self, data: bytes, subject: VerifyKey) -> VerifiedDelegation:
        try:
            return check_delegation(
                parse_envelope(data),
                roots=self._central_keys,
                at=self._clock(),
                subject_key_id=subject.key_id,
                allow_expired=True,  # offline expiry: keep signing, the server flags it
            ).unwrap()
        except ProtocolError as exc:
            raise CertificateRejectedError(f"certificate for key {subject.key_id}: {exc}") from None


def _load_secret(path: Path, *, create: bool) -> bytes:
    """A 32-byte secret from a private file, generated (atomically) if asked."""
    if not path.exists():
        if not create:
            raise KeyFileError(f"key file {path} does not exist")
        secret = SigningKey.generate().seed_bytes()
        write_atomic(path, secret, mode=0o600)
        return secret
    _check_private(path, kind="key file")
    secret = path.read_bytes()
    if len(secret) != KEY_BYTES:
        raise KeyFileError(
            f"key file {path} is damaged ({len(secret)} bytes, expected {KEY_BYTES}); "
            "restore it from backup or re-enroll this appliance"
        )
    return secret


def read_audit_row_key(key_dir: Path) -> bytes:
    """The audit trail's row-authentication secret, for tools that verify the
    trail beside the running service (never created here)."""
    return _load_secret(key_dir / AUDIT_ROW_KEY_FILE, create=False)


def _load_key(path: Path, *, create: bool) -> SigningKey:
    return SigningKey(_load_secret(path, create=create))


__all__ = [
    "DEFAULT_KEY_DIR",
    "CertificateRejectedError",
    "DelegatedSigningKey",
    "KeyFileError",
    "KeyRevokedError",
    "PendingRotation",
    "read_audit_row_key",
]
