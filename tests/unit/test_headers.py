"""Header rules: hop-by-hop never crosses, everything else keeps its order and repeats."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.headers import HOP_BY_HOP, request_headers, response_headers, serialize_fields

NAMES = st.sampled_from(
    ["Content-Type", "X-A", "x-b", "Connection", "Keep-Alive", "TE", "Upgrade", "X-Named",
     "Transfer-Encoding", "Set-Cookie", "Proxy-Authorization", "Accept"]
)  # fmt: skip
HEADERS = st.lists(st.tuples(NAMES, st.sampled_from(["1", "x-named", "close", "a, b"])))


@given(HEADERS)
def test_no_hop_by_hop_or_connection_named_header_crosses(headers: list[tuple[str, str]]) -> None:
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    raw = [(name.encode(), value.encode()) for name, value in headers]
    passed = [(name.decode(), value.decode()) for name, value in response_headers(raw)]
    for name, _ in passed:
        assert name.lower() not in HOP_BY_HOP | named
    expected = [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP | named]
    assert passed == expected  # order and repeats kept


def test_forwarded_headers_are_added_and_a_gateways_own_are_kept() -> None:
    out = request_headers(
        [(b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-For", b"10.0.0.1"), (b"Host", b"h")],
        client_ip="127.0.0.1",
        scheme="http",
        authority=None,
        request_id="rid",
        id_passed=False,
    )
    assert (b"X-Forwarded-Proto", b"https") in out
    assert (b"X-Forwarded-For", b"10.0.0.1, 127.0.0.1") in out
    assert (b"X-Forwarded-Host", b"h") in out
    assert (b"X-Request-Id", b"rid") in out


def test_an_absolute_form_authority_is_host_and_forwarded_host_as_written() -> None:
    out = request_headers(
        [(b"Host", b"ignored"), (b"Accept", b"*/*")],
        client_ip=None,
        scheme="http",
        authority=b"H.Example:8080",
        request_id="rid",
        id_passed=False,
    )
    assert out[:2] == [(b"Host", b"H.Example:8080"), (b"Accept", b"*/*")]
    assert (b"X-Forwarded-Host", b"H.Example:8080") in out
    assert b"ignored" not in [value for _, value in out]


@pytest.mark.parametrize(
    "value", [b"a\r\nX-Injected: 1", b"a\nb", b"a\rb", b"a\x00b", b"a\x7fb", b"a\x1bb"]
)
def test_a_control_byte_in_a_field_is_refused_not_written(value: bytes) -> None:
    with pytest.raises(ValueError, match="Forbidden control character"):
        serialize_fields([(b"X-Ok", b"fine"), (b"X-Bad", value)])
    with pytest.raises(ValueError, match="Forbidden control character"):
        serialize_fields([(b"X-Bad" + value, b"v")])


def test_no_fields_are_no_bytes() -> None:
    assert serialize_fields([]) == b""


def test_fields_are_written_as_received_tab_and_obs_text_included() -> None:
    fields = [(b"X-A", b"1"), (b"x-a", b"a\tb \xe9\xff"), (b"Set-Cookie", b"")]
    assert serialize_fields(fields) == b"X-A: 1\r\nx-a: a\tb \xe9\xff\r\nSet-Cookie: \r\n"
