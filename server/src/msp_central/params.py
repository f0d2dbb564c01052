"""Query parameters, checked against the OpenAPI document.

Each operation's query parameters are declared once, in
:data:`msp_central.openapi.QUERY_PARAMETERS`; :func:`checked_query` parses a
request's query string by that declaration, so the document and the server
cannot disagree. A parameter the operation does not declare, one given twice
that is not a list, a value not of its schema: all are 400
``malformed-query``, never ignored (``?open=yes`` is not "all of them").

The authentication functions in :mod:`msp_central.auth` call it once the
caller is known (an anonymous caller gets its 401 first), and handlers
call it again for the parsed values (it parses once per request).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from msp_central.openapi import query_parameters
from msp_central.problems import Problem

QUERY = web.RequestKey("query", dict[str, Any])

# The longest value any parameter may have (a cursor is the longest).
MAX_VALUE = 512


def checked_query(request: web.Request) -> dict[str, Any]:
    """The request's query parameters, parsed by their declared schemas;
    defaults filled in. Raises ``malformed-query``."""
    if QUERY in request:
        return request[QUERY]
    resource = request.match_info.route.resource
    method = "get" if request.method == "HEAD" else request.method
    declared = query_parameters(method.lower(), resource.canonical) if resource else None
    values = parse_query(request.query, declared or [])
    request[QUERY] = values
    return values


def parse_query(query: MultiMapping[str], declared: list[dict[str, Any]]) -> dict[str, Any]:
    specs = {spec["name"]: spec for spec in declared}
    unknown = sorted(set(query) - set(specs))
    if unknown:
        raise Problem("malformed-query", f"unknown query parameter {unknown[0][:32]!r}")
    values: dict[str, Any] = {}
    for name, spec in specs.items():
        schema = spec["schema"]
        given = query.getall(name, [])
        if not given:
            if "default" in schema:
                values[name] = schema["default"]
            continue
        if schema.get("type") == "array":
            limit = schema.get("maxItems", 32)
            if len(given) > limit:
                raise Problem("malformed-query", f"{name} given {len(given)} times, most {limit}")
            values[name] = [_value(name, text, schema["items"]) for text in given]
        elif len(given) > 1:
            raise Problem("malformed-query", f"{name} may be given at most once")
        else:
            values[name] = _value(name, given[0], schema)
    return values


def _value(name: str, text: str, schema: dict[str, Any]) -> Any:
    if len(text) > MAX_VALUE:
        raise Problem("malformed-query", f"{name} is longer than {MAX_VALUE} characters")
    kind = schema.get("type", "string")
    if "enum" in schema and text not in [str(option).lower() for option in schema["enum"]]:
        options = ", ".join(str(option).lower() for option in schema["enum"])
        raise Problem("malformed-query", f"{name} must be one of {options}, not {text[:32]!r}")
    if kind == "boolean":
        if text not in ("true", "false"):
            raise Problem("malformed-query", f"{name} must be true or false, not {text[:32]!r}")
        return text == "true"
    if kind == "integer":
        if not re.fullmatch(r"-?[0-9]{1,18}", text):
            raise Problem("malformed-query", f"{name} must be an integer, not {text[:32]!r}")
        number = int(text)
        low, high = schema.get("minimum"), schema.get("maximum")
        if (low is not None and number < low) or (high is not None and number > high):
            raise Problem("malformed-query", f"{name} must be from {low} to {high}, not {number}")
        return number
    if schema.get("format") == "date-time":
        return parse_moment(name, text)
    if re.search(r"[\x00-\x1f\x7f]", text):
        raise Problem("malformed-query", f"{name} holds a control character")
    pattern = schema.get("pattern")
    if pattern is not None and not re.search(pattern, text):
        raise Problem("malformed-query", f"{name} is not a valid value: {text[:32]!r}")
    if len(text) > schema.get("maxLength", MAX_VALUE):
        raise Problem("malformed-query", f"{name} is longer than {schema['maxLength']} characters")
    return text


# RFC 3339 date-time, as the document's "format": "date-time" allows it: any
# offset, any number of fraction digits, "t" and "z" in either case.
_MOMENT = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)


def parse_moment(name: str, text: str) -> datetime:
    """An RFC 3339 date-time in UTC. A moment whose offset takes it beyond
    the years 1 to 9999 is the first or the last moment there is: these are
    bounds of filters, and nothing lies beyond them either way."""
    match = _MOMENT.fullmatch(text)
    if match is None:
        raise Problem("malformed-query", f"{name} is not RFC 3339: {text[:40]!r}")
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    try:
        offset = timezone(
            (-1 if sign == "-" else 1) * timedelta(hours=int(off_h or 0), minutes=int(off_m or 0))
        )
        # A leap second (:60) is the first instant of the next minute.
        leap = int(second) == 60
        local = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            59 if leap else int(second),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=offset,
        )
    except ValueError:
        raise Problem(
            "malformed-query", f"{name} is not a valid date and time: {text[:40]!r}"
        ) from None
    try:
        moment = local.astimezone(UTC)
        return moment + timedelta(seconds=1) if leap else moment
    except OverflowError:
        return (
            datetime.min.replace(tzinfo=UTC)
            if local.year == 1
            else datetime.max.replace(tzinfo=UTC)
        )
