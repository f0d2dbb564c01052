"""Canonical JSON (RFC 8785 / JCS) and the strict parser for untrusted JSON.

Every expected byte string below is written out by hand from RFC 8785 (its
Appendix B number table, its §3.2.3 sorting example and its §3.2.4 full example)
and ECMAScript's Number.prototype.toString; none is computed by the code under
test. The property-based tests then prove that the fast path of
:func:`canonicalize` agrees with the ``rfc8785`` package on every JSON value.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msp_protocol import canonical
from msp_protocol.canonical import (
    canonicalize,
    canonicalize_reference,
    parse_canonical_json,
    parse_json,
)
from msp_protocol.errors import JSONError, MalformedError, UsageError
from msp_protocol.limits import Limits

MAX_SAFE = 2**53 - 1

ENCODERS = [
    pytest.param(canonicalize, id="canonicalize"),
    pytest.param(canonicalize_reference, id="reference"),
]


def _double(hex_bits: str) -> float:
    """The IEEE 754 double whose big-endian bit pattern is ``hex_bits``."""
    value: float = struct.unpack(">d", bytes.fromhex(hex_bits))[0]
    return value


# --- numbers ----------------------------------------------------------------------

# RFC 8785 Appendix B: IEEE 754 bit pattern -> JCS text.
RFC8785_APPENDIX_B = [
    pytest.param("0000000000000000", b"0", id="zero"),
    pytest.param("8000000000000000", b"0", id="minus_zero"),
    pytest.param("0000000000000001", b"5e-324", id="min_subnormal"),
    pytest.param("8000000000000001", b"-5e-324", id="minus_min_subnormal"),
    pytest.param("7fefffffffffffff", b"1.7976931348623157e+308", id="max_double"),
    pytest.param("ffefffffffffffff", b"-1.7976931348623157e+308", id="minus_max_double"),
    # 2**53, -(2**53) and 2**68 are written as integers beyond ±(2**53 - 1):
    # only the reference encoder writes them (see check_encoding).
    pytest.param("4340000000000000", b"9007199254740992", id="2_pow_53"),
    pytest.param("c340000000000000", b"-9007199254740992", id="minus_2_pow_53"),
    pytest.param("4430000000000000", b"295147905179352830000", id="2_pow_68"),
    pytest.param("44b52d02c7e14af5", b"9.999999999999997e+22", id="below_1e23"),
    pytest.param("44b52d02c7e14af6", b"1e+23", id="1e23"),
    pytest.param("44b52d02c7e14af7", b"1.0000000000000001e+23", id="above_1e23"),
    pytest.param("444b1ae4d6e2ef4e", b"999999999999999700000", id="below_1e21_a"),
    pytest.param("444b1ae4d6e2ef4f", b"999999999999999900000", id="below_1e21_b"),
    pytest.param("444b1ae4d6e2ef50", b"1e+21", id="1e21"),
    pytest.param("3eb0c6f7a0b5ed8c", b"9.999999999999997e-7", id="below_1e-6"),
    pytest.param("3eb0c6f7a0b5ed8d", b"0.000001", id="1e-6"),
    pytest.param("41b3de4355555553", b"333333333.3333332", id="third_a"),
    pytest.param("41b3de4355555554", b"333333333.33333325", id="third_b"),
    pytest.param("41b3de4355555555", b"333333333.3333333", id="third_c"),
    pytest.param("41b3de4355555556", b"333333333.3333334", id="third_d"),
    pytest.param("41b3de4355555557", b"333333333.33333343", id="third_e"),
    pytest.param("becbf647612f3696", b"-0.0000033333333333333333", id="small_negative"),
    pytest.param("43143ff3c1cb0959", b"1424953923781206.2", id="large_fraction"),
]


@pytest.mark.parametrize(("hex_bits", "expected"), RFC8785_APPENDIX_B)
@pytest.mark.parametrize("encode", ENCODERS)
def test_rfc8785_appendix_b_numbers(
    encode: Callable[[Any], bytes], hex_bits: str, expected: bytes
) -> None:
    check_encoding(encode, _double(hex_bits), expected)


# The same rules on float literals, including the ECMAScript switch points
# (exponent form from 1e21 up and from 1e-7 down).
FLOAT_LITERALS = [
    pytest.param(1e21, b"1e+21", id="1e21"),
    pytest.param(1e20, b"100000000000000000000", id="1e20"),
    pytest.param(1e16, b"10000000000000000", id="1e16"),
    pytest.param(1e23, b"1e+23", id="1e23"),
    pytest.param(1e30, b"1e+30", id="1e30"),
    pytest.param(1e-7, b"1e-7", id="1e-7"),
    pytest.param(1.5e-7, b"1.5e-7", id="1.5e-7"),
    pytest.param(0.000001, b"0.000001", id="1e-6"),
    pytest.param(0.00001, b"0.00001", id="1e-5"),
    pytest.param(1e-27, b"1e-27", id="1e-27"),
    pytest.param(333333333.3333333, b"333333333.3333333", id="third"),
    pytest.param(-0.0, b"0", id="minus_zero"),
    pytest.param(0.0, b"0", id="zero"),
    pytest.param(5e-324, b"5e-324", id="min_subnormal"),
    pytest.param(1.7976931348623157e308, b"1.7976931348623157e+308", id="max_double"),
    pytest.param(9007199254740992.0, b"9007199254740992", id="2_pow_53"),
    pytest.param(295147905179352830000.0, b"295147905179352830000", id="2_pow_68"),
    pytest.param(1.0, b"1", id="one"),
    pytest.param(-1.0, b"-1", id="minus_one"),
    pytest.param(0.1, b"0.1", id="tenth"),
    pytest.param(0.002, b"0.002", id="2e-3"),
    pytest.param(4.5, b"4.5", id="four_and_half"),
    pytest.param(-1.5, b"-1.5", id="minus_one_and_half"),
    pytest.param(100.0, b"100", id="hundred"),
]


@pytest.mark.parametrize(("value", "expected"), FLOAT_LITERALS)
@pytest.mark.parametrize("encode", ENCODERS)
def test_float_formatting(encode: Callable[[Any], bytes], value: float, expected: bytes) -> None:
    check_encoding(encode, value, expected)


def check_encoding(encode: Callable[[Any], bytes], value: float, expected: bytes) -> None:
    """The reference encoder writes every double; canonicalize refuses the
    integral ones beyond ±(2**53 - 1) that the strict parser would refuse."""
    if encode is canonicalize and value.is_integer() and 2**53 <= abs(value) < 1e21:
        with pytest.raises(UsageError, match="would be written as an integer beyond"):
            encode(value)
    else:
        assert encode(value) == expected


def test_floats_inside_structures() -> None:
    value = {"b": [1.0, 0.5, -0.0], "a": {"x": 1e21, "y": 7}}
    assert canonicalize(value) == b'{"a":{"x":1e+21,"y":7},"b":[1,0.5,0]}'


def test_rfc8785_full_example() -> None:
    # RFC 8785 §3.2.4: the input as a sender might write it, and its canonical form.
    source = (
        b"{\n"
        b'  "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],\n'
        b'  "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",\n'
        b'  "literals": [null, true, false]\n'
        b"}"
    )
    expected = (
        b'{"literals":[null,true,false],'
        b'"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        b'"string":"\xe2\x82\xac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    assert canonicalize(parse_json(source)) == expected
    assert canonicalize_reference(parse_json(source)) == expected


# --- object key order -------------------------------------------------------------


@pytest.mark.parametrize("encode", ENCODERS)
def test_rfc8785_sorting_example(encode: Callable[[Any], bytes]) -> None:
    # RFC 8785 §3.2.3. The emoji key is outside the BMP, so canonicalize takes
    # the reference path; the order is by UTF-16 code units, not code points.
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    expected = (
        b"{"
        b'"\\r":"Carriage Return",'
        b'"1":"One",'
        b'"\xc2\x80":"Control",'
        b'"\xc3\xb6":"Latin Small Letter O With Diaeresis",'
        b'"\xe2\x82\xac":"Euro Sign",'
        b'"\xf0\x9f\x98\x80":"Emoji: Grinning Face",'
        b'"\xef\xac\xb3":"Hebrew Letter Dalet With Dagesh"'
        b"}"
    )
    assert encode(value) == expected


UTF16_ORDER = [
    # U+1F600 is D83D DE00 in UTF-16, which sorts before FB33; by code point it
    # would come after. Python's sort_keys gets these wrong.
    pytest.param(
        {"\ufb33": 2, "\U0001f600": 1},
        b'{"\xf0\x9f\x98\x80":1,"\xef\xac\xb3":2}',
        id="emoji_before_fb33",
    ),
    pytest.param(
        {"x\ufb33": 2, "x\U0001f600": 1},
        b'{"x\xf0\x9f\x98\x80":1,"x\xef\xac\xb3":2}',
        id="differs_after_common_prefix",
    ),
    pytest.param(
        {"\uffff": 2, "\U00010000": 1, "\ud7ff": 0},
        b'{"\xed\x9f\xbf":0,"\xf0\x90\x80\x80":1,"\xef\xbf\xbf":2}',
        id="bmp_edges",
    ),
    pytest.param(
        {"a": {"\ufb33": 2, "\U0001f600": 1}},
        b'{"a":{"\xf0\x9f\x98\x80":1,"\xef\xac\xb3":2}}',
        id="nested_object",
    ),
    pytest.param(
        [{"\ufb33": 2, "\U0001f600": 1}],
        b'[{"\xf0\x9f\x98\x80":1,"\xef\xac\xb3":2}]',
        id="inside_array",
    ),
]


@pytest.mark.parametrize(("value", "expected"), UTF16_ORDER)
@pytest.mark.parametrize("encode", ENCODERS)
def test_keys_sorted_by_utf16_code_units(
    encode: Callable[[Any], bytes], value: Any, expected: bytes
) -> None:
    assert encode(value) == expected


def test_bmp_keys_sorted_by_code_point() -> None:
    value = {"b": 1, "a": 2, "\u00e9": 3, "A": 4, "": 5, "aa": 6, "\ue000": 7, "\u20ac": 8}
    assert canonicalize(value) == (
        b'{"":5,"A":4,"a":2,"aa":6,"b":1,"\xc3\xa9":3,"\xe2\x82\xac":8,"\xee\x80\x80":7}'
    )


# --- strings ----------------------------------------------------------------------

ALL_CONTROLS = "".join(chr(c) for c in range(0x20))
ALL_CONTROLS_ESCAPED = (
    b'"\\u0000\\u0001\\u0002\\u0003\\u0004\\u0005\\u0006\\u0007'
    b"\\b\\t\\n\\u000b\\f\\r\\u000e\\u000f"
    b"\\u0010\\u0011\\u0012\\u0013\\u0014\\u0015\\u0016\\u0017"
    b'\\u0018\\u0019\\u001a\\u001b\\u001c\\u001d\\u001e\\u001f"'
)

STRINGS = [
    pytest.param(ALL_CONTROLS, ALL_CONTROLS_ESCAPED, id="all_controls"),
    pytest.param("\x00", b'"\\u0000"', id="nul"),
    pytest.param("\b", b'"\\b"', id="backspace"),
    pytest.param("\t", b'"\\t"', id="tab"),
    pytest.param("\n", b'"\\n"', id="newline"),
    pytest.param("\f", b'"\\f"', id="form_feed"),
    pytest.param("\r", b'"\\r"', id="carriage_return"),
    pytest.param("\x0b", b'"\\u000b"', id="vertical_tab_lowercase_hex"),
    pytest.param("\x1f", b'"\\u001f"', id="unit_separator"),
    pytest.param('"', b'"\\""', id="quote"),
    pytest.param("\\", b'"\\\\"', id="backslash"),
    pytest.param("/", b'"/"', id="solidus_not_escaped"),
    pytest.param("\x7f", b'"\x7f"', id="delete_raw"),
    pytest.param("\u2028\u2029", b'"\xe2\x80\xa8\xe2\x80\xa9"', id="line_separators_raw"),
    pytest.param("\u00e9", b'"\xc3\xa9"', id="latin1_raw"),
    pytest.param("\u20ac", b'"\xe2\x82\xac"', id="euro_raw"),
    pytest.param("\U0001f600", b'"\xf0\x9f\x98\x80"', id="emoji_raw"),
    pytest.param("\ufeff", b'"\xef\xbb\xbf"', id="bom_char_raw"),
    pytest.param("", b'""', id="empty"),
    pytest.param('a"b\\c/d\ne', b'"a\\"b\\\\c/d\\ne"', id="mixed"),
]


@pytest.mark.parametrize(("value", "expected"), STRINGS)
@pytest.mark.parametrize("encode", ENCODERS)
def test_string_escaping(encode: Callable[[Any], bytes], value: str, expected: bytes) -> None:
    assert encode(value) == expected


@pytest.mark.parametrize(("value", "expected"), STRINGS)
def test_string_escaping_in_keys(value: str, expected: bytes) -> None:
    assert canonicalize({value: 0}) == b"{" + expected + b":0}"


# --- literals and structures ------------------------------------------------------

STRUCTURES = [
    pytest.param(None, b"null", id="null"),
    pytest.param(True, b"true", id="true"),
    pytest.param(False, b"false", id="false"),
    pytest.param(0, b"0", id="int_zero"),
    pytest.param(-1, b"-1", id="int_minus_one"),
    pytest.param(MAX_SAFE, b"9007199254740991", id="max_safe_int"),
    pytest.param(-MAX_SAFE, b"-9007199254740991", id="min_safe_int"),
    pytest.param({}, b"{}", id="empty_object"),
    pytest.param([], b"[]", id="empty_array"),
    pytest.param((), b"[]", id="empty_tuple"),
    pytest.param((1, "a"), b'[1,"a"]', id="tuple_as_array"),
    pytest.param([True, False, None], b"[true,false,null]", id="literals_array"),
    pytest.param(
        {"a": None, "b": True, "c": False}, b'{"a":null,"b":true,"c":false}', id="literals"
    ),
    pytest.param(
        {"b": [1, {"d": [], "c": {}}], "a": [True, False, None]},
        b'{"a":[true,false,null],"b":[1,{"c":{},"d":[]}]}',
        id="nested",
    ),
    pytest.param(
        {"z": {"y": {"x": {"w": [[[MAX_SAFE, -MAX_SAFE]]]}}}},
        b'{"z":{"y":{"x":{"w":[[[9007199254740991,-9007199254740991]]]}}}}',
        id="deep_big_ints",
    ),
    pytest.param([[], {}, [[]], [{}]], b"[[],{},[[]],[{}]]", id="empty_containers"),
    pytest.param({"k": "v", "K": "V"}, b'{"K":"V","k":"v"}', id="case_sensitive_order"),
]


@pytest.mark.parametrize(("value", "expected"), STRUCTURES)
@pytest.mark.parametrize("encode", ENCODERS)
def test_literals_and_structures(
    encode: Callable[[Any], bytes], value: Any, expected: bytes
) -> None:
    assert encode(value) == expected


def test_deep_value_beyond_fast_path_depth() -> None:
    # Past 64 levels canonicalize hands the value to the reference encoder.
    value: Any = 1
    for _ in range(100):
        value = [value]
    assert canonicalize(value) == b"[" * 100 + b"1" + b"]" * 100


def test_fast_path_does_not_call_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    # The property test below only proves something about the fast path if the
    # fast path is what runs for float-free, BMP-keyed values.
    def refuse(value: Any) -> bytes:
        raise AssertionError("reference encoder called")

    monkeypatch.setattr(canonical, "canonicalize_reference", refuse)
    assert canonicalize({"\u20ac": [1, "x", None, True], "a": {"b": -MAX_SAFE}}) == (
        b'{"a":{"b":-9007199254740991},"\xe2\x82\xac":[1,"x",null,true]}'
    )
    with pytest.raises(AssertionError, match="reference encoder called"):
        canonicalize([1.5])
    with pytest.raises(AssertionError, match="reference encoder called"):
        canonicalize({"\U0001f600": 1})


# --- canonicalize refuses what JSON cannot carry ----------------------------------

CANONICALIZE_REFUSALS = [
    pytest.param(float("nan"), "nan is not representable", id="nan"),
    pytest.param(float("inf"), "inf is not representable", id="infinity"),
    pytest.param(float("-inf"), "-inf is not representable", id="minus_infinity"),
    pytest.param([1, float("nan")], "nan is not representable", id="nan_in_array"),
    pytest.param(2**53, "9007199254740992 exceeds safe integer domain", id="int_2_pow_53"),
    pytest.param(
        -(2**53), "-9007199254740992 exceeds safe integer domain", id="int_minus_2_pow_53"
    ),
    pytest.param(10**400, "exceeds safe integer domain", id="huge_int"),
    pytest.param({"a": [2**53]}, "exceeds safe integer domain", id="nested_big_int"),
    pytest.param({1: 2}, "object keys must be strings", id="int_key"),
    pytest.param({None: 2}, "object keys must be strings", id="none_key"),
    pytest.param({"a": 1, (1, 2): 2}, "object keys must be strings", id="tuple_key"),
    pytest.param("\ud800", "lone surrogate", id="lone_surrogate"),
    pytest.param({"a": "x\udc00"}, "lone surrogate", id="lone_surrogate_in_value"),
    pytest.param({"\ud800": 1}, "lone surrogate", id="lone_surrogate_in_key"),
    pytest.param(["\ud800", 1.5], "non-UTF-8", id="lone_surrogate_reference_path"),
    # A lone surrogate in a key on the reference path (a float value, a non-BMP
    # sibling key) must be refused like any other: with UsageError.
    pytest.param({"\ud800": 1.5}, "surrogate", id="lone_surrogate_key_with_float"),
    pytest.param(
        {"\ud800": 1, "\U0001f600": 2}, "surrogate", id="lone_surrogate_key_non_bmp_sibling"
    ),
    pytest.param(object(), "unsupported type", id="object"),
    pytest.param(set(), "unsupported type", id="set"),
    pytest.param(b"bytes", "unsupported type", id="bytes"),
    pytest.param(1 + 2j, "unsupported type", id="complex"),
    pytest.param({"a": [frozenset()]}, "unsupported type", id="nested_frozenset"),
]


@pytest.mark.parametrize(("value", "message"), CANONICALIZE_REFUSALS)
def test_canonicalize_refuses(value: Any, message: str) -> None:
    with pytest.raises(UsageError, match=r"^cannot canonicalize: ") as info:
        canonicalize(value)
    assert message in str(info.value)
    assert info.value.code == "usage"


def test_canonicalize_refuses_absurd_nesting() -> None:
    value: Any = []
    for _ in range(5000):
        value = [value]
    with pytest.raises(UsageError, match="nested too deeply"):
        canonicalize(value)


# --- property: the fast path is RFC 8785 --------------------------------------------

# Characters that are not lone surrogates, with the BMP boundary and the
# sort-order trap (U+FB33 vs U+1F600) drawn often.
_TRAP_CHARS = ["\U0001f600", "\ufb33", "\uffff", "\U00010000", "\ue000", "\U0010ffff"]
_CHARS = st.characters(blacklist_categories=("Cs",))
_TEXT = st.text(st.one_of(_CHARS, st.sampled_from(_TRAP_CHARS)), max_size=12)
_BMP_TEXT = st.text(st.characters(blacklist_categories=("Cs",), max_codepoint=0xFFFF), max_size=12)
# Keys: arbitrary text, or short keys built from the traps, so that one object
# often holds keys whose code-point order and UTF-16 order differ.
_KEYS = st.one_of(_TEXT, st.text(st.sampled_from(["a", *_TRAP_CHARS]), max_size=3))
_SAFE_INTS = st.one_of(
    st.integers(min_value=-MAX_SAFE, max_value=MAX_SAFE),
    st.sampled_from([0, -1, MAX_SAFE, -MAX_SAFE, 2**31, -(2**31), 2**32]),
)
_FLOATS = st.floats(allow_nan=False, allow_infinity=False)


def _json(scalars: st.SearchStrategy[Any], keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=6),
            st.dictionaries(keys, children, max_size=6),
        ),
        max_leaves=15,
    )


_BASE = st.one_of(st.none(), st.booleans(), _SAFE_INTS, _TEXT)
# Everything the schema allows: floats and non-BMP keys included.
JSON_VALUES = _json(st.one_of(_BASE, _FLOATS), _KEYS)
# Exactly what the fast path takes: no floats, keys in the BMP.
FAST_PATH_VALUES = _json(st.one_of(st.none(), st.booleans(), _SAFE_INTS, _TEXT), _BMP_TEXT)
# No floats, but keys anywhere in Unicode.
FLOATLESS_VALUES = _json(_BASE, _KEYS)


def _has_float_beyond_safe(value: Any) -> bool:
    if isinstance(value, float):
        return value.is_integer() and 2**53 <= abs(value) < 1e21
    if isinstance(value, dict):
        return any(_has_float_beyond_safe(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_float_beyond_safe(v) for v in value)
    return False


def assert_matches_reference(value: Any) -> None:
    """canonicalize writes what rfc8785 writes, except that it refuses (and
    refuses only) values holding an integral float beyond ±(2**53 - 1)."""
    if _has_float_beyond_safe(value):
        with pytest.raises(UsageError, match="would be written as an integer beyond"):
            canonicalize(value)
    else:
        assert canonicalize(value) == canonicalize_reference(value)


@settings(max_examples=500)
@given(JSON_VALUES)
def test_canonicalize_matches_reference(value: Any) -> None:
    assert_matches_reference(value)


@settings(max_examples=400)
@given(FLOATLESS_VALUES)
def test_floatless_matches_reference(value: Any) -> None:
    # No float anywhere, so the fast/reference decision rests on the keys alone.
    assert canonicalize(value) == canonicalize_reference(value)


@settings(max_examples=500)
@given(FAST_PATH_VALUES)
def test_fast_path_matches_reference(value: Any) -> None:
    assert canonicalize(value) == canonicalize_reference(value)


@settings(max_examples=300)
@given(st.dictionaries(_KEYS, _SAFE_INTS, max_size=12))
def test_key_order_matches_reference(value: dict[str, int]) -> None:
    assert canonicalize(value) == canonicalize_reference(value)


@settings(max_examples=500)
@given(_FLOATS)
def test_float_matches_reference(value: float) -> None:
    assert_matches_reference(value)


# --- property: round trip through the parser ----------------------------------------

_ROOMY = Limits(max_json_depth=200)


def _same(a: Any, b: Any, *, exact_numbers: bool = False) -> bool:
    """Equal as JSON values: bool is not 1, and (unless ``exact_numbers``) an
    int equals a float of the same value, as 1 and 1.0 do in JSON."""
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_same(a[k], b[k], exact_numbers=exact_numbers) for k in a)
        )
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(_same(x, y, exact_numbers=exact_numbers) for x, y in zip(a, b, strict=True))
        )
    if exact_numbers or isinstance(a, bool | str) or a is None:
        return type(a) is type(b) and a == b
    return type(b) in (int, float) and a == b


@settings(max_examples=200)
@given(FLOATLESS_VALUES)
def test_round_trip_without_floats(value: Any) -> None:
    encoded = canonicalize(value)
    decoded = parse_json(encoded, limits=_ROOMY)
    assert decoded == value
    # Without floats every type survives too: ints stay ints, bools stay bools.
    assert _same(decoded, value, exact_numbers=True)
    assert canonicalize(decoded) == encoded


def _integral_beyond_safe(number: float) -> bool:
    return number.is_integer() and 2**53 <= abs(number) < 1e21


# Floats whose canonical form is not a bare integer beyond the safe range.
_ROUND_TRIP_FLOATS = _FLOATS.filter(lambda f: not _integral_beyond_safe(f))
ROUND_TRIP_VALUES = _json(st.one_of(_BASE, _ROUND_TRIP_FLOATS), _KEYS)


@settings(max_examples=200)
@given(ROUND_TRIP_VALUES)
def test_round_trip_with_floats(value: Any) -> None:
    # 1.0 comes back as the int 1, -0.0 as 0: equal as numbers, and the
    # canonical bytes are the same again.
    encoded = canonicalize(value)
    decoded = parse_json(encoded, limits=_ROOMY)
    assert _same(decoded, value)
    assert canonicalize(decoded) == encoded


@settings(max_examples=100)
@given(
    st.integers(min_value=2**53, max_value=10**21 - 1)
    .map(float)
    .filter(_integral_beyond_safe)
    .flatmap(lambda f: st.sampled_from([f, -f]))
)
def test_integral_floats_beyond_safe_range_are_refused(value: float) -> None:
    # RFC 8785 writes these floats as bare integers (2.0**53 -> 9007199254740992),
    # which the strict parser refuses as beyond ±(2**53 - 1). A document
    # holding one could be signed but never verified, so canonicalize refuses
    # it; the reference encoder alone still writes it.
    assert canonicalize_reference(value).lstrip(b"-").isdigit()
    with pytest.raises(UsageError, match=r"would be written as an integer beyond"):
        canonicalize(value)
    with pytest.raises(UsageError, match=r"would be written as an integer beyond"):
        canonicalize({"nested": [1, {"x": value}]})


@settings(max_examples=300)
@given(JSON_VALUES)
def test_what_parse_json_accepts_can_be_written_again(value: Any) -> None:
    """The rule servers live by: a value parse_json takes in can always be
    canonicalized again (served, signed, hashed). A whole float beyond
    ±(2**53 - 1) written as JSON (1e20) is refused at parsing, not later."""
    text = json.dumps(value, allow_nan=False).encode()
    try:
        decoded = parse_json(text, limits=_ROOMY)
    except JSONError:
        assert _has_float_beyond_safe(value)
        return
    canonicalize(decoded)


@pytest.mark.parametrize("text", [b"1e20", b"-1e20", b"9007199254740993.0", b'{"a": [1e16]}'])
def test_whole_floats_beyond_the_safe_range_are_refused_at_parsing(text: bytes) -> None:
    with pytest.raises(JSONError, match=r"whole number beyond ±\(2\*\*53 - 1\)"):
        parse_json(text)


def test_round_trip_examples() -> None:
    for value, encoded in [
        (1.0, b"1"),
        (-0.0, b"0"),
        (0.5, b"0.5"),
        (1e21, b"1e+21"),
        (MAX_SAFE, b"9007199254740991"),
        ({"\U0001f600": [None, True]}, b'{"\xf0\x9f\x98\x80":[null,true]}'),
    ]:
        assert canonicalize(value) == encoded
        assert _same(parse_json(encoded), value)
    assert type(parse_json(b"1")) is int
    assert type(parse_json(b"1e+21")) is float


# --- parse_json refuses, each with its own message ----------------------------------

_DEPTH_4 = {"limits": Limits(max_json_depth=4)}

PARSE_REFUSALS = [
    # size
    pytest.param(
        b"[1, 2, 3]",
        {"max_bytes": 8},
        "JSON document too large: 9 bytes, limit 8",
        id="oversize_max_bytes",
    ),
    pytest.param(
        b'"abcdefghij"',
        {"limits": Limits(max_json_bytes=4)},
        "JSON document too large: 12 bytes, limit 4",
        id="oversize_limits",
    ),
    # encoding
    pytest.param(b'"\xff"', {}, "JSON is not valid UTF-8 at byte 1", id="invalid_utf8"),
    pytest.param(b'["\xc0\xaf"]', {}, "JSON is not valid UTF-8 at byte 2", id="overlong_utf8"),
    pytest.param(
        b'"\xed\xa0\x80"', {}, "JSON is not valid UTF-8 at byte 1", id="utf8_encoded_surrogate"
    ),
    pytest.param(b'"\xe2\x82"', {}, "JSON is not valid UTF-8 at byte 1", id="truncated_utf8"),
    pytest.param(
        b"\xef\xbb\xbf{}",
        {},
        "JSON starts with a UTF-8 byte order mark",
        id="bom_prefix",
    ),
    pytest.param(b"\xff\xfe{\x00}\x00", {}, "JSON is not valid UTF-8 at byte 0", id="utf16"),
    # duplicate keys
    pytest.param(b'{"a":1,"a":2}', {}, "duplicate key in JSON object: 'a'", id="duplicate_key"),
    pytest.param(
        b'{"a":1,"a":1}', {}, "duplicate key in JSON object: 'a'", id="duplicate_key_same_value"
    ),
    pytest.param(
        b'{"a":1,"\\u0061":2}',
        {},
        "duplicate key in JSON object: 'a'",
        id="duplicate_key_via_escape",
    ),
    pytest.param(
        b'{"x":{"k":1,"b":0,"k":1}}',
        {},
        "duplicate key in JSON object: 'k'",
        id="duplicate_key_nested",
    ),
    pytest.param(
        b'[{"e\xcc\x81":1,"e\xcc\x81":2}]',
        {},
        "duplicate key in JSON object: 'e\u0301'",
        id="duplicate_key_non_ascii",
    ),
    # constants
    pytest.param(b"NaN", {}, "NaN is not a JSON number", id="nan"),
    pytest.param(b"Infinity", {}, "Infinity is not a JSON number", id="infinity"),
    pytest.param(b"-Infinity", {}, "-Infinity is not a JSON number", id="minus_infinity"),
    pytest.param(b'{"a":[1,NaN]}', {}, "NaN is not a JSON number", id="nan_nested"),
    # numbers
    pytest.param(b"1e400", {}, "number overflows a double: 1e400", id="float_overflow"),
    pytest.param(b"-1e400", {}, "number overflows a double: -1e400", id="float_overflow_negative"),
    pytest.param(b"[1.8e308]", {}, "number overflows a double: 1.8e308", id="just_above_max"),
    pytest.param(
        b"9007199254740992",
        {},
        "integer out of range ±(2**53 - 1): 9007199254740992",
        id="int_2_pow_53",
    ),
    pytest.param(
        b"-9007199254740992",
        {},
        "integer out of range ±(2**53 - 1): -9007199254740992",
        id="int_minus_2_pow_53",
    ),
    pytest.param(
        b"99999999999999999",
        {},
        "integer out of range ±(2**53 - 1): 99999999999999999",
        id="int_17_digits",
    ),
    pytest.param(
        b"1" * 5000,
        {},
        "integer out of range ±(2**53 - 1): 11111111111111111111...",
        id="int_5000_digits",
    ),
    pytest.param(
        b"-" + b"9" * 5000,
        {},
        "integer out of range ±(2**53 - 1): -9999999999999999999...",
        id="int_minus_5000_digits",
    ),
    # surrogates
    pytest.param(
        b'"\\ud800"',
        {},
        "JSON string contains a lone surrogate at position 0",
        id="lone_high_surrogate",
    ),
    pytest.param(
        b'"\\udc00"',
        {},
        "JSON string contains a lone surrogate at position 0",
        id="lone_low_surrogate",
    ),
    pytest.param(
        b'"\\uD800"',
        {},
        "JSON string contains a lone surrogate at position 0",
        id="lone_surrogate_uppercase_hex",
    ),
    pytest.param(
        b'"\\ude00\\ud83d"',
        {},
        "JSON string contains a lone surrogate at position 0",
        id="reversed_pair",
    ),
    pytest.param(
        b'"ab\\ud83dx"',
        {},
        "JSON string contains a lone surrogate at position 2",
        id="high_surrogate_then_letter",
    ),
    pytest.param(
        b'{"\\udfff":1}',
        {},
        "JSON string contains a lone surrogate at position 0",
        id="lone_surrogate_in_key",
    ),
    pytest.param(
        b'{"a":["ok","\\ud83d\\ude00\\ud83d"]}',
        {},
        "JSON string contains a lone surrogate at position 1",
        id="pair_then_lone_surrogate",
    ),
    # depth
    pytest.param(b"[[[[[1]]]]]", _DEPTH_4, "JSON nested deeper than 4 levels", id="depth_arrays"),
    pytest.param(
        b'{"a":{"b":{"c":{"d":{}}}}}',
        _DEPTH_4,
        "JSON nested deeper than 4 levels",
        id="depth_objects",
    ),
    pytest.param(
        b'[{"a":[{"b":[]}]}]', _DEPTH_4, "JSON nested deeper than 4 levels", id="depth_mixed"
    ),
    pytest.param(
        b"[" * 33 + b"]" * 33, {}, "JSON nested deeper than 32 levels", id="depth_default_limit"
    ),
    pytest.param(b"[" * 5000, {}, "JSON nested deeper than 32 levels", id="depth_5000_open"),
    pytest.param(
        b"[" * 5000 + b"]" * 5000, {}, "JSON nested deeper than 32 levels", id="depth_5000_balanced"
    ),
    pytest.param(
        b'{"a":' * 5000, _DEPTH_4, "JSON nested deeper than 4 levels", id="depth_5000_objects"
    ),
    # syntax
    pytest.param(b"[] x", {}, "invalid JSON at line 1 column 4: Extra data", id="trailing_garbage"),
    pytest.param(b"{}{}", {}, "invalid JSON at line 1 column 3: Extra data", id="two_documents"),
    pytest.param(b"", {}, "invalid JSON at line 1 column 1: Expecting value", id="empty"),
    pytest.param(b"   ", {}, "invalid JSON at line 1 column 4: Expecting value", id="whitespace"),
    pytest.param(
        b"[1,]", {}, "invalid JSON at line 1 column 4: Expecting value", id="trailing_comma_array"
    ),
    pytest.param(
        b'{\n  "a": 1,\n}',
        {},
        "invalid JSON at line 3 column 1: Expecting property name enclosed in double quotes",
        id="trailing_comma_object",
    ),
    pytest.param(
        b"'a'", {}, "invalid JSON at line 1 column 1: Expecting value", id="single_quotes"
    ),
    pytest.param(b"01", {}, "invalid JSON at line 1 column 2: Extra data", id="leading_zero"),
    pytest.param(
        b'"a\x01"',
        {},
        "invalid JSON at line 1 column 3: Invalid control character",
        id="raw_control_in_string",
    ),
    pytest.param(
        b'"abc',
        {},
        "invalid JSON at line 1 column 1: Unterminated string",
        id="unterminated_string",
    ),
    pytest.param(
        b'{"a" 1}',
        {},
        "invalid JSON at line 1 column 6: Expecting ':' delimiter",
        id="missing_colon",
    ),
    pytest.param(
        b"tru", {}, "invalid JSON at line 1 column 1: Expecting value", id="truncated_literal"
    ),
    pytest.param(
        b'"\\x41"', {}, "invalid JSON at line 1 column 2: Invalid \\escape", id="bad_escape"
    ),
]


@pytest.mark.parametrize(("data", "kwargs", "message"), PARSE_REFUSALS)
def test_parse_json_refuses(data: bytes, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(JSONError) as info:
        parse_json(data, **kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, MalformedError)
    assert info.value.code == "malformed-json"


def test_long_integer_refused_quickly() -> None:
    # The length check comes before int(): a megabyte of digits is refused in
    # linear time, never converted (and never hits int()'s own digit limit).
    data = b"7" * 1_000_000
    start = time.perf_counter()
    for _ in range(5):
        with pytest.raises(JSONError, match="integer out of range"):
            parse_json(data)
    assert time.perf_counter() - start < 2.0


def test_deep_nesting_is_jsonerror_not_recursionerror() -> None:
    # 100,000 brackets under the default 8 MiB bound: a JSONError, no RecursionError.
    with pytest.raises(JSONError, match="nested deeper than 32 levels"):
        parse_json(b"[" * 100_000 + b"]" * 100_000)


# --- parse_json accepts valid documents unchanged ----------------------------------

PARSE_ACCEPTS = [
    pytest.param(b"{}", {}, {}, id="empty_object"),
    pytest.param(b"[]", {}, [], id="empty_array"),
    pytest.param(b"null", {}, None, id="null"),
    pytest.param(b"true", {}, True, id="true"),
    pytest.param(b"false", {}, False, id="false"),
    pytest.param(b'""', {}, "", id="empty_string"),
    pytest.param(b"9007199254740991", {}, MAX_SAFE, id="max_safe_int"),
    pytest.param(b"-9007199254740991", {}, -MAX_SAFE, id="min_safe_int"),
    pytest.param(b"-0", {}, 0, id="minus_zero_int"),
    pytest.param(b"1.5e3", {}, 1500.0, id="exponent"),
    pytest.param(b"1e-400", {}, 0.0, id="underflow_to_zero"),
    pytest.param(b"1.7976931348623157e308", {}, 1.7976931348623157e308, id="max_double"),
    # A whole float beyond ±(2**53 - 1) is refused (see below); 1e21 and up is
    # written with an exponent, so it stays a float when read back.
    pytest.param(b"1e21", {}, 1e21, id="big_float_literal"),
    pytest.param(b'"\\ud83d\\ude00"', {}, "\U0001f600", id="surrogate_pair"),
    pytest.param(b'"\\uD83D\\uDE00"', {}, "\U0001f600", id="surrogate_pair_uppercase"),
    pytest.param(b'"\\\\ud800"', {}, "\\ud800", id="escaped_backslash_not_surrogate"),
    pytest.param(b'"\xf0\x9f\x98\x80"', {}, "\U0001f600", id="raw_non_bmp"),
    pytest.param(b'"\xc3\xa9\\u00e9"', {}, "\u00e9\u00e9", id="raw_and_escaped"),
    pytest.param(b'"\\/\\b\\f\\n\\r\\t\\"\\\\"', {}, '/\b\f\n\r\t"\\', id="all_short_escapes"),
    pytest.param(
        b' {\n\t"a" : [1, 2.5, "x", null, true, false],\r\n "b": {"c": {}} } ',
        {},
        {"a": [1, 2.5, "x", None, True, False], "b": {"c": {}}},
        id="whitespace_everywhere",
    ),
    pytest.param(b'{"a":1,"A":2,"a ":3}', {}, {"a": 1, "A": 2, "a ": 3}, id="near_duplicates"),
    pytest.param(b"[[[[1]]]]", _DEPTH_4, [[[[1]]]], id="depth_exactly_limit"),
    pytest.param(
        b'{"a":{"b":{"c":{"d":1}}}}',
        _DEPTH_4,
        {"a": {"b": {"c": {"d": 1}}}},
        id="depth_objects_exactly_limit",
    ),
    pytest.param(b"[1, 2, 3]", {"max_bytes": 9}, [1, 2, 3], id="size_exactly_limit"),
]


@pytest.mark.parametrize(("data", "kwargs", "expected"), PARSE_ACCEPTS)
def test_parse_json_accepts(data: bytes, kwargs: dict[str, Any], expected: Any) -> None:
    value = parse_json(data, **kwargs)
    assert value == expected
    assert type(value) is type(expected)


def test_parse_json_keeps_canonical_documents_unchanged() -> None:
    for document in [
        b'{"a":[true,false,null],"b":[1,{"c":{},"d":[]}]}',
        b'{"\\r":"x","1":"One","\xc2\x80":"y","\xf0\x9f\x98\x80":"z","\xef\xac\xb3":"w"}',
        b'{"n":[333333333.3333333,1e+30,4.5,0.002,1e-27,-9007199254740991]}',
        b'"\\u0000\\b\\t\\n\\u000b\\f\\r\\u001f\\"\\\\/\x7f\xe2\x80\xa8"',
    ]:
        assert canonicalize(parse_json(document)) == document


# --- property: parse_canonical_json accepts exactly the RFC 8785 bytes -------------


def _other_encodings(value: Any) -> list[bytes]:
    """Encodings of ``value`` that are valid JSON but may not be canonical."""
    return [
        json.dumps(value, ensure_ascii=False).encode("utf-8"),
        json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("utf-8"),
        json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode(),
        json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
    ]


@settings(max_examples=400)
@given(ROUND_TRIP_VALUES)
def test_parse_canonical_accepts_exactly_the_reference_bytes(value: Any) -> None:
    # Floats, non-BMP keys and strings, key order traps: the parser's fast
    # check must agree with the reference encoder on every one.
    reference = canonicalize_reference(value)
    assert _same(parse_canonical_json(reference, limits=_ROOMY), value)
    for other in _other_encodings(value):
        if other == reference:
            assert _same(parse_canonical_json(other, limits=_ROOMY), value)
        else:
            with pytest.raises(JSONError, match="not in canonical"):
                parse_canonical_json(other, limits=_ROOMY)
