"""The central client over HTTP: RFC 9421-signed requests to ``msp-central``.

It implements :class:`msp_agent.central.CentralClient` for the components
(audit sync, evidence, escalations, bundles, certificates) and adds what
the runtime needs besides (revocations, heartbeat). Outcomes are sorted as
the components expect:

- no answer, a 5xx or a 429: :class:`CentralUnavailable` (retry later;
  every request is idempotent on the server);
- any other 4xx: :class:`CentralRejected` with the problem document's code
  and its other members (``server_size`` of a stale sync, for one).

The appliance holds no bearer secret: each request is signed by the key
``signing_key()`` returns at that moment, so a rotation takes effect on the
next request.

The signature covers the request's URL (RFC 9421 ``@target-uri``), which the
server rebuilds from what arrived. So the URL is built once from the
normalised base URL (:mod:`msp_agent.central_url`), signed as that string and
sent as those bytes: the HTTP library is told it is already encoded and must
not rewrite it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import aiohttp
from multidict import CIMultiDict
from pydantic import TypeAdapter, ValidationError
from yarl import URL

from msp_agent.central import CentralRejected, CentralUnavailable, FetchedBundle
from msp_agent.central_url import normalize_central_url
from msp_agent.connectivity import Connectivity
from msp_protocol.bundle import BundleKind, Escalation
from msp_protocol.dsse import Envelope
from msp_protocol.encoding import Identifier
from msp_protocol.errors import MalformedError
from msp_protocol.httpsig import sign_request
from msp_protocol.keys import SigningKey
from msp_protocol.model import WireModel
from msp_protocol.sync import SyncRequest, SyncResponse

# A full audit batch is a few hundred kilobytes; a slow link may need a while,
# a dead one must not hold a sync loop for ever.
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=120, connect=15, sock_read=60)

PROBLEM_PREFIX = "urn:msp:problem:"
# Refusals a later attempt may not get: the request was dated outside the
# server's window (this appliance's clock is off), or its nonce collided.
# Treating them as final would set evidence and incidents aside for good.
RETRYABLE_REFUSALS = frozenset(
    {"stale-signature", "future-signature", "stale-request", "replayed-nonce"}
)
# A server (or a proxy in front of it) asking for a longer wait is obeyed only
# this far: the appliance must not fall silent for hours on one header.
MAX_RETRY_AFTER_SECONDS = 600.0
CLOCK_REFUSALS = frozenset({"stale-signature", "future-signature", "stale-request"})
_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)


class HttpCentralClient:
    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        *,
        signing_key: Callable[[], SigningKey],
        appliance_id: str | None = None,
        timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
        connectivity: Connectivity | None = None,
    ) -> None:
        # Normally already normalised (the settings are); doing it again
        # costs nothing and makes "signed as sent" hold for any caller.
        self.base_url = normalize_central_url(base_url)
        self.session = session
        self.signing_key = signing_key
        self.appliance_id = appliance_id
        self.timeout = timeout
        # Every request reports its outcome here (the link state).
        self.connectivity = connectivity or Connectivity()

    # --- CentralClient ----------------------------------------------------------------

    async def sync_audit(self, appliance_id: str, request: SyncRequest) -> SyncResponse:
        body = await self._call("POST", f"/api/v1/appliances/{appliance_id}/audit/sync", request)
        return _parse(SyncResponse, body)

    async def submit_evidence(self, envelope: Envelope) -> None:
        await self._call("POST", f"{self._appliance_path()}/evidence", envelope)

    async def escalate(self, escalation: Escalation) -> None:
        await self._call("POST", f"{self._appliance_path()}/escalations", escalation)

    async def fetch_bundle(self, kind: BundleKind, etag: str | None) -> FetchedBundle | None:
        status, headers, body = await self._send(
            "GET",
            f"{self._appliance_path()}/bundles/{kind.value}",
            None,
            {"If-None-Match": etag} if etag else {},
        )
        if status == 304:
            return None
        return FetchedBundle(_parse(Envelope, body), headers.get("ETag"))

    async def request_certificate(
        self, request: Envelope, *, enrollment_token: str | None = None
    ) -> Envelope:
        """Enroll (with the one-time token; the only unsigned request), or
        renew / rotate (signed by the current key)."""
        document = {"request": request.to_wire()}
        if enrollment_token is not None:
            body = await self._call(
                "POST", "/api/v1/enroll", {**document, "token": enrollment_token}, signed=False
            )
            answer = _json(body)
            self.appliance_id = _appliance_id(answer.get("appliance_id"))
        else:
            answer = _json(
                await self._call("POST", f"{self._appliance_path()}/certificates", document)
            )
        try:
            return Envelope.from_wire(answer.get("certificate"))
        except MalformedError as exc:
            raise CentralUnavailable(f"central server sent no certificate: {exc}") from None

    # --- beyond the components' protocol ------------------------------------------------

    async def fetch_revocations(self, etag: str | None) -> FetchedBundle | None:
        """The signed revocation list, or None when ``etag`` is current."""
        status, headers, body = await self._send(
            "GET", "/api/v1/revocations", None, {"If-None-Match": etag} if etag else {}
        )
        if status == 304:
            return None
        return FetchedBundle(_parse(Envelope, body), headers.get("ETag"))

    async def heartbeat(self, state: dict[str, Any]) -> dict[str, Any]:
        return _json(await self._call("POST", f"{self._appliance_path()}/heartbeat", state))

    # --- transport --------------------------------------------------------------------

    def _appliance_path(self) -> str:
        if self.appliance_id is None:
            raise CentralUnavailable("not enrolled yet: no appliance id")
        return f"/api/v1/appliances/{self.appliance_id}"

    async def _call(self, method: str, path: str, value: Any, *, signed: bool = True) -> bytes:
        _status, _headers, body = await self._send(method, path, value, {}, signed=signed)
        return body

    async def _send(
        self,
        method: str,
        path: str,
        value: Any,
        extra: dict[str, str],
        *,
        signed: bool = True,
    ) -> tuple[int, CIMultiDict[str], bytes]:
        body = b"" if value is None else _encode(value)
        # The signed string and the request line are the same bytes: ``path``
        # is built from identifiers that need no escaping.
        url = self.base_url + path
        headers = dict(extra)
        if body:
            headers["Content-Type"] = "application/json"
        if signed:
            headers.update(sign_request(self.signing_key(), method, url, body=body))
        try:
            async with self.session.request(
                method,
                URL(url, encoded=True),
                data=body or None,
                headers=headers,
                timeout=self.timeout,
            ) as response:
                payload = await response.read()
                status, answer_headers = response.status, CIMultiDict(response.headers)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            error = f"{method} {path}: {type(exc).__name__}: {exc}"
            self.connectivity.unavailable(error, server_answered=False)
            raise CentralUnavailable(error, timed_out=isinstance(exc, TimeoutError)) from None
        if status == 429 or status >= 500:
            wait = retry_after(answer_headers.get("Retry-After"))
            error = f"{method} {path}: HTTP {status}"
            if wait is not None:
                error += f", retry after {wait:g} s"
            self.connectivity.unavailable(error, server_answered=True)
            raise CentralUnavailable(error, retry_after=wait, status=status)
        if status >= 400:
            rejection = _rejected(status, payload, answer_headers.get("Content-Type", ""))
            if rejection is None:
                # Not the central server's answer (a proxy, a captive portal,
                # a filter): nothing was decided; never a reason to give up.
                error = f"{method} {path}: HTTP {status} from something other than the server"
                self.connectivity.unavailable(error, server_answered=False)
                raise CentralUnavailable(error)
            if rejection.code in RETRYABLE_REFUSALS:
                error = f"{method} {path}: refused ({rejection.code}): {rejection.detail}"
                self.connectivity.unavailable(error, server_answered=True)
                raise CentralUnavailable(error, code=rejection.code)
            self.connectivity.answered()
            raise rejection
        self.connectivity.answered()
        return status, answer_headers, payload


def retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """The wait a ``Retry-After`` field asks for (RFC 9110 §10.2.3: a number
    of seconds or an HTTP date), at most :data:`MAX_RETRY_AFTER_SECONDS`;
    None when there is none or it does not parse."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        seconds = float(int(text[:12]))
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; -0000 parses naive
            when = when.replace(tzinfo=UTC)
        seconds = max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
    return min(seconds, MAX_RETRY_AFTER_SECONDS)


