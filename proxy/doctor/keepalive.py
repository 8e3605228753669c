"""The communication check of `servegate doctor`: how long the server keeps an idle keep-alive
connection open, measured so that the verdict holds on a loaded host.

Two connections are measured, their idle periods starting `STAGGER` apart. A server with a
timer per connection (Uvicorn: `loop.call_later(timeout_keep_alive, ...)` in
protocols/http/h11_impl.py; Hypercorn: `_update_keep_alive_timeout` in asyncio/tcp_server.py)
closes both after the same idle time. A server that
closes idle connections in a periodic sweep (Waitress: `BaseWSGIServer.maintenance` every
`cleanup_interval`, 30 s by default, closes channels idle past `channel_timeout`; Gunicorn's
gthread worker: `murder_keepalived` after each poll of at most 1 s) closes them after different
idle times, anywhere from its setting up to one sweep later: it gets a range, not a number.
"""

from __future__ import annotations

import asyncio
import math

from proxy.doctor.verdicts import Check, Fact, Target, Verdict, skipped
from proxy.doctor.wire import ProbeError, Response, close, connect, exchange, wait_for_close
from proxy.failures import Category, Cause
from proxy.upstream import expiry_for

CLOSED_AT_ONCE = 0.1  # an idle close this soon after the response is a close after every response
KEEP_ALIVE_ADVICE = 200  # the platform's advice for custom images: gunicorn --keep-alive 200
# Apart so that one sweep cannot close both after the same idle time; short beside any timeout.
STAGGER = 0.4
# Two closes by one timer differ by the scheduling delays of a loaded host, seen twice (the last
# byte of the answer, then the close): measured up to about 0.1 s on a busy 2-core machine.
TIMER_TOLERANCE = 0.25


async def check_communication(target: Target, tls: bool) -> Check:
    """The server's idle keep-alive timeout, per connection or swept, and what it means for
    servegate's upstream.idle_expiry."""
    first = asyncio.create_task(_idle_close(target, tls))
    await asyncio.sleep(STAGGER)
    second = asyncio.create_task(_idle_close(target, tls))
    measured = await asyncio.gather(first, second, return_exceptions=True)
    if isinstance(measured[0], BaseException):
        error = measured[0]
        if isinstance(error, ProbeError):
            return skipped(Category.COMMUNICATION, error.detail)
        if isinstance(error, TimeoutError):
            return skipped(Category.COMMUNICATION, f"no answer within {target.budget:g} s")
        raise error
    response, idle, how = measured[0]
    # The second measurement only adds evidence: a server serving one connection at a time
    # may fail it, and the first stands alone then.
    other = None if isinstance(measured[1], BaseException) else measured[1][1]
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
    idles = sorted(i for i in (idle, other) if i is not None)
    return _judge_idle_timeout(target, response, idles, facts)


async def _idle_close(target: Target, tls: bool) -> tuple[Response, float | None, str]:
    """One request, then the idle connection held until the server closes it."""
    stream = await connect(target, tls)
    try:
        async with asyncio.timeout(target.budget):
            response = await exchange(stream, target, "GET", target.probe_path)
        idle, how = await wait_for_close(stream[0], response.received_at, target.max_idle_wait)
    finally:
        await close(stream)
    return response, idle, how


def _judge_idle_timeout(
    target: Target, response: Response, idles: list[float], facts: dict[str, Fact]
) -> Check:
    shortest, longest = idles[0], idles[-1]
    swept = longest - shortest > TIMER_TOLERANCE
    setting = settable(shortest, at_most=True) if swept else settable(sum(idles) / len(idles))
    announced = response.announced_idle
    suggested = round(expiry_for(setting), 2)  # what run mode would do with an announced one
    expiry = target.idle_expiry if announced is None else expiry_for(announced)
    facts |= {
        "idle_timeout_s": round(shortest, 3),
        "closes_idle": "in a periodic sweep" if swept else "per connection",
        "server_setting_s": setting,
        "servegate_idle_expiry_s": expiry,
        "suggested_idle_expiry_s": suggested,
    }
    if swept:
        facts["idle_timeout_longest_s"] = round(longest, 3)
        advice = [
            f"The server closes idle connections in a periodic sweep: two of them closed after "
            f"{shortest:.2f} s and {longest:.2f} s of idleness. Its setting is at most "
            f"{setting:g} s, and a connection may close any time from then until the next sweep."
        ]
    else:
        advice = [
            f"The server closes each idle connection after {shortest:.2f} s: set to "
            f"{setting:g} s, likely."
        ]
    if announced is not None and abs(announced - setting) >= 1:
        advice.append(
            f"It announces Keep-Alive: timeout={announced:g} but closed at {shortest:.2f} s."
        )
    verdict, cause = Verdict.OK, None
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
    if setting < KEEP_ALIVE_ADVICE / 2:
        how = "Gunicorn: --keep-alive" if response.gunicorn else "e.g. Gunicorn --keep-alive"
        advice.append(
            f"Raise the server's idle timeout to save connection set-ups ({how} "
            f"{KEEP_ALIVE_ADVICE}, the platform's advice for custom images; Gunicorn's default "
            "is 2 s)."
        )
    return Check(Category.COMMUNICATION, verdict, facts, tuple(advice), cause)


def settable(seconds: float, *, at_most: bool = False) -> float:
    """The idle timeout a server is likely set to, from one measured close: whole seconds (Gunicorn
    --keep-alive, Uvicorn --timeout-keep-alive, Waitress channel_timeout take integers), tenths
    below one second.

    A timer closes on time, and a loaded host's delays push the measurement either way: the
    nearest value. A sweep closes late, never early: `at_most` takes the value at or below the
    measurement (a tenth of a step of slack, for the last byte seen late)."""
    step = 1.0 if seconds >= 0.95 else 0.1
    steps = math.floor(seconds / step + 0.1) if at_most else round(seconds / step)
    return round(max(1, steps) * step, 1)


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
