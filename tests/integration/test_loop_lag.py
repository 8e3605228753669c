"""servegate's own busy event loop is never the model server's fault: a health check or a
connect that waited for servegate's loop changes no verdict, and a server that really is
silent is still found out.

The busy loop is made the way a burst of thousands of requests makes it: work in servegate's
own loop that keeps it from reading its sockets, here a test coroutine that blocks it for
longer than every timeout servegate has of its own, again and again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import LogCapture, StartGate, gate_url, sample, scrape
from tests.upstreams.gunicorn import Gunicorn
from tests.upstreams.raw import HoldsRequests

TIMEOUT = 0.5  # health.timeout and upstream.connect_timeout, seconds
HOG_SLICE = 1.5  # seconds the loop is blocked at a time: three timeouts
HOG_SLICES = 4
CLIENTS = 8  # the demo model's Gunicorn serves 2 workers x 4 threads
ROW = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}


async def hog() -> None:
    for _ in range(HOG_SLICES):
        await asyncio.sleep(0.05)  # the loop starts new work between slices: checks, connects
        time.sleep(HOG_SLICE)  # noqa: ASYNC251 (blocking the loop is the point)


@pytest.mark.time_limit(90)
async def test_a_busy_loop_fails_no_health_check_and_no_connect(
    start_gate: StartGate, gunicorn: Callable[..., Gunicorn], log_capture: LogCapture
) -> None:
    model = gunicorn()
    gate = await start_gate(
        model.url,
        **{
            "health.interval": 0.1,
            "health.timeout": TIMEOUT,
            "upstream.connect_timeout": TIMEOUT,
            # Pooled connections expire at once: every request connects anew, across the slices.
            "upstream.idle_expiry": 0.01,
        },
    )
    statuses: list[int] = []
    hogging = asyncio.create_task(hog())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as clients:

        async def one_client() -> None:
            for _ in range(100):  # bounded; ends with the hog
                if hogging.done():
                    return
                async with clients.post(gate_url(gate, "/predict"), json=ROW) as r:
                    await r.read()
                    statuses.append(r.status)

        await asyncio.gather(hogging, *(one_client() for _ in range(CLIENTS)))

    samples = await scrape(gate)
    # The loop really was busy, for longer than any of servegate's own timeouts, many times.
    assert sample(samples, "servegate_event_loop_lag_seconds_total") >= HOG_SLICES * HOG_SLICE * 0.8
    assert statuses, "no request was made while the loop was busy"
    assert set(statuses) == {200}
    assert sample(samples, "servegate_upstream_failures_total",
                  category="service", cause="connect_timeout") == 0  # fmt: skip
    assert log_capture.events("upstream.down") == []
    assert sample(samples, "servegate_upstream_up") == 1


@pytest.mark.time_limit(60)
async def test_a_silent_server_still_fails_its_checks_when_servegate_is_not_busy(
    start_gate: StartGate, raw_server: Any, log_capture: LogCapture
) -> None:
    silent = await raw_server(HoldsRequests())  # takes the connection, never answers
    gate = await start_gate(
        silent.url,
        **{"health.path": "/health", "health.interval": 0.1, "health.timeout": 0.3},
    )
    for _ in range(100):  # bounded: two failed checks take about a second
        if gate.health.state.value == "down":
            break
        await asyncio.sleep(0.1)
    assert gate.health.state.value == "down"
    samples = await scrape(gate)
    assert sample(samples, "servegate_health_checks_inconclusive_total") == 0
