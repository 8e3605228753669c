"""Supervise mode: `servegate run ... -- gunicorn ...` runs the model server as its child, counts
its worker restarts from its log, restarts it when it dies, and stops it last."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.supervise import (
    FIRST_DELAY,
    MAX_DELAY,
    STABLE_RUN,
    Backoff,
    Kind,
    WorkerCounter,
    WorkerEvent,
    parse_line,
)
from tests.upstreams.gunicorn import ROOT, free_port, wait_for_port

pytestmark = pytest.mark.slow  # each test runs servegate and its model server as processes

SERVEGATE = [sys.executable, "-m", "proxy", "run"]
BOOT_LINE = "Booting worker with pid:"
INITIAL_WORKERS = 2
CRASHES = 3  # below circuit.failure_threshold (5): every crash reaches a worker

# --- parse_line: real lines, as Gunicorn 27 (and older) and Uvicorn print them -------------

GUNICORN_27 = [
    ("[2026-11-25 12:15:18 +0000] [16843] [INFO] Booting worker with pid: 16843", Kind.BOOT),
    (
        "[2026-11-25 12:15:21 +0000] [16834] [ERROR] Worker (pid:16843) exited with code 1.",
        Kind.EXIT,
    ),
    ("[2026-11-25 12:15:22 +0000] [16843] [INFO] Worker exiting (pid: 16843)", Kind.EXIT),
    ("[2026-11-25 12:15:22 +0000] [16834] [INFO] Worker (pid:16843) was sent SIGTERM!", Kind.EXIT),
    (
        "[2026-11-25 12:15:22 +0000] [16834] [ERROR] Worker (pid:16843) was sent SIGKILL! "
        "Perhaps out of memory?",
        Kind.EXIT,
    ),
    ("[2026-11-25 12:15:22 +0000] [16834] [CRITICAL] WORKER TIMEOUT (pid:16843)", Kind.TIMEOUT),
    ("[2023-06-01 10:00:00 +0000] [16834] [ERROR] Worker (pid:16843) was sent code 34!", Kind.EXIT),
    (
        "[2021-06-01 10:00:00 +0000] [16834] [WARNING] Worker with pid 16843 was terminated "
        "due to signal 9",
        Kind.EXIT,
    ),
]  # fmt: skip
UVICORN = [
    ("INFO:     Started server process [16843]", Kind.BOOT),
    ("INFO:     Finished server process [16843]", Kind.EXIT),
    ("INFO:     Child process [16843] died", Kind.EXIT),
    ("ERROR:    Child process [16843] died before startup completed, shutting down.", Kind.EXIT),
]
NOT_WORKER_EVENTS = [
    "[2026-11-25 12:15:18 +0000] [16834] [INFO] Starting gunicorn 27.0.1",
    "[2026-11-25 12:15:18 +0000] [16834] [INFO] Listening at: http://127.0.0.1:8000 (16834)",
    "[2026-11-25 12:15:22 +0000] [16834] [INFO] Handling signal: term",
    "[2026-11-25 12:15:22 +0000] [16834] [INFO] Shutting down: Master",
    # Gunicorn 27's dirty-worker pool is not the HTTP workers servegate forwards to.
    "[2026-11-25 12:15:22 +0000] [16834] [CRITICAL] DIRTY WORKER TIMEOUT (pid:16843)",
    "[2026-11-25 12:15:22 +0000] [16834] [INFO] Dirty worker exited (pid:16843)",
    "INFO:     Started parent process [16834]",
    "INFO:     Waiting for application startup.",
    "loaded weights for pid 16843 in 2.1 s",
]


@pytest.mark.parametrize(("line", "kind"), GUNICORN_27 + UVICORN)
def test_parse_line_reads_each_worker_event_and_its_pid(line: str, kind: Kind) -> None:
    event = parse_line(line)
    assert event is not None
    assert (event.kind, event.pid) == (kind, 16843)


@pytest.mark.parametrize("line", NOT_WORKER_EVENTS)
def test_parse_line_ignores_everything_else(line: str) -> None:
    assert parse_line(line) is None


# --- the boot-counting rule -----------------------------------------------------------------


B, X, T = Kind.BOOT, Kind.EXIT, Kind.TIMEOUT


def count_restarts(*events: tuple[Kind, int]) -> int:
    counter = WorkerCounter()
    return sum(counter.observe(WorkerEvent(kind, pid, "Gunicorn")) for kind, pid in events)


def test_initial_boots_are_not_restarts_and_each_replacement_is_one() -> None:
    assert count_restarts((B, 1), (B, 2)) == 0
    assert count_restarts((B, 1), (B, 2), (X, 1), (B, 3), (X, 2), (B, 4)) == 2


def test_a_worker_dying_before_its_siblings_booted_is_still_one_restart() -> None:
    assert count_restarts((B, 1), (X, 1), (B, 2), (B, 3)) == 1


def test_several_lines_about_one_worker_count_once() -> None:
    # Gunicorn's UvicornWorker: Gunicorn's boot line, then Uvicorn's, for the same pid.
    assert count_restarts((B, 1), (B, 1), (B, 2), (B, 2)) == 0
    # A timeout, then the master's report of the kill, then one replacement.
    assert count_restarts((B, 1), (B, 2), (T, 1), (X, 1), (X, 1), (B, 3), (B, 3)) == 1


def test_a_shutdown_is_no_restart() -> None:
    assert count_restarts((B, 1), (B, 2), (X, 1), (X, 2)) == 0


def test_restart_delay_doubles_to_its_cap_and_starts_over_after_a_stable_run() -> None:
    backoff = Backoff()
    delays = [backoff.next(ran_for=1.0) for _ in range(9)]
    assert delays[:3] == [FIRST_DELAY, 2 * FIRST_DELAY, 4 * FIRST_DELAY]
    assert delays[-1] == MAX_DELAY
    assert backoff.next(ran_for=STABLE_RUN) == FIRST_DELAY


# --- servegate supervising a real Gunicorn ---------------------------------------------------


@dataclass
class Supervised:
    """servegate run as a process, with the demo model under Gunicorn as its child."""

    process: subprocess.Popen[bytes]
    data: int
    admin: int
    model: int
    log_path: Path

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(errors="replace").splitlines(keepends=True)
        parsed = [json.loads(line) for line in lines if line.endswith("\n")]
        return [line for line in parsed if name is None or line.get("event") == name]

    def output(self) -> list[str]:
        return [event["line"] for event in self.events("model.output")]

    def boots(self) -> int:
        return sum(BOOT_LINE in line for line in self.output())

    def model_pids(self) -> list[int]:
        return [event["pid"] for event in self.events("model.started")]

    def worker_pids(self) -> list[int]:
        """servegate's own worker processes (--workers), every one started."""
        started = [pid for event in self.events("workers.started") for pid in event["pids"]]
        return started + [event["pid"] for event in self.events("workers.worker_restarted")]

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.admin}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if not sample.labels
        }

    def predict(self, query: str = "", timeout: float = 10) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.data}/predict{query}",
            data=b'{"inputs": [5.1, 3.5, 1.4, 0.2]}',
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            error.close()
            return int(error.code)


