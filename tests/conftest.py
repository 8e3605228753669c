"""Shared fixtures: settings factory, servegate on free loopback ports, log capture, metrics
reading, trustme certificates, the Gunicorn demo model, a per-test time limit, and a leak check
that fails the test which left a socket, transport or session open."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tracemalloc
import urllib.request
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from proxy import config, logs
from proxy.app import Servegate
from tests.upstreams.apps import Recorder, recording_app
from tests.upstreams.gunicorn import Gunicorn, start_gunicorn
from tests.upstreams.raw import ClosesIdleOnReuse
from tests.upstreams.uvicorn import Uvicorn, start_uvicorn

DEFAULT_TIME_LIMIT = 60


class TestTimedOut(BaseException):
    """Raised into a test that overran its limit; a BaseException so no handler swallows it."""


@pytest.fixture(autouse=True)
def _time_limit(request: pytest.FixtureRequest) -> Iterator[None]:
    marker = request.node.get_closest_marker("time_limit")
    limit = int(marker.args[0]) if marker else DEFAULT_TIME_LIMIT

    def overran(_signum: int, _frame: object) -> None:
        raise TestTimedOut(f"test ran longer than {limit} s")

    previous = signal.signal(signal.SIGALRM, overran)
    signal.alarm(limit)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Everything imported so far lives for the whole session: set it aside, so the collection
    after each test (below) looks only at what tests made (about 90 ms less per test)."""
    gc.collect()
    gc.freeze()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """After every fixture of the test is gone (its event loop too), collect garbage and fail the
    test if that finds a socket, transport, session or process it left open.

    Without this, a leak surfaces as a ResourceWarning whenever the garbage collector happens to
    run: in a later test, or at the end of the session, where it fails the whole run and names
    no culprit."""
    try:
        yield
    finally:  # also when a fixture's teardown failed: its leaks are not a later test's
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
    leaks = sorted({_described(w) for w in caught if issubclass(w.category, ResourceWarning)})
    if leaks:
        pytest.fail(f"{item.nodeid} left resources open: " + "; ".join(leaks), pytrace=False)


def _described(leak: warnings.WarningMessage) -> str:
    """The warning, and where the object was made when tracemalloc traces (PYTHONTRACEMALLOC=20)."""
    made = tracemalloc.get_object_traceback(leak.source) if leak.source is not None else None
    return str(leak.message) + ("\n" + "\n".join(made.format()) if made else "")


def require_tool(name: str) -> str:
    """A tool the tests need: missing is a failure (make test installs it), never a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test` installs it (apt-get)")
    return path


def make_settings(**flat: Any) -> config.Settings:
    """Settings for a test: loopback, any free port, plus dotted overrides."""
    base = {"server.listen": "127.0.0.1:0", "server.admin_listen": "127.0.0.1:0"}
    return config.load(None, environ={}, overrides={**base, **flat})


@contextlib.contextmanager
def no_descriptor_left(spare: int) -> Iterator[None]:
    """For the block, this process (servegate too, when it runs in the test's loop) can open
    no file: its open-file limit is lowered to `spare` above its highest descriptor and every
    number below that is taken. Both are given back afterwards, also on failure."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        highest = max(int(name) for name in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + spare, hard))
        for _ in range(highest + spare):  # every number below the limit taken
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        yield
    finally:
        for descriptor in fillers:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass
class LogCapture:
    stream: io.StringIO

    def lines(self) -> list[dict[str, Any]]:
        logs.flush()  # lines are written once per event-loop step
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    def access(self) -> list[dict[str, Any]]:
        return self.events("request")


@pytest.fixture
def log_capture() -> LogCapture:
    capture = LogCapture(io.StringIO())
    logs.configure(config.LoggingSettings(level="debug", format="json"), capture.stream)
    return capture


StartGate = Callable[..., Awaitable[Servegate]]


@pytest.fixture
async def start_gate(log_capture: LogCapture) -> AsyncIterator[StartGate]:
    """Start servegate in this test's event loop; every one started is stopped afterwards."""
    started: list[Servegate] = []

    async def start(upstream: str, **flat: Any) -> Servegate:
        gate = Servegate(make_settings(**{"upstream.url": upstream, **flat}))
        await gate.start()
        started.append(gate)
        return gate

    yield start
    for gate in started:
        await gate.stop()


def gate_url(gate: Servegate, path: str = "/") -> str:
    return f"http://127.0.0.1:{gate.data_port}{path}"


async def scrape(gate: Servegate) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The admin port's /metrics, parsed: (sample name, labels) -> value."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{gate.admin_port}/metrics") as response,
    ):
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def inflight_requests(admin_port: int) -> float:
    """servegate_inflight_requests from a servegate process's admin port (blocking)."""
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == "servegate_inflight_requests":
                return float(found.value)
    raise AssertionError("servegate_inflight_requests is not exported")


