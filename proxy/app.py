"""Composition root: builds the request path's stages in order, binds the ports, and stops
gracefully: not ready at once, still serving for server.shutdown_quiet seconds so load balancers
see it, then no longer accepting, and in-flight requests finish within the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import random
import signal
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy import aiohttp_internals
from proxy.admin import Readiness, admin_routes, admin_runner
from proxy.admission import Admission
from proxy.body import BufferPool
from proxy.config import Settings, effective, split_address
from proxy.data_server import JsonErrorServer, server_options
from proxy.failures import Failure
from proxy.forward import Forwarder
from proxy.headers import install_byte_exact_writer
from proxy.health import check_upstream
from proxy.ingress import Ingress
from proxy.lag import LoopLag
from proxy.listener import ADMIN_LIMIT, SniffingSite, admin_limits
from proxy.metrics import Metrics
from proxy.probe import SchemeProbe
from proxy.tls import CertificateError
from proxy.upstream import TLSFilesError, Upstream
from proxy.upstream_state import UpstreamState

log = structlog.get_logger("servegate")

# Each request in flight keeps a few hundred objects alive (aiohttp's request, response, parser
# and streams on both sides). With CPython's default first-generation threshold (700) a burst
# of thousands of requests starts a collection every few requests, and the older generations'
# collections scan everything held. Measured with 5,000 requests held at once: answered in 26 s
# instead of 32-39 s (docs/benchmarks.md). Full collections still run, every 400 young ones.
GC_THRESHOLDS = (20_000, 20, 20)


class StartupError(Exception):
    """servegate cannot start; the message is the one line the operator needs."""


class Servegate:
    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry, settings.budget.seconds)
        self._rng = rng or random.Random()
        self._probe = SchemeProbe(settings.upstream, self.metrics)
        self.state = UpstreamState(settings.health, settings.circuit, self.metrics)
        self.circuit, self.health = self.state.circuit, self.state.health
        self.lag = LoopLag(on_lag=self.metrics.loop_lag.inc)
        self.admission = Admission(settings.admission, self.metrics)
        self.readiness = Readiness(self._probe, self.health, self.circuit)
        self._upstream: Upstream | None = None
        self._checks: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._runners: list[web.BaseRunner] = []
        self.data_port = 0
        self.admin_port = 0

    @property
    def upstream(self) -> Upstream | None:
        """The model server's connection pools (proxy/upstream.py); None until started."""
        return self._upstream

    async def start(self) -> None:
        try:
            await aiohttp_internals.check()
        except aiohttp_internals.MissingInternal as exc:
            raise StartupError(str(exc)) from None
        install_byte_exact_writer()  # obs-text and raw target bytes pass byte for byte
        try:
            self._upstream = Upstream(
                self.settings.upstream, self.metrics.record_failed_attempt, self.lag
            )
        except TLSFilesError as exc:
            raise StartupError(str(exc)) from None
        self.lag.start()
        forwarder = Forwarder(
            self._upstream,
            self._probe,
            self.state,
            self.settings.retry,
            self.metrics,
            self._rng,
        )
        bodies = BufferPool(self.settings.retry.replay_buffer_total_bytes, self.metrics)
        self.metrics.body_buffer_limit.set(bodies.limit)
        ingress = Ingress(
            self.settings,
            forwarder,
            self.admission,
            self.circuit,
            self.metrics,
            bodies,
            self.readiness,
        )
        data_server = JsonErrorServer(
            ingress.handle,
            on_rejected=lambda status: self.metrics.requests_rejected.labels(str(status)).inc(),
            keepalive_timeout=self.settings.server.client_keepalive,
            # A client that hangs up cancels its upstream request instead of leaving the model
            # working for nobody.
            handler_cancellation=True,
            access_log=None,  # servegate writes its own access line, with the 4503 fields
            **server_options(self.settings.server),
        )
        grace = self.settings.budget.seconds
        self.data_port = await self._bind(
            web.ServerRunner(data_server, shutdown_timeout=grace),
            self.settings.server.listen,
            # Always sniffed, even with tls off: a plain port can then name an HTTPS client.
            partial(SniffingSite, settings=self.settings.server, metrics=self.metrics),
        )
        admin = admin_routes(self.registry, self.readiness)
        self.admin_port = await self._bind(  # the data port's listener, for its limits
            admin_runner(admin, self.settings.server),
            self.settings.server.admin_listen,
            partial(
                SniffingSite,
                settings=admin_limits(self.settings.server),
                metrics=self.metrics.admin,
                limit_name=ADMIN_LIMIT,
            ),
        )
        await self._probe.detect()
        await self._start_health_checks()
        if origin_uses_unverified_tls(self.settings):
            log.warning(
                "upstream.tls_verification_disabled",
                message="upstream.tls.verify is false: the model server's identity is NOT checked",
            )
        log.info(
            "servegate.started",
            data_port=self.data_port,
            admin_port=self.admin_port,
            settings=effective(self.settings),
        )

    async def _bind(
        self,
        runner: web.BaseRunner,
        address: str,
        site: Callable[[web.BaseRunner, str, int], web.TCPSite | SniffingSite] = web.TCPSite,
    ) -> int:
        host, port = split_address(address)
        await runner.setup()
        self._runners.append(runner)
        bound = site(runner, host, port)
        try:
            await bound.start()
        except CertificateError as exc:
            await self.stop()
            raise StartupError(str(exc)) from None
        except OSError as exc:
            await self.stop()
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise StartupError(f"cannot listen on {address}: {reason}") from None
        return bound.port

    async def _start_health_checks(self) -> None:
        # Separate one-shot connections: a check must not take or keep a pooled connection.
        assert self._upstream is not None  # started first
        tls = self._upstream.tls_context
        self._checks = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, ssl=tls), trust_env=False
        )
        checks = self._checks

        async def check() -> Failure | None:
            began, spoke = time.monotonic(), self._probe.speaking
            failed = await check_upstream(
                checks, self._probe.host, self._probe.port, spoke,
                self.settings.health, tls, self.settings.upstream.tls.server_name, self.lag,
            )  # fmt: skip
            if failed is None:
                return None
            # A check that meets the other scheme asks the probe, as a request does: with
            # upstream.scheme: auto the next check speaks what the server speaks now. Without
            # it, a model restarted in the other scheme while no request came stayed unready,
            # and so got no request to trigger the probe.
            left = self.settings.health.timeout - (time.monotonic() - began)
            return await self._probe.confirm(failed, spoke, began, left)

        self._health_task = await self.state.start_checks(check)  # the first verdict is known

    async def stop(self, quiet: float = 0.0) -> None:
        """Fail /readyz, keep serving for `quiet` seconds, then stop accepting and drain."""
        self.readiness.shutting_down = True
        if quiet > 0:
            log.info("servegate.quiet_period", quiet_s=quiet)
            await asyncio.sleep(quiet)
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        if self._checks is not None:
            await self._checks.close()
            self._checks = None
        if self._upstream is not None:
            await self._upstream.close()
            self._upstream = None
        self.lag.stop()


