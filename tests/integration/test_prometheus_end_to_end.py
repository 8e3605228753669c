"""A real Prometheus, run with the shipped scrape config and alert rules, scraping real
servegates: it sees exactly the 4503 categories that were provoked, the 4503 alerts go active
for those and no others, and every dashboard query and alert rule evaluates on the series
servegate exports.

The shipped prometheus.yml is copied with two changes only: the target (servegate's admin
port on 127.0.0.1 instead of the compose service) and 1 s scrape and evaluation intervals.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml

from proxy.app import Servegate
from proxy.failures import Category
from tests.conftest import StartGate, close_when_reused, gate_url, require_tool
from tests.upstreams.gunicorn import Gunicorn, free_port
from tests.upstreams.raw import ClosesIdleOnReuse

pytestmark = pytest.mark.slow  # a real Prometheus scraping servegate

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "config" / "prometheus"
DASHBOARD_FILE = REPO / "config" / "grafana" / "dashboards" / "servegate.json"
WAIT = 20.0  # seconds any one thing may take to show up in Prometheus

T = TypeVar("T")


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                async with session.get(f"{self.url}/-/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        pytest.fail(f"prometheus was not ready within {WAIT} s:\n{self.log()}")

    async def api(self, session: aiohttp.ClientSession, path: str, **params: str) -> Any:
        # The test's client does not decompress (it checks servegate's bytes), so ask for none.
        async with session.get(
            f"{self.url}/api/v1/{path}", params=params, headers={"Accept-Encoding": "identity"}
        ) as response:
            body = await response.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    async def query(self, session: aiohttp.ClientSession, promql: str) -> list[dict[str, Any]]:
        data = await self.api(session, "query", query=promql)
        assert data["resultType"] in ("vector", "scalar"), (promql, data)
        return data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    """Start Prometheus on the shipped config, scraping `targets`; stopped by pid afterwards."""
    binary = require_tool("prometheus")
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        directory = tmp_path / f"prometheus-{len(started)}"
        directory.mkdir()
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        [job] = [job for job in config["scrape_configs"] if job["job_name"] == "servegate"]
        job["static_configs"] = [{"targets": targets}]
        # rule_files are relative to the config file: beside it here, as in docker compose.
        assert config["rule_files"] == ["alerts.yml"]
        shutil.copy(PROMETHEUS_DIR / "alerts.yml", directory / "alerts.yml")
        config_file = directory / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        port = free_port()
        log_path = directory / "prometheus.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


async def eventually(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
    """Poll `probe` until `done` holds or WAIT seconds passed; the last value either way, so
    the caller's assertion shows what Prometheus really had."""
    deadline = time.monotonic() + WAIT
    while True:
        value = await probe()
        if done(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.25)


def instance(gate: Servegate) -> str:
    return f"127.0.0.1:{gate.admin_port}"


async def provoke(
    category: Category, gate: Servegate, client: aiohttp.ClientSession
) -> tuple[int, str | None]:
    """Exactly one 4503 of `category` from `gate` (set up for it below): the answer's status
    and X-Servegate-Category."""
    if category is Category.COMMUNICATION:
        # The first request leaves a pooled connection; the server closes it under the second,
        # whose body is larger than the replay buffer, so servegate cannot hide it.
        async with client.post(gate_url(gate, "/small"), data=b"x") as response:
            assert response.status == 200
        request = client.post(gate_url(gate, "/big"), data=b"y" * 4096)
    elif category is Category.PROTOCOL:
        request = client.get(gate_url(gate, "/health"))  # HTTPS to a plain Gunicorn
    elif category is Category.TIMEOUT:
        request = client.post(gate_url(gate, "/predict?sleep=4"), json={"inputs": [1, 2, 3, 4]})
    else:
        request = client.post(gate_url(gate, "/predict"), data=b"{}")  # nothing listens
    async with request as response:
        await response.read()
        return response.status, response.headers.get("X-Servegate-Category")


async def start_gates(
    start_gate: StartGate, model: Gunicorn, closes_idle_on_reuse: ClosesIdleOnReuse
) -> dict[Category, Servegate]:
    """One servegate per category, each in front of an upstream that provokes only that one."""
    communication = await start_gate(
        closes_idle_on_reuse.url,
        **{"upstream.idle_expiry": 30, "retry.replay_buffer_bytes": 1024},
    )
    close_when_reused(communication, closes_idle_on_reuse)
    return {
        Category.COMMUNICATION: communication,
        Category.PROTOCOL: await start_gate(model.url.replace("http://", "https://")),
        Category.TIMEOUT: await start_gate(
            model.url, **{"budget.seconds": 2.0, "budget.margin": 0.5}
        ),
        Category.SERVICE: await start_gate(
            f"http://127.0.0.1:{free_port()}",
            # Refused until the budget ends, before health checks or the circuit call it down.
            **{
                "budget.seconds": 1.5,
                "budget.margin": 0.5,
                "health.unhealthy_threshold": 100,
                "circuit.failure_threshold": 1000,
            },
        ),
    }


