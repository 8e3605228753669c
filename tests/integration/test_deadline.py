"""4503 timeout: every request has a deadline from arrival, and servegate answers before it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import LogCapture, StartGate, assert_4503, gate_url, sample, scrape
from tests.upstreams.gunicorn import Gunicorn
from tests.upstreams.misbehaving import Trickles
from tests.upstreams.raw import ClosesReusedConnections, HoldsRequests

SHORT = {"budget.seconds": 3.0, "budget.margin": 0.5}


@pytest.fixture
async def holds(raw_server: Callable[..., Any]) -> HoldsRequests:
    return await raw_server(HoldsRequests())


async def timed_post(client: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[float, Any]:
    sent = time.monotonic()
    async with client.post(url, data=b'{"inputs": [1, 2, 3, 4]}', **kwargs) as response:
        elapsed = time.monotonic() - sent
        body = await assert_4503(response, 504, "timeout", "deadline_exceeded")
    return elapsed, body


@pytest.mark.slow
async def test_a_slow_model_gets_its_504_at_budget_minus_margin(
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    model = gunicorn()
    gate = await start_gate(model.url, **SHORT)
    elapsed, body = await timed_post(client, gate_url(gate, "/predict?sleep=10"))
    assert 2.4 <= elapsed < 3.0  # budget - margin, and in any case before the budget ends
    assert "Budget: 2.5 s" in body["hint"]
    assert "waiting for model" in body["hint"]  # where the time went
    samples = await scrape(gate)
    timeout = {"category": "timeout", "cause": "deadline_exceeded"}
    assert sample(samples, "servegate_4503_total", **timeout) == 1
    line = log_capture.access()[-1]
    assert (line["status"], line["cause"]) == (504, "deadline_exceeded")
    assert line["spent"]["waiting_for_model"] > 2.3


@pytest.mark.slow
async def test_the_model_servers_connection_is_closed_when_the_deadline_passes(
    start_gate: StartGate, holds: HoldsRequests, client: aiohttp.ClientSession
) -> None:
    gate = await start_gate(holds.url, **{"budget.seconds": 1.5, "budget.margin": 0.5})
    await timed_post(client, gate_url(gate, "/"))
    answered = time.monotonic()
    await asyncio.wait_for(holds.closed.wait(), 2)
    assert holds.closed_at[0] - answered < 1.0  # at once, not at the model's leisure


@pytest.mark.time_limit(60)
@pytest.mark.slow
async def test_the_default_budget_answers_a_45_second_prediction_just_before_40_seconds(
    start_gate: StartGate, gunicorn: Callable[..., Gunicorn], client: aiohttp.ClientSession
) -> None:
    model = gunicorn("--timeout", "60")  # so Gunicorn does not kill the worker at 30 s first
    gate = await start_gate(model.url)
    elapsed, _ = await timed_post(client, gate_url(gate, "/predict?sleep=45"))
    assert 38.5 <= elapsed < 40.0


@pytest.mark.slow
async def test_a_client_may_shorten_its_budget_but_not_lengthen_it(
    start_gate: StartGate, holds: HoldsRequests, client: aiohttp.ClientSession
) -> None:
    gate = await start_gate(holds.url, **SHORT)
    url = gate_url(gate, "/")
    elapsed, _ = await timed_post(client, url, headers={"X-Servegate-Timeout-Ms": "1000"})
    assert 0.95 <= elapsed < 2.0  # the client's 1 s, far from the configured 2.5 s
    elapsed, _ = await timed_post(client, url, headers={"X-Servegate-Timeout-Ms": "100000"})
    assert 2.4 <= elapsed < 3.0  # budget - margin, and in any case before the budget ends


async def test_the_remaining_time_reaches_the_model_and_shrinks_across_retries(
    start_gate: StartGate, raw_server: Callable[..., Any], client: aiohttp.ClientSession
) -> None:
    server = await raw_server(ClosesReusedConnections(close_delay=0.1))
    replay = {"retry.replay_after_reset": ["POST"]}  # the server read it: opted in
    gate = await start_gate(server.url, **{"upstream.idle_expiry": 30, **SHORT, **replay})
    for _ in range(2):  # the second one is retried after the server drops it
        async with client.post(gate_url(gate, "/"), data=b"x") as response:
            assert response.status == 200
    first, dropped, retried = server.remaining_ms
    assert 2000 <= first <= 2500  # budget - margin, less the time to get there
    assert dropped - retried >= 100  # the retry was told about the time the drop cost


@pytest.mark.slow
async def test_a_stream_that_outlives_the_budget_is_cut_at_the_deadline(
    start_gate: StartGate,
    upstream_url: str,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    gate = await start_gate(upstream_url, **{"budget.seconds": 3.0, "budget.margin": 1.0})
    sent = time.monotonic()
    async with client.get(gate_url(gate, "/ticks?count=50&every=0.1")) as response:
        assert response.status == 200
        received = await response.content.readuntil(b"\n\n")
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()  # the connection ends before the stream does
    assert 1.95 <= time.monotonic() - sent < 3.0  # cut at budget - margin, before the budget
    assert received.startswith(b"data: 0\n\n")
    samples = await scrape(gate)
    during = {"category": "timeout", "cause": "deadline_during_stream"}
    assert sample(samples, "servegate_4503_total", **during) == 1
    line = log_capture.access()[-1]
    assert (line["status"], line["cause"]) == (200, "deadline_during_stream")


@pytest.mark.slow
async def test_a_first_byte_budget_lets_a_started_stream_run_on(
    start_gate: StartGate, upstream_url: str, client: aiohttp.ClientSession
) -> None:
    gate = await start_gate(
        upstream_url,
        **{"budget.seconds": 1.5, "budget.margin": 0.5, "budget.scope": "first_byte"},
    )
    async with client.get(gate_url(gate, "/ticks?count=15&every=0.1")) as response:
        body = await response.read()
    assert body.count(b"data:") == 15


async def test_a_first_byte_budget_lets_a_small_answer_of_known_length_run_on_too(
    start_gate: StartGate, raw_server: Any, client: aiohttp.ClientSession
) -> None:
    """A small answer with a Content-Length is read whole before it is relayed; with the
    budget ending at the first byte, that read must not be held to it: a 504 whose hint says
    "set budget.scope: first_byte", which is set, was the answer."""
    model = await raw_server(Trickles(every=0.1, content_length=20))  # 2 s for its body
    gate = await start_gate(
        model.url, **{"budget.seconds": 1.5, "budget.margin": 0.5, "budget.scope": "first_byte"}
    )
    async with client.get(gate_url(gate, "/predict")) as response:
        assert response.status == 200
        assert len(await response.read()) == 20
