"""Keeps each answer from the model to its own framing (RFC 9112 §6.3): the declared length, no
body where none is allowed, nothing after the last chunk.

aiohttp's client parses every byte that arrives on a connection as HTTP. Bytes beyond an
answer's framing (a Content-Length that counted characters, a body after a 204) are parsed as
the start of a next answer; the parser raises and the answer already received is lost. Here
the parser is fed the answer's head, then exactly its framed body; anything after that is
surplus: discarded, named in an `upstream.framing_fault` warning, counted, and the connection
is closed instead of going back to the pool, since its next bytes can no longer be trusted.

This is built on aiohttp 3.14's `ResponseHandler` and its response parser
(`aiohttp/client_proto.py`), which are not public API: the private attributes are reached
through proxy/aiohttp_internals.py, checked at start-up, and tests/integration/test_framing.py
fails if their behaviour changes.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

import structlog
from aiohttp import ClientPayloadError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import LineTooLong, TransferEncodingError

from proxy.acked import AckCounter
from proxy.aiohttp_internals import (
    parser_field_limit,
    replace_response_parser,
    response_parser,
    response_parser_maker,
    shorten_answer_queue,
    take_unparsed,
)
from proxy.failures import (
    TRAILER_TOO_LARGE,
    BodyFramingBroken,
    Cause,
    Failure,
    TrailerTooLarge,
)
from proxy.headers import longer_field

log = structlog.get_logger("servegate.upstream")

# The end of a response head: CRLF CRLF, or a bare LF where aiohttp's lenient parser takes one.
_HEAD_ENDS = (b"\n\r\n", b"\n\n")
_NO_BODY_STATUSES = frozenset({204, 304})  # RFC 9110 §15.3.5, §15.4.5
# How a chunked body ends when no trailer field and no extension follow its last chunk (RFC
# 9112 §7.1): the line before ends, a lone 0, and an empty trailer section.
BARE_LAST_CHUNK = b"\n0\r\n\r\n"
_IDLE_TIMEOUT_NOTICES = (b"HTTP/1.1 408 ", b"HTTP/1.0 408 ")
# The most of an early answer read from the kernel after a failed write: its head and a short
# body (an error page); a longer one ends cut, as it would have.
EARLY_ANSWER_LIMIT = 256 * 1024


class Fault(StrEnum):
    BYTES_AFTER_LENGTH = "bytes_after_content_length"
    BYTES_AFTER_LAST_CHUNK = "bytes_after_last_chunk"
    BODY_ON_BODILESS_ANSWER = "body_on_bodiless_answer"  # a 1xx, 204, 304 or an answer to HEAD


@dataclass(frozen=True)
class FramingFault:
    """Bytes the model sent beyond its answer's framing. `surplus_bytes` is None when aiohttp's
    parser took them in before refusing them (after a last chunk), so the count is unknown."""

    fault: Fault
    status: int
    declared: str  # what the framing allowed: "Content-Length: 17", "chunked", "no body (204)"
    surplus_bytes: int | None

    def describe(self) -> str:
        seen = "more bytes" if self.surplus_bytes is None else f"{self.surplus_bytes} more bytes"
        return (
            f"the model's {self.status} answer was framed as {self.declared}, and {seen} "
            "followed it; servegate relayed what the framing covers and closed that connection"
        )


class _Stage(Enum):
    HEAD = "head"  # reading a status line and headers (again after a 1xx)
    LENGTH = "length"  # a body of declared length
    CHUNKED = "chunked"  # a chunked body, until its last chunk
    UNTIL_CLOSE = "until_close"  # no framing: the body ends when the connection does
    DONE = "done"  # the answer is complete: every further byte is surplus


# The stages by module name, as the parser reads them several times per answer: on Python
# 3.11 a member read off its Enum class goes through EnumType.__getattr__ (gone in 3.12),
# about ten times the cost of a module global.
_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE = (
    _Stage.HEAD,
    _Stage.LENGTH,
    _Stage.CHUNKED,
    _Stage.UNTIL_CLOSE,
    _Stage.DONE,
)


class _FramedParser:
    """Stands in for aiohttp's response parser on one exchange, feeding it only what the
    answer's framing covers.

    aiohttp's parser lives from the answer's first byte to its last, not from the request on:
    a request the model holds costs no parser while it waits (about 1 KiB each,
    bench/held_memory.py). When many answers come at once, the event loop reads them all
    before any of their requests ends and frees its memory; a small answer is parsed whole in
    one read, and its parser is freed before the next answer's is built. Building one costs
    under a microsecond."""

    def __init__(
        self, handler: FramedResponseHandler, skip_payload: bool, field_limit: int
    ) -> None:
        self._parser: Any = None
        self._handler = handler
        self._skip_payload = skip_payload  # the request was HEAD
        # Each header field's name and value together (upstream.max_response_header_bytes):
        # aiohttp's parser is given more room (aiohttp_internals.parser_field_limit).
        self._field_limit = field_limit
        self._parser_limit = parser_field_limit(field_limit)
        self._parser_failed = False
        self.next_answer()

    def next_answer(self) -> None:
        """Expect the head of the connection's next answer."""
        self._stage = _HEAD
        self._head_carry = b""  # the last bytes of the head so far: its end may straddle reads
        self._remaining = 0
        self._declared = ""
        self._status = 0
        self._payload: Any = None
        self._body_end = b""  # the last bytes of a chunked body so far
        self._handler.answer_fragment = ""

    def feed_data(self, data: bytes) -> tuple[list[Any], bool, bytes]:
        messages: list[Any] = []
        idle = self._stage is _DONE  # the answer ended in an earlier read
        while True:
            if self._stage is _DONE:
                if idle and data.startswith(_IDLE_TIMEOUT_NOTICES) and self.complete:
                    # A 408 on a connection whose answer is done: the server's idle timer
                    # closing it (RFC 9110 §15.5.9; Node.js, Apache's mod_reqtimeout), no
                    # fault of the answer before it (Go's Transport takes it so too).
                    self._handler.close_idle()
                elif data:
                    self._surplus(len(data))
                elif not self._parser_failed and self._parser is not None:
                    self._parser.feed_data(data)  # a paused body resuming (flow control)
                return messages, False, b""
            piece, data = self._split(data)
            if self._parser is None:
                self._parser = self._handler.build_parser()
            try:
                parsed, upgraded, tail = self._parser.feed_data(piece)
            except LineTooLong as exc:
                if self._stage is _CHUNKED or exc.args[1] != self._parser_limit:
                    raise  # a trailer field (below), or the status line (max_line_size)
                # Past the parser's own limit: some field is longer than the setting's.
                raise self._field_too_long() from exc
            except Exception as exc:
                if self._stage is not _CHUNKED:
                    raise
                if not self._payload.is_eof():
                    # In the body, not the head (parsed on its own): a chunk or trailer field
                    # that breaks the framing, which the error's name must say, whatever llhttp
                    # called it. aiohttp puts it on the connection's queue alone: whoever
                    # reads this body, its head relayed already, must hear of it too, or it
                    # waits for the budget.
                    said = getattr(exc, "message", exc)
                    if isinstance(exc, LineTooLong) or "Too many headers" in str(exc):
                        broken: BodyFramingBroken = TrailerTooLarge(f"{TRAILER_TOO_LARGE}: {said}")
                    else:
                        broken = BodyFramingBroken(
                            f"the answer's chunked body is malformed: {said}"
                        )
                    self._payload.set_exception(broken)
                    raise TransferEncodingError(str(broken)) from exc
                # The last chunk ended the body; what followed it could not be parsed.
                self._parser_failed = True
                self._stage = _DONE
                self._surplus(None)
                return messages, False, b""
            for message, payload in parsed:
                if self._stage is _HEAD:
                    if longer_field(message.raw_headers, self._field_limit) is not None:
                        raise self._field_too_long()
                    messages.append((message, payload))
                    self._begin_body(message, payload)
                else:  # a whole second answer to one request: surplus as well
                    self._stage = _DONE
                    self._surplus(None)
            if upgraded:  # 101: the bytes that follow belong to the new protocol
                return messages, upgraded, tail
            self._check_complete()
            if self.complete:
                self._parser = None  # nothing left in it: the next answer gets a new one
            if not data:
                return messages, False, b""

    def _field_too_long(self) -> LineTooLong:
        """What aiohttp's parser raises at a limit, with the limit the setting gives
        (failures.classify names the cause and the setting)."""
        return LineTooLong("a header field (its name and value together)", self._field_limit)

    def _split(self, data: bytes) -> tuple[bytes, bytes]:
        """The next piece the parser may see, and the rest."""
        if self._stage is _HEAD:
            if data and not self._handler.answer_fragment:
                self._handler.answer_fragment = "part of an answer's head"
            cut = self._head_end(data)
            if cut < 0:
                self._head_carry = (self._head_carry + data)[-2:]
                return data, b""
            self._head_carry = b""
            return data[:cut], data[cut:]
        if self._stage is _LENGTH:
            piece = data[: self._remaining]
            self._remaining -= len(piece)
            return piece, data[len(piece) :]
        if self._stage is _CHUNKED:
            keep = len(BARE_LAST_CHUNK)
            self._body_end = (self._body_end + data[-keep:])[-keep:]
        return data, b""

    def _head_end(self, data: bytes) -> int:
        """How many bytes of `data` complete the head, or -1 if it goes on past them."""
        carry = self._head_carry
        if carry:  # the end may straddle this read and the last one
            joint = carry + data[:2]
            ends = [i + len(end) for end in _HEAD_ENDS if (i := joint.find(end)) >= 0]
            if ends:
                return min(ends) - len(carry)
        crlf = data.find(b"\n\r\n")
        # A bare-LF end counts only before the first CRLF one: the body is not searched.
        lf = data.find(b"\n\n", 0, crlf + 1 if crlf >= 0 else len(data))
        if lf >= 0:
            return lf + 2
        return crlf + 3 if crlf >= 0 else -1

    def _begin_body(self, message: Any, payload: Any) -> None:
        self._status = message.code
        if 100 <= message.code < 200 and message.code != 101:
            self._handler.answer_fragment = f"an interim {message.code} answer"
            return  # the final answer's head follows
        self._payload = payload
        length = message.headers.get("Content-Length")
        if self._skip_payload or message.code in _NO_BODY_STATUSES:
            why = "answer to HEAD" if self._skip_payload else str(message.code)
            self._stage, self._declared = _DONE, f"no body ({why})"
        elif message.chunked:
            self._stage, self._declared = _CHUNKED, "chunked"
            self._body_end = b"\n"  # the head's last byte
        elif length is not None:  # the parser has refused a malformed or repeated one
            self._stage, self._declared = _LENGTH, f"Content-Length: {length}"
            self._remaining = int(length)
        else:
            self._stage = _UNTIL_CLOSE

    def _check_complete(self) -> None:
        if (self._stage is _LENGTH and self._remaining == 0) or (
            self._stage is _CHUNKED and self._payload.is_eof()
        ):
            self._stage = _DONE

    def _surplus(self, size: int | None) -> None:
        if self._declared.startswith("Content-Length"):
            fault = Fault.BYTES_AFTER_LENGTH
        elif self._declared == "chunked":
            fault = Fault.BYTES_AFTER_LAST_CHUNK
        else:
            fault = Fault.BODY_ON_BODILESS_ANSWER
        self._handler.framing_fault(FramingFault(fault, self._status, self._declared, size))

    def reset(self, error: ConnectionResetError) -> None:
        """The connection was reset. A body that ends with the connection (no length, not
        chunked) ends with a close (RFC 9112 §6.3), not a reset, which may have dropped bytes
        the server sent: its reader hears an error, not the end."""
        payload = self._payload
        if self._stage is _UNTIL_CLOSE and payload is not None and not payload.is_eof():
            payload.set_exception(
                ClientPayloadError(f"the connection was reset before the answer's end: {error}")
            )

    @property
    def complete(self) -> bool:
        """The whole framed answer has reached the payload (nothing left in the parser)."""
        return self._stage is _DONE and (self._payload is None or self._payload.is_eof())

    @property
    def ended_cleanly(self) -> bool:
        """The answer ended exactly where its framing said, with nothing after it: aiohttp's
        parser then stands at the start of the next answer, as on any keep-alive connection.

        Not after a chunked body that may have ended with trailer fields (RFC 9112 §7.1.2):
        aiohttp's parser (3.14, _http_parser.pyx) keeps them and adds them to the headers of
        the connection's next answer, which may be another client's."""
        if not self.complete or self._parser_failed:
            return False
        return self._declared != "chunked" or self._body_end.endswith(BARE_LAST_CHUNK)

    def feed_eof(self) -> Any:
        if self._parser_failed or self._stage is _DONE:
            return None  # the answer was complete: the close ends nothing
        if self._parser is None:
            return None  # not a byte of the answer came: aiohttp's parser says the same
        return self._parser.feed_eof()

    def pause_reading(self) -> None:
        if self._parser is not None:
            self._parser.pause_reading()


