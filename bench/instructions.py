"""Instructions per request: servegate under callgrind, for exactly N keep-alive requests.

Throughput on a shared machine scatters by ±5 % between repetitions, more than most single
changes move it. An instruction count does not: servegate runs under `valgrind
--tool=callgrind --instr-atstart=no`, a warm-up goes through uninstrumented, and then
instrumentation (`callgrind_control -i on`) counts exactly `--requests` POSTs of 1 KiB, sent
over four keep-alive connections to a fixed-answer nginx upstream. Each TREE is a source
tree of servegate (this one by default, or another checkout: `git archive REV | tar -x -C
DIR`); they are measured one after the other against the same upstream. Repeated runs of one
tree agree within about ±1,000 instructions per request (of about 720,000).

    python bench/instructions.py [--requests 2000] [TREE ...]

Needs valgrind (`make bench-deps`). Only 127.0.0.1; every process it starts is stopped by pid,
also on failure.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import targets
from processes import HOST, free_ports, stop

BODY = b"x" * 1024
REQUEST = (
    b"POST /predict HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (HOST.encode(), len(BODY), BODY)
)
CONNECTIONS = 4
WARM_UP = 400  # requests before counting: imports, first connections, caches
START_SECONDS = 300.0  # servegate's start-up under valgrind is slow
STOP_SECONDS = 120.0  # and so is its shutdown, after which callgrind writes its counts


def send(port: int, requests: int) -> None:
    """`requests` POSTs, in rounds of one per connection, each answer read whole (a 200)."""
    connections = [socket.create_connection((HOST, port), timeout=60) for _ in range(CONNECTIONS)]
    try:
        for _ in range(requests // CONNECTIONS):
            for connection in connections:
                connection.sendall(REQUEST)
            for connection in connections:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += connection.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200 "):
                    raise RuntimeError(f"not a 200: {head[:200]!r}")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(body) < length:
                    body += connection.recv(65536)
    finally:
        for connection in connections:
            connection.close()


def count(tree: Path, upstream: int, requests: int, workdir: Path) -> int:
    """Instructions callgrind counted over `requests` requests through servegate from `tree`."""
    port, admin = free_ports(2)
    out = workdir / f"callgrind.{port}"
    argv = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, "-m", "proxy", "run",
        "--upstream", f"http://{HOST}:{upstream}",
        "--listen", f"{HOST}:{port}", "--admin-listen", f"{HOST}:{admin}",
    ]  # fmt: skip
    log = (workdir / f"servegate.{port}.log").open("wb")
    process = subprocess.Popen(argv, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"servegate from {tree} did not start") from None
                time.sleep(0.5)
        send(port, WARM_UP)
        subprocess.run(
            ["callgrind_control", "-i", "on", str(process.pid)], check=True, capture_output=True
        )
        send(port, requests)
        subprocess.run(
            ["callgrind_control", "-i", "off", str(process.pid)], check=True, capture_output=True
        )
        process.terminate()
        process.wait(timeout=STOP_SECONDS)
    finally:
        stop(process)
        log.close()
    totals = [
        int(line.split()[1])
        for path in workdir.glob(f"callgrind.{port}*")
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
        if line.startswith(("totals:", "summary:"))
    ]
    if not totals:
        raise RuntimeError(f"callgrind wrote no totals for {tree}")
    return max(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests counted (2000)")
    parser.add_argument("trees", nargs="*", type=Path, default=[targets.ROOT])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        procs = targets.Processes(Path(workdir))
        try:
            upstream = targets.fixed_upstream(procs, cpus="1")
            for tree in args.trees:
                instructions = count(tree.resolve(), upstream.port, args.requests, Path(workdir))
                print(f"{tree}: {instructions / args.requests:,.0f} instructions per request")
        finally:
            procs.stop_all()


if __name__ == "__main__":
    main()
