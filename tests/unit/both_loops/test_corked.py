"""Writes held to the end of the event loop's step while the loop is busy (proxy/corked.py), on
real loopback TCP connections: what the peer's socket holds, read without waiting, is what was
sent. A test that asks for held writes first makes its loop count as busy (`make_busy`): each
test runs on a loop of its own, asyncio's and uvloop's (servegate's), whose steps differ: uvloop
reads sockets between one step's callbacks and the next's."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest

from proxy import corked as corked_module
from proxy.connection import ClientConnection
from proxy.corked import HOLD_LIMIT, WINDOW, CorkedTransport
from tests.conftest import LogCapture


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


async def make_busy(
    corked: CorkedTransport, peer: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Make the loop count as busy, whatever else runs on the machine: any share of a window
    will do (BUSY_SHARE 0), and a window passes. Then a write must wait."""
    monkeypatch.setattr(corked_module, "BUSY_SHARE", 0.0)
    corked.write(b".")
    await asyncio.sleep(1.5 * WINDOW)
    corked.write(b".")  # its step's end looks back over a whole window
    await asyncio.sleep(0)
    assert unread(peer) == b".."
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


async def test_a_loop_idle_again_sends_at_once_again(monkeypatch: pytest.MonkeyPatch) -> None:
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer, monkeypatch)
        monkeypatch.setattr(corked_module, "BUSY_SHARE", 0.5)
        await asyncio.sleep(3 * WINDOW)  # idle
        corked.write(b"step")  # its end looks back over an idle window
        await asyncio.sleep(0)
        assert unread(peer) == b"step"
        corked.write(b"at once")
        assert unread(peer) == b"at once"


async def test_a_loop_working_most_of_a_window_holds_writes() -> None:
    """The busy test itself, on the thread's real CPU clock."""
    async with corked_pair() as (corked, peer):
        for _ in range(50):  # bounded: a machine that lends the test half a core gets there
            corked.write(b".")
            burn(2 * WINDOW)
            await asyncio.sleep(0)  # the step's end looks back over the window
            unread(peer)  # the dots, sent at once or at the step's end
            corked.write(b"probe")
            if unread(peer) == b"":
                break  # held: the loop counts as busy
        else:
            pytest.fail("50 windows of work never counted as busy")
        await asyncio.sleep(0)
        assert unread(peer) == b"probe"


async def test_small_writes_wait_for_the_end_of_the_step_then_leave_together_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer, monkeypatch)
        corked.write(b"HTTP/1.1 200 OK\r\n")
        corked.writelines([b"Content-Length: 2\r\n", b"\r\n"])
        corked.write(bytearray(b"ok"))
        assert unread(peer) == b""
        assert corked.get_write_buffer_size() == 40
        await asyncio.sleep(0)  # the step's callbacks ran, the outbox's first among them
        assert unread(peer) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        assert corked.get_write_buffer_size() == 0


async def test_a_bytearray_is_taken_as_it_was_when_written(monkeypatch: pytest.MonkeyPatch) -> None:
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer, monkeypatch)
        data = bytearray(b"first")
        corked.write(data)
        data[:] = b"later"
        await asyncio.sleep(0)
        assert unread(peer) == b"first"


async def test_a_write_past_the_hold_limit_sends_what_waits_first_then_itself_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Large bodies reach the transport, and its flow control, as they are written."""
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer, monkeypatch)
        corked.write(b"head;")
        corked.write(b"b" * HOLD_LIMIT)
        assert await read(peer, 5 + HOLD_LIMIT) == b"head;" + b"b" * HOLD_LIMIT
        await make_busy(corked, peer, monkeypatch)
        corked.write(b"next")  # waits again
        assert unread(peer) == b""
        await asyncio.sleep(0)
        assert unread(peer) == b"next"


async def test_closing_sends_what_waits_before_the_close(monkeypatch: pytest.MonkeyPatch) -> None:
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer, monkeypatch)
        corked.write(b"the last answer")
        corked.close()
        assert await read(peer, 16) == b"the last answer"  # then the FIN


async def test_half_closing_sends_what_waits_before_the_fin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer, monkeypatch)
        corked.write(b"408 and done")
        corked.write_eof()
        assert await read(peer, 13) == b"408 and done"  # then the FIN


async def test_aborting_drops_what_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer, monkeypatch)
        corked.write(b"never sent")
        corked.abort()
        with contextlib.suppress(ConnectionResetError):
            assert await read(peer, 64) == b""


async def test_what_waits_for_a_transport_closed_meanwhile_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The peer reset the connection, or the owner closed the transport itself: nothing is
    written to a closing transport."""
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer, monkeypatch)
        corked.write(b"too late")
        corked._transport.close()
        await asyncio.sleep(0)
        assert unread(peer) == b""


@pytest.mark.parametrize("count", [2, 50])
async def test_every_transport_written_in_a_step_is_sent_by_its_end(
    count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        pairs = [await stack.enter_async_context(corked_pair()) for _ in range(count)]
        await make_busy(*pairs[0], monkeypatch)
        for number, (corked, _peer) in enumerate(pairs):
            corked.write(b"%d" % number)
        await asyncio.sleep(0)
        assert [unread(peer) for _corked, peer in pairs] == [b"%d" % n for n in range(count)]


async def test_a_failing_transport_does_not_keep_the_others_writes(
    monkeypatch: pytest.MonkeyPatch, log_capture: LogCapture
) -> None:
    async with corked_pair() as (broken, broken_peer), corked_pair() as (fine, peer):
        await make_busy(broken, broken_peer, monkeypatch)
        broken.write(b"first")
        broken._transport.write_eof()  # past the wrapper: its held write will fail
        fine.write(b"still sent")
        await asyncio.sleep(0)
        assert unread(peer) == b"still sent"
        fine.write(b"and the next")  # the step's end is scheduled again
        await asyncio.sleep(0)
        assert unread(peer) == b"and the next"
    [line] = log_capture.events("servegate.internal_error")  # reported once, as a bug
    assert line["detail"] == "sending held writes failed"
    assert line["level"] == "error"


async def test_writelines_past_the_hold_limit_sends_the_pieces_after_what_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with corked_pair() as (corked, peer):
        await make_busy(corked, peer, monkeypatch)
        corked.write(b"head;")
        corked.writelines([b"request head;", b"b" * HOLD_LIMIT])
        expected = b"head;request head;" + b"b" * HOLD_LIMIT
        assert await read(peer, len(expected)) == expected


async def test_a_client_half_close_in_the_same_step_keeps_the_held_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client sends its request and half-closes; the answer held for the step's end must
    still leave, though the loop closes the transport as the FIN arrives (on uvloop, within
    the same step: it reads sockets before the step's end runs)."""

    class Handler(asyncio.Protocol):  # aiohttp's request handler, as far as this goes
        def eof_received(self) -> None:
            return None

    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        connection = ClientConnection(
            Handler(), 5.0, on_timeout=lambda: None, on_closed=lambda _connection: None
        )
        transport, _ = await loop.connect_accepted_socket(lambda: connection, accepted)
        try:
            corked = connection._transport
            assert isinstance(corked, CorkedTransport)
            await make_busy(corked, client, monkeypatch)
            corked.write(b"the answer")
            client.shutdown(socket.SHUT_WR)
            assert await read(client, 11) == b"the answer"  # then the close
        finally:
            transport.abort()
            client.close()
