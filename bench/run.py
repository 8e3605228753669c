"""`make bench`: servegate against nginx and a plain aiohttp proxy, interleaved, with repetitions.

Sections (each a table of medians over `--reps` repetitions, every target once per repetition,
in a rotating order so that the machine's other load falls on all of them alike):

    throughput  req/s on one core: each proxy pinned to CPU 0, the fixed-answer nginx upstream
                and wrk (32 connections, 1 KiB POST) on CPU 1
    latency     median latency at a fixed rate (~500 req/s, wrk pacing 4 connections), and what
                each proxy adds over the upstream direct; with bench/byte_pipe.py, the floor
                of a Python proxy on uvloop
    held        N POSTs at once to a model that holds each for S seconds: answered, seconds,
                peak RSS of the proxy (all its processes)
    workers     servegate --workers 1 against --workers 2, both allowed CPUs 0 and 1
    first_byte  median time to the first event of a streamed answer, one request at a time
    bodies      bench/memory.py: RSS while 200 MiB bodies pass through

    python bench/run.py [--reps 3] [--only throughput,latency] [--write-docs]
    python bench/run.py --compare OTHER_CHECKOUT   # adds `servegate@base` from another tree

Only 127.0.0.1. `--write-docs` rewrites the generated parts of docs/benchmarks.md (between
`<!-- bench:NAME -->` markers), with the machine, the command and the date.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import load
import targets
import uvloop
from held import hold
from processes import StartFailed
from targets import Processes, Started

DOCS = targets.ROOT / "docs" / "benchmarks.md"
SECTIONS = ("throughput", "latency", "held", "workers", "first_byte", "bodies")
Table = tuple[list[str], list[list[str]]]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def rotated(names: list[str], rep: int) -> list[str]:
    return names[rep % len(names) :] + names[: rep % len(names)]


def _proxies(
    procs: Processes, upstream: int, cpus: str | None, args: argparse.Namespace
) -> dict[str, Started]:
    found = {
        "nginx": targets.nginx_proxy(procs, upstream, cpus),
        "plain aiohttp": targets.plain_proxy(procs, upstream, cpus),
        "servegate": targets.servegate(procs, upstream, cpus),
    }
    if args.compare:
        found["servegate@base"] = targets.servegate(
            procs, upstream, cpus, name="servegate-base", root=args.compare
        )
    return found


def section_throughput(procs: Processes, args: argparse.Namespace) -> Table:
    upstream = targets.fixed_upstream(procs, cpus="1")
    ports = {"direct": upstream.port} | {
        name: p.port for name, p in _proxies(procs, upstream.port, "0", args).items()
    }
    rates: dict[str, list[float]] = {name: [] for name in ports}
    failed: dict[str, int] = dict.fromkeys(ports, 0)
    for rep in range(args.reps):
        for name in rotated(list(ports), rep):
            rate, bad = load.throughput(ports[name], args.seconds, 32, args.scratch, cpus="1")
            rates[name].append(rate)
            failed[name] += bad
    plain = statistics.median(rates["plain aiohttp"])
    rows = [
        [
            name,
            f"{statistics.median(values):,.0f}",
            " / ".join(f"{v:,.0f}" for v in values),
            "—" if name == "direct" else f"{statistics.median(values) / plain:.2f}",
            str(failed[name]),
        ]
        for name, values in rates.items()
    ]
    return ["", "req/s (median)", "each repetition", "x plain aiohttp", "failed"], rows


def section_latency(procs: Processes, args: argparse.Namespace) -> Table:
    upstream = targets.fixed_upstream(procs, cpus="1")
    started = {
        "direct": upstream,
        "byte pipe (floor)": targets.byte_pipe(procs, upstream.port, "0"),
        **_proxies(procs, upstream.port, "0", args),
    }
    p50s: dict[str, list[float]] = {name: [] for name in started}
    achieved: dict[str, list[float]] = {name: [] for name in started}
    cpu_ms: dict[str, list[float]] = {name: [] for name in started}
    for rep in range(args.reps):
        for name in rotated(list(started), rep):
            pid = started[name].pid
            before = targets.cpu_seconds(pid)
            p50, rate = load.latency_p50(
                started[name].port, args.rate, args.seconds, args.scratch, "1"
            )
            cpu_ms[name].append(
                1000 * (targets.cpu_seconds(pid) - before) / max(1.0, rate * args.seconds)
            )
            p50s[name].append(p50)
            achieved[name].append(rate)
    direct = statistics.median(p50s["direct"])
    rows = [
        [
            name,
            f"{statistics.median(values):.3f}",
            "—" if name == "direct" else f"+{statistics.median(values) - direct:.3f}",
            " / ".join(f"{v:.3f}" for v in values),
            f"{statistics.median(achieved[name]):.0f}",
            "—" if name == "direct" else f"{statistics.median(cpu_ms[name]):.2f}",
        ]
        for name, values in p50s.items()
    ]
    header = ["", "p50 ms (median)", "added ms", "each repetition", "req/s achieved"]
    return [*header, "proxy CPU ms per request"], rows


class PeakRss:
    """Samples the RSS of a process and its children every 50 ms in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, targets.rss_mib(self.pid))
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def section_held(procs: Processes, args: argparse.Namespace) -> Table:
    model = targets.holding_upstream(procs, args.hold)
    proxies = {
        "nginx": targets.nginx_proxy(procs, model.port),
        "servegate": targets.servegate(procs, model.port),
    }
    if args.compare:
        proxies["servegate@base"] = targets.servegate(
            procs, model.port, name="servegate-base", root=args.compare
        )
    results: dict[str, list[tuple[int, float, float]]] = {name: [] for name in proxies}
    for rep in range(args.reps):
        for name in rotated(list(proxies), rep):
            proxy = proxies[name]
            time.sleep(1.0)  # let the previous round's connections close
            with PeakRss(proxy.pid) as rss:
                held = uvloop.run(hold(proxy.port, args.held, limit=args.hold + 130))
            results[name].append((held.answered_200, held.seconds, rss.peak))
            if held.errors:
                print(f"  {name}: {held.errors}", file=sys.stderr)
    rows = []
    for name, runs in results.items():
        answered, seconds, peak = (statistics.median(r[i] for r in runs) for i in range(3))
        rows.append(
            [
                name,
                f"{answered:,.0f} / {args.held:,}",
                f"{seconds:.1f}",
                f"{peak:.0f}",
                " / ".join(f"{r[0]} in {r[1]:.1f} s, {r[2]:.0f} MiB" for r in runs),
            ]
        )
    return ["", "answered 200", "seconds", "peak RSS MiB", "each repetition"], rows


