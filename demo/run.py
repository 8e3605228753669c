"""`make run`: the demo model behind Gunicorn on 127.0.0.1:8000, servegate in front of it.

Gunicorn keeps its default 2 s keep-alive on purpose: that is the setting behind the stale
connections servegate exists to hide. Ctrl-C stops both processes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "127.0.0.1:8000"
DATA_PORT = 8080
ADMIN_PORT = 9464

BANNER = f"""
servegate is in front of the demo model (Gunicorn on {MODEL}).

  predict:  curl -X POST localhost:{DATA_PORT}/predict -d '{{"inputs": [[5.1, 3.5, 1.4, 0.2]]}}'
  slow:     curl -X POST 'localhost:{DATA_PORT}/predict?sleep=45' -d '{{"inputs": [1, 2, 3, 4]}}'
  crash:    curl -X POST 'localhost:{DATA_PORT}/predict?crash=1' -d '{{"inputs": [1, 2, 3, 4]}}'
  metrics:  curl localhost:{ADMIN_PORT}/metrics
  ready:    curl localhost:{ADMIN_PORT}/readyz

Ctrl-C stops both.
"""


def main() -> int:
    model = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--chdir", str(ROOT), "--bind", MODEL,
         "--worker-class", "gthread", "--workers", "2", "--threads", "4",
         "--no-control-socket", "demo.model:app"],
    )  # fmt: skip
    gate = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--upstream", f"http://{MODEL}"],
        cwd=ROOT,
    )
    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    time.sleep(1.5)
    if model.poll() is None and gate.poll() is None:
        print(BANNER, flush=True)
    try:
        while not stop_requested and model.poll() is None and gate.poll() is None:
            time.sleep(0.2)
    finally:
        for process in (gate, model):  # servegate first, so it drains before the model goes
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0 if stop_requested else 1


if __name__ == "__main__":
    sys.exit(main())
