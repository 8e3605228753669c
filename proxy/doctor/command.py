"""`servegate doctor`: probe a model server and say, per 4503 category, what would fail and why.

The four checks (checkup.py, keepalive.py) run one after another, so a single-threaded server
never sees two of them overlap; this module runs them and renders the report (text, or JSON with
--json).
Exit code 0 when no check fails (warnings alone do not fail), 1 when one does; usage errors
are 2, as in every servegate command.
"""

from __future__ import annotations

import asyncio
import json
import sys

from proxy.config import Settings
from proxy.doctor.checkup import NO_ANSWER, check_protocol, check_service, check_timeout
from proxy.doctor.keepalive import check_communication
from proxy.doctor.verdicts import Check, Fact, Report, Target, Verdict, skipped
from proxy.failures import UNREACHABLE, Category, Cause


async def diagnose(target: Target) -> Report:
    """Every check, one after another; those that need a connection only if one opens."""
    protocol = await check_protocol(target)
    speaks = protocol.facts.get("server_speaks") or target.scheme
    tls = speaks == "https"
    service = await check_service(target, tls)
    if (why := _unmeasurable(target, service)) is not None:
        timeout, communication = (
            skipped(Category.TIMEOUT, why),
            skipped(Category.COMMUNICATION, why),
        )
    else:
        timeout = await check_timeout(target, tls)
        communication = await check_communication(target, tls)  # last: it holds a connection
    return Report(target.url, (protocol, communication, timeout, service))


def _unmeasurable(target: Target, service: Check) -> str | None:
    """Why no request can be timed nor a connection kept idle, when the service check shows
    it: no connection, no HTTP/1.1, or the very request the timeout check would send (with
    no --sample-body) failed already: it would wait out the budget again for the same silence,
    or report the same failure under another name."""
    if service.cause in UNREACHABLE:
        return f"no connection to {target.address}"
    if service.cause is Cause.MALFORMED_RESPONSE:
        return "the server does not answer in HTTP/1.1"
    if target.sample_body is not None or "error" not in service.facts:
        return None
    if service.facts["error"] == NO_ANSWER:
        return f"GET {target.probe_path} got no answer within the {target.budget:g} s budget"
    return f"GET {target.probe_path} failed"


# --- rendering ----------------------------------------------------------------------------------


def as_json(report: Report) -> str:
    checks = {
        check.category.value: {
            "verdict": check.verdict.value,
            "cause": check.cause.value if check.cause else None,
            "facts": check.facts,
            "advice": list(check.advice),
        }
        for check in report.checks
    }
    return json.dumps({"upstream": report.upstream, "ok": report.ok, "checks": checks}, indent=2)


def as_text(report: Report) -> str:
    lines = [f"servegate doctor: {report.upstream}", ""]
    for check in report.checks:
        # The cause's own category: a check may meet a failure of another (the timeout
        # check's request dropped by a crashing worker is service/reset_during_request).
        cause = f"  ({check.cause.category}/{check.cause})" if check.cause else ""
        lines.append(f"{check.category.value:<14} {check.verdict.value.upper()}{cause}")
        lines += [
            f"    {_label(name)}: {_value(name, value)}" for name, value in check.facts.items()
        ]
        lines += [f"  - {advice}" for advice in check.advice]
        lines.append("")
    failed = [check.category.value for check in report.checks if check.verdict is Verdict.FAIL]
    lines.append(
        f"Would cause a 4503: {', '.join(failed)}."
        if failed
        else "Nothing found that would cause a 4503."
    )
    return "\n".join(lines)


def _label(name: str) -> str:
    return name.removesuffix("_s").replace("_", " ")


def _value(name: str, value: Fact) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:g} s" if name.endswith("_s") and isinstance(value, float | int) else str(value)


def main(
    settings: Settings, max_idle_wait: float, sample_body: str | None, *, json_output: bool
) -> int:
    """Run the diagnosis and print it; the exit code says whether anything would cause a 4503."""
    try:
        body = None if sample_body is None else json.dumps(json.loads(sample_body)).encode()
    except ValueError as exc:
        print(f"servegate: --sample-body is not JSON: {exc}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(diagnose(Target.of(settings, max_idle_wait, body)))
    except KeyboardInterrupt:
        return 130  # as a shell reports a command stopped by Ctrl-C
    print(as_json(report) if json_output else as_text(report))
    return 0 if report.ok else 1
