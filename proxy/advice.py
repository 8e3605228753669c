"""What each cause means and what to do about it, written once.

The error answer's hint (proxy/answer.py), `servegate doctor`'s checks (proxy/doctor/) and the
scheme probe's mismatch sentence (proxy/probe.py, shown by /readyz) all read these two tables,
so the same cause never gets two different pieces of advice.
"""

from __future__ import annotations

from proxy.failures import Cause

# What happened, in one sentence, as the error answer tells it.
WHAT: dict[Cause, str] = {
    Cause.STALE_CONNECTION: (
        "The model server closed an idle keep-alive connection as the request was sent on it."
    ),
    Cause.TLS_TO_PLAIN_SERVER: "servegate spoke HTTPS but the model server speaks plain HTTP.",
    Cause.PLAIN_TO_TLS_SERVER: "servegate spoke plain HTTP but the model server speaks HTTPS.",
    Cause.TLS_CERTIFICATE: "The model server's certificate failed verification.",
    Cause.TLS_HANDSHAKE: "The TLS handshake with the model server failed.",
    Cause.MALFORMED_RESPONSE: "The model server answered with something that is not HTTP/1.1.",
    Cause.DEADLINE_EXCEEDED: "The model did not answer within the budget.",
    Cause.DEADLINE_DURING_STREAM: "The response was still streaming when the budget ran out.",
    Cause.CONNECT_REFUSED: "The model server refused connections for the whole wait.",
    Cause.CONNECT_TIMEOUT: "No connection to the model server could be opened in time.",
    Cause.NAME_NOT_RESOLVED: "The model server's host name did not resolve to an address.",
    Cause.RESET_DURING_REQUEST: (
        "The model server dropped the connection while handling the request, as a crashing "
        "worker does."
    ),
    Cause.CRASH_LOOP: "The model server keeps restarting (a crash loop).",
    Cause.CIRCUIT_OPEN: (
        "The model server took no connections or failed its health checks, so servegate sends "
        "it no requests for now."
    ),
    Cause.UPSTREAM_UNHEALTHY: "The budget ran out while the model server was down or restarting.",
    Cause.OVERLOADED: (
        "The model server is busy with as many requests as it can take, and this one found the "
        "queue full or spent its budget waiting in it; the model server was never asked."
    ),
    Cause.RESPONSE_HEADER_TOO_LARGE: (
        "The model server sent a reason phrase or a header field (often a Set-Cookie) longer "
        "than servegate accepts."
    ),
    Cause.RESPONSE_FRAMING: (
        "The model server's answer breaks its own framing (Content-Length and "
        "Transfer-Encoding both, two lengths, a length that is not a number, an invalid "
        "chunk, or a transfer coding other than chunked)."
    ),
}

