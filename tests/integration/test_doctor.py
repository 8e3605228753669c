"""`servegate doctor` as an operator runs it: a process probing real servers on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Certificates, tls10_only
from tests.upstreams.gunicorn import ROOT, Gunicorn, free_port
from tests.upstreams.misbehaving import AnswersWith, ClosesUnread, Silent, SpeaksFirst
from tests.upstreams.raw import (
    OK,
    RawServer,
    SilentOnTlsHello,
    SweepsIdleConnections,
    read_request,
    threaded_server,
)
from tests.upstreams.uvicorn import Uvicorn

# The doctor command as a process, waiting on real servers' idle timers.
pytestmark = pytest.mark.slow

DOCTOR = [sys.executable, "-m", "proxy", "doctor"]
SAMPLE = '{"inputs": [5.1, 3.5, 1.4, 0.2]}'


def _environment() -> dict[str, str]:
    # The settings the doctor judges against are the built-in defaults, not this machine's.
    return {name: value for name, value in os.environ.items() if not name.startswith("SERVEGATE_")}


def run_doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DOCTOR, *args], capture_output=True, text=True, timeout=50, cwd=ROOT, env=_environment()
    )


async def run_doctor_beside(*args: str) -> subprocess.CompletedProcess[str]:
    """The doctor against a server in this test's own event loop, which must keep running."""
    process = await asyncio.create_subprocess_exec(
        *DOCTOR, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=ROOT, env=_environment(),
    )  # fmt: skip
    try:
        async with asyncio.timeout(50):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return subprocess.CompletedProcess(DOCTOR, process.returncode, out.decode(), err.decode())