def origin_uses_unverified_tls(settings: Settings) -> bool:
    may_speak_tls = settings.upstream.origin.scheme == "https" or settings.upstream.scheme == "auto"
    return may_speak_tls and not settings.upstream.tls.verify


async def serve(
    settings: Settings,
    command: tuple[str, ...] = (),
    on_started: Callable[[Servegate], None] | None = None,
    *,
    worker: bool = False,
    parent_supervises: bool = False,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; a second signal stops at once.

    With a `command` (supervise mode) the model server is servegate's child: started first, so
    it boots meanwhile, and stopped last, once servegate has stopped accepting and drained.
    A `worker` of `servegate run --workers` drains on any number of signals: one may come
    from its parent and one from the terminal's process group (Ctrl-C), and the parent alone
    decides to stop at once (it kills its workers then). When its parent supervises the model
    server (`parent_supervises`), it counts no restarts and hears of them (proxy/news.py).
    """
    from proxy.supervise import Supervisor  # supervise mode only

    stop, at_once = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:  # a second signal: the operator will not wait for the drain
        (at_once if stop.is_set() and not worker else stop).set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # before the child exists: it is never orphaned
        loop.add_signal_handler(signum, on_signal)
    gate = Servegate(settings)
    if parent_supervises:
        # As in supervise mode: the model server may be booting until a check reaches it.
        gate.health.supervised()
    supervisor = None
    if command:
        supervisor = Supervisor(command, gate.health, gate.metrics, settings.budget.seconds)
        try:
            await supervisor.start()
        except OSError as exc:
            raise StartupError(
                f"cannot start the model server: {command[0]}: {exc.strerror or exc}"
            ) from None
    try:
        if supervisor is not None:
            origin = settings.upstream.origin
            assert origin.host is not None  # checked by config
            assert origin.port is not None
            await supervisor.wait_listening(origin.host, origin.port)
        await gate.start()
        gc.freeze()  # what start-up built lives as long as the process: never scanned again
        gc.set_threshold(*GC_THRESHOLDS)
        if on_started is not None:  # a worker tells its parent (proxy/workers.py) where it is
            on_started(gate)
        await stop.wait()
        quiet = settings.server.shutdown_quiet
        log.info("servegate.stopping", quiet_s=quiet, grace_s=settings.budget.seconds)
        await stop_unless_hurried(gate.stop(quiet), at_once)
    except Hurried:
        log.warning("servegate.stopped_at_once", reason="a second stop signal", exit_code=1)
        if supervisor is not None:
            supervisor.kill()
        raise SystemExit(1) from None
    finally:
        if supervisor is not None and not at_once.is_set():
            await supervisor.stop()
    log.info("servegate.stopped")


class Hurried(Exception):
    """A second stop signal arrived while servegate was stopping gracefully."""


async def stop_unless_hurried(stopping: Coroutine[Any, Any, None], at_once: asyncio.Event) -> None:
    """Run `stopping` to its end, or raise Hurried once `at_once` is set (the graceful stop is
    cancelled)."""
    graceful = asyncio.ensure_future(stopping)
    hurried = asyncio.ensure_future(at_once.wait())
    await asyncio.wait((graceful, hurried), return_when=asyncio.FIRST_COMPLETED)
    if not graceful.done():
        graceful.cancel()
        raise Hurried
    hurried.cancel()
    graceful.result()