def _appliance_id(value: Any) -> str:
    """The id enrollment assigned. It becomes part of every later request
    path, sent as is, so it must be an identifier (nothing to escape)."""
    try:
        return _IDENTIFIER.validate_python(value)
    except ValidationError:
        raise CentralUnavailable("central server sent no usable appliance id") from None


def _encode(value: Any) -> bytes:
    if hasattr(value, "canonical_bytes"):
        return bytes(value.canonical_bytes())
    return json.dumps(value, separators=(",", ":")).encode()


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        raise CentralUnavailable(
            "central server answered with something that is not JSON"
        ) from None
    if not isinstance(value, dict):
        raise CentralUnavailable("central server answered with JSON that is not an object")
    return value


ModelT = TypeVar("ModelT", bound=WireModel)


def _parse(model: type[ModelT], body: bytes) -> ModelT:
    try:
        return model.from_json(body)
    except MalformedError as exc:
        raise CentralUnavailable(f"central server answered with a bad document: {exc}") from None


def _rejected(status: int, payload: bytes, content_type: str) -> CentralRejected | None:
    """The central server's refusal, or None when the answer is not one of
    its problem documents (RFC 9457, ``type`` ``urn:msp:problem:<code>``)."""
    if not content_type.startswith("application/problem+json"):
        return None
    try:
        problem = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(problem, dict) or not str(problem.get("type", "")).startswith(PROBLEM_PREFIX):
        return None
    code = str(problem["type"])[len(PROBLEM_PREFIX) :] or f"http-{status}"
    extra = {
        key: value
        for key, value in problem.items()
        if key not in ("type", "title", "status", "detail", "code", "instance")
    }
    return CentralRejected(status, code, str(problem.get("detail", "")), extra)
