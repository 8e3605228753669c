"""Settings: one frozen pydantic model, loaded from defaults < YAML file < environment < flags.

This is the only module that reads the environment. Everything else receives the `Settings`
object (or one slice of it) explicitly.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

ENV_PREFIX = "SERVEGATE_"
# An upstream host as yarl gives it (IDNA-encoded, IPv6 without brackets): a DNS name (with
# `_`, which Kubernetes and Docker names may carry), an IPv4 address, or an IPv6 one.
_HOST_NAME = re.compile(
    r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*"
)
MiB = 1024 * 1024
# Limits handed to C code (llhttp's parser, listen(2)) as a C int: a larger number would
# overflow there, after start-up, on every connection.
C_INT_MAX = 2**31 - 1
# YAML 1.1, which PyYAML reads (in the file and in SERVEGATE_* values), turns on/off into
# booleans: for a setting whose words they are, they mean the words.
_BOOLEAN_WORDS = {"tls": ("off", "on")}


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """true/false is a boolean only where a boolean is meant: pydantic would read it as
        the number 1 or 0 (a 1-byte body limit, one concurrency slot)."""
        if not isinstance(value, bool) or info.field_name is None:
            return value
        if (words := _BOOLEAN_WORDS.get(info.field_name)) is not None:
            return words[value]
        if cls.model_fields[info.field_name].annotation is bool:
            return value
        raise ValueError(
            "is no true/false setting (YAML reads yes/no/on/off as true/false: quote a word)"
        )


def _check_address(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT, e.g. 0.0.0.0:8080 or [::1]:8080")
    return value


Address = Annotated[str, AfterValidator(_check_address)]


def split_address(address: str) -> tuple[str, int]:
    """'[::1]:8080' -> ('::1', 8080); the host keeps no brackets so it can be bound."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _certificate_with_key(cert_file: Path | None, key_file: Path | None) -> None:
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file must be set together")


