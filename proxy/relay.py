"""Relays the model's answer to the client unchanged: status, reason, headers, body.

An answer read whole that fits the client connection's write buffer (most predictions) leaves
in one write of servegate's own. Any other streams through aiohttp's response: each chunk is
written as soon as it arrives (server-sent events reach the client at once), and `write` waits
for the client to drain, so a slow client slows the model's stream instead of filling
servegate's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import aiohttp
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion10, HttpVersion11, RawResponseMessage

from proxy.aiohttp_internals import hold_head_for_body
from proxy.budget import Budget
from proxy.exchange import InterimRelay, UpstreamResponse
from proxy.failures import AttemptFacts, Cause, Failure, classify
from proxy.forward import ModelResponse, cut_short
from proxy.headers import (
    Fields,
    decoded,
    http_date,
    response_headers,
    serialize_fields,
    serialize_start,
)

# Statuses whose responses carry no body, whatever their headers say (RFC 9110 §6.4.1).
_NO_BODY_STATUSES = frozenset({204, 304})
# An HTTP/1.0 client cannot read chunked framing (RFC 9112 §7.1): an answer of unknown length
# up to this size is read whole and sent with a Content-Length, so the connection can stay
# open; a longer one is sent close-delimited and the connection closed (RFC 9112 §6.3).
HTTP10_BUFFER_MAX = 1024 * 1024
# Headers aiohttp adds to every answer; kept only when the model sent them.
_ADDED_BY_AIOHTTP = (hdrs.SERVER, hdrs.CONTENT_TYPE)


class _AsTheModelSent(web.StreamResponse):
    """A response that adds no header the model did not send but the ones HTTP requires of a
    proxy (Date, RFC 9110 §6.6.1; framing): aiohttp would add Server and a default
    Content-Type. It also keeps a 304's Content-Length, which aiohttp takes off: there it frames
    nothing and tells the length of the representation the cache holds (RFC 9110 §8.6).
    aiohttp_internals.check() makes sure aiohttp still calls this hook."""

    async def _prepare_headers(self) -> None:
        model_sent = [name in self.headers for name in _ADDED_BY_AIOHTTP]
        length = (
            [
                (at, field)
                for at, field in enumerate(self.headers.items())
                if field[0].lower() == "content-length"
            ]
            if self.status == 304
            else []
        )
        await super()._prepare_headers()
        for name, sent in zip(_ADDED_BY_AIOHTTP, model_sent, strict=True):
            if not sent:
                self.headers.popall(name, None)
        if length:  # back where the model put it
            fields = list(self.headers.items())
            for at, field in length:
                fields.insert(at, field)
            self.headers.clear()
            self.headers.extend(fields)


class _Written(web.StreamResponse):
    """An answer servegate wrote whole on the client connection itself (`_relay_whole`): aiohttp,
    which prepares and ends the response a handler returns, has nothing left to send, and only
    learns whether the connection stays open."""

    def __init__(self, status: int, keep_alive: bool) -> None:
        super().__init__(status=status)
        self._stays_open = keep_alive

    @property
    def keep_alive(self) -> bool:
        return self._stays_open

    def force_close(self) -> None:
        self._stays_open = False

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


@dataclass(slots=True)
class Relayed:
    response: web.StreamResponse
    bytes_out: int
    # Reading the answer broke: after its status line went out when `response.prepared`,
    # else before any of it did (the caller answers the failure then).
    failure: Failure | None = None
    client_gone: bool = False


async def relay(
    request: web.BaseRequest,
    answer: ModelResponse,
    budget: Budget | None,
    facts: AttemptFacts,
    extra_headers: dict[str, str],
    sent: Callable[[int], None] = lambda _bytes: None,
    *,
    keep_alive: bool = True,
) -> Relayed:
    """Relay the model's answer; `sent` hears of every body byte written to the client, so
    the access line is right even when the client leaves mid-stream. `keep_alive=False`
    closes the client's connection after the answer, whatever the request asked."""
    upstream = answer.response
    keep_alive = keep_alive and request.keep_alive
    if (whole := _in_one_write(request, answer, extra_headers, keep_alive)) is not None:
        return await _relay_whole(request, upstream, whole, sent, keep_alive)
    response = _AsTheModelSent(status=upstream.status, reason=upstream.reason)
    if not keep_alive:
        response.force_close()
    if answer.body is not None:
        # The head waits for the body read whole: both leave in one write, as web.Response's do.
        hold_head_for_body(response)
    for name, value in decoded(response_headers(upstream.raw_headers)):
        response.headers.add(name, value)
    for name, value in extra_headers.items():
        if name not in response.headers:  # the model's own field of that name is its word
            response.headers[name] = value
    has_body = request.method != "HEAD" and upstream.status not in _NO_BODY_STATUSES
    relayed = Relayed(response, 0)

    async def write(chunk: bytes) -> None:
        await response.write(chunk)
        relayed.bytes_out += len(chunk)
        sent(len(chunk))

    async def send() -> None:
        body, read_ahead = answer.body, b""
        if has_body and body is None and request.version < HttpVersion11:
            read_ahead, whole = await _read_for_http10(upstream, response)
            body = read_ahead if whole else None
        await response.prepare(request)
        if has_body and body is not None:
            await write(body)
        elif has_body:
            if read_ahead:
                await write(read_ahead)
            async for chunk in _from_model(upstream):
                await write(chunk)
        await response.write_eof()

    try:
        # No budget: it covered only the first byte (budget.scope: first_byte).
        if budget is None:
            await send()
        else:
            async with asyncio.timeout(budget.remaining()):
                await send()
    except _ModelBroke as broke:
        relayed.failure = cut_short(classify(broke.cause, facts, deadline_passed=False), upstream)
    except TimeoutError:
        if response.prepared:
            relayed.failure = classify(TimeoutError(), facts, deadline_passed=True)
        else:  # nothing streamed to the client: the answer was being read whole first
            relayed.failure = Failure(
                Cause.DEADLINE_EXCEEDED,
                "the budget ended before the model's answer was whole (an HTTP/1.0 client's "
                "answer of unknown length is read whole before it is sent)",
                facts.reused,
                facts.request_sent,
                facts.response_started,
            )
    except ConnectionResetError:  # aiohttp's write error when the client has gone
        relayed.client_gone = True
    finally:
        if relayed.failure is None and not relayed.client_gone:
            upstream.release()  # fully read: the connection goes back to the pool
        else:
            upstream.close()
    if relayed.failure is not None and response.prepared:
        _abort(request)  # else nothing left yet (an HTTP/1.0 client's answer is read first)
    return relayed


