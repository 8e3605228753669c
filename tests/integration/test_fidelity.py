"""What passes through servegate arrives as it was sent: a raw-socket model records the exact
bytes, and each case compares them with what the client sent (and what it got back)."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LogCapture, StartGate, no_descriptor_left, sample, scrape
from tests.upstreams.misframed import MisframedModel
from tests.upstreams.raw import OK
from tests.upstreams.recording import RecordingModel, Seen

# Headers servegate adds on the way in (DESIGN.md §4), and the framing it may set.
ADDED = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id",
         b"x-servegate-remaining-ms", b"content-length"}  # fmt: skip


async def exchange(port: int, data: bytes, limit: float = 10) -> bytes:
    """Send raw bytes, read until servegate closes (requests say Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        async with asyncio.timeout(limit):
            return await reader.read(-1)
    finally:
        writer.close()


def request(target: bytes, *fields: bytes, body: bytes = b"", method: bytes = b"POST") -> bytes:
    head = [method + b" " + target + b" HTTP/1.1", b"Host: model", *fields]
    if body:
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join([*head, b"Connection: close", b"", b""]) + body


def end_to_end(seen: Seen) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in seen.headers if name.lower() not in ADDED]


def answer(*fields: bytes, body: bytes = b"ok", status: bytes = b"200 OK") -> Any:
    head = b"\r\n".join([b"HTTP/1.1 " + status, *fields, b"Content-Length: %d" % len(body)])
    return lambda _seen: head + b"\r\n\r\n" + body


def json_body(raw: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    return parsed


PAYLOAD = json.dumps({"inputs": [[5.1, 3.5, 1.4, 0.2]] * 50}).encode()


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        (b"gzip", gzip.compress(PAYLOAD)),
        (b"deflate", zlib.compress(PAYLOAD)),
        (b"br", os.urandom(300)),  # not valid brotli: servegate must not even look
        (b"zstd", os.urandom(300)),
        (b"x-unknown", b"\x00\x01 not decodable \xff"),
        (b"gzip, identity", gzip.compress(PAYLOAD)),
    ],
)
async def test_compressed_request_bodies_reach_the_model_byte_for_byte(
    encoding: bytes, body: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(b"/v2/infer", b"Content-Encoding: " + encoding,
                                                 body=body))  # fmt: skip
    assert raw.startswith(b"HTTP/1.1 200")
    assert model.last().body == body
    assert model.last().header(b"content-encoding") == [encoding]


@pytest.mark.parametrize(
    "target",
    [b"/predict?", b"/?", b"/a?b?c", b"//x//y?", b"/a/./b/../c?", b"/%7E%zz?q=%41&q=",
     b"/caf%C3%A9;v=1?x=%20+", b"/p?'!$&()*+,;=:@~"],
)  # fmt: skip
async def test_the_request_target_reaches_the_model_byte_for_byte(
    target: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(target, method=b"GET"))
    assert raw.startswith(b"HTTP/1.1 200")
    assert model.last().target == target


@pytest.mark.parametrize("target", [b"/caf\xc3\xa9", b"/x?q=\xe9", b"/\xff\xfe"])
async def test_a_target_with_raw_non_ascii_bytes_gets_a_clear_400_and_a_log_line(
    target: bytes, start_gate: StartGate, raw_server: Any, log_capture: LogCapture
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(target, method=b"GET"))
    assert raw.split(b"\r\n")[0].endswith(b"400 Bad Request")
    assert "percent-encode" in json_body(raw)["error_msg"]
    assert log_capture.events("request.rejected")[-1]["status"] == 400
    assert model.seen == []


@pytest.mark.parametrize(
    "value", [b"Jos\xe9", b"\x80\xff\xfe", b"caf\xc3\xa9 and \xe9", b"a\tb  c", b"\xe2\x82\xac"]
)
async def test_obs_text_header_values_pass_byte_for_byte_both_ways(
    value: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel(answer=answer(
        b"Content-Disposition: attachment; filename=\"r" + value + b".pdf\"",
        b"X-Echo: " + value, status=b"200 \xc9t\xe9 OK")))  # fmt: skip
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(b"/u", b"X-User: " + value, method=b"GET"))
    assert model.last().header(b"x-user") == [value]
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 200 \xc9t\xe9 OK"
    assert b'Content-Disposition: attachment; filename="r' + value + b'.pdf"' in head
    assert b"X-Echo: " + value in head


