"""What the `--workers` parent tells its workers, and how a worker learns the parent is gone.

Each worker's stdin is a pipe from the parent. In supervise mode the parent alone reads the
model server's log and sees it exit, so it alone counts restarts; a worker that never heard of
them would name no request for a crash loop, nor wait `retry.boot_wait` for a boot. The parent
writes a line per event, which a worker applies to its own health state:

    restart <seconds>   a restart, at that CLOCK_MONOTONIC time (one clock for every process
                        on the host): crash loops and "restarted recently" as in one process
    booting             the model server process is starting again: refused connects are a
                        boot in progress until a health check reaches it

A worker started later hears the restarts still within `health.crash_loop_window` first.

The pipe's end tells a worker that the parent is gone, even by SIGKILL, which no child hears
of: it drains and exits as on SIGTERM, rather than keep the data port with nobody to restart
it. (A supervised model server, the parent's child, hears of it too: proxy/orphan_guard.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

import structlog

from proxy.health import HealthMonitor

log = structlog.get_logger("servegate.workers")

RESTART = "restart"
BOOTING = "booting"


class Bulletin:
    """The parent's end: one pipe per worker, written without blocking. A worker too stuck to
    read 64 KiB of news misses the rest, said in the log; the parent never waits for it."""

    def __init__(self) -> None:
        self._pipes: dict[int, int] = {}  # worker index -> the write end of its stdin

    def open(self, index: int, restarts: tuple[float, ...] = ()) -> int:
        """A new pipe for worker `index` (its last one closed), with `restarts` written first.
        Returns the read end, for the worker's stdin: the caller closes it once passed on."""
        self.close(index)
        read, write = os.pipe()  # not inherited by other children: only the worker holds it
        os.set_blocking(write, False)
        self._pipes[index] = write
        for at in restarts:
            self._write(index, f"{RESTART} {at!r}\n")
        return read

    def tell(self, news: str) -> None:
        """One line of news, to every worker."""
        for index in list(self._pipes):
            self._write(index, f"{news}\n")

    def close(self, index: int) -> None:
        if (write := self._pipes.pop(index, None)) is not None:
            os.close(write)

    def close_all(self) -> None:
        for index in list(self._pipes):
            self.close(index)

    def _write(self, index: int, line: str) -> None:
        try:
            os.write(self._pipes[index], line.encode("ascii"))
        except BlockingIOError:
            log.warning("workers.news_dropped", worker=index, news=line.strip())
        except BrokenPipeError:
            pass  # the worker is gone; its watcher restarts it with a new pipe


async def listen(health: HealthMonitor) -> None:
    """The worker's end: apply the parent's news to `health` until the pipe ends, then drain
    and exit as on SIGTERM."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        while line := await reader.readline():
            news, _, at = line.decode("ascii", "replace").strip().partition(" ")
            if news == RESTART:
                with contextlib.suppress(ValueError):
                    health.hear_restart(float(at))
            elif news == BOOTING:
                health.booting = True
    finally:
        transport.close()
    log.error("workers.parent_gone", reason="the parent process ended without stopping us")
    os.kill(os.getpid(), signal.SIGTERM)
