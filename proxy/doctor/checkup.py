"""The four checks of `servegate doctor`, one coroutine per 4503 category.

Each measures one thing on a raw connection (wire.py) and returns a frozen `Check`:
the scheme the server speaks, its health, a sample request against the budget, and its idle
keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import math
import time

from proxy.advice import FIX
from proxy.doctor.verdicts import Check, Fact, Target, Verdict, skipped, worse
from proxy.doctor.wire import ProbeError, Response, close, connect, exchange, wait_for_close
from proxy.failures import Category, Cause
from proxy.probe import speaks_tls
from proxy.upstream import expiry_for

PROBE_WAIT = 3.0  # the TLS probe: run mode allows 1 s; a one-off diagnosis can wait longer
CLOSED_AT_ONCE = 0.1  # an idle close this soon after the response is a close after every response
GUNICORN_TIMEOUT = 30  # Gunicorn's default --timeout: a worker busy longer than this is killed
KEEP_ALIVE_ADVICE = 200  # the platform's advice for custom images: gunicorn --keep-alive 200


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
    """Which scheme the server speaks, against the URL's; for TLS, whether it verifies."""
    found = await speaks_tls(target.host, target.port, PROBE_WAIT)
    if found is None:
        return await _protocol_inconclusive(target)
    speaks = "https" if found else "http"
    facts: dict[str, Fact] = {"url_scheme": target.scheme, "server_speaks": speaks}
    verdict, cause, advice = Verdict.OK, None, [f"servegate and the server both speak {speaks}."]
    if speaks != target.scheme:
        cause = Cause.PLAIN_TO_TLS_SERVER if found else Cause.TLS_TO_PLAIN_SERVER
        facts["direction"] = cause.value
        advice = [_MISMATCH[cause]]
        adopted = target.auto_scheme and cause is Cause.PLAIN_TO_TLS_SERVER
        verdict = Verdict.WARN if adopted else Verdict.FAIL
        if adopted:
            advice.append("upstream.scheme is auto: servegate adopts https, so this is no 4503.")
    if found:
        certificate = await _certificate_problem(target)
        facts["certificate"] = certificate or "verified"
        if certificate and target.tls.verify:
            advice.append(f"Verified as servegate verifies, the certificate fails: {certificate}.")
            advice.append(FIX[Cause.TLS_CERTIFICATE])
            if target.scheme == "https":
                verdict, cause = Verdict.FAIL, Cause.TLS_CERTIFICATE
        elif not target.tls.verify:
            facts["certificate"] = (
                f"not verified (upstream.tls.verify: false); {facts['certificate']}"
            )
            verdict = worse(verdict, Verdict.WARN)
            advice.append("upstream.tls.verify is false: anyone on the path can pose as the model.")
    return Check(Category.PROTOCOL, verdict, facts, tuple(advice), cause)


async def _protocol_inconclusive(target: Target) -> Check:
    facts: dict[str, Fact] = {"url_scheme": target.scheme, "server_speaks": None}
    try:
        await close(await connect(target, tls=False))
    except ProbeError as exc:
        advice = f"No connection to {target.address} ({exc.detail}): see service."
        return Check(Category.PROTOCOL, Verdict.SKIPPED, facts, (advice,))
    advice = (
        f"The server took the connection but answered a TLS handshake neither way within "
        f"{PROBE_WAIT:g} s: servegate cannot tell which scheme it speaks. A busy server does this."
    )
    return Check(Category.PROTOCOL, Verdict.WARN, facts, (advice,))


async def _certificate_problem(target: Target) -> str | None:
    """Why a handshake verified as servegate verifies fails; None when it succeeds."""
    try:
        await close(await connect(target, tls=True, verify=True))
    except ProbeError as exc:
        return exc.detail
    return None


async def check_service(target: Target, tls: bool) -> Check:
    """Does the server take connections, and does its health path answer 2xx, quickly?"""
    path = target.probe_path
    facts: dict[str, Fact] = {"address": target.address, "path": path}
    try:
        stream = await connect(target, tls)
    except ProbeError as exc:
        facts["error"] = exc.detail
        if exc.cause in (Cause.CONNECT_REFUSED, Cause.CONNECT_TIMEOUT):
            note = f"No connection to {target.address}: {exc.detail}."
        else:
            note = "The connection failed in its TLS handshake: see protocol."
        return Check(Category.SERVICE, Verdict.FAIL, facts, (note,), exc.cause)
    try:
        async with asyncio.timeout(target.budget):
            response = await exchange(stream, target, "GET", path)
    except (ProbeError, TimeoutError) as exc:
        cause = exc.cause if isinstance(exc, ProbeError) else None
        detail = exc.detail if isinstance(exc, ProbeError) else f"no answer in {target.budget:g} s"
        facts["error"] = detail
        notes = (f"GET {path} failed: {detail}.", FIX[Cause.RESET_DURING_REQUEST])
        return Check(Category.SERVICE, Verdict.FAIL, facts, notes, cause)
    finally:
        await close(stream)
    facts |= {"status": response.status, "latency_s": round(response.seconds, 3)}
    facts["server"] = response.headers.get("server")
    return _judge_health(target, response, facts)


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
        verdict = worse(verdict, Verdict.WARN)
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