def interim_relay(request: web.BaseRequest) -> InterimRelay | None:
    """Where the model's interim 1xx answers (103 Early Hints, 102) go: to an HTTP/1.1 client
    at once, before the final answer, as RFC 9110 §15.2 asks of a proxy; nowhere for an
    HTTP/1.0 client, which cannot read them (§15.2). A 100 Continue is not passed on:
    servegate answers a client's Expect itself and passes no Expect to the model. An interim
    answer with a control byte in its head is dropped: it cannot be written as sent.

    Past the client connection's high-water mark (a client that does not read), the relay
    returns what to wait for before the next: its caller reads no more of the model's until
    then, so neither side's buffer grows without end."""
    transport = request.transport
    if request.version < HttpVersion11 or transport is None:
        return None
    # A partial, not a closure: every request the model holds keeps one (half the bytes).
    return functools.partial(_relay_interim, request, transport)


def _relay_interim(
    request: web.BaseRequest, transport: asyncio.Transport, message: RawResponseMessage
) -> Awaitable[None] | None:
    if message.code == 100 or transport.is_closing():
        return None
    try:
        head = b"".join(
            (
                serialize_start(f"HTTP/1.1 {message.code} {message.reason}"),
                serialize_fields(response_headers(message.raw_headers)),
                b"\r\n",
            )
        )
    except ValueError:
        return None
    transport.write(head)
    if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]:
        return None
    return _written(request.writer)


async def _written(writer: AbstractStreamWriter) -> None:
    """Until the client connection takes writes again (its buffer down to the low-water mark);
    the caller's deadline bounds the wait."""
    with contextlib.suppress(ConnectionError):  # the client left: the relay hears of it later
        await writer.drain()