async def test_header_names_order_repeats_and_case_reach_the_model_as_sent(
    start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    # A repeat spelled in another case stays two fields (aiohttp's ClientSession merged them).
    fields = [
        b"x-lower: 1",
        b"X-UPPER: 2",
        b"X-Mixed-Case: 3",
        b"x-lower: 4",
        b"X-Lower: 5",
        b"Accept: */*",
    ]
    await exchange(gate.data_port, request(b"/h", *fields, method=b"GET"))
    assert end_to_end(model.last()) == [(b"Host", b"model")] + [
        tuple(field.split(b": "))
        for field in fields  # type: ignore[misc]
    ]


async def test_the_answer_gets_no_header_the_model_did_not_send(
    start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel(answer=answer(b"X-Only: this")))
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(b"/a", method=b"GET"))
    names = [line.split(b":")[0].lower() for line in raw.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]]
    assert b"server" not in names
    assert b"content-type" not in names
    assert b"x-only" in names
    assert b"date" in names  # a proxy with a clock adds it (RFC 9110 §6.6.1)


@pytest.mark.parametrize("size", [2, 100_000], ids=["read-whole", "streamed"])
async def test_the_models_own_request_ids_reach_the_client_as_sent(
    size: int, start_gate: StartGate, raw_server: Any
) -> None:
    """servegate adds its X-Request-Id only to an answer without one: a model's own is its
    word, like every other field it sends."""
    fields = (b"x-request-id: model-own", b"X-Other: 1", b"X-Request-Id: second")
    model = await raw_server(RecordingModel(answer=answer(*fields, body=b"x" * size)))
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(b"/a", method=b"GET"))
    lines = raw.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]
    assert [line for line in lines if line.lower().startswith(b"x-")] == list(fields)


MODEL_DATE = b"Mon, 01 Jan 2024 00:00:00 GMT"
# Answers servegate relays in one write of its own (read whole, fitting the client's empty
# write buffer) and answers relayed through aiohttp's response (too large for that buffer) must
# carry the same head: these are the model's fields the two must agree on.
HEAD_SHAPES = {
    "bare": [],
    "dated": [b"date: " + MODEL_DATE, b"server: model/1", b"content-type: x/y"],
    "request ids": [b"A: 1", b"x-request-id: m1", b"B: 2", b"X-REQUEST-ID: m2"],
    "hop-by-hop": [b"Connection: keep-alive, X-Foo", b"Keep-Alive: timeout=30", b"X-Foo: 1",
                   b"X-Bar: 2"],
    "obs-text": [b"X-Odd: caf\xe9", b"Set-Cookie: a=1", b"set-cookie: b=2", b"X-Empty:"],
}  # fmt: skip
CLIENTS = {
    "1.1 close": (b"HTTP/1.1", b"Connection: close"),
    "1.1 keep-alive": (b"HTTP/1.1", b"X-Keep: yes"),
    "1.0": (b"HTTP/1.0", b"X-Keep: no"),
    "1.0 keep-alive": (b"HTTP/1.0", b"Connection: keep-alive"),
}
LARGE = 100_000  # over the 64 KiB write buffer, under the 256 KiB read whole


