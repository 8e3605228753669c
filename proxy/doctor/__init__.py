"""`servegate doctor`: a second program beside the request path that probes a model server on
raw connections and says, per 4503 category, what would fail and why.

In order: command.py (runs the checks, renders the report), checkup.py (scheme, health,
latency), keepalive.py (the idle keep-alive timeout), verdicts.py (what a check finds), wire.py
(one HTTP/1.1 exchange on a raw connection).
"""

from proxy.doctor.command import main

__all__ = ["main"]
