"""The attempt loop: attempt, classify, decide, back off or give up.

It is the only place where a retry happens, and every attempt, failure and retry is counted
here, so a recovered failure is as visible in the metrics as one the client saw.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import aiohttp
import structlog

from proxy.body import RequestBody
from proxy.budget import REMAINING_HEADER, Budget, Spent
from proxy.circuit import Circuit, Signal
from proxy.config import RetrySettings
from proxy.failures import AttemptFacts, Category, Cause, Failure, classify
from proxy.health import HealthMonitor
from proxy.metrics import Metrics
from proxy.probe import SchemeProbe
from proxy.retry import Decision, GiveUp, GiveUpReason, Outcome, RetryState, decide, retry_outcome
from proxy.upstream import Upstream

log = structlog.get_logger("servegate.forward")

BUFFERED_ANSWER_MAX = 256 * 1024  # predictions are small; larger answers stream as they come
UNREACHABLE = frozenset({Cause.CONNECT_REFUSED, Cause.CONNECT_TIMEOUT})
RESTARTING = "(the model server restarted workers moments ago)"


@dataclass(frozen=True)
class Outbound:
    """The request as it goes to the model server; headers are already end-to-end only."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: RequestBody | None


@dataclass(frozen=True)
class ModelResponse:
    """The model's response, with its body when it was small enough to read whole."""

    response: aiohttp.ClientResponse
    body: bytes | None


@dataclass
class Forwarded:
    attempts: int
    facts: AttemptFacts  # of the last attempt
    response: ModelResponse | None = None
    failure: Failure | None = None  # set when no response came
    give_up: GiveUpReason | None = None
    retry_after: float | None = None  # when trying again makes sense, if servegate knows


@dataclass(frozen=True)
class Forwarder:
    upstream: Upstream
    probe: SchemeProbe
    health: HealthMonitor
    circuit: Circuit
    settings: RetrySettings
    metrics: Metrics
    rng: random.Random

    async def forward(self, outbound: Outbound, budget: Budget, spent: Spent) -> Forwarded:
        state = RetryState()
        fresh = False
        retrying: Failure | None = None  # the failure the current attempt is a retry of
        attempt = 0
        while True:
            attempt += 1
            facts = AttemptFacts(scheme=self.probe.speaking)
            began = time.monotonic()
            answer, failure = await self._attempt(outbound, budget, facts, spent, fresh=fresh)
            if retrying is not None:
                outcome = Outcome.SUCCEEDED if answer is not None else Outcome.FAILED
                self.metrics.record_retry(retrying.cause, outcome)
            if answer is not None:
                self.probe.observed_working()
                self.circuit.signal(Signal.SUCCESS)
                return Forwarded(attempt, facts, response=answer)
            assert failure is not None
            failure = await self._observe(failure, facts.scheme, began, budget)
            decision = self._decide(outbound, failure, facts, state, budget, attempt)
            if isinstance(decision, GiveUp):
                if (skipped := retry_outcome(decision.reason)) is not None:
                    self.metrics.record_retry(failure.cause, skipped)
                failure = self.health.explain(failure)
                retry_after = self.circuit.retry_after() or None
                return Forwarded(
                    attempt,
                    facts,
                    failure=failure,
                    give_up=decision.reason,
                    retry_after=retry_after,
                )
            state.record(failure.cause)
            fresh = decision.fresh_connection
            retrying = failure
            spent.backing_off += decision.delay
            await asyncio.sleep(decision.delay)

    def _decide(
        self,
        outbound: Outbound,
        failure: Failure,
        facts: AttemptFacts,
        state: RetryState,
        budget: Budget,
        attempt: int,
    ) -> Decision:
        decision = decide(
            failure,
            state,
            scheme_adopted=self.probe.speaking != facts.scheme,
            replay_after_reset=outbound.method in self.settings.replay_after_reset,
            body_replayable=outbound.body is None or outbound.body.replayable,
            remaining=budget.remaining(),
            settings=self.settings,
            rng=self.rng,
        )
        # Debug for a retried failure: the metrics count it, the access line tells the end.
        log.log(
            logging.INFO if isinstance(decision, GiveUp) else logging.DEBUG,
            "upstream.attempt_failed",
            attempt=attempt,
            category=failure.category,
            cause=failure.cause,
            reused=failure.reused,
            detail=failure.detail,
            retry=not isinstance(decision, GiveUp),
            give_up=decision.reason if isinstance(decision, GiveUp) else None,
        )
        return decision

    async def _observe(self, failure: Failure, spoke: str, began: float, budget: Budget) -> Failure:
        """Confirm a protocol suspicion, then let metrics, health and the circuit see it."""
        failure = await self.probe.confirm(failure, spoke, began, budget.remaining())
        if failure.cause is Cause.STALE_CONNECTION and self.health.restarted_recently():
            # Workers are dying: a pooled connection dropped after the request went out is
            # far more likely a crash than an idle close, and a crash is not replayed.
            failure = failure.as_(Cause.RESET_DURING_REQUEST, f"{failure.detail} {RESTARTING}")
        self.metrics.record_failed_attempt(failure)
        if failure.category is Category.SERVICE:
            self.health.record_failure(failure)
        if failure.cause in UNREACHABLE:
            # Only a server that takes no connection opens the circuit: resets come from
            # workers dying behind a master that still serves, and shedding all traffic
            # then would fail requests the next worker could answer.
            self.circuit.signal(Signal.SERVICE_FAILURE)
        return failure

    async def _attempt(
        self,
        outbound: Outbound,
        budget: Budget,
        facts: AttemptFacts,
        spent: Spent,
        *,
        fresh: bool,
    ) -> tuple[ModelResponse | None, Failure | None]:
        started = time.monotonic()
        headers = [*outbound.headers, (REMAINING_HEADER, budget.remaining_ms_header())]
        body = outbound.body.for_attempt() if outbound.body is not None else None
        deadline = asyncio.timeout(budget.remaining())
        response: aiohttp.ClientResponse | None = None
        try:
            async with deadline:
                response = await self.upstream.send(
                    outbound.method,
                    outbound.raw_path,
                    headers,
                    body,
                    facts,
                    scheme=facts.scheme,
                    fresh=fresh,
                )
                # A small answer of known length is read whole before the client sees a
                # status, as nginx's proxy buffering does: a model that dies in the middle of
                # it is then a clean 503 (and replayable when opted in), not a cut 200.
                length = response.content_length
                small = length is not None and length <= BUFFERED_ANSWER_MAX
                complete = await response.read() if small and outbound.method != "HEAD" else None
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
            if response is not None:
                response.close()
            return None, classify(exc, facts, deadline_passed=deadline.expired())
        finally:
            elapsed = time.monotonic() - started
            self.metrics.attempt_duration.observe(elapsed)
            if facts.reused is None:  # no connection was obtained: all of it was connecting
                spent.connecting += elapsed
            else:
                spent.connecting += facts.connect_seconds
                spent.waiting_for_model += elapsed - facts.connect_seconds
        return ModelResponse(response, complete), None
