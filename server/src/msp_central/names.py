"""Names people give things (partners, sites, keys, files): stored as a
person would type them, compared as a person would read them.

A name is stored in Unicode NFC, with every run of spacing (a no-break or a
thin space included) written as one space, and without characters nobody
can see or that change how the text around them reads: controls, format
characters (zero-width spaces and joiners, bidirectional overrides, byte-
order marks), line and paragraph separators, private-use and surrogate code
points. Two names are the same name when their NFKC case-folded forms are
equal ("Acme MSP", "ACME  msp", "Acme\\u00a0MSP"). Look-alikes from other
scripts (a Cyrillic "\\u0410" for a Latin "A") are not folded together.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata

# Controls, format, surrogate and private-use characters, and the line and
# paragraph separators.
_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}
_SPACING = re.compile(r"\s+")


def _invisible_ranges() -> list[tuple[int, int]]:
    """The code point ranges of the :data:`_INVISIBLE` categories, but for
    the surrogates: they are not characters, and I-JSON (RFC 7493) strings,
    the only ones a schema describes, never hold them (regular expression
    engines differ on them, too)."""
    ranges: list[tuple[int, int]] = []
    for code in range(sys.maxunicode + 1):
        if unicodedata.category(chr(code)) not in _INVISIBLE - {"Cs"}:
            continue
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    return ranges


def _class_member(code: int) -> str:
    # \\uXXXX reads the same in ECMA-262 and Python regular expressions; a
    # character beyond the BMP is written as itself.
    return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)


@functools.cache
def name_pattern() -> str:
    """A regular expression (ECMA-262 and Python alike) matching exactly
    the names :func:`readable_name` accepts (of strings without lone
    surrogates): nothing invisible, and at least one character that is not
    a space. For the OpenAPI document."""
    invisible = "".join(
        _class_member(low) if low == high else f"{_class_member(low)}-{_class_member(high)}"
        for low, high in _invisible_ranges()
    )
    return f"^[^{invisible}]*[^\\s{invisible}][^{invisible}]*$"


def readable_name(value: str) -> str:
    """``value`` as it is stored; raises ValueError naming what is refused."""
    value = unicodedata.normalize("NFC", value)
    for character in value:
        if unicodedata.category(character) in _INVISIBLE:
            name = unicodedata.name(character, "a control character")
            raise ValueError(f"a name may not hold U+{ord(character):04X} ({name})")
    value = _SPACING.sub(" ", value).strip()
    if not value:
        raise ValueError("a name must hold something visible")
    return value


def name_key(value: str) -> str:
    """What two names are compared by: equal keys, the same name."""
    return _SPACING.sub(" ", unicodedata.normalize("NFKC", value).casefold()).strip()