async def answer_head(port: int, version: bytes, field: bytes, size: int) -> bytes:
    """The head of the answer to `GET /<size>`, with the values servegate makes up masked."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /%d %s\r\nHost: model\r\n%s\r\n\r\n" % (size, version, field))
    try:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert len(await reader.readexactly(size)) == size
    finally:
        writer.close()
    return b"\r\n".join(_masked(line) for line in head.split(b"\r\n"))


def _masked(line: bytes) -> bytes:
    """A field whose value differs between the two answers by design, with the value masked."""
    name, _, value = line.partition(b": ")
    made_up = name.lower() in {b"x-request-id", b"content-length"}
    return name + b": *" if made_up or (name.lower() == b"date" and value != MODEL_DATE) else line


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("shape", HEAD_SHAPES)
async def test_an_answer_relayed_in_one_write_has_the_head_of_a_streamed_one(
    shape: str, client: str, start_gate: StartGate, raw_server: Any
) -> None:
    fields = HEAD_SHAPES[shape]

    def sized(seen: Seen) -> bytes:
        size = int(seen.target[1:])
        status = b"200 \xc9t\xe9" if shape == "obs-text" else b"201 Created"
        return answer(*fields, body=b"x" * size, status=status)(seen)

    model = await raw_server(RecordingModel(answer=sized))
    gate = await start_gate(model.url)
    version, field = CLIENTS[client]
    whole = await answer_head(gate.data_port, version, field, 2)
    streamed = await answer_head(gate.data_port, version, field, LARGE)
    assert whole == streamed
    if shape == "dated":
        assert b"date: " + MODEL_DATE in whole.split(b"\r\n")


async def test_a_large_chunked_upload_reaches_the_model_with_its_length(
    start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url, **{"retry.replay_buffer_bytes": 64 * 1024})
    body = os.urandom(1024 * 1024 + 17)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 50_000]), body[i : i + 50_000])
                      for i in range(0, len(body), 50_000))  # fmt: skip
    raw = await exchange(gate.data_port, request(b"/up", b"Transfer-Encoding: chunked")
                         + chunks + b"0\r\n\r\n")  # fmt: skip
    assert raw.startswith(b"HTTP/1.1 200")
    seen = model.last()
    assert seen.framing == "length"
    assert seen.header(b"content-length") == [str(len(body)).encode()]
    assert seen.body == body


@pytest.mark.parametrize("disk", ["missing", "full"])
async def test_a_chunked_upload_that_cannot_be_spooled_is_a_507_and_the_log_says_why(
    disk: str,
    start_gate: StartGate,
    raw_server: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    log_capture: LogCapture,
) -> None:
    """The directory large chunked bodies are spooled to is gone, or full (/dev/full fails
    every write with ENOSPC, the last of them only when the file's buffer is flushed): the
    client is told what servegate could not do, not a bare 500 or a fault of the model's."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url, **{"retry.replay_buffer_bytes": 1024})
    if disk == "missing":
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
        why = str(tmp_path / "gone")
    else:
        monkeypatch.setattr(tempfile, "TemporaryFile", lambda: open("/dev/full", "w+b"))  # noqa: SIM115
        why = "No space left on device"
    # Over the replay buffer, under the file's buffer: the write itself succeeds.
    data = request(b"/up", b"Transfer-Encoding: chunked") + b"7d0\r\n" + b"x" * 2000
    raw = await exchange(gate.data_port, data + b"\r\n0\r\n\r\n")
    assert raw.split(b"\r\n")[0] == b"HTTP/1.1 507 Insufficient Storage"
    body = json_body(raw)
    assert body["error_code"] == "servegate.insufficient_storage"
    assert "retry.replay_buffer_bytes" in body["error_msg"]
    assert str(tmp_path) not in body["error_msg"]  # no paths to the client (DESIGN.md §2)
    assert model.seen == []
    [line] = log_capture.events("request.body_spool_failed")
    assert line["level"] == "error"
    assert why in line["error"]
    monkeypatch.undo()
    ok = await exchange(gate.data_port, request(b"/small", b"Transfer-Encoding: chunked")
                        + b"2\r\nok\r\n0\r\n\r\n")  # fmt: skip
    assert ok.startswith(b"HTTP/1.1 200")


async def test_no_descriptor_for_the_spool_file_is_servegates_own_shortage_not_the_disks(
    start_gate: StartGate, raw_server: Any, log_capture: LogCapture
) -> None:
    """Out of open files as a chunked body over the replay buffer needs its spool file: the
    answer a connect out of descriptors gets (429 service/overloaded, the open-file hint,
    counted), not a 507 that sends the operator to the disk."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url, **{"retry.replay_buffer_bytes": 1024, "health.interval": 60})
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)
    await loop.sock_connect(client, ("127.0.0.1", gate.data_port))
    head = request(b"/up", b"Transfer-Encoding: chunked")
    await loop.sock_sendall(client, head + b"200\r\n" + b"x" * 512 + b"\r\n")
    await asyncio.sleep(0.3)  # the head is parsed and the first chunk buffered
    with no_descriptor_left(spare=16):
        await loop.sock_sendall(client, b"7d0\r\n" + b"x" * 2000 + b"\r\n0\r\n\r\n")
        for _ in range(100):
            if log_capture.events("request.body_spool_failed"):
                break
            await asyncio.sleep(0.05)
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(sock=client)
            raw = await reader.read(-1)
            writer.close()
    finally:
        client.close()
    assert raw.split(b"\r\n")[0] == b"HTTP/1.1 429 Too Many Requests", raw[:200]
    body = json_body(raw)
    assert (body["category"], body["cause"]) == ("service", "overloaded")
    assert "ulimit -n" in body["hint"]
    assert b"\r\nRetry-After: 1\r\n" in raw
    assert model.seen == []
    [line] = log_capture.events("request.body_spool_failed")
    assert "Too many open files" in line["error"]
    overloaded = {"category": "service", "cause": "overloaded"}
    assert sample(await scrape(gate), "servegate_4503_total", **overloaded) == 1


@pytest.mark.parametrize("chunked", [True, False])
async def test_a_body_over_max_body_bytes_is_a_413(
    chunked: bool, start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(
        model.url, **{"retry.replay_buffer_bytes": 1024, "server.max_body_bytes": 4096}
    )
    body = b"x" * 5000
    if chunked:
        data = (
            request(b"/up", b"Transfer-Encoding: chunked") + b"1388\r\n" + body + b"\r\n0\r\n\r\n"
        )
    else:
        data = request(b"/up", body=body)
    raw = await exchange(gate.data_port, data)
    assert raw.split(b"\r\n")[0] == b"HTTP/1.1 413 Request Entity Too Large"
    assert "server.max_body_bytes" in json_body(raw)["error_msg"]
    assert model.seen == []


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ([], 414),  # the target itself is long
        ([b"X-Big: " + b"a" * 9000], 431),
        ([b"X-%d: v" % n for n in range(200)], 431),
    ],
)
async def test_oversized_request_heads_get_414_or_431_with_the_json_body(
    fields: list[bytes], status: int, start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    target = b"/" + b"t" * 12_000 if status == 414 else b"/"
    raw = await exchange(gate.data_port, request(target, *fields, method=b"GET"))
    assert raw.split(b"\r\n")[0].split(b" ")[1] == str(status).encode()
    assert json_body(raw)["error_code"] == "servegate.bad_request"
    assert model.seen == []


async def test_request_head_limits_are_settings(start_gate: StartGate, raw_server: Any) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url, **{"server.max_request_line_bytes": 16_000,
                                          "server.max_header_bytes": 16_000})  # fmt: skip
    target = b"/" + b"t" * 12_000
    raw = await exchange(gate.data_port, request(target, b"X-Big: " + b"a" * 9000, method=b"GET"))
    assert raw.startswith(b"HTTP/1.1 200")
    assert model.last().target == target


def fields_around(field: bytes, position: str) -> list[bytes]:
    """`field` first, after a field with a long name, or between two such."""
    neighbour = b"X-" + b"n" * 600 + b": v"
    return {
        "first": [field, neighbour],
        "after-a-long-name": [neighbour, field],
        "between": [neighbour, field, neighbour],
    }[position]


@pytest.mark.parametrize("position", ["first", "after-a-long-name", "between"])
async def test_a_header_field_is_held_to_its_limit_wherever_it_stands(
    position: str, start_gate: StartGate, raw_server: Any
) -> None:
    """Name and value together, up to the setting, whatever the fields around it: aiohttp's
    parsers count a field's neighbour too, and alone would refuse some fields within the
    limit and pass some over it, by where they stand."""
    limit = 1000
    at_limit = b"X-Edge: " + b"e" * (limit - len(b"X-Edge"))  # name and value: 1000 bytes
    over = at_limit + b"e"
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url, **{"server.max_header_bytes": limit})
    raw = await exchange(gate.data_port, request(b"/in", *fields_around(at_limit, position)))
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    raw = await exchange(gate.data_port, request(b"/in", *fields_around(over, position)))
    assert raw.split(b"\r\n")[0] == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert "server.max_header_bytes (1000)" in json_body(raw)["error_msg"]
    assert len(model.seen) == 1

    for field, status in ((at_limit, b"200 OK"), (over, b"502 Bad Gateway")):
        answering = await raw_server(RecordingModel(answer=answer(*fields_around(field, position))))
        relaying = await start_gate(answering.url, **{"upstream.max_response_header_bytes": limit})
        raw = await exchange(relaying.data_port, request(b"/out", method=b"GET"))
        assert raw.split(b"\r\n")[0] == b"HTTP/1.1 " + status, raw[:200]
        if field is over:
            body = json_body(raw)
            assert body["cause"] == "response_header_too_large"


LONG_COOKIE = [b"Set-Cookie: s=" + b"c" * 9000]
LONGER_COOKIE = [b"Set-Cookie: s=" + b"c" * 20_000]
MANY_FIELDS = [b"X-Field-%d: %d" % (i, i) for i in range(200)]


@pytest.mark.parametrize(
    ("fields", "setting", "raised"),
    [
        (LONG_COOKIE, "upstream.max_response_header_bytes", 32_000),
        (LONGER_COOKIE, "upstream.max_response_header_bytes", 32_000),
        (MANY_FIELDS, "upstream.max_response_headers", 256),
    ],
    ids=["line-9000", "line-20000", "200-fields"],
)
async def test_a_response_head_over_a_limit_has_its_own_cause_and_setting(
    fields: list[bytes], setting: str, raised: int, start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel(answer=answer(*fields)))
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(b"/c", method=b"GET"))
    assert raw.split(b"\r\n")[0] == b"HTTP/1.1 502 Bad Gateway"
    body = json_body(raw)
    assert (body["category"], body["cause"]) == ("protocol", "response_header_too_large")
    assert setting in body["hint"]
    assert "port" not in body["hint"]
    relayed = await start_gate(model.url, **{setting: raised})
    raw = await exchange(relayed.data_port, request(b"/c", method=b"GET"))
    assert raw.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    assert all(field in raw.split(b"\r\n") for field in fields)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\nhello",
    ],
)  # fmt: skip
async def test_an_answer_with_contradictory_framing_is_named_and_never_blames_the_port(
    head: bytes, start_gate: StartGate, raw_server: Any, log_capture: LogCapture
) -> None:
    model = await raw_server(RecordingModel(answer=lambda _seen: head))
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(b"/f", method=b"GET"))
    assert raw.split(b"\r\n")[0] == b"HTTP/1.1 502 Bad Gateway"
    body = json_body(raw)
    assert (body["category"], body["cause"]) == ("protocol", "response_framing")
    assert "port" not in body["hint"]
    assert log_capture.access()[-1]["cause"] == "response_framing"


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"


@pytest.mark.parametrize(
    "hints",
    [
        EARLY_HINTS,
        b"HTTP/1.1 103 \r\nLink: </a>\r\n\r\n",  # an empty reason keeps its space (RFC 9112 §4)
        b"HTTP/1.1 103 Hints  \r\nLink: </a>\r\n\r\n",
    ],
    ids=["reason", "empty-reason", "trailing-spaces"],
)
async def test_early_hints_reach_an_http11_client_before_the_final_answer_as_sent(
    hints: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    """RFC 9110 §15.2: a proxy forwards 1xx answers. The 103 leaves at once, while the model
    is still working on the final answer."""
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    model = await raw_server(MisframedModel(first=[hints, final], pause=1.0))
    gate = await start_gate(model.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        writer.write(request(b"/page", method=b"GET"))
        async with asyncio.timeout(0.8):  # before the model sends its final answer
            assert await reader.readuntil(b"\r\n\r\n") == hints
        async with asyncio.timeout(10):
            rest = await reader.read()
    finally:
        writer.close()
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
    assert rest.endswith(b"\r\n\r\nok")


@pytest.mark.parametrize(
    ("version", "interim", "expected_first"),
    [
        (b"HTTP/1.0", EARLY_HINTS, b"HTTP/1.0 200"),  # RFC 9110 §15.2: never to HTTP/1.0
        (b"HTTP/1.1", b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200"),  # servegate's own
    ],
    ids=["http10-client", "100-continue"],
)
async def test_interim_answers_a_client_must_not_get_are_not_passed_on(
    version: bytes, interim: bytes, expected_first: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    model = await raw_server(MisframedModel(first=[interim, final], pause=0.1))
    gate = await start_gate(model.url)
    sent = request(b"/page", method=b"GET").replace(b"HTTP/1.1", version, 1)
    raw = await exchange(gate.data_port, sent)
    assert raw.startswith(expected_first)
    assert raw.count(b" 200 OK\r\n") == 1
    assert b" 103 " not in raw
    assert b" 100 " not in raw


@pytest.mark.parametrize("trailer", [b"", b"X-Trailer: leak\r\n"])
async def test_a_chunked_request_whose_body_may_end_with_trailers_is_the_last_on_its_connection(
    trailer: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    """aiohttp's parser adds a chunked request's last trailer field to the next request's
    headers on the connection, which a gateway may send for another client: after a body
    that may have ended with one, the connection is closed; after one that did not, it
    carries the next request as usual."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    chunked = (
        b"POST /first HTTP/1.1\r\nHost: model\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n" + trailer + b"\r\n"
    )
    try:
        async with asyncio.timeout(10):
            writer.write(chunked)
            first = await reader.readuntil(b"\r\n\r\nok")
            if trailer:
                assert b"\r\nConnection: close\r\n" in first
                assert await reader.read() == b""
            else:
                writer.write(b"GET /second HTTP/1.1\r\nHost: model\r\n\r\n")
                await reader.readuntil(b"\r\n\r\nok")
    finally:
        writer.close()
    expected = [b"/first"] if trailer else [b"/first", b"/second"]
    assert [seen.target for seen in model.seen] == expected
    assert all(seen.header(b"x-trailer") == [] for seen in model.seen)


