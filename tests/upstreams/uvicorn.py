"""A real Uvicorn serving tests/upstreams/asgi.py, as a subprocess its owner stops by pid."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.upstreams.gunicorn import ROOT, free_port, wait_for_port


@dataclass
class Uvicorn:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_uvicorn(log_dir: Path, *args: str) -> Uvicorn:
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", "tests.upstreams.asgi:app", "--app-dir", str(ROOT),
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log", *args,
    ]  # fmt: skip
    with (log_dir / f"uvicorn-{port}.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    server = Uvicorn(port, process)
    try:
        wait_for_port(port, process)
    except BaseException:
        server.stop()
        raise
    return server
