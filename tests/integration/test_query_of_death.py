"""Proof before replay: a request is sent again only when the model server's TCP acknowledged
none of it. A model that dies on a request's bytes gets them once; an idle close that crossed a
request is retried on a fresh connection, whatever the timing."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.acked import AckCounter, bytes_acked
from tests.conftest import StartGate, gate_url, sample, scrape
from tests.upstreams.raw import ClosesAsRequestArrives, DelayRelay
from tests.upstreams.uvicorn import Uvicorn, start_uvicorn

REQUEST = b"POST /predict HTTP/1.1\r\nHost: model\r\nContent-Length: 5\r\n\r\nhello"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
STALE = {"category": "communication", "cause": "stale_connection"}
RESET = {"category": "service", "cause": "reset_during_request"}


# --- The kernel's count, on real loopback sockets ------------------------------------------


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A client and a server socket after one request and answer, as a pooled connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    client.sendall(REQUEST)
    server.recv(65536)
    server.sendall(ANSWER)
    client.recv(65536)
    yield client, server
    client.close()
    server.close()


def settle() -> None:
    time.sleep(0.05)  # the peer's last segment has reached the client's kernel


def test_the_count_is_read_at_the_right_offset(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    client, server = connection
    before = bytes_acked(client)
    assert before is not None
    client.sendall(REQUEST)
    assert server.recv(65536) == REQUEST
    server.sendall(ANSWER)  # carries the acknowledgement
    client.recv(65536)
    assert bytes_acked(client) == before + len(REQUEST)


def test_an_idle_close_before_the_request_arrived_acknowledges_none_of_it(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    client, server = connection
    counter = AckCounter.attach(_Transport(client))
    assert counter is not None
    before = counter.count()
    server.close()
    settle()
    client.sendall(REQUEST)  # the close is in the kernel, not yet seen by the sender
    settle()
    assert counter.count() == before
    counter.close()


def test_a_crash_before_reading_acknowledges_none_of_the_request(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    client, server = connection
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)  # as mid-exchange
    counter = AckCounter.attach(_Transport(client))
    assert counter is not None
    before = counter.count()
    client.sendall(REQUEST)
    select.select([server], [], [], 1.0)
    server.close()  # the request is in its kernel, unread: a reset
    settle()
    assert counter.count() == before
    counter.close()


def test_a_crash_after_reading_acknowledges_the_request_even_after_the_owner_closed(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    client, server = connection
    counter = AckCounter.attach(_Transport(client))
    assert counter is not None
    before = counter.count()
    assert before is not None
    client.sendall(REQUEST)
    assert server.recv(65536) == REQUEST
    server.close()  # its close carries the acknowledgement
    settle()
    client.close()  # the library's own descriptor is gone; the counter still counts
    assert counter.count() == before + len(REQUEST)
    counter.close()  # the last count is kept
    assert counter.count() == before + len(REQUEST)


def test_on_plain_tcp_the_bytes_written_and_the_count_share_one_scale() -> None:
    """Where a request begins is known from the bytes written, without asking the kernel:
    the count at the handshake (which may count the SYN) plus every byte written since."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    try:
        counter = AckCounter.attach(_Transport(client))
        assert counter is not None
        assert counter.mark() == counter.count()
        for _ in range(3):  # requests answered: each is acknowledged whole, and no more
            client.sendall(REQUEST)
            counter.sent(len(REQUEST))
            assert server.recv(65536) == REQUEST
            server.sendall(ANSWER)
            client.recv(65536)
            assert counter.count() == counter.mark()
        begins = counter.mark()
        assert begins is not None
        client.sendall(REQUEST)
        counter.sent(len(REQUEST))
        assert server.recv(65536) == REQUEST
        server.close()  # read, then a crash: all of it acknowledged
        settle()
        assert counter.acked_since(begins) == len(REQUEST)
        counter.close()
    finally:
        client.close()
        server.close()


