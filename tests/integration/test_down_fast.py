"""A model server that is down costs a client seconds, not the budget: refused connects are
retried for retry.connect_wait, and once the circuit is open every request, including those
backing off and the half-open trial, is answered at once with Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import aiohttp
import pytest

from proxy.app import Servegate
from proxy.circuit import CircuitState
from tests.conftest import StartGate, gate_url, sample, scrape
from tests.upstreams.gunicorn import free_port

REFUSED = {"category": "service", "cause": "connect_refused"}
# Behaviour bounds with ample headroom for a loaded machine, far below the 40 s budget.
AT_ONCE = 0.5


async def post(client: aiohttp.ClientSession, gate: Servegate) -> tuple[float, int, dict[str, str]]:
    began = time.monotonic()
    async with client.post(gate_url(gate, "/predict"), data=b"{}") as response:
        body = await response.json()
        body["retry_after"] = response.headers.get("Retry-After", "")
        return time.monotonic() - began, response.status, body


@contextlib.contextmanager
def accepting_nothing() -> Iterator[int]:
    """A port whose accept queue is full: the kernel drops further SYNs, so a connect to it
    neither succeeds nor fails, as to a host that is down or firewalled without a reply."""
    listening = socket.socket()
    queued: list[socket.socket] = []
    try:
        listening.bind(("127.0.0.1", 0))
        listening.listen(0)
        port = listening.getsockname()[1]
        for _ in range(3):  # more than the queue holds: it is full for good
            filler = socket.socket()
            queued.append(filler)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port
    finally:
        for sock in [*queued, listening]:
            sock.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    with accepting_nothing() as port:
        yield port


async def refused_attempts(gate: Servegate) -> float:
    return sample(await scrape(gate), "servegate_upstream_failures_total", **REFUSED)


async def test_a_dead_model_is_answered_within_the_connect_wait_then_at_once_and_tried_once(
    start_gate: StartGate, client: aiohttp.ClientSession
) -> None:
    gate = await start_gate(f"http://127.0.0.1:{free_port()}")  # default settings
    seconds, status, body = await post(client, gate)
    assert status == 503
    assert seconds < 5.0  # within retry.connect_wait (3 s), never the 40 s budget
    assert gate.circuit.state is CircuitState.OPEN  # the health checks opened the circuit
    for _ in range(10):
        seconds, status, body = await post(client, gate)
        assert (status, body["cause"]) == (503, "circuit_open")
        assert seconds < AT_ONCE
        assert int(body["retry_after"]) >= 1
        assert "connect_refused" in body["hint"]  # what opened it: "down" alone says no fix
    # The cool-down ends: the next request is the half-open trial, and makes one attempt.
    await asyncio.sleep(gate.circuit.retry_after() + 0.05)
    before = await refused_attempts(gate)
    seconds, status, body = await post(client, gate)
    assert (status, body["cause"]) == (503, "circuit_open")
    assert seconds < AT_ONCE
    assert await refused_attempts(gate) == before + 1
    assert gate.circuit.state is CircuitState.OPEN


async def test_requests_backing_off_get_circuit_open_as_soon_as_it_opens(
    start_gate: StartGate, client: aiohttp.ClientSession
) -> None:
    gate = await start_gate(f"http://127.0.0.1:{free_port()}")
    answers = await asyncio.gather(*(post(client, gate) for _ in range(4)))
    assert [(status, body["cause"]) for _, status, body in answers] == [(503, "circuit_open")] * 4
    assert max(seconds for seconds, _, _ in answers) < 3.0  # all stopped when it opened
    samples = await scrape(gate)
    assert sample(samples, "servegate_shed_total", reason="circuit_open") == 4


async def test_without_the_circuit_refused_connects_are_retried_for_the_connect_wait(
    start_gate: StartGate, client: aiohttp.ClientSession
) -> None:
    gate = await start_gate(
        f"http://127.0.0.1:{free_port()}",
        **{"circuit.failure_threshold": 1000, "health.unhealthy_threshold": 100,
           "retry.connect_wait": 1.5},
    )  # fmt: skip
    seconds, status, body = await post(client, gate)
    assert (status, body["cause"]) == (503, "connect_refused")
    assert 1.4 <= seconds < 4.0


async def test_refusals_during_a_crash_loop_are_named_for_the_crash_loop(
    start_gate: StartGate, client: aiohttp.ClientSession
) -> None:
    gate = await start_gate(f"http://127.0.0.1:{free_port()}", **{"circuit.failure_threshold": 1})
    for _ in range(3):  # restarts seen close together: a crash loop
        gate.health.record_restart("a worker died")
    await post(client, gate)  # its refusal opens the circuit
    assert gate.circuit.state is CircuitState.OPEN
    seconds, status, body = await post(client, gate)
    assert (status, body["category"], body["cause"]) == (503, "service", "crash_loop")
    assert seconds < AT_ONCE
    assert int(body["retry_after"]) >= 1
    assert "keeps restarting" in body["hint"]


async def test_a_connect_that_never_completes_is_a_connect_timeout_and_is_retried(
    start_gate: StartGate, client: aiohttp.ClientSession, silent_port: int
) -> None:
    """Never a crash: nothing reached the model, so the request is retried within the connect
    wait and the answer says the connection could not be opened in time."""
    gate = await start_gate(
        f"http://127.0.0.1:{silent_port}",
        **{"circuit.failure_threshold": 1000, "health.unhealthy_threshold": 100,
           "upstream.connect_timeout": 0.3, "retry.connect_wait": 1.0},
    )  # fmt: skip
    seconds, status, body = await post(client, gate)
    assert (status, body["category"], body["cause"]) == (503, "service", "connect_timeout")
    assert 0.9 <= seconds < 4.0
    samples = await scrape(gate)
    timed_out = sample(samples, "servegate_upstream_failures_total",
                       category="service", cause="connect_timeout")  # fmt: skip
    assert timed_out >= 2
    assert sample(samples, "servegate_upstream_failures_total",
                  category="service", cause="reset_during_request") == 0  # fmt: skip


async def test_a_restart_shorter_than_the_connect_wait_is_ridden_out_with_defaults(
    start_gate: StartGate, client: aiohttp.ClientSession
) -> None:
    """A request's refusals count towards the circuit once, when it gives up: with default
    settings, a model server that stops listening for 0.8 s (a master restarting) costs the
    requests in flight, more of them than circuit.failure_threshold, a wait, not an error."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r")[0])
            await reader.readexactly(length)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                b"Connection: close\r\n\r\n{}"
            )
            await writer.drain()
        writer.close()

    port = free_port()
    model = await asyncio.start_server(answer, "127.0.0.1", port)
    try:
        gate = await start_gate(f"http://127.0.0.1:{port}")
        model.close()
        await model.wait_closed()
        sent = [asyncio.create_task(post(client, gate)) for _ in range(8)]
        await asyncio.sleep(0.8)
        model = await asyncio.start_server(answer, "127.0.0.1", port)
        answers = await asyncio.wait_for(asyncio.gather(*sent), 10)
    finally:
        model.close()
    assert [status for _, status, _ in answers] == [200] * 8
    assert all(0.7 < seconds < 3.5 for seconds, _, _ in answers)
