"""Retry decisions: only what provably never reached the application, and only in time."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import RetrySettings
from proxy.failures import UNREACHABLE, Cause, Failure
from proxy.retry import (
    Decision,
    GiveUp,
    GiveUpReason,
    Outcome,
    Retry,
    RetryState,
    backoff,
    decide,
    retry_outcome,
)

SETTINGS = RetrySettings()


def decide_for(
    cause: Cause,
    state: RetryState | None = None,
    *,
    body_replayable: bool = True,
    remaining: float = 30.0,
) -> Decision:
    return decide(
        Failure(cause, "x"),
        state or RetryState(),
        body_replayable=body_replayable,
        remaining=remaining,
        settings=SETTINGS,
        rng=random.Random(1),
    )


def test_a_stale_connection_is_retried_at_once_on_a_fresh_connection() -> None:
    assert decide_for(Cause.STALE_CONNECTION) == Retry(delay=0, fresh_connection=True)


def test_a_stale_connection_is_retried_only_once() -> None:
    decision = decide_for(Cause.STALE_CONNECTION, RetryState(stale_retries=1))
    assert decision == GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)


def test_a_new_connection_closed_unread_is_retried_after_a_backoff_up_to_three_times() -> None:
    def unread_drop(retried: int) -> Decision:
        return decide(
            Failure(Cause.STALE_CONNECTION, "x", reused=False),
            RetryState(stale_retries=retried),
            body_replayable=True,
            remaining=30.0,
            settings=SETTINGS,
            rng=random.Random(1),
        )

    for retried in (1, 2):  # after the pooled connection's one retry, or another new one's
        decision = unread_drop(retried)
        assert isinstance(decision, Retry)
        assert decision.fresh_connection
        assert 0 < decision.delay <= SETTINGS.backoff_max
    assert unread_drop(3) == GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)


def test_a_streamed_body_cannot_be_replayed() -> None:
    decision = decide_for(Cause.STALE_CONNECTION, body_replayable=False)
    assert decision == GiveUp(GiveUpReason.NOT_REPLAYABLE)


@pytest.mark.parametrize(
    "cause",
    [c for c in Cause if c not in (Cause.STALE_CONNECTION, *UNREACHABLE)],
)  # fmt: skip
def test_nothing_that_may_have_reached_the_model_is_retried(cause: Cause) -> None:
    assert decide_for(cause) == GiveUp(GiveUpReason.NOT_RETRYABLE)


def test_a_refused_connection_backs_off_within_the_remaining_budget() -> None:
    decision = decide_for(Cause.CONNECT_REFUSED, RetryState(connect_retries=10), remaining=0.3)
    assert isinstance(decision, Retry)
    assert not decision.fresh_connection
    assert decision.delay <= 0.3 - 0.05
    assert decide_for(Cause.CONNECT_REFUSED, remaining=0.01) == GiveUp(GiveUpReason.NO_BUDGET)


def test_refusals_ridden_out_for_the_whole_connect_wait_say_so_not_no_budget() -> None:
    def refused(remaining: float, wait_left: float) -> Decision:
        return decide(
            Failure(Cause.CONNECT_REFUSED, "x"), RetryState(), body_replayable=True,
            remaining=remaining, wait_left=wait_left, settings=SETTINGS, rng=random.Random(1),
        )  # fmt: skip

    assert refused(35.0, 0.01) == GiveUp(GiveUpReason.WAIT_OVER)
    assert refused(0.01, 2.0) == GiveUp(GiveUpReason.NO_BUDGET)
    retry = refused(35.0, 0.3)
    assert isinstance(retry, Retry)
    assert retry.delay <= 0.3 - 0.05  # the last one lands within the wait


@given(retries=st.integers(min_value=0, max_value=60), seed=st.integers())
def test_backoff_stays_between_half_the_first_wait_and_the_ceiling(retries: int, seed: int) -> None:
    delay = backoff(retries, SETTINGS, random.Random(seed))
    assert SETTINGS.backoff_initial / 2 <= delay <= SETTINGS.backoff_max


def test_an_opted_in_reset_is_replayed_once_and_never_after_a_stale_retry() -> None:
    def reset(state: RetryState) -> Decision:
        return decide(
            Failure(Cause.RESET_DURING_REQUEST, "x"), state, replay_after_reset=True,
            body_replayable=True, remaining=30, settings=SETTINGS, rng=random.Random(1),
        )  # fmt: skip

    exhausted = GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)
    assert reset(RetryState()) == Retry(fresh_connection=True)
    assert reset(RetryState(reset_retries=1)) == exhausted
    # In flight on two crashed workers already (the first looked like a stale connection).
    assert reset(RetryState(stale_retries=1)) == exhausted
    assert decide_for(Cause.RESET_DURING_REQUEST) == GiveUp(GiveUpReason.NOT_RETRYABLE)


@pytest.mark.parametrize(
    ("reason", "outcome"),
    [
        (GiveUpReason.NOT_RETRYABLE, None),
        (GiveUpReason.NOT_REPLAYABLE, Outcome.NOT_REPLAYABLE),
        (GiveUpReason.NO_BUDGET, Outcome.NO_BUDGET),
        (GiveUpReason.WAIT_OVER, Outcome.WAIT_OVER),
        (GiveUpReason.ATTEMPTS_EXHAUSTED, None),
    ],
)
def test_only_a_retry_that_was_due_but_not_made_counts_as_a_retry_outcome(
    reason: GiveUpReason, outcome: Outcome | None
) -> None:
    assert retry_outcome(reason) is outcome
