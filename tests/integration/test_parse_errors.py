"""Requests aiohttp cannot parse are answered in the HTTP version the client spoke (RFC 9110
§2.5), with the status that names the fault and the JSON body."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from tests.conftest import StartGate, sample, scrape
from tests.integration.test_fidelity import exchange, json_body
from tests.upstreams.apps import Busy, busy_app
from tests.upstreams.recording import RecordingModel

LONG_TARGET = b"/" + b"t" * 12_000


def head(target: bytes, *fields: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    lines = [b"GET " + target + b" " + version, b"Host: model", *fields, b"Connection: close"]
    return b"\r\n".join([*lines, b"", b""])


async def in_two_reads(port: int, first: bytes, second: bytes) -> bytes:
    """Send `first`, wait until servegate has read it alone, send `second`; what servegate
    answers until it closes the connection (the last request says Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(10):
            writer.write(first)
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(second)
            return await reader.read(-1)
    finally:
        writer.close()


# A head aiohttp cannot parse, and the status line it is answered with.
MALFORMED = {
    "414": (head(LONG_TARGET), b"HTTP/1.1 414 Request-URI Too Long"),
    "431-long-header": (head(b"/", b"X-Big: " + b"a" * 9000),
                        b"HTTP/1.1 431 Request Header Fields Too Large"),
    "431-many-headers": (head(b"/", *(b"X-%d: v" % i for i in range(200))),
                         b"HTTP/1.1 431 Request Header Fields Too Large"),
    "400": (head(b"/", b"Bad Name: x"), b"HTTP/1.1 400 Bad Request"),
}  # fmt: skip
ALONE = {
    **MALFORMED,
    "431-http10-client": (head(b"/", b"X-Big: " + b"a" * 9000, version=b"HTTP/1.0"),
                          b"HTTP/1.0 431 Request Header Fields Too Large"),
    "400-repeated-singleton": (head(b"/", b"User-Agent: a", b"User-Agent: b"),
                               b"HTTP/1.1 400 Bad Request"),
}  # fmt: skip


@pytest.mark.parametrize(("sent", "status_line"), list(ALONE.values()), ids=list(ALONE))
async def test_a_request_that_cannot_be_parsed_is_answered_in_the_clients_version(
    sent: bytes, status_line: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, sent)
    assert raw.split(b"\r\n")[0] == status_line
    assert json_body(raw)["error_code"] == "servegate.bad_request"
    assert model.seen == []
    # A head limit reached is no hidden limit: the metrics count it by status.
    code = status_line.split(b" ")[1].decode()
    rejected = sample(await scrape(gate), "servegate_requests_rejected_total", code=code)
    assert rejected == 1


async def test_the_body_of_an_earlier_request_is_not_read_as_the_next_requests_head(
    start_gate: StartGate, raw_server: Any
) -> None:
    """The status of an unparseable head is read from its own request line, not from bytes of
    the body before it on the same connection (a body sent after its head, as curl sends one
    after `100 Continue`, holding a line break)."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        async with asyncio.timeout(10):
            writer.write(
                b"POST /predict HTTP/1.1\r\nHost: model\r\nContent-Length: 9\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            # servegate has parsed the head when it invites the body, which comes on its own.
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b'{\n"a": 1}')
            first = await reader.readuntil(b"\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 200")
            await reader.readexactly(int(first.split(b"Content-Length: ")[1].split(b"\r")[0]))
            writer.write(head(LONG_TARGET))
            second = await reader.read(-1)
    finally:
        writer.close()
    assert second.split(b"\r\n")[0] == b"HTTP/1.1 414 Request-URI Too Long"
    assert len(model.seen) == 1


async def test_a_pipelined_head_behind_a_queued_request_is_read_from_its_own_line(
    start_gate: StartGate, aiohttp_server: Any
) -> None:
    """Three requests on one connection, each sent while the one before is handled or still
    queued: the third, unparseable, is judged by its own request line."""
    model = await aiohttp_server(busy_app(Busy(), 0.3))
    gate = await start_gate(f"http://127.0.0.1:{model.port}")
    predict = b"POST /predict HTTP/1.1\r\nHost: model\r\nContent-Length: 2\r\n\r\n{}"
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        async with asyncio.timeout(10):
            for sent in (predict, predict, head(LONG_TARGET)):
                writer.write(sent)
                await writer.drain()
                await asyncio.sleep(0.05)
            answers = await reader.read(-1)
    finally:
        writer.close()
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert b"HTTP/1.1 414 Request-URI Too Long\r\n" in answers


@pytest.mark.parametrize(("behind", "status_line"), list(MALFORMED.values()), ids=list(MALFORMED))
async def test_requests_pipelined_in_one_write_before_a_malformed_one_are_answered_first(
    behind: bytes, status_line: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    """Sent together, in one packet: each request before the malformed one reaches the model
    and is answered, in order, and the malformed one then gets its own verdict, as nginx
    answers. aiohttp alone parses a read whole, so the error discarded the requests before it:
    the client got the error alone and read it as the answer to its first request."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    first = b"POST /first HTTP/1.1\r\nHost: model\r\nContent-Length: 2\r\n\r\n{}"
    # Not chunked: a chunked body may end with trailer fields, and a read that goes on past
    # one closes its connection after its answer (test_fidelity).
    second = b"GET /second HTTP/1.1\r\nHost: model\r\n\r\n"
    raw = await exchange(gate.data_port, first + second + behind)
    status_lines = re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", raw)
    assert status_lines == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", status_line]
    assert [seen.target for seen in model.seen] == [b"/first", b"/second"]
    assert json_body(raw.rsplit(b"HTTP/1.1 ", 1)[1])["error_code"] == "servegate.bad_request"


async def test_many_requests_pipelined_in_one_write_are_all_answered(
    start_gate: StartGate, raw_server: Any
) -> None:
    """More requests in one read than aiohttp queues at once (32): the rest wait in the parser
    and are all answered, in order."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    requests = b"".join(b"GET /%d HTTP/1.1\r\nHost: model\r\n\r\n" % i for i in range(99))
    raw = await exchange(gate.data_port, requests + head(b"/last"))
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 100
    assert [seen.target for seen in model.seen] == [b"/%d" % i for i in range(99)] + [b"/last"]


@pytest.mark.parametrize(
    "timeout_field", [b"", b"X-Servegate-Timeout-Ms: soon\r\n"], ids=["read", "answered-unread"]
)
async def test_a_request_that_comes_with_the_end_of_the_body_before_it_is_answered(
    timeout_field: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    """The read that ends one request's body also brings the next request whole: the parser
    stops at the body's end, and the rest of that read is parsed too, not left waiting for
    bytes the client will not send; also when the first is answered (400, a malformed budget
    header) without servegate reading its body."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    first = b"POST /a HTTP/1.1\r\nHost: model\r\n%sContent-Length: 5\r\n\r\nhel" % timeout_field
    answers = await in_two_reads(gate.data_port, first, b"lo" + head(b"/b"))
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answers)
    assert statuses == ([b"400"] if timeout_field else [b"200"]) + [b"200"]
    targets = [b"/b"] if timeout_field else [b"/a", b"/b"]
    assert [seen.target for seen in model.seen] == targets


