"""Upstream health: thresholds, restarts from outside, crash loops and their end."""

from __future__ import annotations

from proxy.config import HealthSettings
from proxy.failures import Cause, Failure
from proxy.health import Health, HealthMonitor


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def monitor(clock: Clock) -> tuple[HealthMonitor, list[tuple[Health, Health]], list[int]]:
    changes: list[tuple[Health, Health]] = []
    restarts: list[int] = []
    settings = HealthSettings(
        unhealthy_threshold=2, healthy_threshold=1, crash_loop_restarts=3, crash_loop_window=60
    )
    health = HealthMonitor(
        settings, lambda was, now: changes.append((was, now)), lambda: restarts.append(1), clock
    )
    return health, changes, restarts


def test_down_takes_two_failed_checks_and_coming_back_is_a_restart() -> None:
    clock = Clock()
    health, changes, restarts = monitor(clock)
    health.record_check(True)
    health.record_check(False)
    assert health.state is Health.UP
    health.record_check(False)
    assert health.state is Health.DOWN
    health.record_check(True)
    assert health.state is Health.UP
    assert changes == [
        (Health.UNKNOWN, Health.UP), (Health.UP, Health.DOWN), (Health.DOWN, Health.UP)
    ]  # fmt: skip
    assert len(restarts) == 1


def test_resets_of_one_dying_worker_count_as_one_restart() -> None:
    clock = Clock()
    health, _, restarts = monitor(clock)
    reset = Failure(Cause.RESET_DURING_REQUEST, "x", reused=False, request_sent=True)
    for _ in range(4):  # four threads of one worker, reset at once
        health.record_failure(reset)
    assert len(restarts) == 1


def test_restarts_close_together_are_a_crash_loop_that_ends_after_a_quiet_window() -> None:
    clock = Clock()
    health, _, _ = monitor(clock)
    health.record_check(True)
    for _ in range(3):
        clock.now += 5
        health.record_restart("test")
    assert health.state is Health.CRASH_LOOP
    crashed = health.explain(Failure(Cause.RESET_DURING_REQUEST, "reset", reused=False))
    assert crashed.cause is Cause.CRASH_LOOP
    clock.now += 61
    health.record_check(True)  # the window passed with no restart
    assert health.state is Health.UP


def test_passive_evidence_is_ignored_when_the_log_counts_restarts() -> None:
    clock = Clock()
    health, _, restarts = monitor(clock)
    health.restarts_from_log = True
    health.record_failure(Failure(Cause.RESET_DURING_REQUEST, "x", reused=False))
    assert restarts == []


def test_a_restart_the_log_counted_is_not_counted_again_when_checks_pass() -> None:
    clock = Clock()
    health, _, restarts = monitor(clock)
    health.restarts_from_log = True
    health.record_check(True)
    health.record_restart("the supervised model server exited")
    health.record_check(False)
    health.record_check(False)
    assert health.state is Health.DOWN
    health.record_check(True)
    assert health.state is Health.UP
    assert len(restarts) == 1


def test_a_timeout_while_the_server_is_down_is_a_service_failure() -> None:
    clock = Clock()
    health, _, _ = monitor(clock)
    health.record_check(False)
    health.record_check(False)
    timed_out = health.explain(Failure(Cause.DEADLINE_EXCEEDED, "budget"))
    assert timed_out.cause is Cause.UPSTREAM_UNHEALTHY
    assert timed_out.category == "service"


def test_an_answer_cut_short_on_a_fresh_connection_is_no_restart() -> None:
    """A server that frames an answer wrong, or closes after part of it, is up and answering:
    three such answers must not declare a crash loop (and fail /readyz)."""
    clock = Clock()
    health, _, restarts = monitor(clock)
    health.record_check(True)
    cut = Failure(
        Cause.RESET_DURING_REQUEST, "cut", reused=False, request_sent=True, response_started=True
    )
    for _ in range(5):
        clock.now += 1
        health.record_failure(cut)
    assert restarts == []
    assert health.state is Health.UP


def test_a_timeout_after_the_server_answered_again_is_the_predictions_not_the_restarts() -> None:
    """DESIGN §1: a timeout is the restart's only while the server is known to be restarting.
    Once a request got an answer after the restart, a slow one is the prediction's."""
    clock = Clock()
    health, _, _ = monitor(clock)
    health.record_check(True)
    health.record_restart("a worker died")
    clock.now += 1
    slow = Failure(Cause.DEADLINE_EXCEEDED, "budget")
    assert health.explain(slow).cause is Cause.UPSTREAM_UNHEALTHY
    health.record_answer()
    assert health.explain(slow).cause is Cause.DEADLINE_EXCEEDED
    health.record_restart("another worker died")
    assert health.explain(slow).cause is Cause.UPSTREAM_UNHEALTHY
