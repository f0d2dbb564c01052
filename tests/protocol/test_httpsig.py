"""RFC 9421 request signatures and RFC 9530 Content-Digest."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from datetime import timedelta

import pytest

from msp_protocol import errors
from msp_protocol.httpsig import (
    HttpRequest,
    averify_request,
    content_digest,
    parse_signature,
    sign_message,
    sign_request,
    signature_base,
    verify_message_signature,
    verify_request,
)
from msp_protocol.keys import SigningKey, VerifyKey
from msp_protocol.sfv import parse_dictionary
from tests.protocol.support import NOW, key

# RFC 9421 Appendix B.1.4, test-key-ed25519 (PKCS#8 / SPKI DER, base64).
RFC_PRIVATE = "MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF"
RFC_PUBLIC = "MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs="

# RFC 9421 Appendix B.2, test-request.
RFC_REQUEST = HttpRequest.build(
    "POST",
    "https://example.com/foo?param=Value&Pet=dog",
    [
        ("Host", "example.com"),
        ("Date", "Tue, 20 Apr 2021 02:07:55 GMT"),
        ("Content-Type", "application/json"),
        (
            "Content-Digest",
            "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:",
        ),
        ("Content-Length", "18"),
    ],
)
RFC_BODY = b'{"hello": "world"}'

# RFC 9421 Appendix B.2.6.
B26_COMPONENTS = ["date", "@method", "@path", "@authority", "content-type", "content-length"]
B26_PARAMS: dict[str, int | str] = {"created": 1618884473, "keyid": "test-key-ed25519"}
B26_BASE = (
    '"date": Tue, 20 Apr 2021 02:07:55 GMT\n'
    '"@method": POST\n'
    '"@path": /foo\n'
    '"@authority": example.com\n'
    '"content-type": application/json\n'
    '"content-length": 18\n'
    '"@signature-params": ("date" "@method" "@path" "@authority" "content-type" '
    '"content-length");created=1618884473;keyid="test-key-ed25519"'
)
B26_SIGNATURE_INPUT = (
    'sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length")'
    ';created=1618884473;keyid="test-key-ed25519"'
)
B26_SIGNATURE = "sig-b26=:wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw==:"


def rfc_keys() -> tuple[SigningKey, VerifyKey]:
    # The last 32 bytes of both DER structures are the raw seed / public key.
    private = SigningKey(base64.b64decode(RFC_PRIVATE)[-32:])
    public = VerifyKey(base64.b64decode(RFC_PUBLIC)[-32:])
    assert private.verify_key == public
    return private, public


def test_rfc9421_b26_signature_base() -> None:
    assert signature_base(B26_COMPONENTS, B26_PARAMS, RFC_REQUEST).decode() == B26_BASE


def test_rfc9421_b26_our_signer_reproduces_the_rfc_signature() -> None:
    private, _ = rfc_keys()
    fields = sign_message(
        private, RFC_REQUEST, components=B26_COMPONENTS, params=B26_PARAMS, label="sig-b26"
    )
    assert fields == {"Signature-Input": B26_SIGNATURE_INPUT, "Signature": B26_SIGNATURE}


def test_rfc9421_b26_our_verifier_accepts_the_rfc_signature() -> None:
    _, public = rfc_keys()
    signed = HttpRequest.build(
        RFC_REQUEST.method,
        RFC_REQUEST.target_uri,
        [
            *RFC_REQUEST.headers,
            ("Signature-Input", B26_SIGNATURE_INPUT),
            ("Signature", B26_SIGNATURE),
        ],
    )
    parsed = parse_signature(signed, label="sig-b26")
    assert parsed.components == tuple(B26_COMPONENTS)
    verify_message_signature(parsed, signed, public)


def test_rfc9421_b26_verifier_refuses_a_changed_component() -> None:
    _, public = rfc_keys()
    signed = HttpRequest.build(
        RFC_REQUEST.method,
        "https://example.com/bar",
        [
            *RFC_REQUEST.headers,
            ("Signature-Input", B26_SIGNATURE_INPUT),
            ("Signature", B26_SIGNATURE),
        ],
    )
    with pytest.raises(errors.RequestSignatureError, match="does not verify"):
        verify_message_signature(parse_signature(signed), signed, public)


def test_rfc9530_content_digest_of_the_rfc_example() -> None:
    # RFC 9530 §2 example, sha-256 of {"hello": "world"}.
    assert content_digest(RFC_BODY) == "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"


# --- the appliance profile ---------------------------------------------------------

URL = "https://central.example/api/v1/audit/appliance-1/sync"
BODY = b'{"entries":[]}'


class NonceStore:
    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, key_id: str, nonce: str, created: int) -> bool:
        known = (key_id, nonce) in self.seen
        self.seen.add((key_id, nonce))
        return known


def signed(
    signer: SigningKey,
    *,
    method: str = "POST",
    url: str = URL,
    body: bytes = BODY,
    created: int | None = None,
    nonce: str | None = None,
) -> list[tuple[str, str]]:
    fields = sign_request(
        signer,
        method,
        url,
        body=body,
        created=int(NOW.timestamp()) if created is None else created,
        nonce=nonce,
    )
    return [("Content-Type", "application/json"), *fields.items()]


def check(
    headers: list[tuple[str, str]],
    *,
    method: str = "POST",
    url: str = URL,
    body: bytes = BODY,
    keys: tuple[VerifyKey, ...] = (),
    nonces: Callable[[str, str, int], bool] | None = None,
    now_offset: timedelta = timedelta(0),
) -> str:
    known = {k.key_id: k for k in keys}
    result = verify_request(
        HttpRequest.build(method, url, headers),
        body,
        resolve_key=known.get,
        nonce_seen=nonces or NonceStore(),
        now=NOW + now_offset,
    )
    return result.key_id


def test_profile_accepts_a_fresh_signed_request() -> None:
    device = key(7)
    assert check(signed(device), keys=(device.verify_key,)) == device.key_id


def test_profile_signs_method_uri_and_digest_with_created_nonce_keyid() -> None:
    device = key(7)
    fields = dict(signed(device, nonce="0123456789abcdef0123456789abcdef"))
    assert fields["Signature-Input"] == (
        'msp=("@method" "@target-uri" "content-digest")'
        f';created={int(NOW.timestamp())};nonce="0123456789abcdef0123456789abcdef"'
        f';keyid="{device.key_id}"'
    )
    assert "sha-256" in parse_dictionary(fields["Content-Digest"])


def test_profile_without_body_covers_no_digest() -> None:
    device = key(7)
    headers = signed(device, method="GET", body=b"")
    assert "content-digest" not in dict(headers)["Signature-Input"]
    assert check(headers, method="GET", body=b"", keys=(device.verify_key,)) == device.key_id


def _replace(headers: list[tuple[str, str]], name: str, value: str) -> list[tuple[str, str]]:
    return [(n, value if n == name else v) for n, v in headers]


def _drop(headers: list[tuple[str, str]], name: str) -> list[tuple[str, str]]:
    return [(n, v) for n, v in headers if n != name]


DEVICE = key(7)
OTHER = key(8)
FRESH = int(NOW.timestamp())

# (id, headers, check() keyword overrides, error class, message fragment)
REFUSALS = [
    pytest.param(
        signed(DEVICE),
        {"keys": (OTHER.verify_key,)},
        errors.UnknownKeyError,
        "unknown key id",
        id="wrong_key_id",
    ),
    pytest.param(
        signed(DEVICE, created=FRESH - 301),
        {},
        errors.StaleSignatureError,
        "signature created 301 s ago",
        id="stale_created",
    ),
    pytest.param(
        signed(DEVICE, created=FRESH + 61),
        {},
        errors.FutureSignatureError,
        "signature created 61 s in the future",
        id="future_created",
    ),
    pytest.param(
        signed(DEVICE),
        {"body": b'{"entries":[1]}'},
        errors.ContentDigestError,
        "Content-Digest does not match the body",
        id="body_changed_after_signing",
    ),
    pytest.param(
        signed(DEVICE),
        {"url": "https://central.example/api/v1/audit/appliance-2/sync"},
        errors.RequestSignatureError,
        "request signature does not verify",
        id="path_changed_after_signing",
    ),
    pytest.param(
        signed(DEVICE),
        {"method": "PUT"},
        errors.RequestSignatureError,
        "request signature does not verify",
        id="method_changed_after_signing",
    ),
    pytest.param(
        signed(DEVICE, method="GET", body=b""),
        {"method": "GET", "body": b"smuggled"},
        errors.MissingComponentError,
        "signature does not cover content-digest",
        id="body_added_to_bodiless_signature",
    ),
    pytest.param(
        _drop(signed(DEVICE), "Signature"),
        {},
        errors.SignatureHeaderError,
        "no Signature-Input and Signature",
        id="no_signature_field",
    ),
    pytest.param(
        _replace(signed(DEVICE), "Signature-Input", 'msp=("@method");created=1;keyid="x"'),
        {},
        errors.MissingComponentError,
        "signature does not cover @target-uri, content-digest",
        id="too_few_components",
    ),
    pytest.param(
        _replace(signed(DEVICE), "Signature-Input", 'msp=("@method" "@target-uri"'),
        {},
        errors.SignatureHeaderError,
        "unterminated inner list",
        id="unparsable_signature_input",
    ),
    pytest.param(
        _replace(signed(DEVICE), "Content-Digest", "sha-512=:AAAA:"),
        {},
        errors.SignatureHeaderError,
        "Content-Digest has no sha-256",
        id="digest_without_sha256",
    ),
]


@pytest.mark.parametrize(("headers", "overrides", "error", "message"), REFUSALS)
def test_profile_refusals(
    headers: list[tuple[str, str]],
    overrides: dict[str, object],
    error: type[Exception],
    message: str,
) -> None:
    options: dict[str, object] = {"keys": (DEVICE.verify_key,), **overrides}
    with pytest.raises(error, match=message) as raised:
        check(headers, **options)  # type: ignore[arg-type]
    assert type(raised.value) is error


def test_profile_refuses_replayed_nonce() -> None:
    store = NonceStore()
    headers = signed(DEVICE)
    check(headers, keys=(DEVICE.verify_key,), nonces=store)
    with pytest.raises(errors.ReplayedNonceError, match="already used"):
        check(headers, keys=(DEVICE.verify_key,), nonces=store)


def test_forged_request_does_not_burn_the_nonce() -> None:
    store = NonceStore()
    genuine = signed(DEVICE, nonce="feedfacefeedfacefeedfacefeedface")
    forged = signed(OTHER, nonce="feedfacefeedfacefeedfacefeedface")
    forged = _replace(forged, "Signature-Input", dict(genuine)["Signature-Input"])
    with pytest.raises(errors.RequestSignatureError):
        check(forged, keys=(DEVICE.verify_key,), nonces=store)
    assert store.seen == set()
    check(genuine, keys=(DEVICE.verify_key,), nonces=store)


def test_profile_refuses_unknown_parameter_and_foreign_algorithm() -> None:
    for params, message in [
        (';alg="hmac-sha256"', "not ed25519"),
        (";unexpected=1", "unknown signature parameter unexpected"),
    ]:
        headers = signed(DEVICE)
        value = dict(headers)["Signature-Input"] + params
        with pytest.raises(errors.SignatureHeaderError, match=message):
            check(_replace(headers, "Signature-Input", value), keys=(DEVICE.verify_key,))


def test_duplicate_parameter_is_refused_not_overwritten() -> None:
    headers = signed(DEVICE)
    value = dict(headers)["Signature-Input"] + ";created=1"
    with pytest.raises(errors.SignatureHeaderError, match="parameter 'created' repeats"):
        check(_replace(headers, "Signature-Input", value), keys=(DEVICE.verify_key,))


def test_async_variant_applies_the_same_checks() -> None:
    asyncio.run(_async_variant())


async def _async_variant() -> None:
    store = NonceStore()
    headers = signed(DEVICE)
    request = HttpRequest.build("POST", URL, headers)

    async def resolve(key_id: str) -> VerifyKey | None:
        return DEVICE.verify_key if key_id == DEVICE.key_id else None

    async def seen(key_id: str, nonce: str, created: int) -> bool:
        return store(key_id, nonce, created)

    result = await averify_request(request, BODY, resolve_key=resolve, nonce_seen=seen, now=NOW)
    assert result.key_id == DEVICE.key_id
    with pytest.raises(errors.ReplayedNonceError):
        await averify_request(request, BODY, resolve_key=resolve, nonce_seen=seen, now=NOW)


def test_header_names_are_case_insensitive_and_lines_joined() -> None:
    request = HttpRequest.build("GET", URL, [("X-A", " one "), ("x-a", "two")])
    assert request.field("x-a") == "one, two"
