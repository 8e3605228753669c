"""The only module that reaches into aiohttp's private attributes, and the start-up check that
says so loudly when an aiohttp release has moved one.

servegate needs three things aiohttp offers no public switch for: turning off the client's hidden
one-time retry of idempotent requests (servegate's attempt loop must be the only place a retry
is decided and counted), changing a connector's idle expiry once the server announces its
keep-alive, and building the data port's request handlers from servegate's own class. A renamed
attribute would not fail: Python would quietly set a new one, and a PUT that reached the model
would be replayed. So each use checks that the attribute is there, and `check()` runs at start-up.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

# aiohttp >= 3.9 (client.py, ClientSession._request): "retry_persistent_connection =
# self._retry_connection and method in IDEMPOTENT_METHODS", after RFC 9112 §9.3.1. aiohttp's own
# test client switches it off the same way (test_utils.py, TestClient.__init__).
_RETRY_SWITCH = "_retry_connection"
# aiohttp's BaseConnector reads this when it takes a pooled connection and when it sweeps idle
# ones (connector.py, BaseConnector._get / _cleanup); the constructor's keepalive_timeout sets it.
_KEEPALIVE = "_keepalive_timeout"


class MissingInternal(Exception):
    """An aiohttp attribute servegate relies on is gone; the message names it and the fix."""


def _missing(what: str, why: str) -> MissingInternal:
    return MissingInternal(
        f"aiohttp {aiohttp.__version__} has no {what}, which servegate needs to {why}: "
        "install an aiohttp version servegate was tested with (see pyproject.toml)"
    )


def disable_hidden_retry(session: aiohttp.ClientSession) -> None:
    """Stop `session` from replaying an idempotent request once after a dropped connection.

    Raises MissingInternal if the switch is gone (a new attribute would change nothing)."""
    if _RETRY_SWITCH not in aiohttp.ClientSession.ATTRS or not hasattr(session, _RETRY_SWITCH):
        raise _missing(f"ClientSession.{_RETRY_SWITCH}", "switch off its hidden retry")
    setattr(session, _RETRY_SWITCH, False)


def set_keepalive_timeout(connector: aiohttp.BaseConnector, seconds: float) -> None:
    """Expire `connector`'s idle pooled connections after `seconds` from now on.

    Raises MissingInternal if the attribute is gone."""
    if not hasattr(connector, _KEEPALIVE):
        raise _missing(f"BaseConnector.{_KEEPALIVE}", "expire idle pooled connections")
    setattr(connector, _KEEPALIVE, seconds)


class HandlerServer(web.Server):
    """A low-level web.Server whose connections are served by `handler_class`, a RequestHandler
    subclass (to answer unparseable requests servegate's way).

    web.Server builds a plain RequestHandler per connection from the keyword arguments it was
    given; this keeps its own copy of them instead of reading web.Server's private ones."""

    def __init__(
        self,
        handler: Any,
        *,
        handler_class: type[RequestHandler],
        handler_cancellation: bool = False,
        request_factory: Any = None,
        **handler_kwargs: Any,
    ) -> None:
        super().__init__(
            handler,
            request_factory=request_factory,
            handler_cancellation=handler_cancellation,
            **handler_kwargs,
        )
        self._handler_class = handler_class
        self._handler_kwargs = handler_kwargs
        self._handler_loop = asyncio.get_running_loop()

    def __call__(self) -> RequestHandler:
        # The runner uses the server itself as the protocol factory (web_runner.py, BaseSite).
        return self._handler_class(self, loop=self._handler_loop, **self._handler_kwargs)


async def check() -> None:
    """Fail at start-up, not under traffic, if any of the above no longer holds.

    Raises MissingInternal with one line naming what is gone."""
    connector = aiohttp.TCPConnector(keepalive_timeout=12.5)
    session = aiohttp.ClientSession(connector=connector)
    try:
        if getattr(connector, _KEEPALIVE, None) != 12.5:
            raise _missing(f"BaseConnector.{_KEEPALIVE}", "expire idle pooled connections")
        if getattr(session, _RETRY_SWITCH, None) is not True:
            raise _missing(f"ClientSession.{_RETRY_SWITCH}", "switch off its hidden retry")
        disable_hidden_retry(session)
    finally:
        await session.close()
    if not callable(getattr(RequestHandler, "handle_error", None)):
        raise _missing("RequestHandler.handle_error", "answer unparseable requests in JSON")
