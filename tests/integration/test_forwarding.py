"""Forwarding on the data port: what the model server receives and what the client gets back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.conftest import StartGate, gate_url, sample, scrape
from tests.upstreams.apps import Recorder, recording_app
from tests.upstreams.gunicorn import Gunicorn
from tests.upstreams.raw import HoldsRequests


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"])
async def test_every_method_and_its_body_reach_the_model_server(
    method: str,
    start_gate: StartGate,
    upstream_url: str,
    recorder: Recorder,
    client: aiohttp.ClientSession,
) -> None:
    gate = await start_gate(upstream_url)
    body = f"payload for {method}".encode()
    async with client.request(method, gate_url(gate, "/anything"), data=body) as response:
        assert response.status == 200
        assert response.headers["X-Upstream-Method"] == method
        assert await response.read() == body
    assert recorder.last().method == method
    assert recorder.last().body == body


@pytest.mark.parametrize(
    "target",
    [
        "/a%2Fb/../c?q=%41&q=2&empty=&plus=a+b",
        "//double//slashes?x=%zz",
        "/caf%C3%A9;matrix=1?sp=%20&amp=%26",
    ],
)
async def test_path_and_query_are_forwarded_byte_for_byte(
    target: str, start_gate: StartGate, upstream_url: str, recorder: Recorder
) -> None:
    gate = await start_gate(upstream_url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    assert status_line.startswith(b"HTTP/1.1 200")
    assert recorder.last().raw_path == target


async def test_headers_keep_order_and_repeats_and_lose_hop_by_hop_ones(
    start_gate: StartGate, upstream_url: str, recorder: Recorder
) -> None:
    gate = await start_gate(upstream_url)
    request = (
        "POST /h HTTP/1.1\r\nHost: model.example\r\nX-Multi: one\r\nX-Other: x\r\n"
        "X-Multi: two\r\nConnection: keep-alive, X-Named-Hop\r\nX-Named-Hop: secret\r\n"
        "Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic abc\r\n"
        "X-Forwarded-For: 203.0.113.7\r\nX-Request-Id: abc-123\r\nContent-Length: 2\r\n\r\nhi"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(request.encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 200")
    assert b"X-Request-Id: abc-123" in head
    seen = recorder.last()
    names = [name.lower() for name, _ in seen.headers]
    for hop in ("connection", "keep-alive", "te", "proxy-authorization", "x-named-hop"):
        assert hop not in names
    multi = [value for name, value in seen.headers if name == "X-Multi"]
    assert multi == ["one", "two"]
    assert names.index("x-multi") < names.index("x-other")
    headers = CIMultiDict(seen.headers)
    assert headers["Host"] == "model.example"
    assert headers["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == "model.example"
    assert headers["X-Request-Id"] == "abc-123"
    assert 0 < int(headers["X-Servegate-Remaining-Ms"]) <= 39_000
    assert seen.body == b"hi"


async def _request_id_exchange(port: int, field: bytes) -> bytes:
    """The head servegate answers a GET carrying `field` (a header line, or b"") with."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /id HTTP/1.1\r\nHost: model\r\n" + field + b"Connection: close\r\n\r\n")
        async with asyncio.timeout(10):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


@pytest.mark.parametrize(
    "passed",
    [
        b"abc-123",
        b"Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1",  # an AWS trace id
        b"{6F9619FF-8B86-D011-B42D-00C04FC964FF}",
        b"dGhlIHJlcXVlc3Q+aWQ/PQ==",  # base64
        b"batch 7 / item 12",
        b"r" * 300,
    ],
)
async def test_a_clients_request_id_reaches_the_model_and_comes_back_as_sent(
    passed: bytes, start_gate: StartGate, upstream_url: str, recorder: Recorder
) -> None:
    gate = await start_gate(upstream_url)
    head = await _request_id_exchange(gate.data_port, b"X-Request-Id: " + passed + b"\r\n")
    assert b"\r\nX-Request-Id: " + passed + b"\r\n" in head
    assert CIMultiDict(recorder.last().headers).getall("X-Request-Id") == [passed.decode()]


@pytest.mark.parametrize(
    "field", [b"", b"X-Request-Id:\r\n", "X-Request-Id: caf\u00e9\r\n".encode()]
)
async def test_a_request_id_is_created_when_the_client_sends_none_or_one_not_ascii(
    field: bytes, start_gate: StartGate, upstream_url: str, recorder: Recorder
) -> None:
    gate = await start_gate(upstream_url)
    head = await _request_id_exchange(gate.data_port, field)
    created = head.split(b"\r\nX-Request-Id: ", 1)[1].split(b"\r\n", 1)[0].decode()
    assert len(created) == 32
    assert CIMultiDict(recorder.last().headers).getall("X-Request-Id") == [created]


