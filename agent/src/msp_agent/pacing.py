"""How hard an appliance pushes its backlog: the wait before a retry, and
the size of its next audit batch.

A fleet coming back from a regional outage all at once must not knock the
central server over, and must not wait in lockstep either:

- :func:`wait_before_retry`: at least what the server asked for
  (``Retry-After``), plus full jitter over the capped exponential backoff,
  so appliances told the same wait still spread out.
- :class:`BatchSizer`: the number of audit entries per sync request, grown
  while the server answers fast and cut after a refusal for load (503,
  429), a timeout or a slow answer (additive increase is too slow to
  matter for a backlog of a few thousand entries; doubling and halving
  settle in a few batches).

Only the changes that matter are logged at info level (batches cut to the
floor, and back to full size after that); every other change is debug, so
a long backlog does not write a line per batch.
"""

from __future__ import annotations

import logging

from msp_agent.retry import BASE_SECONDS, CAP_SECONDS, retry_delay
from msp_protocol.sync import MAX_BATCH_ENTRIES

# The largest batch the agent sends by default: about 180 KiB of typical
# entries (some 450 bytes of base64 each), small enough for a load balancer
# to hold whole and send again to another replica when the one it chose dies
# mid-request (HAProxy's tune.bufsize in deploy/haproxy.cfg is 256 KiB). The
# protocol allows MAX_BATCH_ENTRIES; per entry, a batch of this size costs
# the witness hardly more than one of that size.
DEFAULT_LARGEST_BATCH = 400

log = logging.getLogger(__name__)


def wait_before_retry(
    attempt: int,
    retry_after: float | None,
    *,
    base: float = BASE_SECONDS,
    cap: float = CAP_SECONDS,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): the
    server's ``Retry-After`` (if any) plus a fully jittered backoff."""
    return (retry_after or 0.0) + retry_delay(attempt, base=base, cap=cap)


class BatchSizer:
    """The size of the next audit batch, from how the last ones went."""

    def __init__(
        self,
        *,
        smallest: int = 50,
        largest: int = DEFAULT_LARGEST_BATCH,
        start: int = 250,
        slow_seconds: float = 2.0,
    ) -> None:
        if not 1 <= smallest <= start <= largest <= MAX_BATCH_ENTRIES:
            raise ValueError("need 1 <= smallest <= start <= largest <= the protocol's batch limit")
        if slow_seconds <= 0:
            raise ValueError("slow_seconds must be positive")
        self.smallest = smallest
        self.largest = largest
        self.slow_seconds = slow_seconds
        self._size = start
        # Cut to the floor since the last time batches were full size.
        self._at_floor = False

    @property
    def size(self) -> int:
        """Entries to put in the next batch."""
        return self._size

    def answered(self, seconds: float) -> None:
        """A batch was witnessed in ``seconds``: grow while that is fast,
        shrink when it was slow (the server is struggling)."""
        if seconds >= self.slow_seconds:
            self._resize(max(self.smallest, self._size // 2), f"a slow answer ({seconds:.1f} s)")
        elif seconds < self.slow_seconds / 4:
            self._resize(min(self.largest, self._size * 2), "fast answers")

    def refused(self) -> None:
        """The server shed the batch (503, 429) or it timed out: halve."""
        self._resize(max(self.smallest, self._size // 2), "a refusal for load")

    def _resize(self, size: int, why: str) -> None:
        before, self._size = self._size, size
        if size == before:
            return
        if size == self.smallest:
            self._at_floor = True
            log.info("audit batches cut to %d entries after %s", size, why)
        elif size == self.largest and self._at_floor:
            self._at_floor = False
            log.info("audit batches back to %d entries", size)
        else:
            log.debug("audit batch size %d -> %d after %s", before, size, why)
