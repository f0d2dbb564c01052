"""The central server's URL in the one form both ends sign and rebuild.

Every appliance request is signed over its RFC 9421 ``@target-uri``, and the
server verifies against the URI it rebuilds from what arrived (behind a
reverse proxy: its configured public URL followed by the raw path and query
of the request). An HTTP client rewrites what it is given (host case, a
default port, percent escapes, dot segments), so signing the configured
string as written turns an operator's harmless spelling
(``https://Central.Example.com:443/``) into a refusal of every signed
request. The agent's ``central_url`` and the server's ``public_url`` are
therefore normalised once, when each configuration is loaded, by this one
function (RFC 3986 §6.2.2 syntax-based and §6.2.3 scheme-based
normalisation), and the agent sends exactly that string without letting its
library re-encode it.

The normal form: lowercase scheme (``http`` or ``https``) and host (IDNA
for a non-ASCII name, the compressed form of an IPv6 address), no default
port, percent escapes with uppercase hex digits, percent-encoded unreserved
characters decoded, no dot segments, and no trailing slash (the agent
appends ``/api/v1/…``; an empty path is the server's root). What cannot be
a central URL is refused with a one-line reason: another scheme, user
information, a query or fragment, no host, a bad port or escape.
"""

from __future__ import annotations

import ipaddress
import re
import string

from yarl import URL

_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# What a path may hold as it is (RFC 3986 §3.3: pchar and "/", less the
# percent escapes, which are normalised on their own).
_PATH_SAFE = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
_HEX = frozenset(string.hexdigits)
_SPLIT = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):(?P<slashes>//)?"
    r"(?P<authority>[^/?#]*)(?P<path>[^?#]*)(?P<rest>[?#].*)?",
    re.DOTALL,
)
# A host name after IDNA: DNS labels (underscores too: container names).
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
_NUMERIC = re.compile(r"[0-9.]+")


def normalize_central_url(value: str) -> str:
    """``value`` in its normal form (see the module's docstring); idempotent.
    Raises ValueError with a one-line reason when it is no central URL."""
    text = value.strip()
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise ValueError("is not a URL: it holds a control character")
    match = _SPLIT.fullmatch(text)
    if match is None or match["scheme"].lower() not in _DEFAULT_PORTS:
        raise ValueError("must be an http:// or https:// URL")
    if match["slashes"] is None:
        raise ValueError("is not a URL: no // before the host")
    if match["rest"] is not None:
        raise ValueError("must not carry a query or a fragment")
    scheme = match["scheme"].lower()
    host, port = _authority(match["authority"])
    authority = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = remove_dot_segments(normalize_percent_encoding(match["path"])).rstrip("/")
    return f"{scheme}://{authority}{path}"


def _authority(authority: str) -> tuple[str, int | None]:
    """The normalised host (IPv6 in brackets) and the port, if one is given."""
    if "@" in authority:
        raise ValueError("must not carry credentials (user@host)")
    if authority.startswith("["):
        literal, bracket, after = authority[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ValueError("is not a URL: a bad IPv6 address in brackets")
        if "%" in literal:
            # RFC 6874 zones name an interface of this machine: the server
            # cannot rebuild the same URI from its side.
            raise ValueError("must not name an IPv6 zone (%25...)")
        try:
            host = f"[{ipaddress.IPv6Address(literal).compressed}]"
        except ValueError:
            raise ValueError(f"is not a URL: [{literal}] is not an IPv6 address") from None
        port_text = after[1:] if after else None
    else:
        name, colon, port_text_or_empty = authority.partition(":")
        host = _host_name(name)
        port_text = port_text_or_empty if colon else None
    return host, _port(port_text)


def _host_name(name: str) -> str:
    if not name:
        raise ValueError("has no host name")
    if "%" in name:
        raise ValueError("is not a URL: a percent-encoded host name")
    try:
        # yarl encodes the name exactly as the HTTP client would (IDNA, lowercase).
        host = URL.build(scheme="http", host=name).raw_host
    except (ValueError, UnicodeError):
        raise ValueError(f"is not a URL: {name!r} is not a host name") from None
    if host is None or not _HOST_NAME.fullmatch(host):
        raise ValueError(f"is not a URL: {name!r} is not a host name")
    if _NUMERIC.fullmatch(host):
        # All digits is an IPv4 address; the HTTP client refuses the legacy
        # forms (127.1, 2130706433, 010.0.0.1) that would map onto another.
        try:
            canonical = str(ipaddress.IPv4Address(host)) == host
        except ValueError:
            canonical = False
        if not canonical:
            raise ValueError(f"is not a URL: {name!r} is not a dotted-quad IPv4 address")
    return host


def _port(text: str | None) -> int | None:
    """An empty port is no port (RFC 3986 §6.2.3); else 1-65535."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError(f"is not a URL: bad port {text[:12]!r} (1-65535)")
    return int(text)


def normalize_percent_encoding(path: str) -> str:
    """RFC 3986 §6.2.2.1-2: escapes in uppercase hex, escaped unreserved
    characters decoded, and any other character a path cannot hold as it
    is (a space, a non-ASCII letter) escaped as UTF-8. A ``%`` that starts
    no escape is refused: it cannot be told from a typo."""
    out: list[str] = []
    i = 0
    while i < len(path):
        char = path[i]
        if char == "%":
            digits = path[i + 1 : i + 3]
            if len(digits) != 2 or not set(digits) <= _HEX:
                raise ValueError(f"is not a URL: bad percent-encoding {path[i : i + 3]!r}")
            decoded = chr(int(digits, 16))
            out.append(decoded if decoded in _UNRESERVED else f"%{digits.upper()}")
            i += 3
            continue
        if char in _PATH_SAFE:
            out.append(char)
        else:
            try:
                encoded = char.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("is not a URL: it holds a lone surrogate") from None
            out.extend(f"%{byte:02X}" for byte in encoded)
        i += 1
    return "".join(out)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, as written (the input buffer and the output
    buffer): "." and ".." segments resolved, "//" kept."""
    output: list[str] = []
    rest = path
    while rest:
        if rest.startswith("../"):
            rest = rest[3:]
        elif rest.startswith(("./", "/./")):
            rest = rest[2:]
        elif rest == "/.":
            rest = "/"
        elif rest.startswith("/../"):
            rest = rest[3:]
            if output:
                output.pop()
        elif rest == "/..":
            rest = "/"
            if output:
                output.pop()
        elif rest in (".", ".."):
            rest = ""
        else:
            end = rest.find("/", 1)
            segment, rest = (rest, "") if end < 0 else (rest[:end], rest[end:])
            output.append(segment)
    return "".join(output)
