"""Model servers that break HTTP: what the client gets (a JSON answer, or a connection cut
within the budget, never a hang), and how the metrics and the access line classify it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.app import Servegate
from tests.conftest import LogCapture, StartGate, sample, scrape
from tests.upstreams.misbehaving import (
    AnswersWith,
    ClosesUnread,
    CutsBody,
    EndlessInterim,
    InParts,
    LargeInterims,
    NeverReads,
    SpeaksFirst,
    Trickles,
)

RawStart = Callable[[Any], Awaitable[Any]]
TIMEOUT_MS = "X-Servegate-Timeout-Ms"


async def exchange(gate: Servegate, head: bytes, body: bytes = b"") -> tuple[bytes, bytes, float]:
    """Send a request over a raw socket; return the answer's head, every body byte that came
    before servegate closed the connection, and how long that took."""
    began = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        writer.write(head + body)
        async with asyncio.timeout(20):  # a hang fails here
            answer_head = await reader.readuntil(b"\r\n\r\n")
            rest = await reader.read()
    finally:
        writer.close()
    return answer_head, rest, time.monotonic() - began


def status_of(head: bytes) -> int:
    return int(head.split(b" ")[1])


async def assert_classified(
    gate: Servegate, log_capture: LogCapture, category: str, cause: str, status: int
) -> None:
    metrics = await scrape(gate)
    assert sample(metrics, "servegate_4503_total", category=category, cause=cause) == 1
    assert sample(metrics, "servegate_upstream_failures_total", category=category, cause=cause) == 1
    [line] = log_capture.access()
    assert (line["category"], line["cause"], line["status"]) == (category, cause, status)


def json_body(rest: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(rest)
    return parsed


GET = b"GET /predict HTTP/1.1\r\nHost: model\r\nConnection: close\r\n"

MALFORMED = {  # the model's bytes, and the cause and status the client gets for them
    "status_line": (b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok", "malformed_response", 503),
    "not_http_at_all": (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "malformed_response", 503),
    "header_without_colon": (
        b"HTTP/1.1 200 OK\r\nX Bad Header\r\nContent-Length: 2\r\n\r\nok",
        "malformed_response",
        503,
    ),
    # HTTP, but framed so that no length can be trusted: its own cause, and a 502.
    "content_length_not_a_number": (
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nok",
        "response_framing",
        502,
    ),
    "chunk_size_overflow": (  # llhttp says "Chunk size overflow": framing, not a bad port
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 20 + b"\r\nx\r\n",
        "response_framing",
        502,
    ),
    "malformed_trailer_field": (  # in the body: framing, whatever llhttp calls it
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nBad Trailer\r\n\r\n",
        "response_framing",
        502,
    ),
    "control_byte_in_a_header": (
        b"HTTP/1.1 200 OK\r\nX-Trace: a\x01b\r\nContent-Length: 0\r\n\r\n",
        "malformed_response",
        503,
    ),
    # aiohttp reads `099` as 99: relayed, it would be a status line of two digits.
    "status_below_100": (
        b"HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\nok",
        "malformed_response",
        503,
    ),
}


@pytest.mark.parametrize("shape", MALFORMED)
async def test_a_malformed_answer_is_a_precise_protocol_error_that_keeps_the_model_s_bytes_out(
    shape: str, start_gate: StartGate, raw_server: RawStart, log_capture: LogCapture
) -> None:
    answer, cause, status = MALFORMED[shape]
    model = await raw_server(AnswersWith(answer=answer))
    gate = await start_gate(model.url)
    head, rest, _ = await exchange(gate, GET + b"\r\n")
    assert status_of(head) == status
    body = json_body(rest)
    assert (body["category"], body["cause"]) == ("protocol", cause)
    # The model's bytes stay in the log's detail (the request id is random hex: not checked).
    said = json.dumps({key: value for key, value in body.items() if key != "request_id"})
    for internal in ("2OO", "OpenSSH", "X Bad", "abc", "a\x01b", "a\\u0001b"):
        assert internal not in said
    assert model.paths == [b"/predict"]  # sent once: a framing fault is not retried
    await assert_classified(gate, log_capture, "protocol", cause, status)


@pytest.mark.parametrize(
    "answer",
    [
        # h2c prior knowledge: a SETTINGS frame (RFC 9113 §6.5), then GOAWAY
        b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64"
        b"\x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01",
        b"HTTP/2 200\r\ncontent-length: 2\r\n\r\nok",
    ],
    ids=["settings-frame", "status-line"],
)
async def test_an_answer_in_http2_says_so_instead_of_blaming_the_port_alone(
    answer: bytes, start_gate: StartGate, raw_server: RawStart
) -> None:
    model = await raw_server(AnswersWith(answer=answer))
    gate = await start_gate(model.url)
    head, rest, _ = await exchange(gate, GET + b"\r\n")
    assert status_of(head) == 503
    body = json_body(rest)
    assert (body["category"], body["cause"]) == ("protocol", "malformed_response")
    assert "answered in HTTP/2" in body["hint"]


BANNERS = {  # what a port of another protocol sends as a connection opens
    "ssh": b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
    "smtp": b"220 mail.example ESMTP Postfix\r\n",
    "mysql": b"J\x00\x00\x00\n8.0.36\x00\x08\x00\x00\x00",
    "http2": b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64",
}


@pytest.mark.parametrize("banner", BANNERS)
async def test_a_port_whose_server_speaks_first_and_not_in_http_is_a_protocol_error(
    banner: str, start_gate: StartGate, raw_server: RawStart
) -> None:
    """Across a network the banner often arrives before servegate writes the request: it
    broke the answer's parser then, and the write that followed failed. That is no dropped
    connection (a worker crashing), but the port's answer. On loopback the write wins the race
    unless the banner is let in first, as the second request does (only the order is
    arranged; the bytes and the connection are real)."""
    model = await raw_server(SpeaksFirst(banner=BANNERS[banner]))
    gate = await start_gate(model.url)
    for arranged in (False, True):
        if arranged:
            let_the_banner_in_before_the_write(gate)
        head, rest, _ = await exchange(gate, GET + b"\r\n")
        assert status_of(head) == 503
        body = json_body(rest)
        assert (body["category"], body["cause"]) == ("protocol", "malformed_response"), body
        if banner == "http2":
            assert "answered in HTTP/2" in body["hint"]


def let_the_banner_in_before_the_write(gate: Servegate) -> None:
    assert gate.upstream is not None
    pool = gate.upstream.pool("http", fresh=False)
    acquire = pool.acquire

    async def acquire_then_listen(*args: Any, **kwargs: Any) -> Any:
        connection = await acquire(*args, **kwargs)
        await asyncio.sleep(0.05)  # the banner arrives
        return connection

    pool.acquire = acquire_then_listen  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "trailer",
    # Over twice the field limit: aiohttp's parser, which holds trailers, counts each field
    # with its neighbour's name, and is given twice the limit (README, Hardening).
    [b"X-Long: " + b"t" * 20000 + b"\r\n", b"".join(b"X-T%d: v\r\n" % n for n in range(200))],
    ids=["long-field", "many-fields"],
)
async def test_trailer_fields_past_the_head_limits_name_those_limits(
    trailer: bytes, start_gate: StartGate, raw_server: RawStart, log_capture: LogCapture
) -> None:
    """A trailer section is held to the limits of a head: passing them is that cause, with
    the settings that raise them, not a framing fault."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
    model = await raw_server(AnswersWith(answer=answer + trailer + b"\r\n"))
    gate = await start_gate(model.url)
    head, rest, _ = await exchange(gate, GET + b"\r\n")
    assert status_of(head) == 502
    body = json_body(rest)
    assert (body["category"], body["cause"]) == ("protocol", "response_header_too_large")
    assert "upstream.max_response_header" in body["hint"]
    await assert_classified(gate, log_capture, "protocol", "response_header_too_large", 502)


