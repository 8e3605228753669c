"""servegate run --workers N: the workers share the data port, one scrape of the parent's
/metrics counts every request, and a worker that dies is started again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.upstreams.apps import Recorder, recording_app
from tests.upstreams.gunicorn import ROOT, free_port

REQUESTS = 60


@dataclass
class Parent:
    process: asyncio.subprocess.Process
    data_port: int
    admin_port: int
    lines: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(raw))
                self.arrived.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def wait_for(self, name: str, count: int = 1, limit: float = 30) -> list[dict[str, Any]]:
        async with asyncio.timeout(limit):
            while len(self.events(name)) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.events(name)


@pytest.fixture
async def parent(aiohttp_server: Any) -> AsyncIterator[Parent]:
    upstream = await aiohttp_server(recording_app(Recorder()))
    data_port, admin_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run",
        "--upstream", f"http://127.0.0.1:{upstream.port}",
        "--listen", f"127.0.0.1:{data_port}", "--admin-listen", f"127.0.0.1:{admin_port}",
        "--workers", "2",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "SERVEGATE_LOGGING__FORMAT": "json"},
    )  # fmt: skip
    started = Parent(process, data_port, admin_port)
    reader = asyncio.create_task(started.read())
    try:
        await started.wait_for("workers.started")
        yield started
    finally:
        worker_pids = {pid for line in started.events("workers.started") for pid in line["pids"]}
        worker_pids |= {line["pid"] for line in started.events("workers.worker_restarted")}
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
        for pid in worker_pids:  # stopped with the parent; killed here if the parent failed to
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(reader, 10)


async def requests_total(session: aiohttp.ClientSession, parent: Parent) -> dict[str, float]:
    async with session.get(f"http://127.0.0.1:{parent.admin_port}/metrics") as response:
        text = await response.text()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("servegate_requests_total", "servegate_worker_restarts_total"):
                found[f"{sample.name}{sorted(sample.labels.items())}"] = sample.value
    return found


async def send(parent: Parent, count: int) -> list[int]:
    # A new connection for each request: the kernel spreads connections, not requests.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(n: int) -> int:
            url = f"http://127.0.0.1:{parent.data_port}/predict"
            async with session.post(url, data=b"%d" % n) as response:
                await response.read()
                return response.status

        return list(await asyncio.gather(*(one(n) for n in range(count))))


POST_200 = "servegate_requests_total[('code', '200'), ('method', 'POST')]"
RESTARTS = "servegate_worker_restarts_total[]"


@pytest.mark.time_limit(120)
async def test_both_workers_serve_and_one_scrape_counts_every_request(parent: Parent) -> None:
    assert await send(parent, REQUESTS) == [200] * REQUESTS
    await parent.wait_for("request", REQUESTS)
    served_by = {line["worker"] for line in parent.events("request")}
    assert served_by == set(parent.events("workers.started")[0]["pids"])
    async with aiohttp.ClientSession() as session:
        counted = await requests_total(session, parent)
        async with session.get(f"http://127.0.0.1:{parent.admin_port}/readyz") as ready:
            assert ready.status == 200
    assert counted[POST_200] == REQUESTS
    assert counted[RESTARTS] == 0


@pytest.mark.time_limit(120)
async def test_a_killed_worker_is_restarted_counted_and_its_requests_stay_counted(
    parent: Parent,
) -> None:
    assert await send(parent, REQUESTS) == [200] * REQUESTS
    await parent.wait_for("request", REQUESTS)
    victim = parent.events("workers.started")[0]["pids"][0]
    os.kill(victim, signal.SIGKILL)
    (died,) = await parent.wait_for("workers.worker_died")
    assert (died["pid"], died["exit_code"]) == (victim, -signal.SIGKILL)
    (restarted,) = await parent.wait_for("workers.worker_restarted")
    await parent.wait_for("servegate.started", 3)  # the new worker serves
    assert await send(parent, REQUESTS) == [200] * REQUESTS
    await parent.wait_for("request", 2 * REQUESTS)
    assert restarted["pid"] in {line["worker"] for line in parent.events("request")[REQUESTS:]}
    async with aiohttp.ClientSession() as session:
        counted = await requests_total(session, parent)
    assert counted[POST_200] == 2 * REQUESTS  # the dead worker's count is kept
    assert counted[RESTARTS] == 1
    # Its per-process gauges are gone: a sum over `pid` would count its connections forever.
    metrics_url = f"http://127.0.0.1:{parent.admin_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(metrics_url) as response:
        families = text_string_to_metric_families(await response.text())
    pids = {
        sample.labels["pid"]
        for family in families
        if family.name == "servegate_client_connections"
        for sample in family.samples
    }
    assert str(victim) not in pids
    assert str(restarted["pid"]) in pids