class ServerSettings(_Section):
    listen: Address = "0.0.0.0:8080"  # the port such platforms call by default
    admin_listen: Address = "0.0.0.0:9464"  # clear of Prometheus 9090, Pushgateway 9091
    # The client, not servegate, should close idle connections: a gateway that reuses a
    # connection servegate is closing would see the very race servegate hides upstream.
    # 620 s outlasts the 600 s idle timeout of common cloud load balancers.
    client_keepalive: Seconds = 620.0
    # "off": plain HTTP. "on": HTTPS only (cert_file and key_file required). "auto": one port
    # serves both, telling them apart by the first byte of each connection, so the call works
    # whichever protocol the platform is set to; without files, a self-signed certificate.
    tls: Literal["off", "on", "auto"] = "off"
    cert_file: Path | None = None
    key_file: Path | None = None
    # Request head limits, answered 414 (the request target) and 431 (a header name or a
    # header value, each on its own, or too many headers) with the JSON body. 8190 bytes is
    # aiohttp's default and within nginx's 8 KiB large_client_header_buffers; 128 headers is
    # aiohttp's default.
    max_request_line_bytes: int = Field(default=8190, ge=256, le=C_INT_MAX)
    max_header_bytes: int = Field(default=8190, ge=256, le=C_INT_MAX)
    max_headers: int = Field(default=128, ge=8, le=C_INT_MAX)
    # Pass `Upgrade` requests (WebSocket) to the model server and pipe both directions after
    # its 101. false: the Upgrade header is dropped and the request goes on as plain HTTP, as
    # nginx does without `proxy_set_header Upgrade`.
    upgrades: bool = True
    # Seconds an upgraded connection may stay silent in both directions before servegate
    # closes it; 600 s matches the idle timeout of common cloud load balancers.
    upgrade_idle_timeout: Seconds = 600.0
    # On SIGTERM, /readyz fails at once but the data port keeps serving this long, so load
    # balancers see the failed probe before connections are refused (Knative's drainer does
    # the same); then in-flight requests drain within the budget. 0: stop accepting at once.
    shutdown_quiet: float = Field(default=5.0, ge=0, allow_inf_nan=False)
    # A request whose headers have not all arrived this long after their first byte is
    # answered 408 and closed (nginx's client_header_timeout, 60 s by default, is the same
    # idea; a gateway sends its headers in one packet, so 10 s is ample and frees a slowloris
    # client's connection six times sooner). It applies to every request of a connection.
    header_timeout: Seconds = 10.0
    # A new connection that sends nothing at all this long is closed (nginx gives a client
    # its client_header_timeout, 60 s, to start a request); it bounds the descriptors idle
    # connections can hold. Counted in servegate_client_timeouts_total{phase="idle"}.
    first_byte_timeout: Seconds = 60.0
    # Client connections open at once; beyond it a new one is closed at once (counted, and
    # logged at most every 10 s). "auto": a third of the open-file limit left after 64
    # descriptors for servegate itself, since every client connection may hold two more (the
    # model server's connection and its acknowledgement counter), as HAProxy sizes its maxconn
    # from `ulimit -n`.
    max_connections: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # Connections open at once on the admin port (Prometheus, the kubelet's probes: a few);
    # beyond it a new one is closed at once. Its connections have the data port's
    # header_timeout, and one silent for 60 s is closed, so no client can hold the
    # descriptors the data port and the model server's connections need.
    admin_max_connections: int = Field(default=64, ge=1, le=C_INT_MAX)
    # Largest request body, answered 413: before a byte of it is read when Content-Length
    # declares more, else when a chunked body grows past it. A chunked body larger than the
    # replay buffer is spooled to a temporary file (as nginx's proxy_request_buffering does)
    # so the model gets a Content-Length; this bounds that file. 1 GiB: far above any
    # prediction payload (the platform stops at 12 MB), small enough for a container's disk.
    max_body_bytes: int = Field(default=1024 * MiB, ge=1)
    # Connections the kernel queues for accept() on the data port. Linux caps it at
    # net.core.somaxconn (4096 since Linux 5.4), and start-up logs the effective value; asyncio's
    # 100 and nginx's 511 drop connection bursts that a model's clients do send.
    backlog: int = Field(default=4096, ge=1, le=65535)
    # Share the data port with other processes (SO_REUSEPORT), each accepting its own
    # connections. `servegate run --workers N` sets it for its workers.
    reuse_port: bool = False

    @model_validator(mode="after")
    def _tls_files(self) -> ServerSettings:
        _certificate_with_key(self.cert_file, self.key_file)
        if self.tls == "on" and self.cert_file is None:
            raise ValueError("tls: on needs cert_file and key_file (or use tls: auto)")
        return self

    @model_validator(mode="after")
    def _two_ports(self) -> ServerSettings:
        data, admin = split_address(self.listen), split_address(self.admin_listen)
        wildcard = {"", "0.0.0.0", "::"}
        same_host = data[0] == admin[0] or bool({data[0], admin[0]} & wildcard)
        if data[1] == admin[1] != 0 and same_host:
            raise ValueError(
                f"listen ({self.listen}) and admin_listen ({self.admin_listen}) must be two "
                "different ports"
            )
        return self


class UpstreamTLSSettings(_Section):
    verify: bool = True
    ca_file: Path | None = None
    server_name: str | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTLSSettings:
        _certificate_with_key(self.cert_file, self.key_file)
        return self

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("no such file")
        return value


