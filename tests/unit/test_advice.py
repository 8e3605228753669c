"""Each cause's advice is written once: the error answer, `servegate doctor` and the scheme probe
all say the same fix for it."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from proxy import advice, answer
from proxy.doctor.verdicts import Check, Verdict
from proxy.failures import Cause, Failure
from proxy.metrics import Metrics
from proxy.probe import SchemeProbe
from proxy.retry import GiveUpReason
from tests.conftest import make_settings


@pytest.mark.parametrize("cause", list(Cause))
def test_every_cause_has_one_fix_that_the_answer_and_the_doctor_both_give(cause: Cause) -> None:
    fix = advice.FIX[cause]
    assert fix.endswith(".")
    assert advice.WHAT[cause].endswith(".")
    hint = answer.hint_for(Failure(cause, "detail"))
    assert hint.startswith(advice.WHAT[cause])
    assert fix in hint
    check = Check(cause.category, Verdict.FAIL, {}, ("What the doctor measured.",), cause)
    assert check.advice == ("What the doctor measured.", fix)


@pytest.mark.parametrize(
    ("url", "detected", "cause"),
    [
        ("http://127.0.0.1:8000", "https", Cause.PLAIN_TO_TLS_SERVER),
        ("https://127.0.0.1:8000", "http", Cause.TLS_TO_PLAIN_SERVER),
    ],
)
def test_the_probes_mismatch_sentence_gives_the_same_fix(
    url: str, detected: str, cause: Cause
) -> None:
    settings = make_settings(**{"upstream.url": url})
    probe = SchemeProbe(settings.upstream, Metrics(CollectorRegistry(), 40.0))
    probe.detected = detected
    mismatch = probe.mismatch()
    assert mismatch is not None
    assert mismatch.endswith(advice.FIX[cause])
    assert advice.FIX[cause] in answer.hint_for(Failure(cause, "detail"))


def test_the_doctor_does_not_repeat_a_fix_it_already_gave() -> None:
    fix = advice.FIX[Cause.TLS_CERTIFICATE]
    check = Check(Cause.TLS_CERTIFICATE.category, Verdict.FAIL, {}, (fix,), Cause.TLS_CERTIFICATE)
    assert check.advice == (fix,)


def test_a_new_connection_closed_unread_gets_no_keep_alive_advice() -> None:
    pooled = answer.hint_for(Failure(Cause.STALE_CONNECTION, "d", reused=True))
    new = answer.hint_for(Failure(Cause.STALE_CONNECTION, "d", reused=False))
    assert "keep-alive" in pooled
    assert "keep-alive" not in new
    assert "never reached the application" in new


def test_the_hint_says_how_often_the_request_may_have_reached_the_model() -> None:
    reset = Failure(Cause.RESET_DURING_REQUEST, "d", reused=False, request_sent=True)
    after_unread = answer.hint_for(reset, GiveUpReason.NOT_RETRYABLE, attempts=3)
    assert "earlier ones provably never reached the model" in after_unread
    assert "kills the workers" not in after_unread
    guarded = answer.hint_for(reset, GiveUpReason.ATTEMPTS_EXHAUSTED, attempts=2)
    assert "sent 2 times" in guarded


def test_an_expired_certificate_is_told_to_be_renewed_not_trusted_otherwise() -> None:
    expired = answer.hint_for(Failure(Cause.TLS_CERTIFICATE, "certificate has expired"))
    assert "Renew" in expired
    assert "Set upstream.tls.ca_file" not in expired
    mismatch = answer.hint_for(Failure(Cause.TLS_CERTIFICATE, "Hostname mismatch, 'x'."))
    assert "upstream.tls.server_name" in mismatch
    assert ".." not in mismatch