async def test_a_small_body_cut_mid_way_is_a_503_and_not_replayed(
    start_gate: StartGate, raw_server: RawStart, log_capture: LogCapture
) -> None:
    model = await raw_server(CutsBody(declared=1000, sent=100))
    gate = await start_gate(model.url)
    head, rest, _ = await exchange(gate, GET + b"\r\n")
    assert status_of(head) == 503  # small answers are read whole before the client sees one
    body = json_body(rest)
    assert (body["category"], body["cause"]) == ("service", "reset_during_request")
    assert "not replayed" in body["hint"]
    assert model.paths == [b"/predict"]
    await assert_classified(gate, log_capture, "service", "reset_during_request", 503)


@pytest.mark.parametrize(
    ("sent", "named"),
    [
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n", "part of an answer's head"),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", "an interim 103 answer"),
    ],
)
async def test_an_answer_begun_then_closed_is_no_restart_and_no_crash_loop(
    sent: bytes, named: str, start_gate: StartGate, raw_server: RawStart, log_capture: LogCapture
) -> None:
    """A server that sent the beginning of an answer was up and speaking HTTP: three such
    answers must not declare a crash loop (and fail /readyz), nor ask whether it speaks TLS."""
    model = await raw_server(AnswersWith(answer=sent))
    gate = await start_gate(model.url)
    probed_at_start = model.tls_hellos
    for _ in range(3):
        head, rest, _ = await exchange(gate, GET + b"\r\n")
        if head.startswith(b"HTTP/1.1 103"):  # passed on at once; the final answer follows
            head, _, rest = rest.partition(b"\r\n\r\n")
        assert status_of(head) == 503
        assert json_body(rest)["cause"] == "reset_during_request"
    metrics = await scrape(gate)
    assert sample(metrics, "servegate_upstream_restarts_total") == 0
    assert sample(metrics, "servegate_upstream_crash_loop") == 0
    assert model.paths == [b"/predict"] * 3  # each once: it reached the model
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{gate.admin_port}/readyz") as ready,
    ):
        assert ready.status == 200
    lines = log_capture.access()
    assert [line["cause"] for line in lines] == ["reset_during_request"] * 3
    assert all(f"after sending {named}" in line["detail"] for line in lines)
    assert model.tls_hellos == probed_at_start  # no scheme probe for a server that spoke HTTP


