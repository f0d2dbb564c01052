"""Retry delays: exponential backoff with full jitter, applied after the cap.

``delay = uniform(0, min(cap, base * 2**attempt))``, with the exponential
sequence from the ``backoff`` package and its full-jitter function. The jitter
comes after the cap, so a fleet whose appliances all reached the cap does not
retry in lockstep (each waits a uniformly random time up to the cap, not the
cap itself).
"""

from __future__ import annotations

import itertools

import backoff

BASE_SECONDS = 1.0
CAP_SECONDS = 64.0


def capped_backoff(attempt: int, *, base: float = BASE_SECONDS, cap: float = CAP_SECONDS) -> float:
    """``min(cap, base * 2**attempt)``: the ceiling of the jittered delay."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    sequence = backoff.expo(base=2, factor=base, max_value=cap)
    next(sequence)  # the generator's priming yield
    # The sequence stays at the cap once it reaches it; never walk further.
    steps = min(attempt, max(0, int(cap / base).bit_length() + 1))
    value = next(itertools.islice(sequence, steps, None))
    return float(value)


def retry_delay(attempt: int, *, base: float = BASE_SECONDS, cap: float = CAP_SECONDS) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based)."""
    return float(backoff.full_jitter(capped_backoff(attempt, base=base, cap=cap)))
