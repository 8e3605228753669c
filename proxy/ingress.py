"""The data-port handler: one client request from arrival to its access line.

It fixes the request id and the budget, prepares what goes upstream, hands it to the attempt
loop, then relays the answer or answers the failure, and counts and logs the result once.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestPayloadError

from proxy import answer, logs, request_ids
from proxy.admin import Readiness
from proxy.admission import Admission, QueueFull
from proxy.body import BodyTooLarge, BufferPool, RequestBody, SpoolFailed
from proxy.budget import TIMEOUT_HEADER, BadTimeoutHeader, Budget, Spent, in_log
from proxy.circuit import Circuit
from proxy.config import Settings
from proxy.connection import ClientConnection
from proxy.data_server import HEADER_FIELD_TOO_LONG, closes_after_answer, refused_version
from proxy.failures import Cause, Failure, own_shortage
from proxy.forward import Forwarder, Outbound
from proxy.headers import (
    Fields,
    longer_field,
    only_chunked,
    request_headers,
    serialize_fields,
)
from proxy.metrics import KNOWN_METHODS, Metrics, ShedReason, TimeoutPhase
from proxy.relay import interim_relay, relay
from proxy.retry import GiveUpReason
from proxy.upgrade import (
    UpgradeHeadTooLarge,
    Upgrader,
    UpgradeRefused,
    UpstreamUnreachable,
    wants_upgrade,
)

access_log = structlog.get_logger("servegate.access")

# RFC 9112 §3.2: Host is uri-host [":" port] (RFC 3986 §3.2.2: an IP literal in brackets, or a
# reg-name, which may be empty); any other value is a 400. It reaches the model, and may build
# its URLs: a space, `@` or `/` in it is no host.
_HOST = re.compile(r"(?:\[[0-9A-Za-z.:_~!$&'()*+,;=-]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)(?::[0-9]*)?")
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first"
# nginx's status for "closed without a response", logged for a request servegate's stop cut:
# a second stop signal, or a drain's end (server.shutdown_quiet, then the budget).
CUT_BY_STOP = 444


@dataclass(slots=True)
class AccessLine:
    """What the one access line of a request says; filled in as the request goes."""

    method: str
    path: str
    status: int | None = None
    attempts: int = 0
    reused: bool | None = None
    body: RequestBody | None = None
    bytes_upgraded_in: int = 0  # what the client sent after an upgrade (it has no body)
    bytes_out: int = 0
    spent: Spent = field(default_factory=Spent)
    failure: Failure | None = None

    def count_sent(self, size: int) -> None:
        self.bytes_out += size

    def count_attempt(self, attempt: int) -> None:
        self.attempts = attempt

    def fields(self, seconds: float) -> dict[str, Any]:
        line: dict[str, Any] = {
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "duration_s": in_log(seconds),
            "attempts": self.attempts,
            "reused": self.reused,
            "bytes_in": self.body.size if self.body else self.bytes_upgraded_in,
            "bytes_out": self.bytes_out,
            "spent": self.spent.as_log(),
        }
        if self.failure is not None:
            line.update(
                category=self.failure.category,
                cause=self.failure.cause,
                detail=self.failure.detail,
            )
        return line


def origin_form(method: str, target: str) -> str:
    """The target to send upstream, byte for byte. An absolute-form target (`GET
    http://host/path?q`, as sent to proxies) goes as its path and query, an empty query's `?`
    kept; `*` (`OPTIONS *`, RFC 9112 §3.2.4: the server itself) goes as sent, and so does an
    OPTIONS target with neither path nor query (`OPTIONS http://host`), which means it."""
    if target.startswith("/") or target == "*":
        return target
    _, rest = _split_absolute(target)
    if not rest and method == "OPTIONS":
        return "*"
    return rest if rest.startswith("/") else "/" + rest


def target_authority(target: str) -> str | None:
    """The authority of an absolute-form target (`GET http://host:81/x`) as written, else None."""
    if target.startswith("/") or target == "*":
        return None
    return _split_absolute(target)[0]


def _split_absolute(target: str) -> tuple[str, str]:
    """An absolute-form target's authority and what follows it (RFC 3986 §3.2: the authority
    ends at the first `/`, `?` or `#`); aiohttp's parser has checked its shape."""
    _, _, rest = target.partition("://")
    ends = [at for at in (rest.find("/"), rest.find("?"), rest.find("#")) if at >= 0]
    cut = min(ends) if ends else len(rest)
    return rest[:cut], rest[cut:]


