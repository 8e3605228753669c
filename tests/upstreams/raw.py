"""Raw asyncio servers that misbehave on purpose, and a relay that stands for a real network.

On bare loopback a server's close reaches the client within microseconds, so the keep-alive
race almost never shows. `DelayRelay` puts tens of milliseconds between the two hosts, as a
network does, so a request can be in flight while the server's close is too.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import select
import socket
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One HTTP/1.1 request with a Content-Length body (or none); None at end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        await reader.readexactly(length)
    return head


@contextlib.contextmanager
def threaded_server(
    handle: Callable[[socket.socket, threading.Event], None],
) -> Iterator[int]:
    """A blocking loopback server in a thread of its own, for servers asyncio cannot play
    (OpenSSL's own handshake, bytes written under a TLS layer): `handle` gets each accepted
    connection (5 s timeout) and the event that is set when the server stops. Yields the port;
    the server is stopped and joined on the way out."""
    listening = socket.create_server(("127.0.0.1", 0))
    listening.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listening.accept()
            except TimeoutError:
                continue
            with connection, contextlib.suppress(OSError):
                connection.settimeout(5)
                handle(connection, stop)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield listening.getsockname()[1]
    finally:
        stop.set()
        server.join(10)
        listening.close()


@dataclass(kw_only=True)
class Connections:
    """The connections a loopback server holds, so that stopping it closes every one and waits
    until each transport is gone: one still closing when the test's event loop ends is reported
    as leaked (ResourceWarning)."""

    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    def _track(self, *writers: asyncio.StreamWriter) -> asyncio.Task[None]:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.update(writers)
        return task

    async def _release(self, task: asyncio.Task[None], *writers: asyncio.StreamWriter) -> None:
        for writer in writers:
            await _close_and_wait(writer)
            self._writers.discard(writer)
        self._tasks.discard(task)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await asyncio.sleep(0)  # a connection accepted just now gets its task started (tracked)
        await _cancel_and_wait(self._tasks)
        for writer in list(self._writers):  # its task was cancelled while closing it
            await _close_and_wait(writer)
        self._writers.clear()
        await self._server.wait_closed()


@dataclass
class RawServer(Connections):
    """Base: a loopback server whose `serve_connection` decides how to misbehave."""

    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = self._track(writer)
        try:
            await self.serve_connection(reader, writer)
        except asyncio.CancelledError:
            pass  # stop() ends connections so; ending normally keeps asyncio's stream log quiet
        finally:
            await self._release(task, writer)

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        raise NotImplementedError


async def _close_and_wait(writer: asyncio.StreamWriter) -> None:
    """Close a connection and wait until its transport is gone: a transport still closing when
    the test's event loop ends is reported as leaked (ResourceWarning).

    Shielded: on Python 3.11 a task cancelled in wait_closed() cancels the stream's shared
    close future, and every later wait_closed() on it raises CancelledError."""
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await asyncio.shield(writer.wait_closed())


async def _cancel_and_wait(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel connection tasks and wait for them: each closes its own sockets as it ends."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


@dataclass
class ClosesReusedConnections(RawServer):
    """Answers the first request on each connection, then closes it when the next one arrives,
    without answering: what a server's idle timer does to a request that races it.

    `close_delay` holds the close back after reading the request, as a server that read it and
    then died would; every request's X-Servegate-Remaining-Ms is recorded."""

    close_delay: float = 0.0
    answered: int = 0
    stale_hits: int = 0
    remaining_ms: list[int] = field(default_factory=list)

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not await self._record(reader):
            return
        writer.write(OK)
        await writer.drain()
        self.answered += 1
        if await self._record(reader):
            self.stale_hits += 1
            await asyncio.sleep(self.close_delay)

    async def _record(self, reader: asyncio.StreamReader) -> bool:
        head = await read_request(reader)
        if head is None:
            return False
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"x-servegate-remaining-ms":
                self.remaining_ms.append(int(value))
        return True


@dataclass
class HoldsRequests(RawServer):
    """Reads a request and never answers; records when servegate closed the connection."""

    closed_at: list[float] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if await read_request(reader) is None:
            return
        await reader.read()  # returns at end of stream: servegate gave up on the request
        self.closed_at.append(time.monotonic())
        self.closed.set()


@dataclass
class AnnouncesKeepAlive(RawServer):
    """Announces `Keep-Alive: timeout=N` and records how long each reused connection sat idle."""

    announced: float = 1.0
    connections: int = 0
    idle_before_reuse: list[float] = field(default_factory=list)

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        answered_at: float | None = None
        while await read_request(reader) is not None:
            if answered_at is None:
                self.connections += 1  # counted at its first request: probes are not counted
            else:
                self.idle_before_reuse.append(time.monotonic() - answered_at)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=%d\r\n\r\nok"
                % self.announced
            )
            await writer.drain()
            answered_at = time.monotonic()


