"""What the benchmarks start: the upstreams (a fixed-answer nginx, the holding model) and the
proxies under test (servegate, nginx, a plain aiohttp proxy), each on a free loopback port,
optionally pinned to CPUs with taskset, and always stopped by pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from processes import HOST, StartFailed, free_ports, stop, tail

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
START_TIMEOUT = 30.0  # seconds for a process to accept connections
ANSWER = '{"outputs": [0]}'  # the fixed answer of the fixed-answer upstream


@dataclass
class Started:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    admin_port: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Processes:
    """Every process a benchmark started, stopped together by pid, also on failure."""

    logs: Path
    started: list[Started] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: list[str],
        port: int,
        cpus: str | None = None,
        cwd: Path = ROOT,
        **env: str,
    ) -> Started:
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        log = self.logs / f"{name}.log"
        with log.open("ab") as output:
            process = subprocess.Popen(
                argv,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env={**os.environ, **env},
            )
        started = Started(name, port, process)
        self.started.append(started)
        _wait_accepting(started, log)
        return started

    def stop(self, started: Started) -> None:
        stop(started.process)
        self.started.remove(started)

    def stop_all(self) -> None:
        for started in reversed(list(self.started)):
            self.stop(started)


def _wait_accepting(started: Started, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if started.process.poll() is not None:
            raise StartFailed(
                f"{started.name} exited with {started.process.returncode}; log:\n{tail(log)}"
            )
        with contextlib.suppress(OSError), socket.create_connection((HOST, started.port), 0.5):
            return
        time.sleep(0.05)
    raise StartFailed(f"{started.name} did not accept on {HOST}:{started.port}")


def nginx_path() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if not path:
        raise StartFailed("nginx is not installed: `make bench` installs it (apt-get)")
    return path


def _nginx(procs: Processes, name: str, server_block: str, cpus: str | None) -> Started:
    port = int(server_block.split("listen 127.0.0.1:")[1].split()[0].rstrip(";"))
    prefix = procs.logs / name
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    {server_block}
}}
""",
        encoding="utf-8",
    )
    return procs.start(name, [nginx_path(), "-p", str(prefix), "-c", str(conf)], port, cpus)


def fixed_upstream(procs: Processes, cpus: str | None = None) -> Started:
    """nginx answering every request with the same small JSON body (after reading the body)."""
    (port,) = free_ports(1)
    block = f"""server {{
        listen 127.0.0.1:{port} backlog=8192;
        location / {{
            client_body_buffer_size 1m;
            default_type application/json;
            return 200 '{ANSWER}';
        }}
    }}"""
    return _nginx(procs, "upstream", block, cpus)


def nginx_proxy(procs: Processes, upstream: int, cpus: str | None = None) -> Started:
    """nginx as a reverse proxy with upstream keep-alive, as one would deploy it."""
    (port,) = free_ports(1)
    block = f"""upstream model {{ server 127.0.0.1:{upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=8192;
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 120s;
        }}
    }}"""
    return _nginx(procs, "nginx", block, cpus)


def servegate(
    procs: Processes,
    upstream: int,
    cpus: str | None = None,
    workers: int = 1,
    name: str = "servegate",
    root: Path = ROOT,
    **settings: str,
) -> Started:
    """servegate with its default settings (plus `settings` as SERVEGATE_* variables), from the
    source tree at `root` (another checkout, to compare two versions in one run)."""
    port, admin = free_ports(2)
    argv = [
        sys.executable, "-m", "proxy", "run",
        "--upstream", f"http://{HOST}:{upstream}",
        "--listen", f"{HOST}:{port}",
        "--admin-listen", f"{HOST}:{admin}",
    ]  # fmt: skip
    if workers != 1:
        argv += ["--workers", str(workers)]
    env = {f"SERVEGATE_{key.upper()}": value for key, value in settings.items()}
    env.setdefault("SERVEGATE_LOGGING__FORMAT", "json")
    started = procs.start(name, argv, port, cpus, cwd=root, **env)
    started.admin_port = admin
    return started


def plain_proxy(procs: Processes, upstream: int, cpus: str | None = None) -> Started:
    """bench/plain_proxy.py: the aiohttp pass-through proxy one writes in twenty lines."""
    (port,) = free_ports(1)
    argv = [sys.executable, str(BENCH / "plain_proxy.py"), str(port), str(upstream)]
    return procs.start("plain-aiohttp", argv, port, cpus)


def byte_pipe(procs: Processes, upstream: int, cpus: str | None = None) -> Started:
    """bench/byte_pipe.py: the floor, a proxy that copies bytes and parses nothing."""
    (port,) = free_ports(1)
    argv = [sys.executable, str(BENCH / "byte_pipe.py"), str(port), str(upstream)]
    return procs.start("byte-pipe", argv, port, cpus)


def holding_upstream(procs: Processes, hold: float, cpus: str | None = None) -> Started:
    (port,) = free_ports(1)
    argv = [sys.executable, str(BENCH / "held.py"), "--serve", str(port), str(hold)]
    return procs.start("holding-model", argv, port, cpus)


def rss_mib(pid: int, field_name: str = "VmRSS") -> float:
    """A kB field of /proc/PID/status in MiB, summed over the process and its children."""
    total = 0.0
    for one in (pid, *_descendants(pid)):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{one}/status").read_text(encoding="ascii").splitlines():
                if line.startswith(field_name + ":"):
                    total += int(line.split()[1]) / 1024
    return total


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its children (nginx's workers), seconds;
    /proc's clock ticks make it exact to 10 ms, so compare it over thousands of requests."""
    total = 0
    for one in (pid, *_descendants(pid)):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{one}/stat").read_text(encoding="ascii").rsplit(")", 1)[1]
            user, system = fields.split()[11:13]
            total += int(user) + int(system)
    return total / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    from processes import children_of

    found = []
    for child in children_of(pid):
        found += [child, *_descendants(child)]
    return found
