"""One exchange on one upstream connection: servegate writes the request, aiohttp's response
parser reads the answer.

servegate writes the request head itself (proxy/headers.py) rather than through
aiohttp's ClientSession: every header in the order and spelling the client sent, repeats
included (the session merges `X-A: 1` and `x-a: 2` into one), and the head and a buffered body
leave in one write, on a connection from servegate's pool (proxy/pool.py). aiohttp's protocol
(proxy/framing.py) parses the answer; errors keep aiohttp's types, which `failures.classify`
reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import hdrs
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import RawResponseMessage, StreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.acked import AckCounter
from proxy.failures import TOO_MANY_INTERIM
from proxy.headers import serialize_fields, serialize_start
from proxy.pool import PooledConnection


@dataclass(frozen=True, slots=True)
class StreamedBody:
    """A body sent as it is read: `length` bytes (declared to the model in Content-Length: a
    WSGI app reads CONTENT_LENGTH bytes and nothing without it), from `chunks`."""

    length: int
    chunks: AsyncIterable[bytes]


Body = bytes | StreamedBody | None

# Methods whose requests mean nothing by a body: one without a body gets no Content-Length.
# Every other one gets `Content-Length: 0` (RFC 9110 §8.6: a user agent SHOULD send it when the
# method defines a meaning for content), as aiohttp's client has always done.
_NO_CONTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_COALESCE_MAX = 64 * 1024  # a body up to this size is copied behind its head: one write


class UpstreamResponse:
    """The model server's response: its head, and its body as a stream (`content`).

    `release()` gives a fully read connection back to the pool; `close()` drops it. One of the
    two must be called."""

    __slots__ = ("_connection", "_writer", "content", "headers", "raw_headers", "reason", "status")

    def __init__(
        self,
        message: Any,
        content: aiohttp.StreamReader,
        connection: PooledConnection,
        writer: asyncio.Task[None] | None,
    ) -> None:
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.raw_headers: tuple[tuple[bytes, bytes], ...] = message.raw_headers
        self.content = content
        self._connection = connection
        self._writer = writer  # still sending a streamed request body, if not done

    @property
    def content_length(self) -> int | None:
        """The declared body length in bytes (the parser has refused a malformed one)."""
        length = self.headers.get(hdrs.CONTENT_LENGTH)
        return int(length) if length is not None else None

    async def read(self) -> bytes:
        """The whole body; on any error the connection is dropped and the error raised."""
        try:
            if self.content.is_eof():  # it came whole with the head: no waiting, one join
                return self.content.read_nowait()
            return await self.content.read()
        except BaseException:
            self.close()
            raise

    def release(self) -> None:
        """Back to the pool if the answer was read to its end and the request fully sent;
        closed otherwise (the connection's state is then unknown)."""
        if self._writer is not None and not self._writer.done():
            self.close()
            return
        self._connection.release()

    def close(self) -> None:
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self._connection.close()


def request_head(
    method: str,
    raw_path: str,
    fields: tuple[bytes, ...],
    body: Body,
    *,
    host: bytes | None,
    close: bool,
) -> bytes:
    """The request head as it goes upstream (RFC 9112 §3): the target as given, the `host`
    field first when the client sent no Host (§3.2), the client's end-to-end header fields
    in order, serialized in blocks (headers.serialize_fields; without framing: this frames
    the body), the body's Content-Length, and `Connection: close` on a one-shot connection.

    Raises ValueError on a control byte (headers.serialize_fields)."""
    if isinstance(body, bytes):
        length: int | None = len(body)
    elif isinstance(body, StreamedBody):
        length = body.length
    else:
        length = None if method in _NO_CONTENT_METHODS else 0
    framing = b"" if length is None else b"Content-Length: %d\r\n" % length
    if close:
        framing += b"Connection: close\r\n"
    start = serialize_start(f"{method} {raw_path} HTTP/1.1")
    if host is not None:
        start += serialize_fields(((b"Host", host),))
    return b"".join((start, *fields, framing, b"\r\n"))


def send_request(
    connection: PooledConnection, head: bytes, body: Body, acks: AckCounter | None = None
) -> asyncio.Task[None] | None:
    """Write the request; a streamed body goes on in a task (returned), so that an answer the
    model sends before reading all of it is read meanwhile, as aiohttp does. `acks` hears of
    every byte written.

    Raises aiohttp.ClientConnectionResetError if the connection is already closing."""
    protocol = connection.protocol
    transport = connection.transport
    if protocol is None or transport is None or transport.is_closing():
        raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
    if isinstance(body, StreamedBody):
        task = _stream_body(protocol, head, body.chunks, acks)
        return asyncio.get_running_loop().create_task(task)
    if body is None:
        transport.write(head)
    elif len(body) <= _COALESCE_MAX:
        transport.write(head + body)
    else:
        transport.writelines((head, body))
    if acks is not None:
        acks.sent(len(head) + len(body or b""))
    return None


async def _stream_body(
    protocol: ResponseHandler,
    head: bytes,
    chunks: AsyncIterable[bytes],
    acks: AckCounter | None,
) -> None:
    """The head leaves with the body's first chunk, in one write and one segment; every byte
    written is counted for the replay proof (proxy/acked.py). A failure here reaches the
    reader of the answer through the protocol, with aiohttp's exception types
    (client_reqrep.py, ClientRequest.write_bytes)."""
    writer = StreamWriter(protocol, asyncio.get_running_loop())

    async def write(data: bytes) -> None:
        await writer.write(data)
        if acks is not None:
            acks.sent(len(data))

    try:
        async for chunk in chunks:
            await write(head + chunk if head else chunk)
            head = b""
        if head:  # an empty body
            await write(head)
        await writer.write_eof()
    except OSError as exc:
        transport = protocol.transport
        if transport is None or transport.is_closing():
            # The connection is ending: its end (connection_lost) tells the reader, after it
            # has read an answer the server may have sent before it stopped reading (a 413 to
            # a body too large). Told here first, the reader would hear this error instead.
            return
        protocol.set_exception(aiohttp.ClientOSError(exc.errno, "Can not write request body"), exc)
    except Exception as exc:  # the client's own body broke off: the request cannot complete
        broken = aiohttp.ClientConnectionError(f"the request body could not be sent: {exc}")
        protocol.set_exception(broken, exc)


# Where interim 1xx answers go (proxy/relay.py, interim_relay): it returns what to wait for
# before the next one when its client is behind, else None.
InterimRelay = Callable[[RawResponseMessage], Awaitable[None] | None]


async def read_answer(
    connection: PooledConnection,
    writer: asyncio.Task[None] | None,
    method: str,
    url: URL,
    on_interim: InterimRelay | None = None,
    max_interim: int = 100,
) -> UpstreamResponse:
    """Wait for the final answer's head; each interim 1xx answer before it goes to
    `on_interim` (101 is final), up to `max_interim` of them (upstream.max_interim_responses).

    Raises aiohttp.ClientResponseError for an unparseable head or one interim answer too
    many, and the connection's errors (aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError, ...) as aiohttp raises them."""
    protocol = connection.protocol
    assert protocol is not None
    interim = 0
    try:
        while True:
            try:
                message, content = await protocol.read()
            except HttpProcessingError as exc:
                info = aiohttp.RequestInfo(url, method, CIMultiDictProxy(CIMultiDict()), url)
                raise aiohttp.ClientResponseError(
                    info, (), status=exc.code, message=exc.message, headers=exc.headers
                ) from exc
            if not 100 <= message.code <= 199 or message.code == 101:
                return UpstreamResponse(message, content, connection, writer)
            interim += 1
            if interim > max_interim:
                info = aiohttp.RequestInfo(url, method, CIMultiDictProxy(CIMultiDict()), url)
                raise aiohttp.ClientResponseError(
                    info, (), status=message.code, message=f"{TOO_MANY_INTERIM} {max_interim}"
                )
            if on_interim is not None and (behind := on_interim(message)) is not None:
                await _read_none_meanwhile(connection, behind)
    except BaseException:
        if writer is not None:
            writer.cancel()  # the connection is dropped by the caller: nothing to finish
        raise


async def _read_none_meanwhile(connection: PooledConnection, behind: Awaitable[None]) -> None:
    """Wait for a client that is behind with the interim answers, reading none of the model's
    meanwhile: what it sends waits in the kernel, and its TCP window closes."""
    transport = connection.transport
    if transport is None or transport.is_closing() or not transport.is_reading():
        await behind  # paused already (aiohttp's own flow control): it resumes it
        return
    transport.pause_reading()
    try:
        await behind
    finally:
        if not transport.is_closing():
            transport.resume_reading()