async def test_a_trailer_never_reaches_a_chunked_request_pipelined_behind_its_body(
    start_gate: StartGate, raw_server: Any
) -> None:
    """The second body ends bare, but the first's end is not what the connection's last
    bytes show: the connection closes after the first answer, and no request of the model's
    carries the first's trailer field."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    trailed = (
        b"POST /first HTTP/1.1\r\nHost: model\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\nx\r\n0\r\nX-Trailer: leak\r\n\r\n"
    )
    bare = (
        b"POST /second HTTP/1.1\r\nHost: model\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\ny\r\n0\r\n\r\n"
    )
    raw = await exchange(gate.data_port, trailed + bare)
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 1
    assert b"\r\nConnection: close\r\n" in raw
    assert all(seen.header(b"x-trailer") == [] for seen in model.seen)
    assert [seen.target for seen in model.seen] == [b"/first"]


@pytest.mark.parametrize(
    ("line", "target", "host"),
    [
        (b"GET http://h.example//a//b? HTTP/1.1", b"//a//b?", b"h.example"),
        (b"GET http://h.example?q=1 HTTP/1.1", b"/?q=1", b"h.example"),
        (b"GET HTTP://H.Example:80/X HTTP/1.1", b"/X", b"H.Example:80"),
        (b"GET http://[::1]:8080/x HTTP/1.1", b"/x", b"[::1]:8080"),
        (b"OPTIONS http://h.example:8001 HTTP/1.1", b"*", b"h.example:8001"),  # §3.2.4
        (b"OPTIONS * HTTP/1.1", b"*", b"model"),
    ],
)  # fmt: skip
async def test_a_target_as_proxies_get_it_reaches_the_model_as_the_client_meant_it(
    line: bytes, target: bytes, host: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    """RFC 9112 §3.2.2-§3.2.4: an absolute-form target goes on as its path and query, its
    authority as Host; X-Forwarded-Host names the host asked for, as written."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, line + b"\r\nHost: model\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200")
    seen = model.last()
    assert seen.target == target
    assert seen.header(b"host") == [host]
    assert seen.header(b"x-forwarded-host") == [host]