# What to do about it: the one fix for each cause, wherever servegate names that cause.
FIX: dict[Cause, str] = {
    Cause.STALE_CONNECTION: (
        "Raise the server's idle timeout (Gunicorn --keep-alive) above servegate's "
        "upstream.idle_expiry."
    ),
    Cause.TLS_TO_PLAIN_SERVER: (
        "Use an http:// upstream URL (upstream.scheme: auto never downgrades an https:// one), "
        "or serve TLS from the model server (on the platform: set the Container API protocol "
        "to HTTP)."
    ),
    Cause.PLAIN_TO_TLS_SERVER: (
        "Use an https:// upstream URL or set upstream.scheme: auto (on the platform: set the "
        "Container API protocol to HTTPS)."
    ),
    Cause.TLS_CERTIFICATE: (
        "Set upstream.tls.ca_file to the CA that signed the certificate, or "
        "upstream.tls.server_name to the name it carries."
    ),
    Cause.TLS_HANDSHAKE: (
        "Check the server's TLS versions and ciphers, and whether it requires a client "
        "certificate (upstream.tls.cert_file); a handshake that gets no answer at all is most "
        "often a plain-HTTP server behind an https:// upstream URL."
    ),
    Cause.MALFORMED_RESPONSE: "Check that the upstream URL points at the model's HTTP port.",
    Cause.DEADLINE_EXCEEDED: "Make the prediction faster, or send smaller batches.",
    Cause.DEADLINE_DURING_STREAM: (
        "Raise budget.seconds for long streams, or set budget.scope: first_byte so the budget "
        "covers only the wait for the stream to start."
    ),
    Cause.CONNECT_REFUSED: (
        "Check that the model server is running and listening on the upstream address "
        "(Gunicorn: --bind) and the URL's port."
    ),
    Cause.CONNECT_TIMEOUT: (
        "Check the upstream address, firewalls, and that the server's accept queue is not full."
    ),
    Cause.NAME_NOT_RESOLVED: (
        "Check the host name in upstream.url and the resolver (in Kubernetes: the Service's "
        "name and namespace, and the cluster DNS)."
    ),
    Cause.RESET_DURING_REQUEST: "Check the model server's log for crashing workers.",
    Cause.CRASH_LOOP: (
        "Reduce the load (lower admission.max_concurrency, or add instances) or debug the "
        "inference code."
    ),
    Cause.CIRCUIT_OPEN: "Try again after Retry-After; /readyz on the admin port says why.",
    Cause.UPSTREAM_UNHEALTHY: (
        "Find out why the model server restarts (its log), rather than raising the budget."
    ),
    Cause.OVERLOADED: "Try again after Retry-After, or add instances.",
    Cause.RESPONSE_HEADER_TOO_LARGE: (
        "Raise upstream.max_response_header_bytes (a long line), "
        "upstream.max_response_headers (many fields) or upstream.max_interim_responses (many "
        "1xx answers), or make the model server send less."
    ),
    Cause.RESPONSE_FRAMING: (
        "Fix how the server or its framework frames answers: one Content-Length, counted in "
        "bytes, not characters, or chunked alone (compression goes in Content-Encoding)."
    ),
}


# A stale connection that was a new one (the README's departure from DESIGN §1): no idle
# timeout raced it, and the keep-alive advice would send the operator the wrong way.
NEW_CONNECTION_UNREAD = (
    "The model server closed new connections before reading the request, as a worker that "
    "shuts down or a server at its connection limit does; the request never reached the "
    "application. Check the model server's log for workers exiting, and its connection limit."
)


# A certificate verified but out of date (failures.ssl_reason says "certificate has expired").
CERTIFICATE_OUT_OF_DATE = (
    "The model server's certificate has expired. Renew it (or check the clocks of both "
    "machines); neither upstream.tls.ca_file nor server_name can fix a date."
)
# servegate's own descriptors or memory ran out as it connected, or as it opened a spool file
# for a chunked body (failures.OWN_SHORTAGE).
OWN_SHORTAGE = (
    "servegate itself ran out of file descriptors or memory, opening a connection to the model "
    "server or a spool file for a large chunked body; the model server was never asked. Raise "
    "servegate's open-file limit (ulimit -n; in Kubernetes, the container runtime's), or "
    "lower server.max_connections."
)
# A new connection over server.max_connections (or server.admin_max_connections), with none of
# those open idle to close for it (proxy/listener.py).
CONNECTION_LIMIT = (
    "servegate had {limit} client connections open ({setting}), all of them busy, so it could "
    "not take this one; the model server was never asked. Try again after Retry-After; if "
    "this is steady load, raise {setting} (and the open-file limit with it) or add instances."
)
# A malformed answer that was HTTP/2: the port serves HTTP/2 only (h2c prior knowledge, or a
# gRPC port), which servegate does not speak to the model server.
HTTP2_ANSWER = (
    "The model server answered in HTTP/2, which servegate does not speak to it. Point the "
    "upstream URL at a port that serves HTTP/1.1 (a gRPC port serves HTTP/2 only: Triton's "
    "HTTP port is 8000, its gRPC port 8001), or turn HTTP/1.1 on in the server."
)


def hint(cause: Cause) -> str:
    """What happened and what to do, as the error answer's `hint` begins."""
    return f"{WHAT[cause]} {FIX[cause]}"
