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

import re
import unicodedata

# Controls, format, surrogate and private-use characters, and the line and
# paragraph separators.
_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}
_SPACING = re.compile(r"\s+")


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
