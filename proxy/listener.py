"""The data port's listener: it reads the first byte of every connection (without consuming it)
and hands the connection to aiohttp as HTTPS or plain HTTP, so one port can serve both, and a
client speaking the other protocol is told so instead of failing obscurely.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import partial
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Literal

import structlog
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from yarl import URL

from proxy.config import ServerSettings

log = structlog.get_logger("servegate.listener")

# A TLS connection opens with a handshake record (content type 22, RFC 8446 §5.1); an HTTP
# request opens with a method name, always ASCII letters.
TLS_HANDSHAKE_RECORD = 0x16
# How long a new connection may stay silent: nginx's client_header_timeout (60 s) allows a
# client as long to start its request. It bounds the descriptors idle connections can hold.
PEEK_TIMEOUT = 60.0
BACKLOG = 128  # asyncio's and aiohttp's default
# Out of descriptors (EMFILE) the pending connection stays queued and the socket stays
# readable: wait before accepting again instead of spinning, as asyncio's own loop does.
ACCEPT_RETRY_DELAY = 1.0
# After the 400 answer, read what the client still sends for this long: closing with unread
# bytes sends a TCP reset, which can destroy the answer before the client reads it (nginx's
# lingering close).
LINGER = 2.0
REMEMBERED_CLIENTS = 1024  # addresses already warned about; a scan cannot grow this set
SELF_SIGNED_VALIDITY = timedelta(days=365)

Mode = Literal["off", "on", "auto"]


class Mismatch(StrEnum):
    """A connection that spoke the protocol the port does not serve: the metric's `direction`."""

    TLS_ON_PLAIN_PORT = "tls_on_plain_port"
    PLAIN_ON_TLS_PORT = "plain_on_tls_port"


class CertificateError(Exception):
    """The data port's certificate cannot be loaded; the message is the line to show."""


BAD_REQUEST_BODY = json.dumps(
    {
        "error_code": "servegate.bad_request",
        "error_msg": "plain HTTP was sent to servegate's HTTPS port; "
        "use https:// or set server.tls: auto",
    }
).encode()
BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BAD_REQUEST_BODY), BAD_REQUEST_BODY)
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


def server_tls_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """The data port's TLS context: from cert_file/key_file, or self-signed for `auto`."""
    if settings.tls == "off":
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # aiohttp speaks HTTP/1.1 only; saying so spares an h2-capable client a guess.
    context.set_alpn_protocols(["http/1.1"])
    if settings.cert_file is not None and settings.key_file is not None:
        try:
            context.load_cert_chain(
                settings.cert_file, settings.key_file, partial(_no_password, settings.key_file)
            )
        except OSError as exc:  # missing file, unreadable, not PEM, key not matching
            raise CertificateError(
                f"cannot load server.cert_file {settings.cert_file} with server.key_file "
                f"{settings.key_file}: {exc.strerror or exc} (both must be PEM, and the key "
                "must be the certificate's)"
            ) from None
        return context
    _load_self_signed(context)
    return context


def _no_password(key_file: Path) -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and hang start-up.
    raise CertificateError(f"server.key_file {key_file} is encrypted: servegate needs it plain")


def _load_self_signed(context: ssl.SSLContext) -> None:
    key, certificate = _self_signed()
    # The ssl module loads keys only from files. The file is private (mode 0600), exists only
    # while it is loaded, and holds the key encrypted with a password that never leaves memory.
    password = secrets.token_bytes(32)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    ) + certificate.public_bytes(serialization.Encoding.PEM)
    with tempfile.NamedTemporaryFile(suffix=".pem") as file:
        file.write(pem)
        file.flush()
        context.load_cert_chain(file.name, password=password)
    log.warning(
        "listener.self_signed_certificate",
        message="server.tls is auto and no cert_file is set: made a self-signed certificate "
        "for this run; HTTPS clients must skip verification or trust this fingerprint",
        sha256=certificate.fingerprint(hashes.SHA256()).hex(":").upper(),
        valid_until=certificate.not_valid_after_utc.isoformat(),
    )


