"""`servegate doctor` as an operator runs it: a process probing real servers on loopback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from tests.conftest import Certificates
from tests.upstreams.gunicorn import ROOT, Gunicorn, free_port

DOCTOR = [sys.executable, "-m", "proxy", "doctor"]
SAMPLE = '{"inputs": [5.1, 3.5, 1.4, 0.2]}'


def run_doctor(*args: str) -> subprocess.CompletedProcess[str]:
    # The settings the doctor judges against are the built-in defaults, not this machine's.
    env = {name: value for name, value in os.environ.items() if not name.startswith("SERVEGATE_")}
    return subprocess.run(
        [*DOCTOR, *args], capture_output=True, text=True, timeout=50, cwd=ROOT, env=env
    )


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
    assert abs(communication["facts"]["idle_timeout_s"] - 2.0) <= 0.3
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
