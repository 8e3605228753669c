"""One client connection once the listener has handed it to aiohttp: aiohttp's request
handler, plus a deadline on each request's head (server.header_timeout).

A client that trickles its headers (slowloris) holds a connection and a descriptor for as long
as it likes unless something times the head; aiohttp times only idle keep-alive connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from aiohttp.web_protocol import RequestHandler

from proxy import answer, request_ids
from proxy.aiohttp_internals import awaits_request
from proxy.corked import CorkedTransport
from proxy.data_server import partial_head_pending

# After the 408, read what the client still sends for this long before closing: closing with
# unread bytes sends a TCP reset, which can destroy the answer before the client reads it
# (nginx's lingering close).
LINGER = 2.0


class ClientConnection(asyncio.Protocol):
    """aiohttp's handler for one served connection, plus a deadline on each request's head.

    The deadline starts with the first byte of a request's head, on every request of a
    keep-alive connection (idle time between requests is the keep-alive's), and ends when
    aiohttp has parsed the head; the body then draws on the request's budget. A head begun
    behind a whole request in the same read (pipelined) is timed from then, and again while
    the request before it is still being handled. When it passes,
    the client gets a 408 and the connection is closed. Whether aiohttp's handler awaits a
    head is read from its private state, through proxy/aiohttp_internals.py.
    """

    # One per client connection: no instance dictionary.
    __slots__ = (
        "_expired",
        "_handler",
        "_on_closed",
        "_on_timeout",
        "_pipelined",
        "_timeout",
        "_timer",
        "_transport",
        "lost",
    )

    def __init__(
        self,
        handler: RequestHandler,
        timeout: float,
        *,
        on_timeout: Callable[[], None],
        on_closed: Callable[[ClientConnection], None],
    ) -> None:
        self._handler, self._timeout = handler, timeout
        self._on_timeout, self._on_closed = on_timeout, on_closed
        self._transport: CorkedTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._pipelined = False  # the timer runs for a head pipelined behind other requests
        self._expired = False
        self.lost = False  # the connection ended (the transport said so)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Every write to the client goes through it (proxy/corked.py), aiohttp's too.
        self._transport = CorkedTransport(cast(asyncio.Transport, transport))
        self._handler.connection_made(self._transport)

    def data_received(self, data: bytes) -> None:
        if self._expired:
            return  # answered 408: what still comes is read and dropped until the close
        waiting = awaits_request(self._handler)
        self._handler.data_received(data)
        pipelined = partial_head_pending(self._handler)
        if not waiting:
            # A request is being handled: its body is the budget's business, but the start of
            # a head pipelined behind it is timed from now.
            if pipelined and self._timer is None:
                self._arm(pipelined=True)
            return
        if data:
            # A request has begun: the keep-alive's idle timer, which aiohttp leaves armed for
            # the whole request (server.client_keepalive, 620 s), has nothing left to time.
            # Its public switch cancels it; aiohttp arms it again once the request is answered.
            self._handler.keep_alive(True)
        if not awaits_request(self._handler):
            # The head is complete (or unparseable, and answered so); one begun behind it in
            # the same read is timed as its own.
            self._disarm()
            if pipelined:
                self._arm(pipelined=True)
        elif data and self._timer is None:
            self._arm(pipelined=False)

    def eof_received(self) -> None:
        if self._transport is not None:
            self._transport.send_held()  # the loop closes the transport on return, itself
        self._handler.eof_received()  # None: the transport closes once the client half-closed

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._disarm()
        self._handler.connection_lost(exc)
        self._on_closed(self)

    def idle(self) -> bool:
        """Whether the connection waits for a request's first byte: no request is being handled,
        answered or received (a keep-alive between requests), and nothing of an answer is left
        to send."""
        transport = self._transport
        return (
            transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() == 0
            and self._timer is None
            and not self._expired
            and awaits_request(self._handler)
            and not partial_head_pending(self._handler)
        )

    def reclaim(self) -> None:
        """End an idle connection for a new one, at once: a TLS close would wait for the
        client's close_notify, and the limit would stretch meanwhile."""
        if self._transport is not None:
            self._transport.abort()

    def _arm(self, *, pipelined: bool) -> None:
        self._pipelined = pipelined
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._pipelined:
            if not partial_head_pending(self._handler):
                return  # the pipelined head came whole
            if not awaits_request(self._handler):
                # Still busy with a request before it: that one's time is its budget's; the
                # head waiting behind it gets another header_timeout from now.
                self._arm(pipelined=True)
                return
        elif not awaits_request(self._handler):
            return
        self._expired = True
        self._on_timeout()
        transport.write(answer.on_socket(answer.header_timeout(self._timeout, request_ids.new())))
        if transport.can_write_eof():  # plain TCP: half-close, then linger before closing
            transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER, transport.close)
        else:
            transport.close()
