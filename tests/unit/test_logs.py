"""Logs: secrets never reach them, and library records come out as the same JSON lines."""

from __future__ import annotations

import io
import json
import logging

import structlog

from proxy import config, logs


def test_secret_header_values_are_redacted_whatever_their_case() -> None:
    stream = io.StringIO()
    logs.configure(config.LoggingSettings(format="json"), stream)
    headers = {"Authorization": "Bearer s3cret", "X-Auth-Token": "t0ken", "Accept": "*/*"}
    structlog.get_logger("test").info("upstream.request", headers=headers)
    line = json.loads(stream.getvalue())
    assert line["headers"] == {
        "Authorization": logs.REDACTED, "X-Auth-Token": logs.REDACTED, "Accept": "*/*"
    }  # fmt: skip
    assert "s3cret" not in stream.getvalue()


def test_standard_library_records_become_json_lines() -> None:
    stream = io.StringIO()
    logs.configure(config.LoggingSettings(format="json", level="info"), stream)
    logging.getLogger("aiohttp.server").warning("Error handling request from %s", "1.2.3.4")
    line = json.loads(stream.getvalue())
    assert line["event"] == "Error handling request from 1.2.3.4"
    assert line["level"] == "warning"
