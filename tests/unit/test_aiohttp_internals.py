"""The aiohttp attributes servegate relies on are checked before it serves anything."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import client_proto, http_writer, web, web_protocol
from aiohttp.http_parser import HttpResponseParserPy

from proxy import aiohttp_internals
from proxy.app import Servegate, StartupError
from tests.conftest import make_settings

RENAMED = "_renamed_in_a_future_release"
# Every private aiohttp name servegate reads or writes, as aiohttp_internals names it.
NAMES = [
    "_UNPARSED",
    "_PARSER",
    "_HEAD_NOW",
    "_PREPARE_HEADERS",
    "_WAITER",
    "_REQUEST_COUNT",
    "_MESSAGES",
    "_BUFFER",
    "_PARSE_ERROR",
    "_SERIALIZER",
]


async def test_the_installed_aiohttp_has_every_attribute_servegate_relies_on() -> None:
    await aiohttp_internals.check()


@pytest.mark.parametrize("name", NAMES)
async def test_a_renamed_attribute_stops_start_up_with_one_line_naming_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aiohttp_internals, name, RENAMED)
    gate = Servegate(make_settings(**{"upstream.url": "http://127.0.0.1:9"}))
    with pytest.raises(StartupError) as raised:
        await gate.start()
    message = str(raised.value)
    assert "\n" not in message
    assert f"aiohttp {aiohttp.__version__} has no" in message
    assert f".{RENAMED}, which servegate needs to" in message
    assert message.count(RENAMED) == 1  # nothing else is reported missing


async def test_every_missing_attribute_is_named_in_the_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(http_writer, "_serialize_headers")
    monkeypatch.delattr(web_protocol, "ERROR")
    monkeypatch.delattr(web.StreamResponse, "_send_headers_immediately")
    with pytest.raises(aiohttp_internals.MissingInternal) as raised:
        await aiohttp_internals.check()
    message = str(raised.value)
    assert "\n" not in message
    for named in (
        "http_writer._serialize_headers",
        "web_protocol.ERROR",
        "StreamResponse._send_headers_immediately",
    ):
        assert named in message


async def test_a_private_attribute_gone_from_aiohttp_itself_is_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slots = tuple(name for name in web_protocol.RequestHandler.__slots__ if name != "_waiter")
    monkeypatch.setattr(web_protocol.RequestHandler, "__slots__", slots)
    with pytest.raises(aiohttp_internals.MissingInternal, match=r"RequestHandler\._waiter"):
        await aiohttp_internals.check()


async def test_aiohttps_pure_python_response_parser_stops_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What AIOHTTP_NO_EXTENSIONS, or an aiohttp built without its C extensions, would run: a
    # parser that keeps bytes after a last chunk for the connection's next answer.
    monkeypatch.setattr(client_proto, "HttpResponseParser", HttpResponseParserPy)
    with pytest.raises(aiohttp_internals.MissingInternal) as raised:
        await aiohttp_internals.check()
    message = str(raised.value)
    assert "\n" not in message
    assert "response parser that refuses bytes after a last chunk" in message
    assert "AIOHTTP_NO_EXTENSIONS" in message