class UpstreamSettings(_Section):
    url: str = "http://127.0.0.1:8000"  # Gunicorn's default bind
    # "url": speak the URL's scheme; a mismatch is reported, never papered over. "auto": speak
    # what the server speaks (a TLS probe decides, and decides again after a mismatch); an
    # https:// URL is never downgraded to plain HTTP.
    scheme: Literal["url", "auto"] = "url"
    connect_timeout: Seconds = 2.0
    # Used until the server announces `Keep-Alive: timeout=N`: safely under Gunicorn's 2 s.
    idle_expiry: Seconds = 1.0
    # Longest reason phrase, and longest header field (name and value together), accepted
    # from the model server; longer is a 502 protocol/response_header_too_large. 8190 bytes
    # is aiohttp's default.
    max_response_header_bytes: int = Field(default=8190, ge=256, le=C_INT_MAX)
    # Most header fields accepted in one answer from the model server; more is a 502
    # protocol/response_header_too_large. 128 is aiohttp's default, as server.max_headers.
    max_response_headers: int = Field(default=128, ge=8, le=C_INT_MAX)
    # Most interim answers (1xx: 102 Processing, 103 Early Hints) accepted before the final
    # one; more is a 502 protocol/response_header_too_large. Each is relayed as it comes, so a
    # model that sent them without end would cost servegate and the client without bound. A
    # 102 every second through the 40 s budget is 40.
    max_interim_responses: int = Field(default=100, ge=1, le=C_INT_MAX)
    tls: UpstreamTLSSettings = UpstreamTLSSettings()

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = URL(value)
            port = url.port
        except ValueError:
            raise ValueError("must be an http:// or https:// URL with a host") from None
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ValueError("must be an http:// or https:// URL with a host")
        if not _HOST_NAME.fullmatch(url.raw_host):
            # It becomes the Host field of every request, and what the resolver is asked.
            raise ValueError(
                "must name a host by a DNS name (letters, digits, '-', '_', '.') or an IP address"
            )
        if url.path not in ("", "/") or url.query_string or url.fragment:
            raise ValueError("must name only scheme, host and port (paths are forwarded as sent)")
        if url.user is not None or url.password is not None:
            # servegate sends no credentials of its own, and a password would be logged.
            raise ValueError("must carry no user or password (user:password@)")
        if port == 0:
            raise ValueError("must name a port from 1 to 65535")
        return value

    @property
    def origin(self) -> URL:
        return URL(self.url).origin()


class BudgetSettings(_Section):
    seconds: Seconds = 40.0  # the platform's API gateway allows 40 s per prediction
    # Answer this long before the budget ends, so servegate's precise error beats the gateway's.
    margin: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    # "response": the whole answer must be sent within the budget, as the platform counts it.
    # "first_byte": the budget ends when the answer starts; a stream may then run on.
    scope: Literal["response", "first_byte"] = "response"

    @model_validator(mode="after")
    def _margin_fits(self) -> BudgetSettings:
        if self.margin >= self.seconds:
            raise ValueError(
                f"margin ({self.margin}) must be smaller than seconds ({self.seconds})"
            )
        return self


class RetrySettings(_Section):
    # The platform refuses request bodies over 12 MB, so every request it passes on fits.
    replay_buffer_bytes: int = Field(default=12 * MiB, ge=0)
    # The memory all bodies kept for a replay may take together, per process. Bodies are read
    # before a request waits for a concurrency slot, so one is held per request in flight;
    # past this, a body is handled as one over replay_buffer_bytes (streamed, or spooled when
    # chunked), and is not replayed once sent.
    replay_buffer_total_bytes: int = Field(default=256 * MiB, ge=0)
    # Jittered exponential backoff for a refused connection (a restarting server).
    backoff_initial: Seconds = 0.05
    backoff_max: Seconds = 1.0
    # How long refused (or timed-out) connects are retried for one request: long enough to
    # ride out a model server's master restarting (a Gunicorn boots in about a second), short
    # enough that a server that is down answers in seconds, not at the end of the budget.
    connect_wait: Seconds = 3.0
    # The same while the supervised model server is known to be booting (supervise mode
    # only): its start-up, loading a model, can take longer; the budget still bounds it.
    boot_wait: Seconds = 20.0
    # Methods whose requests may be replayed after the model server dropped them mid-request
    # (service/reset_during_request): only for inference that is safe to run twice. At most
    # once per request, and never a request that was on two crashed workers already.
    replay_after_reset: tuple[str, ...] = ()

    @field_validator("replay_after_reset")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(method.upper() for method in value)


class HealthSettings(_Section):
    # GET this path and expect a 2xx; null: a TCP connect is the check.
    path: str | None = None
    # A dead server is noticed within 2 intervals at the thresholds. At least 0.1 s: each
    # check opens a connection to the model server.
    interval: Annotated[float, Field(ge=0.1, allow_inf_nan=False)] = 1.0
    timeout: Seconds = 1.0
    unhealthy_threshold: int = Field(default=2, ge=1)
    healthy_threshold: int = Field(default=1, ge=1)
    # This many restarts within crash_loop_window seconds is a crash loop.
    crash_loop_restarts: int = Field(default=3, ge=2)
    crash_loop_window: Seconds = 60.0

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must start with /")
        return value


