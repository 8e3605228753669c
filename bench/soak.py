"""Soak: steady load through servegate for ten minutes while faults hit the model server.

What it measures
    The demo model runs under Gunicorn (`--workers 2 --worker-class gthread --threads 2
    --keep-alive 1`: its idle close lands on servegate's 1 s pool expiry, so stale pooled
    connections really happen). servegate runs in front with its defaults plus
    `upstream.scheme: auto` and the CA of the model's TLS certificate, so it can follow a
    scheme flip. `--concurrency` clients (default 4) send `POST /predict` back to back, each
    pausing `--pause` seconds (0.05) between requests. Every `--fault-every` seconds (5) one
    fault from this cycle is injected:

    * `stale`     every client pauses 1.0 s (the model's keep-alive), then all send at once;
    * `crash`     one `POST /predict?crash=1`: its worker exits mid-request (os._exit);
    * `slow`      four `?sleep=2` predictions, and one `?sleep=3` with a 1 s client budget;
    * `restart`   the model is stopped and started again (about 1-2 s down);
    * `flip`      the model is restarted speaking the other scheme (HTTP <-> HTTPS).

    The fault's own requests are counted apart from the load. Every `--sample-every` seconds
    (10) it samples servegate's RSS (VmRSS) and open file descriptors (/proc/PID/fd). At the
    end it prints the load's outcome per category (200s; servegate's answers by the JSON
    body's category/cause; client exceptions), servegate's failure metrics, the samples, and
    whether RSS and descriptors stayed flat: the median of the last two minutes against the
    median of the first two (after a one-minute warm-up), within `--rss-slack-mib` (16) and
    `--fd-slack` (16).

How to run it (from the repository root; Linux; by hand, not in CI; it takes --minutes)
    nice .venv/bin/python bench/soak.py                  # 10 minutes, the documented run
    nice .venv/bin/python bench/soak.py --minutes 2 --fault-every 3

Everything listens on 127.0.0.1; every process is started here and stopped by its pid, also
on failure. Exit status 1 when RSS or descriptors grew, or a process could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp
import trustme
from processes import HOST, StartFailed, free_ports, stop, tail

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"inputs": [[5.1, 3.5, 1.4, 0.2]]}).encode()
CLIENT_TIMEOUT = 45.0  # seconds: longer than servegate's 40 s budget
START_TIMEOUT = 20.0
FAULTS = ("stale", "crash", "slow", "restart", "stale", "crash", "slow", "flip")
SERIES = ("servegate_4503_total", "servegate_upstream_failures_total", "servegate_retries_total")
MiB = 1024 * 1024


@dataclass
class Soak:
    args: argparse.Namespace
    logs: Path
    model_port: int
    port: int
    admin_port: int
    ca_file: Path
    cert_file: Path
    tls: bool = False
    model: subprocess.Popen[bytes] | None = None
    gate: subprocess.Popen[bytes] | None = None
    files: list[IO[bytes]] = field(default_factory=list)
    load: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    samples: list[tuple[float, float, int]] = field(default_factory=list)
    paused_until: float = 0.0

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.files.append((self.logs / f"{name}.log").open("ab"))
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self.files[-1], stderr=subprocess.STDOUT,
            cwd=ROOT, env=env,
        )  # fmt: skip

    def start_model(self) -> None:
        argv = [
            sys.executable, "-m", "gunicorn", "--bind", f"{HOST}:{self.model_port}",
            "--workers", "2", "--worker-class", "gthread", "--threads", "2", "--keep-alive", "1",
            "--no-control-socket", "--graceful-timeout", "1", "demo.model:app",
        ]  # fmt: skip
        if self.tls:
            argv[-1:-1] = ["--certfile", str(self.cert_file), "--keyfile", str(self.cert_file)]
        self.model = self.spawn("gunicorn", argv, clean_env())
        context = ssl.create_default_context(cafile=str(self.ca_file)) if self.tls else None
        wait_until(lambda: answers(self.model_port, context), "gunicorn", self.logs)

    def stop_model(self) -> None:
        if self.model is not None:
            stop(self.model)
            self.model = None

    def start_gate(self) -> None:
        argv = [
            sys.executable, "-m", "proxy", "run", "--upstream", f"http://{HOST}:{self.model_port}",
            "--listen", f"{HOST}:{self.port}", "--admin-listen", f"{HOST}:{self.admin_port}",
        ]  # fmt: skip
        env = clean_env() | {
            "SERVEGATE_UPSTREAM__SCHEME": "auto",
            "SERVEGATE_UPSTREAM__TLS__CA_FILE": str(self.ca_file),
            "SERVEGATE_LOGGING__FORMAT": "json",
        }
        self.gate = self.spawn("servegate", argv, env)
        wait_until(lambda: answers(self.port, None), "servegate", self.logs)

    def stop_all(self) -> None:
        if self.gate is not None:
            stop(self.gate)
        self.stop_model()
        for file in self.files:
            file.close()


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SERVEGATE_", "DEMO_"))}


def answers(port: int, context: ssl.SSLContext | None) -> bool:
    """Whether GET /health answers 200 (over HTTPS when a context is given)."""
    scheme = "https" if context is not None else "http"
    try:
        url = f"{scheme}://{HOST}:{port}/health"
        with urllib.request.urlopen(url, timeout=1, context=context) as answer:
            return bool(answer.status == 200)
    except (OSError, ValueError):
        return False


def wait_until(ready: Callable[[], bool], name: str, logs: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    log = tail(logs / f"{name}.log")
    raise StartFailed(f"{name} did not answer within {START_TIMEOUT:.0f} s:\n{log}")


def outcome(status: int, body: bytes) -> str:
    if status == 200:
        return "200"
    try:
        parsed = json.loads(body)
        return f"{status} {parsed['category']}/{parsed['cause']}"
    except (ValueError, KeyError, TypeError):
        return f"{status} other"


async def request(session: aiohttp.ClientSession, url: str, **kwargs: object) -> str:
    try:
        async with session.post(url, data=BODY, **kwargs) as response:  # type: ignore[arg-type]
            return outcome(response.status, await response.read())
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"client {type(exc).__name__}"


async def load(soak: Soak, until: float) -> None:
    url = f"http://{HOST}:{soak.port}/predict"
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def client() -> None:
            while time.monotonic() < until:
                if (wait := soak.paused_until - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                soak.load[await request(session, url)] += 1
                await asyncio.sleep(soak.args.pause)

        await asyncio.gather(*(client() for _ in range(soak.args.concurrency)))


async def inject(soak: Soak, until: float) -> None:
    url = f"http://{HOST}:{soak.port}/predict"
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)) as s:
        for number in range(10**6):
            await asyncio.sleep(soak.args.fault_every)
            if time.monotonic() >= until:
                return
            fault = FAULTS[number % len(FAULTS)]
            if fault == "stale":
                soak.paused_until = time.monotonic() + 1.0
            elif fault == "crash":
                soak.faults[f"crash: {await request(s, url + '?crash=1')}"] += 1
            elif fault == "slow":
                slow = [request(s, url + "?sleep=2") for _ in range(4)]
                short = request(s, url + "?sleep=3", headers={"X-Servegate-Timeout-Ms": "1000"})
                for result in await asyncio.gather(*slow, short):
                    soak.faults[f"slow: {result}"] += 1
            else:
                if fault == "flip":
                    soak.tls = not soak.tls
                await loop.run_in_executor(None, soak.stop_model)
                await loop.run_in_executor(None, soak.start_model)
                soak.faults[f"{fault} (now {'https' if soak.tls else 'http'})"] += 1


def resources(pid: int) -> tuple[float, int]:
    """A process's resident memory (MiB) and open file descriptors."""
    status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    rss_kib = next(
        int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
    )
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def sample(soak: Soak, until: float, began: float) -> None:
    assert soak.gate is not None
    while time.monotonic() < until:
        rss, descriptors = resources(soak.gate.pid)
        soak.samples.append((time.monotonic() - began, rss, descriptors))
        await asyncio.sleep(soak.args.sample_every)


