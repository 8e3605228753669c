"""The attempt loop: attempt, classify, decide, back off or give up.

It is the only place where a retry happens, and every attempt, failure and retry is counted
here, so a recovered failure is as visible in the metrics as one the client saw.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import aiohttp
import structlog
from aiohttp import hdrs

from proxy.body import RequestBody
from proxy.budget import Budget, Spent
from proxy.config import RetrySettings
from proxy.deadlines import Deadlines
from proxy.exchange import InterimRelay, UpstreamResponse
from proxy.failures import (
    UNREACHABLE,
    AttemptFacts,
    Cause,
    Failure,
    classify,
)
from proxy.headers import has_control_byte, only_chunked
from proxy.metrics import Metrics, ShedReason
from proxy.probe import SchemeProbe
from proxy.retry import Decision, GiveUp, GiveUpReason, Outcome, RetryState, decide, retry_outcome
from proxy.upstream import Upstream
from proxy.upstream_state import UpstreamState

log = structlog.get_logger("servegate.forward")

BUFFERED_ANSWER_MAX = 256 * 1024  # predictions are small; larger answers stream as they come


class Outbound(NamedTuple):
    """The request as it goes to the model server (a tuple, as budget.Budget is)."""

    method: str
    raw_path: str
    # The end-to-end header fields, serialized once (headers.serialize_fields): an attempt adds
    # only its own field, and a request the model holds keeps one block of bytes, not a list.
    fields: bytes
    has_host: bool  # the fields hold a Host field (else the upstream's authority is sent)
    body: RequestBody | None
    # Hears each interim 1xx answer's head (the message aiohttp parsed) as it comes.
    on_interim: InterimRelay | None = None
    # Whether the budget covers the whole answer (budget.scope: response); with first_byte it
    # ends as the answer starts, and no small answer is read whole within it.
    whole_answer_in_budget: bool = True


class ModelResponse(NamedTuple):
    """The model's response, with its body when it was small enough to read whole."""

    response: UpstreamResponse
    body: bytes | None


