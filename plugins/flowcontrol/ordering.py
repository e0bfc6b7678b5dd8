"""Ordering policies: which request inside one flow queue is served first (smallest key)."""

from __future__ import annotations

import math
from typing import Any

from epp.framework import register
from epp.framework.flowcontrol import OrderingPolicy, QueueItem



@register("fcfs-ordering-policy")
class FCFSOrdering(OrderingPolicy):
    """First come, first served (by the time the request was queued)."""

    def sort_key(self, item: QueueItem) -> Any:
        return item.enqueued_at


@register("edf-ordering-policy")
class EDFOrdering(OrderingPolicy):
    """Earliest deadline first: deadline = enqueue time + the request's TTL (no TTL: last);
    ties in arrival order."""

    def sort_key(self, item: QueueItem) -> Any:
        ttl = item.ttl
        return item.enqueued_at + ttl if ttl else math.inf


@register("slo-deadline-ordering-policy")
class SLODeadlineOrdering(OrderingPolicy):
    """Earliest SLO deadline first: received time + ``x-llm-d-slo-ttft-ms`` (old name
    ``x-slo-ttft-ms``); a missing or invalid value sorts last; ties in arrival order."""

    def sort_key(self, item: QueueItem) -> Any:
        ms = item.request.slo_ttft_ms  # read from the headers by the Director (0 = none or invalid)
        if ms <= 0:
            return math.inf
        return (item.request.received_at or item.enqueued_at) + ms / 1000.0
