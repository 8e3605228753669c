"""Supervise mode: servegate runs the model server as its child, passes its output on to its own
log, restarts it when it exits, and counts the workers it restarts from what it prints
(Gunicorn and Uvicorn name every worker they boot and lose, which no probe from outside can see).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

from proxy.health import HealthMonitor
from proxy.metrics import Metrics

log = structlog.get_logger("servegate.model")

FIRST_DELAY = 0.5  # a worker that died once may just need a second try
MAX_DELAY = 30.0  # a crash-looping model server is retried twice a minute, not hammered
STABLE_RUN = 60.0  # a child that ran this long was healthy: its successor starts at FIRST_DELAY
STOP_GRACE = 30.0  # Gunicorn's default --graceful-timeout: what its workers get to finish
LISTEN_WAIT = 5.0  # at start-up, this long at most for the model to listen before servegate does
LINE_LIMIT = 1 << 20  # a longer line is passed on in pieces, never dropped
READ_REST = 1.0  # at shutdown, for the model's last lines after its processes are gone
RECENT_PIDS = 1024  # exited workers remembered, so a second line about one is not a second exit

TIMEOUT_ADVICE = (
    "the worker ran longer than Gunicorn's --timeout (30 s unless set), which is shorter than "
    "servegate's {budget:g} s budget, so Gunicorn killed it; raise --timeout above the budget"
)


class Kind(StrEnum):
    BOOT = "boot"
    EXIT = "exit"
    TIMEOUT = "timeout"  # the master is about to kill the worker: its exit
    PLANNED = "planned"  # the worker announced it will exit on purpose (max requests reached)
    RELOAD = "reload"  # the master replaces every worker it has (Gunicorn's SIGHUP)
    SHRINK = "shrink"  # the master retires its oldest worker (Gunicorn's SIGTTOU)


@dataclass(frozen=True)
class WorkerEvent:
    kind: Kind
    pid: int
    server: str  # who printed it, for the evidence a health line shows


# Exact messages of Gunicorn (20 to 27) and Uvicorn, case-sensitive: Gunicorn's "DIRTY WORKER
# TIMEOUT" and "Dirty worker exited" are its separate dirty-worker pool, not HTTP workers.
_PATTERNS: tuple[tuple[re.Pattern[str], Kind, str], ...] = (
    (re.compile(r"Booting worker with pid: (\d+)"), Kind.BOOT, "Gunicorn"),
    (re.compile(r"Worker exiting \(pid: (\d+)\)"), Kind.EXIT, "Gunicorn"),
    (re.compile(r"Worker \(pid:(\d+)\) (?:exited with code|was sent) "), Kind.EXIT, "Gunicorn"),
    (re.compile(r"Worker with pid (\d+) was terminated due to signal"), Kind.EXIT, "Gunicorn"),
    (re.compile(r"(?<!DIRTY )WORKER TIMEOUT \(pid:(\d+)\)"), Kind.TIMEOUT, "Gunicorn"),
    # A recycle the server announces (Gunicorn's --max-requests, Uvicorn's
    # --limit-max-requests): its worker's exit is planned, not a restart. Gunicorn's log prefix
    # names the pid; Uvicorn's own log does not (pid 0: its next exit line is the planned one).
    (
        re.compile(r"\[(\d+)\] \[INFO\] Autorestarting worker after current request"),
        Kind.PLANNED,
        "Gunicorn",
    ),
    (
        re.compile(r"(?:\[(\d+)\] \[INFO\] )?Maximum request limit of \d+ exceeded\. Terminating"),
        Kind.PLANNED,
        "Uvicorn",
    ),
    # Retirements the operator asked for: Gunicorn reloading on SIGHUP (new workers boot, then
    # every old one exits) or taking one worker away on SIGTTOU (the oldest exits, unless it
    # is the last: arbiter.py, handle_ttou); Uvicorn's
    # parent ending a child on purpose (SIGHUP restarts each after its successor is ready;
    # SIGTTOU). Their exits are no crash, and the boots that replace them no restart.
    (re.compile(r"Hang up: "), Kind.RELOAD, "Gunicorn"),
    (re.compile(r"Handling signal: ttou"), Kind.SHRINK, "Gunicorn"),
    (re.compile(r"Terminated child process \[(\d+)\]"), Kind.PLANNED, "Uvicorn"),
    (re.compile(r"Started server process \[(\d+)\]"), Kind.BOOT, "Uvicorn"),
    (re.compile(r"Finished server process \[(\d+)\]"), Kind.EXIT, "Uvicorn"),
    (re.compile(r"Child process \[(\d+)\] died"), Kind.EXIT, "Uvicorn"),
)


_MARKERS = ("pid", "process [", "Autorestarting", "Maximum request limit", "Hang up", "ttou")


def parse_line(line: str) -> WorkerEvent | None:
    """The worker event a line of the model server's log reports, if any."""
    if not any(marker in line for marker in _MARKERS):  # most lines: cheap tests
        return None
    for pattern, kind, server in _PATTERNS:
        if match := pattern.search(line):
            pid = match[1] if match.groups() else None
            return WorkerEvent(kind, int(pid or 0), server)
    return None


