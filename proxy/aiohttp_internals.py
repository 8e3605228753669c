"""The only module that reaches into aiohttp's private attributes, and the start-up check that
says so loudly when an aiohttp release has moved one.

aiohttp offers no public switch for what servegate needs here: building the data port's
request handlers from servegate's own class, reading an answer on a connection servegate opened
and wrote the request to itself (proxy/pool.py, proxy/exchange.py, which need no session and so
none of the session's hidden one-time retry of idempotent requests), holding an answer to its
framing, timing a request's head, writing heads byte for byte, sending a buffered answer's
head with its body, parsing pipelined requests one at a time, and telling a too-long target
from a too-long header line, and keeping its per-connection queues small (each held
request keeps three). A renamed attribute would not fail: Python would quietly set a
new one, and an answer's surplus bytes would be read as the next one's. So `check()` verifies
every one of them before servegate serves anything, and each use below names the aiohttp 3.14
source it relies on.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import http_writer, web, web_protocol
from aiohttp.base_protocol import BaseProtocol
from aiohttp.client_exceptions import ClientPayloadError
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser, HttpResponseParser
from aiohttp.streams import DataQueue, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from proxy.config import C_INT_MAX

# client_proto.py, ResponseHandler.data_received: bytes that arrive while no parser is set
# (before the request is sent) wait in `_tail`; set_response_params builds the response parser
# in `_parser` (base_protocol.py, BaseProtocol) and then feeds it `_tail`.
_UNPARSED = "_tail"
_PARSER = "_parser"
# base_protocol.py, BaseProtocol: the event loop, which the response parser is built with.
_LOOP = "_loop"
# web_response.py, StreamResponse._write_headers: "if self._send_headers_immediately:
# writer.send_headers()"; web.Response sets it False so its head leaves with its body.
_HEAD_NOW = "_send_headers_immediately"
# web_response.py, StreamResponse._start awaits `_prepare_headers()`, which adds the Date,
# Server, Content-Type and framing headers; a subclass can take some of them out after it.
_PREPARE_HEADERS = "_prepare_headers"
# web_protocol.py, RequestHandler: `_waiter` is the future start() awaits while no request is
# queued; data_received counts every head it parses (or fails to) in `_request_count`.
_WAITER = "_waiter"
_REQUEST_COUNT = "_request_count"
# web_protocol.py, RequestHandler.data_received: each parsed head is queued in `_messages` as
# (message, payload) until start() takes it.
_MESSAGES = "_messages"
# streams.py: StreamReader (a body) and DataQueue (which ResponseHandler is: the parsed answers
# of an upstream connection) keep what they were fed in `_buffer`, a deque they append to and
# popleft from.
_BUFFER = "_buffer"
# web_protocol.py: the stand-in message ERROR that RequestHandler.start hands the request factory
# for a head it could not parse.
_PARSE_ERROR = "ERROR"
# http_writer.py: StreamWriter.write_headers calls the module-level `_serialize_headers` (the C
# writer's, or the Python one), for the client's requests and the server's answers alike.
_SERIALIZER = "_serialize_headers"
# web_protocol.py, RequestHandler: `_max_msg_queue_size` parsed heads may wait in `_messages`;
# at that many it stops reading, and start() feeds the parser again (`data_received(b"")`) as
# the queue drains.
_QUEUE_SIZE = "_max_msg_queue_size"
# web_protocol.py, RequestHandler: `_manager` is cleared, with `_parser`, as the connection is
# lost (connection_lost).
_MANAGER = "_manager"
# _http_parser.pyx: the callback that takes the request target, where llhttp's parser raises
# LineTooLong for a target over max_line_size (the header callbacks raise it for header lines).
_TARGET_CALLBACK = "cb_on_url"
# What `_server_missing` feeds a request parser: two requests in one read, the second
# unparseable, and a target and a header line over a 256-byte limit.
_GOOD_THEN_BAD = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nBad Name: x\r\n\r\n"
_LONG_TARGET = b"GET /" + b"t" * 300 + b" HTTP/1.1\r\n\r\n"
_LONG_FIELD = b"GET / HTTP/1.1\r\nX: " + b"v" * 300 + b"\r\n\r\n"
# What `_parses_as_llhttp` feeds a response parser.
_WHOLE_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
_CHUNKED_THEN_SURPLUS = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX"


class MissingInternal(Exception):
    """An aiohttp attribute servegate relies on is gone; the message names it and the fix."""


def _missing(*needs: tuple[str, str]) -> MissingInternal:
    named = "; ".join(f"{what}, which servegate needs to {why}" for what, why in needs)
    return MissingInternal(
        f"aiohttp {aiohttp.__version__} has no {named}: "
        "install an aiohttp version servegate was tested with (see pyproject.toml)"
    )


class _ShortQueue(list[Any]):
    """First in, first out, for the queues that hold an item or two: what aiohttp calls on
    those deques (append, popleft, len, truth, [-1]) on a list, 56 bytes when empty against a
    deque's 760 (CPython allocates a deque's first block of 64 slots with it). A held request
    keeps three such queues, a tenth of what it costs. popleft is O(n): only for queues that
    stay short."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


