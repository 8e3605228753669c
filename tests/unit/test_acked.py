"""The acknowledgement count of an upstream connection, on real loopback TCP connections."""

from __future__ import annotations

import asyncio

import pytest

from proxy import acked
from proxy.acked import AckCounter
from tests.conftest import LogCapture, no_descriptor_left


async def test_a_connection_opened_without_a_descriptor_to_spare_says_so_once_per_interval(
    log_capture: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No descriptor left for the duplicate that keeps the count: the connection goes on
    without the proof (its keep-alive race is answered, not replayed), and the log says so,
    once for a burst of such connections, with how many."""
    monkeypatch.setattr(acked, "_unproven", acked._Unproven())
    accepted: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    transports = [
        (await loop.create_connection(asyncio.Protocol, "127.0.0.1", port))[0] for _ in range(3)
    ]
    try:
        counted = AckCounter.attach(transports[0])
        assert counted is not None
        counted.close()
        with no_descriptor_left(spare=8):
            assert AckCounter.attach(transports[1]) is None
            assert AckCounter.attach(transports[2]) is None
    finally:
        for transport in transports:
            transport.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    [line] = log_capture.events("upstream.replay_proof_unavailable")
    assert line["level"] == "warning"
    assert line["connections"] == 1  # the first of the burst; the next line counts the rest
    assert "Too many open files" in line["error"]
    assert "ulimit -n" in line["message"]
