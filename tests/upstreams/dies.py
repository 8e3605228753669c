"""An ASGI model that dies on a request's bytes as soon as it reads them: a query of death.

POST /die appends the worker's pid to the file named by $DEATHS_FILE, then ends the worker at
once (os._exit, as a segfault in inference code would); every other request answers its pid.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/die":
        # A blocking write is the point: nothing else may run before the worker is gone.
        with open(os.environ["DEATHS_FILE"], "a") as deaths:  # noqa: ASYNC230
            deaths.write(f"{os.getpid()}\n")
        os._exit(1)
    body = str(os.getpid()).encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
