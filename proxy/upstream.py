"""The connection pool to the model server and one attempt on it.

Each attempt reports whether it used a pooled (reused) or a fresh connection, how long a fresh
one took, and whether its request left servegate, and how much of the request the server's TCP
acknowledged (proxy/acked.py): the facts `failures.classify` needs. The exchange itself is
servegate's (proxy/exchange.py); aiohttp's connector keeps the pool, and tells servegate
whether a connection is new where it calls servegate's code, not through its trace signals,
which cost a dozen awaited calls per request. Idle pooled connections are expired before the
server's own idle timer can close them. The connect timeout counts only the time servegate's
event loop could run (proxy/lag.py): a connect that waited for servegate's own busy loop is not
the model server's failure.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

import aiohttp
import structlog
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from yarl import URL

from proxy import aiohttp_internals
from proxy.config import UpstreamSettings, UpstreamTLSSettings
from proxy.exchange import Body, UpstreamResponse, read_answer, request_head, send_request
from proxy.failures import AttemptFacts, Failure
from proxy.framing import FramedResponseHandler, OnFault, report
from proxy.lag import LoopLag, ResponsiveTimeout

log = structlog.get_logger("servegate.upstream")

_KEEP_ALIVE_TIMEOUT = re.compile(r"(?:^|[,\s])timeout\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)

# The facts of the attempt a connector is connecting for: `send` sets them; `_WatchingConnector`,
# which runs in the same task, fills them in.
_ATTEMPT: ContextVar[AttemptFacts | None] = ContextVar("servegate_attempt", default=None)
# No timeout of aiohttp's own: the connector times the connect (in responsive time), the
# request's budget bounds the rest.
_NO_TIMEOUT = aiohttp.ClientTimeout(total=None)
# One resolved address as aiohttp passes them (socket.getaddrinfo's shape: family, type, proto,
# canonical name, address).
_AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]
# What aiohttp's TCPConnector passes `_wrap_create_connection` besides the protocol factory and
# its own keywords (connector.py, _create_direct_connection); anything else: aiohttp's path.
_NATIVE_CONNECT_OPTIONS = frozenset({"ssl", "server_hostname"})


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
    """Two pools: one for normal traffic, and fresh one-shot connections for retries.

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
        self.lag = lag
        # A pool limit would be a queue no metric shows and no budget sees (aiohttp waits for
        # a free connection without end), so the pools never limit on their own: admission
        # does, in the open. A request holds one connection at a time (its retry's fresh one
        # only after the pooled one is closed), so with admission set neither pool can ever
        # wait for a connection.
        on_fault = report(on_failure)
        self.pool = _framed(
            _WatchingConnector(
                settings.connect_timeout,
                lag,
                limit=max_concurrency,
                limit_per_host=0,
                keepalive_timeout=settings.idle_expiry,
                ssl=ssl_context,
            ),
            on_fault,
        )
        self.fresh_pool = _framed(
            _WatchingConnector(
                settings.connect_timeout,
                lag,
                limit=max_concurrency,
                limit_per_host=0,
                force_close=True,
                ssl=ssl_context,
            ),
            on_fault,
        )
        self._origins: dict[str, ClientRequest] = {}

    def _origin(self, scheme: str) -> ClientRequest:
        """What the connectors connect to for `scheme` (they read only where and how: host,
        port, TLS, server name), built once per scheme."""
        origin = self._origins.get(scheme)
        if origin is None:
            url = URL.build(scheme=scheme, authority=self._authority, encoded=True)
            origin = ClientRequest(
                "GET",
                url,
                loop=asyncio.get_running_loop(),
                server_hostname=self.settings.tls.server_name,
            )
            self._origins[scheme] = origin
        return origin

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
    ) -> UpstreamResponse:
        """One attempt: returns once the answer's head has arrived; the body is read later.

        Raises what aiohttp's client raises for the same failure (failures.classify)."""
        origin = self._origin(scheme)
        token = _ATTEMPT.set(facts)
        try:
            connection = await (self.fresh_pool if fresh else self.pool).connect(
                origin, [], _NO_TIMEOUT
            )
        finally:
            _ATTEMPT.reset(token)
        protocol = connection.protocol
        assert isinstance(protocol, FramedResponseHandler)
        protocol.set_response_params(
            skip_payload=method == "HEAD",
            read_until_eof=True,
            auto_decompress=False,  # bytes pass through exactly as the model sent them
            max_line_size=self.settings.max_response_header_bytes,
            max_field_size=self.settings.max_response_header_bytes,
            max_headers=self.settings.max_response_headers,
        )
        acks = protocol.acks
        begins = acks.mark() if acks is not None else None
        try:
            head = request_head(
                method, raw_path, headers, body, authority=self._authority, close=fresh
            )
            writer = send_request(connection, head, body, acks)
            facts.request_sent = True
            answer = await read_answer(connection, writer, method, origin.url)
        except BaseException:
            if acks is not None and begins is not None:
                facts.request_bytes_acked = acks.acked_since(begins)
                facts.peer_finished = acks.peer_finished
            connection.close()
            raise
        facts.response_started = True
        self._learn_idle_timeout(answer)
        return answer

    def _learn_idle_timeout(self, answer: UpstreamResponse) -> None:
        announced = answer.headers.get("Keep-Alive", "")
        seconds = announced_idle_timeout(announced)
        if seconds is None:
            return
        expiry = expiry_for(seconds)
        if expiry != self.idle_expiry:
            self.idle_expiry = expiry
            aiohttp_internals.set_keepalive_timeout(self.pool, expiry)
            log.info("upstream.idle_expiry_learned", keep_alive=announced, idle_expiry_s=expiry)

    async def close(self) -> None:
        await self.pool.close()
        await self.fresh_pool.close()


