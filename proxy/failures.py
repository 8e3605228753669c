"""The one failure taxonomy: every failed attempt becomes a `Failure(category, cause, ...)`.

`classify` is the only code that reads the exceptions of a request's attempt; retries, metrics,
logs and error bodies all read the `Cause` it returns; `connect_failure` and `exchange_failure`
translate the doctor's raw connections the same way. (The TLS probe and the health checks read
only what their own yes-or-no question needs.)
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import aiohttp


class Category(StrEnum):
    COMMUNICATION = "communication"
    PROTOCOL = "protocol"
    TIMEOUT = "timeout"
    SERVICE = "service"


class Cause(StrEnum):
    STALE_CONNECTION = "stale_connection"
    TLS_TO_PLAIN_SERVER = "tls_to_plain_server"
    PLAIN_TO_TLS_SERVER = "plain_to_tls_server"
    TLS_CERTIFICATE = "tls_certificate"
    TLS_HANDSHAKE = "tls_handshake"
    MALFORMED_RESPONSE = "malformed_response"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    DEADLINE_DURING_STREAM = "deadline_during_stream"
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    NAME_NOT_RESOLVED = "name_not_resolved"  # the upstream host name has no address
    RESET_DURING_REQUEST = "reset_during_request"
    CRASH_LOOP = "crash_loop"
    CIRCUIT_OPEN = "circuit_open"
    OVERLOADED = "overloaded"
    UPSTREAM_UNHEALTHY = "upstream_unhealthy"
    # Faults of an answer that is HTTP, but not HTTP servegate can pass on (issue 12).
    RESPONSE_HEADER_TOO_LARGE = "response_header_too_large"
    RESPONSE_FRAMING = "response_framing"

    @property
    def category(self) -> Category:
        return _CATEGORY_OF[self]


_CATEGORY_OF: dict[Cause, Category] = {
    Cause.STALE_CONNECTION: Category.COMMUNICATION,
    Cause.TLS_TO_PLAIN_SERVER: Category.PROTOCOL,
    Cause.PLAIN_TO_TLS_SERVER: Category.PROTOCOL,
    Cause.TLS_CERTIFICATE: Category.PROTOCOL,
    Cause.TLS_HANDSHAKE: Category.PROTOCOL,
    Cause.MALFORMED_RESPONSE: Category.PROTOCOL,
    Cause.DEADLINE_EXCEEDED: Category.TIMEOUT,
    Cause.DEADLINE_DURING_STREAM: Category.TIMEOUT,
    Cause.CONNECT_REFUSED: Category.SERVICE,
    Cause.CONNECT_TIMEOUT: Category.SERVICE,
    Cause.NAME_NOT_RESOLVED: Category.SERVICE,
    Cause.RESET_DURING_REQUEST: Category.SERVICE,
    Cause.CRASH_LOOP: Category.SERVICE,
    Cause.CIRCUIT_OPEN: Category.SERVICE,
    Cause.OVERLOADED: Category.SERVICE,
    Cause.UPSTREAM_UNHEALTHY: Category.SERVICE,
    Cause.RESPONSE_HEADER_TOO_LARGE: Category.PROTOCOL,
    Cause.RESPONSE_FRAMING: Category.PROTOCOL,
}

# Causes of an attempt that reached no server process at all: no connection opened.
UNREACHABLE = frozenset({Cause.CONNECT_REFUSED, Cause.CONNECT_TIMEOUT, Cause.NAME_NOT_RESOLVED})


@dataclass(slots=True)
class AttemptFacts:
    """What the transport reported about one attempt (filled by proxy/upstream.py)."""

    scheme: str = "http"  # what the attempt spoke: the answer to a mismatch depends on it
    reused: bool | None = None  # None: no connection was obtained
    request_sent: bool = False  # the request headers left servegate
    # Bytes of this request the peer's TCP acknowledged (proxy/acked.py); None where the
    # kernel does not tell.
    request_bytes_acked: int | None = None
    # The peer's FIN arrived on the connection: it closed its end in order (proxy/acked.py).
    peer_finished: bool = False
    response_started: bool = False  # the response's status line and headers arrived
    # What came of an answer before the connection failed, when not its whole head: "part of
    # an answer's head", "an interim 103 answer"; "" when nothing came.
    answer_fragment: str = ""
    connect_seconds: float = 0.0  # time spent opening a new connection (0 when reused)


@dataclass(frozen=True, slots=True)
class Failure:
    cause: Cause
    detail: str
    reused: bool | None = None
    request_sent: bool = False
    response_started: bool = False
    # Some bytes of an answer arrived: its head, a part of it, or an interim 1xx answer. The
    # server was up and speaking HTTP, whatever became of the connection after.
    answer_began: bool = False

    def __post_init__(self) -> None:
        if self.response_started and not self.answer_began:
            object.__setattr__(self, "answer_began", True)

    @property
    def category(self) -> Category:
        return self.cause.category

    @property
    def protocol_suspect(self) -> bool:
        """A fresh plain connection dropped or answered with garbage: a TLS server looks so.
        One dropped after the beginning of an HTTP answer is not: the server spoke HTTP."""
        if self.reused is not False or self.response_started:
            return False
        if self.cause is Cause.MALFORMED_RESPONSE:
            return True
        return self.cause is Cause.RESET_DURING_REQUEST and not self.answer_began

    def as_(self, cause: Cause, detail: str) -> Failure:
        return Failure(
            cause, detail, self.reused, self.request_sent, self.response_started, self.answer_began
        )


class AnswersPlainHTTP(aiohttp.ClientConnectionError):
    """The TLS handshake got no answer within the connect timeout, and the server answers a
    plain HTTP request line (`probe.plain_behind_tls`): servegate speaks TLS to a plain server
    that waits silently for a request line (Werkzeug, Waitress, Hypercorn do)."""


class BodyFramingBroken(aiohttp.ClientPayloadError):
    """An answer's body broke its own framing (an invalid chunk) after its head was read: the
    reader of the body hears this, not a hang until the budget ends."""


class TrailerTooLarge(BodyFramingBroken):
    """A chunked answer's trailer section passed the head limits every answer is held to
    (upstream.max_response_header_bytes, upstream.max_response_headers). Its message begins
    with TRAILER_TOO_LARGE, which also names it when it broke the answer's first read."""


