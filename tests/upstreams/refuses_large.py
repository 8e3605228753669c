"""A WSGI model that refuses a body over 1 MB from its Content-Length alone, without reading
it, as a framework's body limit does (Flask's MAX_CONTENT_LENGTH, Django's
DATA_UPLOAD_MAX_MEMORY_SIZE): under Gunicorn's sync worker, the connection then closes with
the body unread, and its kernel resets it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

LIMIT = 1_000_000
REFUSAL = b'{"error": "too large"}'


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length > LIMIT:
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(REFUSAL)))]
        start_response("413 Content Too Large", headers)
        return [REFUSAL]
    environ["wsgi.input"].read(length)
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
