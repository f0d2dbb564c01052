"""Strict base64: exactly the canonical standard encoding of some bytes
(and, where allowed, the URL-safe one)."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msp_protocol.encoding import b64decode
from msp_protocol.errors import EncodingError

STANDARD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def reference(text: str) -> bytes | None:
    """What a canonical-only standard decoder accepts: valid padded base64
    whose re-encoding is the same text."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if base64.b64encode(data).decode() == text else None


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_round_trip(data: bytes) -> None:
    assert b64decode(base64.b64encode(data).decode()) == data


@settings(max_examples=2000)
@given(st.text(st.sampled_from(STANDARD + "=" + " -_\n"), max_size=12))
def test_accepts_exactly_the_canonical_standard_encodings(text: str) -> None:
    expected = reference(text)
    if expected is None:
        with pytest.raises(EncodingError):
            b64decode(text)
    else:
        assert b64decode(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("QR==", "not canonical", id="unused_bits_under_double_padding"),
        pytest.param("QUJ=", "not canonical", id="unused_bits_under_single_padding"),
        pytest.param("QQ", "not valid", id="missing_padding"),
        pytest.param("QQ==\n", "not valid", id="trailing_newline"),
        pytest.param("Q===", "not valid", id="too_much_padding"),
        pytest.param("QQ==QQ==", "not valid", id="data_after_padding"),
        pytest.param("QUJD\u00e9", "not valid", id="non_ascii"),
    ],
)
def test_refusals(text: str, message: str) -> None:
    with pytest.raises(EncodingError, match=message):
        b64decode(text)


def test_urlsafe_only_where_allowed() -> None:
    assert b64decode("-_8", urlsafe_ok=True) == base64.urlsafe_b64decode("-_8=")
    with pytest.raises(EncodingError):
        b64decode("-_8=")