def eventually(check: Callable[[], bool], what: str, limit: float = 10) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit} s: {what}")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    """Start servegate supervising Gunicorn; afterwards every process is stopped by pid."""
    started: list[Supervised] = []

    def start(
        *gunicorn_args: str,
        env: dict[str, str] | None = None,
        workers: int = 1,
        boot_delay: float = 0.0,
        booted: bool = True,
    ) -> Supervised:
        """`workers`: servegate's --workers; `boot_delay`: seconds each start of the model
        server takes before Gunicorn runs (a model loading its weights); `booted`: return
        once Gunicorn has booted its workers, else once servegate listens."""
        data, admin, model = free_port(), free_port(), free_port()
        log_path = tmp_path / f"servegate-{data}.log"
        slow = ["/bin/sh", "-c", f'sleep {boot_delay}; exec "$@"', "sh"] if boot_delay else []
        command = [
            *SERVEGATE, "--listen", f"127.0.0.1:{data}", "--admin-listen", f"127.0.0.1:{admin}",
            "--upstream", f"http://127.0.0.1:{model}", "--workers", str(workers),
            "--", *slow, sys.executable, "-m", "gunicorn", "--chdir", str(ROOT),
            "--bind", f"127.0.0.1:{model}", "--no-control-socket", "--workers", "2",
            "--worker-class", "gthread", "--threads", "2", *gunicorn_args, "demo.model:app",
        ]  # fmt: skip
        with log_path.open("wb") as log:  # a file, not a pipe: a full pipe would stall servegate
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        gate = Supervised(process, data, admin, model, log_path)
        started.append(gate)
        wait_for_port(data, process)  # type: ignore[arg-type]
        wait_for_port(admin, process)  # type: ignore[arg-type]
        if booted:
            eventually(lambda: gate.boots() >= INITIAL_WORKERS, "Gunicorn booted its workers")
        return gate

    yield start
    for gate in started:
        # servegate first, or it would restart the model servers stopped below.
        if gate.process.poll() is None:
            gate.process.kill()
        gate.process.wait(timeout=10)
        for pid in gate.model_pids():  # each master leads its own process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        for pid in gate.worker_pids():  # stopped with their parent; killed here if not
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_each_crashed_worker_is_one_worker_restart_and_initial_boots_are_none(
    supervised: Callable[..., Supervised],
) -> None:
    gate = supervised(env={"DEMO_CRASH_EVERY": "2"})
    assert gate.metrics()["servegate_upstream_worker_restarts_total"] == 0
    for _ in range(CRASHES):
        assert gate.predict("?crash=1") == 503

    def restarts() -> float:
        return gate.metrics()["servegate_upstream_worker_restarts_total"]

    eventually(lambda: restarts() == CRASHES, f"{CRASHES} worker restarts counted")
    eventually(lambda: gate.boots() == INITIAL_WORKERS + CRASHES, "every replacement booted")
    assert restarts() == gate.boots() - INITIAL_WORKERS == CRASHES
    assert gate.metrics()["servegate_upstream_crash_loop"] == 1  # 3 restarts within 60 s
    evidence = [event["evidence"] for event in gate.events("upstream.restarted")]
    assert len(evidence) == CRASHES
    assert all(line.startswith("Gunicorn booted a new worker (pid ") for line in evidence)


def test_the_model_servers_output_is_passed_on_line_by_line_as_model_output(
    supervised: Callable[..., Supervised],
) -> None:
    gate = supervised()
    [master] = gate.model_pids()
    output = gate.output()
    assert output[0].endswith(" [INFO] Starting gunicorn 27.0.1")
    assert f"Listening at: http://127.0.0.1:{gate.model} ({master})" in output[1]
    assert all("\n" not in line for line in output)
    for event in gate.events("model.output"):
        assert event["stream"] in ("stdout", "stderr")


@pytest.mark.time_limit(40)
def test_sigterm_drains_servegate_first_then_stops_the_model_server(
    supervised: Callable[..., Supervised],
) -> None:
    gate = supervised()
    [master] = gate.model_pids()
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(gate.predict, "?sleep=2")
        eventually(
            lambda: gate.metrics()["servegate_inflight_requests"] == 1,
            "the slow prediction is in flight",
        )
        gate.process.send_signal(signal.SIGTERM)
        assert slow.result(timeout=10) == 200  # the model outlived the request it was serving
    assert gate.process.wait(timeout=10) == 0
    eventually(lambda: gone(master), "the Gunicorn master is gone")
    order = [event["event"] for event in gate.events()]
    steps = ["servegate.stopping", "model.stopping", "model.stopped", "servegate.stopped"]
    assert [order.index(step) for step in steps] == sorted(order.index(step) for step in steps)


def test_a_killed_master_is_started_again_and_serves(
    supervised: Callable[..., Supervised],
) -> None:
    gate = supervised()
    [master] = gate.model_pids()
    os.kill(master, signal.SIGKILL)
    eventually(lambda: len(gate.model_pids()) == 2, "a new master started")
    assert gate.model_pids()[1] != master
    [exited] = gate.events("model.exited")
    assert (exited["pid"], exited["reason"]) == (master, "signal SIGKILL")
    eventually(lambda: gate.predict(timeout=2) == 200, "a prediction succeeds again", limit=15)
    metrics = gate.metrics()
    assert metrics["servegate_upstream_restarts_total"] >= 1
    assert metrics["servegate_upstream_worker_restarts_total"] == 0  # the new master's first


@pytest.mark.time_limit(30)
def test_a_worker_timeout_names_gunicorns_timeout_as_shorter_than_the_budget(
    supervised: Callable[..., Supervised],
) -> None:
    # The sync worker (--threads 1, or Gunicorn picks gthread): gthread keeps heartbeating
    # while a thread sleeps, so it never times out.
    gate = supervised("--worker-class", "sync", "--threads", "1", "--timeout", "1")
    # The sync worker answers its aborted request with a 500, which servegate passes on.
    assert gate.predict("?sleep=5") == 500
    eventually(lambda: bool(gate.events("model.worker_timeout")), "a worker timeout logged")
    [warning] = gate.events("model.worker_timeout")
    assert "raise --timeout above the budget" in warning["advice"]
    assert "40 s budget" in warning["advice"]
    eventually(
        lambda: gate.metrics()["servegate_upstream_worker_restarts_total"] == 1,
        "the killed worker's replacement counted once",
    )


def test_a_model_server_that_cannot_start_stops_servegate_with_one_line() -> None:
    result = subprocess.run(
        [*SERVEGATE, "--listen", f"127.0.0.1:{free_port()}", "--admin-listen",
         f"127.0.0.1:{free_port()}", "--", "/nonexistent/model-server", "--bind", ":8000"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "servegate: cannot start the model server: /nonexistent/model-server: "
        "No such file or directory"
    )


def test_nothing_after_the_separator_is_a_usage_error() -> None:
    result = subprocess.run([*SERVEGATE, "--"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "-- COMMAND" in result.stderr


def test_a_crash_loop_is_declared_within_its_window_and_cleared_after_it(
    supervised: Callable[..., Supervised],
) -> None:
    window = 3.0
    gate = supervised(
        env={
            "SERVEGATE_HEALTH__CRASH_LOOP_WINDOW": str(window),
            "SERVEGATE_HEALTH__INTERVAL": "0.2",
        }
    )
    for _ in range(CRASHES):  # three restarts, well inside the window
        assert gate.predict("?crash=1") == 503

    def crash_loop() -> float:
        return gate.metrics()["servegate_upstream_crash_loop"]

    eventually(lambda: crash_loop() == 1, "crash loop declared")
    declared = time.monotonic()
    assert len(gate.events("upstream.crash_loop")) == 1
    eventually(lambda: crash_loop() == 0, "crash loop cleared", limit=window + 2)
    assert time.monotonic() - declared >= window - 1  # not before the window has passed
    eventually(lambda: gate.metrics()["servegate_upstream_up"] == 1, "up again")
    assert gate.predict() == 200


@pytest.mark.time_limit(60)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_request_waits_for_a_model_server_that_takes_seconds_to_boot_again(
    workers: int, supervised: Callable[..., Supervised]
) -> None:
    """retry.boot_wait (20 s) carries a request through the boot: the health checks failing
    meanwhile (down after two) opened the circuit, and the request was refused at once.
    With --workers, the parent alone sees the model exit: its workers must hear of it."""
    gate = supervised(workers=workers, boot_delay=2.5)
    eventually(lambda: gate.predict(timeout=5) == 200, "serving", limit=15)
    [master] = gate.model_pids()
    os.killpg(master, signal.SIGKILL)
    eventually(lambda: bool(gate.events("model.exited")), "the exit seen")
    # Its workers die a moment after the master: a request their listening socket still took
    # would be reset by a dying worker, a true reset_during_request, not the boot's refusals.
    eventually(lambda: refuses(gate.model), "every process of the model server gone")
    began = time.monotonic()
    assert gate.predict(timeout=30) == 200, client_errors(gate)
    assert time.monotonic() - began > 2.5  # it did wait for the boot
    assert not gate.events("circuit.open")


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def client_errors(gate: Supervised) -> list[tuple[Any, ...]]:
    return [
        (line.get("status"), line.get("cause"), line.get("detail"))
        for line in gate.events("request")
        if line.get("status") != 200
    ]


@pytest.mark.time_limit(60)
def test_workers_name_requests_for_the_crash_loop_their_parent_sees(
    supervised: Callable[..., Supervised],
) -> None:
    """The parent counts restarts from the model server's log, which no worker reads: the
    workers must hear of them, or a crash loop is a reset_during_request without end."""
    gate = supervised(workers=2)
    for _ in range(3):  # three workers crash and are booted again: a crash loop
        assert gate.predict("?crash=1") == 503
    eventually(lambda: bool(gate.events("upstream.crash_loop")), "a crash loop", limit=20)
    eventually(lambda: gate.metrics()["servegate_upstream_crash_loop"] == 1, "shown", limit=5)
    told = len(gate.events("request"))
    for _ in range(12):  # new connections each: both workers answer some (all on one: 1 in 2,048)
        assert gate.predict("?crash=1") == 503
    later = gate.events("request")[told:]
    assert {line["cause"] for line in later} == {"crash_loop"}, later
    assert len({line["worker"] for line in later}) == 2, "one worker answered every request"


@pytest.mark.time_limit(60)
def test_workers_drain_and_exit_when_their_parent_is_killed(
    supervised: Callable[..., Supervised],
) -> None:
    """SIGKILL reaches no child: workers left serving would hold the data port, and a
    servegate started again could not bind it."""
    gate = supervised(workers=2)
    workers = gate.worker_pids()
    assert len(workers) == 2
    gate.process.kill()
    gate.process.wait(timeout=10)
    eventually(lambda: all(gone(pid) for pid in workers), "the workers exited", limit=20)
    assert len(gate.events("workers.parent_gone")) == 2


@pytest.mark.time_limit(60)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_request_waits_for_a_first_boot_longer_than_servegates_own_start(
    workers: int, supervised: Callable[..., Supervised]
) -> None:
    """servegate listens after 5 s even if the model server does not yet: a request then
    waits for the boot. With --workers, the workers start after the model began booting, so
    they cannot hear of it: they begin as booting, as a single servegate does."""
    gate = supervised(workers=workers, boot_delay=8.0, booted=False)
    assert gate.boots() == 0
    assert gate.predict(timeout=30) == 200, client_errors(gate)
    assert not gate.events("circuit.open")


@pytest.mark.time_limit(60)
def test_the_model_server_stops_when_servegate_is_killed(
    supervised: Callable[..., Supervised],
) -> None:
    """SIGKILL reaches no child: the model server ran on in its own process group, holding
    its port, and the next servegate's model server could not bind it."""
    gate = supervised("--graceful-timeout", "1")
    [master] = gate.model_pids()
    gate.process.kill()
    gate.process.wait(timeout=10)
    eventually(lambda: gone(master), "the model server stopped", limit=20)
