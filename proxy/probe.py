"""Scheme detection: does the server at the upstream address answer a TLS handshake?

A fresh plain-HTTP connection that a TLS server drops looks exactly like a crashed worker.
Rather than guess from one error, servegate asks the server: a short TLS handshake attempt.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import structlog

from proxy import advice
from proxy.config import UpstreamSettings
from proxy.failures import Cause, Failure
from proxy.metrics import Metrics
from proxy.retry import SCHEME_MISMATCHES

log = structlog.get_logger("servegate.probe")

# Suspicions arrive in bursts (every in-flight request fails at once): a probe made after an
# attempt began answers for it, and none is made within this long of the last one.
PROBE_MIN_INTERVAL = 0.5
PROBE_TIMEOUT = 1.0


async def speaks_tls(host: str, port: int, wait: float) -> bool | None:
    """True: the server speaks TLS: a handshake completed, or it answered with a TLS alert
    (a TLS 1.0-only server refuses servegate's versions so; a handshake that fails is still
    TLS). False: the server answered but not with TLS.

    None: nothing conclusive (refused, timed out) — the caller keeps its own classification.
    """
    # The question is "TLS or not", not "trusted or not": no CA certificates to load (a
    # default context loads the system's, about 0.8 MiB, for every probe).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(wait):
            _, writer = await asyncio.open_connection(host, port, ssl=context)
    except ssl.SSLError as exc:
        said = str(exc).lower()
        return "alert" in said or "unsupported protocol" in said
    except (OSError, TimeoutError):
        return None
    writer.close()
    try:
        async with asyncio.timeout(wait):
            await writer.wait_closed()
    except (OSError, TimeoutError, ssl.SSLError):
        pass  # the answer is known; a messy close of the probe changes nothing
    return True


# How long the plain-HTTP check of a silent TLS handshake may take.
PLAIN_CHECK_TIMEOUT = 1.0
_PLAIN_CHECK = b"OPTIONS * HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"


async def plain_behind_tls(host: str, port: int, within: str) -> str | None:
    """After a TLS handshake with `host`:`port` got no answer `within` a timeout (named so):
    the detail of a protocol/tls_to_plain_server verdict if the server answers a plain HTTP
    request (Werkzeug, Waitress, Hypercorn wait silently for a request line), else None. A TLS
    server too busy to accept, whose kernel still connects, answers neither: it stays the
    connect timeout it was.

    The request is `OPTIONS *`, which asks about the server itself (RFC 9110 §9.3.7): the one
    with the least effect."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    writer = None
    try:
        async with asyncio.timeout(PLAIN_CHECK_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(_PLAIN_CHECK % authority.encode())
            first = await reader.read(5)
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
    if first != b"HTTP/":
        return None
    return (
        f"servegate spoke HTTPS; the TLS handshake got no answer within {within}, and the "
        "server answers plain HTTP"
    )


class SchemeProbe:
    """What servegate speaks to the model server, and what the server is found to speak.

    The probe runs at start-up and again, at most twice a second, whenever a failure
    suggests a mismatch. With `upstream.scheme: auto` servegate adopts what it finds, except
    that an https:// URL is never downgraded to plain HTTP.
    """

    def __init__(self, settings: UpstreamSettings, metrics: Metrics) -> None:
        origin = settings.origin
        assert origin.host is not None  # checked by config
        assert origin.port is not None
        self.host, self.port = origin.host, origin.port
        self.url_scheme = origin.scheme
        self.auto = settings.scheme == "auto"
        self.speaking = origin.scheme  # what servegate uses now
        self.detected: str | None = None  # what the server speaks, once a probe has told
        self._probed_at: float | None = None
        self._lock = asyncio.Lock()
        self._metrics = metrics
        self._publish()

    async def detect(self, wait: float = PROBE_TIMEOUT, since: float = 0.0) -> str | None:
        """What the server speaks, as probed after `since` (monotonic); adopted when allowed."""
        async with self._lock:
            last = self._probed_at
            if last is None or (last < since and time.monotonic() - last > PROBE_MIN_INTERVAL):
                found = await speaks_tls(self.host, self.port, wait)
                self._probed_at = time.monotonic()
                if found is not None:
                    self._found("https" if found else "http")
            return self.detected

    def observed_working(self) -> None:
        """A response arrived: the server speaks what servegate spoke."""
        if self.detected != self.speaking:
            self._found(self.speaking)

    def _found(self, scheme: str) -> None:
        changed = scheme != self.detected
        self.detected = scheme
        if self.auto and scheme != self.speaking and not self._would_downgrade(scheme):
            log.warning("upstream.scheme_adopted", was=self.speaking, now=scheme)
            self.speaking = scheme
        if changed:
            self._publish()
            log.log(
                logging.ERROR if self.mismatch() else logging.INFO,
                "upstream.scheme_detected",
                configured=self.configured,
                detected=scheme,
                speaking=self.speaking,
                mismatch=self.mismatch(),
            )

    def _would_downgrade(self, scheme: str) -> bool:
        return self.url_scheme == "https" and scheme == "http"

    @property
    def configured(self) -> str:
        return "auto" if self.auto and self.url_scheme == "http" else self.url_scheme

    def mismatch(self) -> str | None:
        """The standing mismatch, as a sentence with its fix; None when the schemes agree."""
        if self.detected is None or self.detected == self.speaking:
            return None
        where = f"{self.host}:{self.port}"
        if self.detected == "https":
            found = f"servegate speaks plain HTTP but the model server at {where} speaks HTTPS"
            return f"{found}. {advice.FIX[Cause.PLAIN_TO_TLS_SERVER]}"
        found = f"servegate speaks HTTPS but the model server at {where} speaks plain HTTP"
        return f"{found}. {advice.FIX[Cause.TLS_TO_PLAIN_SERVER]}"

    async def confirm(
        self, failure: Failure, spoke: str, began: float, remaining: float
    ) -> Failure:
        """Ask the server when a failure looks like a mismatch; name the mismatch if it is one.

        `began` is when the failed attempt began: only a probe made since then can speak for it.
        """
        suspect = failure.protocol_suspect or failure.cause in SCHEME_MISMATCHES
        if not suspect or remaining <= 0:
            return failure
        detected = await self.detect(min(PROBE_TIMEOUT, remaining), since=began)
        if spoke == "http" and detected == "https":
            return failure.as_(
                Cause.PLAIN_TO_TLS_SERVER,
                f"servegate spoke plain HTTP, but {self.host}:{self.port} speaks HTTPS (TLS)",
            )
        return failure

    def _publish(self) -> None:
        self._metrics.record_scheme(self.configured, self.detected or "unknown")
