"""Crash-loop benchmark: the share of POST /predict requests that succeed while the model crashes.

What it measures
    The demo model runs under Gunicorn (`--workers 2 --worker-class gthread --threads 2
    --no-control-socket --graceful-timeout 1 demo.model:app`) with `DEMO_CRASH_EVERY=N`
    (default 5): every Nth prediction in a worker calls `os._exit(1)`, as a segfaulting
    inference library would, and Gunicorn boots a new worker. The same load then goes through
    each front end in turn, each with a fresh Gunicorn:

    * `servegate`         servegate with its default settings;
    * `servegate-replay`  servegate with `retry.replay_after_reset: [POST]` (the opt-in that
                          replays, once, a request reset mid-request by a dying worker);
    * `nginx`             nginx with `proxy_pass` to an `upstream` block with `keepalive 32`,
                          `proxy_http_version 1.1` and `proxy_set_header Connection ""`
                          (HTTP/1.1 keep-alive to the model, as a tuned nginx has), default
                          `proxy_next_upstream`;
    * `haproxy`           HAProxy with `retry-on all-retryable-errors`, `retries 3` and
                          `option redispatch`.

    `--concurrency` client tasks (default 8) send `POST /predict` back to back for `--seconds`
    (default 20), each request with a 45 s client timeout. For each front end the benchmark
    counts requests, 200s, other statuses (for servegate's own answers, by the JSON body's
    `cause`), client-side exceptions, the longest latency and Gunicorn's worker boots
    ("Booting worker" lines, the 2 initial boots included), then prints a table and the
    success shares, plus what each front end says about its failures (servegate's /metrics
    and log events, nginx's error log, HAProxy's request log).

How to run it (from the repository root; Linux; nginx and haproxy from Debian, if present)
    .venv/bin/python bench/crash_loop.py
    .venv/bin/python bench/crash_loop.py --seconds 60 --concurrency 16 --crash-every 10
    .venv/bin/python bench/crash_loop.py --frontends servegate,nginx --keep-logs
    .venv/bin/python bench/crash_loop.py --frontends servegate,servegate-replay \\
        --servegate-setting circuit__failure_threshold=1000000   # a diagnostic, not the defaults

A front end whose program is not installed is skipped, and the output says so. Everything
listens on 127.0.0.1 only; every process is started here and stopped by its pid, also when
something fails. The exit status is 1 when a front end or model server could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO

import aiohttp
from processes import (
    HOST,
    StartFailed,
    free_ports,
    stop,
    tail,
)

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
THREADS = 2
BODY = json.dumps({"inputs": [[5.1, 3.5, 1.4, 0.2]]}).encode()
CLIENT_TIMEOUT = 45.0  # seconds per request: longer than servegate's 40 s budget
START_TIMEOUT = 20.0  # seconds for a process to answer GET /health
FRONTENDS = ("servegate", "servegate-replay", "nginx", "haproxy")
# servegate's answers with these causes would mean a failure it exists to hide got through.
HIDDEN_CAUSES = ("connect_refused", "stale_connection")
SERVEGATE_SERIES = (
    "servegate_upstream_failures_total",
    "servegate_retries_total",
    "servegate_4503_total",
    "servegate_shed_total",
    "servegate_upstream_restarts_total",
)


# --------------------------------------------------------------------------------------------
# Processes: started on free loopback ports, stopped by pid (and their orphans by pid).


@dataclass
class Processes:
    """Every process this benchmark starts, with its log; `stop_all` ends them by pid."""

    logs: Path
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    files: list[IO[bytes]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        self.files.append(log.open("wb"))
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self.files[-1],
                stderr=subprocess.STDOUT, cwd=ROOT, env=env,
            )  # fmt: skip
        except OSError as exc:
            raise StartFailed(f"{name}: cannot start {argv[0]}: {exc.strerror}") from None
        self.started.append((name, process))
        return process

    def stop_all(self) -> None:
        for _, process in reversed(self.started):  # the front end first, then the model
            stop(process)
        self.started.clear()
        for file in self.files:
            file.close()
        self.files.clear()


def wait_healthy(process: subprocess.Popen[bytes], port: int, name: str, log: Path) -> None:
    """Until GET /health answers 200 through `port` (the model's route, not a prediction)."""
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StartFailed(
                f"{name} exited with {process.returncode} before it answered;"
                f" last log lines:\n{tail(log)}"
            )
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=1) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}"
        except (OSError, ValueError) as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise StartFailed(f"{name} gave no 200 on {HOST}:{port}/health within {START_TIMEOUT:.0f} s"
                      f" ({last}); last log lines:\n{tail(log)}")  # fmt: skip


