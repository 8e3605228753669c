"""The data port's listener: it owns the accept loop and every client connection's limits.

It reads the first byte of every connection (without consuming it) and hands the connection to
aiohttp as HTTPS or plain HTTP, so one port can serve both, and a client speaking the other
protocol is told so. It caps the connections open at once (server.max_connections) and gives
each request's headers a deadline (server.header_timeout), so a slow or hoarding client costs
others nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import resource
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Literal, Protocol

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import Counter, Gauge
from yarl import URL

from proxy import advice, answer, request_ids
from proxy.config import ServerSettings
from proxy.connection import ClientConnection
from proxy.failures import Cause, Failure, ssl_reason
from proxy.metrics import Mismatch, TimeoutPhase
from proxy.tls import server_tls_context

log = structlog.get_logger("servegate.listener")

# A TLS connection opens with a handshake record (content type 22, RFC 8446 §5.1); an HTTP
# request opens with a method name, always ASCII letters.
TLS_HANDSHAKE_RECORD = 0x16
# Out of descriptors (EMFILE) the pending connection stays queued and the socket stays
# readable: wait before accepting again instead of spinning, as asyncio's own loop does.
ACCEPT_RETRY_DELAY = 1.0
# Linux's accept() reports a queued connection's own network error (accept(2), "Error
# handling"), which the man page says to treat like EAGAIN: they say nothing of the listener.
PASSED_ON_NETWORK_ERRORS = frozenset(
    {
        errno.ENETDOWN,
        errno.EPROTO,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    }
)
# Connections accepted per readiness of a listening socket: asyncio's own loop accepts up to its
# backlog (100 by default) at once, nginx one (multi_accept off).
ACCEPT_BATCH = 64
# After an answer servegate closes on, read what the client still sends for this long:
# closing with unread bytes sends a TCP reset, which can destroy the answer before the client
# reads it (nginx's lingering close).
LINGER = 2.0
REMEMBERED_CLIENTS = 1024  # addresses already warned about; a scan cannot grow this set
# Descriptors kept for servegate itself (listening and admin sockets, health checks, probes,
# logs, a supervised model's pipes) when server.max_connections is auto.
RESERVED_DESCRIPTORS = 64
# What one client connection can hold at once: its own socket, the model server's connection
# its request uses, and the duplicate of that one which counts its acknowledgements
# (proxy/acked.py).
DESCRIPTORS_PER_CONNECTION = 3
LIMIT_LOG_INTERVAL = 10.0  # one line per interval, whatever a flood of connections does
# At the limit, served connections looked at for an idle one per new connection, oldest first:
# a bound on the work one new connection can cause (nginx drains up to 32 at once).
RECLAIM_SCAN = 32
# Seconds a new connection may send nothing before it counts as idle at the limit: a client
# sends its request within milliseconds of connecting, and one reclaimed in between would lose
# it (a connection just accepted is often one whose bytes are still on their way).
SILENT_BEFORE_RECLAIM = 1.0
# Reads of what a client refused at the limit already sent, so that closing sends a FIN, not a
# reset that could destroy the answer before the client reads it.
REFUSED_DRAIN_READS = 4

Mode = Literal["off", "on", "auto"]


class ListenerMetrics(Protocol):
    """The series the listener feeds (proxy.metrics.Metrics has them)."""

    client_connections: Gauge
    client_connections_limit: Gauge
    client_connections_refused: Counter
    client_connections_reclaimed: Counter

    def record_listener_mismatch(self, direction: Mismatch) -> None: ...
    def record_client_timeout(self, phase: TimeoutPhase) -> None: ...
    def record_4503(self, failure: Failure) -> None: ...


PLAIN_ON_TLS_PORT = (
    "plain HTTP was sent to servegate's HTTPS port; use https:// or set server.tls: auto"
)
WARNINGS = {
    Mismatch.TLS_ON_PLAIN_PORT: "a TLS (HTTPS) handshake arrived on servegate's plain-HTTP port "
    'from {client}; the client (e.g. the platform\'s "Container API" protocol setting) speaks '
    "HTTPS; set server.tls: auto or on",
    Mismatch.PLAIN_ON_TLS_PORT: "plain HTTP arrived on servegate's HTTPS port from {client}; "
    'the client (e.g. the platform\'s "Container API" protocol setting) speaks HTTP; use '
    "https:// or set server.tls: auto",
}


def route(first_byte: int, mode: Mode) -> Literal["tls", "plain"] | Mismatch:
    """How to serve a connection, from its first byte and the port's `server.tls` mode."""
    if first_byte == TLS_HANDSHAKE_RECORD:
        return Mismatch.TLS_ON_PLAIN_PORT if mode == "off" else "tls"
    return Mismatch.PLAIN_ON_TLS_PORT if mode == "on" else "plain"