class _WatchingConnector(aiohttp.TCPConnector):
    """Tells a new connection from a pooled one, and times a new connection's TCP connect and
    TLS handshake in responsive time (proxy/lag.py)."""

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
        try:
            async with ResponsiveTimeout(self._connect_timeout, self._lag):
                protocol = await super()._create_connection(req, traces, timeout)
        except TimeoutError as exc:
            if isinstance(exc, aiohttp.ClientError):
                raise
            # The connect timeout passed (the request's own deadline cancels instead): the
            # type `failures.classify` reads as a connection that never opened.
            what = "TCP connect and TLS handshake" if req.is_ssl() else "TCP connect"
            raise aiohttp.ConnectionTimeoutError(
                f"no {what} to {req.host}:{req.port} within upstream.connect_timeout "
                f"({self._connect_timeout:g} s)"
            ) from exc
        facts = _ATTEMPT.get()
        if facts is not None:
            facts.reused = False
            facts.connect_seconds = time.monotonic() - began
        return protocol

    async def _wrap_create_connection(
        self,
        *args: Any,
        addr_infos: list[_AddrInfo],
        req: ClientRequest,
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
        client_error: type[Exception] = aiohttp.ClientConnectorError,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, ResponseHandler]:
        """Connect to a single address with the event loop's own connect.

        aiohttp connects through aiohappyeyeballs, which builds a Python socket object and
        awaits its connect in Python before handing it to the loop, work and memory that every
        new connection paid (docs/benchmarks.md, held requests). With one address there is no
        race to run; several (a name with IPv4 and IPv6 addresses) still go through it, as
        does a call with options servegate does not know or an aiohttp connect timeout
        (servegate sets none, nor a local address or socket factory, which this path would not
        honour). The connect's time limit is `_create_connection`'s; errors are mapped as
        aiohttp's own `_wrap_create_connection` maps them (connector.py), which
        `failures.classify` reads.
        """
        native = len(addr_infos) == 1 and len(args) == 1 and timeout.sock_connect is None
        if not native or kwargs.keys() - _NATIVE_CONNECT_OPTIONS:
            return await super()._wrap_create_connection(
                *args,
                addr_infos=addr_infos,
                req=req,
                timeout=timeout,
                client_error=client_error,
                **kwargs,
            )
        (factory,) = args
        family, _, _, _, address = addr_infos[0]
        try:
            transport, protocol = await self._loop.create_connection(
                factory,
                address[0],
                address[1],
                family=family,
                ssl=kwargs.get("ssl"),
                server_hostname=kwargs.get("server_hostname"),
            )
        except ssl.CertificateError as exc:
            raise aiohttp.ClientConnectorCertificateError(req.connection_key, exc) from exc
        except ssl.SSLError as exc:
            raise aiohttp.ClientConnectorSSLError(req.connection_key, exc) from exc
        except OSError as exc:
            if exc.errno is None and isinstance(exc, asyncio.TimeoutError):
                raise
            raise client_error(req.connection_key, exc) from exc
        return transport, protocol

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        facts = _ATTEMPT.get()
        if facts is not None and facts.reused is None:  # `_create_connection` was not called
            facts.reused = True
        return connection


def _framed(connector: aiohttp.TCPConnector, on_fault: OnFault) -> aiohttp.TCPConnector:
    """Each connection's protocol holds answers to their framing (proxy/framing.py).

    aiohttp offers no public hook to replace the protocol a connector builds.
    """
    loop = asyncio.get_running_loop()
    factory = functools.partial(FramedResponseHandler, loop=loop, on_fault=on_fault)
    aiohttp_internals.use_protocol_factory(connector, factory)
    return connector


def client_ssl_context(tls: UpstreamTLSSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context
