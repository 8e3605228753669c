"""HTTP/1.0 clients (RFC 9112 §6.3, §7.1, §9.3; RFC 9110 §10.1.1): never a chunked answer,
persistence only when asked and the length is known, no 1xx."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from typing import Any

from tests.conftest import LogCapture, StartGate, require_tool
from tests.upstreams.recording import RecordingModel


def chunked(body: bytes) -> Any:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    return lambda _seen: head + framed


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"\r\nContent-Length: (\d+)", head)
    assert length is not None, head
    return head, await reader.readexactly(int(length.group(1)))


async def test_a_keep_alive_client_gets_lengths_and_keeps_its_connection(
    start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel(answer=chunked(b"hello world")))
    gate = await start_gate(model.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        for _ in range(3):
            writer.write(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head, body = await asyncio.wait_for(read_answer(reader), 10)
            assert head.startswith(b"HTTP/1.0 200 OK\r\n")
            assert b"Transfer-Encoding" not in head
            assert b"\r\nConnection: keep-alive\r\n" in head
            assert body == b"hello world"
    finally:
        writer.close()


async def test_without_keep_alive_the_answer_ends_with_the_connection(
    start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel(answer=chunked(b"abc")))
    gate = await start_gate(model.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(b"GET /x HTTP/1.0\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(-1), 10)  # returns only once servegate closes
    writer.close()
    assert raw.startswith(b"HTTP/1.0 200 OK\r\n")
    assert raw.endswith(b"\r\n\r\nabc")


async def test_a_long_answer_of_unknown_length_is_close_delimited(
    start_gate: StartGate, raw_server: Any
) -> None:
    body = bytes(range(256)) * 5000  # 1.2 MiB: beyond what is read ahead for a length
    model = await raw_server(RecordingModel(answer=chunked(body)))
    gate = await start_gate(model.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(-1), 20)
    writer.close()
    head, _, received = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert b"Content-Length" not in head
    assert b"Connection: keep-alive" not in head
    assert received == body


async def test_an_http10_client_gets_no_100_continue(
    start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    writer.write(b"POST /x HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.3)  # a 100 would be on its way by now
    writer.write(b"hi")
    raw = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    assert raw.startswith(b"HTTP/1.0 200 OK\r\n")
    assert model.last().body == b"hi"
    assert model.last().header(b"expect") == []


async def test_ab_keep_alive_completes_against_a_chunked_model(
    start_gate: StartGate, raw_server: Any
) -> None:
    ab = require_tool("ab")
    model = await raw_server(RecordingModel(answer=chunked(b'{"predictions": [0]}')))
    gate = await start_gate(model.url)
    command = [ab, "-k", "-n", "200", "-c", "4", "-s", "20",
               f"http://127.0.0.1:{gate.data_port}/predict"]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 40)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode()
    assert process.returncode == 0, text
    assert re.search(r"Complete requests:\s+200", text), text
    assert re.search(r"Failed requests:\s+0", text), text
    assert re.search(r"Keep-Alive requests:\s+200", text), text


async def test_an_answer_that_breaks_before_any_of_it_left_is_answered_as_a_failure(
    start_gate: StartGate, raw_server: Any, log_capture: LogCapture
) -> None:
    """An HTTP/1.0 client's answer of unknown length is read whole before its head leaves:
    when the model's answer breaks first, the client can still be told why (a 503), where it
    got an empty reply and the log said 200."""
    cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"
    model = await raw_server(RecordingModel(answer=lambda _seen: cut, close_after=True))
    gate = await start_gate(model.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        writer.write(b"GET /x HTTP/1.0\r\n\r\n")
        head, body = await asyncio.wait_for(read_answer(reader), 10)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.0 503 ")
    assert json.loads(body)["cause"] == "reset_during_request"
    [line] = log_capture.access()
    assert (line["status"], line["cause"]) == (503, "reset_during_request")
