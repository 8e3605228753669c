"""A raw-socket model whose answers disagree with their own framing, written in parts so that
the surplus can arrive with the answer or after it, and which records on which connection
each request arrived."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from tests.upstreams.raw import RawServer
from tests.upstreams.recording import OK, read_seen


@dataclass
class MisframedModel(RawServer):
    """Answers the first request with `first` (its parts written `pause` seconds apart) and
    every later one with a well-framed `OK`; `connection_of` holds, per request, the number of
    the connection it came on (1, 2, ...)."""

    first: list[bytes] = field(default_factory=list)
    pause: float = 0.0
    close_after_first: bool = False
    connection_of: list[int] = field(default_factory=list)
    connections: int = 0

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        number = self.connections
        while await read_seen(reader) is not None:
            self.connection_of.append(number)
            parts = self.first if len(self.connection_of) == 1 else [OK]
            for index, part in enumerate(parts):
                if index:
                    await asyncio.sleep(self.pause)
                writer.write(part)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
            if self.close_after_first and len(self.connection_of) == 1:
                return
