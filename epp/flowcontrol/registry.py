"""Priority bands and the flows inside them, with their capacity accounting.

Bands are created for every configured priority (and priority 0, upstream's fallback band)
and, on first use, for any other priority from the default (or negative) band template.
Flows are created on first use. Empty flows are forgotten after ``FLOW_GC_AFTER`` seconds
idle, dynamically provisioned bands after ``BAND_GC_AFTER``.
"""

from __future__ import annotations

from typing import Callable, Iterable

from epp.flowcontrol.queue import FlowItem, FlowQueue
from epp.flowcontrol.settings import BAND_GC_AFTER, FLOW_GC_AFTER, BandSettings, FlowControlSettings
from epp.framework.flowcontrol import FairnessPolicy, FlowKey, OrderingPolicy


class BandState:
    """One priority band: its flows, counts and the fairness policy's state."""

    __slots__ = ("settings", "priority", "fairness", "ordering", "fairness_state", "all_flows", "active",
                 "_sorted", "len", "byte_size", "configured", "idle_since")

    def __init__(self, settings: BandSettings, priority: int, configured: bool, now: float) -> None:
        self.settings = settings
        self.priority = priority
        self.fairness: FairnessPolicy = settings.fairness
        self.ordering: OrderingPolicy = settings.ordering
        self.fairness_state = settings.fairness.new_state()
        self.all_flows: dict[str, FlowQueue] = {}
        self.active: dict[str, FlowQueue] = {}  # non-empty flows
        self._sorted: list[FlowQueue] | None = []
        self.len = 0
        self.byte_size = 0
        self.configured = configured
        self.idle_since = now

    def flows(self) -> list[FlowQueue]:
        """The non-empty flows, sorted by fairness id (what fairness policies iterate)."""
        if self._sorted is None:
            self._sorted = [self.active[k] for k in sorted(self.active)]
        return self._sorted

    def flow(self, fairness_id: str) -> FlowQueue:
        q = self.all_flows.get(fairness_id)
        if q is None:
            q = self.all_flows[fairness_id] = FlowQueue(FlowKey(fairness_id, self.priority), self)
        return q

    def _became_active(self, q: FlowQueue) -> None:
        self.active[q.key.id] = q
        self._sorted = None

    def _became_idle(self, q: FlowQueue, now: float) -> None:
        del self.active[q.key.id]
        self._sorted = None
        q.idle_since = now
        if not self.active:
            self.idle_since = now


class FlowRegistry:
    """All bands, highest priority first, and the global counts the capacity checks use."""

    def __init__(self, settings: FlowControlSettings, now: float) -> None:
        self.settings = settings
        self.bands: dict[int, BandState] = {}
        self.priorities: list[int] = []  # highest first
        self.len = 0
        self.byte_size = 0
        for b in settings.bands:
            assert b.priority is not None
            self._add_band(b, b.priority, configured=True, now=now)
        if 0 not in self.bands:
            self._add_band(settings.default_band, 0, configured=True, now=now)

    def _add_band(self, s: BandSettings, priority: int, *, configured: bool, now: float) -> BandState:
        band = self.bands[priority] = BandState(s.at(priority), priority, configured, now)
        self.priorities = sorted(self.bands, reverse=True)
        return band

    def band(self, priority: int, now: float) -> BandState:
        band = self.bands.get(priority)
        if band is None:
            band = self._add_band(self.settings.template_for(priority), priority, configured=False, now=now)
        return band

    # --- capacity ----------------------------------------------------------------------------
    def has_room(self, band: BandState, size: int) -> bool:
        s = self.settings
        if s.max_bytes and self.byte_size + size > s.max_bytes:
            return False
        if s.max_requests and self.len + 1 > s.max_requests:
            return False
        bs = band.settings
        return band.byte_size + size <= bs.max_bytes and band.len + 1 <= bs.max_requests

    # --- membership ----------------------------------------------------------------------------
    def add(self, band: BandState, item: FlowItem) -> None:
        q = band.flow(item.key.id)
        if not len(q):
            band._became_active(q)
        q.push(item)
        band.len += 1
        band.byte_size += item.byte_size
        self.len += 1
        self.byte_size += item.byte_size

    def remove(self, item: FlowItem, now: float) -> None:
        """Take a queued item out of its flow (it was selected, expired or cancelled)."""
        q = item.flow
        assert q is not None
        q.remove(item)
        self._shrunk(q, item, now)

    def pop(self, q: FlowQueue, now: float) -> FlowItem:
        item = q.pop()
        self._shrunk(q, item, now)
        return item

    def _shrunk(self, q: FlowQueue, item: FlowItem, now: float) -> None:
        band = q.band
        band.len -= 1
        band.byte_size -= item.byte_size
        self.len -= 1
        self.byte_size -= item.byte_size
        if not len(q):
            band._became_idle(q, now)

    def drain(self, now: float) -> list[FlowItem]:
        out: list[FlowItem] = []
        for band in self.bands.values():
            for q in list(band.active.values()):
                for item in q.drain():
                    self._shrunk_counts(band, item)
                    out.append(item)
                band._became_idle(q, now)
        return out

    def _shrunk_counts(self, band: BandState, item: FlowItem) -> None:
        band.len -= 1
        band.byte_size -= item.byte_size
        self.len -= 1
        self.byte_size -= item.byte_size

    def items(self) -> Iterable[FlowItem]:
        for band in self.bands.values():
            for q in band.active.values():
                yield from q.live_items()

    # --- garbage collection ----------------------------------------------------------------------
    def collect_garbage(self, now: float, forget: Callable[[FlowQueue], None]) -> None:
        for priority in list(self.bands):
            band = self.bands[priority]
            for fid, q in list(band.all_flows.items()):
                if not len(q) and now - q.idle_since >= FLOW_GC_AFTER:
                    del band.all_flows[fid]
                    forget(q)
            if not band.configured and not band.all_flows and now - band.idle_since >= BAND_GC_AFTER:
                del self.bands[priority]
                self.priorities = sorted(self.bands, reverse=True)
