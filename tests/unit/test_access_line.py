"""The access line's fast path says what structlog would, and metric children bound once
count like fresh ones."""

from __future__ import annotations

import io
import json
from dataclasses import fields

from prometheus_client import CollectorRegistry

from proxy import config, logs
from proxy.budget import Spent
from proxy.metrics import Metrics


def test_the_access_line_is_one_json_object_with_the_event_id_level_and_utc_time() -> None:
    stream = io.StringIO()
    logs.configure(config.LoggingSettings(format="json"), stream)
    logs.access({"method": "POST", "status": 200, "spent": Spent().as_log()}, "abc")
    line = json.loads(stream.getvalue())
    assert line["event"] == "request"
    assert line["request_id"] == "abc"
    assert line["level"] == "info"
    assert line["timestamp"].endswith("Z")
    assert len(line["timestamp"]) == len("2026-01-01T00:00:00.000000Z")
    assert (line["method"], line["status"]) == ("POST", 200)


def test_no_access_line_below_info() -> None:
    stream = io.StringIO()
    logs.configure(config.LoggingSettings(format="json", level="warning"), stream)
    logs.access({"status": 200}, "abc")
    assert stream.getvalue() == ""


def test_lines_are_written_whole_and_in_pipe_sized_writes() -> None:
    class Recording(io.StringIO):
        writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return super().write(text)

    stream = Recording()
    lines = logs.Lines(stream)
    lines._pending = [f'{{"n": {i}, "pad": "{"x" * 100}"}}' for i in range(100)]
    lines.flush()
    assert all(len(w) <= logs.PIPE_BUF and w.endswith("\n") for w in stream.writes)
    assert [json.loads(x)["n"] for x in stream.getvalue().splitlines()] == list(range(100))


def test_spent_logs_every_field() -> None:
    assert set(Spent().as_log()) == {f.name for f in fields(Spent)}


def test_bound_children_count_like_labels() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, 40.0)
    for _ in range(3):
        metrics.record_answer("POST", 200, 0.01)
    metrics.record_answer("BREW", 418, 0.01)
    value = registry.get_sample_value
    assert value("servegate_requests_total", {"method": "POST", "code": "200"}) == 3
    assert value("servegate_requests_total", {"method": "other", "code": "418"}) == 1
    assert value("servegate_request_duration_seconds_count", {"method": "POST"}) == 3
