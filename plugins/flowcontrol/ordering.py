"""Ordering policies: which request inside one flow queue is served first (smallest key)."""

from __future__ import annotations

import math
from typing import Any

from epp.framework import register
from epp.framework.flowcontrol import OrderingPolicy, QueueItem

SLO_TTFT_HEADERS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")  # new name first; the old one still accepted


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
        headers = item.request.headers
        for name in SLO_TTFT_HEADERS:
            raw = headers.get(name)
            if raw is None:
                continue
            try:
                ms = float(raw.strip())
            except ValueError:
                return math.inf
            if not math.isfinite(ms) or ms <= 0:
                return math.inf
            received = item.request.received_at or item.enqueued_at
            return received + ms / 1000.0
        return math.inf
