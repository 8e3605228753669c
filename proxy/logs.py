"""structlog set-up, the one access line per request, and redaction of secrets.

JSON lines on stdout (a console renderer on a terminal). The request id is bound once per
request through contextvars, so every line about a request carries it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from proxy.config import LoggingSettings

REDACTED = "[redacted]"


def configure(settings: LoggingSettings, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    console = settings.format == "console" or (settings.format == "auto" and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        Redactor(settings.redact_headers),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info,
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
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(settings.level.upper())


class Redactor:
    """Replaces the values of secret headers wherever a `headers` mapping is logged."""

    def __init__(self, secret_names: tuple[str, ...]) -> None:
        self.secret_names = frozenset(name.lower() for name in secret_names)

    def __call__(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        headers = event.get("headers")
        if isinstance(headers, Mapping):
            event["headers"] = {
                name: REDACTED if name.lower() in self.secret_names else value
                for name, value in headers.items()
            }
        return event
