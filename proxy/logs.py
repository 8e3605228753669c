"""structlog set-up, the one access line per request, and redaction of secrets.

JSON lines on stdout (a console renderer on a terminal). The request id is bound once per
request through contextvars, so every line about a request carries it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

from proxy.config import LoggingSettings

REDACTED = "[redacted]"


def configure(settings: LoggingSettings, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    console = settings.format == "console" or (settings.format == "auto" and stream.isatty())
    renderer: Processor = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    shared: list[Processor] = [
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
        logger_factory=structlog.PrintLoggerFactory(stream),
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
