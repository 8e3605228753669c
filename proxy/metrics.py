"""Every Prometheus series of DESIGN.md §5, declared once on a registry passed in.

Each category and cause starts at zero, so dashboards and alert rules can name all of them
before the first failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

from proxy.failures import Cause, Failure
from proxy.retry import Outcome

# Methods outside this set are counted as "other": a client must not be able to mint series.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
RETRYABLE_CAUSES = (
    Cause.STALE_CONNECTION,
    Cause.CONNECT_REFUSED,
    Cause.CONNECT_TIMEOUT,
    Cause.NAME_NOT_RESOLVED,
    Cause.TLS_TO_PLAIN_SERVER,  # retried only with upstream.scheme: auto
    Cause.PLAIN_TO_TLS_SERVER,
    Cause.RESET_DURING_REQUEST,  # retried only for methods in retry.replay_after_reset
)


# How a gauge of several worker processes (servegate run --workers N) becomes one number:
# amounts add up over the live workers; states take the highest value a live worker reports
# (an open circuit, a crash loop, a server seen up). A dead worker's gauges drop out. A process
# that never sets a gauge reports 0, which neither a sum nor a maximum is changed by.
SUMMED: Final = "livesum"
HIGHEST: Final = "livemax"
# Facts of each worker's own data port (its connections, their limit, its upgraded ones): one
# series per live worker (label `pid`).
PER_PROCESS: Final = "liveall"


class LoopValue:
    """prometheus-client's store of one series' value, for a process whose series change on
    one thread: servegate's event loop, where its scrapes run too. prometheus-client's own
    (MutexValue) takes a lock on every change, more than half of what an increment costs
    (`Counter.inc` 300 ns, 130 without), and a request makes a dozen. Worker processes keep
    their values in files instead (prometheus-client's multiprocess mode, workers.py)."""

    __slots__ = ("_exemplar", "_value")
    _multiprocess = False

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        self._value = 0.0
        self._exemplar: Any = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: Any) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> Any:
        return self._exemplar


def _keep_values_in_memory() -> bool:
    """Whether this process keeps its series in memory (not in multiprocess mode's files),
    in a LoopValue from now on."""
    if values.ValueClass is values.MutexValue:
        values.ValueClass = LoopValue
    return values.ValueClass is LoopValue


def _adder(series: Counter | Gauge) -> Callable[[float], None]:
    """`series.inc` for a series every request changes, without the checks prometheus-client's
    makes on each call (that the series is unlabelled or a child, and a counter's that the
    amount is not negative: callers pass 1): its value store's own `inc`, a third of the
    cost, or `series.inc` should a release keep the store elsewhere."""
    inc = getattr(getattr(series, "_value", None), "inc", None)
    return inc if callable(inc) else series.inc


@dataclass(slots=True)
class AdminListenerMetrics:
    """The admin port's listener series (proxy/listener.py feeds them): its own connection
    counts, and `on_mismatch` and `on_timeout` for what it counts in the data port's series
    (protocol mismatches, client timeouts)."""

    client_connections: Gauge
    client_connections_limit: Gauge
    client_connections_refused: Counter
    client_connections_reclaimed: Counter
    on_mismatch: Callable[[Mismatch], None]
    on_timeout: Callable[[TimeoutPhase], None]

    def record_listener_mismatch(self, direction: Mismatch) -> None:
        self.on_mismatch(direction)

    def record_client_timeout(self, phase: TimeoutPhase) -> None:
        self.on_timeout(phase)

    def record_4503(self, failure: Failure) -> None:
        """A connection refused at the admin port's limit asked nothing of the model: its count
        is `servegate_admin_connections_refused_total` alone."""


def admin_listener_metrics(
    registry: CollectorRegistry,
    on_mismatch: Callable[[Mismatch], None],
    on_timeout: Callable[[TimeoutPhase], None],
) -> AdminListenerMetrics:
    """The admin port's series in `registry` (a `Metrics`' own, or the `--workers` parent's,
    whose admin port is the one scraped)."""
    return AdminListenerMetrics(
        Gauge(
            "servegate_admin_connections",
            "Connections open on the admin port.",
            registry=registry,
            multiprocess_mode=PER_PROCESS,
        ),
        Gauge(
            "servegate_admin_connections_limit",
            "server.admin_max_connections in force: connections beyond it are closed.",
            registry=registry,
            multiprocess_mode=PER_PROCESS,
        ),
        Counter(
            "servegate_admin_connections_refused",
            "Admin port connections answered 429 and closed: server.admin_max_connections "
            "were open, none idle.",
            registry=registry,
        ),
        Counter(
            "servegate_admin_connections_reclaimed",
            "Idle admin port connections closed for a new one: server.admin_max_connections "
            "were open.",
            registry=registry,
        ),
        on_mismatch,
        on_timeout,
    )


class ShedReason(StrEnum):
    """The `reason` label of servegate_shed_total."""

    QUEUE_FULL = "queue_full"  # admission control: every slot and the queue taken
    QUEUE_TIMEOUT = "queue_timeout"  # the budget ran out in the queue, waiting for a slot
    CIRCUIT_OPEN = "circuit_open"  # the model server is known to be down


