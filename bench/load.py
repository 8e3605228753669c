"""Load generators: wrk for throughput and for latency at a fixed rate, raw sockets for the first
byte of a streamed answer. Everything on 127.0.0.1."""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from processes import HOST, StartFailed

BODY_BYTES = 1024  # a small prediction request
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise StartFailed("wrk is not installed: `make bench` installs it (apt-get)")
    return path


def _script(directory: Path, delay_ms: float | None) -> Path:
    """A wrk Lua script: POST a 1 KiB JSON-ish body; with `delay_ms`, wait that long before
    each request on a connection (wrk's own pacing hook), which fixes the rate."""
    script = directory / (f"post-{delay_ms}.lua" if delay_ms else "post.lua")
    text = (
        'wrk.method = "POST"\n'
        f'wrk.body = string.rep("x", {BODY_BYTES})\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    if delay_ms:
        text += f"function delay() return {delay_ms} end\n"
    script.write_text(text, encoding="ascii")
    return script


def _run_wrk(argv: list[str], cpus: str | None) -> str:
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise StartFailed(f"wrk failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def throughput(
    port: int, seconds: float, connections: int, scripts: Path, cpus: str | None
) -> tuple[float, int]:
    """Requests per second, and how many answers were not 2xx/3xx or failed at the socket."""
    out = _run_wrk(
        [wrk_path(), "-t1", f"-c{connections}", f"-d{round(seconds)}s",
         "-s", str(_script(scripts, None)), f"http://{HOST}:{port}/predict"],
        cpus,
    )  # fmt: skip
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = int(bad.group(1)) if bad else 0
    failed += sum(int(n) for n in errors.groups()) if errors else 0
    return rate, failed


def latency_p50(
    port: int, rate: float, seconds: float, scripts: Path, cpus: str | None, connections: int = 4
) -> tuple[float, float]:
    """The median latency (ms) at about `rate` requests per second, and the rate achieved."""
    delay_ms = round(1000 * connections / rate, 3)
    out = _run_wrk(
        [wrk_path(), "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--latency",
         "-s", str(_script(scripts, delay_ms)), f"http://{HOST}:{port}/predict"],
        cpus,
    )  # fmt: skip
    match = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    assert match is not None, out
    achieved = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return float(match.group(1)) * _UNITS[match.group(2)], achieved


async def _first_byte_once(port: int) -> float:
    request = b"GET /stream HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (HOST.encode(), port)
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        sent = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n", 1)[0], head
        await reader.readuntil(b"data: first")
        return (time.perf_counter() - sent) * 1000
    finally:
        writer.close()


async def first_byte_ms(port: int, count: int = 200) -> float:
    """Median ms from sending a request to reading the first event of a streamed answer whose
    rest comes much later; one request at a time."""
    times = [await _first_byte_once(port) for _ in range(count)]
    return statistics.median(times)
