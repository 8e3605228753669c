"""Connections to the model server at one origin: opened on demand, kept idle for reuse, and
expired before the server's own idle timer can close them.

There is no limit and no queue here: every request that needs a connection gets one at once,
pooled or new. A limit on requests to the model server is admission's (proxy/admission.py),
where a wait is counted and bounded by the budget; a request holds one connection at a time, so
with admission set the pool never holds more than its limit.

The idle connection taken is the one used last (LIFO), as nginx's upstream keep-alive cache and
Go's http.Transport take it: it is the least likely to be near the server's idle timeout, and
after a burst the connections left over age out together instead of being kept alive in turn.

A new connection is opened with the event loop's own connect and timed in responsive time
(proxy/lag.py). A host name is resolved once for every connection opened within
DNS_CACHE_SECONDS (aiohttp's connector kept its answers as long), by one lookup however many
connections wait for it, and its addresses are tried in turn, the one that connected last
first, each within upstream.connect_timeout. Failures are raised as aiohttp's connector
exceptions, which `failures.classify` reads for every connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.client_reqrep import ConnectionKey

from proxy.failures import AnswersPlainHTTP, AttemptFacts
from proxy.framing import FramedResponseHandler
from proxy.lag import LoopLag, ResponsiveTimeout
from proxy.probe import plain_behind_tls

CLOSE_WAIT = 2.0  # seconds `Pool.close` waits for its connections to be closed
DNS_CACHE_SECONDS = 10.0  # aiohttp's TCPConnector default (ttl_dns_cache)

_Address = tuple[int, tuple[Any, ...]]  # (family, socket address), as getaddrinfo gives them


def tls_name(server_name: str | None, host: str) -> str:
    """The name a server's certificate is checked against: upstream.tls.server_name, else the
    host, without the root's trailing dot (`model.example.`), which no certificate carries
    (aiohttp strips it too)."""
    return (server_name or host).rstrip(".")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a pool connects: host (a name or an IP address), port, and TLS when it is set."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None  # the name the certificate is checked against

    @property
    def key(self) -> ConnectionKey:
        """aiohttp's description of the origin, which its connector exceptions carry."""
        return ConnectionKey(
            self.host, self.port, self.tls is not None, self.tls or True, None, None, None
        )


class PooledConnection:
    """One connection taken from a pool, until `release()` (back to the pool, if it can be
    reused) or `close()`; after either, both do nothing."""

    __slots__ = ("_pool", "protocol")

    def __init__(self, protocol: FramedResponseHandler, pool: Pool) -> None:
        self.protocol: FramedResponseHandler | None = protocol
        self._pool = pool

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.protocol.transport if self.protocol is not None else None

    def release(self) -> None:
        """The answer was read to its end: the connection may serve another request."""
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            self._pool.put_back(protocol)

    def close(self) -> None:
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            self._pool.drop(protocol)


