"""Properties of header handling over generated header lists, in any case and order: hop-by-hop
and Connection-named headers never cross, everything else crosses unchanged, and the
X-Forwarded-* chain is extended, never rewritten."""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import given
from hypothesis import strategies as st

from proxy.headers import HOP_BY_HOP, longer_field, request_headers, response_headers

FORWARDED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
KNOWN = sorted(HOP_BY_HOP) + list(FORWARDED) + ["x-request-id", "host", "content-type", "accept"]


@st.composite
def header_name(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(KNOWN) | st.from_regex(r"X-[A-Za-z0-9]{1,8}", fullmatch=True))
    # Case never matters to the rules (RFC 9110 §5.1): spell each letter either way.
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if flip else c.lower() for c, flip in zip(name, flips, strict=True))


VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


@st.composite
def connection_value(draw: st.DrawFn) -> str:
    """A Connection header's token list, with the spacing clients really send."""
    tokens = draw(st.lists(header_name() | st.sampled_from(["close", "keep-alive"]), max_size=4))
    return draw(st.sampled_from([",", ", ", " ,  "])).join(tokens)


HEADER = st.tuples(header_name(), VALUE) | st.tuples(st.just("Connection"), connection_value())
HEADERS = st.lists(HEADER, max_size=12)
IP = st.from_regex(r"(\d{1,3}\.){3}\d{1,3}", fullmatch=True)


def named_by_connection(headers: list[tuple[str, str]]) -> set[str]:
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }


def named_on_request(headers: list[tuple[str, str]]) -> set[str]:
    """What Connection names that a request's headers lose: Host, for every recipient, and
    the request id are kept (RFC 9110 §7.6.1 forbids naming such a field)."""
    return named_by_connection(headers) - {"host", "x-request-id"}


def as_bytes(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers]


def as_text(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode(), value.decode()) for name, value in headers]


def outbound(
    headers: list[tuple[str, str]], client_ip: str, *, id_passed: bool = False
) -> list[tuple[str, str]]:
    sent = request_headers(
        as_bytes(headers),
        client_ip=client_ip,
        scheme="https",
        authority=None,
        request_id="rid-1",
        id_passed=id_passed,
    )
    return as_text(sent)


@given(HEADERS, IP)
def test_no_hop_by_hop_or_connection_named_header_reaches_the_model(
    headers: list[tuple[str, str]], client_ip: str
) -> None:
    stopped = HOP_BY_HOP | named_on_request(headers)
    added = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}
    for name, _ in outbound(headers, client_ip):
        assert name.lower() not in stopped - added


@given(HEADERS, IP)
def test_every_end_to_end_header_reaches_the_model_unchanged_in_order(
    headers: list[tuple[str, str]], client_ip: str
) -> None:
    dropped = HOP_BY_HOP | named_on_request(headers) | {"x-request-id", "x-forwarded-for"}
    dropped |= {"content-length", "expect"}  # servegate frames the body and answers Expect
    expected = [(n, v) for n, v in headers if n.lower() not in dropped]
    got = [(n, v) for n, v in outbound(headers, client_ip) if n.lower() not in dropped]
    assert got[: len(expected)] == expected


@given(HEADERS, IP)
def test_x_forwarded_for_extends_the_chain_with_the_client_once(
    headers: list[tuple[str, str]], client_ip: str
) -> None:
    stopped = HOP_BY_HOP | named_on_request(headers)
    prior = [v for n, v in headers if n.lower() == "x-forwarded-for" and n.lower() not in stopped]
    chains = [v for n, v in outbound(headers, client_ip) if n.lower() == "x-forwarded-for"]
    assert chains == [", ".join([*prior, client_ip])]


@given(HEADERS, IP)
def test_a_gateway_s_forwarded_proto_and_host_win_else_servegate_sets_them(
    headers: list[tuple[str, str]], client_ip: str
) -> None:
    stopped = HOP_BY_HOP | named_on_request(headers)
    out = outbound(headers, client_ip)
    # The host the client asked for: its first Host field that crosses, if it names one.
    asked = [v for n, v in headers if n.lower() == "host" and "host" not in stopped][:1]
    for name, own in (("x-forwarded-proto", ["https"]), ("x-forwarded-host", asked)):
        sent = [v for n, v in headers if n.lower() == name and name not in stopped]
        assert [v for n, v in out if n.lower() == name] == (sent or [v for v in own if v])


@given(HEADERS, IP)
def test_the_model_sees_exactly_one_request_id_servegate_s(
    headers: list[tuple[str, str]], client_ip: str
) -> None:
    ids = [v for n, v in outbound(headers, client_ip) if n.lower() == "x-request-id"]
    assert ids == ["rid-1"]


@given(HEADERS, IP)
def test_a_clients_own_request_ids_pass_as_sent_and_none_is_added(
    headers: list[tuple[str, str]], client_ip: str
) -> None:
    stopped = HOP_BY_HOP | named_on_request(headers)
    sent = [v for n, v in headers if n.lower() == "x-request-id" and n.lower() not in stopped]
    out = outbound(headers, client_ip, id_passed=True)
    assert [v for n, v in out if n.lower() == "x-request-id"] == sent


@given(HEADERS)
def test_the_client_sees_every_end_to_end_response_header_and_no_hop_by_hop_one(
    headers: list[tuple[str, str]],
) -> None:
    stopped = HOP_BY_HOP | named_by_connection(headers)
    assert as_text(response_headers(as_bytes(headers))) == [
        (n, v) for n, v in headers if n.lower() not in stopped
    ]


@given(
    st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=40)), max_size=8),
    st.integers(min_value=0, max_value=100),
)
def test_the_first_field_over_the_limit_is_found_whatever_the_head_adds_up_to(
    fields: list[tuple[bytes, bytes]], limit: int
) -> None:
    """A head whose bytes add up to no more than the limit is passed at once; else every field
    is measured, its name and value together."""
    expected = next((name for name, value in fields if len(name) + len(value) > limit), None)
    assert longer_field(tuple(fields), limit) == expected
