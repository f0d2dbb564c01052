"""The one accepted textual form of binary values, identifiers and times.

- Binary values are lowercase hex (``HexStr``); a hash is 64 hex characters.
- Base64 appears only where a standard says so (DSSE envelopes, RFC 9421 and
  RFC 9530 byte sequences) and is parsed strictly: the right alphabet, correct
  padding, nothing after it.
- Times are RFC 3339 in UTC with a ``Z`` and at most microsecond precision.
  Parsing accepts exactly what :func:`format_time` writes, so a timestamp has
  one spelling and a signed document one set of bytes.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from typing import Annotated, NewType

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, StringConstraints

from msp_protocol.errors import EncodingError

HexStr = NewType("HexStr", str)
KeyId = NewType("KeyId", str)

_HEX = re.compile(r"[0-9a-f]*")
_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?Z")
_B64_STD = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_B64_URL = re.compile(r"(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2}(?:==)?|[A-Za-z0-9_-]{3}=?)?")


def to_hex(data: bytes) -> HexStr:
    return HexStr(data.hex())


def from_hex(text: str, *, length: int | None = None, what: str = "value") -> bytes:
    """Decode lowercase hex; ``length`` is the expected number of bytes."""
    if len(text) % 2 or _HEX.fullmatch(text) is None:
        raise EncodingError(f"{what} is not lowercase hex")
    if length is not None and len(text) != 2 * length:
        raise EncodingError(
            f"{what} has wrong length: expected {length} bytes, got {len(text) // 2}"
        )
    return bytes.fromhex(text)


def b64encode(data: bytes) -> str:
    """Standard base64 with padding (DSSE, RFC 9421, RFC 9530)."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, *, what: str = "value", urlsafe_ok: bool = False) -> bytes:
    """Strict base64: standard alphabet with padding, or (where a standard
    allows it, as DSSE does) the URL-safe alphabet with or without padding.

    Only the canonical encoding of the decoded bytes is accepted: the unused
    low bits of the last character must be zero, so no two strings decode to
    the same bytes and a changed character is always a changed value.
    """
    if text.isascii():
        # The common case, in C: the standard alphabet with correct padding
        # (strict mode refuses anything else), and then only the last
        # quantum can be non-canonical (unused bits set under the padding).
        try:
            data = binascii.a2b_base64(text, strict_mode=True)
        except binascii.Error:
            pass
        else:
            padded = text.endswith("=")
            if (
                padded
                and base64.b64encode(data[-(3 - text.count("=", -2)) :]) != text[-4:].encode()
            ):
                raise EncodingError(f"{what} is not canonical base64")
            return data
    if _B64_STD.fullmatch(text) is not None:
        data = base64.b64decode(text)
        canonical = base64.b64encode(data).decode("ascii")
    elif urlsafe_ok and _B64_URL.fullmatch(text) is not None:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        canonical = base64.urlsafe_b64encode(data).decode("ascii")
        if "=" not in text:
            canonical = canonical.rstrip("=")
    else:
        raise EncodingError(f"{what} is not valid base64")
    if canonical != text:
        raise EncodingError(f"{what} is not canonical base64")
    return data


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with ``Z``; fractional seconds only when non-zero."""
    if moment.tzinfo is None:
        raise EncodingError("time has no timezone")
    m = moment.astimezone(UTC)
    text = f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
    if m.microsecond:
        text += f".{m.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_time(text: str, *, what: str = "time") -> datetime:
    """Parse the one form :func:`format_time` writes; refuse every other."""
    match = _TIME.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise EncodingError(f"{what} is not RFC 3339 UTC with Z: {str(text)[:40]!r}")
    year, month, day, hour, minute, second, frac = match.groups()
    if frac is not None and frac.endswith("0"):
        raise EncodingError(f"{what} has trailing zeros in its fraction: {text!r}")
    try:
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int(frac.ljust(6, "0")) if frac else 0,
            tzinfo=UTC,
        )
    except ValueError as exc:
        raise EncodingError(f"{what} is not a valid date and time: {text!r}") from exc


def utc_now() -> datetime:
    return datetime.now(UTC)


def _check_hex(text: str) -> str:
    if len(text) % 2 or _HEX.fullmatch(text) is None:
        raise ValueError("not lowercase hex")
    return text


def _as_time(value: object) -> object:
    if isinstance(value, str):
        try:
            return parse_time(value)
        except EncodingError as exc:
            raise ValueError(str(exc)) from exc
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC)
    raise ValueError("expected an RFC 3339 UTC time string")


# Field types for pydantic models. Only the exact forms above validate.
Hex = Annotated[str, StringConstraints(strict=True), AfterValidator(_check_hex)]
Hash = Annotated[
    str, StringConstraints(strict=True, min_length=64, max_length=64), AfterValidator(_check_hex)
]
KeyIdField = Annotated[
    str, StringConstraints(strict=True, min_length=16, max_length=16), AfterValidator(_check_hex)
]
# A certificate serial: 128 random bits.
Serial = Annotated[
    str, StringConstraints(strict=True, min_length=32, max_length=32), AfterValidator(_check_hex)
]
# A request nonce: 128 to 256 random bits.
Nonce = Annotated[
    str, StringConstraints(strict=True, min_length=32, max_length=64), AfterValidator(_check_hex)
]
PublicKeyHex = Annotated[
    str, StringConstraints(strict=True, min_length=64, max_length=64), AfterValidator(_check_hex)
]
Timestamp = Annotated[
    datetime, BeforeValidator(_as_time), PlainSerializer(format_time, return_type=str)
]
# Appliance, site, bundle and escalation ids: safe in a URL path, a file name
# and a log origin ("msp/<appliance_id>").
Identifier = Annotated[
    str, StringConstraints(strict=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
]
