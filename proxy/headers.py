"""Which headers cross servegate, in both directions.

Hop-by-hop headers describe one connection, so they stop here, together with every header the
sender named in its `Connection` header (RFC 9110 §7.6.1). Everything else passes in order,
repeated headers included.
"""

from __future__ import annotations

import email.utils
import functools
import re
import time
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
# servegate sets the budget left itself: a client's own value would sit before servegate's, and
# most frameworks read the first.
_REQUEST_DROP = HOP_BY_HOP | _HANDLED_ON_REQUEST | {"x-servegate-remaining-ms"}
# Named in Connection, these still cross: Host is the request's, for every recipient (RFC
# 9110 §7.6.1 forbids naming such a field; nginx ignores Connection's names altogether), and
# the request id the access line logs must reach the model.
_NEVER_HOP_BY_HOP = frozenset({b"host", b"x-request-id"})
# Headers cross as the bytes they came as: names compared lowercased, never decoded.
_HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)
_REQUEST_DROP_BYTES = frozenset(name.encode() for name in _REQUEST_DROP)
# A client's X-Request-Id fields pass as sent when the first can be logged as sent; else
# servegate's own id takes their place.
_REQUEST_DROP_WITH_ID_BYTES = _REQUEST_DROP_BYTES | {b"x-request-id"}

Fields = list[tuple[bytes, bytes]]  # header fields as sent: (name, value), in order


def _connection_named(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    values = [value for name, value in headers if name.lower() == b"connection"]
    if not values:
        return frozenset()
    return frozenset(token.strip().lower() for value in values for token in value.split(b","))


def request_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    client_ip: str | None,
    scheme: str,
    authority: bytes | None,
    request_id: str,
    id_passed: bool,
) -> Fields:
    """The client's header fields, as received, as the model server should see them.

    `authority` is an absolute-form target's (`GET http://host:81/x`): it replaces Host (RFC
    9112 §3.2.2). X-Forwarded-Host names the host the client asked for, as it wrote it: that
    authority, else its Host field; none when it sent neither (an HTTP/1.0 client may not).
    `id_passed`: `request_id` is the client's own, whose X-Request-Id fields then pass as sent;
    else they are dropped and `request_id` is added."""
    items = list(headers)
    drop = _REQUEST_DROP_BYTES if id_passed else _REQUEST_DROP_WITH_ID_BYTES
    if named := _connection_named(items):
        drop = drop | (named - _NEVER_HOP_BY_HOP)
    forwarded: Fields = [] if authority is None else [(b"Host", authority)]
    prior_for: list[bytes] = []
    asked = authority
    has_proto = has_host = False
    for name, value in items:  # one pass: this runs on every request
        lower = name.lower()
        if lower in drop:
            continue
        if lower == b"host":
            if authority is not None:
                continue
            asked = value if asked is None else asked
        elif lower == b"x-forwarded-for":
            prior_for.append(value)
            continue
        has_proto = has_proto or lower == b"x-forwarded-proto"
        has_host = has_host or lower == b"x-forwarded-host"
        forwarded.append((name, value))
    chain = b", ".join([*prior_for, _wire(client_ip)] if client_ip else prior_for)
    if chain:
        forwarded.append((b"X-Forwarded-For", chain))
    # A gateway in front may have terminated TLS: what it says about the original request wins.
    if not has_proto:
        forwarded.append((b"X-Forwarded-Proto", _wire(scheme)))
    if not has_host and asked:
        forwarded.append((b"X-Forwarded-Host", asked))
    if not id_passed:
        forwarded.append((b"X-Request-Id", _wire(request_id)))
    return forwarded


@functools.lru_cache(maxsize=1)  # formatted once a second
def http_date(second: int) -> bytes:
    """A time in seconds since the epoch as an IMF-fixdate (RFC 9110 §5.6.7), the form of a
    Date field."""
    return email.utils.formatdate(second, usegmt=True).encode()


