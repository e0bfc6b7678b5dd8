"""Metrics of the precise prefix index and its KV-event feed, in upstream's names.

The request path only bumps plain integers (``LookupStats``) and samples one latency per
``TIMING_EVERY`` lookups; subscription counters live in the subscriber (possibly another
process). A custom collector turns all of it into metric families when ``/metrics`` is
scraped, so nothing is formatted or locked per event or per request.

Upstream (llm-d ``pkg/kvcache/metrics``): ``llm_d_epp_kv_cache_index_{admissions,evictions,
lookup_requests,lookup_hits,max_pod_hit_count}_total``, ``..._index_lookup_latency_seconds``,
``llm_d_epp_kv_cache_events_{messages_received,subscriber_reconnections,zmq_errors}_total``
(per ``pod_identifier``), ``..._events_active_subscribers``, ``..._events_stores_skipped_total``
(``cache_kind``, ``reason``). Ours (``epp_kv_events_*``): sequence gaps, replays, publisher
restarts, resets, decode errors, delivery lag, and the index size per endpoint.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Iterator

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from epp.observability import deferred
from epp.observability.metrics import REGISTRY

TIMING_EVERY = 16
LOOKUP_LATENCY = Histogram("llm_d_epp_kv_cache_index_lookup_latency_seconds",
                           "[ALPHA] Duration of precise prefix index lookups (request keys + match), sampled.",
                           buckets=(0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01),
                           registry=REGISTRY)


class LookupStats:
    """Request-path counters of one producer (plain ints; exported at scrape time)."""

    __slots__ = ("lookups", "hits", "blocks", "_n")

    def __init__(self) -> None:
        self.lookups = 0
        self.hits = 0  # sum over lookups of the best endpoint's consecutive matched blocks
        self.blocks = 0  # sum over lookups of the request's blocks
        self._n = 0

    def observe(self, total: int, best: int, seconds: float) -> None:
        self.lookups += 1
        self.hits += best
        self.blocks += total
        self._n += 1
        if self._n >= TIMING_EVERY:
            self._n = 0
            deferred.observe(LOOKUP_LATENCY, seconds)

    def as_dict(self) -> dict[str, Any]:
        return {"lookups": self.lookups, "matched_blocks": self.hits, "request_blocks": self.blocks,
                "hit_ratio": round(self.hits / self.blocks, 4) if self.blocks else None}


_producers: "weakref.WeakSet[Any]" = weakref.WeakSet()
_lock = threading.Lock()


def register(producer: Any) -> None:
    """A started precise producer: exported until ``unregister`` (or garbage collection)."""
    with _lock:
        _producers.add(producer)


def unregister(producer: Any) -> None:
    with _lock:
        _producers.discard(producer)


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, f"[ALPHA] {doc}", labels=labels)


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, f"[ALPHA] {doc}", labels=labels)


class _KVCollector(Collector):
    def collect(self) -> Iterator[Any]:
        with _lock:
            producers = list(_producers)
        pre = "llm_d_epp_kv_cache_"
        admissions = _counter(pre + "index_admissions_total", "Total number of KV-block admissions")
        evictions = _counter(pre + "index_evictions_total", "Total number of KV-block evictions by the index bound")
        lookups = _counter(pre + "index_lookup_requests_total", "Total number of lookup calls")
        hits = _counter(pre + "index_lookup_hits_total", "Contiguous prefix blocks matched by the best pod per lookup")
        max_hit = _counter(pre + "index_max_pod_hit_count_total",
                           "Longest contiguous per-pod prefix chain observed per lookup")
        entries = _gauge("epp_kv_cache_index_entries", "Entries (endpoint, block) in the precise prefix index",
                         ("endpoint",))
        active = _gauge(pre + "events_active_subscribers", "Number of ZMQ subscriptions currently managed")
        received = _counter(pre + "events_messages_received_total",
                            "Total number of messages received from ZMQ subscribers", ("pod_identifier",))
        reconnects = _counter(pre + "events_subscriber_reconnections_total",
                              "Total number of ZMQ subscriber reconnections", ("pod_identifier",))
        zmq_errors = _counter(pre + "events_zmq_errors_total", "Total number of ZMQ subscriber errors",
                              ("pod_identifier", "operation"))
        skipped = _counter(pre + "events_stores_skipped_total",
                           "KV events skipped before prefix indexing", ("cache_kind", "reason"))
        gaps = _counter("epp_kv_events_sequence_gaps_total", "Batches missing from a publisher's sequence",
                        ("pod_identifier",))
        replays = _counter("epp_kv_events_replays_total", "Replay requests by outcome", ("pod_identifier", "result"))
        restarts = _counter("epp_kv_events_publisher_restarts_total",
                            "Publisher restarts detected (its entries were cleared)", ("pod_identifier",))
        resets = _counter("epp_kv_events_resets_total",
                          "Replays that could not cover what was missed (the endpoint was reset)", ("pod_identifier",))
        connected = _gauge("epp_kv_events_connected", "1 while the subscription is connected", ("pod_identifier",))
        lag = _gauge("epp_kv_events_delivery_lag_seconds",
                     "Receive time minus the engine's timestamp of the last batch", ("pod_identifier",))
        n_subs = 0
        for p in producers:
            idx = p.index
            admissions.add_metric([], idx.admissions)
            evictions.add_metric([], idx.evictions)
            lookups.add_metric([], p.stats.lookups)
            hits.add_metric([], p.stats.hits)
            max_hit.add_metric([], p.stats.hits)
            for ep in idx.endpoints():
                entries.add_metric([ep], idx.entries(ep))
            feed = p.feed
            if feed is None:
                continue
            for st in feed.statuses():
                ep = st["endpoint"]
                n_subs += 1
                received.add_metric([ep], st["messages"])
                reconnects.add_metric([ep], st["reconnections"])
                for op, n in st["errors"].items():
                    zmq_errors.add_metric([ep, op], n)
                gaps.add_metric([ep], st["gaps"])
                replays.add_metric([ep, "ok"], st["replays"] - st["replay_failures"])
                replays.add_metric([ep, "failed"], st["replay_failures"])
                restarts.add_metric([ep], st["restarts"])
                resets.add_metric([ep], st["resets"])
                connected.add_metric([ep], 1 if st["connected"] else 0)
                lag.add_metric([ep], st["delivery_lag_s"])
            for reason, n in feed.counters().get("skipped", {}).items():
                skipped.add_metric(["gpu", reason], n)
        active.add_metric([], n_subs)
        yield from (admissions, evictions, lookups, hits, max_hit, entries, active, received, reconnects,
                    zmq_errors, skipped, gaps, replays, restarts, resets, connected, lag)


REGISTRY.register(_KVCollector())