class _Transport:
    """What AckCounter reads of an asyncio transport, for a plain socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def get_extra_info(self, name: str) -> Any:
        return self._sock if name == "socket" else None


# --- servegate in front of a real Uvicorn with two workers ---------------------------------


@pytest.fixture
def uvicorn(tmp_path: Path) -> Iterator[Callable[..., Uvicorn]]:
    started: list[Uvicorn] = []

    def start(*args: str) -> Uvicorn:
        env = {"DEATHS_FILE": str(tmp_path / "deaths")}
        server = start_uvicorn(tmp_path, "tests.upstreams.dies:app", *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def deaths(tmp_path: Path) -> list[str]:
    path = tmp_path / "deaths"
    return path.read_text().split() if path.exists() else []


async def post(client: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with client.post(url, data=b'{"inputs": [1]}') as response:
        return response.status, await response.text()


@pytest.mark.parametrize("relayed", [False, True], ids=["direct", "through_a_relay"])
@pytest.mark.time_limit(90)
async def test_a_model_that_dies_on_a_request_gets_it_once_and_one_worker_dies(
    relayed: bool,
    tmp_path: Path,
    uvicorn: Callable[..., Uvicorn],
    raw_server: Callable[..., Any],
    start_gate: StartGate,
    client: aiohttp.ClientSession,
) -> None:
    model = uvicorn("--workers", "2")
    url = (await raw_server(DelayRelay(model.port))).url if relayed else model.url
    gate = await start_gate(url)
    pids = {(await post(client, gate_url(gate, "/predict")))[1] for _ in range(10)}
    assert len(pids) == 1  # one keep-alive connection to one worker
    await asyncio.sleep(0.3)

    status, text = await post(client, gate_url(gate, "/die"))
    assert status == 503
    body = json.loads(text)
    assert (body["category"], body["cause"]) == ("service", "reset_during_request")
    assert "sent once and not replayed" in body["hint"]
    await asyncio.sleep(1.0)  # a replay would have killed the other worker by now
    assert deaths(tmp_path) == list(pids)

    samples = await scrape(gate)
    assert sample(samples, "servegate_upstream_failures_total", **RESET) == 1
    assert sample(samples, "servegate_upstream_failures_total", **STALE) == 0
    assert sample(samples, "servegate_4503_total", **RESET) == 1
    for cause in ("stale_connection", "reset_during_request"):
        for outcome in ("succeeded", "failed"):
            assert sample(samples, "servegate_retries_total", cause=cause, outcome=outcome) == 0
    assert (await post(client, gate_url(gate, "/predict")))[0] == 200  # the other worker


async def test_an_idle_close_that_crossed_the_request_is_retried_and_succeeds(
    raw_server: Callable[..., Any], start_gate: StartGate, client: aiohttp.ClientSession
) -> None:
    server = await raw_server(ClosesAsRequestArrives())
    gate = await start_gate(server.url, **{"upstream.idle_expiry": 30})
    for _ in range(10):
        assert (await post(client, gate_url(gate, "/predict")))[0] == 200
    # Every other request met the close on the pooled connection (its retry ran on a one-shot
    # connection, so the next request opened a new pooled one); each was read exactly once.
    assert server.closed_unread == 5
    assert server.answered == 10
    samples = await scrape(gate)
    assert sample(samples, "servegate_upstream_failures_total", **STALE) == 5
    assert sample(samples, "servegate_upstream_failures_total", **RESET) == 0
    recovered = {"cause": "stale_connection", "outcome": "succeeded"}
    assert sample(samples, "servegate_retries_total", **recovered) == 5
    assert sample(samples, "servegate_4503_total", **STALE) == 0


@pytest.mark.time_limit(90)
async def test_uvicorn_closing_idle_connections_costs_no_request(
    uvicorn: Callable[..., Uvicorn], start_gate: StartGate, client: aiohttp.ClientSession
) -> None:
    model = uvicorn("--workers", "2", "--timeout-keep-alive", "1")
    # The pool keeps connections past Uvicorn's 1 s, so its idle closes meet servegate's reuse.
    gate = await start_gate(model.url, **{"upstream.idle_expiry": 5})
    for pause in (0.0, 0.3, 1.2, 0.9, 1.0, 1.1):
        for _ in range(10):
            assert (await post(client, gate_url(gate, "/predict")))[0] == 200
        await asyncio.sleep(pause)
    assert (await post(client, gate_url(gate, "/predict")))[0] == 200
    samples = await scrape(gate)
    assert sample(samples, "servegate_upstream_failures_total", **RESET) == 0
    stale = sample(samples, "servegate_upstream_failures_total", **STALE)
    recovered = {"cause": "stale_connection", "outcome": "succeeded"}
    assert sample(samples, "servegate_retries_total", **recovered) == stale
