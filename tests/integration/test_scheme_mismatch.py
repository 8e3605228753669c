"""4503 protocol on the upstream side: each mismatch is found, named with its fix, and removed
where it safely can be (upstream.scheme: auto, never downgrading an https:// URL)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import Servegate
from proxy.probe import speaks_tls
from tests.conftest import (
    Certificates,
    LogCapture,
    StartGate,
    assert_4503,
    gate_url,
    sample,
    scrape,
    tls10_only,
)
from tests.upstreams.gunicorn import Gunicorn
from tests.upstreams.misbehaving import Silent, WaitsForARequestLine
from tests.upstreams.raw import threaded_server


def tls_gunicorn(
    gunicorn: Callable[..., Gunicorn], certificates: Certificates, port: int | None = None
) -> Gunicorn:
    return gunicorn(certfile=certificates.cert_file, keyfile=certificates.key_file, port=port)


async def test_https_to_a_plain_server_is_named_quickly_with_both_schemes(
    start_gate: StartGate, gunicorn: Callable[..., Gunicorn], client: aiohttp.ClientSession
) -> None:
    model = gunicorn()
    gate = await start_gate(model.url.replace("http://", "https://"))
    for _ in range(3):
        sent = time.monotonic()
        async with client.get(gate_url(gate, "/health")) as response:
            body = await assert_4503(response, 503, "protocol", "tls_to_plain_server")
        assert time.monotonic() - sent < 3.0  # no retry storm: that would last the 40 s budget
    assert "HTTPS" in body["hint"]
    assert "plain HTTP" in body["hint"]
    samples = await scrape(gate)
    mismatch = {"category": "protocol", "cause": "tls_to_plain_server"}
    assert sample(samples, "servegate_4503_total", **mismatch) == 3
    info = {"configured": "https", "detected": "http"}
    assert sample(samples, "servegate_upstream_scheme_info", **info) == 1


async def test_plain_http_to_a_tls_server_is_confirmed_by_a_probe_and_fails_readiness(
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
    certificates: Certificates,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    model = tls_gunicorn(gunicorn, certificates)
    gate = await start_gate(model.url.replace("https://", "http://"))
    sent = time.monotonic()
    async with client.get(gate_url(gate, "/health")) as response:
        body = await assert_4503(response, 503, "protocol", "plain_to_tls_server")
    assert time.monotonic() - sent < 3.0  # one probe, not the 40 s budget
    assert "https://" in body["hint"]
    assert "upstream.scheme: auto" in body["hint"]
    async with client.get(f"http://127.0.0.1:{gate.admin_port}/readyz") as response:
        assert response.status == 503
        reason = (await response.json())["reason"]
    assert "speaks HTTPS" in reason
    detected = log_capture.events("upstream.scheme_detected")
    assert detected[-1]["level"] == "error"
    assert detected[-1]["mismatch"] == reason


@pytest.mark.slow
async def test_auto_speaks_whatever_the_server_speaks(
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
    certificates: Certificates,
    client: aiohttp.ClientSession,
) -> None:
    plain = gunicorn()
    tls = tls_gunicorn(gunicorn, certificates)
    trust = {"upstream.scheme": "auto", "upstream.tls.ca_file": str(certificates.ca_file)}
    for model in (plain, tls):
        gate = await start_gate(model.url.replace("https://", "http://"), **trust)
        async with client.get(gate_url(gate, "/health")) as response:
            assert response.status == 200
        async with client.get(f"http://127.0.0.1:{gate.admin_port}/readyz") as response:
            assert response.status == 200
        samples = await scrape(gate)
        detected = "https" if model is tls else "http"
        info = {"configured": "auto", "detected": detected}
        assert sample(samples, "servegate_upstream_scheme_info", **info) == 1


@pytest.mark.slow
async def test_auto_follows_a_server_that_switches_to_tls_without_the_client_noticing(
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
    certificates: Certificates,
    client: aiohttp.ClientSession,
) -> None:
    plain = gunicorn()
    gate = await start_gate(
        plain.url,
        **{"upstream.scheme": "auto", "upstream.tls.ca_file": str(certificates.ca_file)},
    )
    async with client.get(gate_url(gate, "/health")) as response:
        assert response.status == 200
    plain.stop()
    tls_gunicorn(gunicorn, certificates, port=plain.port)
    async with client.post(gate_url(gate, "/predict"), json={"inputs": [1, 2, 3, 4]}) as response:
        assert response.status == 200  # dropped in plain HTTP, probed, replayed over TLS
    samples = await scrape(gate)
    adopted = {"cause": "plain_to_tls_server", "outcome": "succeeded"}
    assert sample(samples, "servegate_retries_total", **adopted) == 1


async def test_auto_never_downgrades_an_https_url(
    start_gate: StartGate, gunicorn: Callable[..., Gunicorn], client: aiohttp.ClientSession
) -> None:
    model = gunicorn()
    https_url = model.url.replace("http://", "https://")
    gate = await start_gate(https_url, **{"upstream.scheme": "auto"})
    async with client.get(gate_url(gate, "/health")) as response:
        await assert_4503(response, 503, "protocol", "tls_to_plain_server")
    async with client.get(f"http://127.0.0.1:{gate.admin_port}/readyz") as response:
        assert response.status == 503


async def test_an_untrusted_certificate_is_named_with_the_reason_and_a_ca_file_fixes_it(
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
    certificates: Certificates,
    client: aiohttp.ClientSession,
) -> None:
    model = tls_gunicorn(gunicorn, certificates)
    untrusting = await start_gate(model.url)
    async with client.get(gate_url(untrusting, "/health")) as response:
        body = await assert_4503(response, 503, "protocol", "tls_certificate")
    assert "Reason: " in body["hint"]
    assert "unable to get local issuer certificate" in body["hint"]
    trusting = await start_gate(model.url, **{"upstream.tls.ca_file": str(certificates.ca_file)})
    async with client.get(gate_url(trusting, "/health")) as response:
        assert response.status == 200


async def test_verification_can_be_switched_off_with_a_loud_warning(
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
    certificates: Certificates,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    model = tls_gunicorn(gunicorn, certificates)
    gate = await start_gate(model.url, **{"upstream.tls.verify": False})
    async with client.get(gate_url(gate, "/health")) as response:
        assert response.status == 200
    warning = log_capture.events("upstream.tls_verification_disabled")
    assert warning
    assert warning[0]["level"] == "warning"


async def test_a_client_certificate_is_presented_to_a_server_that_requires_one(
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
    certificates: Certificates,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    client_cert = certificates.ca.issue_cert("servegate@example.test")
    pem = tmp_path / "client.pem"
    client_cert.private_key_and_cert_chain_pem.write_to_path(pem)
    model = gunicorn(
        "--cert-reqs", "2", "--ca-certs", str(certificates.ca_file),  # CERT_REQUIRED
        certfile=certificates.cert_file, keyfile=certificates.key_file,
    )  # fmt: skip
    trust = {"upstream.tls.ca_file": str(certificates.ca_file)}
    anonymous = await start_gate(model.url, **trust)
    for _ in range(4):  # TLS 1.3 refuses the missing certificate after the handshake
        async with client.get(gate_url(anonymous, "/health")) as response:
            assert response.status == 503
            body = await response.json()
            # The protocol, never a worker dying: no restart, no crash loop.
            assert (body["category"], body["cause"]) == ("protocol", "tls_handshake")
            assert "certificate required" in body["hint"]
    assert sample(await scrape(anonymous), "servegate_upstream_restarts_total") == 0
    identity = {"upstream.tls.cert_file": str(pem), "upstream.tls.key_file": str(pem)}
    mutual = await start_gate(model.url, **trust, **identity)
    async with client.get(gate_url(mutual, "/health")) as response:
        assert response.status == 200


async def ready_again_speaking(scheme: str, gate: Servegate, client: aiohttp.ClientSession) -> None:
    """Wait, without a request, until the checks have probed the server again and found
    `scheme`, then until /readyz is 200: the next check speaks it, and passes."""
    found = (
        "servegate_upstream_scheme_info",
        frozenset({("configured", "auto"), ("detected", scheme)}),
    )
    deadline = time.monotonic() + 10
    while not (await scrape(gate)).get(found):
        assert time.monotonic() < deadline, "the checks never probed the server again"
        await asyncio.sleep(0.1)
    while True:
        async with client.get(f"http://127.0.0.1:{gate.admin_port}/readyz") as response:
            if response.status == 200:
                return
        assert time.monotonic() < deadline, "readyz never ready again without a request"
        await asyncio.sleep(0.1)


async def test_auto_follows_a_server_that_drops_tls_while_no_request_comes(
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
    certificates: Certificates,
    client: aiohttp.ClientSession,
) -> None:
    """Only the health checks meet the restarted server. Were it left to a request to probe
    again, /readyz would stay 503 for good: an unready pod gets no request."""
    tls = tls_gunicorn(gunicorn, certificates)
    trust = {"upstream.scheme": "auto", "upstream.tls.ca_file": str(certificates.ca_file)}
    gate = await start_gate(f"http://127.0.0.1:{tls.port}", **trust, **{"health.interval": 0.2})
    readyz = f"http://127.0.0.1:{gate.admin_port}/readyz"
    async with client.get(readyz) as response:
        assert response.status == 200  # speaking HTTPS, as the server does
    tls.stop()
    gunicorn(port=tls.port)  # the same address, now plain HTTP
    await ready_again_speaking("http", gate, client)


async def test_https_to_a_plain_server_that_never_answers_the_handshake_is_named_so(
    start_gate: StartGate,
    raw_server: Any,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    """TCP connects, the TLS handshake gets no answer, a plain request line does: servegate
    speaks TLS to a plain server. It was "down", with the circuit open."""
    model = await raw_server(WaitsForARequestLine())
    fast = {"upstream.connect_timeout": 0.5, "health.timeout": 0.3, "health.interval": 0.2}
    gate = await start_gate(f"https://127.0.0.1:{model.port}", **fast)
    async with client.post(gate_url(gate, "/predict"), json={}) as response:
        body = await response.json()
    assert response.status == 503
    assert (body["category"], body["cause"]) == ("protocol", "tls_to_plain_server")
    samples = await scrape(gate)
    assert sample(samples, "servegate_circuit_state") == 0
    async with client.get(f"http://127.0.0.1:{gate.admin_port}/readyz") as ready:
        reason = (await ready.json())["reason"]
    assert ready.status == 503
    assert "protocol/tls_to_plain_server" in reason
    assert "the TLS handshake got no answer" in log_capture.access()[0]["detail"]


async def test_a_server_that_answers_neither_tls_nor_plain_http_is_still_a_connect_timeout(
    start_gate: StartGate, raw_server: Any, client: aiohttp.ClientSession
) -> None:
    """An overloaded TLS server whose kernel still completes TCP looks so: no protocol finding
    there, it stays unreachable (and opens the circuit as before)."""
    model = await raw_server(Silent())
    fast = {"upstream.connect_timeout": 0.5, "health.timeout": 0.3, "retry.connect_wait": 0.5}
    gate = await start_gate(f"https://127.0.0.1:{model.port}", **fast)
    async with client.post(gate_url(gate, "/predict"), json={}) as response:
        body = await response.json()
    assert response.status == 503
    assert body["category"] == "service"
    assert body["cause"] in {"connect_timeout", "circuit_open"}


async def test_auto_follows_a_server_that_takes_up_tls_while_no_request_comes(
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
    certificates: Certificates,
    client: aiohttp.ClientSession,
) -> None:
    """The other way round, with a health path: the checks' failed GETs ask the probe too."""
    plain = gunicorn()
    trust = {"upstream.scheme": "auto", "upstream.tls.ca_file": str(certificates.ca_file)}
    checks = {"health.interval": 0.2, "health.path": "/health"}
    gate = await start_gate(plain.url, **trust, **checks)
    readyz = f"http://127.0.0.1:{gate.admin_port}/readyz"
    async with client.get(readyz) as response:
        assert response.status == 200
    plain.stop()
    tls_gunicorn(gunicorn, certificates, port=plain.port)
    await ready_again_speaking("https", gate, client)


