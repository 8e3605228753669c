"""When no answer comes from the model server, the client gets the JSON 4503 body, and the
metrics and the access line name the same category and cause."""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp
import pytest

from tests.conftest import LogCapture, StartGate, assert_4503, gate_url, sample, scrape
from tests.upstreams.gunicorn import Gunicorn, free_port


@pytest.mark.slow
async def test_connection_refused_for_the_whole_budget_is_a_service_failure_on_time(
    start_gate: StartGate, client: aiohttp.ClientSession, log_capture: LogCapture
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    not_yet_known_down = {"health.unhealthy_threshold": 100, "circuit.failure_threshold": 1000}
    gate = await start_gate(
        nobody, **{"budget.seconds": 3.0, "budget.margin": 1.0, **not_yet_known_down}
    )
    sent = time.monotonic()
    async with client.post(gate_url(gate, "/predict"), data=b"{}") as response:
        elapsed = time.monotonic() - sent
        await assert_4503(response, 503, "service", "connect_refused")
    # Refused connections are retried (a restart is ridden out) until budget - margin, no later.
    assert 1.9 <= elapsed < 3.0  # at budget - margin; never after the budget
    samples = await scrape(gate)
    labels = {"category": "service", "cause": "connect_refused"}
    assert sample(samples, "servegate_4503_total", **labels) == 1
    assert sample(samples, "servegate_upstream_failures_total", **labels) >= 2
    line = log_capture.access()[-1]
    assert (line["status"], line["category"], line["cause"]) == (503, "service", "connect_refused")
    assert line["attempts"] >= 2


async def test_a_worker_crash_during_the_request_is_not_replayed(
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    model = gunicorn()
    gate = await start_gate(model.url)
    async with client.post(gate_url(gate, "/predict?crash=1"), data=b"{}") as response:
        body = await assert_4503(response, 503, "service", "reset_during_request")
    assert "not replayed" in body["hint"]
    assert log_capture.access()[-1]["attempts"] == 1  # the model may have acted on it
    samples = await scrape(gate)
    labels = {"category": "service", "cause": "reset_during_request"}
    assert sample(samples, "servegate_4503_total", **labels) == 1


async def test_a_malformed_timeout_header_is_a_400_with_the_json_body(
    start_gate: StartGate, client: aiohttp.ClientSession
) -> None:
    gate = await start_gate(f"http://127.0.0.1:{free_port()}")
    headers = {"X-Servegate-Timeout-Ms": "soon"}
    async with client.get(gate_url(gate, "/"), headers=headers) as response:
        assert response.status == 400
        body = await response.json()
    assert body["error_code"] == "servegate.bad_request"
    assert "X-Servegate-Timeout-Ms" in body["error_msg"]
