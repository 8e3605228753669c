"""Answers whose framing disagrees with their own headers or with the request method: the
client gets what the framing rules say (RFC 9112 §6.3), the rest is discarded with a warning
and a count, and the connection that carried it is never used again."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import LogCapture, StartGate, sample, scrape
from tests.integration.test_fidelity import exchange, json_body, request
from tests.upstreams.misframed import MisframedModel
from tests.upstreams.recording import RecordingModel

TEXT = "Prix: €€€€€ total".encode()  # 17 characters, 27 bytes of UTF-8
assert len(TEXT) == 27


def split(raw: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Status line, headers (lower-cased names), body as the client received them."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (h.partition(b":") for h in lines)}
    return status, headers, body


CASES = {
    # name: (method, answer parts, status line, body the client gets, fault, declared, surplus)
    "content_length_counted_characters": (
        b"GET",
        [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 17\r\n\r\n" + TEXT],
        b"HTTP/1.1 200 OK", TEXT[:17],
        "bytes_after_content_length", "Content-Length: 17", 10,
    ),
    "body_on_204": (
        b"GET", [b"HTTP/1.1 204 No Content\r\n\r\n{\"ok\": true}"],
        b"HTTP/1.1 204 No Content", b"",
        "body_on_bodiless_answer", "no body (204)", 12,
    ),
    "body_on_304": (
        b"GET", [b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\nstale body"],
        b"HTTP/1.1 304 Not Modified", b"",
        "body_on_bodiless_answer", "no body (304)", 10,
    ),
    "body_on_an_answer_to_head": (
        b"HEAD", [b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\npayload"],
        b"HTTP/1.1 200 OK", b"",
        "body_on_bodiless_answer", "no body (answer to HEAD)", 7,
    ),
    "bytes_after_the_last_chunk": (
        b"GET",
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nleftover"],
        b"HTTP/1.1 200 OK", b"3\r\nabc\r\n0\r\n\r\n",
        "bytes_after_last_chunk", "chunked", None,
    ),
    "a_second_answer_to_one_request": (
        b"GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"
                 b"Content-Length: 5\r\n\r\nextra"],
        b"HTTP/1.1 200 OK", b"ok",
        "bytes_after_content_length", "Content-Length: 2", 43,
    ),
    "head_end_split_across_reads": (
        b"GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r", b"\nokmore"],
        b"HTTP/1.1 200 OK", b"ok",
        "bytes_after_content_length", "Content-Length: 2", 4,
    ),
    # Not an idle timer's notice: it came with the answer, in the same read.
    "a_408_in_the_same_read_as_the_answer": (
        b"GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 408 Request Timeout"
                 b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"],
        b"HTTP/1.1 200 OK", b"ok",
        "bytes_after_content_length", "Content-Length: 2", 70,
    ),
    "surplus_arriving_after_the_answer": (
        b"GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"late bytes"],
        b"HTTP/1.1 200 OK", b"ok",
        "bytes_after_content_length", "Content-Length: 2", 10,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_an_answer_is_relayed_as_its_framing_says_and_its_connection_is_dropped(
    case: tuple[Any, ...], start_gate: StartGate, raw_server: Any, log_capture: LogCapture
) -> None:
    method, parts, status_line, body, fault, declared, surplus = case
    model = await raw_server(MisframedModel(first=parts, pause=0.2))
    gate = await start_gate(model.url)

    raw = await exchange(gate.data_port, request(b"/predict", method=method))
    status, headers, received = split(raw)
    assert (status, received) == (status_line, body)
    if b"Content-Length: 17" in parts[0]:
        assert headers[b"content-length"] == b"17"
    if method == b"HEAD":
        assert headers[b"content-length"] == b"7"
    assert b"port" not in raw

    if len(parts) > 1:  # the surplus comes after the answer went back to the pool
        for _ in range(250):
            if log_capture.events("upstream.framing_fault"):
                break
            await asyncio.sleep(0.02)
    [warning] = log_capture.events("upstream.framing_fault")
    assert warning["level"] == "warning"
    assert (warning["fault"], warning["declared"], warning["surplus_bytes"]) == (
        fault,
        declared,
        surplus,
    )
    assert warning["request_id"] == log_capture.access()[0]["request_id"]
    assert "cause" not in log_capture.access()[0]  # the client's request did not fail

    samples = await scrape(gate)
    labels = {"category": "protocol", "cause": "response_framing"}
    assert sample(samples, "servegate_upstream_failures_total", **labels) == 1
    assert sample(samples, "servegate_4503_total", **labels) == 0

    again = await exchange(gate.data_port, request(b"/next", method=b"GET"))
    assert again.startswith(b"HTTP/1.1 200 OK")
    assert again.endswith(b"\r\n\r\nok")
    assert model.connection_of[1] != model.connection_of[0]
    assert log_capture.access()[1]["reused"] is False


@pytest.mark.parametrize("cut", [30, 44, 45, 46, 47])  # in the head and around its end
async def test_a_well_framed_answer_keeps_its_connection_however_it_is_split(
    cut: int, start_gate: StartGate, raw_server: Any, log_capture: LogCapture
) -> None:
    """A correct model loses nothing to the guard: its answer and its connection are kept."""
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    model = await raw_server(MisframedModel(first=[chunked[:cut], chunked[cut:]], pause=0.05))
    gate = await start_gate(model.url)
    first = await exchange(gate.data_port, request(b"/a", method=b"GET"))
    assert first.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    second = await exchange(gate.data_port, request(b"/b", method=b"GET"))
    assert second.endswith(b"\r\n\r\nok")
    assert model.connection_of[0] == model.connection_of[1]
    assert log_capture.events("upstream.framing_fault") == []


SEQUENCE = {  # target: (method, the model's answer, what the client's answer ends with)
    b"/length": (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst", b"\r\n\r\nfirst"),
    b"/chunked": (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n0\r\n\r\n", b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    b"/204": (b"DELETE", b"HTTP/1.1 204 No Content\r\n\r\n", b"\r\n\r\n"),
    b"/head": (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", b"\r\n\r\n"),
    b"/interim": (b"GET", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                  b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal", b"\r\n\r\nfinal"),
    b"/304": (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n", b"\r\n\r\n"),
    b"/empty": (b"POST", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"\r\n\r\n"),
    b"/last": (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast", b"\r\n\r\nlast"),
}  # fmt: skip


async def test_one_pooled_connection_carries_answers_of_every_framing_in_turn(
    start_gate: StartGate, raw_server: Any, log_capture: LogCapture
) -> None:
    """Each answer on a kept connection is parsed from where the last one ended, whatever the
    framing of either, and twice over in another order."""
    model = await raw_server(RecordingModel(answer=lambda seen: SEQUENCE[seen.target][1]))
    gate = await start_gate(model.url)
    order = [*SEQUENCE, *reversed(SEQUENCE)]
    for target in order:
        method, answer, ends = SEQUENCE[target]
        raw = await exchange(gate.data_port, request(target, method=method))
        assert raw.startswith(answer[:12]), (target, raw)  # an interim answer too
        assert raw.endswith(ends), (target, raw)
    assert [seen.target for seen in model.seen] == order
    # Health checks open connections of their own: the access lines tell the pooled one.
    assert [line["reused"] for line in log_capture.access()] == [False] + [True] * (len(order) - 1)
    assert log_capture.events("upstream.framing_fault") == []


async def test_a_short_body_read_whole_is_a_clean_503_that_says_how_short(
    start_gate: StartGate, raw_server: Any, log_capture: LogCapture
) -> None:
    """Content-Length 100, 9 bytes, close: an incomplete message (RFC 9112 §8). A small answer
    is read whole before the status goes out, so the client gets the precise error."""
    model = await raw_server(
        MisframedModel(
            first=[b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"],
            close_after_first=True,
        )
    )
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(b"/short", method=b"GET"))
    assert raw.startswith(b"HTTP/1.1 503 ")
    body = json_body(raw)
    assert (body["category"], body["cause"]) == ("service", "reset_during_request")
    assert "port" not in body["hint"]
    assert "(9 of the 100 bytes its Content-Length declared)" in log_capture.access()[0]["detail"]


async def test_a_long_body_cut_short_cuts_the_clients_connection(
    start_gate: StartGate, raw_server: Any, log_capture: LogCapture
) -> None:
    """Past the read-ahead buffer the status is already out: the client sees fewer bytes than
    the Content-Length and a closed connection, which is how HTTP says "incomplete"."""
    declared, sent = 400_000, 300_000
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % declared
    model = await raw_server(MisframedModel(first=[head + b"x" * sent], close_after_first=True))
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(b"/long", method=b"GET"))
    status, headers, body = split(raw)
    assert (status, headers[b"content-length"]) == (b"HTTP/1.1 200 OK", b"400000")
    assert len(body) == sent
    access = log_capture.access()[0]
    assert (access["cause"], access["bytes_out"]) == ("reset_during_request", sent)
    assert f"({sent} of the {declared} bytes" in access["detail"]


TRAILED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Cost\r\n\r\n"
    b"3\r\nabc\r\n0\r\nX-Cost: 7\r\nServer-Timing: model;dur=12\r\n\r\n"
)


@pytest.mark.parametrize("cut", [None, len(TRAILED) - 4, len(TRAILED) - 30])
async def test_trailer_fields_of_an_answer_never_reach_the_next_answer_on_its_connection(
    cut: int | None, start_gate: StartGate, raw_server: Any
) -> None:
    """A chunked answer that ends with trailer fields, whole or split around them: the next
    answer on that pooled connection, which may be another client's, carries only its own
    headers. aiohttp's parser (3.14) keeps an answer's trailer fields and adds them to the
    next answer it parses; servegate then gives the next answer a parser of its own."""
    parts = [TRAILED] if cut is None else [TRAILED[:cut], TRAILED[cut:]]
    model = await raw_server(MisframedModel(first=parts, pause=0.05))
    gate = await start_gate(model.url)
    first = await exchange(gate.data_port, request(b"/trailed", method=b"GET"))
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\n3\r\nabc\r\n0\r\n" in first
    second = await exchange(gate.data_port, request(b"/next", method=b"GET"))
    status, headers, body = split(second)
    assert (status, body) == (b"HTTP/1.1 200 OK", b"ok")
    assert b"x-cost" not in headers
    assert b"server-timing" not in headers
    assert model.connection_of[0] == model.connection_of[1]  # the connection itself is kept


async def test_an_idle_connections_408_closes_it_quietly(
    start_gate: StartGate, raw_server: Any, log_capture: LogCapture
) -> None:
    """A server's idle timer may say 408 as it closes a kept-alive connection (RFC 9110
    §15.5.9; Node.js, Apache's mod_reqtimeout): that is no fault of the 200 before it."""
    notice = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    model = await raw_server(MisframedModel(first=[answer, notice], pause=0.2))
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(b"/predict", method=b"GET"))
    assert raw.startswith(b"HTTP/1.1 200 OK")
    assert raw.endswith(b"ok")
    await asyncio.sleep(0.5)  # the notice has come
    again = await exchange(gate.data_port, request(b"/next", method=b"GET"))
    assert again.startswith(b"HTTP/1.1 200 OK")
    assert model.connection_of[1] != model.connection_of[0]  # the closed one is not reused
    assert not log_capture.events("upstream.framing_fault")
    samples = await scrape(gate)
    labels = {"category": "protocol", "cause": "response_framing"}
    assert not sample(samples, "servegate_upstream_failures_total", **labels)
