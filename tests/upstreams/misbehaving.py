"""Raw model servers that break HTTP on purpose: garbage heads, bodies cut short, endless
interim answers, answers that trickle or break mid-way, and a server that accepts but never
reads."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

from tests.upstreams.raw import RawServer

TLS_HANDSHAKE_RECORD = b"\x16"


async def next_request(reader: asyncio.StreamReader) -> bytes:
    """The next request head (its Content-Length body read and dropped), or b"" at the end of
    the stream. Raises TLSHello for a TLS handshake (servegate's scheme probe), which these
    plain servers refuse by closing at once."""
    try:
        first = await reader.readexactly(1)
        if first == TLS_HANDSHAKE_RECORD:
            raise TLSHello
        head = first + await reader.readuntil(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                await reader.readexactly(int(value))
    except (asyncio.IncompleteReadError, ConnectionError):
        return b""
    return head


class TLSHello(Exception):
    """A connection began with a TLS handshake record."""


@dataclass
class Misbehaving(RawServer):
    """Base: records the paths of the requests that reached it, and counts the TLS
    handshakes (servegate's scheme probes) it refused."""

    paths: list[bytes] = field(default_factory=list)
    tls_hellos: int = 0

    async def _request(self, reader: asyncio.StreamReader) -> bool:
        try:
            head = await next_request(reader)
        except TLSHello:
            self.tls_hellos += 1
            return False
        if not head:
            return False
        self.paths.append(head.split(b" ")[1])
        return True


@dataclass
class AnswersWith(Misbehaving):
    """Answers every request with `answer`, whatever it is, then closes."""

    answer: bytes = b""

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if await self._request(reader):
            writer.write(self.answer)
            await writer.drain()


@dataclass
class SpeaksFirst(Misbehaving):
    """Sends `banner` as each connection opens, before any request, then reads and ignores
    what comes: a port that serves another protocol whose server speaks first (SSH, SMTP, a
    MySQL greeting), or HTTP/2 with its SETTINGS frame."""

    banner: bytes = b""

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(self.banner)
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass


@dataclass
class ClosesUnread(Misbehaving):
    """Closes every connection as it accepts it, reading nothing: a server shutting down, or
    at its connection limit."""

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        return None


@dataclass
class CutsBody(Misbehaving):
    """Declares `declared` body bytes, sends `sent`, and closes: a worker dying mid-answer."""

    declared: int = 0
    sent: int = 0

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if await self._request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.declared)
            writer.write(b"x" * self.sent)
            await writer.drain()


@dataclass
class LargeInterims(Misbehaving):
    """Sends `count` interim 103 answers of about 1 MB each (120 fields of 8,000 bytes, each
    within servegate's head limits), then a 200; `written` counts the 103s its socket took."""

    count: int = 100
    written: int = 0

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not await self._request(reader):
            return
        field = b"Link: <" + b"a" * 7990 + b">\r\n"
        interim = b"HTTP/1.1 103 Early Hints\r\n" + field * 120 + b"\r\n"
        for _ in range(self.count):
            writer.write(interim)
            await writer.drain()
            self.written += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()


@dataclass
class EndlessInterim(Misbehaving):
    """Sends `102 Processing` every `every` seconds and never a final answer."""

    every: float = 0.05
    interim_sent: int = 0

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not await self._request(reader):
            return
        while not writer.is_closing():
            writer.write(b"HTTP/1.1 102 Processing\r\n\r\n")
            await writer.drain()
            self.interim_sent += 1
            await asyncio.sleep(self.every)


@dataclass
class Trickles(Misbehaving):
    """A 200 whose body comes one byte every `every` seconds, chunked or with a length."""

    every: float = 0.1
    content_length: int | None = None

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not await self._request(reader):
            return
        if self.content_length is None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.content_length)
        for _ in range(self.content_length or 10_000):
            writer.write(b"1\r\nx\r\n" if self.content_length is None else b"x")
            await writer.drain()
            await asyncio.sleep(self.every)


@dataclass
class NeverReads(Misbehaving):
    """Accepts connections and never reads from them (beyond what asyncio buffers itself)."""

    accepted: int = 0

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        first = await reader.read(1)
        if first in (b"", TLS_HANDSHAKE_RECORD):
            return  # a health check's connect, or the scheme probe
        self.accepted += 1
        await asyncio.Event().wait()  # until the test stops the server


@dataclass
class InParts(Misbehaving):
    """Answers with `parts`, `pause` seconds apart, then holds the connection `hold` seconds
    and closes it: with a reset (SO_LINGER 0) if `reset`, else with a FIN."""

    parts: list[bytes] = field(default_factory=list)
    pause: float = 0.3
    hold: float = 0.0
    reset: bool = False

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not await self._request(reader):
            return
        for part in self.parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(self.pause)
        await asyncio.sleep(self.hold)
        if self.reset:
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            writer.transport.abort()


@dataclass
class Silent(Misbehaving):
    """Accepts connections and says nothing, whatever comes: a plain-HTTP server that waits
    for a request line and so never answers a TLS handshake (Werkzeug, Waitress, Hypercorn)."""

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await asyncio.Event().wait()  # until the test stops the server


@dataclass
class WaitsForARequestLine(Misbehaving):
    """A plain-HTTP server that reads until a head ends, then answers: a TLS handshake, which
    never ends a head, gets no answer at all (Werkzeug, Waitress, Hypercorn)."""

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
