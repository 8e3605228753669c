"""Settings: sources in priority order, one line per problem, frozen once built."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from proxy import config


def test_defaults_follow_the_design() -> None:
    settings = config.load(None, environ={})
    assert settings.server.listen == "0.0.0.0:8080"
    assert settings.server.admin_listen == "0.0.0.0:9464"
    assert settings.upstream.url == "http://127.0.0.1:8000"
    assert (settings.budget.seconds, settings.budget.margin) == (40, 1)
    assert settings.retry.replay_buffer_bytes == 12 * 1024 * 1024
    assert settings.upstream.idle_expiry < 2  # below Gunicorn's default keep-alive


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "s.yaml"
    file.write_text("budget: {seconds: 30}\nupstream: {url: 'http://file:1', idle_expiry: 0.5}\n")
    environ = {"SERVEGATE_UPSTREAM__URL": "http://env:2", "SERVEGATE_BUDGET__MARGIN": "2"}
    settings = config.load(file, environ, {"budget.seconds": 20})
    assert settings.budget.seconds == 20
    assert settings.budget.margin == 2
    assert settings.upstream.url == "http://env:2"
    assert settings.upstream.idle_expiry == 0.5


def test_every_problem_is_reported_on_its_own_line() -> None:
    environ = {"SERVEGATE_UPSTREAM__URL": "model:8000", "SERVEGATE_SERVER__PORT": "1"}
    with pytest.raises(config.SettingsError) as caught:
        config.load(None, environ, {"server.listen": "8080", "budget.margin": 50})
    problems = caught.value.problems
    assert len(problems) == 4
    assert any(p.startswith("upstream.url:") and "'model:8000'" in p for p in problems)
    assert "server.port: unknown setting" in problems
    assert any(p.startswith("server.listen:") and "HOST:PORT" in p for p in problems)
    assert any(p.startswith("budget:") and "margin" in p for p in problems)


@pytest.mark.parametrize("address", ["[::1]:8080", "127.0.0.1:0", "0.0.0.0:65535"])
def test_listen_addresses_split_into_bindable_parts(address: str) -> None:
    settings = config.load(None, {}, {"server.listen": address})
    host, port = config.split_address(settings.server.listen)
    assert host in ("::1", "127.0.0.1", "0.0.0.0")
    assert 0 <= port <= 65535


def test_an_upstream_url_with_a_path_is_refused() -> None:
    with pytest.raises(config.SettingsError, match=r"upstream\.url"):
        config.load(None, {}, {"upstream.url": "http://model:8000/v1"})


def test_a_client_certificate_needs_its_key() -> None:
    with pytest.raises(config.SettingsError, match="cert_file and key_file"):
        config.load(None, {}, {"upstream.tls.cert_file": "/c.pem"})


def test_settings_are_frozen() -> None:
    settings = config.load(None, {})
    with pytest.raises(pydantic.ValidationError):
        settings.budget.seconds = 1  # type: ignore[misc]
