"""Retry policy: given a failure and the request's state, retry now, retry later, or give up. Pure.

The rule that never bends: a request that may have reached the model's application is not
replayed. Only failures that provably happened before it (a stale pooled connection, a refused
or timed-out connect) are retried, and only while the body can still be sent again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from proxy.config import RetrySettings
from proxy.failures import UNREACHABLE, Cause, Failure

# One retry after a stale pooled connection is enough: it runs on a brand-new connection, which
# no idle timer can have closed. A brand-new connection closed before the request reached it
# (proven by TCP, proxy/acked.py) is a worker going away, as in a restart or a crash loop,
# closing what it had accepted: still never read, so it is retried again, after a backoff, up
# to MAX_UNREAD_RETRIES in all.
MAX_STALE_RETRIES = 1
MAX_UNREAD_RETRIES = 3
# Time kept for the connect attempt after a backoff: ample for loopback or a sidecar.
LAST_ATTEMPT_RESERVE = 0.05
MAX_RESET_REPLAYS = 1
SCHEME_MISMATCHES = frozenset({Cause.TLS_TO_PLAIN_SERVER, Cause.PLAIN_TO_TLS_SERVER})


class Outcome(StrEnum):
    """The `outcome` label of servegate_retries_total."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    NOT_REPLAYABLE = "not_replayable"  # a retry was due, but the body had already streamed
    NO_BUDGET = "no_budget"  # a retry was due, but the deadline left no time for it
    WAIT_OVER = "wait_over"  # a connect retry was due, but retry.connect_wait had ended


class GiveUpReason(StrEnum):
    NOT_RETRYABLE = "not_retryable"  # the failure may have reached the model, or cannot heal
    NOT_REPLAYABLE = "not_replayable"  # a retry was due, but the body had already streamed
    NO_BUDGET = "no_budget"  # a retry was due, but the deadline left no time for it
    # A connect retry was due, but the request had ridden out failed connects (refused, timed
    # out, a name without an address) for its whole retry.connect_wait (retry.boot_wait while
    # a supervised model server boots).
    WAIT_OVER = "wait_over"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again after `delay` seconds, on a fresh connection or one from the pool."""

    delay: float = 0.0
    fresh_connection: bool = False


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: GiveUpReason


Decision = Retry | GiveUp

# A retry that was due but not made is still a retry outcome on servegate_retries_total; a
# failure that was never retryable is not counted there at all.
_OUTCOME_OF: dict[GiveUpReason, Outcome | None] = {
    GiveUpReason.NOT_RETRYABLE: None,
    GiveUpReason.NOT_REPLAYABLE: Outcome.NOT_REPLAYABLE,
    GiveUpReason.NO_BUDGET: Outcome.NO_BUDGET,
    GiveUpReason.WAIT_OVER: Outcome.WAIT_OVER,
    GiveUpReason.ATTEMPTS_EXHAUSTED: None,
}


def retry_outcome(reason: GiveUpReason) -> Outcome | None:
    """The `outcome` a give-up adds to servegate_retries_total, or None when it adds none."""
    return _OUTCOME_OF[reason]


@dataclass(slots=True)
class RetryState:
    """Per-request counters the policy reads; `record` is called for each retry made."""

    stale_retries: int = 0
    connect_retries: int = 0
    scheme_retries: int = 0
    reset_retries: int = 0

    def record(self, cause: Cause) -> None:
        if cause is Cause.STALE_CONNECTION:
            self.stale_retries += 1
        elif cause is Cause.RESET_DURING_REQUEST:
            self.reset_retries += 1
        elif cause in SCHEME_MISMATCHES:
            self.scheme_retries += 1
        else:
            self.connect_retries += 1


def decide(
    failure: Failure,
    state: RetryState,
    *,
    scheme_adopted: bool = False,
    replay_after_reset: bool = False,
    body_replayable: bool,
    remaining: float,
    wait_left: float | None = None,
    settings: RetrySettings,
    rng: random.Random,
) -> Decision:
    """`remaining`: seconds of the budget left; `wait_left`: of the request's connect wait
    (retry.connect_wait or boot_wait), once its connects have been refused."""
    if failure.cause is Cause.STALE_CONNECTION:
        brand_new = failure.reused is False
        if state.stale_retries >= (MAX_UNREAD_RETRIES if brand_new else MAX_STALE_RETRIES):
            return GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)
        if not body_replayable:
            return GiveUp(GiveUpReason.NOT_REPLAYABLE)
        if not brand_new:
            return Retry(fresh_connection=True)
        if remaining < LAST_ATTEMPT_RESERVE:
            return GiveUp(GiveUpReason.NO_BUDGET)
        delay = min(backoff(state.stale_retries, settings, rng), remaining - LAST_ATTEMPT_RESERVE)
        return Retry(delay=delay, fresh_connection=True)
    if failure.cause in UNREACHABLE:
        # Nothing was sent, so even a streamed body is intact; only time limits these. The
        # last backoff is cut short so one more attempt lands just before the limit.
        left = remaining if wait_left is None else min(remaining, wait_left)
        if left < LAST_ATTEMPT_RESERVE:
            spent = remaining < LAST_ATTEMPT_RESERVE
            return GiveUp(GiveUpReason.NO_BUDGET if spent else GiveUpReason.WAIT_OVER)
        delay = min(backoff(state.connect_retries, settings, rng), left - LAST_ATTEMPT_RESERVE)
        return Retry(delay=delay)
    if failure.cause is Cause.RESET_DURING_REQUEST and replay_after_reset:
        # The operator vouched that this method's inference may run twice. Twice at most: a
        # request that was on two crashed workers may be what kills them (query of death).
        # A stale retry also followed a drop after sending: a worker that crashed on a
        # reused connection looks exactly like an idle close. Both count toward the guard.
        if state.reset_retries + state.stale_retries >= MAX_RESET_REPLAYS:
            return GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)
        if not body_replayable:
            return GiveUp(GiveUpReason.NOT_REPLAYABLE)
        return Retry(fresh_connection=True)
    if scheme_adopted and failure.cause in SCHEME_MISMATCHES:
        # The server could not read a word of the request; the same one goes out again in
        # the scheme it speaks (upstream.scheme: auto).
        if state.scheme_retries >= 1:
            return GiveUp(GiveUpReason.ATTEMPTS_EXHAUSTED)
        if not body_replayable:
            return GiveUp(GiveUpReason.NOT_REPLAYABLE)
        return Retry(fresh_connection=True)
    return GiveUp(GiveUpReason.NOT_RETRYABLE)


def backoff(retries_so_far: int, settings: RetrySettings, rng: random.Random) -> float:
    """Full jitter (AWS architecture blog): spreads a burst of waiters over the whole window."""
    ceiling = min(settings.backoff_max, settings.backoff_initial * 2**retries_so_far)
    return rng.uniform(settings.backoff_initial / 2, ceiling)