OnFault = Callable[[FramingFault], None]

# What builds each answer's parser, per distinct set_response_params arguments: servegate
# passes two (a HEAD's, and every other method's) per upstream; a few kept, whatever comes.
_PARSER_MAKERS: dict[tuple[tuple[str, Any], ...], Callable[[ResponseHandler], Any]] = {}
_PARSER_MAKERS_KEPT = 8


class FramedResponseHandler(ResponseHandler):
    """aiohttp's client protocol, with each answer held to its framing. `on_fault` hears of
    each fault once, in the context of the request that got the answer (its log fields).
    `acks` counts what the server's TCP acknowledged (proxy/acked.py), for the connection's
    whole life."""

    def __init__(self, loop: Any, on_fault: OnFault) -> None:
        super().__init__(loop)
        shorten_answer_queue(self)
        self._on_fault = on_fault
        self._context = contextvars.copy_context()
        self._faulted = False
        self._params: dict[str, Any] = {}
        self._make_parser: Callable[[ResponseHandler], Any] | None = None  # shared, per params
        self._closed_here = False
        self.acks: AckCounter | None = None
        # What arrived of the current answer before its head was whole (AttemptFacts).
        self.answer_fragment = ""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.acks = AckCounter.attach(transport)

    def eof_received(self) -> None:
        if self.acks is not None:
            self.acks.peer_finished = True
        super().eof_received()

    def close(self) -> None:
        self._closed_here = True
        super().close()

    def abort(self) -> None:
        self._closed_here = True
        super().abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        parser = response_parser(self)
        if (
            isinstance(exc, OSError)
            and self.acks is not None
            and isinstance(parser, _FramedParser)
            and not parser.complete
            and (early := self.acks.unread(EARLY_ANSWER_LIMIT))
        ):
            # A write failed: the server had stopped reading the request and closed (an early
            # answer, a 413 to a body too large). Its answer may wait unread in the kernel.
            self.data_received(early)
        if self.acks is not None:
            # The peer's FIN, when eof_received did not hear of it: uvloop's TLS layer closes
            # on a FIN that came without close_notify and reports no error (unless servegate
            # closed it itself); and Linux reports a reset as EPIPE only to a socket that had
            # received the peer's FIN first (tcp_reset in CLOSE_WAIT), which a write can meet
            # before a read does. A reset alone is ECONNRESET.
            if (exc is None and not self._closed_here) or isinstance(exc, BrokenPipeError):
                self.acks.peer_finished = True
            self.acks.close()
        if isinstance(exc, ConnectionResetError) and isinstance(parser, _FramedParser):
            parser.reset(exc)
        super().connection_lost(exc)

    def set_response_params(self, **params: Any) -> None:
        self._context = contextvars.copy_context()
        parser = response_parser(self)
        if isinstance(parser, _FramedParser) and parser.ended_cleanly and params == self._params:
            # aiohttp builds a parser per request; one that ended its last answer cleanly goes
            # on, at a third of the cost. Bytes that came while the connection was idle were
            # a fault already (surplus after that answer), and closed it.
            parser.next_answer()
            return
        self._params = params
        early = take_unparsed(self)  # bytes that came before the request was sent
        # aiohttp's own, for what the protocol keeps of them (a HEAD's answer has no body);
        # the parser it builds is let go: each answer's is built at its first byte.
        super().set_response_params(**params)
        key = tuple(params.items())
        if (make := _PARSER_MAKERS.get(key)) is None:
            if len(_PARSER_MAKERS) >= _PARSER_MAKERS_KEPT:
                _PARSER_MAKERS.clear()
            make = _PARSER_MAKERS[key] = response_parser_maker(params)
        self._make_parser = make
        skip_payload = params.get("skip_payload", False)
        # The stand-in answers every call the protocol makes of a parser.
        framed = _FramedParser(self, skip_payload, params["max_field_size"])
        replace_response_parser(self, framed)
        if early:
            self.data_received(early)

    def build_parser(self) -> Any:
        """aiohttp's response parser for the current answer, as its set_response_params builds
        it, with room for a field's neighbour (aiohttp_internals.parser_field_limit); the
        stand-in (_FramedParser) stays the one the protocol feeds."""
        assert self._make_parser is not None  # set_response_params comes first
        return self._make_parser(self)

    def close_idle(self) -> None:
        """The server closes this connection, idle, and says so: never back to the pool."""
        self.force_close()
        if self.transport is not None:
            self._closed_here = True
            self.transport.close()

    def framing_fault(self, fault: FramingFault) -> None:
        self.force_close()  # never back to the pool: the stream's next bytes mean nothing
        parser = response_parser(self)
        if isinstance(parser, _FramedParser) and parser.complete and self.transport is not None:
            self._closed_here = True
            self.transport.close()  # stop reading; the answer is whole in its payload
        if not self._faulted:
            self._faulted = True
            self._context.run(self._on_fault, fault)


def report(on_failure: Callable[[Failure], None]) -> OnFault:
    """A fault handler that logs `upstream.framing_fault` and counts the fault as a
    `protocol/response_framing` failure, though the client got the framed answer."""

    def on_fault(fault: FramingFault) -> None:
        log.warning(
            "upstream.framing_fault",
            fault=fault.fault,
            status=fault.status,
            declared=fault.declared,
            surplus_bytes=fault.surplus_bytes,
            detail=fault.describe(),
        )
        on_failure(Failure(Cause.RESPONSE_FRAMING, fault.describe()))

    return on_fault