def report_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_measures_gunicorns_two_second_keep_alive_and_finds_nothing_wrong(
    gunicorn: Callable[..., Gunicorn],
) -> None:
    model = gunicorn("--keep-alive", "2")
    result = run_doctor(
        "--upstream", model.url, "--health-path", "/health", "--sample-body", SAMPLE, "--json",
        "--max-idle-wait", "10",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = report_of(result)
    communication = report["checks"]["communication"]
    assert communication["verdict"] == "ok"
    assert communication["facts"]["closed_by"] == "eof"
    # gthread sweeps idle connections after each poll (at most 1 s): per connection or swept,
    # the setting the doctor names is the 2 s it was given, never 1 s.
    assert communication["facts"]["server_setting_s"] == 2.0
    assert communication["facts"]["suggested_idle_expiry_s"] == 1.0  # expiry_for(2 s)
    assert report["checks"]["timeout"]["facts"]["request"] == "POST /predict"
    assert report["checks"]["timeout"]["facts"]["status"] == 200
    assert report["checks"]["service"]["facts"]["status"] == 200
    assert report["checks"]["protocol"]["facts"]["server_speaks"] == "http"
    assert report["ok"] is True


def test_a_tls_server_behind_an_http_url_is_a_protocol_failure_naming_the_direction(
    gunicorn: Callable[..., Gunicorn], certificates: Certificates
) -> None:
    model = gunicorn(certfile=certificates.cert_file, keyfile=certificates.key_file)
    plain_url = f"http://127.0.0.1:{model.port}"
    result = run_doctor("--upstream", plain_url, "--json", "--max-idle-wait", "3")
    assert result.returncode == 1, result.stdout + result.stderr
    report = report_of(result)
    protocol = report["checks"]["protocol"]
    assert protocol["verdict"] == "fail"
    assert protocol["cause"] == "plain_to_tls_server"
    assert protocol["facts"]["direction"] == "plain_to_tls_server"
    assert protocol["facts"]["server_speaks"] == "https"
    assert any(
        "https://" in line and "upstream.scheme: auto" in line for line in protocol["advice"]
    )
    # The trustme CA is not among the system CAs: switching to https:// alone would not do.
    assert "issuer" in protocol["facts"]["certificate"]
    # The other checks spoke TLS, as the server does, and measured it.
    assert report["checks"]["service"]["verdict"] == "ok"
    assert report["ok"] is False


def test_a_long_keep_alive_beyond_the_wait_is_reported_as_longer_and_is_ok(
    gunicorn: Callable[..., Gunicorn],
) -> None:
    model = gunicorn("--keep-alive", "60")
    result = run_doctor("--upstream", model.url, "--health-path", "/health", "--max-idle-wait", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^communication\s+OK$", result.stdout, re.MULTILINE), result.stdout
    assert "longer than 3 s" in result.stdout
    assert result.stdout.rstrip().endswith("Nothing found that would cause a 4503.")


def test_a_dead_port_is_a_service_failure_and_nothing_else_is_measured() -> None:
    result = run_doctor("--upstream", f"http://127.0.0.1:{free_port()}", "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    checks = report_of(result)["checks"]
    assert (checks["service"]["verdict"], checks["service"]["cause"]) == ("fail", "connect_refused")
    assert checks["service"]["facts"]["error"] == "connection refused"
    assert {checks[name]["verdict"] for name in ("protocol", "communication", "timeout")} == {
        "skipped"
    }


def test_a_bad_url_exits_2_with_one_line() -> None:
    result = run_doctor("--upstream", "ftp://model")
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert "upstream.url" in line
    assert "ftp://model" in line


def test_uvicorns_per_connection_keep_alive_is_named_exactly(
    uvicorn: Callable[..., Uvicorn],
) -> None:
    model = uvicorn("--timeout-keep-alive", "2")
    result = run_doctor("--upstream", model.url, "--json", "--max-idle-wait", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    communication = report_of(result)["checks"]["communication"]
    assert communication["verdict"] == "ok"
    assert communication["facts"]["closes_idle"] == "per connection"
    assert communication["facts"]["server_setting_s"] == 2.0
    assert communication["facts"]["suggested_idle_expiry_s"] == 1.0
    assert "set to 2 s, likely" in " ".join(communication["advice"])


@pytest.mark.time_limit(120)
def test_the_keep_alive_verdict_holds_with_every_core_busy(
    uvicorn: Callable[..., Uvicorn], cpu_load: Callable[[float], None]
) -> None:
    model = uvicorn("--timeout-keep-alive", "2")
    cpu_load(90)
    result = run_doctor("--upstream", model.url, "--json", "--max-idle-wait", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    communication = report_of(result)["checks"]["communication"]
    assert communication["verdict"] == "ok", communication
    assert communication["facts"]["server_setting_s"] == 2.0, communication
    assert communication["facts"]["suggested_idle_expiry_s"] == 1.0


async def test_a_server_that_sweeps_idle_connections_gets_a_range_not_a_false_number(
    raw_server: Callable[..., Any],
) -> None:
    server = await raw_server(SweepsIdleConnections(channel_timeout=2.0, cleanup_interval=1.0))
    result = await run_doctor_beside("--upstream", server.url, "--json", "--max-idle-wait", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    communication = report_of(result)["checks"]["communication"]
    facts = communication["facts"]
    assert facts["closes_idle"] == "in a periodic sweep", communication
    assert 2.0 <= facts["idle_timeout_s"] < facts["idle_timeout_longest_s"] < 3.5
    assert facts["server_setting_s"] == 2.0
    assert facts["suggested_idle_expiry_s"] == 1.0
    assert "periodic sweep" in communication["advice"][0]


@pytest.mark.parametrize(("scheme", "verdict"), [("http", "ok"), ("https", "fail")])
async def test_a_server_silent_on_a_tls_hello_that_answers_http_speaks_plain_http(
    scheme: str, verdict: str, raw_server: Callable[..., Any]
) -> None:
    server = await raw_server(SilentOnTlsHello(keep_alive=5.0))
    url = f"{scheme}://127.0.0.1:{server.port}"
    result = await run_doctor_beside("--upstream", url, "--json", "--max-idle-wait", "1")
    protocol = report_of(result)["checks"]["protocol"]
    assert protocol["verdict"] == verdict, protocol
    assert protocol["facts"]["server_speaks"] == "http"
    assert protocol["facts"]["tls_hello"] == "no answer within 3 s"
    if scheme == "https":
        assert protocol["cause"] == "tls_to_plain_server"
        assert result.returncode == 1


def test_an_adopted_https_whose_certificate_fails_is_a_failure_not_a_warning(
    gunicorn: Callable[..., Gunicorn], certificates: Certificates, tmp_path: Path
) -> None:
    """With upstream.scheme: auto servegate adopts the server's TLS, and then fails every
    request on its certificate (the trustme CA is not trusted here): a 4503 cause, exit 1."""
    model = gunicorn(certfile=certificates.cert_file, keyfile=certificates.key_file)
    settings = tmp_path / "s.yaml"
    settings.write_text("upstream: {scheme: auto}\n")
    result = run_doctor(
        "--upstream", f"http://127.0.0.1:{model.port}", "--config", str(settings), "--json",
        "--max-idle-wait", "3",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    protocol = report_of(result)["checks"]["protocol"]
    assert (protocol["verdict"], protocol["cause"]) == ("fail", "tls_certificate")


def test_a_health_path_slower_than_the_health_timeout_is_a_failure(
    gunicorn: Callable[..., Gunicorn],
) -> None:
    """servegate's checks would time out as the doctor's did: the server marked down and
    every request refused while the circuit is open."""
    model = gunicorn()
    result = run_doctor(
        "--upstream", model.url, "--health-path", "/health?sleep=1.5", "--json",
        "--max-idle-wait", "3",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert report_of(result)["checks"]["service"]["verdict"] == "fail"


OTHER_PROTOCOLS = {  # a port's first words, and what the doctor says they are
    "ssh": (SpeaksFirst(banner=b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"), "not in HTTP/1.1"),
    "http2": (
        SpeaksFirst(banner=b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64"),
        "answered in HTTP/2",
    ),
    "redis": (AnswersWith(answer=b"-ERR unknown command 'GET'\r\n"), "not in HTTP/1.1"),
}


@pytest.mark.parametrize("port", OTHER_PROTOCOLS)
async def test_a_port_of_another_protocol_is_named_so_at_once(
    port: str, raw_server: Callable[..., Any]
) -> None:
    """No blank line ends what such a port says: read as an HTTP head, it took the whole
    budget three times over and was reported as a timeout and crashing workers."""
    shape, said = OTHER_PROTOCOLS[port]
    server = await raw_server(shape)
    result = await run_doctor_beside("--upstream", server.url, "--max-idle-wait", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "protocol       FAIL  (protocol/malformed_response)" in result.stdout
    assert said in result.stdout
    assert "crashing workers" not in result.stdout
    for check in ("timeout", "communication"):
        assert f"{check:<14} SKIPPED" in result.stdout, result.stdout


async def test_a_server_that_ends_every_connection_unanswered_gets_true_pairs(
    raw_server: Callable[..., Any],
) -> None:
    """Each cause is shown with its own category, as the error answers show it: the timeout
    check's request dropped by the server is service/reset_during_request."""
    server = await raw_server(ClosesUnread())
    result = await run_doctor_beside("--upstream", server.url, "--max-idle-wait", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    pairs = set(re.findall(r"\((\w+)/(\w+)\)", result.stdout))
    assert pairs == {("service", "reset_during_request")}, result.stdout
    assert "ends them without a word" in result.stdout


async def test_a_silent_server_costs_one_budget_and_is_no_timeout_verdict(
    raw_server: Callable[..., Any],
) -> None:
    """The timeout check's request would be the service check's own GET again: the same
    silence, waited out twice, and a timeout verdict for a server that never answers."""
    server = await raw_server(Silent())
    result = await run_doctor_beside(
        "--upstream", server.url, "--budget", "4", "--json", "--max-idle-wait", "1"
    )
    checks = report_of(result)["checks"]
    assert result.returncode == 1
    assert checks["service"]["verdict"] == "fail"
    assert "did not answer GET / within the 4 s budget" in checks["service"]["advice"][0]
    assert checks["timeout"]["verdict"] == checks["communication"]["verdict"] == "skipped"
    assert checks["protocol"]["verdict"] == "warn"


def test_a_tls_server_that_refuses_servegates_versions_is_a_handshake_failure(
    certificates: Certificates,
) -> None:
    """Not a certificate failure: no CA file or server name makes a TLS 1.0 server speak
    TLS 1.2."""
    legacy = tls10_only(certificates)

    def refuse(connection: socket.socket, _stop: threading.Event) -> None:
        legacy.wrap_socket(connection, server_side=True)  # OpenSSL's alert, then the close

    with threaded_server(refuse) as port:
        result = run_doctor("--upstream", f"https://127.0.0.1:{port}", "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    protocol = report_of(result)["checks"]["protocol"]
    assert (protocol["verdict"], protocol["cause"]) == ("fail", "tls_handshake"), protocol
    assert "certificate" not in protocol["facts"]


def test_a_server_that_requires_a_client_certificate_is_a_handshake_failure(
    gunicorn: Callable[..., Gunicorn], certificates: Certificates, tmp_path: Path
) -> None:
    """TLS 1.3 refuses the missing certificate after the handshake, on the first read: the
    protocol check waits for that alert, and the service check's GET names it, not a crashing
    worker."""
    model = gunicorn(
        "--cert-reqs", "2", "--ca-certs", str(certificates.ca_file),  # CERT_REQUIRED
        certfile=certificates.cert_file, keyfile=certificates.key_file,
    )  # fmt: skip
    settings = tmp_path / "s.yaml"
    settings.write_text(f"upstream: {{tls: {{ca_file: {certificates.ca_file}}}}}\n")
    result = run_doctor(
        "--upstream", f"https://127.0.0.1:{model.port}", "--config", str(settings), "--json",
        "--max-idle-wait", "2",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    checks = report_of(result)["checks"]
    protocol, service = checks["protocol"], checks["service"]
    assert (protocol["verdict"], protocol["cause"]) == ("fail", "tls_handshake"), protocol
    assert "certificate required" in protocol["facts"]["handshake"]
    assert service["cause"] == "tls_handshake", service
    assert checks["timeout"]["verdict"] == "skipped"


@dataclass
class AnswersOnlyPost(RawServer):
    """Never answers a GET (a health route stuck behind a lock), answers a POST at once."""

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while (head := await read_request(reader)) is not None:
            if head.startswith(b"GET"):
                await asyncio.Event().wait()  # until the test stops the server
            writer.write(OK)
            await writer.drain()


async def test_a_sample_request_is_timed_though_the_health_get_got_no_answer(
    raw_server: Callable[..., Any],
) -> None:
    server = await raw_server(AnswersOnlyPost())
    result = await run_doctor_beside(
        "--upstream", server.url, "--budget", "3", "--sample-body", SAMPLE, "--json",
        "--max-idle-wait", "1",
    )  # fmt: skip
    checks = report_of(result)["checks"]
    assert checks["service"]["verdict"] == "fail"
    assert checks["timeout"]["verdict"] == "ok", checks["timeout"]
    assert checks["timeout"]["facts"]["request"] == "POST /predict"