def shorten_answer_queue(handler: ResponseHandler) -> None:
    """Queue `handler`'s parsed answers in a short queue: servegate sends one request at a time
    on an upstream connection (proxy/upstream.py), so one answer, or an interim one before it,
    waits at most. Called from the handler's __init__, before anything is queued."""
    setattr(handler, _BUFFER, _ShortQueue())


def release_read_buffer(body: StreamReader) -> None:
    """Let go of a body reader's buffer once the whole body has been read: at its end nothing
    is fed to it again (streams.py, feed_data after feed_eof), and its reader is kept until the
    request's handler returns. A body still arriving keeps its deque: a chunked upload may queue
    thousands of chunks."""
    if body.is_eof() and not getattr(body, _BUFFER):
        setattr(body, _BUFFER, _ShortQueue())


def parser_field_limit(limit: int) -> int:
    """What to give aiohttp's parsers as `max_field_size` for header fields whose name and value
    together may be `limit` bytes. Their check counts the previous field's name as well
    (_http_parser.pyx: cb_on_header_field measures the name before the field before it is
    processed, and the value's check adds that sum), so at `limit` they refuse fields within
    it, by where they stand; at twice it they refuse none that are within it, and servegate
    holds each field to `limit` itself (headers.longer_field). Within a C int."""
    return min(2 * limit, C_INT_MAX)


def take_unparsed(handler: ResponseHandler) -> bytes:
    """The bytes `handler` holds because no response parser was set when they came; cleared."""
    early, handler._tail = handler._tail, b""
    return early


def response_parser_maker(params: Mapping[str, Any]) -> Callable[[ResponseHandler], Any]:
    """What builds aiohttp's response parser for a connection whose protocol was given `params`
    (ResponseHandler.set_response_params's keyword arguments): the parser that method builds
    (client_proto.py), with each header field given room for its neighbour
    (`parser_field_limit`). Made once per distinct `params`, called per answer: a call of the
    parser's constructor, where set_response_params costs about 20,000 instructions more
    (callgrind)."""
    make = functools.partial(
        HttpResponseParser,
        timer=params.get("timer"),
        payload_exception=ClientPayloadError,
        response_with_body=not params.get("skip_payload", False),
        read_until_eof=params.get("read_until_eof", False),
        auto_decompress=params.get("auto_decompress", True),
        max_line_size=params.get("max_line_size", 8190),
        max_field_size=parser_field_limit(params.get("max_field_size", 8190)),
        max_headers=params.get("max_headers", 128),
    )
    bufsize = params.get("read_bufsize", DEFAULT_CHUNK_SIZE)
    return lambda handler: make(handler, getattr(handler, _LOOP), bufsize)


def response_parser(handler: ResponseHandler) -> Any:
    """The parser `handler` feeds the connection's bytes (None before a request is sent)."""
    return handler._parser


def replace_response_parser(handler: ResponseHandler, parser: Any) -> None:
    """Make `handler` feed `parser` instead: it answers feed_data, feed_eof and pause_reading
    as aiohttp's HttpResponseParser does."""
    handler._parser = parser


def hold_head_for_body(response: web.StreamResponse) -> None:
    """Send `response`'s head with its first body write, in one packet, as web.Response does."""
    response._send_headers_immediately = False