class WorkerCounter:
    """Tells worker restarts from initial boots, for one run of the model server's master.

    The rule: a boot is a restart when a worker of this master has exited unplanned and no
    boot has replaced it yet; any other boot is initial (the master's first --workers, or ones
    a reload or SIGTTIN adds). An exit is planned when announced (a recycle) or when a reload
    or SIGTTOU retires the worker. Unlike "every boot after the first exit", this stays exact
    when a worker dies before its siblings have booted. Lines are keyed by pid, so the several
    lines one worker may cause (Gunicorn's and Uvicorn's boot lines for a Uvicorn worker; a
    timeout, then its exit code) count once.
    """

    def __init__(self) -> None:
        self._alive: dict[int, None] = {}  # an ordered set, oldest first
        self._gone: dict[int, None] = {}  # an ordered set, oldest first
        self._unreplaced = 0
        self._planned: set[int] = set()  # workers that announced a planned exit
        self._announced = 0  # planned exits announced without a pid
        self._recycled = 0  # planned exits not yet replaced: their successors are no restart

    def observe(self, event: WorkerEvent) -> bool:
        """Record the event; True when it is the boot of a worker replacing one that exited
        unplanned (a recycle the server announced is no restart)."""
        if event.kind is Kind.RELOAD:
            self._planned |= self._alive.keys()  # its new workers boot first: none replaces
            return False
        if event.kind is Kind.SHRINK:
            if len(self._alive) > 1:  # Gunicorn keeps its last worker
                self._planned.add(next(iter(self._alive)))
            return False
        if event.kind is Kind.PLANNED:
            if event.pid:
                self._planned.add(event.pid)
            else:
                self._announced += 1
            return False
        if event.kind is Kind.BOOT:
            if event.pid in self._alive:
                return False
            self._alive[event.pid] = None
            self._gone.pop(event.pid, None)  # a reused pid is a new worker
            if self._unreplaced:
                self._unreplaced -= 1
                return True
            self._recycled = max(0, self._recycled - 1)
            return False
        if event.pid not in self._gone:
            self._alive.pop(event.pid, None)
            self._gone[event.pid] = None
            if len(self._gone) > RECENT_PIDS:
                del self._gone[next(iter(self._gone))]
            if self._claims_planned(event):
                self._recycled += 1
            else:
                self._unreplaced += 1
        return False

    def _claims_planned(self, event: WorkerEvent) -> bool:
        if event.pid in self._planned:
            self._planned.discard(event.pid)
            return True
        if event.kind is Kind.EXIT and self._announced:
            self._announced -= 1
            return True
        return False


@dataclass
class Backoff:
    """Delay before restarting the model server: doubling, and reset by a long enough run."""

    delay: float = FIRST_DELAY

    def next(self, ran_for: float) -> float:
        if ran_for >= STABLE_RUN:
            self.delay = FIRST_DELAY
        current, self.delay = self.delay, min(self.delay * 2, MAX_DELAY)
        return current


@dataclass
class _Run:
    """One run of the model server's master, with what its log said about its workers."""

    process: asyncio.subprocess.Process
    started: float
    workers: WorkerCounter = field(default_factory=WorkerCounter)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def output_open(self) -> bool:
        """Some process of its group still holds its stdout or stderr: it may still run."""
        return not all(reader.done() for reader in self.readers)


