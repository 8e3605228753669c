"""`servegate run --workers N`: N worker processes share the data port, one parent runs them.

Each worker is a whole servegate (`servegate run ... --worker-of DIR`) that binds the data port
with SO_REUSEPORT, so the kernel spreads new connections over them, as nginx's `reuseport` and
Envoy's listeners do. The parent restarts a worker that dies (counted and logged), serves the
admin port, and in supervise mode alone runs the model server. Workers write their metrics to
files in a private directory (prometheus-client's multiprocess mode), so one scrape of the
parent's /metrics covers them all. Health and circuit state are per worker; in supervise
mode the parent tells them of the model server's restarts and boots (proxy/news.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, values
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric

from proxy import news
from proxy.admin import AdminHandler, admin_runner
from proxy.app import Hurried, Servegate, StartupError, stop_unless_hurried
from proxy.config import Settings, split_address
from proxy.health import CRASH_LOOP_ADVICE, Health, HealthMonitor
from proxy.listener import ADMIN_LIMIT, SniffingSite, admin_limits
from proxy.metrics import Metrics, admin_listener_metrics
from proxy.supervise import Supervisor

log = structlog.get_logger("servegate.workers")

WORKER_FLAG = "--worker-of"
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable
STARTUP_WAIT = 30.0  # seconds for every first worker to serve
RESTART_DELAY = 0.5  # doubling for a worker that dies within STABLE_RUN of its start, to 30 s
MAX_RESTART_DELAY = 30.0
STABLE_RUN = 60.0
# Seconds a draining worker gets beyond its quiet period and budget: aiohttp's own shutdown
# (closing connections, the runner's cleanup) before the parent kills it.
DRAIN_SLACK = 3.0


def count(text: str) -> int:
    """`--workers`: a whole number >= 1, or `auto` for the CPUs this process may run on."""
    if text == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--workers must be a whole number >= 1 or auto, got {text!r}")
    return int(text)


# Written by a parent that supervises the model server: it counts the model's restarts from
# the model's own log, and its workers count none (each would count the same restart again).
SUPERVISED_MARK = "supervised"


def parent_supervises(directory: Path) -> bool:
    """For a worker: whether its parent runs the model server (and counts its restarts)."""
    return (directory / SUPERVISED_MARK).exists()


def announce(directory: Path) -> Callable[[Servegate], None]:
    """For a worker: once serving, tell the parent which admin port answers its /readyz, and
    listen to what the parent tells (proxy/news.py)."""

    listening: list[asyncio.Task[None]] = []  # referenced for as long as the worker runs

    def started(gate: Servegate) -> None:
        listening.append(asyncio.create_task(news.listen(gate.health)))
        path = directory / f"admin-{os.getpid()}.port"
        path.with_suffix(".tmp").write_text(str(gate.admin_port), encoding="ascii")
        path.with_suffix(".tmp").rename(path)  # atomic: the parent never reads half a number

    return started


class Pool:
    """The worker processes: started, watched, restarted, stopped."""

    def __init__(self, argv: list[str], size: int, directory: Path, grace: float) -> None:
        self._argv, self._size, self._directory, self._grace = argv, size, directory, grace
        self.bulletin = news.Bulletin()  # each worker's stdin (proxy/news.py)
        # In supervise mode, the model server's restarts a worker starting now hears first.
        self.recent_restarts: Callable[[], tuple[float, ...]] = tuple
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False
        registry = CollectorRegistry()  # values go to the shared files; this one is not read
        self.restarts = Counter(
            "servegate_worker_restarts",
            "servegate worker processes that died and were started again.",
            registry=registry,
        )
        self.alive = Gauge(
            "servegate_workers",
            "servegate worker processes running.",
            registry=registry,
            multiprocess_mode="livemax",
        )

    def pids(self) -> list[int]:
        return [p.pid for p in self._processes.values() if p.returncode is None]

    async def start(self) -> None:
        first = [await self._spawn(index) for index in range(self._size)]
        deadline = time.monotonic() + STARTUP_WAIT
        while not all(self._announced(p.pid) for p in first):
            dead = [p for p in first if p.returncode is not None]
            if dead or time.monotonic() > deadline:
                await self.stop()
                why = f"exited with {dead[0].returncode}" if dead else "did not start in time"
                raise StartupError(f"a worker {why}; its log lines above say why")
            await asyncio.sleep(0.05)
        self._watchers = [asyncio.create_task(self._watch(i)) for i in range(self._size)]

    def _announced(self, pid: int) -> bool:
        return (self._directory / f"admin-{pid}.port").exists()

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        stdin = self.bulletin.open(index, self.recent_restarts())
        try:
            process = await asyncio.create_subprocess_exec(*self._argv, stdin=stdin)
        finally:
            os.close(stdin)
        self._processes[index] = process
        self.alive.set(len(self.pids()))
        return process

    async def _watch(self, index: int) -> None:
        delay = RESTART_DELAY
        while True:
            process = self._processes[index]
            started = time.monotonic()
            code = await process.wait()
            prometheus_multiprocess.mark_process_dead(process.pid, str(self._directory))  # type: ignore[no-untyped-call]
            self.bulletin.close(index)
            with contextlib.suppress(FileNotFoundError):
                (self._directory / f"admin-{process.pid}.port").unlink()
            self.alive.set(len(self.pids()))
            if self._stopping:
                return
            delay = RESTART_DELAY if time.monotonic() - started > STABLE_RUN else delay
            self.restarts.inc()
            log.error("workers.worker_died", worker=index, pid=process.pid, exit_code=code,
                      restart_in_s=delay)  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RESTART_DELAY)
            if self._stopping:
                return
            process = await self._spawn(index)
            log.info("workers.worker_restarted", worker=index, pid=process.pid)

    def readiness_ports(self) -> list[int]:
        ports = []
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError):
                path = self._directory / f"admin-{pid}.port"
                ports.append(int(path.read_text(encoding="ascii")))
        return ports

    def kill(self) -> None:
        """SIGKILL to every worker still running: the parent stops at once."""
        self._stopping = True
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()

    async def stop(self) -> None:
        """SIGTERM to every worker (each drains as a single servegate does), SIGKILL to one
        still running once the grace is over, said in the log."""
        self._stopping = True
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        until = time.monotonic() + self._grace  # one grace for all: they drain at once
        for process in self._processes.values():
            try:
                await asyncio.wait_for(process.wait(), max(0.0, until - time.monotonic()))
            except TimeoutError:
                log.warning("workers.killed_after_grace", pid=process.pid, grace_s=self._grace)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self.bulletin.close_all()  # every worker is gone: no end of a pipe is news to one


def _data_port(settings: Settings) -> int:
    """The data port, checked free (a port 0 becomes a real one every worker can share)."""
    host, port = split_address(settings.server.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the workers bind: connections of an earlier run still in TIME_WAIT do not hold
        # the port, a socket listening on it does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise StartupError(f"cannot listen on {settings.server.listen}: {reason}") from None
        return int(probe.getsockname()[1])


def _admin(
    pool: Pool, directory: Path, stopping: asyncio.Event, health: HealthMonitor | None
) -> dict[str, AdminHandler]:
    async def metrics(_request: web.BaseRequest) -> web.Response:
        registry = CollectorRegistry()
        registry.register(_Present(directory))
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(_request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.BaseRequest) -> web.Response:
        """A worker's own answer: each checks the same model server on the same schedule; a
        crash loop the parent sees in the supervised model's log, the parent's."""
        if health is not None and health.state is Health.CRASH_LOOP and not stopping.is_set():
            reason = f"the model server is in a crash loop: {CRASH_LOOP_ADVICE}"
            return web.json_response({"status": "not_ready", "reason": reason}, status=503)
        reason = "servegate is shutting down" if stopping.is_set() else "no worker is serving"
        for port in [] if stopping.is_set() else pool.readiness_ports():
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                    session.get(f"http://127.0.0.1:{port}/readyz") as answer,
                ):
                    body = await answer.read()
                    return web.Response(
                        status=answer.status, body=body, content_type="application/json"
                    )
        return web.json_response({"status": "not_ready", "reason": reason}, status=503)

    return {"/metrics": metrics, "/healthz": healthz, "/readyz": readyz}


class _Present:
    """Every worker's series, less info series set to 0: a worker's way of removing one."""

    def __init__(self, directory: Path) -> None:
        self._files = prometheus_multiprocess.MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        for metric in self._files.collect():  # type: ignore[no-untyped-call]
            if metric.name.endswith("_info"):
                metric.samples = [s for s in metric.samples if s.value != 0]
            yield metric


def worker_argv(own_args: list[str], listen: str, port: int, directory: Path) -> list[str]:
    """A worker's command line: the parent's own (a later flag wins), on the resolved port."""
    host, _ = split_address(listen)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return [sys.executable, "-m", "proxy", *own_args, "--listen", address,
            WORKER_FLAG, str(directory)]  # fmt: skip


async def run(settings: Settings, size: int, own_args: list[str], command: tuple[str, ...]) -> None:
    """The parent: until SIGTERM or SIGINT, then the workers drain and the model stops last."""
    directory = Path(tempfile.mkdtemp(prefix="servegate-metrics-"))
    os.environ[METRICS_DIR] = str(directory)  # inherited by every worker
    # The parent's own series (worker restarts, supervise mode's) go to the files too.
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    try:
        await _run(settings, size, own_args, command, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _run(
    settings: Settings,
    size: int,
    own_args: list[str],
    command: tuple[str, ...],
    directory: Path,
) -> None:
    stopping, at_once = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:  # a second signal: the operator will not wait for the drain
        (at_once if stopping.is_set() else stopping).set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    port = _data_port(settings)
    argv = worker_argv(own_args, settings.server.listen, port, directory)
    # A worker drains as a single servegate does: the quiet period, then its requests within
    # the budget, and a moment for its own shutdown.
    grace = settings.server.shutdown_quiet + settings.budget.seconds + DRAIN_SLACK
    pool = Pool(argv, size, directory, grace)
    supervisor: Supervisor | None = None
    health: HealthMonitor | None = None
    if command:
        metrics = Metrics(CollectorRegistry(), settings.budget.seconds)

        def crash_loop_shown(_was: Health, now: Health) -> None:
            metrics.crash_loop.set(now is Health.CRASH_LOOP)

        def restarted() -> None:  # counted here, heard by the workers (their own count none)
            metrics.upstream_restarts.inc()
            pool.bulletin.tell(f"{news.RESTART} {time.monotonic()!r}")

        health = HealthMonitor(
            settings.health,
            crash_loop_shown,
            restarted,
            on_booting=lambda: pool.bulletin.tell(news.BOOTING),
        )
        pool.recent_restarts = health.recent_restarts
        supervisor = Supervisor(command, health, metrics, settings.budget.seconds)
        (directory / SUPERVISED_MARK).touch()  # before any worker starts
        await _start_model(supervisor, settings)
        admin_metrics = metrics.admin
    else:
        admin_metrics = admin_listener_metrics(CollectorRegistry(), _uncounted, _uncounted)
    runner = admin_runner(_admin(pool, directory, stopping, health), settings.server)
    try:
        await pool.start()
        await runner.setup()
        host, admin_port = split_address(settings.server.admin_listen)
        # The workers' listener, for its limits (Servegate.start's admin port has the same).
        site = SniffingSite(
            runner,
            host,
            admin_port,
            settings=admin_limits(settings.server),
            metrics=admin_metrics,
            limit_name=ADMIN_LIMIT,
        )
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {settings.server.admin_listen}: {exc}") from None
        log.info("workers.started", workers=size, pids=pool.pids(), data_port=port,
                 admin_port=site.port)  # fmt: skip
        await stopping.wait()
        log.info("servegate.stopping", grace_s=grace)
        await stop_unless_hurried(pool.stop(), at_once)
    except Hurried:
        log.warning("servegate.stopped_at_once", reason="a second stop signal", exit_code=1)
        pool.kill()
        if supervisor is not None:
            supervisor.kill()
        raise SystemExit(1) from None
    finally:
        await pool.stop()  # at once when done already; after a kill, reaps the workers
        await runner.cleanup()
        if supervisor is not None and not at_once.is_set():
            await supervisor.stop()
    log.info("servegate.stopped")


def _uncounted(*_args: Any) -> None:
    """The parent's admin port's timeouts and mismatches: the client_timeouts and mismatch
    series are the workers' (without supervise mode the parent has none of its own)."""


async def _start_model(supervisor: Supervisor, settings: Settings) -> None:
    try:
        await supervisor.start()
    except OSError as exc:
        raise StartupError(f"cannot start the model server: {exc.strerror or exc}") from None
    origin = settings.upstream.origin
    assert origin.host is not None  # checked by config
    assert origin.port is not None
    await supervisor.wait_listening(origin.host, origin.port)
