"""A compressed request from a real client (curl) to a real model server that reads compressed
bodies itself (Gunicorn, tests/upstreams/gzip_model.py) gets the same answer through servegate
as directly: the body reaches the model byte for byte, still labelled with its encoding."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import StartGate, gate_url, require_tool
from tests.upstreams.gunicorn import Gunicorn

PAYLOAD = json.dumps({"inputs": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]] * 40}).encode()
GZIP_MODEL = "tests.upstreams.gzip_model:app"


async def curl(url: str, body: bytes, encoding: str) -> tuple[bytes, bytes, bytes]:
    """POST `body` with curl; returns the answer's status line, Content-Type and body."""
    process = await asyncio.create_subprocess_exec(
        require_tool("curl"), "-sS", "-i", "--max-time", "20", "--data-binary", "@-",
        "-H", f"Content-Encoding: {encoding}", "-H", "Content-Type: application/json",
        "-H", "Expect:",  # one answer per request, no 100 Continue before it
        url, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):
            out, error = await process.communicate(body)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, error
    head, _, answer = out.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    [content_type] = [line for line in lines if line.lower().startswith(b"content-type:")]
    return status, content_type, answer


@pytest.mark.parametrize(
    ("encoding", "compress", "status"),
    [
        ("gzip", gzip.compress, 200),
        ("deflate", zlib.compress, 200),
        ("x-custom", lambda raw: raw[::-1], 415),  # unknown to everyone: the model says so
    ],
)
async def test_curl_gets_the_same_answer_through_servegate_as_direct(
    encoding: str,
    compress: Callable[[bytes], bytes],
    status: int,
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
) -> None:
    model = gunicorn(app=GZIP_MODEL)
    gate = await start_gate(model.url)
    body = compress(PAYLOAD)

    direct = await curl(f"{model.url}/v2/models/iris/infer", body, encoding)
    through = await curl(gate_url(gate, "/v2/models/iris/infer"), body, encoding)

    assert through == direct
    assert direct[0].split(b" ")[1] == str(status).encode()
    seen: dict[str, Any] = json.loads(direct[2])
    assert (seen["encoding"], seen["bytes"]) == (encoding, len(body))
    assert seen["sha256"] == hashlib.sha256(body).hexdigest()
    if status == 200:
        assert len(seen["outputs"]) == 80
