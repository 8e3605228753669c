"""Scheme detection: does the server at the upstream address answer a TLS handshake?

A fresh plain-HTTP connection that a TLS server drops looks exactly like a crashed worker.
Rather than guess from one error, servegate asks the server: a short TLS handshake attempt.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass

import structlog

from proxy.failures import Cause, Failure

log = structlog.get_logger("servegate.probe")

# Suspicions arrive in bursts (every in-flight request fails at once); one probe answers all.
PROBE_REUSE_SECONDS = 5.0
PROBE_TIMEOUT = 1.0


async def speaks_tls(host: str, port: int, wait: float) -> bool | None:
    """True: a TLS handshake completed. False: the server answered but not with TLS.

    None: nothing conclusive (refused, timed out) — the caller keeps its own classification.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the question is "TLS or not", not "trusted or not"
    try:
        async with asyncio.timeout(wait):
            _, writer = await asyncio.open_connection(host, port, ssl=context)
    except ssl.SSLError:
        return False
    except (OSError, TimeoutError):
        return None
    writer.close()
    try:
        async with asyncio.timeout(wait):
            await writer.wait_closed()
    except (OSError, TimeoutError, ssl.SSLError):
        pass  # the answer is known; a messy close of the probe changes nothing
    return True


@dataclass
class _Finding:
    speaks_tls: bool | None
    at: float


class SchemeProbe:
    """Confirms protocol suspicions against one upstream address, at most every few seconds."""

    def __init__(self, scheme: str, host: str, port: int) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self._last: _Finding | None = None
        self._lock = asyncio.Lock()

    async def server_speaks_tls(self, wait: float) -> bool | None:
        async with self._lock:
            now = time.monotonic()
            if self._last is None or now - self._last.at > PROBE_REUSE_SECONDS:
                found = await speaks_tls(self.host, self.port, wait)
                self._last = _Finding(found, time.monotonic())
                log.info("probe.scheme", host=self.host, port=self.port, speaks_tls=found)
            return self._last.speaks_tls

    async def confirm(self, failure: Failure, remaining: float) -> Failure:
        """Reclassify a fresh plain connection's drop as a protocol mismatch when it is one."""
        if self.scheme != "http" or not failure.protocol_suspect or remaining <= 0:
            return failure
        if await self.server_speaks_tls(min(PROBE_TIMEOUT, remaining)):
            return failure.as_(
                Cause.PLAIN_TO_TLS_SERVER,
                f"servegate spoke plain HTTP, but {self.host}:{self.port} speaks HTTPS (TLS)",
            )
        return failure
