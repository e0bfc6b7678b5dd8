"""One queued request (``FlowItem``) and one flow's queue (``FlowQueue``).

A flow queue is a binary heap ordered by ``(order, seq)``: ``order`` is the key the band's
ordering policy gave the item when it was queued, ``seq`` the arrival number (FCFS among
equal keys). Removing an item from the middle (a client that went away, an expired TTL)
marks it and drops its counts at once; the heap entry is discarded when it reaches the top,
and the heap is rebuilt when dead entries outnumber live ones, so memory stays bounded.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any

from epp.framework.flowcontrol import FlowKey
from epp.framework.types import InferenceRequest

if TYPE_CHECKING:
    import asyncio

    from epp.flowcontrol.registry import BandState

# item states
QUEUED = 0
HANDOFF = 1  # released by the controller; the request's coroutine has not reported back yet
IN_FLIGHT = 2  # scheduled onto endpoints; counted in the in-flight ledger
DONE = 3  # finished: dispatched and completed, or ended without dispatch


class FlowItem:
    """One request inside flow control, from enqueue to its end; also the caller's ticket.

    The policies read ``request``, ``key``, ``byte_size``, ``enqueued_at``, ``ttl`` and
    ``order``; everything else belongs to the controller.
    """

    __slots__ = ("request", "key", "byte_size", "enqueued_at", "ttl", "order", "seq", "state", "future",
                 "deadline", "flow", "released_at", "sent_at", "targets", "labels", "outcome", "controller")

    def __init__(self, request: InferenceRequest, key: FlowKey, byte_size: int, enqueued_at: float,
                 ttl: float | None, seq: int) -> None:
        self.request = request
        self.key = key
        self.byte_size = byte_size
        self.enqueued_at = enqueued_at
        self.ttl = ttl  # the budget while the pool has endpoints (None: never expires)
        self.order: Any = None
        self.seq = seq
        self.state = QUEUED
        self.future: asyncio.Future[None] | None = None
        self.deadline = 0.0  # when the TTL in force expires (0: no expiry)
        self.flow: FlowQueue | None = None
        self.released_at = 0.0
        self.sent_at = 0.0  # when it was scheduled (its time in the in-flight ledger)
        self.targets: tuple[str, ...] = ()
        self.labels: tuple[str, str] = ("", "")  # (model, target model) for metric labels
        self.outcome = ""
        self.controller: Any = None

    @property
    def waited(self) -> bool:
        """Whether the request was parked in a queue (not let through at once)."""
        return self.future is not None

    @property
    def queue_time(self) -> float:
        """Seconds between enqueue and release (0 for a request that never waited)."""
        return max(0.0, self.released_at - self.enqueued_at) if self.released_at else 0.0

    # --- the caller's side (the Director) -------------------------------------------------
    def scheduled(self, targets: tuple[str, ...] | list[str]) -> None:
        """The request was scheduled onto ``targets`` (endpoint keys); it is now in flight."""
        if self.controller is not None:
            self.controller.on_scheduled(self, tuple(targets))

    def finish(self) -> None:
        """The request is over (response complete, error, or scheduling failed). Idempotent."""
        if self.controller is not None:
            self.controller.on_finished(self)

    def __repr__(self) -> str:
        return f"<FlowItem {self.request.request_id} {self.key} state={self.state}>"


class FlowQueue:
    """The queued requests of one flow (fairness id x priority), best first."""

    __slots__ = ("key", "band", "_heap", "_live", "byte_size", "idle_since", "labels")

    def __init__(self, key: FlowKey, band: "BandState") -> None:
        self.key = key
        self.band = band
        self._heap: list[tuple[Any, int, FlowItem]] = []
        self._live = 0
        self.byte_size = 0
        self.idle_since = 0.0  # when the queue last became empty (for garbage collection)
        self.labels: set[tuple[str, str]] = set()  # (model, target) pairs seen: gauge series to drop on GC

    def __len__(self) -> int:
        return self._live

    def push(self, item: FlowItem) -> None:
        heapq.heappush(self._heap, (item.order, item.seq, item))
        item.flow = self
        self._live += 1
        self.byte_size += item.byte_size

    def peek(self) -> FlowItem:
        heap = self._heap
        while heap[0][2].state != QUEUED or heap[0][2].flow is not self:
            heapq.heappop(heap)
        return heap[0][2]

    def pop(self) -> FlowItem:
        item = self.peek()
        heapq.heappop(self._heap)
        self._forget(item)
        return item

    def remove(self, item: FlowItem) -> None:
        """Take ``item`` out (it stays in the heap, dead, until it surfaces or a rebuild)."""
        self._forget(item)
        heap = self._heap
        if len(heap) > 64 and len(heap) > 2 * self._live:
            self._heap = [(i.order, i.seq, i) for i in self.live_items()]
            heapq.heapify(self._heap)

    def live_items(self) -> list[FlowItem]:
        """The queued items, in no particular order."""
        return [e[2] for e in self._heap if e[2].flow is self and e[2].state == QUEUED]

    def drain(self) -> list[FlowItem]:
        items = self.live_items()
        for item in items:
            self._forget(item)
        self._heap = []
        return items

    def _forget(self, item: FlowItem) -> None:
        item.flow = None
        self._live -= 1
        self.byte_size -= item.byte_size