def base_env() -> dict[str, str]:
    """The environment without servegate or demo settings the caller may have exported."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SERVEGATE_", "DEMO_"))}


# --------------------------------------------------------------------------------------------
# The model server and the front ends.


def start_model(procs: Processes, port: int, crash_every: int) -> Path:
    argv = [
        sys.executable, "-m", "gunicorn", "--bind", f"{HOST}:{port}",
        "--workers", str(WORKERS), "--worker-class", "gthread", "--threads", str(THREADS),
        "--no-control-socket", "--graceful-timeout", "1", "demo.model:app",
    ]  # fmt: skip
    env = base_env() | {"DEMO_CRASH_EVERY": str(crash_every)}
    process = procs.start("gunicorn", argv, env)
    log = procs.logs / "gunicorn.log"
    wait_healthy(process, port, "gunicorn", log)
    return log


def nginx_conf(tmp: Path, model_port: int, port: int) -> str:
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{nginx_proxy_block(model_port, port)}}}
"""


def nginx_proxy_block(model_port: int, port: int) -> str:
    """The part of nginx.conf that decides the result (printed with the table)."""
    return f"""    upstream model {{
        server {HOST}:{model_port};
        keepalive 32;
    }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


def haproxy_conf(model_port: int, port: int) -> str:
    return f"""global
    log stdout format raw local0
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch
    retry-on all-retryable-errors
frontend fe
    bind {HOST}:{port}
    default_backend model
backend model
    server model {HOST}:{model_port}
"""


def start_frontend(
    procs: Processes, name: str, ports: tuple[int, int, int], args: argparse.Namespace
) -> Path:
    model_port, port, admin_port = ports
    tmp = procs.logs
    if name.startswith("servegate"):
        argv = [
            sys.executable, "-m", "proxy", "run", "--upstream", f"http://{HOST}:{model_port}",
            "--listen", f"{HOST}:{port}", "--admin-listen", f"{HOST}:{admin_port}",
        ]  # fmt: skip
        env = base_env() | {"SERVEGATE_LOGGING__LEVEL": args.servegate_log_level}
        env |= {f"SERVEGATE_{key.upper()}": value for key, value in args.servegate_setting}
        if name == "servegate-replay":
            env["SERVEGATE_RETRY__REPLAY_AFTER_RESET"] = "[POST]"
    elif name == "nginx":
        # nginx's worker runs as an unprivileged user ("nobody") and may need the temp dirs.
        for directory in (tmp.parent, tmp):
            directory.chmod(0o755)
        (tmp / "nginx.conf").write_text(nginx_conf(tmp, model_port, port), encoding="utf-8")
        argv = ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
                "-e", str(tmp / "nginx-error.log")]  # fmt: skip
        env = base_env()
    else:
        (tmp / "haproxy.cfg").write_text(haproxy_conf(model_port, port), encoding="utf-8")
        argv, env = ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")], base_env()
    process = procs.start(name, argv, env)
    log = tmp / f"{name}.log"
    wait_healthy(process, port, name, log)
    return log


def version_of(program: str) -> str:
    try:
        done = subprocess.run(
            [program, "-v"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return (done.stdout + done.stderr).strip().splitlines()[0]


# --------------------------------------------------------------------------------------------
# The load.


@dataclass
class Tally:
    frontend: str
    total: int = 0
    ok: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # non-200, with cause if servegate's
    exceptions: Counter[str] = field(default_factory=Counter)
    max_latency: float = 0.0
    seconds: float = 0.0
    boots: int = 0
    notes: list[str] = field(default_factory=list)
    skipped: str = ""

    @property
    def share(self) -> float:
        return self.ok / self.total if self.total else 0.0

    def record(self, status: int | None, body: bytes, error: str, latency: float) -> None:
        self.total += 1
        self.max_latency = max(self.max_latency, latency)
        if error:
            self.exceptions[error] += 1
        elif status == 200:
            self.ok += 1
        else:
            self.statuses[f"{status}{servegate_cause(body)}"] += 1

    def caused(self, cause: str) -> int:
        return sum(n for key, n in self.statuses.items() if key.endswith(f" {cause}"))


def servegate_cause(body: bytes) -> str:
    """' <cause>' for servegate's own JSON error answers, '' for anything else."""
    with contextlib.suppress(ValueError):
        doc = json.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("cause"), str):
            return f" {doc['cause']}"
    return ""


async def run_load(port: int, seconds: float, concurrency: int, tally: Tally) -> None:
    url = f"http://{HOST}:{port}/predict"
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=concurrency)
    loop = asyncio.get_running_loop()
    began = loop.time()
    ends = began + seconds

    async def client() -> None:
        while loop.time() < ends:
            started = loop.time()
            status, body, error = None, b"", ""
            try:
                async with session.post(url, data=BODY, headers=headers) as response:
                    status, body = response.status, await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = type(exc).__name__
            tally.record(status, body, error, loop.time() - started)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # Each task ends by `ends` plus one request's timeout; this outer limit only guards that.
        async with asyncio.timeout(seconds + CLIENT_TIMEOUT + 15):
            await asyncio.gather(*(client() for _ in range(concurrency)))
    tally.seconds = loop.time() - began


