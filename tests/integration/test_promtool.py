"""promtool accepts the shipped alert rules, and their unit tests pass."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool

pytestmark = pytest.mark.slow  # promtool, as a process

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "config" / "prometheus"
ALERTS_FILE = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST_FILE = PROMETHEUS_DIR / "alerts_test.yml"


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = require_tool("promtool")

    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS_FILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}"


def test_every_alert_passes_its_promtool_unit_tests() -> None:
    promtool = require_tool("promtool")

    # rule_files in the test file are relative to it: run where both files are.
    result = subprocess.run(
        [promtool, "test", "rules", ALERTS_TEST_FILE.name],
        cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == 0, f"promtool test rules:\n{result.stdout}{result.stderr}"
    assert "SUCCESS" in result.stdout
