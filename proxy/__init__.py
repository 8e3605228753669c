"""servegate: a reverse proxy in front of a model-inference server that turns ModelArts.4503
into no error at all, or a precise one.

One request's path through the package, file by file, in order:

 1. cli.py, __main__.py  `servegate run | doctor | check-config`; builds the settings, raises the
                         open-file limit (limits.py), and with --workers runs N processes that
                         share the data port (workers.py), each one all of what follows
 2. config.py            the one frozen Settings object (defaults < YAML < environment < flags)
 3. app.py               the composition root: wires the stages below, binds the ports, and
                         stops gracefully; first it checks every private aiohttp attribute
                         servegate uses (aiohttp_internals.py, the only module that touches one)
                         and starts the event-loop heartbeat (lag.py: servegate's own slowness,
                         which the connect and health-check timeouts discount)
 4. listener.py          the data port: accepts under server.max_connections, peeks at each
                         connection's first byte, TLS (tls.py: its context) or plain HTTP
 5. connection.py        one client connection: aiohttp's request handler, plus a deadline on
                         each request's head (server.header_timeout, a 408); while the event
                         loop is busy, its small writes leave at the end of the loop's step
                         (corked.py)
 6. data_server.py       the aiohttp server behind it: its options, and the JSON answer to a
                         head aiohttp cannot parse (400, 414, 431), before any handler runs
 7. ingress.py           the handler: request id (request_ids.py, which every answer's comes
                         from), budget, body, then forward; relays the answer or answers the
                         failure; one access line per request. An Upgrade (WebSocket) request
                         goes to upgrade.py instead, piped both ways
 8. budget.py            the request's deadline, and the time left told to the model
 9. body.py              the client's body, read first and kept for replay up to a limit
10. admission.py         the circuit's verdict, a concurrency slot, a bounded queue, or a 429
    headers.py           which headers cross servegate, both ways, written byte for byte
11. forward.py           the attempt loop: attempt, classify, decide, back off or give up;
                         each attempt's deadline waits on one shared timer (deadlines.py)
12. upstream.py          the pools (pool.py: no cap, the connection used last first, idle ones
                         expired) and one attempt on them; reports reused / sent, and from the
                         kernel how many request bytes the model's TCP acknowledged (acked.py:
                         the proof a replay needs); exchange.py writes the request head byte
                         for byte and reads the answer's head; framing.py holds each answer to
                         its own framing and names the bytes beyond it
13. failures.py          Category, Cause, Failure: the one translation of what went wrong
14. retry.py             decide() -> Retry | GiveUp; pure
15. relay.py             relays the model's response to the client unchanged: in one write
                         when it was read whole, else streamed as it comes
16. answer.py            a Failure -> the JSON 503/504/429 the client gets, with the hint that
                         advice.py writes once per cause (doctor/ and probe.py read it too)

In the background, fed by the checks and by failures: upstream_state.py wires the two state
machines together (what each health transition, check and attempt tells the circuit): circuit.py
(closed, half-open, open) and health.py (up, down, restarts, crash loop); probe.py (which scheme
the server speaks); supervise.py (the model server as a child process, which orphan_guard.py
ends with servegate); news.py (what a --workers parent that runs it tells its workers).
Observability:
metrics.py, logs.py, admin.py (/metrics, /healthz, /readyz). A second program beside the request
path: doctor/ (`servegate doctor`; its __init__.py lists its files in order).
"""