@pytest.mark.parametrize(
    "host", [b"", b"[::1]:8080", b"Model_Server:80", b"xn--bcher-kva.example."]
)
async def test_every_host_an_authority_can_be_reaches_the_model_as_sent(
    host: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    raw = await exchange(
        gate.data_port, b"GET /h HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host
    )
    assert raw.startswith(b"HTTP/1.1 200")
    assert model.last().header(b"host") == [host]


async def test_a_request_without_host_gets_the_models_and_no_forwarded_host(
    start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, b"GET /x HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.0 200")
    seen = model.last()
    assert seen.header(b"host") == [b"127.0.0.1:%d" % model.port]
    assert seen.header(b"x-forwarded-host") == []  # the client named no host


async def test_a_target_with_userinfo_is_refused_and_never_becomes_host(
    start_gate: StartGate, raw_server: Any
) -> None:
    """RFC 9110 §4.2.4: userinfo in a target is an error (nginx: 400)."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(b"http://u:p@h.example/x", method=b"GET"))
    assert raw.split(b"\r\n")[0] == b"HTTP/1.1 400 Bad Request"
    assert "userinfo" in json_body(raw)["error_msg"]
    assert model.seen == []


async def test_a_clients_own_remaining_budget_field_never_reaches_the_model(
    start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    sent = request(b"/r", b"X-Servegate-Remaining-Ms: 99999999", method=b"GET")
    assert (await exchange(gate.data_port, sent)).startswith(b"HTTP/1.1 200")
    [remaining] = model.last().header(b"x-servegate-remaining-ms")
    assert 0 < int(remaining) <= 40_000


@pytest.mark.parametrize("codings", [b"gzip, chunked", b"deflate,chunked", b"x-custom, chunked"])
async def test_a_request_transfer_coding_but_chunked_is_a_501_never_passed_on_undecoded(
    codings: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    """RFC 9112 §6.1: servegate decodes chunked alone; taking off another coding unread would
    hand the model coded bytes as plain ones (nginx: 501)."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    body = gzip.compress(PAYLOAD)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    sent = request(b"/p", b"Transfer-Encoding: " + codings) + chunked
    raw = await exchange(gate.data_port, sent)
    assert raw.split(b"\r\n")[0] == b"HTTP/1.1 501 Not Implemented"
    assert codings.decode() in json_body(raw)["error_msg"]
    assert model.seen == []


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nxyz",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\nConnection: close\r\n\r\nxyz",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nConnection: close\r\n\r\nxyz",
    ],
)  # fmt: skip
async def test_an_answer_transfer_coding_but_chunked_is_a_framing_fault_not_relayed_as_plain(
    head: bytes, start_gate: StartGate, raw_server: Any, log_capture: LogCapture
) -> None:
    """servegate offers no transfer coding (it sends no TE field) and decodes chunked alone
    (RFC 9112 §6.1): an answer in another one would reach the client labelled as plain."""
    model = await raw_server(RecordingModel(answer=lambda _seen: head, close_after=True))
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(b"/f", method=b"GET"))
    assert raw.split(b"\r\n")[0] == b"HTTP/1.1 502 Bad Gateway"
    body = json_body(raw)
    assert (body["category"], body["cause"]) == ("protocol", "response_framing")
    assert "Transfer-Encoding" in log_capture.access()[-1]["detail"]
    assert b"xyz" not in raw  # no hex digit: the request id cannot hold it