def _self_signed() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """EC P-256, CN servegate, for localhost and the loopback addresses, valid one year."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "servegate")])
    now = datetime.now(UTC)
    names = [x509.DNSName("localhost")] + [
        x509.IPAddress(ip_address(ip)) for ip in ("127.0.0.1", "::1")
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))  # a client's clock may be a little behind
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


class SniffingSite(web.BaseSite):
    """A site for aiohttp's runner that serves HTTP, HTTPS or both on one address."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        settings: ServerSettings,
        on_mismatch: Callable[[Mismatch], None],
    ) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self._host, self._port = host, port
        self._settings = settings
        self._on_mismatch = on_mismatch

    @property
    def name(self) -> str:
        scheme = "https" if self._settings.tls == "on" else "http"
        return str(URL.build(scheme=scheme, host=self._host, port=self._port))

    async def start(self) -> None:
        tls = server_tls_context(self._settings)  # before binding: a bad file binds nothing
        sockets = await _listen(self._host, self._port, self._backlog)
        await super().start()
        assert self._runner.server is not None  # set up before any site is made
        # BaseSite only closes its server and waits for it; the accept loops start at once, so
        # AbstractServer's start_serving and serve_forever are never called.
        self._server = _Acceptor(  # type: ignore[abstract]
            sockets, self._runner.server, self._settings.tls, tls, self._on_mismatch
        )

    async def stop(self) -> None:
        acceptor = self._server
        await super().stop()  # stops accepting; the runner then lets in-flight requests finish
        if isinstance(acceptor, _Acceptor):
            await acceptor.wait_closed()


async def _listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for every address the host names, bound as asyncio would bind them."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


class _Acceptor(asyncio.AbstractServer):
    """The accept loops and the connections still being sniffed; the runner sees its sockets."""

    def __init__(
        self,
        sockets: list[socket.socket],
        protocol: Callable[[], Any],
        mode: Mode,
        tls: ssl.SSLContext | None,
        on_mismatch: Callable[[Mismatch], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sockets = tuple(sockets)
        self._protocol, self._mode, self._tls = protocol, mode, tls
        self._on_mismatch = on_mismatch
        self._warned: OrderedDict[str, None] = OrderedDict()
        self._pending: set[asyncio.Task[None]] = set()
        self._accepting = [self._loop.create_task(self._accept(sock)) for sock in sockets]

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return self._sockets if self.is_serving() else ()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return any(not task.done() for task in self._accepting)

    def close(self) -> None:
        # Connections not yet handed to aiohttp have sent no complete request: drop them, as
        # the kernel drops those still queued when a listening socket closes.
        for task in (*self._accepting, *self._pending):
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._accepting, *self._pending, return_exceptions=True)

    async def _accept(self, listening: socket.socket) -> None:
        try:
            while True:
                try:
                    sock, peer = await self._loop.sock_accept(listening)
                except ConnectionAbortedError:
                    continue  # the client left while queued
                except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: keep what is served, retry
                    log.error(
                        "listener.accept_failed",
                        error=exc.strerror or repr(exc),
                        retry_in_s=ACCEPT_RETRY_DELAY,
                    )
                    await asyncio.sleep(ACCEPT_RETRY_DELAY)
                    continue
                task = self._loop.create_task(self._serve(sock, str(peer[0])))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
        finally:
            listening.close()

    async def _serve(self, sock: socket.socket, client: str) -> None:
        """One connection: peek, then hand it to aiohttp or refuse it. `sock` is always closed
        here unless aiohttp's transport took it."""
        handed_over = False
        try:
            async with asyncio.timeout(PEEK_TIMEOUT):
                first = await _peek(sock)
            if not first:
                return  # the client closed without sending anything
            decision = route(first[0], self._mode)
            if isinstance(decision, Mismatch):
                self._refused(decision, client)
                if decision is Mismatch.PLAIN_ON_TLS_PORT:
                    await _answer_bad_request(sock)
                return
            tls = self._tls if decision == "tls" else None
            await self._loop.connect_accepted_socket(self._protocol, sock, ssl=tls)
            handed_over = True
        except OSError as exc:  # silent, reset, or a failed TLS handshake (TimeoutError too)
            log.debug("listener.connection_dropped", client=client, error=repr(exc))
        finally:
            if not handed_over:
                sock.close()

    def _refused(self, mismatch: Mismatch, client: str) -> None:
        self._on_mismatch(mismatch)
        if client in self._warned:  # one line per client: a retrying client must not flood
            self._warned.move_to_end(client)
            return
        self._warned[client] = None
        if len(self._warned) > REMEMBERED_CLIENTS:
            self._warned.popitem(last=False)
        log.warning(
            f"listener.{mismatch}",
            message=WARNINGS[mismatch].format(client=client),
            client=client,
            note="logged once per client address; the metric counts every connection",
        )


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
        await loop.sock_sendall(sock, BAD_REQUEST)
        sock.shutdown(socket.SHUT_WR)
        while await loop.sock_recv(sock, 4096):
            pass