@pytest.mark.parametrize("code", [400, 404, 418, 500, 502, 503])
async def test_upstream_errors_pass_through_untouched(
    code: int, start_gate: StartGate, upstream_url: str, client: aiohttp.ClientSession
) -> None:
    gate = await start_gate(upstream_url)
    url = gate_url(gate, f"/status/{code}?reason=Model%20Says%20No")
    async with client.get(url) as response:
        assert response.status == code
        assert response.reason == "Model Says No"
        assert await response.read() == f"upstream says {code}".encode()
        assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert "X-Hop" not in response.headers
        assert "X-Servegate-Category" not in response.headers


@pytest.mark.parametrize("code", [204, 304])
async def test_bodiless_statuses_pass_through_and_keep_the_connection_usable(
    code: int, start_gate: StartGate, upstream_url: str
) -> None:
    gate = await start_gate(upstream_url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    for _ in range(2):  # a stray body byte would corrupt the second response on this connection
        writer.write(f"GET /status/{code} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(f"HTTP/1.1 {code}".encode())
        assert b"Transfer-Encoding" not in head
        assert b'ETag: "v1"' in head
    writer.close()
    await writer.wait_closed()


async def test_head_keeps_content_length_and_sends_no_body(
    start_gate: StartGate, upstream_url: str
) -> None:
    gate = await start_gate(upstream_url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    for _ in range(2):
        writer.write(b"HEAD /head HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"Content-Length: 1234" in head
    writer.close()
    await writer.wait_closed()


async def test_server_sent_events_reach_the_client_while_the_model_is_still_sending(
    start_gate: StartGate, upstream_url: str, recorder: Recorder, client: aiohttp.ClientSession
) -> None:
    gate = await start_gate(upstream_url)
    async with client.get(gate_url(gate, "/sse")) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        assert first == b"data: first\n\n"
        assert not recorder.release.is_set()  # the model has not finished: this was streamed
        recorder.release.set()
        assert await response.content.read() == b"data: second\n\n"


async def test_a_large_declared_upload_streams_to_the_model_before_it_ends(
    start_gate: StartGate, upstream_url: str, recorder: Recorder, client: aiohttp.ClientSession
) -> None:
    gate = await start_gate(upstream_url, **{"retry.replay_buffer_bytes": 1024})

    async def upload() -> AsyncIterator[bytes]:
        yield b"x" * 4096
        # Only continues once the model has seen the start: servegate did not wait for the end.
        await asyncio.wait_for(recorder.first_chunk_arrived.wait(), 5)
        for _ in range(16):
            yield b"y" * 65536

    size = 4096 + 16 * 65536
    headers = {"Content-Length": str(size)}
    async with client.post(gate_url(gate, "/sink"), data=upload(), headers=headers) as response:
        assert response.status == 200
        assert await response.json() == {"received": size}


async def test_expect_100_continue_is_answered_and_not_forwarded(
    start_gate: StartGate, upstream_url: str, recorder: Recorder
) -> None:
    gate = await start_gate(upstream_url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(
        b"POST /expect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    await writer.drain()
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    await writer.wait_closed()
    assert final.startswith(b"HTTP/1.1 200")
    assert recorder.last().body == b"hello"
    assert "expect" not in [name.lower() for name, _ in recorder.last().headers]


async def test_the_gunicorn_demo_model_answers_a_prediction_through_servegate(
    start_gate: StartGate, gunicorn: Callable[..., Gunicorn], client: aiohttp.ClientSession
) -> None:
    model = gunicorn()
    gate = await start_gate(model.url)
    payload = {"inputs": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}
    async with client.post(gate_url(gate, "/predict"), json=payload) as response:
        assert response.status == 200
        answer = await response.json()
    assert [p["label"] for p in answer["predictions"]] == ["setosa", "virginica"]


async def test_a_request_aiohttp_cannot_parse_gets_a_json_400(start_gate: StartGate) -> None:
    gate = await start_gate("http://127.0.0.1:9")  # never asked
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(b"GET /a b c HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400"
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["error_code"] == "servegate.bad_request"


async def test_credentials_never_reach_the_log(
    start_gate: StartGate, upstream_url: str, client: aiohttp.ClientSession, log_capture: Any
) -> None:
    gate = await start_gate(upstream_url)
    secrets = {"Authorization": "Bearer s3cret-1", "Cookie": "session=s3cret-2"}
    async with client.get(gate_url(gate, "/private?x=1"), headers=secrets) as response:
        assert response.status == 200
    short = {"budget.seconds": 0.6, "budget.margin": 0.1}
    failing = await start_gate("http://127.0.0.1:9", **short)
    async with client.get(gate_url(failing, "/private"), headers=secrets) as response:
        assert response.status == 503
    assert len(log_capture.access()) == 2
    assert "s3cret" not in log_capture.stream.getvalue()


async def test_an_ipv6_model_server_is_reached(
    start_gate: StartGate, aiohttp_server: Any, recorder: Recorder, client: aiohttp.ClientSession
) -> None:
    server = await aiohttp_server(recording_app(recorder), host="::1")
    gate = await start_gate(f"http://[::1]:{server.port}")
    async with client.get(gate_url(gate, "/v6?x=1")) as response:
        assert response.status == 200
    assert recorder.last().raw_path == "/v6?x=1"


async def test_an_absolute_form_target_keeps_its_path_and_query(
    start_gate: StartGate, upstream_url: str, recorder: Recorder
) -> None:
    gate = await start_gate(upstream_url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(b"GET http://model.local/predict?x=%41 HTTP/1.1\r\nHost: model.local\r\n\r\n")
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()
    assert recorder.last().raw_path == "/predict?x=%41"


async def test_a_client_that_leaves_mid_stream_is_not_a_model_failure(
    start_gate: StartGate, upstream_url: str, log_capture: Any
) -> None:
    gate = await start_gate(upstream_url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(b"GET /ticks?count=50&every=0.05 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"data: 1"), 5)
    writer.close()  # the client gives up on the stream
    await writer.wait_closed()
    for _ in range(100):
        if log_capture.access():
            break
        await asyncio.sleep(0.02)
    assert log_capture.access()[-1]["status"] == 499
    assert "cause" not in log_capture.access()[-1]
    samples = await scrape(gate)
    reset = {"category": "service", "cause": "reset_during_request"}
    assert sample(samples, "servegate_4503_total", **reset) == 0


async def test_a_request_cut_by_servegates_own_stop_is_not_logged_as_the_client_leaving(
    start_gate: StartGate, upstream_url: str, log_capture: Any
) -> None:
    """The drain ends after the budget, and cancels what still runs: the client, still
    connected, did not leave (499); servegate closed without an answer (nginx's 444)."""
    settings = {"budget.seconds": 1.5, "budget.margin": 0.1, "budget.scope": "first_byte"}
    gate = await start_gate(upstream_url, **settings)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        writer.write(b"GET /ticks?count=100&every=0.05 HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"data: 1"), 5)
        await gate.stop()
    finally:
        writer.close()
    [line] = log_capture.access()
    assert line["status"] == 444, line


async def test_the_access_line_counts_bytes_sent_before_the_client_left(
    start_gate: StartGate, upstream_url: str, log_capture: Any
) -> None:
    gate = await start_gate(upstream_url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(b"GET /ticks?count=50&every=0.05 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"data: 5"), 10)
    writer.close()
    await writer.wait_closed()
    for _ in range(200):
        if log_capture.access():
            break
        await asyncio.sleep(0.02)
    line = log_capture.access()[-1]
    assert line["status"] == 499
    assert line["bytes_out"] >= 6 * len(b"data: 0\n\n")
    assert line["attempts"] == 1


async def test_the_access_line_counts_the_attempt_when_the_client_leaves_while_the_model_works(
    start_gate: StartGate, raw_server: Any, log_capture: Any
) -> None:
    model = await raw_server(HoldsRequests())
    gate = await start_gate(model.url)
    _reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.5)  # the request is with the model
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(model.closed.wait(), 10)
    for _ in range(200):
        if log_capture.access():
            break
        await asyncio.sleep(0.02)
    line = log_capture.access()[-1]
    assert (line["status"], line["attempts"]) == (499, 1)


async def upload_until_answered(port: int, size: int) -> bytes:
    """POST `size` bytes, reading the answer as they go, as curl does; the answer's head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /predict HTTP/1.1\r\nHost: model\r\nContent-Length: %d\r\n\r\n" % size

    async def upload() -> None:
        writer.write(head + b"x" * size)
        await writer.drain()

    sending = asyncio.create_task(upload())
    try:
        async with asyncio.timeout(20):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        writer.close()


async def test_an_early_answer_to_a_large_upload_reaches_the_client_and_is_no_restart(
    start_gate: StartGate, gunicorn: Callable[..., Gunicorn]
) -> None:
    """The model refuses a body too large from its Content-Length and closes with it unread
    (RFC 9110 §15.5.14): servegate's next write fails, and the 413 that arrived before waits
    in the kernel. Lost, it was a 503 'reset before answering', a restart each, and a crash
    loop that failed /readyz."""
    model = gunicorn("--worker-class", "sync", app="tests.upstreams.refuses_large:app")
    gate = await start_gate(model.url)
    for _ in range(10):  # 20 MB: past upstream.replay_buffer_bytes, so streamed to the model
        head = await upload_until_answered(gate.data_port, 20_000_000)
        assert head.startswith(b"HTTP/1.1 413 "), head
    samples = await scrape(gate)
    assert sample(samples, "servegate_requests_total", code="413", method="POST") == 10
    assert sample(samples, "servegate_upstream_restarts_total") == 0
