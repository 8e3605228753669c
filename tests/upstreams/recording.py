"""A raw-socket model that records exactly the bytes each request arrived with, and answers
with bytes the test chose: the far end of the fidelity tests, where no HTTP library can
respell a target, a header or a body on the way in or out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.upstreams.raw import RawServer

READ_LIMIT = 1024 * 1024  # a head up to 1 MiB: servegate's own limits are what is tested
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass(frozen=True)
class Seen:
    """One request as it reached the model: the head byte for byte, the body as framed and as
    its payload, and how it was framed ("length", "chunked" or "none")."""

    head: bytes
    framed_body: bytes
    body: bytes
    framing: str

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def target(self) -> bytes:
        return self.request_line.split(b" ")[1]

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        lines = self.head.split(b"\r\n")[1:-2]
        return [
            (name, value.strip(b" \t")) for name, _, value in (h.partition(b":") for h in lines)
        ]

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


Answer = Callable[[Seen], bytes]


@dataclass
class RecordingModel(RawServer):
    """Records every request; answers each with `answer(seen)` (default a 2-byte 200), keeps the
    connection unless `close_after` or the request said `Connection: close`, and counts
    connections."""

    answer: Answer = field(default=lambda _seen: OK)
    close_after: bool = False
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=READ_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]

    def last(self) -> Seen:
        return self.seen[-1]

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        while True:
            seen = await read_seen(reader)
            if seen is None:
                return
            self.seen.append(seen)
            self.arrived.set()
            writer.write(self.answer(seen))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            if self.close_after or seen.header(b"connection") == [b"close"]:
                return


async def read_seen(reader: asyncio.StreamReader) -> Seen | None:
    """One request, or None when the connection ends before one is complete."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = [line.lower() for line in head.split(b"\r\n")]
    chunked = any(
        line.startswith(b"transfer-encoding:") and line.rstrip().endswith(b"chunked")
        for line in lines
    )
    lengths = [
        int(line.partition(b":")[2]) for line in lines if line.startswith(b"content-length:")
    ]
    try:
        if chunked:
            framed, body = await _read_chunked(reader)
            return Seen(head, framed, body, "chunked")
        if lengths:
            body = await reader.readexactly(lengths[0])
            return Seen(head, body, body, "length")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return Seen(head, b"", b"", "none")


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    framed, body = [], []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        framed.append(size_line)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                framed.append(trailer)
            framed.append(trailer)
            return b"".join(framed), b"".join(body)
        data = await reader.readexactly(size + 2)
        framed.append(data)
        body.append(data[:-2])
