"""The client's request body: kept for replay up to a limit, streamed or spooled beyond it.

A body that fits the replay buffer is kept in memory and can be sent again after a stale
connection. A larger body of declared length streams straight to the model server, so
servegate's memory stays flat; once its first byte has left, it cannot be replayed. A larger
chunked body is spooled to an unlinked temporary file, as nginx's proxy_request_buffering
does, so the model server gets a Content-Length (a WSGI app reads CONTENT_LENGTH bytes, and
reads nothing without it); a spooled body can be replayed too.

The bodies kept in memory share one bound (retry.replay_buffer_total_bytes, a `BufferPool`):
bodies are read before a request waits for admission, so without it as many could be held as
there are connections. A body that finds the pool full is handled as one over the
per-request limit, so memory stays within the bound and the request still goes through.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from typing import IO, Protocol

from aiohttp import StreamReader

from proxy.aiohttp_internals import release_read_buffer
from proxy.exchange import StreamedBody

CHUNK = 64 * 1024


class BodyTooLarge(Exception):
    """The body is larger than server.max_body_bytes (answered 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than server.max_body_bytes ({limit} bytes)")


class SpoolFailed(Exception):
    """The temporary file for a chunked body over the replay buffer could not be written
    (answered 507): its directory ($TMPDIR) is full, read-only or missing. The message is for
    the log; `to_client` says what the client may know (no paths, DESIGN.md §2)."""

    to_client = (
        "servegate could not store the request body to send it on: a chunked body over "
        "retry.replay_buffer_bytes is spooled to a temporary file, and that failed; "
        "servegate's log says why"
    )

    def __init__(self, error: OSError) -> None:
        super().__init__(
            f"the spool file in {tempfile.gettempdir()} could not be written: "
            f"{error.strerror or error}"
        )
        self.error = error  # out of descriptors is servegate's shortage, not the disk's


class BufferMetrics(Protocol):
    """What a BufferPool reports (proxy.metrics.Metrics does)."""

    def record_body_buffer(self, change: int) -> None: ...
    def record_body_buffer_full(self) -> None: ...


class BufferPool:
    """The memory, in bytes, that the request bodies kept for a replay may take together:
    `limit` (retry.replay_buffer_total_bytes); `used` is what they take now."""

    __slots__ = ("_metrics", "limit", "used")

    def __init__(self, limit: int, metrics: BufferMetrics) -> None:
        self.limit = limit
        self.used = 0
        self._metrics = metrics

    def take(self, size: int) -> bool:
        """Count `size` more bytes if they fit; False (and counted as full) if not."""
        if self.used + size > self.limit:
            self._metrics.record_body_buffer_full()
            return False
        self.hold(size)
        return True

    def hold(self, size: int) -> None:
        """Count `size` bytes that are in memory already, whether or not they fit."""
        self.used += size
        self._metrics.record_body_buffer(size)

    def give(self, size: int) -> None:
        """Stop counting `size` bytes taken or held before."""
        self.used -= size
        self._metrics.record_body_buffer(-size)


class RequestBody:
    __slots__ = (
        "_declared",
        "_head",
        "_held",
        "_pool",
        "_rest",
        "_spool",
        "_streaming_started",
        "size",
    )

    def __init__(
        self,
        head: list[bytes],
        rest: StreamReader | None,
        spool: IO[bytes] | None = None,
        declared: int = 0,
        pool: BufferPool | None = None,
    ) -> None:
        self._head = head  # what was read ahead; the whole body when `rest` is None
        self._rest = rest
        self._declared = declared  # its Content-Length, when `rest` streams the rest
        self._spool = spool  # the whole body, when it was spooled to disk
        self._streaming_started = False
        self.size = sum(len(part) for part in head)  # bytes read from the client so far
        self._pool = pool  # that counts `head` (already counted) until it is let go
        self._held = self.size if pool is not None else 0

    @classmethod
    async def read(
        cls,
        content: StreamReader,
        limit: int,
        content_length: int | None,
        max_body: int,
        pool: BufferPool,
    ) -> RequestBody:
        """Buffer up to `limit` bytes, within what `pool` has left; a body declared larger
        is not buffered at all, a chunked one larger is spooled to disk. Raises BodyTooLarge
        beyond `max_body` bytes, SpoolFailed when the spool file cannot be written."""
        if content_length is not None and content_length > max_body:
            raise BodyTooLarge(max_body)
        if content_length is not None and content_length > limit:
            return cls([], content, declared=content_length)
        if content.is_eof():  # all of it came with the head (a small prediction): one read
            whole = content.read_nowait()
            release_read_buffer(content)
            if len(whole) > max_body:
                raise BodyTooLarge(max_body)
            if len(whole) > limit:
                return await cls._spooled([whole], len(whole), content, max_body)  # chunked
            if pool.take(len(whole)):
                return cls([whole], None, pool=pool)
            pool.hold(len(whole))  # read already: counted until it has been sent
            return cls([whole], content, declared=len(whole), pool=pool)
        head: list[bytes] = []
        size = 0
        try:
            while size <= limit:
                chunk = await content.readany()
                if not chunk:
                    release_read_buffer(content)
                    return cls(head, None, pool=pool)
                fits = pool.take(len(chunk))
                if not fits:
                    pool.hold(len(chunk))  # read already; the rest goes as over the limit
                head.append(chunk)
                size += len(chunk)
                if size > max_body:
                    raise BodyTooLarge(max_body)
                if not fits:
                    break
            if content_length is not None:
                return cls(head, content, declared=content_length, pool=pool)
        except BaseException:
            pool.give(size)
            raise
        pool.give(size)  # written to the spool file next, not kept
        return await cls._spooled(head, size, content, max_body)

    @classmethod
    async def _spooled(
        cls, head: list[bytes], size: int, content: StreamReader, max_body: int
    ) -> RequestBody:
        # Unlinked at once, so nothing is left behind; closed by close() or below.
        try:
            spool = tempfile.TemporaryFile()  # noqa: SIM115
        except OSError as exc:
            raise SpoolFailed(exc) from exc
        try:
            _write(spool, head)
            head.clear()  # on disk now: the memory goes before the rest arrives
            async for chunk in content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > max_body:
                    raise BodyTooLarge(max_body)
                _write(spool, [chunk])
            try:  # the file's own buffer: a full disk fails here, not when it is sent
                spool.flush()
            except OSError as exc:
                raise SpoolFailed(exc) from exc
        except BaseException:
            _close(spool)
            raise
        body = cls([], None, spool)
        body.size = size
        return body

    @property
    def buffered(self) -> bool:
        return self._rest is None

    @property
    def replayable(self) -> bool:
        return self.buffered or not self._streaming_started

    def for_attempt(self) -> bytes | StreamedBody:
        if self._spool is not None:
            return StreamedBody(self.size, self._from_spool(self._spool))
        if self._rest is None:
            return b"".join(self._head)
        return StreamedBody(self._declared, self._stream(self._rest))

    def close(self) -> None:
        if self._spool is not None:
            _close(self._spool)
        self._let_go()

    def _let_go(self) -> None:
        """The pool no longer counts the bytes read ahead: sent, or never to be."""
        if self._pool is not None and self._held:
            self._pool.give(self._held)
            self._held = 0

    async def _from_spool(self, spool: IO[bytes]) -> AsyncIterator[bytes]:
        spool.seek(0)
        while chunk := spool.read(CHUNK):
            yield chunk

    async def _stream(self, rest: StreamReader) -> AsyncIterator[bytes]:
        self._streaming_started = True
        for part in self._head:
            yield part
        self._head = []  # the memory of a large body must not grow with its length
        self._let_go()
        async for chunk in rest.iter_chunked(CHUNK):
            self.size += len(chunk)
            yield chunk


def _write(spool: IO[bytes], parts: list[bytes]) -> None:
    """Raises SpoolFailed: a failed write is the disk's fault, not the client's."""
    try:
        spool.writelines(parts)
    except OSError as exc:
        raise SpoolFailed(exc) from exc


def _close(spool: IO[bytes]) -> None:
    """Close a spool file; its unwritten buffer is of no use, so a write error then is none."""
    with contextlib.suppress(OSError):
        spool.close()