async def test_new_connections_closed_unread_get_no_keep_alive_hint(
    start_gate: StartGate, raw_server: RawStart, log_capture: LogCapture
) -> None:
    """A server that closes each new connection unread is not racing an idle timeout: the
    keep-alive hint would send its operator the wrong way."""
    model = await raw_server(ClosesUnread())
    gate = await start_gate(model.url, **{"retry.connect_wait": 0.5})
    for _ in range(4):
        head, rest, _ = await exchange(gate, GET + b"\r\n")
        assert status_of(head) == 503
        hint = json_body(rest)["hint"]
        assert "keep-alive" not in hint
        assert "kills the workers" not in hint  # no attempt of them reached a worker
    assert model.paths == []


async def test_a_large_body_cut_mid_way_aborts_the_client_connection_at_once(
    start_gate: StartGate, raw_server: RawStart, log_capture: LogCapture
) -> None:
    declared, sent = 10_000_000, 300_000  # streamed: larger than what is read whole
    model = await raw_server(CutsBody(declared=declared, sent=sent))
    gate = await start_gate(model.url)
    head, rest, seconds = await exchange(gate, GET + b"\r\n")
    assert status_of(head) == 200
    assert b"Content-Length: %d" % declared in head
    assert len(rest) == sent < declared  # cut, as the model cut it: never a silent success
    assert seconds < 5  # aborted, not left hanging until some timeout
    await assert_classified(gate, log_capture, "service", "reset_during_request", 200)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n"


@pytest.mark.parametrize("bad", [b"zz\r\nabc\r\n", b"f" * 20 + b"\r\n"])
async def test_a_chunk_that_breaks_mid_stream_cuts_the_client_at_once_as_a_framing_fault(
    bad: bytes, start_gate: StartGate, raw_server: RawStart, log_capture: LogCapture
) -> None:
    """The model keeps its connection open after the bad chunk: the client must not wait for
    that close, or for the budget, and the verdict is the model's framing, not a timeout."""
    model = await raw_server(InParts(parts=[CHUNKED_HEAD, bad], hold=15))
    gate = await start_gate(model.url)
    head, rest, seconds = await exchange(gate, GET + b"\r\n")
    assert status_of(head) == 200
    assert rest == b"5\r\nabcde\r\n"  # no last chunk: the client sees the answer is cut
    assert seconds < 5
    await assert_classified(gate, log_capture, "protocol", "response_framing", 200)


