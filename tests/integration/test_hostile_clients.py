"""Hostile or broken clients, over raw sockets: each gets a clear 4xx with the JSON body (or a
closed connection where no answer fits), the model never sees it, and a normal request still
succeeds afterwards."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from proxy import listener
from proxy.app import Servegate
from tests.conftest import (
    Certificates,
    LogCapture,
    StartGate,
    gate_url,
    no_descriptor_left,
    sample,
    scrape,
)
from tests.upstreams.apps import Busy, Recorder, busy_app
from tests.upstreams.recording import RecordingModel


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        assert self.headers["content-type"].startswith("application/json")
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One response with a Content-Length body, as a client reads it off the socket."""
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(int(status_line.split()[1]), headers, body)


async def send_raw(gate: Servegate, data: bytes) -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.close()
        await writer.wait_closed()


async def assert_still_serves(gate: Servegate, recorder: Recorder) -> None:
    seen = len(recorder.seen)
    async with (
        aiohttp.ClientSession() as client,
        client.post(gate_url(gate, "/after"), data=b"fine") as response,
    ):
        assert response.status == 200
        assert await response.read() == b"fine"
    assert len(recorder.seen) == seen + 1


HEAD = b"POST /predict HTTP/1.1\r\nHost: model\r\n"
SMUGGLING_AND_GARBAGE = {
    "content_length_with_transfer_encoding": (
        HEAD + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        {400},
    ),
    "conflicting_content_lengths": (
        HEAD + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        {400},
    ),
    "duplicate_content_lengths": (
        HEAD + b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
        {400},
    ),
    "garbage_request_line": (b"\x01\x02 hello there\r\n\r\n", {400}),
    # RFC 9112 §3.2: a Host that is no host[:port] (it would reach the model, and its URLs).
    **{
        f"host_{name}": (b"GET /h HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", {400})
        for name, host in [
            ("with_a_space", b"a b"),
            ("with_userinfo", b"user@evil.example"),
            ("with_a_path", b"a/b?c"),
            ("with_raw_bytes", b"\xff\xfe"),
            ("with_two_colons", b"a:b:c"),
        ]
    },
    "request_line_with_a_bare_lf_and_two_targets": (b"GET /a /b HTTP/1.1\nHost: m\n\n", {400}),
    "control_byte_in_header_value": (HEAD + b"X-Bad: a\x00b\r\nContent-Length: 0\r\n\r\n", {400}),
    "space_in_header_name": (HEAD + b"X Bad: value\r\nContent-Length: 0\r\n\r\n", {400}),
    # Another developer answers oversized heads with 431; either is a clear refusal.
    "a_200_kb_header": (HEAD + b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n", {400, 431}),
    "five_thousand_headers": (
        HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n",
        {400, 431},
    ),
}


@pytest.mark.parametrize("shape", SMUGGLING_AND_GARBAGE)
async def test_smuggling_shapes_and_garbage_get_a_json_4xx_and_never_reach_the_model(
    shape: str, start_gate: StartGate, upstream_url: str, recorder: Recorder
) -> None:
    data, statuses = SMUGGLING_AND_GARBAGE[shape]
    gate = await start_gate(upstream_url)
    answer = await send_raw(gate, data)
    assert answer.status in statuses
    assert "server" not in answer.headers  # no versions of aiohttp and Python on show
    assert answer.json()["error_code"] == "servegate.bad_request"
    assert answer.json()["error_msg"]
    assert recorder.seen == []
    await assert_still_serves(gate, recorder)


async def test_connect_is_answered_405_with_allow_and_never_forwarded(
    start_gate: StartGate, upstream_url: str, recorder: Recorder, log_capture: LogCapture
) -> None:
    gate = await start_gate(upstream_url)
    answer = await send_raw(
        gate, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    )
    assert answer.status == 405
    assert answer.headers["allow"] == "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
    assert answer.headers["connection"] == "close"
    assert "server" not in answer.headers
    body = answer.json()
    assert body["error_code"] == "servegate.bad_request"
    assert body["error_msg"] == "CONNECT is not served"
    assert body["request_id"] == answer.headers["x-request-id"]
    assert recorder.seen == []
    [line] = log_capture.access()
    assert (line["method"], line["status"]) == ("CONNECT", 405)
    await assert_still_serves(gate, recorder)


async def test_an_absolute_form_target_goes_to_the_configured_upstream_with_its_host(
    start_gate: StartGate, upstream_url: str, recorder: Recorder
) -> None:
    """RFC 9112 §3.2.2: accepted, and its authority becomes Host; it never picks the server."""
    gate = await start_gate(upstream_url)
    answer = await send_raw(
        gate,
        b"GET http://other-host:81/x?q=1 HTTP/1.1\r\nHost: mine\r\nConnection: close\r\n\r\n",
    )
    assert answer.status == 200
    [seen] = recorder.seen
    assert seen.raw_path == "/x?q=1"
    hosts = [value for name, value in seen.headers if name.lower() == "host"]
    assert hosts == ["other-host:81"]


async def test_a_body_declared_over_max_body_bytes_is_answered_413_before_it_is_sent(
    start_gate: StartGate, upstream_url: str, recorder: Recorder
) -> None:
    gate = await start_gate(upstream_url, **{"server.max_body_bytes": 1000})
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(HEAD + b"Content-Length: 1001\r\n\r\n")  # the head only: no body byte sent
    answer = await read_answer(reader)
    writer.close()
    await writer.wait_closed()
    assert answer.status == 413
    assert answer.json()["error_msg"] == "body over server.max_body_bytes (1000)"
    assert answer.headers["connection"] == "close"
    assert recorder.seen == []
    # At the limit is still served.
    exact = await send_raw(gate, HEAD + b"Content-Length: 1000\r\n\r\n" + b"x" * 1000)
    assert exact.status == 200
    await assert_still_serves(gate, recorder)


async def trickle(writer: asyncio.StreamWriter, lines: int, every: float) -> None:
    """A slowloris head: one header line per `every` seconds, never the blank line."""
    for number in range(lines):
        writer.write(b"X-Slow-%d: still coming\r\n" % number)
        await writer.drain()
        await asyncio.sleep(every)


@pytest.mark.time_limit(30)
async def test_slowloris_headers_get_a_408_within_the_header_timeout_and_are_counted(
    start_gate: StartGate, upstream_url: str, recorder: Recorder, log_capture: LogCapture
) -> None:
    gate = await start_gate(upstream_url, **{"server.header_timeout": 1.0})
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    began = time.monotonic()
    writer.write(b"GET /slow HTTP/1.1\r\nHost: model\r\n")
    dripping = asyncio.create_task(trickle(writer, lines=60, every=0.2))
    try:
        answer = await read_answer(reader)
        elapsed = time.monotonic() - began
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and the connection closed
    finally:
        dripping.cancel()
        writer.close()
    assert answer.status == 408
    assert answer.json()["error_code"] == "servegate.header_timeout"
    assert answer.json()["request_id"] == answer.headers["x-request-id"]
    assert 0.9 <= elapsed < 5  # the timeout, with room for a loaded machine
    assert recorder.seen == []
    metrics = await scrape(gate)
    assert sample(metrics, "servegate_client_timeouts_total", phase="headers") == 1
    [line] = log_capture.events("request.rejected")
    assert line["status"] == 408
    assert "server.header_timeout" in line["reason"]
    await assert_still_serves(gate, recorder)


@pytest.mark.time_limit(30)
async def test_the_header_timeout_applies_to_every_request_of_a_keep_alive_connection(
    start_gate: StartGate, upstream_url: str, recorder: Recorder
) -> None:
    gate = await start_gate(upstream_url, **{"server.header_timeout": 1.0})
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        for _ in range(2):  # idle time between requests is the keep-alive's, not the head's
            writer.write(b"GET /first HTTP/1.1\r\nHost: model\r\n\r\n")
            assert (await read_answer(reader)).status == 200
            await asyncio.sleep(1.5)
        writer.write(b"GET /second HTTP/1.1\r\nHost: model\r\n")
        began = time.monotonic()
        dripping = asyncio.create_task(trickle(writer, lines=60, every=0.2))
        answer = await read_answer(reader)
        assert time.monotonic() - began < 5
        dripping.cancel()
    finally:
        writer.close()
    assert answer.status == 408
    assert [seen.raw_path for seen in recorder.seen] == ["/first", "/first"]
    metrics = await scrape(gate)
    assert sample(metrics, "servegate_client_timeouts_total", phase="headers") == 1


@pytest.mark.time_limit(30)
@pytest.mark.parametrize(
    "first",
    [
        b"GET /first HTTP/1.1\r\nHost: model\r\n\r\n",
        b"POST /first HTTP/1.1\r\nHost: model\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["get", "post"],
)
async def test_a_head_pipelined_behind_a_request_is_held_to_the_header_timeout(
    first: bytes, start_gate: StartGate, upstream_url: str, recorder: Recorder
) -> None:
    """The start of a second head sent with the first request, and then nothing: the first
    is answered, the second gets its 408 (it held the connection for server.client_keepalive
    before). Two whole pipelined requests, and then quiet, get no 408: the connection idles."""
    gate = await start_gate(upstream_url, **{"server.header_timeout": 1.0})
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        writer.write(first + b"GET /second HTTP/1.1\r\nHost: model\r\nX-Partial: b")
        assert (await read_answer(reader)).status == 200
        began = time.monotonic()
        answer = await read_answer(reader)
        assert time.monotonic() - began < 5
    finally:
        writer.close()
    assert answer.status == 408
    assert [seen.raw_path for seen in recorder.seen] == ["/first"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        writer.write(first + b"GET /second HTTP/1.1\r\nHost: model\r\n\r\n")
        for _ in range(2):
            assert (await read_answer(reader)).status == 200
        with pytest.raises(TimeoutError):  # nothing more: neither a 408 nor a close
            async with asyncio.timeout(2.5):
                await reader.read(1)
    finally:
        writer.close()


async def test_an_idle_kept_connection_is_closed_at_the_keep_alive_timeout_a_busy_one_never(
    start_gate: StartGate, aiohttp_server: Any
) -> None:
    """server.client_keepalive times the idle time between requests only: a request that
    outlasts it (the model takes 1.5 s, the keep-alive is 0.5 s) is answered, and the
    connection is closed once it has stayed idle that long after the answer."""
    model = await aiohttp_server(busy_app(Busy(), 1.5))
    gate = await start_gate(f"http://127.0.0.1:{model.port}", **{"server.client_keepalive": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    predict = b"POST /predict HTTP/1.1\r\nHost: model\r\nContent-Length: 2\r\n\r\n{}"
    try:
        for _ in range(2):  # the second comes within the keep-alive, after a long first one
            writer.write(predict)
            assert (await read_answer(reader)).status == 200
            await asyncio.sleep(0.2)
        idle = time.monotonic()
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # servegate closed it
        assert time.monotonic() - idle >= 0.2
    finally:
        writer.close()


@pytest.mark.time_limit(30)
async def test_over_https_an_unfinished_handshake_or_head_is_closed_at_the_header_timeout(
    start_gate: StartGate,
    upstream_url: str,
    recorder: Recorder,
    certificates: Certificates,
    log_capture: LogCapture,
) -> None:
    gate = await start_gate(
        upstream_url,
        **{
            "server.header_timeout": 1.0,
            "server.tls": "auto",
            "server.cert_file": str(certificates.cert_file),
            "server.key_file": str(certificates.key_file),
        },
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(b"\x16\x03\x01\x00\x05")  # a handshake record that never completes
    began = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert time.monotonic() - began < 5
    writer.close()
    trusting = ssl.create_default_context(cafile=str(certificates.ca_file))
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port, ssl=trusting)
    writer.write(b"GET /tls HTTP/1.1\r\nHost: model\r\n")  # at once with the handshake's end
    try:
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert answer.status == 408
    assert recorder.seen == []
    metrics = await scrape(gate)
    assert sample(metrics, "servegate_client_timeouts_total", phase="tls_handshake") == 1
    assert sample(metrics, "servegate_client_timeouts_total", phase="headers") == 1
    assert [line["client"] for line in log_capture.events("listener.tls_handshake_timeout")] == [
        "127.0.0.1"
    ]
    await wait_for_gauge(gate, "servegate_client_connections", 0)


@pytest.mark.time_limit(30)
@pytest.mark.parametrize("expect", [b"", b"Expect: 100-continue\r\n"], ids=["drip", "expect"])
async def test_a_body_that_does_not_arrive_within_the_budget_is_a_408_not_a_4503(
    expect: bytes, start_gate: StartGate, upstream_url: str, recorder: Recorder
) -> None:
    """The client's slowness: it draws on the request's budget, and is answered as nginx's
    client_body_timeout does, never counted as the model's failure (the model was not asked).
    With `Expect: 100-continue`, the body never comes at all."""
    gate = await start_gate(upstream_url, **{"server.header_timeout": 1.0})
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    began = time.monotonic()
    writer.write(HEAD + b"X-Servegate-Timeout-Ms: 2000\r\nContent-Length: 100\r\n" + expect)
    writer.write(b"\r\n")

    async def drip_body() -> None:
        for _ in range(100):
            if not expect:
                writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.2)

    dripping = asyncio.create_task(drip_body())
    try:
        answer = await read_answer(reader)
        if expect:  # servegate answers the Expect itself, then waits for the body
            assert answer.status == 100
            answer = await read_answer(reader)
    finally:
        dripping.cancel()
        writer.close()
    assert answer.status == 408
    assert answer.json()["error_code"] == "servegate.bad_request"
    assert "did not all arrive within the budget" in answer.json()["error_msg"]
    assert answer.headers["connection"] == "close"
    assert 1.9 <= time.monotonic() - began < 6  # the budget, not the header timeout
    assert recorder.seen == []
    metrics = await scrape(gate)
    assert sample(metrics, "servegate_client_timeouts_total", phase="body") == 1
    assert (
        sample(metrics, "servegate_4503_total", category="timeout", cause="deadline_exceeded") == 0
    )
    await assert_still_serves(gate, recorder)


async def test_a_silent_connection_closed_at_the_first_byte_timeout_is_counted_as_idle(
    start_gate: StartGate, upstream_url: str
) -> None:
    gate = await start_gate(upstream_url, **{"server.first_byte_timeout": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await writer.wait_closed()
    metrics = await scrape(gate)
    assert sample(metrics, "servegate_client_timeouts_total", phase="idle") == 1


async def wait_for_gauge(gate: Servegate, name: str, value: float) -> None:
    for _ in range(100):
        if sample(await scrape(gate), name) == value:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never reached {value}")


@pytest.mark.time_limit(60)
async def test_silent_connections_past_the_limit_make_room_oldest_first_and_never_lock_the_port(
    start_gate: StartGate, upstream_url: str, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At server.max_connections, a new connection closes the oldest idle one, as nginx reuses
    its idle connections: thousands of connections that send nothing cannot hold the port
    until their first-byte timeout, nor run servegate out of descriptors."""
    monkeypatch.setattr(listener, "SILENT_BEFORE_RECLAIM", 0.2)
    gate = await start_gate(upstream_url, **{"server.max_connections": 200})
    idle = [await asyncio.open_connection("127.0.0.1", gate.data_port) for _ in range(200)]
    await wait_for_gauge(gate, "servegate_client_connections", 200)
    flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        # In waves below the listen backlog (128): a larger burst would wait on the kernel's
        # SYN retries, which is the client's problem, not what this test is about.
        for _ in range(10):
            await asyncio.sleep(0.3)  # the connections before are silent for long enough
            flood.extend(
                await asyncio.gather(
                    *(asyncio.open_connection("127.0.0.1", gate.data_port) for _ in range(100))
                )
            )
        await wait_for_gauge(gate, "servegate_client_connections_reclaimed_total", 1000)
        await asyncio.sleep(0.3)
        for reader, _ in idle:  # the oldest went first
            assert await asyncio.wait_for(reader.read(), 10) == b""
        await assert_still_serves(gate, recorder)  # one more: it closed the oldest of the flood
        metrics = await scrape(gate)
        assert sample(metrics, "servegate_client_connections_refused_total") == 0
        assert sample(metrics, "servegate_client_connections_limit") == 200
        assert sample(metrics, "servegate_client_connections") <= 200
        newest = flood[-100:]
        for reader, _ in newest:  # the newest are still open
            assert not reader.at_eof()
    finally:
        for _, writer in flood + idle:
            writer.close()


async def test_a_connection_that_just_opened_is_not_closed_for_a_newer_one(
    start_gate: StartGate, upstream_url: str, recorder: Recorder
) -> None:
    """A client sends its request just after it connects; a connection silent for less than
    SILENT_BEFORE_RECLAIM is no idle one. The newer connection is refused, the older served."""
    gate = await start_gate(upstream_url, **{"server.max_connections": 1})
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        await wait_for_gauge(gate, "servegate_client_connections", 1)
        late, late_writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
        late_writer.write(HEAD + b"\r\n")
        assert (await read_answer(late)).status == 429
        late_writer.close()
        writer.write(HEAD + b"Content-Length: 4\r\n\r\nlate")
        assert (await read_answer(reader)).status == 200
    finally:
        writer.close()
    assert sample(await scrape(gate), "servegate_client_connections_reclaimed_total") == 0


@pytest.mark.time_limit(30)
async def test_at_the_limit_with_every_connection_busy_a_new_one_gets_a_429_not_a_reset(
    start_gate: StartGate, upstream_url: str, recorder: Recorder, log_capture: LogCapture
) -> None:
    """Nothing idle to close: the client is told, in the shape of every shed answer, and the
    refusal is counted and logged; once a connection is free, the next one is served."""
    gate = await start_gate(upstream_url, **{"server.max_connections": 5})
    streams = []
    async with aiohttp.ClientSession() as client:
        try:
            for _ in range(5):  # five answers in flight: five busy connections
                streams.append(await client.get(gate_url(gate, "/ticks?count=15&every=0.2")))
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
                writer.write(HEAD + b"\r\n")
                answer = await read_answer(reader)
                writer.close()
                assert answer.status == 429
                assert answer.headers["connection"] == "close"
                assert answer.headers["retry-after"] == "1"
                body = answer.json()
                assert (body["category"], body["cause"]) == ("service", "overloaded")
                assert "server.max_connections" in body["hint"]
        finally:
            for stream in streams:
                stream.close()
    metrics = await scrape(gate)
    assert sample(metrics, "servegate_client_connections_refused_total") == 3
    assert sample(metrics, "servegate_client_connections_reclaimed_total") == 0
    overloaded = {"category": "service", "cause": "overloaded"}
    assert sample(metrics, "servegate_4503_total", **overloaded) == 3  # as every 429 it sends
    [line] = log_capture.events("listener.connection_limit_reached")  # one, not three
    assert line["level"] == "warning"
    assert line["limit"] == 5
    await wait_for_gauge(gate, "servegate_client_connections", 0)
    await assert_still_serves(gate, recorder)


@pytest.mark.time_limit(30)
async def test_connections_with_answers_left_to_send_are_not_idle_and_the_limit_holds(
    start_gate: StartGate, raw_server: Any
) -> None:
    """Clients that asked for 2.2 MB and read none of it (a 2 KiB receive buffer): their
    requests are done, but what is left of the answers waits in servegate's write buffers.
    Such a connection is not idle: closing it would wait for the buffer to drain, and the
    limit would stretch meanwhile, by one per new connection."""
    size = 2_200_000
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"a" * size
    model = await raw_server(RecordingModel(answer=lambda _seen: answer))
    gate = await start_gate(model.url, **{"server.max_connections": 3})
    loop = asyncio.get_running_loop()
    slow: list[socket.socket] = []
    try:
        for _ in range(3):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            sock.setblocking(False)
            slow.append(sock)
            await loop.sock_connect(sock, ("127.0.0.1", gate.data_port))
            await loop.sock_sendall(sock, b"GET /big HTTP/1.1\r\nHost: model\r\n\r\n")
        await asyncio.sleep(1.0)  # every answer written as far as the kernel takes it
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
            writer.write(HEAD + b"\r\n")
            refused = await read_answer(reader)
            writer.close()
            assert refused.status == 429
        metrics = await scrape(gate)
        assert sample(metrics, "servegate_client_connections_reclaimed_total") == 0
        assert sample(metrics, "servegate_client_connections") <= 3
    finally:
        for sock in slow:
            sock.close()


@pytest.mark.time_limit(30)
async def test_failed_tls_handshakes_leave_nothing_behind_that_hides_an_idle_connection(
    start_gate: StartGate, upstream_url: str, certificates: Certificates
) -> None:
    """Clients that refuse servegate's certificate, forty of them, then one more connection
    at the limit: it makes room by closing an idle one, as if they had never come."""
    gate = await start_gate(
        upstream_url,
        **{
            "server.max_connections": 3,
            "server.tls": "auto",
            "server.cert_file": str(certificates.cert_file),
            "server.key_file": str(certificates.key_file),
        },
    )
    for _ in range(40):
        with pytest.raises(ssl.SSLError):
            await asyncio.open_connection(
                "127.0.0.1", gate.data_port, ssl=ssl.create_default_context()
            )
    await wait_for_gauge(gate, "servegate_client_connections", 0)
    trusting = ssl.create_default_context(cafile=str(certificates.ca_file))
    kept = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusting)) as client:
        for index in range(3):  # three keep-alive connections, idle after their answer
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", gate.data_port, ssl=trusting, server_hostname="localhost"
            )
            writer.write(b"GET /k%d HTTP/1.1\r\nHost: model\r\n\r\n" % index)
            assert (await read_answer(reader)).status == 200
            kept.append(writer)
        try:
            url = f"https://localhost:{gate.data_port}/over"
            async with client.get(url, server_hostname="localhost") as response:
                assert response.status == 200  # an idle one made room: no 429
        finally:
            for writer in kept:
                writer.close()
    assert sample(await scrape(gate), "servegate_client_connections_reclaimed_total") == 1


async def test_out_of_descriptors_the_listener_waits_and_then_serves_the_queued_client(
    start_gate: StartGate,
    upstream_url: str,
    recorder: Recorder,
    log_capture: LogCapture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(listener, "ACCEPT_RETRY_DELAY", 0.2)
    gate = await start_gate(upstream_url, **{"health.interval": 60})
    await assert_still_serves(gate, recorder)  # the first health check is behind it
    loop = asyncio.get_running_loop()
    client = socket.socket()  # its descriptor before there are none left
    client.setblocking(False)
    with no_descriptor_left(spare=32):  # accept() fails
        await loop.sock_connect(client, ("127.0.0.1", gate.data_port))  # queued by the kernel
        await loop.sock_sendall(client, b"GET /queued HTTP/1.1\r\nHost: model\r\n\r\n")
        for _ in range(100):
            if log_capture.events("listener.accept_failed"):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a few retry delays with no descriptor
    try:
        reader, writer = await asyncio.open_connection(sock=client)
        answer = await read_answer(reader)
        writer.close()
    finally:
        client.close()
    assert answer.status == 200
    failed = log_capture.events("listener.accept_failed")
    assert 1 <= len(failed) <= 10  # once per retry delay, not a busy loop
    assert failed[0]["level"] == "error"
    assert "Too many open files" in failed[0]["error"]
    await assert_still_serves(gate, recorder)


async def test_the_connection_limit_is_sized_from_the_open_file_limit_by_default(
    start_gate: StartGate, upstream_url: str
) -> None:
    gate = await start_gate(upstream_url)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = (soft - listener.RESERVED_DESCRIPTORS) // listener.DESCRIPTORS_PER_CONNECTION
    assert sample(await scrape(gate), "servegate_client_connections_limit") == expected


async def test_a_connection_limit_the_open_file_limit_cannot_hold_is_warned_at_start(
    start_gate: StartGate, upstream_url: str, log_capture: LogCapture
) -> None:
    fits = listener.connection_limit("auto")
    await start_gate(upstream_url, **{"server.max_connections": fits + 1})
    [line] = log_capture.events("listener.max_connections_over_open_files")
    assert (line["max_connections"], line["fits"]) == (fits + 1, fits)
    assert "ulimit -n" in line["message"]
    await start_gate(upstream_url, **{"server.max_connections": fits})  # within: no line
    assert len(log_capture.events("listener.max_connections_over_open_files")) == 1
