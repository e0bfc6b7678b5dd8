"""Flow control's Prometheus series (upstream's ``llm_d_epp_flow_control_*`` names and labels).

Labelled children are cached (a ``labels()`` lookup costs more than the update). Fairness ids
and model names come from clients, so each label keeps at most ``LABEL_CAP`` distinct values;
later ones are reported as ``other``, as upstream does. A garbage-collected flow's queue
series are removed.
"""

from __future__ import annotations

from typing import Any

from epp.flowcontrol.queue import FlowItem, FlowQueue
from epp.flowcontrol.registry import BandState, FlowRegistry
from epp.observability import deferred
from epp.observability import metrics as m

LABEL_CAP = 1000
OTHER = "other"


class _Cap:
    """Passes the first ``cap`` distinct values of a label through, then ``other``."""

    __slots__ = ("seen", "cap")

    def __init__(self, cap: int = LABEL_CAP) -> None:
        self.seen: set[str] = set()
        self.cap = cap

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.cap:
            return OTHER
        self.seen.add(value)
        return value


class FlowMetrics:
    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._fid = _Cap()
        self._model = _Cap()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._labels: dict[tuple[Any, tuple[str, str]], tuple[str, str, str, str, str]] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _flow_labels(self, item: FlowItem) -> tuple[str, str, str, str, str]:
        key = (item.key, item.labels)
        labels = self._labels.get(key)
        if labels is None:
            model, target = item.labels
            labels = (self._fid(item.key.id), str(item.key.priority), self.pool, self._model(model), self._model(target))
            if len(self._labels) < 4 * LABEL_CAP:
                self._labels[key] = labels
        return labels

    # --- per request ---------------------------------------------------------------------------
    def enqueue_decision(self, item: FlowItem, outcome: str, seconds: float) -> None:
        fid, prio = self._flow_labels(item)[:2]
        deferred.observe(self._child(m.FC_ENQUEUE_DURATION, fid, prio, outcome), seconds)

    def queued(self, item: FlowItem) -> None:
        labels = self._flow_labels(item)
        self._child(m.FC_QUEUE_SIZE, *labels).inc()
        self._child(m.FC_QUEUE_BYTES, *labels).inc(item.byte_size)
        if item.flow is not None:
            item.flow.labels.add(item.labels)

    def left_queue(self, item: FlowItem) -> None:
        labels = self._flow_labels(item)
        self._child(m.FC_QUEUE_SIZE, *labels).dec()
        self._child(m.FC_QUEUE_BYTES, *labels).dec(item.byte_size)

    def finished(self, item: FlowItem, outcome: str, queue_seconds: float) -> None:
        fid, prio, pool, model, target = self._flow_labels(item)
        deferred.observe(self._child(m.FC_QUEUE_DURATION, fid, prio, outcome, pool, model, target), queue_seconds)
        self._child(m.FC_REQUESTS_TOTAL, outcome, prio, pool).inc()

    # --- per cycle / band ------------------------------------------------------------------------
    def cycle(self, seconds: float) -> None:
        deferred.observe(m.FC_DISPATCH_CYCLE, seconds)

    def saturation(self, effective: float, stages: dict[str, float]) -> None:
        self._child(m.FC_POOL_SATURATION, self.pool, "effective").set(effective)
        for stage, value in stages.items():
            self._child(m.FC_POOL_SATURATION, self.pool, stage).set(value)

    def capacity(self, registry: FlowRegistry, band: BandState) -> None:
        s = band.settings
        prio = str(band.priority)
        self._child(m.FC_CAPACITY_REQUESTS, prio, self.pool).set(band.len / s.max_requests)
        self._child(m.FC_CAPACITY_BYTES, prio, self.pool).set(band.byte_size / s.max_bytes)
        gs = registry.settings
        if gs.max_requests:
            self._child(m.FC_GLOBAL_CAPACITY_REQUESTS, self.pool).set(registry.len / gs.max_requests)
        if gs.max_bytes:
            self._child(m.FC_GLOBAL_CAPACITY_BYTES, self.pool).set(registry.byte_size / gs.max_bytes)

    def forget_flow(self, q: FlowQueue) -> None:
        """Drop the queue series of a garbage-collected flow."""
        fid = self._fid(q.key.id)
        if fid == OTHER:
            return  # shared with other flows
        for model, target in q.labels:
            self._labels.pop((q.key, (model, target)), None)
            labels = (fid, str(q.key.priority), self.pool, self._model(model), self._model(target))
            for metric in (m.FC_QUEUE_SIZE, m.FC_QUEUE_BYTES):
                self._children.pop((metric, labels), None)
                try:
                    metric.remove(*labels)
                except KeyError:
                    pass
