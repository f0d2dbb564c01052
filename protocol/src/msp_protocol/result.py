"""The result of a verification: what was verified, or every reason it was not.

Each ``check_*`` function in this package returns a :class:`Result`; the
matching ``verify_*`` function is ``check_*(...).unwrap()``. Tools (``msp-verify``,
``audit verify``) show ``result.failures``; the hot path calls ``verify_*`` and
catches :class:`~msp_protocol.errors.ProtocolError`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, ParamSpec, TypeVar, cast

from msp_protocol.errors import MalformedError, UsageError, VerificationError

T = TypeVar("T")
P = ParamSpec("P")

Failure = VerificationError | MalformedError


@dataclass(frozen=True, slots=True)
class Result(Generic[T]):
    value: T | None
    failures: tuple[Failure, ...] = ()

    @classmethod
    def success(cls, value: T) -> Result[T]:
        return cls(value, ())

    @classmethod
    def failure(cls, *failures: Failure) -> Result[T]:
        if not failures:
            raise UsageError("a failed result needs at least one failure")
        return cls(None, tuple(failures))

    @classmethod
    def collect(cls, value: T, failures: Iterable[Failure]) -> Result[T]:
        found = tuple(failures)
        return cls(None, found) if found else cls(value, ())

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(failure.code for failure in self.failures)

    def unwrap(self) -> T:
        """The verified value, or raise the first failure."""
        if self.failures:
            raise self.failures[0]
        # A success may carry None (a proof check has nothing to return).
        return cast(T, self.value)

    def describe(self) -> str:
        if self.ok:
            return "ok"
        return "; ".join(f"{failure.code}: {failure}" for failure in self.failures)


def raising(check: Callable[P, Result[T]]) -> Callable[P, T]:
    """Make ``verify_x`` from ``check_x``: same arguments, returns the verified
    value or raises the first failure."""

    @functools.wraps(check)
    def verify(*args: P.args, **kwargs: P.kwargs) -> T:
        return check(*args, **kwargs).unwrap()

    verify.__doc__ = (
        f"Like ``{check.__name__}``, but returns the value or raises the first failure."
    )
    return verify
