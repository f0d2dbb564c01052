"""A fault-injecting TCP proxy for the multi-process system tests.

The agent talks to the central server through this proxy, and the test turns
the network between them bad on demand, without touching either process (so
either can be killed with SIGKILL while the proxy, and the port the agent
dials, stay up). Modes:

- ``pass``: forward bytes both ways.
- ``refuse``: accept, then reset at once (RST, via ``SO_LINGER`` 0); open
  connections are reset too. The client sees a reset within milliseconds.
- ``blackhole``: accept, forward nothing, never answer; open connections stop
  forwarding too (bytes are swallowed, not delivered late, and neither side
  learns of an EOF or reset from the other). The client's own timeout must fire. When
  the mode leaves ``blackhole``, every connection it swallowed is *reset*,
  not resumed: a request held for seconds and then delivered would be a
  replay no real network makes, and a test of timeouts wants the client to
  have given up on that connection anyway.
- ``cut``: forward, but after ``after_bytes`` bytes in ``direction`` (``up``,
  client to server, a cut mid-request; or ``down``, a cut mid-response) reset
  both sides. Exactly ``after_bytes`` bytes are delivered. The budget starts
  when the mode is set, for open connections too. ``times`` (optional): after
  that many cuts the proxy returns to ``pass`` by itself, so a retry that
  follows a cut gets through without a race against the test.
- ``slow``: forward after ``delay`` seconds per chunk read, and/or at most
  ``bytes_per_second``, both directions, open connections too.

If the upstream is down, a new connection is reset, as a refused connection
to the server would be.

In-process (pytest async tests)::

    async with FaultProxy(upstream_port) as proxy:
        proxy.set_mode("cut", after_bytes=100)
        ...  # connect to 127.0.0.1:proxy.port

As a separate process, driven from a synchronous test::

    with start_proxy_process(upstream_port) as proxy:
        proxy.control.set_mode("blackhole")
        proxy.control.stats()  # {"mode": "blackhole", "accepted": 3, ...}

or by hand: ``python -m tests.system.proxy --upstream 127.0.0.1:8080
[--listen 127.0.0.1:0] [--control 127.0.0.1:0]`` (port 0: any free port). It
prints ``listening <port> control <port>`` on stdout once it is serving; the
control endpoint (loopback HTTP) takes ``POST /mode`` with a JSON body
``{"mode": ..., **params}``, ``POST /upstream`` with ``{"host": ..., "port":
...}`` (for a server restarted on another port) and ``GET /stats``. SIGTERM
or SIGINT shuts it down cleanly (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import select
import signal
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypedDict

from aiohttp import web

MODES = ("pass", "refuse", "blackhole", "cut", "slow")
CHUNK = 64 * 1024
# Writes per second under a bandwidth limit: often enough that bytes trickle
# out rather than arriving in one late burst per 64 KiB read.
SLOW_TICKS_PER_SECOND = 20
ROOT = Path(__file__).resolve().parents[2]

Direction = Literal["up", "down"]


@dataclass(frozen=True)
class Mode:
    """The proxy's current behaviour: a mode name and that mode's parameters."""

    name: str = "pass"
    after_bytes: int = 0
    direction: Direction = "up"
    times: int | None = None
    delay: float = 0.0
    bytes_per_second: float | None = None

    @classmethod
    def parse(cls, name: str, **params: Any) -> Mode:
        """Validate a mode and its parameters (ValueError names what is wrong)."""
        allowed: dict[str, set[str]] = {
            "pass": set(),
            "refuse": set(),
            "blackhole": set(),
            "cut": {"after_bytes", "direction", "times"},
            "slow": {"delay", "bytes_per_second"},
        }
        if name not in allowed:
            raise ValueError(f"unknown mode {name!r}; one of {', '.join(MODES)}")
        unknown = set(params) - allowed[name]
        if unknown:
            raise ValueError(f"mode {name!r} takes no {', '.join(sorted(unknown))}")
        mode = cls(name=name, **params)
        if name == "cut":
            if "after_bytes" not in params:
                raise ValueError("mode 'cut' needs after_bytes")
            if not isinstance(mode.after_bytes, int) or mode.after_bytes < 0:
                raise ValueError("after_bytes must be an integer >= 0")
            if mode.direction not in ("up", "down"):
                raise ValueError("direction must be 'up' or 'down'")
            if mode.times is not None and (not isinstance(mode.times, int) or mode.times < 1):
                raise ValueError("times must be an integer >= 1")
        if mode.delay < 0 or (mode.bytes_per_second is not None and mode.bytes_per_second <= 0):
            raise ValueError("delay must be >= 0 and bytes_per_second > 0")
        return mode

    def params(self) -> dict[str, Any]:
        """The parameters that mean something in this mode, for stats."""
        if self.name == "cut":
            return {
                "after_bytes": self.after_bytes,
                "direction": self.direction,
                "times": self.times,
            }
        if self.name == "slow":
            return {"delay": self.delay, "bytes_per_second": self.bytes_per_second}
        return {}


class Stats(TypedDict):
    mode: str
    params: dict[str, Any]
    accepted: int  # connections accepted since start, in any mode
    open: int  # connections accepted and not yet closed
    bytes_up: int  # bytes delivered to the upstream (client to server)
    bytes_down: int  # bytes delivered to clients (server to client)
    cuts: int  # connections reset by the cut mode


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN, as a failed network or host would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # The socket may already be gone (the peer reset it first): nothing to set.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    # Swallowed by a blackhole: forwards nothing from then on, reset when the
    # mode changes.
    blackholed: bool = False
    closed: bool = False
    # Bytes still allowed in cut_direction before the cut (None: no cut).
    cut_left: int | None = None
    cut_direction: Direction = "up"

    def close(self, *, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            if reset:
                _reset(writer)
            else:
                writer.close()


class FaultProxy:
    """Forwards ``host:port`` to the upstream, injecting the current mode's faults."""

    def __init__(
        self,
        upstream_port: int,
        *,
        upstream_host: str = "127.0.0.1",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self._requested_port = port
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._mode = Mode()
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._accepted = 0
        self._bytes = {"up": 0, "down": 0}
        self._cuts = 0

    @property
    def port(self) -> int:
        """The port clients connect to (known once started)."""
        if self._port is None:
            raise RuntimeError("proxy not started")
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self._requested_port)
        self._port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, reset every open connection, end every handler."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for connection in list(self._connections):
            connection.close(reset=True)
        # With every connection reset there is nothing left to wait for: a
        # handler may be asleep in slow mode or dialling, so cancel, not wait.
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def set_upstream(self, port: int, host: str = "127.0.0.1") -> None:
        """Where new connections go (open ones stay where they are)."""
        self.upstream = (host, port)

    def set_mode(self, mode: str, **params: Any) -> Stats:
        """Switch mode (see the module docstring); returns the stats after the switch."""
        new = Mode.parse(mode, **params)
        self._mode = new
        for connection in list(self._connections):
            if new.name == "refuse" or (connection.blackholed and new.name != "blackhole"):
                connection.close(reset=True)
            elif new.name == "blackhole":
                connection.blackholed = True
            connection.cut_left = new.after_bytes if new.name == "cut" else None
            connection.cut_direction = new.direction
        return self.stats()

    def stats(self) -> Stats:
        return {
            "mode": self._mode.name,
            "params": self._mode.params(),
            "accepted": self._accepted,
            "open": len(self._connections),
            "bytes_up": self._bytes["up"],
            "bytes_down": self._bytes["down"],
            "cuts": self._cuts,
        }

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Serve in a task of our own, not in the one start_server() makes: ours
        # may be cancelled at close() (asyncio 3.11 logs an error when the
        # server's own task ends cancelled).
        task = asyncio.create_task(self._serve(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        connection = _Connection(client=writer)
        mode = self._mode
        try:
            if mode.name == "refuse":
                connection.close(reset=True)
                return
            # From here on set_mode() updates the connection as the mode changes.
            self._connections.add(connection)
            if mode.name == "cut":
                connection.cut_left = mode.after_bytes
                connection.cut_direction = mode.direction
            if mode.name == "blackhole":
                connection.blackholed = True
                await self._pump(connection, reader, None, "up")
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                connection.close(reset=True)
                return
            connection.upstream = up_writer
            if connection.closed:  # reset (refuse, close) while we were dialling
                _reset(up_writer)
                return
            for w in (writer, up_writer):
                # Drain waits until the kernel has every byte: byte counts are
                # exact, and a cut's last bytes are sent before its RST.
                w.transport.set_write_buffer_limits(high=0)
            await asyncio.gather(
                self._pump(connection, reader, up_writer, "up"),
                self._pump(connection, up_reader, writer, "down"),
            )
        finally:
            # Both directions ended (EOF or reset): close what is left gracefully.
            connection.close(reset=False)
            self._connections.discard(connection)

    async def _pump(
        self,
        connection: _Connection,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter | None,
        direction: Direction,
    ) -> None:
        """Copy source to sink in the current mode until EOF, error or cut."""
        while not connection.closed:
            try:
                data = await source.read(CHUNK)
            except OSError:
                # A reset from one peer: pass it on to the other, as the bare
                # network would; unless blackholed (the other side must learn
                # nothing; it is reset when the blackhole lifts).
                if not connection.blackholed:
                    connection.close(reset=True)
                return
            if not data:
                # EOF: pass on the half-close, unless blackholed (the other side
                # must learn nothing) or already torn down.
                if sink is not None and not connection.closed and not connection.blackholed:
                    with contextlib.suppress(OSError):
                        sink.write_eof()
                return
            if sink is not None:  # None: a blackhole's client, whose bytes go nowhere
                await self._forward(connection, data, sink, direction)

    async def _forward(
        self,
        connection: _Connection,
        data: bytes,
        sink: asyncio.StreamWriter,
        direction: Direction,
    ) -> None:
        """Deliver one chunk as the mode says (all of it, part of it, or none)."""
        mode = self._mode
        slow = mode.name == "slow"
        if slow and mode.delay:
            await asyncio.sleep(mode.delay)
        step = len(data)
        if slow and mode.bytes_per_second:
            step = max(1, int(mode.bytes_per_second / SLOW_TICKS_PER_SECOND))
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            if slow and mode.bytes_per_second:
                await asyncio.sleep(len(piece) / mode.bytes_per_second)
            # Re-checked after every wait: the mode may have changed meanwhile.
            if connection.closed or connection.blackholed:
                return
            cut = False
            if connection.cut_left is not None and connection.cut_direction == direction:
                if len(piece) >= connection.cut_left:
                    piece = piece[: connection.cut_left]
                    cut = True
                connection.cut_left -= len(piece)
            try:
                sink.write(piece)
                await sink.drain()
            except OSError:
                connection.close(reset=True)
                return
            self._bytes[direction] += len(piece)
            if cut:
                self._cut(connection)
                return

    def _cut(self, connection: _Connection) -> None:
        connection.close(reset=True)
        self._cuts += 1
        mode = self._mode
        if mode.name == "cut" and mode.times is not None:
            if mode.times > 1:
                self._mode = Mode.parse("cut", **{**mode.params(), "times": mode.times - 1})
            else:
                self.set_mode("pass")


# --- Control over HTTP, for a proxy in another process ------------------------


class ControlServer:
    """``POST /mode``, ``POST /upstream`` and ``GET /stats`` on loopback HTTP."""

    def __init__(self, proxy: FaultProxy, host: str = "127.0.0.1", port: int = 0) -> None:
        self.proxy = proxy
        self.host = host
        self._requested_port = port
        app = web.Application()
        app.router.add_post("/mode", self._mode)
        app.router.add_post("/upstream", self._upstream)
        app.router.add_get("/stats", self._stats)
        self._runner = web.AppRunner(app, access_log=None)
        self._site: web.TCPSite | None = None

    @property
    def port(self) -> int:
        port: int = self._runner.addresses[0][1]
        return port

    async def start(self) -> None:
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self._requested_port)
        await self._site.start()

    async def close(self) -> None:
        await self._runner.cleanup()

    async def _mode(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            params = dict(body)
            stats = self.proxy.set_mode(params.pop("mode", None), **params)
        except (TypeError, ValueError) as e:
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response(stats)

    async def _upstream(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            self.proxy.set_upstream(int(body["port"]), str(body.get("host", "127.0.0.1")))
        except (TypeError, ValueError, KeyError) as e:
            return web.json_response({"error": f"expected {{host, port}}: {e}"}, status=400)
        return web.json_response(self.proxy.stats())

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.proxy.stats())


class ProxyControl:
    """Synchronous client of a ControlServer (urllib: usable from any thread)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.base = f"http://{host}:{port}"
        self.timeout = timeout

    def set_mode(self, mode: str, **params: Any) -> Stats:
        """Switch the proxy's mode; ValueError if the proxy rejects it."""
        result: Stats = self._call("POST", "/mode", {"mode": mode, **params})
        return result

    def set_upstream(self, port: int, host: str = "127.0.0.1") -> Stats:
        result: Stats = self._call("POST", "/upstream", {"host": host, "port": port})
        return result

    def stats(self) -> Stats:
        result: Stats = self._call("GET", "/stats", None)
        return result

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            with e:  # the error holds the response open: close it
                raise ValueError(e.read().decode(errors="replace")) from None


# --- The proxy as a child process ----------------------------------------------


class ProxyProcess:
    """A proxy running in a child process; stop() (or leaving ``with``) ends it."""

    def __init__(self, process: subprocess.Popen[str], port: int, control_port: int) -> None:
        self.process = process
        self.host = "127.0.0.1"
        self.port = port
        self.control = ProxyControl(control_port)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait (SIGKILL if it will not go); returns the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_proxy_process(
    upstream_port: int,
    *,
    upstream_host: str = "127.0.0.1",
    listen_port: int = 0,
    timeout: float = 15.0,
) -> ProxyProcess:
    """Start ``python -m tests.system.proxy`` and wait until it is serving."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.system.proxy",
            "--listen",
            f"127.0.0.1:{listen_port}",
            "--upstream",
            f"{upstream_host}:{upstream_port}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    try:
        # select before readline: a child that hangs before printing must fail
        # this call, not hang the test.
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline() if ready else ""
        words = line.split()
        if len(words) != 4 or words[0] != "listening" or words[2] != "control":
            raise RuntimeError(f"proxy process did not start (said {line!r})")
        return ProxyProcess(process, int(words[1]), int(words[3]))
    except BaseException:
        ProxyProcess(process, 0, 0).stop()
        raise


# --- Command line ------------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _main(
    listen: tuple[str, int], upstream: tuple[str, int], control: tuple[str, int]
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    proxy = FaultProxy(upstream[1], upstream_host=upstream[0], host=listen[0], port=listen[1])
    await proxy.start()
    control_server = ControlServer(proxy, *control)
    try:
        await control_server.start()
        print(f"listening {proxy.port} control {control_server.port}", flush=True)
        await stop.wait()
    finally:
        await control_server.close()
        await proxy.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.system.proxy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0), help="HOST:PORT")
    parser.add_argument("--upstream", type=_address, required=True, help="HOST:PORT")
    parser.add_argument("--control", type=_address, default=("127.0.0.1", 0), help="HOST:PORT")
    args = parser.parse_args(argv)
    asyncio.run(_main(args.listen, args.upstream, args.control))


if __name__ == "__main__":
    main()
