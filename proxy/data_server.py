"""The data port's aiohttp server: its options, and its answers to request heads aiohttp
cannot parse (a bad request line, a target or header too long, too many headers), which come
before the request handler (proxy/ingress.py) runs: JSON like every other answer, with the
status the RFCs give and in the HTTP version the client spoke.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, InvalidURLError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from proxy import answer, request_ids
from proxy.aiohttp_internals import (
    HandlerServer,
    feed_request_parser,
    is_parse_error,
    last_queued_body,
    last_queued_failed,
    last_queued_message,
    let_go_of_request_parser,
    parse_one_request_per_feed,
    parser_field_limit,
    queue_full,
    queued_requests,
    renew_request_parser,
    request_count,
    target_too_long,
)
from proxy.config import ServerSettings
from proxy.framing import BARE_LAST_CHUNK
from proxy.logs import without_client_bytes

access_log = structlog.get_logger("servegate.access")


def server_options(settings: ServerSettings) -> dict[str, Any]:
    """aiohttp server options that keep requests as the client sent them, within the limits.

    `auto_decompress=False`: a compressed body reaches the model byte for byte, still
    labelled with its Content-Encoding (aiohttp decodes gzip, deflate and br by default).
    """
    return {
        "auto_decompress": False,
        "max_line_size": settings.max_request_line_bytes,
        "max_field_size": parser_field_limit(settings.max_header_bytes),
        "max_headers": settings.max_headers,
        # Taken by _JsonErrorHandler, not aiohttp: each field's own limit, which ingress holds
        # every request to (aiohttp's parser is given more, `parser_field_limit`).
        FIELD_LIMIT: settings.max_header_bytes,
    }


FIELD_LIMIT = "field_limit"
HEADER_FIELD_TOO_LONG = (
    "a header field (its name and value together) is longer than server.max_header_bytes ({})"
)


# A method as RFC 9110 §9.1 has it (a token), short enough to be named in an answer.
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")
_UNCARRIED_TARGET = (
    "the request target has a byte servegate's HTTP parser (aiohttp's llhttp) refuses: raw "
    "bytes outside ASCII, a space or a control byte; percent-encode them (RFC 3986 §2.1)"
)
_SPOKEN = frozenset({HttpVersion10, HttpVersion11})


@dataclass(frozen=True)
class _Head:
    """What a request's first line says, for answering a head aiohttp could not parse.

    `spoke` is the version the answer is written in: RFC 9110 §2.5, the highest one servegate
    conforms to within the request's major version, so HTTP/1.1 for any HTTP/1.x client, also
    when the line was too long to reach its version or was not seen, and HTTP/1.0 only for a
    client that said so (as aiohttp answers a well-formed 1.0 request).
    """

    spoke: HttpVersion = HttpVersion11

    @classmethod
    def of(cls, head_start: bytes) -> _Head:
        line = head_start.split(b"\n", 1)[0]
        ended = b"\n" in head_start and line.rstrip(b"\r").endswith(b" HTTP/1.0")
        return cls(HttpVersion10 if ended else HttpVersion11)


class _JsonErrorHandler(RequestHandler):
    """aiohttp answers a request it cannot parse (bad request line, oversized headers) before
    servegate's handler runs, in plain text; this gives that answer the JSON body too, and the
    status RFC 9110 and RFC 6585 give a too-long target (414) or header section (431).

    Requests pipelined in one read are parsed one at a time, so that each one before a
    malformed one is answered first, in order (RFC 9112 §9.3.2), as nginx does; aiohttp would
    answer the error alone."""

    # One per client connection: no instance dictionary (RequestHandler has none either).
    __slots__ = (
        "_body",
        "_chunked",
        "_closes",
        "_current",
        "_field_limit",
        "_head_cap",
        "_head_start",
        "_heads",
        "_last_bytes",
        "_number",
        "_on_rejected",
        "_parser_let_go",
        "_recorded",
        "_server",
        "draining",
        "partial_head_pending",
        "refused_version",
    )

    def __init__(
        self, manager: web.Server, *, loop: asyncio.AbstractEventLoop, **options: Any
    ) -> None:
        self._field_limit = options.pop(FIELD_LIMIT, None)
        super().__init__(manager, loop=loop, **options)
        parse_one_request_per_feed(self, loop, options)
        assert isinstance(manager, HandlerServer)  # which builds every connection's handler
        self._server = manager
        self._parser_let_go = False  # after a read of one whole request (`data_received`)
        self._on_rejected = (
            manager.on_rejected if isinstance(manager, JsonErrorServer) else _count_nothing
        )
        # The first bytes of the head being parsed: up to the end of its request line, and at
        # most as long as one can be. A body's bytes are no head's: none are taken while the
        # body of the last head parsed is still arriving, so a long upload without a line
        # break is neither copied nor kept here.
        self._head_start = b""
        self._head_cap = options.get("max_line_size", 8190) + 64
        # The first bytes of each head aiohttp has queued, taken in order by
        # `JsonErrorServer._request` as each is handled. Kept when aiohttp queues the head (or
        # its parse error): bytes that arrive before an error is answered belong to no request
        # and must not change the verdict on it. Read only for an error (`head`).
        self._heads: list[bytes] = []
        self._current = b""  # those of the request being handled
        self._body: StreamReader | None = None  # of the request being handled
        self._last_bytes = b""  # the connection's last bytes so far
        self._number = 0  # of the request being handled, among the heads parsed on it
        self._chunked = False  # whether the body of the request being handled is chunked
        self._recorded = 0  # heads whose lines `_heads` has taken, on this connection
        # Whether the connection closes after the request being handled (`closes_after_answer`).
        self._closes = False
        # The version of the request being handled when it is no HTTP/1.x (`refused_version`).
        self.refused_version: HttpVersion | None = None
        # The parser holds the start of a head pipelined behind the requests before it, which
        # no read has completed yet (proxy/connection.py times it: `partial_head_pending`).
        self.partial_head_pending = False
        self.draining = False  # servegate shuts down: no request after the one being handled

    def data_received(self, data: bytes) -> None:
        if self.draining:
            # aiohttp drops what it reads from now on: the rest of a body still arriving would
            # never reach the request reading it, which would wait for its budget.
            body = self._body
            if body is not None and not body.is_eof():
                try:
                    feed_request_parser(self, data)
                except Exception as exc:  # a malformed chunk: the reader hears it at once
                    body.set_exception(RequestPayloadError(f"the request body is malformed: {exc}"))
            return
        if last_queued_failed(self):
            return  # llhttp's parse error is final: each further feed would queue it again
        if self._parser_let_go:
            if not data:
                return  # a feed to resume a paused parser: the one let go held nothing
            self._parser_let_go = False
            renew_request_parser(self, self._server.loop, self._server.handler_options)
        if data:
            keep = len(BARE_LAST_CHUNK)
            self._last_bytes = (self._last_bytes + data[-keep:])[-keep:]
        requests_before = request_count(self)
        between = self._between_requests()
        begins_head = between and not self._head_start  # this read starts a request
        if b"\n" not in self._head_start and between:
            room = self._head_cap - len(self._head_start)
            end = data.find(b"\n", 0, room)
            self._head_start += data[: end + 1 if end >= 0 else room]
        super().data_received(data)
        grew = self._queue_heads(requests_before)
        if begins_head and grew and self._was_one_whole_request(data):
            self.partial_head_pending = False
            # The parser has nothing left: most reads are one request, whole. A request the
            # model holds keeps no parser meanwhile; the next read gets a new one.
            let_go_of_request_parser(self)
            self._parser_let_go = True
            return
        if grew:
            # What is left of this read after the requests it began with is a head begun; a
            # read that completed a pending head leaves none counted (the safe side: no timer).
            self.partial_head_pending = (
                begins_head and not self.partial_head_pending and _ends_in_head(data)
            )
        # The parser stops at the end of each request, also of one whose body began in an
        # earlier read, and keeps the rest of the read: it is fed again until a feed brings no
        # further request, a parse error (llhttp's is final: each further feed repeats it), or
        # aiohttp's full queue (aiohttp feeds it again as the queue drains). The line captured
        # above is the first request's; one whose line was not seen is answered in HTTP/1.1.
        while (grew or data) and not queue_full(self) and not last_queued_failed(self):
            data = b""
            requests_before = request_count(self)
            super().data_received(b"")
            grew = self._queue_heads(requests_before)

    def _was_one_whole_request(self, data: bytes) -> bool:
        """Whether `data`, which began with a request's head, held that request to its last
        byte and nothing more: a head ended by its first empty line (llhttp takes CRLF line
        ends alone from a client), then a body of the length the head declared. Anything else
        (a chunked body, an upgrade, more bytes) is fed to the parser again."""
        message = last_queued_message(self)
        if message is None or message.chunked or message.upgrade:
            return False
        # A head that began in an earlier read can end in this one, even with its CRLF CRLF
        # split across the two: then this read starts with its rest, not with a method.
        if not data.startswith(message.method.encode("ascii", "replace") + b" "):
            return False
        end = data.find(b"\r\n\r\n")
        return end >= 0 and end + 4 + int(message.headers.get("Content-Length", 0)) == len(data)

    def _queue_heads(self, requests_before: int) -> bool:
        """Keep the captured line for each head parsed since `requests_before`; whether any
        was."""
        requests = request_count(self)
        if requests == requests_before:
            return False
        if requests_before > self._recorded:  # parsed by a feed of aiohttp's own: lines unseen
            self._heads.extend([b""] * (requests_before - self._recorded))
        self._heads.extend([self._head_start] * (requests - requests_before))
        self._head_start = b""
        self._recorded = requests
        return True

    def _between_requests(self) -> bool:
        """Whether the parser stands at the start of a head: the body of the last head it
        parsed (queued, else the one being handled) has fully arrived."""
        queued = last_queued_body(self)
        body = queued if queued is not None else self._body
        return body is None or body.is_eof()

    def connection_lost(self, exc: BaseException | None) -> None:
        # The body refers back to this handler (its flow control): without the reference the
        # two are freed as the connection ends, not left to the cyclic garbage collector,
        # which servegate runs rarely (app.GC_THRESHOLDS).
        self._body = None
        super().connection_lost(exc)

    def next_head(self, message: RawRequestMessage, body: StreamReader) -> None:
        """The next queued head, `message` with its `body`, is now the one being handled."""
        parsed = request_count(self)
        unseen = parsed - self._recorded
        if unseen:
            # aiohttp parsed these with a feed of its own: what followed a WebSocket handshake
            # that was not upgraded (web_protocol.py, finish_response). Their lines were not
            # seen (answered in HTTP/1.1), and the rest of that feed is parsed below.
            self._heads.extend([b""] * unseen)
            self._recorded = parsed
        self._current = self._heads.pop(0) if self._heads else b""
        self._body = body
        self._chunked = message.chunked
        # aiohttp keeps what follows an HTTP/1.1 WebSocket handshake; after any other upgrade
        # offer (h2c, or one in HTTP/1.0, which servegate ignores) llhttp stops and aiohttp
        # never parses the rest of the connection's bytes. An HTTP/1.0 request with a
        # Transfer-Encoding has faulty framing, and the connection closes after it (RFC 9112
        # §6.1): an HTTP/1.0 hop before servegate would read its chunks as the next request.
        self._closes = (
            message.upgrade
            and (
                message.version < HttpVersion11
                or message.headers.get("Upgrade", "").lower() != "websocket"
            )
        ) or (message.version == HttpVersion10 and "Transfer-Encoding" in message.headers)
        self.refused_version = None
        self._number = parsed - queued_requests(self)
        if unseen and not is_parse_error(message):  # after an error, nothing more is parsed
            self.data_received(b"")

    @property
    def closes_after_answer(self) -> bool:
        """Whether the connection must close once the request being handled is answered: its
        body may have ended with trailer fields (`trailers_possible`), it offered an upgrade
        other than an HTTP/1.1 WebSocket one (h2c, or any in HTTP/1.0), after which llhttp
        stops and aiohttp never parses the rest of the connection's bytes, or it is an
        HTTP/1.0 request with a Transfer-Encoding (RFC 9112 §6.1)."""
        return self._closes or self.trailers_possible

    @property
    def trailers_possible(self) -> bool:
        """Whether the body of the request being handled is chunked and was not seen to end
        with a bare last chunk (no trailer field, no extension): it has not all arrived, the
        connection's last bytes are not a bare last chunk, or a head was parsed after this
        request's (its bytes came after the body's end)."""
        if not self._chunked:
            return False
        body = self._body
        return (
            body is None
            or not body.is_eof()
            or request_count(self) != self._number
            or not self._last_bytes.endswith(BARE_LAST_CHUNK)
        )

    @property
    def head(self) -> _Head:
        """What the request line of the request being handled said."""
        return _Head.of(self._current)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        # A client's mistake, answered and logged as one (aiohttp logs it as a server error).
        reason = without_client_bytes(message) if message else HTTPStatus(status).phrase
        if isinstance(exc, LineTooLong) and target_too_long(exc):
            status = 414
            reason = (
                f"the request target is longer than server.max_request_line_bytes ({exc.args[1]})"
            )
        elif isinstance(exc, LineTooLong):
            # Past twice the limit (parser_field_limit): some field is longer than the limit.
            status = 431
            reason = HEADER_FIELD_TOO_LONG.format(self._field_limit or exc.args[1])
        elif isinstance(exc, InvalidURLError):
            reason = f"{_target_fault(self._current)}: {reason}"
        elif isinstance(exc, BadHttpMessage) and "Invalid HTTP version" in str(exc):
            # llhttp refuses HTTP/1.2 or 3.0 itself (and reads 2.0 and 0.9 as HTTP/1.x,
            # refused in ingress): a version this port does not speak, as RFC 9110 §15.6.6
            # has a server say.
            status = 505
            reason = "the request's HTTP version is not spoken on this port: servegate serves "
            reason += "HTTP/1.1 and HTTP/1.0 (RFC 9110 §15.6.6)"
        elif isinstance(exc, BadHttpMessage) and "PRI/Upgrade" in str(exc):
            status = 505
            reason = (
                "an HTTP/2 connection preface (prior knowledge): this port speaks HTTP/1.1 and "
                "HTTP/1.0"
            )
        elif (
            isinstance(exc, BadHttpMessage)
            and "Invalid method" in str(exc)
            and (method := _method_token(self._current)) is not None
        ):
            # RFC 9110 §9.1: any token is a method, and a proxy passes on those it does not
            # know; llhttp, aiohttp's parser, knows a fixed list. Not the client's mistake:
            # 501, as RFC 9110 §15.6.2 has a server say it lacks what a request needs. A
            # method that is no token is garbage: 400.
            status = 501
            reason = (
                f"{method} is not a method servegate's HTTP parser (llhttp) knows, so it cannot "
                "be passed on to the model server; use a standard one (GET, POST, PUT, PATCH, "
                "DELETE, ...)"
            )
        elif isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
            status = 431
            reason = "the request has more headers than server.max_headers allows"
        access_log.info("request.rejected", status=status, reason=reason, client=request.remote)
        self._on_rejected(status)
        response = answer.bad_request(reason, request_ids.new(), status)
        response.force_close()  # the stream cannot be trusted after a parse error
        return response


# A request line's start: a method, then a space.
_REQUEST_LINE = re.compile(rb"[A-Z][A-Z-]* ")


def _ends_in_head(read: bytes) -> bool:
    """Whether `read`, which began with a request, ends in the start of another request's head
    that it does not complete: its requests are counted by their heads' ends and
    Content-Lengths. Unknown (False) when a body is chunked or a request upgrades: where they
    end is not counted here, and a timer on an idle connection would be worse than none."""
    if not _REQUEST_LINE.match(read):
        return False
    at = 0
    while (end := read.find(b"\r\n\r\n", at)) >= 0:
        head = read[at:end].lower()
        if b"\ntransfer-encoding:" in head or b"\nupgrade:" in head:
            return False
        length = 0
        if (field := head.find(b"\ncontent-length:")) >= 0:
            value = head[field + 16 :].split(b"\r", 1)[0].strip()
            if not value.isdigit():
                return False
            length = int(value)
        at = end + 4 + length
    return 0 < at < len(read)


def _target_fault(head_start: bytes) -> str:
    """Why llhttp refused the request target on the captured request line."""
    parts = head_start.split(b" ", 2)
    target = parts[1] if len(parts) > 1 else b""
    if any(byte < 0x21 or byte > 0x7E for byte in target.rstrip(b"\r\n")):
        return _UNCARRIED_TARGET
    return (
        "the request target has none of the forms RFC 9112 §3.2 allows (origin-form `/path?q`, "
        "absolute-form `http://host/path`, `*` for OPTIONS)"
    )


def _method_token(head_start: bytes) -> str | None:
    """The request line's method, if it is a token (RFC 9110 §9.1) short enough to name."""
    method = head_start.split(b" ", 1)[0]
    return method.decode() if _TOKEN.fullmatch(method) else None


