"""The link to the central server, as the agent's own requests find it.

There is no probing: every request the central client makes reports its
outcome here, and the state follows.

- ``online``: the last request got an answer the server meant (2xx to 4xx).
- ``degraded``: the server answered but could not serve (5xx, 429), or the
  last one or two requests got no answer at all.
- ``offline``: :data:`OFFLINE_AFTER` requests in a row got no answer.

When a request gets an answer after requests got none (the link was down),
every listener is called at once (:meth:`Connectivity.on_recovery`): the
queues retry immediately instead of sleeping out their backoff. A server
that answers but fails (5xx, 429) wakes nobody: its queues keep backing off,
and however the link flaps, listeners are called at most once per
:data:`MIN_WAKE_SECONDS`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import StrEnum

log = logging.getLogger(__name__)

OFFLINE_AFTER = 3
MIN_WAKE_SECONDS = 5.0


class LinkState(StrEnum):
    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"


class Connectivity:
    def __init__(self, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        # Unknown until the first request: nothing has failed yet.
        self.state = LinkState.DEGRADED
        self.failures = 0
        self.last_error: str | None = None
        self.last_answer_at: float | None = None
        # The last failure got no answer at all (the link, not the server).
        self.unreachable = True
        self._woken_at: float | None = None
        self._listeners: list[Callable[[], None]] = []

    def on_recovery(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def answered(self) -> None:
        """A request got an answer the server meant (success or a refusal)."""
        was_down = self.state is not LinkState.ONLINE and self.unreachable
        if self.state is not LinkState.ONLINE:
            log.info("central server reachable: link online")
        self.state, self.failures, self.last_error = LinkState.ONLINE, 0, None
        self.unreachable = False
        now = self.last_answer_at = self._monotonic()
        if was_down and (self._woken_at is None or now - self._woken_at >= MIN_WAKE_SECONDS):
            self._woken_at = now
            for listener in self._listeners:
                listener()

    def unavailable(self, error: str, *, server_answered: bool) -> None:
        """A request failed: no answer, or an answer that decided nothing."""
        self.failures += 1
        self.last_error = error
        previous = self.state
        self.unreachable = not server_answered
        if server_answered:
            self.last_answer_at = self._monotonic()
            self.state = LinkState.DEGRADED
        elif self.failures >= OFFLINE_AFTER:
            self.state = LinkState.OFFLINE
        else:
            self.state = LinkState.DEGRADED
        if self.state is not previous:
            log.warning("link %s: %s", self.state, error)

    def seconds_since_answer(self) -> float | None:
        if self.last_answer_at is None:
            return None
        return self._monotonic() - self.last_answer_at