def section_workers(procs: Processes, args: argparse.Namespace) -> Table:
    upstream = targets.fixed_upstream(procs)
    gates = {
        n: targets.servegate(procs, upstream.port, "0,1", workers=n, name=f"servegate-w{n}")
        for n in (1, 2)
    }
    rates: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(args.reps):
        for n in rotated([1, 2], rep):
            rate, _ = load.throughput(gates[n].port, args.seconds, 64, args.scratch, None)
            rates[n].append(rate)
    one = statistics.median(rates[1])
    rows = [
        [
            f"--workers {n}",
            f"{statistics.median(values):,.0f}",
            " / ".join(f"{v:,.0f}" for v in values),
            f"{statistics.median(values) / one:.2f}",
        ]
        for n, values in rates.items()
    ]
    return ["servegate", "req/s (median)", "each repetition", "x --workers 1"], rows


def section_first_byte(procs: Processes, args: argparse.Namespace) -> Table:
    model = targets.holding_upstream(procs, 0.05)
    ports = {"direct": model.port} | {
        name: p.port for name, p in _proxies(procs, model.port, None, args).items()
    }
    times: dict[str, list[float]] = {name: [] for name in ports}
    for rep in range(args.reps):
        for name in rotated(list(ports), rep):
            times[name].append(uvloop.run(load.first_byte_ms(ports[name], 100)))
    direct = statistics.median(times["direct"])
    rows = [
        [
            name,
            f"{statistics.median(values):.3f}",
            "—" if name == "direct" else f"+{statistics.median(values) - direct:.3f}",
            " / ".join(f"{v:.3f}" for v in values),
        ]
        for name, values in times.items()
    ]
    return ["", "first event ms (median)", "added ms", "each repetition"], rows


def section_bodies(_procs: Processes, _args: argparse.Namespace) -> Table:
    done = subprocess.run(
        [sys.executable, str(targets.BENCH / "memory.py")],
        capture_output=True,
        text=True,
        cwd=targets.ROOT,
        check=False,
    )
    rows = [[line] for line in done.stdout.strip().splitlines()]
    return [f"bench/memory.py output (exit status {done.returncode})"], rows


RUNNERS: dict[str, Callable[[Processes, argparse.Namespace], Table]] = {
    "throughput": section_throughput,
    "latency": section_latency,
    "held": section_held,
    "workers": section_workers,
    "first_byte": section_first_byte,
    "bodies": section_bodies,
}


def markdown(table: Table) -> str:
    head, rows = table
    if len(head) == 1:  # preformatted output
        return "```\n" + "\n".join(row[0] for row in rows) + "\n```"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    keep = ("Model name", "CPU(s):", "Thread(s) per core", "CPU MHz", "L3 cache")
    cpu = "; ".join(" ".join(line.split()) for line in lscpu.splitlines() if line.startswith(keep))
    versions = subprocess.run(
        [targets.nginx_path(), "-v"], capture_output=True, text=True, check=False
    ).stderr.strip()
    return (
        f"`uname -a`: {platform.uname().system} {platform.uname().release} "
        f"{platform.uname().version} {platform.machine()}; `lscpu`: {cpu}; "
        f"Python {platform.python_version()}; {versions}"
    )


def write_docs(generated: dict[str, str]) -> None:
    text = DOCS.read_text(encoding="utf-8")
    for name, body in generated.items():
        start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        if start not in text:
            text += f"\n{start}\n{end}\n"
        before, _, rest = text.partition(start)
        _, _, after = rest.partition(end)
        text = f"{before}{start}\n{body}\n{end}{after}"
    DOCS.write_text(text, encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions per target (3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per wrk run (5)")
    parser.add_argument("--rate", type=float, default=500.0, help="req/s for latency (500)")
    parser.add_argument("--held", type=int, default=5000, help="requests held at once (5000)")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds the model holds (20)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections, comma-separated")
    parser.add_argument("--compare", type=Path, help="another checkout, run as servegate@base")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    generated: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="servegate-bench-") as scratch:
        args.scratch = Path(scratch)
        for name in args.only.split(","):
            load_before = uptime()
            procs = Processes(args.scratch)
            try:
                print(f"== {name}  ({load_before})", flush=True)
                table = RUNNERS[name](procs, args)
            except StartFailed as exc:
                print(f"{name}: {exc}", file=sys.stderr)
                return 1
            finally:
                procs.stop_all()
            print(markdown(table), flush=True)
            generated[name] = (
                f"{markdown(table)}\n\n*{datetime.date.today()}; `{command}`; load before: "
                f"`{load_before}`; after: `{uptime()}`.*"
            )
    generated["machine"] = machine()
    if args.write_docs:
        write_docs(generated)
    return 0


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    sys.exit(main())
