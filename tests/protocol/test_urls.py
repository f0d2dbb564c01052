"""The central URL's normal form (RFC 3986 §6.2.2-3), shared by the agent's
``central_url`` and the server's ``public_url``: examples, refusals, RFC
3986's own dot-segment examples, and properties over generated spellings:
idempotent, every spelling of one URL gives the same string, and the normal
form is a fixed point. Over real sockets: tests/agent/test_central_url_http.py
and tests/central/test_raw_target_uri.py."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msp_protocol.urls import (
    normalize_central_url,
    normalize_percent_encoding,
    remove_dot_segments,
)


@pytest.mark.parametrize(
    ("spelt", "normal"),
    [
        ("https://Central.Example.com", "https://central.example.com"),
        ("HTTPS://CENTRAL.EXAMPLE.COM/", "https://central.example.com"),
        ("https://central.example.com:443", "https://central.example.com"),
        ("http://central.example.com:80/", "http://central.example.com"),
        ("http://central.example.com:443", "http://central.example.com:443"),
        ("https://central.example.com:80", "https://central.example.com:80"),
        ("https://central.example.com:", "https://central.example.com"),
        ("https://central.example.com:0443", "https://central.example.com"),
        ("https://central.example.com/", "https://central.example.com"),
        ("https://central.example.com//", "https://central.example.com"),
        ("https://central.example.com/msp/", "https://central.example.com/msp"),
        ("https://h.example/%7emsp", "https://h.example/~msp"),
        ("https://h.example/%7Emsp/%41%2d%5F%2E", "https://h.example/~msp/A-_."),
        ("https://h.example/a%2fb%3a", "https://h.example/a%2Fb%3A"),
        ("https://h.example/caf%c3%a9", "https://h.example/caf%C3%A9"),
        ("https://h.example/café", "https://h.example/caf%C3%A9"),
        ("https://h.example/a b", "https://h.example/a%20b"),
        ("https://h.example/!$&'()*+,;=:@", "https://h.example/!$&'()*+,;=:@"),
        ("https://h.example/./", "https://h.example"),
        ("https://h.example/a/./b/../c/", "https://h.example/a/c"),
        ("https://h.example/%2e%2E/a/%2E/b", "https://h.example/a/b"),
        ("https://h.example/../../a", "https://h.example/a"),
        ("https://h.example/a//b", "https://h.example/a//b"),
        ("https://h.example/..a/b..", "https://h.example/..a/b.."),
        ("  https://h.example/msp \n", "https://h.example/msp"),
        ("https://Bücher.Example", "https://xn--bcher-kva.example"),
        ("http://[0:0:0::1]:8080/", "http://[::1]:8080"),
        ("http://[FE80::A]:80", "http://[fe80::a]"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://msp_central:8080", "http://msp_central:8080"),
    ],
)
def test_examples(spelt: str, normal: str) -> None:
    assert normalize_central_url(spelt) == normal
    assert normalize_central_url(normal) == normal


@pytest.mark.parametrize(
    ("spelt", "reason"),
    [
        ("central.example.com", "must be an http:// or https:// URL"),
        ("ftp://central.example.com", "must be an http:// or https:// URL"),
        ("ws://central.example.com", "must be an http:// or https:// URL"),
        ("https:central.example.com", "no // before the host"),
        ("https://", "has no host name"),
        ("https:///msp", "has no host name"),
        ("https://:443", "has no host name"),
        ("https://user@central.example.com", "must not carry credentials"),
        ("https://user:pw@central.example.com", "must not carry credentials"),
        ("https://central.example.com/?", "must not carry a query or a fragment"),
        ("https://central.example.com?a=1", "must not carry a query or a fragment"),
        ("https://central.example.com/#top", "must not carry a query or a fragment"),
        ("https://central.example.com:99999", "bad port"),
        ("https://central.example.com:0", "bad port"),
        ("https://central.example.com:https", "bad port"),
        ("https://central.example.com:-1", "bad port"),
        ("https://central.example.com:\uff18\uff10", "bad port"),  # fullwidth 80
        ("https://[::1", "bad IPv6 address"),
        ("https://[::1]x", "bad IPv6 address"),
        ("https://[not-v6]", "is not an IPv6 address"),
        ("https://[fe80::1%25eth0]", "must not name an IPv6 zone"),
        ("https://cen%74ral.example.com", "percent-encoded host name"),
        ("https://central..example.com", "is not a host name"),
        ("https://central example.com", "is not a host name"),
        ("http://127.1", "not a dotted-quad IPv4 address"),
        ("http://2130706433", "not a dotted-quad IPv4 address"),
        ("http://010.0.0.1", "not a dotted-quad IPv4 address"),
        ("http://1.2.3.4.", "not a dotted-quad IPv4 address"),
        ("https://h.example/a%zz", "bad percent-encoding"),
        ("https://h.example/a%4", "bad percent-encoding"),
        ("https://h.example/a\tb", "control character"),
        ("https://h.example/\ud800", "lone surrogate"),
    ],
)
def test_refusals(spelt: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)) as refused:
        normalize_central_url(spelt)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("path", "result"),
    [
        # RFC 3986 §5.2.4's own two examples.
        ("/a/b/c/./../../g", "/a/g"),
        ("mid/content=5/../6", "mid/6"),
        ("/.", "/"),
        ("/..", "/"),
        ("/a/..", "/"),
        ("/a/.", "/a/"),
        ("../x", "x"),
        (".", ""),
        ("..", ""),
        ("/a/.../b", "/a/.../b"),
    ],
)
def test_remove_dot_segments(path: str, result: str) -> None:
    assert remove_dot_segments(path) == result


# --- properties -------------------------------------------------------------------------

UNRESERVED = string.ascii_letters + string.digits + "-._~"
SUB_DELIMS = "!$&'()*+,;="
# A path segment as characters: the ones a path holds as they are, and
# others it holds only escaped (reserved delimiters, "%", a space, non-ASCII),
# which may be spelt as they are and are escaped by the normaliser (not a
# space: one at the end of the setting is surrounding blank, stripped).
ESCAPED_ONLY = "/?#[]% "
ESCAPED_OR_RAW = '"<>{}|^`é€'
segments = st.lists(
    st.sampled_from(UNRESERVED + SUB_DELIMS + ":@" + ESCAPED_ONLY + ESCAPED_OR_RAW),
    min_size=1,
    max_size=8,
).filter(lambda chars: "".join(chars) not in (".", ".."))


def escape(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode())


labels = st.from_regex(r"[a-z][a-z0-9-]{0,9}", fullmatch=True)


@st.composite
def spellings(draw: st.DrawFn) -> tuple[str, str]:
    """A URL in normal form, and another spelling of the same URL."""
    scheme = draw(st.sampled_from(["http", "https"]))
    host = ".".join(draw(st.lists(labels, min_size=1, max_size=3)))
    port = draw(st.one_of(st.none(), st.integers(1, 65535)))
    path = draw(st.lists(segments, max_size=4))
    default = {"http": 80, "https": 443}[scheme]
    port_part = "" if port in (None, default) else f":{port}"
    safe = UNRESERVED + SUB_DELIMS + ":@"
    normal = f"{scheme}://{host}{port_part}" + "".join(
        "/" + "".join(c if c in safe else escape(c) for c in segment) for segment in path
    )

    def recase(text: str) -> str:
        flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
        return "".join(c.upper() if flip else c for c, flip in zip(text, flips, strict=True))

    def respell(char: str) -> str:
        if char in ESCAPED_ONLY or (char not in SUB_DELIMS + ":@" and draw(st.booleans())):
            return recase(escape(char).lower())  # %7e or %7E for "~", %c3%A9 for "é"
        return char

    def respell_segment(segment: list[str]) -> str:
        noise = draw(st.sampled_from(["", "./", "x/../", "%2e/", "a/b/%2E%2e/../"]))
        return noise + "".join(respell(char) for char in segment)

    spelt_port = port_part or draw(st.sampled_from(["", f":{default}", ":"]))
    spelt_path = "".join(f"/{respell_segment(s)}" for s in path)
    spelt_path += draw(st.sampled_from(["", "/", "/.", "//", "/./", "/x/.."]))
    return normal, f"{recase(scheme)}://{recase(host)}{spelt_port}{spelt_path}"


@given(spellings())
def test_every_spelling_normalises_to_one_string(pair: tuple[str, str]) -> None:
    normal, spelt = pair
    assert normalize_central_url(spelt) == normal
    assert normalize_central_url(normal) == normal


@given(st.text(max_size=40))
def test_percent_encoding_is_idempotent_or_refused(path: str) -> None:
    try:
        once = normalize_percent_encoding(path)
    except ValueError:
        return
    assert normalize_percent_encoding(once) == once
    assert not re.search(r"%[0-9A-F]?[a-f]", once)
    for escape in re.findall(r"%([0-9A-F]{2})", once):
        assert chr(int(escape, 16)) not in UNRESERVED


@given(st.text(alphabet="/.a%2e", max_size=24))
def test_the_normal_form_is_a_fixed_point(path: str) -> None:
    try:
        once = normalize_central_url(f"https://h.example{path}")
    except ValueError:
        return
    assert normalize_central_url(once) == once
    assert not once.endswith("/")
    assert "/./" not in once + "/"
    assert "/../" not in once + "/"
