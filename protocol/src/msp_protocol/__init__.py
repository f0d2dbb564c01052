"""msp_protocol: the wire contract of the MSP compliance appliance.

Pure: no network, no disk (the auditor's command aside). Modules, bottom up:

- :mod:`~msp_protocol.canonical` — RFC 8785 canonical JSON, strict JSON parsing
- :mod:`~msp_protocol.encoding` — hex, base64, RFC 3339 times, field types
- :mod:`~msp_protocol.keys` — Ed25519 keys and key ids
- :mod:`~msp_protocol.dsse` — DSSE envelopes (every signed document)
- :mod:`~msp_protocol.delegation` — delegation certificates, requests, revocations
- :mod:`~msp_protocol.merkle` — the RFC 6962 tree, proofs, compact tree state
- :mod:`~msp_protocol.log` — audit entries, checkpoints, receipts, log replay
- :mod:`~msp_protocol.evidence` — evidence bundles and their log inclusion
- :mod:`~msp_protocol.sync` — the audit sync batch and the witness's check of it
- :mod:`~msp_protocol.export` — audit and evidence exports, verified offline
- :mod:`~msp_protocol.summary` — an auditor package's per-control summary, one rule
- :mod:`~msp_protocol.package` — the auditor package (a site's evidence for a period)
- :mod:`~msp_protocol.central_log` — the central server's own log, its export, record proofs
- :mod:`~msp_protocol.bundle` — signed config bundles, escalations
- :mod:`~msp_protocol.httpsig` — RFC 9421 request signatures, RFC 9530 digests
- :mod:`~msp_protocol.errors`, :mod:`~msp_protocol.limits`, :mod:`~msp_protocol.result`

:mod:`~msp_protocol.verify_cli` is the ``msp-verify`` command, the one module
that reads files.
"""

from msp_protocol.errors import MalformedError, ProtocolError, UsageError, VerificationError
from msp_protocol.limits import DEFAULT_LIMITS, Limits
from msp_protocol.result import Result

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LIMITS",
    "Limits",
    "MalformedError",
    "ProtocolError",
    "Result",
    "UsageError",
    "VerificationError",
    "__version__",
]
