"""RFC 9457 problem documents: one stable ``type`` per cause.

Handlers and queries raise :class:`Problem`; the middleware in
:mod:`msp_central.app` turns it (and any protocol error that escaped) into an
``application/problem+json`` response. The ``type`` of a problem is
``urn:msp:problem:<code>``; ``code`` is repeated as a member so a client can
switch on it without parsing the URN.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from msp_protocol.canonical import canonicalize
from msp_protocol.errors import MalformedError, ProtocolError, VerificationError

PROBLEM_TYPE_PREFIX = "urn:msp:problem:"
CONTENT_TYPE = "application/problem+json"

# code -> (HTTP status, title). Protocol error codes (msp_protocol.errors) are
# listed too, with the status a request failing that way gets.
PROBLEMS: dict[str, tuple[int, str]] = {
    # requests
    "malformed": (400, "The request did not parse"),
    "malformed-json": (400, "The request body is not valid JSON"),
    "malformed-encoding": (400, "A value is not in its canonical encoding"),
    "malformed-document": (400, "The request body is not a valid document"),
    "malformed-query": (400, "A query parameter is not valid"),
    "body-too-large": (413, "The request body is too large"),
    "header-too-large": (431, "A request line or header field is too large"),
    "server-busy": (503, "The server is busy; retry later"),
    "database-unavailable": (503, "The server's database does not answer; retry later"),
    "shutting-down": (503, "The server is shutting down; use another replica"),
    "unsupported-media-type": (415, "The request body must be application/json"),
    "not-found": (404, "No such resource"),
    "method-not-allowed": (405, "Method not allowed"),
    "conflict": (409, "The request conflicts with what is stored"),
    "export-too-large": (422, "The export asked for is larger than one file may be"),
    "internal-error": (500, "Internal server error"),
    # partner and admin authentication
    "missing-credentials": (401, "Credentials are required"),
    "bad-credentials": (401, "The API key is not valid"),
    "forbidden": (403, "The caller may not do this"),
    # appliance authentication (RFC 9421)
    "malformed-signature-header": (401, "The request signature headers do not parse"),
    "signature-missing-component": (401, "The request signature does not cover what it must"),
    "stale-signature": (401, "The request signature is too old"),
    "future-signature": (401, "The request signature is dated in the future"),
    "replayed-nonce": (401, "The request signature's nonce was already used"),
    "content-digest-mismatch": (401, "The body does not match its Content-Digest"),
    "unknown-key": (401, "The request is signed by an unknown key"),
    "bad-signature": (401, "The request signature does not verify"),
    "bad-request-signature": (401, "The request signature is not valid"),
    "appliance-revoked": (403, "The appliance's certificate is revoked"),
    "wrong-appliance": (403, "The request is signed by another appliance's key"),
    # enrollment and delegation
    "bad-enrollment-token": (403, "The enrollment token is unknown, used or expired"),
    "delegation-request-refused": (422, "The delegation request does not verify"),
    "stale-request": (422, "The delegation request is too old or in the future"),
    # witnessed audit sync
    "stale-size": (409, "The batch does not start where the server's log ends"),
    "rewrite": (422, "An entry differs from the one witnessed at that index"),
    "truncated-history": (422, "The log is shorter than what was witnessed"),
    "bad-checkpoint": (422, "The checkpoint does not verify against the batch"),
    "bad-consistency-proof": (422, "The consistency proof does not hold"),
    "bad-log-entry": (422, "A log entry is out of place"),
    "batch-too-large": (413, "The batch has too many entries"),
    "certificate-revoked": (422, "Signed by a revoked certificate past its cutoff"),
    "certificate-not-yet-valid": (422, "Signed by a certificate not yet valid"),
    "verification-failed": (422, "The document does not verify"),
    "wrong-payload-type": (422, "The envelope has the wrong payload type"),
    "wrong-issuer": (422, "The document names the wrong issuer"),
    "wrong-subject": (422, "The document is for another appliance or site"),
    "scope-not-granted": (422, "The certificate does not grant this scope"),
    "bad-certificate": (422, "The certificate does not verify"),
    "certificate-expired": (422, "The certificate has expired"),
    "bad-proof": (422, "A proof does not hold"),
    "bad-inclusion-proof": (422, "The inclusion proof does not hold"),
    "rollback": (422, "The document is older than one already held"),
    # evidence and escalations
    "bad-evidence": (422, "The evidence bundle does not verify"),
    "evidence-not-in-log": (422, "The evidence bundle differs from its audit entry"),
    "escalation-conflict": (409, "Another escalation was stored under this id"),
    # notifications
    "bad-webhook-url": (400, "The webhook URL is not an http(s) URL"),
    "smtp-not-configured": (409, "The server has no SMTP server to send e-mail through"),
    # The partner console's sessions.
    "session-expired": (401, "The console session has ended; sign in again"),
    "csrf-failed": (403, "The request did not come from the console's own page"),
    "too-many-attempts": (429, "Too many failed attempts; wait before trying again"),
}


class Problem(Exception):
    """An error answered as problem+json. ``extra`` members are added to the
    document (for example ``server_size`` of a stale sync)."""

    def __init__(self, code: str, detail: str, *, status: int | None = None, **extra: Any):
        if code not in PROBLEMS:
            raise ValueError(f"unregistered problem code {code}")
        super().__init__(detail)
        self.code = code
        self.status = status or PROBLEMS[code][0]
        self.detail = detail
        self.extra = extra

    @classmethod
    def from_protocol(cls, error: ProtocolError, **extra: Any) -> Problem:
        code = error.code if error.code in PROBLEMS else _family(error)
        return cls(code, str(error), **extra)


def _family(error: ProtocolError) -> str:
    if isinstance(error, MalformedError):
        return "malformed"
    if isinstance(error, VerificationError):
        return "verification-failed"
    return "internal-error"


def problem_response(problem: Problem, instance: str | None = None) -> web.Response:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + problem.code,
        "title": PROBLEMS[problem.code][1],
        "status": problem.status,
        "detail": problem.detail,
        "code": problem.code,
    }
    if instance:
        body["instance"] = instance
    body.update(problem.extra)
    headers = {}
    if problem.code in ("missing-credentials", "bad-credentials"):
        headers["WWW-Authenticate"] = 'Bearer realm="msp-central"'
    if isinstance(problem.extra.get("retry_after"), int):
        headers["Retry-After"] = str(problem.extra["retry_after"])
    return web.Response(
        status=problem.status, body=canonicalize(body), content_type=CONTENT_TYPE, headers=headers
    )
