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
    environ = {"SERVEGATE_UPSTREAM__URL": "model:8000"}
    with pytest.raises(config.SettingsError) as caught:
        config.load(None, environ, {"server.listen": "8080", "budget.margin": 50, "server.port": 1})
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


def test_a_client_certificate_needs_its_key(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("")
    with pytest.raises(config.SettingsError, match="cert_file and key_file"):
        config.load(None, {}, {"upstream.tls.cert_file": str(cert)})


def test_settings_are_frozen() -> None:
    settings = config.load(None, {})
    with pytest.raises(pydantic.ValidationError):
        settings.budget.seconds = 1  # type: ignore[misc]


# What Kubernetes puts into every pod of a namespace that has a Service named servegate.
SERVICE_LINKS = {
    "SERVEGATE_SERVICE_HOST": "10.96.0.12",
    "SERVEGATE_SERVICE_PORT": "8080",
    "SERVEGATE_SERVICE_PORT_HTTP": "8080",
    "SERVEGATE_PORT": "tcp://10.96.0.12:8080",
    "SERVEGATE_PORT_8080_TCP": "tcp://10.96.0.12:8080",
    "SERVEGATE_PORT_8080_TCP_PROTO": "tcp",
    "SERVEGATE_PORT_8080_TCP_PORT": "8080",
    "SERVEGATE_PORT_8080_TCP_ADDR": "10.96.0.12",
}


def test_kubernetes_service_links_are_ignored_with_one_warning_each() -> None:
    loaded = config.load_with_warnings(None, {**SERVICE_LINKS, "SERVEGATE_BUDGET__SECONDS": "30"})
    assert loaded.settings.budget.seconds == 30
    assert loaded.settings.server.listen == "0.0.0.0:8080"
    assert sorted(variable.name for variable in loaded.ignored) == sorted(SERVICE_LINKS)
    for variable in loaded.ignored:
        assert "Kubernetes service link (Service 'servegate')" in variable.reason
        assert "\n" not in str(variable)


def test_the_plain_load_accepts_service_links_too() -> None:
    assert config.load(None, SERVICE_LINKS) == config.load(None, {})


def test_a_misspelled_key_in_a_known_section_is_a_warning_that_names_the_setting_meant() -> None:
    loaded = config.load_with_warnings(
        None, {"SERVEGATE_UPSTREAM__URLL": "http://m:1", "SERVEGATE_UPSTREAM__TLS__VERIFYY": "0"}
    )
    assert loaded.settings.upstream.url == "http://127.0.0.1:8000"
    assert [str(variable) for variable in loaded.ignored] == [
        "SERVEGATE_UPSTREAM__TLS__VERIFYY: section upstream.tls has no setting 'verifyy' "
        "(did you mean SERVEGATE_UPSTREAM__TLS__VERIFY?); ignored",
        "SERVEGATE_UPSTREAM__URLL: section upstream has no setting 'urll' "
        "(did you mean SERVEGATE_UPSTREAM__URL?); ignored",
    ]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("SERVEGATE_UPSTREAM", "names the section upstream"),
        ("SERVEGATE_UPSTREAM__URL__HOST", "upstream.url is a setting, not a section"),
        ("SERVEGATE_TOKEN", "not a setting (those are SERVEGATE_<SECTION>__<KEY>"),
    ],
)
def test_a_variable_that_names_no_setting_is_ignored_with_the_reason(
    name: str, reason: str
) -> None:
    loaded = config.load_with_warnings(None, {name: "s3cr3t-value"})
    assert loaded.settings == config.load(None, {})
    [variable] = loaded.ignored
    assert variable.name == name
    assert reason in variable.reason
    assert "s3cr3t-value" not in str(variable)  # the environment may hold secrets


def test_a_whole_nested_section_may_still_be_given_as_yaml() -> None:
    loaded = config.load_with_warnings(None, {"SERVEGATE_UPSTREAM__TLS": "{verify: false}"})
    assert loaded.settings.upstream.tls.verify is False
    assert loaded.ignored == ()