# --------------------------------------------------------------------------------------------
# What each front end and the model server said about the failures.


def count_boots(log: Path) -> int:
    with contextlib.suppress(OSError):
        return log.read_text(encoding="utf-8", errors="replace").count("Booting worker")
    return 0


def servegate_metrics(admin_port: int) -> list[str]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{admin_port}/metrics", timeout=5) as answer:
            text = answer.read().decode("utf-8", errors="replace")
    except (OSError, ValueError) as exc:
        return [f"/metrics not read: {exc}"]
    lines = []
    for line in text.splitlines():
        if line.split("{")[0].split(" ")[0] in SERVEGATE_SERIES:
            with contextlib.suppress(ValueError, IndexError):
                if float(line.rsplit(" ", 1)[1]) > 0:
                    lines.append(line)
    return lines


def servegate_log_events(log: Path) -> list[str]:
    events: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                events["(not JSON) " + line[:80]] += 1
                continue
            if isinstance(entry, dict):
                events[f"{entry.get('level', '?')} {entry.get('event', '?')}"] += 1
    return [f"{name} x {n}" for name, n in events.most_common()]


_NGINX_ERROR = re.compile(r"\[(\w+)\] \d+#\d+: (?:\*\d+ )?(.*?)(?:, client: .*)?$")


def nginx_errors(log: Path) -> list[str]:
    errors: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            match = _NGINX_ERROR.search(line)
            if match:
                errors[f"[{match.group(1)}] {match.group(2)}"] += 1
    return [f"{text} x {n}" for text, n in errors.most_common()]


# httplog: ... status bytes req_cookie res_cookie termination_state ac/fc/bc/sc/[+]retries ...
_HAPROXY_LINE = re.compile(r" (-?\d+) \d+ \S+ \S+ (\S{4}) \d+/\d+/\d+/\d+/(\+?)(\d+) ")


def haproxy_summary(log: Path) -> list[str]:
    retried: Counter[int] = Counter()
    failed: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            match = _HAPROXY_LINE.search(line)
            if not match or "/predict" not in line:
                continue
            status, state, _, retries = match.groups()
            retried[int(retries)] += 1
            if status != "200":
                failed[f"status {status} termination {state}"] += 1
    by_retries = ", ".join(f"{n} with {r} retries" for r, n in sorted(retried.items()))
    return [f"requests logged: {by_retries or 'none'}"] + [
        f"{text} x {n}" for text, n in failed.most_common()
    ]


# --------------------------------------------------------------------------------------------
# One front end, start to finish.


def measure(name: str, args: argparse.Namespace, logs: Path) -> Tally:
    tally = Tally(name)
    if name in ("nginx", "haproxy") and shutil.which(name) is None:
        tally.skipped = f"{name} is not installed (apt-get install -y {name})"
        return tally
    run_dir = logs / name
    run_dir.mkdir()
    procs = Processes(run_dir)
    model_port, port, admin_port = free_ports(3)
    try:
        gunicorn_log = start_model(procs, model_port, args.crash_every)
        log = start_frontend(procs, name, (model_port, port, admin_port), args)
        asyncio.run(run_load(port, args.seconds, args.concurrency, tally))
        if name.startswith("servegate"):
            tally.notes += ["metrics: " + line for line in servegate_metrics(admin_port)]
    finally:
        procs.stop_all()
    tally.boots = count_boots(gunicorn_log)
    if name.startswith("servegate"):
        tally.notes += ["log: " + line for line in servegate_log_events(log)]
    elif name == "nginx":
        tally.notes += ["error log: " + line for line in nginx_errors(run_dir / "nginx-error.log")]
    else:
        tally.notes += ["log: " + line for line in haproxy_summary(log)]
    return tally