def awaits_request(handler: RequestHandler) -> bool:
    """Whether the request handler is idle, waiting for the next request's head.

    Before its task first runs (asyncio < 3.12 starts tasks lazily, and a TLS connection's
    first bytes can arrive with its handshake) there is no waiter yet: then no head has been
    parsed at all."""
    waiter = handler._waiter
    if waiter is None:
        return handler._request_count == 0
    return not waiter.done()


def request_count(handler: RequestHandler) -> int:
    """How many heads the request handler has parsed on its connection, unparseable ones too."""
    return handler._request_count


def last_queued_message(handler: RequestHandler) -> RawRequestMessage | None:
    """The last head the request handler has parsed and not yet handled (None: none waits,
    or it could not be parsed)."""
    queued = handler._messages
    message = queued[-1][0] if queued else None
    return message if isinstance(message, RawRequestMessage) else None


def last_queued_body(handler: RequestHandler) -> StreamReader | None:
    """The body of the last head the request handler has parsed and not yet handled (None:
    none waits)."""
    queued = handler._messages
    return queued[-1][1] if queued else None


def parse_one_request_per_feed(
    handler: RequestHandler, loop: asyncio.AbstractEventLoop, options: Mapping[str, Any]
) -> None:
    """Give `handler` a request parser that stops after each complete request and keeps the
    rest of the read for the next feed (llhttp's pause, which aiohttp's own parser makes only
    once 32 are queued).

    aiohttp's parser parses every request of one read in a single call, and a parse error in
    any of them raises and discards the complete requests before it (_http_parser.pyx,
    HttpParser.feed_data): two pipelined requests sent together, the second malformed, were
    answered with one error alone, which the client reads as the answer to the first.
    `options` are the handler's own keyword arguments (data_server.server_options)."""
    handler._parser = _request_parser(handler, loop, options)
    # At most one parsed head waits now: no 760-byte deque per connection for it.
    setattr(handler, _MESSAGES, _ShortQueue())


def _request_parser(
    handler: RequestHandler, loop: asyncio.AbstractEventLoop, options: Mapping[str, Any]
) -> HttpRequestParser:
    return HttpRequestParser(
        handler,
        loop,
        options.get("read_bufsize", DEFAULT_CHUNK_SIZE),
        max_line_size=handler.max_line_size,
        max_field_size=handler.max_field_size,
        max_headers=handler.max_headers,
        payload_exception=RequestPayloadError,
        auto_decompress=options.get("auto_decompress", True),
        max_msg_queue_size=1,
    )


def let_go_of_request_parser(handler: RequestHandler) -> None:
    """Free the request parser of a connection whose last read was one whole request: llhttp
    stopped at its end and holds nothing. A request the model holds then costs no parser
    while it waits (about 1 KiB; bench/held_memory.py); `renew_request_parser` builds the
    next, in under a microsecond, before the connection's next bytes are parsed. aiohttp
    reads a missing parser as a lost connection only where the connection has no manager
    (web_protocol.py: connection_lost clears both; start() skips `message_consumed`)."""
    handler._parser = None


def renew_request_parser(
    handler: RequestHandler, loop: asyncio.AbstractEventLoop, options: Mapping[str, Any]
) -> None:
    """Give a connection whose parser was let go a new one (as `parse_one_request_per_feed`
    builds it); nothing for one that has its parser, or is lost."""
    if handler._parser is None and getattr(handler, _MANAGER) is not None:
        handler._parser = _request_parser(handler, loop, options)


def last_queued_failed(handler: RequestHandler) -> bool:
    """Whether the last head the request handler queued is one it could not parse: aiohttp
    queues a stand-in (`_ErrInfo`) in place of its message."""
    queued = handler._messages
    return bool(queued) and not isinstance(queued[-1][0], RawRequestMessage)


def feed_request_parser(handler: RequestHandler, data: bytes) -> None:
    """Feed `data` to the connection's request parser, past aiohttp's data_received, which
    drops every byte once the server shuts down (web_protocol.py: close() sets `_close`): the
    rest of the body of the request being handled reaches its reader. A head parsed after that body
    is not queued (the connection closes after this answer). An empty feed resumes a parser
    paused for a full body buffer. Raises what the parser raises (a malformed chunk)."""
    parser = handler._parser
    if parser is not None:
        parser.feed_data(data)


