"""What the model server's TCP acknowledged of one attempt: the proof that it never read it.

A process can only read bytes its kernel has received. A server that closes with nothing
unread sends a FIN, and the FIN acknowledges every byte its kernel had received (RFC 9293
§3.10.7.4 processes a FIN's acknowledgement like any other). So when a connection fails, the
peer's FIN has arrived, and it acknowledged none of the bytes sent for this request, the server
had closed before any of them reached it: its process never read them, however fast it closed,
and the request can be sent again on a fresh connection. That is the keep-alive race: an idle
timer's close crossing the request.

A FIN says only that the server will send nothing more. The proof assumes it closed the
connection, as the idle timers of Gunicorn, Uvicorn, Hypercorn and nginx do, and not merely
its sending half: a server that half-closes (shutdown(SHUT_WR)) can still read, and one that
went on to act on a request it could no longer answer would defeat it. A lingering close
(reading after the FIN only to discard) acts on nothing.

A reset alone proves nothing. A server resets when it closes with received bytes unread (RFC
9293 §3.6.1): those may be this request, of which its process may have read a part, and its
TCP may not have acknowledged them yet (delayed acknowledgements wait up to 40 ms on Linux,
longer elsewhere); the reset's own acknowledgement is never processed (RFC 9293 §3.10.7.4
checks the RST bit before the ACK field). Measured on loopback: a server that read 10 bytes
of a request and closed within 10 ms left 0 of them acknowledged, by a reset; a server that
read the request and then closed acknowledged all of it, by its FIN.

Nothing may read SO_ERROR on these sockets: that consumes a reset's ECONNRESET, after which
a write reports EPIPE, which reads as a FIN came first (proxy/framing.py).

The count comes from `getsockopt(IPPROTO_TCP, TCP_INFO)`; Python has no parser for it, so the
one field is read at its offset in `struct tcp_info` (include/uapi/linux/tcp.h):
8 bytes of u8 fields, 24 u32 fields (tcpi_rto .. tcpi_total_retrans), tcpi_pacing_rate and
tcpi_max_pacing_rate (u64), then tcpi_bytes_acked (u64, RFC 4898's tcpEStatsAppHCThruOctetsAcked)
at byte 120. Linux has had it since 4.1. Elsewhere the count is unknown (None), and the caller
falls back to what it can prove without it.

What it cannot prove: a relay or load balancer between servegate and the model acknowledges
bytes the model never read, so there an acknowledgement proves nothing; a drop with bytes
acknowledged is then never replayed, which is the safe side. None acknowledged still proves
that even the relay did not take them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import time
from typing import Any

import structlog

log = structlog.get_logger("servegate.acked")

_TCP_INFO = getattr(socket, "TCP_INFO", None)
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_OFFSET = 120
_TCP_INFO_LENGTH = 256  # the kernel copies min(its size, this); 6.x fills 248 or so


def bytes_acked(sock: socket.socket) -> int | None:
    """tcpi_bytes_acked of a connected TCP socket; None where the kernel does not report it."""
    if _TCP_INFO is None or not sys.platform.startswith("linux"):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LENGTH)
    except OSError:
        return None
    if len(raw) < _BYTES_ACKED_OFFSET + _BYTES_ACKED.size:  # a kernel older than 4.1
        return None
    return int(_BYTES_ACKED.unpack_from(raw, _BYTES_ACKED_OFFSET)[0])


class _Unproven:
    """Connections that opened without an acknowledgement count for want of a descriptor: a
    stale connection among them is answered, not replayed (the safe side), and the log says so,
    at most once per LOG_INTERVAL seconds with the number since the last line."""

    LOG_INTERVAL = 10.0

    def __init__(self) -> None:
        self._unlogged = 0
        self._logged_at: float | None = None

    def record(self, error: OSError) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < self.LOG_INTERVAL:
            return
        log.warning(
            "upstream.replay_proof_unavailable",
            message="no descriptor to duplicate a new connection to the model server: a "
            "keep-alive race on it is answered 503, not replayed; raise servegate's open-file "
            "limit (ulimit -n) or lower server.max_connections",
            error=error.strerror or repr(error),
            connections=self._unlogged,
            note=f"logged at most every {self.LOG_INTERVAL:g} s",
        )
        self._logged_at, self._unlogged = now, 0


_unproven = _Unproven()


class AckCounter:
    """The peer's acknowledgement count of one TCP connection a library owns, readable until
    and after the library closes it, and where each request's bytes begin in it.

    It holds a duplicate of the connection's descriptor from `attach` (as the connection opens)
    to `close` (as it is lost, when the count is read one last time): the library closes its
    own descriptor when the connection fails, and the count is needed after that. Until
    `close`, the connection stays open in the kernel.

    Acknowledgements are cumulative, in stream order (RFC 9293 §3.4): a request's bytes follow
    every byte written before them, so "the peer acknowledged none of this request" is "the
    count has not passed where this request began". On plain TCP that position is known
    without asking the kernel: the count at `attach` plus every byte written since (`sent`).
    On TLS the stream holds records and handshakes rather than the bytes written, so a request
    begins where the count stood when it was written (the peer may still acknowledge earlier
    bytes after that, which reads as this request's: the safe side).

    `peer_finished` is set by the connection's protocol when the peer's FIN arrives.
    """

    def __init__(self, sock: socket.socket, position: int, *, plain: bool) -> None:
        self._sock: socket.socket | None = sock
        self._final: int | None = None
        self._position = position  # of the next byte written, in the count's units
        self._plain = plain
        # The peer's FIN arrived (set by the connection's protocol): it closed in order.
        self.peer_finished = False

    @classmethod
    def attach(cls, transport: Any) -> AckCounter | None:
        """Count on an asyncio transport's TCP socket, as it opens; None when its count cannot
        be read."""
        original = transport.get_extra_info("socket") if transport is not None else None
        if original is None or _TCP_INFO is None:
            return None
        try:
            duplicate = socket.socket(fileno=os.dup(original.fileno()))
        except OSError as exc:  # out of descriptors: this connection goes without the proof
            _unproven.record(exc)
            return None
        opened = bytes_acked(duplicate)
        if opened is None:
            duplicate.close()
            return None
        return cls(duplicate, opened, plain=transport.get_extra_info("ssl_object") is None)

    def sent(self, size: int) -> None:
        """Count `size` more bytes written on the connection; every byte written must be."""
        self._position += size

    def mark(self) -> int | None:
        """Where the bytes written next begin, for `acked_since` (None: unknown)."""
        return self._position if self._plain else self.count()

    def acked_since(self, mark: int) -> int | None:
        """How many of the bytes written since `mark` the peer has acknowledged (None:
        unknown)."""
        count = self.count()
        return None if count is None else max(0, count - mark)

    def count(self) -> int | None:
        """Bytes the peer has acknowledged on this connection so far (its last count once
        closed)."""
        return self._final if self._sock is None else bytes_acked(self._sock)

    def unread(self, limit: int) -> bytes:
        """What the kernel holds unread on a plain connection, up to `limit` bytes, read without
        waiting (b"" over TLS, whose records only the transport can open).

        For the answer of a server that stopped reading the request and closed (RFC 9110
        §15.5.14's 413 to a large body): the write that then fails makes the event loop drop
        the connection without reading what arrived before."""
        if self._sock is None or not self._plain:
            return b""
        pieces: list[bytes] = []
        size = 0
        with contextlib.suppress(OSError):  # nothing more (EAGAIN), or the reset itself
            while size < limit and (piece := self._sock.recv(limit - size, socket.MSG_DONTWAIT)):
                pieces.append(piece)
                size += len(piece)
        return b"".join(pieces)

    def close(self) -> None:
        """Read the count a last time and close the duplicate descriptor."""
        if self._sock is None:
            return
        self._final = bytes_acked(self._sock)
        with contextlib.suppress(OSError):
            self._sock.close()
        self._sock = None