def test_a_misspelled_key_in_the_file_or_a_flag_still_stops_start_up(tmp_path: Path) -> None:
    file = tmp_path / "s.yaml"
    file.write_text("upstream:\n  urll: http://m:1\n")
    with pytest.raises(config.SettingsError, match=r"upstream\.urll: unknown setting"):
        config.load_with_warnings(file, {})
    with pytest.raises(config.SettingsError, match=r"budget\.second: unknown setting"):
        config.load_with_warnings(None, {}, {"budget.second": 3})


@pytest.mark.parametrize(
    ("source", "key", "value", "said"),
    [
        ("flag", "budget.seconds", float("inf"), "finite number"),
        ("env", "BUDGET__SECONDS", "inf", "finite number"),
        ("flag", "server.max_headers", 2**64, "less than or equal to 2147483647"),
        ("flag", "server.backlog", 10**11, "less than or equal to 65535"),
        ("flag", "upstream.url", "http://127.0.0.1:0", "port from 1 to 65535"),
        ("flag", "upstream.url", "http://127.0.0 .1:8000", "a DNS name"),
        ("flag", "upstream.url", "http://exa%20mple:8000", "a DNS name"),
        ("flag", "upstream.url", 'http://exa"mple:8000', "a DNS name"),
        ("flag", "upstream.url", "http://a\x00b:8000", "a DNS name"),
        ("flag", "upstream.url", "http://user:s3cret@127.0.0.1:8000", "no user or password"),
        ("flag", "server.max_body_bytes", True, "no true/false setting"),
        ("env", "ADMISSION__MAX_CONCURRENCY", "true", "no true/false setting"),
        ("env", "HEALTH__PATH", "yes", "no true/false setting"),
        ("flag", "health.interval", 1e-9, "greater than or equal to 0.1"),
        ("flag", "upstream.tls.ca_file", "/nonexistent/ca.pem", "no such file"),
        ("flag", "server.admin_listen", "0.0.0.0:8080", "two different ports"),
    ],
)
def test_a_value_that_would_break_serving_stops_start_up_on_one_line(
    source: str, key: str, value: object, said: str
) -> None:
    """Each of these once started servegate and failed later (every request a 500, every
    connection dropped, a password in the log) or silently meant something else."""
    environ = {f"SERVEGATE_{key}": str(value)} if source == "env" else {}
    overrides = {key: value} if source == "flag" else {}
    with pytest.raises(config.SettingsError) as caught:
        config.load(None, environ, overrides)
    [problem] = caught.value.problems
    assert said in problem
    assert "s3cret" not in problem  # a password reaches no log, the error line included


@pytest.mark.parametrize(("word", "meant"), [("off", "off"), ("on", "on"), ("'auto'", "auto")])
def test_tls_takes_its_words_unquoted_though_yaml_reads_them_as_booleans(
    word: str, meant: str, tmp_path: Path
) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    file = tmp_path / "s.yaml"
    file.write_text(f"server: {{tls: {word}, cert_file: {cert}, key_file: {key}}}\n")
    assert config.load(file, {}).server.tls == meant
    environ = {
        "SERVEGATE_SERVER__TLS": word.strip("'"),
        "SERVEGATE_SERVER__CERT_FILE": str(cert),
        "SERVEGATE_SERVER__KEY_FILE": str(key),
    }
    assert config.load(None, environ).server.tls == meant


def test_a_union_setting_gets_one_line_without_pydantics_names() -> None:
    with pytest.raises(config.SettingsError) as caught:
        config.load(None, {}, {"server.max_connections": 0})
    [problem] = caught.value.problems
    assert problem.startswith("server.max_connections: ")
    assert "constrained" not in problem
    assert "literal" not in problem


def test_a_settings_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    file = tmp_path / "s.yaml"
    file.write_bytes(b"budget: {seconds: 30}\n# caf\xe9\n")
    with pytest.raises(config.SettingsError) as caught:
        config.load(file, {})
    [problem] = caught.value.problems
    assert "not UTF-8" in problem
