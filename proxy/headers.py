"""Which headers cross servegate, in both directions.

Hop-by-hop headers describe one connection, so they stop here, together with every header the
sender named in its `Connection` header (RFC 9110 §7.6.1). Everything else passes in order,
repeated headers included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from proxy.aiohttp_internals import replace_head_serializer

HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Not hop-by-hop, but servegate answers them itself: it sends "100 Continue" to the client,
# and it frames the body it sends upstream (a buffered chunked upload gets a Content-Length).
_HANDLED_ON_REQUEST = frozenset({"expect", "content-length"})
# servegate sets X-Request-Id itself (the client's, when it is safe to pass on).
_REQUEST_DROP = HOP_BY_HOP | _HANDLED_ON_REQUEST | {"x-request-id"}


def _connection_named(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    values = [value for name, value in headers if name.lower() == "connection"]
    if not values:
        return frozenset()
    return frozenset(token.strip().lower() for value in values for token in value.split(","))


def request_headers(
    headers: Iterable[tuple[str, str]],
    *,
    client_ip: str | None,
    scheme: str,
    host: str | None,
    request_id: str,
) -> list[tuple[str, str]]:
    """The client's headers as the model server should see them."""
    items = list(headers)
    named = _connection_named(items)
    drop = _REQUEST_DROP | named if named else _REQUEST_DROP
    forwarded: list[tuple[str, str]] = []
    prior_for: list[str] = []
    has_proto = has_host = False
    for name, value in items:  # one pass: this runs on every request
        lower = name.lower()
        if lower in drop:
            continue
        if lower == "x-forwarded-for":
            prior_for.append(value)
            continue
        has_proto = has_proto or lower == "x-forwarded-proto"
        has_host = has_host or lower == "x-forwarded-host"
        forwarded.append((name, value))
    chain = ", ".join([*prior_for, client_ip] if client_ip else prior_for)
    if chain:
        forwarded.append(("X-Forwarded-For", chain))
    # A gateway in front may have terminated TLS: what it says about the original request wins.
    if not has_proto:
        forwarded.append(("X-Forwarded-Proto", scheme))
    if not has_host and host:
        forwarded.append(("X-Forwarded-Host", host))
    forwarded.append(("X-Request-Id", request_id))
    return forwarded


def decoded(raw: Iterable[tuple[bytes, bytes]]) -> Iterator[tuple[str, str]]:
    """Raw header bytes as the sender spelled them (aiohttp's parsed view may respell names).

    Bytes that are not UTF-8 (obs-text, RFC 9110 §5.5) become lone surrogates, as aiohttp's
    parsers carry them; `serialize_head` writes them back as the same bytes."""
    return (
        (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        for name, value in raw
    )


def response_headers(headers: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """The model server's headers as the client should see them."""
    items = list(headers)
    named = _connection_named(items)
    drop = HOP_BY_HOP | named if named else HOP_BY_HOP
    return ((name, value) for name, value in items if name.lower() not in drop)


# RFC 9110 §5.5 and RFC 9112 §4: no control bytes but HTAB in a field or the start line.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def serialize_head(start_line: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """A message head as bytes, with each surrogate-escaped byte restored.

    aiohttp encodes a head as UTF-8: its C writer silently drops a lone surrogate and its
    Python writer raises, so obs-text in a header value or a reason phrase, and raw bytes in a
    request target, would vanish. This writes the bytes the sender sent; for text without
    escaped bytes the output is identical to aiohttp's. Raises ValueError on a control byte
    (header injection), as aiohttp's writer does.
    """
    fields = [f"{name}: {value}" for name, value in headers]
    # One search over every field (joined by a space, which is allowed), not one per field.
    if _FORBIDDEN.search(start_line) or _FORBIDDEN.search(" ".join(fields)):
        raise ValueError("Forbidden control character detected in headers.")
    return "\r\n".join([start_line, *fields, "", ""]).encode("utf-8", "surrogateescape")


def install_byte_exact_writer() -> None:
    """Make every aiohttp message head in this process go through `serialize_head`.

    aiohttp offers no option for its header writer; its client and server both call one
    module-level function, so replacing it covers both directions.
    """
    replace_head_serializer(lambda start_line, headers: serialize_head(start_line, headers.items()))
