"""On SIGTERM servegate fails /readyz at once, keeps serving through a quiet period so load
balancers notice, then refuses connections, drains, and exits 0; a second signal exits at once."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.test_cli import SERVEGATE, post_status
from tests.upstreams.gunicorn import ROOT, Gunicorn, free_port, wait_for_port

QUIET = 2.0


@pytest.fixture
def servegate(
    tmp_path: Path,
) -> Iterator[Callable[[str], tuple[subprocess.Popen[bytes], int, int]]]:
    """`servegate run` with a 2 s quiet period; stopped by pid afterwards, also on failure."""
    started: list[subprocess.Popen[bytes]] = []

    def start(upstream: str) -> tuple[subprocess.Popen[bytes], int, int]:
        config = tmp_path / "servegate.yaml"
        config.write_text(f"server:\n  shutdown_quiet: {QUIET}\n")
        data, admin = free_port(), free_port()
        process = subprocess.Popen(
            [*SERVEGATE, "run", "--upstream", upstream, "--config", str(config),
             "--listen", f"127.0.0.1:{data}", "--admin-listen", f"127.0.0.1:{admin}"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        started.append(process)
        wait_for_port(data, process)  # type: ignore[arg-type]
        wait_for_port(admin, process)  # type: ignore[arg-type]
        return process, data, admin

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def readyz(admin: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as response:
            return int(response.status), ""
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code), json.loads(error.read())["reason"]


def post_and_read(connection: http.client.HTTPConnection, path: str) -> http.client.HTTPResponse:
    """A prediction on a kept-alive connection, its answer read to the end."""
    connection.request("POST", path, body=b'{"inputs": [[1, 2, 3, 4]]}')
    answer = connection.getresponse()
    answer.read()
    return answer


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return False
    return True


@pytest.mark.time_limit(60)
def test_sigterm_fails_readiness_keeps_serving_through_the_quiet_period_then_refuses_and_exits_0(
    gunicorn: Callable[..., Gunicorn],
    servegate: Callable[[str], tuple[subprocess.Popen[bytes], int, int]],
) -> None:
    process, data, admin = servegate(gunicorn().url)
    deadline = time.monotonic() + 10
    while readyz(admin)[0] != 200:  # the first health check is on its way
        assert time.monotonic() < deadline, readyz(admin)
        time.sleep(0.05)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert readyz(admin) == (503, "servegate is shutting down")
    served = 0
    while time.monotonic() - signalled < QUIET - 0.5:  # new connections, still served
        assert post_status(f"http://127.0.0.1:{data}/predict") == 200
        served += 1
    assert served >= 3
    deadline = signalled + QUIET + 5
    while accepts(data):  # the quiet period ends: no longer accepting
        assert time.monotonic() < deadline, "still accepting long after the quiet period"
        time.sleep(0.05)
    assert time.monotonic() - signalled >= QUIET - 0.1
    assert process.wait(timeout=10) == 0


@pytest.mark.time_limit(60)
def test_answers_in_the_quiet_period_close_their_keep_alive_connection(
    gunicorn: Callable[..., Gunicorn],
    servegate: Callable[[str], tuple[subprocess.Popen[bytes], int, int]],
) -> None:
    """A keep-alive client told `Connection: close` moves on to another instance; one not told
    sends its next request on a connection that closes under it when the quiet period ends."""
    process, data, admin = servegate(gunicorn().url)
    connection = http.client.HTTPConnection("127.0.0.1", data, timeout=10)
    try:
        before = post_and_read(connection, "/predict")
        assert (before.status, before.will_close) == (200, False)
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while readyz(admin)[0] != 503:  # the signal has been handled
            assert time.monotonic() < deadline
            time.sleep(0.05)
        during = post_and_read(connection, "/predict")
        assert (during.status, during.getheader("Connection")) == (200, "close")
    finally:
        connection.close()
    assert process.wait(timeout=15) == 0


@pytest.mark.time_limit(60)
def test_an_answer_in_flight_when_the_signal_comes_closes_its_connection(
    gunicorn: Callable[..., Gunicorn],
    servegate: Callable[[str], tuple[subprocess.Popen[bytes], int, int]],
) -> None:
    """The request came before the signal, its answer after it: the answer says so too."""
    process, data, _admin = servegate(gunicorn().url)
    connection = http.client.HTTPConnection("127.0.0.1", data, timeout=10)
    try:
        # The signal comes while the model works on the request (it sleeps 1 s).
        threading.Timer(0.3, process.send_signal, (signal.SIGTERM,)).start()
        answer = post_and_read(connection, "/predict?sleep=1")
        assert (answer.status, answer.getheader("Connection")) == (200, "close")
    finally:
        connection.close()
    assert process.wait(timeout=15) == 0


@pytest.mark.time_limit(60)
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/predict", b'{"inputs": [[5.1, 3.5, 1.4, 0.2]]}'),
        ("/echo", b"x" * (600 * 1024)),  # past the body reader's buffer: aiohttp pauses it
    ],
    ids=["small", "large"],
)
def test_a_body_still_arriving_when_the_quiet_period_ends_is_read_and_answered(
    path: str,
    body: bytes,
    gunicorn: Callable[..., Gunicorn],
    servegate: Callable[[str], tuple[subprocess.Popen[bytes], int, int]],
) -> None:
    """aiohttp stops reading its connections when the server shuts down: the request whose
    body straddled the end of the quiet period waited for its budget (39 s) and was answered
    as a slow client's."""
    process, data, admin = servegate(gunicorn().url)
    with socket.create_connection(("127.0.0.1", data), timeout=15) as client:
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        deadline = signalled + 5
        while readyz(admin)[0] != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        head = b"POST %s HTTP/1.1\r\nHost: m\r\nContent-Type: application/json\r\n" % (
            path.encode()
        )
        half = len(body) // 2
        client.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:half])
        time.sleep(max(0.0, signalled + QUIET + 1.0 - time.monotonic()))  # past the quiet end
        client.sendall(body[half:])
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := client.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert process.wait(timeout=15) == 0
    assert time.monotonic() - signalled < QUIET + 10  # not held for the budget


