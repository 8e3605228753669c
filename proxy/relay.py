"""Streams the model's answer to the client unchanged: status, reason, headers, body as it comes.

Each chunk is written as soon as it arrives (server-sent events reach the client at once), and
`write` waits for the client to drain, so a slow client slows the model's stream instead of
filling servegate's memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.budget import Budget
from proxy.failures import AttemptFacts, Failure, classify
from proxy.forward import ModelResponse
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
    answer: ModelResponse,
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
    # No budget: it covered only the first byte (budget.scope: first_byte).
    deadline = asyncio.timeout(budget.remaining() if budget is not None else None)
    try:
        async with deadline:
            await response.prepare(request)
            if has_body and answer.body is not None:
                await response.write(answer.body)
                relayed.bytes_out = len(answer.body)
            elif has_body:
                async for chunk in _from_model(upstream):
                    await response.write(chunk)
                    relayed.bytes_out += len(chunk)
            await response.write_eof()
    except _ModelBroke as broke:
        relayed.failure = classify(broke.cause, facts, deadline_passed=False)
    except TimeoutError:
        relayed.failure = classify(TimeoutError(), facts, deadline_passed=True)
    except ConnectionResetError:  # aiohttp's write error when the client has gone
        relayed.client_gone = True
    finally:
        if relayed.failure is None and not relayed.client_gone:
            upstream.release()  # fully read: the connection goes back to the pool
        else:
            upstream.close()
    if relayed.failure is not None:
        _abort(request)
    return relayed


class _ModelBroke(Exception):
    """Reading the model's answer failed (as opposed to writing it to the client)."""

    def __init__(self, cause: aiohttp.ClientError) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def _from_model(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
    except aiohttp.ClientError as exc:
        raise _ModelBroke(exc) from exc


def _abort(request: web.BaseRequest) -> None:
    """The status line is gone already: the only honest signal left is a cut connection."""
    if request.transport is not None:
        request.transport.close()
