"""Proof before replay: a request is sent again only when the model server had closed the
connection (its FIN came) with none of the request acknowledged. A model that dies on a
request's bytes gets them once; an idle close that crossed a request is retried on a fresh
connection, whatever the timing; a reset as the request arrived is answered, never replayed."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop

from proxy.acked import AckCounter, bytes_acked
from proxy.framing import FramedResponseHandler
from tests.conftest import (
    Certificates,
    LogCapture,
    StartGate,
    close_when_reused,
    gate_url,
    sample,
    scrape,
)
from tests.upstreams.raw import ClosesIdleOnReuse, DelayRelay, ResetsAsRequestArrives
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


@pytest.mark.parametrize("read", [0, 10], ids=["before_reading", "after_reading_part"])
def test_a_reset_before_or_after_reading_part_may_acknowledge_none_of_the_request(
    read: int, connection: tuple[socket.socket, socket.socket]
) -> None:
    """Why a reset alone proves nothing: whether the process read none of the request or its
    start, its TCP's delayed acknowledgement had not gone out when the close reset the
    connection, and the two look the same."""
    client, server = connection
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)  # as mid-exchange
    counter = AckCounter.attach(_Transport(client))
    assert counter is not None
    before = counter.count()
    client.sendall(REQUEST)
    select.select([server], [], [], 1.0)
    if read:
        assert server.recv(read) == REQUEST[:read]  # the process has seen the request line
    server.close()  # the rest is in its kernel, unread: a reset
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


# The loop servegate runs on, and the one the tests run on: each reports a FIN its own way.
LOOPS = {"uvloop": uvloop.run, "asyncio": asyncio.run}


@pytest.mark.parametrize("loop_kind", sorted(LOOPS))
def test_the_connection_tells_a_close_before_the_request_from_a_reset_alone(
    loop_kind: str,
) -> None:
    """servegate's protocol records the peer's FIN; a reset with no FIN before it leaves the
    request unproven, though neither acknowledged any of it."""
    LOOPS[loop_kind](_plain_close_or_reset())


async def _plain_close_or_reset() -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    ended: dict[str, bool] = {}
    try:
        for how in (
            "closed before the request",
            "met by a write first",
            "reset after reading part",
            "closed by servegate",
        ):
            transport, handler = await loop.create_connection(
                lambda: FramedResponseHandler(loop, on_fault=lambda _fault: None),
                *listener.getsockname(),
            )
            server, _ = await loop.sock_accept(listener)
            server.setblocking(True)
            try:
                acks = handler.acks
                assert acks is not None
                transport.write(REQUEST)  # a first exchange: the connection as a pooled one
                acks.sent(len(REQUEST))
                assert server.recv(65536) == REQUEST
                server.sendall(ANSWER)
                settle()
                begins = acks.mark()
                assert begins is not None
                server.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
                if how == "closed before the request":
                    server.shutdown(socket.SHUT_RDWR)  # an idle timer's close: a FIN
                    transport.write(REQUEST)  # crosses it, and is reset unread
                    acks.sent(len(REQUEST))
                elif how == "met by a write first":
                    server.shutdown(socket.SHUT_RDWR)
                    transport.write(REQUEST[:20])
                    acks.sent(20)
                    settle()  # the reset is in; the next write, not a read, meets it
                    transport.write(REQUEST[20:])
                    acks.sent(len(REQUEST) - 20)
                elif how == "reset after reading part":
                    transport.write(REQUEST)
                    acks.sent(len(REQUEST))
                    assert server.recv(10) == REQUEST[:10]
                    server.close()  # with the rest unread: a reset, and no FIN
                else:
                    handler.close()  # a loss without error that is no FIN
                await _lost(handler)
                assert acks.acked_since(begins) == 0  # in both cases
                ended[how] = acks.peer_finished
            finally:
                transport.close()
                server.close()
    finally:
        listener.close()
    assert ended == {
        "closed before the request": True,
        "met by a write first": True,
        "reset after reading part": False,
        "closed by servegate": False,
    }


@pytest.mark.parametrize("loop_kind", sorted(LOOPS))
@pytest.mark.parametrize("how", ["closed before the request", "reset with it unread"])
def test_over_tls_too_the_connection_tells_a_close_from_a_reset_alone(
    how: str, loop_kind: str, certificates: Certificates
) -> None:
    """A TLS server that closes without close_notify (Gunicorn's workers close the socket so)
    ends with a bare FIN, which uvloop's TLS layer reports as a loss without error rather than
    as an end of stream."""
    LOOPS[loop_kind](_tls_close_or_reset(how, certificates))


async def _tls_close_or_reset(how: str, certificates: Certificates) -> None:
    loop = asyncio.get_running_loop()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(certificates.cert_file, certificates.key_file)
    client_tls = ssl.create_default_context(cafile=str(certificates.ca_file))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    try:
        connecting = asyncio.ensure_future(
            loop.create_connection(
                lambda: FramedResponseHandler(loop, on_fault=lambda _fault: None),
                *listener.getsockname(),
                ssl=client_tls,
            )
        )
        raw, _ = await loop.sock_accept(listener)
        raw.setblocking(True)
        server = await loop.run_in_executor(
            None, lambda: server_tls.wrap_socket(raw, server_side=True)
        )
        transport, handler = await connecting
        try:
            acks = handler.acks
            assert acks is not None
            transport.write(REQUEST)  # a first exchange: the connection as a pooled one
            assert await loop.run_in_executor(None, server.recv, 65536) == REQUEST
            server.sendall(ANSWER)
            settle()
            await asyncio.sleep(0.05)  # the answer is read
            begins = acks.mark()
            assert begins is not None
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
            if how == "closed before the request":
                server.shutdown(socket.SHUT_RDWR)  # a FIN, no close_notify
                transport.write(REQUEST)
            else:
                transport.write(REQUEST)
                select.select([server], [], [], 1.0)
                server.close()  # its record arrived and is unread: a reset
            await _lost(handler)
            assert acks.acked_since(begins) == 0
            assert acks.peer_finished is (how == "closed before the request")
        finally:
            transport.close()
            server.close()
    finally:
        listener.close()


async def _lost(handler: FramedResponseHandler) -> None:
    """Until the connection is lost (connection_lost has run), within 2 s."""
    closed = handler.closed  # None: connection_lost has run already
    if closed is not None:
        done, _ = await asyncio.wait([closed], timeout=2.0)
        assert done, "the connection was not lost within 2 s"


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
    server = await raw_server(ClosesIdleOnReuse())
    gate = await start_gate(server.url, **{"upstream.idle_expiry": 30})
    close_when_reused(gate, server)
    for _ in range(10):
        assert (await post(client, gate_url(gate, "/predict")))[0] == 200
    # Every other request met the close on the pooled connection (its retry ran on a one-shot
    # connection, so the next request opened a new pooled one); each was read exactly once.
    assert server.closed_idle == 5
    assert server.answered == 10
    samples = await scrape(gate)
    assert sample(samples, "servegate_upstream_failures_total", **STALE) == 5
    assert sample(samples, "servegate_upstream_failures_total", **RESET) == 0
    recovered = {"cause": "stale_connection", "outcome": "succeeded"}
    assert sample(samples, "servegate_retries_total", **recovered) == 5
    assert sample(samples, "servegate_4503_total", **STALE) == 0


@pytest.mark.parametrize("opted_in", [False, True])
async def test_a_reset_as_the_request_arrived_is_answered_and_replayed_only_when_opted_in(
    opted_in: bool,
    raw_server: Callable[..., Any],
    start_gate: StartGate,
    client: aiohttp.ClientSession,
    log_capture: LogCapture,
) -> None:
    # The server read none of it, but a reset looks the same when it had read a part: the
    # request may have reached the model, so only the operator's opt-in replays it.
    server = await raw_server(ResetsAsRequestArrives())
    settings: dict[str, Any] = {"upstream.idle_expiry": 30}
    if opted_in:
        settings["retry.replay_after_reset"] = ["POST"]
    gate = await start_gate(server.url, **settings)
    assert (await post(client, gate_url(gate, "/predict")))[0] == 200  # leaves a pooled one
    status, text = await post(client, gate_url(gate, "/predict"))
    assert server.closed_unread == 1
    samples = await scrape(gate)
    assert sample(samples, "servegate_upstream_failures_total", **STALE) == 0
    assert sample(samples, "servegate_upstream_failures_total", **RESET) == 1
    if opted_in:
        assert status == 200
        assert server.answered == 2  # the warm request, and the replay
    else:
        assert status == 503
        body = json.loads(text)
        assert (body["category"], body["cause"]) == ("service", "reset_during_request")
        assert "not replayed: the model may have acted on it" in body["hint"]
        detail = log_capture.access()[-1]["detail"]
        assert "a reset does not tell whether it had read any of the request" in detail
        assert server.answered == 1
        assert sample(samples, "servegate_4503_total", **RESET) == 1


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
