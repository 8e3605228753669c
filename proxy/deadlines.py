"""Deadlines of many concurrent attempts on one timer.

`asyncio.timeout` arms an event-loop timer per scope; on uvloop each is a libuv timer,
allocated, started, stopped and closed again, which cost about 4 % of servegate's CPU per
request although nearly every deadline is cancelled unfired (the answer came first). Here the
deadlines wait in one heap and one timer wakes for the earliest, at most every `resolution`
seconds: a scope costs a heap push, and a deadline passes at most `resolution` late.

Only the attempts, which every request makes, use it; the waits only some requests make (a
body still arriving, an answer streamed to the client, an upgrade's handshake) keep
`asyncio.timeout`, whose one timer each costs nothing that matters there.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from enum import Enum
from types import TracebackType

RESOLUTION = 0.01  # seconds a deadline may pass late: nothing servegate times is that short


class _State(Enum):
    WAITING = "waiting"
    EXPIRED = "expired"  # the task was cancelled for it
    EXITED = "exited"


# By module name: each attempt reads them (why: framing._HEAD).
_WAITING, _EXPIRED, _EXITED = _State.WAITING, _State.EXPIRED, _State.EXITED


class Deadline:
    """`async with deadlines.scope(delay)`: as `asyncio.timeout(delay)`, the block is cancelled
    when `delay` seconds have passed and the cancellation leaves it as TimeoutError; a
    cancellation from elsewhere (the client hung up) stays one."""

    __slots__ = ("_cancelling", "_deadlines", "_state", "_task", "when")

    def __init__(self, deadlines: Deadlines, when: float) -> None:
        self._deadlines = deadlines
        self.when = when  # in the loop's clock
        self._state = _WAITING
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0

    def expired(self) -> bool:
        """Whether the deadline passed while the block ran (and so cancelled it)."""
        return self._state is _EXPIRED

    @property
    def pending(self) -> bool:
        """Still in its block, before its deadline."""
        return self._state is _WAITING

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._deadlines.add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None  # a left scope may wait in the heap a while
        if self._state is _EXPIRED:
            assert task is not None
            # As asyncio.timeout: only the cancellation this deadline made becomes TimeoutError.
            if task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
            return
        self._state = _EXITED
        self._deadlines.left()

    def expire(self) -> None:
        """The deadline passed: cancel the block."""
        if self._state is _WAITING and self._task is not None:
            self._state = _EXPIRED
            self._task.cancel()


class Deadlines:
    """The deadlines of one event loop's attempts; `resolution`: seconds a deadline may pass
    late, and the shortest time between two wake-ups of the timer."""

    def __init__(self, resolution: float = RESOLUTION) -> None:
        self._resolution = resolution
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()  # ties in `when` never compare two Deadlines
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._exited = 0  # scopes left but still in the heap

    def scope(self, delay: float) -> Deadline:
        """A deadline `delay` seconds from now (0 or less: at the next wake-up)."""
        return Deadline(self, asyncio.get_running_loop().time() + delay)

    def add(self, deadline: Deadline) -> None:
        heapq.heappush(self._heap, (deadline.when, next(self._order), deadline))
        if deadline.when < self._timer_at:
            self._arm(deadline.when)

    def left(self) -> None:
        """A scope was left before its deadline: it stays in the heap until it surfaces, unless
        left scopes outnumber the waiting ones, when the heap is rebuilt without them."""
        self._exited += 1
        if self._exited > 1024 and self._exited * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2].pending]
            heapq.heapify(self._heap)
            self._exited = 0

    @property
    def waiting(self) -> int:
        """How many scopes wait for their deadline now."""
        return len(self._heap) - self._exited

    @property
    def entries(self) -> int:
        """Scopes in the heap, waiting or left: never much more than twice the waiting ones,
        or 1,024."""
        return len(self._heap)

    def _arm(self, when: float) -> None:
        loop = asyncio.get_running_loop()
        when = max(when, loop.time() + self._resolution)
        if self._timer is not None:
            if when >= self._timer_at - self._resolution:
                return  # the armed wake-up comes soon enough
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._wake)

    def _wake(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = asyncio.get_running_loop().time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline = heapq.heappop(heap)[2]
            if deadline.pending:
                deadline.expire()
            else:
                self._exited -= 1
        while heap and not heap[0][2].pending:
            heapq.heappop(heap)
            self._exited -= 1
        if heap:
            self._arm(heap[0][0])