async def test_empty_elements_of_a_transfer_encoding_list_are_ignored_both_ways(
    start_gate: StartGate, raw_server: Any
) -> None:
    """RFC 9110 §5.6.1: a recipient ignores empty list elements: `, chunked` is chunked."""
    answer_head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: , chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    model = await raw_server(RecordingModel(answer=lambda _seen: answer_head))
    gate = await start_gate(model.url)
    sent = request(b"/p", b"Transfer-Encoding: , chunked") + b"3\r\nxyz\r\n0\r\n\r\n"
    raw = await exchange(gate.data_port, sent)
    assert raw.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    assert raw.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert model.last().body == b"xyz"


async def test_a_transfer_coding_on_an_answer_without_a_body_frames_nothing_and_is_relayed(
    start_gate: StartGate, raw_server: Any
) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nX-Kept: 1\r\n\r\n"
    model = await raw_server(RecordingModel(answer=lambda _seen: head))
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(b"/h", method=b"HEAD"))
    assert raw.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    assert b"\r\nX-Kept: 1\r\n" in raw


async def test_a_switch_of_protocols_nobody_asked_for_is_a_protocol_failure(
    start_gate: StartGate, raw_server: Any
) -> None:
    """RFC 9110 §15.2.2: a server switches only to a protocol the request offered, and this
    request offered none (Upgrade is hop-by-hop)."""
    head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\nraw"
    model = await raw_server(RecordingModel(answer=lambda _seen: head, close_after=True))
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(b"/x", method=b"GET"))
    body = json_body(raw)
    assert (body["category"], body["cause"]) == ("protocol", "malformed_response")
    assert b"raw" not in raw.split(b"\r\n\r\n", 1)[1]
    assert len(model.seen) == 1  # it reached the model: never replayed


