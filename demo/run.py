"""`make run`: servegate on the default ports, running the demo model under Gunicorn on
127.0.0.1:8000 as its child (supervise mode).

Gunicorn keeps its default 2 s keep-alive on purpose: that is the setting behind the stale
connections servegate exists to hide. Ctrl-C stops servegate, which stops the model.
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

Ctrl-C stops both (servegate first, then the model it supervises).
"""


def main() -> int:
    gate = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--upstream", f"http://{MODEL}", "--",
         sys.executable, "-m", "gunicorn", "--chdir", str(ROOT), "--bind", MODEL,
         "--worker-class", "gthread", "--workers", "2", "--threads", "4",
         "--no-control-socket", "demo.model:app"],
        cwd=ROOT,
        # Its own session: Ctrl-C reaches this script alone, which passes servegate one SIGTERM.
        # Both getting the terminal's SIGINT would be two stop signals, and servegate takes a
        # second one as "exit at once", skipping the drain.
        start_new_session=True,
    )  # fmt: skip
    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    time.sleep(2)
    if gate.poll() is None:
        print(BANNER, flush=True)
    try:
        while not stop_requested and gate.poll() is None:
            time.sleep(0.2)
    finally:
        if gate.poll() is None:
            gate.terminate()  # servegate drains, then stops the model
        try:
            gate.wait(timeout=75)
        except subprocess.TimeoutExpired:
            gate.kill()
    return 0 if stop_requested else 1


if __name__ == "__main__":
    sys.exit(main())
