"""A certificate servegate cannot verify is a protocol finding, never an outage: /readyz names
it, every request gets protocol/tls_certificate, and the circuit stays closed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import pytest

from proxy.app import Servegate
from tests.conftest import Certificates, LogCapture, StartGate, gate_url, sample, scrape
from tests.upstreams.gunicorn import Gunicorn

CERTIFICATE = {"category": "protocol", "cause": "tls_certificate"}


async def readyz(client: aiohttp.ClientSession, gate: Servegate) -> tuple[int, dict[str, str]]:
    async with client.get(f"http://127.0.0.1:{gate.admin_port}/readyz") as response:
        return response.status, await response.json()


@pytest.mark.parametrize("health_path", [None, "/health"], ids=["tcp_check", "health_path"])
async def test_a_wrong_ca_fails_readiness_naming_the_certificate_and_never_opens_the_circuit(
    health_path: str | None,
    gunicorn: Callable[..., Gunicorn],
    certificates: Certificates,
    start_gate: StartGate,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    model = gunicorn(certfile=certificates.cert_file, keyfile=certificates.key_file)
    # No upstream.tls.ca_file: the system's CAs do not know trustme's.
    gate = await start_gate(
        model.url, **{"health.path": health_path, "circuit.failure_threshold": 2}
    )
    for _ in range(6):  # more failures than the circuit's threshold, across health checks
        async with client.post(gate_url(gate, "/predict"), json={"inputs": [1]}) as response:
            assert response.status == 503
            body = await response.json()
        assert (body["category"], body["cause"]) == ("protocol", "tls_certificate")
        await asyncio.sleep(0.5)
    status, ready = await readyz(client, gate)
    assert status == 503
    assert "protocol/tls_certificate" in ready["reason"]
    assert "certificate failed verification" in ready["reason"]
    assert "upstream.tls.ca_file" in ready["reason"]
    samples = await scrape(gate)
    assert sample(samples, "servegate_4503_total", **CERTIFICATE) == 6
    assert sample(samples, "servegate_circuit_state") == 0
    assert sample(samples, "servegate_upstream_up") == 1  # it answers: not down
    assert not log_capture.events("upstream.down")
    assert not log_capture.events("circuit.open")


async def test_the_right_ca_makes_the_same_server_ready(
    gunicorn: Callable[..., Gunicorn],
    certificates: Certificates,
    start_gate: StartGate,
    client: aiohttp.ClientSession,
) -> None:
    model = gunicorn(certfile=certificates.cert_file, keyfile=certificates.key_file)
    gate = await start_gate(model.url, **{"upstream.tls.ca_file": str(certificates.ca_file)})
    assert await readyz(client, gate) == (200, {"status": "ready"})
    prediction = {"inputs": [[5.1, 3.5, 1.4, 0.2]]}
    async with client.post(gate_url(gate, "/predict"), json=prediction) as response:
        assert response.status == 200
