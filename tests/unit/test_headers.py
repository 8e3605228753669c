"""Header rules: hop-by-hop never crosses, everything else keeps its order and repeats."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.headers import HOP_BY_HOP, request_headers, response_headers

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
    passed = list(response_headers(headers))
    for name, _ in passed:
        assert name.lower() not in HOP_BY_HOP | named
    expected = [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP | named]
    assert passed == expected  # order and repeats kept


def test_forwarded_headers_are_added_and_a_gateways_own_are_kept() -> None:
    out = request_headers(
        [("X-Forwarded-Proto", "https"), ("X-Forwarded-For", "10.0.0.1"), ("Host", "h")],
        client_ip="127.0.0.1",
        scheme="http",
        host="h",
        request_id="rid",
    )
    assert ("X-Forwarded-Proto", "https") in out
    assert ("X-Forwarded-For", "10.0.0.1, 127.0.0.1") in out
    assert ("X-Forwarded-Host", "h") in out
    assert ("X-Request-Id", "rid") in out
