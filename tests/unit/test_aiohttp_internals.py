"""The aiohttp attributes servegate relies on are checked before it serves anything."""

from __future__ import annotations

import aiohttp
import pytest

from proxy import aiohttp_internals
from proxy.app import Servegate, StartupError
from tests.conftest import make_settings


async def test_the_installed_aiohttp_has_every_attribute_servegate_relies_on() -> None:
    await aiohttp_internals.check()


@pytest.mark.parametrize("name", ["_RETRY_SWITCH", "_KEEPALIVE"])
async def test_a_renamed_attribute_stops_start_up_with_one_line_naming_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aiohttp_internals, name, "_renamed_in_a_future_release")
    gate = Servegate(make_settings(**{"upstream.url": "http://127.0.0.1:9"}))
    with pytest.raises(StartupError) as raised:
        await gate.start()
    message = str(raised.value)
    assert "\n" not in message
    assert f"aiohttp {aiohttp.__version__} has no" in message
    assert "_renamed_in_a_future_release" in message


async def test_switching_off_the_hidden_retry_refuses_a_session_without_the_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aiohttp_internals, "_RETRY_SWITCH", "_renamed_in_a_future_release")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp_internals.MissingInternal):
            aiohttp_internals.disable_hidden_retry(session)
