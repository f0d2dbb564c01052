"""RFC 9421 HTTP Message Signatures (ed25519) and RFC 9530 Content-Digest.

Two layers:

- The general mechanism: the signature base of §2.5 over any mix of derived
  components (``@method``, ``@target-uri``, ``@authority``, ``@scheme``,
  ``@request-target``, ``@path``, ``@query``) and header fields, signing and
  verifying with Ed25519 (§3.3.6). This is what the RFC's own test vector
  (Appendix B.2.6) exercises.
- The appliance profile on top of it, which every request from an appliance
  uses and the central server enforces: covered components ``@method``,
  ``@target-uri`` and, when there is a body, ``content-digest`` (SHA-256);
  parameters ``created``, ``nonce`` and ``keyid`` (the appliance key id). A
  signature older than the limit or from the future is refused, and so is a
  nonce the caller has seen. The appliance holds no bearer secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from msp_protocol.encoding import utc_now
from msp_protocol.errors import (
    ContentDigestError,
    FutureSignatureError,
    MissingComponentError,
    ReplayedNonceError,
    RequestSignatureError,
    SignatureError,
    SignatureHeaderError,
    StaleSignatureError,
    UnknownKeyError,
)
from msp_protocol.keys import SigningKey, VerifyKey
from msp_protocol.limits import DEFAULT_LIMITS, Limits
from msp_protocol.sfv import (
    BareItem,
    InnerList,
    Item,
    Params,
    parse_dictionary,
    serialize_dictionary,
    serialize_inner_list,
)

LABEL = "msp"
DERIVED = frozenset(
    {"@method", "@target-uri", "@authority", "@scheme", "@request-target", "@path", "@query"}
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_KNOWN_PARAMS = frozenset({"created", "expires", "nonce", "alg", "keyid", "tag"})

HeaderInput = Mapping[str, str] | Iterable[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """What a signature over a request can cover. Header names are matched
    case-insensitively; a field sent on several lines is joined by ", "."""

    method: str
    target_uri: str
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(cls, method: str, target_uri: str, headers: HeaderInput = ()) -> HttpRequest:
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        return cls(method, target_uri, tuple((name.lower(), value) for name, value in pairs))

    def field(self, name: str) -> str | None:
        values = [value.strip(" \t") for key, value in self.headers if key == name]
        return ", ".join(values) if values else None


# --- RFC 9530 -------------------------------------------------------------------


def content_digest(body: bytes) -> str:
    """The Content-Digest field value for ``body`` (sha-256)."""
    return serialize_dictionary({"sha-256": Item(hashlib.sha256(body).digest())})


def check_content_digest(header: str, body: bytes) -> None:
    """Raise unless the field carries a sha-256 digest equal to the body's.

    Other algorithms present beside sha-256 are ignored; sha-256 is required.
    """
    if not hmac.compare_digest(_sha256_digest(header), hashlib.sha256(body).digest()):
        raise ContentDigestError("Content-Digest does not match the body")


def _sha256_digest(header: str) -> bytes:
    """The sha-256 member of a Content-Digest field value."""
    digest = parse_dictionary(header).get("sha-256")
    if not isinstance(digest, Item) or not isinstance(digest.value, bytes):
        raise SignatureHeaderError("Content-Digest has no sha-256 byte sequence")
    return digest.value


# --- RFC 9421 §2: components and the signature base -------------------------------


def component_value(name: str, request: HttpRequest) -> str:
    """The value of one covered component (no component parameters supported)."""
    if name in DERIVED:
        return _derived(name, request)
    if name.startswith("@"):
        raise SignatureHeaderError(f"unsupported derived component {name}")
    value = request.field(name)
    if value is None:
        raise MissingComponentError(f"covered header field {name} is absent from the request")
    return value


def _derived(name: str, request: HttpRequest) -> str:
    if name == "@method":
        return request.method
    if name == "@target-uri":
        return request.target_uri
    parts = urlsplit(request.target_uri)
    if name == "@scheme":
        return parts.scheme.lower()
    if name == "@authority":
        host = (parts.hostname or "").lower()
        if ":" in host:
            host = f"[{host}]"
        port = parts.port
        return (
            host if port in (None, _DEFAULT_PORTS.get(parts.scheme.lower())) else f"{host}:{port}"
        )
    path = parts.path or "/"
    if name == "@path":
        return path
    if name == "@query":
        return f"?{parts.query}"
    # @request-target
    return f"{path}?{parts.query}" if parts.query else path


def signature_params(components: Sequence[str], params: Params) -> InnerList:
    return InnerList(tuple(Item(name) for name in components), dict(params))


def signature_base(components: Sequence[str], params: Params, request: HttpRequest) -> bytes:
    """RFC 9421 §2.5: one line per covered component, then @signature-params."""
    lines = []
    for name in components:
        if name == "@signature-params":
            raise SignatureHeaderError("@signature-params cannot be a covered component")
        value = component_value(name, request)
        if "\n" in value or "\r" in value:
            raise SignatureHeaderError(f"component {name} holds a line break")
        lines.append(f'"{name}": {value}')
    lines.append(
        f'"@signature-params": {serialize_inner_list(signature_params(components, params))}'
    )
    return "\n".join(lines).encode("ascii", errors="strict")


def sign_message(
    key: SigningKey,
    request: HttpRequest,
    *,
    components: Sequence[str],
    params: Params,
    label: str = LABEL,
) -> dict[str, str]:
    """Sign ``request``; return the Signature-Input and Signature fields to add."""
    base = signature_base(components, params, request)
    signature = key.sign(base)
    return {
        "Signature-Input": serialize_dictionary({label: signature_params(components, params)}),
        "Signature": serialize_dictionary({label: Item(signature)}),
    }


@dataclass(frozen=True, slots=True)
class ParsedSignature:
    """One signature of a message, parsed from its two header fields."""

    label: str
    components: tuple[str, ...]
    params: Params
    signature: bytes

    def param(self, name: str) -> BareItem | None:
        return self.params.get(name)


def parse_signature(
    request: HttpRequest, *, label: str | None = None, limits: Limits = DEFAULT_LIMITS
) -> ParsedSignature:
    """Read the signature labelled ``label`` (or the only one) from the request."""
    input_field = request.field("signature-input")
    signature_field = request.field("signature")
    if input_field is None or signature_field is None:
        raise SignatureHeaderError("request has no Signature-Input and Signature fields")
    for name, field_value in (("Signature-Input", input_field), ("Signature", signature_field)):
        if len(field_value) > limits.max_signature_header_bytes:
            raise SignatureHeaderError(
                f"{name} field is longer than {limits.max_signature_header_bytes}"
            )
    inputs = parse_dictionary(input_field)
    signatures = parse_dictionary(signature_field)
    if label is None:
        if len(inputs) != 1:
            raise SignatureHeaderError(f"expected one signature, found {len(inputs)}")
        label = next(iter(inputs))
    entry = inputs.get(label)
    value = signatures.get(label)
    if not isinstance(entry, InnerList):
        raise SignatureHeaderError(f"Signature-Input has no inner list labelled {label!r}")
    if not isinstance(value, Item) or not isinstance(value.value, bytes):
        raise SignatureHeaderError(f"Signature has no byte sequence labelled {label!r}")
    if len(entry.items) > limits.max_covered_components:
        raise SignatureHeaderError(
            f"signature covers more than {limits.max_covered_components} components"
        )
    components: list[str] = []
    for item in entry.items:
        if type(item.value) is not str:  # a Token is a str subclass: not allowed here
            raise SignatureHeaderError("a covered component is not a string")
        if item.params:
            raise SignatureHeaderError(f"component parameters are not supported ({item.value})")
        if item.value != item.value.lower():
            raise SignatureHeaderError(f"component name {item.value!r} is not lowercase")
        if item.value in components:
            raise SignatureHeaderError(f"component {item.value} is covered twice")
        components.append(item.value)
    return ParsedSignature(label, tuple(components), dict(entry.params), value.value)


def verify_message_signature(parsed: ParsedSignature, request: HttpRequest, key: VerifyKey) -> None:
    """Rebuild the signature base and check the Ed25519 signature over it."""
    base = signature_base(parsed.components, parsed.params, request)
    try:
        key.verify(base, parsed.signature)
    except SignatureError as exc:
        raise RequestSignatureError(f"request signature does not verify: {exc}") from None


# --- the appliance profile ------------------------------------------------------------


def sign_request(
    key: SigningKey,
    method: str,
    target_uri: str,
    *,
    headers: HeaderInput = (),
    body: bytes = b"",
    created: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Sign an appliance request; return the fields to add (Content-Digest
    when there is a body, Signature-Input, Signature)."""
    added: dict[str, str] = {}
    components = ["@method", "@target-uri"]
    if body:
        added["Content-Digest"] = content_digest(body)
        components.append("content-digest")
    base_headers = list(headers.items() if isinstance(headers, Mapping) else headers) + list(
        added.items()
    )
    request = HttpRequest.build(method, target_uri, base_headers)
    params: Params = {
        "created": int(utc_now().timestamp()) if created is None else created,
        "nonce": nonce or secrets.token_hex(16),
        "keyid": key.key_id,
    }
    added.update(sign_message(key, request, components=components, params=params))
    return added