async def test_an_answer_ended_by_its_connection_is_cut_not_completed_by_a_reset(
    start_gate: StartGate, raw_server: RawStart, log_capture: LogCapture
) -> None:
    """RFC 9112 §6.3: a body without a length ends with the close. A reset is no close: it
    may have dropped bytes the model sent, so the client must not get a last chunk."""
    until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart-one "
    model = await raw_server(InParts(parts=[until_close, b"part-two"], reset=True))
    gate = await start_gate(model.url)
    head, rest, _ = await exchange(gate, GET + b"\r\n")
    assert status_of(head) == 200
    assert b"part-one" in rest
    assert not rest.endswith(b"0\r\n\r\n")
    await assert_classified(gate, log_capture, "service", "reset_during_request", 200)


async def test_interim_answers_past_their_limit_are_a_502_naming_the_setting(
    start_gate: StartGate, raw_server: RawStart, log_capture: LogCapture
) -> None:
    """Each interim answer is relayed as it comes: a model that sends them without end, all
    at once, would cost servegate's loop and the client's memory without bound."""
    flood = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 5000
    model = await raw_server(
        AnswersWith(answer=flood + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    )
    gate = await start_gate(model.url, **{"upstream.max_interim_responses": 20})
    head, rest, seconds = await exchange(gate, GET + b"\r\n")
    assert head.startswith(b"HTTP/1.1 103 Early Hints")
    interim, _, final = rest.rpartition(b"Link: </a>\r\n\r\n")
    assert interim.count(b"HTTP/1.1 103") == 19  # with the one in `head`: the limit, no more
    final_head, _, final_body = final.partition(b"\r\n\r\n")
    assert status_of(final_head) == 502
    body = json_body(final_body)
    assert (body["category"], body["cause"]) == ("protocol", "response_header_too_large")
    assert "upstream.max_interim_responses" in body["hint"]
    assert seconds < 5
    await assert_classified(gate, log_capture, "protocol", "response_header_too_large", 502)


async def test_an_answer_of_many_tiny_chunks_and_a_body_of_them_pass_whole(
    start_gate: StartGate, raw_server: RawStart
) -> None:
    """The bytes come through exactly, in order, whatever the pieces."""
    pieces = [bytes([48 + n % 10]) for n in range(20_000)]
    chunked = b"".join(b"1\r\n" + piece + b"\r\n" for piece in pieces) + b"0\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    model = await raw_server(AnswersWith(answer=answer))
    gate = await start_gate(model.url)
    upload = b"POST /predict HTTP/1.1\r\nHost: model\r\nTransfer-Encoding: chunked\r\n"
    head, rest, _ = await exchange(gate, upload + b"Connection: close\r\n\r\n", chunked)
    assert status_of(head) == 200
    relayed = b""
    while rest and not rest.startswith(b"0\r\n"):
        size, _, rest = rest.partition(b"\r\n")
        relayed += rest[: int(size, 16)]
        rest = rest[int(size, 16) + 2 :]
    assert relayed == b"".join(pieces)


@pytest.mark.time_limit(30)
async def test_endless_interim_answers_end_in_a_504_at_the_budget(
    start_gate: StartGate, raw_server: RawStart, log_capture: LogCapture
) -> None:
    model = await raw_server(EndlessInterim())
    gate = await start_gate(model.url)
    head, rest, seconds = await exchange(gate, GET + b"%s: 1500\r\n\r\n" % TIMEOUT_MS.encode())
    # Each interim answer is passed on (RFC 9110 §15.2), and the final one ends the wait.
    assert head == b"HTTP/1.1 102 Processing\r\n\r\n"
    interim, final = rest.rsplit(b"HTTP/1.1 102 Processing\r\n\r\n", 1)
    assert interim == b"HTTP/1.1 102 Processing\r\n\r\n" * interim.count(b"HTTP/1.1 102")
    assert interim.count(b"HTTP/1.1 102") > 3
    final_head, _, final_body = final.partition(b"\r\n\r\n")
    assert status_of(final_head) == 504
    body = json_body(final_body)
    assert (body["category"], body["cause"]) == ("timeout", "deadline_exceeded")
    assert 1.4 <= seconds < 6
    assert model.interim_sent > 5
    await assert_classified(gate, log_capture, "timeout", "deadline_exceeded", 504)


@pytest.mark.time_limit(30)
async def test_a_streamed_answer_trickling_past_the_deadline_is_cut_at_the_budget(
    start_gate: StartGate, raw_server: RawStart, log_capture: LogCapture
) -> None:
    model = await raw_server(Trickles(every=0.1))
    gate = await start_gate(model.url)
    head, rest, seconds = await exchange(gate, GET + b"%s: 1500\r\n\r\n" % TIMEOUT_MS.encode())
    assert status_of(head) == 200
    assert b"Transfer-Encoding: chunked" in head
    assert not rest.endswith(b"0\r\n\r\n")  # no final chunk: the client can tell it was cut
    assert 1.4 <= seconds < 6
    await assert_classified(gate, log_capture, "timeout", "deadline_during_stream", 200)


@pytest.mark.time_limit(30)
async def test_a_small_answer_trickling_past_the_deadline_is_a_504(
    start_gate: StartGate, raw_server: RawStart, log_capture: LogCapture
) -> None:
    model = await raw_server(Trickles(every=0.1, content_length=100))
    gate = await start_gate(model.url)
    head, rest, seconds = await exchange(gate, GET + b"%s: 1500\r\n\r\n" % TIMEOUT_MS.encode())
    assert status_of(head) == 504
    body = json_body(rest)
    assert (body["category"], body["cause"]) == ("timeout", "deadline_during_stream")
    assert 1.4 <= seconds < 6
    await assert_classified(gate, log_capture, "timeout", "deadline_during_stream", 504)


@pytest.mark.time_limit(40)
async def test_a_server_that_never_reads_a_large_upload_gets_it_answered_504_at_the_budget(
    start_gate: StartGate, raw_server: RawStart, log_capture: LogCapture
) -> None:
    model = await raw_server(NeverReads())
    gate = await start_gate(model.url)
    size = 64 * 1024 * 1024  # far beyond the replay buffer and every socket buffer
    head = b"POST /predict HTTP/1.1\r\nHost: model\r\n%s: 2000\r\nContent-Length: %d\r\n\r\n" % (
        TIMEOUT_MS.encode(),
        size,
    )
    began = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)

    async def upload() -> None:
        writer.write(head)
        for _ in range(size // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()

    uploading = asyncio.create_task(upload())
    try:
        async with asyncio.timeout(20):
            answer_head = await reader.readuntil(b"\r\n\r\n")
        seconds = time.monotonic() - began
        length = int(answer_head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        body = json.loads(await reader.readexactly(length))
    finally:
        uploading.cancel()
        writer.close()
    assert status_of(answer_head) == 504
    assert (body["category"], body["cause"]) == ("timeout", "deadline_exceeded")
    assert 1.9 <= seconds < 8
    assert model.accepted == 1
    await assert_classified(gate, log_capture, "timeout", "deadline_exceeded", 504)


async def test_interim_answers_for_a_client_that_does_not_read_wait_in_the_models_kernel(
    start_gate: StartGate, raw_server: RawStart
) -> None:
    """100 interim answers of 1 MB each, all within the head limits, to a client that reads
    nothing yet: servegate held all 96 MB (its client buffer grew without end). It now reads
    no more of the model's while the client is behind, so the model's writes wait; the
    client, once it reads, gets every one of them and the answer."""
    model = await raw_server(LargeInterims(count=100))
    gate = await start_gate(model.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        writer.write(GET + b"\r\n")
        await asyncio.sleep(2)  # the client reads nothing meanwhile
        assert model.written < 50, "servegate took every interim answer without a reader"
        received = bytearray()
        async with asyncio.timeout(30):
            while not received.endswith(b"\r\n\r\nok"):
                piece = await reader.read(1 << 20)
                assert piece, bytes(received[-200:])
                received += piece
    finally:
        writer.close()
    assert received.count(b"HTTP/1.1 103 Early Hints\r\n") == 100
    assert b"HTTP/1.1 200 OK\r\n" in received
