"""The client's request body: kept for replay up to a limit, streamed through beyond it.

A body that fits the replay buffer can be sent again after a stale connection. A larger one
streams straight to the model server, so servegate's memory stays flat; once its first byte
has left, it cannot be replayed, and the attempt loop is told so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import StreamReader

CHUNK = 64 * 1024


class RequestBody:
    def __init__(self, head: list[bytes], rest: StreamReader | None) -> None:
        self._head = head  # what was read ahead; the whole body when `rest` is None
        self._rest = rest
        self._streaming_started = False
        self.size = sum(len(part) for part in head)  # bytes read from the client so far

    @classmethod
    async def read(
        cls, content: StreamReader, limit: int, content_length: int | None
    ) -> RequestBody:
        """Buffer up to `limit` bytes; a body declared larger is not buffered at all."""
        if content_length is not None and content_length > limit:
            return cls([], content)
        head: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = await content.readany()
            if not chunk:
                return cls(head, None)
            head.append(chunk)
            size += len(chunk)
        return cls(head, content)

    @property
    def buffered(self) -> bool:
        return self._rest is None

    @property
    def replayable(self) -> bool:
        return self.buffered or not self._streaming_started

    def for_attempt(self) -> bytes | AsyncIterator[bytes]:
        if self._rest is None:
            return b"".join(self._head)
        return self._stream(self._rest)

    async def _stream(self, rest: StreamReader) -> AsyncIterator[bytes]:
        self._streaming_started = True
        for part in self._head:
            yield part
        self._head = []  # the memory of a large body must not grow with its length
        async for chunk in rest.iter_chunked(CHUNK):
            self.size += len(chunk)
            yield chunk
