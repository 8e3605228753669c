"""Admission control: at most `max_concurrency` requests at the model server, a bounded queue
behind them, and an immediate 429 beyond it — the platform's advice to "reduce the number of
prediction requests", done before the model falls over instead of after.

Waiting in the queue draws on the request's budget like everything else.
"""

from __future__ import annotations

import asyncio
from collections import deque

from proxy.config import AdmissionSettings
from proxy.metrics import Metrics, ShedReason


class QueueFull(Exception):
    """The queue is full: the request is shed."""


class Admission:
    def __init__(self, settings: AdmissionSettings, metrics: Metrics) -> None:
        self.settings = settings
        self._metrics = metrics
        self._busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limited(self) -> bool:
        return self.settings.max_concurrency > 0

    async def enter(self, wait: float) -> bool:
        """Take a slot, waiting up to `wait` seconds; False when the wait ran out.

        Raises QueueFull at once when no slot is free and the queue is full.
        """
        if not self.limited or (self._busy < self.settings.max_concurrency and not self._waiters):
            self._busy += 1
            return True
        if len(self._waiters) >= self.settings.max_queue:
            self._metrics.shed.labels(ShedReason.QUEUE_FULL).inc()
            raise QueueFull
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._metrics.queue_depth.set(len(self._waiters))
        admitted = False
        try:
            async with asyncio.timeout(wait):
                await waiter  # `leave` hands its slot over by resolving this future
            admitted = True
            return True
        except TimeoutError:
            return False
        finally:
            if waiter in self._waiters:  # timed out or cancelled before a slot came
                self._waiters.remove(waiter)
            elif not admitted and waiter.done() and not waiter.cancelled():
                self.leave()  # a slot arrived just as the wait ended: pass it on
            self._metrics.queue_depth.set(len(self._waiters))

    def leave(self) -> None:
        """Give the slot to the longest waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; _busy stays the same
                return
        self._busy -= 1
