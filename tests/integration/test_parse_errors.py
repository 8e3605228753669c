"""Requests aiohttp cannot parse are answered in the HTTP version the client spoke (RFC 9110
§2.5), with the status that names the fault and the JSON body."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import StartGate, sample, scrape
from tests.integration.test_fidelity import exchange, json_body
from tests.upstreams.recording import RecordingModel

LONG_TARGET = b"/" + b"t" * 12_000


def head(target: bytes, *fields: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    lines = [b"GET " + target + b" " + version, b"Host: model", *fields, b"Connection: close"]
    return b"\r\n".join([*lines, b"", b""])


@pytest.mark.parametrize(
    ("sent", "status_line"),
    [
        (head(LONG_TARGET), b"HTTP/1.1 414 Request-URI Too Long"),
        (head(b"/", b"X-Big: " + b"a" * 9000), b"HTTP/1.1 431 Request Header Fields Too Large"),
        (head(b"/", *(b"X-%d: v" % i for i in range(200))),
         b"HTTP/1.1 431 Request Header Fields Too Large"),
        (head(b"/", b"X-Big: " + b"a" * 9000, version=b"HTTP/1.0"),
         b"HTTP/1.0 431 Request Header Fields Too Large"),
        (head(b"/", b"Bad Name: x"), b"HTTP/1.1 400 Bad Request"),
    ],
    ids=["414", "431-long-header", "431-many-headers", "431-http10-client", "400"],
)  # fmt: skip
async def test_a_request_that_cannot_be_parsed_is_answered_in_the_clients_version(
    sent: bytes, status_line: bytes, start_gate: StartGate, raw_server: Any
) -> None:
    model = await raw_server(RecordingModel())
    gate = await start_gate(model.url)
    raw = await exchange(gate.data_port, sent)
    assert raw.split(b"\r\n")[0] == status_line
    assert json_body(raw)["error_code"] == "servegate.bad_request"
    assert model.seen == []
    # A head limit reached is no hidden limit: the metrics count it by status.
    code = status_line.split(b" ")[1].decode()
    rejected = sample(await scrape(gate), "servegate_requests_rejected_total", code=code)
    assert rejected == 1
