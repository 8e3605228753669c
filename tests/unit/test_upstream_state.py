"""What moves what between the model server's health and the circuit."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry

from proxy.circuit import CircuitState
from proxy.config import CircuitSettings, HealthSettings
from proxy.failures import Cause, Failure
from proxy.health import Health
from proxy.metrics import Metrics
from proxy.upstream_state import UpstreamState

REFUSED = Failure(Cause.CONNECT_REFUSED, "refused", reused=False, request_sent=False)
RESET = Failure(Cause.RESET_DURING_REQUEST, "reset", reused=False, request_sent=True)
DOWN = Failure(Cause.CONNECT_REFUSED, "the check's connect was refused")


def upstream(failure_threshold: int = 2) -> tuple[UpstreamState, CollectorRegistry]:
    registry = CollectorRegistry()
    health = HealthSettings(unhealthy_threshold=1, healthy_threshold=1, interval=3600)
    circuit = CircuitSettings(failure_threshold=failure_threshold, open_seconds=3600)
    return UpstreamState(health, circuit, Metrics(registry, 40.0)), registry


def gauge(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name)


async def check(state: UpstreamState, result: Failure | None) -> None:
    """One health check with `result`, recorded as start-up's first check is."""

    async def one() -> Failure | None:
        return result

    loop = await state.start_checks(one)
    loop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop


async def test_health_down_opens_the_circuit_and_up_lets_requests_try_again() -> None:
    state, registry = upstream()
    await check(state, None)
    assert state.health.state is Health.UP
    assert gauge(registry, "servegate_upstream_up") == 1
    await check(state, DOWN)
    assert state.health.state is Health.DOWN
    assert state.circuit.state is CircuitState.OPEN
    assert gauge(registry, "servegate_upstream_up") == 0
    await check(state, None)
    assert state.circuit.state is CircuitState.HALF_OPEN
    state.attempt_succeeded()
    assert state.circuit.state is CircuitState.CLOSED


async def test_a_passing_check_while_up_reopens_a_circuit_that_refusals_opened() -> None:
    state, _ = upstream()
    await check(state, None)
    state.request_found_unreachable()
    state.request_found_unreachable()
    assert state.circuit.state is CircuitState.OPEN  # between two checks, which never saw it
    await check(state, None)
    assert state.circuit.state is CircuitState.HALF_OPEN


async def test_resets_are_health_evidence_but_never_open_the_circuit() -> None:
    state, registry = upstream(failure_threshold=1)
    await check(state, None)
    for _ in range(3):
        state.attempt_failed(RESET)
        await asyncio.sleep(0.06)  # apart: three restarts, not one worker's resets at once
    assert state.health.state is Health.CRASH_LOOP
    assert gauge(registry, "servegate_upstream_crash_loop") == 1
    assert state.circuit.state is CircuitState.CLOSED


UNHEALTHY = Failure(Cause.UPSTREAM_UNHEALTHY, "/health answered 503")


async def test_a_boot_keeps_the_circuit_closed_while_the_port_refuses_and_no_longer() -> None:
    """Requests wait retry.boot_wait for a booting model server: checks failing on refused
    connects meanwhile mark it down, not the circuit open. Once it takes connections and its
    checks still fail, the boot is over, and the server is down like any other."""
    state, _ = upstream()
    await check(state, None)
    state.health.supervised_exited("exit code 1")
    await check(state, DOWN)
    assert state.health.state is Health.DOWN
    assert state.circuit.state is CircuitState.CLOSED
    await check(state, UNHEALTHY)
    assert not state.health.booting
    assert state.circuit.state is CircuitState.OPEN


async def test_a_boot_that_ends_in_passing_checks_never_opened_the_circuit() -> None:
    state, _ = upstream()
    await check(state, None)
    state.health.supervised_exited("signal SIGKILL")
    await check(state, DOWN)
    await check(state, None)
    assert (state.health.state, state.circuit.state) == (Health.UP, CircuitState.CLOSED)
    assert not state.health.booting


async def test_a_server_unhealthy_when_it_starts_is_down_and_the_circuit_opens() -> None:
    state, _ = upstream()
    state.health.supervised()
    await check(state, UNHEALTHY)
    assert (state.health.state, state.circuit.state) == (Health.DOWN, CircuitState.OPEN)


async def test_boots_that_keep_ending_in_exits_open_the_circuit_at_the_crash_loop() -> None:
    """A model server that exits as it starts is booting forever: each request would wait
    retry.boot_wait, and the circuit would never open."""
    state, _ = upstream()
    await check(state, None)
    state.health.supervised_exited("exit code 1")
    await check(state, DOWN)
    assert state.circuit.state is CircuitState.CLOSED
    state.health.supervised_exited("exit code 1")
    state.health.supervised_exited("exit code 1")
    assert state.health.state is Health.CRASH_LOOP
    assert not state.health.boot_in_progress
    assert state.circuit.state is CircuitState.OPEN


async def test_exits_before_any_check_saw_the_server_are_a_crash_loop_that_opens_the_circuit() -> (
    None
):
    state, _ = upstream()
    state.health.supervised()
    for _ in range(3):
        state.health.supervised_exited("exit code 1")
    assert state.health.state is Health.CRASH_LOOP
    assert state.circuit.state is CircuitState.OPEN