def metrics(admin_port: int) -> list[str]:
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return [
        line for line in text.splitlines()
        if line.split("{")[0] in SERIES and not line.endswith(" 0.0")
    ]  # fmt: skip


def flat(samples: list[tuple[float, float, int]], args: argparse.Namespace) -> tuple[bool, str]:
    """Median of the first two minutes after a one-minute warm-up against the last two."""
    end = samples[-1][0]
    early = [s for s in samples if 60 <= s[0] < 180] or samples[: len(samples) // 3]
    late = [s for s in samples if s[0] >= end - 120] or samples[-len(samples) // 3 :]
    rss = statistics.median(s[1] for s in late) - statistics.median(s[1] for s in early)
    fds = statistics.median(s[2] for s in late) - statistics.median(s[2] for s in early)
    ok = rss <= args.rss_slack_mib and fds <= args.fd_slack
    slack = f"slack {args.rss_slack_mib} MiB and {args.fd_slack} descriptors"
    return ok, f"RSS {rss:+.1f} MiB, descriptors {fds:+.0f} ({slack})"


def report(soak: Soak, seconds: float) -> bool:
    total = sum(soak.load.values())
    print(f"\nload: {total} requests in {seconds:.0f} s ({total / seconds:.1f}/s)")
    for key, count in sorted(soak.load.items(), key=lambda item: -item[1]):
        print(f"  {key:<50} {count:>7}  {100 * count / total:6.2f} %")
    print("fault requests and actions:")
    for key, count in sorted(soak.faults.items()):
        print(f"  {key:<50} {count:>7}")
    print("servegate metrics (non-zero):")
    for line in metrics(soak.admin_port):
        print(f"  {line}")
    print("samples (t s, RSS MiB, open descriptors):")
    for t, rss, fds in soak.samples:
        print(f"  {t:7.0f} {rss:8.1f} {fds:6d}")
    ok, text = flat(soak.samples, soak.args)
    print(f"{'FLAT' if ok else 'GREW'}: {text}")
    return ok


async def run(soak: Soak) -> bool:
    began = time.monotonic()
    until = began + soak.args.minutes * 60
    await asyncio.gather(load(soak, until), inject(soak, until), sample(soak, until, began))
    return report(soak, time.monotonic() - began)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--pause", type=float, default=0.05)
    parser.add_argument("--fault-every", type=float, default=5)
    parser.add_argument("--sample-every", type=float, default=10)
    parser.add_argument("--rss-slack-mib", type=float, default=16)
    parser.add_argument("--fd-slack", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="servegate-soak-") as tmp:
        logs = Path(tmp)
        ca = trustme.CA()
        ca_file, cert_file = logs / "ca.pem", logs / "model.pem"
        ca.cert_pem.write_to_path(ca_file)
        ca.issue_cert(HOST).private_key_and_cert_chain_pem.write_to_path(cert_file)
        soak = Soak(args, logs, *free_ports(3), ca_file, cert_file)
        try:
            soak.start_model()
            soak.start_gate()
            ok = asyncio.run(run(soak))
        except StartFailed as exc:
            print(f"cannot start: {exc}", file=sys.stderr)
            return 1
        finally:
            soak.stop_all()
        events = Counter(
            json.loads(line).get("event", "?")
            for line in (logs / "servegate.log").read_text(errors="replace").splitlines()
            if line.startswith("{") and '"level": "info"' not in line
        )
        print("servegate log lines above info, by event:", dict(events))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