class CircuitSettings(_Section):
    # Requests in a row that gave up on an unreachable server (refused, timed-out or
    # unresolvable connects for their whole retry.connect_wait; each counts once) that open the
    # circuit; health checks failing open it too.
    failure_threshold: int = Field(default=5, ge=1)
    # While open, a new request waits this long for the server to return, then fails fast.
    # 0: fail fast at once (restarts are ridden out by retry.connect_wait before it opens).
    wait: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # Open this long at least before requests try the server again (half-open).
    open_seconds: Seconds = 5.0


class AdmissionSettings(_Section):
    # Requests sent to the model server at once; set it to what the model can take (for
    # Gunicorn: workers x threads). 0: no limit.
    max_concurrency: int = Field(default=0, ge=0)
    # Requests waiting for a slot; beyond it, 429 at once. Waiting counts against the budget.
    # Envoy's default for pending requests per cluster (max_pending_requests) is 1024.
    max_queue: int = Field(default=1024, ge=0)
    # Retry-After on a 429, in seconds.
    retry_after: int = Field(default=1, ge=1)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    redact_headers: tuple[str, ...] = (
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-auth-token",
    )

    @field_validator("redact_headers")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(name.lower() for name in value)


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    budget: BudgetSettings = BudgetSettings()
    retry: RetrySettings = RetrySettings()
    health: HealthSettings = HealthSettings()
    circuit: CircuitSettings = CircuitSettings()
    admission: AdmissionSettings = AdmissionSettings()
    logging: LoggingSettings = LoggingSettings()


# Settings that no longer exist, and what took their place: an old file that sets one stops
# start-up with this line instead of silently losing the limit its operator meant.
REMOVED = {
    "upstream.max_connections": "removed: the connection pool no longer queues requests out "
    "of sight; to limit requests at the model server set admission.max_concurrency (the wait "
    "then shows in servegate_queue_depth and draws on the budget)",
}


class SettingsError(Exception):
    """Invalid settings; `problems` holds one human-readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Loaded(NamedTuple):
    """The settings, and the `SERVEGATE_*` environment variables that were ignored."""

    settings: Settings
    ignored: tuple[IgnoredVariable, ...]


@dataclass(frozen=True)
class IgnoredVariable:
    """An environment variable that starts with SERVEGATE_ but names no setting; never its value."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}; ignored"


