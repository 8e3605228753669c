"""Secrets never reach a log line or an error body: real requests carrying credentials, on the
normal path and every error path, with the log at debug level."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import structlog

from proxy import logs
from proxy.app import Servegate
from tests.conftest import LogCapture, StartGate, gate_url, make_settings
from tests.upstreams.apps import Recorder
from tests.upstreams.misbehaving import AnswersWith

# Each secret is unique, so a failure names the header that leaked.
SECRETS = {
    "Authorization": "Bearer tok-authorization-7f3a",
    "Proxy-Authorization": "Basic tok-proxy-authorization-91c2",
    "Cookie": "session=tok-cookie-55d1",
    "X-Auth-Token": "tok-x-auth-token-0b8e",
    "X-Api-Key": "tok-x-api-key-c4f0",
    "Api-Key": "tok-api-key-2d9b",
    "X-Model-Key": "tok-x-model-key-e61a",  # named in logging.redact_headers
}
CONFIGURED = {"logging.redact_headers": ["x-model-key"], "logging.level": "debug"}


@pytest.fixture(autouse=True)
def _configured_logging(log_capture: LogCapture) -> None:
    """The log set up as `servegate run` sets it up from these settings, at debug level."""
    settings = make_settings(**CONFIGURED).logging.model_copy(update={"format": "json"})
    logs.configure(settings, log_capture.stream)


def secret_heads() -> bytes:
    return b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in SECRETS.items())


def token(value: str) -> str:
    return value.split("=")[-1].split(" ")[-1]


def assert_nothing_leaked(text: str, where: str) -> None:
    for name, value in SECRETS.items():
        assert token(value) not in text, f"the {name} value reached {where}"


async def raw(gate: Servegate, data: bytes, *, wait: float = 10) -> bytes:
    """Send bytes, return everything servegate sent back until it closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.data_port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait):
            return await reader.read()
    finally:
        writer.close()


async def test_secret_headers_reach_the_model_but_no_log_line(
    start_gate: StartGate, upstream_url: str, recorder: Recorder, log_capture: LogCapture
) -> None:
    gate = await start_gate(upstream_url, **CONFIGURED)
    async with (
        aiohttp.ClientSession() as client,
        client.post(gate_url(gate, "/predict"), data=b"{}", headers=SECRETS) as response,
    ):
        assert response.status == 200
    seen = dict(recorder.last().headers)
    assert seen["Authorization"] == SECRETS["Authorization"]  # transparent to the model
    assert seen["X-Model-Key"] == SECRETS["X-Model-Key"]
    assert log_capture.access(), "the request was logged"
    assert_nothing_leaked(log_capture.stream.getvalue(), "the log")


UNPARSEABLE = {
    "control_byte_in_authorization": b"Authorization: Bearer tok-authorization-7f3a\x01\r\n",
    "a_200_kb_cookie": b"Cookie: session=tok-cookie-55d1" + b"c" * 200_000 + b"\r\n",
    "api_key_without_colon": b"X-Api-Key tok-x-api-key-c4f0\r\n",
    "nul_in_a_configured_header": b"X-Model-Key: tok-x-model-key-e61a\x00\r\n",
}


@pytest.mark.parametrize("shape", UNPARSEABLE)
async def test_an_unparseable_request_quoting_a_secret_keeps_it_out_of_log_and_body(
    shape: str, start_gate: StartGate, upstream_url: str, log_capture: LogCapture
) -> None:
    gate = await start_gate(upstream_url, **CONFIGURED)
    answer = await raw(gate, b"GET / HTTP/1.1\r\nHost: m\r\n" + UNPARSEABLE[shape] + b"\r\n")
    assert answer.split(b" ")[1] in (b"400", b"431")
    assert log_capture.events("request.rejected"), "the rejection was logged"
    assert_nothing_leaked(answer.decode("latin-1"), "the error body")
    assert_nothing_leaked(log_capture.stream.getvalue(), "the log")


async def test_an_unreachable_model_answers_without_echoing_the_request_secrets(
    start_gate: StartGate, log_capture: LogCapture
) -> None:
    gate = await start_gate("http://127.0.0.1:9", **CONFIGURED)  # nothing listens on port 9
    answer = await raw(
        gate,
        b"POST /p HTTP/1.1\r\nHost: m\r\nConnection: close\r\nX-Servegate-Timeout-Ms: 300\r\n"
        + secret_heads()
        + b"Content-Length: 2\r\n\r\n{}",
    )
    assert answer.split(b" ")[1] == b"503"
    assert_nothing_leaked(answer.decode("latin-1"), "the error body")
    assert_nothing_leaked(log_capture.stream.getvalue(), "the log")


async def test_a_malformed_model_answer_carrying_secrets_is_logged_without_them(
    start_gate: StartGate,
    raw_server: Callable[[Any], Awaitable[Any]],
    log_capture: LogCapture,
) -> None:
    model = await raw_server(
        AnswersWith(
            answer=b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=tok-cookie-55d1\r\n"
            b"X-Model-Key: tok-x-model-key-e61a\r\nBroken Header\r\n\r\n"
        )
    )
    gate = await start_gate(model.url, **CONFIGURED)
    answer = await raw(gate, b"GET /p HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
    assert answer.split(b" ")[1] == b"503"
    assert b"Broken" not in answer  # the model's bytes stay out of the body
    [line] = log_capture.access()
    assert line["cause"] == "malformed_response"
    assert "Broken Header" in line["detail"]  # the fault is named in the log...
    assert_nothing_leaked(answer.decode("latin-1"), "the error body")
    assert_nothing_leaked(log_capture.stream.getvalue(), "the log")  # ...its secrets are not


@pytest.mark.time_limit(30)
async def test_a_request_timed_out_in_its_headers_logs_none_of_them(
    start_gate: StartGate, upstream_url: str, log_capture: LogCapture
) -> None:
    gate = await start_gate(upstream_url, **{**CONFIGURED, "server.header_timeout": 0.5})
    answer = await raw(gate, b"GET / HTTP/1.1\r\nHost: m\r\n" + secret_heads())
    assert answer.split(b" ")[1] == b"408"
    assert_nothing_leaked(answer.decode("latin-1"), "the error body")
    assert_nothing_leaked(log_capture.stream.getvalue(), "the log")


async def test_logged_headers_and_tracebacks_are_redacted_at_debug_level(
    start_gate: StartGate, upstream_url: str, log_capture: LogCapture
) -> None:
    await start_gate(upstream_url, **CONFIGURED)
    log = structlog.get_logger("servegate.test")
    log.debug("headers.seen", headers=dict(SECRETS))
    log.debug("headers.seen", headers=list(SECRETS.items()))
    try:
        raise ValueError(b"X-Api-Key tok-x-api-key-c4f0")
    except ValueError:
        log.exception("failed")
    [as_mapping, as_pairs] = log_capture.events("headers.seen")
    assert as_mapping["headers"]["Authorization"] == "[redacted]"
    assert as_pairs["headers"][0] == ["Authorization", "[redacted]"]
    assert "ValueError" in log_capture.events("failed")[0]["exception"]
    assert_nothing_leaked(log_capture.stream.getvalue(), "the log")
