"""The connection pool to the model server and one attempt on it.

Each attempt reports whether it used a pooled (reused) or a fresh connection, how long a fresh
one took, and whether its request left servegate, and on a reused connection how much of the
request the server's TCP acknowledged (proxy/acked.py): the facts `failures.classify` needs.
They are learnt where aiohttp already calls servegate's code (its connector, its request
class), not through its trace signals, which cost a dozen awaited calls per request.
Idle pooled connections are expired before the server's own idle timer can close them. The
connect timeout counts only the time servegate's event loop could run (proxy/lag.py): a
connect that waited for servegate's own busy loop is not the model server's failure.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
import time
from collections.abc import AsyncIterable, Callable, Iterable
from contextvars import ContextVar
from typing import Any

import aiohttp
import structlog
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest, ClientResponse
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from multidict import CIMultiDict
from yarl import URL

from proxy import aiohttp_internals
from proxy.acked import AckWatch
from proxy.config import UpstreamSettings, UpstreamTLSSettings
from proxy.failures import AttemptFacts, Failure
from proxy.framing import FramedResponseHandler, OnFault, report
from proxy.lag import LoopLag, ResponsiveTimeout

log = structlog.get_logger("servegate.upstream")

_KEEP_ALIVE_TIMEOUT = re.compile(r"(?:^|[,\s])timeout\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)

Body = bytes | AsyncIterable[bytes] | None

# The attempt a connector is connecting for: `send` sets it; `_WatchingConnector` and
# `_WatchedRequest`, which run in the same task, read it.
_ATTEMPT: ContextVar[_Attempt | None] = ContextVar("servegate_attempt", default=None)


def expiry_for(announced: float) -> float:
    """How long servegate keeps an idle connection to a server that closes it after `announced`.

    Half the server's timeout for short ones (1 s -> 0.5 s), one second less for long ones:
    the pooled connection must be gone before the server's close can cross a request.
    """
    return announced / 2 if announced <= 2 else announced - 1


def announced_idle_timeout(keep_alive: str) -> float | None:
    """The N of a `Keep-Alive: timeout=N` header value, if there is one."""
    match = _KEEP_ALIVE_TIMEOUT.search(keep_alive)
    return float(match.group(1)) if match else None


class Upstream:
    """Two sessions: a pool for normal traffic, and fresh one-shot connections for retries.

    A burst after a quiet period can find every pooled connection stale, so the retry after a
    stale connection must not draw from the pool again.
    """

    def __init__(
        self,
        settings: UpstreamSettings,
        max_concurrency: int = 0,
        on_failure: Callable[[Failure], None] = lambda _failure: None,
        lag: LoopLag | None = None,
    ) -> None:
        """`max_concurrency`: admission's limit (0: none), which sizes both pools.
        `on_failure` hears of faults in answers that were still relayed (proxy/framing.py).
        `lag`: the loop's heartbeat, which the connect timeout discounts (unstarted: wall
        time)."""
        self.settings = settings
        origin = settings.origin
        # With upstream.scheme: auto either scheme may be spoken, so both are ready.
        # The port is always explicit: with upstream.scheme: auto the scheme may change, and
        # the port must not change with it. An IPv6 host keeps its brackets.
        host = f"[{origin.raw_host}]" if ":" in (origin.raw_host or "") else origin.raw_host
        self._authority = f"{host}:{origin.port}"
        self.idle_expiry = settings.idle_expiry
        ssl_context = client_ssl_context(settings.tls)
        lag = lag or LoopLag()
        # A pool limit would be a queue no metric shows and no budget sees (aiohttp waits for
        # a free connection without end), so the pools never limit on their own: admission
        # does, in the open. A request holds one connection at a time (its retry's fresh one
        # only after the pooled one is closed), so with admission set neither pool can ever
        # wait for a connection.
        self._on_fault = report(on_failure)
        self._pool = _WatchingConnector(
            settings.connect_timeout,
            lag,
            limit=max_concurrency,
            limit_per_host=0,
            keepalive_timeout=settings.idle_expiry,
            ssl=ssl_context,
        )
        self._pooled = self._session(self._pool)
        self._fresh = self._session(
            _WatchingConnector(
                settings.connect_timeout,
                lag,
                limit=max_concurrency,
                limit_per_host=0,
                force_close=True,
                ssl=ssl_context,
            )
        )

    def _session(self, connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(
            connector=_framed(connector, self._on_fault),
            request_class=_WatchedRequest,
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
            auto_decompress=False,  # bytes pass through exactly as the model sent them
            trust_env=False,  # an HTTP_PROXY in the container must not reroute model traffic
            max_line_size=self.settings.max_response_header_bytes,
            max_field_size=self.settings.max_response_header_bytes,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            # No timeout of aiohttp's own: the connector times the connect (in responsive time),
            # the request's budget bounds the rest.
            timeout=aiohttp.ClientTimeout(total=None),
        )
        # aiohttp silently replays an idempotent request once after a disconnect; servegate's
        # attempt loop must be the only place that decides (and counts) a retry.
        aiohttp_internals.disable_hidden_retry(session)
        return session

    async def send(
        self,
        method: str,
        raw_path: str,
        headers: Iterable[tuple[str, str]],
        body: Body,
        facts: AttemptFacts,
        *,
        scheme: str,
        fresh: bool,
    ) -> aiohttp.ClientResponse:
        """One attempt: returns once the response head has arrived; the body is read later."""
        session = self._fresh if fresh else self._pooled
        attempt = _Attempt(facts)
        token = _ATTEMPT.set(attempt)
        try:
            response: aiohttp.ClientResponse = await session.request(
                method,
                # The whole target as the path: yarl would drop an empty query ("/predict?")
                # or a fragment; this way it goes out byte for byte, dot segments and all.
                URL.build(scheme=scheme, authority=self._authority, path=raw_path, encoded=True),
                headers=CIMultiDict(headers),
                data=body,
                allow_redirects=False,
                server_hostname=self.settings.tls.server_name,
            )
        finally:
            _ATTEMPT.reset(token)
            attempt.finish()
        facts.response_started = True
        self._learn_idle_timeout(response)
        return response

    def _learn_idle_timeout(self, response: aiohttp.ClientResponse) -> None:
        announced = response.headers.get("Keep-Alive", "")
        seconds = announced_idle_timeout(announced)
        if seconds is None:
            return
        expiry = expiry_for(seconds)
        if expiry != self.idle_expiry:
            self.idle_expiry = expiry
            aiohttp_internals.set_keepalive_timeout(self._pool, expiry)
            log.info("upstream.idle_expiry_learned", keep_alive=announced, idle_expiry_s=expiry)

    async def close(self) -> None:
        await self._pooled.close()
        await self._fresh.close()


class _Attempt:
    """One attempt's facts, and the acknowledgement count of the connection it used."""

    def __init__(self, facts: AttemptFacts) -> None:
        self.facts = facts
        self.watch: AckWatch | None = None

    def finish(self) -> None:
        """Called once the attempt's request is out and answered, or has failed."""
        if self.watch is not None:
            self.facts.request_bytes_acked = self.watch.finish()
            self.watch = None