def queued_requests(handler: RequestHandler) -> int:
    """How many parsed heads wait in the request handler's queue."""
    return len(handler._messages)


def queue_full(handler: RequestHandler) -> bool:
    """Whether as many parsed requests wait as the request handler queues: it parses more as
    the queue drains."""
    return len(handler._messages) >= handler._max_msg_queue_size


def target_too_long(error: BaseException) -> bool:
    """Whether a LineTooLong from the request parser is about the request target (414), not a
    header line (431): llhttp's parser raises both from its callbacks, the target's own."""
    return isinstance(error, LineTooLong) and any(
        frame.name.endswith(_TARGET_CALLBACK) for frame in traceback.extract_tb(error.__traceback__)
    )


def is_parse_error(message: RawRequestMessage) -> bool:
    """Whether `message` is aiohttp's stand-in for a head it could not parse."""
    return message is web_protocol.ERROR


def replace_head_serializer(serialize: Callable[[str, Mapping[str, str]], bytes]) -> None:
    """Make every message head aiohttp writes in this process, client and server, go through
    `serialize(start_line, headers)`."""
    setattr(http_writer, _SERIALIZER, serialize)


class HandlerServer(web.Server):
    """A low-level web.Server whose connections are served by `handler_class`, a RequestHandler
    subclass (to answer unparseable requests servegate's way).

    web.Server builds a plain RequestHandler per connection from the keyword arguments it was
    given; this keeps its own copy of them, `handler_options` (shared by every connection, which
    builds its request parsers from them), instead of reading web.Server's private ones.
    `loop` is the event loop it serves on."""

    def __init__(
        self,
        handler: Any,
        *,
        handler_class: type[RequestHandler],
        handler_cancellation: bool = False,
        request_factory: Any = None,
        **handler_kwargs: Any,
    ) -> None:
        super().__init__(
            handler,
            request_factory=request_factory,
            handler_cancellation=handler_cancellation,
            **handler_kwargs,
        )
        self._handler_class = handler_class
        self.handler_options: Mapping[str, Any] = handler_kwargs
        self.loop = asyncio.get_running_loop()

    def __call__(self) -> RequestHandler:
        # The runner uses the server itself as the protocol factory (web_runner.py, BaseSite).
        return self._handler_class(self, loop=self.loop, **self.handler_options)


async def check() -> None:
    """Fail at start-up, not under traffic, if anything above no longer holds.

    Raises MissingInternal with one line naming everything that is gone."""
    missing = [*await _client_missing(), *_server_missing()]
    if missing:
        raise _missing(*missing)


async def _client_missing() -> list[tuple[str, str]]:
    missing: list[tuple[str, str]] = []
    handler = ResponseHandler(asyncio.get_running_loop())
    if getattr(handler, _UNPARSED, None) != b"":
        missing.append((f"ResponseHandler.{_UNPARSED}", "hold answers to their framing"))
    # proxy/upstream.py sets these for each exchange it runs on a connection itself.
    try:
        handler.set_response_params(
            skip_payload=False,
            read_until_eof=True,
            auto_decompress=False,
            max_line_size=8190,
            max_field_size=8190,
            max_headers=128,
        )
    except TypeError:
        why = "read an answer on a connection it wrote the request to itself"
        missing.append(("ResponseHandler.set_response_params's options", why))
        return missing
    parser = getattr(handler, _PARSER, None)
    if parser is None:
        missing.append((f"ResponseHandler.{_PARSER}", "hold answers to their framing"))
    elif not _parses_as_llhttp(parser):
        what = (
            "response parser that refuses bytes after a last chunk (its compiled llhttp "
            "parser: unset AIOHTTP_NO_EXTENSIONS, or install a build with its C extensions)"
        )
        missing.append((what, "hold answers to their framing"))
    return missing


def _parses_as_llhttp(parser: Any) -> bool:
    """Whether `parser` treats a connection's bytes as proxy/framing.py expects: it parses the
    next answer once one has ended (a pooled connection keeps its parser) and refuses bytes
    after a last chunk. aiohttp's pure-Python parser keeps those bytes and reads them as the
    start of the connection's next answer, another request's."""
    try:
        answers = [len(parser.feed_data(_WHOLE_ANSWER)[0]) for _ in range(2)]
    except Exception:
        return False
    try:
        parser.feed_data(_CHUNKED_THEN_SURPLUS)
    except Exception:
        return answers == [1, 1]
    return False


