"""Properties of the failure taxonomy and the retry policy over generated failures: every
symptom gets exactly one category and cause, and no decision replays a request whose bytes
may have reached the model unless the operator opted in."""

from __future__ import annotations

import random
import ssl
from typing import Any

import aiohttp
from aiohttp.client_reqrep import ConnectionKey
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import failures
from proxy.config import RetrySettings
from proxy.failures import UNREACHABLE, AttemptFacts, Category, Cause, Failure, classify
from proxy.retry import RetryState, decide

KEY = ConnectionKey("127.0.0.1", 8000, False, True, None, None, None)
REQUEST = aiohttp.RequestInfo(URL("http://m/p"), "POST", CIMultiDictProxy(CIMultiDict()))
# Failures that provably happened before the model's application could read the request:
# no connection (refused, timed out, no address), a pooled connection the server had closed
# (stale), or a server that could not read a byte of it (the other scheme).
NEVER_REACHED = frozenset(
    {
        Cause.STALE_CONNECTION,
        Cause.CONNECT_REFUSED,
        Cause.CONNECT_TIMEOUT,
        Cause.NAME_NOT_RESOLVED,
        Cause.TLS_TO_PLAIN_SERVER,
        Cause.PLAIN_TO_TLS_SERVER,
    }
)


def test_every_cause_belongs_to_exactly_one_category() -> None:
    assert set(failures._CATEGORY_OF) == set(Cause)
    for cause in Cause:
        assert [c for c in Category if cause.category is c] == [failures._CATEGORY_OF[cause]]


SYMPTOMS = st.sampled_from(
    [
        lambda: aiohttp.ServerDisconnectedError(),
        lambda: aiohttp.ClientOSError(104, "Connection reset by peer"),
        lambda: ConnectionResetError(104, "reset"),
        lambda: aiohttp.ClientPayloadError("Response payload is not completed"),
        lambda: aiohttp.ClientResponseError(REQUEST, (), message="Bad status line"),
        lambda: aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "refused")),
        lambda: aiohttp.ConnectionTimeoutError("connect timed out"),
        lambda: aiohttp.ClientConnectorSSLError(KEY, ssl.SSLError(1, "[SSL] wrong version number")),
        lambda: aiohttp.ClientConnectorSSLError(KEY, ssl.SSLError(1, "[SSL] handshake failure")),
        lambda: TimeoutError(),
        lambda: RuntimeError("anything else"),
    ]
)
FACTS = st.builds(
    AttemptFacts,
    scheme=st.sampled_from(["http", "https"]),
    reused=st.none() | st.booleans(),
    request_sent=st.booleans(),
    request_bytes_acked=st.none() | st.integers(0, 1 << 20),
    peer_finished=st.booleans(),
    response_started=st.booleans(),
)


@given(SYMPTOMS, FACTS, st.booleans())
def test_every_symptom_maps_to_one_cause_and_its_category_the_same_way_every_time(
    symptom: Any, facts: AttemptFacts, deadline_passed: bool
) -> None:
    first = classify(symptom(), facts, deadline_passed=deadline_passed)
    again = classify(symptom(), facts, deadline_passed=deadline_passed)
    assert first == again
    assert first.category is first.cause.category
    assert (first.reused, first.request_sent) == (facts.reused, facts.request_sent)
    if deadline_passed:  # the model's time, unless no connection ever opened
        expected = Category.SERVICE if facts.reused is None else Category.TIMEOUT
        assert first.category is expected
    if first.cause is Cause.STALE_CONNECTION:  # only with proof that nothing was read
        assert not facts.response_started
        if facts.request_bytes_acked is None:
            assert facts.reused
            assert not facts.request_sent
        else:  # and a request that went out needs the peer's FIN: a reset proves nothing
            assert facts.request_bytes_acked == 0
            assert facts.peer_finished or not facts.request_sent


def retries(decision: object) -> bool:
    """Whether a decision says "try again", read from behaviour rather than the type's shape:
    a `retry` flag if it has one, else the name of its type (distinct Retry/GiveUp types)."""
    flag = getattr(decision, "retry", None)
    if isinstance(flag, bool):
        return flag
    return type(decision).__name__.lower().startswith("retry")


FAILURES = st.builds(
    Failure,
    cause=st.sampled_from(list(Cause)),
    detail=st.just("generated"),
    reused=st.none() | st.booleans(),
    request_sent=st.booleans(),
    response_started=st.booleans(),
)
STATES = st.builds(
    RetryState,
    stale_retries=st.integers(0, 3),
    connect_retries=st.integers(0, 50),
    scheme_retries=st.integers(0, 3),
    reset_retries=st.integers(0, 3),
)


@given(
    FAILURES,
    STATES,
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.floats(0, 60),
    st.integers(),
)
def test_no_decision_replays_what_may_have_reached_the_model_without_the_opt_in(
    failure: Failure,
    state: RetryState,
    scheme_adopted: bool,
    opted_in: bool,
    body_replayable: bool,
    remaining: float,
    seed: int,
) -> None:
    decision = decide(
        failure,
        state,
        scheme_adopted=scheme_adopted,
        replay_after_reset=opted_in,
        body_replayable=body_replayable,
        remaining=remaining,
        settings=RetrySettings(),
        rng=random.Random(seed),
    )
    if not retries(decision):
        return
    if failure.cause not in NEVER_REACHED:
        # The one exception: the operator vouched that the method may run twice, and then
        # only once per request, counting a stale retry (a crash can look like one).
        assert failure.cause is Cause.RESET_DURING_REQUEST
        assert opted_in
        assert state.reset_retries + state.stale_retries == 0
    if failure.cause not in UNREACHABLE:
        assert body_replayable  # a body that already streamed cannot be sent again
    assert getattr(decision, "delay", 0.0) <= remaining  # a retry never outlives the budget
