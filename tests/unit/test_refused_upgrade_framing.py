"""Where a refused upgrade's chunked answer ends, however its bytes are split into reads."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.upgrade import _ChunkedEnd

chunk = st.binary(min_size=1, max_size=300)
extension = st.sampled_from([b"", b";a=1", b';name="v v"', b"; q"])
trailer = st.sampled_from([b"", b"X-Trailer: t\r\n", b"A: 1\r\nB: 2\r\n"])


def chunked(chunks: list[bytes], ext: bytes, trailers: bytes, upper: bool) -> bytes:
    body = b"".join(
        (b"%X" if upper else b"%x") % len(data) + ext + b"\r\n" + data + b"\r\n" for data in chunks
    )
    return body + b"0" + ext + b"\r\n" + trailers + b"\r\n"


@given(
    chunks=st.lists(chunk, max_size=6),
    ext=extension,
    trailers=trailer,
    upper=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=8),
    after=st.binary(max_size=20),
)
def test_the_end_is_found_exactly_in_any_split_of_the_reads(
    chunks: list[bytes], ext: bytes, trailers: bytes, upper: bool, cuts: list[int], after: bytes
) -> None:
    message = chunked(chunks, ext, trailers, upper)
    stream = message + after  # what a model sends past the end is not the answer's
    points = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
    scanner = _ChunkedEnd(8190)
    relayed = b""
    for start, stop in itertools.pairwise(points):
        piece = stream[start:stop]
        end = scanner.feed(piece)
        if end is not None:
            relayed += piece[:end]
            break
        relayed += piece
    assert relayed == message


def test_a_chunk_size_that_is_no_number_ends_the_body_at_once() -> None:
    scanner = _ChunkedEnd(8190)
    assert scanner.feed(b"2\r\nok\r\n") is None
    assert scanner.feed(b"zz\r\nmore") == 4


def test_a_chunk_size_line_without_an_end_past_the_limit_ends_the_body() -> None:
    scanner = _ChunkedEnd(100)
    assert scanner.feed(b"1;" + b"e" * 100) is None
    assert scanner.feed(b"e" * 100) == 100


@pytest.mark.parametrize("size", [b"-6", b"+6", b"0x6", b"1_0", b"", b" "])
def test_a_chunk_size_that_is_not_hex_digits_ends_the_body_at_its_line(size: bytes) -> None:
    """int() takes a sign, "0x" and "_": a negative size once sent the scanner back over the
    same line for ever, freezing the event loop."""
    scanner = _ChunkedEnd(8190)
    line = size + b"\r\n"
    assert scanner.feed(line + b"abcdef\r\n0\r\n\r\n") == len(line)
