"""Demo model server for servegate: a fixed-weight iris logistic-regression WSGI app.

Routes: POST /predict, GET /health, any-method /echo[/...]. Failure knobs: ``?sleep=SECONDS`` and
``?crash=1`` per request, ``DEMO_SLEEP`` and ``DEMO_CRASH_EVERY=N`` process-wide. TLS is
Gunicorn's job (``--certfile``/``--keyfile``), not this app's.
"""

import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

MODEL_NAME = "iris-logistic"
LABELS = ("setosa", "versicolor", "virginica")
# Rows: classes; columns: sepal length, sepal width, petal length, petal width (cm).
# Close to what scikit-learn's LogisticRegression learns on the full iris data set.
WEIGHTS = (
    (-0.42, 0.97, -2.40, -1.03),
    (0.53, -0.32, -0.21, -0.79),
    (-0.11, -0.64, 2.61, 1.82),
)
BIASES = (9.85, 2.24, -12.09)
N_FEATURES = len(WEIGHTS[0])

MAX_SLEEP = 600.0
MAX_BODY = 1 << 20  # /predict only; /echo must accept anything a proxy test throws at it


def _non_negative(raw: str, what: str, kind: type[int] | type[float] = float) -> float:
    error = f"{what} must be a {'whole' if kind is int else 'finite'} number >= 0, got {raw!r}"
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(error) from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(error)
    return value


# Read once at import: a misconfigured knob should stop the worker from booting, loudly.
DEMO_SLEEP = min(_non_negative(os.environ.get("DEMO_SLEEP") or "0", "DEMO_SLEEP"), MAX_SLEEP)
DEMO_CRASH_EVERY = int(
    _non_negative(os.environ.get("DEMO_CRASH_EVERY") or "0", "DEMO_CRASH_EVERY", int)
)

# Gunicorn forks workers after import, so each worker gets its own counter; the lock
# matters under gthread, where several threads of one worker handle /predict at once.
_predict_count = itertools.count(1)
_count_lock = threading.Lock()


class BadRequest(Exception):
    """Client error reported with the message as ``error``."""

    status = "400 Bad Request"


class TooLarge(BadRequest):
    status = "413 Content Too Large"


def predict_row(row: list[float]) -> dict[str, Any]:
    logits = [
        b + sum(w * x for w, x in zip(ws, row, strict=True))
        for ws, b in zip(WEIGHTS, BIASES, strict=True)
    ]
    top = max(logits)  # subtracting the max keeps exp() from overflowing
    exps = [math.exp(z - top) for z in logits]
    best = max(range(len(exps)), key=exps.__getitem__)
    return {"label": LABELS[best], "probability": round(exps[best] / sum(exps), 4)}


def parse_inputs(body: bytes) -> list[list[float]]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise BadRequest('body must be a JSON object with an "inputs" key')
    rows = doc["inputs"]
    if not isinstance(rows, list) or not rows:
        raise BadRequest('"inputs" must be a non-empty list')
    if not isinstance(rows[0], list):
        rows = [rows]  # a single flat row
    parsed: list[list[float]] = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != N_FEATURES:
            raise BadRequest(f"inputs[{i}] must be a list of {N_FEATURES} numbers")
        values: list[float] = []
        for j, x in enumerate(row):
            # bool is an int subclass and NaN/Infinity are accepted by json.loads.
            if isinstance(x, bool) or not isinstance(x, int | float):
                raise BadRequest(f"inputs[{i}][{j}] must be a number, got {type(x).__name__}")
            try:
                values.append(float(x))
            except OverflowError:
                raise BadRequest(f"inputs[{i}][{j}] is out of range") from None
            if not math.isfinite(values[-1]):
                raise BadRequest(f"inputs[{i}][{j}] must be finite")
        parsed.append(values)
    return parsed


def read_body(environ: dict[str, Any], limit: int | None = None) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH", "")
    if length:
        try:
            size = int(length)
        except ValueError:
            raise BadRequest("invalid Content-Length") from None
        if limit is not None and size > limit:
            raise TooLarge(f"body exceeds {limit} bytes")
        return stream.read(size)
    # Chunked upload: no Content-Length, Gunicorn's reader returns b"" at the end.
    chunks: list[bytes] = []
    total = 0
    while chunk := stream.read(65536):
        total += len(chunk)
        if limit is not None and total > limit:
            raise TooLarge(f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def sleep_seconds(query: dict[str, list[str]], default: float) -> float:
    if "sleep" not in query:
        return default
    try:
        return min(_non_negative(query["sleep"][-1], "sleep"), MAX_SLEEP)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def handle_predict(environ: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
    body = read_body(environ, MAX_BODY)
    delay = sleep_seconds(query, DEMO_SLEEP)
    with _count_lock:
        n = next(_predict_count)
    if delay:
        time.sleep(delay)
    if query.get("crash", [""])[-1] in ("1", "true") or (
        DEMO_CRASH_EVERY and n % DEMO_CRASH_EVERY == 0
    ):
        # os._exit skips cleanup and the response, as a segfaulting inference library would.
        os._exit(1)
    rows = parse_inputs(body)
    return {
        "predictions": [predict_row(row) for row in rows],
        "model": MODEL_NAME,
        "worker_pid": os.getpid(),
    }


def handle_echo(environ: dict[str, Any]) -> dict[str, Any]:
    body = read_body(environ)
    headers = {
        key.removeprefix("HTTP_").replace("_", "-").title(): value
        for key, value in environ.items()
        # WSGI strips the HTTP_ prefix from these two, but they are request headers all the same.
        if key.startswith("HTTP_") or (key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value)
    }
    return {
        "method": environ["REQUEST_METHOD"],
        "path": environ.get("PATH_INFO", ""),
        "query": environ.get("QUERY_STRING", ""),
        # Gunicorn's undecoded request target, to check exactly what a proxy forwarded.
        "raw_uri": environ.get("RAW_URI"),
        "headers": headers,
        "body_bytes": len(body),
    }


def json_response(
    start_response: StartResponse,
    status: str,
    payload: dict[str, Any],
    extra: list[tuple[str, str]] | None = None,
) -> Iterable[bytes]:
    data = json.dumps(payload).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    start_response(status, headers + (extra or []))
    return [data]


ROUTES = {"/predict": "POST", "/health": "GET", "/echo": None}


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    method = environ["REQUEST_METHOD"]
    # /echo/<anything> echoes too, so tests can see how a proxy rewrote a path.
    route = "/echo" if path.startswith("/echo/") else path
    if route not in ROUTES:
        return json_response(start_response, "404 Not Found", {"error": f"no route {path}"})
    allowed = ROUTES[route]
    if allowed is not None and method != allowed:
        return json_response(
            start_response,
            "405 Method Not Allowed",
            {"error": f"method {method} not allowed on {path}"},
            [("Allow", allowed)],
        )
    query = parse_qs(environ.get("QUERY_STRING", ""))
    try:
        if route == "/predict":
            payload = handle_predict(environ, query)
        elif route == "/health":
            time.sleep(sleep_seconds(query, 0.0))
            payload = {"status": "ok", "worker_pid": os.getpid()}
        else:
            payload = handle_echo(environ)
    except BadRequest as exc:
        return json_response(start_response, exc.status, {"error": str(exc)})
    return json_response(start_response, "200 OK", payload)
