"""``epp demo``: a simulated fleet, the EPP and Envoy on 127.0.0.1, a burst of traffic, and why.

Modules: ``traffic`` (the seeded request mix and sending it with the ``openai`` SDK),
``explain`` (a scheduling decision from ``/debug/decisions`` turned into a one-line reason),
``summary`` (per-endpoint totals), ``view`` (live or plain-text output), ``cli`` (wiring).
"""
