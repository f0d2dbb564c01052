"""Canonical JSON (RFC 8785, "JCS") and a strict parser for untrusted JSON.

Everything that is signed or hashed is the JCS form of a value. Two encoders
produce it:

- :func:`canonicalize` is the one to call. For the values our documents mostly
  hold (strings, booleans, null, integers within ±(2**53 - 1), objects whose
  keys are in the Basic Multilingual Plane) the standard library's
  ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` is
  byte-identical to RFC 8785 and five times faster, so it is used for them;
  anything else (a float, a key outside the BMP) goes to the ``rfc8785``
  package. The property-based tests prove the two agree on every value the
  fast path accepts.
- :func:`canonicalize_reference` is ``rfc8785`` alone, for tests and tools.

:func:`parse_json` reads untrusted bytes and refuses, each with its own
message: oversize input, invalid UTF-8, duplicate object keys, NaN and
Infinity, numbers that overflow a double, integers beyond ±(2**53 - 1), lone
surrogates, and nesting deeper than the limit.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

import rfc8785

from msp_protocol.errors import JSONError, UsageError
from msp_protocol.limits import DEFAULT_LIMITS, Limits

MAX_SAFE_INTEGER = 2**53 - 1

# A \uD800-\uDFFF escape: the only way a surrogate gets into a parsed string,
# since the input was decoded from UTF-8 strictly before parsing.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_FIRST_NON_BMP = "\U00010000"

_reference_dumps = json.JSONEncoder(
    ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
).encode


def _unserializable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"),
# allow_nan=False).encode builds this C encoder (and a closure) on every call,
# which costs as much as encoding a small entry: build it once. No circular
# check (markers=None): callers pass parsed JSON or values _fast_path_ok
# bounded in depth, and the encoder guards its own recursion.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_c_encode = (
    _c_make_encoder(
        None, _unserializable, json.encoder.encode_basestring, None, ":", ",", True, False, False
    )
    if _c_make_encoder is not None
    else None
)


def _dumps(value: Any) -> str:
    if _c_encode is None:  # pragma: no cover - CPython always has the C encoder
        return _reference_dumps(value)
    return "".join(_c_encode(value, 0))


def canonicalize(value: Any) -> bytes:
    """Return the RFC 8785 canonical UTF-8 bytes of a JSON value.

    Raises :class:`UsageError` for values JSON cannot carry canonically
    (non-string keys, NaN, integers beyond ±(2**53 - 1), integral floats that
    RFC 8785 would write as such integers, lone surrogates, types other than
    dict/list/tuple/str/int/float/bool/None).
    """
    if _fast_path_ok(value, 0):
        try:
            return _dumps(value).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UsageError("cannot canonicalize: string contains a lone surrogate") from exc
    unsafe = _integral_float_beyond_safe(value, 0)
    if unsafe is not None:
        # RFC 8785 writes such a float as a bare integer beyond ±(2**53 - 1),
        # which parse_json (rightly) refuses: a document carrying it could be
        # signed but never verified. Refuse it here, where every signed or
        # hashed document passes.
        raise UsageError(
            f"cannot canonicalize: {unsafe!r} would be written as an integer beyond ±(2**53 - 1)"
        )
    return canonicalize_reference(value)


def canonicalize_reference(value: Any) -> bytes:
    """RFC 8785 bytes from the ``rfc8785`` package alone (slower, always right)."""
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        raise UsageError(f"cannot canonicalize: {exc}") from exc
    except RecursionError as exc:
        raise UsageError("cannot canonicalize: value nested too deeply") from exc
    except UnicodeEncodeError as exc:
        # rfc8785 sorts keys by their UTF-16 encoding, which a lone surrogate
        # in a key cannot have.
        raise UsageError("cannot canonicalize: string contains a lone surrogate") from exc


def _fast_path_ok(value: Any, depth: int) -> bool:
    """True when ``json.dumps`` gives exactly the JCS bytes for ``value``.

    That holds when there is no float (JCS formats numbers as ECMAScript does),
    every integer is in the safe range (JCS refuses the others), every key is a
    string in the BMP (JCS sorts keys by UTF-16 code units, Python by code
    points: the orders differ only for keys with characters beyond U+FFFF),
    and the value is not absurdly deep (left to the reference encoder's error).
    """
    if depth > 64:
        return False
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return False
            if not key.isascii() and max(key) >= _FIRST_NON_BMP:
                return False
            if not _fast_path_ok(item, depth + 1):
                return False
        return True
    if kind is list or kind is tuple:
        return all(_fast_path_ok(item, depth + 1) for item in value)
    return False


def _integral_float_beyond_safe(value: Any, depth: int) -> float | None:
    if depth > 64:
        return None  # left to the reference encoder's depth error
    if isinstance(value, float):
        if value.is_integer() and MAX_SAFE_INTEGER < abs(value) < 1e21:
            return value
        return None
    if isinstance(value, dict):
        items: Any = value.values()
    elif isinstance(value, list | tuple):
        items = value
    else:
        return None
    for item in items:
        found = _integral_float_beyond_safe(item, depth + 1)
        if found is not None:
            return found
    return None


def parse_json(
    data: bytes, *, limits: Limits = DEFAULT_LIMITS, max_bytes: int | None = None
) -> Any:
    """Parse untrusted JSON strictly.

    ``max_bytes`` defaults to ``limits.max_json_bytes``. Raises
    :class:`JSONError` naming the first problem found.
    """
    return _parse(data, limits, max_bytes)[0]


def parse_canonical_json(
    data: bytes, *, limits: Limits = DEFAULT_LIMITS, max_bytes: int | None = None
) -> Any:
    """:func:`parse_json`, and refuse bytes that are not the value's RFC 8785 form.

    For what is hashed as-is (audit entries) this makes the bytes and the value
    interchangeable: one value, one encoding. Raises :class:`JSONError`.

    This is the witness's per-entry hot path, so most documents take a fast
    route that reaches the same verdict: parse with the C decoder and no
    hooks, then require that the fast encoder gives back exactly ``data``.
    Equal bytes rule out duplicate keys (a repeated key is lost in the dict,
    and the bytes shrink), lone surrogates (they cannot encode) and NaN (the
    encoder refuses it); what equal bytes cannot rule out is sent to the
    strict route first: floats (JCS writes them as ECMAScript does), integers
    of more than 15 digits (perhaps beyond ±(2**53 - 1)), characters beyond
    U+FFFF (JCS sorts keys by UTF-16 code units) and deep nesting. Anything
    refused is parsed again strictly, for the precise error.
    """
    bound = limits.max_json_bytes if max_bytes is None else max_bytes
    if (
        len(data) <= bound
        and (data.isascii() or _BEYOND_BMP_OR_BOM.search(data) is None)
        and data.count(b"{") + data.count(b"[") <= limits.max_json_depth
    ):
        try:
            value = _FAST_DECODER.decode(data.decode("utf-8"))
            if _dumps(value).encode("utf-8") == data:
                return value
        except (ValueError, UnicodeError, RecursionError, _FloatFound):
            pass
    return _parse_canonical_strictly(data, limits, max_bytes)


def _parse_canonical_strictly(data: bytes, limits: Limits, max_bytes: int | None) -> Any:
    value, _ = _parse(data, limits, max_bytes)
    try:
        canonical = canonicalize(value) == data
    except UsageError:  # pragma: no cover - a strictly parsed value always encodes
        canonical = False
    if not canonical:
        raise JSONError("JSON is not in canonical (RFC 8785) form")
    return value


class _FloatFound(Exception):
    pass


def _no_float(_text: str) -> float:
    raise _FloatFound


def _short_int(digits: str) -> int:
    # 15 characters are always within ±(2**53 - 1); longer numbers go the
    # strict route, which checks the value.
    if len(digits) > 15:
        raise _FloatFound
    return int(digits)


# UTF-8 lead bytes of characters beyond U+FFFF (0xF0-0xF4; the rest cannot
# occur in valid UTF-8) and of a byte-order mark (0xEF): strict route.
_BEYOND_BMP_OR_BOM = re.compile(rb"[\xef-\xff]")
_FAST_DECODER = json.JSONDecoder(
    parse_float=_no_float, parse_constant=_no_float, parse_int=_short_int
)


def _parse(data: bytes, limits: Limits, max_bytes: int | None) -> tuple[Any, str]:
    bound = limits.max_json_bytes if max_bytes is None else max_bytes
    if len(data) > bound:
        raise JSONError(f"JSON document too large: {len(data)} bytes, limit {bound}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONError(f"JSON is not valid UTF-8 at byte {exc.start}") from exc
    if text.startswith("\ufeff"):
        raise JSONError("JSON starts with a UTF-8 byte order mark")
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise JSONError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:
        raise JSONError(f"JSON nested deeper than {limits.max_json_depth} levels") from exc
    # Walk the value only when it could break a rule the decoder cannot see:
    # more brackets than the depth limit, or an escape that may be a lone
    # surrogate. Most documents need no walk at all.
    check_surrogates = "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None
    if check_surrogates or text.count("{") + text.count("[") > limits.max_json_depth:
        _check_tree(value, limits.max_json_depth, check_surrogates)
    return value, text


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONError(f"duplicate key in JSON object: {key!r}")
            seen.add(key)
    return result


def _refuse_constant(name: str) -> NoReturn:
    raise JSONError(f"{name} is not a JSON number")


def _checked_int(digits: str) -> int:
    # 16 characters hold every safe integer with its sign; check the length
    # first so a 4,000-digit number never reaches int().
    if len(digits) > 17:
        raise JSONError(f"integer out of range ±(2**53 - 1): {digits[:20]}...")
    number = int(digits)
    if not -MAX_SAFE_INTEGER <= number <= MAX_SAFE_INTEGER:
        raise JSONError(f"integer out of range ±(2**53 - 1): {digits}")
    return number


def _checked_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise JSONError(f"number overflows a double: {text[:20]}")
    if number.is_integer() and MAX_SAFE_INTEGER < abs(number) < 1e21:
        # RFC 8785 would write it as a bare integer beyond ±(2**53 - 1), which
        # this parser refuses: a value taken here could never be served,
        # signed or hashed again (canonicalize refuses it for that reason).
        raise JSONError(f"number is a whole number beyond ±(2**53 - 1): {text[:20]}")
    return number


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates,
    parse_constant=_refuse_constant,
    parse_int=_checked_int,
    parse_float=_checked_float,
)


def _check_tree(root: Any, max_depth: int, check_surrogates: bool) -> None:
    """Walk the parsed value once: bound its depth, find lone surrogates."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > max_depth:
                raise JSONError(f"JSON nested deeper than {max_depth} levels")
            for key, item in value.items():
                if check_surrogates:
                    _refuse_lone_surrogate(key)
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            if depth > max_depth:
                raise JSONError(f"JSON nested deeper than {max_depth} levels")
            stack.extend((item, depth + 1) for item in value)
        elif check_surrogates and isinstance(value, str):
            _refuse_lone_surrogate(value)


def _refuse_lone_surrogate(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JSONError(f"JSON string contains a lone surrogate at position {exc.start}") from exc
