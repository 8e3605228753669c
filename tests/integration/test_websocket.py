"""Upgrades (RFC 9110 §7.8): a WebSocket passes through servegate, counted, and can be switched
off."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Certificates, LogCapture, StartGate, gate_url, sample, scrape
from tests.integration.test_down_fast import accepting_nothing
from tests.upstreams.gunicorn import Gunicorn, free_port
from tests.upstreams.misbehaving import WaitsForARequestLine
from tests.upstreams.recording import RecordingModel

UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Key": "k"}


def echo_app() -> web.Application:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo: {message.data}")
            elif message.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    return app


async def test_a_websocket_echo_works_through_servegate_and_is_counted(
    start_gate: StartGate,
    aiohttp_server: Any,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    model = await aiohttp_server(echo_app())
    gate = await start_gate(f"http://127.0.0.1:{model.port}")
    async with client.ws_connect(gate_url(gate, "/ws")) as ws:
        during = await scrape(gate)
        for text in ("hello", "caf\u00e9", "x" * 100_000):
            await ws.send_str(text)
            assert await ws.receive_str(timeout=10) == f"echo: {text}"
        await ws.send_bytes(b"\x00\x01\xff")
        assert await ws.receive_bytes(timeout=10) == b"\xff\x01\x00"
    assert sample(during, "servegate_upgraded_connections_inflight") == 1
    samples = await scrape(gate)
    assert sample(samples, "servegate_upgraded_connections_total") == 1
    for _ in range(100):  # the session's line is written once the pipe has closed
        if log_capture.access():
            break
        await asyncio.sleep(0.02)
    [line] = log_capture.access()
    assert line["bytes_in"] > 100_000 < line["bytes_out"]  # the frames, both ways


async def test_upgrades_switched_off_reach_the_model_as_plain_http(
    start_gate: StartGate, raw_server: Any, client: aiohttp.ClientSession
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url, **{"server.upgrades": False})
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Key": "k"}
    async with client.get(gate_url(gate, "/ws"), headers=headers) as response:
        assert response.status == 200
        assert await response.read() == b"ok"
    seen = model.last()
    assert seen.header(b"upgrade") == []
    assert seen.header(b"connection") == []
    assert seen.header(b"sec-websocket-key") == [b"k"]


async def test_an_upgrade_offered_on_a_request_with_a_body_is_ignored_not_made_a_get(
    start_gate: StartGate, raw_server: Any, client: aiohttp.ClientSession
) -> None:
    """curl offers HTTP/2 (`Upgrade: h2c`) on a POST with its body: the POST and its body reach
    the model as sent, as plain HTTP (RFC 9110 §7.8 lets a server ignore an Upgrade), rather
    than a bodiless GET handshake."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    headers = {
        "Connection": "Upgrade, HTTP2-Settings",
        "Upgrade": "h2c",
        "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA",
    }
    async with client.post(gate_url(gate, "/predict"), data=b'{"x": 1}', headers=headers) as answer:
        assert answer.status == 200
        assert await answer.read() == b"ok"
    seen = model.last()
    assert seen.request_line == b"POST /predict HTTP/1.1"
    assert seen.body == b'{"x": 1}'
    assert seen.header(b"upgrade") == []
    assert seen.header(b"http2-settings") == []  # named by Connection: hop-by-hop


async def test_a_bodiless_upgrade_reaches_the_model_with_the_clients_method(
    start_gate: StartGate, raw_server: Any, client: aiohttp.ClientSession
) -> None:
    model = await raw_server(RecordingModel(close_after=True))
    gate = await start_gate(model.url)
    headers = {"Connection": "Upgrade", "Upgrade": "example/1"}
    async with client.options(gate_url(gate, "/predict"), headers=headers) as answer:
        assert answer.status == 200
        assert await answer.read() == b"ok"
    seen = model.last()
    assert seen.request_line == b"OPTIONS /predict HTTP/1.1"
    assert seen.header(b"upgrade") == [b"example/1"]
    # The handshake is an attempt like any other: the model hears the budget left.
    [remaining] = seen.header(b"x-servegate-remaining-ms")
    assert 0 < int(remaining) <= 40_000


async def test_a_refused_handshake_is_relayed_as_the_model_answered(
    start_gate: StartGate, raw_server: Any, client: aiohttp.ClientSession
) -> None:
    refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno"
    model = await raw_server(RecordingModel(answer=lambda _seen: refusal, close_after=True))
    gate = await start_gate(model.url)
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Key": "k"}
    async with client.get(gate_url(gate, "/ws"), headers=headers) as response:
        assert response.status == 403
        assert await response.read() == b"no"
        # What servegate adds to every answer without them, as the other answers get it.
        assert len(response.headers.getall("X-Request-Id")) == 1
        assert len(response.headers.getall("Date")) == 1
    assert model.last().header(b"upgrade") == [b"websocket"]
    assert len(model.last().header(b"x-servegate-remaining-ms")) == 1
    assert sample(await scrape(gate), "servegate_upgraded_connections_total") == 0


HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: model\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: k\r\n\r\n"
)
NEXT = b"POST /predict HTTP/1.1\r\nHost: model\r\nContent-Length: 2\r\n\r\nhi"
CHUNKED_BODY = b"4;ext=1\r\nnope\r\n0\r\nX-Trailer: t\r\n\r\n"


async def handshake_then_more(port: int) -> bytes:
    """A refused handshake, then another request on the same connection: all the client
    receives until servegate closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(HANDSHAKE)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(NEXT)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read(-1)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (b"Content-Length: 4", b"nope"),
        (b"Transfer-Encoding: chunked", CHUNKED_BODY),
        (b"Content-Length: 0", b""),
    ],
    ids=["length", "chunked", "empty"],
)  # fmt: skip
async def test_a_refused_handshake_is_one_answer_and_nothing_after_it_reaches_the_model(
    framing: bytes, body: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    """A model that refuses the upgrade and keeps its connection open: the client gets that
    answer whole, told the connection closes, and its next request goes nowhere, rather than
    down a raw pipe past servegate's limits, budget, logs and metrics."""
    refusal = b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nConnection: Upgrade, "
    refusal += b"keep-alive\r\n" + framing + b"\r\n\r\n" + body
    model = await raw_server(RecordingModel(answer=lambda _seen: refusal))
    gate = await start_gate(model.url)
    raw = await handshake_then_more(gate.data_port)
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 426 Upgrade Required"
    assert b"Upgrade: websocket" in lines  # what a 426 must say (RFC 9110 §15.5.22)
    assert b"Connection: close" in lines
    assert not [line for line in lines if line.lower().startswith(b"connection: upgrade")]
    assert rest == body  # to the end of its framing, byte for byte, and nothing more
    assert [seen.request_line for seen in model.seen] == [b"GET /ws HTTP/1.1"]
    samples = await scrape(gate)
    assert sample(samples, "servegate_upgraded_connections_total") == 0
    assert sample(samples, "servegate_upgraded_connections_inflight") == 0


async def test_a_refusal_read_until_the_model_closes_reaches_the_client_whole(
    start_gate: StartGate, raw_server: Any
) -> None:
    refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n\r\nno upgrades here"
    model = await raw_server(RecordingModel(answer=lambda _seen: refusal, close_after=True))
    gate = await start_gate(model.url)
    raw = await handshake_then_more(gate.data_port)
    assert raw.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert raw.endswith(b"\r\n\r\nno upgrades here")
    assert len(model.seen) == 1


async def test_interim_answers_before_the_handshakes_answer_are_relayed_and_do_not_end_it(
    start_gate: StartGate, raw_server: Any
) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    refusal = early + b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 3\r\n\r\nwho"
    model = await raw_server(RecordingModel(answer=lambda _seen: refusal))
    gate = await start_gate(model.url)
    raw = await handshake_then_more(gate.data_port)
    assert raw.startswith(early + b"HTTP/1.1 401 Unauthorized\r\n")
    assert raw.endswith(b"\r\n\r\nwho")
    assert len(model.seen) == 1


