"""No hidden cap: with default settings servegate passes on as many requests at once as its
clients send, and a setting that used to cap them out of sight is refused by name."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_parser import HttpRequestParser, HttpResponseParser
from aiohttp.web_protocol import RequestHandler

from proxy import config, corked, limits
from proxy.data_server import _JsonErrorHandler
from proxy.framing import FramedResponseHandler
from tests.conftest import StartGate, gate_url, sample, scrape
from tests.upstreams.apps import Busy, busy_app

AT_ONCE = 300  # three times aiohttp's default pool limit (100), which servegate once had
HOLD = 5.0  # seconds the model holds each request: long enough for all to overlap


@pytest.mark.time_limit(120)
async def test_300_requests_held_by_the_model_all_reach_it_at_once_with_default_settings(
    start_gate: StartGate, aiohttp_server: Any
) -> None:
    limits.raise_open_files()  # four descriptors per request in this one process
    busy = Busy()
    server = await aiohttp_server(busy_app(busy, seconds=HOLD))
    gate = await start_gate(f"http://127.0.0.1:{server.port}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as clients:

        async def one() -> int:
            async with clients.post(gate_url(gate, "/predict"), json={"x": 1}) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one() for _ in range(AT_ONCE)))

    assert statuses == [200] * AT_ONCE
    assert busy.peak == AT_ONCE  # the model saw every one of them at the same time
    samples = await scrape(gate)
    assert sample(samples, "servegate_requests_total", method="POST", code="200") == AT_ONCE
    assert sample(samples, "servegate_shed_total", reason="queue_full") == 0
    assert sample(samples, "servegate_queue_depth") == 0


CLIENTS = 40
ROUNDS = 15
TICKS = b"".join(b"data: %d\n\n" % tick for tick in range(4))


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 answer's body, framed by Content-Length or chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    fields = head.lower()
    if b"content-length: " in fields:
        return await reader.readexactly(int(fields.split(b"content-length: ")[1].split(b"\r")[0]))
    assert b"transfer-encoding: chunked" in fields, head
    body = b""
    while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"
    assert await reader.readexactly(2) == b"\r\n"  # no trailer fields
    return body


@pytest.mark.time_limit(120)
async def test_under_load_with_writes_held_each_client_gets_its_own_answers_in_order(
    start_gate: StartGate, upstream_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Busy, the event loop holds small writes to clients to the end of its step
    (proxy/corked.py): many keep-alive clients sending back to back, a request and a streamed
    answer's request pipelined at a time, each get their own answers, whole and in order,
    while many writes did wait."""
    held = 0
    end_step = corked._Outbox._end_step

    def counting_end_step(outbox: corked._Outbox) -> None:
        nonlocal held
        held += len(outbox._held)
        end_step(outbox)

    monkeypatch.setattr(corked._Outbox, "_end_step", counting_end_step)
    gate = await start_gate(upstream_url)

    async def client(number: int) -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
        answers = []
        try:
            for round_ in range(ROUNDS):
                body = b"client %d, round %d" % (number, round_)
                writer.write(
                    b"POST /echo HTTP/1.1\r\nHost: model\r\nContent-Length: %d\r\n\r\n%s"
                    b"GET /ticks?count=4&every=0 HTTP/1.1\r\nHost: model\r\n\r\n"
                    % (len(body), body)
                )
                answers.append(await read_answer(reader))
                answers.append(await read_answer(reader))
        finally:
            writer.close()
        return answers

    got = await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    for number, answers in enumerate(got):
        assert answers == [
            answer
            for round_ in range(ROUNDS)
            for answer in (b"client %d, round %d" % (number, round_), TICKS)
        ]
    assert held > CLIENTS  # the load made the loop busy, and writes waited for their step's end


def test_a_file_that_still_sets_upstream_max_connections_is_refused_with_what_replaced_it(
    tmp_path: Any,
) -> None:
    file = tmp_path / "old.yaml"
    file.write_text("upstream: {max_connections: 100}\nbudget: {seconds: -1}\n")
    with pytest.raises(config.SettingsError) as caught:
        config.load(file, environ={})
    removed, *others = caught.value.problems
    assert removed.startswith("upstream.max_connections: removed")
    assert "admission.max_concurrency" in removed
    assert [p.split(":")[0] for p in others] == ["budget.seconds"]  # the rest is still checked


def test_the_environment_cannot_set_the_removed_setting_either() -> None:
    with pytest.raises(config.SettingsError, match=r"upstream\.max_connections: removed"):
        config.load(None, environ={"SERVEGATE_UPSTREAM__MAX_CONNECTIONS": "100"})


def test_open_files_are_raised_to_the_hard_limit() -> None:
    files = limits.raise_open_files()
    assert files.soft == files.hard or files.hard < files.before
    assert files.soft >= files.before


def test_the_listen_backlog_is_a_setting_and_the_admission_queue_is_envoy_sized() -> None:
    settings = config.load(None, environ={}, overrides={"server.backlog": 511})
    assert settings.server.backlog == 511
    defaults = config.load(None, environ={})
    assert defaults.server.backlog == 4096
    assert defaults.admission.max_queue == 1024