async def test_a_304_keeps_the_content_length_the_model_gave_it(
    start_gate: StartGate, raw_server: Any
) -> None:
    """RFC 9110 §8.6: a 304's Content-Length tells the cached representation's length; it
    frames nothing, and the connection stays usable after it (nginx relays it too)."""
    not_modified = b'HTTP/1.1 304 Not Modified\r\nETag: "v"\r\nContent-Length: 1234\r\n\r\n'
    answers = iter([not_modified, OK])
    model = await raw_server(RecordingModel(answer=lambda _seen: next(answers)))
    gate = await start_gate(model.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        writer.write(b'GET /c HTTP/1.1\r\nHost: model\r\nIf-None-Match: "v"\r\n\r\n')
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"GET /d HTTP/1.1\r\nHost: model\r\nConnection: close\r\n\r\n")
            rest = await reader.read()
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 304 Not Modified\r\n")
    assert b'\r\nETag: "v"\r\nContent-Length: 1234\r\n' in head  # where the model put it
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
    assert rest.endswith(b"\r\n\r\nok")


@pytest.mark.parametrize("method", [b"FOO", b"BREW", b"get"])
async def test_a_method_the_parser_does_not_know_is_a_501_that_names_it(
    method: bytes, start_gate: StartGate, raw_server: Any, log_capture: LogCapture
) -> None:
    """RFC 9110 §9.1: any token is a method. aiohttp's parser (llhttp) knows a fixed list,
    so servegate cannot carry another; it says so, and that it is no mistake of the client's."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, request(b"/m", method=method))
    assert raw.split(b"\r\n")[0] == b"HTTP/1.1 501 Not Implemented"
    message = json_body(raw)["error_msg"]
    assert message.startswith(f"{method.decode()} is not a method servegate's HTTP parser")
    assert model.seen == []
    [line] = log_capture.events("request.rejected")
    assert line["status"] == 501


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        (b"GET /v HTTP/2.0\r\nHost: model\r\n\r\n", b"505 HTTP Version Not Supported"),
        (b"GET /v HTTP/0.9\r\nHost: model\r\n\r\n", b"505 HTTP Version Not Supported"),
        (b"GET /v\r\n\r\n", b"505 HTTP Version Not Supported"),  # HTTP/0.9's simple request
        (b"GET /v HTTP/1.2\r\nHost: model\r\n\r\n", b"505 HTTP Version Not Supported"),
        (b"GET /v HTTP/3.0\r\nHost: model\r\n\r\n", b"505 HTTP Version Not Supported"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"505 HTTP Version Not Supported"),  # h2 preface
        (b"GET /p#frag HTTP/1.1\r\nHost: model\r\n\r\n", b"400 Bad Request"),
        (b"GET http://model/p#/../admin HTTP/1.1\r\nHost: model\r\n\r\n", b"400 Bad Request"),
        (b"GET /p?a=b# HTTP/1.1\r\nHost: model\r\n\r\n", b"400 Bad Request"),
    ],
    ids=[
        "http2",
        "http09",
        "no-version",
        "http12",
        "http3",
        "h2-preface",
        "fragment",
        "absolute-fragment",
        "empty",
    ],
)
async def test_a_request_this_port_cannot_speak_is_refused_in_http11_and_never_forwarded(
    sent: bytes, status: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    """RFC 9110 §2.5 and §15.6.6: no version but HTTP/1.x is spoken here, and the refusal is
    written in HTTP/1.1; a target carries no fragment (RFC 9112 §3.2). A request pipelined
    behind one is not parsed: the connection closes."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, sent + b"GET /next HTTP/1.1\r\nHost: model\r\n\r\n")
    assert raw.split(b"\r\n")[0] == b"HTTP/1.1 " + status
    assert json_body(raw)["error_code"] == "servegate.bad_request"
    assert raw.count(b"\r\nX-Request-Id: ") == 1  # one answer: nothing after it was parsed
    assert model.seen == []


