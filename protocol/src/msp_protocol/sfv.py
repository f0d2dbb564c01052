"""The part of RFC 8941 (Structured Field Values) that RFC 9421 and RFC 9530 use.

Dictionaries whose members are items or inner lists, with parameters; bare
items of every RFC 8941 type (integer, decimal, string, token, byte sequence,
boolean). Parsing follows RFC 8941 §4.2 step by step, with one deliberate
strictness: a parameter or dictionary key given twice is refused rather than
silently overwritten, since two readers of a signed header must never
disagree about what it says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal

from msp_protocol.encoding import b64decode, b64encode
from msp_protocol.errors import EncodingError, SignatureHeaderError


class Token(str):
    """An RFC 8941 token (as opposed to a string)."""

    __slots__ = ()


BareItem = int | Decimal | str | Token | bytes | bool
Params = dict[str, BareItem]


@dataclass(frozen=True, slots=True)
class Item:
    value: BareItem
    params: Params = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InnerList:
    items: tuple[Item, ...]
    params: Params = field(default_factory=dict)


Member = Item | InnerList

_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")


class _Parser:
    def __init__(self, text: str) -> None:
        if not text.isascii():
            raise SignatureHeaderError("structured field is not ASCII")
        self.text = text.strip(" ")
        self.pos = 0

    def fail(self, what: str) -> SignatureHeaderError:
        return SignatureHeaderError(f"structured field: {what} at character {self.pos}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip(self, chars: str) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def dictionary(self) -> dict[str, Member]:
        members: dict[str, Member] = {}
        while self.pos < len(self.text):
            key = self.key()
            if key in members:
                raise self.fail(f"dictionary key {key!r} repeats")
            if self.peek() == "=":
                self.pos += 1
                members[key] = self.item_or_inner_list()
            else:
                members[key] = Item(True, self.parameters())
            self.skip(" \t")
            if self.pos >= len(self.text):
                return members
            if self.peek() != ",":
                raise self.fail("expected ',' between dictionary members")
            self.pos += 1
            self.skip(" \t")
            if self.pos >= len(self.text):
                raise self.fail("trailing comma")
        raise self.fail("empty dictionary")

    def key(self) -> str:
        match = _KEY.match(self.text, self.pos)
        if match is None:
            raise self.fail("expected a key")
        self.pos = match.end()
        return match.group()

    def item_or_inner_list(self) -> Member:
        if self.peek() == "(":
            return self.inner_list()
        return Item(self.bare_item(), self.parameters())

    def inner_list(self) -> InnerList:
        self.pos += 1  # "("
        items: list[Item] = []
        while self.pos < len(self.text):
            self.skip(" ")
            if self.peek() == ")":
                self.pos += 1
                return InnerList(tuple(items), self.parameters())
            items.append(Item(self.bare_item(), self.parameters()))
            if self.pos >= len(self.text):
                break
            if self.peek() not in (" ", ")"):
                raise self.fail("expected ' ' or ')' in inner list")
        raise self.fail("unterminated inner list")

    def parameters(self) -> Params:
        params: Params = {}
        while self.peek() == ";":
            self.pos += 1
            self.skip(" ")
            key = self.key()
            if key in params:
                raise self.fail(f"parameter {key!r} repeats")
            value: BareItem = True
            if self.peek() == "=":
                self.pos += 1
                value = self.bare_item()
            params[key] = value
        return params

    def bare_item(self) -> BareItem:
        char = self.peek()
        if char == "-" or char.isdigit():
            return self.number()
        if char == '"':
            return self.string()
        if char == ":":
            return self.byte_sequence()
        if char == "?":
            return self.boolean()
        if char.isalpha() or char == "*":
            match = _TOKEN.match(self.text, self.pos)
            if match is None:
                raise self.fail("expected a token")
            self.pos = match.end()
            return Token(match.group())
        raise self.fail("expected an item")

    def number(self) -> int | Decimal:
        match = _NUMBER.match(self.text, self.pos)
        if match is None:
            raise self.fail("expected a number")
        text = match.group()
        digits = text.lstrip("-")
        self.pos = match.end()
        if match.group(1) is None:
            if len(digits) > 15:
                raise self.fail("integer has more than 15 digits")
            return int(text)
        whole, fraction = digits.split(".")
        if len(whole) > 12 or len(fraction) > 3:
            raise self.fail("decimal out of range")
        return Decimal(text)

    def string(self) -> str:
        self.pos += 1  # opening quote
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == "\\":
                escaped = self.peek()
                if escaped not in ('"', "\\"):
                    raise self.fail("invalid escape in string")
                out.append(escaped)
                self.pos += 1
            elif char == '"':
                return "".join(out)
            elif not " " <= char <= "~":
                raise self.fail("control character in string")
            else:
                out.append(char)
        raise self.fail("unterminated string")

    def byte_sequence(self) -> bytes:
        end = self.text.find(":", self.pos + 1)
        if end < 0:
            raise self.fail("unterminated byte sequence")
        body = self.text[self.pos + 1 : end]
        self.pos = end + 1
        try:
            return b64decode(body, what="byte sequence")
        except EncodingError:
            raise self.fail("byte sequence is not base64") from None

    def boolean(self) -> bool:
        value = self.text[self.pos + 1 : self.pos + 2]
        if value not in ("0", "1"):
            raise self.fail("expected ?0 or ?1")
        self.pos += 2
        return value == "1"


def parse_dictionary(text: str) -> dict[str, Member]:
    """Parse an RFC 8941 dictionary field value (field lines already joined by ", ")."""
    return _Parser(text).dictionary()


def serialize_bare_item(value: BareItem) -> str:
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, int):
        if abs(value) >= 10**15:
            raise SignatureHeaderError("integer out of structured-field range")
        return str(value)
    if isinstance(value, Decimal):
        return f"{value.quantize(Decimal('0.001')).normalize():f}"
    if isinstance(value, bytes):
        return f":{b64encode(value)}:"
    if isinstance(value, Token):
        if _TOKEN.fullmatch(value) is None:
            raise SignatureHeaderError(f"invalid token {value!r}")
        return str(value)
    if not value.isascii() or any(not " " <= char <= "~" for char in value):
        raise SignatureHeaderError("string holds characters a structured field cannot carry")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def serialize_params(params: Params) -> str:
    parts = []
    for key, value in params.items():
        if _KEY.fullmatch(key) is None:
            raise SignatureHeaderError(f"invalid parameter key {key!r}")
        parts.append(f";{key}" if value is True else f";{key}={serialize_bare_item(value)}")
    return "".join(parts)


def serialize_item(item: Item) -> str:
    return serialize_bare_item(item.value) + serialize_params(item.params)


def serialize_inner_list(inner: InnerList) -> str:
    return (
        "("
        + " ".join(serialize_item(item) for item in inner.items)
        + ")"
        + serialize_params(inner.params)
    )


def serialize_member(member: Member) -> str:
    return serialize_inner_list(member) if isinstance(member, InnerList) else serialize_item(member)


def serialize_dictionary(members: dict[str, Member]) -> str:
    parts = []
    for key, member in members.items():
        if _KEY.fullmatch(key) is None:
            raise SignatureHeaderError(f"invalid dictionary key {key!r}")
        if isinstance(member, Item) and member.value is True:
            parts.append(key + serialize_params(member.params))
        else:
            parts.append(f"{key}={serialize_member(member)}")
    return ", ".join(parts)


__all__ = [
    "BareItem",
    "InnerList",
    "Item",
    "Member",
    "Params",
    "Token",
    "parse_dictionary",
    "serialize_dictionary",
    "serialize_inner_list",
    "serialize_item",
]
