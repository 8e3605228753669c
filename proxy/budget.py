"""The request's deadline: one per request, fixed when the request arrives, on a monotonic clock.

Every wait inside servegate draws on it; the model server is told how much is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

from proxy.config import BudgetSettings

TIMEOUT_HEADER = "X-Servegate-Timeout-Ms"
REMAINING_HEADER = "X-Servegate-Remaining-Ms"
_REMAINING_NAME = REMAINING_HEADER.encode()

Clock = Callable[[], float]


class BadTimeoutHeader(ValueError):
    """The client's budget header is not a positive whole number of milliseconds."""


class Budget(NamedTuple):
    """Immutable, and a tuple so that it is built at a tuple's cost: a frozen dataclass sets
    each field through object.__setattr__, twice the cost, once per request."""

    started: float
    deadline: float  # when servegate answers, at the latest (monotonic seconds)
    total: float  # the budget in force for this request, in seconds
    clock: Clock = time.monotonic

    @classmethod
    def start(
        cls, settings: BudgetSettings, asked_ms: str | None = None, clock: Clock = time.monotonic
    ) -> Budget:
        """The platform's budget minus the margin, or less when the client asks for less.

        The margin exists to beat the platform's own timeout; a client's shorter budget is its
        own deadline and is answered on time.
        """
        now = clock()
        total = settings.seconds - settings.margin
        if asked_ms is not None:
            total = min(total, parse_timeout_ms(asked_ms) / 1000)
        return cls(now, now + total, total, clock)

    def remaining(self) -> float:
        return max(0.0, self.deadline - self.clock())

    def elapsed(self) -> float:
        return self.clock() - self.started

    def expired(self) -> bool:
        return self.clock() >= self.deadline

    def remaining_ms_header(self) -> str:
        return str(int(self.remaining() * 1000))

    def remaining_field(self) -> tuple[bytes, bytes]:
        """The header field that tells the model how many milliseconds the budget has left,
        as sent on every attempt and upgrade handshake."""
        return _REMAINING_NAME, self.remaining_ms_header().encode()

    def remaining_line(self) -> bytes:
        """That field as a serialized header line (`Name: value` and CRLF): digits alone, no
        control byte to check for."""
        return b"%s: %d\r\n" % (_REMAINING_NAME, int(self.remaining() * 1000))


# More milliseconds than any budget: a longer number is clamped to the budget like any other.
_MS_DIGITS = 12


def parse_timeout_ms(raw: str) -> int:
    """The milliseconds a client asked for; any number larger than the budget is the budget.

    Raises BadTimeoutHeader unless `raw` is a positive whole number: a list (`500, 900`, or
    the field sent twice, which RFC 9110 §5.3 makes the same) has no one meaning."""
    value = raw.strip()
    digits = value.lstrip("0")
    if not value.isascii() or not value.isdigit() or not digits:
        raise BadTimeoutHeader(
            f"{TIMEOUT_HEADER} must be a positive whole number of milliseconds, given once, "
            f"got {raw[:40]!r}"
        )
    return int(digits) if len(digits) <= _MS_DIGITS else 10**_MS_DIGITS


@dataclass(slots=True)
class Spent:
    """Where a request's time went: the timeout hint and the access line tell the operator
    whether to look at the client, the network, or the model."""

    queued: float = 0.0
    reading_request: float = 0.0
    connecting: float = 0.0
    waiting_for_model: float = 0.0
    backing_off: float = 0.0

    def describe(self) -> str:
        parts = [
            f"{getattr(self, name):.1f} s {name.replace('_', ' ')}"
            for name in _SPENT
            if getattr(self, name) >= 0.05
        ]
        return ", ".join(parts) or "no measurable time"

    def as_log(self) -> dict[str, float]:
        return {
            "queued": in_log(self.queued),
            "reading_request": in_log(self.reading_request),
            "connecting": in_log(self.connecting),
            "waiting_for_model": in_log(self.waiting_for_model),
            "backing_off": in_log(self.backing_off),
        }


def in_log(seconds: float) -> float:
    """`seconds` (not negative) to the tenth of a millisecond, as the access line gives times.

    Not `round(seconds, 4)`, which goes through a decimal string (CPython's float.__round__)
    and costs twice as much, six times in every request's line; the two differ only on an
    exact half, where this rounds up."""
    return int(seconds * 10000.0 + 0.5) / 10000.0


_SPENT = tuple(f.name for f in fields(Spent))
