"""Processes for the benchmarks: free loopback ports, and stopping by pid, orphans included."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path

HOST = "127.0.0.1"
STOP_TIMEOUT = 10.0  # seconds for a process to exit after SIGTERM (then SIGKILL)


class StartFailed(Exception):
    pass


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together, released just before use)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        return int(stat.rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def children_of(pid: int) -> list[int]:
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and parent_of(int(entry.name)) == pid
    ]


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM by pid, wait, SIGKILL if it stays; then kill any child it left orphaned."""
    if process.poll() is not None:
        return
    children = children_of(process.pid)  # Gunicorn workers, nginx workers
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_TIMEOUT)
    for child in children:
        if parent_of(child) not in (None, process.pid):  # still alive, re-parented: orphaned
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)


def tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"