@pytest.mark.time_limit(30)
def test_a_second_signal_exits_at_once_with_code_1(
    gunicorn: Callable[..., Gunicorn],
    servegate: Callable[[str], tuple[subprocess.Popen[bytes], int, int]],
) -> None:
    process, data, _ = servegate(gunicorn().url)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert accepts(data)  # in its quiet period
    second = time.monotonic()
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=5) == 1
    assert time.monotonic() - second < QUIET  # did not wait for the quiet period to end


@pytest.mark.slow
@pytest.mark.time_limit(90)
def test_sigterm_under_steady_load_loses_no_request_that_got_in_and_exits_0(
    gunicorn: Callable[..., Gunicorn],
    servegate: Callable[[str], tuple[subprocess.Popen[bytes], int, int]],
) -> None:
    """Eight clients keep predicting (0.3 s each) through a SIGTERM: every request servegate
    accepted is answered 200, in-flight ones included; the only failures are connections
    refused once the quiet period is over; servegate exits 0."""
    process, data, _ = servegate(gunicorn("--workers", "2", "--threads", "8").url)
    url = f"http://127.0.0.1:{data}/predict?sleep=0.3"
    signalled: list[float] = []
    finished = threading.Event()

    def client() -> tuple[list[int], list[tuple[float, str]]]:
        statuses: list[int] = []
        refused: list[tuple[float, str]] = []
        for _ in range(200):  # bounded: about 60 s at most
            try:
                statuses.append(post_status(url))
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as exc:
                refused.append((time.monotonic(), repr(exc)))
                break  # the port is closed: the quiet period is over
            if finished.is_set():
                break
        return statuses, refused

    with ThreadPoolExecutor(max_workers=8) as pool:
        clients = [pool.submit(client) for _ in range(8)]
        time.sleep(1.5)  # steady load first
        signalled.append(time.monotonic())
        process.send_signal(signal.SIGTERM)
        results = [future.result(timeout=60) for future in clients]
        finished.set()
    statuses = [status for answered, _ in results for status in answered]
    refusals = [refusal for _, refused in results for refusal in refused]
    assert statuses, "no request was answered"
    assert set(statuses) == {200}, statuses  # none cut, none answered with an error
    for when, what in refusals:  # only once servegate had stopped accepting
        assert when >= signalled[0] + QUIET - 0.1, what
    assert len(statuses) >= 8 * 3  # served before and through the quiet period
    assert process.wait(timeout=30) == 0
