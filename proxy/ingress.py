"""The data-port handler: one client request from arrival to its access line.

It fixes the request id and the budget, prepares what goes upstream, hands it to the attempt
loop, then relays the answer or answers the failure, and counts and logs the result once.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from proxy import answer
from proxy.admission import Admission, QueueFull
from proxy.aiohttp_internals import HandlerServer
from proxy.body import RequestBody
from proxy.budget import TIMEOUT_HEADER, BadTimeoutHeader, Budget, Spent
from proxy.circuit import Circuit
from proxy.config import Settings
from proxy.failures import Cause, Failure
from proxy.forward import Forwarder, Outbound
from proxy.headers import decoded, request_headers
from proxy.metrics import Metrics, ShedReason
from proxy.relay import relay
from proxy.retry import GiveUpReason

access_log = structlog.get_logger("servegate.access")

# A passed-on request id is kept only if it is safe to log and to echo in a header.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first"


@dataclass
class AccessLine:
    """What the one access line of a request says; filled in as the request goes."""

    method: str
    path: str
    status: int | None = None
    attempts: int = 0
    reused: bool | None = None
    body: RequestBody | None = None
    bytes_out: int = 0
    spent: Spent = field(default_factory=Spent)
    failure: Failure | None = None

    def fields(self, seconds: float) -> dict[str, Any]:
        line: dict[str, Any] = {
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "duration_s": round(seconds, 4),
            "attempts": self.attempts,
            "reused": self.reused,
            "bytes_in": self.body.size if self.body else 0,
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


def origin_form(target: str) -> str:
    """The path and query to send upstream, byte for byte; an absolute-form target
    (`GET http://host/path`, as sent to proxies) keeps its path and query too."""
    if target.startswith("/"):
        return target
    path = URL(target, encoded=True).raw_path_qs
    return path if path.startswith("/") else "/"  # "*" (OPTIONS *) asks the server itself


@dataclass(frozen=True)
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

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        arrived = time.monotonic()
        passed_id = request.headers.get("X-Request-Id", "")
        request_id = passed_id if _REQUEST_ID.fullmatch(passed_id) else uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=request_id)
        self.metrics.inflight.inc()
        line = AccessLine(request.method, request.path)
        try:
            response = await self._serve(request, request_id, line)
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
        finally:
            # Without a status, the client hung up and the handler was cancelled.
            line.status = line.status or CLIENT_CLOSED
            seconds = time.monotonic() - arrived
            self.metrics.inflight.dec()
            self.metrics.record_answer(request.method, line.status, seconds)
            access_log.info("request", **line.fields(seconds))
            structlog.contextvars.unbind_contextvars("request_id")
        return response

    async def _serve(
        self, request: web.BaseRequest, request_id: str, line: AccessLine
    ) -> web.StreamResponse:
        try:
            budget = Budget.start(self.settings.budget, request.headers.get(TIMEOUT_HEADER))
        except BadTimeoutHeader as exc:
            line.status = 400
            return answer.bad_request(str(exc), request_id)
        # Read before taking a slot: a slow client must not hold the model's capacity.
        try:
            async with asyncio.timeout(budget.remaining()):
                line.body = await self._read_body(request)
        except TimeoutError:
            detail = "the budget ran out while the client was still sending its request"
            refusal: Refusal | None = Refusal(Failure(Cause.DEADLINE_EXCEEDED, detail))
        else:
            refusal = await self._admit(budget, line)
        finally:
            line.spent.reading_request = budget.elapsed()
        if refusal is not None:
            return self._refuse(refusal, request_id, budget, line)
        try:
            return await self._exchange(request, request_id, budget, line)
        finally:
            self.admission.leave()

    async def _admit(self, budget: Budget, line: AccessLine) -> Refusal | None:
        """The circuit, then a concurrency slot: both before the model server is asked."""
        arrived = budget.elapsed()
        try:
            if not await self.circuit.admit(budget.remaining()):
                self.metrics.shed.labels(ShedReason.CIRCUIT_OPEN).inc()
                detail = "the circuit is open: the model server is down"
                return Refusal(Failure(Cause.CIRCUIT_OPEN, detail), self.circuit.retry_after())
            admitted = await self.admission.enter(budget.remaining())
        except QueueFull:
            detail = "every concurrency slot is taken and the queue is full"
            return Refusal(Failure(Cause.OVERLOADED, detail), self.settings.admission.retry_after)
        finally:
            line.spent.queued = budget.elapsed() - arrived
        if not admitted:
            detail = "the budget ran out while waiting for a concurrency slot"
            return Refusal(Failure(Cause.DEADLINE_EXCEEDED, detail))
        return None

    async def _exchange(
        self, request: web.BaseRequest, request_id: str, budget: Budget, line: AccessLine
    ) -> web.StreamResponse:
        outbound = Outbound(
            method=request.method,
            raw_path=origin_form(request.raw_path),
            headers=self._outbound_headers(request, request_id, line.body),
            body=line.body,
        )
        forwarded = await self.forwarder.forward(outbound, budget, line.spent)
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
            budget if self.settings.budget.scope == "response" else None,
            forwarded.facts,
            {"X-Request-Id": request_id},
        )
        line.bytes_out = relayed.bytes_out
        line.status = relayed.response.status  # set late: a cancelled relay logs 499
        if relayed.failure is not None:
            # The client already has the status line; the cut connection tells it the rest.
            line.failure = relayed.failure
            self.metrics.record_failed_attempt(relayed.failure)
            self.metrics.record_4503(relayed.failure)
        elif relayed.client_gone:
            line.status = CLIENT_CLOSED
        return relayed.response

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

    async def _read_body(self, request: web.BaseRequest) -> RequestBody | None:
        if not request.body_exists:
            return None
        if request.headers.get("Expect", "").lower() == "100-continue":
            # servegate reads the body itself, so it invites it; the model sees no Expect.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await RequestBody.read(
            request.content, self.settings.retry.replay_buffer_bytes, request.content_length
        )

    def _outbound_headers(
        self, request: web.BaseRequest, request_id: str, body: RequestBody | None
    ) -> list[tuple[str, str]]:
        headers = request_headers(
            decoded(request.raw_headers),
            client_ip=request.remote,
            scheme=request.scheme,
            host=request.host,
            request_id=request_id,
        )
        if body is not None and not body.buffered and request.content_length is not None:
            headers.append(("Content-Length", str(request.content_length)))
        return headers


class _JsonErrorHandler(RequestHandler):
    """aiohttp answers a request it cannot parse (bad request line, oversized headers) before
    servegate's handler runs, in plain text; this gives that answer the JSON body too."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        # A client's mistake, answered and logged as one (aiohttp logs it as a server error).
        reason = message or HTTPStatus(status).phrase
        access_log.info("request.rejected", status=status, reason=reason, client=request.remote)
        response = answer.bad_request(reason, uuid.uuid4().hex, status)
        response.force_close()  # the stream cannot be trusted after a parse error
        return response


class JsonErrorServer(HandlerServer):
    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, handler_class=_JsonErrorHandler, **kwargs)
