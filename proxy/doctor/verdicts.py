"""What `servegate doctor` finds: a verdict per 4503 category, the facts measured, advice.

Verdicts: `ok`; `warn`, worth changing but no cause of a 4503 with servegate in front; `fail`,
something that would end requests in a 4503; `skipped`, not measurable because the server
took no connection (the service check fails then).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from proxy.advice import FIX
from proxy.config import Settings
from proxy.doctor.wire import Peer
from proxy.failures import Category, Cause

Fact = str | int | float | bool | None


class Verdict(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Check:
    """One category's verdict, what was measured, and what to do about it.

    `notes` say what this check found; a named `cause` adds its one fix from proxy/advice.py,
    the same words the error answer's hint uses."""

    category: Category
    verdict: Verdict
    facts: dict[str, Fact]
    notes: tuple[str, ...] = ()
    cause: Cause | None = None

    @property
    def advice(self) -> tuple[str, ...]:
        if self.cause is None or FIX[self.cause] in self.notes:
            return self.notes
        return (*self.notes, FIX[self.cause])


@dataclass(frozen=True)
class Report:
    upstream: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        """Nothing found would end a request in a 4503; warnings do not count."""
        return all(check.verdict is not Verdict.FAIL for check in self.checks)


@dataclass(frozen=True)
class Target(Peer):
    """The model server and the settings servegate would run with in front of it."""

    url: str
    scheme: str
    auto_scheme: bool
    idle_expiry: float  # servegate's expiry until the server announces `Keep-Alive: timeout=`
    health_path: str | None
    health_timeout: float
    budget: float
    max_idle_wait: float
    sample_body: bytes | None

    @classmethod
    def of(cls, settings: Settings, max_idle_wait: float, sample_body: bytes | None) -> Target:
        upstream, origin = settings.upstream, settings.upstream.origin
        assert origin.host is not None  # checked by config
        assert origin.port is not None
        return cls(
            host=origin.host,
            port=origin.port,
            tls=upstream.tls,
            connect_timeout=upstream.connect_timeout,
            url=upstream.url,
            scheme=origin.scheme,
            auto_scheme=upstream.scheme == "auto",
            idle_expiry=upstream.idle_expiry,
            health_path=settings.health.path,
            health_timeout=settings.health.timeout,
            budget=settings.budget.seconds,
            max_idle_wait=max_idle_wait,
            sample_body=sample_body,
        )

    @property
    def probe_path(self) -> str:
        return self.health_path or "/"


_SEVERITY = (Verdict.OK, Verdict.SKIPPED, Verdict.WARN, Verdict.FAIL)


def worse(a: Verdict, b: Verdict) -> Verdict:
    return max(a, b, key=_SEVERITY.index)


def skipped(category: Category, why: str) -> Check:
    return Check(category, Verdict.SKIPPED, {}, (f"Not measured: {why}. See service.",))