async def test_a_tls_server_that_refuses_servegates_versions_still_speaks_tls(
    certificates: Certificates,
) -> None:
    """A TLS 1.0-only server answers servegate's hello with a protocol-version alert: a TLS
    server all the same, never a plain one (whose fix, an http:// URL, would be wrong)."""
    legacy = tls10_only(certificates)
    listening = socket.create_server(("127.0.0.1", 0))
    listening.settimeout(10)

    def serve_one() -> None:  # OpenSSL's own server, which sends its alert before closing
        connection, _ = listening.accept()
        with connection, contextlib.suppress(OSError):
            connection.settimeout(10)
            legacy.wrap_socket(connection, server_side=True)

    server = threading.Thread(target=serve_one, daemon=True)
    server.start()
    try:
        port = listening.getsockname()[1]
        assert await speaks_tls("127.0.0.1", port, 5.0) is True
    finally:
        server.join(10)
        listening.close()


async def test_plain_http_after_the_tls_handshake_is_a_protocol_error_not_a_crash(
    start_gate: StartGate, certificates: Certificates, client: aiohttp.ClientSession
) -> None:
    """The handshake completes, then the answer comes as plain text (a terminator set up
    wrong): servegate's TLS layer drops the connection on records that are no TLS. That was
    `reset_during_request`, a restart each, and a crash loop by the third request."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert_file, certificates.key_file)

    def answer_in_plain_text(connection: socket.socket, stop: threading.Event) -> None:
        tls = context.wrap_socket(connection, server_side=True)
        if tls.recv(65536):
            # The answer written under the TLS layer, on the raw socket.
            with socket.socket(fileno=os.dup(tls.fileno())) as raw:
                raw.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                stop.wait(1)
        tls.close()

    with threaded_server(answer_in_plain_text) as port:
        url = f"https://127.0.0.1:{port}"
        gate = await start_gate(url, **{"upstream.tls.ca_file": str(certificates.ca_file)})
        for _ in range(3):
            async with client.get(gate_url(gate, "/predict")) as response:
                body = await response.json()
                assert (body["category"], body["cause"]) == ("protocol", "malformed_response")
        samples = await scrape(gate)
    assert sample(samples, "servegate_upstream_restarts_total") == 0
    assert sample(samples, "servegate_upstream_crash_loop") == 0