# The admin port's cap and its refusals' series, as the log names them.
ADMIN_LIMIT = ("server.admin_max_connections", "servegate_admin_connections_refused_total")


def admin_limits(settings: ServerSettings) -> ServerSettings:
    """The data port's settings as the admin port's listener takes them: plain HTTP, its own
    cap, and never a port shared with another process (SO_REUSEPORT would let two servegates
    answer one scrape address in turn)."""
    return settings.model_copy(
        update={
            "tls": "off",
            "max_connections": settings.admin_max_connections,
            "reuse_port": False,
        }
    )


def connection_limit(configured: int | Literal["auto"]) -> int:
    """server.max_connections in force: `auto` is the open-file limit (RLIMIT_NOFILE) left
    after RESERVED_DESCRIPTORS, divided by DESCRIPTORS_PER_CONNECTION."""
    if configured != "auto":
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20  # Linux's default nr_open: the real ceiling
    return max(1, (soft - RESERVED_DESCRIPTORS) // DESCRIPTORS_PER_CONNECTION)


def over_limit_answer(failure: Failure, setting: str, limit: int) -> bytes:
    """What a connection over the limit gets when no idle one can be closed for it: the answer
    every shed request gets (429 `service/overloaded`, Retry-After), written on the socket
    itself."""
    hint = advice.CONNECTION_LIMIT.format(setting=setting, limit=limit)
    return answer.on_socket(
        answer.failure_response(failure, request_ids.new(), hint, retry_after=1.0)
    )


class SniffingSite(web.BaseSite):
    """A site for aiohttp's runner that serves HTTP, HTTPS or both on one address.

    The runner stops it (`stop`) before it lets in-flight requests finish; the accept loop and
    the sockets are this site's own, so nothing of BaseSite's internals is touched.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        settings: ServerSettings,
        metrics: ListenerMetrics,
        limit_name: tuple[str, str] = (
            "server.max_connections",
            "servegate_client_connections_refused_total",
        ),
    ) -> None:
        """`limit_name`: the setting that caps the port's connections and the series that
        counts refusals, as the log names them (the admin port has its own)."""
        super().__init__(runner, backlog=settings.backlog)
        assert runner.server is not None  # BaseSite checked that the runner is set up
        self._handler_factory: Callable[[], RequestHandler] = runner.server
        self._host, self._port = host, port
        self._settings = settings
        self._metrics = metrics
        self._limit_name = limit_name
        self._acceptor: _Acceptor | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self._settings.tls == "on" else "http"
        return str(URL.build(scheme=scheme, host=self._host, port=self.port))

    @property
    def port(self) -> int:
        """The bound port once started (the one asked for, 0 included, before)."""
        return self._acceptor.port if self._acceptor is not None else self._port

    async def start(self) -> None:
        tls = server_tls_context(self._settings)  # before binding: a bad file binds nothing
        settings = self._settings
        sockets = await _listen(self._host, self._port, settings.backlog, settings.reuse_port)
        await super().start()
        self._acceptor = _Acceptor(
            sockets, self._handler_factory, tls, self._settings, self._metrics, self._limit_name
        )

    async def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()  # stops accepting; the runner then lets requests finish
            await self._acceptor.wait_closed()
        await super().stop()


async def _listen(host: str, port: int, backlog: int, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets for every address the host names, bound as asyncio would bind them."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:  # servegate run --workers: the kernel spreads connections over them
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # "::" means IPv6 only, as it did with aiohttp's site
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Acceptor:
    """The accept loops, the connections open (sniffed or served), and their limit.

    servegate accepts itself rather than through the event loop's server: uvloop's closes the
    listening socket for good on an accept error it is passed (handles/streamserver.pyx,
    __uv_streamserver_on_listen), where out of descriptors this one waits ACCEPT_RETRY_DELAY
    and goes on, the queued clients still in the backlog.
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        handler: Callable[[], RequestHandler],
        tls: ssl.SSLContext | None,
        settings: ServerSettings,
        metrics: ListenerMetrics,
        limit_name: tuple[str, str],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._setting, self._refusals = limit_name
        self.port = int(sockets[0].getsockname()[1])
        self._handler, self._tls = handler, tls
        self._mode: Mode = settings.tls
        self._header_timeout = settings.header_timeout
        self._first_byte_timeout = settings.first_byte_timeout
        self._metrics = metrics
        self._limit = connection_limit(settings.max_connections)
        if self._limit > (fits := connection_limit("auto")):
            # nginx warns the same way when worker_connections exceed its open-file limit.
            log.warning(
                "listener.max_connections_over_open_files",
                message=f"{self._setting} ({self._limit}) allows more connections than "
                f"the open-file limit can hold ({fits}, at {DESCRIPTORS_PER_CONNECTION} "
                "descriptors each): past that, accepting fails (listener.accept_failed) and "
                f"new connections wait; raise `ulimit -n` or lower {self._setting}",
                max_connections=self._limit,
                fits=fits,
            )
        metrics.client_connections_limit.set(self._limit)
        self._open = 0
        # Connections closed to admit new ones, until their close comes (an abort: the next
        # loop step): the limit stretches by as many meanwhile, and by no more.
        self._reclaiming: set[asyncio.Task[bool] | ClientConnection] = set()
        # The connections that may be closed for a new one at the limit, oldest first, as nginx
        # reuses its idle connections: those still silent (the first byte awaited, with their
        # socket) and those served (closed only while idle between requests).
        self._silent: dict[asyncio.Task[bool], tuple[socket.socket, float]] = {}
        self._served_connections: dict[ClientConnection, None] = {}
        self._refused_unlogged = 0
        self._limit_logged_at: float | None = None
        self._warned: OrderedDict[str, None] = OrderedDict()
        self._pending: set[asyncio.Task[bool]] = set()
        self._listening = sockets
        self._paused: dict[socket.socket, asyncio.TimerHandle] = {}
        for listening in sockets:
            self._loop.add_reader(listening, self._accept, listening)

    def close(self) -> None:
        for listening in self._listening:
            if (paused := self._paused.pop(listening, None)) is not None:
                paused.cancel()
            else:
                self._loop.remove_reader(listening)
            listening.close()
        self._listening = []
        # Connections not yet handed to aiohttp have sent no complete request: drop them, as
        # the kernel drops those still queued when a listening socket closes.
        for task in self._pending:
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._pending, return_exceptions=True)

    def _accept(self, listening: socket.socket) -> None:
        """Accept what the listening socket holds, ACCEPT_BATCH at most: between batches the
        loop serves the connections already open."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client left while queued
            except OSError as exc:
                if exc.errno in PASSED_ON_NETWORK_ERRORS:
                    continue  # that client's connection failed: the next may be fine
                # EMFILE, ENFILE, ENOBUFS, ENOMEM or worse: keep what is served, retry later
                log.error(
                    "listener.accept_failed",
                    error=exc.strerror or repr(exc),
                    retry_in_s=ACCEPT_RETRY_DELAY,
                )
                self._loop.remove_reader(listening)
                self._paused[listening] = self._loop.call_later(
                    ACCEPT_RETRY_DELAY, self._resume, listening
                )
                return
            # At the limit, an idle connection makes room, as nginx reuses its idle ones.
            if self._open >= self._limit + len(self._reclaiming) and not self._reclaim_idle():
                self._refuse_over_limit(sock)
                continue
            sock.setblocking(False)
            self._opened()
            task = self._loop.create_task(self._serve(sock, str(peer[0])))
            self._pending.add(task)
            task.add_done_callback(partial(self._served, sock))

    def _resume(self, listening: socket.socket) -> None:
        del self._paused[listening]
        self._loop.add_reader(listening, self._accept, listening)

    def _opened(self) -> None:
        self._open += 1
        self._metrics.client_connections.set(self._open)

    def _closed(self) -> None:
        self._open -= 1
        self._metrics.client_connections.set(self._open)

    def _served_closed(self, connection: ClientConnection) -> None:
        self._served_connections.pop(connection, None)
        self._reclaiming.discard(connection)
        self._closed()

    def _reclaim_idle(self) -> bool:
        """Abort the oldest idle connection, if there is one, for a new one: a silent one
        (nothing arrived on it yet) first, then one between requests with nothing left to
        send. Whether one was aborted."""
        silent_since = self._loop.time() - SILENT_BEFORE_RECLAIM
        for task, (sock, since) in list(itertools.islice(self._silent.items(), RECLAIM_SCAN)):
            if since > silent_since:
                break  # this one and every later one connected just now
            del self._silent[task]
            if _has_bytes(sock):
                continue  # its request has come: the task serves it next
            task.cancel()  # `_served` closes its socket
            return self._reclaimed(task)
        served = self._served_connections
        for connection in list(itertools.islice(served, RECLAIM_SCAN)):
            if connection.idle():
                del served[connection]
                connection.reclaim()
                return self._reclaimed(connection)
            del served[connection]  # busy: behind the others for the next look
            served[connection] = None
        return False

    def _reclaimed(self, reclaimed: asyncio.Task[bool] | ClientConnection) -> bool:
        self._reclaiming.add(reclaimed)
        self._metrics.client_connections_reclaimed.inc()
        return True

    def _refuse_over_limit(self, sock: socket.socket) -> None:
        """Answer a connection over the limit, with nothing idle to close for it, with a 429
        and close it; count every refusal; log the first, then at most one line per interval.

        Only a client known to speak plain HTTP gets the answer: on a TLS port, or with
        server.tls: auto before (or after) a TLS handshake's first byte, HTTP bytes would read
        as a broken handshake; such a connection is closed."""
        sock.setblocking(False)  # never a wait: the bytes already here, if any
        first = b""
        with contextlib.suppress(OSError):
            first = sock.recv(1, socket.MSG_PEEK)
        plain = self._mode == "off" or (
            self._mode == "auto" and first != b"" and first[0] != TLS_HANDSHAKE_RECORD
        )
        with contextlib.suppress(OSError):
            for _ in range(REFUSED_DRAIN_READS):  # most clients sent their request with connect
                if not sock.recv(65536):
                    break
        detail = f"{self._limit} client connections are open ({self._setting}), none of them idle"
        failure = Failure(Cause.OVERLOADED, detail)
        if plain:
            with contextlib.suppress(OSError):
                sock.send(over_limit_answer(failure, self._setting, self._limit))
                sock.shutdown(socket.SHUT_WR)
        sock.close()
        self._metrics.client_connections_refused.inc()
        self._metrics.record_4503(failure)
        self._refused_unlogged += 1
        now = time.monotonic()
        if self._limit_logged_at is not None and now - self._limit_logged_at < LIMIT_LOG_INTERVAL:
            return
        log.warning(
            "listener.connection_limit_reached",
            message=f"{self._limit} client connections are open ({self._setting}), none of "
            "them idle: new connections are answered 429 and closed until some end",
            limit=self._limit,
            refused=self._refused_unlogged,
            note=f"logged at most every {LIMIT_LOG_INTERVAL:g} s; "
            f"{self._refusals} counts every one",
        )
        self._limit_logged_at, self._refused_unlogged = now, 0

    def _connection(self, client: str) -> ClientConnection:
        return ClientConnection(
            self._handler(),
            self._header_timeout,
            on_timeout=partial(self._header_timed_out, client),
            on_closed=self._served_closed,
        )

    def _served(self, sock: socket.socket, task: asyncio.Task[bool]) -> None:
        """Close and uncount a connection aiohttp did not take, however `_serve` ended: also
        cancelled (servegate stopping) before it ever ran, when its own code could not."""
        self._pending.discard(task)
        self._reclaiming.discard(task)
        if not task.cancelled():
            if (exc := task.exception()) is None and task.result():
                return  # aiohttp's transport has it; ClientConnection uncounts it on close
            if exc is not None:
                log.error("listener.serve_failed", error=repr(exc), exc_info=exc)
        sock.close()
        self._closed()

    async def _serve(self, sock: socket.socket, client: str) -> bool:
        """One connection: peek, then hand it to aiohttp or refuse it. True once aiohttp's
        transport has taken `sock`; otherwise `_served` closes it."""
        tls: ssl.SSLContext | None = None
        try:
            try:  # most clients send the request as soon as they connect: no wait then
                first = sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                silent = asyncio.current_task()
                assert silent is not None  # this runs as a task of its own
                # Closed first when the limit is reached, once silent for a while.
                self._silent[silent] = (sock, self._loop.time())
                try:
                    async with asyncio.timeout(self._first_byte_timeout):
                        first = await _peek(sock)
                except TimeoutError:
                    self._metrics.record_client_timeout(TimeoutPhase.IDLE)
                    raise
                finally:
                    self._silent.pop(silent, None)
            if not first:
                return False  # the client closed without sending anything
            decision = route(first[0], self._mode)
            if isinstance(decision, Mismatch):
                self._refused(decision, client)
                if decision is Mismatch.PLAIN_ON_TLS_PORT:
                    await _answer_bad_request(sock)
                return False
            tls = self._tls if decision == "tls" else None
            transport, _ = await self._loop.connect_accepted_socket(
                partial(self._connection, client),
                sock,
                ssl=tls,
                # A handshake is part of the request's head: the same deadline (nginx).
                ssl_handshake_timeout=self._header_timeout if tls else None,
            )
            # Known from here on, once a handshake has succeeded: one that fails never reaches
            # the connection, whose close would forget it. The transport's protocol is the
            # connection itself, also behind TLS (where uvloop returns its own TLS protocol).
            served = transport.get_protocol()
            if isinstance(served, ClientConnection) and not served.lost:
                self._served_connections[served] = None
        except ConnectionAbortedError as exc:
            if tls is None:
                log.debug("listener.connection_dropped", client=client, error=repr(exc))
                return False
            # asyncio's and uvloop's handshake timeout. There is no TLS channel to answer on:
            # the connection is closed, counted and named.
            self._metrics.record_client_timeout(TimeoutPhase.TLS_HANDSHAKE)
            log.info(
                "listener.tls_handshake_timeout",
                reason=f"TLS handshake not complete within server.header_timeout "
                f"({self._header_timeout:g} s)",
                client=client,
            )
            return False
        except OSError as exc:
            if tls is not None:  # a handshake that failed, or that the client gave up
                self._tls_failed(client, exc)
                return False
            log.debug("listener.connection_dropped", client=client, error=repr(exc))  # reset
            return False
        return True

    def _first_time(self, key: str) -> bool:
        """Whether `key` (what happened, from which client) was not seen lately: one line per
        client, so that a retrying client does not flood the log."""
        if key in self._warned:
            self._warned.move_to_end(key)
            return False
        self._warned[key] = None
        if len(self._warned) > REMEMBERED_CLIENTS:
            self._warned.popitem(last=False)
        return True

    def _refused(self, mismatch: Mismatch, client: str) -> None:
        self._metrics.record_listener_mismatch(mismatch)
        if not self._first_time(client):
            return
        log.warning(
            f"listener.{mismatch}",
            message=WARNINGS[mismatch].format(client=client),
            client=client,
            note="logged once per client address; the metric counts every connection",
        )

    def _tls_failed(self, client: str, error: OSError) -> None:
        if isinstance(error, ssl.SSLError):
            reason = ssl_reason(error)
            # The client's alert about servegate's certificate (RFC 8446 §6.2).
            distrust = "certificate" in reason or "unknown ca" in reason
        else:
            # TLS 1.3 finishes servegate's side of the handshake before the client checks the
            # certificate; a client that refuses it then closes, and only the close arrives.
            reason = "the client closed the connection during the handshake"
            distrust = True
        if not self._first_time(f"tls {client} {reason}"):
            return
        why = (
            "; a client that does not trust servegate's certificate ends it so (with "
            "server.tls: auto and no files, the certificate is self-signed)"
            if distrust
            else ""
        )
        log.warning(
            "listener.tls_handshake_failed",
            message=f"a TLS handshake from {client} failed ({reason}){why}",
            client=client,
            reason=reason,
            note="logged once per client address and reason",
        )

    def _header_timed_out(self, client: str) -> None:
        self._metrics.record_client_timeout(TimeoutPhase.HEADERS)
        log.info(
            "request.rejected",
            status=408,
            reason=f"headers not complete within server.header_timeout "
            f"({self._header_timeout:g} s)",
            client=client,
        )


def _has_bytes(sock: socket.socket) -> bool:
    """Whether bytes wait unread on a connection (not its close, nor a reset): a client that
    has just sent its request is no longer silent."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except OSError:  # nothing yet (EAGAIN), or the connection failed
        return False


async def _peek(sock: socket.socket) -> bytes:
    """The connection's first byte, left unread for whoever reads next; b"" if it closed."""
    while True:
        await _readable(sock)
        try:
            return sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            continue


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    loop.add_reader(sock, lambda: None if readable.done() else readable.set_result(None))
    try:
        await readable
    finally:
        loop.remove_reader(sock)  # before any close: the loop must forget the descriptor


async def _answer_bad_request(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(LINGER):
        refused = answer.bad_request(PLAIN_ON_TLS_PORT, request_ids.new())
        await loop.sock_sendall(sock, answer.on_socket(refused))
        sock.shutdown(socket.SHUT_WR)
        while await loop.sock_recv(sock, 4096):
            pass
