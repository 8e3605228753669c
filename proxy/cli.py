"""Entry points: `servegate run | doctor | check-config`. Builds the settings, calls the app.

`servegate run [options] -- COMMAND...` is supervise mode: COMMAND is the model server, started
and restarted by servegate. Everything after the first `--` belongs to it, unparsed.

Exit codes: 0 done, 1 could not start (doctor: something would cause a 4503), 2 invalid settings
or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from proxy import config, doctor, limits, logs, workers
from proxy.app import StartupError, serve
from proxy.upstream import TLSFilesError, client_ssl_context

log = structlog.get_logger("servegate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="servegate",
        description="A reverse proxy for model-inference servers that names every 4503.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="serve: forward the data port to the model server",
        usage="%(prog)s [options] [-- COMMAND ...]",
        epilog="-- COMMAND ...: run the model server as servegate's child (supervise mode), "
        "e.g. -- gunicorn demo.model:app --bind 127.0.0.1:8000",
    )
    run.add_argument("--upstream", metavar="URL", help="model server, e.g. http://127.0.0.1:8000")
    run.add_argument("--listen", metavar="HOST:PORT", help="data port (default 0.0.0.0:8080)")
    run.add_argument("--admin-listen", metavar="HOST:PORT", help="admin port (default :9464)")
    run.add_argument("--budget", metavar="SECONDS", type=float, help="end-to-end budget (40)")
    run.add_argument("--config", metavar="FILE", type=Path, help="YAML settings file")
    run.add_argument(
        "--workers",
        metavar="N",
        default="1",
        help="worker processes sharing the data port (default 1; auto: one per CPU)",
    )
    run.add_argument(workers.WORKER_FLAG, metavar="DIR", type=Path, help=argparse.SUPPRESS)
    diagnose = commands.add_parser(
        "doctor",
        help="probe a model server and say what would cause a 4503, per category",
        epilog="Exit code: 0 when no check fails (warnings alone do not), 1 when one does, "
        "2 for usage errors. Settings not given as flags come from --config and SERVEGATE_* "
        "variables, as for run.",
    )
    diagnose.add_argument("--upstream", metavar="URL", help="model server (default as for run)")
    diagnose.add_argument("--health-path", metavar="PATH", help="GET this path, expect 2xx")
    diagnose.add_argument("--budget", metavar="SECONDS", type=float, help="end-to-end budget (40)")
    diagnose.add_argument("--config", metavar="FILE", type=Path, help="YAML settings file")
    diagnose.add_argument(
        "--max-idle-wait",
        metavar="SECONDS",
        type=_positive,
        default=30.0,
        help="hold an idle connection open this long at most, to see the server close it (30)",
    )
    diagnose.add_argument(
        "--sample-body",
        metavar="JSON",
        help="time POST /predict with this body, not the health GET",
    )
    diagnose.add_argument("--json", action="store_true", help="print the report as JSON")
    check = commands.add_parser("check-config", help="validate a settings file and print it")
    check.add_argument("file", type=Path)
    return parser


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    given = vars(args)  # each command has its own flags
    flags: dict[str, Any] = {
        "upstream.url": given.get("upstream"),
        "server.listen": given.get("listen"),
        "server.admin_listen": given.get("admin_listen"),
        "budget.seconds": given.get("budget"),
        "health.path": given.get("health_path"),
    }
    if given.get("worker_of") is not None:  # the parent serves the admin port
        flags |= {"server.admin_listen": "127.0.0.1:0", "server.reuse_port": True}
    return {key: value for key, value in flags.items() if value is not None}


def split_command(argv: Sequence[str]) -> tuple[list[str], tuple[str, ...] | None]:
    """servegate's own arguments, and the model server's command after the first `--`."""
    if "--" not in argv:
        return list(argv), None
    at = list(argv).index("--")
    return list(argv[:at]), tuple(argv[at + 1 :])


def main(argv: Sequence[str] | None = None) -> int:
    own, command = split_command(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(own)
    if command is not None and (args.command != "run" or not command):
        parser.error("`-- COMMAND ...` starts the model server: only with `run`, and not empty")
    try:
        if args.command == "check-config":
            settings, ignored = config.load_with_warnings(args.file, os.environ)
            _warn(ignored)
            client_ssl_context(settings.upstream.tls)  # its files load, as `run` loads them
            print(json.dumps(config.effective(settings), indent=2))
            return 0
        settings, ignored = config.load_with_warnings(
            args.config, os.environ, _flag_overrides(args)
        )
    except config.SettingsError as exc:
        for problem in exc.problems:
            print(f"servegate: invalid setting: {problem}", file=sys.stderr)
        return 2
    except TLSFilesError as exc:
        print(f"servegate: invalid setting: {exc}", file=sys.stderr)
        return 2
    if args.command == "doctor":
        _warn(ignored)
        try:
            client_ssl_context(settings.upstream.tls)
        except TLSFilesError as exc:
            print(f"servegate: {exc}", file=sys.stderr)
            return 2
        return doctor.main(settings, args.max_idle_wait, args.sample_body, json_output=args.json)
    logs.configure(settings.logging, worker=os.getpid() if args.worker_of else None)
    for variable in ignored:  # now that the log has its format: one warning line each
        log.warning("config.variable_ignored", variable=variable.name, reason=variable.reason)
    try:
        size = workers.count(args.workers)
    except ValueError as exc:
        parser.error(str(exc))
    if args.worker_of is None:  # a worker inherits its parent's limits
        limits.apply(settings.server.backlog)
    try:
        if args.worker_of is not None:
            directory = args.worker_of
            _run(
                serve(
                    settings,
                    (),
                    on_started=workers.announce(directory),
                    worker=True,
                    parent_supervises=workers.parent_supervises(directory),
                )
            )
        elif size > 1:
            own_args = _without_option(own, "--workers")
            _run(workers.run(settings, size, own_args, command or ()))
        else:
            _run(serve(settings, command or ()))
    except StartupError as exc:
        print(f"servegate: {exc}", file=sys.stderr)
        return 1
    return 0


def _warn(ignored: Sequence[config.IgnoredVariable]) -> None:
    """Commands that print a report rather than a log say it on stderr, one line each."""
    for variable in ignored:
        print(f"servegate: warning: {variable}", file=sys.stderr)


def _without_option(args: list[str], option: str) -> list[str]:
    """`args` less `option VALUE` and `option=VALUE`."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def _run(main_coroutine: Any) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional where it cannot be built
        asyncio.run(main_coroutine)
    else:
        uvloop.run(main_coroutine)


if __name__ == "__main__":
    sys.exit(main())