class Supervisor:
    """Runs `command` until stop(); the one task in `_supervise` owns every process change."""

    def __init__(
        self,
        command: Sequence[str],
        health: HealthMonitor,
        metrics: Metrics,
        budget_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.command = list(command)
        self._health = health
        self._metrics = metrics
        self._timeout_advice = TIMEOUT_ADVICE.format(budget=budget_seconds)
        self._clock = clock
        self._backoff = Backoff()
        self._stop = asyncio.Event()
        self._run: _Run | None = None
        self._exited: list[_Run] = []  # earlier runs whose orphaned workers may still be going
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the model server; OSError when its command cannot be run at all."""
        self._health.supervised()
        self._run = await self._spawn()
        self._task = asyncio.create_task(self._supervise())

    async def wait_listening(self, host: str, port: int, limit: float = LISTEN_WAIT) -> bool:
        """Give the model a moment to listen, so servegate's start-up probe finds it."""
        deadline = self._clock() + limit
        while self._clock() < deadline and self._run and self._run.process.returncode is None:
            with contextlib.suppress(OSError):  # refused: not yet
                async with asyncio.timeout(max(deadline - self._clock(), 0.01)):
                    _, writer = await asyncio.open_connection(host, port)
                writer.close()
                return True
            await asyncio.sleep(0.05)
        return False

    async def stop(self) -> None:
        """SIGTERM to the model server's process group, SIGKILL after STOP_GRACE."""
        self._stop.set()
        if self._task is not None:
            await self._task
        for run in self._exited:
            if run.output_open:  # an orphan that ignored SIGTERM must not outlive servegate
                _signal_group(run.process.pid, signal.SIGKILL)
        runs = [*self._exited, *([self._run] if self._run else [])]
        readers = [reader for run in runs for reader in run.readers]
        # Every writer is gone: the last lines are still in the pipes, worth reading.
        _, unfinished = await asyncio.wait(readers, timeout=READ_REST) if readers else ((), ())
        for reader in unfinished:  # a grandchild that left the group still holds a pipe
            reader.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)

    def kill(self) -> None:
        """SIGKILL to every process group of the model server: for an exit that cannot wait."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
        for run in [*self._exited, *([self._run] if self._run else [])]:
            _signal_group(run.process.pid, signal.SIGKILL)

    async def _spawn(self) -> _Run:
        _check_executable(self.command[0])  # the guard's exec would fail where servegate cannot see
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy.orphan_guard",
            str(os.getpid()),
            *self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # Its own process group: a Ctrl-C meant for servegate does not reach the model
            # before servegate has drained, and the whole group can be signalled at once.
            # (A new session, as uvloop knows no process_group.)
            start_new_session=True,
            limit=LINE_LIMIT,
        )
        run = _Run(process, self._clock())
        for stream, name in ((process.stdout, "stdout"), (process.stderr, "stderr")):
            assert stream is not None
            run.readers.append(asyncio.create_task(self._pass_on(run, stream, name)))
        log.info("model.started", pid=process.pid, command=self.command)
        return run

    async def _supervise(self) -> None:
        assert self._run is not None
        while True:
            run = self._run
            exited = asyncio.ensure_future(run.process.wait())
            stopping = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait((exited, stopping), return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if self._stop.is_set():
                await self._terminate(run)
                return
            ran_for = self._clock() - run.started
            reason = exit_reason(exited.result())
            log.warning("model.exited", pid=run.process.pid, reason=reason, ran_s=round(ran_for, 1))
            self._health.supervised_exited(reason)
            # Its orphaned workers still hold the port: they are asked to finish and go.
            _signal_group(run.process.pid, signal.SIGTERM)
            self._exited = [old for old in self._exited if old.output_open] + [run]
            restarted = await self._restart(self._backoff.next(ran_for))
            if restarted is None:
                return
            self._run = restarted

    async def _restart(self, delay: float) -> _Run | None:
        """The next run after `delay`, retrying a command that cannot start; None on stop()."""
        while True:
            log.info("model.restarting", delay_s=delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
                    return None
            try:
                return await self._spawn()
            except OSError as exc:
                log.error("model.start_failed", command=self.command, error=str(exc))
                delay = self._backoff.next(0.0)

    async def _terminate(self, run: _Run) -> None:
        pid = run.process.pid
        log.info("model.stopping", pid=pid, grace_s=STOP_GRACE)
        _signal_group(pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_GRACE):
                await run.process.wait()
        except TimeoutError:
            log.warning("model.killed", pid=pid, reason=f"still running after {STOP_GRACE:g} s")
        # Whatever of the group outlived the grace period (or its master) would hold the port.
        _signal_group(pid, signal.SIGKILL)
        code = await run.process.wait()
        log.info("model.stopped", pid=pid, reason=exit_reason(code))

    async def _pass_on(self, run: _Run, stream: asyncio.StreamReader, name: str) -> None:
        async for line in _lines(stream):
            log.info("model.output", line=line, stream=name)
            event = parse_line(line)
            if event is not None:
                self._on_worker_event(run, event)

    def _on_worker_event(self, run: _Run, event: WorkerEvent) -> None:
        if event.kind is Kind.TIMEOUT:
            log.warning("model.worker_timeout", pid=event.pid, advice=self._timeout_advice)
        if run.workers.observe(event):
            self._metrics.worker_restarts.inc()
            self._health.record_restart(f"{event.server} booted a new worker (pid {event.pid})")


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[str]:
    while True:
        try:
            raw = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:  # end of output
            if exc.partial:
                yield exc.partial.decode(errors="replace")
            return
        except asyncio.LimitOverrunError as exc:
            raw = await stream.readexactly(exc.consumed)
        yield raw.decode(errors="replace").rstrip("\r\n")


def _check_executable(name: str) -> None:
    """Raise the OSError exec would for `name` (ENOENT, EACCES), as a direct spawn did."""
    path = name if os.sep in name else shutil.which(name)
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)


def exit_reason(returncode: int) -> str:
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:  # a real-time signal has no name
        return f"signal {-returncode}"


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(pgid, signum)
