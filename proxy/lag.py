"""servegate's own slowness, told apart from the model server's: a heartbeat on the event loop,
and timeouts that count only the time the loop could run.

A timeout that fires while servegate's one event loop is busy with its own work (a burst of
thousands of requests can keep it busy for seconds) measures servegate, not the server: on
loopback a TCP handshake completes in the kernel within microseconds, and what takes seconds
is the loop getting round to the socket's event. A connect or a health check that "timed out"
then blames a model that is fine, opens the circuit, and fails requests it would have answered.

So those timeouts count *responsive* time: the wall time minus the time the loop ran late.
A heartbeat is scheduled every `TICK`; whenever it runs later than it was due, the loop was
busy (or blocked) for that long, and every waiter in the loop with it. A timeout that reaches
its wall-clock end re-arms itself for the time the loop owed it, and fires once the waited-for
answer had `seconds` of the loop's time in which it could have been read. Measuring this way
needs no guess of a threshold, and a server that really is silent still times out, later by
exactly the time servegate was not listening. The request's own budget stays wall time: the
client's clock is the wall clock, and it bounds every wait anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

TICK = 0.05  # seconds between heartbeats: 20 timer callbacks a second, lateness seen to 50 ms


class LoopLagged(TimeoutError):
    """A timeout reached its wall-clock bound (`at_most`) before the awaited answer had had its
    time of the loop: the outcome says nothing about the server."""

    def __init__(self, waited: float, lagged: float) -> None:
        super().__init__(f"waited {waited:.1f} s, servegate's event loop lagged {lagged:.1f} s")
        self.waited = waited
        self.lagged = lagged


class LoopLag:
    """The event loop's cumulative lateness, from a heartbeat; `start` inside the running loop.

    Unstarted, it reports no lag, so a timeout built on it is a plain wall-clock timeout.
    """

    def __init__(self, tick: float = TICK, on_lag: Callable[[float], None] | None = None) -> None:
        """`on_lag` hears each late heartbeat's lateness, in seconds (for a metric)."""
        self._tick = tick
        self._on_lag = on_lag
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._total = 0.0  # seconds of lateness seen by heartbeats so far
        self._due = 0.0  # when the next heartbeat should run

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._due = self._loop.time() + self._tick
        self._handle = self._loop.call_at(self._due, self._beat)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _beat(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        late = now - self._due
        if late > 0:
            self._total += late
            if self._on_lag is not None:
                self._on_lag(late)
        self._due = now + self._tick
        self._handle = self._loop.call_at(self._due, self._beat)

    def mark(self) -> float:
        """Seconds of lateness so far, including a stall still going on (an overdue beat).
        The difference of two marks is how long the loop lagged between them."""
        if self._loop is None or self._handle is None:
            return 0.0
        return self._total + max(0.0, self._loop.time() - self._due)


class ResponsiveTimeout:
    """`async with ResponsiveTimeout(seconds, lag):` is `asyncio.timeout(seconds)` counting
    only the time the loop could run: on expiry the body is cancelled and TimeoutError raised.

    `at_most`: a wall-clock bound (seconds); reaching it before `seconds` of responsive time
    raises LoopLagged instead, an inconclusive outcome. None: no bound but the caller's.
    """

    def __init__(self, seconds: float, lag: LoopLag, at_most: float | None = None) -> None:
        self._seconds = seconds
        self._lag = lag
        self._at_most = at_most
        self._scope = asyncio.timeout(None)
        self._timer: asyncio.TimerHandle | None = None
        self._began = 0.0
        self._mark = 0.0
        self._lagged_out: LoopLagged | None = None

    async def __aenter__(self) -> ResponsiveTimeout:
        await self._scope.__aenter__()
        loop = asyncio.get_running_loop()
        self._began, self._mark = loop.time(), self._lag.mark()
        self._timer = loop.call_at(self._began + self._seconds, self._check)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
        try:
            await self._scope.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            if self._lagged_out is not None:
                raise self._lagged_out from None
            raise

    def expired(self) -> bool:
        return self._scope.expired()

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        waited = now - self._began
        lagged = self._lag.mark() - self._mark
        owed = self._seconds - (waited - lagged)
        if owed <= 0:
            self._scope.reschedule(now)  # expires at once: the server had its time
            return
        if self._at_most is not None and waited >= self._at_most:
            self._lagged_out = LoopLagged(waited, lagged)
            self._scope.reschedule(now)
            return
        until = now + owed
        if self._at_most is not None:
            until = min(until, self._began + self._at_most)
        self._timer = loop.call_at(until, self._check)
