"""What one held request costs servegate in memory: RSS, and the Python heap by allocation site.

servegate runs in this process (default settings, uvloop) in front of the holding model
(bench/held.py, its own process); a client in a third process sends N POSTs at once. Some
seconds later, with all of them held by the model, the RSS growth over the resting process
is divided by N; with --trace, tracemalloc (one frame per allocation) compares a snapshot
taken at rest with one taken then, grouped by the file (or line) that allocated.

    python bench/held_memory.py [--count 2000] [--trace] [--by filename|lineno] [--top 30]

Only 127.0.0.1. Every process it starts is stopped by pid, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
import tracemalloc
from pathlib import Path

import uvloop
from processes import free_ports, stop

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from proxy import config, logs  # noqa: E402  (after the path)
from proxy.app import serve  # noqa: E402

HOLD = 15.0  # seconds the model holds each request: longer than the measurement
SETTLE = 6.0  # seconds after the burst before measuring: every request is at the model


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def measure(args: argparse.Namespace) -> None:
    model_port, port, admin = free_ports(3)
    model = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, str(BENCH / "held.py"), "--serve", str(model_port), str(HOLD)],
    )
    client: subprocess.Popen[bytes] | None = None
    served: asyncio.Task[None] | None = None
    try:
        settings = config.load(
            None,
            environ={},
            overrides={
                "upstream.url": f"http://127.0.0.1:{model_port}",
                "server.listen": f"127.0.0.1:{port}",
                "server.admin_listen": f"127.0.0.1:{admin}",
                "logging.level": "warning",
            },
        )
        logs.configure(settings.logging)
        served = asyncio.create_task(serve(settings))
        await asyncio.sleep(1.5)  # started, and the model too
        gc.collect()
        resting = rss_mib()
        before = tracemalloc.take_snapshot() if args.trace else None
        sender = (
            f"import sys, uvloop; sys.path.insert(0, {str(BENCH)!r}); from held import hold; "
            f"print(uvloop.run(hold({port}, {args.count}, 60)))"
        )
        client = await asyncio.to_thread(subprocess.Popen, [sys.executable, "-c", sender])
        await asyncio.sleep(SETTLE)
        held = rss_mib()
        print(
            f"RSS at rest {resting:.1f} MiB, with {args.count} held {held:.1f} MiB: "
            f"{(held - resting) * 1024 / args.count:.1f} KiB per held request"
        )
        if before is not None:
            stats = tracemalloc.take_snapshot().compare_to(before, args.by)
            total = sum(stat.size_diff for stat in stats)
            print(f"Python heap: {total / 1024 / args.count:.1f} KiB per held request")
            for stat in stats[: args.top]:
                print(f"{stat.size_diff / args.count:8.0f} B  {stat.traceback[0]}")
        await asyncio.to_thread(client.wait)  # every answer back (the client prints them)
    finally:
        for process in (client, model):
            if process is not None:
                stop(process)
        if served is not None:
            served.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=2000, help="requests held at once (2000)")
    parser.add_argument("--trace", action="store_true", help="tracemalloc by allocation site")
    parser.add_argument("--by", choices=("filename", "lineno"), default="filename")
    parser.add_argument("--top", type=int, default=30, help="allocation sites shown (30)")
    args = parser.parse_args()
    if args.trace:
        tracemalloc.start(1)
    uvloop.run(measure(args))


if __name__ == "__main__":
    main()