async def test_a_refusals_body_that_looks_like_a_field_is_body_not_head(
    start_gate: StartGate, raw_server: Any
) -> None:
    body = b"content-length: see the docs\r\n\r\n"
    refusal = b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    model = await raw_server(RecordingModel(answer=lambda _seen: refusal))
    gate = await start_gate(model.url)
    raw = await handshake_then_more(gate.data_port)
    assert raw.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert raw.endswith(b"\r\n\r\n" + body)


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 426 Upgrade Required\r\n"
         b"Content-Length: 0\r\n\r\n", 426),
        (b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 401 Unauthorized\r\nContent-Length: x\r\n"
         b"\r\n", 503),
    ],
    ids=["interim-then-refusal", "interim-then-broken-length"],
)  # fmt: skip
async def test_the_final_answer_after_interim_ones_is_what_is_judged_and_logged(
    answer: bytes,
    status: int,
    start_gate: StartGate,
    raw_server: Any,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    model = await raw_server(RecordingModel(answer=lambda _seen: answer))
    gate = await start_gate(model.url)
    if status == 503:  # checked before anything was relayed, the interim answer included
        async with client.get(gate_url(gate, "/ws"), headers=UPGRADE) as response:
            assert response.status == 503
            body = await response.json()
        assert body["cause"] == "malformed_response"
    else:
        raw = await handshake_then_more(gate.data_port)
        assert raw.startswith(b"HTTP/1.1 103 Early Hints\r\n")
    [line] = log_capture.access()
    assert line["status"] == status
    counted = sample(await scrape(gate), "servegate_requests_total", method="GET", code=str(status))
    assert counted == 1


async def test_a_refusal_with_a_broken_content_length_is_the_models_fault_not_relayed(
    start_gate: StartGate,
    raw_server: Any,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3, 4\r\n\r\nnope"
    model = await raw_server(RecordingModel(answer=lambda _seen: refusal))
    gate = await start_gate(model.url)
    async with client.get(gate_url(gate, "/ws"), headers=UPGRADE) as response:
        assert response.status == 503
        body = await response.json()
    assert (body["category"], body["cause"]) == ("protocol", "malformed_response")
    [line] = log_capture.access()
    assert "invalid Content-Length" in line["detail"]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ([b"Set-Cookie: " + b"c" * 9000], "upstream.max_response_header_bytes"),
        ([b"X-%d: v" % n for n in range(200)], "upstream.max_response_headers"),
    ],
    ids=["long-line", "many-fields"],
)  # fmt: skip
async def test_a_handshake_answer_over_the_head_limits_is_a_502_naming_the_setting(
    fields: list[bytes],
    named: str,
    start_gate: StartGate,
    raw_server: Any,
    client: aiohttp.ClientSession,
) -> None:
    """The same head limits as every other answer, and the same cause."""
    refusal = b"\r\n".join([b"HTTP/1.1 401 Unauthorized", *fields, b"Content-Length: 0", b"", b""])
    model = await raw_server(RecordingModel(answer=lambda _seen: refusal, close_after=True))
    gate = await start_gate(model.url)
    async with client.get(gate_url(gate, "/ws"), headers=UPGRADE) as response:
        assert response.status == 502
        body = await response.json()
    assert (body["category"], body["cause"]) == ("protocol", "response_header_too_large")
    assert named in body["hint"] or named in str(body)


async def test_a_handshake_answer_within_the_head_limits_is_relayed_however_long(
    start_gate: StartGate, raw_server: Any, client: aiohttp.ClientSession
) -> None:
    """40 fields of 8,000 bytes: 320 KB of head, each line within its limit."""
    fields = [b"X-%d: %s" % (n, b"v" * 8000) for n in range(40)]
    refusal = b"\r\n".join([b"HTTP/1.1 401 Unauthorized", *fields, b"Content-Length: 0", b"", b""])
    model = await raw_server(RecordingModel(answer=lambda _seen: refusal, close_after=True))
    gate = await start_gate(model.url)
    async with client.get(gate_url(gate, "/ws"), headers=UPGRADE) as response:
        assert response.status == 401
        assert response.headers["X-39"] == "v" * 8000


@pytest.mark.parametrize("server", ["silent", "refusing", "untrusted_tls", "plain_behind_https"])
async def test_a_handshake_that_cannot_connect_is_named_as_every_other_connect(
    server: str,
    start_gate: StartGate,
    client: aiohttp.ClientSession,
    gunicorn: Callable[..., Gunicorn],
    certificates: Certificates,
    raw_server: Any,
) -> None:
    """The same cause as a request's attempt gets: never a refusal for a timeout or a
    certificate."""
    expected = {
        "silent": ("service", "connect_timeout"),
        "refusing": ("service", "connect_refused"),
        "untrusted_tls": ("protocol", "tls_certificate"),
        "plain_behind_https": ("protocol", "tls_to_plain_server"),  # answers no handshake
    }[server]
    with accepting_nothing() as silent:
        if server == "silent":
            url = f"http://127.0.0.1:{silent}"
        elif server == "refusing":
            url = f"http://127.0.0.1:{free_port()}"
        elif server == "untrusted_tls":
            url = gunicorn(certfile=certificates.cert_file, keyfile=certificates.key_file).url
        else:
            url = f"https://127.0.0.1:{(await raw_server(WaitsForARequestLine())).port}"
        gate = await start_gate(url, **{"upstream.connect_timeout": 0.3})
        async with client.get(gate_url(gate, "/ws"), headers=UPGRADE) as response:
            body = await response.json()
        assert response.status == 503
        assert (body["category"], body["cause"]) == expected


@pytest.mark.parametrize("connection", [b"Upgrade", b"Upgrade, keep-alive"])
async def test_an_http10_upgrade_is_ignored_and_the_request_goes_on_as_plain_http(
    connection: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    """RFC 9110 §7.8: a server must ignore Upgrade in an HTTP/1.0 request; it went to the model
    as an HTTP/1.1 handshake without Host, and a 101 reached the HTTP/1.0 client."""
    model = await raw_server(RecordingModel(close_after=True))
    gate = await start_gate(model.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        writer.write(
            b"GET /ws HTTP/1.0\r\nUpgrade: websocket\r\nConnection: %s\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % connection
        )
        async with asyncio.timeout(10):  # the connection closes after the answer
            answer = await reader.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.0 200 OK\r\n")
    seen = model.last()
    assert seen.header(b"upgrade") == []
    assert len(seen.header(b"host")) == 1
