"""The data port's listener: HTTPS, HTTP and both on one port; a client speaking the other
protocol is refused with a reason, counted, and logged once per address."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from multidict import CIMultiDict

from proxy.app import Servegate, StartupError
from tests.conftest import (
    Certificates,
    LogCapture,
    StartGate,
    gate_url,
    make_settings,
    require_tool,
    sample,
    scrape,
)
from tests.upstreams.apps import Recorder

MISMATCHES = "servegate_listener_protocol_mismatch_total"


@pytest.fixture
def trusting(certificates: Certificates) -> ssl.SSLContext:
    """A client context that trusts the test CA, and so verifies servegate's certificate."""
    return ssl.create_default_context(cafile=str(certificates.ca_file))


def tls_files(certificates: Certificates, mode: str) -> dict[str, Any]:
    return {
        "server.tls": mode,
        "server.cert_file": str(certificates.cert_file),
        "server.key_file": str(certificates.key_file),
    }


def https_url(gate: Servegate, path: str = "/") -> str:
    return f"https://127.0.0.1:{gate.data_port}{path}"


async def test_auto_serves_http_and_https_on_the_same_port(
    start_gate: StartGate,
    upstream_url: str,
    recorder: Recorder,
    certificates: Certificates,
    trusting: ssl.SSLContext,
    client: aiohttp.ClientSession,
) -> None:
    gate = await start_gate(upstream_url, **tls_files(certificates, "auto"))
    for url, scheme in ((gate_url(gate, "/p"), "http"), (https_url(gate, "/p"), "https")):
        async with client.post(url, data=scheme.encode(), ssl=trusting) as response:
            assert response.status == 200
            assert await response.read() == scheme.encode()
        assert CIMultiDict(recorder.last().headers)["X-Forwarded-Proto"] == scheme


