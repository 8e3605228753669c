"""One HTTP/1.1 exchange on a raw connection, for measuring what a connection pool hides.

`servegate doctor` needs the connection itself: to see how long the server keeps it open when
idle, and exactly how it fails. Failures are raised in servegate's taxonomy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass

from proxy.config import UpstreamTLSSettings
from proxy.failures import Cause, connect_failure, exchange_failure
from proxy.upstream import announced_idle_timeout, client_ssl_context

_HTTP_NAME = b"HTTP/"

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True)
class Peer:
    """Where to connect, with the TLS settings and connect timeout servegate would use."""

    host: str
    port: int
    tls: UpstreamTLSSettings
    connect_timeout: float

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class ProbeError(Exception):
    """A probe failed; `cause` names how, in servegate's taxonomy."""

    def __init__(self, cause: Cause, detail: str) -> None:
        super().__init__(detail)
        self.cause, self.detail = cause, detail


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    seconds: float  # from sending the request to the last byte of the body
    received_at: float  # monotonic time the last byte was read: the server's idle clock began

    @property
    def gunicorn(self) -> bool:
        return self.headers.get("server", "").lower().startswith("gunicorn")

    @property
    def announced_idle(self) -> float | None:
        return announced_idle_timeout(self.headers.get("keep-alive", ""))

    @property
    def closes(self) -> bool:
        tokens = self.headers.get("connection", "").lower().split(",")
        return "close" in (token.strip() for token in tokens)


def _context(tls: UpstreamTLSSettings, verify: bool) -> ssl.SSLContext:
    context = client_ssl_context(tls)  # the CAs and client certificate servegate would use
    if not verify:  # the certificate is the protocol check's question, not the others'
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def connect(target: Peer, tls: bool, *, verify: bool = False) -> Stream:
    context = _context(target.tls, verify) if tls else None
    server_name = (target.tls.server_name or target.host) if tls else None
    try:
        async with asyncio.timeout(target.connect_timeout):
            return await asyncio.open_connection(
                target.host, target.port, ssl=context, server_hostname=server_name
            )
    except OSError as exc:  # TimeoutError and ssl.SSLError are OSErrors
        raise ProbeError(*connect_failure(exc)) from None


async def close(stream: Stream) -> None:
    stream[1].close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1):
            await stream[1].wait_closed()


async def exchange(
    stream: Stream, target: Peer, method: str, path: str, body: bytes | None = None
) -> Response:
    """Send one request and read the whole response; the connection stays open."""
    reader, writer = stream
    head = [f"{method} {path} HTTP/1.1", f"Host: {target.address}", "User-Agent: servegate-doctor"]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    started, status = time.monotonic(), 0
    try:
        writer.write("\r\n".join([*head, "", ""]).encode("latin-1") + (body or b""))
        await writer.drain()
        status, headers = await _read_head(reader)
        await _read_body(reader, status, headers)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError) as exc:
        raise ProbeError(*exchange_failure(exc, response_started=status > 0)) from None
    received = time.monotonic()
    return Response(status, headers, received - started, received)


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    while True:  # interim 1xx responses come before the real one
        head = await _http_name(reader) + await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            quoted = status_line[:60].encode("latin-1")  # as bytes: failures reads HTTP/2 so
            raise ValueError(f"status line {quoted!r}")
        headers: dict[str, str] = {}
        for line in filter(None, lines):
            name, colon, value = line.partition(":")
            if not colon:
                raise ValueError(f"header line {line[:60]!r}")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if int(rest[:3]) >= 200:
            return int(rest[:3]), headers


async def _http_name(reader: asyncio.StreamReader) -> bytes:
    """An answer's first bytes, `HTTP/`. Raises ValueError as soon as they cannot be: a port
    of another protocol (an SSH banner, a Redis error, an HTTP/2 frame) may never send the
    blank line a head ends with, and waiting for it would take the whole budget."""
    seen = b""
    while len(seen) < len(_HTTP_NAME):
        seen += await reader.readexactly(1)
        if not _HTTP_NAME.startswith(seen):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):  # what came with them, to quote
                    seen += await reader.read(40)
            raise ValueError(f"the server's first bytes are {seen[:40]!r}")
    return seen


async def _read_body(reader: asyncio.StreamReader, status: int, headers: dict[str, str]) -> None:
    if status in (204, 304):
        return
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass  # trailers
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        await reader.read()  # no length: the body ends when the server closes


async def wait_for_close(
    reader: asyncio.StreamReader, since: float, limit: float
) -> tuple[float | None, str]:
    """Hold an idle connection open until the server closes it: (seconds idle or None, how).

    The idle time counts from `since`, when the last byte of the answer arrived, not from this
    call: the server's timer started when it sent that byte, and on a loaded host the time spent
    parsing the answer would otherwise be missing from the measurement."""
    try:
        async with asyncio.timeout(max(0.0, since + limit - time.monotonic())):
            while await reader.read(65536):
                pass  # bytes on an idle connection are not expected; the close is the question
        how = "eof"
    except TimeoutError:
        return None, "still open"
    except OSError:
        how = "reset"
    return time.monotonic() - since, how
