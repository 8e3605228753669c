"""Writes held to the end of the event loop's step while the loop is busy (proxy/corked.py), on
real loopback TCP connections: what the peer's socket holds, read without waiting, is what was
sent. A test that asks for held writes first makes its loop busy (`make_busy`): each test runs
on a loop of its own."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest

from proxy.corked import HOLD_LIMIT, WINDOW, CorkedTransport


@contextlib.asynccontextmanager
async def corked_pair() -> AsyncIterator[tuple[CorkedTransport, socket.socket]]:
    """A CorkedTransport over a loopback connection, and the peer's socket."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        peer, _ = listener.accept()
        corked = CorkedTransport(transport)
        try:
            yield corked, peer
        finally:
            transport.abort()
            peer.close()


def unread(peer: socket.socket) -> bytes:
    """What the peer's kernel holds, read without waiting (loopback delivers within the
    sending system call)."""
    try:
        return peer.recv(4 * HOLD_LIMIT, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


async def read(peer: socket.socket, size: int) -> bytes:
    """Up to `size` bytes, fewer when the peer's end comes first, while the loop runs."""
    loop = asyncio.get_running_loop()
    peer.setblocking(False)
    data = b""
    async with asyncio.timeout(5):
        while len(data) < size and (piece := await loop.sock_recv(peer, size - len(data))):
            data += piece
    return data


def burn(seconds: float) -> None:
    """Keep this thread busy for `seconds` of its CPU time."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


async def make_busy(corked: CorkedTransport, peer: socket.socket) -> None:
    """Keep the loop busy for a few windows, then write: the write must wait."""
    for _ in range(3):
        corked.write(b".")  # a step whose end looks back over the window
        burn(2 * WINDOW)
        await asyncio.sleep(0)
    assert unread(peer).strip(b".") == b""
    corked.write(b"held")
    assert unread(peer) == b""  # held while the loop is busy
    await asyncio.sleep(0)
    assert unread(peer) == b"held"


async def test_an_idle_loop_sends_each_write_at_once() -> None:
    async with corked_pair() as (corked, peer):
        corked.write(b"one")
        assert unread(peer) == b"one"
        corked.write(b"two")
        assert unread(peer) == b"two"


async def test_a_loop_idle_again_sends_at_once_again() -> None:
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer)
        await asyncio.sleep(3 * WINDOW)  # idle
        corked.write(b"step")  # its end looks back over an idle window
        await asyncio.sleep(0)
        assert unread(peer) == b"step"
        corked.write(b"at once")
        assert unread(peer) == b"at once"


async def test_small_writes_wait_for_the_end_of_the_step_then_leave_together_in_order() -> None:
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer)
        corked.write(b"HTTP/1.1 200 OK\r\n")
        corked.writelines([b"Content-Length: 2\r\n", b"\r\n"])
        corked.write(bytearray(b"ok"))
        assert unread(peer) == b""
        assert corked.get_write_buffer_size() == 40
        await asyncio.sleep(0)  # the step's callbacks ran, the outbox's first among them
        assert unread(peer) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        assert corked.get_write_buffer_size() == 0


async def test_a_bytearray_is_taken_as_it_was_when_written() -> None:
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer)
        data = bytearray(b"first")
        corked.write(data)
        data[:] = b"later"
        await asyncio.sleep(0)
        assert unread(peer) == b"first"


async def test_a_write_past_the_hold_limit_sends_what_waits_first_then_itself_at_once() -> None:
    """Large bodies reach the transport, and its flow control, as they are written."""
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer)
        corked.write(b"head;")
        corked.write(b"b" * HOLD_LIMIT)
        assert await read(peer, 5 + HOLD_LIMIT) == b"head;" + b"b" * HOLD_LIMIT
        await make_busy(corked, peer)
        corked.write(b"next")  # waits again
        assert unread(peer) == b""
        await asyncio.sleep(0)
        assert unread(peer) == b"next"


async def test_closing_sends_what_waits_before_the_close() -> None:
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer)
        corked.write(b"the last answer")
        corked.close()
        assert await read(peer, 16) == b"the last answer"  # then the FIN


async def test_half_closing_sends_what_waits_before_the_fin() -> None:
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer)
        corked.write(b"408 and done")
        corked.write_eof()
        assert await read(peer, 13) == b"408 and done"  # then the FIN


async def test_aborting_drops_what_waits() -> None:
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer)
        corked.write(b"never sent")
        corked.abort()
        with contextlib.suppress(ConnectionResetError):
            assert await read(peer, 64) == b""


async def test_what_waits_for_a_transport_closed_meanwhile_is_dropped() -> None:
    """The peer reset the connection, or the owner closed the transport itself: nothing is
    written to a closing transport."""
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer)
        corked.write(b"too late")
        corked._transport.close()
        await asyncio.sleep(0)
        assert unread(peer) == b""


@pytest.mark.parametrize("count", [2, 50])
async def test_every_transport_written_in_a_step_is_sent_by_its_end(count: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        pairs = [await stack.enter_async_context(corked_pair()) for _ in range(count)]
        await make_busy(*pairs[0])
        for number, (corked, _peer) in enumerate(pairs):
            corked.write(b"%d" % number)
        await asyncio.sleep(0)
        assert [unread(peer) for _corked, peer in pairs] == [b"%d" % n for n in range(count)]