def report(tallies: list[Tally], args: argparse.Namespace) -> None:
    header = (
        f"{'front end':<17} {'requests':>8} {'200':>6} {'non-200':>7} {'client exc':>10}"
        f" {'max lat s':>9} {'200/s':>6} {'boots':>5} {'success':>8}"
    )
    print(f"\n{header}\n{'-' * len(header)}")
    for t in tallies:
        if t.skipped:
            print(f"{t.frontend:<17} skipped: {t.skipped}")
            continue
        print(
            f"{t.frontend:<17} {t.total:>8} {t.ok:>6} {t.statuses.total():>7}"
            f" {t.exceptions.total():>10} {t.max_latency:>9.2f}"
            f" {t.ok / t.seconds if t.seconds else 0:>6.0f} {t.boots:>5} {t.share:>8.1%}"
        )
    print(f"(boots: Gunicorn 'Booting worker' lines, the {WORKERS} initial boots included)")
    for t in tallies:
        if t.skipped:
            continue
        print(f"\n{t.frontend}: {t.ok} of {t.total} succeeded ({t.share:.1%})")
        for key, n in (t.statuses + t.exceptions).most_common():
            print(f"  {key}: {n}")
        for note in t.notes:
            print(f"  {note}")
        if t.frontend.startswith("servegate"):
            hidden = {cause: t.caused(cause) for cause in HIDDEN_CAUSES}
            verdict = "as expected" if not any(hidden.values()) else "UNEXPECTED"
            print(f"  answers with cause {' / '.join(HIDDEN_CAUSES)}:"
                  f" {' / '.join(map(str, hidden.values()))} ({verdict})")  # fmt: skip
    if any(t.frontend == "nginx" and not t.skipped for t in tallies):
        print("\nnginx config used (the proxy part; no proxy_next_upstream line: the default):")
        print(nginx_proxy_block(model_port=0, port=0).replace(":0;", ":PORT;"))


def code_fingerprint() -> str:
    """A digest of proxy/*.py: ties the numbers to the servegate code that produced them."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "proxy").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def describe_machine(args: argparse.Namespace, names: list[str]) -> None:
    versions = {pkg: metadata.version(pkg) for pkg in ("aiohttp", "gunicorn")}
    print(
        f"machine: nproc {os.cpu_count()}, {platform.machine()}, Linux {platform.release()},"
        f" Python {platform.python_version()}, aiohttp {versions['aiohttp']},"
        f" gunicorn {versions['gunicorn']}"
    )
    for program in ("nginx", "haproxy"):
        if program in names:
            print(f"{program}: {version_of(program)}")
    print(f"servegate code: sha256 of proxy/*.py {code_fingerprint()}")
    print(
        f"model: gunicorn --workers {WORKERS} --worker-class gthread --threads {THREADS}"
        f" --no-control-socket --graceful-timeout 1 demo.model:app,"
        f" DEMO_CRASH_EVERY={args.crash_every} (a fresh Gunicorn per front end)"
    )
    print(
        f"load: {args.concurrency} clients, POST /predict back to back for {args.seconds:g} s,"
        f" {CLIENT_TIMEOUT:g} s client timeout; front ends: {', '.join(names)}"
    )
    if args.servegate_setting:
        extra = ", ".join(f"SERVEGATE_{k.upper()}={v}" for k, v in args.servegate_setting)
        print(f"servegate diagnostic settings (not the defaults): {extra}")


def setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or "__" not in key:
        raise argparse.ArgumentTypeError(f"expected SECTION__KEY=VALUE, got {text!r}")
    return key, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="load per front end (20)")
    parser.add_argument("--concurrency", type=int, default=8, help="client tasks (8)")
    parser.add_argument("--crash-every", type=int, default=5, help="DEMO_CRASH_EVERY (5)")
    parser.add_argument(
        "--frontends", default=",".join(FRONTENDS), help=f"comma-separated subset of {FRONTENDS}"
    )
    parser.add_argument(
        "--servegate-log-level", default="warning", choices=("debug", "info", "warning", "error")
    )
    parser.add_argument(
        "--servegate-setting",
        action="append",
        default=[],
        type=setting,
        metavar="SECTION__KEY=VALUE",
        help="extra servegate setting for a diagnostic run, e.g. circuit__failure_threshold=1000",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the logs directory")
    args = parser.parse_args(argv)
    args.names = [name.strip() for name in args.frontends.split(",") if name.strip()]
    unknown = sorted(set(args.names) - set(FRONTENDS))
    if unknown or not args.names:
        parser.error(f"--frontends: unknown {unknown}; choose from {', '.join(FRONTENDS)}")
    if args.seconds <= 0 or args.concurrency < 1 or args.crash_every < 1:
        parser.error("--seconds must be positive, --concurrency and --crash-every at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    describe_machine(args, args.names)
    fingerprint = code_fingerprint()
    logs = Path(tempfile.mkdtemp(prefix="servegate-crash-loop-"))
    tallies: list[Tally] = []
    failed = False
    try:
        for name in args.names:
            print(f"running {name} ...", flush=True)
            try:
                tallies.append(measure(name, args, logs))
            except StartFailed as exc:
                print(f"crash_loop.py: {exc}", file=sys.stderr)
                tallies.append(Tally(name, skipped="did not start (see above)"))
                failed = True
        report(tallies, args)
        if code_fingerprint() != fingerprint:
            print(f"\nnote: proxy/*.py changed during the run (now {code_fingerprint()})")
    finally:
        if args.keep_logs or failed:
            print(f"\nlogs kept in {logs}")
        else:
            shutil.rmtree(logs, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
