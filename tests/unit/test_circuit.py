"""The circuit's states and transitions, on a clock the test owns."""

from __future__ import annotations

from proxy.circuit import Circuit, CircuitState, Signal
from proxy.config import CircuitSettings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def circuit(clock: Clock, seen: list[CircuitState] | None = None) -> Circuit:
    settings = CircuitSettings(failure_threshold=3, wait=2.0, open_seconds=5.0)
    record = seen.append if seen is not None else (lambda _state: None)
    return Circuit(settings, on_change=record, clock=clock)


async def test_consecutive_service_failures_open_it_and_a_success_in_between_resets_them() -> None:
    clock = Clock()
    breaker = circuit(clock)
    for signal in (Signal.SERVICE_FAILURE, Signal.SERVICE_FAILURE, Signal.SUCCESS):
        breaker.signal(signal)
    breaker.signal(Signal.SERVICE_FAILURE)
    breaker.signal(Signal.SERVICE_FAILURE)
    assert breaker.state is CircuitState.CLOSED
    breaker.signal(Signal.SERVICE_FAILURE)
    assert breaker.state is CircuitState.OPEN


async def test_health_opens_it_and_the_first_result_after_recovery_decides() -> None:
    clock = Clock()
    seen: list[CircuitState] = []
    breaker = circuit(clock, seen)
    breaker.signal(Signal.DOWN)
    assert not breaker.admits()
    breaker.signal(Signal.UP)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.admits()
    breaker.signal(Signal.SERVICE_FAILURE)
    assert breaker.state is CircuitState.OPEN
    clock.now += 5.0  # the cool-down lets requests try again without waiting for health
    assert breaker.admits()
    breaker.signal(Signal.SUCCESS)
    assert seen == [
        CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.OPEN,
        CircuitState.HALF_OPEN, CircuitState.CLOSED,
    ]  # fmt: skip


async def test_requests_wait_only_just_after_it_opened_then_fail_fast() -> None:
    clock = Clock()
    breaker = circuit(clock)
    breaker.signal(Signal.DOWN)
    clock.now += 2.5  # longer than circuit.wait after the opening
    assert await breaker.admit(budget=30) is False
    assert breaker.retry_after() == 2.5
