"""The demo model under a real Gunicorn, as a subprocess that its owner always stops by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None, limit: float = 15) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {limit} s")


@dataclass
class Gunicorn:
    """A running Gunicorn serving demo.model:app on 127.0.0.1."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    tls: bool = False
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_gunicorn(
    log_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    port: int | None = None,
    app: str = "demo.model:app",
) -> Gunicorn:
    port = port or free_port()
    log_path = log_dir / f"gunicorn-{port}.log"
    command = [
        sys.executable, "-m", "gunicorn", "--chdir", str(ROOT), "--bind", f"127.0.0.1:{port}",
        "--no-control-socket", "--worker-class", "gthread", "--workers", "2", "--threads", "4",
        "--graceful-timeout", "1",  # a test stops its server at once, sleeping workers too
        *args,
    ]  # fmt: skip
    if certfile and keyfile:
        command += ["--certfile", str(certfile), "--keyfile", str(keyfile)]
    command.append(app)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    server = Gunicorn(port, process, log_path, tls=certfile is not None)
    try:
        wait_for_port(port, process)
    except BaseException:
        server.stop()
        raise
    return server
