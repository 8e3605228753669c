"""The circuit breaker: stop sending requests to a model server that is known to be down.

Closed: traffic flows. Open: the server is down (health checks say so, or refused connects came
one after another); every request fails fast, including those already backing off between
attempts, unless circuit.wait lets new ones wait briefly. Half-open: the server may be back (or
the cool-down ended); a request that tries it decides between closed and open again, and one
that fails reopens the circuit, so that trial makes one attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from enum import IntEnum

import structlog

from proxy.config import CircuitSettings

log = structlog.get_logger("servegate.circuit")


class CircuitState(IntEnum):
    """Values are those of the servegate_circuit_state gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Signal(IntEnum):
    SERVICE_FAILURE = 0  # an attempt failed in the service category
    SUCCESS = 1  # a response arrived
    DOWN = 2  # health checks declared the server down
    UP = 3  # health checks declared the server up
    COOL_DOWN_OVER = 4  # open for circuit.open_seconds: time to try again


# (state, signal) -> next state; a pair missing from the table leaves the state unchanged.
_TRANSITIONS: dict[tuple[CircuitState, Signal], CircuitState] = {
    (CircuitState.CLOSED, Signal.DOWN): CircuitState.OPEN,
    (CircuitState.OPEN, Signal.UP): CircuitState.HALF_OPEN,
    (CircuitState.OPEN, Signal.COOL_DOWN_OVER): CircuitState.HALF_OPEN,
    (CircuitState.HALF_OPEN, Signal.SUCCESS): CircuitState.CLOSED,
    (CircuitState.HALF_OPEN, Signal.SERVICE_FAILURE): CircuitState.OPEN,
    (CircuitState.HALF_OPEN, Signal.DOWN): CircuitState.OPEN,
}

# By module name: every request reads them (why: framing._HEAD).
_CLOSED, _HALF_OPEN, _OPEN = CircuitState.CLOSED, CircuitState.HALF_OPEN, CircuitState.OPEN
_SERVICE_FAILURE, _SUCCESS, _DOWN = Signal.SERVICE_FAILURE, Signal.SUCCESS, Signal.DOWN
_COOL_DOWN_OVER = Signal.COOL_DOWN_OVER


class Circuit:
    def __init__(
        self,
        settings: CircuitSettings,
        on_change: Callable[[CircuitState], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.state = _CLOSED
        self._on_change = on_change
        self._clock = clock
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._changed = asyncio.Event()
        on_change(self.state)

    def signal(self, signal: Signal) -> None:
        if signal is _SERVICE_FAILURE and self.state is _CLOSED:
            self._consecutive_failures += 1
            if self._consecutive_failures < self.settings.failure_threshold:
                return
            signal = _DOWN
        if signal is _SUCCESS:
            self._consecutive_failures = 0
        self._move(_TRANSITIONS.get((self.state, signal), self.state), signal)

    def _move(self, state: CircuitState, cause: Signal) -> None:
        if state is self.state:
            return
        log.warning(f"circuit.{state.name.lower()}", was=self.state.name.lower(), on=cause.name)
        self.state = state
        self._consecutive_failures = 0
        if state is _OPEN:
            self._opened_at = self._clock()
        self._on_change(state)
        self._changed.set()
        self._changed = asyncio.Event()

    def admits(self) -> bool:
        """Whether a request may go to the model server now."""
        if self.state is _OPEN and self.retry_after() <= 0:
            self.signal(_COOL_DOWN_OVER)
        return self.state is not _OPEN

    async def admit(self, budget: float) -> bool:
        """Admit now, or wait for the circuit to let the request through.

        Requests that arrive just as the circuit opens wait up to circuit.wait after the
        opening (a restart is often that short); later ones fail fast. None waits longer than
        `budget` seconds.
        """
        deadline = min(self._clock() + budget, self._opened_at + self.settings.wait)
        while not self.admits():
            left = deadline - self._clock()
            if left <= 0:
                return False
            try:
                async with asyncio.timeout(min(left, max(self.retry_after(), 0.001))):
                    await self._changed.wait()
            except TimeoutError:
                pass
        return True

    @property
    def open(self) -> bool:
        """Open now (a cool-down that ended is noticed only by the next `admits`)."""
        return self.state is _OPEN

    async def opens_within(self, seconds: float) -> bool:
        """A backoff: sleep `seconds`, or less when the circuit opens; True when it is open."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not self.open:
                    await self._changed.wait()
        return self.open

    def retry_after(self) -> float:
        """Seconds until an open circuit lets requests try again (for Retry-After)."""
        if self.state is not _OPEN:
            return 0.0
        return max(0.0, self.settings.open_seconds - (self._clock() - self._opened_at))
