"""Streams the model's answer to the client unchanged: status, reason, headers, body as it comes.

Each chunk is written as soon as it arrives (server-sent events reach the client at once), and
`write` waits for the client to drain, so a slow client slows the model's stream instead of
filling servegate's memory.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.budget import Budget
from proxy.failures import AttemptFacts, Failure, classify
from proxy.forward import Answer
from proxy.headers import decoded, response_headers

# Statuses whose responses carry no body, whatever their headers say (RFC 9110 §6.4.1).
_NO_BODY_STATUSES = frozenset({204, 304})


@dataclass
class Relayed:
    response: web.StreamResponse
    bytes_out: int
    failure: Failure | None = None  # the stream broke after the status was sent
    client_gone: bool = False


async def relay(
    request: web.BaseRequest,
    answer: Answer,
    budget: Budget | None,
    facts: AttemptFacts,
    extra_headers: dict[str, str],
) -> Relayed:
    upstream = answer.response
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for name, value in response_headers(decoded(upstream.raw_headers)):
        response.headers.add(name, value)
    response.headers.update(extra_headers)
    has_body = request.method != "HEAD" and upstream.status not in _NO_BODY_STATUSES
    relayed = Relayed(response, 0)
    try:
        await response.prepare(request)
        if has_body and answer.body is not None:
            await response.write(answer.body)
            relayed.bytes_out = len(answer.body)
        elif has_body:
            # No budget: it covered only the first byte (budget.scope: first_byte).
            deadline = asyncio.timeout(budget.remaining() if budget is not None else None)
            try:
                async with deadline:
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                        relayed.bytes_out += len(chunk)
            except (TimeoutError, aiohttp.ClientError) as exc:
                relayed.failure = classify(exc, facts, deadline_passed=deadline.expired())
                _abort(request)
                return relayed
        await response.write_eof()
    except ConnectionResetError:
        relayed.client_gone = True  # the client left; the upstream response is released below
    finally:
        if relayed.failure is None and not relayed.client_gone:
            upstream.release()  # fully read: the connection goes back to the pool
        else:
            upstream.close()
    return relayed


def _abort(request: web.BaseRequest) -> None:
    """The status line is gone already: the only honest signal left is a cut connection."""
    if request.transport is not None:
        request.transport.close()