@pytest.mark.time_limit(60)
async def test_while_the_model_holds_requests_their_connections_keep_no_http_parser(
    start_gate: StartGate, aiohttp_server: Any
) -> None:
    """A request read whole in one read lets go of its connection's request parser, and the
    answer's parser lives from its first byte to its last: thousands of held requests then
    cost no parser each (about 1 KiB, bench/held_memory.py). The connections still carry
    their next requests."""
    busy = Busy()
    server = await aiohttp_server(busy_app(busy, seconds=1.0))
    gate = await start_gate(f"http://127.0.0.1:{server.port}")
    request = b'POST /predict HTTP/1.1\r\nHost: m\r\nContent-Length: 7\r\n\r\n{"x":1}'
    streams = [await asyncio.open_connection("127.0.0.1", gate.data_port) for _ in range(3)]
    try:
        for rounds in range(2):  # the second on the same connections, after a let-go
            for _, writer in streams:
                writer.write(request)  # one write: one read, on loopback
            for _ in range(100):
                if busy.now == len(streams):
                    break
                await asyncio.sleep(0.05)
            assert busy.now == len(streams), f"round {rounds}: not all held"
            alive = gc.get_objects()
            clients = [o for o in alive if isinstance(o, _JsonErrorHandler) and o.transport]
            upstreams = [o for o in alive if isinstance(o, FramedResponseHandler) and o.transport]
            assert len(clients) == len(upstreams) == len(streams)
            for connection in (*clients, *upstreams):
                kept = [
                    type(o).__name__
                    for held in (connection, *gc.get_referents(connection))
                    for o in gc.get_referents(held)
                    if isinstance(o, HttpRequestParser | HttpResponseParser)
                ]
                assert kept == [], f"round {rounds}: {type(connection).__name__} keeps {kept}"
            for reader, _ in streams:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200 ")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
    finally:
        for _, writer in streams:
            writer.close()


async def test_a_finished_connection_leaves_no_handler_for_the_garbage_collector(
    start_gate: StartGate, aiohttp_server: Any
) -> None:
    """What a connection held is freed as it closes: servegate runs the cyclic collector
    rarely (app.GC_THRESHOLDS), so a cycle through a connection's handler would keep it, and
    all it refers to, for thousands of requests."""
    server = await aiohttp_server(busy_app(Busy(), seconds=0.0))
    gate = await start_gate(f"http://127.0.0.1:{server.port}")
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage, to look at
    try:
        for _ in range(5):  # a connection per request, each with a body
            async with (
                aiohttp.ClientSession() as client,
                client.post(gate_url(gate, "/predict"), json={"x": 1}) as response,
            ):
                assert response.status == 200
        await asyncio.sleep(0.2)  # every connection's close has run
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, RequestHandler)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


@pytest.mark.time_limit(60)
async def test_bodies_kept_for_a_replay_share_one_bound_and_those_past_it_still_go_through(
    start_gate: StartGate, aiohttp_server: Any, client: aiohttp.ClientSession
) -> None:
    """Bodies are read before a request waits for admission, so each request in flight holds
    one: together they stay within retry.replay_buffer_total_bytes. A body that finds it full
    goes on as one over retry.replay_buffer_bytes does (streamed, or spooled when chunked),
    and reaches the model whole."""
    arrived: list[tuple[bytes, str | None]] = []
    all_arrived = asyncio.Event()

    async def predict(request: web.Request) -> web.Response:
        body = await request.read()
        arrived.append((body, request.headers.get("Content-Length")))
        if len(arrived) == len(bodies):
            all_arrived.set()
        await asyncio.wait_for(all_arrived.wait(), 20)
        await asyncio.sleep(0.5)  # held together, while the gauge is read
        return web.Response(body=hashlib.sha256(body).hexdigest().encode())

    app = web.Application()
    app.router.add_post("/predict", predict)
    server = await aiohttp_server(app)
    gate = await start_gate(
        f"http://127.0.0.1:{server.port}",
        **{"retry.replay_buffer_bytes": 64 * 1024, "retry.replay_buffer_total_bytes": 128 * 1024},
    )
    bodies = [os.urandom(60_000) for _ in range(6)]

    async def send(body: bytes, chunked: bool) -> str:
        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 16_384):
                yield body[start : start + 16_384]

        data = chunks() if chunked else body
        async with client.post(gate_url(gate, "/predict"), data=data) as response:
            assert response.status == 200
            return await response.text()

    sending = asyncio.gather(*(send(body, i % 2 == 1) for i, body in enumerate(bodies)))
    await asyncio.wait_for(all_arrived.wait(), 20)
    during = await scrape(gate)
    digests = await sending
    assert digests == [hashlib.sha256(body).hexdigest() for body in bodies]
    assert sorted(body for body, _ in arrived) == sorted(bodies)
    assert {length for _, length in arrived} == {"60000"}  # chunked ones too, when spooled
    held = sample(during, "servegate_request_body_buffer_bytes")
    assert 0 < held <= 128 * 1024
    assert sample(during, "servegate_request_body_buffer_limit_bytes") == 128 * 1024
    assert sample(during, "servegate_request_body_buffer_full_total") >= len(bodies) - 2
    assert sample(await scrape(gate), "servegate_request_body_buffer_bytes") == 0


async def test_a_refused_request_gives_its_body_memory_back(
    start_gate: StartGate, aiohttp_server: Any, client: aiohttp.ClientSession
) -> None:
    """A request read and then shed (429) or cancelled while queued holds its body no longer:
    after the answers, nothing is counted."""
    busy = Busy()
    server = await aiohttp_server(busy_app(busy, seconds=1.0))
    gate = await start_gate(
        f"http://127.0.0.1:{server.port}",
        **{"admission.max_concurrency": 1, "admission.max_queue": 0},
    )

    async def send() -> int:
        async with client.post(gate_url(gate, "/predict"), data=os.urandom(100_000)) as response:
            await response.read()
            return response.status

    statuses = await asyncio.gather(send(), send())
    assert sorted(statuses) == [200, 429]
    assert sample(await scrape(gate), "servegate_request_body_buffer_bytes") == 0
