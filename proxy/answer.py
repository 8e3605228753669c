"""Failure -> the JSON answer the client gets: status, headers, and a body that says what to do.

The body keeps the platform's ModelArts error shape so existing clients still parse it, and
adds `category`, `cause` and a `hint`. Nothing of the model server's internals goes into it.
"""

from __future__ import annotations

import json

from aiohttp import hdrs, web

from proxy import advice
from proxy.budget import Spent
from proxy.failures import (
    HTTP2_ANSWER,
    OWN_SHORTAGE,
    OWN_SHORTAGE_RETRY_AFTER,
    Category,
    Cause,
    Failure,
)
from proxy.retry import GiveUpReason

ERROR_CODE = "ModelArts.4503"
CATEGORY_HEADER = "X-Servegate-Category"

# The platform's wording for each category, so a client matching on it keeps working.
_ERROR_MSG = {
    Category.COMMUNICATION: "Failed to find backend service because the connection was closed.",
    Category.PROTOCOL: "Failed to find backend service because of a protocol error.",
    Category.TIMEOUT: "Failed to find backend service because response timed out.",
    Category.SERVICE: "Failed to find backend service because it is unavailable.",
}

# Shed requests are the client's to slow down: 429, as rate limiters answer. An answer from
# the model that cannot be passed on is a bad gateway (RFC 9110 §15.6.3), as nginx answers.
_STATUS = {
    Cause.OVERLOADED: 429,
    Cause.RESPONSE_HEADER_TOO_LARGE: 502,
    Cause.RESPONSE_FRAMING: 502,
}

# The client must know whether the model may have run its request, and how often.
_ONCE = (
    " The request was sent once and not replayed: the model may have acted on it "
    "(retry.replay_after_reset opts a method in when its inference is safe to run twice)."
)
_AGAIN = (
    " The request was sent {attempts} times and servegate stops there: a request that was "
    "on two failed connections may be what kills the workers."
)
# OpenSSL's reason for a certificate past its validity.
_OUT_OF_DATE = "certificate has expired"
# Earlier attempts were retried because they provably never reached the model.
_ONCE_AFTER_UNREAD = (
    " Of its {attempts} attempts, the earlier ones provably never reached the model; the last "
    "may have, and was not replayed: the model may have acted on it "
    "(retry.replay_after_reset opts a method in when its inference is safe to run twice)."
)

_NOT_REPLAYED = (
    " The request body was not kept for a replay (larger than retry.replay_buffer_bytes, or "
    "retry.replay_buffer_total_bytes was taken by other bodies) and had already been "
    "streamed, so it could not be replayed on a fresh connection."
)


def hint_for(
    failure: Failure,
    give_up: GiveUpReason | None = None,
    *,
    attempts: int = 1,
    budget: float = 0.0,
    spent: Spent | None = None,
) -> str:
    hint = advice.hint(failure.cause)
    if failure.cause is Cause.STALE_CONNECTION and failure.reused is False:
        hint = advice.NEW_CONNECTION_UNREAD
    if failure.cause is Cause.MALFORMED_RESPONSE and failure.detail.startswith(HTTP2_ANSWER):
        hint = advice.HTTP2_ANSWER
    if failure.cause in (Cause.RESET_DURING_REQUEST, Cause.CRASH_LOOP) and failure.request_sent:
        # Whether the model may have run it, and how often; a request that never left
        # servegate (refused by the circuit, or by every connect) gets no such sentence.
        if attempts <= 1:
            hint += _ONCE
        elif give_up is GiveUpReason.ATTEMPTS_EXHAUSTED:  # the replay guard stopped it
            hint += _AGAIN.format(attempts=attempts)
        else:
            hint += _ONCE_AFTER_UNREAD.format(attempts=attempts)
    if failure.cause is Cause.OVERLOADED and failure.detail.startswith(OWN_SHORTAGE):
        hint = advice.OWN_SHORTAGE
    if failure.cause is Cause.TLS_CERTIFICATE and _OUT_OF_DATE in failure.detail.lower():
        hint = advice.CERTIFICATE_OUT_OF_DATE  # no CA or name setting fixes a date
    if failure.cause in (Cause.TLS_CERTIFICATE, Cause.TLS_HANDSHAKE, Cause.CIRCUIT_OPEN):
        # For an open circuit, what opened it: a refused port, a name that does not resolve
        # and a full accept queue each need their own fix.
        hint = f"{hint} Reason: {failure.detail.rstrip('.')}."
    if failure.category is Category.TIMEOUT:
        hint = f"{hint} Budget: {budget:.1f} s"
        hint += f" ({spent.describe()})." if spent is not None else "."
    if give_up is GiveUpReason.NOT_REPLAYABLE:
        hint += _NOT_REPLAYED
    return hint