TRAILER_TOO_LARGE = (
    "the answer's trailer fields pass a head limit (upstream.max_response_header_bytes, "
    "upstream.max_response_headers)"
)


# How the error for one interim answer too many begins (proxy/exchange.py raises it).
TOO_MANY_INTERIM = "More interim (1xx) answers than upstream.max_interim_responses:"

# A connect that failed for want of servegate's own resources (socket(2), connect(2)): its
# descriptors, memory, or local ports (EADDRNOTAVAIL: every ephemeral port to that address in
# use or in TIME_WAIT).
_OWN_EXHAUSTION = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)
# How the detail of such a failure begins (proxy/answer.py gives it its own hint).
OWN_SHORTAGE = "servegate could not open"
# Its Retry-After, in seconds: descriptors come back as connections close, not at a time
# servegate knows; a second, as admission.retry_after's default.
OWN_SHORTAGE_RETRY_AFTER = 1.0

_DISCONNECTS = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError)
_PLAIN_PEER_MARKERS = ("wrong version number", "record layer failure", "packet length too long")
# OpenSSL's words for records that are no TLS, or not the session's (RFC 8446 §5.2).
_BROKEN_RECORD_MARKERS = (
    *_PLAIN_PEER_MARKERS,
    "bad record mac",
    "decryption failed",
    "record overflow",
    "bad record type",
)