class _WatchingConnector(aiohttp.TCPConnector):
    """Starts counting the server's acknowledgements on a connection once it is taken from
    the pool or opened, before the request is written to it; times a new connection's TCP
    connect and TLS handshake in responsive time (proxy/lag.py)."""

    def __init__(self, connect_timeout: float, lag: LoopLag, **options: Any) -> None:
        super().__init__(**options)
        self._connect_timeout = connect_timeout
        self._lag = lag

    async def _create_connection(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> ResponseHandler:
        # Called for a new connection only: one taken from the pool never comes here.
        began = time.monotonic()
        # A TimeoutError from here becomes aiohttp's ConnectionTimeoutError (connect_timeout).
        async with ResponsiveTimeout(self._connect_timeout, self._lag):
            protocol = await super()._create_connection(req, traces, timeout)
        attempt = _ATTEMPT.get()
        if attempt is not None:
            attempt.facts.reused = False
            attempt.facts.connect_seconds = time.monotonic() - began
        return protocol

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        attempt = _ATTEMPT.get()
        if attempt is not None:
            if attempt.facts.reused is None:  # `_create_connection` was not called
                attempt.facts.reused = True
            attempt.watch = AckWatch.start(connection.transport)
        return connection


def _framed(connector: aiohttp.TCPConnector, on_fault: OnFault) -> aiohttp.TCPConnector:
    """Each connection's protocol holds answers to their framing (proxy/framing.py).

    aiohttp offers no public hook to replace the protocol a connector builds.
    """
    loop = asyncio.get_running_loop()
    factory = functools.partial(FramedResponseHandler, loop=loop, on_fault=on_fault)
    aiohttp_internals.use_protocol_factory(connector, factory)
    return connector


class _WatchedRequest(ClientRequest):
    """Marks the attempt's request as sent as aiohttp begins to write its head, the moment its
    `on_request_headers_sent` signal would report."""

    async def send(self, conn: Connection) -> ClientResponse:
        attempt = _ATTEMPT.get()
        if attempt is not None:
            attempt.facts.request_sent = True
        return await super().send(conn)


def client_ssl_context(tls: UpstreamTLSSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context
