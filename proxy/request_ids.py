"""Request ids: the one every answer and access line carries (X-Request-Id, `request_id`).

A client's own id is kept when it can be logged as sent; otherwise, and for every answer
servegate writes before a request exists (a head it cannot parse, a connection over the
limit, a head that timed out, plain HTTP on the TLS port, the admin port's refusals), a new
one: 32 hex digits, 128 bits of the system's randomness.
"""

from __future__ import annotations

import os
import re

# A client's request id is passed on as it came when it is printable ASCII (a field value of
# visible characters and spaces, RFC 9110 §5.5): trace ids carry `=`, `/`, `+`, `;` or braces.
# One with bytes outside ASCII cannot be written into a UTF-8 log line as sent: a new one.
_LOGGABLE = re.compile(r"[\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?")


class _NewIds:
    """New ids, as unpredictable as os.urandom's (an id goes back to the client, and a model
    server may key on it: none may tell what ids others will get, as a seeded generator's
    outputs do), drawn for 256 ids at a time: one getrandom system call per 256, not per
    request."""

    __slots__ = ("_hex", "_next")
    _AT_ONCE = 256

    def __init__(self) -> None:
        self._hex = ""
        self._next = 0

    def new(self) -> str:
        at = self._next
        if at >= len(self._hex):
            self._hex, at = os.urandom(16 * self._AT_ONCE).hex(), 0
        self._next = at + 32
        return self._hex[at : at + 32]

    def forget(self) -> None:
        """A forked process must not hand out the ids its parent drew."""
        self._hex, self._next = "", 0


_ids = _NewIds()
os.register_at_fork(after_in_child=_ids.forget)
new = _ids.new


def of(passed: str) -> str:
    """The request's id: `passed` (its X-Request-Id field, "" when it sent none) when it can
    be logged as sent, else a new one."""
    return passed if _LOGGABLE.fullmatch(passed) else new()
