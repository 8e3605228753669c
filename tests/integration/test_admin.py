"""The admin port: metrics every dashboard can rely on from start-up, liveness, readiness."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from proxy import listener
from proxy.failures import Category, Cause
from tests.conftest import LogCapture, StartGate, require_tool, sample, scrape
from tests.integration.test_down_fast import accepting_nothing
from tests.upstreams.gunicorn import Gunicorn, free_port
from tests.upstreams.recording import RecordingModel


async def test_every_category_and_cause_is_exported_at_zero_from_start_up(
    start_gate: StartGate,
) -> None:
    gate = await start_gate(f"http://127.0.0.1:{free_port()}")
    samples = await scrape(gate)
    for cause in Cause:
        for name in ("servegate_4503_total", "servegate_upstream_failures_total"):
            assert sample(samples, name, category=cause.category, cause=cause) == 0
    categories = {labels for (name, labels) in samples if name == "servegate_4503_total"}
    assert {dict(labels)["category"] for labels in categories} == set(Category)
    assert sample(samples, "servegate_inflight_requests") == 0


async def test_promtool_accepts_the_metrics_output(
    start_gate: StartGate, gunicorn: Callable[..., Gunicorn], client: aiohttp.ClientSession
) -> None:
    promtool = require_tool("promtool")
    model = gunicorn()
    gate = await start_gate(model.url)
    async with client.post(f"http://127.0.0.1:{gate.data_port}/predict", json={"inputs": [1] * 4}):
        pass
    async with client.get(f"http://127.0.0.1:{gate.admin_port}/metrics") as response:
        assert response.status == 200
        text = await response.read()
    assert b"servegate_requests_total" in text
    checked = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_readiness_follows_the_model_server_and_liveness_does_not(
    start_gate: StartGate, gunicorn: Callable[..., Gunicorn], client: aiohttp.ClientSession
) -> None:
    model = gunicorn()
    gate = await start_gate(model.url, **{"health.interval": 0.5})
    admin = f"http://127.0.0.1:{gate.admin_port}"
    async with client.get(f"{admin}/readyz") as response:
        assert response.status == 200
    model.stop()
    stopped = time.monotonic()
    while True:  # bounded by 2 health intervals, asserted below
        async with client.get(f"{admin}/readyz") as response:
            if response.status == 503:
                body = await response.json()
                break
        assert time.monotonic() - stopped < 1.0 + 2.0, "readyz still 200 long after 2 intervals"
        await asyncio.sleep(0.05)
    assert "health checks fail" in body["reason"]
    async with client.get(f"{admin}/healthz") as response:
        assert response.status == 200


async def test_readiness_fails_while_requests_keep_the_circuit_open(
    start_gate: StartGate, gunicorn: Callable[..., Gunicorn], client: aiohttp.ClientSession
) -> None:
    """Requests that find the model gone open the circuit before the next health check runs;
    /readyz says so for the circuit's cool-down, and not after it (were the pod unready until
    a request came, none would come)."""
    model = gunicorn()
    settings = {
        "health.interval": 60,
        "circuit.open_seconds": 2.0,
        "circuit.failure_threshold": 1,
        "retry.connect_wait": 0.5,
    }
    gate = await start_gate(model.url, **settings)
    admin = f"http://127.0.0.1:{gate.admin_port}"
    model.stop()
    async with client.post(f"http://127.0.0.1:{gate.data_port}/predict", json={}) as failed:
        assert failed.status == 503
    async with client.get(f"{admin}/readyz") as response:
        assert response.status == 503
        assert "opened the circuit" in (await response.json())["reason"]
    await asyncio.sleep(2.2)  # the cool-down is over: the health checks decide again
    async with client.get(f"{admin}/readyz") as response:
        assert response.status == 200


@pytest.mark.parametrize(
    ("server", "reason"),
    [
        ("refusing", "(service/connect_refused: connection refused)"),
        ("silent", "(service/connect_timeout: no connection within health.timeout (0.3 s))"),
    ],
)
async def test_readiness_says_why_the_health_checks_fail(
    server: str, reason: str, start_gate: StartGate, client: aiohttp.ClientSession
) -> None:
    with accepting_nothing() as silent:
        port = silent if server == "silent" else free_port()
        gate = await start_gate(
            f"http://127.0.0.1:{port}",
            **{"health.interval": 0.2, "health.timeout": 0.3, "health.unhealthy_threshold": 1},
        )
        began = time.monotonic()
        while True:  # bounded below
            async with client.get(f"http://127.0.0.1:{gate.admin_port}/readyz") as response:
                body = await response.json()
            if response.status == 503 and "health checks fail" in body["reason"]:
                break
            assert time.monotonic() - began < 5.0, body
            await asyncio.sleep(0.05)
    assert body["reason"].endswith(reason)


async def test_the_admin_port_caps_its_connections_and_times_out_a_slow_head(
    start_gate: StartGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silent or slow connections to the admin port (0.0.0.0 by default) cannot hold the
    descriptors the data port and the model server's connections need, nor lock out the
    probes and scrapes: a cap, a setting, metrics, the oldest silent connection closed for a
    new one, and the data port's header timeout."""
    gate = await start_gate(
        f"http://127.0.0.1:{free_port()}",
        **{"server.admin_max_connections": 2, "server.header_timeout": 1.0},
    )
    monkeypatch.setattr(listener, "SILENT_BEFORE_RECLAIM", 0.2)
    held = [await asyncio.open_connection("127.0.0.1", gate.admin_port) for _ in range(2)]
    await asyncio.sleep(0.3)  # silent for long enough to count as idle
    try:
        samples = await scrape(gate)  # over the cap: the oldest silent one makes room
        oldest_reader, _ = held[0]
        async with asyncio.timeout(5):
            assert await oldest_reader.read() == b""
        slow_reader, slow_writer = held[1]
        slow_writer.write(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n")  # and nothing more
        async with asyncio.timeout(5):
            assert (await slow_reader.readline()).startswith(b"HTTP/1.1 408")
    finally:
        for _, held_writer in held:
            held_writer.close()
    assert sample(samples, "servegate_admin_connections_reclaimed_total") == 1
    assert sample(samples, "servegate_admin_connections_refused_total") == 0
    assert sample(samples, "servegate_admin_connections_limit") == 2


@pytest.mark.parametrize(
    ("sent", "status", "said"),
    [
        (b"GET /metrics?" + b"q" * 9000 + b" HTTP/1.1\r\n", 414, "max_request_line_bytes"),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"v" * 9000 + b"\r\n", 431, "max_header_bytes"),
        (b"GET /metrics HTTP/1.1\r\n" + b"X-A: 1\r\n" * 200, 431, "max_headers"),
        (b"GET /nothing HTTP/1.1\r\n", 404, "/metrics, /healthz, /readyz"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n", 405, "GET and HEAD"),
    ],
    ids=["long-target", "long-field", "many-fields", "unknown-path", "post"],
)  # fmt: skip
async def test_the_admin_port_answers_what_it_cannot_serve_as_the_data_port_does(
    sent: bytes, status: int, said: str, start_gate: StartGate, log_capture: LogCapture
) -> None:
    """The data port's head limits and JSON answers, not aiohttp's defaults in plain text
    with the client's bytes quoted back and an error logged with a traceback."""
    gate = await start_gate(f"http://127.0.0.1:{free_port()}")
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.admin_port)
    try:
        writer.write(sent + b"Host: admin\r\n\r\n")
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = json.loads(await reader.readexactly(length))
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert said in body["error_msg"]
    assert "qqqq" not in body["error_msg"]  # no client bytes quoted back
    assert "vvvv" not in body["error_msg"]
    if status == 405:
        assert b"\r\nAllow: GET, HEAD\r\n" in head
    assert not [line for line in log_capture.lines() if line.get("level") == "error"]


async def test_a_health_path_with_a_query_is_asked_as_written(
    start_gate: StartGate, raw_server: Any
) -> None:
    """`health.path: /health?verbose=1` was sent as `/health%3Fverbose=1`: a 404, and a model
    server declared down that was up."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url, **{"health.path": "/health?verbose=1"})
    assert gate.health.state.value == "up"
    assert model.seen[0].request_line == b"GET /health?verbose=1 HTTP/1.1"