def _in_one_write(
    request: web.BaseRequest,
    answer: ModelResponse,
    extra_headers: dict[str, str],
    keep_alive: bool,
) -> _WholeAnswer | None:
    """The whole answer, its head written here, when its body is in hand and both fit the
    client connection's empty write buffer: then relaying it is one write that cannot wait
    (asyncio pauses a writer only above the buffer's high-water mark), and it needs no deadline
    of its own. Else None.

    Most answers are small and read whole, and aiohttp's response machinery (a header
    multidict, header preparation, a writer with length accounting) cost as much CPU as the
    rest of relaying them: the head is written from the same rules (`_whole_head`)."""
    body = answer.body
    upstream = answer.response
    status = upstream.status
    if body is None or status < 200 or status in _NO_BODY_STATUSES:
        return None
    transport = request.transport
    if transport is None or transport.get_write_buffer_size() > 0:
        return None
    version = request.version
    fields = _whole_head(upstream.raw_headers, extra_headers, version, keep_alive)
    start = serialize_start(f"HTTP/{version.major}.{version.minor} {status} {upstream.reason}")
    head = b"".join((start, serialize_fields(fields), b"\r\n"))
    if len(head) + len(body) > transport.get_write_buffer_limits()[1]:
        return None
    return _WholeAnswer(head + body, len(body))


class _WholeAnswer(NamedTuple):
    data: bytes  # head and body
    body_size: int


async def _relay_whole(
    request: web.BaseRequest,
    upstream: UpstreamResponse,
    whole: _WholeAnswer,
    sent: Callable[[int], None],
    keep_alive: bool,
) -> Relayed:
    """An answer relayed in one write of its head and body (`_in_one_write`)."""
    relayed = Relayed(_Written(upstream.status, keep_alive), 0)
    try:
        await request.writer.write(whole.data)
    except ConnectionResetError:  # aiohttp's write error when the client has gone
        relayed.client_gone = True
        upstream.close()
        return relayed
    upstream.release()
    relayed.bytes_out = whole.body_size
    sent(relayed.bytes_out)
    return relayed


def _whole_head(
    raw_headers: Iterable[tuple[bytes, bytes]],
    extra_headers: dict[str, str],
    version: tuple[int, int],
    keep_alive: bool,
) -> Fields:
    """The header fields of an answer with a body of known length, in the order the streamed
    path writes them: the model's end-to-end fields as sent (its Content-Length frames the
    body), then each of servegate's `extra_headers` the model sent no field of, Date if the
    model sent none (RFC 9110 §6.6.1), and the connection's fate where the version does not
    imply it (RFC 9112 §9.3, §9.6)."""
    extra = {
        name.lower().encode(): (name.encode(), value.encode("utf-8", "surrogateescape"))
        for name, value in extra_headers.items()
    }
    fields: Fields = []
    dated = False
    for name, value in response_headers(raw_headers):
        lower = name.lower()
        extra.pop(lower, None)  # the model's own field of that name is its word
        dated = dated or lower == b"date"
        fields.append((name, value))
    fields.extend(extra.values())
    if not dated:
        fields.append((b"Date", http_date(int(time.time()))))
    if keep_alive and version == HttpVersion10:
        fields.append((b"Connection", b"keep-alive"))
    elif not keep_alive and version == HttpVersion11:
        fields.append((b"Connection", b"close"))
    return fields


class _ModelBroke(Exception):
    """Reading the model's answer failed (as opposed to writing it to the client)."""

    def __init__(self, cause: aiohttp.ClientError) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def _read_for_http10(
    upstream: UpstreamResponse, response: web.StreamResponse
) -> tuple[bytes, bool]:
    """An answer of unknown length for an HTTP/1.0 client: read whole (True) and sent with its
    length, or, beyond HTTP10_BUFFER_MAX, what was read so far (False): the rest then goes
    close-delimited, and the connection ends with it."""
    if upstream.content_length is not None:
        return b"", False
    parts: list[bytes] = []
    size = 0
    try:
        while size <= HTTP10_BUFFER_MAX:
            chunk = await upstream.content.readany()
            if not chunk:
                response.content_length = size
                return b"".join(parts), True
            parts.append(chunk)
            size += len(chunk)
    except aiohttp.ClientError as exc:
        raise _ModelBroke(exc) from exc
    # aiohttp leaves such an HTTP/1.0 connection open (so the client would wait for an end
    # that never comes): it must close, since the close is what ends the body.
    response.force_close()
    return b"".join(parts), False


async def _from_model(upstream: UpstreamResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
    except aiohttp.ClientError as exc:
        raise _ModelBroke(exc) from exc


def _abort(request: web.BaseRequest) -> None:
    """The status line is gone already: the only honest signal left is a cut connection."""
    if request.transport is not None:
        request.transport.close()
