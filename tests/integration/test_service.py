"""4503 service: shed load before the model falls over, fail fast while it is down, and let
traffic flow again the moment it is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import LogCapture, StartGate, assert_4503, gate_url, sample, scrape
from tests.upstreams.apps import Busy, busy_app
from tests.upstreams.gunicorn import Gunicorn

PREDICTION = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}


@pytest.mark.slow
async def test_beyond_concurrency_and_queue_requests_get_429_at_once_and_the_model_is_spared(
    start_gate: StartGate, aiohttp_server: Any, client: aiohttp.ClientSession
) -> None:
    busy = Busy()
    server = await aiohttp_server(busy_app(busy, seconds=1.5))
    concurrency, queue = 4, 4
    gate = await start_gate(
        f"http://127.0.0.1:{server.port}",
        **{"admission.max_concurrency": concurrency, "admission.max_queue": queue},
    )

    async def one() -> tuple[int, float, dict[str, str], Any]:
        sent = time.monotonic()
        async with client.post(gate_url(gate, "/predict"), json=PREDICTION) as response:
            body = await response.json()
            return response.status, time.monotonic() - sent, dict(response.headers), body

    results = await asyncio.gather(*(one() for _ in range(10 * (concurrency + queue))))
    served = [r for r in results if r[0] == 200]
    shed = [r for r in results if r[0] == 429]
    assert len(served) == concurrency + queue  # the queued ones were served too
    assert len(shed) == 9 * (concurrency + queue)
    assert busy.peak == concurrency
    for _status, seconds, headers, body in shed:
        assert seconds < 1.0  # at once: before the model finished a single request
        assert headers["Retry-After"] == "1"
        assert (body["category"], body["cause"]) == ("service", "overloaded")
    samples = await scrape(gate)
    assert sample(samples, "servegate_shed_total", reason="queue_full") == len(shed)
    assert sample(samples, "servegate_queue_depth") == 0


@pytest.mark.slow
async def test_a_dead_model_fails_fast_and_a_restarted_one_gets_traffic_without_errors(
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    model = gunicorn()
    interval = 0.5
    gate = await start_gate(
        model.url, **{"health.path": "/health", "health.interval": interval, "circuit.wait": 2.0}
    )
    admin = f"http://127.0.0.1:{gate.admin_port}"
    model.stop()
    killed = time.monotonic()
    while await status_of(client, f"{admin}/readyz") != 503:
        assert time.monotonic() - killed < 2 * interval + 2.0  # a loaded machine's headroom
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.1)  # past circuit.wait: from now on, no request waits
    for _ in range(5):
        sent = time.monotonic()
        async with client.post(gate_url(gate, "/predict"), json=PREDICTION) as response:
            await assert_4503(response, 503, "service", "circuit_open")
            assert int(response.headers["Retry-After"]) >= 1
        assert time.monotonic() - sent < 1.0  # well short of circuit.wait (2 s)
    samples = await scrape(gate)
    assert sample(samples, "servegate_circuit_state") == 2
    assert sample(samples, "servegate_upstream_up") == 0

    gunicorn(port=model.port)
    back = time.monotonic()
    while await status_of(client, f"{admin}/readyz") != 200:
        assert time.monotonic() - back < 2 * interval + 2.0
        await asyncio.sleep(0.05)
    for _ in range(20):
        async with client.post(gate_url(gate, "/predict"), json=PREDICTION) as response:
            assert response.status == 200
    samples = await scrape(gate)
    assert sample(samples, "servegate_circuit_state") == 0
    assert sample(samples, "servegate_upstream_up") == 1
    assert sample(samples, "servegate_upstream_restarts_total") == 1
    assert [line["event"] for line in log_capture.lines() if "circuit" in line["event"]] == [
        "circuit.open", "circuit.half_open", "circuit.closed",
    ]  # fmt: skip


async def status_of(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(url) as response:
        return response.status


async def test_a_query_of_death_is_tried_on_two_workers_at_most_even_when_opted_in(
    start_gate: StartGate, gunicorn: Callable[..., Gunicorn], client: aiohttp.ClientSession
) -> None:
    model = gunicorn()
    gate = await start_gate(model.url, **{"retry.replay_after_reset": ["POST"]})
    async with client.post(gate_url(gate, "/predict?crash=1"), json=PREDICTION) as response:
        await assert_4503(response, 503, "service", "reset_during_request")
    for _ in range(60):  # up to 3 s: the master logs worker exits as it reaps them
        if model.log().count("exited with code 1") >= 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert model.log().count("exited with code 1") == 2  # two workers, never a third
    samples = await scrape(gate)
    replayed = {"cause": "reset_during_request", "outcome": "failed"}
    assert sample(samples, "servegate_retries_total", **replayed) == 1


async def test_an_opted_in_method_rides_out_a_worker_that_dies_under_it(
    start_gate: StartGate, gunicorn: Callable[..., Gunicorn], client: aiohttp.ClientSession
) -> None:
    model = gunicorn("--workers", "1", env={"DEMO_CRASH_EVERY": "2"})
    gate = await start_gate(model.url, **{"retry.replay_after_reset": ["POST"]})
    statuses = []
    for _ in range(6):
        async with client.post(gate_url(gate, "/predict"), json=PREDICTION) as response:
            statuses.append(response.status)
    assert statuses == [200] * 6
    samples = await scrape(gate)
    replayed = {"cause": "reset_during_request", "outcome": "succeeded"}
    assert sample(samples, "servegate_retries_total", **replayed) >= 2


async def test_a_slow_client_is_cut_at_its_budget_without_holding_the_models_capacity(
    start_gate: StartGate, aiohttp_server: Any, client: aiohttp.ClientSession
) -> None:
    busy = Busy()
    server = await aiohttp_server(busy_app(busy, seconds=0.05))
    gate = await start_gate(
        f"http://127.0.0.1:{server.port}",
        **{"admission.max_concurrency": 1, "budget.seconds": 1.5, "budget.margin": 0.5},
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
    await writer.drain()  # 10 of 100 bytes, then nothing
    async with client.post(gate_url(gate, "/predict"), json=PREDICTION) as response:
        assert response.status == 200  # the slot was free for a client that sends its body
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    writer.close()
    await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 408")  # the client's slowness, not a 4503
    assert b"X-Servegate-Category" not in head


async def test_the_wait_for_a_slot_is_queued_time_not_reading_time(
    start_gate: StartGate,
    aiohttp_server: Any,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    """The access line says where the budget went: a request whose body came with its head and
    then waited for the one slot spent its time queued, not reading the request. Its answer is
    servegate's queue's, not the model's: shed, with the capacity fix, never "make the
    prediction faster"."""
    server = await aiohttp_server(busy_app(Busy(), seconds=2.0))
    gate = await start_gate(f"http://127.0.0.1:{server.port}", **{"admission.max_concurrency": 1})
    holder = asyncio.create_task(client.post(gate_url(gate, "/predict"), json=PREDICTION))
    await asyncio.sleep(0.3)  # the slot is taken
    headers = {"X-Servegate-Timeout-Ms": "1000"}
    async with client.post(gate_url(gate, "/predict"), json=PREDICTION, headers=headers) as late:
        assert late.status == 429
        assert int(late.headers["Retry-After"]) >= 1
        body = await late.json()
        assert (body["category"], body["cause"]) == ("service", "overloaded")
        assert "never asked" in body["hint"]
        assert "faster" not in body["hint"]
    (await holder).release()
    samples = await scrape(gate)
    assert sample(samples, "servegate_shed_total", reason="queue_timeout") == 1
    late_line = next(line for line in log_capture.access() if line["status"] == 429)
    assert late_line["spent"]["queued"] > 0.5
    assert late_line["spent"]["reading_request"] < 0.2
