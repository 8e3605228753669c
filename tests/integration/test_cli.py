"""The command line as an operator meets it: servegate run as a real process."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import Certificates, inflight_requests
from tests.upstreams.gunicorn import ROOT, Gunicorn, free_port, wait_for_port

pytestmark = pytest.mark.slow  # each test runs the servegate command as a process

SERVEGATE = [sys.executable, "-m", "proxy"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SERVEGATE, *args], capture_output=True, text=True, timeout=30, cwd=ROOT, env=env
    )


@pytest.fixture
def servegate_process() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [*SERVEGATE, "run", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        process.stdout.close()  # type: ignore[union-attr]
        process.stderr.close()  # type: ignore[union-attr]


def test_check_config_prints_the_effective_settings_of_the_shipped_example() -> None:
    result = run_cli("check-config", str(ROOT / "config" / "servegate.yaml"))
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["budget"]["seconds"] == 40
    assert effective["server"]["listen"] == "0.0.0.0:8080"


def test_check_config_names_every_offending_key_and_exits_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "upstream:\n  url: ftp://model\nbudget:\n  seconds: -3\nserver:\n  listne: x\n"
    )
    result = run_cli("check-config", str(broken))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert any("upstream.url" in line and "ftp://model" in line for line in lines)
    assert any("budget.seconds" in line for line in lines)
    assert any("server.listne: unknown setting" in line for line in lines)


def test_check_config_on_a_file_that_is_not_yaml_exits_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("upstream: [unclosed\n")
    result = run_cli("check-config", str(broken))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_flags_beat_environment_which_beats_the_file(tmp_path: Path) -> None:
    file = tmp_path / "s.yaml"
    file.write_text("budget:\n  seconds: 30\n  margin: 2\nupstream:\n  url: http://file:1\n")
    env = {"SERVEGATE_BUDGET__SECONDS": "20", "SERVEGATE_UPSTREAM__URL": "http://env:2"}
    result = run_cli("check-config", str(file), env={**env, "PATH": "/usr/bin:/bin"})
    effective = json.loads(result.stdout)
    assert (effective["budget"]["seconds"], effective["budget"]["margin"]) == (20, 2)
    assert effective["upstream"]["url"] == "http://env:2"


def test_a_port_in_use_stops_start_up_with_one_clear_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            "run", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{free_port()}"
        )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"servegate: cannot listen on 127.0.0.1:{port}: address already in use"
    )


def test_an_upstream_ca_file_that_is_no_certificate_stops_start_up_with_one_line(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    settings = tmp_path / "s.yaml"
    settings.write_text(f"upstream: {{url: 'https://127.0.0.1:8443', tls: {{ca_file: {ca}}}}}\n")
    result = run_cli(
        "run",
        "--config",
        str(settings),
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--admin-listen",
        f"127.0.0.1:{free_port()}",
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"servegate: cannot load upstream.tls.ca_file {ca}: ")
    for command in (["check-config", str(settings)], ["doctor", "--config", str(settings)]):
        checked = run_cli(*command)
        assert checked.returncode == 2
        [line] = checked.stderr.strip().splitlines()
        assert f"cannot load upstream.tls.ca_file {ca}: " in line


def test_an_invalid_flag_value_exits_2_naming_the_key() -> None:
    result = run_cli("run", "--listen", "nowhere")
    assert result.returncode == 2
    assert "server.listen" in result.stderr


@pytest.mark.time_limit(40)
def test_sigterm_fails_readiness_at_once_and_lets_in_flight_requests_finish(
    gunicorn: Callable[..., Gunicorn],
    servegate_process: Callable[..., subprocess.Popen[str]],
    tmp_path: Path,
) -> None:
    model = gunicorn()
    data, admin = free_port(), free_port()
    no_quiet_period = tmp_path / "servegate.yaml"  # test_shutdown.py covers the quiet period
    no_quiet_period.write_text("server:\n  shutdown_quiet: 0\n")
    process = servegate_process(
        "--upstream", model.url, "--listen", f"127.0.0.1:{data}", "--admin-listen",
        f"127.0.0.1:{admin}", "--config", str(no_quiet_period),
    )  # fmt: skip
    wait_for_port(data, process)  # type: ignore[arg-type]
    wait_for_port(admin, process)  # type: ignore[arg-type]
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(post_status, f"http://127.0.0.1:{data}/predict?sleep=2")
        for _ in range(200):  # up to 10 s, until the slow prediction is in flight
            if inflight_requests(admin) == 1:
                break
            time.sleep(0.05)
        assert inflight_requests(admin) == 1
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises(urllib.error.URLError):  # 503, or already closed: never ready
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2)
        with pytest.raises(ConnectionRefusedError):  # no longer accepting
            socket.create_connection(("127.0.0.1", data), timeout=1).close()
        assert slow.result(timeout=10) == 200
    assert process.wait(timeout=10) == 0


def post_status(url: str) -> int:
    request = urllib.request.Request(url, data=b'{"inputs": [1, 2, 3, 4]}', method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def test_at_the_connection_limit_an_idle_tls_connection_makes_room_on_the_real_event_loop(
    gunicorn: Callable[..., Gunicorn],
    servegate_process: Callable[..., subprocess.Popen[str]],
    certificates: Certificates,
    tmp_path: Path,
) -> None:
    """`servegate run` on uvloop, whose accepted TLS connection hands back its own TLS
    protocol rather than servegate's: idle TLS keep-alive connections are still found and
    closed for new ones, and the limit holds."""
    model = gunicorn()
    data, admin = free_port(), free_port()
    settings = tmp_path / "servegate.yaml"
    settings.write_text(
        f"server:\n  max_connections: 3\n  tls: auto\n  cert_file: {certificates.cert_file}\n"
        f"  key_file: {certificates.key_file}\n"
    )
    process = servegate_process(
        "--upstream", model.url, "--listen", f"127.0.0.1:{data}", "--admin-listen",
        f"127.0.0.1:{admin}", "--config", str(settings),
    )  # fmt: skip
    wait_for_port(data, process)  # type: ignore[arg-type]
    wait_for_port(admin, process)  # type: ignore[arg-type]
    trusting = ssl.create_default_context(cafile=str(certificates.ca_file))
    kept: list[ssl.SSLSocket] = []
    try:
        for index in range(5):  # the fourth and fifth each close the oldest idle one
            plain = socket.create_connection(("127.0.0.1", data), timeout=10)
            tls = trusting.wrap_socket(plain, server_hostname="localhost")
            kept.append(tls)
            tls.sendall(b"GET /k%d HTTP/1.1\r\nHost: model\r\n\r\n" % index)
            assert tls.recv(12) == b"HTTP/1.1 404"  # the model's own answer: no 429
        time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as answer:
            metrics = answer.read().decode()
    finally:
        for tls in kept:
            tls.close()
    assert "servegate_client_connections_reclaimed_total 2.0" in metrics
    assert "servegate_client_connections 3.0" in metrics
