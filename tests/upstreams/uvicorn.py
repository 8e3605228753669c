"""A real Uvicorn with several workers, as a subprocess that its owner always stops by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.upstreams.gunicorn import ROOT, free_port, wait_for_port


@dataclass
class Uvicorn:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM to its process group (the master and its workers), SIGKILL if it lingers."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start_uvicorn(
    log_dir: Path, app: str, *args: str, env: dict[str, str] | None = None
) -> Uvicorn:
    port = free_port()
    log_path = log_dir / f"uvicorn-{port}.log"
    command = [
        sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
        "--app-dir", str(ROOT), *args,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
            start_new_session=True,  # its own group: stop() reaches every worker
        )
    server = Uvicorn(port, process, log_path)
    try:
        wait_for_port(port, process)
    except BaseException:
        server.stop()
        raise
    return server
