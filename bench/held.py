"""Held requests: a model that holds every request for a while, and a client that sends many
at once. Both are raw asyncio protocols on uvloop, so that what is measured is the proxy.

    python bench/held.py --serve PORT HOLD_SECONDS     # the holding model (a process of its own)

`hold(port, count, ...)` is the client side: `count` POSTs over as many connections, all sent
at once; it returns how many were answered 200 and when the last answer came.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

HOST = "127.0.0.1"
BODY = b'{"inputs": [[5.1, 3.5, 1.4, 0.2]]}'
ANSWER_BODY = b'{"outputs": [0]}'
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(ANSWER_BODY),
    ANSWER_BODY,
)
# GET /stream: the head and a first event at once, the end `hold` seconds later.
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Accel-Buffering: no\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
FIRST_EVENT = b"data: first\n\n"
STREAM_START = STREAM_HEAD + b"%x\r\n%s\r\n" % (len(FIRST_EVENT), FIRST_EVENT)
STREAM_END = b"0\r\n\r\n"


class _Holding(asyncio.Protocol):
    """Reads one request at a time (head and Content-Length body), answers it `hold` s later."""

    def __init__(self, hold: float) -> None:
        self._hold = hold
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self._buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self._buffer) < end + 4 + length:
                return
            streamed = self._buffer.startswith(b"GET /stream ")
            self._buffer = self._buffer[end + 4 + length :]
            if streamed:
                self._send(STREAM_START)
            asyncio.get_running_loop().call_later(
                self._hold, self._send, STREAM_END if streamed else ANSWER
            )

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def _serve(port: int, hold: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Holding(hold), HOST, port, backlog=8192)
    async with server:
        await server.serve_forever()


@dataclass
class Held:
    sent: int
    answered_200: int
    seconds: float  # from the first request sent to the last answer received
    errors: dict[str, int]


async def _one(port: int, limit: float) -> str:
    request = (
        b"POST /predict HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (HOST.encode(), port, len(BODY), BODY)
    )
    writer = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1].decode()
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":")[1]))
            return status
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        return type(exc).__name__
    finally:
        if writer is not None:
            writer.close()


async def hold(port: int, count: int, limit: float = 150.0) -> Held:
    started = time.monotonic()
    outcomes = await asyncio.gather(*(_one(port, limit) for _ in range(count)))
    seconds = time.monotonic() - started
    errors: dict[str, int] = {}
    for outcome in outcomes:
        if outcome != "200":
            errors[outcome] = errors.get(outcome, 0) + 1
    return Held(count, outcomes.count("200"), seconds, errors)


def main(argv: list[str]) -> int:
    import uvloop

    if len(argv) == 3 and argv[0] == "--serve":
        uvloop.run(_serve(int(argv[1]), float(argv[2])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
