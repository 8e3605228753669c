"""The connection pool to the model server and one attempt on it.

Each attempt reports, through aiohttp's trace signals, whether it used a pooled (reused) or a
fresh connection and whether its request left servegate: the facts `failures.classify` needs.
Idle pooled connections are expired before the server's own idle timer can close them.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import AsyncIterable, Iterable
from types import SimpleNamespace
from typing import Any

import aiohttp
import structlog
from multidict import CIMultiDict
from yarl import URL

from proxy import aiohttp_internals
from proxy.config import UpstreamSettings, UpstreamTLSSettings
from proxy.failures import AttemptFacts

log = structlog.get_logger("servegate.upstream")

_KEEP_ALIVE_TIMEOUT = re.compile(r"(?:^|[,\s])timeout\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)

Body = bytes | AsyncIterable[bytes] | None


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

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        origin = settings.origin
        # With upstream.scheme: auto either scheme may be spoken, so both are ready.
        # The port is always explicit: with upstream.scheme: auto the scheme may change, and
        # the port must not change with it. An IPv6 host keeps its brackets.
        host = f"[{origin.raw_host}]" if ":" in (origin.raw_host or "") else origin.raw_host
        self._authority = f"{host}:{origin.port}"
        self.idle_expiry = settings.idle_expiry
        ssl_context = client_ssl_context(settings.tls)
        trace = _trace_config()
        self._pool = aiohttp.TCPConnector(
            limit=settings.max_connections, keepalive_timeout=settings.idle_expiry, ssl=ssl_context
        )
        self._pooled = self._session(self._pool, trace)
        self._fresh = self._session(
            aiohttp.TCPConnector(limit=settings.max_connections, force_close=True, ssl=ssl_context),
            trace,
        )

    def _session(
        self, connector: aiohttp.TCPConnector, trace: aiohttp.TraceConfig
    ) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(
            connector=connector,
            trace_configs=[trace],
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
            auto_decompress=False,  # bytes pass through exactly as the model sent them
            trust_env=False,  # an HTTP_PROXY in the container must not reroute model traffic
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            # sock_connect, not connect: waiting for a free pooled connection is queueing, not
            # a server that cannot be reached; the request's budget bounds it.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout),
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
        response: aiohttp.ClientResponse = await session.request(
            method,
            # Concatenated, not joined: the path and query go out byte for byte as the client
            # sent them, dot segments and all.
            URL(f"{scheme}://{self._authority}{raw_path}", encoded=True),
            headers=CIMultiDict(headers),
            data=body,
            allow_redirects=False,
            server_hostname=self.settings.tls.server_name,
            trace_request_ctx=facts,
        )
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


def client_ssl_context(tls: UpstreamTLSSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def _trace_config() -> aiohttp.TraceConfig:
    async def reused(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
        ctx.trace_request_ctx.reused = True

    async def creating(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
        ctx.trace_request_ctx.connect_started = time.monotonic()

    async def created(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
        facts: AttemptFacts = ctx.trace_request_ctx
        facts.reused = False
        if facts.connect_started is not None:
            facts.connect_seconds = time.monotonic() - facts.connect_started

    async def headers_sent(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
        ctx.trace_request_ctx.request_sent = True
        ctx.trace_request_ctx.last_sent_at = time.monotonic()

    async def chunk_sent(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
        ctx.trace_request_ctx.last_sent_at = time.monotonic()

    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(reused)
    trace.on_connection_create_start.append(creating)
    trace.on_connection_create_end.append(created)
    trace.on_request_headers_sent.append(headers_sent)
    trace.on_request_chunk_sent.append(chunk_sent)
    trace.freeze()
    return trace
