"""The yardstick: the aiohttp pass-through proxy one writes in twenty lines, on uvloop.

Default ClientSession, a catch-all route, the request body streamed up and the answer streamed
down. No deadline, no retries, no metrics, no access log.

    python bench/plain_proxy.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import sys

import aiohttp
import uvloop
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def app(upstream: str) -> web.Application:
    async def session_context(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession()
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with request.app["session"].request(
            request.method,
            upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=request.content if request.body_exists else None,
        ) as answer:
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            for name, value in answer.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    application = web.Application()
    application.cleanup_ctx.append(session_context)
    application.router.add_route("*", "/{tail:.*}", forward)
    return application


def main() -> None:
    port, upstream = int(sys.argv[1]), int(sys.argv[2])
    web.run_app(
        app(f"http://127.0.0.1:{upstream}"),
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
