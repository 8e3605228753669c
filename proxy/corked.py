"""Small writes held to the end of the event loop's step while the loop is busy, then sent
one after another.

uvloop sends a write at once when nothing waits in the socket's buffer: under load, a step of
the loop finishes many requests, and their answers leave one by one, each after the rest of
its request's work (the access line, metrics, the next request's parsing). Each write may find
its reader asleep and wake it: a wake-up across cores, which on a virtual machine is an
interrupt through the hypervisor. Held until the step's work is done, the step's answers leave
back to back, and a client woken by the first is still awake for the rest. The same number of
system calls, fewer wake-ups: Redis sends its replies so, gathered before its event loop sleeps
(`handleClientsWithPendingWrites` in `beforeSleep`).

Client connections only. Holding the writes to the model server too gained about a tenth
more requests a second on the same load, but its wrapper on every upstream connection cost a
burst of 5,000 held requests 1.3-1.5 MiB at its peak (148.2-148.9 MiB without it, 148.8-150.3
with it, against a target of 150 MiB; docs/benchmarks.md, "Tenth round").

Measured on the 2-core virtual machine of docs/benchmarks.md (the throughput load, a 1 KiB
POST through one worker pinned to one core), holding the writes to clients alone: 6,700 →
7,500 requests a second (both sides: 8,500). A loop that is mostly idle sends at once
(`_Outbox`): there a held write would only wait.

Only small writes wait, and only until the end of the step: a write that would take what
waits past HOLD_LIMIT sends it all at once, so flow control (the transport's high-water
mark, which pauses a writer) sees every large body as before. Every write to a connection
must go through its CorkedTransport, or bytes would leave out of order: proxy/connection.py
gives it to aiohttp's request handler as the connection's transport, through which every
writer reaches the client. (`loop.sendfile` does not take it; nothing in servegate sends
files.)
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import weakref
from typing import Any

import structlog

log = structlog.get_logger("servegate.connection")

# Writes up to this many bytes in all wait for the end of the step: asyncio's (and uvloop's)
# default high-water mark, past which a writer is paused anyway.
HOLD_LIMIT = 64 * 1024
# Writes wait only while the loop's thread ran for at least this share of the last WINDOW
# seconds (_Outbox).
BUSY_SHARE = 0.5
WINDOW = 0.01
_NO_EXTRA: dict[str, Any] = {}


class CorkedTransport(asyncio.Transport):
    """An asyncio transport whose small writes leave at the end of the loop's step, in order,
    while the loop is busy.

    Closing sends what waits first; aborting drops it, as it drops the transport's own
    buffer. `get_write_buffer_size` counts what waits. Everything else is the transport's.
    """

    __slots__ = ("_held", "_held_size", "_outbox", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__(_NO_EXTRA)  # get_extra_info asks the transport
        self._transport = transport
        # None while nothing waits: one per connection, and most connections are idle.
        self._held: list[bytes] | None = None
        self._held_size = 0
        self._outbox = _outbox(asyncio.get_running_loop())

    def write(self, data: bytes | bytearray | memoryview) -> None:
        size = data.nbytes if type(data) is memoryview else len(data)
        if not size:
            return
        held = self._held
        if held is None:
            if size > HOLD_LIMIT or not self._outbox.holds(self):
                self._transport.write(data)
                return
            self._held = [_copied(data)]
            self._held_size = size
        elif self._held_size + size > HOLD_LIMIT:
            self.send_held()
            self._transport.write(data)
        else:
            held.append(_copied(data))
            self._held_size += size

    def writelines(self, list_of_data: Any) -> None:
        pieces = list(list_of_data)
        if self._held_size + sum(map(len, pieces)) > HOLD_LIMIT:
            # A large body goes on as the pieces it is in, not copied into one.
            self.send_held()
            self._transport.writelines(pieces)
        else:
            self.write(b"".join(pieces))

    def send_held(self) -> None:
        """Send what waits now (a closed transport drops it, as it drops its own buffer).

        The client connection's protocol calls it as the client's end arrives
        (`eof_received`): the event loop then closes the transport itself, not through this
        wrapper, and an answer held in the same step would be dropped."""
        held = self._held
        if held is None:
            return
        self._held, self._held_size = None, 0
        if self._transport.is_closing():
            return
        self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def write_eof(self) -> None:
        self.send_held()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def close(self) -> None:
        self.send_held()
        self._transport.close()

    def abort(self) -> None:
        self._held, self._held_size = None, 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._held_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()


class _Outbox:
    """The writes of one event loop's step: while the loop is busy, held and sent by one
    callback at the step's end (scheduled with the step's first write, so it runs after every
    callback scheduled before it).

    A loop that is mostly idle sends at once: there, requests come one or a few at a time, no
    peer is saved a wake-up worth the wait, and a held answer would wait for the rest of its
    step's work (measured: +0.18 ms at 500 requests a second, four at a time). Busy means the
    loop's thread ran for at least BUSY_SHARE of the last WINDOW seconds, as its CPU clock
    tells."""

    __slots__ = (
        "__weakref__",
        "_busy",
        "_context",
        "_ending",
        "_held",
        "_window_ran",
        "_window_start",
    )

    def __init__(self) -> None:
        self._held: list[CorkedTransport] = []
        # The step's end runs in a context of its own, not in the request's whose write
        # scheduled it: what it reports belongs to no one request.
        self._context = contextvars.Context()
        self._busy = False
        self._ending = False  # the step's end is scheduled
        self._window_start = time.monotonic()
        self._window_ran = time.thread_time()

    def holds(self, transport: CorkedTransport) -> bool:
        """Whether a write to `transport`, which holds none yet, is to wait for the step's end,
        which then sends it."""
        if not self._ending:
            self._ending = True
            asyncio.get_running_loop().call_soon(self._end_step, context=self._context)
        if self._busy:
            self._held.append(transport)
        return self._busy

    def _end_step(self) -> None:
        self._ending = False
        now = time.monotonic()
        if now - self._window_start >= WINDOW:
            ran = time.thread_time()
            self._busy = ran - self._window_ran >= BUSY_SHARE * (now - self._window_start)
            self._window_start, self._window_ran = now, ran
        held, self._held = self._held, []
        for transport in held:
            try:
                transport.send_held()
            except Exception:  # one broken transport must not keep the rest's writes
                # A bug in servegate, as ingress names one: a write after the connection's end.
                log.exception("servegate.internal_error", detail="sending held writes failed")


_outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Outbox] = (
    weakref.WeakKeyDictionary()
)


def _copied(data: bytes | bytearray | memoryview) -> bytes:
    # asyncio copies what it buffers too: a caller may reuse a bytearray once it returns.
    return data if type(data) is bytes else bytes(data)


def _outbox(loop: asyncio.AbstractEventLoop) -> _Outbox:
    outbox = _outboxes.get(loop)
    if outbox is None:
        outbox = _outboxes[loop] = _Outbox()
    return outbox
