"""How a queued request ends, and the HTTP answer each ending gets (upstream's table).

Every request that enters flow control ends with exactly one ``Outcome``; the names are
upstream's (they are the ``outcome`` label of ``llm_d_epp_flow_control_requests_total``).
Non-dispatch outcomes become a ``RequestError``: status, ``inference error: <Code> - <Msg>``
body and the ``x-llm-d-request-dropped-reason`` header, exactly as upstream's admission
controller maps them (429 = capacity exists but is contended, 503 = no serving capacity).
"""

from __future__ import annotations

import enum

from epp.requestcontrol.errors import RequestError

DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"

# upstream's error texts (pkg/epp/flowcontrol/types/errors.go), which end up in the body
_REJECTED = "request rejected pre-queue"
_EVICTED = "request evicted from queue"
_AT_CAPACITY = "queue at capacity"
_NO_ENDPOINTS = "no endpoints available"
_TTL = "request TTL expired"
_CANCELLED = "request context cancelled"
_NOT_RUNNING = "flow controller is not running"


class Outcome(enum.Enum):
    DISPATCHED = "Dispatched"
    REJECTED_CAPACITY = "RejectedCapacity"
    REJECTED_NO_ENDPOINTS = "RejectedNoEndpoints"
    REJECTED_OTHER = "RejectedOther"
    EVICTED_TTL = "EvictedTTL"
    EVICTED_NO_ENDPOINTS = "EvictedNoEndpoints"
    EVICTED_CONTEXT_CANCELLED = "EvictedContextCancelled"
    EVICTED_OTHER = "EvictedOther"


def _error(code: str, message: str, reason: str) -> RequestError:
    return RequestError(code, message, headers={DROPPED_REASON_HEADER: reason})


def rejected_capacity(pool_empty: bool) -> RequestError:
    if pool_empty:
        return _error("ServiceUnavailable", f"no endpoints available: {_REJECTED}: {_NO_ENDPOINTS}",
                      "rejected-no-endpoints")
    return _error("ResourceExhausted", f"{_REJECTED}: {_AT_CAPACITY}", "rejected-saturated")


def evicted_ttl(pool_empty: bool) -> RequestError:
    if pool_empty:
        return _error("ServiceUnavailable", "request timed out in queue and no endpoints are available: "
                      f"{_EVICTED}: {_TTL}: {_NO_ENDPOINTS}", "rejected-no-endpoints")
    return _error("ResourceExhausted", f"request timed out in queue: {_EVICTED}: {_TTL}", "rejected-ttl-expired")


def evicted_cancelled() -> RequestError:
    return _error("ServiceUnavailable", f"client disconnected: {_EVICTED}: {_CANCELLED}: context canceled",
                  "rejected-context-cancelled")


def shutting_down(queued: bool) -> RequestError:
    return _error("ServiceUnavailable", f"flow controller shutting down: {_EVICTED if queued else _REJECTED}: "
                  f"{_NOT_RUNNING}", "rejected-shutting-down")


def internal(detail: str) -> RequestError:
    return _error("Internal", f"internal flow control error: {detail}", "rejected-internal")