def classify(exc: BaseException, facts: AttemptFacts, *, deadline_passed: bool) -> Failure:
    """Translate one attempt's exception into the taxonomy."""

    def failure(cause: Cause, detail: str) -> Failure:
        began = facts.response_started or bool(facts.answer_fragment)
        return Failure(
            cause, detail, facts.reused, facts.request_sent, facts.response_started, began
        )

    if deadline_passed:
        if facts.reused is None:
            # No connection opened within the budget: the model never got the request, so
            # the prediction is not what to fix (DESIGN §1: a timeout is the budget running
            # out while the model works).
            return failure(
                Cause.CONNECT_TIMEOUT,
                "the budget ran out before a connection to the model server opened",
            )
        if facts.response_started:
            return failure(Cause.DEADLINE_DURING_STREAM, "the budget ended while streaming")
        return failure(Cause.DEADLINE_EXCEEDED, "the budget ended before the model answered")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return failure(*connect_failure(exc.certificate_error))
    if isinstance(exc, ssl.SSLError):  # a handshake made without aiohttp (health checks)
        return failure(*connect_failure(exc))
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return failure(Cause.CONNECT_TIMEOUT, str(exc) or "no connection within the timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):  # SSL errors included
        return failure(*connect_failure(exc.os_error))
    if isinstance(exc, aiohttp.ClientResponseError) and not facts.response_started:
        return _unparseable_head(exc.message, failure)
    if isinstance(exc, TrailerTooLarge):
        return failure(Cause.RESPONSE_HEADER_TOO_LARGE, str(exc))
    if isinstance(exc, BodyFramingBroken):
        return failure(Cause.RESPONSE_FRAMING, str(exc))
    if isinstance(exc, AnswersPlainHTTP):
        return failure(Cause.TLS_TO_PLAIN_SERVER, str(exc))
    if (tls := _tls_verdict(exc)) is not None and not facts.response_started:
        # A TLS 1.3 server refuses a client certificate (or its absence) after the handshake:
        # its alert comes on the first read, as a dropped connection, not from the connect.
        return failure(*tls)
    if isinstance(exc, (aiohttp.ClientPayloadError, *_DISCONNECTS)):
        # A fresh connection counts only with the kernel's proof: without it, a fresh one
        # dropped after sending is a TLS server's answer to plain HTTP as often as not.
        proven = facts.reused or facts.request_bytes_acked == 0
        answered = facts.response_started or facts.answer_fragment
        if proven and not answered and _never_read(facts):
            return failure(Cause.STALE_CONNECTION, _stale_reason(facts))
        return failure(Cause.RESET_DURING_REQUEST, _disconnect_reason(exc, facts))
    # Anything else is still a failure of this attempt; the detail names it for the log.
    return failure(Cause.RESET_DURING_REQUEST, f"unexpected {type(exc).__name__}: {exc}")


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS layer's error behind an error aiohttp raised for a dropped connection (it keeps
    the transport's error as the cause), or None."""
    seen: BaseException | None = exc
    for _ in range(4):  # aiohttp wraps it once or twice
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tls_verdict(exc: BaseException) -> tuple[Cause, str] | None:
    """A dropped connection's TLS reason, when it names the server's doing: an alert it sent,
    or records that are no TLS (a server that speaks plain HTTP once the handshake is done).
    A close without close_notify is no such reason: a crashing worker's connection ends so."""
    error = _tls_error(exc)
    if error is None:
        return None
    said = str(error).lower()
    if "alert" in said:
        return connect_failure(error)
    if any(marker in said for marker in _BROKEN_RECORD_MARKERS):
        return Cause.MALFORMED_RESPONSE, (
            f"the server's TLS records could not be read ({ssl_reason(error)}): after the "
            "handshake it spoke something other than TLS"
        )
    return None


def _never_read(facts: AttemptFacts) -> bool:
    """Proof that the model's process read none of the request, whatever the timing: it had
    closed the connection in order (its FIN came) and its TCP acknowledged none of the
    request's bytes (proxy/acked.py). A connection that ended with a reset alone proves
    nothing, however few bytes were acknowledged; nor does a drop after the request went out
    where the kernel keeps no count."""
    if facts.request_bytes_acked is None:
        return not facts.request_sent
    return facts.request_bytes_acked == 0 and (facts.peer_finished or not facts.request_sent)


def _stale_reason(facts: AttemptFacts) -> str:
    which = "pooled" if facts.reused else "new"
    if facts.request_bytes_acked is not None:
        return (
            f"the server closed the {which} connection before the request reached it; its TCP "
            "acknowledged none of the request"
        )
    return f"the server closed the {which} connection before the request was sent"


def connect_failure(error: BaseException) -> tuple[Cause, str]:
    """Why a connection (TCP, then TLS) could not be opened: the cause and its detail.

    The one translation for servegate's attempts (aiohttp wraps these errors) and for the
    doctor's raw connections (proxy/doctor/wire.py)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return Cause.TLS_CERTIFICATE, ssl_reason(error)
    if isinstance(error, ssl.SSLError):
        if any(marker in str(error).lower() for marker in _PLAIN_PEER_MARKERS):
            return Cause.TLS_TO_PLAIN_SERVER, ssl_reason(error)
        return Cause.TLS_HANDSHAKE, ssl_reason(error)
    if isinstance(error, TimeoutError):
        return Cause.CONNECT_TIMEOUT, "no TCP connection within the connect timeout"
    if isinstance(error, socket.gaierror):  # nothing to connect to: the name has no address
        return Cause.NAME_NOT_RESOLVED, f"the host name did not resolve: {error.strerror}"
    if isinstance(error, OSError) and (shortage := own_shortage(error, "a connection")):
        # servegate's own descriptors or memory ran out: no word on the model server, whose
        # restarts, health and circuit must not hear of it.
        return Cause.OVERLOADED, shortage
    if isinstance(error, OSError) and error.errno:
        return Cause.CONNECT_REFUSED, os.strerror(error.errno).lower()
    return Cause.CONNECT_REFUSED, str(error)


def own_shortage(error: OSError, opening: str) -> str | None:
    """The detail of a failure to open `opening` (a connection, a file) for want of servegate's
    own descriptors, memory or local ports: a `Cause.OVERLOADED` of its own, which no setting
    of the model server's fixes. None for any other error."""
    if error.errno not in _OWN_EXHAUSTION:
        return None
    return (
        f"{OWN_SHORTAGE} {opening}: {os.strerror(error.errno).lower()}; raise its open-file "
        "limit (ulimit -n) or lower server.max_connections"
    )


def exchange_failure(error: BaseException, *, response_started: bool) -> tuple[Cause, str]:
    """Why an exchange on an open raw connection failed (the doctor reads responses itself;
    servegate's own attempts go through `classify`)."""
    if isinstance(error, asyncio.LimitOverrunError | ValueError):
        if _HTTP2.search(str(error)):
            return Cause.MALFORMED_RESPONSE, f"{HTTP2_ANSWER}: {error}"
        return Cause.MALFORMED_RESPONSE, f"not an HTTP/1.1 response: {error}"
    if isinstance(error, ssl.SSLError) and "alert" in str(error).lower():
        # A TLS 1.3 server refusing a client certificate (or its absence) after the
        # handshake: its alert comes on the first read.
        return connect_failure(error)
    if isinstance(error, asyncio.IncompleteReadError):
        where = "in the middle of its response" if response_started else "without answering"
        return Cause.RESET_DURING_REQUEST, f"the server closed the connection {where}"
    reason = error.strerror if isinstance(error, OSError) and error.strerror else error
    return Cause.RESET_DURING_REQUEST, f"the connection failed: {reason}"


def ssl_reason(error: BaseException) -> str:
    """A TLS error's reason as one lowercase phrase, for a detail or a log line."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return error.verify_message or str(error)
    if isinstance(error, ssl.SSLError):
        return str(getattr(error, "reason", None) or error).lower().replace("_", " ")
    return str(error)


def _disconnect_reason(exc: BaseException, facts: AttemptFacts) -> str:
    if facts.response_started:
        return "the server closed the connection in the middle of its response"
    if facts.answer_fragment:
        return (
            f"the server closed the connection after sending {facts.answer_fragment}, before "
            "its answer's head was complete"
        )
    if acked := facts.request_bytes_acked:
        # Without a FIN first, the end was a reset: the server closed with bytes unread.
        how = "closed" if facts.peer_finished else "reset"
        return (
            f"the server {how} the connection after its TCP acknowledged {acked} "
            f"byte{'s' if acked != 1 else ''} of the request, before answering"
        )
    if facts.request_sent and facts.request_bytes_acked == 0 and not facts.peer_finished:
        return (
            "the server reset the connection as the request reached it, before answering; a "
            "reset does not tell whether it had read any of the request"
        )
    if facts.request_sent:
        return "the server closed the connection after receiving the request, before answering"
    return f"the connection failed while sending the request ({type(exc).__name__})"


# aiohttp's parser messages for an answer that is HTTP but framed against the rules
# (RFC 9112 §6.3): conflicting, repeated or invalid lengths, or bytes after a complete answer.
# Compared lowercased with the description's first line (llhttp says "Invalid character in
# chunk size" but "Chunk size overflow"), not with the head bytes it quotes after it.
_FRAMING_FAULTS = (
    "content-length",
    "transfer-encoding",
    "chunk",
    "data after `connection: close`",
)


# An HTTP/2 server's first bytes, as aiohttp's parse error quotes them: a SETTINGS frame's
# header on stream 0 (RFC 9113 §6.5: length, type 0x4, flags, stream 0), or a status line
# that says HTTP/2.
_HTTP2 = re.compile(
    r"b'(?:\\x00(?:\\x[0-9a-f]{2}|.){2}\\x04(?:\\x00|\\x01)\\x00\\x00\\x00\\x00|HTTP/2[ .])"
)
# How the detail of an HTTP/2 answer begins (proxy/answer.py gives it its own hint).
HTTP2_ANSWER = "the model server answered in HTTP/2"


def _unparseable_head(message: str, failure: Callable[[Cause, str], Failure]) -> Failure:
    if message.startswith("Got more than"):
        limit = message.removeprefix("Got more than ").split(" ", 1)[0]
        return failure(
            Cause.RESPONSE_HEADER_TOO_LARGE,
            f"a response reason phrase or header field longer than {limit} bytes "
            f"(upstream.max_response_header_bytes): {message[:200]}",
        )
    if message.startswith((TOO_MANY_INTERIM, TRAILER_TOO_LARGE)):
        return failure(Cause.RESPONSE_HEADER_TOO_LARGE, message)
    if "Too many headers" in message:
        detail = "more header fields in the response than upstream.max_response_headers allows"
        return failure(Cause.RESPONSE_HEADER_TOO_LARGE, detail)
    if _HTTP2.search(message):
        return failure(Cause.MALFORMED_RESPONSE, f"{HTTP2_ANSWER}: {message}")
    described = message.split("\n", 1)[0].lower()
    if any(marker in described for marker in _FRAMING_FAULTS):
        return failure(Cause.RESPONSE_FRAMING, f"the response's framing is invalid: {message}")
    return failure(Cause.MALFORMED_RESPONSE, f"unparseable response head: {message}")
