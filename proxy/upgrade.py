"""Upgraded connections (WebSocket, RFC 9110 §7.8): the handshake goes to the model server on a
connection of its own; after its 101 the bytes are piped both ways until either side closes
or both stay silent for server.upgrade_idle_timeout. Any other answer is an ordinary one: it
is relayed to the end of its framing and both connections close, so nothing the client sends
after it reaches the model outside servegate's own handling of requests.

aiohttp's client pool cannot hand over a connection after a 101, so the handshake is written
and read here, with the same byte-exact head writer as every other request.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from dataclasses import dataclass

import structlog
from aiohttp import web
from aiohttp.http import HttpVersion11

from proxy.config import ServerSettings, UpstreamSettings
from proxy.failures import Cause, connect_failure
from proxy.headers import Fields, serialize_fields, serialize_start, with_own_fields
from proxy.lag import LoopLag, ResponsiveTimeout
from proxy.metrics import Metrics
from proxy.pool import tls_name
from proxy.probe import plain_behind_tls
from proxy.upstream import client_ssl_context

log = structlog.get_logger("servegate.upgrade")

CHUNK = 64 * 1024
HTTP_START = b"HTTP/1."  # how an HTTP/1.x answer begins


def wants_upgrade(request: web.BaseRequest) -> bool:
    """An Upgrade the client asked for, with `Connection: upgrade` (RFC 9110 §7.8), on an
    HTTP/1.1 request without a body, as a WebSocket handshake is (RFC 6455 §4.1).

    A request with a body goes on as plain HTTP, its Upgrade ignored as RFC 9110 §7.8 lets a
    server do: curl offers `Upgrade: h2c` on a POST, and the handshake carries no body. So
    does an HTTP/1.0 one, whose Upgrade a server must ignore (§7.8), and an offer of h2c
    alone: its HTTP2-Settings field belongs to the one connection (RFC 7540 §3.2.1, a
    connection option), so no proxy can pass it on, and RFC 9113 §3.1 deprecates it."""
    if request.version < HttpVersion11:
        return False
    connection = request.headers.get("Connection", "").lower()
    if "upgrade" not in connection:  # most requests: no token to split out
        return False
    if "upgrade" not in {t.strip() for t in connection.split(",")} or request.body_exists:
        return False
    offered = (p.strip().lower() for p in request.headers.get("Upgrade", "").split(","))
    return any(protocol and protocol != "h2c" for protocol in offered)


class UpgradeRefused(Exception):
    """The model server did not answer the handshake as HTTP."""


class UpgradeHeadTooLarge(Exception):
    """The model's answer to the handshake has a line longer than
    upstream.max_response_header_bytes, or more fields than upstream.max_response_headers:
    the limits every other answer's head is held to."""


@dataclass(frozen=True)
class HandshakeAnswer:
    """The model's answer to an upgrade request: its interim heads (1xx but 101), relayed as
    they came, and the final head with whatever followed it in the same reads."""

    interim: bytes
    head: bytes

    @property
    def status(self) -> int:
        """The final answer's status (0: none readable), what the access line counts."""
        return _status(self.head)


