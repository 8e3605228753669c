"""The listener's accounting of the connections it accepted but never handed to aiohttp."""

from __future__ import annotations

import select
import socket

from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry

from proxy import listener
from proxy.config import ServerSettings
from proxy.metrics import Metrics


def _never_handed_over() -> RequestHandler:
    raise AssertionError("no connection reaches aiohttp in these tests")


async def test_stopping_before_a_connection_was_peeked_at_closes_and_uncounts_it() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, budget_seconds=40.0)
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    acceptor = listener._Acceptor(
        [listening], _never_handed_over, None, ServerSettings(), metrics, listener.ADMIN_LIMIT
    )
    client = socket.create_connection(listening.getsockname()[:2], timeout=5)
    try:
        assert select.select([listening], [], [], 5)[0]  # the kernel has queued the connection
        # What the loop does when the listening socket is readable, then a stop before the
        # accepted connection's task has run at all.
        acceptor._accept(listening)
        assert registry.get_sample_value("servegate_client_connections") == 1
        acceptor.close()
        acceptor.close()  # a second stop is harmless
        await acceptor.wait_closed()
        assert registry.get_sample_value("servegate_client_connections") == 0
        assert client.recv(1) == b""  # servegate closed its side
    finally:
        client.close()
        acceptor.close()
