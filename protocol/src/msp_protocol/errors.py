"""Errors, grouped by who is at fault.

- :class:`MalformedError`: the input did not parse (bad JSON, a field of the
  wrong shape, a header that is not a structured field). Nothing was checked.
- :class:`VerificationError`: the input parsed but does not verify (tampered,
  expired, unsigned, replayed). This is the family a security alert is raised for.
- :class:`UsageError`: the caller misused the API (an index outside the tree, a
  threshold of zero). A bug on our side, never the remote's.

Every class carries a stable ``code``: the central server turns it into the
``type`` of an RFC 9457 problem, tools print it, tests match on it. Messages
are short and specific ("inclusion proof has wrong length: expected 7, got 6").
Transport failures belong to the agent and the server, not to this package.
"""

from __future__ import annotations

from typing import ClassVar


class ProtocolError(Exception):
    """Base of every error this package raises."""

    code: ClassVar[str] = "protocol-error"

    @property
    def message(self) -> str:
        return str(self)


# --- the input did not parse ---------------------------------------------------


class MalformedError(ProtocolError, ValueError):
    """The input is not well-formed: it never reached verification."""

    code = "malformed"


class JSONError(MalformedError):
    """Untrusted JSON that the strict parser refuses."""

    code = "malformed-json"


class EncodingError(MalformedError):
    """A hex, base64 or timestamp string that is not in its one accepted form."""

    code = "malformed-encoding"


class ModelError(MalformedError):
    """JSON that parsed but does not match the document's schema."""

    code = "malformed-document"


class SignatureHeaderError(MalformedError):
    """An RFC 9421 / RFC 9530 header that is missing or does not parse."""

    code = "malformed-signature-header"


# --- the input parsed but does not verify --------------------------------------


class VerificationError(ProtocolError):
    """The input is well-formed but must not be trusted."""

    code = "verification-failed"


class PayloadTypeError(VerificationError):
    """A signed document of another kind than the one the caller asked for."""

    code = "wrong-payload-type"


class SignatureError(VerificationError):
    """No valid signature by a key the verifier trusts."""

    code = "bad-signature"


class UnknownKeyError(VerificationError):
    """The signer's key id is not one the verifier knows."""

    code = "unknown-key"


class CertificateError(VerificationError):
    """A delegation certificate that does not authorise what it is used for."""

    code = "bad-certificate"


class CertificateExpiredError(CertificateError):
    code = "certificate-expired"


class CertificateNotYetValidError(CertificateError):
    code = "certificate-not-yet-valid"


class ScopeError(CertificateError):
    code = "scope-not-granted"


class IssuerError(CertificateError):
    code = "wrong-issuer"


class SubjectError(CertificateError):
    """The certificate names another appliance, site or key than the one at hand."""

    code = "wrong-subject"


class RevokedError(CertificateError):
    code = "certificate-revoked"


class RollbackError(VerificationError):
    """A signed document older than the one already trusted."""

    code = "rollback"


class ProofError(VerificationError):
    """A Merkle inclusion or consistency proof that does not hold."""

    code = "bad-proof"


class InclusionProofError(ProofError):
    code = "bad-inclusion-proof"


class ConsistencyProofError(ProofError):
    code = "bad-consistency-proof"


class CheckpointError(VerificationError):
    """A log checkpoint that does not match the log it claims to describe."""

    code = "bad-checkpoint"


class LogEntryError(VerificationError):
    """A log entry out of place (wrong index, missing genesis, a gap)."""

    code = "bad-log-entry"


class UnsignedEntriesError(LogEntryError):
    """Entries that no checkpoint covers: appended behind the signer's back."""

    code = "unsigned-entries"


class EvidenceError(VerificationError):
    """An evidence bundle inconsistent with its signer or its log entry."""

    code = "bad-evidence"


class SummaryError(VerificationError):
    """A summary that says something other than the signed documents beside it."""

    code = "bad-summary"


class RequestSignatureError(VerificationError):
    """An RFC 9421 request signature that does not verify."""

    code = "bad-request-signature"


class MissingComponentError(RequestSignatureError):
    code = "signature-missing-component"


class StaleSignatureError(RequestSignatureError):
    code = "stale-signature"


class FutureSignatureError(RequestSignatureError):
    code = "future-signature"


class ReplayedNonceError(RequestSignatureError):
    code = "replayed-nonce"


class ContentDigestError(RequestSignatureError):
    code = "content-digest-mismatch"


class StaleRequestError(VerificationError):
    """A signed request document (enrolment, renewal) outside its freshness window."""

    code = "stale-request"


# --- the caller misused the API ------------------------------------------------


class UsageError(ProtocolError, ValueError):
    """The caller passed arguments that can never be right."""

    code = "usage"