@dataclass(frozen=True, slots=True)
class AuthenticatedRequest:
    """What the profile check established: who signed, and when."""

    key_id: str
    created: int
    nonce: str


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """A request whose signature parsed and is fresh, before key lookup."""

    parsed: ParsedSignature
    request: HttpRequest
    key_id: str
    created: int
    nonce: str


def inspect_headers(
    request: HttpRequest,
    *,
    has_body: bool,
    now: datetime | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> PendingRequest:
    """The profile checks (1)-(4) and the header half of (5), which need
    neither key, state nor body: a server runs them before it reads a body,
    so that an unsigned or stale request costs it no more than its headers.

    (1) the two signature fields exist and parse, with our label — malformed input;
    (2) @method and @target-uri are covered, and content-digest whenever there
        is a body (``has_body``) — a signature that leaves the method, URL or
        body free to change;
    (3) created, nonce and keyid are present, alg if present is ed25519, no
        unknown parameters — algorithm confusion, unbounded replay;
    (4) created is no older than the limit and not in the future (with skew);
        expires, if present, has not passed — replay of old captures;
    (5a) with a body, or content-digest covered, the Content-Digest field is
        there and holds a sha-256 byte sequence.
    """
    parsed = parse_signature(request, label=LABEL, limits=limits)  # (1)
    required = ["@method", "@target-uri"] + (["content-digest"] if has_body else [])  # (2)
    missing = [name for name in required if name not in parsed.components]
    if missing:
        raise MissingComponentError(f"signature does not cover {', '.join(missing)}")
    unknown = set(parsed.params) - _KNOWN_PARAMS  # (3)
    if unknown:
        raise SignatureHeaderError(f"unknown signature parameter {sorted(unknown)[0]}")
    created, nonce, keyid = (parsed.param(name) for name in ("created", "nonce", "keyid"))
    if type(created) is not int:
        raise SignatureHeaderError("signature parameter created is missing or not an integer")
    if type(nonce) is not str or not 16 <= len(nonce) <= 128:
        raise SignatureHeaderError(
            "signature parameter nonce is missing or not a 16-128 char string"
        )
    if type(keyid) is not str or not keyid:
        raise SignatureHeaderError("signature parameter keyid is missing or not a string")
    alg = parsed.param("alg")
    if alg is not None and alg != "ed25519":
        raise SignatureHeaderError(f"signature algorithm {alg!r} is not ed25519")
    moment = int((now or utc_now()).timestamp())  # (4)
    if created < moment - int(limits.max_signature_age.total_seconds()):
        raise StaleSignatureError(f"signature created {moment - created} s ago")
    if created > moment + int(limits.clock_skew.total_seconds()):
        raise FutureSignatureError(f"signature created {created - moment} s in the future")
    expires = parsed.param("expires")
    if expires is not None and (type(expires) is not int or expires < moment):
        raise StaleSignatureError("signature has expired")
    if has_body or "content-digest" in parsed.components:  # (5a)
        _sha256_digest(_digest_field(request))
    return PendingRequest(parsed, request, keyid, created, nonce)


def check_body(pending: PendingRequest, body: bytes) -> None:
    """(5) the body matches its Content-Digest — a body changed after signing.

    Run on every request once its body is read, whatever
    :func:`inspect_headers` was told about the body beforehand."""
    if body or "content-digest" in pending.parsed.components:
        check_content_digest(_digest_field(pending.request), body)


def _digest_field(request: HttpRequest) -> str:
    digest_field = request.field("content-digest")
    if digest_field is None:
        raise MissingComponentError("request with a body has no Content-Digest")
    return digest_field


def inspect_request(
    request: HttpRequest,
    body: bytes,
    *,
    now: datetime | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> PendingRequest:
    """Profile checks that need no key and no state: (1)-(4) of
    :func:`inspect_headers` for this body, then (5) :func:`check_body`."""
    pending = inspect_headers(request, has_body=bool(body), now=now, limits=limits)
    check_body(pending, body)
    return pending


def _authenticate(pending: PendingRequest, key: VerifyKey | None) -> None:
    """(6) the key id names a known key, and it is the key the caller resolved
    — forged key ids; (7) the Ed25519 signature over the rebuilt base holds —
    forgery, a path or method changed after signing."""
    if key is None or key.key_id != pending.key_id:  # (6)
        raise UnknownKeyError(f"unknown key id {pending.key_id[:32]}")
    verify_message_signature(pending.parsed, pending.request, key)  # (7)


def _accept(pending: PendingRequest, nonce_seen: bool) -> AuthenticatedRequest:
    """(8) the nonce was not seen before — replay within the freshness window.

    The nonce is recorded only after (7) passed, so forged requests cannot
    use up an appliance's nonces."""
    if nonce_seen:
        raise ReplayedNonceError(f"nonce {pending.nonce[:32]} was already used")
    return AuthenticatedRequest(pending.key_id, pending.created, pending.nonce)


def verify_request(
    request: HttpRequest,
    body: bytes,
    *,
    resolve_key: Callable[[str], VerifyKey | None],
    nonce_seen: Callable[[str, str, int], bool],
    now: datetime | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> AuthenticatedRequest:
    """Check an appliance request end to end (steps (1)-(8)).

    ``resolve_key(key_id)`` returns the appliance key or None;
    ``nonce_seen(key_id, nonce, created)`` must atomically record the nonce
    in the store every server replica shares and return whether it was
    already there.
    """
    pending = inspect_request(request, body, now=now, limits=limits)
    _authenticate(pending, resolve_key(pending.key_id))
    return _accept(pending, nonce_seen(pending.key_id, pending.nonce, pending.created))


async def averify_headers(
    request: HttpRequest,
    *,
    has_body: bool,
    resolve_key: Callable[[str], Awaitable[VerifyKey | None]],
    now: datetime | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> PendingRequest:
    """Steps (1)-(4), (5a), (6) and (7) of an appliance request, from its
    headers alone: the signature base covers the Content-Digest field, not
    the body, so an unsigned, stale or forged request is refused before a
    byte of its body is read. Nothing is recorded (no nonce): the caller
    reads the body and then runs :func:`averify_request` in full."""
    pending = inspect_headers(request, has_body=has_body, now=now, limits=limits)
    _authenticate(pending, await resolve_key(pending.key_id))
    return pending


async def averify_request(
    request: HttpRequest,
    body: bytes,
    *,
    resolve_key: Callable[[str], Awaitable[VerifyKey | None]],
    nonce_seen: Callable[[str, str, int], Awaitable[bool]],
    now: datetime | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> AuthenticatedRequest:
    """:func:`verify_request` for callers whose key and nonce stores are async."""
    pending = inspect_request(request, body, now=now, limits=limits)
    _authenticate(pending, await resolve_key(pending.key_id))
    return _accept(pending, await nonce_seen(pending.key_id, pending.nonce, pending.created))


__all__ = [
    "AuthenticatedRequest",
    "HttpRequest",
    "ParsedSignature",
    "averify_headers",
    "averify_request",
    "check_body",
    "check_content_digest",
    "content_digest",
    "inspect_headers",
    "inspect_request",
    "parse_signature",
    "sign_message",
    "sign_request",
    "signature_base",
    "verify_message_signature",
    "verify_request",
]