class UpstreamUnreachable(Exception):
    """No connection to the model server opened: `cause` and `detail` as
    `failures.connect_failure` names them for every other connect."""

    def __init__(self, cause: Cause, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause
        self.detail = detail


@dataclass(frozen=True)
class Upgrader:
    server: ServerSettings
    upstream: UpstreamSettings
    metrics: Metrics
    lag: LoopLag  # upstream.connect_timeout counts only the time the loop could run

    async def handshake(
        self,
        scheme: str,
        method: str,
        target: str,
        headers: Fields,
        upgrade: str,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, HandshakeAnswer]:
        """Send the upgrade request, with the client's method; returns the connection and the
        model's answer.

        Raises UpstreamUnreachable when no connection opens within upstream.connect_timeout,
        UpgradeRefused when the answer is not an HTTP head, UpgradeHeadTooLarge when its head
        is over upstream.max_response_header_bytes (a line) or max_response_headers (fields),
        and OSError when the connection fails after it opened."""
        host, port = self.upstream.origin.raw_host, self.upstream.origin.port
        assert host is not None  # a validated URL has one
        assert port is not None  # and a port, the scheme's default if not written
        context: ssl.SSLContext | None = None
        hostname: str | None = None
        if scheme == "https":
            context = client_ssl_context(self.upstream.tls)
            hostname = tls_name(self.upstream.tls.server_name, host)
        try:
            async with ResponsiveTimeout(self.upstream.connect_timeout, self.lag):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=context,
                    server_hostname=hostname,
                )
        except OSError as exc:  # refused, a TLS failure, or the connect timeout passed
            cause, detail = connect_failure(exc)
            within = f"upstream.connect_timeout ({self.upstream.connect_timeout:g} s)"
            if (
                context is not None  # as for every other connect (pool.Pool._open)
                and cause is Cause.CONNECT_TIMEOUT
                and (plain := await plain_behind_tls(host, port, within))
            ):
                cause, detail = Cause.TLS_TO_PLAIN_SERVER, plain
            raise UpstreamUnreachable(cause, detail) from exc
        # `headers` hold no hop-by-hop field (headers.request_headers): these are the only ones.
        fields = [
            *headers,
            (b"Connection", b"Upgrade"),
            (b"Upgrade", upgrade.encode("utf-8", "surrogateescape")),
        ]
        start = serialize_start(f"{method} {target} HTTP/1.1")
        writer.write(start + serialize_fields(fields) + b"\r\n")
        try:
            answer = await self._answer(reader)
            if answer.status != 101:  # a refusal whose framing is broken is refused, unsent
                _framing(answer.head[: answer.head.find(b"\r\n\r\n") + 4], method)
        except BaseException:  # refused, too large, the budget's end, a reset, a cancel
            writer.close()
            raise
        return reader, writer, answer

    async def _answer(self, reader: asyncio.StreamReader) -> HandshakeAnswer:
        """The interim answers (1xx but 101), then the final one; at most
        upstream.max_interim_responses interim ones, as for every other request."""
        limits = (self.upstream.max_response_header_bytes, self.upstream.max_response_headers)
        head = await _read_head(reader, *limits)
        interim = b""
        for _ in range(self.upstream.max_interim_responses):
            if not _is_interim(head):
                return HandshakeAnswer(interim, head)
            end = head.find(b"\r\n\r\n") + 4
            interim += head[:end]
            head = await _read_head(reader, *limits, start=head[end:])
        if _is_interim(head):
            raise UpgradeRefused(
                "more interim (1xx) answers to the upgrade request than "
                f"upstream.max_interim_responses ({self.upstream.max_interim_responses})"
            )
        return HandshakeAnswer(interim, head)

    async def pipe(
        self,
        request: web.BaseRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        answer: HandshakeAnswer,
        request_id: str,
    ) -> tuple[int, int]:
        """Relay the model's answer head as it came (with what came after it in the same
        reads), X-Request-Id and Date added when it has none, as to every answer; after a 101,
        both directions until one side closes or both are idle for
        server.upgrade_idle_timeout; after any other answer, its body (`_relay_refusal`).
        Returns the bytes from the client and to it."""
        transport = request.transport
        assert transport is not None
        inbound = _ClientBytes(transport)
        # Bytes after the handshake come here; aiohttp takes any object with its parser's
        # feed_data and feed_eof, as its own WebSocket support does.
        request.protocol.set_parser(inbound)  # type: ignore[arg-type]
        interim, head = answer.interim, answer.head
        if answer.status != 101:
            try:
                sent = await self._relay_refusal(request, reader, interim, head, request_id)
            finally:
                writer.close()
                transport.close()
            return 0, sent
        end = head.find(b"\r\n\r\n") + 4  # `handshake` read the head to its end
        head = interim + with_own_fields(head[:end], request_id) + head[end:]
        transport.write(head)
        self.metrics.upgraded.inc()
        self.metrics.upgraded_inflight.inc()
        sent, received = len(head), 0
        last = [time.monotonic()]

        async def to_model() -> None:
            nonlocal received
            while chunk := await inbound.read():
                last[0] = time.monotonic()
                writer.write(chunk)
                received += len(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        async def to_client() -> None:
            nonlocal sent
            while chunk := await reader.read(CHUNK):
                last[0] = time.monotonic()
                transport.write(chunk)
                sent += len(chunk)
                await request.writer.drain()

        pumps = {asyncio.create_task(to_model()), asyncio.create_task(to_client())}
        try:
            await self._until_done(pumps, last)
        finally:
            for pump in pumps:
                pump.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*pumps, return_exceptions=True)
            writer.close()
            transport.close()
            self.metrics.upgraded_inflight.dec()
        return received, sent

    async def _relay_refusal(
        self,
        request: web.BaseRequest,
        reader: asyncio.StreamReader,
        interim: bytes,
        head: bytes,
        request_id: str,
    ) -> int:
        """An answer other than 101: relayed with its body to the end of its framing (RFC 9112
        §6.3), then the client's connection closes, as the head now says. The client asked to
        leave HTTP on it; what it sends next is neither parsed as requests nor passed to the
        model. Returns the bytes sent to the client."""
        transport = request.transport
        assert transport is not None
        end = head.find(b"\r\n\r\n") + 4
        framing, length = _framing(head[:end], request.method)
        out = interim + _closing(with_own_fields(head[:end], request_id))
        transport.write(out)
        sent, body = len(out), head[end:]
        chunks = _ChunkedEnd(self.upstream.max_response_header_bytes)
        idle = self.server.upgrade_idle_timeout
        while framing != "none":
            if framing == "length":
                body = body[:length]
                length -= len(body)
            elif framing == "chunked" and (ends := chunks.feed(body)) is not None:
                body, framing = body[:ends], "none"
            transport.write(body)
            sent += len(body)
            if framing == "length" and length == 0:
                break
            if framing == "none":
                break
            await request.writer.drain()
            try:
                async with asyncio.timeout(idle):
                    body = await reader.read(CHUNK)
            except TimeoutError:
                log.info("upgrade.refusal_idle_closed", idle_timeout_s=idle)
                break
            if not body:
                break  # the model closed: the end of a body read until close, or cut short
        return sent

    async def _until_done(self, pumps: set[asyncio.Task[None]], last: list[float]) -> None:
        idle = self.server.upgrade_idle_timeout
        while True:
            wait = last[0] + idle - time.monotonic()
            if wait <= 0:
                log.info("upgrade.idle_closed", idle_timeout_s=idle)
                return
            done, _ = await asyncio.wait(pumps, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if done:
                return


class _ClientBytes:
    """Stands in for aiohttp's parser after the 101: keeps the client's bytes for the pump,
    and stops reading from the client while the model is slower than the client."""

    LIMIT = 4 * CHUNK

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._ready = asyncio.Event()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self.LIMIT and isinstance(self._transport, asyncio.ReadTransport):
            self._transport.pause_reading()
        self._ready.set()
        return False, b""

    def feed_eof(self) -> None:
        self._eof = True
        self._ready.set()

    async def read(self) -> bytes:
        """The client's next bytes; b"" once it has closed."""
        while not self._chunks and not self._eof:
            self._ready.clear()
            await self._ready.wait()
        if not self._chunks:
            return b""
        data = b"".join(self._chunks)
        self._chunks, self._size = [], 0
        if isinstance(self._transport, asyncio.ReadTransport):
            self._transport.resume_reading()
        return data


# A chunk size (RFC 9112 §7.1: 1*HEXDIG): int() would also take a sign, "0x" and "_".
_HEX = re.compile(rb"[0-9A-Fa-f]+")


def _status(head: bytes) -> int:
    code = head[9:12]
    return int(code) if code.isdigit() else 0


def _is_interim(head: bytes) -> bool:
    return 100 <= _status(head) < 200 and _status(head) != 101


def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """A head's fields as lowercased names and stripped values."""
    fields = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name:
            fields.append((name.strip().lower(), value.strip(b" \t")))
    return fields


def _framing(head: bytes, method: str) -> tuple[str, int]:
    """How a refused upgrade's answer body ends (RFC 9112 §6.3): "none", "length" with its
    length, "chunked", or "close" (read until the model closes).

    Raises UpgradeRefused for a Content-Length that is no length, or several that disagree:
    RFC 9112 §6.3 makes that an unrecoverable framing error."""
    code = _status(head)
    if method == "HEAD" or code < 200 or code in (204, 304):
        return "none", 0
    fields = _fields(head)
    codings = [
        coding.strip().lower()
        for name, value in fields
        if name == b"transfer-encoding"
        for coding in value.split(b",")
        if coding.strip()
    ]
    if codings:
        return ("chunked", 0) if codings[-1] == b"chunked" else ("close", 0)
    lengths = {
        item.strip()
        for name, value in fields
        if name == b"content-length"
        for item in value.split(b",")
    }
    if not lengths:
        return "close", 0
    if len(lengths) > 1 or not all(length.isdigit() for length in lengths):
        raise UpgradeRefused(
            "the answer to the upgrade request has an invalid Content-Length "
            f"({b', '.join(sorted(lengths)).decode('latin-1')[:100]!r})"
        )
    return "length", int(lengths.pop())


def _closing(head: bytes) -> bytes:
    """`head` with `Connection: close` in place of its Connection and Keep-Alive fields
    (RFC 9112 §9.6): the client's connection ends after this answer. Its other fields, an
    Upgrade that a 426 must send (RFC 9110 §15.5.22) too, go on as the model sent them."""
    status, *lines = head[:-4].split(b"\r\n")
    kept = [
        line
        for line in lines
        if line.partition(b":")[0].strip().lower() not in (b"connection", b"keep-alive")
    ]
    return b"\r\n".join([status, *kept, b"Connection: close"]) + b"\r\n\r\n"


class _ChunkedEnd:
    """Finds where a chunked body ends (RFC 9112 §7.1) in the pieces it arrives in, keeping
    no more of it than one unfinished line: chunk-size lines and trailer lines longer than
    `line_limit` bytes end it there (what reached the client is then cut short, and the
    connection closes)."""

    def __init__(self, line_limit: int) -> None:
        self._limit = line_limit + 64
        self._line = b""  # an unfinished chunk-size or trailer line
        self._left = 0  # bytes of chunk data, and the CRLF after it, still to come
        self._trailers = False

    def feed(self, data: bytes) -> int | None:
        """Where in `data` the body ends (the index just past it), or None: it goes on."""
        at = 0
        while at < len(data):
            if self._left:
                taken = min(self._left, len(data) - at)
                self._left -= taken
                at += taken
                continue
            newline = data.find(b"\n", at)
            if newline < 0:
                self._line += data[at:]
                return len(data) if len(self._line) > self._limit else None
            line, self._line = (self._line + data[at:newline]).rstrip(b"\r"), b""
            at = newline + 1
            if self._trailers:
                if not line:
                    return at
                continue
            digits = line.split(b";", 1)[0].strip(b" \t")
            if not _HEX.fullmatch(digits):
                return at  # no chunk size: the framing is broken, nothing after it is relayed
            size = int(digits, 16)
            if size == 0:
                self._trailers = True
            else:
                self._left = size + 2  # the data and its CRLF
        return None


async def _read_head(
    reader: asyncio.StreamReader, line_limit: int, fields_limit: int, start: bytes = b""
) -> bytes:
    """The model's answer head, and whatever of the stream came with it in the same reads.

    Held to the limits aiohttp holds every answer to, as near as bytes tell: the reason
    phrase and each field's name and value within `line_limit` bytes
    (upstream.max_response_header_bytes), at most `fields_limit` fields
    (upstream.max_response_headers). Read here in pieces, so the
    connection's own buffer, which the session then pipes through, stays at its usual size.

    `start`: what of the answer came already (after an interim head).
    Raises UpgradeRefused when the answer is not HTTP or ends first, UpgradeHeadTooLarge past
    the limits."""
    # Every line at its limit, with its status or field syntax and CRLF, and some slack for
    # whitespace around values.
    most = (line_limit + 64) * (fields_limit + 1)
    received = bytearray(start)
    if received and not HTTP_START.startswith(bytes(received[: len(HTTP_START)])):
        raise UpgradeRefused("the answer to the upgrade request is not HTTP")
    searched = 0  # where the end of the head may start: no byte is searched twice
    while (end := received.find(b"\r\n\r\n", searched)) < 0:
        if len(received) > most:
            raise UpgradeHeadTooLarge(
                f"the answer to the upgrade request has a head over {most} bytes, more than "
                "upstream.max_response_header_bytes and max_response_headers allow"
            )
        searched = max(0, len(received) - 3)
        piece = await reader.read(CHUNK)
        if not piece:
            raise UpgradeRefused("no HTTP answer to the upgrade request: it closed first")
        received += piece
        # Told from the first bytes: a head shorter than this prefix is no HTTP head either.
        if not HTTP_START.startswith(received[: len(HTTP_START)]):
            raise UpgradeRefused("the answer to the upgrade request is not HTTP")
    status, *fields = bytes(received[:end]).split(b"\r\n")
    reason = status.split(b" ", 2)[2] if status.count(b" ") >= 2 else b""
    parts = (line.partition(b":") for line in fields)
    sizes = (len(name) + len(value.strip(b" \t")) for name, _, value in parts)
    longest = max([len(reason), *sizes])
    if longest > line_limit:
        raise UpgradeHeadTooLarge(
            f"the answer to the upgrade request has a reason or a field of {longest} bytes, "
            f"more than upstream.max_response_header_bytes ({line_limit})"
        )
    if len(fields) > fields_limit:
        raise UpgradeHeadTooLarge(
            f"the answer to the upgrade request has {len(fields)} header fields, more than "
            f"upstream.max_response_headers ({fields_limit})"
        )
    return bytes(received)
