"""Generated requests sent directly to a recording model and through servegate: the model
must see the same target, end-to-end headers in order, and body, and the client must get the
same status line, headers and body back."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import Servegate
from tests.conftest import make_settings
from tests.upstreams.recording import RecordingModel, Seen

ADDED = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id",
         b"x-servegate-remaining-ms"}  # fmt: skip
# Headers an HTTP proxy sets on an answer itself: Date (RFC 9110 §6.6.1), its own
# `Connection: close` before it closes (RFC 9112 §9.6), and servegate's request id.
SET_ON_ANSWER = {b"date", b"connection", b"x-request-id"}

PCHAR = "abcXYZ019-._~!$&'()*+,;=:@%"
targets = st.builds(
    lambda segments, query: ("/" + "/".join(segments) + query).encode(),
    st.lists(st.text(PCHAR, max_size=8), max_size=4),
    st.one_of(st.just(""), st.just("?"), st.text(PCHAR + "/?", max_size=12).map("?".__add__)),
)
# Field values: visible ASCII, obs-text bytes and inner spaces, no leading or trailing space.
field_byte = st.sampled_from([*range(0x21, 0x7F), *range(0x80, 0x100)])
field_values = st.builds(
    lambda first, middle, last: bytes([first]) + bytes(middle) + bytes([last]),
    field_byte,
    st.lists(st.one_of(field_byte, st.just(0x20)), max_size=20),
    field_byte,
)
names = st.sampled_from([b"X-A", b"x-b", b"X-Model-Input", b"Accept", b"X-A"])
fields = st.lists(st.tuples(names, field_values), max_size=6)
bodies = st.binary(max_size=3000)


@dataclass(repr=False)  # its recordings grow; hypothesis prints the arguments of a failure
class Bench:
    loop: asyncio.AbstractEventLoop
    model: RecordingModel
    gate_port: int


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    """A recording model and servegate on their own event loop, for synchronous clients."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[RecordingModel, Servegate]:
        model = RecordingModel()
        await model.start()
        gate = Servegate(make_settings(**{"upstream.url": model.url}))
        await gate.start()
        return model, gate

    model, gate = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield Bench(loop, model, gate.data_port)
    finally:

        async def stop() -> None:
            await gate.stop()
            await model.stop()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        parts = []
        while chunk := sock.recv(65536):
            parts.append(chunk)
    return b"".join(parts)


def answer_head(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    kept = [line for line in lines if line.split(b":")[0].lower() not in SET_ON_ANSWER]
    return status, kept, body


def end_to_end(seen: Seen) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in seen.headers if n.lower() not in ADDED]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(target=targets, request_fields=fields, answer_fields=fields, body=bodies)
def test_direct_and_through_servegate_the_model_and_client_see_the_same_bytes(
    bench: Bench,
    target: bytes,
    request_fields: list[tuple[bytes, bytes]],
    answer_fields: list[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    bench.model.seen.clear()
    reply = b"".join(b"%s: %s\r\n" % field for field in answer_fields)
    bench.model.answer = lambda seen: (
        b"HTTP/1.1 200 OK\r\n" + reply + b"Content-Length: %d\r\n\r\n" % len(seen.body) + seen.body
    )
    head = b"".join(b"%s: %s\r\n" % field for field in request_fields)
    data = (
        b"POST " + target + b" HTTP/1.1\r\nHost: model\r\n" + head
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    )  # fmt: skip
    direct_answer = exchange(bench.model.port, data)
    direct = bench.model.last()
    through_answer = exchange(bench.gate_port, data)
    through = bench.model.last()
    assert through.target == direct.target == target
    assert end_to_end(through) == [(n, v) for n, v in direct.headers if n.lower() != b"connection"]
    assert (through.body, through.framing) == (direct.body, direct.framing)
    assert answer_head(through_answer) == answer_head(direct_answer)