@pytest.mark.parametrize(
    "expect", [b"Expect: 100-continue, x-other", b"Expect: x-other\r\nExpect: 100-Continue"]
)
async def test_a_100_continue_in_an_expect_list_is_answered_at_once(
    expect: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    """Expect is a list (RFC 9110 §10.1.1): a client that waits for the 100 before its body
    gets it, wherever in the list it asked."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        writer.write(b"POST /e HTTP/1.1\r\nHost: model\r\n%s\r\nContent-Length: 2\r\n\r\n" % expect)
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"hi")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        writer.close()
    assert model.last().body == b"hi"


async def test_an_http10_request_with_a_transfer_encoding_is_the_last_on_its_connection(
    start_gate: StartGate, raw_server: Any
) -> None:
    """RFC 9112 §6.1: its framing is faulty by definition, and the connection closes after it:
    an HTTP/1.0 hop in front would read its chunks as the next request."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    raw = await exchange(
        gate.data_port,
        b"POST /first HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\nGET /second HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"keep-alive" not in raw.lower()
    assert [seen.request_line.split(b" ")[1] for seen in model.seen] == [b"/first"]


async def test_an_h2c_upgrade_offer_is_not_passed_on_and_the_request_is_served(
    start_gate: StartGate, raw_server: Any
) -> None:
    """Its HTTP2-Settings field belongs to the one connection (RFC 7540 §3.2.1): no proxy can
    pass the offer on, so the request goes on as plain HTTP/1.1, as nginx sends it."""
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    raw = await exchange(
        gate.data_port,
        b"GET /h2c HTTP/1.1\r\nHost: model\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    names = {name.lower() for name, _ in model.last().headers}
    assert not names & {b"upgrade", b"http2-settings", b"connection"}


async def test_repeated_request_ids_and_a_host_named_in_connection_reach_the_model_as_sent(
    start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    await exchange(
        gate.data_port,
        b"GET /ids HTTP/1.1\r\nHost: model\r\nX-Request-Id: one\r\nx-request-id: two\r\n"
        b"Connection: close, Host\r\n\r\n",
    )
    headers = model.last().headers
    assert [value for name, value in headers if name.lower() == b"x-request-id"] == [b"one", b"two"]
    assert (b"Host", b"model") in headers
