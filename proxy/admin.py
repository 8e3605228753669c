"""The admin port: /metrics, /healthz, /readyz — apart from the data port, so no model route
can shadow them and no client of the model can reach them by accident."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy import answer, request_ids
from proxy.answer import hint_for
from proxy.circuit import Circuit
from proxy.config import ServerSettings
from proxy.data_server import HEADER_FIELD_TOO_LONG, JsonErrorServer, server_options
from proxy.headers import longer_field
from proxy.health import CRASH_LOOP_ADVICE, Health, HealthMonitor
from proxy.probe import SchemeProbe

MISMATCH_RECHECK = 5.0  # seconds a probe's finding stands for readiness while it is a mismatch


@dataclass
class Readiness:
    """What /readyz reports; `shutting_down` flips the moment a stop signal arrives."""

    scheme: SchemeProbe
    health: HealthMonitor
    circuit: Circuit
    shutting_down: bool = False

    async def check(self) -> str | None:
        """None when ready, else the reason in a sentence."""
        if self.shutting_down:
            return "servegate is shutting down"
        where = f"{self.scheme.host}:{self.scheme.port}"
        if self.health.state is Health.CRASH_LOOP:
            return f"the model server at {where} is in a crash loop: {CRASH_LOOP_ADVICE}"
        if (finding := self.health.finding) is not None:  # it answers, in a way that fails
            named = f"{finding.category}/{finding.cause}"
            return f"the model server at {where} fails health checks with {named}: " + hint_for(
                finding
            )
        if self.health.state is not Health.UP:
            reason = f"the model server at {where} is {self.health.state}: health checks fail"
            if (failed := self.health.last_failure) is not None:
                reason += f" ({failed.category}/{failed.cause}: {failed.detail})"
            return reason
        if self.circuit.open and (wait := self.circuit.retry_after()) > 0:
            # Requests found it unreachable before the next health check did, and fail fast
            # for the circuit's cool-down: the load balancer should send none meanwhile. Only
            # then: were the pod unready until a request closed the circuit, none would come.
            return (
                f"the model server at {where} takes no connections: requests that could not "
                f"connect opened the circuit; it is tried again in {wait:.1f} s"
            )
        if self.scheme.mismatch():  # a fixed server is ready again within seconds
            await self.scheme.detect(since=time.monotonic() - MISMATCH_RECHECK)
        return self.scheme.mismatch()


AdminHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def admin_runner(routes: Mapping[str, AdminHandler], settings: ServerSettings) -> web.ServerRunner:
    """The admin port's server: `routes` by path, for GET and HEAD, on the data port's request
    handling and its head limits (server.max_request_line_bytes, max_header_bytes,
    max_headers): a request it cannot parse gets the data port's JSON answer (400, 414, 431),
    not aiohttp's plain text quoting the client's bytes and an error logged with its
    traceback."""
    paths = ", ".join(routes)

    async def route(request: web.BaseRequest) -> web.StreamResponse:
        if longer_field(request.raw_headers, settings.max_header_bytes):  # as ingress does
            why = HEADER_FIELD_TOO_LONG.format(settings.max_header_bytes)
            return answer.bad_request(why, request_ids.new(), 431)
        handler = routes.get(request.path)
        if handler is None:
            return answer.bad_request(f"the admin port serves {paths}", request_ids.new(), 404)
        if request.method not in ("GET", "HEAD"):
            refused = answer.bad_request(
                "the admin port answers GET and HEAD", request_ids.new(), 405
            )
            refused.headers["Allow"] = "GET, HEAD"
            return refused
        return await handler(request)

    server = JsonErrorServer(route, access_log=None, **server_options(settings))
    return web.ServerRunner(server, shutdown_timeout=1.0)


def admin_routes(registry: CollectorRegistry, readiness: Readiness) -> dict[str, AdminHandler]:
    async def metrics(_request: web.BaseRequest) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(_request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.BaseRequest) -> web.Response:
        reason = await readiness.check()
        if reason is None:
            return web.json_response({"status": "ready"})
        return web.Response(
            status=503,
            body=json.dumps({"status": "not_ready", "reason": reason}).encode(),
            content_type="application/json",
        )

    return {"/metrics": metrics, "/healthz": healthz, "/readyz": readyz}
