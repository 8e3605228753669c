"""The connection pools to the model server and one attempt on them.

Each attempt reports whether it used a pooled (reused) or a fresh connection, how long a fresh
one took, whether its request left servegate, and how much of the request the server's TCP
acknowledged (proxy/acked.py): the facts `failures.classify` needs. The pools are servegate's
(proxy/pool.py), the exchange too (proxy/exchange.py); aiohttp's protocol and response parser
read the answers (proxy/framing.py). Idle pooled connections are expired before the server's
own idle timer can close them.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
from collections.abc import Callable

import structlog
from yarl import URL

from proxy.config import UpstreamSettings, UpstreamTLSSettings
from proxy.exchange import (
    Body,
    InterimRelay,
    UpstreamResponse,
    read_answer,
    request_head,
    send_request,
)
from proxy.failures import AttemptFacts, Failure
from proxy.framing import FramedResponseHandler, report
from proxy.lag import LoopLag
from proxy.pool import Origin, Pool

log = structlog.get_logger("servegate.upstream")

_KEEP_ALIVE_TIMEOUT = re.compile(r"(?:^|[,\s])timeout\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def expiry_for(announced: float) -> float:
    """How long servegate keeps an idle connection to a server that closes it after `announced`.

    Half the server's timeout for short ones (1 s -> 0.5 s), one second less for long ones:
    the pooled connection must be gone before the server's close can cross a request.
    """
    return announced / 2 if announced <= 2 else announced - 1


def announced_idle_timeout(keep_alive: str) -> float | None:
    """The N of a `Keep-Alive: timeout=N` header value, if there is one."""
    match = _KEEP_ALIVE_TIMEOUT.search(keep_alive)
    return float(match.group(1)) if match else None


class Upstream:
    """Per scheme, two pools: one for normal traffic, and fresh one-shot connections for
    retries.

    A burst after a quiet period can find every pooled connection stale, so the retry after a
    stale connection must not draw from the pool again.
    """

    def __init__(
        self,
        settings: UpstreamSettings,
        on_failure: Callable[[Failure], None] = lambda _failure: None,
        lag: LoopLag | None = None,
    ) -> None:
        """`on_failure` hears of faults in answers that were still relayed (proxy/framing.py).
        `lag`: the loop's heartbeat, which the connect timeout discounts (unstarted: wall
        time)."""
        self.settings = settings
        origin = settings.origin
        # With upstream.scheme: auto either scheme may be spoken, so both are ready.
        # The port is always explicit: with upstream.scheme: auto the scheme may change, and
        # the port must not change with it. An IPv6 host keeps its brackets.
        host = f"[{origin.raw_host}]" if ":" in (origin.raw_host or "") else origin.raw_host
        self._authority = f"{host}:{origin.port}"
        self._host_field = self._authority.encode()  # Host, for a request that has none
        self.idle_expiry = settings.idle_expiry
        # Read once: every attempt needs them, and a settings model's attribute read (pydantic's
        # BaseModel.__getattr__ hook) costs three plain ones.
        self._answer_limits = (
            settings.max_response_header_bytes,
            settings.max_response_headers,
            settings.max_interim_responses,
        )
        # The one context of servegate's TLS connections to the model server, the health
        # checks' too: each loads the system's CA certificates, about 0.8 MiB.
        self.tls_context = client_ssl_context(settings.tls)
        self.lag = lag or LoopLag()
        self._factory = functools.partial(
            FramedResponseHandler, loop=asyncio.get_running_loop(), on_fault=report(on_failure)
        )
        self._pools: dict[tuple[str, bool], Pool] = {}
        self._urls: dict[str, URL] = {}

    def pool(self, scheme: str, *, fresh: bool) -> Pool:
        """The pool for `scheme` ("http" or "https"): the one-shot one when `fresh`."""
        pool = self._pools.get((scheme, fresh))
        if pool is None:
            # The host as it is looked up and named in TLS: IDNA-encoded, as in Host.
            host, port = self.settings.origin.raw_host, self.settings.origin.port
            assert host is not None  # a validated URL has both
            assert port is not None
            tls = self.tls_context if scheme == "https" else None
            pool = Pool(
                Origin(host, port, tls, self.settings.tls.server_name),
                self._factory,
                idle_expiry=None if fresh else self.idle_expiry,
                connect_timeout=self.settings.connect_timeout,
                lag=self.lag,
            )
            self._pools[(scheme, fresh)] = pool
        return pool

    def _url(self, scheme: str) -> URL:
        """The origin as a URL, which aiohttp's exceptions for an unparseable answer carry."""
        url = self._urls.get(scheme)
        if url is None:
            url = URL.build(scheme=scheme, authority=self._authority, encoded=True)
            self._urls[scheme] = url
        return url

    async def send(
        self,
        method: str,
        raw_path: str,
        fields: tuple[bytes, ...],
        body: Body,
        facts: AttemptFacts,
        *,
        scheme: str,
        fresh: bool,
        has_host: bool,
        on_interim: InterimRelay | None = None,
    ) -> UpstreamResponse:
        """One attempt: returns once the answer's head has arrived (interim 1xx answers go to
        `on_interim` as they come); the body is read later. `fields` are the request's
        end-to-end header fields, serialized (headers.serialize_fields), in blocks sent in
        order; `has_host`: they hold a Host field, else the upstream's authority is added.

        Raises what aiohttp's client raises for the same failure (failures.classify)."""
        connection = await self.pool(scheme, fresh=fresh).acquire(facts)
        protocol = connection.protocol
        assert protocol is not None
        header_bytes, headers, interim = self._answer_limits
        protocol.set_response_params(
            skip_payload=method == "HEAD",
            read_until_eof=True,
            auto_decompress=False,  # bytes pass through exactly as the model sent them
            max_line_size=header_bytes,
            max_field_size=header_bytes,
            max_headers=headers,
        )
        acks = protocol.acks
        begins = acks.mark() if acks is not None else None
        try:
            host = None if has_host else self._host_field
            head = request_head(method, raw_path, fields, body, host=host, close=fresh)
            writer = None
            if protocol.exception() is None:
                writer = send_request(connection, head, body, acks)
                facts.request_sent = True
            del head  # written: a request the model holds keeps no copy of it
            # Else the connection failed before the request was written: the server spoke
            # first, and not in HTTP (an SSH or SMTP banner, a MySQL greeting, an HTTP/2
            # SETTINGS frame), and its bytes broke aiohttp's parser, which closed it; or a
            # pooled connection was closed or reset meanwhile. The request stays unsent;
            # read_answer raises that error, the true verdict, where a write would fail on a
            # closed transport.
            answer = await read_answer(
                connection,
                writer,
                method,
                self._url(scheme),
                on_interim,
                interim,
            )
        except BaseException:
            facts.answer_fragment = protocol.answer_fragment
            if acks is not None and begins is not None:
                facts.request_bytes_acked = acks.acked_since(begins)
                facts.peer_finished = acks.peer_finished
            connection.close()
            raise
        facts.response_started = True
        self._learn_idle_timeout(answer)
        return answer

    def _learn_idle_timeout(self, answer: UpstreamResponse) -> None:
        announced = answer.headers.get("Keep-Alive", "")
        seconds = announced_idle_timeout(announced)
        if seconds is None:
            return
        expiry = expiry_for(seconds)
        if expiry != self.idle_expiry:
            self.idle_expiry = expiry
            for pool in self._pools.values():
                pool.set_idle_expiry(expiry)
            log.info("upstream.idle_expiry_learned", keep_alive=announced, idle_expiry_s=expiry)

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self._pools.values()))


class TLSFilesError(Exception):
    """upstream.tls's files cannot be loaded: the message names the setting and the reason."""


def client_ssl_context(tls: UpstreamTLSSettings) -> ssl.SSLContext:
    """The context servegate's TLS connections to the model server use.

    Raises TLSFilesError when upstream.tls.ca_file, cert_file or key_file cannot be loaded."""
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise TLSFilesError(f"cannot load upstream.tls.ca_file {tls.ca_file}: {reason}") from None
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file and tls.key_file:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or exc
            raise TLSFilesError(
                f"cannot load upstream.tls.cert_file {tls.cert_file} with key_file "
                f"{tls.key_file}: {reason}"
            ) from None
    return context
