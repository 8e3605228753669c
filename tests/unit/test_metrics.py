"""Importing the metrics (the series and their label enums) loads no listener or TLS code."""

from __future__ import annotations

import subprocess
import sys


def test_importing_metrics_loads_neither_the_listener_nor_cryptography() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, proxy.metrics; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert "proxy.metrics" in loaded
    assert "proxy.listener" not in loaded
    assert "proxy.connection" not in loaded
    assert not [name for name in loaded if name.split(".")[0] == "cryptography"]