def with_own_fields(head: bytes, request_id: str) -> bytes:
    """An answer head as the model sent it (its status line, fields and the empty line that
    ends it), with the fields servegate adds to every answer the model sent none of:
    X-Request-Id, and Date (RFC 9110 §6.6.1)."""
    names = {line.split(b":", 1)[0].strip().lower() for line in head.split(b"\r\n")[1:]}
    added = b""
    if b"x-request-id" not in names:
        added += b"X-Request-Id: " + _wire(request_id) + b"\r\n"
    if b"date" not in names:
        added += b"Date: " + http_date(int(time.time())) + b"\r\n"
    return head[:-2] + added + b"\r\n"


def longer_field(raw: Iterable[tuple[bytes, bytes]], limit: int) -> bytes | None:
    """The name of the first field whose name and value together are longer than `limit`
    bytes (server.max_header_bytes, upstream.max_response_header_bytes), or None."""
    for name, value in raw:
        if len(name) + len(value) > limit:
            return name
    return None


def only_chunked(transfer_encoding: Iterable[str]) -> bool:
    """Whether Transfer-Encoding field values list chunked alone, the one transfer coding
    servegate decodes (RFC 9112 §6.1): taking off another undecoded would pass coded bytes on
    as plain ones. Empty list elements do not count (RFC 9110 §5.6.1)."""
    codings = [
        lowered
        for value in transfer_encoding
        for coding in value.split(",")
        if (lowered := coding.strip().lower())
    ]
    return codings == ["chunked"]


def decoded(raw: Iterable[tuple[bytes, bytes]]) -> Iterator[tuple[str, str]]:
    """Raw header bytes as text for aiohttp's response, which takes no bytes.

    Bytes that are not UTF-8 (obs-text, RFC 9110 §5.5) become lone surrogates, as aiohttp's
    parsers carry them; `serialize_head` writes them back as the same bytes."""
    return (
        (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        for name, value in raw
    )


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
    """The model server's header fields, as received, as the client should see them."""
    items = list(headers)
    named = _connection_named(items)
    drop = _HOP_BY_HOP_BYTES | named if named else _HOP_BY_HOP_BYTES
    return ((name, value) for name, value in items if name.lower() not in drop)


def _wire(text: str) -> bytes:
    """Text servegate received or made, as the bytes it came as (surrogates restored)."""
    return text.encode("utf-8", "surrogateescape")


# RFC 9110 §5.5 and RFC 9112 §4: no control bytes but HTAB in a field or the start line.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Those bytes changed (their top bit set), every other byte kept: a translation by this table
# changes `data` exactly when it holds one. One pass in C; `bytes.translate` with bytes to
# delete would build a table of its own on every call, at twice the cost.
_MARK_CONTROL = bytes(
    byte | 0x80 if (byte < 0x20 and byte != 0x09) or byte == 0x7F else byte for byte in range(256)
)
_FIELD = b": "


def has_control_byte(data: bytes) -> bool:
    """Whether `data` holds a control byte other than HTAB (RFC 9110 §5.5 allows none else in a
    field, RFC 9112 §4 none in a status line)."""
    return data.translate(_MARK_CONTROL) != data


def serialize_start(line: str) -> bytes:
    """A request or status line with its CRLF, its surrogate-escaped bytes restored.

    Raises ValueError on a control byte but HTAB."""
    if _FORBIDDEN.search(line):
        raise ValueError("Forbidden control character detected in headers.")
    return line.encode("utf-8", "surrogateescape") + b"\r\n"


def serialize_fields(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """`Name: value` lines, each ended by CRLF (RFC 9112 §5), as one block of bytes.

    Raises ValueError if a name or value holds a control byte but HTAB (RFC 9110 §5.5): a CR
    or LF in one would end the field early and start another (header injection)."""
    lines = list(map(_FIELD.join, fields))
    if not lines:
        return b""
    if has_control_byte(b"".join(lines)):  # one search over them all, in C
        raise ValueError("Forbidden control character detected in headers.")
    return b"\r\n".join(lines) + b"\r\n"


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
