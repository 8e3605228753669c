"""Three of the four checks of `servegate doctor`, one coroutine per 4503 category: the scheme
the server speaks, its health, and a sample request against the budget. The fourth, its idle
keep-alive timeout, is keepalive.py.

Each measures one thing on a raw connection (wire.py) and returns a frozen `Check`.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time

from proxy.advice import FIX, HTTP2_ANSWER
from proxy.doctor.verdicts import Check, Fact, Target, Verdict, worse
from proxy.doctor.wire import ProbeError, Response, close, connect, exchange
from proxy.failures import HTTP2_ANSWER as HTTP2_DETAIL
from proxy.failures import UNREACHABLE, Category, Cause, connect_failure
from proxy.probe import speaks_tls

# How long a verified handshake's connection waits for a TLS 1.3 server's alert (sent once
# it has read the client's certificate, or its absence): a loopback or LAN round trip or two.
POST_HANDSHAKE_WAIT = 0.5
PROBE_WAIT = 3.0  # the TLS probe: run mode allows 1 s; a one-off diagnosis can wait longer
GUNICORN_TIMEOUT = 30  # Gunicorn's default --timeout: a worker busy longer than this is killed


_MISMATCH = {
    Cause.PLAIN_TO_TLS_SERVER: (
        "The URL says http:// but the model server speaks HTTPS: every request would be dropped."
    ),
    Cause.TLS_TO_PLAIN_SERVER: (
        "The URL says https:// but the model server speaks plain HTTP: every TLS handshake "
        "would fail."
    ),
}


async def check_protocol(target: Target) -> Check:
    """Which scheme the server speaks, against the URL's; for TLS, whether it verifies; for
    plain, whether what it speaks is HTTP/1.1 at all."""
    found = await speaks_tls(target.host, target.port, PROBE_WAIT)
    if not found:  # it answered, not in TLS, or said nothing: is it plain HTTP?
        plain = await _plain_answer(target)
        if isinstance(plain, ProbeError) and plain.cause is Cause.MALFORMED_RESPONSE:
            return _not_http(target, plain.detail)
        if found is None and not isinstance(plain, Response):
            return await _protocol_inconclusive(target, plain)
    silent = found is None
    speaks = "https" if found else "http"
    facts: dict[str, Fact] = {"url_scheme": target.scheme, "server_speaks": speaks}
    verdict, cause, advice = Verdict.OK, None, [f"servegate and the server both speak {speaks}."]
    if silent:
        # Werkzeug, Waitress and Hypercorn wait for the end of an HTTP head and never answer a
        # TLS hello: silence there while plain HTTP gets an answer means plain HTTP.
        facts["tls_hello"] = f"no answer within {PROBE_WAIT:g} s"
        advice.append(
            f"It never answered a TLS hello (within {PROBE_WAIT:g} s) but answers plain HTTP, as "
            "a server that waits for an HTTP head does."
        )
    if speaks != target.scheme:
        cause = Cause.PLAIN_TO_TLS_SERVER if found else Cause.TLS_TO_PLAIN_SERVER
        facts["direction"] = cause.value
        advice = [_MISMATCH[cause]]
        adopted = target.auto_scheme and cause is Cause.PLAIN_TO_TLS_SERVER
        verdict = Verdict.WARN if adopted else Verdict.FAIL
        if adopted:
            advice.append("upstream.scheme is auto: servegate adopts https, so this is no 4503.")
    if found:
        verdict, cause = _judge_tls(
            target, await _handshake_problem(target), verdict, cause, facts, advice
        )
    return Check(Category.PROTOCOL, verdict, facts, tuple(advice), cause)


def _judge_tls(
    target: Target,
    problem: ProbeError | None,
    verdict: Verdict,
    cause: Cause | None,
    facts: dict[str, Fact],
    advice: list[str],
) -> tuple[Verdict, Cause | None]:
    """A TLS server: does a handshake made as servegate makes it succeed, and if not, is it
    the certificate (servegate's verification) or the handshake itself (versions, ciphers, a
    client certificate), which no verification setting changes?"""
    # servegate speaks TLS to it: by the URL, or adopting it (upstream.scheme: auto).
    spoken = target.scheme == "https" or target.auto_scheme
    if problem is not None and problem.cause is Cause.CONNECT_REFUSED:
        facts["handshake"] = f"not made: {problem.detail}"
        advice.append(
            f"The verified handshake could not be made ({problem.detail}): the server stopped "
            "taking connections between two probes. See service."
        )
        return worse(verdict, Verdict.WARN), cause
    if problem is not None and problem.cause is not Cause.TLS_CERTIFICATE:
        facts["handshake"] = f"fails: {problem.detail}"
        advice.append(f"A TLS handshake as servegate makes it fails: {problem.detail}.")
        if not spoken:
            return verdict, cause
        return Verdict.FAIL, Cause.TLS_HANDSHAKE
    certificate = problem.detail if problem is not None else None
    facts["certificate"] = certificate or "verified"
    if certificate and target.tls.verify:
        advice.append(f"Verified as servegate verifies, the certificate fails: {certificate}.")
        advice.append(FIX[Cause.TLS_CERTIFICATE])
        if spoken:
            return Verdict.FAIL, Cause.TLS_CERTIFICATE
    elif not target.tls.verify:
        facts["certificate"] = "not verified (upstream.tls.verify: false)" + (
            f"; verified, it would fail: {certificate}" if certificate else ""
        )
        advice.append("upstream.tls.verify is false: anyone on the path can pose as the model.")
        return worse(verdict, Verdict.WARN), cause
    return verdict, cause


async def _plain_answer(target: Target) -> Response | ProbeError | None:
    """A plain HTTP request's answer within PROBE_WAIT; the error that ended it; None if none
    came in time."""
    try:
        async with asyncio.timeout(PROBE_WAIT):
            stream = await connect(target, tls=False)
            try:
                return await exchange(stream, target, "GET", target.probe_path)
            finally:
                await close(stream)
    except ProbeError as exc:
        return exc
    except TimeoutError:
        return None


def _not_http(target: Target, detail: str) -> Check:
    """The port answers, in a protocol other than HTTP/1.1: every request would fail so."""
    facts: dict[str, Fact] = {
        "url_scheme": target.scheme,
        "server_speaks": "not HTTP/1.1",
        "answer": detail,
    }
    if detail.startswith(HTTP2_DETAIL):
        notes: tuple[str, ...] = (HTTP2_ANSWER,)
    else:
        notes = (
            f"{target.address} answers, but not in HTTP/1.1 (see answer): the port of another "
            "service, or of something in front of the model server that is not HTTP.",
        )
    return Check(Category.PROTOCOL, Verdict.FAIL, facts, notes, Cause.MALFORMED_RESPONSE)


async def _protocol_inconclusive(target: Target, plain: ProbeError | None) -> Check:
    facts: dict[str, Fact] = {"url_scheme": target.scheme, "server_speaks": None}
    if plain is None:  # was it the connection that did not open?
        try:
            await close(await connect(target, tls=False))
        except ProbeError as exc:
            plain = exc
    if plain is not None and plain.cause in UNREACHABLE:
        advice = f"No connection to {target.address} ({plain.detail}): see service."
        return Check(Category.PROTOCOL, Verdict.SKIPPED, facts, (advice,))
    if plain is not None:
        facts["plain_request"] = plain.detail
        advice = (
            "The server takes connections and ends them without a word, to a TLS hello and to a "
            "plain HTTP request alike: servegate cannot tell which scheme it speaks. A port "
            "forwarder with nothing listening behind it does this (docker-proxy, a Service "
            "without ready endpoints), and so do workers that die at once: see service."
        )
    else:
        advice = (
            f"The server took the connection but answered neither a TLS handshake nor a plain "
            f"HTTP request within {PROBE_WAIT:g} s: servegate cannot tell which scheme it "
            "speaks. A busy server does this, and so does a port of another protocol that "
            "waits for its client to speak."
        )
    return Check(Category.PROTOCOL, Verdict.WARN, facts, (advice,))


async def _handshake_problem(target: Target) -> ProbeError | None:
    """Why a handshake made as servegate makes it (verifying as it does) fails; None when it
    succeeds. A TLS 1.3 server refuses a client certificate, or its absence, after the
    handshake: its alert is waited for a moment."""
    try:
        stream = await connect(target, tls=True, verify=True)
    except ProbeError as exc:
        return exc
    try:
        async with asyncio.timeout(POST_HANDSHAKE_WAIT):
            await stream[0].read(1)
    except ssl.SSLError as exc:
        return ProbeError(*connect_failure(exc))
    except (OSError, TimeoutError):
        pass  # no alert: what else the server does with an idle connection is not the question
    finally:
        await close(stream)
    return None


async def check_service(target: Target, tls: bool) -> Check:
    """Does the server take connections, and does its health path answer 2xx, quickly?"""
    path = target.probe_path
    facts: dict[str, Fact] = {"address": target.address, "path": path}
    try:
        stream = await connect(target, tls)
    except ProbeError as exc:
        facts["error"] = exc.detail
        if exc.cause in UNREACHABLE:
            note = f"No connection to {target.address}: {exc.detail}."
        else:
            note = "The connection failed in its TLS handshake: see protocol."
        return Check(Category.SERVICE, Verdict.FAIL, facts, (note,), exc.cause)
    try:
        async with asyncio.timeout(target.budget):
            response = await exchange(stream, target, "GET", path)
    except ProbeError as exc:
        facts["error"] = exc.detail
        if exc.cause is Cause.MALFORMED_RESPONSE:
            notes: tuple[str, ...] = (f"GET {path} got no HTTP/1.1 answer: see protocol.",)
        else:
            notes = (f"GET {path} failed: {exc.detail}.",)
        return Check(Category.SERVICE, Verdict.FAIL, facts, notes, exc.cause)
    except TimeoutError:
        facts["error"] = NO_ANSWER
        return Check(Category.SERVICE, Verdict.FAIL, facts, _silence(target))
    finally:
        await close(stream)
    facts |= {"status": response.status, "latency_s": round(response.seconds, 3)}
    facts["server"] = response.headers.get("server")
    return _judge_health(target, response, facts)


# The service check's error when its GET got no answer within the budget.
NO_ANSWER = "no answer within the budget"


def _silence(target: Target) -> tuple[str, ...]:
    path, within = target.probe_path, f"the {target.budget:g} s budget"
    notes = [f"The server took the connection but did not answer GET {path} within {within}."]
    if target.health_path is not None:
        notes.append(
            f"servegate's health checks would time out (health.timeout, "
            f"{target.health_timeout:g} s), mark it down and answer 503 (service/circuit_open)."
        )
    notes.append(
        "A server whose every worker is busy or stuck does this (its log, and a thread dump of "
        "a worker, say where), and so does a port of another protocol that waits for its "
        "client to speak first: check that the URL names the model's HTTP port."
    )
    return tuple(notes)


def _judge_health(target: Target, response: Response, facts: dict[str, Fact]) -> Check:
    status, path = response.status, target.probe_path
    advice: list[str] = []
    if target.health_path is None:
        verdict = Verdict.WARN if status >= 500 else Verdict.OK
        advice.append(
            f"The server answers (GET / gave {status}). Give --health-path (and health.path) "
            "so the model's own health route is checked."
        )
    elif 200 <= status < 300:
        verdict = Verdict.OK
        advice.append(f"GET {path} answers {status}: healthy.")
    else:
        verdict = Verdict.FAIL
        advice.append(
            f"GET {path} answers {status}, not 2xx: servegate's health checks would mark the "
            "server down and answer 503 (service/circuit_open). Fix the model, or the path."
        )
    if response.seconds > target.health_timeout:
        # With a health path, servegate's checks time out as this one did: the server is
        # marked down, and every request is refused while the circuit is open.
        slow = Verdict.WARN if target.health_path is None else Verdict.FAIL
        verdict = worse(verdict, slow)
        advice.append(
            f"It took {response.seconds:.2f} s, more than health.timeout "
            f"({target.health_timeout:g} s): raise health.timeout, or make the path cheaper."
        )
    return Check(Category.SERVICE, verdict, facts, tuple(advice))


async def check_timeout(target: Target, tls: bool) -> Check:
    """The latency of a sample request (connecting included) against the budget."""
    sample = target.sample_body is not None
    method, path = ("POST", "/predict") if sample else ("GET", target.probe_path)
    facts: dict[str, Fact] = {"request": f"{method} {path}", "budget_s": target.budget}
    started = time.monotonic()
    try:
        async with asyncio.timeout(target.budget):
            stream = await connect(target, tls)
            try:
                response = await exchange(stream, target, method, path, target.sample_body)
            finally:
                await close(stream)
    except TimeoutError:
        facts["latency_s"] = None
        advice = f"No answer within the {target.budget:g} s budget: every such request is a 4503."
        return _timeout_check(target, Verdict.FAIL, facts, [advice], Cause.DEADLINE_EXCEEDED)
    except ProbeError as exc:
        latency = time.monotonic() - started
        facts |= {"latency_s": round(latency, 3), "error": exc.detail}
        advice = f"The sample request failed after {latency:.2f} s: {exc.detail}."
        return _timeout_check(target, Verdict.FAIL, facts, [advice], exc.cause)
    latency = time.monotonic() - started
    facts |= {"latency_s": round(latency, 3), "status": response.status}
    return _judge_latency(target, response, latency, facts)


def _judge_latency(
    target: Target, response: Response, latency: float, facts: dict[str, Fact]
) -> Check:
    advice = [f"The request took {latency:.2f} s of the {target.budget:g} s budget."]
    verdict = Verdict.OK
    if latency > target.budget / 2:
        verdict = Verdict.WARN
        advice.append(
            "That is more than half the budget: a larger input or a busy server would end in a "
            f"4503 (timeout). {FIX[Cause.DEADLINE_EXCEEDED]}"
        )
    if target.sample_body is None:
        advice.append("Give --sample-body (JSON for POST /predict) to time a real prediction.")
    elif 400 <= response.status < 500:
        verdict = worse(verdict, Verdict.WARN)
        advice.append(f"The sample got {response.status}: check --sample-body.")
    elif response.status >= 500:
        verdict = worse(verdict, Verdict.WARN)
        advice.append(
            f"The sample got {response.status}: the model server's log says why (a 500 after "
            "about --timeout seconds is Gunicorn's WORKER TIMEOUT)."
        )
    return _timeout_check(target, verdict, facts, advice, gunicorn=response.gunicorn)


def _timeout_check(
    target: Target,
    verdict: Verdict,
    facts: dict[str, Fact],
    advice: list[str],
    cause: Cause | None = None,
    *,
    gunicorn: bool = False,
) -> Check:
    """Gunicorn kills a worker busy past its --timeout, before the 40 s budget ends: say so."""
    if target.budget > GUNICORN_TIMEOUT:
        who = "The server is Gunicorn: its" if gunicorn else "If the server is Gunicorn, its"
        advice.append(
            f"{who} --timeout ({GUNICORN_TIMEOUT} s by default) kills a sync worker whose "
            "request runs longer (WORKER TIMEOUT in its log; the client gets a 500) before the "
            f"{target.budget:g} s budget ends: with slow predictions, raise it above the budget "
            f"(--timeout {math.ceil(target.budget) + 20})."
        )
    return Check(Category.TIMEOUT, verdict, facts, tuple(advice), cause)