def closes_after_answer(request: web.BaseRequest) -> bool:
    """Whether the client's connection must close once `request` is answered
    (`_JsonErrorHandler.closes_after_answer`): its chunked body may have ended with trailer
    fields, or it offered an upgrade to a protocol other than WebSocket.

    aiohttp's parser (3.14, _http_parser.pyx) keeps the last trailer field and adds it to the
    headers of the next request it parses on the connection, which a gateway in front may be
    sending for another client; when bytes of a next request came after the body, its end is
    not seen, and it counts as possibly trailed: the safe side."""
    protocol = request.protocol
    if isinstance(protocol, _JsonErrorHandler):
        return protocol.closes_after_answer
    return request.body_exists and request.content_length is None  # chunked: the safe side


def partial_head_pending(handler: RequestHandler) -> bool:
    """Whether `handler`'s parser holds the start of a pipelined head that has not come whole
    (`_JsonErrorHandler.partial_head_pending`); False for other handlers (the admin port's)."""
    return isinstance(handler, _JsonErrorHandler) and handler.partial_head_pending


def refused_version(request: web.BaseRequest) -> HttpVersion | None:
    """The version `request` said when it is no HTTP/1.x (`HTTP/2.0`, `HTTP/0.9`), else None:
    servegate refuses it with 505 (RFC 9110 §15.6.6). The request's own `version` then says
    HTTP/1.1, the version the answer is written in."""
    protocol = request.protocol
    return protocol.refused_version if isinstance(protocol, _JsonErrorHandler) else None