async def test_requests_pipelined_behind_an_upgrade_that_is_not_made_are_all_answered(
    start_gate: StartGate, raw_server: Any
) -> None:
    """With upgrades off, a WebSocket handshake is a plain request; aiohttp keeps what came
    behind it aside and parses it once the answer is ready, in one feed: every request of it
    is answered, not only the first."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url, **{"server.upgrades": False})
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: model\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    behind = b"GET /a HTTP/1.1\r\nHost: model\r\n\r\n" + head(b"/b")
    raw = await exchange(gate.data_port, upgrade + behind)
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert [seen.target for seen in model.seen] == [b"/ws", b"/a", b"/b"]


async def test_a_head_whose_end_straddles_two_reads_leaves_no_request_behind(
    start_gate: StartGate, raw_server: Any
) -> None:
    """The second read starts with the last LF of a head begun in the first, then holds one
    whole request: both requests of it are parsed, not only the one whose head it ends."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    first = b"GET /a HTTP/1.1\r\nHost: model\r\n\r\nGET /b HTTP/1.1\r\nHost: model\r\n\r"
    answers = await in_two_reads(gate.data_port, first, b"\n" + head(b"/c"))
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert [seen.target for seen in model.seen] == [b"/a", b"/b", b"/c"]


async def test_an_upgrade_offer_other_than_websocket_that_is_not_taken_closes_the_connection(
    start_gate: StartGate, raw_server: Any
) -> None:
    """After an h2c offer, llhttp stops and aiohttp drops the connection's further bytes: a
    request pipelined behind it would vanish and a later one be refused 400. The offer is
    answered as plain HTTP, and the connection closed after it, so the client sends its next
    request on a new one."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url, **{"server.upgrades": False})
    offer = b"GET /a HTTP/1.1\r\nHost: model\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    raw = await exchange(gate.data_port, offer + head(b"/b"))
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 1
    assert b"\r\nConnection: close\r\n" in raw
    assert [seen.target for seen in model.seen] == [b"/a"]