async def test_prometheus_sees_a_4503_in_exactly_the_categories_that_were_provoked(
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
    closes_idle_on_reuse: ClosesIdleOnReuse,
    prometheus: Callable[[list[str]], Prometheus],
    client: aiohttp.ClientSession,
) -> None:
    gates = await start_gates(start_gate, gunicorn(), closes_idle_on_reuse)
    targets = sorted(instance(gate) for gate in gates.values())
    server = prometheus(targets)
    await server.wait_ready(client)

    async def totals() -> dict[str, dict[str, float]]:
        """servegate_4503_total as Prometheus has it: instance -> category -> count."""
        query = 'sum by (instance, category) (servegate_4503_total{job="servegate"})'
        found: dict[str, dict[str, float]] = {}
        for result in await server.query(client, query):
            labels = result["metric"]
            found.setdefault(labels["instance"], {})[labels["category"]] = float(result["value"][1])
        return found

    zero = {target: dict.fromkeys(Category, 0.0) for target in targets}
    before = await eventually(totals, lambda found: found == zero)
    assert before == zero  # every servegate scraped, every category there, at zero

    answers = await asyncio.gather(*(provoke(c, gate, client) for c, gate in gates.items()))
    assert answers == [
        (504 if category is Category.TIMEOUT else 503, category) for category in gates
    ]

    expected = {
        instance(gate): {category: float(category is provoked) for category in Category}
        for provoked, gate in gates.items()
    }
    after = await eventually(totals, lambda found: found == expected)
    assert after.keys() == before.keys()
    increased = {
        target: {
            category: after[target][category] - before[target][category] for category in Category
        }
        for target in after
    }
    assert increased == expected

    up = await server.query(client, 'up{job="servegate"}')
    assert {result["metric"]["instance"]: result["value"][1] for result in up} == dict.fromkeys(
        targets, "1"
    )

    async def active_4503_alerts() -> set[tuple[str, str]]:
        alerts = (await server.api(client, "alerts"))["alerts"]
        return {
            (alert["labels"]["instance"], alert["labels"]["category"])
            for alert in alerts
            if alert["labels"]["alertname"].startswith("Servegate4503")
            and alert["state"] in ("pending", "firing")
        }

    # The shipped rules see the same thing: one alert goes active per provoked category
    # (pending until its `for:` has passed), on the servegate that answered it.
    provoked = {(instance(gate), category.value) for category, gate in gates.items()}
    assert await eventually(active_4503_alerts, lambda active: active == provoked) == provoked


async def test_every_dashboard_query_and_alert_rule_evaluates_on_servegates_series(
    start_gate: StartGate,
    gunicorn: Callable[..., Gunicorn],
    prometheus: Callable[[list[str]], Prometheus],
    client: aiohttp.ClientSession,
) -> None:
    gate = await start_gate(gunicorn().url)
    async with client.post(gate_url(gate, "/predict"), json={"inputs": [1, 2, 3, 4]}) as response:
        assert response.status == 200  # so the request series exist from the first scrape
    server = prometheus([instance(gate)])
    await server.wait_ready(client)

    async def scrapes() -> int:
        samples = await server.query(client, 'count_over_time(up{job="servegate"}[1m])')
        return int(float(samples[0]["value"][1])) if samples else 0

    # rate() needs two samples in its window; three scrapes leave room for a slow first one.
    assert await eventually(scrapes, lambda count: count >= 3) >= 3

    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        # Grafana's label_values(selector, label): the selector must find series with the label.
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector, label = match.groups()
        queries.append((f"${variable['name']}", f"count by ({label}) ({selector})"))
    empty = []
    for title, expr in queries:
        promql = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        assert "$" not in promql, f"{title}: a dashboard variable this test does not know"
        if not await server.query(client, promql):
            empty.append((title, promql))
    assert not empty, f"queries with no data from a servegate that served a request: {empty}"

    async def rule_health() -> dict[str, str]:
        groups = (await server.api(client, "rules"))["groups"]
        return {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}

    health = await eventually(
        rule_health, lambda found: bool(found) and set(found.values()) == {"ok"}
    )
    alert_names = {
        rule["alert"]
        for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    assert health == dict.fromkeys(alert_names, "ok")