@dataclass
class DelayRelay(Connections):
    """A TCP relay to `target_port` that delays every byte toward the server, and the server's
    close toward the client, by `delay` seconds.

    `idle_closes` records, for each connection the server closed, how long after its last
    answer byte it did: where a server's keep-alive boundary really lies on this machine."""

    target_port: int
    delay: float = 0.03
    port: int = 0
    idle_closes: list[float] = field(default_factory=list)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._tasks)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = self._track(client_w)
        server_w: asyncio.StreamWriter | None = None
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.add(server_w)
            pumps = {
                asyncio.create_task(self._toward_server(client_r, server_w)),
                asyncio.create_task(self._toward_client(server_r, client_w)),
            }
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await _cancel_and_wait(pumps)
        except OSError:
            pass  # the target refused: the client sees its connection closed
        except asyncio.CancelledError:
            pass  # stop() ends connections so; ending normally keeps asyncio's stream log quiet
        finally:
            await self._release(task, *(w for w in (client_w, server_w) if w is not None))

    async def _toward_server(
        self, client_r: asyncio.StreamReader, server_w: asyncio.StreamWriter
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not chunk:
                    return
                server_w.write(chunk)
                await server_w.drain()

        delivery = asyncio.create_task(deliver())
        try:
            while chunk := await client_r.read(65536):
                queue.put_nowait((time.monotonic() + self.delay, chunk))
            queue.put_nowait((time.monotonic() + self.delay, b""))
            await delivery
        except (ConnectionError, OSError):
            pass
        finally:
            await _cancel_and_wait({delivery})

    async def _toward_client(
        self, server_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        last_byte: float | None = None
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await server_r.read(65536):
                client_w.write(chunk)
                await client_w.drain()
                last_byte = time.monotonic()
            if last_byte is not None:
                self.idle_closes.append(time.monotonic() - last_byte)
        await asyncio.sleep(self.delay)  # the server's close crosses the network too


@dataclass
class SweepsIdleConnections(RawServer):
    """A keep-alive server that closes idle connections in a periodic sweep, as Waitress does:
    every `cleanup_interval` seconds its `BaseWSGIServer.maintenance` marks each channel idle
    longer than `channel_timeout` to close (waitress/server.py; 30 s and 120 s by default, here
    scaled down). An idle connection is closed from `channel_timeout` to one interval later."""

    channel_timeout: float = 2.0
    cleanup_interval: float = 1.0
    _idle_since: dict[asyncio.StreamWriter, float] = field(default_factory=dict)
    _sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.cleanup_interval)
            cutoff = time.monotonic() - self.channel_timeout
            for writer, since in list(self._idle_since.items()):
                if since < cutoff:
                    del self._idle_since[writer]
                    writer.close()

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while await read_request(reader) is not None:
                self._idle_since.pop(writer, None)
                writer.write(OK)
                await writer.drain()
                self._idle_since[writer] = time.monotonic()
        finally:
            self._idle_since.pop(writer, None)

    async def stop(self) -> None:
        if self._sweeper is not None:
            await _cancel_and_wait({self._sweeper})
        await super().stop()


@dataclass
class ClosesIdleOnReuse(RawServer):
    """Answers every request; `close_idle` closes each connection that sits idle after an
    answer at once, as an idle timer does: with nothing unread, its kernel sends a FIN, and a
    request that reaches it afterwards is reset unread (RFC 9293 §3.6.1; Linux resets data
    that reaches a socket shut for reading). `close_when_reused` (tests/conftest.py) calls it
    in the instant between servegate taking a pooled connection and writing on it: the
    keep-alive race, whose window on loopback is microseconds wide, every time.

    `answered` counts the requests it read, `closed_idle` the connections it closed."""

    answered: int = 0
    closed_idle: int = 0
    _idle: set[asyncio.StreamWriter] = field(default_factory=set)

    def close_idle(self) -> None:
        for writer in self._idle:
            writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
            self.closed_idle += 1
        self._idle.clear()

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while await read_request(reader) is not None:
                self._idle.discard(writer)
                writer.write(OK)
                await writer.drain()
                self.answered += 1
                self._idle.add(writer)
        finally:
            self._idle.discard(writer)


@dataclass
class ResetsAsRequestArrives(RawServer):
    """Answers the first request on each connection; when the next one arrives, closes the
    connection without reading a byte of it, so its kernel resets it: a worker shutting down or
    crashing with the request unread, which servegate cannot tell from one that had read part
    of it (proxy/acked.py).

    Its kernel is told to delay acknowledgements (TCP_QUICKACK off, as during a request/response
    exchange), so the reset goes out before any acknowledgement of the unread request.
    `answered` counts the requests it read."""

    answered: int = 0
    closed_unread: int = 0

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if await read_request(reader) is None:
            return
        writer.write(OK)
        await writer.drain()
        self.answered += 1
        writer.transport.pause_reading()  # what arrives next stays in the kernel, unread
        sock = writer.get_extra_info("socket")
        while True:  # ends when the request arrives or the test stops the server
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:  # a request, or servegate closing the connection
                waiting = array.array("i", [0])
                fcntl.ioctl(sock.fileno(), termios.FIONREAD, waiting)
                self.closed_unread += waiting[0] > 0
                return  # RawServer closes the connection: a reset, as the data is unread
            await asyncio.sleep(0.001)


@dataclass
class SilentOnTlsHello(RawServer):
    """A plain HTTP/1.1 keep-alive server that reads until the end of a request head before it
    answers anything, so a TLS ClientHello (no CRLF CRLF in it) gets no answer at all: what
    Werkzeug does (its handler is the standard library's BaseHTTPRequestHandler, whose
    handle_one_request waits on rfile.readline), and Waitress (its parser waits for the end of
    the head) and Hypercorn (h11 waits for the end of the head) too. Idle connections close
    after `keep_alive` seconds on a timer of their own."""

    keep_alive: float = 5.0

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                async with asyncio.timeout(self.keep_alive):
                    head = await read_request(reader)
            except TimeoutError:
                return
            if head is None:
                return
            writer.write(OK)
            await writer.drain()