def failure_response(
    failure: Failure, request_id: str, hint: str, retry_after: float | None = None
) -> web.Response:
    status = _STATUS.get(failure.cause, 504 if failure.category is Category.TIMEOUT else 503)
    headers = {CATEGORY_HEADER: failure.category.value, "X-Request-Id": request_id}
    if retry_after is None and failure.cause is Cause.OVERLOADED:
        # Every shed answer says when to come back (DESIGN §2); admission passes its own
        # setting, servegate's own shortage has no time of its own.
        retry_after = OWN_SHORTAGE_RETRY_AFTER
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    body = {
        "error_code": ERROR_CODE,
        "error_msg": _ERROR_MSG[failure.category],
        "category": failure.category.value,
        "cause": failure.cause.value,
        "request_id": request_id,
        "hint": hint,
    }
    return _json(status, body, headers)


def bad_request(message: str, request_id: str, status: int = 400) -> web.Response:
    """A request servegate answers itself, before the model is asked (not a 4503): a client's
    mistake, one too slow to send, or one servegate cannot carry (a 501)."""
    body = {"error_code": "servegate.bad_request", "error_msg": message, "request_id": request_id}
    return _json(status, body, {"X-Request-Id": request_id})


def header_timeout(seconds: float, request_id: str) -> web.Response:
    """A request whose headers did not all arrive within server.header_timeout: 408 (RFC 9110
    §15.5.9), as nginx answers a client_header_timeout."""
    body = {
        "error_code": "servegate.header_timeout",
        "error_msg": f"the request's headers did not arrive within {seconds:g} s "
        "(server.header_timeout)",
        "request_id": request_id,
    }
    return _json(408, body, {"X-Request-Id": request_id})


def on_socket(response: web.Response) -> bytes:
    """One of servegate's own answers as the bytes to write on a socket aiohttp does not
    serve: the listener's, before aiohttp has a connection or instead of giving it one, and
    the header timer's, on a connection aiohttp will not answer. Its fields, its body's
    Content-Length, and `Connection: close`: the socket is closed after it."""
    assert isinstance(response.body, bytes)  # a JSON body built whole (_json)
    fields = "".join(
        f"{name}: {value}\r\n"
        for name, value in response.headers.items()
        if name.lower() not in ("content-length", "connection")
    )
    head = f"HTTP/1.1 {response.status} {response.reason}\r\n{fields}"
    head += f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n"
    return head.encode("latin-1") + response.body


def insufficient_storage(message: str, request_id: str) -> web.Response:
    """servegate could not store what the request needs (RFC 4918 §11.5): the model was never
    asked."""
    body = {
        "error_code": "servegate.insufficient_storage",
        "error_msg": message,
        "request_id": request_id,
    }
    return _json(507, body, {"X-Request-Id": request_id})


def internal_error(request_id: str) -> web.Response:
    body = {
        "error_code": "servegate.internal_error",
        "error_msg": "servegate failed to handle the request; its log has the details.",
        "request_id": request_id,
    }
    return _json(500, body, {"X-Request-Id": request_id})


class _Own(web.Response):
    """An answer of servegate's own, without the Server field aiohttp would add: it names
    aiohttp's and Python's versions, which scanners flag (nginx has server_tokens off), and
    servegate's other answers (the listener's 400, the header timeout's 408) send none.
    aiohttp_internals.check() makes sure aiohttp still calls this hook."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall(hdrs.SERVER, None)


def _json(status: int, body: dict[str, str], headers: dict[str, str]) -> web.Response:
    return _Own(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )
