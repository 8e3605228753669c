"""Parser benchmark: what parsing one message costs, in microseconds, on one core.

What it measures
    * a typical inference request head and a 40-byte body, parsed by aiohttp's C request
      parser (llhttp) and by its pure-Python one: the price of accepting raw non-ASCII target
      bytes by parsing every request in Python (README, Forwarding);
    * a typical answer (head and a 40-byte body, Content-Length), parsed by aiohttp's C
      response parser alone and through servegate's framing guard (`proxy/framing.py`), which
      feeds the parser the head, then exactly the framed body.

Each figure is the best of five means over `--rounds` parses (default 20000), a fresh parser
each time, as each exchange has; the machine's other load still shows in it, so compare
figures from one run only.

How to run it (from the repository root)
    .venv/bin/python bench/request_parsers.py
"""

from __future__ import annotations

import argparse
import asyncio
import timeit
from typing import Any, cast

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParserC, HttpRequestParserPy, HttpResponseParserC

from proxy.framing import _FramedParser

REQUEST = (
    b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\nContent-Type: application/json\r\nX-Request-Id: 4503\r\n"
    b"Content-Length: 40\r\n\r\n" + b"x" * 40
)
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 40\r\n"
    b"Date: Sun, 29 Nov 2026 17:00:00 GMT\r\n\r\n" + b"y" * 40
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20_000)
    rounds = parser.parse_args().rounds
    loop = asyncio.new_event_loop()
    protocol = BaseProtocol(loop)

    def request_with(cls: Any) -> None:
        cls(protocol, loop, 2**16, max_line_size=8190, max_field_size=8190).feed_data(REQUEST)

    def answer_plain() -> None:
        HttpResponseParserC(protocol, loop, 2**16).feed_data(ANSWER)

    def answer_framed() -> None:
        inner = HttpResponseParserC(protocol, loop, 2**16)
        _FramedParser(inner, cast(Any, None), skip_payload=False).feed_data(ANSWER)

    cases = {
        "request, C parser (llhttp)": lambda: request_with(HttpRequestParserC),
        "request, pure-Python parser": lambda: request_with(HttpRequestParserPy),
        "answer, C parser alone": answer_plain,
        "answer, C parser through the framing guard": answer_framed,
    }
    for name, case in cases.items():
        seconds = min(timeit.repeat(case, number=rounds, repeat=5))
        print(f"{name:45s} {seconds / rounds * 1e6:6.1f} µs")
    loop.close()


if __name__ == "__main__":
    main()