async def assert_4503(
    response: aiohttp.ClientResponse, status: int, category: str, cause: str
) -> dict[str, Any]:
    """The JSON 4503 answer with its headers, naming `category` and `cause`; returns the body."""
    assert response.status == status
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Servegate-Category"] == category
    body = await response.json()
    assert body["error_code"] == "ModelArts.4503"
    assert (body["category"], body["cause"]) == (category, cause)
    assert body["request_id"] == response.headers["X-Request-Id"]
    assert body["hint"]
    return body


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


class Startable(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


S = TypeVar("S", bound=Startable)


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[S], Awaitable[S]]]:
    """Start a raw server or relay (tests/upstreams/raw.py); each is stopped afterwards."""
    started: list[Startable] = []

    async def start(server: S) -> S:
        await server.start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        await server.stop()


@pytest.fixture
async def closes_idle_on_reuse(raw_server: Callable[..., Any]) -> ClosesIdleOnReuse:
    return await raw_server(ClosesIdleOnReuse())


def close_when_reused(gate: Servegate, server: ClosesIdleOnReuse) -> None:
    """Make `server` close its idle connections in the instant after `gate` takes a connection
    from its keep-alive pool and before it writes the request on it: the race of an idle
    timer's close with a request, certain instead of microseconds wide. The close, the request
    and the reset are real; only their order is arranged."""
    upstream = gate.upstream
    assert upstream is not None, "start the gate first"
    pool = upstream.pool("http", fresh=False)
    acquire = pool.acquire

    async def acquire_then_close(*args: Any, **kwargs: Any) -> Any:
        connection = await acquire(*args, **kwargs)
        server.close_idle()
        return connection

    pool.acquire = acquire_then_close  # type: ignore[method-assign]


@pytest.fixture
async def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def upstream_url(aiohttp_server: Any, recorder: Recorder) -> str:
    """An in-process aiohttp upstream that records what reached it (tests/upstreams/apps.py)."""
    server = await aiohttp_server(recording_app(recorder))
    return f"http://127.0.0.1:{server.port}"


@dataclass(frozen=True)
class Certificates:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path


def tls10_only(certificates: Certificates) -> ssl.SSLContext:
    """A server context that speaks TLS 1.0 alone: it answers a modern client's hello with a
    protocol-version alert."""
    legacy = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.warns(DeprecationWarning, match="TLSv1"):  # what such a server is
        legacy.minimum_version = legacy.maximum_version = ssl.TLSVersion.TLSv1
    legacy.set_ciphers("DEFAULT:@SECLEVEL=0")
    legacy.load_cert_chain(certificates.cert_file, certificates.key_file)
    return legacy


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = (directory / name for name in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(ca_file)
    server.private_key_and_cert_chain_pem.write_to_path(cert_file)
    server.private_key_pem.write_to_path(key_file)
    return Certificates(ca, ca_file, cert_file, key_file)


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    """Start the demo model under Gunicorn; each one is stopped by pid, also on failure."""
    started: list[Gunicorn] = []

    def start(*args: str, **kwargs: Any) -> Gunicorn:
        server = start_gunicorn(tmp_path, *args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def uvicorn(tmp_path: Path) -> Iterator[Callable[..., Uvicorn]]:
    """Start a real Uvicorn (tests/upstreams/asgi.py); each one is stopped by pid."""
    started: list[Uvicorn] = []

    def start(*args: str) -> Uvicorn:
        server = start_uvicorn(tmp_path, "tests.upstreams.asgi:app", "--no-access-log", *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


BUSY_LOOP = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"


@pytest.fixture
def cpu_load() -> Iterator[Callable[[float], None]]:
    """Keep every core busy: one bounded busy loop per core, each stopped by pid afterwards."""
    loops: list[subprocess.Popen[bytes]] = []

    def start(seconds: float) -> None:
        for _ in range(os.cpu_count() or 2):
            code = BUSY_LOOP.format(seconds=seconds)
            loops.append(subprocess.Popen([sys.executable, "-c", code]))

    yield start
    for loop in loops:
        loop.kill()
        loop.wait(timeout=10)