def load(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from every source, highest priority last.

    Raises SettingsError for an invalid value, or an unknown key in the file or the overrides.
    Ignored environment variables are not reported: callers with an operator to tell use
    `load_with_warnings`.
    """
    return load_with_warnings(config_file, environ, overrides).settings


def load_with_warnings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Loaded:
    """As `load`, and the SERVEGATE_* variables that name no setting, for the caller to log.

    The environment is shared with everything else in the container: Kubernetes alone adds
    SERVEGATE_PORT, SERVEGATE_SERVICE_HOST... to every pod of a namespace with a Service named
    servegate. So a variable that names no setting is a warning, never a refusal; the file and
    the flags belong to servegate alone, and an unknown key there still stops start-up.
    """
    from_environ, ignored = _from_environ(os.environ if environ is None else environ)
    layers = [
        _read_yaml(config_file) if config_file else {},
        from_environ,
        _nest(overrides or {}),
    ]
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge(merged, layer)
    problems = [f"{key}: {why}" for key, why in REMOVED.items() if _pop(merged, key)]
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        problems += _describe_all(exc.errors())
    if problems:
        raise SettingsError(problems)
    return Loaded(settings, tuple(ignored))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise SettingsError([f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}"]) from None
    except yaml.YAMLError as exc:
        raise SettingsError([f"{path}: not valid YAML: {exc}".replace("\n", " ")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError([f"{path}: must be a mapping of sections, got {type(data).__name__}"])
    return data


def _from_environ(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[IgnoredVariable]]:
    """SERVEGATE_UPSTREAM__URL=x -> {"upstream": {"url": x}}; values are read as YAML scalars.

    A variable that names no setting is returned apart, with the reason, and not used.
    """
    flat: dict[str, Any] = {}
    ignored: list[IgnoredVariable] = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        # A removed setting is refused wherever it comes from: whoever set it meant it.
        reason = None if ".".join(path) in REMOVED else _names_no_setting(name, path)
        if reason is not None:
            ignored.append(IgnoredVariable(name, reason))
            continue
        try:
            flat[".".join(path)] = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError:
            flat[".".join(path)] = raw
    return _nest(flat), ignored


# Kubernetes gives every container <SERVICE>_SERVICE_HOST, <SERVICE>_SERVICE_PORT[_<NAME>],
# <SERVICE>_PORT and <SERVICE>_PORT_<N>_<PROTO>[_ADDR|_PORT|_PROTO] for each Service in its
# namespace (enableServiceLinks, on by default); a Service named servegate-x gives SERVEGATE_X_...
_SERVICE_LINK = re.compile(
    r"(?P<service>[A-Z0-9_]+?)_(?:SERVICE_HOST|SERVICE_PORT(?:_\w+)?"
    r"|PORT(?:_\d+_(?:TCP|UDP|SCTP)(?:_(?:ADDR|PORT|PROTO))?)?)"
)


def _names_no_setting(name: str, path: list[str]) -> str | None:
    """Why SERVEGATE_<path> is not a setting, in a few words; None when it is one."""
    model: type[BaseModel] = Settings
    for depth, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None and depth == 0:
            link = _SERVICE_LINK.fullmatch(name)
            if link:
                service = link["service"].lower().replace("_", "-")
                return f"a Kubernetes service link (Service {service!r}), not a setting"
            return (
                "not a setting (those are SERVEGATE_<SECTION>__<KEY>, e.g. SERVEGATE_UPSTREAM__URL)"
            )
        section = ".".join(path[:depth])
        if field is None:
            known = [
                f"{ENV_PREFIX}{'__'.join([*path[:depth], key]).upper()}"
                for key in model.model_fields
            ]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return f"section {section} has no setting {part!r}{hint}"
        if depth + 1 == len(path):
            break
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return f"{'.'.join(path[: depth + 1])} is a setting, not a section"
        model = field.annotation
    if len(path) == 1:
        return f"names the section {path[0]}, not one of its settings ({name}__<KEY>)"
    return None


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _pop(nested: dict[str, Any], dotted: str) -> bool:
    """Remove a dotted key from merged settings (whose sections are fresh dicts); True if set."""
    *parents, leaf = dotted.split(".")
    node: Any = nested
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        return False
    del node[leaf]
    return True


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _describe_all(errors: list[Any]) -> list[str]:
    """One line per problem setting: a value that fits no branch of a union (a number or
    "auto") gets pydantic's error for each branch, joined into one line."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for error in errors:
        grouped.setdefault(_key(error), []).append(error)
    return [_describe(key, group) for key, group in grouped.items()]


# A setting's or section's name; a union's branches add their own to an error's location
# ("constrained-int", "literal['auto']"), which name nothing the operator wrote.
_SETTING_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def _key(error: Mapping[str, Any]) -> str:
    parts = [
        str(part)
        for part in error["loc"]
        if isinstance(part, int) or _SETTING_NAME.fullmatch(str(part))
    ]
    return ".".join(parts) or "(top level)"


def _describe(key: str, group: list[Mapping[str, Any]]) -> str:
    first = group[0]
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown setting"
    said = dict.fromkeys(str(error["msg"]).removeprefix("Value error, ") for error in group)
    message = " or ".join(said)
    if isinstance(first["input"], Mapping):  # a rule across keys: the message names them
        return f"{key}: {message}"
    given = first["input"]
    if isinstance(given, str):  # a URL's password goes to no log, this line included
        given = _URL_PASSWORD.sub(r"\1***@", given)
    return f"{key}: {message} (got {given!r})"


_URL_PASSWORD = re.compile(r"(//[^/@\s:]*:)[^/@\s]*@")


def effective(settings: Settings) -> dict[str, Any]:
    """The settings as plain data, for `check-config` and the start-up log line."""
    return settings.model_dump(mode="json")