@dataclass(frozen=True, slots=True)
class Refusal:
    """servegate answers instead of the model: why, and when trying again makes sense."""

    failure: Failure
    retry_after: float | None = None
    give_up: GiveUpReason | None = None
    attempts: int = 0


@dataclass(frozen=True)
class Ingress:
    settings: Settings
    forwarder: Forwarder
    admission: Admission
    circuit: Circuit
    metrics: Metrics
    bodies: BufferPool  # the memory all bodies kept for a replay share
    readiness: Readiness  # shutting down: every answer then closes its connection

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        arrived = time.monotonic()
        request_id = request_ids.of(request.headers.get("X-Request-Id", ""))
        # Each request's handler runs in a task of its own, on a copy of the connection's
        # context (aiohttp, web_protocol.py): the id is bound for this request alone.
        structlog.contextvars.bind_contextvars(request_id=request_id)
        self.metrics.change_inflight(1)
        line = AccessLine(request.method, request.path)
        transport = request.transport  # aiohttp lets go of it before a cancelled handler ends
        try:
            response = await self._serve(request, request_id, line)
            if not self._keeps_connection(request):
                response.force_close()
        except Exception:
            # A bug in servegate still gets a JSON answer and a traceback in the log, unless
            # the status line is already out: then only a cut connection can tell the client.
            access_log.exception("servegate.internal_error")
            line.status = line.status or 500
            if request.writer.output_size > 0:
                if request.transport is not None:
                    request.transport.close()
                raise
            response = answer.internal_error(request_id)
            response.force_close()  # what the connection holds next is in doubt
        finally:
            if line.body is not None:  # whatever the answer, refusals and cancellation too
                line.body.close()
            # Without a status the handler was cancelled: the client hung up, or, its
            # connection still open, servegate's own stop cut the request.
            line.status = line.status or self._cancelled_status(transport)
            seconds = time.monotonic() - arrived
            self.metrics.change_inflight(-1)
            self.metrics.record_answer(request.method, line.status, seconds)
            logs.access(line.fields(seconds), request_id)
        return response

    @staticmethod
    def _cancelled_status(transport: asyncio.BaseTransport | None) -> int:
        """A cancelled handler's status for the log. aiohttp cancels one when its client's
        connection is lost, and when a stop ends the drain (then it closes the connection
        after the cancel: the connection has not been lost yet)."""
        connection = transport.get_protocol() if transport is not None else None
        if isinstance(connection, ClientConnection) and not connection.lost:
            return CUT_BY_STOP
        return CLIENT_CLOSED

    async def _serve(
        self, request: web.BaseRequest, request_id: str, line: AccessLine
    ) -> web.StreamResponse:
        if (refused := self._refuse_on_sight(request, request_id)) is not None:
            line.status = refused.status
            return refused
        try:
            asked = request.headers.getall(TIMEOUT_HEADER, None)
            budget = Budget.start(self.settings.budget, ", ".join(asked) if asked else None)
        except BadTimeoutHeader as exc:
            line.status = 400
            return answer.bad_request(str(exc), request_id)
        # Read before taking a slot: a slow client must not hold the model's capacity.
        try:
            line.body = await self._read_body_in_time(request, budget)
        except BodyTooLarge as exc:
            line.status = 413
            return answer.bad_request(str(exc), request_id, 413)
        except RequestPayloadError as exc:  # broken chunked framing, a body cut short
            line.status = 400
            return answer.bad_request(f"the request body could not be read: {exc}", request_id)
        except SpoolFailed as exc:
            access_log.error("request.body_spool_failed", error=str(exc))
            if shortage := own_shortage(exc.error, "a spool file for the request body"):
                # Out of descriptors, as a connect can be: the same 429 and count, not a 507
                # that blames the disk.
                failure = Failure(Cause.OVERLOADED, shortage)
                return self._refuse(Refusal(failure), request_id, budget, line)
            line.status = 507
            return answer.insufficient_storage(exc.to_client, request_id)
        except TimeoutError:
            # The client's slowness, not the model's: no 4503 (the model was never asked),
            # and 408, as nginx's client_body_timeout answers. What is left of the body is
            # unread, so the connection closes.
            line.status = 408
            self.metrics.record_client_timeout(TimeoutPhase.BODY)
            refused = answer.bad_request(
                f"the request body did not all arrive within the budget ({budget.total:g} s)",
                request_id,
                408,
            )
            refused.force_close()
            return refused
        finally:
            line.spent.reading_request = budget.elapsed()  # the wait for a slot is `queued`
        refusal = await self._admit(budget, line)
        if refusal is not None:
            return self._refuse(refusal, request_id, budget, line)
        try:
            return await self._exchange(request, request_id, budget, line)
        finally:
            self.admission.leave()

    def _keeps_connection(self, request: web.BaseRequest) -> bool:
        """Whether the client's connection may carry another request after this one's answer.
        Not after a chunked body that may have ended with trailer fields, or an upgrade asked
        for and not made (data_server). Nor once servegate is shutting down: each answer then
        says `Connection: close`, so that a keep-alive client moves to another instance
        instead of sending its next request on a connection about to close (Envoy's drain
        does the same)."""
        return not closes_after_answer(request) and not self.readiness.shutting_down

    def _refuse_on_sight(self, request: web.BaseRequest, request_id: str) -> web.Response | None:
        """Requests answered from their head alone; the connection is closed after them."""
        if (version := refused_version(request)) is not None:
            refused = answer.bad_request(
                f"HTTP/{version.major}.{version.minor} is not spoken on this port: servegate "
                "serves HTTP/1.1 and HTTP/1.0 (RFC 9110 §15.6.6)",
                request_id,
                505,
            )
        elif longer_field(request.raw_headers, self.settings.server.max_header_bytes):
            # aiohttp's parser counts a field's neighbour too, so it is given more room and
            # each field is held to the limit here (aiohttp_internals.parser_field_limit).
            self.metrics.requests_rejected.labels("431").inc()
            limit = self.settings.server.max_header_bytes
            refused = answer.bad_request(HEADER_FIELD_TOO_LONG.format(limit), request_id, 431)
        elif "#" in request.raw_path:
            # RFC 9112 §3.2: a request target carries no fragment; a model's framework might
            # read `/p#/../admin` as a path of its own.
            refused = answer.bad_request(
                "the request target has a fragment (`#...`), which no request target carries "
                "(RFC 9112 §3.2): leave it out",
                request_id,
            )
        elif request.method == "CONNECT":  # servegate is no tunnel and no open proxy
            refused = answer.bad_request("CONNECT is not served", request_id, 405)
            refused.headers["Allow"] = ", ".join(sorted(KNOWN_METHODS))
        elif (host := request.headers.get("Host")) is not None and not _HOST.fullmatch(host):
            refused = answer.bad_request(
                f"Host {host[:100]!r} is not a host name or address with an optional port "
                "(RFC 9112 §3.2)",
                request_id,
            )
        elif (authority := target_authority(request.raw_path)) is not None and (
            "@" in authority or not _HOST.fullmatch(authority)
        ):
            # It becomes Host. RFC 9110 §4.2.4: a recipient treats userinfo as an error.
            what = (
                "userinfo (user:password@), which HTTP forbids"
                if "@" in authority
                else (f"{authority[:100]!r}, no host name or address with an optional port")
            )
            refused = answer.bad_request(f"the request target's authority is {what}", request_id)
        elif (codings := request.headers.getall("Transfer-Encoding", None)) and not only_chunked(
            codings
        ):
            refused = answer.bad_request(
                f"Transfer-Encoding: {', '.join(codings)}: servegate decodes no transfer coding "
                "but chunked; send the body chunked alone (a Content-Encoding may say how "
                "its bytes are compressed)",
                request_id,
                501,
            )
        elif (request.content_length or 0) > self.settings.server.max_body_bytes:
            limit = self.settings.server.max_body_bytes
            refused = answer.bad_request(
                f"body over server.max_body_bytes ({limit})", request_id, 413
            )
        else:
            return None
        refused.force_close()
        return refused

    async def _admit(self, budget: Budget, line: AccessLine) -> Refusal | None:
        """The circuit, then a concurrency slot: both before the model server is asked."""
        arrived = budget.elapsed()
        try:
            if not await self.circuit.admit(budget.remaining()):
                self.metrics.shed.labels(ShedReason.CIRCUIT_OPEN).inc()
                detail = f"the circuit is open: {self.forwarder.state.why_open()}"
                failure = self.forwarder.state.health.explain(Failure(Cause.CIRCUIT_OPEN, detail))
                return Refusal(failure, self.circuit.retry_after())
            admitted = await self.admission.enter(budget.remaining())
        except QueueFull:
            detail = "every concurrency slot is taken and the queue is full"
            return Refusal(Failure(Cause.OVERLOADED, detail), self.settings.admission.retry_after)
        finally:
            line.spent.queued = budget.elapsed() - arrived
        if not admitted:
            self.metrics.shed.labels(ShedReason.QUEUE_TIMEOUT).inc()
            # The model was never asked: the wait was servegate's queue, so the fix is
            # capacity (the slots, or instances), not a faster prediction.
            detail = (
                "the budget ran out while waiting for a concurrency slot "
                f"(admission.max_concurrency: {self.settings.admission.max_concurrency}); the "
                "model server was never asked"
            )
            return Refusal(Failure(Cause.OVERLOADED, detail), self.settings.admission.retry_after)
        return None

    async def _exchange(
        self,
        request: web.BaseRequest,
        request_id: str,
        budget: Budget,
        line: AccessLine,
    ) -> web.StreamResponse:
        if self.settings.server.upgrades and wants_upgrade(request):
            return await self._upgrade(request, request_id, budget, line)
        fields = self._outbound_headers(request, request_id)
        whole_answer_in_budget = self.settings.budget.scope == "response"
        outbound = Outbound(
            method=request.method,
            raw_path=origin_form(request.method, request.raw_path),
            fields=serialize_fields(fields),
            # request_headers keeps the client's Host, or puts the authority of an absolute-form
            # target in its place: two lookups, not a scan of the fields.
            has_host="Host" in request.headers or target_authority(request.raw_path) is not None,
            body=line.body,
            on_interim=interim_relay(request),
            whole_answer_in_budget=whole_answer_in_budget,
        )
        forwarded = await self.forwarder.forward(
            outbound, budget, line.spent, on_attempt=line.count_attempt
        )
        line.attempts, line.reused = forwarded.attempts, forwarded.facts.reused
        if forwarded.response is None:
            assert forwarded.failure is not None
            refusal = Refusal(
                forwarded.failure, forwarded.retry_after, forwarded.give_up, forwarded.attempts
            )
            return self._refuse(refusal, request_id, budget, line)
        relayed = await relay(
            request,
            forwarded.response,
            budget if whole_answer_in_budget else None,
            forwarded.facts,
            {"X-Request-Id": request_id},
            sent=line.count_sent,
            # Decided as the answer goes out, with its Connection field: a shutdown may have
            # begun while the model worked.
            keep_alive=self._keeps_connection(request),
        )
        if relayed.failure is not None and not relayed.response.prepared:
            # None of the answer left (an HTTP/1.0 client's is read whole first): the client
            # gets the failure, as if the model had failed before answering.
            self.metrics.record_failed_attempt(relayed.failure)
            refusal = Refusal(relayed.failure, attempts=forwarded.attempts)
            return self._refuse(refusal, request_id, budget, line)
        line.status = relayed.response.status  # set late: a cancelled relay logs no status
        if relayed.failure is not None:
            # The client already has the status line; the cut connection tells it the rest.
            line.failure = relayed.failure
            self.metrics.record_failed_attempt(relayed.failure)
            self.metrics.record_4503(relayed.failure)
        elif relayed.client_gone:
            line.status = CLIENT_CLOSED
        return relayed.response

    async def _upgrade(
        self, request: web.BaseRequest, request_id: str, budget: Budget, line: AccessLine
    ) -> web.StreamResponse:
        """The budget covers the handshake; server.upgrade_idle_timeout covers the session."""
        upgrader = Upgrader(
            self.settings.server,
            self.settings.upstream,
            self.metrics,
            self.forwarder.upstream.lag,
        )
        headers = [*self._outbound_headers(request, request_id), budget.remaining_field()]
        line.attempts = 1
        try:
            async with asyncio.timeout(budget.remaining()):
                reader, writer, handshake = await upgrader.handshake(
                    self.forwarder.probe.speaking,
                    request.method,
                    origin_form(request.method, request.raw_path),
                    headers,
                    request.headers["Upgrade"],
                )
        except TimeoutError:
            failure = Failure(Cause.DEADLINE_EXCEEDED, "no answer to the upgrade request")
            return self._refuse(Refusal(failure), request_id, budget, line)
        except UpstreamUnreachable as exc:
            refusal = Refusal(Failure(exc.cause, exc.detail))
            return self._refuse(refusal, request_id, budget, line)
        except OSError as exc:  # the connection opened, then failed before an answer
            detail = f"the connection failed during the upgrade handshake: {exc.strerror or exc}"
            failure = Failure(Cause.RESET_DURING_REQUEST, detail)
            return self._refuse(Refusal(failure), request_id, budget, line)
        except UpgradeRefused as exc:
            failure = Failure(Cause.MALFORMED_RESPONSE, str(exc))
            return self._refuse(Refusal(failure), request_id, budget, line)
        except UpgradeHeadTooLarge as exc:
            failure = Failure(Cause.RESPONSE_HEADER_TOO_LARGE, str(exc))
            return self._refuse(Refusal(failure), request_id, budget, line)
        line.status = handshake.status or 502
        line.bytes_upgraded_in, line.bytes_out = await upgrader.pipe(
            request, reader, writer, handshake, request_id
        )
        # Everything was written on the transport itself; aiohttp's own answer finds it closed.
        response = web.StreamResponse(status=line.status if line.status != 101 else 200)
        response.force_close()
        return response

    def _refuse(
        self, refusal: Refusal, request_id: str, budget: Budget, line: AccessLine
    ) -> web.Response:
        failure = refusal.failure
        line.failure = failure
        self.metrics.record_4503(failure)
        hint = answer.hint_for(
            failure,
            refusal.give_up,
            attempts=refusal.attempts,
            budget=budget.total,
            spent=line.spent,
        )
        response = answer.failure_response(failure, request_id, hint, refusal.retry_after)
        line.status = response.status
        return response

    async def _read_body_in_time(
        self, request: web.BaseRequest, budget: Budget
    ) -> RequestBody | None:
        """Raises TimeoutError when the budget ends first."""
        if request.content.is_eof():  # all of it came with the head: there is no wait to bound
            return await self._read_body(request)
        async with asyncio.timeout(budget.remaining()):
            return await self._read_body(request)

    async def _read_body(self, request: web.BaseRequest) -> RequestBody | None:
        if not request.body_exists:
            return None
        # Expect is a list (RFC 9110 §10.1.1), in one field or several; most requests have none.
        expected = request.headers.getall("Expect", ())
        expects = bool(expected) and any(
            token.strip().lower() == "100-continue"
            for value in expected
            for token in value.split(",")
        )
        if expects and request.version >= HttpVersion11:
            # servegate reads the body itself, so it invites it; the model sees no Expect.
            # An HTTP/1.0 client is sent no 1xx at all (RFC 9110 §10.1.1, §15.2).
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await RequestBody.read(
            request.content,
            self.settings.retry.replay_buffer_bytes,
            request.content_length,
            self.settings.server.max_body_bytes,
            self.bodies,
        )

    def _outbound_headers(self, request: web.BaseRequest, request_id: str) -> Fields:
        # RFC 9112 §3.2.2: an absolute-form target's authority replaces Host; it never picks
        # where the request goes, which is always the configured upstream.
        authority = target_authority(request.raw_path)
        return request_headers(
            request.raw_headers,
            client_ip=request.remote,
            scheme=request.scheme,
            authority=None if authority is None else authority.encode("utf-8", "surrogateescape"),
            request_id=request_id,
            id_passed=request_id == request.headers.get("X-Request-Id"),
        )