class Pool:
    """The connections to one origin.

    `idle_expiry`: seconds an idle connection is kept (None: none is kept, each connection
    serves one request). `connect_timeout`: seconds a new connection may take, TCP and TLS,
    counted only while the event loop could run."""

    def __init__(
        self,
        origin: Origin,
        factory: Callable[[], FramedResponseHandler],
        *,
        idle_expiry: float | None,
        connect_timeout: float,
        lag: LoopLag,
    ) -> None:
        self._origin = origin
        self._factory = factory
        self._expiry = idle_expiry
        self._connect_timeout = connect_timeout
        self._lag = lag
        self._loop = asyncio.get_running_loop()
        self._idle: deque[tuple[FramedResponseHandler, float]] = deque()  # oldest first
        self._in_use: set[FramedResponseHandler] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self._addresses: list[_Address] = []
        self._resolved_until = 0.0
        self._preferred: _Address | None = None  # the address that connected last
        self._resolving: asyncio.Future[list[_Address]] | None = None
        try:  # an address needs no lookup, ever
            ip = ipaddress.ip_address(origin.host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            self._addresses, self._resolved_until = [(family, (origin.host, origin.port))], math.inf

    @property
    def idle(self) -> int:
        """Connections kept for reuse now."""
        return len(self._idle)

    def set_idle_expiry(self, seconds: float) -> None:
        """Keep idle connections `seconds` from now on (a server announced its timeout)."""
        if self._expiry is not None:
            self._expiry = seconds

    async def acquire(self, facts: AttemptFacts) -> PooledConnection:
        """The connection used last if one is idle and fresh, else a new one; `facts` learns
        which (`reused`) and how long a new one took (`connect_seconds`).

        Raises aiohttp.ConnectionTimeoutError past the connect timeout,
        aiohttp.ClientConnectorError (its certificate, SSL and DNS subclasses included) when
        the connect fails, and aiohttp.ClientConnectionError once the pool is closed (as
        aiohttp's connector does)."""
        if self._closed:
            raise aiohttp.ClientConnectionError("Connector is closed.")
        idle = self._idle
        while idle:
            protocol, since = idle.pop()
            if self._expiry is None or self._loop.time() - since > self._expiry:
                protocol.close()
                self._close_idle()  # the one used last has expired, so every older one has
                break
            if protocol.is_connected():
                facts.reused = True
                self._in_use.add(protocol)
                return PooledConnection(protocol, self)
            protocol.close()  # the server closed it while it was idle: the next one may serve
        began = time.monotonic()
        protocol = await self._open()
        facts.reused = False
        facts.connect_seconds = time.monotonic() - began
        self._in_use.add(protocol)
        return PooledConnection(protocol, self)

    def put_back(self, protocol: FramedResponseHandler) -> None:
        """Keep `protocol`'s connection for the next request, or close it if it cannot serve
        one: its answer was not read to its end, the server said close, or a fault."""
        self._in_use.discard(protocol)
        if self._closed or self._expiry is None or protocol.should_close:
            protocol.close()
            return
        if not protocol.is_connected():  # the server closed it as the answer ended
            return
        self._idle.append((protocol, self._loop.time()))
        if self._sweep is None:
            self._sweep = self._loop.call_later(self._expiry, self._expire)

    def drop(self, protocol: FramedResponseHandler) -> None:
        """Close `protocol`'s connection: its state is unknown, or its request failed."""
        self._in_use.discard(protocol)
        protocol.close()

    async def close(self) -> None:
        """Close every connection, idle or in use, and wait up to CLOSE_WAIT seconds for them
        to be closed (a TLS connection sends its close_notify first), as aiohttp's connector
        waits for its own."""
        self._closed = True
        protocols = [*(protocol for protocol, _ in self._idle), *self._in_use]
        self._idle.clear()
        self._in_use.clear()
        self._close_idle()
        closing: list[asyncio.Future[None]] = []
        for protocol in protocols:
            protocol.close()
            if (closed := protocol.closed) is not None:
                closing.append(closed)
        if closing:
            gathered = asyncio.gather(*closing, return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gathered, CLOSE_WAIT)

    def _close_idle(self) -> None:
        while self._idle:
            self._idle.popleft()[0].close()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def _expire(self) -> None:
        """Close the idle connections past their expiry, oldest first, and wake again for the
        oldest one left."""
        self._sweep = None
        if self._expiry is None:
            return
        now, idle = self._loop.time(), self._idle
        while idle and now - idle[0][1] >= self._expiry:
            idle.popleft()[0].close()
        if idle:
            wake = idle[0][1] + self._expiry - now
            self._sweep = self._loop.call_later(wake, self._expire)

    async def _resolve(self) -> list[_Address]:
        """The origin's addresses, from the last lookup while it is fresh.

        Raises socket.gaierror when the name does not resolve."""
        if self._loop.time() < self._resolved_until:
            return self._addresses
        if self._resolving is None:  # one lookup, whoever else needs it meanwhile
            self._resolving = self._loop.create_task(self._lookup())
            # Its failure is read by every waiter; with none left (all past their connect
            # timeout), it is read here, not reported as never retrieved.
            self._resolving.add_done_callback(_retrieve)
        # A waiter cancelled (its budget ended) must not cancel the lookup for the others.
        return await asyncio.shield(self._resolving)

    async def _lookup(self) -> list[_Address]:
        try:
            infos = await self._loop.getaddrinfo(
                self._origin.host, self._origin.port, type=socket.SOCK_STREAM
            )
        finally:
            self._resolving = None
        self._addresses = list(dict.fromkeys((family, address) for family, *_, address in infos))
        self._resolved_until = self._loop.time() + DNS_CACHE_SECONDS
        return self._addresses

    async def _connect(self, addresses: list[_Address]) -> FramedResponseHandler:
        """Each address in turn, the one that connected last first, until one connects, each
        within upstream.connect_timeout (nginx tries its next server so); the last one's error
        if none does. One address that never answers costs each request its timeout once, not
        every request the whole wait."""
        origin = self._origin
        hostname = tls_name(origin.server_hostname, origin.host) if origin.tls else None
        failed: OSError | None = None
        silent: list[_Address] = []  # addresses whose connect timed out
        for family, address in sorted(addresses, key=lambda each: each != self._preferred):
            try:
                async with ResponsiveTimeout(self._connect_timeout, self._lag):
                    _, protocol = await self._loop.create_connection(
                        self._factory,
                        address[0],
                        address[1],
                        family=family,
                        ssl=origin.tls,
                        server_hostname=hostname,
                    )
            except ssl.SSLError:
                raise  # the server answered: another address is the same server
            except OSError as exc:  # TimeoutError too: the next address may answer
                if isinstance(exc, TimeoutError) and exc.errno is None:
                    silent.append((family, address))
                failed = exc
                continue
            self._preferred = (family, address)
            return protocol
        assert failed is not None  # getaddrinfo gives at least one address or raises
        if silent:  # one that never answered says more than one that refused
            raise _AddressesSilent(silent)
        raise failed

    async def _open(self) -> FramedResponseHandler:
        origin = self._origin
        addresses: list[_Address] | None = None
        try:
            async with ResponsiveTimeout(self._connect_timeout, self._lag):
                addresses = await self._resolve()
            protocol = await self._connect(addresses)
        except ssl.CertificateError as exc:
            raise aiohttp.ClientConnectorCertificateError(origin.key, exc) from exc
        except ssl.SSLError as exc:
            raise aiohttp.ClientConnectorSSLError(origin.key, exc) from exc
        except TimeoutError as exc:
            if exc.errno is not None:  # the kernel's own (ETIMEDOUT), not the connect timeout
                raise aiohttp.ClientConnectorError(origin.key, exc) from exc
            silent = exc.addresses if isinstance(exc, _AddressesSilent) else []
            within = f"upstream.connect_timeout ({self._connect_timeout:g} s)"
            if len(silent) > 1:
                within = f"{within} at each of {len(silent)} addresses"
            if origin.tls and silent:
                host, port = silent[0][1][:2]
                if plain := await plain_behind_tls(host, port, within):
                    raise AnswersPlainHTTP(plain) from exc
            if addresses is None:
                what = f"address for {origin.host} (the DNS lookup did not answer)"
            elif origin.tls:
                what = f"TCP connect and TLS handshake to {origin.host}:{origin.port}"
            else:
                what = f"TCP connect to {origin.host}:{origin.port}"
            raise aiohttp.ConnectionTimeoutError(f"no {what} within {within}") from exc
        except socket.gaierror as exc:
            raise aiohttp.ClientConnectorDNSError(origin.key, exc) from exc
        except OSError as exc:
            raise aiohttp.ClientConnectorError(origin.key, exc) from exc
        return protocol


class _AddressesSilent(TimeoutError):
    """No address connected, and these timed out (the others refused)."""

    def __init__(self, addresses: list[_Address]) -> None:
        super().__init__()
        self.addresses = addresses


def _retrieve(lookup: asyncio.Task[list[_Address]]) -> None:
    if not lookup.cancelled():
        lookup.exception()