def _count_nothing(_status: int) -> None:
    pass


class JsonErrorServer(HandlerServer):
    """`on_rejected` hears the status of every request answered before its head was parsed,
    so the head limits show in the metrics when they are reached."""

    def __init__(
        self, handler: Any, on_rejected: Callable[[int], None] = _count_nothing, **kwargs: Any
    ) -> None:
        self.on_rejected = on_rejected
        super().__init__(
            handler, handler_class=_JsonErrorHandler, request_factory=self._request, **kwargs
        )

    def pre_shutdown(self) -> None:
        """Close every connection to new requests (aiohttp's), each still reading the body of
        the request it is handling (`_JsonErrorHandler.data_received`)."""
        for handler in self.connections:
            if isinstance(handler, _JsonErrorHandler):
                handler.draining = True
        super().pre_shutdown()

    def _request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        """aiohttp gives an unparseable request a stand-in message that says HTTP/1.0, and its
        answer's status line says the same; it gets the version the client spoke instead."""
        if isinstance(protocol, _JsonErrorHandler):
            protocol.next_head(message, payload)
            if is_parse_error(message):
                message = message._replace(version=protocol.head.spoke)
            elif message.version not in _SPOKEN:
                # llhttp parses `HTTP/2.0` and `HTTP/0.9` lines as HTTP/1.x: the request is
                # refused (ingress), and answered in HTTP/1.1 (RFC 9110 §2.5), not in a
                # version whose syntax this port does not speak.
                protocol.refused_version = message.version
                message = message._replace(version=HttpVersion11)
        return web.BaseRequest(message, payload, protocol, writer, task, self.loop)