class Mismatch(StrEnum):
    """A connection that spoke the protocol the port does not serve: the metric's `direction`."""

    TLS_ON_PLAIN_PORT = "tls_on_plain_port"
    PLAIN_ON_TLS_PORT = "plain_on_tls_port"


class TimeoutPhase(StrEnum):
    """The `phase` label of servegate_client_timeouts_total."""

    HEADERS = "headers"  # a request's headers did not all arrive within server.header_timeout
    TLS_HANDSHAKE = "tls_handshake"  # a TLS handshake was not done within server.header_timeout
    IDLE = "idle"  # a new connection sent nothing at all (server.first_byte_timeout)
    BODY = "body"  # a request's body did not all arrive within its budget


def duration_buckets(budget: float) -> tuple[float, ...]:
    """Fine buckets for fast predictions, and enough around the budget to see requests near it."""
    fast = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)
    near = tuple(budget + offset for offset in (-10, -5, -2, -1, 0, 5, 20))
    return tuple(sorted({b for b in fast + near if b > 0}))


class Metrics:
    def __init__(self, registry: CollectorRegistry, budget_seconds: float) -> None:
        self._in_memory = _keep_values_in_memory()  # before the first series is made
        buckets = duration_buckets(budget_seconds)
        self.requests = Counter(
            "servegate_requests_total",
            "Requests answered to clients.",
            ["method", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "servegate_request_duration_seconds",
            "End-to-end time of a request.",
            ["method"],
            buckets=buckets,
            registry=registry,
        )
        self.answers_4503 = Counter(
            "servegate_4503_total",
            "Requests that ended in a 4503 answer to the client.",
            ["category", "cause"],
            registry=registry,
        )
        self.upstream_failures = Counter(
            "servegate_upstream_failures_total",
            "Failed attempts to reach the model server, including those a retry recovered.",
            ["category", "cause"],
            registry=registry,
        )
        self.retries = Counter(
            "servegate_retries_total",
            "Retries of a failed attempt, and how they ended.",
            ["cause", "outcome"],
            registry=registry,
        )
        self.attempt_duration = Histogram(
            "servegate_upstream_attempt_duration_seconds",
            "Time per attempt to the model server, until its response head arrived.",
            buckets=buckets,
            registry=registry,
        )
        self.inflight = Gauge(
            "servegate_inflight_requests",
            "Requests being served.",
            registry=registry,
            multiprocess_mode=SUMMED,
        )
        self.change_inflight = _adder(self.inflight)  # +1 as a request comes, -1 as it ends
        self.scheme_info = Gauge(
            "servegate_upstream_scheme_info",
            "1 for the scheme configured (http, https or auto) and the one the server speaks.",
            ["configured", "detected"],
            registry=registry,
            multiprocess_mode=HIGHEST,
        )
        self.listener_mismatches = Counter(
            "servegate_listener_protocol_mismatch_total",
            "Data-port connections refused for speaking the other protocol (HTTPS or HTTP).",
            ["direction"],
            registry=registry,
        )
        for direction in Mismatch:
            self.listener_mismatches.labels(direction)
        self.requests_rejected = Counter(
            "servegate_requests_rejected_total",
            "Requests answered before their head could be parsed: 400 (malformed), 414 "
            "(server.max_request_line_bytes), 431 (server.max_header_bytes, max_headers).",
            ["code"],
            registry=registry,
        )
        for code in ("400", "414", "431", "501", "505"):
            self.requests_rejected.labels(code)
        # Client-side limits (server.header_timeout, server.max_connections); not in DESIGN.md.
        self.client_connections = Gauge(
            "servegate_client_connections",
            "Client connections open on the data port.",
            registry=registry,
            multiprocess_mode=PER_PROCESS,
        )
        self.client_connections_limit = Gauge(
            "servegate_client_connections_limit",
            "server.max_connections in force: client connections beyond it are closed.",
            registry=registry,
            multiprocess_mode=PER_PROCESS,
        )
        self.client_connections_refused = Counter(
            "servegate_client_connections_refused",
            "Client connections answered 429 and closed: server.max_connections were open, "
            "none idle.",
            registry=registry,
        )
        self.client_connections_reclaimed = Counter(
            "servegate_client_connections_reclaimed",
            "Idle client connections (silent, or between requests) closed for a new one: "
            "server.max_connections were open.",
            registry=registry,
        )
        self.admin = admin_listener_metrics(
            registry, self.record_listener_mismatch, self.record_client_timeout
        )
        self.client_timeouts = Counter(
            "servegate_client_timeouts",
            "Client connections closed for being too slow: headers or a TLS handshake not "
            "complete within server.header_timeout, nothing sent at all (idle), or a request "
            "body not all sent within the budget.",
            ["phase"],
            registry=registry,
        )
        for phase in TimeoutPhase:
            self.client_timeouts.labels(phase)
        self.body_buffer = Gauge(
            "servegate_request_body_buffer_bytes",
            "Bytes of request bodies kept in memory for a replay now.",
            registry=registry,
            multiprocess_mode=SUMMED,
        )
        self._change_body_buffer = _adder(self.body_buffer)
        self.body_buffer_limit = Gauge(
            "servegate_request_body_buffer_limit_bytes",
            "retry.replay_buffer_total_bytes: what those bodies may take together.",
            registry=registry,
            multiprocess_mode=SUMMED,
        )
        self.body_buffer_full = Counter(
            "servegate_request_body_buffer_full",
            "Request bodies that found that memory full, and went on as bodies over "
            "retry.replay_buffer_bytes do (streamed, or spooled when chunked).",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "servegate_queue_depth",
            "Requests waiting for a concurrency slot.",
            registry=registry,
            multiprocess_mode=SUMMED,
        )
        self.shed = Counter(
            "servegate_shed_total",
            "Requests refused to protect the model server.",
            ["reason"],
            registry=registry,
        )
        for reason in ShedReason:
            self.shed.labels(reason)
        self.upstream_up = Gauge(
            "servegate_upstream_up",
            "1 when the model server is healthy.",
            registry=registry,
            multiprocess_mode=HIGHEST,
        )
        self.upstream_restarts = Counter(
            "servegate_upstream_restarts",
            "Restarts of the model server detected (health came back, or workers died).",
            registry=registry,
        )
        self.crash_loop = Gauge(
            "servegate_upstream_crash_loop",
            "1 while the model server restarts again and again (a crash loop).",
            registry=registry,
            multiprocess_mode=HIGHEST,
        )
        self.circuit_state = Gauge(
            "servegate_circuit_state",
            "0 closed, 1 half-open, 2 open.",
            registry=registry,
            multiprocess_mode=HIGHEST,
        )
        self.worker_restarts = Counter(
            "servegate_upstream_worker_restarts",
            "Worker processes the supervised model server booted after its first ones.",
            registry=registry,
        )
        self.upgraded = Counter(
            "servegate_upgraded_connections",
            "Connections upgraded (WebSocket) after the model server's 101.",
            registry=registry,
        )
        self.upgraded_inflight = Gauge(
            "servegate_upgraded_connections_inflight",
            "Upgraded connections open now.",
            registry=registry,
            multiprocess_mode=PER_PROCESS,
        )
        # servegate's own slowness (proxy/lag.py), kept apart from the model server's.
        self.loop_lag = Counter(
            "servegate_event_loop_lag_seconds",
            "Seconds servegate's event loop ran behind its heartbeat: time every waiter in it "
            "waited for servegate, not for the model server.",
            registry=registry,
        )
        self.checks_inconclusive = Counter(
            "servegate_health_checks_inconclusive",
            "Health checks that could not be judged: servegate's own event loop was too busy "
            "to read the answer in time. They change no health state.",
            registry=registry,
        )
        for cause in Cause:
            self.answers_4503.labels(cause.category, cause)
            self.upstream_failures.labels(cause.category, cause)
        for cause in RETRYABLE_CAUSES:
            for outcome in Outcome:
                self.retries.labels(cause, outcome)
        self._answers: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._schemes: set[tuple[str, str]] = set()

    def record_answer(self, method: str, code: int, seconds: float) -> None:
        # `labels()` hashes, locks and looks up on every call; a request's pair is bound once.
        children = self._answers.get((method, code))
        if children is None:
            label = method if method in KNOWN_METHODS else "other"
            count = _adder(self.requests.labels(label, str(code)))
            children = (count, self.request_duration.labels(label))
            if method in KNOWN_METHODS:  # other methods are many: not worth keeping
                self._answers[(method, code)] = children
        children[0](1)
        children[1].observe(seconds)

    def record_scheme(self, configured: str, detected: str) -> None:
        """The one `servegate_upstream_scheme_info` series: the configured and detected scheme."""
        if self._in_memory:
            self.scheme_info.clear()
        else:  # worker processes cannot remove a series: 0 marks it gone (workers.py drops it)
            for labels in self._schemes:
                self.scheme_info.labels(*labels).set(0)
            self._schemes.add((configured, detected))
        self.scheme_info.labels(configured, detected).set(1)

    def record_4503(self, failure: Failure) -> None:
        self.answers_4503.labels(failure.category, failure.cause).inc()

    def record_failed_attempt(self, failure: Failure) -> None:
        self.upstream_failures.labels(failure.category, failure.cause).inc()

    def record_retry(self, cause: Cause, outcome: Outcome) -> None:
        self.retries.labels(cause, outcome).inc()

    def record_listener_mismatch(self, direction: Mismatch) -> None:
        self.listener_mismatches.labels(direction).inc()

    def record_body_buffer(self, change: int) -> None:
        self._change_body_buffer(change)

    def record_body_buffer_full(self) -> None:
        self.body_buffer_full.inc()

    def record_client_timeout(self, phase: TimeoutPhase) -> None:
        self.client_timeouts.labels(phase).inc()