async def test_auto_serves_curl_over_http_and_https_on_the_same_port(
    start_gate: StartGate, upstream_url: str, recorder: Recorder, certificates: Certificates
) -> None:
    curl = require_tool("curl")
    gate = await start_gate(upstream_url, **tls_files(certificates, "auto"))
    for flags, url, scheme in (
        (["-s"], gate_url(gate, "/c"), "http"),
        (["-sk"], https_url(gate, "/c"), "https"),
    ):
        process = await asyncio.create_subprocess_exec(
            curl, *flags, "--max-time", "10", "-d", f"via {scheme}", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        assert out == f"via {scheme}".encode()
        assert CIMultiDict(recorder.last().headers)["X-Forwarded-Proto"] == scheme


async def test_auto_without_files_serves_https_with_a_self_signed_certificate_and_says_so(
    start_gate: StartGate,
    upstream_url: str,
    log_capture: LogCapture,
    client: aiohttp.ClientSession,
) -> None:
    gate = await start_gate(upstream_url, **{"server.tls": "auto"})
    async with client.get(https_url(gate, "/s"), ssl=False) as response:
        assert response.status == 200
        assert response.headers["X-Upstream-Method"] == "GET"
    [line] = log_capture.events("listener.self_signed_certificate")
    assert line["level"] == "warning"
    assert "self-signed certificate" in line["message"]
    _, writer = await asyncio.open_connection(
        "127.0.0.1", gate.data_port, ssl=unverified(), server_hostname="localhost"
    )
    served = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    assert line["sha256"] == hashlib.sha256(served).digest().hex(":").upper()
    certificate = x509.load_der_x509_certificate(served)
    assert certificate.subject.rfc4514_string() == "CN=servegate"
    assert isinstance(certificate.public_key(), ec.EllipticCurvePublicKey)
    assert certificate.public_key().curve.name == "secp256r1"
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert timedelta(days=365) <= lifetime <= timedelta(days=366)
    assert line["valid_until"] == certificate.not_valid_after_utc.isoformat()


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def test_a_plain_port_refuses_a_tls_handshake_counts_it_and_warns_once_per_client(
    start_gate: StartGate,
    upstream_url: str,
    log_capture: LogCapture,
    client: aiohttp.ClientSession,
) -> None:
    gate = await start_gate(upstream_url)  # server.tls: off, the default
    for attempt in (1, 2):
        with pytest.raises(aiohttp.ClientConnectionError):
            async with client.get(https_url(gate), ssl=False):
                pass
        metrics = await scrape(gate)
        assert sample(metrics, MISMATCHES, direction="tls_on_plain_port") == attempt
        assert sample(metrics, MISMATCHES, direction="plain_on_tls_port") == 0
    [line] = log_capture.events("listener.tls_on_plain_port")
    assert line["level"] == "warning"
    assert line["message"] == (
        "a TLS (HTTPS) handshake arrived on servegate's plain-HTTP port from 127.0.0.1; the "
        'client (e.g. the platform\'s "Container API" protocol setting) speaks HTTPS; set '
        "server.tls: auto or on"
    )
    async with client.get(gate_url(gate, "/after")) as response:
        assert response.status == 200
        assert response.headers["X-Upstream-Method"] == "GET"


async def test_a_client_that_distrusts_the_certificate_is_named_once_and_costs_others_nothing(
    start_gate: StartGate,
    upstream_url: str,
    log_capture: LogCapture,
    client: aiohttp.ClientSession,
    trusting: ssl.SSLContext,
) -> None:
    gate = await start_gate(upstream_url, **{"server.tls": "auto"})  # self-signed
    for _ in range(2):
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with client.get(https_url(gate, "/refused"), ssl=trusting):
                pass
    async with client.get(https_url(gate, "/s"), ssl=False) as response:
        assert response.status == 200
    [line] = log_capture.events("listener.tls_handshake_failed")
    assert (line["level"], line["client"]) == ("warning", "127.0.0.1")
    # TLS 1.3 ends servegate's side before the client checks the certificate (on uvloop, so
    # does TLS 1.2): a client that refuses it closes, and only the close arrives.
    assert line["reason"] == "the client closed the connection during the handshake"
    assert "a client that does not trust servegate's certificate" in line["message"]


async def test_a_malformed_tls_handshake_is_named_with_its_reason(
    start_gate: StartGate, upstream_url: str, log_capture: LogCapture
) -> None:
    gate = await start_gate(upstream_url, **{"server.tls": "auto"})
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(b"\x16\x03\x01\x00\x04\x01\x00\x00\x00")  # a ClientHello of nothing
    try:
        async with asyncio.timeout(10):
            while await reader.read(65536):
                pass  # servegate's alert, then its close
    finally:
        writer.close()
    [line] = log_capture.events("listener.tls_handshake_failed")
    assert line["client"] == "127.0.0.1"
    assert line["reason"] != "the client closed the connection during the handshake"
    assert line["reason"] in line["message"]
    assert "certificate" not in line["message"]  # no certificate was sent: none was refused


async def test_tls_on_answers_plain_http_with_a_400_naming_the_fix_and_serves_https(
    start_gate: StartGate,
    upstream_url: str,
    certificates: Certificates,
    trusting: ssl.SSLContext,
    log_capture: LogCapture,
    client: aiohttp.ClientSession,
) -> None:
    gate = await start_gate(upstream_url, **tls_files(certificates, "on"))
    for attempt in (1, 2):
        reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)  # until servegate closes
        writer.close()
        await writer.wait_closed()
        head, _, body = answer.partition(b"\r\n\r\n")
        request_id = json.loads(body)["request_id"]
        assert head.split(b"\r\n") == [
            b"HTTP/1.1 400 Bad Request",
            b"X-Request-Id: " + request_id.encode(),
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        assert json.loads(body) == {
            "error_code": "servegate.bad_request",
            "error_msg": "plain HTTP was sent to servegate's HTTPS port; use https:// or set "
            "server.tls: auto",
            "request_id": request_id,
        }
        metrics = await scrape(gate)
        assert sample(metrics, MISMATCHES, direction="plain_on_tls_port") == attempt
    [line] = log_capture.events("listener.plain_on_tls_port")
    assert line["level"] == "warning"
    assert "plain HTTP arrived on servegate's HTTPS port from 127.0.0.1" in line["message"]
    assert "use https:// or set server.tls: auto" in line["message"]
    async with client.get(https_url(gate, "/secure"), ssl=trusting) as response:
        assert response.status == 200
        assert response.headers["X-Upstream-Method"] == "GET"


@pytest.mark.slow
async def test_a_silent_connection_is_closed_after_the_first_byte_timeout_without_holding_up_others(
    start_gate: StartGate,
    upstream_url: str,
    client: aiohttp.ClientSession,
) -> None:
    gate = await start_gate(upstream_url, **{"server.first_byte_timeout": 2.0})
    opened = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    async with client.get(gate_url(gate, "/meanwhile")) as response:
        assert response.status == 200
    assert time.monotonic() - opened < 2.0  # served while the silent one was still waiting
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by servegate
    assert time.monotonic() - opened >= 1.95
    writer.close()
    await writer.wait_closed()


def slow_app(arrived: list[str]) -> web.Application:
    async def slow(request: web.Request) -> web.Response:
        arrived.append(request.path)
        await asyncio.sleep(0.5)
        return web.Response(text="finished")

    app = web.Application()
    app.router.add_get("/slow", slow)
    return app


@pytest.mark.time_limit(20)
async def test_stopping_lets_in_flight_http_and_https_requests_finish(
    start_gate: StartGate,
    aiohttp_server: Any,
    certificates: Certificates,
    trusting: ssl.SSLContext,
    client: aiohttp.ClientSession,
) -> None:
    arrived: list[str] = []
    upstream = await aiohttp_server(slow_app(arrived))
    gate = await start_gate(f"http://127.0.0.1:{upstream.port}", **tls_files(certificates, "auto"))

    async def fetch(url: str) -> tuple[int, str]:
        async with client.get(url, ssl=trusting) as response:
            return response.status, await response.text()

    in_flight = [
        asyncio.create_task(fetch(url))
        for url in (gate_url(gate, "/slow"), https_url(gate, "/slow"))
    ]
    for _ in range(500):  # up to 5 s, until both requests are at the model
        if len(arrived) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(arrived) == 2
    await gate.stop()
    assert await asyncio.gather(*in_flight) == [(200, "finished"), (200, "finished")]
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        await asyncio.open_connection("127.0.0.1", gate.data_port)


async def start_with_files(cert_file: Path, key_file: Path) -> StartupError:
    settings = make_settings(
        **{
            "upstream.url": "http://127.0.0.1:1",
            "server.tls": "on",
            "server.cert_file": str(cert_file),
            "server.key_file": str(key_file),
        }
    )
    with pytest.raises(StartupError) as raised:
        await Servegate(settings).start()
    return raised.value


async def test_a_certificate_without_its_key_stops_start_up_with_one_clear_line(
    certificates: Certificates, log_capture: LogCapture
) -> None:
    problem = await start_with_files(certificates.ca_file, certificates.key_file)
    assert str(problem).startswith(
        f"cannot load server.cert_file {certificates.ca_file} with server.key_file "
        f"{certificates.key_file}: "
    )
    assert str(problem).endswith("(both must be PEM, and the key must be the certificate's)")


async def test_an_encrypted_key_stops_start_up_instead_of_prompting_for_its_password(
    certificates: Certificates, log_capture: LogCapture, tmp_path: Path
) -> None:
    key = serialization.load_pem_private_key(certificates.key_file.read_bytes(), None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    problem = await start_with_files(certificates.cert_file, encrypted)
    assert str(problem) == (f"server.key_file {encrypted} is encrypted: servegate needs it plain")


async def test_auto_serves_both_on_ipv6_loopback(
    start_gate: StartGate,
    upstream_url: str,
    certificates: Certificates,
    client: aiohttp.ClientSession,
) -> None:
    gate = await start_gate(
        upstream_url, **{"server.listen": "[::1]:0", **tls_files(certificates, "auto")}
    )
    for url in (f"http://[::1]:{gate.data_port}/v6", f"https://[::1]:{gate.data_port}/v6"):
        async with client.get(url, ssl=False) as response:
            assert response.status == 200
