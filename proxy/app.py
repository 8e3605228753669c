"""Composition root: builds the request path's stages in order, binds the ports, and stops
gracefully (not ready at once, stop accepting, let in-flight requests finish within the budget).
"""

from __future__ import annotations

import asyncio
import errno
import random
import signal
from collections.abc import Callable
from functools import partial

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.admin import Readiness, admin_app
from proxy.config import Settings, effective, split_address
from proxy.forward import Forwarder
from proxy.ingress import Ingress
from proxy.listener import CertificateError, SniffingSite
from proxy.metrics import Metrics
from proxy.probe import SchemeProbe
from proxy.upstream import Upstream

log = structlog.get_logger("servegate")


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
        self.readiness = Readiness(self._probe)
        self._upstream: Upstream | None = None
        self._runners: list[web.BaseRunner] = []
        self.data_port = 0
        self.admin_port = 0

    async def start(self) -> None:
        self._upstream = Upstream(self.settings.upstream)
        ingress = Ingress(
            self.settings,
            Forwarder(self._upstream, self._probe, self.settings.retry, self.metrics, self._rng),
            self.metrics,
        )
        data_server = web.Server(
            ingress.handle,
            keepalive_timeout=self.settings.server.client_keepalive,
            # A client that hangs up cancels its upstream request instead of leaving the model
            # working for nobody.
            handler_cancellation=True,
            access_log=None,  # servegate writes its own access line, with the 4503 fields
        )
        grace = self.settings.budget.seconds
        self.data_port = await self._bind(
            web.ServerRunner(data_server, shutdown_timeout=grace),
            self.settings.server.listen,
            # Always sniffed, even with tls off: a plain port can then name an HTTPS client.
            partial(
                SniffingSite,
                settings=self.settings.server,
                on_mismatch=self.metrics.record_listener_mismatch,
            ),
        )
        admin = admin_app(self.registry, self.readiness)
        self.admin_port = await self._bind(
            web.AppRunner(admin, access_log=None, shutdown_timeout=1.0),
            self.settings.server.admin_listen,
        )
        await self._probe.detect()
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
        site: Callable[[web.BaseRunner, str, int], web.BaseSite] = web.TCPSite,
    ) -> int:
        host, port = split_address(address)
        await runner.setup()
        self._runners.append(runner)
        try:
            await site(runner, host, port).start()
        except CertificateError as exc:
            await self.stop()
            raise StartupError(str(exc)) from None
        except OSError as exc:
            await self.stop()
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise StartupError(f"cannot listen on {address}: {reason}") from None
        return int(runner.addresses[0][1])

    async def stop(self) -> None:
        self.readiness.shutting_down = True
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []
        if self._upstream is not None:
            await self._upstream.close()
            self._upstream = None


def origin_uses_unverified_tls(settings: Settings) -> bool:
    may_speak_tls = settings.upstream.origin.scheme == "https" or settings.upstream.scheme == "auto"
    return may_speak_tls and not settings.upstream.tls.verify


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    gate = Servegate(settings)
    await gate.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("servegate.stopping", grace_s=settings.budget.seconds)
    await gate.stop()
    log.info("servegate.stopped")
