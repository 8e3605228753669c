"""In-process aiohttp upstreams that record what reached them and answer on demand."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Recorder:
    seen: list[Seen] = field(default_factory=list)
    # Set by a test to let a streaming handler continue after its first event.
    release: asyncio.Event = field(default_factory=asyncio.Event)
    first_chunk_arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def last(self) -> Seen:
        return self.seen[-1]


def recording_app(recorder: Recorder) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        recorder.seen.append(
            Seen(request.method, request.raw_path, list(request.headers.items()), body)
        )
        response = web.Response(body=body, status=200)
        response.headers["X-Upstream-Method"] = request.method
        return response

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        body = None if code in (204, 304) else f"upstream says {code}".encode()
        response = web.Response(status=code, reason=request.query.get("reason"), body=body)
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        response.headers["Connection"] = "X-Hop"
        response.headers["X-Hop"] = "must not reach the client"
        response.headers["ETag"] = '"v1"'
        return response

    async def head_only(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1234"})
        await response.prepare(request)
        await response.write_eof()
        return response

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await asyncio.wait_for(recorder.release.wait(), timeout=10)
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response

    async def ticks(request: web.Request) -> web.StreamResponse:
        """`count` events, one every `every` seconds: a stream that can outlive a budget."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for tick in range(int(request.query["count"])):
            await response.write(b"data: %d\n\n" % tick)
            await asyncio.sleep(float(request.query["every"]))
        await response.write_eof()
        return response

    async def slow_sink(request: web.Request) -> web.Response:
        """Reads the upload chunk by chunk and says when the first one arrived."""
        received = 0
        async for chunk in request.content.iter_any():
            received += len(chunk)
            recorder.first_chunk_arrived.set()
        return web.json_response({"received": received})

    app = web.Application()
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("HEAD", "/head", head_only)
    app.router.add_get("/sse", sse)
    app.router.add_get("/ticks", ticks)
    app.router.add_post("/sink", slow_sink)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@dataclass
class Busy:
    """Counts requests in progress at a slow model and keeps the peak."""

    now: int = 0
    peak: int = 0
    served: int = 0


def busy_app(busy: Busy, seconds: float) -> web.Application:
    async def predict(request: web.Request) -> web.Response:
        busy.now += 1
        busy.peak = max(busy.peak, busy.now)
        try:
            await request.read()
            await asyncio.sleep(seconds)
        finally:
            busy.now -= 1
        busy.served += 1
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/predict", predict)
    return app
