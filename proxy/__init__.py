"""servegate: a reverse proxy in front of a model-inference server that turns ModelArts.4503
into no error at all, or a precise one.

One request's path through the package, file by file, in order:

 1. cli.py, __main__.py  `servegate run | doctor | check-config`; builds the settings
 2. config.py            the one frozen Settings object (defaults < YAML < environment < flags)
 3. app.py               the composition root: wires the stages below, binds the ports, and
                         stops gracefully; aiohttp_internals.py is checked here first
 4. listener.py          the data port: peeks at each connection's first byte, TLS or plain HTTP
 5. ingress.py           the handler: request id, budget, body, then forward; relays the answer
                         or answers the failure; one access line per request
 6. budget.py            the request's deadline, and the time left told to the model
 7. body.py              the client's body, read first and kept for replay up to a limit
 8. admission.py         the circuit's verdict, a concurrency slot, a bounded queue, or a 429
    headers.py           which headers cross servegate, both ways
 9. forward.py           the attempt loop: attempt, classify, decide, back off or give up
10. upstream.py          the connection pool and one attempt on it; reports reused / sent
11. failures.py          Category, Cause, Failure: the one translation of what went wrong
12. retry.py             decide() -> Retry | GiveUp; pure
13. relay.py             streams the model's response to the client unchanged
14. answer.py            a Failure -> the JSON 503/504/429 the client gets, with advice.py's hint

In the background, fed by failures: circuit.py (closed, half-open, open), health.py (up, down,
restarts, crash loop), probe.py (which scheme the server speaks), supervise.py (the model server
as a child process). Observability: metrics.py, logs.py, admin.py (/metrics, /healthz,
/readyz). A second program beside the request path: doctor/ (`servegate doctor`).
"""
