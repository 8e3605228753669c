"""Upstream health: active checks, restarts seen from outside, and crash loops.

The state machine (unknown, up, down, crash_loop) is fed by health checks and by failures of
real requests. A worker that dies mid-request is a restart even when the server never stops
answering health checks (Gunicorn's master keeps listening while it boots a new worker), so
passive evidence counts too. Restarts close together make a crash loop.

A check's timeout counts only the time servegate's event loop could run (proxy/lag.py): a
check that waited on servegate's own busy loop is inconclusive, and changes no state.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from enum import StrEnum

import aiohttp
import structlog
from yarl import URL

from proxy.config import HealthSettings
from proxy.failures import (
    UNREACHABLE,
    AttemptFacts,
    Category,
    Cause,
    Failure,
    classify,
    connect_failure,
)
from proxy.lag import LoopLag, LoopLagged, ResponsiveTimeout
from proxy.pool import tls_name
from proxy.probe import plain_behind_tls

log = structlog.get_logger("servegate.health")

# A dying worker resets every request it holds at the same instant: resets this close
# together are one restart.
SAME_RESTART_WINDOW = 0.05
# A budget that ran out this soon after a restart is named for the restart.
RECENT_RESTART = 10.0
# A check that cannot get health.timeout of the event loop's time within this many timeouts
# of wall time is inconclusive: servegate was too busy to tell, so the state stays as it was.
CHECK_WALL_FACTOR = 10


class Health(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"
    CRASH_LOOP = "crash_loop"


class Event(StrEnum):
    CHECKS_PASSED = "checks_passed"  # healthy_threshold checks in a row passed
    CHECKS_FAILED = "checks_failed"  # unhealthy_threshold checks in a row failed
    RESTARTS_CLUSTERED = "restarts_clustered"  # crash_loop_restarts within the window
    QUIET = "quiet"  # no restart for a whole window


# (state, event) -> next state; a pair missing from the table leaves the state unchanged.
_TRANSITIONS: dict[tuple[Health, Event], Health] = {
    (Health.UNKNOWN, Event.CHECKS_PASSED): Health.UP,
    (Health.UNKNOWN, Event.CHECKS_FAILED): Health.DOWN,
    (Health.DOWN, Event.CHECKS_PASSED): Health.UP,
    (Health.UP, Event.CHECKS_FAILED): Health.DOWN,
    (Health.UNKNOWN, Event.RESTARTS_CLUSTERED): Health.CRASH_LOOP,
    (Health.UP, Event.RESTARTS_CLUSTERED): Health.CRASH_LOOP,
    (Health.DOWN, Event.RESTARTS_CLUSTERED): Health.CRASH_LOOP,
    (Health.CRASH_LOOP, Event.QUIET): Health.UNKNOWN,  # the next checks say up or down
}

CRASH_LOOP_ADVICE = (
    "the model server keeps restarting: reduce the load (lower admission.max_concurrency, "
    "or add instances) or debug the inference code; its log shows why workers exit"
)


class HealthMonitor:
    def __init__(
        self,
        settings: HealthSettings,
        on_change: Callable[[Health, Health], None],
        on_restart: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        on_inconclusive: Callable[[], None] = lambda: None,
        on_booting: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.state = Health.UNKNOWN
        self._on_change = on_change
        self._on_restart = on_restart
        self._on_inconclusive = on_inconclusive
        self._on_booting = on_booting
        self._clock = clock
        self._passed = 0
        self._failed = 0
        self._ever_up = False
        self._restarts: deque[float] = deque()
        # A request got an answer since the last restart: the server is back, and a budget
        # that runs out now is the prediction's, not the restart's.
        self._answered_since_restart = False
        # A restart of this outage is already counted (from the log, or from refusals): the
        # checks passing again is the same restart, not another.
        self._restart_seen = False
        # Set in supervise mode: the model server's own log counts restarts exactly, so
        # failures of requests are no longer taken as evidence of one.
        self.restarts_from_log = False
        # Set in supervise mode while the model server is (re)starting, until a check finds
        # it taking connections: refused connections are then a boot in progress, worth a
        # longer wait.
        self.booting = False
        # What the last check found wrong in how the server speaks (a certificate servegate
        # cannot verify, a failed handshake): it answers, so it is not down, and not ready.
        self.finding: Failure | None = None
        # Why the last check failed, when it did not answer at all (refused, silent, a name
        # that does not resolve): what /readyz says of a server that is down.
        self.last_failure: Failure | None = None

    # Decisions: plain methods, no I/O.

    def record_check_result(self, failed: Failure | None) -> None:
        """A check's outcome (None: passed). A protocol failure is a finding, not an outage:
        the server answered, so for up and down the check counts as passed."""
        protocol = failed is not None and failed.category is Category.PROTOCOL
        self.finding = failed if protocol else None
        self.last_failure = None if protocol else failed
        if failed is not None and failed.cause not in UNREACHABLE:
            self.booting = False  # it takes connections: started, whatever its checks say
        self.record_check(failed is None or protocol)

    def record_check(self, ok: bool) -> None:
        if ok:
            self.booting = False
        self._expire_restarts()
        self._passed, self._failed = (self._passed + 1, 0) if ok else (0, self._failed + 1)
        if self._passed >= self.settings.healthy_threshold:
            if self.state is Health.DOWN and self._ever_up and not self._restart_seen:
                self.record_restart("health checks passed again")
            if self.state is Health.UP:
                self._restart_seen = False  # up, and seen up since: the next outage is new
            self._apply(Event.CHECKS_PASSED)
        elif self._failed >= self.settings.unhealthy_threshold:
            self._apply(Event.CHECKS_FAILED)

    def record_failure(self, failure: Failure) -> None:
        """Passive evidence from a real request."""
        if self.restarts_from_log:
            return
        if (
            failure.cause is Cause.RESET_DURING_REQUEST
            and failure.reused is False
            and not failure.answer_began
        ):
            # A worker that died on the request. An answer begun and then cut is not counted
            # (a part of its head, an interim 103, a body cut short): a server that frames an
            # answer wrong, or closes after part of it, is up and answering, and calling that a
            # crash loop would fail /readyz for every request.
            now = self._clock()
            if not self._restarts or now - self._restarts[-1] > SAME_RESTART_WINDOW:
                self.record_restart(f"a fresh connection ended before any answer: {failure.detail}")
        elif (
            failure.cause is Cause.CONNECT_REFUSED
            and self.state is Health.UP
            and not self._restart_seen
        ):
            self.record_restart("connections refused after the server was up")

    @property
    def boot_in_progress(self) -> bool:
        """The supervised model server is booting, and not in a crash loop: one that exits
        as it starts, again and again, is no boot worth waiting for."""
        return self.booting and self.state is not Health.CRASH_LOOP

    def restarted_recently(self) -> bool:
        """A restart within RECENT_RESTART seconds, and no answer since."""
        return (
            bool(self._restarts)
            and not self._answered_since_restart
            and self._clock() - self._restarts[-1] < RECENT_RESTART
        )

    def record_answer(self) -> None:
        """A request got the model server's answer (any status)."""
        self._answered_since_restart = True

    def record_restart(self, evidence: str) -> None:
        self._on_restart()
        log.info("upstream.restarted", evidence=evidence)
        self.hear_restart(self._clock())

    def hear_restart(self, at: float) -> None:
        """A restart at `at` (this monitor's clock) that another process counted and logged:
        the --workers parent, which reads the supervised model server's log (proxy/news.py).
        It makes crash loops and recent restarts here as one counted here does."""
        self._restart_seen = True
        self._answered_since_restart = False
        self._restarts.append(at)
        self._expire_restarts()
        if len(self._restarts) >= self.settings.crash_loop_restarts:
            self._apply(Event.RESTARTS_CLUSTERED)

    def recent_restarts(self) -> tuple[float, ...]:
        """When the restarts within health.crash_loop_window were, oldest first."""
        self._expire_restarts()
        return tuple(self._restarts)

    def supervised(self) -> None:
        """The model server is servegate's child (supervise mode), starting now."""
        self.restarts_from_log = True
        self.booting = True
        self._on_booting()

    def supervised_exited(self, reason: str) -> None:
        """The supervised model server exited (`reason`: its exit code or signal): a restart,
        and a boot in progress until a check reaches it again."""
        self.record_restart(f"the supervised model server exited with {reason}")
        self.booting = True
        self._on_booting()

    def _expire_restarts(self) -> None:
        horizon = self._clock() - self.settings.crash_loop_window
        while self._restarts and self._restarts[0] < horizon:
            self._restarts.popleft()
        if not self._restarts:
            self._apply(Event.QUIET)

    def _apply(self, event: Event) -> None:
        state = _TRANSITIONS.get((self.state, event), self.state)
        if state is self.state:
            return
        was, self.state = self.state, state
        if state is Health.UP:
            self._ever_up = True
            self._restart_seen = False
        if state is Health.CRASH_LOOP:
            log.error(
                "upstream.crash_loop",
                restarts=len(self._restarts),
                window_s=self.settings.crash_loop_window,
                advice=CRASH_LOOP_ADVICE,
            )
        else:
            log.info(f"upstream.{state.value}", was=was.value)
        self._on_change(was, state)

    def explain(self, failure: Failure) -> Failure:
        """A service failure during a crash loop is named for the loop, the thing to fix."""
        if failure.cause is Cause.OVERLOADED:
            return failure  # servegate's own shedding or shortage: nothing the model did
        if self.state is Health.CRASH_LOOP and failure.category is not Category.PROTOCOL:
            return failure.as_(Cause.CRASH_LOOP, f"{failure.detail}; {CRASH_LOOP_ADVICE}")
        if failure.category is Category.TIMEOUT and (
            self.state is Health.DOWN or self.restarted_recently()
        ):
            # The budget ran out while the server was restarting: the restart is what to fix.
            detail = f"{failure.detail} while the model server was down or restarting"
            return failure.as_(Cause.UPSTREAM_UNHEALTHY, detail)
        return failure

    # I/O: the check loop.

    async def run(self, check: Callable[[], Awaitable[Failure | None]]) -> None:
        """Check every interval (the first check is the caller's, before traffic starts)."""
        while True:
            await asyncio.sleep(self.settings.interval)
            await self.check_once(check)

    async def check_once(self, check: Callable[[], Awaitable[Failure | None]]) -> None:
        """One check, recorded; one servegate was too busy to judge (LoopLagged) is not."""
        try:
            failed = await check()
        except LoopLagged as lagged:
            self._on_inconclusive()
            log.warning(
                "health.check_inconclusive",
                reason="servegate's event loop was too busy to read the answer",
                waited_s=round(lagged.waited, 3),
                loop_lag_s=round(lagged.lagged, 3),
                state=self.state.value,
            )
            return
        if failed is not None and failed.cause is Cause.OVERLOADED:
            self._on_inconclusive()  # servegate's own descriptors ran out: no word on the model
            log.warning("health.check_inconclusive", reason=failed.detail, state=self.state.value)
            return
        self.record_check_result(failed)