async def check_communication(target: Target, tls: bool) -> Check:
    """The server's idle keep-alive timeout, measured: one request, then wait for its close."""
    try:
        stream = await connect(target, tls)
    except ProbeError as exc:
        return skipped(Category.COMMUNICATION, exc.detail)
    try:
        async with asyncio.timeout(target.budget):
            response = await exchange(stream, target, "GET", target.probe_path)
        idle, how = await wait_for_close(stream[0], target.max_idle_wait)
    except ProbeError as exc:
        return skipped(Category.COMMUNICATION, exc.detail)
    except TimeoutError:
        return skipped(Category.COMMUNICATION, f"no answer within {target.budget:g} s")
    finally:
        await close(stream)
    facts: dict[str, Fact] = {
        "request": f"GET {target.probe_path}",
        "keep_alive_header": response.headers.get("keep-alive"),
        "connection_close": response.closes,
        "idle_timeout_s": None if idle is None else round(idle, 3),
        "closed_by": how,
        "waited_up_to_s": target.max_idle_wait,
    }
    if response.closes or (idle is not None and idle < CLOSED_AT_ONCE):
        return _closes_after_every_response(response, facts)
    if idle is None:
        advice = (
            f"The server kept the idle connection open longer than {target.max_idle_wait:g} s "
            f"(--max-idle-wait): servegate's upstream.idle_expiry ({target.idle_expiry:g} s) "
            "closes pooled connections long before it does.",
        )
        return Check(Category.COMMUNICATION, Verdict.OK, facts, advice)
    return _judge_idle_timeout(target, response, idle, facts)


def _judge_idle_timeout(
    target: Target, response: Response, idle: float, facts: dict[str, Fact]
) -> Check:
    announced, setting = response.announced_idle, _likely_setting(idle)
    suggested = round(expiry_for(setting), 2)  # what run mode would do with an announced one
    expiry = target.idle_expiry if announced is None else expiry_for(announced)
    facts |= {"servegate_idle_expiry_s": expiry, "suggested_idle_expiry_s": suggested}
    verdict, cause = Verdict.OK, None
    advice = [
        f"The server closed the idle connection after {idle:.2f} s: set to {setting:g} s, likely."
    ]
    if response.gunicorn and idle - setting > 0.1:
        advice.append(
            "Gunicorn's gthread worker looks at idle connections about once a second, so it "
            "closes them up to 1 s after its --keep-alive."
        )
    if announced is not None and abs(announced - idle) > 1:
        advice.append(f"It announces Keep-Alive: timeout={announced:g} but closed at {idle:.2f} s.")
    if expiry > suggested:
        verdict, cause = Verdict.WARN, Cause.STALE_CONNECTION
        advice.append(
            f"servegate keeps idle connections {expiry:g} s, too close to that: a request sent on "
            "one races the server's close (communication/stale_connection; servegate retries it "
            "on a fresh connection unless its body exceeded retry.replay_buffer_bytes). Set "
            f"upstream.idle_expiry: {suggested:g}."
        )
    elif suggested == expiry:
        advice.append(f"servegate's idle expiry ({expiry:g} s) is below it, as it should be.")
    else:
        advice.append(
            f"servegate's idle expiry ({expiry:g} s) is below it; upstream.idle_expiry: "
            f"{suggested:g} follows from it (half below 2 s, one second less above) and saves "
            "reconnecting."
        )
    if idle < KEEP_ALIVE_ADVICE / 2:
        how = "Gunicorn: --keep-alive" if response.gunicorn else "e.g. Gunicorn --keep-alive"
        advice.append(
            f"Raise the server's idle timeout to save connection set-ups ({how} "
            f"{KEEP_ALIVE_ADVICE}, the platform's advice for custom images; Gunicorn's default "
            "is 2 s)."
        )
    return Check(Category.COMMUNICATION, verdict, facts, tuple(advice), cause)


def _likely_setting(idle: float) -> float:
    """The server's idle timeout setting: usually whole seconds (tenths below one), and at most
    what was measured, as a server that polls its idle connections closes them late."""
    step = 1.0 if idle >= 1 else 0.1
    return round(math.floor(idle / step + 0.05) * step, 1)  # + 0.05: a few ms early is noise


def _closes_after_every_response(response: Response, facts: dict[str, Fact]) -> Check:
    if response.closes:
        verdict, cause = Verdict.OK, None
        advice = [
            "The server closes the connection after every response (Connection: close): no idle "
            "connection can go stale, at the cost of a new connection per request."
        ]
    else:
        verdict, cause = Verdict.WARN, Cause.STALE_CONNECTION
        advice = [
            "The server closed the connection right after its response without announcing it "
            "(no Connection: close): a client that reuses it races that close "
            "(communication/stale_connection; servegate retries on a fresh connection)."
        ]
    who = "Gunicorn does this with" if response.gunicorn else "If it is Gunicorn, this is"
    advice.append(
        f"{who} its sync worker, which never keeps a connection alive: --worker-class gthread "
        f"(with --threads) or gevent, and --keep-alive {KEEP_ALIVE_ADVICE}, save a new connection "
        "per request."
    )
    return Check(Category.COMMUNICATION, verdict, facts, tuple(advice), cause)
