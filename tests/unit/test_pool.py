"""The pool of connections to the model server, against a real server on loopback: no cap,
the connection used last taken first, idle ones expired, connect failures in aiohttp's types."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from proxy.failures import AttemptFacts
from proxy.framing import FramedResponseHandler
from proxy.lag import LoopLag
from proxy.pool import Origin, Pool, PooledConnection
from tests.conftest import Certificates
from tests.integration.test_down_fast import accepting_nothing
from tests.upstreams.gunicorn import free_port


@dataclass
class Listener:
    """Counts the connections it accepted and those the other side has closed."""

    port: int = 0
    accepted: int = 0
    closed: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        self.changed.set()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the pool closes its end
        self.closed += 1
        self.changed.set()
        writer.close()

    async def until(self, *, accepted: int = 0, closed: int = 0) -> None:
        async with asyncio.timeout(5):
            while self.accepted < accepted or self.closed < closed:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    listening = Listener()
    server = await asyncio.start_server(listening.serve, "127.0.0.1", 0, backlog=1024)
    listening.port = server.sockets[0].getsockname()[1]
    async with server:
        yield listening
        for writer in listening.writers:
            writer.close()
        await listening.until(closed=listening.accepted)


def pool(
    to: int | Origin,
    idle_expiry: float | None = 5.0,
    connect_timeout: float = 2.0,
    kind: type[Pool] = Pool,
) -> Pool:
    """A pool to `to`: a port on 127.0.0.1, or an origin."""
    factory = functools.partial(
        FramedResponseHandler, loop=asyncio.get_running_loop(), on_fault=lambda _fault: None
    )
    origin = to if isinstance(to, Origin) else Origin("127.0.0.1", to)
    return kind(
        origin, factory, idle_expiry=idle_expiry, connect_timeout=connect_timeout, lag=LoopLag()
    )


async def test_every_request_gets_a_connection_at_once_however_many_there_are(
    listener: Listener,
) -> None:
    connections = pool(listener.port)
    facts = [AttemptFacts() for _ in range(300)]
    taken = await asyncio.gather(*(connections.acquire(f) for f in facts))
    await listener.until(accepted=300)
    assert all(f.reused is False for f in facts)
    taken[0].close()
    await connections.close()  # the ones still in use too
    await listener.until(closed=300)


async def test_the_connection_used_last_is_taken_first_and_reported_reused(
    listener: Listener,
) -> None:
    connections = pool(listener.port)
    first = await connections.acquire(AttemptFacts())
    second = await connections.acquire(AttemptFacts())
    kept = second.protocol
    first.release()
    second.release()
    assert connections.idle == 2
    facts = AttemptFacts()
    again = await connections.acquire(facts)
    assert (facts.reused, again.protocol) == (True, kept)
    again.close()
    again.release()  # after close: nothing, and never back to the pool
    assert connections.idle == 1
    await connections.close()
    await listener.until(accepted=2, closed=2)


async def test_idle_connections_are_closed_at_their_expiry_and_never_handed_out_after_it(
    listener: Listener,
) -> None:
    connections = pool(listener.port, idle_expiry=0.2)
    taken = await connections.acquire(AttemptFacts())
    taken.release()
    await listener.until(accepted=1, closed=1)  # the pool's own sweep closed it
    assert connections.idle == 0
    facts = AttemptFacts()
    (await connections.acquire(facts)).close()
    assert facts.reused is False


async def test_a_one_shot_pool_keeps_nothing(listener: Listener) -> None:
    connections = pool(listener.port, idle_expiry=None)
    taken: PooledConnection = await connections.acquire(AttemptFacts())
    taken.release()
    assert connections.idle == 0
    await listener.until(accepted=1, closed=1)


async def test_a_refused_connect_and_a_silent_one_raise_what_classify_reads() -> None:
    with pytest.raises(aiohttp.ClientConnectorError) as refused:
        await pool(free_port()).acquire(AttemptFacts())
    assert isinstance(refused.value.os_error, ConnectionRefusedError)
    with accepting_nothing() as port, pytest.raises(aiohttp.ConnectionTimeoutError) as timed_out:
        await pool(port, connect_timeout=0.2).acquire(AttemptFacts())
    assert "upstream.connect_timeout (0.2 s)" in str(timed_out.value)


class CountingLookups(Pool):
    lookups = 0

    async def _lookup(self) -> list[Any]:
        self.lookups += 1
        return await super()._lookup()


class RefusingFirst(Pool):
    """A name whose first address refuses (nothing listens there), as ::1 does for a server
    bound to 127.0.0.1 only."""

    async def _lookup(self) -> list[Any]:
        listening = await super()._lookup()
        return [(socket.AF_INET, ("127.0.0.1", free_port())), *listening]


async def test_a_host_name_is_looked_up_once_for_many_connections(listener: Listener) -> None:
    connections = pool(Origin("localhost", listener.port), None, kind=CountingLookups)
    assert isinstance(connections, CountingLookups)
    taken = await asyncio.gather(*(connections.acquire(AttemptFacts()) for _ in range(20)))
    taken.append(await connections.acquire(AttemptFacts()))
    await listener.until(accepted=21)
    assert connections.lookups == 1
    await connections.close()


async def test_each_address_of_a_name_is_tried_in_turn(listener: Listener) -> None:
    connections = pool(Origin("localhost", listener.port), None, kind=RefusingFirst)
    facts = AttemptFacts()
    (await connections.acquire(facts)).close()
    assert facts.reused is False
    await listener.until(accepted=1, closed=1)


async def test_an_address_that_never_answers_costs_one_connect_timeout_not_every_request(
    listener: Listener,
) -> None:
    """A name whose first address drops every SYN (a full accept queue here; a firewall, a
    stale DNS record): each address gets upstream.connect_timeout, and the one that
    connected is tried first after. One timeout for all of them failed every request."""
    with accepting_nothing() as silent:

        class SilentFirst(Pool):
            async def _lookup(self) -> list[Any]:
                listening = await super()._lookup()
                return [(socket.AF_INET, ("127.0.0.1", silent)), *listening]

        connections = pool(
            Origin("localhost", listener.port), None, connect_timeout=0.3, kind=SilentFirst
        )
        (await connections.acquire(AttemptFacts())).close()
        assert connections._preferred == (socket.AF_INET, ("127.0.0.1", listener.port))
        (await connections.acquire(AttemptFacts())).close()  # tried first now
        await listener.until(accepted=2, closed=2)
        await connections.close()


async def test_an_address_that_never_answered_is_the_verdict_over_one_that_refused() -> None:
    with accepting_nothing() as silent:

        class SilentThenRefusing(Pool):
            async def _lookup(self) -> list[Any]:
                refusing = (socket.AF_INET, ("127.0.0.1", free_port()))
                return [(socket.AF_INET, ("127.0.0.1", silent)), refusing]

        connections = pool(
            Origin("localhost", 1), None, connect_timeout=0.2, kind=SilentThenRefusing
        )
        with pytest.raises(aiohttp.ConnectionTimeoutError) as timed_out:
            await connections.acquire(AttemptFacts())
        assert "upstream.connect_timeout (0.2 s)" in str(timed_out.value)
        await connections.close()


async def test_an_expiry_shortened_by_the_server_applies_to_connections_already_idle(
    listener: Listener,
) -> None:
    connections = pool(listener.port, idle_expiry=5.0)
    (await connections.acquire(AttemptFacts())).release()
    connections.set_idle_expiry(0.1)  # a Keep-Alive: timeout=N learnt meanwhile
    await asyncio.sleep(0.2)  # before the sweep armed for 5 s
    facts = AttemptFacts()
    (await connections.acquire(facts)).close()
    assert facts.reused is False
    await connections.close()


async def test_a_connection_closing_as_it_comes_back_is_not_kept(listener: Listener) -> None:
    connections = pool(listener.port)
    taken = await connections.acquire(AttemptFacts())
    assert taken.transport is not None
    taken.transport.close()  # as when the server's close arrives with the answer's end
    taken.release()
    assert connections.idle == 0
    await listener.until(accepted=1, closed=1)


async def test_a_closed_pool_opens_nothing(listener: Listener) -> None:
    connections = pool(listener.port)
    await connections.close()
    with pytest.raises(aiohttp.ClientConnectionError, match="closed"):
        await connections.acquire(AttemptFacts())
    assert listener.accepted == 0


class SilentResolver(Pool):
    async def _lookup(self) -> list[Any]:
        await asyncio.sleep(3600)
        return []


async def test_a_lookup_that_outlasts_the_connect_timeout_is_named_as_one() -> None:
    connections = pool(Origin("model.example", 80), None, 0.2, kind=SilentResolver)
    with pytest.raises(aiohttp.ConnectionTimeoutError, match="DNS lookup did not answer"):
        await connections.acquire(AttemptFacts())
    await connections.close()


async def test_a_tls_host_name_with_the_roots_trailing_dot_is_verified_without_it(
    certificates: Certificates,
) -> None:
    """Certificates name hosts without the trailing dot of a fully qualified name (given here
    as upstream.tls.server_name: a name such as `localhost.` resolves only where a resolver
    answers for it)."""
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(certificates.cert_file, certificates.key_file)
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0, ssl=served)
    port = server.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cafile=str(certificates.ca_file))
    connections = pool(Origin("127.0.0.1", port, trusting, "localhost."), None, 5.0)
    async with server:
        (await connections.acquire(AttemptFacts())).close()
        await connections.close()


async def test_an_idle_connection_the_server_closed_is_passed_over_for_the_next(
    listener: Listener,
) -> None:
    connections = pool(listener.port)
    older = await connections.acquire(AttemptFacts())
    newer = await connections.acquire(AttemptFacts())
    kept, closed = older.protocol, newer.protocol
    assert kept is not None
    assert closed is not None
    older.release()
    newer.release()
    assert closed.transport is not None
    closed.transport.close()  # as when the server's idle close arrives
    facts = AttemptFacts()
    taken = await connections.acquire(facts)
    assert (facts.reused, taken.protocol) == (True, kept)
    taken.close()
    await connections.close()