async def check_upstream(
    session: aiohttp.ClientSession,
    host: str,
    port: int,
    scheme: str,
    settings: HealthSettings,
    tls: ssl.SSLContext,
    server_name: str | None = None,
    lag: LoopLag | None = None,
) -> Failure | None:
    """One health check; None when it passed, else the failure, classified.

    GET the health path (2xx passes), or, with none set, open a connection as requests do:
    TCP, plus the TLS handshake with servegate's verification when it speaks HTTPS, so a
    certificate it cannot verify is found before the first request.

    The timeout is `settings.timeout` seconds of the event loop's time (`lag`; None: wall
    time). Raises LoopLagged when CHECK_WALL_FACTOR timeouts of wall time pass before that.
    """
    # Every check opens a connection of its own: a drop on it may be a scheme mismatch, which
    # the caller asks the probe about (`Failure.protocol_suspect`).
    facts = AttemptFacts(scheme=scheme, reused=False)
    within = f"health.timeout ({settings.timeout:g} s)"
    timeout = ResponsiveTimeout(
        settings.timeout, lag or LoopLag(), at_most=settings.timeout * CHECK_WALL_FACTOR
    )
    try:
        async with timeout:
            if settings.path is None:
                context = tls if scheme == "https" else None
                hostname = tls_name(server_name, host) if context else None
                try:
                    _, writer = await asyncio.open_connection(
                        host, port, ssl=context, server_hostname=hostname
                    )
                except OSError as exc:  # refused, a TLS failure, a name without an address
                    return Failure(*connect_failure(exc))
                writer.close()
                await writer.wait_closed()
                return None
            # The path as written, its query too: built as a path, `?` would be encoded.
            origin = URL.build(scheme=scheme, host=host, port=port)
            url = URL(f"{origin}{settings.path}", encoded=True)
            async with session.get(url, server_hostname=server_name) as response:
                await response.read()
                if 200 <= response.status < 300:
                    return None
                detail = f"{settings.path} answered {response.status}"
                return Failure(Cause.UPSTREAM_UNHEALTHY, detail)
    except LoopLagged:
        raise
    except TimeoutError as exc:
        if isinstance(exc, aiohttp.ClientError) or not timeout.expired():
            return classify(exc, facts, deadline_passed=False)
        if settings.path is None:  # the TCP check: the connect (and handshake) never ended
            if scheme == "https" and (plain := await plain_behind_tls(host, port, within)):
                return Failure(Cause.TLS_TO_PLAIN_SERVER, plain)
            return Failure(Cause.CONNECT_TIMEOUT, f"no connection within {within}")
        return Failure(Cause.UPSTREAM_UNHEALTHY, f"GET {settings.path}: no answer within {within}")
    except (aiohttp.ClientError, OSError) as exc:  # ssl.SSLError is an OSError
        return classify(exc, facts, deadline_passed=False)
