"""The systemd notification protocol (sd_notify), without a library.

A ``Type=notify`` service tells systemd it is ready (``READY=1``), what it is
doing (``STATUS=…``), that its main loop is alive (``WATCHDOG=1``, at least
once per ``WatchdogSec``) and that it is stopping (``STOPPING=1``). Each is one
datagram to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a leading
``@`` means the abstract namespace). Outside systemd the variable is unset
and every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None, watchdog_usec: str | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec

    @classmethod
    def from_environment(cls) -> Notifier:
        watchdog = os.environ.get("WATCHDOG_USEC")
        # WATCHDOG_PID names the process the watchdog is for; a child we
        # spawned must not feed the parent's watchdog.
        pid = os.environ.get("WATCHDOG_PID")
        if pid is not None and pid != str(os.getpid()):
            watchdog = None
        return cls(os.environ.get("NOTIFY_SOCKET"), watchdog)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings: half the configured timeout,
        as sd_watchdog_enabled(3) advises; None when there is no watchdog."""
        if not self._watchdog_usec:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        return usec / 2_000_000 if usec > 0 else None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=online"``) as one message."""
        if not self._address:
            return False
        address = self._address
        if address.startswith("@"):
            address = "\0" + address[1:]
        message = "\n".join(field.replace("\n", " ") for field in fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall(message)
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")
