"""The model server as servegate sees it: its health and the circuit, and what moves what.

health.py (unknown, up, down, crash loop) and circuit.py (closed, half-open, open) each keep
their own state machine and know nothing of each other; the wiring between them, and what the
checks and the requests tell each, is here: health going up or down signals the circuit, a
passing check while up lets requests try again, a request that got an answer closes a half-open
circuit, and a failed attempt is evidence for both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from proxy.circuit import Circuit, CircuitState, Signal
from proxy.config import CircuitSettings, HealthSettings
from proxy.failures import UNREACHABLE, Category, Cause, Failure
from proxy.health import Health, HealthMonitor
from proxy.metrics import Metrics

# One health check: None when it passed, else the failure, classified (health.check_upstream).
Check = Callable[[], Awaitable[Failure | None]]


class UpstreamState:
    """The model server's health and the circuit in front of it, wired together; both are
    exposed for what only reads them (admission, retry decisions, /readyz)."""

    def __init__(self, health: HealthSettings, circuit: CircuitSettings, metrics: Metrics) -> None:
        self._metrics = metrics
        self.circuit = Circuit(circuit, on_change=metrics.circuit_state.set)
        self.health = HealthMonitor(
            health,
            self._health_changed,
            metrics.upstream_restarts.inc,
            on_inconclusive=metrics.checks_inconclusive.inc,
        )
        # The last failure to reach the server, or health check failed: what an open circuit's
        # answer names, since "down" alone does not say what to fix.
        self._last_down: Failure | None = None

    async def start_checks(self, check: Check) -> asyncio.Task[None]:
        """Run the first check now, so its verdict is known when this returns, then one every
        health.interval in the task returned (the caller cancels it)."""
        checked = self._checked(check)
        await self.health.check_once(checked)
        return asyncio.create_task(self.health.run(checked))

    def attempt_succeeded(self) -> None:
        """An attempt got the model's answer (any status)."""
        self.health.record_answer()
        self.circuit.signal(Signal.SUCCESS)

    def attempt_failed(self, failure: Failure) -> None:
        """An attempt failed with `failure`, classified and confirmed."""
        if failure.category is Category.SERVICE:
            self.health.record_failure(failure)
        if failure.cause in UNREACHABLE:
            self._last_down = failure
            if self.circuit.state is CircuitState.HALF_OPEN:
                self.circuit.signal(Signal.SERVICE_FAILURE)  # the trial failed: open again

    def request_found_unreachable(self) -> None:
        """A request gave up on a server it could not reach (refused, timed-out or
        unresolvable connects) for its whole retry.connect_wait. It counts once towards
        opening the circuit, however often it retried, and only then: a restart shorter than
        that wait is ridden out by every request in flight, as the settings promise. Only a
        server that takes no connection opens it: resets come from workers dying behind a
        master that still serves, and shedding all traffic then would fail requests the next
        worker could answer."""
        self.circuit.signal(Signal.SERVICE_FAILURE)

    def why_open(self) -> str:
        """What opened the circuit, as far as servegate saw it, for an open circuit's answer."""
        last = self._last_down
        if last is None:
            return "the model server is down"
        return f"the last failure seen was {last.cause}: {last.detail}"

    def _checked(self, check: Check) -> Check:
        async def checked() -> Failure | None:
            failed = await check()
            if failed is not None:
                self._last_down = failed
            if failed is None and self.health.state is Health.UP:
                # The circuit may have opened on refusals the checks never saw (a restart
                # between two checks): a passing check lets requests try again.
                self.circuit.signal(Signal.UP)
            elif self._booted_down(failed):
                self.circuit.signal(Signal.DOWN)  # kept closed for the boot, which is over
            return failed

        return checked

    def _booted_down(self, failed: Failure | None) -> bool:
        """Down during a boot, and now taking connections while its checks still fail: the
        boot is over (the check ends it), and the server is down."""
        if failed is None or failed.category is not Category.SERVICE:
            return False  # passed, or a finding on how it speaks: not down
        taking = failed.cause not in UNREACHABLE and failed.cause is not Cause.OVERLOADED
        return taking and self.health.boot_in_progress and self.health.state is Health.DOWN

    def _health_changed(self, was: Health, now: Health) -> None:
        self._metrics.upstream_up.set(now is Health.UP)
        self._metrics.crash_loop.set(now is Health.CRASH_LOOP)
        if now is Health.UP:
            self.circuit.signal(Signal.UP)
        elif now is Health.DOWN and not self.health.boot_in_progress:
            # Down while the supervised model server boots (its port refusing) is no outage
            # to fail fast on: requests wait for it, up to retry.boot_wait, as the settings
            # promise. A boot that takes longer opens the circuit as any refusals do
            # (request_found_unreachable); one that ends with failing checks, at that check.
            self.circuit.signal(Signal.DOWN)
        elif now is Health.CRASH_LOOP and (was is Health.DOWN or self.health.booting):
            # Boots that keep ending in exits (down between them, or never seen up): the
            # circuit kept closed for a boot opens now (open already, this changes nothing).
            self.circuit.signal(Signal.DOWN)