def _server_missing() -> list[tuple[str, str]]:
    needs = (
        (
            getattr(web.StreamResponse, _HEAD_NOW, None) is True,
            f"StreamResponse.{_HEAD_NOW}",
            "send a buffered answer's head with its body",
        ),
        (
            inspect.iscoroutinefunction(getattr(web.StreamResponse, _PREPARE_HEADERS, None)),
            f"StreamResponse.{_PREPARE_HEADERS}",
            "add no Server or Content-Type header the model did not send, and no Server "
            "to servegate's own answers",
        ),
        *(
            (
                name in getattr(RequestHandler, "__slots__", ()),
                f"RequestHandler.{name}",
                "time each request's head (server.header_timeout)",
            )
            for name in (_WAITER, _REQUEST_COUNT)
        ),
        (
            _MESSAGES in getattr(RequestHandler, "__slots__", ()),
            f"RequestHandler.{_MESSAGES}",
            "tell a request's body from the next request's head",
        ),
        (
            _BUFFER in getattr(StreamReader, "__slots__", ())
            and isinstance(getattr(DataQueue(asyncio.get_running_loop()), _BUFFER, None), deque),
            f"StreamReader/DataQueue.{_BUFFER}",
            "keep each held request small",
        ),
        (
            _QUEUE_SIZE in getattr(RequestHandler, "__slots__", ()),
            f"RequestHandler.{_QUEUE_SIZE}",
            "parse one pipelined request after another",
        ),
        (
            _MANAGER in getattr(RequestHandler, "__slots__", ()),
            f"RequestHandler.{_MANAGER}",
            "keep no request parser while a request is held",
        ),
        (
            _parses_one_request_per_feed(),
            "request parser that pauses after each request (max_msg_queue_size)",
            "answer the requests before a malformed pipelined one",
        ),
        (
            _tells_a_long_target(),
            f"_http_parser.{_TARGET_CALLBACK} raising LineTooLong for a long target",
            "answer a too-long target 414 rather than 431",
        ),
        (
            isinstance(getattr(web_protocol, _PARSE_ERROR, None), RawRequestMessage),
            f"web_protocol.{_PARSE_ERROR}",
            "answer an unparseable request in the version its client spoke",
        ),
        (
            callable(getattr(RequestHandler, "handle_error", None)),
            "RequestHandler.handle_error",
            "answer unparseable requests in JSON",
        ),
        (
            callable(getattr(RequestHandler, "set_parser", None)),
            "RequestHandler.set_parser",
            "relay an upgraded connection (server.upgrades)",
        ),
        (
            callable(getattr(http_writer, _SERIALIZER, None)),
            f"http_writer.{_SERIALIZER}",
            "write obs-text and raw target bytes byte for byte",
        ),
    )
    return [(what, why) for ok, what, why in needs if not ok]


class _Parsed(BaseProtocol):
    """The least a request parser needs of its protocol, for the start-up checks."""


def _parser(max_line: int = 8190, *, one_per_feed: bool = False) -> Any:
    loop = asyncio.get_running_loop()
    return HttpRequestParser(
        _Parsed(loop),
        loop,
        DEFAULT_CHUNK_SIZE,
        max_line_size=max_line,
        max_field_size=max_line,
        max_msg_queue_size=1 if one_per_feed else 0,
    )


def _parses_one_request_per_feed() -> bool:
    parser = _parser(one_per_feed=True)
    try:
        first = parser.feed_data(_GOOD_THEN_BAD)[0]
    except HttpProcessingError:
        return False
    try:
        parser.feed_data(b"")
    except HttpProcessingError:
        return len(first) == 1
    return False


def _tells_a_long_target() -> bool:
    verdicts = []
    for head in (_LONG_TARGET, _LONG_FIELD):
        try:
            _parser(256).feed_data(head)
        except LineTooLong as error:
            verdicts.append(target_too_long(error))
    return verdicts == [True, False]
