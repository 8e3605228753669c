"""structlog set-up, the one access line per request, and redaction of secrets.

JSON lines on stdout (a console renderer on a terminal). The request id is bound once per
request through contextvars, so every line about a request carries it.

The access line is written on every request, so it skips structlog's processor chain: its
fields are known, it holds no headers to redact, and orjson renders it in a tenth of the time
of the standard library's encoder. JSON lines are gathered while the event loop runs one step
and written together after it, one system call for many requests instead of one each.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import logging
import re
import sys
import time
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import Processor

from proxy.config import LoggingSettings

REDACTED = "[redacted]"
# A write to a pipe of at most PIPE_BUF bytes (4096 on Linux, POSIX's minimum is 512) is never
# interleaved with another writer's: with several workers on one stdout, lines stay whole.
PIPE_BUF = 4096


class Lines:
    """JSON lines written once per event-loop step, in order, in whole lines."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending: list[str] = []

    def write(self, line: str) -> None:
        if not self._pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop in this thread: write at once
                self._stream.write(line + "\n")
                self._stream.flush()
                return
        self._pending.append(line)

    def flush(self) -> None:
        lines, self._pending = self._pending, []
        chunk: list[str] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) + 1 > PIPE_BUF:
                self._write(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line) + 1
        if chunk:
            self._write(chunk)

    def logger(self, *_args: Any) -> _LinesLogger:
        """A structlog logger factory."""
        return _LinesLogger(self)

    def _write(self, chunk: list[str]) -> None:
        self._stream.write("\n".join(chunk) + "\n")
        self._stream.flush()


class _LinesLogger:
    """structlog's PrintLogger, writing through `Lines`."""

    def __init__(self, lines: Lines) -> None:
        self._lines = lines

    def msg(self, message: str) -> None:
        self._lines.write(message)

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = msg


class _Timestamps:
    """structlog's ISO 8601 UTC timestamp, with the date and time formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            moment = datetime.datetime.fromtimestamp(second, datetime.UTC)
            self._prefix = moment.strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{int((now - second) * 1e6):06d}Z"


class _Access:
    """Where access lines go: rendered here (JSON), or through structlog (console, tests)."""

    lines: Lines | None = None
    enabled = True
    worker: int | None = None
    timestamps = _Timestamps()
    logger: Any = structlog.get_logger("servegate.access")


@atexit.register
def flush() -> None:
    """Write the lines still waiting for the end of this event-loop step (at exit, and for a
    reader of the log that cannot wait for the loop)."""
    if _Access.lines is not None:
        _Access.lines.flush()


def access(fields: dict[str, Any], request_id: str) -> None:
    """The one access line of a request: `fields`, the event name `request` and the id."""
    if not _Access.enabled:
        return
    if _Access.lines is None:
        _Access.logger.info("request", **fields)
        return
    fields["event"] = "request"
    fields["request_id"] = request_id
    if _Access.worker is not None:
        fields["worker"] = _Access.worker
    fields["level"] = "info"
    fields["timestamp"] = _Access.timestamps.now()
    _Access.lines.write(orjson.dumps(fields).decode())


def configure(
    settings: LoggingSettings, stream: TextIO | None = None, worker: int | None = None
) -> None:
    """`worker`: the pid of a worker process (servegate run --workers), added to every line."""
    stream = stream or sys.stdout
    console = settings.format == "console" or (settings.format == "auto" and stream.isatty())
    renderer: Processor = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    lines = None if console else Lines(stream)
    _Access.lines = lines
    _Access.enabled = settings.level in ("debug", "info")
    _Access.worker = worker
    shared: list[Processor] = [
        *([_Tag("worker", worker)] if worker is not None else []),
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Redaction runs last before rendering, so a formatted traceback is redacted too.
    redactor = Redactor(settings.redact_headers)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[settings.level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream) if lines is None else lines.logger,
        cache_logger_on_first_use=False,
    )
    # Libraries (aiohttp, asyncio) log through the standard library: the same JSON lines.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                *shared,
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redactor,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(settings.level.upper())


# Never logged, whatever logging.redact_headers says: credentials and API keys by their
# common names (DESIGN.md §6, and the API-key headers of common gateways).
ALWAYS_SECRET = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-auth-token",
        "x-api-key",
        "api-key",
    }
)
# A bytes literal in a traceback is wire data (aiohttp quotes the offending request line in
# its parse errors), and may be a secret's value without its name.
_BYTES_LITERAL = re.compile(r"b'(?:[^'\\]|\\.)*'" + r'|b"(?:[^"\\]|\\.)*"')


class _Tag:
    """Adds one fixed field to every line."""

    def __init__(self, name: str, value: object) -> None:
        self.name, self.value = name, value

    def __call__(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event[self.name] = self.value
        return event


class Redactor:
    """Keeps secret header values out of every log line: in a logged `headers` mapping (or
    list of pairs), in `Name: value` anywhere in free text (a model's malformed head, a parse
    error, a traceback), and, in tracebacks, every quoted wire byte."""

    def __init__(self, secret_names: tuple[str, ...]) -> None:
        self.secret_names = ALWAYS_SECRET | {name.lower() for name in secret_names}
        names = "|".join(re.escape(name) for name in sorted(self.secret_names, key=len)[::-1])
        # The value runs to the end of its line: a real line break, an escaped one (\r, \n
        # in a repr), or the quote that closes a repr.
        self._in_text = re.compile(
            rf"(?i)(?:(?<=\\[rn])|(?<![\w-]))({names})(['\"]?\s*:\s*['\"]?)"
            rf"((?:(?!\\r|\\n)[^\r\n'\"])*)"
        )

    def __call__(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if key == "headers":
                event[key] = self._headers(value)
            elif key == "exception" and isinstance(value, str):
                event[key] = _BYTES_LITERAL.sub("b'[redacted]'", self._text(value))
            else:
                event[key] = self._value(value)
        return event

    def _headers(self, headers: Any) -> Any:
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        if not isinstance(pairs, Iterable) or isinstance(pairs, str | bytes):
            return self._value(headers)
        redacted = [
            (name, REDACTED if str(name).lower() in self.secret_names else value)
            for name, value in pairs
        ]
        return dict(redacted) if isinstance(headers, Mapping) else redacted

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._text(value)
        if isinstance(value, Mapping):
            return {key: self._value(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self._value(item) for item in value]
        return value

    def _text(self, text: str) -> str:
        return self._in_text.sub(rf"\1\2{REDACTED}", text)


def without_client_bytes(message: str) -> str:
    """aiohttp's description of a request it could not parse, without the request bytes it
    quotes (they may hold a secret, even one whose header name is cut off)."""
    kept = _BYTES_LITERAL.split(message, maxsplit=1)[0]
    return kept.rstrip(" :.\n") or message.split(":", 1)[0]
