"""4503 communication: no client ever sees a stale keep-alive disconnect, and every one of them
is visible in the metrics."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import LogCapture, StartGate, close_when_reused, gate_url, sample, scrape
from tests.upstreams.gunicorn import Gunicorn
from tests.upstreams.raw import (
    AnnouncesKeepAlive,
    ClosesIdleOnReuse,
    ClosesReusedConnections,
    DelayRelay,
)

PREDICTION = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}
STALE = {"category": "communication", "cause": "stale_connection"}
MAX_BURSTS = 12  # bursts until one hits the boundary; each hits it about half the time
# servegate's pool sees most closes before it reuses a connection, so fewer of its bursts race
# one than a naive proxy's: on a loaded machine twelve in a row have missed.
MAX_BURSTS_SERVEGATE = 40
# Concurrent predictions per burst. The client, servegate and the relay share this process's
# event loop: larger bursts on a loaded machine delay the relay's bytes by hundreds of ms.
BURST = 20


@pytest.fixture
def relay_to(raw_server: Callable[..., Any]) -> Callable[[int], Any]:
    async def start(port: int) -> DelayRelay:
        return await raw_server(DelayRelay(port, delay=0.04))

    return start


class Bursts:
    """Bursts of `size` concurrent predictions, each after an idle gap aimed at the moment
    Gunicorn closes idle connections, within the relay's delay either side of it.

    Gunicorn's gthread worker closes idle connections in a sweep after each poll (at most 1 s
    apart), so the close comes 2 s or somewhat later after the last answer: the aim is what the
    relay measured on this machine, not the nominal 2 s."""

    def __init__(self, client: aiohttp.ClientSession, url: str, relay: DelayRelay) -> None:
        self.client, self.url, self.relay = client, url, relay
        self.statuses: list[int] = []

    async def one(self) -> int:
        """One prediction's status; 0 stands for an exchange that broke."""
        try:
            async with self.client.post(self.url, json=PREDICTION) as response:
                await response.read()
                return response.status
        except aiohttp.ClientError:
            return 0

    async def run(self, size: int, rng: random.Random) -> None:
        closes = sorted(self.relay.idle_closes[-size:])
        boundary = closes[len(closes) // 2] if closes else 2.0
        await asyncio.sleep(rng.uniform(boundary - 0.04, boundary + 0.04))
        self.statuses += await asyncio.gather(*(self.one() for _ in range(size)))

    async def warm_up(self, size: int) -> None:
        """One burst, then an idle wait until every connection is closed (by Gunicorn, or by
        the client's idle expiry), so the relay has measured Gunicorn's closes."""
        self.statuses += await asyncio.gather(*(self.one() for _ in range(size)))
        for _ in range(200):  # up to 20 s
            if not self.relay.open_connections:
                break
            await asyncio.sleep(0.1)
        assert not self.relay.open_connections


@pytest.mark.slow
async def test_a_reused_connection_closed_before_its_response_is_retried_on_a_fresh_one(
    start_gate: StartGate,
    closes_idle_on_reuse: ClosesIdleOnReuse,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    server = closes_idle_on_reuse
    gate = await start_gate(server.url, **{"upstream.idle_expiry": 30})
    close_when_reused(gate, server)

    async def one(index: int) -> int:
        async with client.post(gate_url(gate, f"/p/{index}"), data=b"payload") as response:
            assert await response.read() == b"ok"
            return response.status

    statuses: list[int] = []
    for start in range(0, 300, 10):
        statuses += await asyncio.gather(*(one(i) for i in range(start, start + 10)))
    assert statuses == [200] * 300
    assert server.answered == 300  # no request was read twice
    samples = await scrape(gate)
    stale = sample(samples, "servegate_upstream_failures_total", **STALE)
    assert stale >= 30  # the race really happened, at least once in every batch
    recovered = {"cause": "stale_connection", "outcome": "succeeded"}
    assert sample(samples, "servegate_retries_total", **recovered) == stale
    assert sample(samples, "servegate_4503_total", **STALE) == 0
    reset = {"category": "service", "cause": "reset_during_request"}
    assert sample(samples, "servegate_upstream_failures_total", **reset) == 0
    retried = [line for line in log_capture.access() if line["attempts"] == 2]
    assert len(retried) == stale
    assert all(line["reused"] is False for line in retried)  # the retry ran on a fresh one


@pytest.mark.parametrize("method", ["GET", "PUT"])
async def test_a_stale_idempotent_request_is_retried_and_counted_by_servegate_alone(
    method: str,
    start_gate: StartGate,
    closes_idle_on_reuse: ClosesIdleOnReuse,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    # aiohttp would replay a GET or PUT once on its own after a dropped pooled connection,
    # unseen by servegate's metrics and its rule against replaying what reached the model.
    # POST, which aiohttp never replays, cannot show that; these methods do.
    server = closes_idle_on_reuse
    gate = await start_gate(server.url, **{"upstream.idle_expiry": 30})
    close_when_reused(gate, server)
    body = b"put-body" if method == "PUT" else None
    for path in ("/warm", "/stale"):  # the second goes out on the pooled, now closing one
        async with client.request(method, gate_url(gate, path), data=body) as response:
            assert response.status == 200
            assert await response.read() == b"ok"
    assert server.closed_idle == 1
    assert server.answered == 2  # the warm request, and the one retry
    samples = await scrape(gate)
    assert sample(samples, "servegate_upstream_failures_total", **STALE) == 1
    for outcome, count in (("succeeded", 1), ("failed", 0)):
        labels = {"cause": "stale_connection", "outcome": outcome}
        assert sample(samples, "servegate_retries_total", **labels) == count
    stale = log_capture.access()[-1]
    assert (stale["method"], stale["attempts"], stale["reused"]) == (method, 2, False)


async def test_a_body_too_large_to_replay_gets_a_communication_error_that_says_so(
    start_gate: StartGate,
    closes_idle_on_reuse: ClosesIdleOnReuse,
    client: aiohttp.ClientSession,
) -> None:
    gate = await start_gate(
        closes_idle_on_reuse.url,
        **{"upstream.idle_expiry": 30, "retry.replay_buffer_bytes": 1024},
    )
    close_when_reused(gate, closes_idle_on_reuse)
    async with client.post(gate_url(gate, "/small"), data=b"x") as response:
        assert response.status == 200  # this leaves a pooled connection for the next one
    # Larger than the replay buffer: provably unread (the server had closed before any of it
    # came), but already streamed.
    big = b"y" * 4096
    async with asyncio.timeout(10):  # nothing hangs
        async with client.post(gate_url(gate, "/big"), data=big) as response:
            assert response.status == 503
            body = await response.json()
    assert (body["category"], body["cause"]) == ("communication", "stale_connection"), body["hint"]
    assert "could not be replayed" in body["hint"]
    samples = await scrape(gate)
    skipped = {"cause": "stale_connection", "outcome": "not_replayable"}
    assert sample(samples, "servegate_retries_total", **skipped) == 1
    assert sample(samples, "servegate_4503_total", **STALE) == 1


@pytest.mark.slow
async def test_the_idle_timeout_a_server_announces_expires_pooled_connections_before_it(
    start_gate: StartGate, raw_server: Callable[..., Any], client: aiohttp.ClientSession
) -> None:
    server = await raw_server(AnnouncesKeepAlive(announced=1))
    gate = await start_gate(server.url)  # default idle expiry: 1 s
    for pause in (0.1, 0.7, 0.1, 1.2):
        async with client.get(gate_url(gate, "/")) as response:
            assert response.status == 200
        await asyncio.sleep(pause)
    async with client.get(gate_url(gate, "/")) as response:
        assert response.status == 200
    # Learned from "Keep-Alive: timeout=1": connections idle 0.7 s or more were not reused.
    assert server.idle_before_reuse
    assert max(server.idle_before_reuse) < 0.6  # reused ones were idle up to the 0.5 s expiry
    assert server.connections == 3


@pytest.mark.slow
async def test_servegate_keeps_idle_client_connections_open_longer_than_gunicorn_would(
    start_gate: StartGate, closes_idle_on_reuse: ClosesIdleOnReuse
) -> None:
    gate = await start_gate(closes_idle_on_reuse.url)
    close_when_reused(gate, closes_idle_on_reuse)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await reader.readuntil(b"ok")
        await asyncio.sleep(2.5)
        assert not reader.at_eof()
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # a stale upstream: still a 200
        await writer.drain()
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.slow
@pytest.mark.time_limit(300)
async def test_bursts_on_gunicorns_keep_alive_boundary_through_a_real_network_never_fail(
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
    relay_to: Callable[[int], Any],
    client: aiohttp.ClientSession,
) -> None:
    model = gunicorn("--keep-alive", "2")
    rng = random.Random(4503)

    # The failure this test guards against is real here: a plain pass-through proxy fails
    # within a few bursts (about half of its bursts when measured on an idle machine).
    naive_relay = await relay_to(model.port)
    naive = await start_naive_proxy(naive_relay.url)
    try:
        naive_bursts = Bursts(client, naive.url, naive_relay)
        await naive_bursts.warm_up(BURST)
        for _ in range(MAX_BURSTS):
            await naive_bursts.run(BURST, rng)
            if 0 in naive_bursts.statuses or 502 in naive_bursts.statuses:
                break
    finally:
        await naive.cleanup()
    assert set(naive_bursts.statuses) != {200}, "no burst hit the keep-alive boundary"

    # servegate with defaults: idle expiry prevents the race.
    relay = await relay_to(model.port)
    gate = await start_gate(relay.url, **{"upstream.idle_expiry": 1.0})
    defaults = Bursts(client, gate_url(gate, "/predict"), relay)
    await defaults.warm_up(BURST)
    for _ in range(8):
        await defaults.run(BURST, rng)
    assert defaults.statuses == [200] * len(defaults.statuses)

    # The pool kept as long as aiohttp's default 15 s: the race happens. The relay's TCP
    # acknowledges what it takes, so an acknowledgement no longer proves that the model did not
    # read a request: such a drop is answered once, never replayed (README). Bursts go on until
    # one raced a close (as the metrics count it).
    relay = await relay_to(model.port)
    gate = await start_gate(relay.url, **{"upstream.idle_expiry": 15.0})
    kept = Bursts(client, gate_url(gate, "/predict"), relay)
    await kept.warm_up(BURST)
    recovered = {"cause": "stale_connection", "outcome": "succeeded"}
    reset = {"category": "service", "cause": "reset_during_request"}
    for _ in range(MAX_BURSTS_SERVEGATE):
        await kept.run(BURST, rng)
        samples = await scrape(gate)
        stale = sample(samples, "servegate_upstream_failures_total", **STALE)
        resets = sample(samples, "servegate_4503_total", **reset)
        if stale + resets > 0:
            break
    closes = [round(seconds, 3) for seconds in relay.idle_closes[-2 * BURST :]]
    assert stale + resets > 0, f"no burst hit the keep-alive boundary; closes after: {closes}"
    assert sample(samples, "servegate_retries_total", **recovered) == stale
    assert sum(status != 200 for status in kept.statuses) == resets
    assert set(kept.statuses) <= {200, 503}


class NaiveProxy:
    """A plain aiohttp pass-through proxy with default settings, as one would first write it."""

    def __init__(self, runner: web.AppRunner, session: aiohttp.ClientSession, port: int) -> None:
        self.runner, self.session, self.port = runner, session, port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/predict"

    async def cleanup(self) -> None:
        await self.runner.cleanup()
        await self.session.close()


async def start_naive_proxy(upstream: str) -> NaiveProxy:
    session = aiohttp.ClientSession()

    async def forward(request: web.Request) -> web.Response:
        try:
            async with session.request(
                request.method, upstream + request.path_qs, data=await request.read(),
                headers={"Content-Type": request.content_type},
            ) as response:  # fmt: skip
                return web.Response(status=response.status, body=await response.read())
        except aiohttp.ClientError as exc:
            return web.Response(status=502, text=str(exc))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return NaiveProxy(runner, session, runner.addresses[0][1])


@pytest.mark.slow
async def test_a_reused_connection_dropped_after_the_model_worked_on_it_is_not_replayed(
    start_gate: StartGate, raw_server: Callable[..., Any], client: aiohttp.ClientSession
) -> None:
    # Reads the request, works on it, then dies.
    server = await raw_server(ClosesReusedConnections(close_delay=0.5))
    gate = await start_gate(server.url, **{"upstream.idle_expiry": 30})
    async with client.post(gate_url(gate, "/warm"), data=b"warm") as response:
        assert response.status == 200
    async with client.post(gate_url(gate, "/crash"), data=b"crash") as response:
        assert response.status == 503
        body = await response.json()
    assert (body["category"], body["cause"]) == ("service", "reset_during_request")
    assert "sent once and not replayed" in body["hint"]
    assert len(server.remaining_ms) == 2  # the model saw the second request exactly once
