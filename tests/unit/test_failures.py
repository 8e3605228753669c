"""The taxonomy: every cause is complete in every rendering; transport errors map precisely."""

from __future__ import annotations

import errno
import os
import socket
import ssl

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from proxy import answer
from proxy.failures import (
    UNREACHABLE,
    AttemptFacts,
    Category,
    Cause,
    Failure,
    classify,
    connect_failure,
)

KEY = ConnectionKey("127.0.0.1", 8000, False, True, None, None, None)


@pytest.mark.parametrize("cause", list(Cause))
def test_every_cause_has_a_category_a_status_and_a_hint(cause: Cause) -> None:
    failure = Failure(cause, "detail")
    assert failure.category in Category
    response = answer.failure_response(failure, "rid", answer.hint_for(failure, budget=39))
    expected = 504 if failure.category is Category.TIMEOUT else 503
    special = {
        Cause.OVERLOADED: 429,
        Cause.RESPONSE_HEADER_TOO_LARGE: 502,
        Cause.RESPONSE_FRAMING: 502,
    }
    assert response.status == special.get(cause, expected)
    assert response.headers["X-Servegate-Category"] == failure.category
    assert answer.hint_for(failure)


def test_every_category_has_causes() -> None:
    assert {cause.category for cause in Cause} == set(Category)


@pytest.mark.parametrize("exc", [aiohttp.ServerDisconnectedError(), ConnectionResetError()])
def test_a_reused_connection_its_peer_closed_before_any_of_the_request_came_is_stale(
    exc: Exception,
) -> None:
    facts = AttemptFacts(reused=True, request_sent=True, request_bytes_acked=0, peer_finished=True)
    failure = classify(exc, facts, deadline_passed=False)
    assert failure.cause is Cause.STALE_CONNECTION
    assert "acknowledged none" in failure.detail


@pytest.mark.parametrize("reused", [True, False])
def test_a_reset_alone_proves_nothing_however_little_was_acknowledged(reused: bool) -> None:
    # The peer may have read part of the request and reset before its delayed acknowledgement.
    facts = AttemptFacts(reused=reused, request_sent=True, request_bytes_acked=0)
    failure = classify(ConnectionResetError(), facts, deadline_passed=False)
    assert failure.cause is Cause.RESET_DURING_REQUEST
    assert "a reset does not tell whether it had read any of the request" in failure.detail


@pytest.mark.parametrize(
    ("acked", "peer_finished", "detail"),
    [
        (1, True, "the server closed the connection after its TCP acknowledged 1 byte of"),
        (378, False, "the server reset the connection after its TCP acknowledged 378 bytes of"),
    ],
)
def test_a_reused_connection_whose_peer_acknowledged_any_of_the_request_is_not_stale(
    acked: int, peer_finished: bool, detail: str
) -> None:
    facts = AttemptFacts(
        reused=True, request_sent=True, request_bytes_acked=acked, peer_finished=peer_finished
    )
    failure = classify(aiohttp.ServerDisconnectedError(), facts, deadline_passed=False)
    assert failure.cause is Cause.RESET_DURING_REQUEST
    assert failure.detail.startswith(detail)


def test_without_the_kernels_count_a_drop_after_the_request_left_is_never_stale() -> None:
    sent = AttemptFacts(reused=True, request_sent=True)
    drop = aiohttp.ServerDisconnectedError()
    assert classify(drop, sent, deadline_passed=False).cause is Cause.RESET_DURING_REQUEST
    unsent = AttemptFacts(reused=True, request_sent=False)
    assert classify(drop, unsent, deadline_passed=False).cause is Cause.STALE_CONNECTION


def test_a_fresh_connection_closed_with_none_of_the_request_acknowledged_is_stale() -> None:
    facts = AttemptFacts(reused=False, request_sent=True, request_bytes_acked=0, peer_finished=True)
    failure = classify(aiohttp.ServerDisconnectedError(), facts, deadline_passed=False)
    assert failure.cause is Cause.STALE_CONNECTION
    assert "new connection" in failure.detail
    assert not failure.protocol_suspect


