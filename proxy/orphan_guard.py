"""Runs the supervised model server's command so that it hears of servegate's death.

`python -m proxy.orphan_guard PARENT_PID COMMAND...` asks Linux to send SIGTERM when its
parent dies (prctl PR_SET_PDEATHSIG, which an exec keeps), then becomes COMMAND. Without it, a
servegate killed with SIGKILL (the OOM killer, `kill -9`) left the model server running in its
own process group, holding the port the next servegate's model server needs. Elsewhere, or if
prctl fails, it becomes COMMAND all the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main(parent: int, command: list[str]) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no prctl: not told, as before
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            sys.exit(1)  # servegate died before the guard was set: start nothing
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
