"""A WSGI model that reads compressed request bodies itself, as Triton-style inference servers
do for `request_compression_algorithm="gzip"`: gzip and deflate are decoded by the app, any
other Content-Encoding is refused with 415. Every answer says what arrived (the encoding, the
size and SHA-256 of the bytes as received), so a test can compare direct and proxied requests
by the answer alone. Run under Gunicorn (tests/upstreams/gunicorn.py)."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.decompress,
    "deflate": zlib.decompress,  # RFC 9110 §8.4.1.2: the zlib format
    "identity": lambda body: body,
}


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    raw = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    encoding = environ.get("HTTP_CONTENT_ENCODING", "identity").strip().lower()
    received = {"encoding": encoding, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    decode = DECODERS.get(encoding)
    if decode is None:
        refusal = {"error": f"unsupported Content-Encoding {encoding!r}", **received}
        return _answer(start_response, "415 Unsupported Media Type", refusal)
    try:
        inputs = json.loads(decode(raw))["inputs"]
    except (OSError, zlib.error, ValueError, KeyError, TypeError) as exc:
        return _answer(start_response, "400 Bad Request", {"error": str(exc), **received})
    sums = [round(sum(row), 6) for row in inputs]
    return _answer(start_response, "200 OK", {"outputs": sums, **received})


def _answer(start_response: StartResponse, status: str, payload: dict[str, Any]) -> list[bytes]:
    body = json.dumps(payload, sort_keys=True).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])  # fmt: skip
    return [body]