def test_a_fresh_connection_dropped_after_sending_may_have_reached_the_model() -> None:
    facts = AttemptFacts(reused=False, request_sent=True)
    failure = classify(aiohttp.ServerDisconnectedError(), facts, deadline_passed=False)
    assert failure.cause is Cause.RESET_DURING_REQUEST
    assert failure.protocol_suspect


def test_a_reset_on_a_reused_connection_after_the_response_began_is_not_stale() -> None:
    facts = AttemptFacts(reused=True, request_sent=True, response_started=True)
    failure = classify(aiohttp.ClientPayloadError("cut"), facts, deadline_passed=False)
    assert failure.cause is Cause.RESET_DURING_REQUEST


def test_refused_and_timed_out_connects_never_reached_the_model() -> None:
    refused = aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "Connection refused"))
    failure = classify(refused, AttemptFacts(), deadline_passed=False)
    assert failure.cause is Cause.CONNECT_REFUSED
    timed_out = aiohttp.ConnectionTimeoutError("slow")
    assert classify(timed_out, AttemptFacts(), deadline_passed=False).cause is (
        Cause.CONNECT_TIMEOUT
    )


def test_a_host_name_that_does_not_resolve_is_its_own_cause_not_a_refusal() -> None:
    """What getaddrinfo raises, as aiohttp passes it on (ClientConnectorDNSError.os_error) and
    asyncio's own connect raises it."""
    unknown = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    cause, detail = connect_failure(unknown)
    assert cause is Cause.NAME_NOT_RESOLVED
    assert detail == "the host name did not resolve: Name or service not known"
    wrapped = aiohttp.ClientConnectorDNSError(KEY, unknown)
    assert classify(wrapped, AttemptFacts(), deadline_passed=False).detail == detail


def test_the_budget_running_out_is_a_timeout_before_and_during_the_stream() -> None:
    sent = AttemptFacts(reused=False, request_sent=True)
    before = classify(TimeoutError(), sent, deadline_passed=True)
    assert before.cause is Cause.DEADLINE_EXCEEDED
    during = AttemptFacts(reused=True, request_sent=True, response_started=True)
    assert classify(TimeoutError(), during, deadline_passed=True).cause is (
        Cause.DEADLINE_DURING_STREAM
    )


def test_a_budget_spent_connecting_is_the_connect_not_the_prediction() -> None:
    """A TLS handshake the server never answers, within the whole budget: the model never got
    the request, so "make the prediction faster" would be the wrong fix."""
    connecting = AttemptFacts()  # no connection obtained
    failure = classify(TimeoutError(), connecting, deadline_passed=True)
    assert failure.cause is Cause.CONNECT_TIMEOUT
    assert failure.category is Category.SERVICE


def test_tls_errors_name_plain_servers_and_certificates() -> None:
    wrong_version = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    plain = aiohttp.ClientConnectorSSLError(KEY, wrong_version)
    assert classify(plain, AttemptFacts(), deadline_passed=False).cause is (
        Cause.TLS_TO_PLAIN_SERVER
    )
    unverified = ssl.SSLCertVerificationError(1, "certificate verify failed")
    unverified.verify_message = "self-signed certificate"
    certificate = aiohttp.ClientConnectorCertificateError(KEY, unverified)
    failure = classify(certificate, AttemptFacts(), deadline_passed=False)
    assert failure.cause is Cause.TLS_CERTIFICATE
    assert failure.detail == "self-signed certificate"


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.EADDRNOTAVAIL])
def test_servegate_out_of_descriptors_is_never_the_model_refusing(code: int) -> None:
    """Counted as a refusal, it declared the model restarted and opened the circuit."""
    cause, detail = connect_failure(OSError(code, os.strerror(code)))
    assert cause is Cause.OVERLOADED
    assert "ulimit -n" in detail
    assert cause not in UNREACHABLE
    hint = answer.hint_for(Failure(cause, detail))
    assert "servegate itself ran out" in hint
    assert "model server is busy" not in hint
    shed = answer.failure_response(Failure(cause, detail), "rid", hint)
    assert (shed.status, shed.headers["Retry-After"]) == (429, "1")
