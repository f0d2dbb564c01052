"""What every handler needs: the service object, one AppKey, body helpers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from msp_central.config import Settings
from msp_central.problems import Problem
from msp_protocol.canonical import canonicalize, parse_json
from msp_protocol.errors import MalformedError
from msp_protocol.keys import SigningKey
from msp_protocol.limits import DEFAULT_LIMITS, Limits
from msp_protocol.model import first_problem

if TYPE_CHECKING:
    from msp_central.admission import Admission

Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Central:
    settings: Settings
    engine: AsyncEngine
    root: SigningKey
    clock: Callable[[], datetime]
    limits: Limits = DEFAULT_LIMITS


CENTRAL = web.AppKey("central", Central)
# Set to have the notifier start a round now rather than at its next tick.
NOTIFY_WAKE = web.AppKey("notify_wake", asyncio.Event)
# The per-process admission state: lanes, their counters, shutting down
# (msp_central.admission; read by the health check and the metrics).
ADMISSION: web.AppKey[Admission] = web.AppKey("admission")


def central(request: web.Request) -> Central:
    return request.app[CENTRAL]


async def read_body(request: web.Request, limit: int | None = None) -> bytes:
    limit = limit or request.app[CENTRAL].settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise Problem("body-too-large", f"body of {request.content_length} bytes, limit {limit}")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Problem("body-too-large", f"body exceeds {limit} bytes") from None
    if len(body) > limit:
        raise Problem("body-too-large", f"body of {len(body)} bytes, limit {limit}")
    return body


def parse_json_object(
    body: bytes,
    request: web.Request,
    max_bytes: int | None = None,
    media_types: tuple[str, ...] = ("application/json",),
) -> dict[str, Any]:
    """A JSON request body of one of ``media_types``, parsed strictly (no
    duplicate keys, no NaN…), that must be an object."""
    if not body:
        raise Problem("malformed-json", "the request body is empty; send a JSON object")
    if request.content_type not in media_types:
        raise Problem(
            "unsupported-media-type",
            f"content type {request.content_type[:80]}; send {' or '.join(media_types)}",
        )
    try:
        value = parse_json(body, limits=request.app[CENTRAL].limits, max_bytes=max_bytes)
    except MalformedError as exc:
        raise Problem("malformed-json", str(exc)) from None
    if not isinstance(value, dict):
        raise Problem("malformed-document", "request body is not a JSON object")
    whole: dict[str, Any] = whole_numbers(value)
    return whole


def whole_numbers(value: Any) -> Any:
    """``value`` with every whole float within ±2^53 made an int. JSON has
    one kind of number and JSON Schema's ``integer`` is any number without
    a fraction, so ``{"hours": 497.0}`` means 497. Beyond 2^53 a float is
    no longer exact and stays a float (the parser refuses most of those;
    1e21 and up it keeps, as floats)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [whole_numbers(item) for item in value]
    return value


def parse_body(
    body: bytes, model: type[Model], request: web.Request, max_bytes: int | None = None
) -> Model:
    """:func:`parse_json_object` into a strict model; ``max_bytes`` for a
    route whose bodies may exceed the usual JSON bound (the caller read at
    most that many)."""
    value = parse_json_object(body, request, max_bytes)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise Problem("malformed-document", first_problem(exc)) from None
    except MalformedError as exc:
        raise Problem.from_protocol(exc) from None


def json_response(value: BaseModel | list[Any] | dict[str, Any], status: int = 200) -> web.Response:
    if isinstance(value, BaseModel):
        data: Any = value.model_dump(mode="json")
    elif isinstance(value, list):
        data = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    else:
        data = value
    return web.Response(status=status, body=canonicalize(data), content_type="application/json")


def download(body: bytes, filename: str) -> web.Response:
    """A JSON document a browser saves under ``filename``."""
    return web.Response(
        body=body,
        content_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def new_secret(prefix: str) -> str:
    """A random credential: ``<prefix>_<64 hex>`` (256 bits)."""
    return f"{prefix}_{os.urandom(32).hex()}"


def load_root_key(path: Path) -> SigningKey:
    """The central root key: a hex Ed25519 seed in a file only we can read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"central root key {path} does not exist: run `msp-central keys init`"
        ) from None
    if mode & 0o077:
        raise PermissionError(f"central root key {path} is readable by others: chmod 600 {path}")
    try:
        return SigningKey(bytes.fromhex(text))
    except ValueError:
        raise ValueError(f"central root key {path} is not a hex Ed25519 seed") from None


def write_root_key(path: Path) -> SigningKey:
    """Create a new root key file (0600); refuse to overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = SigningKey.generate()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FileExistsError(f"{path} exists: refusing to overwrite a central root key") from None
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(key.seed_bytes().hex() + "\n")
        file.flush()
        os.fsync(file.fileno())
    return key