@dataclass(slots=True)
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
    state: UpstreamState  # the model server's health and the circuit
    settings: RetrySettings
    metrics: Metrics
    rng: random.Random
    deadlines: Deadlines = field(default_factory=Deadlines)  # each attempt's, on one timer

    async def forward(
        self,
        outbound: Outbound,
        budget: Budget,
        spent: Spent,
        on_attempt: Callable[[int], None] = lambda _attempt: None,
    ) -> Forwarded:
        """`on_attempt` hears each attempt's number as it starts (the access line's count
        stays right when the client leaves mid-attempt)."""
        state = RetryState()
        fresh = False
        retrying: Failure | None = None  # the failure the current attempt is a retry of
        unreachable_since: float | None = None  # the first refused (or timed-out) connect
        attempt = 0
        while True:
            attempt += 1
            on_attempt(attempt)
            facts = AttemptFacts(scheme=self.probe.speaking)
            began = time.monotonic()
            answer, failure = await self._attempt(outbound, budget, facts, spent, fresh=fresh)
            if retrying is not None:
                outcome = Outcome.SUCCEEDED if answer is not None else Outcome.FAILED
                self.metrics.record_retry(retrying.cause, outcome)
            if answer is not None:
                self.probe.observed_working()
                self.state.attempt_succeeded()
                return Forwarded(attempt, facts, response=answer)
            assert failure is not None
            failure = await self._observe(failure, facts.scheme, began, budget)
            if failure.cause in UNREACHABLE and unreachable_since is None:
                unreachable_since = began
            if self.state.circuit.open:  # opened by this failure or by another request's
                return self._refused_by_circuit(attempt, facts)
            # Asked at each refusal: a model server found exiting meanwhile is booting, and
            # the wait grows to retry.boot_wait for requests already riding it out.
            connects_until = (
                None if unreachable_since is None else unreachable_since + self._connect_wait()
            )
            decision = self._decide(
                outbound, failure, facts, state, budget, attempt, connects_until
            )
            if isinstance(decision, GiveUp):
                if (skipped := retry_outcome(decision.reason)) is not None:
                    self.metrics.record_retry(failure.cause, skipped)
                if failure.cause in UNREACHABLE:
                    # Once per request, once it has ridden out its retry.connect_wait: a
                    # restart shorter than that is ridden out by every request in flight.
                    self.state.request_found_unreachable()
                failure = self.state.health.explain(failure)
                retry_after = self.state.circuit.retry_after() or None
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
            backoff_began = time.monotonic()
            opened = await self.state.circuit.opens_within(decision.delay)
            spent.backing_off += time.monotonic() - backoff_began
            if opened:
                return self._refused_by_circuit(attempt, facts)

    def _connect_wait(self) -> float:
        """How long one request rides out refused connects: longer while the model boots."""
        boot = self.state.health.boot_in_progress
        return self.settings.boot_wait if boot else self.settings.connect_wait

    def _refused_by_circuit(self, attempts: int, facts: AttemptFacts) -> Forwarded:
        """The circuit opened while this request was trying: it fails fast, as new ones do."""
        self.metrics.shed.labels(ShedReason.CIRCUIT_OPEN).inc()
        failure = Failure(Cause.CIRCUIT_OPEN, f"the circuit opened: {self.state.why_open()}")
        return Forwarded(
            attempts,
            facts,
            failure=self.state.health.explain(failure),
            retry_after=self.state.circuit.retry_after(),
        )

    def _decide(
        self,
        outbound: Outbound,
        failure: Failure,
        facts: AttemptFacts,
        state: RetryState,
        budget: Budget,
        attempt: int,
        connects_until: float | None,
    ) -> Decision:
        wait_left = None if connects_until is None else connects_until - time.monotonic()
        decision = decide(
            failure,
            state,
            scheme_adopted=self.probe.speaking != facts.scheme,
            replay_after_reset=outbound.method in self.settings.replay_after_reset,
            body_replayable=outbound.body is None or outbound.body.replayable,
            remaining=budget.remaining(),
            wait_left=wait_left,
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
        self.metrics.record_failed_attempt(failure)
        self.state.attempt_failed(failure)
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
        body = outbound.body.for_attempt() if outbound.body is not None else None
        deadline = self.deadlines.scope(budget.remaining())
        response: UpstreamResponse | None = None
        try:
            async with deadline:
                response = await self.upstream.send(
                    outbound.method,
                    outbound.raw_path,
                    (outbound.fields, budget.remaining_line()),
                    body,
                    facts,
                    scheme=facts.scheme,
                    fresh=fresh,
                    has_host=outbound.has_host,
                    on_interim=outbound.on_interim,
                )
                if (fault := _unrelayable(response, outbound.method)) is not None:
                    response.close()
                    # Its head was parsed: no sign of a TLS server, nothing to probe for.
                    cause, detail = fault
                    failure = Failure(
                        cause, detail, facts.reused, request_sent=True, response_started=True
                    )
                    return None, failure
                # A small answer of known length is read whole before the client sees a
                # status, as nginx's proxy buffering does: a model that dies in the middle of
                # it is then a clean 503 (and replayable when opted in), not a cut 200.
                length = response.content_length
                small = (
                    outbound.whole_answer_in_budget
                    and length is not None
                    and length <= BUFFERED_ANSWER_MAX
                )
                complete = await response.read() if small and outbound.method != "HEAD" else None
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
            failure = classify(exc, facts, deadline_passed=deadline.expired())
            if response is not None:
                response.close()
                failure = cut_short(failure, response)
            return None, failure
        finally:
            elapsed = time.monotonic() - started
            self.metrics.attempt_duration.observe(elapsed)
            if facts.reused is None:  # no connection was obtained: all of it was connecting
                spent.connecting += elapsed
            else:
                spent.connecting += facts.connect_seconds
                spent.waiting_for_model += elapsed - facts.connect_seconds
        return ModelResponse(response, complete), None


def _unrelayable(response: UpstreamResponse, method: str) -> tuple[Cause, str] | None:
    """Why an answer cannot be relayed as the model sent it, or None. Checked on every answer:
    one search over the head's raw bytes, and a lookup.

    - A control byte no header may carry (RFC 9110 §5.5): a framing fault of the model's,
      answered as one, not as servegate's own error when the head is written.
    - A status code below 100 (`099`, `000`): no HTTP status (RFC 9110 §15), and aiohttp
      reads it as a number, which would be relayed as `99`, a status line no client reads.
      600-999 are no HTTP status either, but are relayed: their three digits survive.
    - 101 Switching Protocols: this path sends no Upgrade field (it is hop-by-hop), and a server
      may switch only to a protocol the request offered (RFC 9110 §15.2.2).
    - A transfer coding other than chunked, on an answer with a body: servegate decodes no other
      (RFC 9112 §6.1) and offered none (it sends no TE field); taking it off would hand the
      client coded bytes as plain. On an answer to HEAD, a 204 or a 304 it frames nothing."""
    head = b"".join(map(b"".join, response.raw_headers))
    reason = (response.reason or "").encode("utf-8", "surrogateescape")
    if has_control_byte(head) or has_control_byte(reason):
        return Cause.MALFORMED_RESPONSE, "a header or the reason phrase holds a control character"
    if response.status < 100:
        return Cause.MALFORMED_RESPONSE, (
            f"status code {response.status:03d}: no HTTP status (RFC 9110 §15 defines 100-599)"
        )
    if response.status == 101:
        return Cause.MALFORMED_RESPONSE, (
            "a 101 (Switching Protocols) answer to a request that offered no upgrade"
        )
    codings = response.headers.getall(hdrs.TRANSFER_ENCODING, None)
    bodiless = method == "HEAD" or response.status in (204, 304)
    if codings and not bodiless and not only_chunked(codings):
        return Cause.RESPONSE_FRAMING, (
            f"Transfer-Encoding {', '.join(codings)[:200]!r}: a transfer coding other than "
            "chunked, which servegate does not decode and did not offer"
        )
    return None


def cut_short(failure: Failure, response: UpstreamResponse) -> Failure:
    """Name a body that ended before its Content-Length did (RFC 9112 §8: an incomplete
    message): the model closed the connection or died mid-answer, which the bytes alone cannot
    tell apart, so the cause stays the one `classify` gave."""
    declared = response.content_length
    received = response.content.total_bytes
    if failure.cause is not Cause.RESET_DURING_REQUEST or declared is None or received >= declared:
        return failure
    detail = f"{failure.detail} ({received} of the {declared} bytes its Content-Length declared)"
    return failure.as_(failure.cause, detail)
