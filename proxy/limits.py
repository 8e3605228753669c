"""The process's own limits that could cap traffic out of sight: open files and the data port's
accept queue. Raised where the process may raise them, and logged once at start-up.

nginx raises its open-file limit with `worker_rlimit_nofile`, Envoy and HAProxy raise theirs at
start; each held request costs servegate three descriptors (the client's connection, the model
server's and the duplicate of it that counts acknowledgements, proxy/acked.py), so the usual
soft limit of 1024 would stop it near 320 requests at once.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("servegate.limits")

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


@dataclass(frozen=True)
class OpenFiles:
    before: int  # the soft limit servegate was started with
    soft: int  # the soft limit now in force
    hard: int


def raise_open_files() -> OpenFiles:
    """Raise the soft RLIMIT_NOFILE to the hard limit (an unprivileged process may)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = soft if hard == resource.RLIM_INFINITY else hard
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a container may forbid it: keep and report the old one
            target = soft
    return OpenFiles(before=soft, soft=max(soft, target), hard=hard)


def kernel_backlog_cap() -> int | None:
    """net.core.somaxconn: Linux silently lowers any listen() backlog to it."""
    try:
        return int(SOMAXCONN.read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None


def apply(backlog: int) -> None:
    """Raise what can be raised and log one line with every limit in force."""
    files = raise_open_files()
    cap = kernel_backlog_cap()
    effective = backlog if cap is None else min(backlog, cap)
    fields = {
        "open_files": files.soft,
        "open_files_at_start": files.before,
        "open_files_hard": files.hard,
        "backlog": effective,
    }
    if effective < backlog:
        log.warning(
            "servegate.limits",
            message=f"the kernel caps server.backlog ({backlog}) at net.core.somaxconn "
            f"({cap}); raise it with `sysctl net.core.somaxconn={backlog}`",
            **fields,
        )
    else:
        log.info("servegate.limits", **fields)
