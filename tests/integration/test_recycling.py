"""A worker recycled on purpose is not a crash: Gunicorn's --max-requests and Uvicorn's
--limit-max-requests under steady load in supervise mode count no restart, raise no crash loop
and keep /readyz at 200. No client sees a stale connection; the only answer other than 200 is
the one servegate cannot avoid without the operator's opt-in: a request already in a
worker's kernel, unread, when it closed its idle connections to exit is reset, which cannot be
told from a worker that read part of it (README, "Proof before replay"), and is answered 503
`service/reset_during_request`, not replayed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from proxy.supervise import Kind, WorkerCounter, WorkerEvent, parse_line
from tests.integration.test_supervise import SERVEGATE, Supervised, eventually
from tests.upstreams.gunicorn import ROOT, free_port, wait_for_port

GUNICORN_RECYCLE = (
    "[2026-11-25 12:15:18 +0000] [16843] [INFO] Autorestarting worker after current request."
)
UVICORN_WORKER_RECYCLE = (
    "[2026-11-25 12:15:18 +0000] [16843] [INFO] Maximum request limit of 22 exceeded. "
    "Terminating process."
)
UVICORN_RECYCLE = "INFO:     Maximum request limit of 21 exceeded. Terminating process."


@pytest.mark.parametrize(
    ("line", "pid"),
    [(GUNICORN_RECYCLE, 16843), (UVICORN_WORKER_RECYCLE, 16843), (UVICORN_RECYCLE, 0)],
)
def test_an_announced_recycle_is_read_as_planned(line: str, pid: int) -> None:
    assert parse_line(line) == WorkerEvent(Kind.PLANNED, pid, parse_line(line).server)  # type: ignore[union-attr]


def count(*events: tuple[Kind, int]) -> int:
    counter = WorkerCounter()
    return sum(counter.observe(WorkerEvent(kind, pid, "test")) for kind, pid in events)


def test_a_recycled_workers_successor_is_no_restart_and_a_crash_still_is_one() -> None:
    boots = [(Kind.BOOT, 1), (Kind.BOOT, 2)]
    recycled = [(Kind.PLANNED, 1), (Kind.EXIT, 1), (Kind.BOOT, 3)]
    assert count(*boots, *recycled) == 0
    assert count(*boots, *recycled, (Kind.EXIT, 2), (Kind.BOOT, 4)) == 1


def test_uvicorns_announcement_without_a_pid_claims_the_next_exit_only() -> None:
    boots = [(Kind.BOOT, 1), (Kind.BOOT, 2)]
    recycled = [(Kind.PLANNED, 0), (Kind.EXIT, 1), (Kind.EXIT, 1), (Kind.BOOT, 3)]
    assert count(*boots, *recycled) == 0
    assert count(*boots, *recycled, (Kind.EXIT, 2), (Kind.BOOT, 4)) == 1


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    """servegate supervising `model_command` (a format string for the model's port)."""
    started: list[Supervised] = []

    def start(*model_command: str) -> Supervised:
        data, admin, model = free_port(), free_port(), free_port()
        log_path = tmp_path / f"servegate-{data}.log"
        command = [
            *SERVEGATE, "--listen", f"127.0.0.1:{data}", "--admin-listen", f"127.0.0.1:{admin}",
            "--upstream", f"http://127.0.0.1:{model}", "--",
            *(part.format(port=model) for part in model_command),
        ]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        gate = Supervised(process, data, admin, model, log_path)
        started.append(gate)
        wait_for_port(data, process)  # type: ignore[arg-type]
        wait_for_port(admin, process)  # type: ignore[arg-type]
        wait_for_port(model, None)
        return gate

    yield start
    for gate in started:
        if gate.process.poll() is None:
            gate.process.kill()
        gate.process.wait(timeout=10)
        for pid in gate.model_pids():  # each model server leads its own process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def ready(gate: Supervised) -> int:
    try:
        url = f"http://127.0.0.1:{gate.admin}/readyz"
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.close()
        return int(error.code)


def steady_load(gate: Supervised, requests: int) -> tuple[list[int], list[int]]:
    """`requests` predictions from 4 clients at once, and /readyz asked between them."""
    readiness: list[int] = []

    def client(index: int) -> list[int]:
        statuses = []
        for number in range(requests // CLIENTS):
            statuses.append(gate.predict())
            if index == 0 and number % 10 == 0:
                readiness.append(ready(gate))
        return statuses

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        statuses = [status for batch in pool.map(client, range(CLIENTS)) for status in batch]
    return statuses, readiness


RECYCLED_AT_LEAST = 4  # times, so that both workers' successors served under load
CLIENTS = 4  # predictions in flight at once: the most one recycle can catch in its kernel


def load_until_recycled(
    gate: Supervised, announcement: str, batch: int, batches: int = 5
) -> tuple[list[int], list[int]]:
    """`steady_load` in batches until the model server has announced RECYCLED_AT_LEAST
    recycles (how many one batch brings depends on how fast the machine serves it)."""
    statuses: list[int] = []
    readiness: list[int] = []
    for _ in range(batches):
        more, checked = steady_load(gate, batch)
        statuses += more
        readiness += checked
        if sum(announcement in line for line in gate.output()) >= RECYCLED_AT_LEAST:
            break
    return statuses, readiness


def client_errors(gate: Supervised) -> list[tuple[Any, ...]]:
    """What servegate answered other than 200, and why: the message of a failed check."""
    return [
        (line.get("status"), line.get("cause"), line.get("attempts"), line.get("detail"))
        for line in gate.events("request")
        if line.get("status") != 200
    ]


def assert_only_shutdown_resets(gate: Supervised, statuses: list[int], announcement: str) -> None:
    """Every answer is a 200 but for requests a worker closing to exit cut before answering:
    503 `reset_during_request` after one attempt (never replayed: whether its TCP had
    acknowledged them when it reset is timing), at most CLIENTS per recycle."""
    errors = client_errors(gate)
    assert set(statuses) <= {200, 503}, errors
    assert statuses.count(503) == len(errors), errors
    reset = (
        "the server reset the connection as the request reached it, before answering; a reset "
        "does not tell whether it had read any of the request",
        "the server reset the connection after its TCP acknowledged",
    )
    assert all(
        (cause, attempts) == ("reset_during_request", 1) and detail.startswith(reset)
        for _status, cause, attempts, detail in errors
    ), errors
    recycled = sum(announcement in line for line in gate.output())
    assert len(errors) <= CLIENTS * recycled, errors


def assert_recycled_without_a_restart(gate: Supervised, announcement: str) -> None:
    recycled = sum(announcement in line for line in gate.output())
    assert recycled >= RECYCLED_AT_LEAST  # it really recycled
    assert_no_restart(gate)


@pytest.mark.time_limit(120)
def test_gunicorn_max_requests_under_load_is_no_restart_and_no_stale_answer(
    supervise: Callable[..., Supervised],
) -> None:
    gate = supervise(
        sys.executable, "-m", "gunicorn", "--chdir", str(ROOT), "--bind", "127.0.0.1:{port}",
        "--no-control-socket", "--workers", "2", "--worker-class", "gthread", "--threads", "2",
        "--max-requests", "20", "--max-requests-jitter", "5", "demo.model:app",
    )  # fmt: skip
    eventually(lambda: ready(gate) == 200, "ready")
    statuses, readiness = load_until_recycled(gate, "Autorestarting worker", 240)
    assert_only_shutdown_resets(gate, statuses, "Autorestarting worker")
    assert set(readiness) == {200}
    assert_recycled_without_a_restart(gate, "Autorestarting worker")


@pytest.mark.time_limit(120)
def test_uvicorn_limit_max_requests_under_load_is_no_restart_and_no_stale_answer(
    supervise: Callable[..., Supervised],
) -> None:
    gate = supervise(
        sys.executable, "-m", "uvicorn", "tests.upstreams.dies:app", "--host", "127.0.0.1",
        "--port", "{port}", "--workers", "2", "--limit-max-requests", "20",
    )  # fmt: skip
    eventually(lambda: ready(gate) == 200, "ready")
    statuses, readiness = load_until_recycled(gate, "Maximum request limit", 200)
    assert_only_shutdown_resets(gate, statuses, "Maximum request limit")
    assert set(readiness) == {200}
    assert_recycled_without_a_restart(gate, "Maximum request limit")


GUNICORN_RELOAD = "[2026-11-25 12:15:18 +0000] [16834] [INFO] Hang up: Master"
GUNICORN_TTOU = "[2026-11-25 12:15:18 +0000] [16834] [INFO] Handling signal: ttou"
UVICORN_TERMINATED = "INFO:     Terminated child process [16843]"


def test_retirements_the_operator_asked_for_are_read_as_such() -> None:
    assert parse_line(GUNICORN_RELOAD) == WorkerEvent(Kind.RELOAD, 0, "Gunicorn")
    assert parse_line(GUNICORN_TTOU) == WorkerEvent(Kind.SHRINK, 0, "Gunicorn")
    assert parse_line(UVICORN_TERMINATED) == WorkerEvent(Kind.PLANNED, 16843, "Uvicorn")


def test_a_reload_retires_every_worker_it_had_and_a_crash_after_it_still_counts() -> None:
    """Gunicorn boots the new workers before the old ones exit: no exit is unreplaced."""
    boots = [(Kind.BOOT, 1), (Kind.BOOT, 2)]
    reload = [(Kind.RELOAD, 0), (Kind.BOOT, 3), (Kind.BOOT, 4), (Kind.EXIT, 1), (Kind.EXIT, 2)]
    assert count(*boots, *reload, *reload[:1], (Kind.BOOT, 5), (Kind.BOOT, 6)) == 0
    assert count(*boots, *reload, (Kind.EXIT, 3), (Kind.BOOT, 5)) == 1


def test_sigttou_retires_the_oldest_worker_and_never_the_last() -> None:
    """Gunicorn retires its oldest worker, and ignores SIGTTOU at one: a crash of another
    worker, or after an ignored SIGTTOU, is still a restart."""
    two = [(Kind.BOOT, 1), (Kind.BOOT, 2), (Kind.SHRINK, 0)]
    assert count(*two, (Kind.EXIT, 1), (Kind.BOOT, 3)) == 0
    assert count(*two, (Kind.EXIT, 2), (Kind.BOOT, 3)) == 1  # the other one crashed
    assert count((Kind.BOOT, 1), (Kind.SHRINK, 0), (Kind.EXIT, 1), (Kind.BOOT, 2)) == 1


RELOADS = 3  # as many as circuit.crash_loop_restarts: counted as restarts, a crash loop


@pytest.mark.time_limit(120)
@pytest.mark.parametrize(
    "server",
    [
        pytest.param(
            ("-m", "gunicorn", "--chdir", str(ROOT), "--bind", "127.0.0.1:{port}",
             "--no-control-socket", "--workers", "2", "demo.model:app"),
            id="gunicorn",
        ),
        pytest.param(
            ("-m", "uvicorn", "tests.upstreams.dies:app", "--host", "127.0.0.1", "--port",
             "{port}", "--workers", "2"),
            id="uvicorn",
        ),
    ],
)  # fmt: skip
def test_a_reload_on_sighup_is_no_restart_and_no_crash_loop(
    server: tuple[str, ...], supervise: Callable[..., Supervised]
) -> None:
    """The operator reloads the model server (new code, new settings): its workers are all
    replaced, on purpose. Counted as restarts, three reloads made a crash loop, and /readyz
    took the instance out of service."""
    gate = supervise(sys.executable, *server)
    eventually(lambda: ready(gate) == 200, "ready")
    [master] = gate.model_pids()
    booted = len(gate.events("model.output"))
    for number in range(1, RELOADS + 1):
        os.kill(master, signal.SIGHUP)
        # Each reload boots two workers, and ends when both old ones are gone.
        eventually(lambda n=number: _reloaded(gate, n), f"reload {number} done", limit=30)
        assert gate.predict() == 200
    assert len(gate.events("model.output")) > booted
    assert_no_restart(gate)


def _reloaded(gate: Supervised, times: int) -> bool:
    lines = gate.output()
    boots = sum("Booting worker" in line or "Started server process" in line for line in lines)
    exits = sum("Worker exiting" in line or "Finished server process" in line for line in lines)
    return boots >= 2 * (times + 1) and exits >= 2 * times


def assert_no_restart(gate: Supervised) -> None:
    metrics = gate.metrics()
    assert metrics["servegate_upstream_worker_restarts_total"] == 0
    assert metrics["servegate_upstream_restarts_total"] == 0
    assert metrics["servegate_upstream_crash_loop"] == 0
    assert not gate.events("upstream.crash_loop")
    assert ready(gate) == 200


@pytest.mark.time_limit(120)
def test_gunicorn_workers_taken_away_and_added_back_are_no_restart(
    supervise: Callable[..., Supervised],
) -> None:
    """SIGTTOU retires the oldest worker, SIGTTIN boots one: a scaled pool, not a crash."""
    gate = supervise(
        sys.executable, "-m", "gunicorn", "--chdir", str(ROOT), "--bind", "127.0.0.1:{port}",
        "--no-control-socket", "--workers", "3", "demo.model:app",
    )  # fmt: skip
    eventually(lambda: ready(gate) == 200, "ready")
    [master] = gate.model_pids()
    for number in range(1, RELOADS + 1):
        os.kill(master, signal.SIGTTOU)
        eventually(lambda n=number: _said(gate, "Worker exiting") >= n, f"{number} retired", 30)
        os.kill(master, signal.SIGTTIN)
        eventually(lambda n=number: _said(gate, "Booting worker") >= 3 + n, f"{number} added", 30)
    assert gate.predict() == 200
    assert_no_restart(gate)


def _said(gate: Supervised, text: str) -> int:
    return sum(text in line for line in gate.output())
