"""The base of every wire document: strict, frozen, canonical."""

from __future__ import annotations

from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from msp_protocol.canonical import canonicalize, parse_json
from msp_protocol.errors import ModelError
from msp_protocol.limits import DEFAULT_LIMITS, Limits


class WireModel(BaseModel):
    """A JSON document of the protocol.

    Unknown fields are refused, values are immutable, and the one way to bytes
    is :meth:`canonical_bytes` (RFC 8785).
    """

    # Field types are strict one by one (StrictInt, strict strings); the model
    # as a whole is not, so JSON arrays validate as tuples.
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Human name used in error messages ("delegation certificate: ...").
    document_name: ClassVar[str] = "document"

    @classmethod
    def from_wire(cls, value: Any) -> Self:
        """Validate an already-parsed JSON value; raise :class:`ModelError`."""
        if not isinstance(value, dict):
            raise ModelError(f"{cls.document_name} is not a JSON object")
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            raise ModelError(f"{cls.document_name}: {first_problem(exc)}") from None

    @classmethod
    def from_json(cls, data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Self:
        return cls.from_wire(parse_json(data, limits=limits))

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def canonical_bytes(self) -> bytes:
        return canonicalize(self.to_wire())


def first_problem(exc: ValidationError) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "value"
    return f"{where}: {error['msg']}"
