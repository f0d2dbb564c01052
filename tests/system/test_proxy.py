"""The fault-injecting proxy itself, over real loopback sockets.

Most tests run the proxy in-process in front of a tiny asyncio upstream that
records what reaches it; one runs it as a child process and drives it through
its control endpoint, the way the system tests do.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.system.proxy import FaultProxy, start_proxy_process

# Long enough that a forwarded byte would have arrived many times over on
# loopback; short enough to keep the file fast.
QUIET = 0.5
# How long a reset may take to be noticed: "quickly", with room for a busy CI.
PROMPT = 2.0


class Peer(asyncio.Protocol):
    """One end of a TCP connection: records what arrives and how it ended."""

    def __init__(self, *, echo: bool = False, greeting: bytes = b"") -> None:
        self.echo = echo
        self.greeting = greeting
        self.data = bytearray()
        self.transport: asyncio.Transport | None = None
        # None for an orderly close (FIN), the error for a reset.
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.greeting:
            transport.write(self.greeting)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)
        self._changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        self._changed.set()

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def received(self, n: int) -> bytes:
        """Wait until at least n bytes have arrived; return everything so far."""
        async with asyncio.timeout(PROMPT):
            while len(self.data) < n:
                self._changed.clear()
                await self._changed.wait()
        return bytes(self.data)

    async def ended(self) -> Exception | None:
        """Wait for the connection to end; None if closed, the error if reset."""
        return await asyncio.wait_for(asyncio.shield(self.lost), PROMPT)


class Upstream:
    """A loopback TCP server whose every accepted connection is a Peer."""

    def __init__(self) -> None:
        self.echo = True
        self.greeting = b""
        self.peers: list[Peer] = []
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def _accept(self) -> Peer:
        peer = Peer(echo=self.echo, greeting=self.greeting)
        self.peers.append(peer)
        return peer

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        await _close_all(self.peers)


async def until(condition: Callable[[], bool]) -> None:
    """Poll for a condition the proxy has no event for (its counters)."""
    for _ in range(int(PROMPT / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def _close_all(peers: list[Peer]) -> None:
    for peer in peers:
        peer.close()
    # Wait for connection_lost: a transport still open at loop close warns.
    await asyncio.wait_for(asyncio.gather(*(p.lost for p in peers)), PROMPT)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def proxy(upstream: Upstream) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(upstream.port) as running:
        yield running


Connect = Callable[[int], Awaitable[Peer]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    clients: list[Peer] = []

    async def _connect(port: int) -> Peer:
        _, peer = await asyncio.get_running_loop().create_connection(Peer, "127.0.0.1", port)
        clients.append(peer)
        return peer

    yield _connect
    await _close_all(clients)


async def test_pass_forwards_both_ways_and_counts(
    proxy: FaultProxy, upstream: Upstream, connect: Connect
) -> None:
    payload = bytes(range(256)) * 800  # 200 KiB: several reads and writes each way
    client = await connect(proxy.port)
    client.send(payload)

    assert await client.received(len(payload)) == payload
    assert upstream.peers[0].data == payload
    stats = proxy.stats()
    assert stats["mode"] == "pass"
    assert (stats["accepted"], stats["open"], stats["cuts"]) == (1, 1, 0)
    assert stats["bytes_up"] == stats["bytes_down"] == len(payload)

    client.close()
    assert await upstream.peers[0].ended() is None  # the close is passed on as a close
    await until(lambda: proxy.stats()["open"] == 0)


async def test_refuse_resets_new_and_open_connections(
    proxy: FaultProxy, upstream: Upstream, connect: Connect
) -> None:
    before = await connect(proxy.port)
    before.send(b"hello")
    await before.received(5)

    proxy.set_mode("refuse")
    assert isinstance(await before.ended(), ConnectionResetError)
    assert isinstance(await upstream.peers[0].ended(), ConnectionResetError)

    started = time.monotonic()
    try:
        refused = await connect(proxy.port)
    except ConnectionError:
        pass  # the reset can beat the end of the handshake on a busy machine
    else:
        assert isinstance(await refused.ended(), ConnectionResetError)
    assert time.monotonic() - started < PROMPT
    assert len(upstream.peers) == 1  # nothing went upstream

    proxy.set_mode("pass")
    after = await connect(proxy.port)
    after.send(b"again")
    assert await after.received(5) == b"again"
    assert proxy.stats()["accepted"] == 3


async def test_blackhole_swallows_then_resets_when_lifted(
    proxy: FaultProxy, upstream: Upstream, connect: Connect
) -> None:
    held = await connect(proxy.port)
    held.send(b"first")
    await held.received(5)

    proxy.set_mode("blackhole")
    held.send(b"late")
    upstream.peers[0].close()  # the server's close must not get through either
    swallowed = await connect(proxy.port)
    swallowed.send(b"nobody hears this")
    await asyncio.sleep(QUIET)

    assert held.data == b"first"
    assert swallowed.data == b""
    assert not held.lost.done()
    assert not swallowed.lost.done()
    assert upstream.peers[0].data == b"first"
    assert len(upstream.peers) == 1  # a blackholed connection dials nothing
    assert proxy.stats()["accepted"] == 2

    # Lifting the blackhole resets what it swallowed: nothing arrives late.
    proxy.set_mode("pass")
    assert isinstance(await held.ended(), ConnectionResetError)
    assert isinstance(await swallowed.ended(), ConnectionResetError)
    assert upstream.peers[0].data == b"first"

    fresh = await connect(proxy.port)
    fresh.send(b"through")
    assert await fresh.received(7) == b"through"


async def test_blackhole_times_out_a_stream_client(proxy: FaultProxy) -> None:
    proxy.set_mode("blackhole")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), QUIET)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_cut_up_delivers_exactly_n_bytes_then_resets_both_sides(
    proxy: FaultProxy, upstream: Upstream, connect: Connect
) -> None:
    upstream.echo = False
    open_before = await connect(proxy.port)
    open_before.send(b"x" * 100)
    await until(lambda: len(upstream.peers) == 1)
    await upstream.peers[0].received(100)

    proxy.set_mode("cut", after_bytes=1000)
    open_before.send(b"y" * 5000)
    fresh = await connect(proxy.port)
    fresh.send(b"z" * 5000)
    await until(lambda: len(upstream.peers) == 2)

    # An open connection's budget starts when the mode is set.
    assert isinstance(await open_before.ended(), ConnectionResetError)
    assert isinstance(await upstream.peers[0].ended(), ConnectionResetError)
    assert upstream.peers[0].data == b"x" * 100 + b"y" * 1000
    assert isinstance(await fresh.ended(), ConnectionResetError)
    assert isinstance(await upstream.peers[1].ended(), ConnectionResetError)
    assert upstream.peers[1].data == b"z" * 1000

    stats = proxy.stats()
    assert stats["mode"] == "cut"  # until told otherwise
    assert stats["params"] == {"after_bytes": 1000, "direction": "up", "times": None}
    assert (stats["cuts"], stats["bytes_up"]) == (2, 2100)


async def test_cut_down_delivers_exactly_n_bytes_of_the_answer(
    proxy: FaultProxy, upstream: Upstream, connect: Connect
) -> None:
    upstream.echo = False
    upstream.greeting = b"r" * 100_000
    proxy.set_mode("cut", after_bytes=3000, direction="down")

    client = await connect(proxy.port)
    assert isinstance(await client.ended(), ConnectionResetError)
    assert client.data == b"r" * 3000
    assert isinstance(await upstream.peers[0].ended(), ConnectionResetError)
    assert proxy.stats()["bytes_down"] == 3000


async def test_cut_with_times_returns_to_pass_by_itself(
    proxy: FaultProxy, upstream: Upstream, connect: Connect
) -> None:
    proxy.set_mode("cut", after_bytes=3, times=2)
    for _ in range(2):
        cut = await connect(proxy.port)
        cut.send(b"abcdef")
        assert isinstance(await cut.ended(), ConnectionResetError)
        assert isinstance(await upstream.peers[-1].ended(), ConnectionResetError)
        assert upstream.peers[-1].data == b"abc"
    assert proxy.stats()["mode"] == "pass"

    retry = await connect(proxy.port)
    retry.send(b"abcdef")
    assert await retry.received(6) == b"abcdef"
    assert proxy.stats()["cuts"] == 2


async def test_slow_delays_each_chunk(proxy: FaultProxy, connect: Connect) -> None:
    delay = 0.2
    proxy.set_mode("slow", delay=delay)
    client = await connect(proxy.port)
    started = time.monotonic()
    client.send(b"ping")
    await client.received(4)
    # Delayed once on the way up and once on the way back.
    assert time.monotonic() - started >= 2 * delay * 0.8


async def test_slow_limits_bandwidth(proxy: FaultProxy, connect: Connect) -> None:
    payload = b"b" * 4000
    proxy.set_mode("slow", bytes_per_second=20_000)  # 0.2 s for the payload
    client = await connect(proxy.port)
    started = time.monotonic()
    client.send(payload)
    assert await client.received(len(payload)) == payload
    assert time.monotonic() - started >= 0.2 * 0.8


async def test_upstream_down_resets_the_client_until_pointed_elsewhere(
    upstream: Upstream, connect: Connect
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    async with FaultProxy(dead_port) as proxy:
        client = await connect(proxy.port)
        assert isinstance(await client.ended(), ConnectionResetError)

        proxy.set_upstream(upstream.port)
        client = await connect(proxy.port)
        client.send(b"up again")
        assert await client.received(8) == b"up again"


async def test_rejects_unknown_modes_and_parameters(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        proxy.set_mode("flaky")
    with pytest.raises(ValueError, match="needs after_bytes"):
        proxy.set_mode("cut")
    with pytest.raises(ValueError, match="direction"):
        proxy.set_mode("cut", after_bytes=1, direction="sideways")
    with pytest.raises(ValueError, match="takes no delay"):
        proxy.set_mode("refuse", delay=1)
    assert proxy.stats()["mode"] == "pass"


async def test_close_resets_connections_and_leaves_no_tasks(
    upstream: Upstream, connect: Connect
) -> None:
    proxy = FaultProxy(upstream.port)
    await proxy.start()
    forwarding = await connect(proxy.port)
    forwarding.send(b"1")
    await forwarding.received(1)
    proxy.set_mode("blackhole")
    swallowed = await connect(proxy.port)
    await until(lambda: proxy.stats()["accepted"] == 2)

    await proxy.close()
    assert isinstance(await forwarding.ended(), ConnectionResetError)
    assert isinstance(await swallowed.ended(), ConnectionResetError)
    assert asyncio.all_tasks() == {asyncio.current_task()}
    with pytest.raises(ConnectionRefusedError):
        await connect(proxy.port)


# --- As a separate process, from a synchronous test ---------------------------


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the agent's client uses

    def do_GET(self) -> None:
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output quiet


class HelloServer(ThreadingHTTPServer):
    """A plain HTTP upstream in a thread, answering every GET with "hello"."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Hello)
        self.port = self.server_address[1]
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the proxy resets connections on purpose: not worth a traceback

    def stop(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
            self._thread.join()
            self.server_close()


def _get(connection: http.client.HTTPConnection) -> bytes:
    connection.request("GET", "/")
    response = connection.getresponse()
    assert response.status == 200
    return response.read()


def _connection(port: int, timeout: float = QUIET) -> closing[http.client.HTTPConnection]:
    return closing(http.client.HTTPConnection("127.0.0.1", port, timeout=timeout))


def test_process_is_driven_through_its_control_endpoint() -> None:
    upstream = HelloServer()
    try:
        with start_proxy_process(upstream.port) as proxy:
            with _connection(proxy.port) as kept:
                assert _get(kept) == b"hello"
                assert proxy.control.stats()["bytes_down"] > 0
                # A keep-alive connection hangs once the blackhole is on.
                assert proxy.control.set_mode("blackhole")["mode"] == "blackhole"
                with pytest.raises(TimeoutError):
                    _get(kept)
            with _connection(proxy.port) as swallowed, pytest.raises(TimeoutError):
                _get(swallowed)

            proxy.control.set_mode("refuse")
            with _connection(proxy.port) as refused, pytest.raises(ConnectionError):
                _get(refused)

            proxy.control.set_mode("pass")
            with _connection(proxy.port) as fresh:
                assert _get(fresh) == b"hello"

            with pytest.raises(ValueError, match="unknown mode"):
                proxy.control.set_mode("flaky")
            stats = proxy.control.stats()
            assert stats["mode"] == "pass"
            assert (stats["accepted"], stats["cuts"]) == (4, 0)

            assert proxy.stop() == 0  # SIGTERM: a clean exit
    finally:
        upstream.stop()


def test_process_outlives_its_upstream() -> None:
    first = HelloServer()
    try:
        with start_proxy_process(first.port) as proxy:
            with _connection(proxy.port, PROMPT) as client:
                assert _get(client) == b"hello"

            # The server dies; the proxy stays, and resets whoever dials it.
            first.stop()
            with _connection(proxy.port, PROMPT) as client, pytest.raises(ConnectionError):
                _get(client)

            # The server comes back on another port: the proxy's port still works.
            second = HelloServer()
            try:
                proxy.control.set_upstream(second.port)
                with _connection(proxy.port, PROMPT) as client:
                    assert _get(client) == b"hello"
            finally:
                second.stop()
            assert proxy.stop() == 0
    finally:
        first.stop()
